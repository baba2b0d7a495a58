//! Turns an export job into a sealed plan: one new audience per field, the segment streamed into
//! shards of at most `shard_size` values, every shard confirmed by the broker, then the totals
//! written and the plan sealed. The producer is the only writer of a plan. A job seen before is
//! resumed (audiences already created are reused; shards already counted are skipped by the
//! workers), never planned twice.

use crate::metrics::Metrics;
use crate::source::{Line, SegmentReader};
use audience_export_core::amqp::{PendingConfirm, PublishError, Publisher, Topology};
use audience_export_core::connection::{
    terms_url, ActiveToken, AdAccountStatus, ConnectionError, Connections,
};
use audience_export_core::consumer::Outcome;
use audience_export_core::contract::{Event, ExportJob};
use audience_export_core::graph::{ErrorClass, GraphClient, GraphError};
use audience_export_core::pause::AccountPauses;
use audience_export_core::progress::{now_ms, Begin, ProgressError, ProgressStore};
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
    /// Workspaces' Facebook connections: where a job's token comes from.
    pub connections: Connections,
    /// Tokens Meta refused, recorded before the connection is marked invalid.
    pub pauses: AccountPauses,
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
    #[error("Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Connection(ConnectionError),
    /// The job cannot run; the reason goes to the requester.
    #[error("{reason}")]
    Refused {
        reason: String,
        invalid_token: Option<Event>,
    },
}

pub async fn handle(deps: Arc<Deps>, body: &[u8]) -> Outcome {
    let job = match ExportJob::parse(body) {
        Ok(job) => job,
        Err(error) => {
            deps.metrics.jobs.with_label_values(&["rejected"]).inc();
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
            Err(PlanError::Refused { reason, invalid_token }) => {
                warn!(message = "Export refused.", %reason);
                deps.metrics.jobs.with_label_values(&["rejected"]).inc();
                let rejected = Event::ExportRejected {
                    export_id: job.export_id.clone(),
                    reason: reason.clone(),
                    notify: job.notify.emails.clone(),
                };
                for event in invalid_token.iter().chain([&rejected]) {
                    if let Err(e) = deps.publisher.event(&deps.topology, event).await {
                        warn!(message = "Could not announce a refused export; requeueing.", error = %e);
                        return Outcome::Requeue;
                    }
                }
                // Announced first, recorded second: a marker without its event would stop every
                // call with the token while nobody marks the connection invalid or tells anyone.
                if let Some(Event::ConnectionInvalidated {
                    workspace_id,
                    token_fingerprint,
                    ..
                }) = &invalid_token
                {
                    let marked = deps
                        .pauses
                        .revoke_token(workspace_id, token_fingerprint, &reason)
                        .await;
                    if let Err(e) = marked {
                        warn!(message = "Could not record the refused token; requeueing.", error = %e);
                        return Outcome::Requeue;
                    }
                }
                Outcome::Ack
            }
            Err(error) => {
                warn!(message = "Planning interrupted; requeueing the job.", %error);
                deps.metrics.jobs.with_label_values(&["requeued"]).inc();
                Outcome::Requeue
            }
        }
    }
    .instrument(span)
    .await
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
            deps.metrics.jobs.with_label_values(&["rejected"]).inc();
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
            deps.metrics.jobs.with_label_values(&["duplicate"]).inc();
            return Ok(Outcome::Ack);
        }
        Begin::Existing {
            sealed: false,
            status,
        } if status != "planning" => {
            info!(message = "Export already ended; ignoring the repeated job.", %status);
            deps.metrics.jobs.with_label_values(&["duplicate"]).inc();
            return Ok(Outcome::Ack);
        }
        Begin::Existing { .. } => {
            info!(message = "Resuming an export whose planning was interrupted.")
        }
    }

    let account = job.ad_account_number();
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
    let phone_country = match &job.default_phone_country {
        Some(country) => Some(country.to_ascii_uppercase()),
        None => {
            deps.workspaces
                .default_phone_country(&job.workspace_id)
                .await?
        }
    };
    let mut sharder = Sharder::new(deps, job, account, audiences, phone_country);
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
    let totals = sharder.finish().await?;
    deps.metrics.members.inc_by(members);

    let shards: u64 = totals.values().map(|t| t.shards).sum();
    let mut seal: Vec<(String, u64)> = vec![
        ("members_read".into(), members),
        ("malformed_records".into(), malformed),
        ("shards_planned".into(), shards),
    ];
    for (field, t) in &totals {
        seal.push((format!("{field}:with_value"), t.with_value));
        seal.push((format!("{field}:missing"), t.missing));
        seal.push((format!("{field}:shards"), t.shards));
    }
    deps.progress.seal(&job.export_id, &seal).await?;
    deps.publisher
        .event(
            &deps.topology,
            &Event::ExportSealed {
                export_id: job.export_id.clone(),
            },
        )
        .await?;
    deps.metrics.jobs.with_label_values(&["planned"]).inc();
    info!(
        message = "Export planned and sealed.",
        members, malformed, shards
    );
    Ok(Outcome::Ack)
}

/// The workspace's token for this job, once the job passes the connection's checks: connected,
/// valid, the ad account selected by this workspace, its terms accepted. Only the job's own
/// workspace is ever looked at, so a job cannot reach another workspace's connection.
async fn resolve(deps: &Deps, job: &ExportJob) -> Result<ActiveToken, PlanError> {
    let ws = &job.workspace_id;
    let account = job.ad_account_number();
    let stored = |e: ConnectionError| {
        if e.is_retryable() {
            PlanError::Connection(e)
        } else {
            warn!(message = "The workspace's connection cannot be read.", error = %e);
            refused(format!("the Facebook connection of workspace {ws} cannot be read ({e}); reconnect Facebook, or ask an operator to check the encryption keys"))
        }
    };
    let Some(view) = deps.connections.view(ws).await.map_err(stored)? else {
        return Err(refused(format!(
            "no Facebook connection: workspace {ws} has not connected Facebook. Connect it and select ad account act_{account}, then export again."
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
            "ad account act_{account} is not selected for workspace {ws}: select it in the workspace's Facebook connection, then export again."
        )));
    };
    let token = deps
        .connections
        .active_token(ws)
        .await
        .map_err(stored)?
        .ok_or_else(|| {
            refused(format!(
                "no Facebook connection: workspace {ws} has no token"
            ))
        })?;
    // Refused by Meta moments ago, before the finalizer marked the connection invalid.
    if let Some(reason) = deps.pauses.token_revoked(ws, &token.fingerprint).await? {
        return Err(refused(reason));
    }
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
                    "terms not accepted: accept the Custom Audience terms for act_{account} at {}, then export again.",
                    terms_url(account)
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
        invalid_token: None,
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
    let account = job.ad_account_number();
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
                account,
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
/// one; a refused token is also reported for the finalizer to mark the connection invalid.
fn refusal(job: &ExportJob, token: &ActiveToken, what: &str, e: &GraphError) -> PlanError {
    let account = job.ad_account_number();
    let class = e.class();
    let reason = match class {
        ErrorClass::TokenInvalid | ErrorClass::PermissionLost | ErrorClass::TermsNotAccepted => {
            e.explain(account)
        }
        _ => format!("Meta refused to {what}: {}", e.user_message()),
    };
    let invalid_token = (class == ErrorClass::TokenInvalid).then(|| {
        let meta = e.meta().cloned().unwrap_or_default();
        Event::ConnectionInvalidated {
            workspace_id: job.workspace_id.clone(),
            export_id: Some(job.export_id.clone()),
            token_fingerprint: token.fingerprint.clone(),
            code: meta.code.unwrap_or(190),
            subcode: meta.error_subcode,
            message: meta.message,
        }
    });
    PlanError::Refused {
        reason,
        invalid_token,
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct FieldTotals {
    with_value: u64,
    missing: u64,
    shards: u64,
}

/// Per-field buffers that become shard messages, with a bounded window of unconfirmed publishes.
struct Sharder<'a> {
    deps: &'a Deps,
    job: &'a ExportJob,
    account: &'a str,
    audiences: BTreeMap<Field, String>,
    buffers: BTreeMap<Field, Vec<String>>,
    totals: BTreeMap<Field, FieldTotals>,
    pending: VecDeque<PendingConfirm>,
    /// Country of national phone numbers: the job's, else the workspace's default.
    phone_country: Option<String>,
    /// Why the export was stopped (checked after each shard), if it was.
    stopped: Option<String>,
}

impl<'a> Sharder<'a> {
    fn new(
        deps: &'a Deps,
        job: &'a ExportJob,
        account: &'a str,
        audiences: BTreeMap<Field, String>,
        phone_country: Option<String>,
    ) -> Self {
        let fields = audiences.keys().copied();
        Sharder {
            deps,
            job,
            account,
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
            ad_account_id: self.account.to_owned(),
            field,
            shard_index: totals.shards as u32,
            records,
            attempt: 1,
            default_phone_country: self.phone_country.clone(),
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
        self.deps
            .metrics
            .shards
            .with_label_values(&[field.as_str()])
            .inc();
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
