//! Connecting a workspace to Facebook: the OAuth dialog and its callback, the system user token,
//! the choice of ad accounts with their terms status, status and disconnect. The HTTP API and
//! the operators' CLI both call this; neither holds any logic of its own.
//!
//! Every token Meta issues goes straight into `Connections` (sealed); none is logged, returned
//! or put in an error message.

use audience_export_core::amqp::{self, Publisher, Topology};
use audience_export_core::config::Settings;
use audience_export_core::connection::{
    AdAccountStatus, ConnectionError, ConnectionView, Connections, NewToken,
};
use audience_export_core::contract::{
    looks_like_email, AdAccountId, ConnectionStatus, Event, WorkspaceId,
};
use audience_export_core::graph::{ErrorClass, GraphClient, GraphError};
use audience_export_core::progress::now_ms;
use audience_export_core::token_cipher::TokenCipher;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

/// The scope every token needs to manage Custom Audiences.
pub const REQUIRED_SCOPE: &str = "ads_management";

/// Why a connection operation failed. `status()` is the HTTP status the API answers with;
/// `is_retryable()` says whether trying again later may work.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    BadRequest(String),
    #[error("workspace {0} has no Facebook connection")]
    NotConnected(WorkspaceId),
    #[error("the connect attempt is not valid: {0}. Start connecting again.")]
    BadState(&'static str),
    /// Meta refused what we asked, or the token cannot do what exports need.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotConfigured(String),
    #[error("Meta could not be reached or failed: {0}")]
    Meta(String),
    #[error(transparent)]
    Store(#[from] ConnectionError),
}

impl ConnectError {
    pub fn status(&self) -> u16 {
        match self {
            ConnectError::BadRequest(_) => 400,
            ConnectError::NotConnected(_) => 404,
            ConnectError::BadState(_) => 403,
            ConnectError::Refused(_) => 422,
            ConnectError::NotConfigured(_) => 503,
            ConnectError::Meta(_) => 502,
            ConnectError::Store(e) if e.is_retryable() => 503,
            ConnectError::Store(_) => 500,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self.status(), 502 | 503)
    }

    fn from_graph(e: GraphError, what: &str) -> ConnectError {
        if e.is_retryable() {
            ConnectError::Meta(format!("{what}: {}", e.user_message()))
        } else {
            let class = e.class();
            let said = e.user_message();
            ConnectError::Refused(match class {
                ErrorClass::TokenInvalid => {
                    format!("{what}: Meta refused the token ({said})")
                }
                _ => format!("{what}: {said}"),
            })
        }
    }
}

/// What the OAuth `state` carries, sealed: nobody can forge it, read the email in it, or use it
/// after `expires_at`.
#[derive(Serialize, Deserialize)]
struct OAuthState {
    workspace_id: WorkspaceId,
    connected_by: Option<String>,
    expires_at: u64,
    nonce: u64,
}

/// Associated data of sealed states, so a sealed token can never pass for a state.
const STATE_CONTEXT: &str = "oauth-state";

/// Where to send the person who connects.
#[derive(Debug, Serialize)]
pub struct DialogStart {
    pub dialog_url: String,
    /// Unix seconds after which the callback refuses this attempt.
    pub state_expires_at: u64,
}

pub struct Connector {
    graph: GraphClient,
    connections: Connections,
    cipher: TokenCipher,
    settings: Settings,
    announcer: Announcer,
}

impl Connector {
    pub fn new(
        graph: GraphClient,
        connections: Connections,
        cipher: TokenCipher,
        settings: Settings,
    ) -> Connector {
        Connector {
            announcer: Announcer::new(&settings),
            graph,
            connections,
            cipher,
            settings,
        }
    }

    fn app_secret(&self) -> Result<&SecretString, ConnectError> {
        self.settings.graph.app_secret.as_ref().ok_or_else(|| {
            ConnectError::NotConfigured(
                "OAuth is not configured: set AE_GRAPH__APP_SECRET (and AE_OAUTH__APP_ID)".into(),
            )
        })
    }

    /// Starts connecting `workspace`: the URL of Meta's dialog, with a sealed, expiring state.
    pub fn start_oauth(
        &self,
        workspace: &WorkspaceId,
        connected_by: Option<&str>,
    ) -> Result<DialogStart, ConnectError> {
        self.app_secret()?;
        check_email(connected_by)?;
        let o = &self.settings.oauth;
        let expires_at = now_ms() / 1000 + o.state_ttl_secs;
        let state = OAuthState {
            workspace_id: workspace.clone(),
            connected_by: connected_by.map(str::to_owned),
            expires_at,
            nonce: rand::random(),
        };
        let state = SecretString::from(serde_json::to_string(&state).expect("state serializes"));
        let sealed = self.cipher.seal(&state, STATE_CONTEXT);
        let mut url = url::Url::parse(&format!(
            "{}/{}/dialog/oauth",
            o.dialog_base_url.trim_end_matches('/'),
            self.settings.graph.version
        ))
        .map_err(|e| ConnectError::NotConfigured(format!("AE_OAUTH__DIALOG_BASE_URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("client_id", &o.app_id)
            .append_pair("redirect_uri", &o.redirect_uri)
            .append_pair("scope", REQUIRED_SCOPE)
            .append_pair("response_type", "code")
            .append_pair("state", &sealed);
        Ok(DialogStart {
            dialog_url: url.into(),
            state_expires_at: expires_at,
        })
    }

    /// The dialog came back with `code` for the person connecting `workspace`: exchange it for a
    /// long-lived user token, check it, list its ad accounts and store the connection. The
    /// caller names the workspace of the person's session: a state issued for another workspace
    /// (someone else's connect link, approved by this person) is refused, and a state works once.
    pub async fn complete_oauth(
        &self,
        workspace: &WorkspaceId,
        code: &str,
        state: &str,
    ) -> Result<ConnectionView, ConnectError> {
        let state = self.open_state(state)?;
        if &state.workspace_id != workspace {
            return Err(ConnectError::BadState(
                "it was issued for another workspace",
            ));
        }
        let ttl = std::time::Duration::from_secs(self.settings.oauth.state_ttl_secs.max(1));
        if !self
            .connections
            .consume_nonce(&state.nonce.to_string(), ttl)
            .await?
        {
            return Err(ConnectError::BadState("it was used already"));
        }
        let secret = self.app_secret()?;
        let o = &self.settings.oauth;
        let short = self
            .graph
            .exchange_code(&o.app_id, secret, &o.redirect_uri, code)
            .await
            .map_err(|e| ConnectError::from_graph(e, "exchanging the dialog's code"))?;
        let long = self
            .graph
            .exchange_long_lived(&o.app_id, secret, &short.access_token)
            .await
            .map_err(|e| ConnectError::from_graph(e, "getting a long-lived token"))?;
        let new = self.inspect(long.access_token).await?;
        self.connections
            .store_user_token(workspace, &new, state.connected_by.as_deref(), now_ms())
            .await?;
        info!(message = "Workspace connected to Facebook.", workspace_id = %workspace, kind = "user", ad_accounts = new.ad_accounts.len());
        self.connected(workspace).await
    }

    /// Sets or replaces the workspace's system user token, after checking it with Meta.
    /// `connected_by`: who is told when it breaks (kept from before when None).
    pub async fn set_system_token(
        &self,
        workspace: &WorkspaceId,
        token: SecretString,
        connected_by: Option<&str>,
    ) -> Result<ConnectionView, ConnectError> {
        check_email(connected_by)?;
        if token.expose_secret().trim().is_empty() {
            return Err(ConnectError::BadRequest("the token is empty".into()));
        }
        let new = self.inspect(token).await?;
        self.connections
            .store_system_token(workspace, &new, connected_by, now_ms())
            .await?;
        info!(message = "System user token set.", workspace_id = %workspace, ad_accounts = new.ad_accounts.len());
        self.connected(workspace).await
    }

    /// Asks Meta what `token` is: valid, with the scope exports need, and which ad accounts it
    /// can use.
    async fn inspect(&self, token: SecretString) -> Result<NewToken, ConnectError> {
        let info = self
            .graph
            .debug_token(&token)
            .await
            .map_err(|e| ConnectError::from_graph(e, "checking the token"))?;
        if !info.is_valid {
            return Err(ConnectError::Refused(
                "Meta says the token is not valid (expired or revoked)".into(),
            ));
        }
        if !info.scopes.iter().any(|s| s == REQUIRED_SCOPE) {
            return Err(ConnectError::Refused(format!(
                "the token lacks the `{REQUIRED_SCOPE}` permission: connect again and grant it"
            )));
        }
        let ad_accounts = self
            .graph
            .ad_accounts(&token)
            .await
            .map_err(|e| ConnectError::from_graph(e, "listing the ad accounts"))?;
        Ok(NewToken {
            token,
            expires_at: info.expires_at,
            scopes: info.scopes,
            ad_accounts,
        })
    }

    fn open_state(&self, sealed: &str) -> Result<OAuthState, ConnectError> {
        let opened = self
            .cipher
            .open(sealed, STATE_CONTEXT)
            .map_err(|_| ConnectError::BadState("the state was not issued by this service"))?;
        let state: OAuthState = serde_json::from_str(opened.expose_secret())
            .map_err(|_| ConnectError::BadState("the state was not issued by this service"))?;
        // Accepted while now < expires_at: a TTL of 0 issues states that never pass.
        if state.expires_at <= now_ms() / 1000 {
            return Err(ConnectError::BadState("the state has expired"));
        }
        Ok(state)
    }

    /// Selects the ad accounts the workspace may export to, checking with Meta that the token
    /// can use each one now (listed in `/me/adaccounts`, not disabled) and its Custom Audience
    /// terms. Selecting again is how a workspace says an unusable account is fixed: the new
    /// selection lifts every unusable mark (`Connections::select_ad_accounts`).
    pub async fn select_ad_accounts(
        &self,
        workspace: &WorkspaceId,
        ids: &[String],
    ) -> Result<ConnectionView, ConnectError> {
        let ids = ids
            .iter()
            .map(|id| AdAccountId::parse(id).map_err(|e| ConnectError::BadRequest(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let view = self.require(workspace).await?;
        let token = self
            .connections
            .active_token(workspace)
            .await?
            .ok_or_else(|| ConnectError::NotConnected(workspace.clone()))?;
        if let Some(reason) = &token.invalid {
            return Err(ConnectError::Refused(format!(
                "the connection is invalid ({reason}): reconnect first"
            )));
        }
        // Asked now, not read from the connect time's list: access may have been removed, or
        // given back, since.
        let listed = self
            .graph
            .listed_ad_accounts(&token.token)
            .await
            .map_err(|e| ConnectError::from_graph(e, "listing the ad accounts"))?;
        let available: Vec<AdAccountId> = listed.iter().map(|a| a.id.clone()).collect();
        self.connections
            .refresh_available(workspace, &token.fingerprint, &available)
            .await?;
        let mut statuses = Vec::new();
        for id in &ids {
            let Some(entry) = listed.iter().find(|a| &a.id == id) else {
                return Err(ConnectError::Refused(format!(
                    "{} is not an ad account this connection can use (it can use: {}); if it was removed, ask an admin of its Business Manager to give {} access to it again",
                    id.act(),
                    list(&available),
                    view.grantee()
                )));
            };
            if entry.is_disabled() {
                return Err(ConnectError::Refused(format!(
                    "Meta reports {} as disabled (account_status {}): it can be selected once Meta enables it again",
                    id.act(),
                    entry.account_status.unwrap_or_default()
                )));
            }
            let accepted = self
                .graph
                .tos_accepted(&token.token, id)
                .await
                .map_err(|e| ConnectError::from_graph(e, "reading the terms status"))?;
            statuses.push(AdAccountStatus::new(id, accepted, now_ms()));
        }
        statuses.sort_by(|a, b| a.id.cmp(&b.id));
        statuses.dedup_by(|a, b| a.id == b.id);
        self.connections
            .select_ad_accounts(workspace, &statuses)
            .await?;
        self.require(workspace).await
    }

    pub async fn status(&self, workspace: &WorkspaceId) -> Result<ConnectionView, ConnectError> {
        self.require(workspace).await
    }

    /// Deletes the connection and its tokens.
    pub async fn disconnect(&self, workspace: &WorkspaceId) -> Result<(), ConnectError> {
        if !self.connections.disconnect(workspace).await? {
            return Err(ConnectError::NotConnected(workspace.clone()));
        }
        info!(message = "Workspace disconnected from Facebook.", workspace_id = %workspace);
        self.announcer
            .announce(&Event::ConnectionChanged {
                workspace_id: workspace.clone(),
                status: ConnectionStatus::Disconnected,
                reason: None,
                code: None,
                subcode: None,
                at_ms: now_ms(),
            })
            .await;
        Ok(())
    }

    async fn require(&self, workspace: &WorkspaceId) -> Result<ConnectionView, ConnectError> {
        self.connections
            .view(workspace)
            .await?
            .ok_or_else(|| ConnectError::NotConnected(workspace.clone()))
    }

    /// Tells the upstream platform the connection is valid (again), and returns its view.
    async fn connected(&self, workspace: &WorkspaceId) -> Result<ConnectionView, ConnectError> {
        self.announcer
            .announce(&Event::ConnectionChanged {
                workspace_id: workspace.clone(),
                status: ConnectionStatus::Valid,
                reason: None,
                code: None,
                subcode: None,
                at_ms: now_ms(),
            })
            .await;
        self.require(workspace).await
    }
}

fn check_email(who: Option<&str>) -> Result<(), ConnectError> {
    match who {
        Some(email) if !looks_like_email(email) => Err(ConnectError::BadRequest(
            "connected_by must be an email address".into(),
        )),
        _ => Ok(()),
    }
}

fn list(ids: &[AdAccountId]) -> String {
    if ids.is_empty() {
        "none".into()
    } else {
        ids.iter()
            .map(AdAccountId::act)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A broker connection for what the producer publishes outside the jobs' consumer: best-effort
/// `connection.changed` events from the API and the CLI, and the health check rounds'
/// announcements. Opened lazily, reopened after a failure. A lost `connection.changed` is
/// logged, not fatal: the connection's state is in Redis and readable through the API at any
/// time.
pub struct Announcer {
    amqp_url: String,
    topology: Topology,
    publisher: Mutex<Option<(lapin::Connection, Publisher)>>,
}

impl Announcer {
    pub fn new(settings: &Settings) -> Announcer {
        Announcer {
            amqp_url: settings.amqp_url.clone(),
            topology: Topology::from_settings(settings),
            publisher: Mutex::new(None),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The open publisher, opening the connection first when there is none.
    pub async fn publisher(&self) -> anyhow::Result<Publisher> {
        let mut slot = self.publisher.lock().await;
        if let Some((_, publisher)) = slot.as_ref() {
            return Ok(publisher.clone());
        }
        let (connection, publisher) = self.open().await?;
        *slot = Some((connection, publisher.clone()));
        Ok(publisher)
    }

    /// Drops the connection after a failure: the next use opens another.
    pub async fn reset(&self) {
        *self.publisher.lock().await = None;
    }

    async fn announce(&self, event: &Event) {
        let publisher = match self.publisher().await {
            Ok(publisher) => publisher,
            Err(error) => {
                warn!(message = "Could not announce a connection change.", %error);
                return;
            }
        };
        if let Err(error) = publisher.event(&self.topology, event).await {
            warn!(message = "Could not announce a connection change.", %error);
            self.reset().await;
        }
    }

    async fn open(&self) -> anyhow::Result<(lapin::Connection, Publisher)> {
        let connection = amqp::connect(&self.amqp_url, "producer-api").await?;
        let publisher = Publisher::new(&connection).await?;
        self.topology.declare(publisher.channel()).await?;
        Ok((connection, publisher))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_maps_to_a_status_and_says_whether_to_retry() {
        let redis = ConnectionError::Redis(redis::RedisError::from((redis::ErrorKind::Io, "down")));
        let key = ConnectionError::Cipher(audience_export_core::token_cipher::CipherError::NoKey);
        let cases = [
            (ConnectError::BadRequest("x".into()), 400, false),
            (
                ConnectError::NotConnected(WorkspaceId::parse("ws").unwrap()),
                404,
                false,
            ),
            (ConnectError::BadState("forged"), 403, false),
            (ConnectError::Refused("x".into()), 422, false),
            (ConnectError::NotConfigured("x".into()), 503, true),
            (ConnectError::Meta("x".into()), 502, true),
            (ConnectError::Store(redis), 503, true),
            (ConnectError::Store(key), 500, false),
        ];
        for (error, status, retryable) in cases {
            assert_eq!(error.status(), status, "{error}");
            assert_eq!(error.is_retryable(), retryable, "{error}");
        }
    }
}
