//! Decides when an export is finished and finishes it exactly once: claim (`SET NX` with a
//! lease), email, `export.finished` event, terminal status with retention. Every event that may
//! complete an export (a shard done, the plan sealed, a refusal) leads here; all but the first to
//! find it complete see the claim taken and do nothing.

use crate::metrics::EmailKind;
use crate::{email, report, Deps, FinalizeError, Handled, LEASE};
use audience_export_core::contract::{Event, ExportId, ExportStatus};
use audience_export_core::progress::{now_ms, Claim};
use audience_export_core::ExportJob;
use tracing::info;

/// A progress event: finishes the export if every planned shard arrived and the plan is sealed.
pub async fn if_complete(deps: &Deps, export_id: &ExportId) -> Result<Handled, FinalizeError> {
    if !deps.progress.progress(export_id).await?.is_complete() {
        return Ok(Handled::Done);
    }
    finish(deps, export_id, None).await
}

/// The producer refused the job: finishes it `rejected` with the reason, telling `notify` too.
pub async fn rejected(
    deps: &Deps,
    export_id: &ExportId,
    reason: String,
    notify: Vec<String>,
) -> Result<Handled, FinalizeError> {
    finish(deps, export_id, Some((reason, notify))).await
}

/// Finishes an export once. `rejection` carries the reason and recipients of a refused job.
async fn finish(
    deps: &Deps,
    export_id: &ExportId,
    rejection: Option<(String, Vec<String>)>,
) -> Result<Handled, FinalizeError> {
    match deps
        .progress
        .claim_finalization(export_id, &deps.owner, LEASE)
        .await?
    {
        Claim::Done => return Ok(Handled::Done),
        Claim::Held { .. } => return Ok(Handled::Held),
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
    export_id: &ExportId,
    rejection: Option<(String, Vec<String>)>,
) -> Result<Handled, FinalizeError> {
    let progress = deps.progress.progress(export_id).await?;
    let job: Option<ExportJob> = deps
        .progress
        .job(export_id)
        .await?
        .and_then(|json| serde_json::from_str(&json).ok());
    let (status, reason, mut recipients) = match (rejection, &progress.stop_reason) {
        (Some((reason, notify)), _) => (ExportStatus::Rejected, Some(reason), notify),
        // Stopped (its connection's token refused): failed, whatever arrived before.
        (None, Some(stop)) => (ExportStatus::Failed, Some(stop.clone()), Vec::new()),
        (None, None) => (report::status_of(&progress), None, Vec::new()),
    };
    if let Some(job) = &job {
        recipients.extend(job.notify.emails.iter().cloned());
    }
    recipients.sort();
    recipients.dedup();
    let now = now_ms();
    let report = report::build(export_id, job.as_ref(), &progress, status, reason, now);

    deps.notifier
        .send(
            EmailKind::Report,
            &recipients,
            email::subject(&report),
            email::body(&report),
        )
        .await?;
    deps.publisher
        .event(&deps.topology, &Event::ExportFinished(report.clone()))
        .await?;
    deps.progress
        .complete(
            export_id,
            status,
            report.reason.as_deref().unwrap_or(""),
            now,
            deps.retention,
        )
        .await?;
    deps.metrics.exports.with(status).inc();
    info!(
        message = "Export finished.",
        status = status.as_str(),
        duration_ms = report.duration_ms
    );
    Ok(Handled::Done)
}
