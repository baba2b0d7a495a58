//! The producer's metrics, declared in one place, with bounded, typed labels only.

use audience_export_core::telemetry::{Counters, Label};
use audience_export_core::Field;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// What became of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// Planned and sealed.
    Planned,
    /// A repeat of a job already planned or ended: ignored.
    Duplicate,
    /// Refused with a reason (invalid, or its connection cannot run it).
    Rejected,
    /// Our infrastructure failed mid-way: tried again shortly (planning resumes).
    Retried,
    /// Another planner holds the export: this copy waits in the delay queue.
    Held,
    /// Could not be planned to its end after audiences were created: sealed with what was
    /// published; the export finishes failed or partially failed.
    Failed,
    /// Stopped (cancelled, or its token refused) before or while it was planned: sealed with
    /// what was published.
    Stopped,
}

impl Label for JobOutcome {
    const ALL: &'static [JobOutcome] = &[
        JobOutcome::Planned,
        JobOutcome::Duplicate,
        JobOutcome::Rejected,
        JobOutcome::Retried,
        JobOutcome::Held,
        JobOutcome::Failed,
        JobOutcome::Stopped,
    ];
    fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Planned => "planned",
            JobOutcome::Duplicate => "duplicate",
            JobOutcome::Rejected => "rejected",
            JobOutcome::Retried => "retried",
            JobOutcome::Held => "held",
            JobOutcome::Failed => "failed",
            JobOutcome::Stopped => "stopped",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    /// Jobs by outcome.
    pub jobs: Counters<JobOutcome>,
    /// Segment members read.
    pub members: IntCounter,
    /// Shards published and confirmed, by field.
    pub shards: Counters<Field>,
    /// HTTP API requests, by route template (never an id) and status code: both bounded by the
    /// router, not by an enum.
    pub api_requests: IntCounterVec,
    /// Members left out by the consent filter, by the attribute that excluded them. Attribute
    /// names come from jobs (checked: at most 64 of `[A-Za-z0-9_.-]`); a platform uses a handful.
    pub excluded: IntCounterVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let jobs = Counters::register(
            registry,
            "audience_export_jobs_total",
            "Export jobs taken by the producer, by outcome.",
            &["outcome"],
        )?;
        let members = IntCounter::new(
            "audience_export_members_read_total",
            "Segment members read by the producer.",
        )?;
        let shards = Counters::register(
            registry,
            "audience_export_shards_published_total",
            "Shards published and confirmed, by field.",
            &["field"],
        )?;
        let api_requests = IntCounterVec::new(
            Opts::new(
                "audience_export_api_requests_total",
                "HTTP API requests, by route template and status code.",
            ),
            &["route", "status"],
        )?;
        let excluded = IntCounterVec::new(
            Opts::new(
                "audience_export_members_excluded_total",
                "Segment members left out by the consent filter, by the attribute that excluded them.",
            ),
            &["attribute"],
        )?;
        registry.register(Box::new(api_requests.clone()))?;
        registry.register(Box::new(excluded.clone()))?;
        registry.register(Box::new(members.clone()))?;
        Ok(Metrics {
            jobs,
            members,
            shards,
            api_requests,
            excluded,
        })
    }
}
