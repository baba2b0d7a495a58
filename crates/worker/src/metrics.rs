//! The worker's metrics, declared in one place. Labels are bounded and typed: field (3 values),
//! outcome and error class (a handful each); never an export, workspace or audience id.

use audience_export_core::contract::AdAccountId;
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
    /// Of a dry run: prepared and counted, no call made.
    DryRun,
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
        ShardOutcome::DryRun,
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
            ShardOutcome::DryRun => "dry_run",
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

/// Why this worker paused an ad account for the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseReason {
    /// Meta's usage headers passed the threshold.
    Usage,
    /// Meta throttled (or temporarily blocked) a call.
    Throttled,
}

impl Label for PauseReason {
    const ALL: &'static [PauseReason] = &[PauseReason::Usage, PauseReason::Throttled];
    fn as_str(self) -> &'static str {
        match self {
            PauseReason::Usage => "usage",
            PauseReason::Throttled => "throttled",
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
    /// Fleet-wide pauses of an ad account this worker started, by reason.
    pub pauses: Counters<PauseReason>,
    /// The last usage Meta reported for each ad account, in percent (the highest of its
    /// figures). Labelled by ad account: the one label that is an id, because the budget is per
    /// ad account and an operator needs to see which one is near it; an installation has a
    /// handful of ad accounts, never one per export or member.
    meta_usage: prometheus::IntGaugeVec,
    /// The fleet's pace for each ad account after the last answer this worker fed to it
    /// (`budget`'s base rate, calls/s): with the usage, what an operator needs to see whether
    /// the budget or the fleet sets an account's speed. Same label as `meta_usage`.
    pace: prometheus::GaugeVec,
}

impl Metrics {
    /// Records the usage Meta reported for `account`.
    pub fn usage(&self, account: &AdAccountId, percent: u64) {
        self.meta_usage
            .with_label_values(&[account.as_str()])
            .set(percent as i64);
    }

    /// Records the fleet's pace for `account` (calls/s).
    pub fn pace(&self, account: &AdAccountId, per_sec: f64) {
        self.pace
            .with_label_values(&[account.as_str()])
            .set(per_sec);
    }
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let meta_usage = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "audience_export_meta_usage_percent",
                "The last usage Meta reported for an ad account, in percent of its budget.",
            ),
            &["ad_account"],
        )?;
        registry.register(Box::new(meta_usage.clone()))?;
        let pace = prometheus::GaugeVec::new(
            prometheus::Opts::new(
                "audience_export_account_pace_calls_per_second",
                "The fleet's base pace for an ad account (calls/s) after the last answer this worker saw; the schedule slows below it as Meta's usage nears the target.",
            ),
            &["ad_account"],
        )?;
        registry.register(Box::new(pace.clone()))?;
        Ok(Metrics {
            meta_usage,
            pace,
            pauses: Counters::register(
                registry,
                "audience_export_account_pauses_total",
                "Fleet-wide pauses of an ad account started by this worker, by reason.",
                &["reason"],
            )?,
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
