//! User tokens expire (about 60 days after the OAuth dialog). A periodic sweep finds connections
//! whose user token expires within `expiry_warning_days` and emails whoever connected the
//! workspace, once per expiry date; `audience_export_connections_expiring` counts them.
//! Connections that use a system user token are skipped: the user token's expiry does not stop
//! their exports.

use crate::email;
use crate::metrics::{EmailKind, Metrics};
use crate::notify::Notifier;
use audience_export_core::connection::{ConnectionError, Connections};
use audience_export_core::progress::{now_ms, Claim};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A claimed warning not marked sent within this is sent again by the next sweep.
const LEASE: Duration = Duration::from_secs(300);

pub struct Sweeper {
    pub connections: Connections,
    pub notifier: Notifier,
    pub metrics: Metrics,
    pub warn_within: Duration,
    pub owner: String,
}

impl Sweeper {
    /// Sweeps every `interval` until `shutdown`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.sweep(now_ms() / 1000).await {
                warn!(message = "The token expiry sweep failed; trying again next time.", %error);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One pass at `now` (Unix seconds). Returns how many connections expire within the window.
    pub async fn sweep(&self, now: u64) -> Result<u64, ConnectionError> {
        let mut expiring = 0;
        for ws in self.connections.workspaces().await? {
            let Some(view) = self.connections.view(&ws).await? else {
                continue;
            };
            if view.has_system_user_token || !view.is_valid() {
                continue;
            }
            let Some(expires_at) = view.user_token_expires_at else {
                continue;
            };
            if expires_at > now + self.warn_within.as_secs() {
                continue;
            }
            expiring += 1;
            let what = format!("expiry:{expires_at}");
            if self
                .connections
                .claim_notice(&ws, &what, &self.owner, LEASE)
                .await?
                != Claim::Won
            {
                continue;
            }
            let date = time::OffsetDateTime::from_unix_timestamp(expires_at as i64)
                .map(|t| t.date().to_string())
                .unwrap_or_default();
            let days_left = (expires_at as i64 - now as i64) / 86_400;
            let email = email::expiry_warning(&ws, &date, days_left);
            let recipients: Vec<String> = view.connected_by.into_iter().collect();
            match self
                .notifier
                .send(EmailKind::Expiry, &recipients, &email)
                .await
            {
                Ok(delivered) => {
                    info!(message = "Token expiry warning done.", workspace_id = %ws, days_left, delivered = ?delivered);
                    self.connections.notice_sent(&ws, &what).await?;
                }
                // Given back: the next sweep sends it.
                Err(_) => {
                    self.connections
                        .release_notice(&ws, &what, &self.owner)
                        .await?;
                }
            }
        }
        self.metrics.expiring.set(expiring as i64);
        Ok(expiring)
    }
}
