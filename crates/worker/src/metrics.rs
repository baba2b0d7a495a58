//! The worker's metrics, declared in one place. Labels are bounded: field (3 values), outcome and
//! error class (a handful each); never an export, workspace or audience id.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    /// Shards handled, by outcome: uploaded, retried, deferred, failed, dropped (export stopped
    /// or connection unusable: no call made), duplicate_delivery, rejected.
    pub shards: IntCounterVec,
    /// Records handled, by field and outcome: uploaded, invalid, duplicate.
    pub records: IntCounterVec,
    /// Graph calls by result class: ok, or the error class.
    pub graph_requests: IntCounterVec,
    /// Time of one upload call, by field.
    pub upload_seconds: HistogramVec,
    /// CPU time to normalize and hash one shard, by field.
    pub prepare_seconds: HistogramVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let shards = IntCounterVec::new(
            Opts::new(
                "audience_export_shards_total",
                "Shards handled by the worker, by outcome.",
            ),
            &["outcome"],
        )?;
        let records = IntCounterVec::new(
            Opts::new(
                "audience_export_records_total",
                "Records handled by the worker, by field and outcome.",
            ),
            &["field", "outcome"],
        )?;
        let graph_requests = IntCounterVec::new(
            Opts::new(
                "audience_export_graph_requests_total",
                "Graph API calls by result class.",
            ),
            &["class"],
        )?;
        let upload_seconds = HistogramVec::new(
            HistogramOpts::new(
                "audience_export_upload_duration_seconds",
                "Duration of one add-users call.",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["field"],
        )?;
        let prepare_seconds = HistogramVec::new(
            HistogramOpts::new(
                "audience_export_prepare_duration_seconds",
                "CPU time to normalize and hash one shard.",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]),
            &["field"],
        )?;
        registry.register(Box::new(shards.clone()))?;
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(graph_requests.clone()))?;
        registry.register(Box::new(upload_seconds.clone()))?;
        registry.register(Box::new(prepare_seconds.clone()))?;
        Ok(Metrics {
            shards,
            records,
            graph_requests,
            upload_seconds,
            prepare_seconds,
        })
    }
}
