//! Nothing ends silently. Every `sweep_interval_secs` the finalizer walks the exports begun and
//! not finished: one with no progress for `stall_after_secs`, or not finished
//! `export_deadline_secs` after it began (throttling deferrals count), is finished through the
//! usual claim (failed, or partially failed when some shards arrived) with a reason naming the
//! shards that never arrived, and its email. Finishing sets its `stop_reason`, so a shard that
//! turns up later is dropped, not uploaded into a finished export. The same pass reads the depth
//! of every dead-letter queue for `audience_export_dead_letters`.
//!
//! It runs beside each broker session (it finishes through that session's publisher) and stops
//! with it; every finalizer replica sweeps, and the finalization claim lets one finish each export.

use crate::finalize::{self, Ending};
use crate::metrics::Abandoned;
use crate::{Deps, FinalizeError};
use audience_export_core::amqp::{Topology, WorkQueue};
use audience_export_core::contract::{shard_key, ExportId};
use audience_export_core::progress::{now_ms, ExportProgress};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// When the sweep gives up on an export.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub deadline: Duration,
    pub stall: Duration,
}

/// Sweeps every `interval` until `stop`.
pub async fn run(deps: Deps, limits: Limits, interval: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Err(error) = sweep(&deps, limits, now_ms()).await {
            warn!(message = "The stalled-export sweep failed; trying again next time.", %error);
        }
        dead_letter_depths(&deps).await;
    }
}

/// One pass at `now` (ms). Returns how many exports it finished.
pub async fn sweep(deps: &Deps, limits: Limits, now: u64) -> Result<u64, FinalizeError> {
    let mut finished = 0;
    let unfinished = deps.progress.unfinished().await?;
    deps.metrics.unfinished.set(unfinished.len() as i64);
    for export_id in unfinished {
        let progress = deps.progress.progress(&export_id).await?;
        match progress.status {
            None => {
                // Its keys expired: nothing left to finish.
                deps.progress.forget(&export_id).await?;
                continue;
            }
            Some(status) if status.is_finished() => {
                deps.progress.forget(&export_id).await?;
                continue;
            }
            Some(_) => {}
        }
        let Some((why, reason)) = verdict(&progress, limits, now) else {
            continue;
        };
        if progress.is_complete() {
            // Every shard arrived; only its follow-up (sizes, lookalikes) never came: finished
            // as complete, without what the follow-up would add.
            warn!(message = "A complete export's follow-up never came; finishing it without.", %export_id);
            if finalize::finish(deps, &export_id, Ending::Complete).await? == crate::Handled::Done {
                finished += 1;
            }
            continue;
        }
        let reason = format!("{reason}; {}", missing(deps, &export_id, &progress).await?);
        warn!(message = "Finishing an export that will not finish by itself.", %export_id, why = ?why, %reason);
        if finalize::finish(deps, &export_id, Ending::Abandoned { reason }).await?
            == crate::Handled::Done
        {
            deps.metrics.abandoned.with(why).inc();
            finished += 1;
        }
    }
    Ok(finished)
}

/// Whether an unfinished export is past its deadline or stalled, and the reason's start.
fn verdict(progress: &ExportProgress, limits: Limits, now: u64) -> Option<(Abandoned, String)> {
    let started = progress.started_at_ms.unwrap_or(now);
    let idle = now.saturating_sub(progress.last_activity_ms());
    if now.saturating_sub(started) >= limits.deadline.as_millis() as u64 {
        Some((
            Abandoned::PastDeadline,
            format!(
                "not finished {} after it began (the deadline)",
                human(limits.deadline)
            ),
        ))
    } else if idle >= limits.stall.as_millis() as u64 {
        Some((
            Abandoned::Stalled,
            format!(
                "stalled: no progress for {}",
                human(Duration::from_millis(idle))
            ),
        ))
    } else {
        None
    }
}

/// "3 of 40 batches never arrived (email #3, #7; phone #2)", or that planning never finished.
async fn missing(
    deps: &Deps,
    export_id: &ExportId,
    progress: &ExportProgress,
) -> Result<String, FinalizeError> {
    let done = deps.progress.done_shards(export_id).await?;
    let plan = progress.plan_fingerprint.as_deref().unwrap_or_default();
    let mut names = Vec::new();
    let mut count = 0u64;
    for (&field, f) in &progress.fields {
        let missing: Vec<String> = (0..f.shards as u32)
            .filter(|&i| !done.contains(&shard_key(plan, field, i)))
            .map(|i| format!("#{i}"))
            .collect();
        count += missing.len() as u64;
        if !missing.is_empty() {
            let shown: Vec<String> = missing.iter().take(10).cloned().collect();
            let more = if missing.len() > 10 { ", ..." } else { "" };
            names.push(format!("{field} {}{more}", shown.join(", ")));
        }
    }
    let total: u64 = progress.fields.values().map(|f| f.shards).sum();
    let arrived = if count == 0 {
        "no published batch is missing".to_owned()
    } else {
        format!(
            "{count} of {total} batches never arrived ({}); the dead-letter queues may hold them",
            names.join("; ")
        )
    };
    Ok(if progress.sealed {
        arrived
    } else {
        format!("planning never finished ({total} batches published); {arrived}")
    })
}

fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 {
        format!("{:.1} h", secs as f64 / 3600.0)
    } else if secs >= 60 {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// Reads each dead-letter queue's depth into `audience_export_dead_letters`.
async fn dead_letter_depths(deps: &Deps) {
    for queue in WorkQueue::ALL {
        let dead = Topology::dead(&queue.name(&deps.topology));
        match deps.publisher.depth(&dead).await {
            Ok(n) => deps.metrics.dead_letters.with(queue).set(i64::from(n)),
            Err(error) => {
                info!(message = "Could not read a dead-letter queue's depth.", queue = %dead, %error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use audience_export_core::progress::ProgressStatus;

    #[test]
    fn stalled_and_late_exports_are_told_apart() {
        let limits = Limits {
            deadline: Duration::from_secs(3600),
            stall: Duration::from_secs(60),
        };
        let mut p = ExportProgress {
            status: Some(ProgressStatus::Running),
            started_at_ms: Some(1_000_000),
            updated_at_ms: Some(1_050_000),
            ..ExportProgress::default()
        };
        assert!(verdict(&p, limits, 1_100_000).is_none(), "50 s idle");
        let (why, reason) = verdict(&p, limits, 1_110_000).expect("60 s idle");
        assert_eq!(why, Abandoned::Stalled);
        assert!(reason.contains("no progress for 1 min"), "{reason}");
        p.updated_at_ms = Some(4_600_000);
        let (why, _) = verdict(&p, limits, 4_600_001).expect("an hour old");
        assert_eq!(why, Abandoned::PastDeadline);
    }
}
