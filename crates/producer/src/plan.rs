//! Turns an export job into a sealed plan: one new audience per field, the segment streamed into
//! shards of at most `shard_size` values, every shard confirmed by the broker, then the totals
//! written and the plan sealed. The producer is the only writer of a plan, and one producer at a
//! time plans an export: `begin` (one script) records the job and takes a planning lease, renewed
//! while the segment streams; a copy of the job that finds the lease held waits in the jobs'
//! delay queue, and once the plan is sealed it only re-announces it.
//!
//! A job seen before is resumed from its checkpoints (`sharder`), never planned twice. Once an
//! audience exists at Meta, nothing ends as `rejected`: a refusal or a segment that cannot be
//! read to its end seals what was published with a `plan_error`, and the export finishes failed
//! or partially failed with that reason.

use crate::admission::{check_with_meta, refused, resolve};
use crate::audiences::audience_for;
use crate::consent::ConsentFilter;
use crate::metrics::{JobOutcome, Metrics};
use crate::sharder::Sharder;
use crate::source::{Line, SegmentReader, SegmentRecord, SourceError};
use audience_export_core::amqp::{PublishError, Publisher, Topology, INFRA_RETRY_MS};
use audience_export_core::connection::{ConnectionError, Connections};
use audience_export_core::consumer::{Handler, Outcome};
use audience_export_core::contract::{Event, ExportJob};
use audience_export_core::graph::{GraphClient, GraphError};
use audience_export_core::progress::{
    now_ms, Begin, ExportProgress, FieldTotals, PlanTotals, ProgressError, ProgressStore,
    Unreadable,
};
use audience_export_core::revocation::{Refusal, RevocationError, Revocations};
use audience_export_core::workspace::Workspaces;
use audience_export_core::Field;
use lapin::message::Delivery;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// How long a planner's claim on an export lasts without renewal: a planner that dies is
/// replaced within this. Renewed every third of it while planning.
pub const PLAN_LEASE: Duration = Duration::from_secs(10);

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
    /// Records per shard for new plans (a resumed plan keeps its own).
    pub shard_size: usize,
    pub confirm_window: usize,
    pub customer_file_source: String,
    /// Workspace settings (the default phone country).
    pub workspaces: Workspaces,
    /// How long an export's keys may live if it never finishes.
    pub job_ttl: Duration,
    /// This process's planner id; each planning attempt adds a nonce to it.
    pub owner: String,
    /// Where segments may be read from (the file root, the headers secrets) and how long a
    /// remote source may keep us waiting.
    pub sources: crate::source::SourceSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Our infrastructure failed: the job is tried again shortly and planning resumes.
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Connection(ConnectionError),
    #[error("the workspace's settings cannot be read: {0}")]
    Settings(anyhow::Error),
    /// Listing the ad account's audiences failed in a way worth retrying.
    #[error("looking for the export's audience at Meta failed: {0}")]
    Lookup(GraphError),
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    /// The segment's source failed in a way worth retrying (a server error, a timeout, a cut
    /// connection): planning resumes from its checkpoints, reading the source again.
    #[error("the segment's source failed for now: {0}")]
    Source(SourceError),
    /// Another planner took the export over (this one outlived its lease).
    #[error("another planner took the export over")]
    LeaseLost,
    /// The job cannot run; the reason goes to the requester.
    #[error("{reason}")]
    Refused {
        reason: String,
        /// Meta refused the workspace's token: announced and recorded for the whole fleet.
        token: Option<Refusal>,
    },
}

impl Handler for Deps {
    async fn handle(self: Arc<Self>, delivery: Arc<Delivery>) -> Outcome {
        handle(&self, &delivery.data).await
    }

    /// A job about to be dead-lettered (its planning panicked, or it was handed out too often):
    /// its export is ended the way a refusal ends it (rejected if nothing exists at Meta yet,
    /// else sealed with what was published and the reason), so nobody waits for it.
    async fn dead_lettering(self: Arc<Self>, delivery: Arc<Delivery>, reason: String) {
        let Ok(job) = ExportJob::parse(&delivery.data) else {
            return;
        };
        let reason = format!("planning failed and the job was dead-lettered: {reason}");
        if let Err(error) = refuse(&self, &job, reason, None).await {
            warn!(message = "A dead-lettered job could not be recorded in its export.", %error);
        }
    }
}

pub async fn handle(deps: &Deps, body: &[u8]) -> Outcome {
    let job = match ExportJob::parse(body) {
        Ok(job) => job,
        Err(error) => return unreadable(deps, body, error.to_string()).await,
    };
    let span =
        tracing::info_span!("export", export_id = %job.export_id, workspace_id = %job.workspace_id);
    let outcome = async {
        match plan(deps, &job, body).await {
            Ok(outcome) => Ok(outcome),
            Err(PlanError::Refused { reason, token }) => refuse(deps, &job, reason, token).await,
            Err(error) => Err(error),
        }
    }
    .instrument(span.clone())
    .await;
    outcome.unwrap_or_else(|error| {
        span.in_scope(
            || warn!(message = "Planning interrupted; retrying the job shortly.", %error),
        );
        deps.metrics.jobs.with(JobOutcome::Retried).inc();
        Outcome::Retry
    })
}

/// A job that does not parse: dead-lettered with the reason, and its rejection announced under
/// the id it names, unless a job holds that id (a malformed copy must never finish a running
/// export, nor email its own recipients about it).
async fn unreadable(deps: &Deps, body: &[u8], reason: String) -> Outcome {
    deps.metrics.jobs.with(JobOutcome::Rejected).inc();
    if let Some((export_id, notify)) = ExportJob::salvage(body) {
        let tombstone = format!("unreadable:{}", hex::encode(Sha256::digest(body)));
        let recorded = deps
            .progress
            .reject_unreadable(&export_id, &tombstone, deps.job_ttl)
            .await;
        match recorded {
            Ok(Unreadable::New | Unreadable::Same) => {
                let event = Event::ExportRejected {
                    export_id,
                    reason: reason.clone(),
                    notify,
                };
                if let Err(e) = deps.publisher.event(&deps.topology, &event).await {
                    warn!(message = "Could not announce a rejected job; retrying shortly.", error = %e);
                    return Outcome::Retry;
                }
            }
            Ok(Unreadable::Taken) => {
                warn!(message = "An unreadable message names an export id a job holds; dead-lettering it without touching that export.", %export_id);
            }
            Err(e) => {
                warn!(message = "Could not record a rejected job; retrying shortly.", error = %e);
                return Outcome::Retry;
            }
        }
    }
    Outcome::Reject { reason }
}

/// A job that cannot run. Nothing created yet: `rejected`, announced for the finalizer to
/// record and tell the requester. An audience created already (a resume): the plan is sealed
/// with what was published and the reason, and the export finishes failed or partially failed.
/// A refused token is announced and recorded for the whole fleet first.
async fn refuse(
    deps: &Deps,
    job: &ExportJob,
    reason: String,
    token: Option<Refusal>,
) -> Result<Outcome, PlanError> {
    warn!(message = "Export refused.", %reason);
    if let Some(refusal) = &token {
        deps.revocations
            .refused(&deps.publisher, &deps.topology, refusal)
            .await?;
    }
    let progress = deps.progress.progress(&job.export_id).await?;
    if progress.touched_meta() {
        let totals = PlanTotals {
            members_read: progress.members_read,
            malformed_records: progress.malformed_records,
            excluded: progress.excluded.clone(),
            fields: published(job, &progress),
            error: Some(reason),
        };
        seal(deps, job, &totals).await?;
        deps.metrics.jobs.with(JobOutcome::Failed).inc();
        return Ok(Outcome::Ack);
    }
    let rejected = Event::ExportRejected {
        export_id: job.export_id.clone(),
        reason,
        notify: job.notify.emails.clone(),
    };
    deps.publisher.event(&deps.topology, &rejected).await?;
    deps.metrics.jobs.with(JobOutcome::Rejected).inc();
    Ok(Outcome::Ack)
}

/// The same job message again after the jobs' delay: another planner holds the export (or
/// held it until it died; its lease expires within `PLAN_LEASE`).
fn later(deps: &Deps, body: &[u8]) -> Outcome {
    Outcome::Delay {
        queue: Topology::retry(&deps.topology.jobs(), INFRA_RETRY_MS),
        body: body.to_vec(),
        expiration_ms: None,
    }
}

async fn plan(deps: &Deps, job: &ExportJob, body: &[u8]) -> Result<Outcome, PlanError> {
    let job_json = serde_json::to_string(job).expect("a parsed job serializes");
    let owner = format!("{}-{:08x}", deps.owner, rand::random::<u32>());
    let begin = deps
        .progress
        .begin(
            &job.export_id,
            &job_json,
            now_ms(),
            deps.job_ttl,
            &owner,
            PLAN_LEASE,
        )
        .await?;
    match begin {
        Begin::New => info!(message = "Export accepted.", fields = ?job.fields),
        Begin::Resumed => info!(message = "Resuming an export whose planning was interrupted."),
        Begin::Conflict => {
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
        Begin::Sealed => {
            // Planned already; the announcement may be what was lost (a crash or a broker blip
            // between seal and event): announcing it again is harmless.
            info!(
                message =
                    "Export already planned; announcing it again and ignoring the repeated job."
            );
            announce_sealed(deps, job).await?;
            deps.metrics.jobs.with(JobOutcome::Duplicate).inc();
            return Ok(Outcome::Ack);
        }
        Begin::Finished(status) => {
            info!(message = "Export already finished; ignoring the repeated job.", %status);
            deps.metrics.jobs.with(JobOutcome::Duplicate).inc();
            return Ok(Outcome::Ack);
        }
        Begin::Held { remaining } => {
            info!(
                message = "Another planner holds this export; looking again shortly.",
                remaining_ms = remaining.as_millis() as u64
            );
            deps.metrics.jobs.with(JobOutcome::Held).inc();
            return Ok(later(deps, body));
        }
    }

    // Jobs that came over AMQP are listed too (the API lists its own when submitted).
    deps.progress
        .list_in_workspace(&job.workspace_id, &job.export_id, now_ms())
        .await?;

    // The lease is renewed while this attempt lives; losing it stops the publishing.
    let lease_lost = AtomicBool::new(false);
    let stop_renewing = CancellationToken::new();
    let renewing = renew_lease(deps, job, &owner, &lease_lost, &stop_renewing);
    let planned = async {
        let outcome = planned(deps, job, &lease_lost).await;
        stop_renewing.cancel();
        outcome
    };
    let ((), outcome) = tokio::join!(renewing, planned);
    // Sealed, refused or failing: the next attempt (a retry, a copy) needs no wait. If this
    // does not reach Redis, the lease expires by itself.
    if let Err(e) = deps.progress.release_lease(&job.export_id, &owner).await {
        warn!(message = "Could not release the planning lease; it expires by itself.", error = %e);
    }
    match outcome {
        Err(PlanError::LeaseLost) => {
            warn!(message = "Another planner took this export over; this attempt stops.");
            deps.metrics.jobs.with(JobOutcome::Held).inc();
            Ok(later(deps, body))
        }
        other => other,
    }
}

/// Renews the planning lease every third of its length until `stop`; sets `lost` when another
/// planner holds it. A Redis failure is retried at the next tick (the lease outlives two).
async fn renew_lease(
    deps: &Deps,
    job: &ExportJob,
    owner: &str,
    lost: &AtomicBool,
    stop: &CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PLAN_LEASE / 3) => {}
        }
        match deps
            .progress
            .renew_lease(&job.export_id, owner, PLAN_LEASE)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                warn!(message = "Could not renew the planning lease; trying again.", %error)
            }
        }
    }
}

/// Plans the export under the lease: audiences, the segment into shards, the seal.
///
/// The segment is opened and read up to its first member the consent rule admits before any
/// audience is created: a segment with no such member ends `failed` with that reason and leaves
/// nothing at Meta. (A resume, whose audiences exist, reads ahead the same way.)
async fn planned(
    deps: &Deps,
    job: &ExportJob,
    lease_lost: &AtomicBool,
) -> Result<Outcome, PlanError> {
    audience_export_core::crash_point("producer::planning");
    if let Some(reason) = deps.progress.stop_reason(&job.export_id).await? {
        // Cancelled (or its token refused) before planning began: nothing is read or created.
        info!(message = "Export stopped before planning; sealing it empty.", %reason);
        return seal_early(deps, job, &Reading::new(job), None, JobOutcome::Stopped).await;
    }
    let token = resolve(deps, job).await?;

    let mut reader = match SegmentReader::open(&job.source, &deps.sources).await {
        Ok(reader) => reader,
        Err(e) if e.retryable() => return Err(PlanError::Source(e)),
        Err(e) => return Err(refused(e.to_string())),
    };
    let first = identity(job, reader.identity(), deps.shard_size as u64);
    let (plan, shard_size) = deps
        .progress
        .plan_identity(&job.export_id, &first, deps.shard_size as u64)
        .await?;
    // A resume keeps the first plan's shard size; with it, the source must be the same too.
    let now = identity(job, reader.identity(), shard_size);
    let progress = deps.progress.progress(&job.export_id).await?;
    let plan = if now == plan {
        plan
    } else if progress.has_shards() {
        return Err(refused(
            "the segment changed while this export was being planned (its file was replaced): export it again".into(),
        ));
    } else {
        // Nothing was sent from the old content: plan the new one.
        deps.progress
            .replace_plan_fingerprint(&job.export_id, &now)
            .await?;
        now
    };

    let mut read = Reading::new(job);
    let first_member = match read.next_admitted(&mut reader).await {
        Ok(member) => member,
        Err(e) if e.retryable() => return Err(PlanError::Source(e)),
        Err(e) if !progress.touched_meta() => {
            return Err(refused(format!("the segment could not be read: {e}")))
        }
        Err(e) => {
            let error = Some(read.error_at(&e));
            return seal_early(deps, job, &read, error, JobOutcome::Failed).await;
        }
    };
    let Some(first_member) = first_member else {
        // Nothing to export: no audience is created (or, on a resume, none more is filled).
        let reason = read.nobody_reason();
        warn!(message = "No member to export; nothing is created.", %reason, members = read.members);
        return seal_early(deps, job, &read, Some(reason), JobOutcome::Failed).await;
    };

    let mut audiences = BTreeMap::new();
    if job.dry_run {
        // Nothing is created: the shards carry no audience, and the workers only count.
        check_with_meta(deps, job, &token).await?;
        audiences.extend(job.fields.iter().map(|&field| (field, String::new())));
    } else {
        for &field in &job.fields {
            audiences.insert(field, audience_for(deps, job, &token, field).await?);
        }
    }
    // The job's country wins over the workspace's default.
    let phone_country = match job.default_phone_country {
        Some(country) => Some(country),
        None => deps
            .workspaces
            .default_phone_country(&job.workspace_id)
            .await
            .map_err(PlanError::Settings)?,
    };
    let mut sharder = Sharder::new(
        deps,
        job,
        plan,
        shard_size as usize,
        audiences,
        &progress,
        phone_country,
        lease_lost,
    );
    if sharder.resumed() {
        info!(message = "Resuming from the checkpoints: the segment is read again, what was published is not.");
    }
    let mut member = Some(first_member);
    let read_error = loop {
        let Some((line, record)) = member.take() else {
            break None;
        };
        for &field in &job.fields {
            sharder.push(field, line, record.value(field)).await?;
        }
        if let Some(reason) = &sharder.stopped {
            // Workers would drop every further shard: stop reading, seal what was published.
            warn!(message = "Export stopped while planning; sealing what was published.", %reason, members = read.members);
            break None;
        }
        match read.next_admitted(&mut reader).await {
            Ok(next) => member = next,
            // What was published is checkpointed: the retry re-reads and publishes the rest.
            Err(e) if e.retryable() => return Err(PlanError::Source(e)),
            Err(e) => break Some(e),
        }
    };
    // A segment that cannot be read to its end: what was published stays, nothing more is.
    let error = read_error.map(|e| {
        warn!(message = "The segment could not be read to its end; sealing what was published.", error = %e, line = read.line);
        read.error_at(&e)
    });
    let stopped = sharder.stopped.is_some();
    let totals = read.totals(sharder.finish(error.is_none()).await?, error);
    read.count(&deps.metrics);
    seal(deps, job, &totals).await?;
    let outcome = match stopped {
        true => JobOutcome::Stopped,
        false => JobOutcome::Planned,
    };
    deps.metrics.jobs.with(outcome).inc();
    info!(
        message = "Export planned and sealed.",
        members = read.members,
        malformed = read.malformed,
        excluded = read.consent.excluded_total(),
        shards = totals.shards()
    );
    Ok(Outcome::Ack)
}

/// The segment as it is being read: line numbers (what checkpoints count), members, malformed
/// lines and the consent filter's tally.
struct Reading {
    /// The next line's number (records and malformed lines alike).
    line: u64,
    members: u64,
    malformed: u64,
    consent: ConsentFilter,
}

impl Reading {
    fn new(job: &ExportJob) -> Reading {
        Reading {
            line: 0,
            members: 0,
            malformed: 0,
            consent: ConsentFilter::new(&job.consent()),
        }
    }

    /// The next member the consent rule admits, with its line; None at the end of the segment.
    async fn next_admitted(
        &mut self,
        reader: &mut SegmentReader,
    ) -> Result<Option<(u64, SegmentRecord)>, SourceError> {
        while let Some(next) = reader.next().await? {
            let line = self.line;
            self.line += 1;
            match next {
                Line::Malformed(_) => self.malformed += 1,
                Line::Record(record) => {
                    self.members += 1;
                    if self.consent.admits(&record) {
                        return Ok(Some((line, record)));
                    }
                }
            }
        }
        Ok(None)
    }

    fn error_at(&self, e: &SourceError) -> String {
        format!(
            "the segment could not be read past line {}: {e}. Export it again once the file is complete.",
            self.line
        )
    }

    /// Why a segment without an admitted member exports nothing.
    fn nobody_reason(&self) -> String {
        if self.members == 0 {
            format!(
                "the segment holds no member: none of its {} lines is a member record. Check the segment export.",
                self.malformed
            )
        } else {
            format!(
                "no member is left after the consent filter: all {} members were excluded ({}).",
                self.members,
                self.consent
                    .excluded()
                    .iter()
                    .filter(|(_, &n)| n > 0)
                    .map(|(a, n)| format!("{a}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }

    fn totals(&self, fields: BTreeMap<Field, FieldTotals>, error: Option<String>) -> PlanTotals {
        PlanTotals {
            members_read: self.members,
            malformed_records: self.malformed,
            excluded: self.consent.excluded().clone(),
            fields,
            error,
        }
    }

    /// Adds this reading's members, and those consent left out, to the producer's metrics.
    fn count(&self, metrics: &Metrics) {
        metrics.members.inc_by(self.members);
        for (attribute, &n) in self.consent.excluded() {
            metrics.excluded.with_label_values(&[attribute]).inc_by(n);
        }
    }
}

/// Seals a plan before its first shard (or, on a resume, with what earlier attempts published):
/// with a reason, the export finishes failed or partially failed; stopped, as its stop says.
async fn seal_early(
    deps: &Deps,
    job: &ExportJob,
    read: &Reading,
    error: Option<String>,
    outcome: JobOutcome,
) -> Result<Outcome, PlanError> {
    let progress = deps.progress.progress(&job.export_id).await?;
    let totals = read.totals(published(job, &progress), error);
    read.count(&deps.metrics);
    seal(deps, job, &totals).await?;
    deps.metrics.jobs.with(outcome).inc();
    Ok(Outcome::Ack)
}

/// Each field's totals as far as earlier attempts published them (their checkpoints): what a
/// plan sealed early reports.
fn published(job: &ExportJob, progress: &ExportProgress) -> BTreeMap<Field, FieldTotals> {
    job.fields
        .iter()
        .map(|&f| {
            let p = progress.field(f);
            let totals = FieldTotals {
                with_value: p.with_value,
                missing: p.missing,
                shards: p.shards,
            };
            (f, totals)
        })
        .collect()
}

/// What identifies a plan: the source (its URL, format and content's identity), the shard size
/// and the fields. Shard keys carry it.
fn identity(job: &ExportJob, source_identity: &str, shard_size: u64) -> String {
    let fields: Vec<&str> = job.fields.iter().map(|f: &Field| f.as_str()).collect();
    let digest = Sha256::digest(
        format!(
            "{}\n{:?}\n{source_identity}\n{shard_size}\n{}",
            job.source.url,
            job.source.format,
            fields.join(",")
        )
        .as_bytes(),
    );
    hex::encode(&digest[..8])
}

/// Writes the plan's totals (sealed), then announces it.
async fn seal(deps: &Deps, job: &ExportJob, totals: &PlanTotals) -> Result<(), PlanError> {
    deps.progress.seal(&job.export_id, totals).await?;
    audience_export_core::crash_point("producer::sealed");
    announce_sealed(deps, job).await
}

async fn announce_sealed(deps: &Deps, job: &ExportJob) -> Result<(), PlanError> {
    let sealed = Event::ExportSealed {
        export_id: job.export_id.clone(),
    };
    deps.publisher.event(&deps.topology, &sealed).await?;
    Ok(())
}
