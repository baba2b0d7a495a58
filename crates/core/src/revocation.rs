//! The one refused-token path of the fleet. Before a call, `usable_token` says whether a
//! workspace's token may be used at all; after Meta refuses it (190/102), `refused` announces
//! `connection.invalidated` to the finalizer (which marks the connection invalid and tells
//! people) and then records the refusal, so that no producer or worker calls Meta with that token
//! again while the event travels. The producer and the workers both go through here; neither
//! words its own check.
//!
//! A refusal is recorded under the token's fingerprint (`{ns}:workspace:<id>:revoked:<fp>`,
//! with the reason reports show), never the token; a new token has another fingerprint, so
//! reconnecting lifts it by itself.

use crate::amqp::{PublishError, Publisher, Topology};
use crate::connection::{revoked_key, ActiveToken, ConnectionError, Connections};
use crate::contract::{AdAccountId, Event, ExportId, WorkspaceId};
use crate::graph::GraphError;

/// How long a refusal stays recorded: longer than a user token lives (about 60 days).
const REVOCATION_TTL_SECS: u64 = 90 * 24 * 3600;

/// Why no call may be made with a workspace's token. Each reason is the sentence the export's
/// report shows.
#[derive(Debug)]
pub enum Unusable {
    /// The workspace has no connection (never connected, or disconnected).
    NotConnected,
    /// The finalizer marked the connection invalid.
    Invalid { reason: String },
    /// Meta refused this very token moments ago; the connection is not marked invalid yet.
    Refused { reason: String },
    /// The stored token cannot be opened (its key is gone, or the record is corrupt).
    Unreadable(ConnectionError),
}

impl Unusable {
    /// The sentence for the marketer's report, naming the fix.
    pub fn reason(&self, workspace: &WorkspaceId) -> String {
        match self {
            Unusable::NotConnected => format!(
                "no Facebook connection: workspace {workspace} is not connected to Facebook. Connect it, then export again."
            ),
            Unusable::Invalid { reason } | Unusable::Refused { reason } => reason.clone(),
            Unusable::Unreadable(e) => format!(
                "the Facebook connection of workspace {workspace} cannot be read ({e}); reconnect Facebook, or ask an operator to check the encryption keys"
            ),
        }
    }
}

/// Meta refused a workspace's token: what must be announced and recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub workspace_id: WorkspaceId,
    /// The export whose call was refused, if any.
    pub export_id: Option<ExportId>,
    pub fingerprint: String,
    pub code: i64,
    pub subcode: Option<i64>,
    /// Meta's message.
    pub message: String,
    /// The sentence reports show (`GraphError::explain`).
    pub reason: String,
}

impl Refusal {
    /// The refusal of `token` that `error` (of class `TokenInvalid`) reports.
    pub fn new(
        workspace_id: &WorkspaceId,
        export_id: Option<&ExportId>,
        token: &ActiveToken,
        error: &GraphError,
        ad_account: &AdAccountId,
    ) -> Refusal {
        let meta = error.meta().cloned().unwrap_or_default();
        Refusal {
            workspace_id: workspace_id.clone(),
            export_id: export_id.cloned(),
            fingerprint: token.fingerprint.clone(),
            code: meta.code.unwrap_or(190),
            subcode: meta.error_subcode,
            message: meta.message,
            reason: error.explain(ad_account),
        }
    }

    fn event(&self) -> Event {
        Event::ConnectionInvalidated {
            workspace_id: self.workspace_id.clone(),
            export_id: self.export_id.clone(),
            token_fingerprint: self.fingerprint.clone(),
            code: self.code,
            subcode: self.subcode,
            message: self.message.clone(),
        }
    }
}

/// Why a refusal could not be announced or recorded. Both are our infrastructure, and both
/// steps are idempotent: retry the whole.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Workspaces' tokens as usable or refused.
#[derive(Clone)]
pub struct Revocations {
    connections: Connections,
    redis: redis::aio::ConnectionManager,
    ns: String,
}

impl Revocations {
    /// On a shared Redis connection (`ProgressStore::connection`), beside `connections`.
    pub fn new(
        connections: Connections,
        redis: redis::aio::ConnectionManager,
        namespace: &str,
    ) -> Revocations {
        Revocations {
            connections,
            redis,
            ns: namespace.to_owned(),
        }
    }

    /// The token this workspace's calls use, or why none may be made. Read right before a call,
    /// so a token refused while the caller waited is not used again. `Err` only when Redis
    /// failed (retry later).
    pub async fn usable_token(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<Result<ActiveToken, Unusable>, ConnectionError> {
        let token = match self.connections.active_token(workspace).await {
            Ok(Some(token)) => token,
            Ok(None) => return Ok(Err(Unusable::NotConnected)),
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => return Ok(Err(Unusable::Unreadable(e))),
        };
        if let Some(reason) = &token.invalid {
            return Ok(Err(Unusable::Invalid {
                reason: reason.clone(),
            }));
        }
        if let Some(reason) = self.reason(workspace, &token.fingerprint).await? {
            return Ok(Err(Unusable::Refused { reason }));
        }
        Ok(Ok(token))
    }

    /// Announces the refusal, then records it. In this order: a record whose event was lost
    /// would stop every call with the token while nobody marks the connection invalid or tells
    /// anyone; an event whose record was lost costs one more refused call on redelivery.
    pub async fn refused(
        &self,
        publisher: &Publisher,
        topology: &Topology,
        refusal: &Refusal,
    ) -> Result<(), RevocationError> {
        publisher.event(topology, &refusal.event()).await?;
        let mut c = self.redis.clone();
        redis::cmd("SET")
            .arg(revoked_key(
                &self.ns,
                &refusal.workspace_id,
                &refusal.fingerprint,
            ))
            .arg(&refusal.reason)
            .arg("EX")
            .arg(REVOCATION_TTL_SECS)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Why Meta refused this workspace's token, if it did.
    async fn reason(
        &self,
        workspace: &WorkspaceId,
        fingerprint: &str,
    ) -> Result<Option<String>, ConnectionError> {
        let mut c = self.redis.clone();
        Ok(redis::cmd("GET")
            .arg(revoked_key(&self.ns, workspace, fingerprint))
            .query_async(&mut c)
            .await?)
    }
}
