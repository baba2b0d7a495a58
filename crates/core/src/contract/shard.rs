//! A shard: up to 10,000 raw values of one field for one audience, the unit of upload and of
//! idempotency. Raw values are PII: a shard is never logged and lives only on the broker.

use super::{AdAccountId, ExportId, Field, PhoneCountry, WorkspaceId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub export_id: ExportId,
    pub workspace_id: WorkspaceId,
    pub audience_id: String,
    pub ad_account_id: AdAccountId,
    pub field: Field,
    /// 0-based, per field. With `export_id`, `plan` and `field` it is the shard's idempotency
    /// key.
    pub shard_index: u32,
    /// The plan's fingerprint (shard size and source identity): a shard of another plan of the
    /// same export can never be taken for this one's. Empty in shards of builds before it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plan: String,
    pub records: Vec<String>,
    /// 1 on first delivery; incremented each time the shard is scheduled for a retry.
    pub attempt: u32,
    /// Country of phone numbers written without their country code (ISO 3166-1 alpha-2), from
    /// the job or the workspace. Absent: such numbers are invalid. A shard naming a country
    /// without a numbering plan does not parse, so it is dead-lettered, never silently sent
    /// without its national numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_phone_country: Option<PhoneCountry>,
    /// Of a dry run: prepared and counted, never uploaded (`audience_id` is empty).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

impl Shard {
    /// The idempotency key recorded in the export's done-set.
    pub fn key(&self) -> String {
        shard_key(&self.plan, self.field, self.shard_index)
    }
}

/// `<plan>:<field>:<index>` (`<field>:<index>` for a shard without a plan fingerprint).
pub fn shard_key(plan: &str, field: Field, index: u32) -> String {
    if plan.is_empty() {
        format!("{field}:{index}")
    } else {
        format!("{plan}:{field}:{index}")
    }
}

/// The header that marks a follow-up on the shards queue (`FOLLOW_UP`): the workers, which hold
/// the tokens, read back a complete export's audience sizes and make its lookalikes. It rides
/// the shard queue so no other queue, consumer or autoscaling rule is needed.
pub const MESSAGE_KIND_HEADER: &str = "x-message-kind";
pub const FOLLOW_UP: &str = "follow-up";

/// A complete export's follow-up, asked by the finalizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowUp {
    pub export_id: ExportId,
}
