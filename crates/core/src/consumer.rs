//! The consumer loop every role runs, written once: a prefetch-bounded set of deliveries handled
//! concurrently, each ending in exactly one `Outcome` that only `settle` turns into an ack, a
//! delayed retry, a dead letter or a requeue; a drain on shutdown; and the reconnect loop around
//! a broker session. Handlers never ack.

use crate::amqp::{self, PublishError, Publisher, Topology};
use crate::config::Settings;
use crate::telemetry::{backoff, Health, Role};
use futures::StreamExt;
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
    /// Our own infrastructure failed before the effect was recorded: give it back to the broker.
    Requeue,
}

/// The only place a delivery is acked, delayed, rejected or requeued. Whatever is published on
/// the way is confirmed before the ack, so a crash in between duplicates, never loses.
pub async fn settle(publisher: &Publisher, queue: &str, delivery: &Delivery, outcome: Outcome) {
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
        Outcome::Requeue => Err(PublishError::Nacked),
    };
    let settled = match handed_on {
        Ok(()) => delivery.ack(BasicAckOptions::default()).await,
        Err(e) => {
            if !matches!(outcome, Outcome::Requeue) {
                warn!(message = "Could not hand the message on; requeueing it.", error = %e);
            }
            // A pause so an outage of Redis or the broker is not a hot redelivery loop; the
            // queue's delivery limit bounds the repeats.
            tokio::time::sleep(Duration::from_millis(500)).await;
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
    };
    // lapin answers Ok(false) when nothing was sent: the channel closed under the delivery.
    match settled {
        Ok(true) => {}
        Ok(false) => {
            warn!(
                message = "Ack or nack not sent: the channel is closed; the broker will redeliver."
            )
        }
        Err(e) => warn!(message = "Ack or nack failed; the broker will redeliver.", error = %e),
    }
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

/// A role's whole broker life, written once for the three roles: connect, declare the topology,
/// build the role's per-session state with a confirming publisher, consume `queue_of(topology)`
/// with `prefetch` deliveries in flight, hand each to `handle`, settle its outcome; reconnect with
/// backoff when the session fails; return once `shutdown` is cancelled and in-flight work drained.
#[allow(clippy::too_many_arguments)]
pub async fn serve<D, B, Q, H, Fut>(
    role: Role,
    settings: &Settings,
    health: &Health,
    shutdown: &CancellationToken,
    queue_of: Q,
    prefetch: u16,
    build: B,
    handle: H,
) -> anyhow::Result<()>
where
    D: Send + Sync + 'static,
    B: Fn(Publisher, Topology) -> anyhow::Result<D>,
    Q: Fn(&Topology) -> String,
    H: Fn(Arc<D>, Arc<Delivery>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    reconnecting(role, health, shutdown, || async {
        let connection = amqp::connect(&settings.amqp_url, &format!("audience-{role}")).await?;
        let topology = Topology::from_settings(settings);
        let publisher = Publisher::new(&connection).await?;
        topology.declare(publisher.channel()).await?;
        let queue = queue_of(&topology);
        let deps = Arc::new(build(publisher.clone(), topology)?);
        let channel = connection.create_channel().await?;
        health.set_broker(true);
        info!(message = "Consuming.", %role, %queue, prefetch);
        let ended = consume(&channel, &queue, prefetch, shutdown, |delivery| {
            let (deps, publisher, queue, handle) = (
                deps.clone(),
                publisher.clone(),
                queue.clone(),
                handle.clone(),
            );
            async move {
                let delivery = Arc::new(delivery);
                let outcome = handle(deps, delivery.clone()).await;
                settle(&publisher, &queue, &delivery, outcome).await;
            }
        })
        .await;
        let _ = connection.close(200, "shutdown".into()).await;
        ended
    })
    .await
}
