//! The RabbitMQ topology and the publishing rule every role follows: durable quorum queues,
//! persistent messages, publisher confirms with `mandatory`, and a message counted as sent only
//! once the broker confirmed it and did not return it. This module never acks: only a consumer
//! loop decides a delivery's fate.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use serde::Serialize;

/// The three work queues, as a metric label (`queue="shards"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkQueue {
    Jobs,
    Shards,
    Finalizer,
}

impl WorkQueue {
    pub const ALL: [WorkQueue; 3] = [WorkQueue::Jobs, WorkQueue::Shards, WorkQueue::Finalizer];

    /// Its name in `topology`'s namespace.
    pub fn name(self, topology: &Topology) -> String {
        match self {
            WorkQueue::Jobs => topology.jobs(),
            WorkQueue::Shards => topology.shards(),
            WorkQueue::Finalizer => topology.finalizer(),
        }
    }

    /// Which work queue `name` is, in `topology`'s namespace.
    pub fn of(name: &str, topology: &Topology) -> Option<WorkQueue> {
        WorkQueue::ALL
            .into_iter()
            .find(|q| q.name(topology) == name)
    }
}

impl crate::telemetry::Label for WorkQueue {
    const ALL: &'static [WorkQueue] = &WorkQueue::ALL;
    fn as_str(self) -> &'static str {
        match self {
            WorkQueue::Jobs => "jobs",
            WorkQueue::Shards => "shards",
            WorkQueue::Finalizer => "finalizer",
        }
    }
}

/// Queue and exchange names of one namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    ns: String,
    /// Retry delays of the shard queue, in milliseconds.
    shard_retry_delays_ms: Vec<u64>,
    /// `x-quorum-initial-group-size` of every queue declared, when set.
    quorum_group_size: Option<u32>,
}

/// Routing keys the finalizer listens to.
pub const FINALIZER_EVENTS: [&str; 6] = [
    "shard.completed",
    "export.sealed",
    "export.followed_up",
    "ad_account.unusable",
    "export.rejected",
    "connection.invalidated",
];

/// Redeliveries of one message before the broker dead-letters it: a message that crashes its
/// consumer this often is poison, not unlucky. (`consumer` dead-letters it itself, with a
/// reason, at half this.)
pub const DELIVERY_LIMIT: i64 = 10;

/// Delay of the finalizer's own retry queue (a claim held by another finalizer).
pub const FINALIZER_RETRY_MS: u64 = 5_000;

/// How long a message waits after an infrastructure failure (Redis or the broker) before it is
/// tried again: every work queue has a delay queue of this length.
pub const INFRA_RETRY_MS: u64 = 1_000;

impl Topology {
    pub fn new(namespace: &str, shard_retry_delays_ms: Vec<u64>) -> Topology {
        Topology {
            ns: namespace.to_owned(),
            shard_retry_delays_ms,
            quorum_group_size: None,
        }
    }

    pub fn from_settings(s: &crate::config::Settings) -> Topology {
        Topology {
            quorum_group_size: s.quorum_initial_group_size,
            ..Topology::new(&s.namespace, s.worker.retry_delays_ms.clone())
        }
    }

    /// Export jobs from the upstream platform.
    pub fn jobs(&self) -> String {
        format!("{}.jobs", self.ns)
    }
    /// Shards from the producer to the workers.
    pub fn shards(&self) -> String {
        format!("{}.shards", self.ns)
    }
    /// Events the finalizer consumes.
    pub fn finalizer(&self) -> String {
        format!("{}.finalizer", self.ns)
    }
    /// Topic exchange of every event; the upstream platform binds its own queue to it.
    pub fn events(&self) -> String {
        format!("{}.events", self.ns)
    }
    /// Where a queue's poison and malformed messages go, with the reason in a header.
    pub fn dead(queue: &str) -> String {
        format!("{queue}.dead")
    }
    /// The delay queue that holds a message for `delay_ms` and dead-letters it back into `queue`.
    pub fn retry(queue: &str, delay_ms: u64) -> String {
        format!("{queue}.retry.{delay_ms}")
    }

    /// The shard retry delay for a shard about to make attempt `next_attempt` (2 for the first
    /// retry). The last configured delay repeats.
    pub fn shard_retry_delay(&self, next_attempt: u32) -> u64 {
        let i = (next_attempt.saturating_sub(2) as usize)
            .min(self.shard_retry_delays_ms.len().saturating_sub(1));
        self.shard_retry_delays_ms.get(i).copied().unwrap_or(1_000)
    }

    /// The shortest shard delay queue that holds a message at least `ms`, or the longest one.
    pub fn shard_delay_at_least(&self, ms: u64) -> u64 {
        let mut delays = self.shard_retry_delays_ms.clone();
        delays.sort_unstable();
        delays
            .iter()
            .copied()
            .find(|d| *d >= ms)
            .or(delays.last().copied())
            .unwrap_or(1_000)
    }

    /// Declares everything, idempotently. Every role calls it at start so none depends on
    /// another having started first.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        channel
            .exchange_declare(
                self.events().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        for queue in [self.jobs(), self.shards(), self.finalizer()] {
            self.declare_work_queue(channel, &queue).await?;
        }
        for (queue, delay) in self.retry_queues() {
            self.declare_retry_queue(channel, &queue, delay).await?;
        }
        for key in FINALIZER_EVENTS {
            channel
                .queue_bind(
                    self.finalizer().into(),
                    self.events().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Every delay queue, as (work queue, delay): the shards' configured delays, the
    /// finalizer's, and one of `INFRA_RETRY_MS` for every work queue.
    fn retry_queues(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .shard_retry_delays_ms
            .iter()
            .map(|d| (self.shards(), *d))
            .collect();
        out.push((self.finalizer(), FINALIZER_RETRY_MS));
        for queue in [self.jobs(), self.shards(), self.finalizer()] {
            out.push((queue, INFRA_RETRY_MS));
        }
        out.sort();
        out.dedup();
        out
    }

    /// Every queue of the namespace.
    pub fn queues(&self) -> Vec<String> {
        let mut out = Vec::new();
        for queue in [self.jobs(), self.shards(), self.finalizer()] {
            out.push(Topology::dead(&queue));
            out.push(queue);
        }
        for (queue, delay) in self.retry_queues() {
            out.push(Topology::retry(&queue, delay));
        }
        out
    }

    /// Deletes the namespace's queues and exchange, messages included. For tests and for
    /// retiring a namespace; never called by the fleet itself. (Queues are deleted explicitly:
    /// `x-expires` on quorum queues stalled other declarations on RabbitMQ 3.10 for minutes.)
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        for queue in self.queues() {
            channel
                .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
                .await?;
        }
        channel
            .exchange_delete(
                self.events().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await
    }

    fn base_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long_string("quorum"));
        if let Some(size) = self.quorum_group_size {
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongUInt(size),
            );
        }
        args
    }

    async fn declare_work_queue(&self, channel: &Channel, queue: &str) -> lapin::Result<()> {
        let dead = Topology::dead(queue);
        channel
            .queue_declare(dead.as_str().into(), durable(), self.base_args())
            .await?;
        let mut args = self.base_args();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        dead_letter_to(&mut args, &dead);
        channel.queue_declare(queue.into(), durable(), args).await?;
        Ok(())
    }

    async fn declare_retry_queue(
        &self,
        channel: &Channel,
        queue: &str,
        delay_ms: u64,
    ) -> lapin::Result<()> {
        let mut args = self.base_args();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay_ms as i64),
        );
        dead_letter_to(&mut args, queue);
        channel
            .queue_declare(Topology::retry(queue, delay_ms).into(), durable(), args)
            .await?;
        Ok(())
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Dead-letter through the default exchange straight into `target`, at least once: the broker
/// keeps the message until `target` confirms it.
fn dead_letter_to(args: &mut FieldTable, target: &str) {
    args.insert("x-dead-letter-exchange".into(), long_string(""));
    args.insert("x-dead-letter-routing-key".into(), long_string(target));
    args.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    );
    args.insert("x-overflow".into(), long_string("reject-publish"));
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Why a publish did not take.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker connection failed: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for routing key `{0}`: the message was returned")]
    Unroutable(String),
    #[error("the message could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

impl PublishError {
    /// Every publish failure is worth retrying once the connection is back; an unroutable
    /// message means the topology is missing and is not.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, PublishError::Unroutable(_) | PublishError::Encode(_))
    }
}

/// Opens a connection. Callers retry with backoff around it (lapin 4 recovers nothing by
/// itself unless asked: `reconnecting` is the one recovery). With its `tokio` feature lapin runs
/// on the calling tokio runtime, not on a global executor: that executor, shared by every
/// runtime of a process, stalled connections for minutes when test runtimes came and went.
///
/// `url` may list several nodes of a cluster, separated by commas: each call starts at the node
/// after the one the previous call of the process started at, and goes on to the next until
/// one accepts, so a connection lost with its node comes back on another.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let nodes = node_urls(url);
    let start = NEXT_NODE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut last_error = None;
    for i in 0..nodes.len() {
        let node = nodes[(start + i) % nodes.len()];
        let props = ConnectionProperties::default().with_connection_name(name.into());
        // lapin waits for the OS's TCP timeout (minutes) on a node that never answers.
        let attempt = tokio::time::timeout(NODE_CONNECT_TIMEOUT, Connection::connect(node, props))
            .await
            .unwrap_or_else(|_| {
                Err(lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer from the node",
                )))
            });
        match attempt {
            Ok(connection) => {
                if nodes.len() > 1 {
                    tracing::info!(message = "connected to RabbitMQ", node = %crate::url_list::redacted(node), connection = name);
                }
                return Ok(connection);
            }
            Err(error) => {
                if nodes.len() > 1 {
                    tracing::warn!(message = "a RabbitMQ node refused the connection; trying the next", node = %crate::url_list::redacted(node), %error);
                }
                last_error = Some(error);
            }
        }
    }
    Err(last_error.expect("at least one node"))
}

/// How long one node may take to accept a connection before the next is tried.
const NODE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where the next connection of this process starts in the node list.
static NEXT_NODE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The node URLs of `AE_AMQP_URL` (one, or several separated by commas).
pub fn node_urls(url: &str) -> Vec<&str> {
    let nodes = crate::url_list::split(url, &["amqp", "amqps"]);
    if nodes.is_empty() {
        vec![url]
    } else {
        nodes
    }
}

/// A channel in confirm mode: every publish is confirmed and `mandatory`.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

/// A publish the broker has not confirmed yet.
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    routing_key: String,
}

impl PendingConfirm {
    pub async fn wait(self) -> Result<(), PublishError> {
        match self.confirm.await? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(self.routing_key)),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
            Confirmation::NotRequested => Ok(()),
        }
    }
}

impl Publisher {
    pub async fn new(connection: &Connection) -> lapin::Result<Publisher> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Sends without waiting for the confirm, so callers can keep a window of publishes in flight.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<PendingConfirm, PublishError> {
        self.send_expiring(exchange, routing_key, body, headers, None)
            .await
    }

    /// `send` with a per-message expiration, for jittered delays in the TTL queues.
    pub async fn send_expiring(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: FieldTable,
        expiration_ms: Option<u64>,
    ) -> Result<PendingConfirm, PublishError> {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_headers(headers);
        if let Some(ms) = expiration_ms {
            props = props.with_expiration(ShortString::from(ms.to_string()));
        }
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await?;
        Ok(PendingConfirm {
            confirm,
            routing_key: routing_key.to_owned(),
        })
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        self.send(exchange, routing_key, body, headers)
            .await?
            .wait()
            .await
    }

    /// Publishes a JSON message straight to a queue through the default exchange.
    pub async fn to_queue<T: Serialize>(
        &self,
        queue: &str,
        message: &T,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_vec(message)?;
        self.publish("", queue, &body, FieldTable::default()).await
    }

    /// Publishes an event on the topic exchange.
    pub async fn event(
        &self,
        topology: &Topology,
        event: &crate::contract::Event,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event)?;
        let key = event.routing_key();
        match self
            .publish(&topology.events(), key, &body, FieldTable::default())
            .await
        {
            // Events the fleet itself consumes must reach the finalizer's queue: unroutable
            // means the topology is missing. The others are broadcasts for the upstream
            // platform; nobody listening is not a failure of ours.
            Err(PublishError::Unroutable(_)) if !FINALIZER_EVENTS.contains(&key) => {
                tracing::debug!(message = "Nobody listens to this event.", routing_key = key);
                Ok(())
            }
            other => other,
        }
    }

    /// How many messages `queue` holds (ready, not the ones delivered and unacked), by a passive
    /// declare: the queue must exist (every role declares the topology first).
    pub async fn depth(&self, queue: &str) -> Result<u32, PublishError> {
        let declared = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(declared.message_count())
    }

    /// Parks a message in `queue`'s dead-letter queue with the reason in the
    /// `x-rejection-reason` header. The caller acks the original only after this returns Ok.
    pub async fn dead_letter(
        &self,
        queue: &str,
        body: &[u8],
        reason: &str,
    ) -> Result<(), PublishError> {
        let mut headers = FieldTable::default();
        headers.insert("x-rejection-reason".into(), long_string(reason));
        headers.insert("x-original-queue".into(), long_string(queue));
        self.publish("", &Topology::dead(queue), body, headers)
            .await
    }
}

/// Events of the fleet for `routing_key` (`#` for all), through an exclusive, auto-deleted queue
/// consumed without acks: how the upstream platform's listener, the demo and the tests follow an
/// export. The channel is returned with the consumer; drop both to stop listening.
pub async fn subscribe(
    connection: &Connection,
    topology: &Topology,
    routing_key: &str,
) -> lapin::Result<(Channel, lapin::Consumer)> {
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            topology.events().into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// Reads a string header of a delivery, for tests and operators' tools.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_step_up_then_repeat_the_last() {
        let t = Topology::new("ns", vec![10, 20, 40]);
        assert_eq!(t.shard_retry_delay(2), 10);
        assert_eq!(t.shard_retry_delay(3), 20);
        assert_eq!(t.shard_retry_delay(4), 40);
        assert_eq!(t.shard_retry_delay(9), 40);
    }

    #[test]
    fn a_deferral_waits_in_the_shortest_queue_that_is_long_enough() {
        let t = Topology::new("ns", vec![1_000, 5_000, 30_000]);
        assert_eq!(t.shard_delay_at_least(10), 1_000);
        assert_eq!(t.shard_delay_at_least(1_001), 5_000);
        assert_eq!(t.shard_delay_at_least(99_000), 30_000);
    }

    #[test]
    fn names_carry_the_namespace() {
        let t = Topology::new("blue", vec![]);
        assert_eq!(t.shards(), "blue.shards");
        assert_eq!(Topology::dead(&t.jobs()), "blue.jobs.dead");
        assert_eq!(Topology::retry(&t.shards(), 500), "blue.shards.retry.500");
    }

    #[test]
    fn several_nodes_are_split_where_a_url_starts() {
        assert_eq!(
            node_urls("amqp://u:p,w@a:5672/%2f, amqp://u:p@b:5673/%2f,"),
            vec!["amqp://u:p,w@a:5672/%2f", "amqp://u:p@b:5673/%2f"]
        );
        assert_eq!(node_urls("amqp://a/%2f"), vec!["amqp://a/%2f"]);
    }

    #[test]
    fn the_quorum_group_size_is_declared_only_when_set() {
        let mut settings = crate::config::Settings::default();
        let args = Topology::from_settings(&settings).base_args();
        assert!(args.inner().get("x-quorum-initial-group-size").is_none());
        settings.quorum_initial_group_size = Some(3);
        let args = Topology::from_settings(&settings).base_args();
        assert_eq!(
            args.inner().get("x-quorum-initial-group-size"),
            Some(&AMQPValue::LongUInt(3))
        );
    }
}
