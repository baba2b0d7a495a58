//! Events on the fleet's topic exchange. Routing keys are the `type` tags. They carry counts and
//! ids, never identifiers or tokens, so the upstream platform may store them as they are.

use super::{AdAccountId, ExportId, Field, WorkspaceId};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An event on the `{ns}.events` topic exchange; its `type` is its routing key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type")]
pub enum Event {
    /// A worker finished a shard (uploaded, or failed for good). Counts are in Redis already.
    #[serde(rename = "shard.completed")]
    ShardCompleted {
        export_id: ExportId,
        field: Field,
        /// 0-based, per field.
        shard_index: u32,
        /// Recorded failed rather than uploaded.
        failed: bool,
    },
    /// The producer confirmed every shard and wrote the plan's totals.
    #[serde(rename = "export.sealed")]
    ExportSealed { export_id: ExportId },
    /// A worker read back what Meta shows of a complete export's audiences (approximate sizes)
    /// and made the lookalikes its job asked for: the finalizer may finish it now.
    #[serde(rename = "export.followed_up")]
    ExportFollowedUp { export_id: ExportId },
    /// The producer refused a job; the finalizer records it and tells the requester.
    #[serde(rename = "export.rejected")]
    ExportRejected {
        export_id: ExportId,
        /// Why, in words the requester can act on.
        reason: String,
        /// Who is told (the job's `notify.emails`).
        notify: Vec<String>,
    },
    /// Meta refused a workspace's token (reported by a worker or the producer; the finalizer
    /// acts on it). The token is named only by its fingerprint.
    #[serde(rename = "connection.invalidated")]
    ConnectionInvalidated {
        workspace_id: WorkspaceId,
        /// The export whose call was refused, if any.
        export_id: Option<ExportId>,
        /// The first 16 hex digits of the refused token's SHA-256.
        token_fingerprint: String,
        /// Meta's error code (190 or 102).
        code: i64,
        /// Meta's error subcode.
        subcode: Option<i64>,
        /// Meta's error message.
        message: String,
    },
    /// A selected ad account of a workspace can no longer be exported to while the connection
    /// stays valid: Meta refused the connection's access to it (codes 10, 200-299; e.g. its
    /// Business Manager admin removed whoever connected), or the connection health check found it
    /// gone from the token's `/me/adaccounts` or disabled. Published by the worker or producer
    /// that found it, each time one does (`at_ms` names the loss: repeats carry the same); the
    /// finalizer tells whoever connected the workspace once, and new exports to the account are
    /// refused until it is selected again.
    #[serde(rename = "ad_account.unusable")]
    AdAccountUnusable {
        workspace_id: WorkspaceId,
        ad_account_id: AdAccountId,
        /// The export whose call was refused, if any.
        export_id: Option<ExportId>,
        /// `permission_lost`, `not_listed` or `disabled`.
        kind: crate::connection::UnusableKind,
        /// Meta's error code, when a call was refused; null for what the health check read.
        code: Option<i64>,
        /// Meta's error subcode.
        subcode: Option<i64>,
        /// Meta's message, or what the health check read.
        reason: String,
        /// When the account was marked unusable, in milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// A workspace's connection changed state, for the upstream platform to show where the
    /// connection is used: `valid` (connected or reconnected), `invalid` (with Meta's reason),
    /// or `disconnected`.
    #[serde(rename = "connection.changed")]
    ConnectionChanged {
        workspace_id: WorkspaceId,
        status: ConnectionStatus,
        /// Meta's reason, when `invalid`.
        #[serde(default)]
        reason: Option<String>,
        /// Meta's error code, when `invalid`.
        #[serde(default)]
        code: Option<i64>,
        /// Meta's error subcode, when `invalid`.
        #[serde(default)]
        subcode: Option<i64>,
        /// When it changed, in milliseconds since the Unix epoch.
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
            Event::ExportFollowedUp { .. } => "export.followed_up",
            Event::ExportRejected { .. } => "export.rejected",
            Event::ConnectionInvalidated { .. } => "connection.invalidated",
            Event::AdAccountUnusable { .. } => "ad_account.unusable",
            Event::ConnectionChanged { .. } => "connection.changed",
            Event::ExportFinished(_) => "export.finished",
        }
    }
}

/// A workspace's Facebook connection as the status API and `connection.changed` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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

/// How an export ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
    /// Someone cancelled it: no shard was sent after that; what was uploaded before stays.
    Cancelled,
}

impl ExportStatus {
    pub const ALL: [ExportStatus; 5] = [
        ExportStatus::Succeeded,
        ExportStatus::PartiallyFailed,
        ExportStatus::Failed,
        ExportStatus::Rejected,
        ExportStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExportStatus::Succeeded => "succeeded",
            ExportStatus::PartiallyFailed => "partially_failed",
            ExportStatus::Failed => "failed",
            ExportStatus::Rejected => "rejected",
            ExportStatus::Cancelled => "cancelled",
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FinishedReport {
    pub export_id: ExportId,
    pub status: ExportStatus,
    /// Why the export was rejected or failed; empty on success.
    #[serde(default)]
    pub reason: Option<String>,
    /// The segment's name, from the job.
    pub segment_name: String,
    /// The ad account's digits; null when the job could not be read (a rejected message).
    pub ad_account_id: Option<AdAccountId>,
    /// Members (records) read from the segment.
    pub members_read: u64,
    /// Lines of the segment file that were not a record at all.
    pub malformed_records: u64,
    /// Members left out by the consent filter, by the attribute that excluded them (each member
    /// once, under the first attribute of the rule that excluded it). Every attribute of the
    /// rule is listed, at zero when it excluded nobody.
    #[serde(default)]
    pub excluded: BTreeMap<String, u64>,
    /// A dry run: no audience was created and nothing uploaded; `uploaded` counts what would
    /// have been sent.
    #[serde(default)]
    pub dry_run: bool,
    /// One per field exported: its audience and counts.
    pub audiences: Vec<AudienceReport>,
    /// From the job's acceptance to the finish, in milliseconds.
    pub duration_ms: u64,
}

/// One field's Custom Audience and what became of its values.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct AudienceReport {
    /// The field; null when the report could not name it.
    pub field: Option<Field>,
    /// Meta's id of the Custom Audience.
    pub audience_id: String,
    /// The audience's name at Meta.
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
    /// Values sent to Meta.
    pub uploaded: u64,
    /// Meta's `num_received`, summed over requests.
    pub meta_received: u64,
    /// Meta's `num_invalid_entries`, summed over requests.
    pub meta_invalid: u64,
    /// Batches (shards) of up to 10,000 values planned for this field.
    pub shards: u64,
    /// Batches recorded failed.
    pub shards_failed: u64,
    /// Meta's message for the last failed shard, if any.
    pub last_error: Option<String>,
    /// Entries Meta refused inside accepted requests (`invalid_entry_samples`), counted by
    /// Meta's reason; never the values.
    #[serde(default)]
    pub meta_invalid_reasons: BTreeMap<String, u64>,
    /// The size Meta shows for the audience once the export is done: approximate bounds only,
    /// as Meta reveals nothing more. Null when it could not be read (or a dry run).
    #[serde(default)]
    pub approximate_count_lower_bound: Option<u64>,
    #[serde(default)]
    pub approximate_count_upper_bound: Option<u64>,
    /// The lookalike audience made from this one, when the job asked for one.
    #[serde(default)]
    pub lookalike: Option<LookalikeReport>,
}

/// A lookalike made from an exported audience (the job's `lookalike`), or why it could not be.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct LookalikeReport {
    /// Its audience id; null when Meta refused to make it.
    pub audience_id: Option<String>,
    pub name: String,
    /// Meta's reason when it was not made (an origin under 100 people, say).
    pub error: Option<String>,
}

impl AudienceReport {
    pub fn invalid_total(&self) -> u64 {
        self.invalid.values().sum()
    }
}
