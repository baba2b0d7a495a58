//! JSON Schemas of the two contracts the upstream platform touches: the export job it publishes
//! (`job`) and the events it may bind to (`event`). They are generated from the types with
//! `schemars`, so serde's attributes stay the authority (`deny_unknown_fields` becomes
//! `additionalProperties: false`, `tag = "type"` a `const` per event, renames the names on the
//! wire); the ids' parse rules are stated here as patterns, beside the test that holds them to
//! the parsers. The rendered schemas are checked in as `docs/schemas/*.schema.json`, and a test
//! here fails when they differ from what the types generate (`just schemas` rewrites them).
//! Nothing here reads or writes a file outside that test.

use super::{AdAccountId, Event, ExportId, ExportJob, PhoneCountry, WorkspaceId};
use schemars::generate::SchemaSettings;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use std::borrow::Cow;

/// A checked-in file, under `docs/schemas/`, and the schema it holds.
pub type SchemaFile = (&'static str, fn() -> Schema);

/// Every checked-in schema.
pub const FILES: [SchemaFile; 2] = [("job.schema.json", job), ("event.schema.json", event)];

/// The export job as the producer reads it: serde's deserializing side, so a key with a default
/// may be left out.
pub fn job() -> Schema {
    SchemaSettings::draft2020_12()
        .for_deserialize()
        .into_generator()
        .into_root_schema_for::<ExportJob>()
}

/// Every event on the `{ns}.events` exchange, one `oneOf` branch per routing key (its `type`),
/// as the fleet writes them: serde's serializing side, so a key that is always written is
/// required even where the reader would default it.
pub fn event() -> Schema {
    SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<Event>()
}

/// Pretty-printed, every object's keys sorted, ending in a newline: the same text whatever order
/// the map type of this build's `serde_json` keeps.
pub fn render(schema: &Schema) -> String {
    fn sorted(value: &serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                serde_json::Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(sorted).collect())
            }
            other => other.clone(),
        }
    }
    // A `Value` always serializes: its keys are strings.
    let mut text =
        serde_json::to_string_pretty(&sorted(schema.as_value())).expect("a JSON value serializes");
    text.push('\n');
    text
}

/// What `char::is_whitespace`, and so `str::trim`, takes for whitespace (Unicode's White_Space),
/// as the inside of a regex class. Spelt out because `\s` means something else in ECMA 262
/// (which adds U+FEFF and drops U+0085), Python and Rust. A macro so `concat!` can use it.
macro_rules! whitespace {
    () => {
        r"\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    };
}
const WHITESPACE: &str = whitespace!();

/// A string that is not blank (`!s.trim().is_empty()`): one character that is not whitespace.
pub(super) const NON_BLANK: &str = concat!("[^", whitespace!(), "]");

/// `ids::is_identifier`: 1-128 of letters, digits, `-`, `_`, `.`.
const IDENTIFIER_PATTERN: &str = "^[A-Za-z0-9._-]{1,128}$";

/// `AdAccountId::parse`: digits (at most 32), optionally after `act_`, surrounding whitespace
/// trimmed.
fn ad_account_pattern() -> String {
    format!("^[{WHITESPACE}]*(?:act_)?[0-9]{{1,32}}[{WHITESPACE}]*$")
}

/// `PhoneCountry::parse`: the two-letter regions libphonenumber has a numbering plan for, in
/// any case, surrounding whitespace trimmed. The regions are read from the parser itself (every
/// pair of letters it accepts), grouped by first letter: `[Aa][CcDd...]|[Bb][...]`.
fn phone_country_pattern() -> String {
    let both = |c: u8| format!("{}{}", c as char, c.to_ascii_lowercase() as char);
    let groups: Vec<String> = (b'A'..=b'Z')
        .filter_map(|first| {
            let seconds: String = (b'A'..=b'Z')
                .filter(|&second| {
                    let code = [first, second];
                    std::str::from_utf8(&code).is_ok_and(|s| PhoneCountry::parse(s).is_ok())
                })
                .map(both)
                .collect();
            (!seconds.is_empty()).then(|| format!("[{}][{seconds}]", both(first)))
        })
        .collect();
    format!("^[{WHITESPACE}]*(?:{})[{WHITESPACE}]*$", groups.join("|"))
}

/// An id of the upstream platform: its own name, the identifier rule, and what it is.
fn identifier_schema(description: &str, example: &str) -> Schema {
    json_schema!({
        "type": "string",
        "description": description,
        "pattern": IDENTIFIER_PATTERN,
        "minLength": 1,
        "maxLength": 128,
        "examples": [example],
    })
}

impl JsonSchema for ExportId {
    fn schema_name() -> Cow<'static, str> {
        "ExportId".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        identifier_schema(
            "An export's id, chosen by the upstream platform: the job's idempotency key (a job \
             delivered twice runs once). 1-128 letters, digits, `-`, `_` or `.`.",
            "exp-2026-11-29-0001",
        )
    }
}

impl JsonSchema for WorkspaceId {
    fn schema_name() -> Cow<'static, str> {
        "WorkspaceId".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        identifier_schema(
            "A workspace of the upstream platform, the owner of one Facebook connection. 1-128 \
             letters, digits, `-`, `_` or `.`.",
            "ws-42",
        )
    }
}

impl JsonSchema for AdAccountId {
    fn schema_name() -> Cow<'static, str> {
        "AdAccountId".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A Meta ad account: its digits (at most 32), with or without the \
                `act_` prefix; surrounding whitespace is ignored. The fleet writes the digits \
                alone.",
            "pattern": ad_account_pattern(),
            "examples": ["act_1234567890", "1234567890"],
        })
    }
}

impl JsonSchema for PhoneCountry {
    fn schema_name() -> Cow<'static, str> {
        "PhoneCountry".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "An ISO 3166-1 alpha-2 country code that libphonenumber has a \
                numbering plan for, in any case (surrounding whitespace is ignored): the country \
                of phone numbers written without their country code. The fleet writes it \
                uppercase.",
            "pattern": phone_country_pattern(),
            "examples": ["US", "GB"],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A validator for `T`'s schema alone.
    fn validator<T: JsonSchema>() -> jsonschema::Validator {
        let schema = schemars::schema_for!(T);
        jsonschema::validator_for(schema.as_value()).expect("a valid JSON Schema")
    }

    /// For each value, the schema and `parse` give the same verdict.
    fn agree<T: JsonSchema>(values: &[&str], parse: impl Fn(&str) -> bool) {
        let schema = validator::<T>();
        for value in values {
            let json = serde_json::Value::from(*value);
            assert_eq!(
                schema.is_valid(&json),
                parse(value),
                "{} {value:?}: the schema says {}, the parser {}",
                T::schema_name(),
                schema.is_valid(&json),
                parse(value)
            );
        }
    }

    #[test]
    fn the_whitespace_class_is_what_trim_trims() {
        let schema = jsonschema::validator_for(&serde_json::json!({
            "type": "string",
            "pattern": format!("^[{WHITESPACE}]$"),
        }))
        .expect("a valid JSON Schema");
        for c in (0..=0x3100)
            .chain([0xfeff, 0x1_f600])
            .filter_map(char::from_u32)
        {
            assert_eq!(
                schema.is_valid(&serde_json::Value::from(c.to_string())),
                c.is_whitespace(),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn non_blank_is_what_trim_leaves_something_of() {
        let schema = jsonschema::validator_for(&serde_json::json!({
            "type": "string",
            "pattern": NON_BLANK,
        }))
        .expect("a valid JSON Schema");
        for s in [
            "a",
            " a ",
            "\u{a0}\u{3000}x",
            "\u{feff}",
            "",
            " ",
            "\t\n\u{85}\u{2028}",
        ] {
            assert_eq!(
                schema.is_valid(&serde_json::Value::from(s)),
                !s.trim().is_empty(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn identifier_patterns_agree_with_the_parsers() {
        let long = "x".repeat(128);
        let too_long = "x".repeat(129);
        let values = [
            "exp-1.a_B",
            "a",
            long.as_str(),
            too_long.as_str(),
            "",
            "a b",
            " a",
            "a\n",
            "a:b",
            "a/b",
            "a{b}",
            "ü",
        ];
        agree::<ExportId>(&values, |s| ExportId::parse(s).is_ok());
        agree::<WorkspaceId>(&values, |s| WorkspaceId::parse(s).is_ok());
    }

    #[test]
    fn the_ad_account_pattern_agrees_with_the_parser() {
        let (max, too_long) = ("1".repeat(32), "1".repeat(33));
        agree::<AdAccountId>(
            &[
                "1234",
                "act_1234",
                " act_1234\n",
                "\u{a0}1\u{3000}",
                "\u{85}1",
                max.as_str(),
                too_long.as_str(),
                "\u{feff}1",
                "",
                " ",
                "act_",
                "act_x1",
                "12a",
                "act_act_1",
                "act_ 1",
                "ACT_1",
                "-1",
                "1.5",
                "\u{661}\u{662}",
            ],
            |s| AdAccountId::parse(s).is_ok(),
        );
    }

    #[test]
    fn the_phone_country_pattern_agrees_with_the_parser() {
        let mut values: Vec<String> = [
            "US",
            "us",
            "uS",
            " gb ",
            "\tDE\n",
            "XX",
            "USA",
            "",
            "1",
            "u",
            "U S",
            "\u{feff}US",
        ]
        .map(str::to_owned)
        .to_vec();
        // Every pair of letters, in each mix of cases.
        for first in b'A'..=b'Z' {
            for second in b'A'..=b'Z' {
                for (a, b) in [
                    (first, second),
                    (first.to_ascii_lowercase(), second),
                    (first, second.to_ascii_lowercase()),
                ] {
                    values.push(String::from_utf8(vec![a, b]).expect("ASCII letters"));
                }
            }
        }
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        agree::<PhoneCountry>(&values, |s| PhoneCountry::parse(s).is_ok());
    }

    /// What CI runs: the checked-in schemas are what the types generate. `UPDATE_SCHEMAS=1`
    /// rewrites them instead (`just schemas`).
    #[test]
    fn checked_in_schemas_match_the_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/schemas");
        let update = std::env::var_os("UPDATE_SCHEMAS").is_some_and(|v| v == "1");
        let mut stale = Vec::new();
        for (name, schema) in FILES {
            let path = dir.join(name);
            let want = render(&schema());
            if update {
                std::fs::create_dir_all(&dir).expect("creating docs/schemas");
                std::fs::write(&path, &want).expect("writing a schema");
                continue;
            }
            let Ok(have) = std::fs::read_to_string(&path) else {
                stale.push(format!("docs/schemas/{name} (missing)"));
                continue;
            };
            if have != want {
                let line = have
                    .lines()
                    .zip(want.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or_else(|| have.lines().count().min(want.lines().count()))
                    + 1;
                stale.push(format!(
                    "docs/schemas/{name} (first difference at line {line})"
                ));
            }
        }
        assert!(
            stale.is_empty(),
            "the checked-in JSON Schemas differ from what the contract types generate: {}.\n\
             Regenerate them with `just schemas` (UPDATE_SCHEMAS=1 cargo test -p \
             audience-export-core --lib contract::schema) and commit docs/schemas/.",
            stale.join(", ")
        );
    }
}
