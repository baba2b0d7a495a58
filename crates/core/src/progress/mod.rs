//! Per-export progress in Redis. Every key of one export carries the hash tag `{export_id}` so
//! multi-key scripts work on Redis Cluster. Counters change only through `RECORD_SHARD`, which
//! first adds the shard to the export's done-set: a redelivered shard can never be counted twice.
//! The progress hash's entries are named in `schema` and nowhere else. Nothing here stores a raw
//! identifier or a token: only counts, ids and Meta's messages.

mod schema;

pub use schema::{
    reason_key, CorruptEntry, ExportProgress, FieldProgress, FieldTotals, PlanTotals,
    ProgressStatus, ShardCounts,
};

use crate::contract::{ExportId, Field, WorkspaceId};
use crate::redis_conn::RedisConn;
use redis::AsyncCommands;
use schema::{FieldKey, Key};
use std::time::Duration;

/// Gives up a finalization claim, but only if this owner still holds it.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Why a shard failed for good. `stops_export`: the failure ends the whole export (Meta refused
/// the connection's token); every later shard of it is dropped and the export fails with
/// `reason`.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub reason: String,
    pub stops_export: bool,
}

impl Failure {
    pub fn shard(reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            stops_export: false,
        }
    }

    pub fn export(reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            stops_export: true,
        }
    }
}

/// Why a progress operation failed. Redis errors are retryable: the connection manager
/// reconnects, and every operation here is idempotent. A corrupt entry will not mend itself.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Corrupt(#[from] CorruptEntry),
}

impl ProgressError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProgressError::Redis(_))
    }
}

type Result<T> = std::result::Result<T, ProgressError>;

/// The outcome of `claim`: of trying to finalize an export, or to send a one-time notice.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// This caller finalizes.
    Won,
    /// Another finalizer holds the lease; try again once it may have expired.
    Held { remaining: Duration },
    /// Finalized already.
    Done,
}

/// What `begin` found, and whether this caller now plans the export.
#[derive(Debug, PartialEq, Eq)]
pub enum Begin {
    /// First sighting: this caller holds the planning lease.
    New,
    /// Planning was interrupted before (a crash, an outage): this caller holds the lease now and
    /// resumes it.
    Resumed,
    /// Another planner holds the lease (a copy of the job published twice, or one being
    /// planned right now): try again after `remaining`, in case it dies.
    Held { remaining: Duration },
    /// Planned already: its `export.sealed` may be announced again, nothing else.
    Sealed,
    /// Finished already.
    Finished(ProgressStatus),
    /// The id holds another job (or an unreadable message under it).
    Conflict,
}

/// How many exports a workspace's list keeps, and how long after its last export.
pub const WORKSPACE_LIST_LEN: usize = 200;
pub const WORKSPACE_LIST_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// What `submit` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// First submission: queue it.
    New,
    /// The same job again (a client's retry): queue it again, harmlessly (it runs once).
    Again,
    /// The id holds another job.
    Conflict,
}

/// What `cancel` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// No job under this id.
    Unknown,
    /// Cancelled (by this call or an earlier one).
    Cancelled,
    /// Stopped for another reason first (its token refused): it finishes as that stop says.
    AlreadyStopped(String),
    /// Finished before the cancellation.
    Finished(ProgressStatus),
}

/// What `reject_unreadable` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// First sighting of the id: announce the rejection.
    New,
    /// The same unreadable message again (a redelivery): announce it again, idempotently.
    Same,
    /// A job holds the id: announce nothing; never touch its export.
    Taken,
}

#[derive(Clone)]
pub struct ProgressStore {
    redis: RedisConn,
    ns: String,
    record_shard: redis::Script,
    complete: redis::Script,
    begin: redis::Script,
    renew: redis::Script,
    set_once: redis::Script,
    reject_unreadable: redis::Script,
    cancel: redis::Script,
}

impl ProgressStore {
    pub async fn connect(url: &str, namespace: &str) -> Result<ProgressStore> {
        let redis = crate::redis_conn::connect(url).await?;
        Ok(ProgressStore {
            redis,
            ns: namespace.to_owned(),
            record_shard: redis::Script::new(schema::RECORD_SHARD),
            complete: redis::Script::new(schema::COMPLETE),
            begin: redis::Script::new(schema::BEGIN),
            renew: redis::Script::new(schema::RENEW),
            set_once: redis::Script::new(schema::SET_ONCE),
            reject_unreadable: redis::Script::new(schema::REJECT_UNREADABLE),
            cancel: redis::Script::new(schema::CANCEL),
        })
    }

    /// Its Redis connection, for the other stores of the process to share: one connection
    /// manager per process, not one per store.
    pub fn connection(&self) -> RedisConn {
        self.redis.clone()
    }

    fn key(&self, export_id: &ExportId, what: &str) -> String {
        format!("{}:export:{{{export_id}}}:{what}", self.ns)
    }

    /// The exports not finished yet, by start time: what the stalled-export sweep walks. One
    /// key for the namespace (never part of a multi-key script, so Redis Cluster is fine).
    fn index(&self) -> String {
        format!("{}:exports", self.ns)
    }

    /// A workspace's exports by start time, newest kept: what `GET /v1/exports?workspace_id=`
    /// lists. One key per workspace, written on its own (never inside a multi-key script).
    fn workspace_index(&self, workspace: &WorkspaceId) -> String {
        crate::redis_conn::workspace_key(&self.ns, workspace, "exports")
    }

    /// Whether Redis persists every write (AOF on), from `INFO persistence`: on a cluster,
    /// every node must (a replica promoted after a failover holds the data then).
    pub async fn persists_writes(&self) -> Result<bool> {
        let answers = self
            .redis
            .on_every_node::<String>(redis::cmd("INFO").arg("persistence"))
            .await?;
        let not: Vec<&str> = answers
            .iter()
            .filter(|(_, info)| {
                !info
                    .as_ref()
                    .is_ok_and(|info| info.lines().any(|l| l.trim() == "aof_enabled:1"))
            })
            .map(|(node, _)| node.as_str())
            .collect();
        if !not.is_empty() {
            tracing::warn!(message = "Redis nodes that do not persist writes (or did not answer INFO)", nodes = ?not);
        }
        Ok(!answers.is_empty() && not.is_empty())
    }

    pub async fn ping(&self) -> Result<()> {
        let mut c = self.redis.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// Records a job's arrival (once: `export_id` is its idempotency key) and takes the planning
    /// lease for `owner`, in one script. `ttl` bounds how long an export that never finishes
    /// keeps its keys; every key gets it when created.
    pub async fn begin(
        &self,
        export_id: &ExportId,
        job_json: &str,
        now_ms: u64,
        ttl: Duration,
        owner: &str,
        lease: Duration,
    ) -> Result<Begin> {
        let mut c = self.redis.clone();
        let answer: Vec<String> = self
            .begin
            .key(self.key(export_id, "job"))
            .key(self.key(export_id, "progress"))
            .key(self.key(export_id, "planner"))
            .arg(job_json)
            .arg(now_ms)
            .arg(ttl.as_millis() as u64)
            .arg(owner)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        let begin = match answer.first().map(String::as_str) {
            Some("new") => Begin::New,
            Some("resumed") => Begin::Resumed,
            Some("sealed") => Begin::Sealed,
            Some("conflict") => Begin::Conflict,
            Some("held") => Begin::Held {
                remaining: Duration::from_millis(
                    answer.get(1).and_then(|v| v.parse().ok()).unwrap_or(1_000),
                ),
            },
            Some("finished") => {
                let status = answer.get(1).map(String::as_str).unwrap_or_default();
                Begin::Finished(status.parse().map_err(|_| CorruptEntry::status(status))?)
            }
            other => return Err(CorruptEntry::answer("BEGIN", other.unwrap_or("")).into()),
        };
        if matches!(begin, Begin::New | Begin::Resumed) {
            let _: () = c.zadd(self.index(), export_id.as_str(), now_ms).await?;
        }
        Ok(begin)
    }

    /// Records a job submitted over the API before it is queued (`SET NX` of the job, the very
    /// bytes `begin` will compare), so a second submission of the same job is recognised and a
    /// different job under the same id refused at once. The planner's `begin` then finds it.
    pub async fn submit(
        &self,
        export_id: &ExportId,
        workspace: &WorkspaceId,
        job_json: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Submitted> {
        let mut c = self.redis.clone();
        let key = self.key(export_id, "job");
        let set = set_nx_px(&mut c, &key, job_json, ttl).await?;
        if !set {
            let held: Option<String> = c.get(&key).await?;
            if held.as_deref() != Some(job_json) {
                return Ok(Submitted::Conflict);
            }
        }
        self.list_in_workspace(workspace, export_id, now_ms).await?;
        Ok(if set {
            Submitted::New
        } else {
            Submitted::Again
        })
    }

    /// Adds an export to its workspace's list (idempotent: the first time stays), keeping the
    /// newest `WORKSPACE_LIST_LEN` and the list's retention.
    pub async fn list_in_workspace(
        &self,
        workspace: &WorkspaceId,
        export_id: &ExportId,
        now_ms: u64,
    ) -> Result<()> {
        let mut c = self.redis.clone();
        let key = self.workspace_index(workspace);
        let _: () = redis::pipe()
            .cmd("ZADD")
            .arg(&key)
            .arg("NX")
            .arg(now_ms)
            .arg(export_id.as_str())
            .ignore()
            .zremrangebyrank(&key, 0, -(WORKSPACE_LIST_LEN as isize) - 1)
            .ignore()
            .pexpire(&key, WORKSPACE_LIST_RETENTION.as_millis() as i64)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// A workspace's most recent exports, newest first, at most `limit`.
    pub async fn recent(&self, workspace: &WorkspaceId, limit: usize) -> Result<Vec<ExportId>> {
        let mut c = self.redis.clone();
        let ids: Vec<String> = c
            .zrevrange(self.workspace_index(workspace), 0, limit as isize - 1)
            .await?;
        Ok(ids
            .into_iter()
            .filter_map(|id| ExportId::parse(id).ok())
            .collect())
    }

    /// Cancels an export (`CANCEL`): no shard is sent after this, and it finishes `cancelled`.
    pub async fn cancel(
        &self,
        export_id: &ExportId,
        reason: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Cancelled> {
        let mut c = self.redis.clone();
        let answer: Vec<String> = self
            .cancel
            .key(self.key(export_id, "job"))
            .key(self.key(export_id, "progress"))
            .arg(reason)
            .arg(now_ms)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        let second = || answer.get(1).cloned().unwrap_or_default();
        Ok(match answer.first().map(String::as_str) {
            Some("unknown") => Cancelled::Unknown,
            Some("cancelled") => Cancelled::Cancelled,
            Some("stopped") => Cancelled::AlreadyStopped(second()),
            Some("finished") => {
                let status = second();
                Cancelled::Finished(status.parse().map_err(|_| CorruptEntry::status(&status))?)
            }
            other => return Err(CorruptEntry::answer("CANCEL", other.unwrap_or("")).into()),
        })
    }

    /// Extends the planning lease if `owner` still holds it; false when it was lost (expired and
    /// taken by another planner): the caller must stop publishing.
    pub async fn renew_lease(
        &self,
        export_id: &ExportId,
        owner: &str,
        lease: Duration,
    ) -> Result<bool> {
        let mut c = self.redis.clone();
        let renewed: i64 = self
            .renew
            .key(self.key(export_id, "planner"))
            .arg(owner)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(renewed == 1)
    }

    /// Gives the planning lease up (planning sealed, or stopped to be tried again).
    pub async fn release_lease(&self, export_id: &ExportId, owner: &str) -> Result<()> {
        let mut c = self.redis.clone();
        Ok(release(&mut c, &self.key(export_id, "planner"), owner).await?)
    }

    /// Records an unreadable job under the id it names unless a job holds it (`Unreadable`).
    pub async fn reject_unreadable(
        &self,
        export_id: &ExportId,
        tombstone: &str,
        ttl: Duration,
    ) -> Result<Unreadable> {
        let mut c = self.redis.clone();
        let answer: String = self
            .reject_unreadable
            .key(self.key(export_id, "job"))
            .arg(tombstone)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(match answer.as_str() {
            "new" => Unreadable::New,
            "same" => Unreadable::Same,
            _ => Unreadable::Taken,
        })
    }

    /// The job as the producer accepted it.
    pub async fn job(&self, export_id: &ExportId) -> Result<Option<String>> {
        let mut c = self.redis.clone();
        Ok(c.get(self.key(export_id, "job")).await?)
    }

    /// The audience recorded for a field, if the producer got that far before.
    pub async fn audience(&self, export_id: &ExportId, field: Field) -> Result<Option<String>> {
        let mut c = self.redis.clone();
        Ok(c.hget(
            self.key(export_id, "progress"),
            FieldKey::AudienceId.of(field),
        )
        .await?)
    }

    async fn set_once(
        &self,
        export_id: &ExportId,
        entry: String,
        value: &str,
    ) -> Result<(String, bool)> {
        let mut c = self.redis.clone();
        let (held, set): (String, i64) = self
            .set_once
            .key(self.key(export_id, "progress"))
            .arg(entry)
            .arg(value)
            .invoke_async(&mut c)
            .await?;
        Ok((held, set == 1))
    }

    /// Records the name an audience is to be created with, before it is created (the intent):
    /// the first plan's name wins, so a resume on another day creates (or finds) the same
    /// audience. Returns the name to use and whether this call recorded it.
    pub async fn intend_audience(
        &self,
        export_id: &ExportId,
        field: Field,
        name: &str,
    ) -> Result<(String, bool)> {
        self.set_once(export_id, FieldKey::AudienceName.of(field), name)
            .await
    }

    /// Forgets the intent to create a field's audience: its create call was refused outright,
    /// so none exists.
    pub async fn forget_audience_intent(&self, export_id: &ExportId, field: Field) -> Result<()> {
        let mut c = self.redis.clone();
        let _: () = c
            .hdel(
                self.key(export_id, "progress"),
                FieldKey::AudienceName.of(field),
            )
            .await?;
        Ok(())
    }

    /// Records the audience of a field unless one is recorded: returns the one that counts (a
    /// second planner adopts the first's).
    pub async fn set_audience(
        &self,
        export_id: &ExportId,
        field: Field,
        id: &str,
    ) -> Result<String> {
        Ok(self
            .set_once(export_id, FieldKey::AudienceId.of(field), id)
            .await?
            .0)
    }

    /// Records Meta's approximate size of a field's audience (the follow-up's readback).
    pub async fn set_size(
        &self,
        export_id: &ExportId,
        field: Field,
        lower: Option<u64>,
        upper: Option<u64>,
    ) -> Result<()> {
        let mut c = self.redis.clone();
        let key = self.key(export_id, "progress");
        let mut pipe = redis::pipe();
        for (entry, bound) in [
            (FieldKey::ApproxLower, lower),
            (FieldKey::ApproxUpper, upper),
        ] {
            match bound {
                Some(n) => pipe.hset(&key, entry.of(field), n).ignore(),
                None => pipe.hdel(&key, entry.of(field)).ignore(),
            };
        }
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Records the name of a field's lookalike before its create call (`intend_audience`'s
    /// rule): the first name recorded, and whether this call recorded it.
    pub async fn intend_lookalike(
        &self,
        export_id: &ExportId,
        field: Field,
        name: &str,
    ) -> Result<(String, bool)> {
        self.set_once(export_id, FieldKey::LookalikeName.of(field), name)
            .await
    }

    /// Records a field's lookalike (its id, or Meta's reason for not making it) once.
    pub async fn set_lookalike(
        &self,
        export_id: &ExportId,
        field: Field,
        made: std::result::Result<&str, &str>,
    ) -> Result<()> {
        let (entry, value) = match made {
            Ok(id) => (FieldKey::LookalikeId, id),
            Err(reason) => (FieldKey::LookalikeError, reason),
        };
        self.set_once(export_id, entry.of(field), value).await?;
        Ok(())
    }

    /// Sets one export-level entry of the progress hash.
    async fn set_entry(&self, export_id: &ExportId, key: Key, value: u64) -> Result<()> {
        let mut c = self.redis.clone();
        let _: () = c
            .hset(self.key(export_id, "progress"), key.name(), value)
            .await?;
        Ok(())
    }

    /// Records activity on an export (what the sweep measures) without changing anything else.
    pub async fn touch(&self, export_id: &ExportId, now_ms: u64) -> Result<()> {
        self.set_entry(export_id, Key::UpdatedAtMs, now_ms).await
    }

    /// Records that the follow-up is done (whatever it could read or make).
    pub async fn mark_followed_up(&self, export_id: &ExportId) -> Result<()> {
        self.set_entry(export_id, Key::FollowedUp, 1).await
    }

    /// Records the plan's identity unless one is recorded; returns the recorded fingerprint and
    /// shard size (the first plan's: a resume keeps them).
    pub async fn plan_identity(
        &self,
        export_id: &ExportId,
        fingerprint: &str,
        shard_size: u64,
    ) -> Result<(String, u64)> {
        let mut c = self.redis.clone();
        let key = self.key(export_id, "progress");
        let (_, _, fp, size): (i64, i64, String, u64) = redis::pipe()
            .atomic()
            .hset_nx(&key, Key::PlanFingerprint.name(), fingerprint)
            .hset_nx(&key, Key::PlanShardSize.name(), shard_size)
            .hget(&key, Key::PlanFingerprint.name())
            .hget(&key, Key::PlanShardSize.name())
            .query_async(&mut c)
            .await?;
        Ok((fp, size))
    }

    /// Replaces the plan's fingerprint: only before any shard was published (a source that
    /// changed before anything was sent from it).
    pub async fn replace_plan_fingerprint(
        &self,
        export_id: &ExportId,
        fingerprint: &str,
    ) -> Result<()> {
        let mut c = self.redis.clone();
        let _: () = c
            .hset(
                self.key(export_id, "progress"),
                Key::PlanFingerprint.name(),
                fingerprint,
            )
            .await?;
        Ok(())
    }

    /// Records that the broker confirmed `shards` shards of `field`, which hold every value of
    /// it from the first `line` lines of the segment: where a resumed plan takes up.
    pub async fn checkpoint(
        &self,
        export_id: &ExportId,
        field: Field,
        shards: u64,
        line: u64,
        now_ms: u64,
    ) -> Result<()> {
        let mut c = self.redis.clone();
        let _: () = c
            .hset_multiple(
                self.key(export_id, "progress"),
                &[
                    (FieldKey::Shards.of(field), shards.to_string()),
                    (FieldKey::CheckpointLine.of(field), line.to_string()),
                    (Key::UpdatedAtMs.name().to_owned(), now_ms.to_string()),
                ],
            )
            .await?;
        Ok(())
    }

    /// Writes the plan's totals and marks it sealed, in one command.
    pub async fn seal(&self, export_id: &ExportId, totals: &PlanTotals) -> Result<()> {
        let mut c = self.redis.clone();
        let _: () = c
            .hset_multiple(self.key(export_id, "progress"), &totals.entries())
            .await?;
        Ok(())
    }

    /// Why the export was stopped (its connection's token refused, or a forced finish), if it was.
    pub async fn stop_reason(&self, export_id: &ExportId) -> Result<Option<String>> {
        let mut c = self.redis.clone();
        Ok(
            c.hget(self.key(export_id, "progress"), Key::StopReason.name())
                .await?,
        )
    }

    /// Whether the shard was counted already, and why its export was stopped, if it was: what
    /// a worker checks before doing anything with a shard.
    pub async fn shard_gate(
        &self,
        export_id: &ExportId,
        shard_key: &str,
    ) -> Result<(bool, Option<String>)> {
        let mut c = self.redis.clone();
        Ok(redis::pipe()
            .sismember(self.key(export_id, "done"), shard_key)
            .hget(self.key(export_id, "progress"), Key::StopReason.name())
            .query_async(&mut c)
            .await?)
    }

    /// Counts a shard once. `Recorded::Before` when it had been counted already (a
    /// redelivery); `Recorded::Unknown` when the export has no progress any more (expired).
    pub async fn record_shard(
        &self,
        export_id: &ExportId,
        shard_key: &str,
        field: Field,
        failure: Option<&Failure>,
        counts: &ShardCounts,
    ) -> Result<Recorded> {
        let mut c = self.redis.clone();
        let mut invocation = self.record_shard.prepare_invoke();
        invocation
            .key(self.key(export_id, "progress"))
            .key(self.key(export_id, "done"))
            .arg(shard_key)
            .arg(match failure {
                None => "0",
                Some(f) if f.stops_export => "2",
                Some(_) => "1",
            })
            .arg(field.as_str())
            .arg(failure.map(|f| f.reason.as_str()).unwrap_or(""))
            .arg(now_ms());
        for (name, value) in counts.increments(field) {
            invocation.arg(name).arg(value);
        }
        let counted: i64 = invocation.invoke_async(&mut c).await?;
        Ok(match counted {
            1 => Recorded::Now,
            0 => Recorded::Before,
            _ => Recorded::Unknown,
        })
    }

    /// The shard keys counted so far.
    pub async fn done_shards(
        &self,
        export_id: &ExportId,
    ) -> Result<std::collections::HashSet<String>> {
        let mut c = self.redis.clone();
        Ok(c.smembers(self.key(export_id, "done")).await?)
    }

    /// The export's progress hash, decoded.
    pub async fn progress(&self, export_id: &ExportId) -> Result<ExportProgress> {
        let mut c = self.redis.clone();
        let hash = c.hgetall(self.key(export_id, "progress")).await?;
        Ok(ExportProgress::decode(hash)?)
    }

    /// Sets why the export must stop, unless a reason is set: workers drop its shards and its
    /// planner stops reading.
    pub async fn stop(&self, export_id: &ExportId, reason: &str) -> Result<()> {
        let mut c = self.redis.clone();
        let _: () = redis::pipe()
            .hset_nx(
                self.key(export_id, "progress"),
                Key::StopReason.name(),
                reason,
            )
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Records that the report email went out.
    pub async fn mark_emailed(&self, export_id: &ExportId, now_ms: u64) -> Result<()> {
        self.set_entry(export_id, Key::EmailedAtMs, now_ms).await
    }

    /// Exports begun and not finished, oldest first (the sweep's list; may hold finished ones
    /// whose removal failed, which the sweep removes).
    pub async fn unfinished(&self) -> Result<Vec<ExportId>> {
        let mut c = self.redis.clone();
        let ids: Vec<String> = c.zrange(self.index(), 0, -1).await?;
        Ok(ids
            .into_iter()
            .filter_map(|id| ExportId::parse(id).ok())
            .collect())
    }

    /// Takes an export off the sweep's list.
    pub async fn forget(&self, export_id: &ExportId) -> Result<()> {
        let mut c = self.redis.clone();
        let _: () = c.zrem(self.index(), export_id.as_str()).await?;
        Ok(())
    }

    /// Claims the right to finalize, with a lease so a finalizer that dies mid-way does not
    /// block the export forever.
    pub async fn claim_finalization(
        &self,
        export_id: &ExportId,
        owner: &str,
        lease: Duration,
    ) -> Result<Claim> {
        let mut c = self.redis.clone();
        Ok(claim(&mut c, &self.key(export_id, "final"), owner, lease).await?)
    }

    /// Releases a claim after a failed attempt, so the next event retries at once rather than
    /// after the lease.
    pub async fn release_finalization(&self, export_id: &ExportId, owner: &str) -> Result<()> {
        let mut c = self.redis.clone();
        Ok(release(&mut c, &self.key(export_id, "final"), owner).await?)
    }

    /// Records the terminal status, starts the retention clock on every key of the export, and
    /// takes it off the sweep's list.
    pub async fn complete(
        &self,
        export_id: &ExportId,
        status: crate::contract::ExportStatus,
        reason: &str,
        now_ms: u64,
        retention: Duration,
    ) -> Result<()> {
        let mut c = self.redis.clone();
        let _: i64 = self
            .complete
            .key(self.key(export_id, "progress"))
            .key(self.key(export_id, "job"))
            .key(self.key(export_id, "done"))
            .key(self.key(export_id, "planner"))
            .key(self.key(export_id, "final"))
            .arg(ProgressStatus::Finished(status).as_str())
            .arg(reason)
            .arg(now_ms)
            .arg(retention.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        self.forget(export_id).await
    }
}

/// What `record_shard` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Now,
    /// Counted before: a redelivery.
    Before,
    /// The export has no progress (expired or never begun): nothing was written.
    Unknown,
}

/// `SET key value NX PX ttl`: whether this call set it (the key did not exist). Every
/// first-writer-wins key of the fleet with a lifetime goes through here.
pub async fn set_nx_px(
    c: &mut RedisConn,
    key: &str,
    value: &str,
    ttl: Duration,
) -> redis::RedisResult<bool> {
    let set: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("NX")
        .arg("PX")
        .arg(ttl.as_millis().max(1) as u64)
        .query_async(c)
        .await?;
    Ok(set.is_some())
}

/// Claims `key` for `owner` with a lease (`SET NX PX`): something done once by whichever process
/// gets there first, taken over by another if the first dies before `done`.
pub async fn claim(
    c: &mut RedisConn,
    key: &str,
    owner: &str,
    lease: Duration,
) -> redis::RedisResult<Claim> {
    if set_nx_px(c, key, owner, lease).await? {
        return Ok(Claim::Won);
    }
    let (value, ttl): (Option<String>, i64) =
        redis::pipe().get(key).pttl(key).query_async(c).await?;
    match value.as_deref() {
        Some("done") => Ok(Claim::Done),
        _ => Ok(Claim::Held {
            remaining: Duration::from_millis(ttl.max(1) as u64),
        }),
    }
}

/// Gives up a claim, but only if `owner` still holds it.
pub async fn release(c: &mut RedisConn, key: &str, owner: &str) -> redis::RedisResult<()> {
    let _: i64 = redis::Script::new(RELEASE)
        .key(key)
        .arg(owner)
        .invoke_async(c)
        .await?;
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
