//! The identifier kinds a marketer can export, one Custom Audience each.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An identifier field. Each becomes its own Custom Audience with Meta's single-key schema.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Field {
    /// Email addresses (`EMAIL_SHA256`).
    Email,
    /// Phone numbers (`PHONE_SHA256`).
    Phone,
    /// Mobile advertiser id: Apple's IDFA or Google's advertising id.
    Madid,
}

impl Field {
    pub const ALL: [Field; 3] = [Field::Email, Field::Phone, Field::Madid];

    /// The wire name, also used in Redis field names and metric labels (bounded: three values).
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Email => "email",
            Field::Phone => "phone",
            Field::Madid => "madid",
        }
    }

    /// Meta's payload schema for this field. MADID is the one key Meta wants unhashed.
    pub fn schema(self) -> &'static str {
        match self {
            Field::Email => "EMAIL_SHA256",
            Field::Phone => "PHONE_SHA256",
            Field::Madid => "MOBILE_ADVERTISER_ID",
        }
    }

    /// The label used in audience names ("<segment> - Email - <date>") and emails.
    pub fn label(self) -> &'static str {
        match self {
            Field::Email => "Email",
            Field::Phone => "Phone",
            Field::Madid => "Mobile advertiser ID",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Field {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "email" => Ok(Field::Email),
            "phone" => Ok(Field::Phone),
            "madid" => Ok(Field::Madid),
            other => Err(format!(
                "unknown field `{other}` (expected email, phone or madid)"
            )),
        }
    }
}
