//! The export's progress hash, named once. Every entry of `{ns}:export:{<id>}:progress` is a
//! variant here, written through typed values (`PlanTotals`, `ShardCounts`, `ProgressStatus`)
//! and read back decoded once into an `ExportProgress`; the Lua scripts that change the hash live
//! here too, beside the names they use. No other module spells an entry's name, so a misspelt
//! counter cannot exist. Nothing here ever holds a raw identifier or a token.

use crate::contract::{ExportStatus, Field};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// The export-level entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Key {
    /// `ProgressStatus`.
    Status,
    /// Why it ended as it did (terminal statuses only; may be empty).
    Reason,
    /// Set once when the export must stop (its connection's token refused); every later shard
    /// is dropped and the export finishes `failed` with it.
    StopReason,
    StartedAtMs,
    FinishedAtMs,
    /// `1` once the producer wrote the plan's totals: only then can the export be complete.
    Sealed,
    ShardsPlanned,
    ShardsDone,
    ShardsFailed,
    MembersRead,
    MalformedRecords,
    /// The plan's identity (`PlanIdentity::fingerprint`): what every shard key carries.
    PlanFingerprint,
    /// The shard size the plan was started with: a resume keeps it, whatever the setting says now.
    PlanShardSize,
    /// Planning could not finish after audiences were created (the segment unreadable or
    /// changed, the connection refused on a resume): the plan was sealed with what was
    /// published, and the export finishes failed or partially failed with this reason.
    PlanError,
    /// The last time anything recorded progress (a shard, a checkpoint): what the stalled-export
    /// sweep measures.
    UpdatedAtMs,
    /// When the report email went out: a retried finish never sends it again.
    EmailedAtMs,
    /// `1` when the stop was a cancellation (`CANCEL`): the export finishes `cancelled`.
    Cancelled,
    /// `1` once a worker read back the audiences' sizes and made the lookalikes (the follow-up
    /// of a complete export): the finalizer finishes it then.
    FollowedUp,
}

impl Key {
    const ALL: [Key; 18] = [
        Key::Status,
        Key::Reason,
        Key::StopReason,
        Key::StartedAtMs,
        Key::FinishedAtMs,
        Key::Sealed,
        Key::ShardsPlanned,
        Key::ShardsDone,
        Key::ShardsFailed,
        Key::MembersRead,
        Key::MalformedRecords,
        Key::PlanFingerprint,
        Key::PlanShardSize,
        Key::PlanError,
        Key::UpdatedAtMs,
        Key::EmailedAtMs,
        Key::Cancelled,
        Key::FollowedUp,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Key::Status => "status",
            Key::Reason => "reason",
            Key::StopReason => "stop_reason",
            Key::StartedAtMs => "started_at_ms",
            Key::FinishedAtMs => "finished_at_ms",
            Key::Sealed => "sealed",
            Key::ShardsPlanned => "shards_planned",
            Key::ShardsDone => "shards_done",
            Key::ShardsFailed => "shards_failed",
            Key::MembersRead => "members_read",
            Key::MalformedRecords => "malformed_records",
            Key::PlanFingerprint => "plan_fp",
            Key::PlanShardSize => "plan_shard_size",
            Key::PlanError => "plan_error",
            Key::UpdatedAtMs => "updated_at_ms",
            Key::EmailedAtMs => "emailed_at_ms",
            Key::Cancelled => "cancelled",
            Key::FollowedUp => "followed_up",
        }
    }
}

/// The entries of one field's audience, stored as `<field>:<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FieldKey {
    AudienceId,
    AudienceName,
    WithValue,
    Missing,
    Shards,
    Uploaded,
    Duplicates,
    Prehashed,
    MetaReceived,
    MetaInvalid,
    ShardsFailed,
    LastError,
    /// Source lines (records and malformed lines) whose values of this field are all in shards
    /// the broker confirmed: a resumed plan re-reads the segment and publishes only this field's
    /// values from later lines. With `Shards` (the shards confirmed so far), the checkpoint.
    CheckpointLine,
    /// Meta's approximate size of the audience, read back by the follow-up.
    ApproxLower,
    ApproxUpper,
    /// The lookalike's name, recorded before its create call (the intent, as for audiences).
    LookalikeName,
    LookalikeId,
    /// Why Meta did not make the lookalike.
    LookalikeError,
}

/// Invalid values of a field are counted per reason, as `<field>:invalid:<reason>`.
const INVALID: &str = "invalid:";

/// Entries Meta refused inside accepted requests are counted per Meta's reason, as
/// `<field>:meta_invalid:<reason>` (the reason made a key by `reason_key`).
const META_INVALID: &str = "meta_invalid:";

/// Meta's reason for an invalid entry ("Invalid format") as a hash-entry and report key
/// (`invalid_format`): lowercase ASCII letters and digits joined by `_`, at most 48 bytes.
pub fn reason_key(reason: &str) -> String {
    let mut key = String::new();
    for word in reason
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if !key.is_empty() {
            key.push('_');
        }
        key.push_str(&word.to_ascii_lowercase());
    }
    key.truncate(48);
    if key.is_empty() {
        key.push_str("unspecified");
    }
    key
}

/// Members left out by the consent filter are counted per attribute (the first that excluded
/// them), as `excluded:<attribute>` (attribute names are checked to hold no `:`).
const EXCLUDED: &str = "excluded:";

impl FieldKey {
    const ALL: [FieldKey; 18] = [
        FieldKey::AudienceId,
        FieldKey::AudienceName,
        FieldKey::WithValue,
        FieldKey::Missing,
        FieldKey::Shards,
        FieldKey::Uploaded,
        FieldKey::Duplicates,
        FieldKey::Prehashed,
        FieldKey::MetaReceived,
        FieldKey::MetaInvalid,
        FieldKey::ShardsFailed,
        FieldKey::LastError,
        FieldKey::CheckpointLine,
        FieldKey::ApproxLower,
        FieldKey::ApproxUpper,
        FieldKey::LookalikeName,
        FieldKey::LookalikeId,
        FieldKey::LookalikeError,
    ];

    fn suffix(self) -> &'static str {
        match self {
            FieldKey::AudienceId => "audience_id",
            FieldKey::AudienceName => "audience_name",
            FieldKey::WithValue => "with_value",
            FieldKey::Missing => "missing",
            FieldKey::Shards => "shards",
            FieldKey::Uploaded => "uploaded",
            FieldKey::Duplicates => "duplicates",
            FieldKey::Prehashed => "prehashed",
            FieldKey::MetaReceived => "meta_received",
            FieldKey::MetaInvalid => "meta_invalid",
            FieldKey::ShardsFailed => "shards_failed",
            FieldKey::LastError => "last_error",
            FieldKey::CheckpointLine => "ckpt_line",
            FieldKey::ApproxLower => "approx_lower",
            FieldKey::ApproxUpper => "approx_upper",
            FieldKey::LookalikeName => "lookalike_name",
            FieldKey::LookalikeId => "lookalike_id",
            FieldKey::LookalikeError => "lookalike_error",
        }
    }

    pub(super) fn of(self, field: Field) -> String {
        format!("{field}:{}", self.suffix())
    }
}

fn invalid_name(field: Field, reason: &str) -> String {
    format!("{field}:{INVALID}{reason}")
}

/// Where an export is. Stored as its name (`planning`, `running`, or the terminal status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressStatus {
    /// The producer accepted the job and is creating audiences and publishing shards.
    Planning,
    /// The plan is sealed; shards are being uploaded.
    Running,
    /// The finalizer finished it.
    Finished(ExportStatus),
}

impl ProgressStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProgressStatus::Planning => "planning",
            ProgressStatus::Running => "running",
            ProgressStatus::Finished(status) => status.as_str(),
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, ProgressStatus::Finished(_))
    }
}

impl fmt::Display for ProgressStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProgressStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<ProgressStatus, String> {
        match s {
            "planning" => Ok(ProgressStatus::Planning),
            "running" => Ok(ProgressStatus::Running),
            other => other.parse().map(ProgressStatus::Finished),
        }
    }
}

/// The plan's totals, written when it is sealed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanTotals {
    pub members_read: u64,
    /// Lines of the segment that were not a record.
    pub malformed_records: u64,
    /// Members left out by the consent filter, by the attribute that excluded them.
    pub excluded: BTreeMap<String, u64>,
    pub fields: BTreeMap<Field, FieldTotals>,
    /// Why planning stopped before the end of the segment, when it did (`Key::PlanError`).
    pub error: Option<String>,
}

/// One field's part of the plan.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FieldTotals {
    /// Members with a value for the field.
    pub with_value: u64,
    /// Members without one.
    pub missing: u64,
    /// Shards published for the field.
    pub shards: u64,
}

impl PlanTotals {
    pub fn shards(&self) -> u64 {
        self.fields.values().map(|t| t.shards).sum()
    }

    /// The hash entries sealing the plan: totals, `sealed`, status `running`.
    pub(super) fn entries(&self) -> Vec<(String, String)> {
        let mut out = vec![
            (Key::MembersRead, self.members_read.to_string()),
            (Key::MalformedRecords, self.malformed_records.to_string()),
            (Key::ShardsPlanned, self.shards().to_string()),
            (Key::Sealed, "1".to_owned()),
            (Key::Status, ProgressStatus::Running.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.name().to_owned(), v))
        .collect::<Vec<_>>();
        if let Some(error) = &self.error {
            out.push((Key::PlanError.name().to_owned(), error.clone()));
        }
        for (attribute, n) in &self.excluded {
            out.push((format!("{EXCLUDED}{attribute}"), n.to_string()));
        }
        for (&field, t) in &self.fields {
            out.push((FieldKey::WithValue.of(field), t.with_value.to_string()));
            out.push((FieldKey::Missing.of(field), t.missing.to_string()));
            out.push((FieldKey::Shards.of(field), t.shards.to_string()));
        }
        out
    }
}

/// What one shard adds to its field's counters, whatever its fate. Invalid values are counted by
/// the normalization's reason.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardCounts {
    pub duplicates: u64,
    pub prehashed: u64,
    pub invalid: BTreeMap<&'static str, u64>,
    /// Entries sent to Meta and accepted by the call.
    pub uploaded: u64,
    /// Meta's `num_received`.
    pub meta_received: u64,
    /// Meta's `num_invalid_entries`.
    pub meta_invalid: u64,
    /// Meta's `invalid_entry_samples`, counted by `reason_key` of their reason (never a value).
    pub meta_invalid_reasons: BTreeMap<String, u64>,
}

impl ShardCounts {
    /// `(entry, increment)` pairs for `RECORD_SHARD`; zeros are left out.
    pub(super) fn increments(&self, field: Field) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (key, n) in [
            (FieldKey::Duplicates, self.duplicates),
            (FieldKey::Prehashed, self.prehashed),
            (FieldKey::Uploaded, self.uploaded),
            (FieldKey::MetaReceived, self.meta_received),
            (FieldKey::MetaInvalid, self.meta_invalid),
        ] {
            if n > 0 {
                out.push((key.of(field), n));
            }
        }
        for (reason, &n) in &self.invalid {
            if n > 0 {
                out.push((invalid_name(field, reason), n));
            }
        }
        for (reason, &n) in &self.meta_invalid_reasons {
            if n > 0 {
                out.push((format!("{field}:{META_INVALID}{}", reason_key(reason)), n));
            }
        }
        out
    }
}

/// An export's progress hash, decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportProgress {
    /// None when the export has no progress hash (never accepted, or expired).
    pub status: Option<ProgressStatus>,
    pub reason: Option<String>,
    pub stop_reason: Option<String>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub sealed: bool,
    pub shards_planned: u64,
    pub shards_done: u64,
    pub shards_failed: u64,
    pub members_read: u64,
    pub malformed_records: u64,
    /// Members left out by consent, by attribute (written with the plan's totals).
    pub excluded: BTreeMap<String, u64>,
    pub plan_fingerprint: Option<String>,
    pub plan_shard_size: Option<u64>,
    pub plan_error: Option<String>,
    pub updated_at_ms: Option<u64>,
    pub emailed_at_ms: Option<u64>,
    /// The stop (`stop_reason`) was a cancellation.
    pub cancelled: bool,
    /// The follow-up (sizes, lookalikes) is done.
    pub followed_up: bool,
    pub fields: BTreeMap<Field, FieldProgress>,
    /// Entries this build does not know: written by a newer build during a rolling upgrade.
    /// Kept out of reports, never an error.
    pub unknown: Vec<String>,
}

/// One field's audience and counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldProgress {
    pub audience_id: Option<String>,
    pub audience_name: Option<String>,
    pub with_value: u64,
    pub missing: u64,
    pub shards: u64,
    pub uploaded: u64,
    pub duplicates: u64,
    pub prehashed: u64,
    pub meta_received: u64,
    pub meta_invalid: u64,
    pub shards_failed: u64,
    pub last_error: Option<String>,
    /// Invalid values by reason.
    pub invalid: BTreeMap<String, u64>,
    /// Entries Meta found invalid, by its reason (from its samples).
    pub meta_invalid_reasons: BTreeMap<String, u64>,
    /// The planning checkpoint's line (see `FieldKey::CheckpointLine`).
    pub checkpoint_line: u64,
    pub approx_lower: Option<u64>,
    pub approx_upper: Option<u64>,
    pub lookalike_name: Option<String>,
    pub lookalike_id: Option<String>,
    pub lookalike_error: Option<String>,
}

/// The progress hash holds something this build cannot read as its schema says.
#[derive(Debug, thiserror::Error)]
#[error("progress entry `{name}` holds `{value}`, which is not {expected}")]
pub struct CorruptEntry {
    name: String,
    value: String,
    expected: &'static str,
}

impl CorruptEntry {
    pub(super) fn status(value: &str) -> CorruptEntry {
        CorruptEntry {
            name: Key::Status.name().to_owned(),
            value: value.to_owned(),
            expected: "a status",
        }
    }

    pub(super) fn answer(script: &str, value: &str) -> CorruptEntry {
        CorruptEntry {
            name: format!("{script} answer"),
            value: value.to_owned(),
            expected: "one the script gives",
        }
    }
}

impl ExportProgress {
    pub fn decode(hash: HashMap<String, String>) -> Result<ExportProgress, CorruptEntry> {
        let mut p = ExportProgress::default();
        for (name, value) in hash {
            let corrupt = |expected| CorruptEntry {
                name: name.clone(),
                value: value.clone(),
                expected,
            };
            let count = || value.parse::<u64>().map_err(|_| corrupt("a count"));
            if let Some(key) = Key::ALL.into_iter().find(|k| k.name() == name) {
                match key {
                    Key::Status => p.status = Some(value.parse().map_err(|_| corrupt("a status"))?),
                    Key::Reason => p.reason = Some(value.clone()).filter(|r| !r.is_empty()),
                    Key::StopReason => p.stop_reason = Some(value.clone()),
                    Key::StartedAtMs => p.started_at_ms = Some(count()?),
                    Key::FinishedAtMs => p.finished_at_ms = Some(count()?),
                    Key::Sealed => p.sealed = value == "1",
                    Key::ShardsPlanned => p.shards_planned = count()?,
                    Key::ShardsDone => p.shards_done = count()?,
                    Key::ShardsFailed => p.shards_failed = count()?,
                    Key::MembersRead => p.members_read = count()?,
                    Key::MalformedRecords => p.malformed_records = count()?,
                    Key::PlanFingerprint => p.plan_fingerprint = Some(value.clone()),
                    Key::PlanShardSize => p.plan_shard_size = Some(count()?),
                    Key::PlanError => p.plan_error = Some(value.clone()),
                    Key::UpdatedAtMs => p.updated_at_ms = Some(count()?),
                    Key::EmailedAtMs => p.emailed_at_ms = Some(count()?),
                    Key::Cancelled => p.cancelled = value == "1",
                    Key::FollowedUp => p.followed_up = value == "1",
                }
                continue;
            }
            if let Some(attribute) = name.strip_prefix(EXCLUDED) {
                p.excluded.insert(attribute.to_owned(), count()?);
                continue;
            }
            let Some((field, rest)) = name
                .split_once(':')
                .and_then(|(f, rest)| Some((f.parse::<Field>().ok()?, rest)))
            else {
                p.unknown.push(name);
                continue;
            };
            let f = p.fields.entry(field).or_default();
            if let Some(reason) = rest.strip_prefix(INVALID) {
                f.invalid.insert(reason.to_owned(), count()?);
                continue;
            }
            if let Some(reason) = rest.strip_prefix(META_INVALID) {
                f.meta_invalid_reasons.insert(reason.to_owned(), count()?);
                continue;
            }
            let Some(key) = FieldKey::ALL.into_iter().find(|k| k.suffix() == rest) else {
                p.unknown.push(name);
                continue;
            };
            match key {
                FieldKey::AudienceId => f.audience_id = Some(value.clone()),
                FieldKey::AudienceName => f.audience_name = Some(value.clone()),
                FieldKey::WithValue => f.with_value = count()?,
                FieldKey::Missing => f.missing = count()?,
                FieldKey::Shards => f.shards = count()?,
                FieldKey::Uploaded => f.uploaded = count()?,
                FieldKey::Duplicates => f.duplicates = count()?,
                FieldKey::Prehashed => f.prehashed = count()?,
                FieldKey::MetaReceived => f.meta_received = count()?,
                FieldKey::MetaInvalid => f.meta_invalid = count()?,
                FieldKey::ShardsFailed => f.shards_failed = count()?,
                FieldKey::LastError => f.last_error = Some(value.clone()),
                FieldKey::CheckpointLine => f.checkpoint_line = count()?,
                FieldKey::ApproxLower => f.approx_lower = Some(count()?),
                FieldKey::ApproxUpper => f.approx_upper = Some(count()?),
                FieldKey::LookalikeName => f.lookalike_name = Some(value.clone()),
                FieldKey::LookalikeId => f.lookalike_id = Some(value.clone()),
                FieldKey::LookalikeError => f.lookalike_error = Some(value.clone()),
            }
        }
        p.unknown.sort();
        Ok(p)
    }

    /// One field's progress (all zero when nothing was recorded for it).
    pub fn field(&self, field: Field) -> FieldProgress {
        self.fields.get(&field).cloned().unwrap_or_default()
    }

    /// Every planned shard is done or failed, and the plan is sealed.
    pub fn is_complete(&self) -> bool {
        self.sealed && self.shards_done + self.shards_failed >= self.shards_planned
    }

    /// Whether an audience may exist at Meta for any field: one was recorded, or one was about
    /// to be created (its name recorded first) and the answer never recorded. From then on a
    /// refusal cannot be a clean `rejected`.
    pub fn touched_meta(&self) -> bool {
        self.fields
            .values()
            .any(|f| f.audience_id.is_some() || f.audience_name.is_some())
    }

    /// Whether any shard was published and confirmed (a checkpoint).
    pub fn has_shards(&self) -> bool {
        self.fields.values().any(|f| f.shards > 0)
    }

    /// When anything last happened to the export.
    pub fn last_activity_ms(&self) -> u64 {
        self.updated_at_ms
            .unwrap_or(0)
            .max(self.started_at_ms.unwrap_or(0))
    }
}

/// Records a shard once. KEYS[1] progress hash, KEYS[2] done-set. ARGV[1] shard key; ARGV[2]
/// '0' uploaded, '1' failed, '2' failed in a way that stops the whole export (its reason becomes
/// `stop_reason`); ARGV[3] the field; ARGV[4] the failure's reason ('' when none); ARGV[5] now
/// (ms); then `(entry, increment)` pairs. Adds the shard to the done-set first and applies its
/// counters only if it was not there: returns 1 when counted now, 0 when counted before, -1
/// when the export has no progress hash (expired, or never begun): nothing is created then, so
/// no key ever lives without a TTL. The done-set takes the progress hash's TTL when created.
pub(super) const RECORD_SHARD: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('PTTL', KEYS[2]) < 0 then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
redis.call('HSET', KEYS[1], 'updated_at_ms', ARGV[5])
if ARGV[2] == '2' then redis.call('HSETNX', KEYS[1], 'stop_reason', ARGV[4]) end
if ARGV[2] ~= '0' then
  redis.call('HINCRBY', KEYS[1], 'shards_failed', 1)
  redis.call('HINCRBY', KEYS[1], ARGV[3] .. ':shards_failed', 1)
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[3] .. ':last_error', ARGV[4]) end
else
  redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
end
for i = 6, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"#;

/// A job's arrival, and who plans it, in one step (a process dying between two steps must not
/// leave a job that looks finished). KEYS[1] job, KEYS[2] progress, KEYS[3] planning lease.
/// ARGV[1] the job's JSON, ARGV[2] now (ms), ARGV[3] retention (ms), ARGV[4] this planner's
/// owner id, ARGV[5] the lease (ms). Answers `{'conflict'}` (the id holds another job),
/// `{'finished', status}`, `{'sealed'}`, `{'held', remaining_ms}` (another planner holds the
/// lease), or `{'new'}` / `{'resumed'}` with the lease taken by this owner.
pub(super) const BEGIN: &str = r#"
local job = redis.call('GET', KEYS[1])
if job and job ~= ARGV[1] then return {'conflict'} end
if not job then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3]) end
local fresh = redis.call('EXISTS', KEYS[2]) == 0
if fresh then
  redis.call('HSET', KEYS[2], 'status', 'planning', 'started_at_ms', ARGV[2], 'updated_at_ms', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= 'planning' and status ~= 'running' then return {'finished', status} end
if redis.call('HGET', KEYS[2], 'sealed') == '1' then return {'sealed'} end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[4] then return {'held', tostring(redis.call('PTTL', KEYS[3]))} end
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
if fresh then return {'new'} end
return {'resumed'}
"#;

/// Cancels an export: sets its `stop_reason` (unless a stop is set already) and marks the stop a
/// cancellation, so workers drop its shards, its planner stops reading, and it finishes
/// `cancelled`. An export whose job is recorded but whose planning has not begun (submitted over
/// the API, still queued) gets its progress hash here, so the planner finds the stop first.
/// KEYS[1] job, KEYS[2] progress; ARGV[1] reason, ARGV[2] now (ms), ARGV[3] retention (ms).
/// Answers `{'unknown'}`, `{'finished', status}`, `{'cancelled'}` (now or before), or
/// `{'stopped', reason}` (stopped for another reason first: it finishes as that stop says).
pub(super) const CANCEL: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local status = redis.call('HGET', KEYS[2], 'status')
if status and status ~= 'planning' and status ~= 'running' then return {'finished', status} end
if not status then
  redis.call('HSET', KEYS[2], 'status', 'planning', 'started_at_ms', ARGV[2], 'updated_at_ms', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
if redis.call('HSETNX', KEYS[2], 'stop_reason', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], 'cancelled', '1', 'updated_at_ms', ARGV[2])
  return {'cancelled'}
end
if redis.call('HGET', KEYS[2], 'cancelled') == '1' then return {'cancelled'} end
return {'stopped', redis.call('HGET', KEYS[2], 'stop_reason')}
"#;

/// Extends a lease if `ARGV[1]` still holds it. KEYS[1] lease; ARGV[2] its length (ms).
pub(super) const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Sets a hash entry unless it is set, and answers the value it holds then: the first writer's
/// audience id, or the first plan's name for an audience. KEYS[1] progress; ARGV entry, value.
/// The second element says whether this call set it.
pub(super) const SET_ONCE: &str = r#"
local set = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return {redis.call('HGET', KEYS[1], ARGV[1]), set}
"#;

/// Records an unreadable job under the id it names, unless a job holds that id: a malformed
/// copy must never finish a running export. KEYS[1] job; ARGV[1] the tombstone (a digest of the
/// bytes), ARGV[2] retention (ms). Answers 'new', 'same' (this very message, again) or 'taken'.
pub(super) const REJECT_UNREADABLE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'new' end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 'same' end
return 'taken'
"#;

/// Marks an export finished and sets every key's retention, atomically. KEYS[1] progress, the
/// last KEYS the finalization claim; ARGV status, reason, finished_at_ms, retention ms. Also sets
/// `stop_reason` (the reason, or `finished`) if none is set, so a shard still in flight after a
/// forced finish (the sweep) is dropped rather than uploaded into a finished export.
pub(super) const COMPLETE: &str = r#"
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'reason', ARGV[2], 'finished_at_ms', ARGV[3])
if ARGV[2] ~= '' then redis.call('HSETNX', KEYS[1], 'stop_reason', ARGV[2]) end
redis.call('SET', KEYS[#KEYS], 'done')
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(pairs: &[(String, String)]) -> HashMap<String, String> {
        pairs.iter().cloned().collect()
    }

    #[test]
    fn what_is_written_decodes_to_what_was_meant() {
        let mut plan = PlanTotals {
            members_read: 120,
            malformed_records: 3,
            excluded: [("ads_tracking_enabled".to_owned(), 9)].into(),
            ..PlanTotals::default()
        };
        plan.fields.insert(
            Field::Email,
            FieldTotals {
                with_value: 100,
                missing: 20,
                shards: 2,
            },
        );
        plan.fields.insert(
            Field::Madid,
            FieldTotals {
                with_value: 7,
                missing: 113,
                shards: 1,
            },
        );
        let mut entries = plan.entries();
        let counts = ShardCounts {
            duplicates: 4,
            prehashed: 1,
            invalid: [("email_format", 2), ("empty", 1)].into(),
            uploaded: 93,
            meta_received: 93,
            meta_invalid: 5,
            meta_invalid_reasons: [("Invalid format".to_owned(), 5)].into(),
        };
        entries.extend(
            counts
                .increments(Field::Email)
                .into_iter()
                .map(|(k, v)| (k, v.to_string())),
        );
        entries.push((FieldKey::AudienceId.of(Field::Email), "555".into()));
        let p = ExportProgress::decode(hash(&entries)).expect("decodes");
        assert!(p.unknown.is_empty(), "{:?}", p.unknown);
        assert_eq!(p.status, Some(ProgressStatus::Running));
        assert!(p.sealed);
        assert_eq!((p.members_read, p.malformed_records), (120, 3));
        assert_eq!(p.excluded, plan.excluded);
        assert_eq!(p.shards_planned, 3);
        let email = p.field(Field::Email);
        assert_eq!(email.audience_id.as_deref(), Some("555"));
        assert_eq!(
            (email.with_value, email.missing, email.shards),
            (100, 20, 2)
        );
        assert_eq!(
            (email.uploaded, email.duplicates, email.prehashed),
            (93, 4, 1)
        );
        assert_eq!((email.meta_received, email.meta_invalid), (93, 5));
        assert_eq!(email.invalid.get("email_format"), Some(&2));
        assert_eq!(email.meta_invalid_reasons.get("invalid_format"), Some(&5));
        assert_eq!(p.field(Field::Madid).with_value, 7);
        assert_eq!(p.field(Field::Phone), FieldProgress::default());
    }

    #[test]
    fn every_name_decodes_and_strangers_are_set_aside() {
        let mut entries: Vec<(String, String)> = Key::ALL
            .iter()
            .map(|k| (k.name().to_owned(), "1".to_owned()))
            .collect();
        entries.retain(|(k, _)| k != "status");
        for f in Field::ALL {
            for k in FieldKey::ALL {
                entries.push((k.of(f), "1".into()));
            }
        }
        entries.push(("email:colour".into(), "blue".into()));
        entries.push(("planning_owner".into(), "x".into()));
        let p = ExportProgress::decode(hash(&entries)).expect("decodes");
        assert_eq!(p.unknown, vec!["email:colour", "planning_owner"]);
        assert_eq!(p.field(Field::Phone).meta_invalid, 1);
        assert_eq!(p.stop_reason.as_deref(), Some("1"));
    }

    #[test]
    fn a_counter_that_is_not_a_number_is_corrupt() {
        let err = ExportProgress::decode(hash(&[("shards_done".into(), "x".into())]))
            .expect_err("corrupt");
        assert!(err.to_string().contains("shards_done"));
        let err = ExportProgress::decode(hash(&[("status".into(), "paused".into())]))
            .expect_err("corrupt");
        assert!(err.to_string().contains("a status"));
    }

    #[test]
    fn meta_reasons_become_plain_keys() {
        assert_eq!(reason_key("Invalid format"), "invalid_format");
        assert_eq!(reason_key("  (#100) Bad: value!! "), "100_bad_value");
        assert_eq!(reason_key("::"), "unspecified");
        assert!(reason_key(&"long reason ".repeat(20)).len() <= 48);
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            ProgressStatus::Planning,
            ProgressStatus::Running,
            ProgressStatus::Finished(ExportStatus::Succeeded),
            ProgressStatus::Finished(ExportStatus::PartiallyFailed),
            ProgressStatus::Finished(ExportStatus::Failed),
            ProgressStatus::Finished(ExportStatus::Rejected),
        ] {
            assert_eq!(s.to_string().parse::<ProgressStatus>(), Ok(s));
        }
    }

    #[test]
    fn the_scripts_use_the_schemas_names() {
        for name in [
            "stop_reason",
            "shards_failed",
            "shards_done",
            "updated_at_ms",
        ] {
            assert!(Key::ALL.iter().any(|k| k.name() == name));
            assert!(RECORD_SHARD.contains(&format!("'{name}'")));
        }
        for name in ["status", "started_at_ms", "updated_at_ms", "sealed"] {
            assert!(Key::ALL.iter().any(|k| k.name() == name));
            assert!(BEGIN.contains(&format!("'{name}'")));
        }
        for status in [ProgressStatus::Planning, ProgressStatus::Running] {
            assert!(BEGIN.contains(&format!("'{status}'")));
        }
        for suffix in ["shards_failed", "last_error"] {
            assert!(FieldKey::ALL.iter().any(|k| k.suffix() == suffix));
            assert!(RECORD_SHARD.contains(&format!("':{suffix}'")));
        }
        for name in ["status", "reason", "finished_at_ms", "stop_reason"] {
            assert!(Key::ALL.iter().any(|k| k.name() == name));
            assert!(COMPLETE.contains(&format!("'{name}'")));
        }
    }
}
