//! The producer's metrics, declared in one place, with bounded labels only.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    /// Jobs by outcome: planned, duplicate, rejected, requeued.
    pub jobs: IntCounterVec,
    /// Segment members read.
    pub members: IntCounter,
    /// Shards published and confirmed, by field.
    pub shards: IntCounterVec,
    /// HTTP API requests, by route template and status code.
    pub api_requests: IntCounterVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let jobs = IntCounterVec::new(
            Opts::new(
                "audience_export_jobs_total",
                "Export jobs taken by the producer, by outcome.",
            ),
            &["outcome"],
        )?;
        let members = IntCounter::new(
            "audience_export_members_read_total",
            "Segment members read by the producer.",
        )?;
        let shards = IntCounterVec::new(
            Opts::new(
                "audience_export_shards_published_total",
                "Shards published and confirmed, by field.",
            ),
            &["field"],
        )?;
        let api_requests = IntCounterVec::new(
            Opts::new(
                "audience_export_api_requests_total",
                "HTTP API requests, by route template and status code.",
            ),
            &["route", "status"],
        )?;
        registry.register(Box::new(api_requests.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(members.clone()))?;
        registry.register(Box::new(shards.clone()))?;
        Ok(Metrics {
            jobs,
            members,
            shards,
            api_requests,
        })
    }
}
