//! Events on the fleet's topic exchange. Routing keys are the `type` tags. They carry counts and
//! ids, never identifiers or tokens, so the upstream platform may store them as they are.

use super::{AdAccountId, ExportId, Field, WorkspaceId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    /// A worker finished a shard (uploaded, or failed for good). Counts are in Redis already.
    #[serde(rename = "shard.completed")]
    ShardCompleted {
        export_id: ExportId,
        field: Field,
        shard_index: u32,
        failed: bool,
    },
    /// The producer confirmed every shard and wrote the plan's totals.
    #[serde(rename = "export.sealed")]
    ExportSealed { export_id: ExportId },
    /// The producer refused a job; the finalizer records it and tells the requester.
    #[serde(rename = "export.rejected")]
    ExportRejected {
        export_id: ExportId,
        reason: String,
        notify: Vec<String>,
    },
    /// Meta refused a workspace's token (reported by a worker or the producer; the finalizer
    /// acts on it). The token is named only by its fingerprint.
    #[serde(rename = "connection.invalidated")]
    ConnectionInvalidated {
        workspace_id: WorkspaceId,
        export_id: Option<ExportId>,
        token_fingerprint: String,
        code: i64,
        subcode: Option<i64>,
        message: String,
    },
    /// A workspace's connection changed state, for the upstream platform to show where the
    /// connection is used: `valid` (connected or reconnected), `invalid` (with Meta's reason),
    /// or `disconnected`.
    #[serde(rename = "connection.changed")]
    ConnectionChanged {
        workspace_id: WorkspaceId,
        status: ConnectionStatus,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        code: Option<i64>,
        #[serde(default)]
        subcode: Option<i64>,
        at_ms: u64,
    },
    /// Terminal: published once per export by the finalizer.
    #[serde(rename = "export.finished")]
    ExportFinished(FinishedReport),
}

impl Event {
    pub fn routing_key(&self) -> &'static str {
        match self {
            Event::ShardCompleted { .. } => "shard.completed",
            Event::ExportSealed { .. } => "export.sealed",
            Event::ExportRejected { .. } => "export.rejected",
            Event::ConnectionInvalidated { .. } => "connection.invalidated",
            Event::ConnectionChanged { .. } => "connection.changed",
            Event::ExportFinished(_) => "export.finished",
        }
    }
}

/// A workspace's Facebook connection as the status API and `connection.changed` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    /// Meta accepts its token (as far as anyone knows).
    Valid,
    /// Meta refused its token: exports are refused until it is reconnected.
    Invalid,
    /// Its tokens were deleted (only in `connection.changed`).
    Disconnected,
}

impl ConnectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionStatus::Valid => "valid",
            ConnectionStatus::Invalid => "invalid",
            ConnectionStatus::Disconnected => "disconnected",
        }
    }
}

impl std::fmt::Display for ConnectionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportStatus {
    /// Every shard uploaded.
    Succeeded,
    /// Some shards failed; the rest arrived.
    PartiallyFailed,
    /// Nothing usable arrived.
    Failed,
    /// The job was refused before any audience was created.
    Rejected,
}

impl ExportStatus {
    pub const ALL: [ExportStatus; 4] = [
        ExportStatus::Succeeded,
        ExportStatus::PartiallyFailed,
        ExportStatus::Failed,
        ExportStatus::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExportStatus::Succeeded => "succeeded",
            ExportStatus::PartiallyFailed => "partially_failed",
            ExportStatus::Failed => "failed",
            ExportStatus::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for ExportStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ExportStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<ExportStatus, String> {
        ExportStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown export status `{s}`"))
    }
}

/// What the marketer's email and the `export.finished` event say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinishedReport {
    pub export_id: ExportId,
    pub status: ExportStatus,
    /// Why the export was rejected or failed; empty on success.
    #[serde(default)]
    pub reason: Option<String>,
    pub segment_name: String,
    /// The ad account's digits; null when the job could not be read (a rejected message).
    pub ad_account_id: Option<AdAccountId>,
    pub members_read: u64,
    /// Lines of the segment file that were not a record at all.
    pub malformed_records: u64,
    pub audiences: Vec<AudienceReport>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AudienceReport {
    pub field: Option<Field>,
    pub audience_id: String,
    pub name: String,
    /// Members that had a value for this field.
    pub with_value: u64,
    /// Members without a value for this field.
    pub missing: u64,
    /// Values that failed normalization, never sent, by reason.
    pub invalid: BTreeMap<String, u64>,
    /// Values that were already SHA-256 hex and were passed through.
    pub prehashed: u64,
    /// Repeats of a value inside one shard, sent once.
    pub duplicates: u64,
    pub uploaded: u64,
    /// Meta's `num_received`, summed over requests.
    pub meta_received: u64,
    /// Meta's `num_invalid_entries`, summed over requests.
    pub meta_invalid: u64,
    pub shards: u64,
    pub shards_failed: u64,
    /// Meta's message for the last failed shard, if any.
    pub last_error: Option<String>,
}

impl AudienceReport {
    pub fn invalid_total(&self) -> u64 {
        self.invalid.values().sum()
    }
}
