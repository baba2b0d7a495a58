//! Exports as the upstream platform and operators see them: submit a job without AMQP, ask how
//! far an export is, cancel it, list a workspace's recent ones. The HTTP API (`api.rs`) and the
//! CLI (`audience-producer exports ...`) both call this module, so they say the same thing.
//!
//! A submitted job is recorded (`ProgressStore::submit`, the very bytes the planner's `begin`
//! compares) and then queued like any job: the planner runs it once whichever way it came, and
//! a different job under the same id is refused here at once instead of dead-lettered later.

use audience_export_core::amqp::{self, PublishError, Publisher, Topology};
use audience_export_core::contract::{ExportId, ExportJob, WorkspaceId};
use audience_export_core::progress::{
    now_ms, Cancelled, ExportProgress, ProgressError, ProgressStatus, ProgressStore, Submitted,
};
use audience_export_core::Field;
use lapin::types::FieldTable;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::Mutex;
use tracing::{info, warn};

/// Why an export request failed; `status()` is the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ExportsError {
    /// The job does not parse or validate: the reason, for the caller to fix.
    #[error("{0}")]
    Invalid(String),
    #[error("export {0} is unknown (never submitted, or its record expired)")]
    NotFound(ExportId),
    /// The id holds another job, or the export cannot be cancelled any more.
    #[error("{0}")]
    Conflict(String),
    /// Redis or the broker failed: worth trying again.
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error("the job could not be queued: {0}")]
    Publish(#[from] PublishError),
    #[error("the broker cannot be reached: {0}")]
    Broker(#[from] lapin::Error),
}

impl ExportsError {
    pub fn status(&self) -> u16 {
        match self {
            ExportsError::Invalid(_) => 400,
            ExportsError::NotFound(_) => 404,
            ExportsError::Conflict(_) => 409,
            ExportsError::Progress(_) | ExportsError::Publish(_) | ExportsError::Broker(_) => 503,
        }
    }
}

pub struct Exports {
    progress: ProgressStore,
    topology: Topology,
    amqp_url: String,
    /// One confirm-mode channel, opened on first use and again after a failure.
    publisher: Mutex<Option<(lapin::Connection, Publisher)>>,
    /// How long an export's keys live if it never finishes (the planner's retention).
    job_ttl: Duration,
    /// How long an export may run before the finalizer's sweep ends it (`deadline` in a view).
    deadline: Duration,
}

/// An export, as `GET /v1/exports/{id}` shows it. Counts and ids only, never a member's value.
#[derive(Debug, Clone, Serialize)]
pub struct ExportView {
    pub export_id: ExportId,
    pub workspace_id: Option<WorkspaceId>,
    pub segment_name: Option<String>,
    /// `queued` (submitted, planning not begun), `planning`, `running`, or the terminal status.
    pub status: String,
    pub dry_run: bool,
    /// Why it ended as it did, or why it is stopping.
    pub reason: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// When the finalizer gives up on it if it has not finished.
    pub deadline: Option<String>,
    pub members_read: u64,
    pub malformed_records: u64,
    pub excluded: BTreeMap<String, u64>,
    /// The plan's shards: `planned` is known once the plan is sealed.
    pub shards: ShardsView,
    pub audiences: Vec<AudienceView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShardsView {
    pub sealed: bool,
    pub planned: u64,
    pub done: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AudienceView {
    pub field: Field,
    pub audience_id: Option<String>,
    pub name: Option<String>,
    pub with_value: u64,
    pub missing: u64,
    pub invalid: u64,
    pub uploaded: u64,
    pub shards: u64,
    pub shards_failed: u64,
}

/// What a submission did.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitView {
    pub export_id: ExportId,
    /// False when the same job had been submitted before (it still runs once).
    pub created: bool,
    pub status: String,
}

impl Exports {
    /// With the fleet's settings: the producer's API and the CLI say the same thing.
    pub fn from_settings(
        progress: ProgressStore,
        settings: &audience_export_core::config::Settings,
    ) -> Exports {
        Exports::new(
            progress,
            Topology::from_settings(settings),
            settings.amqp_url.clone(),
            Duration::from_secs(settings.finalizer.retention_secs),
            Duration::from_secs(settings.finalizer.export_deadline_secs),
        )
    }

    pub fn new(
        progress: ProgressStore,
        topology: Topology,
        amqp_url: String,
        job_ttl: Duration,
        deadline: Duration,
    ) -> Exports {
        Exports {
            progress,
            topology,
            amqp_url,
            publisher: Mutex::new(None),
            job_ttl,
            deadline,
        }
    }

    /// Records and queues a job (the same contract as the jobs queue). Idempotent on
    /// `export_id`: the same job again is queued again and runs once.
    pub async fn submit(&self, body: &[u8]) -> Result<SubmitView, ExportsError> {
        let job = ExportJob::parse(body).map_err(|e| ExportsError::Invalid(e.to_string()))?;
        let json = serde_json::to_string(&job).expect("a parsed job serializes");
        let submitted = self
            .progress
            .submit(
                &job.export_id,
                &job.workspace_id,
                &json,
                now_ms(),
                self.job_ttl,
            )
            .await?;
        if submitted == Submitted::Conflict {
            return Err(ExportsError::Conflict(format!(
                "export_id {} already names a different job; use a new export_id",
                job.export_id
            )));
        }
        // Queued again on a repeat too: the first submission's publish may be what failed.
        self.publish(json.as_bytes()).await?;
        let status = self.view(&job.export_id).await?.status;
        info!(message = "Export submitted over the API.", export_id = %job.export_id, repeat = (submitted == Submitted::Again));
        Ok(SubmitView {
            export_id: job.export_id,
            created: submitted == Submitted::New,
            status,
        })
    }

    async fn publish(&self, body: &[u8]) -> Result<(), ExportsError> {
        let mut held = self.publisher.lock().await;
        if held.is_none() {
            let connection = amqp::connect(&self.amqp_url, "producer-api").await?;
            let publisher = Publisher::new(&connection).await?;
            *held = Some((connection, publisher));
        }
        let (_, publisher) = held.as_ref().expect("opened above");
        let sent = publisher
            .publish("", &self.topology.jobs(), body, FieldTable::default())
            .await;
        if let Err(error) = &sent {
            // The next request opens a new channel.
            warn!(message = "Queueing a submitted job failed.", %error);
            *held = None;
        }
        Ok(sent?)
    }

    /// How far an export is.
    pub async fn status(&self, export_id: &ExportId) -> Result<ExportView, ExportsError> {
        let view = self.view(export_id).await?;
        if view.status == "unknown" {
            return Err(ExportsError::NotFound(export_id.clone()));
        }
        Ok(view)
    }

    /// Stops an export: no shard is sent after this; it finishes `cancelled` with what was
    /// uploaded before, and the report email says so.
    pub async fn cancel(
        &self,
        export_id: &ExportId,
        by: Option<&str>,
    ) -> Result<ExportView, ExportsError> {
        let reason = match by {
            Some(who) => format!("cancelled by {who}"),
            None => "cancelled".to_owned(),
        };
        match self
            .progress
            .cancel(export_id, &reason, now_ms(), self.job_ttl)
            .await?
        {
            Cancelled::Unknown => return Err(ExportsError::NotFound(export_id.clone())),
            Cancelled::Finished(status) => {
                return Err(ExportsError::Conflict(format!(
                    "export {export_id} already finished ({status}): there is nothing to cancel"
                )))
            }
            Cancelled::AlreadyStopped(why) => {
                return Err(ExportsError::Conflict(format!(
                    "export {export_id} is already stopping ({why}): it finishes as that says"
                )))
            }
            Cancelled::Cancelled => {
                info!(message = "Export cancelled.", %export_id);
            }
        }
        self.status(export_id).await
    }

    /// A workspace's most recent exports, newest first.
    pub async fn list(
        &self,
        workspace: &WorkspaceId,
        limit: usize,
    ) -> Result<Vec<ExportView>, ExportsError> {
        let mut out = Vec::new();
        for id in self.progress.recent(workspace, limit).await? {
            let view = self.view(&id).await?;
            if view.status != "unknown" {
                out.push(view);
            }
        }
        Ok(out)
    }

    async fn view(&self, export_id: &ExportId) -> Result<ExportView, ExportsError> {
        let job: Option<ExportJob> = self
            .progress
            .job(export_id)
            .await?
            .and_then(|json| serde_json::from_str(&json).ok());
        let progress = self.progress.progress(export_id).await?;
        Ok(view_of(export_id, job.as_ref(), &progress, self.deadline))
    }
}

/// The view of an export from its job and progress (pure, so its rules are tested alone).
fn view_of(
    export_id: &ExportId,
    job: Option<&ExportJob>,
    p: &ExportProgress,
    deadline: Duration,
) -> ExportView {
    let status = match (p.status, job) {
        (Some(status), _) => status.to_string(),
        (None, Some(_)) => "queued".to_owned(),
        (None, None) => "unknown".to_owned(),
    };
    let finished = p.status.is_some_and(ProgressStatus::is_finished);
    let reason = match finished {
        true => p.reason.clone(),
        false => p.stop_reason.clone().or_else(|| p.plan_error.clone()),
    };
    let fields: &[Field] = job.map_or(&[], |j| &j.fields);
    ExportView {
        export_id: export_id.clone(),
        workspace_id: job.map(|j| j.workspace_id.clone()),
        segment_name: job.map(|j| j.segment.name.clone()),
        status,
        dry_run: job.is_some_and(|j| j.dry_run),
        reason,
        started_at: p.started_at_ms.map(rfc3339),
        finished_at: p.finished_at_ms.map(rfc3339),
        deadline: p
            .started_at_ms
            .filter(|_| !finished)
            .map(|started| rfc3339(started + deadline.as_millis() as u64)),
        members_read: p.members_read,
        malformed_records: p.malformed_records,
        excluded: p.excluded.clone(),
        shards: ShardsView {
            sealed: p.sealed,
            planned: p.shards_planned,
            done: p.shards_done,
            failed: p.shards_failed,
        },
        audiences: fields
            .iter()
            .map(|&field| {
                let f = p.field(field);
                AudienceView {
                    field,
                    invalid: f.invalid.values().sum(),
                    audience_id: f.audience_id,
                    name: f.audience_name,
                    with_value: f.with_value,
                    missing: f.missing,
                    uploaded: f.uploaded,
                    shards: f.shards,
                    shards_failed: f.shards_failed,
                }
            })
            .collect(),
    }
}

fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> ExportJob {
        ExportJob::parse(
            serde_json::json!({
                "export_id": "exp-1", "workspace_id": "ws-1",
                "segment": {"id": "s", "name": "Churned"}, "ad_account_id": "1234",
                "fields": ["email", "phone"],
                "source": {"url": "file:///x.ndjson", "format": "ndjson"},
                "notify": {"emails": []}
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn a_view_says_queued_running_or_finished_with_the_right_reason() {
        let id = ExportId::parse("exp-1").unwrap();
        let minute = Duration::from_secs(60);
        let none = view_of(&id, None, &ExportProgress::default(), minute);
        assert_eq!(none.status, "unknown");
        let queued = view_of(&id, Some(&job()), &ExportProgress::default(), minute);
        assert_eq!(queued.status, "queued");
        assert_eq!(queued.audiences.len(), 2);
        assert_eq!(queued.deadline, None);

        let running = ExportProgress {
            status: Some(ProgressStatus::Running),
            started_at_ms: Some(1_700_000_000_000),
            stop_reason: Some("cancelled by ops@x.io".into()),
            reason: Some("stale".into()),
            ..ExportProgress::default()
        };
        let v = view_of(&id, Some(&job()), &running, minute);
        assert_eq!(v.status, "running");
        assert_eq!(v.reason.as_deref(), Some("cancelled by ops@x.io"));
        assert_eq!(v.started_at.as_deref(), Some("2023-11-14T22:13:20Z"));
        assert_eq!(v.deadline.as_deref(), Some("2023-11-14T22:14:20Z"));

        let finished = ExportProgress {
            status: Some(ProgressStatus::Finished(
                audience_export_core::contract::ExportStatus::Cancelled,
            )),
            reason: Some("cancelled by ops@x.io".into()),
            started_at_ms: Some(1_700_000_000_000),
            ..ExportProgress::default()
        };
        let v = view_of(&id, Some(&job()), &finished, minute);
        assert_eq!(v.status, "cancelled");
        assert_eq!(v.deadline, None, "a finished export has no deadline");
    }
}
