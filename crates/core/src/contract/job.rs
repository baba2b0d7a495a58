//! The export job the upstream platform enqueues: what to export, where, and whom to tell.

use super::{AdAccountId, ExportId, Field, PhoneCountry, WorkspaceId};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The contract version this build reads and writes. A job with another version is rejected with
/// a reason rather than half-understood.
pub const CONTRACT_VERSION: u32 = 1;

/// One export request. `export_id` is its idempotency key: a job delivered twice runs once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportJob {
    /// The contract version; this build reads 1 only.
    #[serde(default = "default_version")]
    pub version: u32,
    pub export_id: ExportId,
    /// The workspace whose Facebook connection the export uses.
    pub workspace_id: WorkspaceId,
    pub segment: Segment,
    /// Meta ad account id, with or without the `act_` prefix on the wire.
    pub ad_account_id: AdAccountId,
    /// The identifier fields to export, one Custom Audience each: at least one, none twice.
    #[schemars(length(min = 1), extend("uniqueItems" = true))]
    pub fields: Vec<Field>,
    pub source: Source,
    pub notify: Notify,
    /// Overrides the generated "<segment> - <Field> - <date>" name prefix.
    #[serde(default)]
    pub audience_name: Option<String>,
    /// ISO 3166-1 alpha-2 country for phone numbers written without their country code.
    #[serde(default)]
    pub default_phone_country: Option<PhoneCountry>,
    /// Who asked for the export (shown in the report).
    #[serde(default)]
    pub requested_by: Option<String>,
    /// When it was asked for, as the upstream platform writes it.
    #[serde(default)]
    pub requested_at: Option<String>,
    /// Which members may be exported, by their consent attributes. Absent: `Consent::default()`
    /// (members who opted out of sale or sharing are left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<Consent>,
    /// Read, filter, normalize and count everything and report it, but create no audience and
    /// upload nothing: Meta is called only to check the connection.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Once the export succeeded, a lookalike of each of its audiences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookalike: Option<Lookalike>,
}

/// What lookalike to make of each exported audience: Meta finds people like them in
/// `countries`, the closest `ratio` (0.01 to 0.20) of each country's population.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lookalike {
    /// ISO 3166-1 alpha-2 codes, e.g. `["US"]`.
    #[schemars(length(min = 1, max = 25), inner(regex(pattern = r"^[A-Z]{2}$")))]
    pub countries: Vec<String>,
    #[schemars(range(min = 0.01, max = 0.2))]
    pub ratio: f64,
}

impl Lookalike {
    fn validate(&self) -> Result<(), String> {
        if self.countries.is_empty() || self.countries.len() > 25 {
            return Err("lookalike.countries must name 1 to 25 countries".into());
        }
        if let Some(bad) = self
            .countries
            .iter()
            .find(|c| c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(format!(
                "lookalike.countries: `{bad}` is not an ISO 3166-1 alpha-2 code (two capital letters, e.g. US)"
            ));
        }
        if !(0.01..=0.20).contains(&self.ratio) {
            return Err(format!(
                "lookalike.ratio {} is outside Meta's 0.01 to 0.20",
                self.ratio
            ));
        }
        Ok(())
    }
}

fn default_version() -> u32 {
    CONTRACT_VERSION
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// The upstream platform's id of the segment.
    pub id: String,
    /// The segment's name: audience names and the report start with it. Not blank.
    #[schemars(regex(pattern = super::schema::NON_BLANK))]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Where the segment is read from: `file://` (inside the producer's `AE_PRODUCER__FILE_ROOT`),
    /// `https://`, `http://` or `s3://<bucket>/<key>`.
    pub url: String,
    pub format: SourceFormat,
    /// `gzip` or `none`; absent: detected (HTTP `Content-Encoding: gzip`, or the gzip magic bytes
    /// `1f 8b` at the start). Serialized as `null` when absent, as before it was typed, so a stored
    /// job compares equal to its redelivered copy.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// For `http(s)://` sources: the name of a file in the producer's
    /// `AE_PRODUCER__SOURCE_SECRETS_DIR` (a mounted Kubernetes Secret) whose `Header-Name: value`
    /// lines are sent with the request. The job names the secret; it never carries the values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret: Option<String>,
}

/// How the segment's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// The bytes are the segment (still decoded if the HTTP answer says `Content-Encoding: gzip`,
    /// which is how the transfer was encoded, not what the segment is).
    None,
    /// One gzip stream (or several, concatenated).
    Gzip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Ndjson,
    Csv,
}

/// Consent attributes of a member (booleans in the segment) that decide whether it is exported:
/// every `require` attribute must be true and no `exclude` attribute true. Absent is not true.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    /// Attributes that must be `true` for a member to be exported.
    #[serde(default)]
    #[schemars(inner(regex(pattern = r"^[A-Za-z0-9_.\-]{1,64}$")))]
    pub require: Vec<String>,
    /// Attributes of which none may be `true`.
    #[serde(default)]
    #[schemars(inner(regex(pattern = r"^[A-Za-z0-9_.\-]{1,64}$")))]
    pub exclude: Vec<String>,
}

/// The attribute a job without a `consent` block excludes on: CCPA's "Do Not Sell or Share".
pub const DO_NOT_SELL_OR_SHARE: &str = "do_not_sell_or_share";

/// The longest consent attribute name: names become Redis hash entries and a metric label.
pub const MAX_ATTRIBUTE_LEN: usize = 64;

impl Default for Consent {
    fn default() -> Consent {
        Consent {
            require: Vec::new(),
            exclude: vec![DO_NOT_SELL_OR_SHARE.to_owned()],
        }
    }
}

impl Consent {
    /// Every attribute, `require` first then `exclude`: the order in which the first that
    /// excludes a member is found.
    pub fn attributes(&self) -> impl Iterator<Item = &str> {
        self.require.iter().chain(&self.exclude).map(String::as_str)
    }

    fn validate(&self) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for name in self.attributes() {
            let ok = !name.is_empty()
                && name.len() <= MAX_ATTRIBUTE_LEN
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok {
                return Err(format!(
                    "consent attribute `{name}` is not a name: use 1 to {MAX_ATTRIBUTE_LEN} letters, digits, `_`, `-` or `.`"
                ));
            }
            if !seen.insert(name) {
                return Err(format!(
                    "consent names `{name}` twice (in require and exclude, every member would be left out)"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// Who receives the report email.
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
        if let Some(name) = &self.source.headers_secret {
            if !is_secret_name(name) {
                return invalid(
                    "source.headers_secret is not a secret's name: use letters, digits, `-`, `_` or `.`, not starting with `.`",
                );
            }
        }
        self.consent().validate().map_err(JobError::Invalid)?;
        if let Some(lookalike) = &self.lookalike {
            lookalike.validate().map_err(JobError::Invalid)?;
            if self.dry_run {
                return invalid(
                    "a dry run creates no audience, so no lookalike: drop `lookalike` or `dry_run`",
                );
            }
        }
        Ok(())
    }

    /// The consent rule this job runs with (its own, or the default).
    pub fn consent(&self) -> Consent {
        self.consent.clone().unwrap_or_default()
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

/// A name the producer may look up in its source secrets directory: one file name (a Kubernetes
/// Secret's key), never a path (`/`, `..`) nor one of the mount's own hidden entries (`..data`).
fn is_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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
                "unknown format",
                Box::new(|v| v["source"]["format"] = serde_json::json!("parquet")),
                "unknown variant `parquet`",
            ),
            (
                "unknown compression",
                Box::new(|v| v["source"]["compression"] = serde_json::json!("zstd")),
                "unknown variant `zstd`",
            ),
            (
                "headers secret as a path",
                Box::new(|v| v["source"]["headers_secret"] = serde_json::json!("../etc/passwd")),
                "headers_secret",
            ),
            (
                "headers secret as a mount's hidden entry",
                Box::new(|v| v["source"]["headers_secret"] = serde_json::json!("..data")),
                "headers_secret",
            ),
            (
                "headers in clear",
                Box::new(|v| v["source"]["headers"] = serde_json::json!({"Authorization": "x"})),
                "unknown field `headers`",
            ),
            (
                "consent attribute with a colon",
                Box::new(|v| v["consent"] = serde_json::json!({"require": ["a:b"]})),
                "consent attribute `a:b`",
            ),
            (
                "consent attribute required and excluded",
                Box::new(|v| {
                    v["consent"] = serde_json::json!({"require": ["x"], "exclude": ["x"]})
                }),
                "names `x` twice",
            ),
            (
                "lookalike ratio out of range",
                Box::new(|v| {
                    v["lookalike"] = serde_json::json!({"countries": ["US"], "ratio": 0.5})
                }),
                "outside Meta's 0.01 to 0.20",
            ),
            (
                "lookalike country lowercase",
                Box::new(|v| {
                    v["lookalike"] = serde_json::json!({"countries": ["us"], "ratio": 0.01})
                }),
                "`us` is not an ISO 3166-1 alpha-2 code",
            ),
            (
                "lookalike in a dry run",
                Box::new(|v| {
                    v["lookalike"] = serde_json::json!({"countries": ["US"], "ratio": 0.01});
                    v["dry_run"] = serde_json::json!(true);
                }),
                "no lookalike",
            ),
            (
                "consent with an unknown key",
                Box::new(|v| v["consent"] = serde_json::json!({"requires": ["x"]})),
                "unknown field `requires`",
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
    fn consent_defaults_to_excluding_do_not_sell_or_share() {
        let job = parse(valid()).unwrap();
        assert_eq!(job.consent, None);
        assert_eq!(
            job.consent().attributes().collect::<Vec<_>>(),
            vec![DO_NOT_SELL_OR_SHARE]
        );
        let mut v = valid();
        v["consent"] = serde_json::json!({"require": ["ads_tracking_enabled"]});
        let job = parse(v).unwrap();
        assert_eq!(
            job.consent().attributes().collect::<Vec<_>>(),
            vec!["ads_tracking_enabled"],
            "a consent block replaces the default"
        );
        // A job without the new keys serializes as before (its stored copy compares equal).
        let json = serde_json::to_value(parse(valid()).unwrap()).unwrap();
        assert!(json.get("consent").is_none() && json.get("dry_run").is_none());
    }

    #[test]
    fn csv_gzip_and_a_headers_secret_are_accepted_and_an_untyped_job_serializes_as_before() {
        let mut v = valid();
        v["source"] = serde_json::json!({
            "url": "https://exports.example.com/seg-7.csv.gz",
            "format": "csv",
            "compression": "gzip",
            "headers_secret": "segments-api"
        });
        let job = parse(v).expect("csv, gzip and a secret's name are valid");
        assert_eq!(job.source.format, SourceFormat::Csv);
        assert_eq!(job.source.compression, Some(Compression::Gzip));
        assert_eq!(job.source.headers_secret.as_deref(), Some("segments-api"));
        let mut v = valid();
        v["source"]["compression"] = serde_json::json!("none");
        assert_eq!(
            parse(v).unwrap().source.compression,
            Some(Compression::None)
        );
        // A stored job is compared byte for byte with a redelivered copy: without the new keys,
        // the source serializes exactly as it did when `compression` was untyped.
        let json = serde_json::to_value(parse(valid()).unwrap()).unwrap();
        assert_eq!(
            json["source"],
            serde_json::json!({"url": "file:///tmp/x.ndjson", "format": "ndjson", "compression": null})
        );
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
