//! HTTP calls to the Graph API. Tokens travel in the `Authorization` header or a form body, not
//! the URL, which proxies log; the one exception is `debug_token`'s `input_token`, a query
//! parameter in the only form Meta documents (GET). `appsecret_proof` goes with the parameters.
//! Payloads are form-encoded with `payload` as a JSON string, as Meta's own SDKs send them.

use super::classify::{classify, ErrorClass};
use super::usage::Usage;
use crate::contract::AdAccountId;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::Sha256;
use std::time::Duration;

/// Meta's error envelope, `{"error": {...}}`. `error_user_msg` is safe to show a marketer.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct MetaError {
    #[serde(default)]
    pub message: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub error_subcode: Option<i64>,
    #[serde(default)]
    pub is_transient: bool,
    #[serde(default)]
    pub error_user_title: Option<String>,
    #[serde(default)]
    pub error_user_msg: Option<String>,
    #[serde(default)]
    pub fbtrace_id: Option<String>,
}

#[derive(Deserialize)]
struct Envelope {
    error: MetaError,
}

/// Everything a Graph call can fail with. `class()` says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("Meta answered HTTP {status}: {} (code {:?}, subcode {:?})", .error.message, .error.code, .error.error_subcode)]
    Meta {
        status: u16,
        error: Box<MetaError>,
        /// What the answer's usage headers said (throttling answers carry them too).
        usage: Option<Usage>,
    },
    #[error("the Graph API could not be reached: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("the Graph API answered HTTP {status} with a body that is not Graph JSON: {detail}")]
    Unexpected { status: u16, detail: String },
}

impl GraphError {
    pub fn class(&self) -> ErrorClass {
        match self {
            GraphError::Meta { status, error, .. } => {
                classify(*status, error.code, error.error_subcode, error.is_transient)
            }
            GraphError::Transport(_) => ErrorClass::Transient,
            GraphError::Unexpected { status, .. } => classify(*status, None, None, false),
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// The sentence for the marketer's report: what failed, and the fix when there is one
    /// (reconnect, regain access, accept the terms). Starts with the class for token, permission,
    /// terms and audience failures so reports and events can be read by people and by code.
    pub fn explain(&self, ad_account: &AdAccountId) -> String {
        let said = self.user_message();
        let act = ad_account.act();
        match self.class() {
            ErrorClass::TokenInvalid => self.token_reason(),
            ErrorClass::PermissionLost => format!("permission lost: the connected user can no longer manage ad account {act} ({said}). Ask an admin of the ad account to grant access again."),
            ErrorClass::TermsNotAccepted => format!("terms not accepted: accept the Custom Audience terms for {act} at {}", ad_account.terms_url()),
            ErrorClass::AudienceGone => format!("audience gone: the audience was deleted or is no longer shared with this account ({said})."),
            _ => said,
        }
    }

    /// The sentence for a refused token (class `TokenInvalid`): it names no ad account.
    pub fn token_reason(&self) -> String {
        format!(
            "token invalid: Meta refused the Facebook connection ({}). Reconnect Facebook for this workspace.",
            self.user_message()
        )
    }

    /// The usage headers of the answer that failed, if any.
    pub fn usage(&self) -> Option<Usage> {
        match self {
            GraphError::Meta { usage, .. } => *usage,
            _ => None,
        }
    }

    /// Meta's code and subcode, when Meta answered.
    pub fn meta(&self) -> Option<&MetaError> {
        match self {
            GraphError::Meta { error, .. } => Some(error.as_ref()),
            _ => None,
        }
    }

    /// The sentence a marketer may read: Meta's user message when it sent one.
    pub fn user_message(&self) -> String {
        match self {
            GraphError::Meta { error, .. } => error
                .error_user_msg
                .clone()
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| error.message.clone()),
            other => other.to_string(),
        }
    }
}

/// Meta's answer to `POST /{audience_id}/users`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct AddUsersResponse {
    #[serde(default)]
    pub audience_id: String,
    #[serde(default)]
    pub session_id: serde_json::Value,
    #[serde(default)]
    pub num_received: u64,
    #[serde(default)]
    pub num_invalid_entries: u64,
    #[serde(default)]
    pub invalid_entry_samples: serde_json::Value,
    /// The answer's usage headers, if Meta sent them.
    #[serde(skip)]
    pub usage: Option<Usage>,
}

#[derive(Deserialize)]
struct IdResponse {
    id: String,
}

/// Meta's answer to `GET /debug_token`: what a token is, for whom, until when.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenInfo {
    #[serde(default)]
    pub is_valid: bool,
    /// Unix seconds; 0 for a token that does not expire.
    #[serde(default)]
    pub expires_at: u64,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub app_id: Option<String>,
    /// `USER`, `SYSTEM_USER`, `PAGE`, `APP`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Why the token is not valid, when Meta says (`is_valid: false`).
    #[serde(default)]
    pub error: Option<TokenInfoError>,
}

/// `debug_token`'s `data.error`: the code (190) and message of an invalid token.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenInfoError {
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub subcode: Option<i64>,
    #[serde(default)]
    pub message: String,
}

/// One entry of `/me/adaccounts`: an ad account the token can use, and its `account_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedAdAccount {
    pub id: AdAccountId,
    /// Meta's `account_status`: 1 active, 2 disabled, 3 unsettled, 7 pending risk review, 8
    /// pending settlement, 9 in grace period, 100 pending closure, 101 closed (the Marketing
    /// API's ad account reference; the same values as the Business SDKs' constants). None when
    /// Meta left it out.
    pub account_status: Option<i64>,
}

impl ListedAdAccount {
    /// Disabled or (being) closed: Custom Audiences cannot be exported to it. Unsettled, risk
    /// review, settlement and grace period stop ads, not audiences: those stay usable.
    pub fn is_disabled(&self) -> bool {
        matches!(self.account_status, Some(2 | 100 | 101))
    }
}

#[derive(Deserialize)]
struct TokenInfoEnvelope {
    data: TokenInfo,
}

/// An access token Meta issued, with its lifetime when Meta says it.
#[derive(Deserialize)]
pub struct IssuedToken {
    pub access_token: SecretString,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

/// One page of a Graph edge: its entries and the cursor to the next.
#[derive(Deserialize)]
struct Page<T> {
    #[serde(default = "Vec::new")]
    data: Vec<T>,
    #[serde(default)]
    paging: Option<Paging>,
}

impl<T> Page<T> {
    /// The cursor of the next page, when Meta says there is one.
    fn next(&mut self) -> Option<String> {
        self.paging
            .take()
            .filter(|p| p.next.is_some())
            .and_then(|p| p.cursors)
            .and_then(|c| c.after)
    }
}

#[derive(Deserialize)]
struct AdAccountEntry {
    #[serde(default)]
    account_id: Option<String>,
    #[serde(default)]
    id: String,
    #[serde(default)]
    account_status: Option<i64>,
}

#[derive(Deserialize)]
struct Paging {
    #[serde(default)]
    cursors: Option<Cursors>,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
struct Cursors {
    #[serde(default)]
    after: Option<String>,
}

#[derive(Deserialize)]
struct AudienceEntry {
    id: String,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
struct TosAnswer {
    #[serde(default)]
    tos_accepted: serde_json::Value,
}

/// A Graph API client bound to one base URL and version; tokens are passed per call because
/// each workspace has its own.
#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    base: String,
    app_secret: Option<SecretString>,
}

impl GraphClient {
    pub fn new(
        base_url: &str,
        version: &str,
        app_secret: Option<SecretString>,
        timeout: Duration,
    ) -> anyhow::Result<GraphClient> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(GraphClient {
            http,
            base: format!("{}/{}", base_url.trim_end_matches('/'), version),
            app_secret,
        })
    }

    pub fn from_settings(settings: &crate::config::GraphSettings) -> anyhow::Result<GraphClient> {
        GraphClient::new(
            &settings.base_url,
            &settings.version,
            settings.app_secret.clone(),
            Duration::from_millis(settings.timeout_ms),
        )
    }

    /// Creates a new, empty customer-list audience and returns its id.
    pub async fn create_custom_audience(
        &self,
        token: &SecretString,
        ad_account: &AdAccountId,
        name: &str,
        description: &str,
        customer_file_source: &str,
    ) -> Result<String, GraphError> {
        let url = format!("{}/{}/customaudiences", self.base, ad_account.act());
        let form = vec![
            ("name", name.to_owned()),
            ("description", description.to_owned()),
            ("subtype", "CUSTOM".to_owned()),
            ("customer_file_source", customer_file_source.to_owned()),
        ];
        let body = self.post(&url, token, form).await?;
        let created: IdResponse = decode(200, &body)?;
        Ok(created.id)
    }

    /// Creates a lookalike of `origin` (`subtype=LOOKALIKE`) as the job's `lookalike` says: one
    /// country goes as `lookalike_spec.country`, several as its `location_spec`.
    pub async fn create_lookalike(
        &self,
        token: &SecretString,
        ad_account: &AdAccountId,
        name: &str,
        description: &str,
        origin: &str,
        like: &crate::contract::Lookalike,
    ) -> Result<String, GraphError> {
        let url = format!("{}/{}/customaudiences", self.base, ad_account.act());
        let spec = match like.countries.as_slice() {
            [country] => serde_json::json!({ "country": country, "ratio": like.ratio }),
            countries => serde_json::json!({
                "ratio": like.ratio,
                "location_spec": { "geo_locations": { "countries": countries } },
            }),
        };
        let form = vec![
            ("name", name.to_owned()),
            ("description", description.to_owned()),
            ("subtype", "LOOKALIKE".to_owned()),
            ("origin_audience_id", origin.to_owned()),
            ("lookalike_spec", spec.to_string()),
        ];
        let body = self.post(&url, token, form).await?;
        let created: IdResponse = decode(200, &body)?;
        Ok(created.id)
    }

    /// The size Meta shows for an audience: `approximate_count_lower_bound` and
    /// `_upper_bound` (Meta reveals no exact count). Absent bounds (an audience still being
    /// processed answers -1 or nothing) are None.
    pub async fn audience_size(
        &self,
        token: &SecretString,
        audience_id: &str,
    ) -> Result<(Option<u64>, Option<u64>), GraphError> {
        #[derive(Deserialize)]
        struct Size {
            approximate_count_lower_bound: Option<i64>,
            approximate_count_upper_bound: Option<i64>,
        }
        let url = format!("{}/{audience_id}", self.base);
        let query = [(
            "fields",
            "approximate_count_lower_bound,approximate_count_upper_bound",
        )];
        let body = self.get(&url, token, &query).await?;
        let size: Size = decode(200, &body)?;
        let bound = |b: Option<i64>| b.and_then(|n| u64::try_from(n).ok());
        Ok((
            bound(size.approximate_count_lower_bound),
            bound(size.approximate_count_upper_bound),
        ))
    }

    /// The id of the ad account's custom audience whose description is `description`, if there
    /// is one: how an export finds the audience it created when the answer to the create call
    /// was lost (a timeout, a 5xx after Meta applied it, a crash before the id was recorded).
    /// Meta lists newest first, so ours is on the first page unless the account is very busy;
    /// the walk is bounded (10 pages of 100, beyond the ~500 audiences an account may hold).
    pub async fn find_audience(
        &self,
        token: &SecretString,
        ad_account: &AdAccountId,
        description: &str,
    ) -> Result<Option<String>, GraphError> {
        let url = format!("{}/{}/customaudiences", self.base, ad_account.act());
        let mut found = None;
        let query = [("fields", "id,description"), ("limit", "100")];
        self.pages(&url, token, &query, 10, |page: Vec<AudienceEntry>| {
            found = page
                .into_iter()
                .find(|a| a.description.as_deref() == Some(description))
                .map(|a| a.id);
            found.is_none()
        })
        .await?;
        Ok(found)
    }

    /// Walks an edge's pages (cursor `after`), at most `max_pages`, handing each page's entries
    /// to `visit` while it answers true (go on).
    async fn pages<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        token: &SecretString,
        query: &[(&str, &str)],
        max_pages: usize,
        mut visit: impl FnMut(Vec<T>) -> bool,
    ) -> Result<(), GraphError> {
        let mut after: Option<String> = None;
        for _ in 0..max_pages {
            let mut query = query.to_vec();
            if let Some(cursor) = &after {
                query.push(("after", cursor));
            }
            let body = self.get(url, token, &query).await?;
            let mut page: Page<T> = decode(200, &body)?;
            after = page.next();
            if !visit(std::mem::take(&mut page.data)) || after.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Adds one batch of single-key entries (at most 10,000) to an audience.
    pub async fn add_users(
        &self,
        token: &SecretString,
        audience_id: &str,
        schema: &str,
        data: &[String],
    ) -> Result<AddUsersResponse, GraphError> {
        let url = format!("{}/{}/users", self.base, audience_id);
        let body = self
            .post_encoded(&url, token, users_form(schema, data))
            .await?;
        let mut answer: AddUsersResponse = decode(200, &body)?;
        answer.usage = body.1;
        Ok(answer)
    }

    /// Exchanges the OAuth dialog's `code` for a (short-lived) user token. The app's secret
    /// and the code travel in the body, not the URL.
    pub async fn exchange_code(
        &self,
        app_id: &str,
        app_secret: &SecretString,
        redirect_uri: &str,
        code: &str,
    ) -> Result<IssuedToken, GraphError> {
        let form = [
            ("client_id", app_id),
            ("client_secret", app_secret.expose_secret()),
            ("redirect_uri", redirect_uri),
            ("code", code),
        ];
        self.oauth(&form).await
    }

    /// Exchanges a short-lived user token for a long-lived one (about 60 days).
    pub async fn exchange_long_lived(
        &self,
        app_id: &str,
        app_secret: &SecretString,
        short: &SecretString,
    ) -> Result<IssuedToken, GraphError> {
        let form = [
            ("grant_type", "fb_exchange_token"),
            ("client_id", app_id),
            ("client_secret", app_secret.expose_secret()),
            ("fb_exchange_token", short.expose_secret()),
        ];
        self.oauth(&form).await
    }

    async fn oauth(&self, form: &[(&str, &str)]) -> Result<IssuedToken, GraphError> {
        let url = format!("{}/oauth/access_token", self.base);
        let body = serde_urlencoded::to_string(form).expect("string pairs always encode");
        let request = self
            .http
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        let answer = self.send(request).await?;
        // Not `decode`: its error quotes the body, which here holds a token.
        serde_json::from_slice(&answer.0).map_err(|_| GraphError::Unexpected {
            status: 200,
            detail: "the token exchange answered without an access_token".into(),
        })
    }

    /// What Meta says about `token`: validity, expiry, scopes. The token asks about itself.
    pub async fn debug_token(&self, token: &SecretString) -> Result<TokenInfo, GraphError> {
        let url = format!("{}/debug_token", self.base);
        let body = self
            .get(&url, token, &[("input_token", token.expose_secret())])
            .await?;
        let envelope: TokenInfoEnvelope = decode(200, &body)?;
        Ok(envelope.data)
    }

    /// The ad accounts `token` may use, every page of them.
    pub async fn ad_accounts(&self, token: &SecretString) -> Result<Vec<AdAccountId>, GraphError> {
        let listed = self.listed_ad_accounts(token).await?;
        Ok(listed.into_iter().map(|a| a.id).collect())
    }

    /// The ad accounts `token` may use with their `account_status`, every page of them, sorted
    /// by id: what the connection health check compares the selection with.
    pub async fn listed_ad_accounts(
        &self,
        token: &SecretString,
    ) -> Result<Vec<ListedAdAccount>, GraphError> {
        let url = format!("{}/me/adaccounts", self.base);
        let mut accounts = Vec::new();
        let query = [("fields", "account_id,account_status"), ("limit", "500")];
        // Bounded: 50 pages of 500 is far beyond any real business.
        self.pages(&url, token, &query, 50, |page: Vec<AdAccountEntry>| {
            // An id Meta spells in a way we cannot read is not one a job could name either.
            accounts.extend(page.into_iter().filter_map(|a| {
                let id = AdAccountId::parse(a.account_id.as_deref().unwrap_or(&a.id)).ok()?;
                Some(ListedAdAccount {
                    id,
                    account_status: a.account_status,
                })
            }));
            true
        })
        .await?;
        accounts.sort_by(|a, b| a.id.cmp(&b.id));
        accounts.dedup_by(|a, b| a.id == b.id);
        Ok(accounts)
    }

    /// Whether the Custom Audience terms are accepted for `ad_account`.
    pub async fn tos_accepted(
        &self,
        token: &SecretString,
        ad_account: &AdAccountId,
    ) -> Result<bool, GraphError> {
        let url = format!("{}/{}", self.base, ad_account.act());
        let body = self.get(&url, token, &[("fields", "tos_accepted")]).await?;
        let answer: TosAnswer = decode(200, &body)?;
        Ok(answer
            .tos_accepted
            .get("custom_audience_tos")
            .and_then(serde_json::Value::as_i64)
            == Some(1))
    }

    async fn get(
        &self,
        url: &str,
        token: &SecretString,
        query: &[(&str, &str)],
    ) -> Result<bytes_body::Body, GraphError> {
        let proof = self.appsecret_proof(token);
        let mut request = self.http.get(url).query(query).header(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", token.expose_secret()),
        );
        if let Some(proof) = &proof {
            request = request.query(&[("appsecret_proof", proof)]);
        }
        self.send(request).await
    }

    async fn post(
        &self,
        url: &str,
        token: &SecretString,
        form: Vec<(&'static str, String)>,
    ) -> Result<bytes_body::Body, GraphError> {
        let body = serde_urlencoded::to_string(&form).map_err(|e| GraphError::Unexpected {
            status: 0,
            detail: format!("the request could not be encoded: {e}"),
        })?;
        self.post_encoded(url, token, body).await
    }

    /// POSTs a form-encoded body, adding `appsecret_proof`.
    async fn post_encoded(
        &self,
        url: &str,
        token: &SecretString,
        mut body: String,
    ) -> Result<bytes_body::Body, GraphError> {
        if let Some(proof) = self.appsecret_proof(token) {
            body.push_str("&appsecret_proof=");
            body.push_str(&proof);
        }
        let request = self
            .http
            .post(url)
            .header(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {}", token.expose_secret()),
            )
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        self.send(request).await
    }

    /// Sends a request and sorts its answer: a body, or Meta's error with its usage headers.
    /// Errors never carry the URL, which may hold `input_token`.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<bytes_body::Body, GraphError> {
        let response = request
            .send()
            .await
            .map_err(|e| GraphError::Transport(e.without_url()))?;
        let status = response.status().as_u16();
        let usage = Usage::from_headers(response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| GraphError::Transport(e.without_url()))?;
        if !(200..300).contains(&status) {
            return Err(error_from(status, &bytes, usage));
        }
        // Meta sometimes answers 200 with an error envelope.
        if let Ok(env) = serde_json::from_slice::<Envelope>(&bytes) {
            return Err(GraphError::Meta {
                status,
                error: Box::new(env.error),
                usage,
            });
        }
        Ok(bytes_body::Body(bytes.to_vec(), usage))
    }

    /// `appsecret_proof`: hex HMAC-SHA256 of the token keyed by the app secret.
    fn appsecret_proof(&self, token: &SecretString) -> Option<String> {
        let secret = self.app_secret.as_ref()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(token.expose_secret().as_bytes());
        Some(hex::encode(mac.finalize().into_bytes()))
    }
}

/// The form body `payload=<JSON>` of an add-users call, as Meta's SDKs send it. Entries made
/// only of characters that neither JSON nor a form escapes (hex digests, MADIDs) are written
/// straight in: encoding 10,000 of them through the general encoders cost more than hashing them.
pub fn users_form(schema: &str, data: &[String]) -> String {
    // Comparisons on ranges, folded without a branch: this check reads every byte of the
    // payload, and so written it vectorizes (a 256-entry table did not: a tenth of an email
    // shard's time on a Zen 2 core).
    let plain = |s: &str| {
        s.bytes().fold(true, |ok, b| {
            ok & (((b | 0x20).wrapping_sub(b'a') < 26)
                | (b.wrapping_sub(b'0') < 10)
                | (b == b'-')
                | (b == b'.')
                | (b == b'_'))
        })
    };
    if !plain(schema) || !data.iter().all(|d| plain(d)) {
        return general_users_form(schema, data);
    }
    let mut out = String::with_capacity(64 + data.iter().map(|d| d.len() + 9).sum::<usize>());
    out.push_str("payload=%7B%22schema%22%3A%22");
    out.push_str(schema);
    out.push_str("%22%2C%22data%22%3A%5B");
    for (i, entry) in data.iter().enumerate() {
        if i > 0 {
            out.push_str("%2C");
        }
        out.push_str("%22");
        out.push_str(entry);
        out.push_str("%22");
    }
    out.push_str("%5D%7D");
    out
}

#[derive(serde::Serialize)]
struct UsersPayload<'a> {
    schema: &'a str,
    data: &'a [String],
}

fn general_users_form(schema: &str, data: &[String]) -> String {
    let payload =
        serde_json::to_string(&UsersPayload { schema, data }).expect("strings always serialize");
    serde_urlencoded::to_string([("payload", payload)]).expect("a string pair always encodes")
}

mod bytes_body {
    /// A successful answer's body, kept opaque so callers decode it through `decode`, and its
    /// usage headers.
    pub struct Body(pub Vec<u8>, pub Option<super::Usage>);
}

fn decode<T: serde::de::DeserializeOwned>(
    status: u16,
    body: &bytes_body::Body,
) -> Result<T, GraphError> {
    serde_json::from_slice(&body.0).map_err(|e| GraphError::Unexpected {
        status,
        detail: format!("{e}: {}", snippet(&body.0)),
    })
}

fn error_from(status: u16, bytes: &[u8], usage: Option<Usage>) -> GraphError {
    match serde_json::from_slice::<Envelope>(bytes) {
        Ok(env) => GraphError::Meta {
            status,
            error: Box::new(env.error),
            usage,
        },
        Err(_) => GraphError::Unexpected {
            status,
            detail: snippet(bytes),
        },
    }
}

/// The start of an unexpected body, for the error message (HTML pages from a proxy, say).
fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]);
    text.chars().filter(|c| !c.is_control()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appsecret_proof_is_hmac_sha256_of_the_token() {
        let client = GraphClient::new(
            "http://x",
            "v27.0",
            Some(SecretString::from("secret")),
            Duration::from_secs(1),
        )
        .expect("client");
        let proof = client
            .appsecret_proof(&SecretString::from("token"))
            .expect("proof");
        // Computed independently: printf token | openssl dgst -sha256 -hmac secret
        assert_eq!(
            proof,
            "e941110e3d2bfe82621f0e3e1434730d7305d106c5f68c87165d0b27a4611a4a"
        );
    }

    #[test]
    fn the_fast_users_form_is_byte_for_byte_the_general_encoding() {
        let general = general_users_form;
        let hashes: Vec<String> = (0..3).map(|i| format!("{i:064x}")).collect();
        assert_eq!(
            users_form("EMAIL_SHA256", &hashes),
            general("EMAIL_SHA256", &hashes)
        );
        let madids = vec!["6d92078a-8246-4ba4-ae5b-76104861e7dc".to_owned()];
        assert_eq!(
            users_form("MOBILE_ADVERTISER_ID", &madids),
            general("MOBILE_ADVERTISER_ID", &madids)
        );
        let odd = vec!["a\"b c&d".to_owned()];
        assert_eq!(
            users_form("EMAIL", &odd),
            general("EMAIL", &odd),
            "falls back when escaping is needed"
        );
        assert_eq!(
            users_form("EMAIL_SHA256", &[]),
            general("EMAIL_SHA256", &[])
        );
        // Every character, in an entry of its own and between others: what is not plain falls
        // back, what is plain is written as the general encoding writes it.
        for c in (0u8..=255).map(char::from) {
            let entries = vec![c.to_string(), format!("a{c}b")];
            assert_eq!(
                users_form("EMAIL", &entries),
                general("EMAIL", &entries),
                "{c:?}"
            );
        }
    }

    #[test]
    fn an_html_error_page_is_unexpected_and_transient_on_5xx() {
        let err = error_from(502, b"<html>Bad gateway</html>", None);
        assert!(matches!(err, GraphError::Unexpected { .. }));
        assert_eq!(err.class(), ErrorClass::Transient);
        let err = error_from(
            400,
            br#"{"error":{"message":"x","code":80003,"error_user_msg":"Too many calls"}}"#,
            None,
        );
        assert_eq!(err.class(), ErrorClass::Throttled);
        assert_eq!(err.user_message(), "Too many calls");
    }
}
