//! Routes each event of the finalizer's queue to what handles it: progress events (a shard done,
//! the plan sealed) and refusals to `finalize`, refused tokens to `invalidation`, ad accounts
//! found unusable to `unusable`. It alone turns their results into an `Outcome`: an
//! infrastructure failure, or a claim another finalizer holds, sends the original message
//! through the finalizer's delay queue, unchanged.

use crate::{finalize, invalidation, unusable, Deps, Handled};
use audience_export_core::amqp::{Topology, FINALIZER_RETRY_MS};
use audience_export_core::consumer::{Handler, Outcome};
use audience_export_core::contract::Event;
use lapin::message::Delivery;
use std::sync::Arc;
use tracing::{warn, Instrument};

impl Handler for Deps {
    async fn handle(self: Arc<Self>, delivery: Arc<Delivery>) -> Outcome {
        handle(&self, &delivery.data).await
    }
}

pub async fn handle(deps: &Deps, body: &[u8]) -> Outcome {
    let event: Event = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => {
            return Outcome::Reject {
                reason: format!("not an event: {e}"),
            }
        }
    };
    let result = match event {
        Event::ShardCompleted { export_id, .. }
        | Event::ExportSealed { export_id }
        | Event::ExportFollowedUp { export_id } => {
            let span = tracing::info_span!("export", %export_id);
            finalize::if_complete(deps, &export_id)
                .instrument(span)
                .await
        }
        Event::ExportRejected {
            export_id,
            reason,
            notify,
        } => {
            let span = tracing::info_span!("export", %export_id);
            finalize::rejected(deps, &export_id, reason, notify)
                .instrument(span)
                .await
        }
        Event::ConnectionInvalidated {
            workspace_id,
            token_fingerprint,
            code,
            subcode,
            message,
            ..
        } => {
            let refusal = invalidation::Refusal {
                workspace_id: &workspace_id,
                token_fingerprint: &token_fingerprint,
                code,
                subcode,
                message: &message,
            };
            invalidation::handle(deps, &refusal).await
        }
        Event::AdAccountUnusable {
            workspace_id,
            ad_account_id,
            at_ms,
            ..
        } => {
            let report = unusable::Report {
                workspace_id: &workspace_id,
                ad_account_id: &ad_account_id,
                at_ms,
            };
            unusable::handle(deps, &report).await
        }
        Event::ExportFinished(_) | Event::ConnectionChanged { .. } => Ok(Handled::Done),
    };
    match result {
        Ok(Handled::Done) => Outcome::Ack,
        Ok(Handled::Held) => later(deps, body),
        Err(error) if error.is_retryable() => {
            warn!(message = "Finalization failed; retrying later.", %error);
            later(deps, body)
        }
        Err(error) => Outcome::Reject {
            reason: format!("cannot be finalized: {error}"),
        },
    }
}

/// The same message, again after the finalizer's delay.
fn later(deps: &Deps, body: &[u8]) -> Outcome {
    Outcome::Delay {
        queue: Topology::retry(&deps.topology.finalizer(), FINALIZER_RETRY_MS),
        body: body.to_vec(),
        expiration_ms: None,
    }
}
