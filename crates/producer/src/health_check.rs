//! The connection health check: asks Meta whether a workspace's connection still works, before
//! an export starts (`admission`, at most once per `CHECK_TTL` per workspace, so a burst of jobs
//! asks once) and for every connection every `health_check_interval_secs` (`Rounds`, one
//! producer of the fleet per round, by a Redis lease). Two calls: `debug_token` (valid, the
//! `ads_management` scope) and `/me/adaccounts` (each selected ad account still listed, and its
//! `account_status` not disabled or closed).
//!
//! What it finds goes through `revocation`, the fleet's one path for refusals: a token Meta
//! refuses is announced and recorded as a worker's refusal would be; a selected account gone,
//! disabled, or out of the token's scope is marked unusable and announced, so whoever connected
//! is told once. A mark left by a token since replaced (a reconnect) is lifted once the new token
//! can use the account; one left by the current token stays until the account is selected
//! again (the listing can show an account whose role no longer allows uploads, which only a
//! person can sort out). A mark nobody was told of (its announcement lost) is announced again.
//! It never calls Meta for a connection that is invalid or whose token was refused.

use crate::connect::{Announcer, REQUIRED_SCOPE};
use audience_export_core::amqp::{Publisher, Topology};
use audience_export_core::connection::{
    unusable_notice, ActiveToken, ConnectionView, Connections, UnusableKind,
};
use audience_export_core::graph::{ErrorClass, GraphClient, GraphError, ListedAdAccount};
use audience_export_core::revocation::{Refusal, RevocationError, Revocations};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a workspace's check counts as fresh for the exports that follow it.
pub const CHECK_TTL: Duration = Duration::from_secs(60);

/// What a check of one connection came to.
#[derive(Debug)]
pub enum Health {
    /// Meta answered both calls. `changed`: an account was marked unusable or its mark lifted.
    Checked { changed: bool },
    /// Meta refused the token itself: announced and recorded (`revocation`); the reason is the
    /// sentence reports show.
    TokenRefused { reason: String },
    /// Meta could not be asked (unreachable, throttled, an unexpected answer): nothing changed.
    Unknown(GraphError),
}

/// What a check needs: borrowed from the planner's `Deps` or from `Rounds`.
pub struct Checker<'a> {
    pub graph: &'a GraphClient,
    pub connections: &'a Connections,
    pub revocations: &'a Revocations,
    pub publisher: &'a Publisher,
    pub topology: &'a Topology,
}

impl Checker<'_> {
    /// Checks `view`'s connection with its usable `token`. `Err` only for our infrastructure
    /// (Redis, the broker).
    pub async fn check(
        &self,
        view: &ConnectionView,
        token: &ActiveToken,
    ) -> Result<Health, RevocationError> {
        let ws = &view.workspace_id;
        let info = match self.graph.debug_token(&token.token).await {
            Ok(info) => info,
            Err(e) => return self.failed(view, token, e).await,
        };
        if !info.is_valid {
            // Meta answered for a token it no longer honours (the token asks about itself, so
            // Meta usually refuses the call instead: `failed`).
            let error = info.error.unwrap_or_default();
            let message = match error.message.as_str() {
                "" => "Meta says the token is not valid (expired or revoked)",
                said => said,
            };
            let reason = format!(
                "token invalid: Meta refused the Facebook connection ({message}). Reconnect Facebook for this workspace."
            );
            let code = Some(error.code.unwrap_or(190));
            let refusal =
                Refusal::of_token(ws, token, code, error.subcode, message, reason.clone());
            self.revocations
                .refused(self.publisher, self.topology, &refusal)
                .await?;
            return Ok(Health::TokenRefused { reason });
        }
        let listed = match self.graph.listed_ad_accounts(&token.token).await {
            Ok(listed) => listed,
            Err(e) => return self.failed(view, token, e).await,
        };
        let ids: Vec<_> = listed.iter().map(|a| a.id.clone()).collect();
        self.connections
            .refresh_available(ws, &token.fingerprint, &ids)
            .await?;
        let scoped = info.scopes.iter().any(|s| s == REQUIRED_SCOPE);
        let mut changed = false;
        for selected in &view.ad_accounts {
            let account = &selected.id;
            let finding = finding(scoped, listed.iter().find(|a| &a.id == account));
            match (&selected.unusable, finding) {
                (None, None) => {}
                (None, Some((kind, message))) => {
                    let refusal = Refusal::of_ad_account(ws, token, account, kind, message);
                    changed |= self
                        .revocations
                        .refused(self.publisher, self.topology, &refusal)
                        .await?
                        .is_some();
                }
                (Some(mark), None) if mark.token_fingerprint != token.fingerprint => {
                    // Reconnected since, and the new token can use it.
                    if self
                        .connections
                        .clear_unusable(ws, account, mark.at_ms)
                        .await?
                    {
                        info!(message = "A reconnected token can use an ad account again; its unusable mark is lifted.", workspace_id = %ws, ad_account = %account);
                        changed = true;
                    }
                }
                (Some(mark), _) => {
                    let notice = unusable_notice(account, mark.at_ms);
                    if !self.connections.notice_done(ws, &notice).await? {
                        self.revocations
                            .reannounce(self.publisher, self.topology, ws, account, mark)
                            .await?;
                    }
                }
            }
        }
        Ok(Health::Checked { changed })
    }

    /// A check call failed: a refused token goes through `revocation`; anything else leaves the
    /// connection as it is.
    async fn failed(
        &self,
        view: &ConnectionView,
        token: &ActiveToken,
        e: GraphError,
    ) -> Result<Health, RevocationError> {
        if e.class() != ErrorClass::TokenInvalid {
            return Ok(Health::Unknown(e));
        }
        let meta = e.meta().cloned().unwrap_or_default();
        let reason = e.token_reason();
        let refusal = Refusal::of_token(
            &view.workspace_id,
            token,
            meta.code,
            meta.error_subcode,
            &meta.message,
            reason.clone(),
        );
        self.revocations
            .refused(self.publisher, self.topology, &refusal)
            .await?;
        Ok(Health::TokenRefused { reason })
    }
}

/// Why a selected account is unusable, from the token's scopes and its `/me/adaccounts` entry
/// (None: not listed); None when it is usable.
fn finding(scoped: bool, listed: Option<&ListedAdAccount>) -> Option<(UnusableKind, String)> {
    if !scoped {
        return Some((
            UnusableKind::PermissionLost,
            format!("the connection's token no longer has the `{REQUIRED_SCOPE}` permission"),
        ));
    }
    match listed {
        None => Some((
            UnusableKind::NotListed,
            "the token's /me/adaccounts no longer lists it".to_owned(),
        )),
        Some(a) if a.is_disabled() => Some((
            UnusableKind::Disabled,
            format!(
                "its account_status is {}",
                a.account_status.unwrap_or_default()
            ),
        )),
        Some(_) => None,
    }
}

/// The periodic check of every connection: one round every `interval`, run by the producer
/// that takes the round's lease.
pub struct Rounds {
    pub graph: GraphClient,
    pub connections: Connections,
    pub revocations: Revocations,
    /// Its own broker connection, opened when a round has something to announce.
    pub announcer: Announcer,
    pub owner: String,
    pub interval: Duration,
}

impl Rounds {
    /// A round every `interval`, the first one `interval` after start (a fleet restarting does
    /// not ask Meta about every connection at once), until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            if let Err(error) = self.round().await {
                warn!(message = "The connection health check round failed; trying again next round.", %error);
            }
        }
    }

    /// One round, if this producer takes its lease (a little shorter than the interval, so the
    /// next tick finds it free): every connection with a selection, a usable token and no check
    /// within `CHECK_TTL`. Returns how many were checked.
    pub async fn round(&self) -> anyhow::Result<u64> {
        let lease = self.interval.mul_f64(0.9).max(Duration::from_millis(100));
        if !self
            .connections
            .claim_health_round(&self.owner, lease)
            .await?
        {
            return Ok(0);
        }
        let mut checked = 0;
        for ws in self.connections.workspaces().await? {
            let Some(view) = self.connections.view(&ws).await? else {
                continue;
            };
            if !view.is_valid() || view.ad_accounts.is_empty() {
                continue;
            }
            let Ok(token) = self.revocations.usable_token(&ws).await? else {
                continue;
            };
            // Checked for an export just now: not again.
            if !self
                .connections
                .claim_health_check(&ws, CHECK_TTL.min(self.interval))
                .await?
            {
                continue;
            }
            let publisher = match self.announcer.publisher().await {
                Ok(publisher) => publisher,
                Err(error) => {
                    self.connections.forget_health_check(&ws).await?;
                    return Err(error);
                }
            };
            let checker = Checker {
                graph: &self.graph,
                connections: &self.connections,
                revocations: &self.revocations,
                publisher: &publisher,
                topology: self.announcer.topology(),
            };
            checked += 1;
            match checker.check(&view, &token).await {
                Ok(Health::Checked { .. }) => {}
                Ok(Health::TokenRefused { reason }) => {
                    warn!(message = "Meta refused a workspace's token during the health check.", workspace_id = %ws, %reason)
                }
                Ok(Health::Unknown(error)) => {
                    warn!(message = "Meta could not be asked about a connection; next round.", workspace_id = %ws, %error);
                    self.connections.forget_health_check(&ws).await?;
                }
                Err(error) => {
                    self.announcer.reset().await;
                    self.connections.forget_health_check(&ws).await?;
                    return Err(error.into());
                }
            }
        }
        info!(
            message = "Connection health check round done.",
            connections = checked
        );
        Ok(checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use audience_export_core::contract::AdAccountId;

    fn listed(status: Option<i64>) -> ListedAdAccount {
        ListedAdAccount {
            id: AdAccountId::parse("1001").unwrap(),
            account_status: status,
        }
    }

    #[test]
    fn an_account_is_unusable_when_unlisted_disabled_or_out_of_scope() {
        let kind = |scoped, l: Option<&ListedAdAccount>| finding(scoped, l).map(|(k, _)| k);
        assert_eq!(kind(true, Some(&listed(Some(1)))), None);
        assert_eq!(kind(true, Some(&listed(None))), None);
        // Unsettled (3) and in grace period (9) stop ads, not audiences.
        assert_eq!(kind(true, Some(&listed(Some(3)))), None);
        assert_eq!(kind(true, Some(&listed(Some(9)))), None);
        for disabled in [2, 100, 101] {
            let l = listed(Some(disabled));
            assert_eq!(kind(true, Some(&l)), Some(UnusableKind::Disabled));
        }
        assert_eq!(kind(true, None), Some(UnusableKind::NotListed));
        assert_eq!(
            kind(false, Some(&listed(Some(1)))),
            Some(UnusableKind::PermissionLost)
        );
    }
}
