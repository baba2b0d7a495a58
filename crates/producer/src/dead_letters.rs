//! The operators' view of the dead-letter queues (`audience-producer dead-letters list|replay`):
//! what is parked in `{ns}.<queue>.dead`, why (the `x-rejection-reason` header, or the broker's
//! own `x-death` record), and for which export; and putting messages back where they came from
//! once the cause is fixed. Never prints a record's values: only ids, reasons and counts.

use audience_export_core::amqp::{self, header_str, Publisher, Topology, WorkQueue};
use audience_export_core::config::Settings;
use audience_export_core::contract::Event;
use audience_export_core::Shard;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;

/// One parked message, described without its content.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The work queue it was taken from.
    pub queue: WorkQueue,
    /// Why it was dead-lettered.
    pub reason: String,
    /// The export it belongs to, when its body names one.
    pub export_id: Option<String>,
    /// What it is: `job`, `shard email #3`, `event shard.completed`, or `unreadable`.
    pub what: String,
}

impl std::fmt::Display for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} export={} reason={:?}",
            self.queue_name(),
            self.what,
            self.export_id.as_deref().unwrap_or("-"),
            self.reason
        )
    }
}

impl DeadLetter {
    fn queue_name(&self) -> &'static str {
        audience_export_core::telemetry::Label::as_str(self.queue)
    }
}

/// Reads up to `limit` messages of `queue`'s dead-letter queue without taking them: the channel
/// is closed unacked, so the broker keeps every one.
pub async fn list(
    settings: &Settings,
    queue: WorkQueue,
    limit: usize,
) -> anyhow::Result<Vec<DeadLetter>> {
    let topology = Topology::from_settings(settings);
    let connection = amqp::connect(&settings.amqp_url, "producer-dead-letters").await?;
    let channel = connection.create_channel().await?;
    let dead = Topology::dead(&queue.name(&topology));
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(message) = channel
            .basic_get(dead.as_str().into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        out.push(describe(queue, &message.delivery));
    }
    let _ = connection.close(200, "listed".into()).await;
    Ok(out)
}

/// Moves up to `limit` messages of `queue`'s dead-letter queue back into `queue`, each confirmed
/// by the broker before it leaves the dead-letter queue. Returns what was replayed.
pub async fn replay(
    settings: &Settings,
    queue: WorkQueue,
    limit: usize,
) -> anyhow::Result<Vec<DeadLetter>> {
    let topology = Topology::from_settings(settings);
    let connection = amqp::connect(&settings.amqp_url, "producer-dead-letters").await?;
    let publisher = Publisher::new(&connection).await?;
    let target = queue.name(&topology);
    let dead = Topology::dead(&target);
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(message) = publisher
            .channel()
            .basic_get(dead.as_str().into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        publisher
            .publish("", &target, &message.delivery.data, FieldTable::default())
            .await?;
        message.delivery.ack(BasicAckOptions::default()).await?;
        out.push(describe(queue, &message.delivery));
    }
    let _ = connection.close(200, "replayed".into()).await;
    Ok(out)
}

fn describe(queue: WorkQueue, delivery: &lapin::message::Delivery) -> DeadLetter {
    let reason = header_str(&delivery.properties, "x-rejection-reason")
        .or_else(|| death_reason(&delivery.properties))
        .unwrap_or_else(|| "no reason recorded".into());
    let (export_id, what) = match queue {
        WorkQueue::Shards => match serde_json::from_slice::<Shard>(&delivery.data) {
            Ok(s) => (
                Some(s.export_id.to_string()),
                format!("shard {} #{}", s.field, s.shard_index),
            ),
            Err(_) => (None, "unreadable".into()),
        },
        WorkQueue::Finalizer => match serde_json::from_slice::<Event>(&delivery.data) {
            Ok(e) => (event_export(&e), format!("event {}", e.routing_key())),
            Err(_) => (None, "unreadable".into()),
        },
        WorkQueue::Jobs => {
            let id = serde_json::from_slice::<Value>(&delivery.data)
                .ok()
                .and_then(|v| v.get("export_id")?.as_str().map(str::to_owned));
            (id, "job".into())
        }
    };
    DeadLetter {
        queue,
        reason,
        export_id,
        what,
    }
}

fn event_export(event: &Event) -> Option<String> {
    match event {
        Event::ShardCompleted { export_id, .. }
        | Event::ExportSealed { export_id }
        | Event::ExportFollowedUp { export_id }
        | Event::ExportRejected { export_id, .. } => Some(export_id.to_string()),
        Event::ExportFinished(r) => Some(r.export_id.to_string()),
        Event::ConnectionInvalidated { export_id, .. }
        | Event::AdAccountUnusable { export_id, .. } => export_id.as_ref().map(|e| e.to_string()),
        Event::ConnectionChanged { .. } => None,
    }
}

/// The broker's own reason, when it dead-lettered the message itself (the delivery limit):
/// `x-death[0].reason`.
fn death_reason(props: &lapin::BasicProperties) -> Option<String> {
    let headers = props.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(format!("the broker dead-lettered it: {s}")),
        AMQPValue::ShortString(s) => Some(format!("the broker dead-lettered it: {s}")),
        _ => None,
    }
}
