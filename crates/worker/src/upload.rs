//! One shard's journey: parse, skip if counted already, prepare, wait for the ad account's rate
//! limit, upload, classify Meta's answer, record the effect in Redis and announce it. Returns one
//! `Outcome`; the consumer loop alone acks, retries or rejects.

use crate::budget::{Observed, Ticket};
use crate::isolate;
use crate::metrics::{Metrics, PauseReason, RecordOutcome, ShardOutcome};
use crate::normalize::Rules;
use crate::prepare::{prepare, Prepared};
use audience_export_core::amqp::{header_str, PublishError, Publisher, Topology};
use audience_export_core::connection::{ActiveToken, ConnectionError};
use audience_export_core::consumer::{Handler, Outcome};
use audience_export_core::contract::{Event, FOLLOW_UP, MESSAGE_KIND_HEADER};
use audience_export_core::graph::{CallOutcome, ErrorClass, GraphClient, GraphError, Usage};
use audience_export_core::pause::AccountPauses;
use audience_export_core::progress::{
    Failure, ProgressError, ProgressStore, Recorded, ShardCounts,
};
use audience_export_core::revocation::{Refusal, RevocationError, Revocations, Unusable};
use audience_export_core::Shard;
use lapin::message::Delivery;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn, Instrument};

/// The invalid reason of records Meta refused on their own (their request refused whole, and
/// alone too): never sent, counted like the values normalization drops.
pub const META_REFUSED: &str = "meta_refused";

/// Logged when a shard waits out its ad account's pause in the delay queues.
const PAUSED: &str = "Ad account paused; shard deferred.";

/// Everything a shard upload needs, shared by the worker's concurrent uploads.
pub struct Deps {
    pub graph: GraphClient,
    pub progress: ProgressStore,
    pub publisher: Publisher,
    pub topology: Topology,
    /// Each ad account's pace, shared by every worker of the fleet.
    pub budget: crate::budget::FleetBudget,
    /// Each shard's token, from its workspace's connection, unless it is unusable.
    pub revocations: Revocations,
    pub metrics: Metrics,
    pub max_attempts: u32,
    /// Fleet-wide pauses per ad account.
    pub pauses: AccountPauses,
    /// The longest pause after a throttling answer without a regain estimate (blocked
    /// answers wait it out whole).
    pub throttle_pause: Duration,
}

impl Deps {
    /// Feeds an answer (its usage, or a throttling answer's) to the shard's ad account's pace,
    /// and shows the pace that results.
    async fn steer(
        &self,
        shard: &Shard,
        ticket: Ticket,
        usage: Option<&Usage>,
        throttled: bool,
    ) -> redis::RedisResult<Option<Observed>> {
        let account = &shard.ad_account_id;
        let observed = self
            .budget
            .observe(account, ticket, usage, throttled)
            .await?;
        if let Some(o) = &observed {
            self.metrics.pace(account, o.pace_per_sec);
        }
        Ok(observed)
    }
}

/// Failures of our own infrastructure, as opposed to Meta's answers.
#[derive(Debug, thiserror::Error)]
enum InfraError {
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("Redis failed: {0}")]
    Pause(#[from] redis::RedisError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error(transparent)]
    Revocation(#[from] RevocationError),
}

impl Handler for Deps {
    async fn handle(self: Arc<Self>, delivery: Arc<Delivery>) -> Outcome {
        let kind = header_str(&delivery.properties, MESSAGE_KIND_HEADER);
        if kind.as_deref() == Some(FOLLOW_UP) {
            return crate::followup::handle(&self, &delivery.data).await;
        }
        handle(&self, &delivery.data).await
    }

    /// A shard about to be dead-lettered (its handler panicked, or it was handed out too often)
    /// is recorded failed in its export with the reason, so the export finishes and its report
    /// says so, instead of waiting for a shard that will never be counted.
    async fn dead_lettering(self: Arc<Self>, delivery: Arc<Delivery>, reason: String) {
        let Ok(shard) = serde_json::from_slice::<Shard>(&delivery.data) else {
            return;
        };
        let failure = Failure::shard(format!("dead-lettered: {reason}"));
        if let Err(error) = finish(&self, &shard, Some(&failure), &ShardCounts::default()).await {
            warn!(message = "A dead-lettered shard could not be recorded in its export.", %error);
        }
    }
}

pub async fn handle(deps: &Deps, body: &[u8]) -> Outcome {
    let shard: Shard = match serde_json::from_slice(body) {
        Ok(shard) => shard,
        Err(e) => {
            deps.metrics.shards.with(ShardOutcome::Rejected).inc();
            return Outcome::Reject {
                reason: format!("not a shard message: {e}"),
            };
        }
    };
    let span = tracing::info_span!(
        "shard",
        export_id = %shard.export_id,
        field = %shard.field,
        shard_index = shard.shard_index,
        attempt = shard.attempt
    );
    match process(deps, shard).instrument(span.clone()).await {
        Ok(outcome) => outcome,
        Err(error) => {
            span.in_scope(
                || warn!(message = "Shard effect not recorded; retrying shortly.", %error),
            );
            Outcome::Retry
        }
    }
}

async fn process(deps: &Deps, mut shard: Shard) -> Result<Outcome, InfraError> {
    audience_export_core::crash_point("worker::handle");
    let key = shard.key();
    let (done, stopped) = deps.progress.shard_gate(&shard.export_id, &key).await?;
    if let (false, Some(reason)) = (done, stopped) {
        // The export was stopped (its connection's token refused): drop what is left of it
        // without calling Meta, even if the workspace has reconnected since.
        deps.metrics.shards.with(ShardOutcome::Dropped).inc();
        let failure = Failure::export(reason);
        return finish(deps, &shard, Some(&failure), &ShardCounts::default()).await;
    }
    if done {
        // Counted before (a redelivery after a crash between record and ack): announce again,
        // since the announcement may be what was lost, and ack.
        deps.metrics
            .shards
            .with(ShardOutcome::DuplicateDelivery)
            .inc();
        announce(deps, &shard, false).await?;
        return Ok(Outcome::Ack);
    }

    // A paused account's shards wait without being prepared: hashing a shard only to defer it
    // would redo the work every cycle of the pause. (A dry run calls nobody: it never waits.)
    let paused = match shard.dry_run {
        true => None,
        false => deps.pauses.remaining(&shard.ad_account_id).await?,
    };
    if let Some(remaining) = paused {
        return Ok(defer(deps, shard, remaining, PAUSED));
    }

    let started = Instant::now();
    let field = shard.field;
    // Hashing 10,000 values takes milliseconds: off the async threads, so other uploads' I/O
    // is not held up. The records come back because a retry must carry them.
    let rules = Rules::new(shard.default_phone_country);
    let records = std::mem::take(&mut shard.records);
    let (prepared, records): (Prepared, Vec<String>) = tokio::task::spawn_blocking(move || {
        let prepared = prepare(field, &records, &rules);
        (prepared, records)
    })
    .await
    .expect("prepare does not panic");
    shard.records = records;
    deps.metrics
        .prepare_seconds
        .with(field)
        .observe(started.elapsed().as_secs_f64());
    let mut counts = prepared.counts();

    if prepared.data.is_empty() {
        return finish(deps, &shard, None, &counts).await;
    }
    if shard.dry_run {
        // Counted exactly as an upload would be, without the call: what would be sent.
        counts.uploaded = prepared.data.len() as u64;
        deps.metrics.shards.with(ShardOutcome::DryRun).inc();
        return finish(deps, &shard, None, &counts).await;
    }

    // The permit is taken on every attempt; none is given while the account is paused (a short
    // pause is waited out). A slot can be booked a little ahead: the pause is checked again once
    // it comes, so one set meanwhile (the answer of a call sent just before) is honoured.
    let ticket = match deps
        .budget
        .until_ready_unless_paused(&shard.ad_account_id)
        .await
    {
        Ok(ticket) => ticket,
        Err(remaining) => return Ok(defer(deps, shard, remaining, PAUSED)),
    };
    if let Some(remaining) = deps.pauses.remaining(&shard.ad_account_id).await? {
        deps.budget.unused(&shard.ad_account_id, ticket).await?;
        return Ok(defer(deps, shard, remaining, PAUSED));
    }
    // Resolved last, right before the call: a token refused while this shard waited for its
    // permit is not used again.
    let token = match deps.revocations.usable_token(&shard.workspace_id).await? {
        Ok(token) => token,
        Err(unusable) => {
            deps.budget.unused(&shard.ad_account_id, ticket).await?;
            if let Unusable::Unreadable(e) = &unusable {
                warn!(message = "The workspace's connection cannot be read.", error = %e);
            }
            deps.metrics.shards.with(ShardOutcome::Dropped).inc();
            let failure = Failure::export(unusable.reason(&shard.workspace_id));
            return finish(deps, &shard, Some(&failure), &counts).await;
        }
    };
    let call = Instant::now();
    let result = isolate::send(deps, &token, &shard, &prepared.data, ticket).await;
    deps.metrics
        .upload_seconds
        .with(field)
        .observe(call.elapsed().as_secs_f64());

    match result {
        Ok(sent) => {
            audience_export_core::crash_point("worker::uploaded");
            deps.metrics
                .graph_requests
                .with(CallOutcome::Ok)
                .inc_by(sent.calls as u64);
            if let Some(usage) = &sent.usage {
                deps.metrics.usage(&shard.ad_account_id, usage.percent);
            }
            if sent.refused > 0 {
                warn!(
                    message = "Meta refused some records of the shard; the others were sent.",
                    refused = sent.refused,
                    calls = sent.calls
                );
                counts.invalid.insert(META_REFUSED, sent.refused);
            }
            // The usage steers the account's pace; a window found full pauses it briefly.
            match deps
                .steer(&shard, sent.ticket, sent.usage.as_ref(), false)
                .await
            {
                Ok(observed) => {
                    if let Some(pause) = observed.and_then(|o| o.pause) {
                        deps.metrics.pauses.with(PauseReason::Usage).inc();
                        if deps.pauses.pause(&shard.ad_account_id, pause).await? {
                            info!(
                                message = "Ad account's budget used up; pausing it fleet-wide.",
                                pause_ms = pause.as_millis() as u64
                            );
                        }
                    }
                }
                Err(error) => {
                    warn!(message = "The account's usage could not be recorded; the pace stays as it was.", %error)
                }
            }
            counts.uploaded = sent.uploaded;
            counts.meta_received = sent.meta_received;
            counts.meta_invalid = sent.meta_invalid;
            counts.meta_invalid_reasons = sent.meta_invalid_reasons;
            let r = finish(deps, &shard, None, &counts).await;
            if r.is_ok() {
                let records = &deps.metrics.records;
                records
                    .with((field, RecordOutcome::Uploaded))
                    .inc_by(sent.uploaded);
                records
                    .with((field, RecordOutcome::Duplicate))
                    .inc_by(prepared.duplicates);
                records
                    .with((field, RecordOutcome::Invalid))
                    .inc_by(prepared.invalid.values().sum::<u64>() + sent.refused);
                deps.metrics.shards.with(ShardOutcome::Uploaded).inc();
                info!(
                    message = "Shard uploaded.",
                    entries = sent.uploaded,
                    meta_invalid = sent.meta_invalid
                );
            }
            r
        }
        Err((error, ticket)) => failed_call(deps, shard, &token, error, ticket, &counts).await,
    }
}

async fn failed_call(
    deps: &Deps,
    mut shard: Shard,
    token: &ActiveToken,
    error: GraphError,
    ticket: Ticket,
    counts: &ShardCounts,
) -> Result<Outcome, InfraError> {
    let class = error.class();
    deps.metrics
        .graph_requests
        .with(CallOutcome::Failed(class))
        .inc();
    if matches!(class, ErrorClass::Throttled | ErrorClass::Blocked) {
        // Waiting is the remedy, not another attempt: pause the account for the whole fleet
        // and defer the shard without spending one of its attempts.
        let pause = match class {
            // Throttled: probe again soon, longer while Meta keeps refusing (`budget`).
            ErrorClass::Throttled => deps
                .steer(&shard, ticket, error.usage().as_ref(), true)
                .await?
                .and_then(|o| o.pause)
                .unwrap_or(deps.throttle_pause),
            // Blocked: wait out what Meta says, whole.
            _ => error
                .usage()
                .and_then(|u| u.regain)
                .unwrap_or(deps.throttle_pause),
        };
        if let Some(usage) = error.usage() {
            deps.metrics.usage(&shard.ad_account_id, usage.percent);
        }
        deps.metrics.pauses.with(PauseReason::Throttled).inc();
        deps.pauses.pause(&shard.ad_account_id, pause).await?;
        warn!(message = "Meta throttled the ad account; pausing it fleet-wide.", class = class.as_str(), pause_ms = pause.as_millis() as u64, %error);
        return Ok(defer(
            deps,
            shard,
            pause,
            "Shard deferred until the ad account recovers.",
        ));
    }
    if class.is_retryable() && shard.attempt < deps.max_attempts {
        shard.attempt += 1;
        let delay_ms = deps.topology.shard_retry_delay(shard.attempt);
        warn!(message = "Upload failed; retrying later.", class = class.as_str(), delay_ms, %error);
        deps.metrics.shards.with(ShardOutcome::Retried).inc();
        let queue = Topology::retry(&deps.topology.shards(), delay_ms);
        let body = serde_json::to_vec(&shard).expect("a shard always serializes");
        return Ok(Outcome::Delay {
            queue,
            body,
            expiration_ms: Some(jittered(delay_ms)),
        });
    }
    warn!(message = "Upload failed for good.", class = class.as_str(), %error);
    let reason = error.explain(&shard.ad_account_id);
    deps.metrics.shards.with(ShardOutcome::Failed).inc();
    if let Some(lost) = crate::permission::lost(deps, &shard, token, &error).await? {
        return finish(deps, &shard, Some(&Failure::export(lost)), counts).await;
    }
    if class != ErrorClass::TokenInvalid {
        return finish(deps, &shard, Some(&Failure::shard(reason)), counts).await;
    }
    // Tell the finalizer and stop every other worker, then stop this export.
    let refusal = Refusal::new(
        &shard.workspace_id,
        Some(&shard.export_id),
        token,
        &error,
        &shard.ad_account_id,
    );
    deps.revocations
        .refused(&deps.publisher, &deps.topology, &refusal)
        .await?;
    finish(deps, &shard, Some(&Failure::export(reason)), counts).await
}

/// Sends the shard to the shortest delay queue that outlasts `wait`, with its attempt unchanged:
/// no call was spent.
fn defer(deps: &Deps, shard: Shard, wait: Duration, why: &'static str) -> Outcome {
    let wait_ms = wait.as_millis() as u64;
    let delay_ms = deps.topology.shard_delay_at_least(wait_ms);
    let expiration_ms = Some(after_pause(wait_ms, delay_ms));
    info!(message = why, delay_ms, expiration_ms);
    deps.metrics.shards.with(ShardOutcome::Deferred).inc();
    Outcome::Delay {
        queue: Topology::retry(&deps.topology.shards(), delay_ms),
        body: serde_json::to_vec(&shard).expect("a shard always serializes"),
        expiration_ms,
    }
}

/// When a deferred shard comes back (a per-message expiration, at most the delay queue's TTL):
/// at a random moment within half the pause (and a quarter second) after it ends, never before,
/// so the shards a pause held back do not all ask for a slot at once, and none waits much
/// longer than the pause (the pace, not the delay queue, spreads the calls). When even the
/// longest queue is shorter than the pause, the shard will be deferred again anyway: it comes
/// back in the second half of the queue's TTL, spread too.
fn after_pause(pause_ms: u64, queue_ms: u64) -> u64 {
    use rand::Rng;
    let (earliest, latest) = if queue_ms > pause_ms {
        (pause_ms, queue_ms.min(pause_ms + pause_ms / 2 + 250))
    } else {
        (queue_ms / 2, queue_ms)
    };
    rand::thread_rng().gen_range(earliest..=latest.max(1))
}

/// A retry delay drawn from `[delay/2, delay]`, so shards that failed together do not come back
/// together. The delay queue's own TTL (`delay`) is the upper bound.
fn jittered(delay_ms: u64) -> u64 {
    use rand::Rng;
    rand::thread_rng().gen_range(delay_ms / 2..=delay_ms.max(1))
}

/// Records the shard (once) and announces it to the finalizer.
async fn finish(
    deps: &Deps,
    shard: &Shard,
    failure: Option<&Failure>,
    counts: &ShardCounts,
) -> Result<Outcome, InfraError> {
    let recorded = deps
        .progress
        .record_shard(&shard.export_id, &shard.key(), shard.field, failure, counts)
        .await?;
    if recorded == Recorded::Unknown {
        // Its export's keys expired (or it never began): nobody waits for this shard.
        warn!(message = "A shard of an export that has no progress any more; dropped.");
        return Ok(Outcome::Ack);
    }
    announce(deps, shard, failure.is_some()).await?;
    audience_export_core::crash_point("worker::recorded");
    Ok(Outcome::Ack)
}

async fn announce(deps: &Deps, shard: &Shard, failed: bool) -> Result<(), PublishError> {
    deps.publisher
        .event(
            &deps.topology,
            &Event::ShardCompleted {
                export_id: shard.export_id.clone(),
                field: shard.field,
                shard_index: shard.shard_index,
                failed,
            },
        )
        .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn deferred_shards_come_back_spread_after_the_pause_never_inside_it() {
        let draws: Vec<u64> = (0..200)
            .map(|_| super::after_pause(10_000, 30_000))
            .collect();
        assert!(draws.iter().all(|d| (10_000..=15_250).contains(d)));
        assert!(draws.iter().any(|d| *d != draws[0]), "not a constant");
        // A queue shorter than the pause: back early (deferred again), spread as well.
        let draws: Vec<u64> = (0..200).map(|_| super::after_pause(500, 400)).collect();
        assert!(draws.iter().all(|d| (200..=400).contains(d)));
        assert!(draws.iter().any(|d| *d != draws[0]), "not a constant");
    }

    #[test]
    fn retry_delays_are_jittered_within_the_queue_ttl() {
        let draws: Vec<u64> = (0..200).map(|_| super::jittered(1_000)).collect();
        assert!(draws.iter().all(|d| (500..=1_000).contains(d)));
        assert!(draws.iter().any(|d| *d != draws[0]), "not a constant");
    }
}
