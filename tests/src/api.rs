//! Typed calls to the producer's HTTP API, one method per endpoint, so a test reads
//! `app.connection_status("ws-2").await.status` instead of building paths and bodies by hand.
//! Each goes through `TestApp::api_call` (the app's key) or `TestApp::api_call_with_key` (no key,
//! or a wrong one: `app.without_key()`, `app.with_key(..)`). Workspace ids are taken as `&str`
//! and put in the path as they are, so a test can send one the API must refuse. Nothing here
//! asserts: a test decides what an answer must be.

use crate::app::TestApp;
use reqwest::Method;
use serde_json::{json, Value};
use std::fmt;

/// The API's answer: its HTTP status and its JSON body (a JSON string holding the text when the
/// body is not JSON, `""` when there is none).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
}

impl ApiResponse {
    /// The `error` sentence of a refusal, or "" when there is none.
    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }

    /// The `dialog_url` of an OAuth start; panics, showing the answer, when there is none.
    pub fn dialog_url(&self) -> url::Url {
        let url = self.body["dialog_url"]
            .as_str()
            .unwrap_or_else(|| panic!("no dialog_url in the answer: {self}"));
        url::Url::parse(url).unwrap_or_else(|e| panic!("dialog_url is not a URL ({e}): {self}"))
    }
}

impl fmt::Display for ApiResponse {
    /// `<status> <body>`: for assertion messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

/// Which key a call presents.
#[derive(Clone)]
enum Key {
    /// The app's own (`TestApp::api_call`).
    App,
    /// The one given, or none.
    Given(Option<String>),
}

/// The API's endpoints, called with one choice of key. `TestApp`'s methods of the same names
/// call with the app's key.
pub struct ApiCaller<'a> {
    app: &'a TestApp,
    key: Key,
}

fn connection(ws: &str) -> String {
    format!("/v1/workspaces/{ws}/connection")
}

impl ApiCaller<'_> {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> ApiResponse {
        let (status, body) = match &self.key {
            Key::App => self.app.api_call(method, path, body).await,
            Key::Given(key) => {
                self.app
                    .api_call_with_key(method, path, body, key.as_deref())
                    .await
            }
        };
        ApiResponse { status, body }
    }

    /// `POST .../connection/oauth`: Meta's dialog URL with a sealed state. Without
    /// `connected_by` the request has no body at all (it is optional).
    pub async fn start_oauth(&self, ws: &str, connected_by: Option<&str>) -> ApiResponse {
        let body = connected_by.map(|email| json!({ "connected_by": email }));
        self.call(Method::POST, &format!("{}/oauth", connection(ws)), body)
            .await
    }

    /// `POST .../connection/oauth/callback` with what the dialog sent back.
    pub async fn oauth_callback(&self, ws: &str, code: &str, state: &str) -> ApiResponse {
        self.call(
            Method::POST,
            &format!("{}/oauth/callback", connection(ws)),
            Some(json!({ "code": code, "state": state })),
        )
        .await
    }

    /// `POST .../connection/oauth/callback` for a dialog the person declined.
    pub async fn oauth_declined(
        &self,
        ws: &str,
        error: &str,
        error_reason: &str,
        state: &str,
    ) -> ApiResponse {
        self.call(
            Method::POST,
            &format!("{}/oauth/callback", connection(ws)),
            Some(json!({ "error": error, "error_reason": error_reason, "state": state })),
        )
        .await
    }

    /// `PUT .../connection/system-user-token`.
    pub async fn set_system_user_token(
        &self,
        ws: &str,
        token: &str,
        connected_by: Option<&str>,
    ) -> ApiResponse {
        let mut body = json!({ "token": token });
        if let Some(email) = connected_by {
            body["connected_by"] = json!(email);
        }
        self.call(
            Method::PUT,
            &format!("{}/system-user-token", connection(ws)),
            Some(body),
        )
        .await
    }

    /// `PUT .../connection/ad-accounts`: ids as the caller spells them (`1001` or `act_1001`).
    pub async fn select_ad_accounts(&self, ws: &str, ids: &[&str]) -> ApiResponse {
        self.call(
            Method::PUT,
            &format!("{}/ad-accounts", connection(ws)),
            Some(json!({ "ad_account_ids": ids })),
        )
        .await
    }

    /// `GET .../connection`.
    pub async fn connection_status(&self, ws: &str) -> ApiResponse {
        self.call(Method::GET, &connection(ws), None).await
    }

    /// `DELETE .../connection`.
    pub async fn disconnect(&self, ws: &str) -> ApiResponse {
        self.call(Method::DELETE, &connection(ws), None).await
    }
}

impl TestApp {
    /// The API called with this app's key.
    pub fn with_app_key(&self) -> ApiCaller<'_> {
        ApiCaller {
            app: self,
            key: Key::App,
        }
    }

    /// The API called without any key.
    pub fn without_key(&self) -> ApiCaller<'_> {
        ApiCaller {
            app: self,
            key: Key::Given(None),
        }
    }

    /// The API called with `key` instead of the app's.
    pub fn with_key(&self, key: &str) -> ApiCaller<'_> {
        ApiCaller {
            app: self,
            key: Key::Given(Some(key.to_owned())),
        }
    }

    /// `ApiCaller::start_oauth` with the app's key.
    pub async fn start_oauth(&self, ws: &str, connected_by: Option<&str>) -> ApiResponse {
        self.with_app_key().start_oauth(ws, connected_by).await
    }

    /// `ApiCaller::oauth_callback` with the app's key.
    pub async fn oauth_callback(&self, ws: &str, code: &str, state: &str) -> ApiResponse {
        self.with_app_key().oauth_callback(ws, code, state).await
    }

    /// `ApiCaller::oauth_declined` with the app's key.
    pub async fn oauth_declined(
        &self,
        ws: &str,
        error: &str,
        error_reason: &str,
        state: &str,
    ) -> ApiResponse {
        self.with_app_key()
            .oauth_declined(ws, error, error_reason, state)
            .await
    }

    /// `ApiCaller::set_system_user_token` with the app's key.
    pub async fn set_system_user_token(
        &self,
        ws: &str,
        token: &str,
        connected_by: Option<&str>,
    ) -> ApiResponse {
        self.with_app_key()
            .set_system_user_token(ws, token, connected_by)
            .await
    }

    /// `ApiCaller::select_ad_accounts` with the app's key.
    pub async fn select_ad_accounts(&self, ws: &str, ids: &[&str]) -> ApiResponse {
        self.with_app_key().select_ad_accounts(ws, ids).await
    }

    /// `ApiCaller::connection_status` with the app's key.
    pub async fn connection_status(&self, ws: &str) -> ApiResponse {
        self.with_app_key().connection_status(ws).await
    }

    /// `ApiCaller::disconnect` with the app's key.
    pub async fn disconnect(&self, ws: &str) -> ApiResponse {
        self.with_app_key().disconnect(ws).await
    }
}
