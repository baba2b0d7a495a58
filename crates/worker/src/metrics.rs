//! The worker's metrics, declared in one place. Labels are bounded and typed: field (3 values),
//! outcome and error class (a handful each); never an export, workspace or audience id.

use audience_export_core::graph::CallOutcome;
use audience_export_core::telemetry::{Counters, Histograms, Label};
use audience_export_core::Field;
use prometheus::Registry;

/// What became of one shard delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardOutcome {
    /// Sent to Meta and recorded.
    Uploaded,
    /// A transient failure: back through a delay queue with one more attempt.
    Retried,
    /// Its ad account is paused fleet-wide: back through a delay queue, no attempt spent.
    Deferred,
    /// Failed for good (a permanent answer, or out of attempts).
    Failed,
    /// Not sent, no call made: its export was stopped or its connection is unusable.
    Dropped,
    /// Counted before (a redelivery): announced again and acked.
    DuplicateDelivery,
    /// Not a shard message: dead-lettered.
    Rejected,
}

impl Label for ShardOutcome {
    const ALL: &'static [ShardOutcome] = &[
        ShardOutcome::Uploaded,
        ShardOutcome::Retried,
        ShardOutcome::Deferred,
        ShardOutcome::Failed,
        ShardOutcome::Dropped,
        ShardOutcome::DuplicateDelivery,
        ShardOutcome::Rejected,
    ];
    fn as_str(self) -> &'static str {
        match self {
            ShardOutcome::Uploaded => "uploaded",
            ShardOutcome::Retried => "retried",
            ShardOutcome::Deferred => "deferred",
            ShardOutcome::Failed => "failed",
            ShardOutcome::Dropped => "dropped",
            ShardOutcome::DuplicateDelivery => "duplicate_delivery",
            ShardOutcome::Rejected => "rejected",
        }
    }
}

/// What became of one record of an uploaded shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    Uploaded,
    /// Failed normalization: counted by reason in the report, never sent.
    Invalid,
    /// A repeat inside its shard: sent once.
    Duplicate,
}

impl Label for RecordOutcome {
    const ALL: &'static [RecordOutcome] = &[
        RecordOutcome::Uploaded,
        RecordOutcome::Invalid,
        RecordOutcome::Duplicate,
    ];
    fn as_str(self) -> &'static str {
        match self {
            RecordOutcome::Uploaded => "uploaded",
            RecordOutcome::Invalid => "invalid",
            RecordOutcome::Duplicate => "duplicate",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    /// Shards handled, by outcome.
    pub shards: Counters<ShardOutcome>,
    /// Records of uploaded shards, by field and outcome.
    pub records: Counters<(Field, RecordOutcome)>,
    /// Graph calls by result: ok, or the error class.
    pub graph_requests: Counters<CallOutcome>,
    /// Time of one upload call, by field.
    pub upload_seconds: Histograms<Field>,
    /// CPU time to normalize and hash one shard, by field.
    pub prepare_seconds: Histograms<Field>,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        Ok(Metrics {
            shards: Counters::register(
                registry,
                "audience_export_shards_total",
                "Shards handled by the worker, by outcome.",
                &["outcome"],
            )?,
            records: Counters::register(
                registry,
                "audience_export_records_total",
                "Records handled by the worker, by field and outcome.",
                &["field", "outcome"],
            )?,
            graph_requests: Counters::register(
                registry,
                "audience_export_graph_requests_total",
                "Graph API calls by result class.",
                &["class"],
            )?,
            upload_seconds: Histograms::register(
                registry,
                "audience_export_upload_duration_seconds",
                "Duration of one add-users call.",
                &["field"],
                vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            )?,
            prepare_seconds: Histograms::register(
                registry,
                "audience_export_prepare_duration_seconds",
                "CPU time to normalize and hash one shard.",
                &["field"],
                vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1],
            )?,
        })
    }
}
