//! Turns an export job into a sealed plan: one new audience per field, the segment streamed into
//! shards of at most `shard_size` values, every shard confirmed by the broker, then the totals
//! written and the plan sealed. The producer is the only writer of a plan. A job seen before is
//! resumed (audiences already created are reused; shards already counted are skipped by the
//! workers), never planned twice.

use crate::metrics::{JobOutcome, Metrics};
use crate::source::{Line, SegmentReader};
use audience_export_core::amqp::{PendingConfirm, PublishError, Publisher, Topology};
use audience_export_core::connection::{
    ActiveToken, AdAccountStatus, ConnectionError, Connections,
};
use audience_export_core::consumer::Outcome;
use audience_export_core::contract::{Event, ExportJob, PhoneCountry};
use audience_export_core::graph::{ErrorClass, GraphClient, GraphError};
use audience_export_core::progress::{
    now_ms, Begin, FieldTotals, PlanTotals, ProgressError, ProgressStatus, ProgressStore,
};
use audience_export_core::revocation::{Refusal, RevocationError, Revocations, Unusable};
use audience_export_core::telemetry::backoff;
use audience_export_core::workspace::Workspaces;
use audience_export_core::{Field, Shard};
use lapin::types::FieldTable;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn, Instrument};

/// Attempts at creating one audience when Meta answers with a retryable error.
const CREATE_ATTEMPTS: u32 = 5;

pub struct Deps {
    pub graph: GraphClient,
    pub progress: ProgressStore,
    pub publisher: Publisher,
    pub topology: Topology,
    /// Workspaces' Facebook connections: what a job is checked against.
    pub connections: Connections,
    /// Whether a workspace's token may be used, and what to do when Meta refuses it.
    pub revocations: Revocations,
    pub metrics: Metrics,
    pub shard_size: usize,
    pub confirm_window: usize,
    pub customer_file_source: String,
    /// Workspace settings (the default phone country).
    pub workspaces: Workspaces,
    /// How long an export's keys may live if it never finishes.
    pub job_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
enum PlanError {
    /// Our infrastructure failed: the job goes back to the queue.
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Connection(ConnectionError),
    #[error("the workspace's settings cannot be read: {0}")]
    Settings(anyhow::Error),
    /// The job cannot run; the reason goes to the requester.
    #[error("{reason}")]
    Refused {
        reason: String,
        /// Meta refused the workspace's token: announced and recorded for the whole fleet.
        token: Option<Refusal>,
    },
}

pub async fn handle(deps: Arc<Deps>, body: &[u8]) -> Outcome {
    let job = match ExportJob::parse(body) {
        Ok(job) => job,
        Err(error) => {
            deps.metrics.jobs.with(JobOutcome::Rejected).inc();
            let reason = error.to_string();
            if let Some((export_id, notify)) = ExportJob::salvage(body) {
                let event = Event::ExportRejected {
                    export_id,
                    reason: reason.clone(),
                    notify,
                };
                if let Err(e) = deps.publisher.event(&deps.topology, &event).await {
                    warn!(message = "Could not announce a rejected job; requeueing.", error = %e);
                    return Outcome::Requeue;
                }
            }
            return Outcome::Reject { reason };
        }
    };
    let span =
        tracing::info_span!("export", export_id = %job.export_id, workspace_id = %job.workspace_id);
    async {
        match plan(&deps, &job).await {
            Ok(outcome) => outcome,
            Err(PlanError::Refused { reason, token }) => {
                warn!(message = "Export refused.", %reason);
                match refuse(&deps, &job, reason, token.as_ref()).await {
                    Ok(()) => {
                        deps.metrics.jobs.with(JobOutcome::Rejected).inc();
                        Outcome::Ack
                    }
                    Err(e) => {
                        warn!(message = "Could not announce a refused export; requeueing.", error = %e);
                        deps.metrics.jobs.with(JobOutcome::Requeued).inc();
                        Outcome::Requeue
                    }
                }
            }
            Err(error) => {
                warn!(message = "Planning interrupted; requeueing the job.", %error);
                deps.metrics.jobs.with(JobOutcome::Requeued).inc();
                Outcome::Requeue
            }
        }
    }
    .instrument(span)
    .await
}

/// Announces a refused job (after the token refusal that caused it, if one did), for the
/// finalizer to record and tell the requester.
async fn refuse(
    deps: &Deps,
    job: &ExportJob,
    reason: String,
    token: Option<&Refusal>,
) -> Result<(), RevocationError> {
    if let Some(refusal) = token {
        deps.revocations
            .refused(&deps.publisher, &deps.topology, refusal)
            .await?;
    }
    let rejected = Event::ExportRejected {
        export_id: job.export_id.clone(),
        reason,
        notify: job.notify.emails.clone(),
    };
    deps.publisher.event(&deps.topology, &rejected).await?;
    Ok(())
}

async fn plan(deps: &Deps, job: &ExportJob) -> Result<Outcome, PlanError> {
    let job_json = serde_json::to_string(job).expect("a parsed job serializes");
    match deps
        .progress
        .begin(&job.export_id, &job_json, now_ms(), deps.job_ttl)
        .await?
    {
        Begin::New => info!(message = "Export accepted.", fields = ?job.fields),
        Begin::Existing { .. }
            if deps.progress.job(&job.export_id).await?.as_deref() != Some(job_json.as_str()) =>
        {
            // The id names another job: running this one would write into that export (its
            // audiences, its report, its workspace's ad account). Never retried, never announced
            // under that id.
            deps.metrics.jobs.with(JobOutcome::Rejected).inc();
            warn!(message = "An export id was reused for a different job; dead-lettering it.");
            return Ok(Outcome::Reject {
                reason: format!(
                    "export_id {} already names a different job; use a new export_id",
                    job.export_id
                ),
            });
        }
        Begin::Existing { sealed: true, .. } => {
            info!(message = "Export already planned; ignoring the repeated job.");
            deps.metrics.jobs.with(JobOutcome::Duplicate).inc();
            return Ok(Outcome::Ack);
        }
        Begin::Existing {
            sealed: false,
            status,
        } if status != Some(ProgressStatus::Planning) => {
            info!(message = "Export already ended; ignoring the repeated job.", status = ?status);
            deps.metrics.jobs.with(JobOutcome::Duplicate).inc();
            return Ok(Outcome::Ack);
        }
        Begin::Existing { .. } => {
            info!(message = "Resuming an export whose planning was interrupted.")
        }
    }

    let token = resolve(deps, job).await?;
    let mut audiences = BTreeMap::new();
    for &field in &job.fields {
        let id = match deps.progress.audience(&job.export_id, field).await? {
            Some(id) => id,
            None => {
                let name = audience_name(job, field);
                let id = create_audience(deps, job, &token, field, &name).await?;
                deps.progress
                    .set_audience(&job.export_id, field, &id, &name)
                    .await?;
                info!(message = "Audience created.", %field, audience_id = %id);
                id
            }
        };
        audiences.insert(field, id);
    }

    let mut reader = SegmentReader::open(&job.source.url, job.source.format)
        .await
        .map_err(|e| refused(e.to_string()))?;
    // The job's country wins over the workspace's default.
    let phone_country = match job.default_phone_country {
        Some(country) => Some(country),
        None => deps
            .workspaces
            .default_phone_country(&job.workspace_id)
            .await
            .map_err(PlanError::Settings)?,
    };
    let mut sharder = Sharder::new(deps, job, audiences, phone_country);
    let (mut members, mut malformed) = (0u64, 0u64);
    while let Some(line) = reader.next().await.map_err(|e| refused(e.to_string()))? {
        match line {
            Line::Malformed => malformed += 1,
            Line::Record(record) => {
                members += 1;
                for &field in &job.fields {
                    sharder.push(field, record.value(field)).await?;
                }
            }
        }
        if let Some(reason) = &sharder.stopped {
            // Workers would drop every further shard: stop reading, seal what was published.
            warn!(message = "Export stopped while planning; sealing what was published.", %reason, members);
            break;
        }
    }
    let totals = PlanTotals {
        members_read: members,
        malformed_records: malformed,
        fields: sharder.finish().await?,
    };
    deps.metrics.members.inc_by(members);
    let shards = totals.shards();
    deps.progress.seal(&job.export_id, &totals).await?;
    deps.publisher
        .event(
            &deps.topology,
            &Event::ExportSealed {
                export_id: job.export_id.clone(),
            },
        )
        .await?;
    deps.metrics.jobs.with(JobOutcome::Planned).inc();
    info!(
        message = "Export planned and sealed.",
        members, malformed, shards
    );
    Ok(Outcome::Ack)
}

/// The workspace's token for this job, once the job passes the connection's checks: connected,
/// valid, the ad account selected by this workspace, its terms accepted, the token usable. Only
/// the job's own workspace is ever looked at, so a job cannot reach another workspace's
/// connection.
async fn resolve(deps: &Deps, job: &ExportJob) -> Result<ActiveToken, PlanError> {
    let ws = &job.workspace_id;
    let account = &job.ad_account_id;
    let act = account.act();
    let stored = |e: ConnectionError| {
        if e.is_retryable() {
            PlanError::Connection(e)
        } else {
            warn!(message = "The workspace's connection cannot be read.", error = %e);
            refused(Unusable::Unreadable(e).reason(ws))
        }
    };
    let Some(view) = deps.connections.view(ws).await.map_err(stored)? else {
        return Err(refused(format!(
            "no Facebook connection: workspace {ws} has not connected Facebook. Connect it and select ad account {act}, then export again."
        )));
    };
    if let Some(invalid) = &view.invalid {
        let when = time::OffsetDateTime::from_unix_timestamp((invalid.at_ms / 1000) as i64)
            .map(|t| t.date().to_string())
            .unwrap_or_default();
        return Err(refused(format!(
            "connection invalid: Meta refused the Facebook connection of workspace {ws} on {when} (code {}{}). Reconnect Facebook, then export again.",
            invalid.code,
            invalid.subcode.map(|s| format!(", subcode {s}")).unwrap_or_default()
        )));
    }
    let Some(selected) = view.selected(account) else {
        return Err(refused(format!(
            "ad account {act} is not selected for workspace {ws}: select it in the workspace's Facebook connection, then export again."
        )));
    };
    // Refused by Meta moments ago (before the finalizer marked the connection invalid), or
    // changed since the view was read: the one usability check the workers make too.
    let token = match deps
        .revocations
        .usable_token(ws)
        .await
        .map_err(PlanError::Connection)?
    {
        Ok(token) => token,
        Err(unusable) => return Err(refused(unusable.reason(ws))),
    };
    if !selected.tos_accepted {
        // Accepted since the last check? Ask Meta rather than refuse on stale news.
        let accepted = deps.graph.tos_accepted(&token.token, account).await;
        match accepted {
            Ok(true) => {
                let status = AdAccountStatus::new(account, true, now_ms());
                deps.connections
                    .update_terms(ws, status)
                    .await
                    .map_err(stored)?;
            }
            Ok(false) => {
                return Err(refused(format!(
                    "terms not accepted: accept the Custom Audience terms for {act} at {}, then export again.",
                    account.terms_url()
                )))
            }
            Err(e) => return Err(refusal(job, &token, "check the Custom Audience terms", &e)),
        }
    }
    Ok(token)
}

fn refused(reason: String) -> PlanError {
    PlanError::Refused {
        reason,
        token: None,
    }
}

/// "<segment> - Email - 2026-11-29", or the job's own name with the field appended.
pub fn audience_name(job: &ExportJob, field: Field) -> String {
    let date = time::OffsetDateTime::now_utc().date();
    match &job.audience_name {
        Some(name) => format!("{name} - {}", field.label()),
        None => format!("{} - {} - {date}", job.segment.name, field.label()),
    }
}

async fn create_audience(
    deps: &Deps,
    job: &ExportJob,
    token: &ActiveToken,
    field: Field,
    name: &str,
) -> Result<String, PlanError> {
    let description = format!(
        "Exported from segment {} ({})",
        job.segment.name, job.segment.id
    );
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = deps
            .graph
            .create_custom_audience(
                &token.token,
                &job.ad_account_id,
                name,
                &description,
                &deps.customer_file_source,
            )
            .await;
        match result {
            Ok(id) => return Ok(id),
            Err(e) if e.is_retryable() && attempt < CREATE_ATTEMPTS => {
                let wait = backoff(attempt, Duration::from_millis(500), Duration::from_secs(15));
                warn!(message = "Creating the audience failed; retrying.", %field, class = e.class().as_str(), wait_ms = wait.as_millis() as u64, error = %e);
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let what = format!("create the {} audience", field.label());
                return Err(refusal(job, token, &what, &e));
            }
        }
    }
}

/// The reason a marketer reads when Meta refuses a call (`what`), naming the fix where there is
/// one; a refused token is also reported for the whole fleet (`revocation`).
fn refusal(job: &ExportJob, token: &ActiveToken, what: &str, e: &GraphError) -> PlanError {
    let class = e.class();
    let reason = match class {
        ErrorClass::TokenInvalid | ErrorClass::PermissionLost | ErrorClass::TermsNotAccepted => {
            e.explain(&job.ad_account_id)
        }
        _ => format!("Meta refused to {what}: {}", e.user_message()),
    };
    let token = (class == ErrorClass::TokenInvalid).then(|| {
        Refusal::new(
            &job.workspace_id,
            Some(&job.export_id),
            token,
            e,
            &job.ad_account_id,
        )
    });
    PlanError::Refused { reason, token }
}

/// Per-field buffers that become shard messages, with a bounded window of unconfirmed publishes.
struct Sharder<'a> {
    deps: &'a Deps,
    job: &'a ExportJob,
    audiences: BTreeMap<Field, String>,
    buffers: BTreeMap<Field, Vec<String>>,
    totals: BTreeMap<Field, FieldTotals>,
    pending: VecDeque<PendingConfirm>,
    /// Country of national phone numbers: the job's, else the workspace's default.
    phone_country: Option<PhoneCountry>,
    /// Why the export was stopped (checked after each shard), if it was.
    stopped: Option<String>,
}

impl<'a> Sharder<'a> {
    fn new(
        deps: &'a Deps,
        job: &'a ExportJob,
        audiences: BTreeMap<Field, String>,
        phone_country: Option<PhoneCountry>,
    ) -> Self {
        let fields = audiences.keys().copied();
        Sharder {
            deps,
            job,
            buffers: fields
                .clone()
                .map(|f| (f, Vec::with_capacity(deps.shard_size)))
                .collect(),
            totals: fields.map(|f| (f, FieldTotals::default())).collect(),
            audiences,
            pending: VecDeque::new(),
            phone_country,
            stopped: None,
        }
    }

    async fn push(&mut self, field: Field, value: Option<String>) -> Result<(), PlanError> {
        let totals = self.totals.entry(field).or_default();
        let Some(value) = value else {
            totals.missing += 1;
            return Ok(());
        };
        totals.with_value += 1;
        let buffer = self.buffers.entry(field).or_default();
        buffer.push(value);
        if buffer.len() >= self.deps.shard_size {
            self.flush(field).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, field: Field) -> Result<(), PlanError> {
        let records = std::mem::take(self.buffers.entry(field).or_default());
        if records.is_empty() {
            return Ok(());
        }
        let totals = self.totals.entry(field).or_default();
        let shard = Shard {
            export_id: self.job.export_id.clone(),
            workspace_id: self.job.workspace_id.clone(),
            audience_id: self.audiences[&field].clone(),
            ad_account_id: self.job.ad_account_id.clone(),
            field,
            shard_index: totals.shards as u32,
            records,
            attempt: 1,
            default_phone_country: self.phone_country,
        };
        totals.shards += 1;
        let body = serde_json::to_vec(&shard).expect("a shard always serializes");
        let pending = self
            .deps
            .publisher
            .send(
                "",
                &self.deps.topology.shards(),
                &body,
                FieldTable::default(),
            )
            .await?;
        self.pending.push_back(pending);
        self.deps.metrics.shards.with(field).inc();
        while self.pending.len() >= self.deps.confirm_window.max(1) {
            if let Some(oldest) = self.pending.pop_front() {
                oldest.wait().await?;
            }
        }
        // One read per shard (10,000 records): cheap next to streaming a segment for nothing.
        self.stopped = self.deps.progress.stop_reason(&self.job.export_id).await?;
        Ok(())
    }

    /// Flushes the partial shards (unless the export was stopped) and waits until the broker
    /// confirmed every one.
    async fn finish(mut self) -> Result<BTreeMap<Field, FieldTotals>, PlanError> {
        let fields: Vec<Field> = self.buffers.keys().copied().collect();
        for field in fields {
            if self.stopped.is_none() {
                self.flush(field).await?;
            }
        }
        while let Some(pending) = self.pending.pop_front() {
            pending.wait().await?;
        }
        Ok(self.totals)
    }
}
