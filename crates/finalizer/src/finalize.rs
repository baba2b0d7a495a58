//! Decides when an export is finished and finishes it exactly once: claim (`SET NX` with a
//! lease), email, `export.finished` event, terminal status with retention. Every event that may
//! complete an export (a shard done, the plan sealed, a refusal) leads here; all but the first to
//! find it complete see the claim taken and do nothing.

use crate::email::{EmailError, Mailer};
use crate::invalidation;
use crate::metrics::Metrics;
use crate::report;
use audience_export_core::amqp::{PublishError, Publisher, Topology, FINALIZER_RETRY_MS};
use audience_export_core::connection::{ConnectionError, Connections};
use audience_export_core::consumer::Outcome;
use audience_export_core::contract::{Event, ExportStatus};
use audience_export_core::progress::{now_ms, Claim, ProgressError, ProgressStore};
use audience_export_core::ExportJob;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn, Instrument};

/// How long a finalizer may hold an export (or a notice) before another may take over.
pub const LEASE: Duration = Duration::from_secs(60);

pub struct Deps {
    pub progress: ProgressStore,
    pub publisher: Publisher,
    pub topology: Topology,
    pub mailer: Mailer,
    pub metrics: Metrics,
    pub retention: Duration,
    /// This process's claim owner id.
    pub owner: String,
    pub connections: Connections,
}

#[derive(Debug, thiserror::Error)]
pub enum FinalizeError {
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Email(#[from] EmailError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

pub async fn handle(deps: Arc<Deps>, body: &[u8]) -> Outcome {
    let event: Event = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => {
            return Outcome::Reject {
                reason: format!("not an event: {e}"),
            }
        }
    };
    let result = match event {
        Event::ShardCompleted { export_id, .. } | Event::ExportSealed { export_id } => {
            let span = tracing::info_span!("export", %export_id);
            finish_if_complete(&deps, &export_id).instrument(span).await
        }
        Event::ExportRejected {
            export_id,
            reason,
            notify,
        } => {
            let span = tracing::info_span!("export", %export_id);
            finish(&deps, &export_id, Some((reason, notify)))
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
            invalidation::handle(&deps, &refusal)
                .await
                .map(|outcome| outcome.unwrap_or_else(|| delay(&deps, body)))
        }
        Event::ExportFinished(_) | Event::ConnectionChanged { .. } => Ok(Outcome::Ack),
    };
    result.unwrap_or_else(|error| {
        warn!(message = "Finalization failed; retrying later.", %error);
        delay(&deps, body)
    })
}

fn delay(deps: &Deps, body: &[u8]) -> Outcome {
    Outcome::Delay {
        queue: Topology::retry(&deps.topology.finalizer(), FINALIZER_RETRY_MS),
        body: body.to_vec(),
        expiration_ms: None,
    }
}

async fn finish_if_complete(deps: &Deps, export_id: &str) -> Result<Outcome, FinalizeError> {
    let snapshot = deps.progress.snapshot(export_id).await?;
    if !snapshot.is_complete() {
        return Ok(Outcome::Ack);
    }
    finish(deps, export_id, None).await
}

/// Finishes an export once. `rejection` carries the reason and recipients of a refused job.
async fn finish(
    deps: &Deps,
    export_id: &str,
    rejection: Option<(String, Vec<String>)>,
) -> Result<Outcome, FinalizeError> {
    match deps
        .progress
        .claim_finalization(export_id, &deps.owner, LEASE)
        .await?
    {
        Claim::Done => return Ok(Outcome::Ack),
        Claim::Held { .. } => {
            let body = serde_json::to_vec(&Event::ExportSealed {
                export_id: export_id.to_owned(),
            })
            .expect("an event serializes");
            return Ok(delay(deps, &body));
        }
        Claim::Won => {}
    }
    let outcome = finish_claimed(deps, export_id, rejection).await;
    if outcome.is_err() {
        deps.progress
            .release_finalization(export_id, &deps.owner)
            .await?;
    }
    outcome
}

async fn finish_claimed(
    deps: &Deps,
    export_id: &str,
    rejection: Option<(String, Vec<String>)>,
) -> Result<Outcome, FinalizeError> {
    let snapshot = deps.progress.snapshot(export_id).await?;
    let job: Option<ExportJob> = deps
        .progress
        .job(export_id)
        .await?
        .and_then(|json| serde_json::from_str(&json).ok());
    let (status, reason, mut recipients) = match (rejection, snapshot.get("stop_reason")) {
        (Some((reason, notify)), _) => (ExportStatus::Rejected, Some(reason), notify),
        // Stopped (its connection's token refused): failed, whatever arrived before.
        (None, Some(stop)) => (ExportStatus::Failed, Some(stop.to_owned()), Vec::new()),
        (None, None) => (report::status_of(&snapshot), None, Vec::new()),
    };
    if let Some(job) = &job {
        recipients.extend(job.notify.emails.iter().cloned());
    }
    recipients.sort();
    recipients.dedup();
    let now = now_ms();
    let report = report::build(export_id, job.as_ref(), &snapshot, status, reason, now);

    match deps.mailer.send(&recipients, &report).await {
        Ok(()) => deps.metrics.emails.with_label_values(&["sent"]).inc(),
        Err(EmailError::NoRecipient) => deps
            .metrics
            .emails
            .with_label_values(&["no_recipient"])
            .inc(),
        Err(e) if e.is_retryable() => return Err(e.into()),
        Err(e) => {
            warn!(message = "The notification email could not be sent.", error = %e);
            deps.metrics.emails.with_label_values(&["failed"]).inc();
        }
    }
    deps.publisher
        .event(&deps.topology, &Event::ExportFinished(report.clone()))
        .await?;
    deps.progress
        .complete(
            export_id,
            status.as_str(),
            report.reason.as_deref().unwrap_or(""),
            now,
            deps.retention,
        )
        .await?;
    deps.metrics
        .exports
        .with_label_values(&[status.as_str()])
        .inc();
    info!(
        message = "Export finished.",
        status = status.as_str(),
        duration_ms = report.duration_ms
    );
    Ok(Outcome::Ack)
}
