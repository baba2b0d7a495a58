//! The producer's HTTP API, for the upstream platform: a workspace's Facebook connection. Every
//! route wants `Authorization: Bearer <AE_API__KEY>`, compared in constant time; without a key
//! configured the API does not start, unless `AE_API__INSECURE_DEV_MODE=true` (the demo).
//!
//! | route | does |
//! |---|---|
//! | `POST /v1/workspaces/{ws}/connection/oauth` `{connected_by?}` | Meta's dialog URL with a sealed, expiring `state` |
//! | `POST /v1/workspaces/{ws}/connection/oauth/callback` `{code, state}` or `{error, state}` | finishes the connect: the upstream page at `redirect_uri` forwards both, naming the workspace of the person's session; a state issued for another workspace, or used before, is refused |
//! | `PUT /v1/workspaces/{ws}/connection/system-user-token` `{token, connected_by?}` | sets or replaces the system user token |
//! | `PUT /v1/workspaces/{ws}/connection/ad-accounts` `{ad_account_ids}` | selects ad accounts, checks their terms |
//! | `GET /v1/workspaces/{ws}/connection` | status, never the token |
//! | `DELETE /v1/workspaces/{ws}/connection` | disconnects, deleting the tokens |
//! | `POST /v1/exports` (a job, the queue's contract) | records and queues it: 202 `{export_id, created, status}`; idempotent on `export_id`, 409 if the id names another job |
//! | `GET /v1/exports/{id}` | status, counts so far, per audience progress, started, deadline |
//! | `POST /v1/exports/{id}/cancel` `{cancelled_by?}` | no more shard is sent; it finishes `cancelled` |
//! | `GET /v1/exports?workspace_id=&limit=` | a workspace's recent exports, newest first |

use crate::connect::{ConnectError, Connector};
use crate::exports::{Exports, ExportsError};
use audience_export_core::contract::{ExportId, WorkspaceId};
use axum::body::Bytes;
use axum::extract::{FromRef, MatchedPath, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use prometheus::IntCounterVec;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Who may call: the digest of the key, or anyone in insecure dev mode.
#[derive(Clone)]
enum Access {
    Key([u8; 32]),
    Anyone,
}

impl Access {
    /// The API's access rule from the settings, or why it must not start.
    pub fn from_settings(
        api: &audience_export_core::config::ApiSettings,
    ) -> anyhow::Result<Access> {
        match (&api.key, api.insecure_dev_mode) {
            (Some(key), _) if !key.expose_secret().is_empty() => Ok(Access::Key(
                Sha256::digest(key.expose_secret().as_bytes()).into(),
            )),
            (_, true) => {
                warn!(message = "The HTTP API serves WITHOUT an API key (AE_API__INSECURE_DEV_MODE). Never do this in a deployment.");
                Ok(Access::Anyone)
            }
            _ => anyhow::bail!(
                "AE_API__KEY is not set: the producer's HTTP API refuses to start without one \
                 (AE_API__INSECURE_DEV_MODE=true serves without a key, for a demo on a laptop only)"
            ),
        }
    }

    /// Digests first, so the comparison takes the same time whatever the presented key's
    /// length or content.
    fn allows(&self, presented: Option<&str>) -> bool {
        match self {
            Access::Anyone => true,
            Access::Key(expected) => {
                let Some(presented) = presented else {
                    return false;
                };
                let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
                digest.ct_eq(expected).into()
            }
        }
    }
}

/// What the handlers share: connections on one side, exports on the other.
#[derive(Clone)]
pub struct Services {
    pub connector: Arc<Connector>,
    pub exports: Arc<Exports>,
}

impl FromRef<Services> for Arc<Connector> {
    fn from_ref(s: &Services) -> Arc<Connector> {
        s.connector.clone()
    }
}

impl FromRef<Services> for Arc<Exports> {
    fn from_ref(s: &Services) -> Arc<Exports> {
        s.exports.clone()
    }
}

/// Binds the API and serves it until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    api: &audience_export_core::config::ApiSettings,
    services: Services,
    requests: IntCounterVec,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let access = Access::from_settings(api)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(services, access, requests);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(message = "HTTP API failed.", %error);
        }
    });
    info!(message = "HTTP API listening.", addr = %bound);
    Ok(bound)
}

fn router(services: Services, access: Access, requests: IntCounterVec) -> Router {
    Router::new()
        .route("/v1/exports", post(submit_export).get(list_exports))
        .route("/v1/exports/{id}", get(export_status))
        .route("/v1/exports/{id}/cancel", post(cancel_export))
        .route(
            "/v1/workspaces/{ws}/connection",
            get(status).delete(disconnect),
        )
        .route("/v1/workspaces/{ws}/connection/oauth", post(start_oauth))
        .route(
            "/v1/workspaces/{ws}/connection/system-user-token",
            put(system_token),
        )
        .route(
            "/v1/workspaces/{ws}/connection/ad-accounts",
            put(ad_accounts),
        )
        .route(
            "/v1/workspaces/{ws}/connection/oauth/callback",
            post(callback),
        )
        .layer(middleware::from_fn_with_state(access, authorize))
        .layer(middleware::from_fn_with_state(requests, count))
        .with_state(services)
}

/// Counts every request by its route template (never the workspace id) and status.
async fn count(State(requests): State<IntCounterVec>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    response
}

async fn authorize(State(access): State<Access>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if access.allows(presented) {
        next.run(request).await
    } else {
        warn!(message = "API request refused: missing or wrong API key.", path = %request.uri().path());
        error_response(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key: send `Authorization: Bearer <key>`",
        )
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            warn!(message = "Connection request failed.", error = %self);
        }
        error_response(status, &self.to_string())
    }
}

impl IntoResponse for ExportsError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            warn!(message = "Export request failed.", error = %self);
        }
        error_response(status, &self.to_string())
    }
}

type Shared = State<Arc<Connector>>;
type ExportsState = State<Arc<Exports>>;

fn export_id(raw: String) -> Result<ExportId, ExportsError> {
    ExportId::parse(raw).map_err(|e| ExportsError::Invalid(e.to_string()))
}

async fn submit_export(State(e): ExportsState, body: Bytes) -> Result<Response, ExportsError> {
    let submitted = e.submit(&body).await?;
    Ok((StatusCode::ACCEPTED, Json(submitted)).into_response())
}

async fn export_status(
    State(e): ExportsState,
    Path(id): Path<String>,
) -> Result<Response, ExportsError> {
    Ok(Json(e.status(&export_id(id)?).await?).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Cancel {
    cancelled_by: Option<String>,
}

async fn cancel_export(
    State(e): ExportsState,
    Path(id): Path<String>,
    body: Option<Json<Cancel>>,
) -> Result<Response, ExportsError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let view = e
        .cancel(&export_id(id)?, body.cancelled_by.as_deref())
        .await?;
    Ok(Json(view).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    workspace_id: String,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    50
}

async fn list_exports(
    State(e): ExportsState,
    Query(q): Query<ListQuery>,
) -> Result<Response, ExportsError> {
    let ws =
        WorkspaceId::parse(q.workspace_id).map_err(|e| ExportsError::Invalid(e.to_string()))?;
    let exports = e.list(&ws, q.limit.clamp(1, 200)).await?;
    Ok(Json(json!({ "exports": exports })).into_response())
}

/// The workspace a route names, parsed at the edge: an id that could not be a workspace is a
/// 400 with the rule, before anything reads Redis.
fn workspace(raw: String) -> Result<WorkspaceId, ConnectError> {
    WorkspaceId::parse(raw).map_err(|e| ConnectError::BadRequest(e.to_string()))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartOAuth {
    connected_by: Option<String>,
}

async fn start_oauth(
    State(c): Shared,
    Path(ws): Path<String>,
    body: Option<Json<StartOAuth>>,
) -> Result<Response, ConnectError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let start = c.start_oauth(&workspace(ws)?, body.connected_by.as_deref())?;
    Ok(Json(start).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Callback {
    #[serde(default)]
    code: Option<String>,
    state: String,
    /// Set by Meta when the person declined the dialog.
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_reason: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

async fn callback(
    State(c): Shared,
    Path(ws): Path<String>,
    Json(body): Json<Callback>,
) -> Result<Response, ConnectError> {
    let code = match (body.code, body.error) {
        (Some(code), None) if !code.is_empty() => code,
        (_, Some(error)) => {
            return Err(ConnectError::Refused(format!(
                "Facebook was not connected: the dialog answered `{error}` ({})",
                body.error_reason
                    .or(body.error_description)
                    .unwrap_or_else(|| "no reason given".into())
            )))
        }
        _ => return Err(ConnectError::BadRequest("code is missing".into())),
    };
    let view = c
        .complete_oauth(&workspace(ws)?, &code, &body.state)
        .await?;
    Ok(Json(view).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SystemToken {
    token: SecretString,
    #[serde(default)]
    connected_by: Option<String>,
}

async fn system_token(
    State(c): Shared,
    Path(ws): Path<String>,
    Json(body): Json<SystemToken>,
) -> Result<Response, ConnectError> {
    let view = c
        .set_system_token(&workspace(ws)?, body.token, body.connected_by.as_deref())
        .await?;
    Ok(Json(view).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdAccounts {
    ad_account_ids: Vec<String>,
}

async fn ad_accounts(
    State(c): Shared,
    Path(ws): Path<String>,
    Json(body): Json<AdAccounts>,
) -> Result<Response, ConnectError> {
    let view = c
        .select_ad_accounts(&workspace(ws)?, &body.ad_account_ids)
        .await?;
    Ok(Json(view).into_response())
}

async fn status(State(c): Shared, Path(ws): Path<String>) -> Result<Response, ConnectError> {
    Ok(Json(c.status(&workspace(ws)?).await?).into_response())
}

async fn disconnect(State(c): Shared, Path(ws): Path<String>) -> Result<Response, ConnectError> {
    c.disconnect(&workspace(ws)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use audience_export_core::config::ApiSettings;

    #[test]
    fn the_key_is_required_unless_insecure_dev_mode() {
        let mut api = ApiSettings::default();
        let refused = Access::from_settings(&api).err().expect("no key, no API");
        assert!(refused.to_string().contains("AE_API__KEY"));
        api.key = Some(SecretString::from(""));
        assert!(
            Access::from_settings(&api).is_err(),
            "an empty key is no key"
        );
        api.insecure_dev_mode = true;
        assert!(Access::from_settings(&api).expect("dev mode").allows(None));
    }

    #[test]
    fn only_the_exact_key_is_allowed() {
        let api = ApiSettings {
            key: Some(SecretString::from("s3cret-key")),
            ..ApiSettings::default()
        };
        let access = Access::from_settings(&api).expect("a key");
        assert!(access.allows(Some("s3cret-key")));
        assert!(!access.allows(None));
        assert!(!access.allows(Some("")));
        assert!(!access.allows(Some("s3cret-ke")));
        assert!(!access.allows(Some("s3cret-key ")));
    }
}
