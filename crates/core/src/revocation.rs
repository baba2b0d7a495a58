//! The one refused-token path of the fleet, and the one lost-ad-account path. Before a call,
//! `usable_token` says whether a workspace's token may be used at all; after Meta refuses it
//! (190/102), `refused` announces `connection.invalidated` to the finalizer (which marks the
//! connection invalid and tells people) and then records the refusal, so that no producer or
//! worker calls Meta with that token again while the event travels. The producer and the workers
//! both go through here; neither words its own check.
//!
//! A refusal is recorded under the token's fingerprint (`{ns}:workspace:<id>:revoked:<fp>`,
//! with the reason reports show), never the token; a new token has another fingerprint, so
//! reconnecting lifts it by itself.
//!
//! Meta may also refuse the token's use of one ad account while the token stays good (codes 10
//! and 200-299: whoever connected was removed from the account or its Business Manager), or the
//! connection health check may find a selected account gone from `/me/adaccounts` or disabled.
//! `refused` handles those too (`Scope::AdAccount`): the account is marked unusable on the
//! connection (`Connections::mark_unusable`, one script, one `Now` per loss), then
//! `ad_account.unusable` is announced, with the loss's `at_ms`, for the finalizer to tell whoever
//! connected, once. In this order because the event names the mark; a lost announcement is sent
//! again by the next health check (whose round re-announces marks nobody was told of), and a
//! worker whose shard was redelivered meets the refusal again.

use crate::amqp::{PublishError, Publisher, Topology};
use crate::connection::{
    revoked_key, AccountUnusable, ActiveToken, ConnectionError, Connections, Marked, UnusableKind,
};
use crate::contract::{AdAccountId, Event, ExportId, WorkspaceId};
use crate::graph::{ErrorClass, GraphError};
use crate::telemetry::{Counters, Label};
use lapin::types::FieldTable;
use tracing::{info, warn};

/// The routing key of `Event::AdAccountUnusable`.
const UNUSABLE_KEY: &str = "ad_account.unusable";

/// Meta's subcode for a disabled ad account. *Unconfirmed*: no official table lists it; a
/// third-party decoder of Meta's ads errors names 1885016 "Ad Account Disabled". It only picks
/// the kind (`disabled` rather than `permission_lost`) of a refusal already classed
/// `PermissionLost`; the health check reads `account_status`, which is documented.
pub const DISABLED_SUBCODE: i64 = 1_885_016;

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

/// What Meta refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// The token itself (190/102): the whole connection.
    Token,
    /// The token's use of one ad account (10, 200-299, disabled), or the health check found the
    /// account gone or disabled: only that account.
    AdAccount {
        ad_account: AdAccountId,
        kind: UnusableKind,
    },
}

/// Meta refused a workspace's token, or its use of one ad account: what must be announced and
/// recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub workspace_id: WorkspaceId,
    /// The export whose call was refused, if any.
    pub export_id: Option<ExportId>,
    pub fingerprint: String,
    /// Meta's code and subcode; None for what the health check read rather than a refusal.
    pub code: Option<i64>,
    pub subcode: Option<i64>,
    /// Meta's message, or what the health check read.
    pub message: String,
    /// The sentence reports show (`GraphError::explain`).
    pub reason: String,
    pub scope: Scope,
}

impl Refusal {
    /// The refusal `error` reports for a call on `ad_account` with `token`: of the token when
    /// its class is `TokenInvalid`, of the ad account when it is `PermissionLost`.
    pub fn new(
        workspace_id: &WorkspaceId,
        export_id: Option<&ExportId>,
        token: &ActiveToken,
        error: &GraphError,
        ad_account: &AdAccountId,
    ) -> Refusal {
        let meta = error.meta().cloned().unwrap_or_default();
        let scope = match error.class() {
            ErrorClass::PermissionLost => Scope::AdAccount {
                ad_account: ad_account.clone(),
                kind: unusable_kind(error),
            },
            _ => Scope::Token,
        };
        Refusal {
            workspace_id: workspace_id.clone(),
            export_id: export_id.cloned(),
            fingerprint: token.fingerprint.clone(),
            code: meta.code,
            subcode: meta.error_subcode,
            message: meta.message,
            reason: error.explain(ad_account),
            scope,
        }
    }

    /// Meta refused `token` itself (class `TokenInvalid`) on a call that names no ad account
    /// (`debug_token`, `/me/adaccounts`).
    pub fn of_token(
        workspace_id: &WorkspaceId,
        token: &ActiveToken,
        code: Option<i64>,
        subcode: Option<i64>,
        message: &str,
        reason: String,
    ) -> Refusal {
        Refusal {
            workspace_id: workspace_id.clone(),
            export_id: None,
            fingerprint: token.fingerprint.clone(),
            code,
            subcode,
            message: message.to_owned(),
            reason,
            scope: Scope::Token,
        }
    }

    /// The health check found `ad_account` unusable with `token` (`kind`, `message` saying what
    /// it read).
    pub fn of_ad_account(
        workspace_id: &WorkspaceId,
        token: &ActiveToken,
        ad_account: &AdAccountId,
        kind: UnusableKind,
        message: String,
    ) -> Refusal {
        Refusal {
            workspace_id: workspace_id.clone(),
            export_id: None,
            fingerprint: token.fingerprint.clone(),
            code: None,
            subcode: None,
            reason: message.clone(),
            message,
            scope: Scope::AdAccount {
                ad_account: ad_account.clone(),
                kind,
            },
        }
    }

    fn token_event(&self) -> Event {
        Event::ConnectionInvalidated {
            workspace_id: self.workspace_id.clone(),
            export_id: self.export_id.clone(),
            token_fingerprint: self.fingerprint.clone(),
            code: self.code.unwrap_or(190),
            subcode: self.subcode,
            message: self.message.clone(),
        }
    }

    /// The mark this refusal of `kind` puts on its ad account, found at `at_ms`.
    fn mark(&self, kind: UnusableKind, at_ms: u64) -> AccountUnusable {
        AccountUnusable {
            kind,
            reason: self.message.clone(),
            code: self.code,
            subcode: self.subcode,
            at_ms,
            token_fingerprint: self.fingerprint.clone(),
        }
    }
}

/// Which kind of loss a `PermissionLost` answer is: `disabled` for Meta's disabled-account
/// subcode, else `permission_lost`.
pub fn unusable_kind(error: &GraphError) -> UnusableKind {
    match error.meta().and_then(|m| m.error_subcode) {
        Some(DISABLED_SUBCODE) => UnusableKind::Disabled,
        _ => UnusableKind::PermissionLost,
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
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("the finalizer's queue could not be bound: {0}")]
    Bind(#[from] lapin::Error),
}

/// Workspaces' tokens as usable or refused, and their ad accounts as usable or not.
#[derive(Clone)]
pub struct Revocations {
    connections: Connections,
    redis: crate::redis_conn::RedisConn,
    ns: String,
    /// `audience_export_ad_accounts_unusable_total{kind}`, in the roles that register it
    /// (`counting`): each loss counted once, by the caller that marked it.
    unusable: Option<Counters<UnusableKind>>,
}

impl Revocations {
    /// On a shared Redis connection (`ProgressStore::connection`), beside `connections`.
    pub fn new(
        connections: Connections,
        redis: crate::redis_conn::RedisConn,
        namespace: &str,
    ) -> Revocations {
        Revocations {
            connections,
            redis,
            ns: namespace.to_owned(),
            unusable: None,
        }
    }

    /// Counts the ad accounts this process marks unusable, by kind, on `registry`.
    pub fn counting(mut self, registry: &prometheus::Registry) -> prometheus::Result<Revocations> {
        self.unusable = Some(Counters::register(
            registry,
            "audience_export_ad_accounts_unusable_total",
            "Selected ad accounts marked unusable (Meta refused access, gone from the token's ad accounts, or disabled), by kind.",
            &["kind"],
        )?);
        Ok(self)
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

    /// Handles a refusal. Of the token: announces it, then records it. In this order: a record
    /// whose event was lost would stop every call with the token while nobody marks the
    /// connection invalid or tells anyone; an event whose record was lost costs one more refused
    /// call on redelivery. Of an ad account: marks it unusable, then announces the mark (see the
    /// module's doc for why this order). Returns the mark, for an ad account still selected by
    /// a connection still using this token.
    pub async fn refused(
        &self,
        publisher: &Publisher,
        topology: &Topology,
        refusal: &Refusal,
    ) -> Result<Option<AccountUnusable>, RevocationError> {
        match &refusal.scope {
            Scope::Token => {
                self.token_refused(publisher, topology, refusal).await?;
                Ok(None)
            }
            Scope::AdAccount { ad_account, kind } => {
                self.account_lost(publisher, topology, refusal, ad_account, *kind)
                    .await
            }
        }
    }

    /// Announces a mark again (for a health check that found nobody was told of it).
    pub async fn reannounce(
        &self,
        publisher: &Publisher,
        topology: &Topology,
        workspace: &WorkspaceId,
        ad_account: &AdAccountId,
        mark: &AccountUnusable,
    ) -> Result<(), RevocationError> {
        announce_unusable(publisher, topology, workspace, ad_account, None, mark).await
    }

    async fn account_lost(
        &self,
        publisher: &Publisher,
        topology: &Topology,
        refusal: &Refusal,
        ad_account: &AdAccountId,
        kind: UnusableKind,
    ) -> Result<Option<AccountUnusable>, RevocationError> {
        let ws = &refusal.workspace_id;
        let mark = refusal.mark(kind, crate::progress::now_ms());
        let stored = match self
            .connections
            .mark_unusable(ws, ad_account, &mark)
            .await?
        {
            Marked::Now(stored) => {
                warn!(message = "An ad account can no longer be used; marked unusable.", workspace_id = %ws, ad_account = %ad_account, kind = kind.as_str(), code = ?refusal.code, subcode = ?refusal.subcode);
                if let Some(counters) = &self.unusable {
                    counters.with(kind).inc();
                }
                stored
            }
            Marked::Already(stored) => stored,
            Marked::Stale | Marked::Missing => {
                info!(message = "A loss of an ad account the connection no longer selects, or of a replaced token; ignored.", workspace_id = %ws, ad_account = %ad_account);
                return Ok(None);
            }
        };
        let export = refusal.export_id.as_ref();
        announce_unusable(publisher, topology, ws, ad_account, export, &stored).await?;
        Ok(Some(stored))
    }

    async fn token_refused(
        &self,
        publisher: &Publisher,
        topology: &Topology,
        refusal: &Refusal,
    ) -> Result<(), RevocationError> {
        publisher.event(topology, &refusal.token_event()).await?;
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

/// Publishes `ad_account.unusable` for the finalizer (its queue is bound to the key, as every
/// role declares the topology: `amqp::FINALIZER_EVENTS`) and the upstream platform. The publish
/// is `mandatory`, so an event nobody would read is an error rather than lost.
async fn announce_unusable(
    publisher: &Publisher,
    topology: &Topology,
    workspace: &WorkspaceId,
    ad_account: &AdAccountId,
    export_id: Option<&ExportId>,
    mark: &AccountUnusable,
) -> Result<(), RevocationError> {
    let event = Event::AdAccountUnusable {
        workspace_id: workspace.clone(),
        ad_account_id: ad_account.clone(),
        export_id: export_id.cloned(),
        kind: mark.kind,
        code: mark.code,
        subcode: mark.subcode,
        reason: mark.reason.clone(),
        at_ms: mark.at_ms,
    };
    debug_assert_eq!(event.routing_key(), UNUSABLE_KEY);
    let body = serde_json::to_vec(&event).map_err(PublishError::from)?;
    publisher
        .publish(
            &topology.events(),
            UNUSABLE_KEY,
            &body,
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::TokenKind;
    use crate::graph::MetaError;
    use secrecy::SecretString;

    fn meta(code: i64, subcode: Option<i64>, message: &str) -> GraphError {
        GraphError::Meta {
            status: 400,
            error: Box::new(MetaError {
                message: message.into(),
                code: Some(code),
                error_subcode: subcode,
                ..MetaError::default()
            }),
            usage: None,
        }
    }

    fn token() -> ActiveToken {
        ActiveToken {
            token: SecretString::from("EAAx"),
            kind: TokenKind::User,
            fingerprint: "0123456789abcdef".into(),
            invalid: None,
        }
    }

    #[test]
    fn a_refusal_is_of_the_token_or_of_the_ad_account_by_metas_class() {
        let ws = WorkspaceId::parse("ws-1").unwrap();
        let account = AdAccountId::parse("1001").unwrap();
        let of = |e: GraphError| Refusal::new(&ws, None, &token(), &e, &account).scope;
        let lost = |kind| Scope::AdAccount {
            ad_account: account.clone(),
            kind,
        };
        // (code, subcode, scope)
        let table = [
            (190, Some(460), Scope::Token),
            (102, None, Scope::Token),
            (200, None, lost(UnusableKind::PermissionLost)),
            (10, None, lost(UnusableKind::PermissionLost)),
            (273, None, lost(UnusableKind::PermissionLost)),
            (200, Some(DISABLED_SUBCODE), lost(UnusableKind::Disabled)),
        ];
        for (code, subcode, scope) in table {
            assert_eq!(of(meta(code, subcode, "x")), scope, "{code} {subcode:?}");
        }
        let refusal = Refusal::new(&ws, None, &token(), &meta(200, None, "(#200) no"), &account);
        assert_eq!(
            (refusal.code, refusal.message.as_str()),
            (Some(200), "(#200) no")
        );
        let mark = refusal.mark(UnusableKind::PermissionLost, 7);
        assert_eq!(
            (mark.code, mark.at_ms, mark.token_fingerprint.as_str()),
            (Some(200), 7, "0123456789abcdef")
        );
        assert!(mark.finding(&account).contains("code 200: (#200) no"));
    }

    #[test]
    fn a_token_refusal_keeps_announcing_190_when_meta_gave_no_code() {
        let ws = WorkspaceId::parse("ws-1").unwrap();
        let refusal = Refusal::of_token(&ws, &token(), None, None, "expired", "r".into());
        let Event::ConnectionInvalidated { code, .. } = refusal.token_event() else {
            panic!("a connection.invalidated");
        };
        assert_eq!(code, 190);
    }
}
