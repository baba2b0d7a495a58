//! One shard's journey: parse, skip if counted already, prepare, wait for the ad account's rate
//! limit, upload, classify Meta's answer, record the effect in Redis and announce it. Returns one
//! `Outcome`; the consumer loop alone acks, retries or rejects.

use crate::metrics::Metrics;
use crate::normalize::Rules;
use crate::prepare::{prepare, Prepared};
use audience_export_core::amqp::{PublishError, Publisher, Topology};
use audience_export_core::connection::{ActiveToken, ConnectionError, Connections};
use audience_export_core::consumer::Outcome;
use audience_export_core::contract::Event;
use audience_export_core::graph::{ErrorClass, GraphClient, GraphError};
use audience_export_core::pause::AccountPauses;
use audience_export_core::progress::{Failure, ProgressError, ProgressStore};
use audience_export_core::Shard;
use governor::{DefaultKeyedRateLimiter, Quota};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn, Instrument};

/// Everything a shard upload needs, shared by the worker's concurrent uploads.
pub struct Deps {
    pub graph: GraphClient,
    pub progress: ProgressStore,
    pub publisher: Publisher,
    pub topology: Topology,
    /// Per-ad-account budget of this process.
    pub limiter: DefaultKeyedRateLimiter<String>,
    /// Workspaces' Facebook connections: each shard's token comes from its workspace's.
    pub connections: Connections,
    pub metrics: Metrics,
    pub max_attempts: u32,
    /// Fleet-wide pauses per ad account, and revoked tokens.
    pub pauses: AccountPauses,
    pub pacing: Pacing,
}

/// When to pause an ad account, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub usage_threshold_pct: u64,
    pub usage_pause: Duration,
    pub throttle_pause: Duration,
}

impl Pacing {
    pub fn from_settings(w: &audience_export_core::config::WorkerSettings) -> Pacing {
        Pacing {
            usage_threshold_pct: w.usage_pause_threshold_pct,
            usage_pause: Duration::from_millis(w.usage_pause_ms),
            throttle_pause: Duration::from_millis(w.throttle_pause_ms),
        }
    }
}

impl Deps {
    pub fn limiter(calls_per_second: u32) -> DefaultKeyedRateLimiter<String> {
        let rate = NonZeroU32::new(calls_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        // No burst: after a pause, a worker resumes one call at a time rather than all at once.
        governor::RateLimiter::keyed(Quota::per_second(rate).allow_burst(NonZeroU32::MIN))
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
    Connection(ConnectionError),
}

pub async fn handle(deps: Arc<Deps>, body: &[u8]) -> Outcome {
    let shard: Shard = match serde_json::from_slice(body) {
        Ok(shard) => shard,
        Err(e) => {
            deps.metrics.shards.with_label_values(&["rejected"]).inc();
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
    match process(&deps, shard).instrument(span.clone()).await {
        Ok(outcome) => outcome,
        Err(error) => {
            span.in_scope(|| warn!(message = "Shard effect not recorded; requeueing.", %error));
            Outcome::Requeue
        }
    }
}

async fn process(deps: &Deps, mut shard: Shard) -> Result<Outcome, InfraError> {
    let key = shard.key();
    let (done, stopped) = deps.progress.shard_gate(&shard.export_id, &key).await?;
    if let (false, Some(reason)) = (done, stopped) {
        // The export was stopped (its connection's token refused): drop what is left of it
        // without calling Meta, even if the workspace has reconnected since.
        deps.metrics.shards.with_label_values(&["dropped"]).inc();
        return finish(deps, &shard, Some(&Failure::export(reason)), Vec::new()).await;
    }
    if done {
        // Counted before (a redelivery after a crash between record and ack): announce again,
        // since the announcement may be what was lost, and ack.
        deps.metrics
            .shards
            .with_label_values(&["duplicate_delivery"])
            .inc();
        announce(deps, &shard, false).await?;
        return Ok(Outcome::Ack);
    }

    let started = Instant::now();
    let field = shard.field;
    // Hashing 10,000 values takes milliseconds: off the async threads, so other uploads' I/O
    // is not held up. The records come back because a retry must carry them.
    // The producer checked the country when it accepted the job.
    let rules = Rules::with_country(shard.default_phone_country.as_deref()).unwrap_or_default();
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
        .with_label_values(&[field.as_str()])
        .observe(started.elapsed().as_secs_f64());
    let mut counters = prepared.counters(field);

    if prepared.data.is_empty() {
        return finish(deps, &shard, None, counters).await;
    }

    // The permit is taken on every attempt; then the fleet-wide pause is checked last, so a
    // pause set while this upload waited is honoured.
    deps.limiter.until_key_ready(&shard.ad_account_id).await;
    if let Some(remaining) = deps.pauses.remaining(&shard.ad_account_id).await? {
        return Ok(defer(
            deps,
            shard,
            remaining,
            "Ad account paused; shard deferred.",
        ));
    }
    // Resolved last, right before the call: a token refused while this shard waited for its
    // permit is not used again.
    let token = match usable_token(deps, &shard).await? {
        Ok(token) => token,
        Err(reason) => {
            deps.metrics.shards.with_label_values(&["dropped"]).inc();
            return finish(deps, &shard, Some(&Failure::export(reason)), counters).await;
        }
    };
    let call = Instant::now();
    let result = deps
        .graph
        .add_users(
            &token.token,
            &shard.audience_id,
            field.schema(),
            &prepared.data,
        )
        .await;
    deps.metrics
        .upload_seconds
        .with_label_values(&[field.as_str()])
        .observe(call.elapsed().as_secs_f64());

    match result {
        Ok(answer) => {
            deps.metrics.graph_requests.with_label_values(&["ok"]).inc();
            if let Some(usage) = answer
                .usage
                .filter(|u| u.percent >= deps.pacing.usage_threshold_pct)
            {
                if deps
                    .pauses
                    .pause(&shard.ad_account_id, deps.pacing.usage_pause)
                    .await?
                {
                    info!(
                        message = "Ad account usage past the threshold; pausing it fleet-wide.",
                        percent = usage.percent,
                        pause_ms = deps.pacing.usage_pause.as_millis() as u64
                    );
                }
            }
            counters.push((format!("{field}:uploaded"), prepared.data.len() as u64));
            counters.push((format!("{field}:meta_received"), answer.num_received));
            counters.push((format!("{field}:meta_invalid"), answer.num_invalid_entries));
            let r = finish(deps, &shard, None, counters).await;
            if r.is_ok() {
                let records = &deps.metrics.records;
                records
                    .with_label_values(&[field.as_str(), "uploaded"])
                    .inc_by(prepared.data.len() as u64);
                records
                    .with_label_values(&[field.as_str(), "duplicate"])
                    .inc_by(prepared.duplicates);
                records
                    .with_label_values(&[field.as_str(), "invalid"])
                    .inc_by(prepared.invalid.values().sum());
                deps.metrics.shards.with_label_values(&["uploaded"]).inc();
                info!(
                    message = "Shard uploaded.",
                    entries = prepared.data.len(),
                    meta_invalid = answer.num_invalid_entries
                );
            }
            r
        }
        Err(error) => failed_call(deps, shard, &token, error, counters).await,
    }
}

/// The workspace's token, or why nothing may be sent for this shard: no connection any more,
/// the connection marked invalid, or this very token already refused by Meta (recorded by the
/// first worker that got the refusal, before the finalizer marks the connection invalid).
async fn usable_token(
    deps: &Deps,
    shard: &Shard,
) -> Result<Result<ActiveToken, String>, InfraError> {
    let ws = &shard.workspace_id;
    let token = match deps.connections.active_token(ws).await {
        Ok(Some(token)) => token,
        Ok(None) => {
            return Ok(Err(format!(
                "no Facebook connection: workspace {ws} was disconnected during the export. Reconnect Facebook, then export again."
            )))
        }
        Err(e) if e.is_retryable() => return Err(InfraError::Connection(e)),
        Err(e) => {
            warn!(message = "The workspace's connection cannot be read.", error = %e);
            return Ok(Err(format!(
                "the Facebook connection of workspace {ws} cannot be read ({e}); reconnect Facebook"
            )));
        }
    };
    if let Some(reason) = &token.invalid {
        return Ok(Err(reason.clone()));
    }
    if let Some(reason) = deps.pauses.token_revoked(ws, &token.fingerprint).await? {
        return Ok(Err(reason));
    }
    Ok(Ok(token))
}

async fn failed_call(
    deps: &Deps,
    mut shard: Shard,
    token: &ActiveToken,
    error: GraphError,
    counters: Vec<(String, u64)>,
) -> Result<Outcome, InfraError> {
    let class = error.class();
    deps.metrics
        .graph_requests
        .with_label_values(&[class.as_str()])
        .inc();
    if matches!(class, ErrorClass::Throttled | ErrorClass::Blocked) {
        // Waiting is the remedy, not another attempt: pause the account for the whole fleet
        // and defer the shard without spending one of its attempts.
        let pause = error
            .usage()
            .and_then(|u| u.regain)
            .unwrap_or(deps.pacing.throttle_pause);
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
        deps.metrics.shards.with_label_values(&["retried"]).inc();
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
    deps.metrics.shards.with_label_values(&["failed"]).inc();
    if class != ErrorClass::TokenInvalid {
        return finish(deps, &shard, Some(&Failure::shard(reason)), counters).await;
    }
    // Tell the finalizer (which marks the connection invalid and tells people), then stop
    // every other worker (the marker is read before each call). In that order: a marker whose
    // event was lost would drop every shard silently, the connection still "valid"; an event
    // whose marker was lost costs one more refused call on redelivery.
    let meta = error.meta().cloned().unwrap_or_default();
    deps.publisher
        .event(
            &deps.topology,
            &Event::ConnectionInvalidated {
                workspace_id: shard.workspace_id.clone(),
                export_id: Some(shard.export_id.clone()),
                token_fingerprint: token.fingerprint.clone(),
                code: meta.code.unwrap_or(190),
                subcode: meta.error_subcode,
                message: meta.message,
            },
        )
        .await?;
    deps.pauses
        .revoke_token(&shard.workspace_id, &token.fingerprint, &reason)
        .await?;
    finish(deps, &shard, Some(&Failure::export(reason)), counters).await
}

/// Sends the shard to the shortest delay queue that outlasts `wait`, with its attempt unchanged:
/// no call was spent.
fn defer(deps: &Deps, shard: Shard, wait: Duration, why: &'static str) -> Outcome {
    let delay_ms = deps.topology.shard_delay_at_least(wait.as_millis() as u64);
    info!(message = why, delay_ms);
    deps.metrics.shards.with_label_values(&["deferred"]).inc();
    Outcome::Delay {
        queue: Topology::retry(&deps.topology.shards(), delay_ms),
        body: serde_json::to_vec(&shard).expect("a shard always serializes"),
        // No jitter below the pause: the shard must not come back while the account is paused.
        expiration_ms: None,
    }
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
    counters: Vec<(String, u64)>,
) -> Result<Outcome, InfraError> {
    deps.progress
        .record_shard(
            &shard.export_id,
            &shard.key(),
            shard.field,
            failure,
            &counters,
        )
        .await?;
    announce(deps, shard, failure.is_some()).await?;
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
    fn retry_delays_are_jittered_within_the_queue_ttl() {
        let draws: Vec<u64> = (0..200).map(|_| super::jittered(1_000)).collect();
        assert!(draws.iter().all(|d| (500..=1_000).contains(d)));
        assert!(draws.iter().any(|d| *d != draws[0]), "not a constant");
    }
}
