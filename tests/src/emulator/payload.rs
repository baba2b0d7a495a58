//! An add- or remove-users payload and Meta's checks on it: parsing single- and multi-key
//! payloads (borrowing from the request), the request-level refusals (more than 10,000 records,
//! no records, an unknown schema key: code 100) and the per-record validation counted in
//! `num_invalid_entries` (`*_SHA256` must be 64 lowercase hex, a MADID must look like a device
//! id). It runs on the request's own task, before the state's lock is taken, and never touches
//! the state: applying the accepted rows is `audiences.rs`'s job.

use super::failure::GraphFailure;
use serde::Deserialize;
use serde_json::{json, Value};
use std::borrow::Cow;

/// The schema keys Meta accepts.
const KNOWN_KEYS: [&str; 17] = [
    "EMAIL",
    "EMAIL_SHA256",
    "PHONE",
    "PHONE_SHA256",
    "MOBILE_ADVERTISER_ID",
    "MADID",
    "EXTERN_ID",
    "FN",
    "LN",
    "FI",
    "CT",
    "ST",
    "ZIP",
    "COUNTRY",
    "GEN",
    "DOBY",
    "DOBM",
];

/// Lowercase hex digits, as a lookup table by byte.
const LOWER_HEX: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = matches!(b as u8, b'0'..=b'9' | b'a'..=b'f');
        b += 1;
    }
    table
};

/// Meta's per-record checks: hashed keys must be SHA-256 hex; MADIDs must look like a device id.
fn valid_entry(key: &str, value: &str) -> bool {
    match key {
        "MOBILE_ADVERTISER_ID" | "MADID" => {
            value.len() == 36 && value.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        }
        "EXTERN_ID" => !value.is_empty(),
        // A branch-free fold over a table: this check reads every byte of every upload.
        _ => {
            value.len() == 64
                && value
                    .bytes()
                    .fold(true, |ok, b| ok & LOWER_HEX[usize::from(b)])
        }
    }
}

/// An add- or remove-users payload, parsed once and borrowing from the request where it can:
/// 10,000 entries per request make allocation the emulator's main cost.
pub(super) struct Payload<'a> {
    pub keys: Vec<Cow<'a, str>>,
    pub rows: Rows<'a>,
}

pub(super) enum Rows<'a> {
    Single(Vec<Cow<'a, str>>),
    Multi(Vec<Vec<Cow<'a, str>>>),
}

#[derive(Deserialize)]
struct SingleKey<'a> {
    #[serde(borrow)]
    schema: Cow<'a, str>,
    #[serde(borrow)]
    data: Vec<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct MultiKey<'a> {
    #[serde(borrow)]
    schema: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    data: Vec<Vec<Cow<'a, str>>>,
}

/// A payload after Meta's checks: the request-level refusal if any, and per row whether it is
/// valid, with the invalid count and samples.
pub(super) struct Checked<'a> {
    pub payload: Payload<'a>,
    pub refusal: Option<GraphFailure>,
    pub valid: Vec<bool>,
    pub invalid: u64,
    pub samples: serde_json::Map<String, Value>,
}

impl Checked<'_> {
    /// The valid rows as stored entries (multi-key rows joined with `|`).
    pub(super) fn accepted(&self) -> Vec<String> {
        let keep = |i: usize| self.valid.get(i).copied().unwrap_or(false);
        match &self.payload.rows {
            Rows::Single(values) => values
                .iter()
                .enumerate()
                .filter(|(i, _)| keep(*i))
                .map(|(_, v)| v.to_string())
                .collect(),
            Rows::Multi(rows) => rows
                .iter()
                .enumerate()
                .filter(|(i, _)| keep(*i))
                .map(|(_, r)| r.join("|"))
                .collect(),
        }
    }
}

impl<'a> Payload<'a> {
    /// Meta's request- and record-level checks, done without the emulator's lock.
    pub fn check(self) -> Checked<'a> {
        let received = self.len();
        let refusal = if received > 10_000 {
            Some(GraphFailure::too_many_entries(received))
        } else if received == 0 {
            Some(GraphFailure::empty_data())
        } else {
            self.keys
                .iter()
                .find(|k| !KNOWN_KEYS.contains(&k.as_ref()))
                .map(|k| GraphFailure::invalid_schema_key(k))
        };
        let mut checked = Checked {
            valid: Vec::new(),
            invalid: 0,
            samples: serde_json::Map::new(),
            refusal,
            payload: self,
        };
        if checked.refusal.is_some() {
            return checked;
        }
        let keys = &checked.payload.keys;
        let verdicts: Vec<(bool, Option<String>)> = match &checked.payload.rows {
            Rows::Single(values) => values
                .iter()
                .map(|v| {
                    let ok = !v.is_empty() && valid_entry(&keys[0], v);
                    (ok, (!ok).then(|| v.to_string()))
                })
                .collect(),
            Rows::Multi(rows) => rows
                .iter()
                .map(|row| {
                    let ok = row.len() == keys.len()
                        && keys
                            .iter()
                            .zip(row)
                            .all(|(k, v)| v.is_empty() || valid_entry(k, v))
                        && row.iter().any(|v| !v.is_empty());
                    (ok, (!ok).then(|| format!("{row:?}")))
                })
                .collect(),
        };
        for (ok, sample) in verdicts {
            checked.valid.push(ok);
            if let Some(sample) = sample {
                checked.invalid += 1;
                if checked.samples.len() < 10 {
                    checked.samples.insert(sample, json!("Invalid format"));
                }
            }
        }
        checked
    }

    /// Single-key (`"schema": "EMAIL_SHA256"`) or multi-key (`"schema": [...]`) payloads. Entries
    /// that are not strings make the whole payload invalid (code 100).
    pub fn parse(raw: &'a str) -> Result<Payload<'a>, GraphFailure> {
        if let Ok(single) = serde_json::from_str::<SingleKey<'a>>(raw) {
            return Ok(Payload {
                keys: vec![single.schema],
                rows: Rows::Single(single.data),
            });
        }
        let multi: MultiKey<'a> =
            serde_json::from_str(raw).map_err(|_| GraphFailure::bad_param("payload"))?;
        Ok(Payload {
            keys: multi.schema,
            rows: Rows::Multi(multi.data),
        })
    }

    pub fn len(&self) -> usize {
        match &self.rows {
            Rows::Single(v) => v.len(),
            Rows::Multi(v) => v.len(),
        }
    }
}
