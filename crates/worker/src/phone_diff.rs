//! The phone fast path against the `phonenumber` crate: generated numbers of many countries in
//! every notation a segment carries, each normalized both ways. Used by this crate's unit test
//! (a million values, seed 15) and by `ae-bench phone-diff` (any count and seed, in release).
//! Never used by the worker itself.
//!
//! Numbers start from each region's own example numbers (the crate's metadata), perturbed (last
//! digits redrawn, a digit dropped or added) so that valid, invalid and impossible numbers all
//! occur; then they are written out nationally (with and without the national prefix), with `+`,
//! with an international prefix (`00`, `011`, the default country's own), with punctuation,
//! parentheses, extensions, leading zeros, as a JSON number, and in forms that are not numbers
//! at all. The default country is the number's own, another one, or none.

use crate::normalize::{phone_with_crate, Invalid, Rules};
use crate::phone_fast::{self, Fast};
use audience_export_core::contract::PhoneCountry;
use phonenumber::metadata::{Metadata, DATABASE};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};

/// The regions numbers are drawn from: large markets, every region with a national prefix
/// transform rule, every country code shared by several regions, and the non-geographic codes.
pub const REGIONS: &[&str] = &[
    "US", "CA", "GB", "DE", "FR", "IT", "ES", "NL", "BE", "CH", "AT", "SE", "NO", "DK", "FI", "PL",
    "PT", "IE", "AU", "NZ", "JP", "KR", "CN", "IN", "BR", "MX", "AR", "CL", "CO", "PE", "ZA", "NG",
    "KE", "EG", "MA", "RU", "UA", "TR", "IL", "AE", "SA", "SG", "HK", "TW", "PH", "ID", "TH", "VN",
    "MY", "PK", "BD", "CZ", "GR", "HU", "RO", "IR", "KZ", "VA", "AX", "EH", "YT", "RE", "TA", "SH",
    "BQ", "CW", "BL", "MF", "GP", "SJ", "GG", "IM", "JE", "CC", "CX", "GA", "MG", "SM", "NF", "JM",
    "PR", "BS", "AG", "AI", "AS", "BB", "BM", "DM", "DO", "GD", "GU", "KN", "KY", "LC", "MP", "MS",
    "SX", "TC", "TT", "VC", "VG", "VI",
];

/// Country codes without a region ("001" in the metadata).
const NON_GEOGRAPHIC: &[u16] = &[800, 808, 870, 878, 881, 882, 883, 888, 979];

/// One generated value and the default country it is normalized with.
#[derive(Debug, Clone)]
pub struct Sample {
    pub value: String,
    pub default_country: Option<PhoneCountry>,
    pub notation: &'static str,
    /// The region (or `+code`) the number was drawn from.
    pub origin: String,
}

/// A value the two paths normalized differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    pub value: String,
    pub default_country: Option<String>,
    pub fast: Result<String, Invalid>,
    pub reference: Result<String, Invalid>,
}

/// What a differential run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub total: u64,
    /// Answered by the fast path (the rest were deferred to the crate).
    pub fast: u64,
    /// Of those, valid numbers.
    pub fast_valid: u64,
    /// Per notation: (values, answered by the fast path).
    pub notations: BTreeMap<&'static str, (u64, u64)>,
    pub origins: BTreeSet<String>,
    pub disagreements: Vec<Disagreement>,
    /// All of them, though only the first few are kept.
    pub disagreement_count: u64,
}

impl Report {
    fn add(&mut self, sample: &Sample, rules: &Rules) {
        let value = sample.value.trim();
        self.total += 1;
        self.origins.insert(sample.origin.clone());
        let counts = self.notations.entry(sample.notation).or_default();
        counts.0 += 1;
        if value.is_empty() {
            // `normalize` stops at "empty" before either path.
            return;
        }
        let mut out = Vec::new();
        let fast = match phone_fast::e164(value, rules.default_country, &mut out) {
            Fast::Defer => return,
            Fast::Done(result) => {
                result.map(|()| String::from_utf8(out).expect("E.164 digits are ASCII"))
            }
        };
        counts.1 += 1;
        self.fast += 1;
        self.fast_valid += u64::from(fast.is_ok());
        let reference = phone_with_crate(value, rules);
        if fast != reference {
            self.disagreement_count += 1;
            if self.disagreements.len() < 20 {
                self.disagreements.push(Disagreement {
                    value: value.to_owned(),
                    default_country: sample.default_country.map(|c| c.as_str().to_owned()),
                    fast,
                    reference,
                });
            }
        }
    }

    /// Counts per notation, on a few lines.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} values from {} regions and codes: {} answered by the fast path ({:.1}%), {} of them valid; {} disagreements",
            self.total,
            self.origins.len(),
            self.fast,
            100.0 * self.fast_share(),
            self.fast_valid,
            self.disagreement_count
        );
        for (notation, (n, fast)) in &self.notations {
            out.push_str(&format!(
                "\n  {notation:<16} {n:>9} values, {:>5.1}% fast",
                100.0 * *fast as f64 / (*n).max(1) as f64
            ));
        }
        out
    }

    /// Share of the values the fast path answered.
    pub fn fast_share(&self) -> f64 {
        self.fast as f64 / self.total.max(1) as f64
    }
}

/// Generates `count` values from `seed` and compares the two paths on each.
pub fn run(count: usize, seed: u64) -> Report {
    let mut report = Report::default();
    for sample in Samples::new(seed).take(count) {
        let rules = Rules::new(sample.default_country);
        report.add(&sample, &rules);
    }
    report
}

/// An endless stream of samples, region after region in batches (the crate keeps only 100
/// compiled regexes: drawing every number from another region would make the reference crawl).
pub struct Samples {
    rng: StdRng,
    sources: Vec<Source>,
    countries: Vec<PhoneCountry>,
    batch: Vec<Sample>,
}

/// Where numbers are drawn from: one metadata entry.
struct Source {
    origin: String,
    meta: &'static Metadata,
    country: Option<PhoneCountry>,
    examples: Vec<String>,
}

const BATCH: usize = 500;

impl Samples {
    pub fn new(seed: u64) -> Samples {
        let mut sources = Vec::new();
        for id in REGIONS {
            if let Some(meta) = DATABASE.by_id(*id) {
                sources.push(Source::new(
                    id.to_string(),
                    meta,
                    PhoneCountry::parse(id).ok(),
                ));
            }
        }
        for code in NON_GEOGRAPHIC {
            for meta in DATABASE.by_code(code).unwrap_or_default() {
                sources.push(Source::new(format!("+{code}"), meta, None));
            }
        }
        sources.retain(|s| !s.examples.is_empty());
        let countries = sources.iter().filter_map(|s| s.country).collect();
        Samples {
            rng: StdRng::seed_from_u64(seed),
            sources,
            countries,
            batch: Vec::new(),
        }
    }

    fn refill(&mut self) {
        let source = self.sources.choose(&mut self.rng).expect("regions");
        // One default country per batch too, beside the number's own and none.
        let other = *self.countries.choose(&mut self.rng).expect("countries");
        let mut batch = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            let default_country = match self.rng.gen_range(0..20) {
                0..=11 => source.country.or(Some(other)),
                12..=14 => PhoneCountry::parse("US").ok(),
                15..=16 => None,
                _ => Some(other),
            };
            let (notation, value) = source.write(&mut self.rng, default_country);
            batch.push(Sample {
                value,
                default_country,
                notation,
                origin: source.origin.clone(),
            });
        }
        batch.reverse();
        self.batch = batch;
    }
}

impl Iterator for Samples {
    type Item = Sample;
    fn next(&mut self) -> Option<Sample> {
        if self.batch.is_empty() {
            self.refill();
        }
        self.batch.pop()
    }
}

impl Source {
    fn new(origin: String, meta: &'static Metadata, country: Option<PhoneCountry>) -> Source {
        let d = meta.descriptors();
        let examples = [
            d.fixed_line(),
            d.mobile(),
            d.toll_free(),
            d.premium_rate(),
            d.shared_cost(),
            d.personal_number(),
            d.voip(),
            d.pager(),
            d.uan(),
            d.voicemail(),
        ]
        .into_iter()
        .flatten()
        .filter_map(|d| d.example())
        .filter(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_owned)
        .collect();
        Source {
            origin,
            meta,
            country,
            examples,
        }
    }

    /// A national significant number: an example, mostly with its last digits redrawn,
    /// sometimes a digit shorter or longer, sometimes random digits.
    fn nsn(&self, rng: &mut StdRng) -> String {
        let mut digits: Vec<u8> = self
            .examples
            .choose(rng)
            .expect("examples")
            .bytes()
            .collect();
        match rng.gen_range(0..20) {
            0..=4 => {}
            5..=14 => {
                let redraw = rng.gen_range(1..=digits.len().min(5));
                let n = digits.len();
                for d in &mut digits[n - redraw..] {
                    *d = b'0' + rng.gen_range(0..10);
                }
            }
            15..=16 => {
                digits.pop();
            }
            17..=18 => digits.push(b'0' + rng.gen_range(0..10)),
            _ => {
                let len = rng.gen_range(1..=16);
                digits = (0..len).map(|_| b'0' + rng.gen_range(0..10)).collect();
            }
        }
        String::from_utf8(digits).expect("digits")
    }

    /// One written form of a number of this source, and the notation's name.
    fn write(&self, rng: &mut StdRng, default: Option<PhoneCountry>) -> (&'static str, String) {
        let nsn = self.nsn(rng);
        let cc = self.meta.country_code().to_string();
        let np = self.meta.national_prefix().unwrap_or("");
        let idd = default
            .and_then(|c| DATABASE.by_id(c.as_str()))
            .map(|m| {
                m.preferred_international_prefix()
                    .map(str::to_owned)
                    .or_else(|| {
                        m.international_prefix()
                            .map(|r| r.as_str().trim().to_owned())
                            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .unwrap_or_else(|| "00".to_owned())
            })
            .unwrap_or_else(|| "00".to_owned());
        let sep = *[" ", " ", "-", ".", "", "/", " - "]
            .choose(rng)
            .expect("separators");
        let grouped = group(rng, &nsn, sep);
        let notation = *[
            "national",
            "national",
            "national-parens",
            "nsn",
            "plus",
            "plus",
            "plus-compact",
            "plus-trunk",
            "plus-rfc",
            "idd",
            "idd-other",
            "idd-parens",
            "leading-zeros",
            "json",
            "extension",
            "trailing",
            "scrambled",
            "other",
        ]
        .choose(rng)
        .expect("notations");
        let value = match notation {
            "national" => format!("{np}{grouped}"),
            "national-parens" => {
                let split = rng.gen_range(1..=nsn.len().min(4));
                format!("({np}{}) {}", &nsn[..split], group(rng, &nsn[split..], sep))
            }
            "nsn" => grouped,
            "plus" => format!("+{cc}{}{grouped}", if sep.is_empty() { " " } else { sep }),
            "plus-compact" => format!("+{cc}{nsn}"),
            "plus-trunk" => format!("+{cc} ({np}) {grouped}"),
            "plus-rfc" => format!("+{cc}-{}", group(rng, &nsn, "-")),
            "idd" => format!("{idd}{sep}{cc}{sep}{grouped}"),
            "idd-other" => {
                let other = ["00", "011", "0011", "010", "001", "0000", "01"]
                    .choose(rng)
                    .expect("prefixes");
                format!("{other} {cc} {grouped}")
            }
            "idd-parens" => format!("({idd}) {cc} {grouped}"),
            "leading-zeros" => {
                let zeros = "0".repeat(rng.gen_range(1..=3));
                if rng.gen_bool(0.5) {
                    format!("{zeros}{cc}{nsn}")
                } else {
                    format!("{zeros}{grouped}")
                }
            }
            "json" => json_number(rng, &cc, np, &nsn),
            "extension" => {
                let base = match rng.gen_range(0..3) {
                    0 => format!("{np}{grouped}"),
                    1 => format!("+{cc} {grouped}"),
                    _ => format!("{idd} {cc} {grouped}"),
                };
                let ext = rng.gen_range(1..100_000).to_string();
                let mark = *[
                    " ext. ",
                    " ext ",
                    " x",
                    " x ",
                    " #",
                    ";ext=",
                    ", ext. ",
                    " extension ",
                    " anexo ",
                    " ext:",
                    "#",
                    " int ",
                ]
                .choose(rng)
                .expect("marks");
                format!("{base}{mark}{ext}")
            }
            "trailing" => {
                let tail = *[")", ".", " -", "/", " ()", "+", ".0"]
                    .choose(rng)
                    .expect("tails");
                let lead = *["", "(", " ", "-", "."].choose(rng).expect("leads");
                format!("{lead}{np}{grouped}{tail}")
            }
            "scrambled" => scrambled(rng, &cc, &nsn),
            _ => other(rng, &cc, &nsn, &grouped),
        };
        (notation, value)
    }
}

/// `digits` split into groups of 2 to 4, joined with `sep`.
fn group(rng: &mut StdRng, digits: &str, sep: &str) -> String {
    let mut out = String::new();
    let mut rest = digits;
    while !rest.is_empty() {
        let n = rng.gen_range(2..=4).min(rest.len());
        if !out.is_empty() {
            out.push_str(sep);
        }
        out.push_str(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

/// How a number stored in a JSON document as a number reaches the worker (`serde_json`'s
/// `Number::to_string`): its digits, sometimes as a float.
fn json_number(rng: &mut StdRng, cc: &str, np: &str, nsn: &str) -> String {
    let digits = match rng.gen_range(0..3) {
        0 => format!("{cc}{nsn}"),
        1 => nsn.to_owned(),
        _ => format!("{np}{nsn}").trim_start_matches('0').to_owned(),
    };
    let Ok(n) = digits.parse::<u64>() else {
        return digits;
    };
    match rng.gen_range(0..4) {
        0 => serde_json::Number::from_f64(n as f64)
            .map(|f| f.to_string())
            .unwrap_or(digits),
        _ => serde_json::Number::from(n).to_string(),
    }
}

/// The number's characters and the fast path's punctuation, shuffled together: the odd shapes
/// (pluses inside, separators only, RFC 3966 look-alikes, two digits) that parsers disagree on.
fn scrambled(rng: &mut StdRng, cc: &str, nsn: &str) -> String {
    let mut chars: Vec<char> = format!("{cc}{nsn}").chars().collect();
    chars.truncate(rng.gen_range(0..=chars.len()));
    for _ in 0..rng.gen_range(0..6) {
        let c = *['+', ' ', '-', '.', '(', ')', '/', '0', '0', '1']
            .choose(rng)
            .expect("characters");
        let at = rng.gen_range(0..=chars.len());
        chars.insert(at, c);
    }
    if rng.gen_bool(0.3) {
        chars.insert(0, '+');
    }
    chars.into_iter().collect()
}

/// Values that are not plain numbers: letters, other scripts, URIs, two numbers, tabs, short
/// and long digit runs.
fn other(rng: &mut StdRng, cc: &str, nsn: &str, grouped: &str) -> String {
    match rng.gen_range(0..12) {
        0 => format!("tel:+{cc}-{nsn}"),
        1 => nsn
            .chars()
            .map(|c| char::from_u32(0xFF10 + c.to_digit(10).unwrap_or(0)).unwrap_or(c))
            .collect(),
        2 => nsn
            .chars()
            .map(|c| char::from_u32(0x0660 + c.to_digit(10).unwrap_or(0)).unwrap_or(c))
            .collect(),
        3 => format!(
            "1-800-{}",
            ["FLOWERS", "CALL-NOW", "go-team"]
                .choose(rng)
                .expect("words")
        ),
        4 => format!("+{cc} {grouped} / +{cc} {grouped}"),
        5 => format!("{}\t{}", &nsn[..nsn.len() / 2], &nsn[nsn.len() / 2..]),
        6 => (0..rng.gen_range(0..4))
            .map(|_| rng.gen_range(0..10).to_string())
            .collect(),
        7 => (0..rng.gen_range(18..40))
            .map(|_| rng.gen_range(0..10).to_string())
            .collect(),
        8 => ["n/a", "", "  ", "+", "00", "-", "()", "unknown"]
            .choose(rng)
            .expect("junk")
            .to_string(),
        9 => format!("+{cc} {grouped}*"),
        10 => format!("\u{FF0B}{cc} {grouped}"),
        _ => format!("+{cc}{}", "0".repeat(rng.gen_range(1..3))) + nsn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path gives the crate's answer on every generated value it takes, and takes
    /// most of them: a million values (about 20 s in debug on the development machine; the
    /// benchmark scripts run `ae-bench phone-diff` on another seed in release).
    #[test]
    fn the_fast_path_agrees_with_the_crate_on_generated_numbers() {
        let report = run(1_000_000, 15);
        eprintln!("{}", report.summary());
        assert!(
            report.disagreements.is_empty(),
            "{} disagreements, first: {:#?}",
            report.disagreement_count,
            report.disagreements
        );
        let countries = report
            .origins
            .iter()
            .filter(|o| !o.starts_with('+'))
            .count();
        assert!(countries >= 30, "{countries} countries");
        assert!(report.fast_share() > 0.6, "{report:?}");
        assert!(report.fast_valid > 5_000, "{report:?}");
    }
}
