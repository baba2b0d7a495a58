//! Decides when an export is finished and finishes it exactly once: claim (`SET NX` with a
//! lease), email, `export.finished` event, terminal status with retention. Every event that may
//! complete an export (a shard done, the plan sealed, a refusal) leads here; all but the first to
//! find it complete see the claim taken and do nothing.

use crate::metrics::EmailKind;
use crate::{email, report, Deps, FinalizeError, Handled};
use audience_export_core::contract::{
    Event, ExportId, ExportStatus, FollowUp, FOLLOW_UP, MESSAGE_KIND_HEADER,
};
use audience_export_core::progress::{now_ms, Claim, ExportProgress};
use audience_export_core::ExportJob;
use lapin::types::{AMQPValue, FieldTable};
use tracing::info;

/// Why an export is being finished, beyond its counters.
pub enum Ending {
    /// Every planned shard arrived (or the plan says why it could not be completed).
    Complete,
    /// The producer refused the job: `rejected` with the reason, telling `notify` too.
    Rejected { reason: String, notify: Vec<String> },
    /// The sweep gave up on it (stalled, or past its deadline): why, naming what never arrived.
    Abandoned { reason: String },
}

/// A progress event: finishes the export if every planned shard arrived and the plan is sealed,
/// once its follow-up is done. A complete export with audiences at Meta first gets a follow-up
/// (a worker, which holds the token, reads back the audiences' sizes and makes the lookalikes
/// the job asked for) and finishes on its `export.followed_up`; asking again on a repeated event
/// is harmless (the follow-up does nothing twice). A follow-up that never comes is the sweep's:
/// the export is then finished without what it would add.
pub async fn if_complete(deps: &Deps, export_id: &ExportId) -> Result<Handled, FinalizeError> {
    let progress = deps.progress.progress(export_id).await?;
    if !progress.is_complete() {
        return Ok(Handled::Done);
    }
    if wants_follow_up(&progress) {
        let body = serde_json::to_vec(&FollowUp {
            export_id: export_id.clone(),
        })
        .expect("a follow-up serializes");
        let mut headers = FieldTable::default();
        headers.insert(
            MESSAGE_KIND_HEADER.into(),
            AMQPValue::LongString(FOLLOW_UP.into()),
        );
        // Counted as progress, so the sweep gives the follow-up its `stall_after_secs`.
        deps.progress.touch(export_id, now_ms()).await?;
        deps.publisher
            .publish("", &deps.topology.shards(), &body, headers)
            .await?;
        info!(message = "Export complete; asked a worker for its follow-up.");
        return Ok(Handled::Done);
    }
    finish(deps, export_id, Ending::Complete).await
}

/// Whether a complete export still needs its follow-up: audiences exist at Meta, it was not
/// stopped (cancelled or its token refused), and no follow-up was recorded.
pub fn wants_follow_up(progress: &ExportProgress) -> bool {
    !progress.followed_up
        && progress.stop_reason.is_none()
        && progress.fields.values().any(|f| f.audience_id.is_some())
}

/// The producer refused the job: finishes it `rejected` with the reason, telling `notify` too.
pub async fn rejected(
    deps: &Deps,
    export_id: &ExportId,
    reason: String,
    notify: Vec<String>,
) -> Result<Handled, FinalizeError> {
    finish(deps, export_id, Ending::Rejected { reason, notify }).await
}

/// Finishes an export once.
pub async fn finish(
    deps: &Deps,
    export_id: &ExportId,
    ending: Ending,
) -> Result<Handled, FinalizeError> {
    match deps
        .progress
        .claim_finalization(export_id, &deps.owner, deps.lease)
        .await?
    {
        Claim::Done => return Ok(Handled::Done),
        Claim::Held { .. } => return Ok(Handled::Held),
        Claim::Won => {}
    }
    let outcome = finish_claimed(deps, export_id, ending).await;
    if outcome.is_err() {
        deps.progress
            .release_finalization(export_id, &deps.owner)
            .await?;
    }
    outcome
}

/// The terminal status, its reason and extra recipients. In order: a refusal; a stop (its
/// connection's token refused: failed, whatever arrived before); the sweep's verdict; a plan
/// that could not be completed; the counters.
fn verdict(
    ending: Ending,
    progress: &ExportProgress,
) -> (ExportStatus, Option<String>, Vec<String>) {
    let some_arrived = progress.shards_done > 0;
    let partial = if some_arrived {
        ExportStatus::PartiallyFailed
    } else {
        ExportStatus::Failed
    };
    match (ending, &progress.stop_reason, &progress.plan_error) {
        (Ending::Rejected { reason, notify }, _, _) => {
            (ExportStatus::Rejected, Some(reason), notify)
        }
        (_, Some(stop), _) if progress.cancelled => {
            (ExportStatus::Cancelled, Some(stop.clone()), Vec::new())
        }
        (_, Some(stop), _) => (ExportStatus::Failed, Some(stop.clone()), Vec::new()),
        (Ending::Abandoned { reason }, _, _) => (partial, Some(reason), Vec::new()),
        (Ending::Complete, None, Some(error)) => (partial, Some(error.clone()), Vec::new()),
        (Ending::Complete, None, None) => (report::status_of(progress), None, Vec::new()),
    }
}

async fn finish_claimed(
    deps: &Deps,
    export_id: &ExportId,
    ending: Ending,
) -> Result<Handled, FinalizeError> {
    let progress = deps.progress.progress(export_id).await?;
    let job: Option<ExportJob> = deps
        .progress
        .job(export_id)
        .await?
        .and_then(|json| serde_json::from_str(&json).ok());
    let (status, reason, mut recipients) = verdict(ending, &progress);
    if let Some(job) = &job {
        recipients.extend(job.notify.emails.iter().cloned());
    }
    recipients.sort();
    recipients.dedup();
    let now = now_ms();
    let report = report::build(export_id, job.as_ref(), &progress, status, reason, now);

    // Once per export, even when a later step fails and the finish is tried again. (A crash
    // between the send and the mark can still send it twice: SMTP has no idempotency key.)
    if progress.emailed_at_ms.is_none() {
        deps.notifier
            .send(EmailKind::Report, &recipients, &email::report(&report))
            .await?;
        deps.progress.mark_emailed(export_id, now).await?;
    }
    audience_export_core::crash_point("finalizer::emailed");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(done: u64, failed: u64) -> ExportProgress {
        ExportProgress {
            shards_done: done,
            shards_failed: failed,
            shards_planned: done + failed,
            sealed: true,
            ..ExportProgress::default()
        }
    }

    #[test]
    fn the_verdict_puts_refusals_first_then_stops_then_the_sweep_then_the_plan() {
        let p = progress(3, 0);
        assert_eq!(verdict(Ending::Complete, &p).0, ExportStatus::Succeeded);
        let rejected = Ending::Rejected {
            reason: "no".into(),
            notify: vec!["a@x.io".into()],
        };
        let (status, reason, notify) = verdict(rejected, &p);
        assert_eq!(
            (status, reason.as_deref()),
            (ExportStatus::Rejected, Some("no"))
        );
        assert_eq!(notify, vec!["a@x.io".to_owned()]);

        let mut stopped = progress(3, 1);
        stopped.stop_reason = Some("token invalid".into());
        let abandoned = Ending::Abandoned {
            reason: "stalled".into(),
        };
        assert_eq!(
            verdict(abandoned, &stopped).0,
            ExportStatus::Failed,
            "a stop wins over the sweep"
        );

        let mut broken = progress(2, 0);
        broken.plan_error = Some("the segment could not be read".into());
        let (status, reason, _) = verdict(Ending::Complete, &broken);
        assert_eq!(status, ExportStatus::PartiallyFailed, "never succeeded");
        assert_eq!(reason.as_deref(), Some("the segment could not be read"));
        assert_eq!(
            verdict(Ending::Complete, &{
                let mut p = progress(0, 0);
                p.plan_error = Some("x".into());
                p
            })
            .0,
            ExportStatus::Failed
        );

        let abandoned = Ending::Abandoned {
            reason: "stalled".into(),
        };
        assert_eq!(verdict(abandoned, &progress(0, 0)).0, ExportStatus::Failed);

        let mut cancelled = progress(2, 3);
        cancelled.stop_reason = Some("cancelled by ops@x.io".into());
        cancelled.cancelled = true;
        let (status, reason, _) = verdict(Ending::Complete, &cancelled);
        assert_eq!(
            (status, reason.as_deref()),
            (ExportStatus::Cancelled, Some("cancelled by ops@x.io"))
        );
    }
}
