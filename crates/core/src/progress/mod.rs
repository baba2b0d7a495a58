//! Per-export progress in Redis. Every key of one export carries the hash tag `{export_id}` so
//! multi-key scripts work on Redis Cluster. Counters change only through `RECORD_SHARD`, which
//! first adds the shard to the export's done-set: a redelivered shard can never be counted twice.
//! Nothing here stores a raw identifier or a token: only counts, ids and Meta's messages.

use crate::contract::Field;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::time::Duration;

/// Adds the shard to the done-set; if it was not there, applies its counters. Returns 1 when the
/// shard was counted now, 0 when it had been counted before. ARGV[2]: '0' uploaded, '1' failed,
/// '2' failed in a way that stops the whole export (its reason becomes `stop_reason`).
const RECORD_SHARD: &str = r#"
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
if ARGV[2] == '2' then redis.call('HSETNX', KEYS[1], 'stop_reason', ARGV[4]) end
if ARGV[2] ~= '0' then
  redis.call('HINCRBY', KEYS[1], 'shards_failed', 1)
  redis.call('HINCRBY', KEYS[1], ARGV[3] .. ':shards_failed', 1)
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[3] .. ':last_error', ARGV[4]) end
else
  redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
end
for i = 5, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"#;

/// Marks an export finished and sets every key's retention, atomically.
const COMPLETE: &str = r#"
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'reason', ARGV[2], 'finished_at_ms', ARGV[3])
redis.call('SET', KEYS[4], 'done')
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return 1
"#;

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
/// reconnects, and every operation here is idempotent.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
}

impl ProgressError {
    pub fn is_retryable(&self) -> bool {
        true
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
        status: String,
    },
}

#[derive(Clone)]
pub struct ProgressStore {
    redis: ConnectionManager,
    ns: String,
    record_shard: redis::Script,
    complete: redis::Script,
}

/// An export's progress hash, read at once.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(pub HashMap<String, String>);

impl Snapshot {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    pub fn count(&self, key: &str) -> u64 {
        self.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
    pub fn field_count(&self, field: Field, what: &str) -> u64 {
        self.count(&format!("{field}:{what}"))
    }
    pub fn is_sealed(&self) -> bool {
        self.get("sealed") == Some("1")
    }
    /// Every planned shard is done or failed, and the plan is sealed.
    pub fn is_complete(&self) -> bool {
        self.is_sealed()
            && self.count("shards_done") + self.count("shards_failed")
                >= self.count("shards_planned")
    }
    /// Invalid counts of one field, by reason.
    pub fn invalid_by_reason(&self, field: Field) -> Vec<(String, u64)> {
        let prefix = format!("{field}:invalid:");
        let mut out: Vec<_> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(&prefix)
                    .map(|r| (r.to_owned(), v.parse().unwrap_or(0)))
            })
            .collect();
        out.sort();
        out
    }
}

impl ProgressStore {
    pub async fn connect(url: &str, namespace: &str) -> Result<ProgressStore> {
        let client = redis::Client::open(url)?;
        let redis = ConnectionManager::new(client).await?;
        Ok(ProgressStore {
            redis,
            ns: namespace.to_owned(),
            record_shard: redis::Script::new(RECORD_SHARD),
            complete: redis::Script::new(COMPLETE),
        })
    }

    /// Its Redis connection, for the other stores of the process to share: one connection
    /// manager per process, not one per store.
    pub fn connection(&self) -> ConnectionManager {
        self.redis.clone()
    }

    fn key(&self, export_id: &str, what: &str) -> String {
        format!("{}:export:{{{export_id}}}:{what}", self.ns)
    }

    /// Keys of one export, for tests and operators.
    pub fn progress_key(&self, export_id: &str) -> String {
        self.key(export_id, "progress")
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
        export_id: &str,
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
                        ("status", "planning".to_owned()),
                        ("started_at_ms", now_ms.to_string()),
                    ],
                )
                .pexpire(&progress, ttl.as_millis() as i64)
                .query_async(&mut c)
                .await?;
            return Ok(Begin::New);
        }
        let snap = self.snapshot(export_id).await?;
        Ok(Begin::Existing {
            sealed: snap.is_sealed(),
            status: snap.get("status").unwrap_or("unknown").to_owned(),
        })
    }

    /// The job as the producer accepted it.
    pub async fn job(&self, export_id: &str) -> Result<Option<String>> {
        let mut c = self.redis.clone();
        Ok(c.get(self.key(export_id, "job")).await?)
    }

    /// The audience created for a field, if the producer got that far before.
    pub async fn audience(&self, export_id: &str, field: Field) -> Result<Option<String>> {
        let mut c = self.redis.clone();
        Ok(c.hget(
            self.key(export_id, "progress"),
            format!("{field}:audience_id"),
        )
        .await?)
    }

    pub async fn set_audience(
        &self,
        export_id: &str,
        field: Field,
        id: &str,
        name: &str,
    ) -> Result<()> {
        let mut c = self.redis.clone();
        let _: () = c
            .hset_multiple(
                self.key(export_id, "progress"),
                &[
                    (format!("{field}:audience_id"), id),
                    (format!("{field}:audience_name"), name),
                ],
            )
            .await?;
        Ok(())
    }

    /// Writes the plan's totals and marks it sealed, in one command.
    pub async fn seal(&self, export_id: &str, totals: &[(String, u64)]) -> Result<()> {
        let mut c = self.redis.clone();
        let mut fields: Vec<(String, String)> = totals
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        fields.push(("sealed".into(), "1".into()));
        fields.push(("status".into(), "running".into()));
        let _: () = c
            .hset_multiple(self.key(export_id, "progress"), &fields)
            .await?;
        Ok(())
    }

    /// Why the export was stopped (its connection's token refused), if it was.
    pub async fn stop_reason(&self, export_id: &str) -> Result<Option<String>> {
        let mut c = self.redis.clone();
        Ok(c.hget(self.key(export_id, "progress"), "stop_reason")
            .await?)
    }

    /// Whether the shard was counted already, and why its export was stopped, if it was: what
    /// a worker checks before doing anything with a shard.
    pub async fn shard_gate(
        &self,
        export_id: &str,
        shard_key: &str,
    ) -> Result<(bool, Option<String>)> {
        let mut c = self.redis.clone();
        Ok(redis::pipe()
            .sismember(self.key(export_id, "done"), shard_key)
            .hget(self.key(export_id, "progress"), "stop_reason")
            .query_async(&mut c)
            .await?)
    }

    /// Counts a shard once. Returns false when it had been counted already (a redelivery).
    pub async fn record_shard(
        &self,
        export_id: &str,
        shard_key: &str,
        field: Field,
        failure: Option<&Failure>,
        increments: &[(String, u64)],
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
        for (name, value) in increments {
            invocation.arg(name).arg(*value);
        }
        let counted: i64 = invocation.invoke_async(&mut c).await?;
        Ok(counted == 1)
    }

    pub async fn snapshot(&self, export_id: &str) -> Result<Snapshot> {
        let mut c = self.redis.clone();
        Ok(Snapshot(c.hgetall(self.key(export_id, "progress")).await?))
    }

    /// Claims the right to finalize, with a lease so a finalizer that dies mid-way does not
    /// block the export forever.
    pub async fn claim_finalization(
        &self,
        export_id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Claim> {
        let mut c = self.redis.clone();
        Ok(claim(&mut c, &self.key(export_id, "final"), owner, lease).await?)
    }

    /// Releases a claim after a failed attempt, so the next event retries at once rather than
    /// after the lease.
    pub async fn release_finalization(&self, export_id: &str, owner: &str) -> Result<()> {
        let mut c = self.redis.clone();
        Ok(release(&mut c, &self.key(export_id, "final"), owner).await?)
    }

    /// Records the terminal status and starts the retention clock on every key of the export.
    pub async fn complete(
        &self,
        export_id: &str,
        status: &str,
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
            .arg(status)
            .arg(reason)
            .arg(now_ms)
            .arg(retention.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }
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
