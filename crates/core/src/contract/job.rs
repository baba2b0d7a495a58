//! The export job the upstream platform enqueues: what to export, where, and whom to tell.

use super::{AdAccountId, ExportId, Field, PhoneCountry, WorkspaceId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The contract version this build reads and writes. A job with another version is rejected with
/// a reason rather than half-understood.
pub const CONTRACT_VERSION: u32 = 1;

/// One export request. `export_id` is its idempotency key: a job delivered twice runs once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportJob {
    #[serde(default = "default_version")]
    pub version: u32,
    pub export_id: ExportId,
    pub workspace_id: WorkspaceId,
    pub segment: Segment,
    /// Meta ad account id, with or without the `act_` prefix on the wire.
    pub ad_account_id: AdAccountId,
    pub fields: Vec<Field>,
    pub source: Source,
    pub notify: Notify,
    /// Overrides the generated "<segment> - <Field> - <date>" name prefix.
    #[serde(default)]
    pub audience_name: Option<String>,
    /// ISO 3166-1 alpha-2 country for phone numbers written without their country code.
    #[serde(default)]
    pub default_phone_country: Option<PhoneCountry>,
    #[serde(default)]
    pub requested_by: Option<String>,
    #[serde(default)]
    pub requested_at: Option<String>,
}

fn default_version() -> u32 {
    CONTRACT_VERSION
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub url: String,
    pub format: SourceFormat,
    #[serde(default)]
    pub compression: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Ndjson,
    Csv,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    #[serde(default)]
    pub emails: Vec<String>,
}

/// Why a job cannot run. Never retryable: the same bytes will fail the same way.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JobError {
    #[error("the message is not JSON: {0}")]
    NotJson(String),
    #[error("the job does not match the contract: {0}")]
    Contract(String),
    #[error("the job is invalid: {0}")]
    Invalid(String),
}

impl ExportJob {
    /// Parses and validates a job message. The error says, in words an integrator can act on,
    /// what is wrong; it is what the dead-letter header and the rejection email carry.
    pub fn parse(bytes: &[u8]) -> Result<ExportJob, JobError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| JobError::NotJson(e.to_string()))?;
        let job: ExportJob =
            serde_json::from_value(value).map_err(|e| JobError::Contract(e.to_string()))?;
        job.validate()?;
        Ok(job)
    }

    fn validate(&self) -> Result<(), JobError> {
        let invalid = |m: &str| Err(JobError::Invalid(m.to_owned()));
        if self.version != CONTRACT_VERSION {
            return Err(JobError::Invalid(format!(
                "contract version {} is not supported (this build reads {CONTRACT_VERSION})",
                self.version
            )));
        }
        if self.fields.is_empty() {
            return invalid("fields is empty: choose at least one of email, phone, madid");
        }
        let distinct: BTreeSet<_> = self.fields.iter().collect();
        if distinct.len() != self.fields.len() {
            return invalid("fields lists the same field twice");
        }
        if self.segment.name.trim().is_empty() {
            return invalid("segment.name is empty");
        }
        if self.source.format != SourceFormat::Ndjson {
            return invalid("source.format csv is not supported yet: use ndjson");
        }
        if self.source.compression.is_some() {
            return invalid("source.compression is not supported yet");
        }
        Ok(())
    }

    /// Best-effort extraction of the export id and recipients from a job that failed to parse,
    /// so a rejection can still be recorded and announced.
    pub fn salvage(bytes: &[u8]) -> Option<(ExportId, Vec<String>)> {
        let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let id = ExportId::parse(value.get("export_id")?.as_str()?).ok()?;
        let emails = value
            .pointer("/notify/emails")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Some((id, emails))
    }
}

/// A syntax check of an email address (one `@`, a dotted domain, no spaces); the SMTP server
/// has the last word.
pub fn looks_like_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.contains('@')
                && !s.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> serde_json::Value {
        serde_json::json!({
            "export_id": "exp-1",
            "workspace_id": "ws-1",
            "segment": {"id": "seg-1", "name": "Churned"},
            "ad_account_id": "act_1234",
            "fields": ["email", "phone"],
            "source": {"url": "file:///tmp/x.ndjson", "format": "ndjson"},
            "notify": {"emails": ["a@example.com"]}
        })
    }

    fn parse(v: serde_json::Value) -> Result<ExportJob, JobError> {
        ExportJob::parse(v.to_string().as_bytes())
    }

    #[test]
    fn a_valid_job_parses() {
        let job = parse(valid()).expect("valid job");
        assert_eq!(job.fields, vec![Field::Email, Field::Phone]);
        assert_eq!(job.ad_account_id.as_str(), "1234");
        assert_eq!(job.ad_account_id.act(), "act_1234");
    }

    #[test]
    fn each_defect_is_rejected_with_its_reason() {
        type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Mutation, &str)> = vec![
            (
                "missing fields",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("fields");
                }),
                "missing field `fields`",
            ),
            (
                "empty fields",
                Box::new(|v| v["fields"] = serde_json::json!([])),
                "fields is empty",
            ),
            (
                "unknown field",
                Box::new(|v| v["fields"] = serde_json::json!(["fax"])),
                "unknown variant `fax`",
            ),
            (
                "duplicate field",
                Box::new(|v| v["fields"] = serde_json::json!(["email", "email"])),
                "same field twice",
            ),
            (
                "bad account",
                Box::new(|v| v["ad_account_id"] = serde_json::json!("act_x1")),
                "ad_account_id",
            ),
            (
                "bad export id",
                Box::new(|v| v["export_id"] = serde_json::json!("a b")),
                "export_id",
            ),
            (
                "unknown key",
                Box::new(|v| v["tokn"] = serde_json::json!("x")),
                "unknown field `tokn`",
            ),
            (
                "future version",
                Box::new(|v| v["version"] = serde_json::json!(2)),
                "version 2",
            ),
            (
                "csv",
                Box::new(|v| v["source"]["format"] = serde_json::json!("csv")),
                "csv",
            ),
            (
                "unknown country",
                Box::new(|v| v["default_phone_country"] = serde_json::json!("XX")),
                "phone country `XX`",
            ),
        ];
        for (name, mutate, expected) in cases {
            let mut v = valid();
            mutate(&mut v);
            let err = parse(v).expect_err(name).to_string();
            assert!(err.contains(expected), "{name}: {err}");
        }
    }

    #[test]
    fn not_json_is_its_own_error() {
        assert!(matches!(
            ExportJob::parse(b"{nope"),
            Err(JobError::NotJson(_))
        ));
    }

    #[test]
    fn salvage_finds_id_and_recipients_of_a_broken_job() {
        let mut v = valid();
        v.as_object_mut().unwrap().remove("fields");
        let (id, emails) = ExportJob::salvage(v.to_string().as_bytes()).expect("salvaged");
        assert_eq!(id.as_str(), "exp-1");
        assert_eq!(emails, vec!["a@example.com".to_owned()]);
        assert!(ExportJob::salvage(b"not json").is_none());
    }
}
