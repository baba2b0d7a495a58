//! A deterministic (seeded) generator of segment files with realistic mess: mixed case, stray
//! whitespace, phone numbers in many notations, pre-hashed emails, invalid and missing values,
//! duplicates, numbers where strings were expected, and a few lines that are not records. It
//! streams to disk, so large segments never sit in memory, and it records, per field, what a
//! correct exporter must send: computed here from the canonical values it started from, never
//! with the worker's code.

use audience_export_core::Field;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::path::Path;

/// What one member's value of one field must become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    Missing,
    Invalid,
    /// Sent as this string; `prehashed` when the input was already a hash.
    Sent {
        entry: String,
        prehashed: bool,
    },
}

/// What the generator wrote.
#[derive(Debug, Default)]
pub struct Generated {
    pub members: u64,
    pub malformed_lines: u64,
    /// Per field, in member order.
    pub expect: BTreeMap<Field, Vec<Expect>>,
}

/// The figures a correct export must report for one field, for a given shard size.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FieldExpectation {
    pub with_value: u64,
    pub missing: u64,
    pub invalid: u64,
    pub prehashed: u64,
    pub duplicates: u64,
    pub uploaded: u64,
    /// Entry → number of shards that carry it (duplicates inside one shard are sent once).
    pub entries: HashMap<String, u32>,
}

impl Generated {
    /// Models Meta's rule and ours independently of the worker: values with a value are cut into
    /// shards of `shard_size` in member order; inside a shard each entry is sent once.
    pub fn expectation(&self, field: Field, shard_size: usize) -> FieldExpectation {
        let mut out = FieldExpectation::default();
        let values: Vec<&Expect> = self.expect[&field]
            .iter()
            .filter(|e| **e != Expect::Missing)
            .collect();
        out.missing = self.expect[&field].len() as u64 - values.len() as u64;
        out.with_value = values.len() as u64;
        for shard in values.chunks(shard_size) {
            let mut seen = HashSet::new();
            for e in shard {
                match e {
                    Expect::Invalid => out.invalid += 1,
                    Expect::Sent { entry, prehashed } => {
                        if *prehashed {
                            out.prehashed += 1;
                        }
                        if seen.insert(entry.clone()) {
                            *out.entries.entry(entry.clone()).or_default() += 1;
                            out.uploaded += 1;
                        } else {
                            out.duplicates += 1;
                        }
                    }
                    Expect::Missing => unreachable!("filtered above"),
                }
            }
        }
        out
    }
}

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A number that exists in its country's numbering plan, as (country code, national number),
/// from blocks that libphonenumber's metadata marks wholly valid: US geographic lines (real area
/// codes, exchange [2-9]XX not N11), UK mobiles (074[0-46-9]), French mobiles (06[0-24-8]),
/// German mobiles (0151) and Japanese mobiles (090[1-9]).
fn valid_mobile_or_line(rng: &mut StdRng) -> (&'static str, String) {
    let digits = |rng: &mut StdRng, n: usize| -> String {
        (0..n)
            .map(|_| char::from(b'0' + rng.gen_range(0..10)))
            .collect()
    };
    let pick = |rng: &mut StdRng, from: &[&'static str]| from[rng.gen_range(0..from.len())];
    match rng.gen_range(0..5) {
        0 => {
            let area = pick(
                rng,
                &["212", "415", "646", "310", "312", "617", "202", "305"],
            );
            let mut exchange = format!("{}{}", rng.gen_range(2..10), digits(rng, 2));
            if exchange.ends_with("11") {
                exchange.replace_range(2..3, "2");
            }
            ("1", format!("{area}{exchange}{}", digits(rng, 4)))
        }
        1 => {
            let block = pick(rng, &["0", "1", "2", "3", "4", "6", "7", "8", "9"]);
            ("44", format!("74{block}{}", digits(rng, 7)))
        }
        2 => {
            let block = pick(rng, &["0", "1", "2", "4", "5", "6", "7", "8"]);
            ("33", format!("6{block}{}", digits(rng, 7)))
        }
        3 => ("49", format!("151{}", digits(rng, 8))),
        _ => (
            "81",
            format!("90{}{}", rng.gen_range(1..10), digits(rng, 7)),
        ),
    }
}
const DOMAINS: [&str; 5] = [
    "example.com",
    "Example.org",
    "mail.example.net",
    "EXAMPLE.io",
    "exämple.de",
];

/// Writes `members` members (plus about 0.1% malformed lines) to `path` as NDJSON.
pub fn generate(path: &Path, members: u64, seed: u64) -> std::io::Result<Generated> {
    write_members(std::fs::File::create(path)?, members, seed, true)
}

/// The same members, streamed to any writer (a FIFO for a benchmark) without keeping the
/// expectations: memory stays flat whatever `members` is.
pub fn stream(out: impl Write, members: u64, seed: u64) -> std::io::Result<()> {
    write_members(out, members, seed, false).map(|_| ())
}

fn write_members(
    out: impl Write,
    members: u64,
    seed: u64,
    keep: bool,
) -> std::io::Result<Generated> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut gen = Generated {
        members,
        ..Generated::default()
    };
    for f in Field::ALL {
        gen.expect.insert(
            f,
            Vec::with_capacity(if keep { members as usize } else { 0 }),
        );
    }
    let mut previous_email: Option<(String, String)> = None;
    for i in 0..members {
        if rng.gen_ratio(1, 1000) {
            writeln!(out, "{{\"external_id\": \"broken-{i}\", \"email\": ")?;
            gen.malformed_lines += 1;
        }
        let mut record = serde_json::Map::new();
        record.insert("external_id".into(), format!("u{i}").into());
        record.insert("ads_tracking_enabled".into(), rng.gen_bool(0.8).into());

        // Email: canonical lowercase, written messily.
        let (email_json, email_expect) = match rng.gen_range(0..100) {
            0..=5 => (None, Expect::Missing),
            6..=7 => (
                Some(serde_json::Value::String("   ".into())),
                Expect::Missing,
            ),
            8..=10 => (Some(format!("not-an-email-{i}").into()), Expect::Invalid),
            11..=12 => {
                let canonical = format!("hashed{i}@example.com");
                let h = sha(&canonical);
                (
                    Some(h.to_uppercase().into()),
                    Expect::Sent {
                        entry: h,
                        prehashed: true,
                    },
                )
            }
            13..=15 if previous_email.is_some() => {
                let (raw, entry) = previous_email.clone().expect("checked");
                (
                    Some(format!("  {}", raw.to_uppercase()).into()),
                    Expect::Sent {
                        entry,
                        prehashed: false,
                    },
                )
            }
            _ => {
                let domain = DOMAINS[rng.gen_range(0..DOMAINS.len())];
                let local = format!("user{i}.{}", rng.gen_range(0..1000));
                let canonical = format!("{local}@{}", domain.to_lowercase());
                let raw = messy_case(&mut rng, &format!("{local}@{domain}"));
                let raw = pad(&mut rng, &raw);
                let entry = sha(&canonical);
                previous_email = Some((raw.trim().to_owned(), entry.clone()));
                (
                    Some(raw.into()),
                    Expect::Sent {
                        entry,
                        prehashed: false,
                    },
                )
            }
        };
        if let Some(v) = email_json {
            record.insert("email".into(), v);
        }
        if keep {
            gen.expect
                .get_mut(&Field::Email)
                .expect("seeded")
                .push(email_expect);
        }

        // Phone: country code + national number, in several notations.
        let (phone_json, phone_expect) = match rng.gen_range(0..100) {
            0..=9 => (None, Expect::Missing),
            10..=11 => (Some(serde_json::Value::Null), Expect::Missing),
            12..=14 => (
                Some(["n/a", "123", "call me"][rng.gen_range(0..3)].into()),
                Expect::Invalid,
            ),
            _ => {
                let (cc, national) = valid_mobile_or_line(&mut rng);
                let canonical = format!("{cc}{national}");
                let (a, b, c) = (&national[..3], &national[3..6], &national[6..]);
                let raw: serde_json::Value = match (cc, rng.gen_range(0..8)) {
                    // The job's default country is the US: national notations must get +1.
                    ("1", 0) => format!("({a}) {b}-{c}").into(),
                    ("1", 1) => format!("{a}.{b}.{c} ext. {}", rng.gen_range(1..999)).into(),
                    (_, 0 | 1) => format!("011 {cc} {a} {b} {c}").into(),
                    (_, 2) => format!("+{cc} ({a}) {b}-{c}").into(),
                    (_, 3) => format!("00{cc} {a} {b} {c}").into(),
                    (_, 4) => format!(" +{cc}.{a}.{b}.{c} ").into(),
                    (_, 5) => {
                        serde_json::Value::Number(canonical.parse::<u64>().expect("digits").into())
                    }
                    _ => format!("+{canonical}").into(),
                };
                // A bare number is read as national: only US numbers keep their meaning.
                let raw = match raw {
                    serde_json::Value::Number(_) if cc != "1" => format!("+{canonical}").into(),
                    other => other,
                };
                (
                    Some(raw),
                    Expect::Sent {
                        entry: sha(&canonical),
                        prehashed: false,
                    },
                )
            }
        };
        if let Some(v) = phone_json {
            record.insert("phone".into(), v);
        }
        if keep {
            gen.expect
                .get_mut(&Field::Phone)
                .expect("seeded")
                .push(phone_expect);
        }

        // Device id: IDFA or Android advertising id, under `idfa` or `madid`.
        let (madid_json, madid_expect) = match rng.gen_range(0..100) {
            0..=29 => (None, Expect::Missing),
            30..=31 => (
                Some("00000000-0000-0000-0000-000000000000".to_owned()),
                Expect::Invalid,
            ),
            32..=33 => (Some(format!("device-{i}")), Expect::Invalid),
            _ => {
                let bytes: [u8; 16] = rng.gen();
                let h = hex::encode(bytes);
                let canonical = format!(
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                );
                let raw = if rng.gen_bool(0.5) {
                    canonical.to_uppercase()
                } else {
                    format!(" {canonical}")
                };
                (
                    Some(raw),
                    Expect::Sent {
                        entry: canonical,
                        prehashed: false,
                    },
                )
            }
        };
        if let Some(v) = madid_json {
            let key = if i % 2 == 0 { "idfa" } else { "madid" };
            record.insert(key.into(), v.into());
        }
        if keep {
            gen.expect
                .get_mut(&Field::Madid)
                .expect("seeded")
                .push(madid_expect);
        }

        serde_json::to_writer(&mut out, &record)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(gen)
}

fn messy_case(rng: &mut StdRng, s: &str) -> String {
    s.chars()
        .map(|c| {
            if rng.gen_ratio(1, 4) {
                c.to_uppercase().next().unwrap_or(c)
            } else {
                c
            }
        })
        .collect()
}

fn pad(rng: &mut StdRng, s: &str) -> String {
    match rng.gen_range(0..6) {
        0 => format!("  {s}"),
        1 => format!("{s}\t"),
        2 => format!("\u{00a0}{s} "),
        _ => s.to_owned(),
    }
}
