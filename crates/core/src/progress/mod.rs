//! Per-export progress in Redis. Every key of one export carries the hash tag `{export_id}` so
//! multi-key scripts work on Redis Cluster. Counters change only through `RECORD_SHARD`, which
//! first adds the shard to the export's done-set: a redelivered shard can never be counted twice.
//! The progress hash's entries are named in `schema` and nowhere else. Nothing here stores a raw
//! identifier or a token: only counts, ids and Meta's messages.

mod schema;

pub use schema::{
    CorruptEntry, ExportProgress, FieldProgress, FieldTotals, PlanTotals, ProgressStatus,
    ShardCounts,
};

use crate::contract::{ExportId, Field};
use redis::aio::ConnectionManager;
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

/// A job's first sighting or a repeat of it (idempotency by `export_id`).
#[derive(Debug, PartialEq, Eq)]
pub enum Begin {
    New,
    /// Seen before; `sealed` says whether its plan was completed.
    Existing {
        sealed: bool,
        status: Option<ProgressStatus>,
    },
}

#[derive(Clone)]
pub struct ProgressStore {
    redis: ConnectionManager,
    ns: String,
    record_shard: redis::Script,
    complete: redis::Script,
}

impl ProgressStore {
    pub async fn connect(url: &str, namespace: &str) -> Result<ProgressStore> {
        let redis = connect_redis(url).await?;
        Ok(ProgressStore {
            redis,
            ns: namespace.to_owned(),
            record_shard: redis::Script::new(schema::RECORD_SHARD),
            complete: redis::Script::new(schema::COMPLETE),
        })
    }

    /// Its Redis connection, for the other stores of the process to share: one connection
    /// manager per process, not one per store.
    pub fn connection(&self) -> ConnectionManager {
        self.redis.clone()
    }

    fn key(&self, export_id: &ExportId, what: &str) -> String {
        format!("{}:export:{{{export_id}}}:{what}", self.ns)
    }

    pub async fn ping(&self) -> Result<()> {
        let mut c = self.redis.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// Records a job's arrival once. `ttl` bounds how long an export that never finishes keeps
    /// its keys.
    pub async fn begin(
        &self,
        export_id: &ExportId,
        job_json: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Begin> {
        let mut c = self.redis.clone();
        let job_key = self.key(export_id, "job");
        let created: bool = redis::cmd("SET")
            .arg(&job_key)
            .arg(job_json)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async::<Option<String>>(&mut c)
            .await?
            .is_some();
        let progress = self.key(export_id, "progress");
        if created {
            let _: () = redis::pipe()
                .atomic()
                .hset_multiple(
                    &progress,
                    &[
                        (Key::Status.name(), ProgressStatus::Planning.to_string()),
                        (Key::StartedAtMs.name(), now_ms.to_string()),
                    ],
                )
                .pexpire(&progress, ttl.as_millis() as i64)
                .query_async(&mut c)
                .await?;
            return Ok(Begin::New);
        }
        let progress = self.progress(export_id).await?;
        Ok(Begin::Existing {
            sealed: progress.sealed,
            status: progress.status,
        })
    }

    /// The job as the producer accepted it.
    pub async fn job(&self, export_id: &ExportId) -> Result<Option<String>> {
        let mut c = self.redis.clone();
        Ok(c.get(self.key(export_id, "job")).await?)
    }

    /// The audience created for a field, if the producer got that far before.
    pub async fn audience(&self, export_id: &ExportId, field: Field) -> Result<Option<String>> {
        let mut c = self.redis.clone();
        Ok(c.hget(
            self.key(export_id, "progress"),
            FieldKey::AudienceId.of(field),
        )
        .await?)
    }

    pub async fn set_audience(
        &self,
        export_id: &ExportId,
        field: Field,
        id: &str,
        name: &str,
    ) -> Result<()> {
        let mut c = self.redis.clone();
        let _: () = c
            .hset_multiple(
                self.key(export_id, "progress"),
                &[
                    (FieldKey::AudienceId.of(field), id),
                    (FieldKey::AudienceName.of(field), name),
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

    /// Why the export was stopped (its connection's token refused), if it was.
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

    /// Counts a shard once. Returns false when it had been counted already (a redelivery).
    pub async fn record_shard(
        &self,
        export_id: &ExportId,
        shard_key: &str,
        field: Field,
        failure: Option<&Failure>,
        counts: &ShardCounts,
    ) -> Result<bool> {
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
            .arg(failure.map(|f| f.reason.as_str()).unwrap_or(""));
        for (name, value) in counts.increments(field) {
            invocation.arg(name).arg(value);
        }
        let counted: i64 = invocation.invoke_async(&mut c).await?;
        Ok(counted == 1)
    }

    /// The export's progress hash, decoded.
    pub async fn progress(&self, export_id: &ExportId) -> Result<ExportProgress> {
        let mut c = self.redis.clone();
        let hash = c.hgetall(self.key(export_id, "progress")).await?;
        Ok(ExportProgress::decode(hash)?)
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

    /// Records the terminal status and starts the retention clock on every key of the export.
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
            .key(self.key(export_id, "final"))
            .arg(ProgressStatus::Finished(status).as_str())
            .arg(reason)
            .arg(now_ms)
            .arg(retention.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }
}

/// How long one Redis command may take before it counts as failed. redis-rs 1.x defaults to
/// 500 ms, which a loaded CI machine (or a Lua script over a large done-set) can exceed; a timeout
/// leaves the outcome unknown (the command may have run), which every caller treats as
/// "retry", and every write here is idempotent.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The one way a process connects to Redis: a connection manager that reconnects in the
/// background (delays from 100 ms, doubling, capped at 2 s) so that work resumes within seconds
/// of Redis coming back, with explicit timeouts.
pub async fn connect_redis(url: &str) -> redis::RedisResult<ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(redis::Client::open(url)?, config).await
}

/// Claims `key` for `owner` with a lease (`SET NX PX`): something done once by whichever process
/// gets there first, taken over by another if the first dies before `done`.
pub async fn claim(
    c: &mut ConnectionManager,
    key: &str,
    owner: &str,
    lease: Duration,
) -> redis::RedisResult<Claim> {
    let won: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(owner)
        .arg("NX")
        .arg("PX")
        .arg(lease.as_millis() as u64)
        .query_async(c)
        .await?;
    if won.is_some() {
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
pub async fn release(c: &mut ConnectionManager, key: &str, owner: &str) -> redis::RedisResult<()> {
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
