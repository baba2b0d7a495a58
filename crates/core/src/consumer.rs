//! The consumer loop every role runs, written once: a prefetch-bounded set of deliveries handled
//! concurrently, each ending in exactly one `Outcome` that only `settle` turns into an ack, a
//! delayed retry or a dead letter; a drain on shutdown; and the reconnect loop around a broker
//! session. Handlers never ack.
//!
//! Three rules keep a message from being lost or spinning: a failure of our own infrastructure
//! (`Outcome::Retry`) goes through a delay queue, so an outage does not spend the queue's
//! delivery limit; a handler that panics has its delivery dead-lettered with the reason instead
//! of left unsettled (which would stop the consumer once `prefetch` of them piled up); and a
//! delivery the broker has handed out `POISON_AFTER` times without an outcome (its handler
//! crashed the process each time) is dead-lettered by us, with a reason and the role's
//! `dead_lettering` hook, before the broker would do it silently.

use crate::amqp::{self, PublishError, Publisher, Topology, DELIVERY_LIMIT, INFRA_RETRY_MS};
use crate::config::Settings;
use crate::telemetry::{backoff, Counters, Health, Label, Role};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How long in-flight deliveries may take to finish after shutdown before the channel closes
/// and the broker requeues them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What becomes of one delivery.
#[derive(Debug)]
pub enum Outcome {
    /// The effect is recorded: ack.
    Ack,
    /// Publish `body` to the delay queue `queue` (which dead-letters back into the work queue),
    /// then ack.
    Delay {
        queue: String,
        body: Vec<u8>,
        /// A per-message expiration shorter than the queue's TTL, to spread retries (jitter).
        expiration_ms: Option<u64>,
    },
    /// Unusable: dead-letter the original with the reason in a header, then ack.
    Reject { reason: String },
    /// Our own infrastructure (Redis, the broker) failed before the effect was recorded: the
    /// same message again after `INFRA_RETRY_MS`, through the queue's delay queue, so an outage
    /// is waited out without counting toward the delivery limit.
    Retry,
}

/// Deliveries without an outcome after which we dead-letter a message ourselves: half the
/// broker's limit, so the role's hook runs before the broker would dead-letter it silently.
pub const POISON_AFTER: i64 = DELIVERY_LIMIT / 2;

/// A role's message handling, as `serve` drives it.
pub trait Handler: Send + Sync + 'static {
    /// One delivery's outcome. Never acks: `settle` does.
    fn handle(self: Arc<Self>, delivery: Arc<Delivery>) -> impl Future<Output = Outcome> + Send;

    /// Runs before a delivery the handler never finished is dead-lettered (the handler
    /// panicked, or the delivery was handed out too often), so the role can record it where
    /// people will look: the worker fails the shard in its export's report, the producer ends the
    /// export. Not for the handler's own rejections, which record what they decide. Best effort:
    /// what it cannot record, the stalled-export sweep finds.
    fn dead_lettering(
        self: Arc<Self>,
        _delivery: Arc<Delivery>,
        _reason: String,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// What became of a delivery, for `audience_export_deliveries_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Acked,
    Delayed,
    /// An infrastructure failure, tried again after `INFRA_RETRY_MS`.
    Retried,
    DeadLettered,
    /// Its handler panicked (and it was dead-lettered).
    Panicked,
    /// Handed out `POISON_AFTER` times without an outcome (and dead-lettered).
    Poisoned,
    /// Not settled: given back to the broker (the delay or dead-letter publish failed, or the
    /// channel closed).
    Returned,
}

impl Label for Settled {
    const ALL: &'static [Settled] = &[
        Settled::Acked,
        Settled::Delayed,
        Settled::Retried,
        Settled::DeadLettered,
        Settled::Panicked,
        Settled::Poisoned,
        Settled::Returned,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Settled::Acked => "acked",
            Settled::Delayed => "delayed",
            Settled::Retried => "retried",
            Settled::DeadLettered => "dead_lettered",
            Settled::Panicked => "panicked",
            Settled::Poisoned => "poisoned",
            Settled::Returned => "returned",
        }
    }
}

/// How many times the broker has handed this delivery out before (quorum queues count returns in
/// `x-delivery-count`; absent on a first delivery).
pub fn delivery_count(delivery: &Delivery) -> i64 {
    use lapin::types::AMQPValue;
    let Some(headers) = delivery.properties.headers().as_ref() else {
        return 0;
    };
    match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortUInt(n)) => i64::from(*n),
        _ => 0,
    }
}

/// The only place a delivery is acked, delayed, rejected or given back. Whatever is published on
/// the way is confirmed before the ack, so a crash in between duplicates, never loses. Returns
/// what became of it.
pub async fn settle(
    publisher: &Publisher,
    queue: &str,
    delivery: &Delivery,
    outcome: Outcome,
) -> Settled {
    let handed_on: Result<(), PublishError> = match &outcome {
        Outcome::Ack => Ok(()),
        Outcome::Delay {
            queue: delay_queue,
            body,
            expiration_ms,
        } => {
            match publisher
                .send_expiring("", delay_queue, body, FieldTable::default(), *expiration_ms)
                .await
            {
                Ok(pending) => pending.wait().await,
                Err(e) => Err(e),
            }
        }
        Outcome::Reject { reason } => {
            warn!(message = "Message rejected to the dead-letter queue.", %queue, %reason);
            publisher.dead_letter(queue, &delivery.data, reason).await
        }
        Outcome::Retry => {
            let retry = Topology::retry(queue, INFRA_RETRY_MS);
            match publisher
                .send("", &retry, &delivery.data, FieldTable::default())
                .await
            {
                Ok(pending) => pending.wait().await,
                Err(e) => Err(e),
            }
        }
    };
    let (settled, result) = match handed_on {
        Ok(()) => {
            let result = delivery.ack(BasicAckOptions::default()).await;
            let settled = match outcome {
                Outcome::Ack => Settled::Acked,
                Outcome::Delay { .. } => Settled::Delayed,
                Outcome::Reject { .. } => Settled::DeadLettered,
                Outcome::Retry => Settled::Retried,
            };
            (settled, result)
        }
        Err(e) => {
            warn!(message = "Could not hand the message on; giving it back to the broker.", error = %e);
            // A pause so a broker in trouble is not a hot redelivery loop. Only here does a
            // message spend its delivery limit on our account: the broker itself is failing.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let result = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            (Settled::Returned, result)
        }
    };
    // lapin answers Ok(false) when nothing was sent: the channel closed under the delivery.
    match result {
        Ok(true) => settled,
        Ok(false) => {
            warn!(
                message = "Ack or nack not sent: the channel is closed; the broker will redeliver."
            );
            Settled::Returned
        }
        Err(e) => {
            warn!(message = "Ack or nack failed; the broker will redeliver.", error = %e);
            Settled::Returned
        }
    }
}

/// Runs the handler, turning a panic into a dead letter and a too-often-delivered message into
/// one, with the role's `dead_lettering` hook before either.
async fn outcome_of<D: Handler>(
    deps: Arc<D>,
    delivery: Arc<Delivery>,
    role: Role,
) -> (Outcome, Option<Settled>) {
    let count = delivery_count(&delivery);
    let (outcome, cause) = if count >= POISON_AFTER {
        let reason = format!(
            "handed out {count} times without an outcome: the {role} handling it stopped each time (crash or lost connection)"
        );
        (Outcome::Reject { reason }, Some(Settled::Poisoned))
    } else {
        match std::panic::AssertUnwindSafe(deps.clone().handle(delivery.clone()))
            .catch_unwind()
            .await
        {
            Ok(outcome) => (outcome, None),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                error!(message = "The handler panicked; dead-lettering its message.", %role, panic = %what);
                let reason = format!("the {role} handler panicked: {what}");
                (Outcome::Reject { reason }, Some(Settled::Panicked))
            }
        }
    };
    // A handler that rejects a message has already recorded what it decided; only deliveries
    // the handler never finished (a panic, a crash loop) need the role's hook.
    if let (Outcome::Reject { reason }, Some(_)) = (&outcome, cause) {
        deps.dead_lettering(delivery, reason.clone()).await;
    }
    (outcome, cause)
}

/// Consumes `queue` with `prefetch` deliveries in flight, each handled by its own task, until
/// `shutdown` (Ok) or until the channel fails (Err). On the way out it stops taking deliveries and
/// waits up to `DRAIN_TIMEOUT` for those in flight.
pub async fn consume<F, Fut>(
    channel: &Channel,
    queue: &str,
    prefetch: u16,
    shutdown: &CancellationToken,
    handler: F,
) -> anyhow::Result<()>
where
    F: Fn(Delivery) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    channel
        .basic_qos(prefetch.max(1), BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut in_flight = JoinSet::new();
    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => { in_flight.spawn(handler(delivery)); }
                Some(Err(e)) => break Err(anyhow::Error::from(e)),
                None => break Err(anyhow::anyhow!("the broker closed the consumer of {queue}")),
            },
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    };
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(message = "Deliveries still in flight at the drain deadline; the broker will redeliver them.", %queue);
    }
    ended
}

/// A failed declaration, with the fix when a queue exists with other arguments (the broker
/// refuses the declaration, 406, and the role retries until the settings match the queues).
fn explain_declare(error: lapin::Error) -> anyhow::Error {
    let inequivalent = error.to_string().contains("inequivalent arg");
    let error = anyhow::Error::new(error);
    if inequivalent {
        error.context(
            "declaring the topology: a queue exists with other arguments (was \
             AE_QUORUM_INITIAL_GROUP_SIZE changed since the queues were created?); set it back \
             to the value they were created with (change existing queues' replicas with \
             rabbitmq-queues grow|shrink instead)",
        )
    } else {
        error.context("declaring the topology")
    }
}

/// Runs broker sessions until one ends cleanly (shutdown), reconnecting with backoff after each
/// failure and keeping `/readyz` honest meanwhile.
pub async fn reconnecting<S, Fut>(
    role: Role,
    health: &Health,
    shutdown: &CancellationToken,
    mut session: S,
) -> anyhow::Result<()>
where
    S: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut failures = 0;
    loop {
        match session().await {
            Ok(()) => return Ok(()),
            Err(e) => {
                health.set_broker(false);
                failures += 1;
                let wait = backoff(
                    failures,
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                );
                error!(message = "Broker session ended; reconnecting.", %role, error = %format!("{e:#}"), wait_ms = wait.as_millis() as u64);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// Where a role's deliveries are counted.
#[derive(Clone)]
pub struct ConsumerMetrics {
    pub deliveries: Counters<Settled>,
}

impl ConsumerMetrics {
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<ConsumerMetrics> {
        Ok(ConsumerMetrics {
            deliveries: Counters::register(
                registry,
                "audience_export_deliveries_total",
                "Deliveries settled by this process, by what became of them.",
                &["outcome"],
            )?,
        })
    }
}

/// A role's whole broker life, written once for the three roles: connect, declare the topology,
/// build the role's per-session state with a confirming publisher, consume `queue_of(topology)`
/// with `prefetch` deliveries in flight, hand each to the role's `Handler`, settle its outcome;
/// reconnect with backoff when the session fails; return once `shutdown` is cancelled and
/// in-flight work drained.
#[allow(clippy::too_many_arguments)]
pub async fn serve<D, B, Q>(
    role: Role,
    settings: &Settings,
    health: &Health,
    metrics: &ConsumerMetrics,
    shutdown: &CancellationToken,
    queue_of: Q,
    prefetch: u16,
    build: B,
) -> anyhow::Result<()>
where
    D: Handler,
    B: Fn(Publisher, Topology) -> anyhow::Result<D>,
    Q: Fn(&Topology) -> String,
{
    reconnecting(role, health, shutdown, || async {
        let connection = amqp::connect(&settings.amqp_url, &format!("audience-{role}")).await?;
        let topology = Topology::from_settings(settings);
        let publisher = Publisher::new(&connection).await?;
        topology
            .declare(publisher.channel())
            .await
            .map_err(explain_declare)?;
        let queue = queue_of(&topology);
        let deps = Arc::new(build(publisher.clone(), topology)?);
        let channel = connection.create_channel().await?;
        health.set_broker(true);
        info!(message = "Consuming.", %role, %queue, prefetch);
        let ended = consume(&channel, &queue, prefetch, shutdown, |delivery| {
            let (deps, publisher, queue, metrics) = (
                deps.clone(),
                publisher.clone(),
                queue.clone(),
                metrics.clone(),
            );
            async move {
                let delivery = Arc::new(delivery);
                let (outcome, cause) = outcome_of(deps, delivery.clone(), role).await;
                let settled = match (settle(&publisher, &queue, &delivery, outcome).await, cause) {
                    (Settled::DeadLettered, Some(cause)) => cause,
                    (settled, _) => settled,
                };
                metrics.deliveries.with(settled).inc();
            }
        })
        .await;
        let _ = connection.close(200, "shutdown".into()).await;
        ended
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_declared_with_other_arguments_is_explained_with_the_fix() {
        let refused = lapin::Error::from(std::io::Error::other(
            "PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size' for queue 'ae.jobs'",
        ));
        let shown = format!("{:#}", explain_declare(refused));
        assert!(shown.contains("AE_QUORUM_INITIAL_GROUP_SIZE"), "{shown}");
        assert!(
            shown.contains("'ae.jobs'"),
            "the broker's words stay: {shown}"
        );
        let other = lapin::Error::from(std::io::Error::other("connection reset"));
        let shown = format!("{:#}", explain_declare(other));
        assert!(!shown.contains("AE_QUORUM"), "{shown}");
    }
}
