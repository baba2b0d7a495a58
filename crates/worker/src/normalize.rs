//! Meta's normalization rules, per field, and the hashing that follows them. This is the only
//! code that turns a raw identifier into what leaves the fleet; it never logs a value.
//!
//! Rules (reference/graph-api.md): email trimmed and lowercased, then SHA-256; phone parsed with
//! libphonenumber's metadata (the `phonenumber` crate) into E.164 with its country code: a number
//! written with `+` or an international prefix keeps its country, a national number gets the
//! export's default country; then its digits are hashed. MADID lowercased with hyphens kept and
//! not hashed. A value that is already a SHA-256 hex string is passed through lowercased, never
//! hashed twice.
//!
//! Phone numbers take one of two paths with the same answer: `phone_fast` (the crate's parse,
//! validity check and E.164 rules re-run on precompiled matchers, for numbers written with digits,
//! spaces, `-.()/` and a leading `+`: nearly all) or the crate itself (`phone_with_crate`, for
//! extensions, letters, other scripts, URIs). `phone_diff` checks them against each other on a
//! million generated numbers. The hot loop (`prepare`) normalizes through `normalize_into`, into
//! one reused buffer.

use audience_export_core::contract::PhoneCountry;
use audience_export_core::Field;
use sha2::{Digest, Sha256};

/// Why a value is not sent. The strings are bounded labels used in Redis counters, reports and
/// metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Invalid {
    Empty,
    EmailFormat,
    /// No phone number could be read from the value.
    PhoneFormat,
    /// A national number, and the export names no default country.
    PhoneNoCountry,
    /// Read, but not a number that exists in its country's numbering plan.
    PhoneInvalid,
    MadidFormat,
    /// The all-zero IDFA of a user who denied tracking.
    MadidZero,
}

impl Invalid {
    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::Empty => "empty",
            Invalid::EmailFormat => "email_format",
            Invalid::PhoneFormat => "phone_format",
            Invalid::PhoneNoCountry => "phone_no_country",
            Invalid::PhoneInvalid => "phone_invalid",
            Invalid::MadidFormat => "madid_format",
            Invalid::MadidZero => "madid_zero",
        }
    }
}

/// A value ready for Meta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The normalized form, before hashing. Only for the operator command: never logged.
    pub normalized: String,
    /// What is sent: the lowercase SHA-256 hex, or the MADID itself.
    pub sent: String,
    /// The input was already a SHA-256 hex string.
    pub prehashed: bool,
}

/// The rules of one export: today, the country of national phone numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    pub default_country: Option<phonenumber::country::Id>,
}

impl Rules {
    /// Rules with `default_country` for national phone numbers. Infallible: a `PhoneCountry`
    /// always has a numbering plan (an unknown one was refused where it was parsed).
    pub fn new(default_country: Option<PhoneCountry>) -> Rules {
        Rules {
            default_country: default_country.map(PhoneCountry::id),
        }
    }
}

pub fn normalize(field: Field, raw: &str, rules: &Rules) -> Result<Normalized, Invalid> {
    Ok(match normalize_to_entry(field, raw, rules)? {
        Entry::Hashed {
            normalized,
            digest,
            prehashed,
        } => Normalized {
            normalized,
            sent: hex::encode(digest),
            prehashed,
        },
        Entry::Plain(id) => Normalized {
            normalized: id.clone(),
            sent: id,
            prehashed: false,
        },
    })
}

/// What one value becomes, before its text form: the hot path dedups on the 32-byte digest and
/// encodes hex only for what it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A SHA-256 digest (computed here, or decoded from a pre-hashed input).
    Hashed {
        normalized: String,
        digest: [u8; 32],
        prehashed: bool,
    },
    /// Sent as it is (MADID).
    Plain(String),
}

pub fn normalize_to_entry(field: Field, raw: &str, rules: &Rules) -> Result<Entry, Invalid> {
    let mut buf = Vec::new();
    let written = normalize_into(field, raw, rules, &mut buf)?;
    let normalized = String::from_utf8(buf).expect("normalized values are UTF-8");
    Ok(match written {
        Written::Hash => Entry::Hashed {
            digest: Sha256::digest(normalized.as_bytes()).into(),
            normalized,
            prehashed: false,
        },
        Written::Prehashed(digest) => Entry::Hashed {
            normalized,
            digest,
            prehashed: true,
        },
        Written::Plain => Entry::Plain(normalized),
    })
}

/// What `normalize_into` appended to the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The normalized form, to be hashed.
    Hash,
    /// The input lowercased: it was already a SHA-256 hex string, this digest.
    Prehashed([u8; 32]),
    /// The normalized form, sent as it is (MADID).
    Plain,
}

/// Appends `raw`'s normalized form (UTF-8) to `buf`, for callers that normalize many values
/// through one buffer (`prepare`): no allocation per value on the common paths. On an error
/// `buf` is left as it was.
pub fn normalize_into(
    field: Field,
    raw: &str,
    rules: &Rules,
    buf: &mut Vec<u8>,
) -> Result<Written, Invalid> {
    let value = raw.trim();
    if value.is_empty() {
        return Err(Invalid::Empty);
    }
    if field == Field::Madid {
        return madid_into(value, buf).map(|()| Written::Plain);
    }
    let mut digest = [0u8; 32];
    if value.len() == 64 && hex::decode_to_slice(value, &mut digest).is_ok() {
        buf.extend(value.bytes().map(|b| b.to_ascii_lowercase()));
        return Ok(Written::Prehashed(digest));
    }
    match field {
        Field::Email => email_into(value, buf)?,
        _ => phone_into(value, rules, buf)?,
    }
    Ok(Written::Hash)
}

/// `email`, without an allocation for ASCII values (nearly all): lowercased into `buf` eight
/// bytes at a time, with the whitespace, the non-ASCII bytes and the `@`s found in the same
/// words (SWAR), then the domain checked on bytes. Byte by byte, an email took 7 cycles a byte on
/// a Zen 2 core, more than its SHA-256.
fn email_into(value: &str, buf: &mut Vec<u8>) -> Result<(), Invalid> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // For bytes below 0x80 (checked first), each `+` below stays within its byte: the high bit
    // of every byte of the result says whether that byte is at least (0x80 - the constant).
    let at_least = |word: u64, b: u8| word.wrapping_add(ONES * u64::from(0x80 - b)) & HIGH;
    let equal =
        |word: u64, b: u8| ((word ^ (ONES * u64::from(b))).wrapping_add(ONES * 0x7f) & HIGH) ^ HIGH;
    let bytes = value.as_bytes();
    let start = buf.len();
    buf.reserve(bytes.len());
    let (mut ascii, mut whitespace, mut ats, mut at) = (true, 0u64, 0u32, None);
    for (i, chunk) in bytes.chunks(8).enumerate() {
        // A short last chunk is padded with 'a', which no check looks for.
        let mut word = [b'a'; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        if word & HIGH != 0 {
            ascii = false;
            break;
        }
        // For ASCII text `char::is_whitespace` is exactly 0x09-0x0D and the space.
        whitespace |= equal(word, b' ') | (at_least(word, 0x09) & !at_least(word, 0x0e));
        let found = equal(word, b'@');
        if found != 0 {
            ats += found.count_ones();
            at = at.or(Some(i * 8 + found.trailing_zeros() as usize / 8));
        }
        let upper = at_least(word, b'A') & !at_least(word, b'Z' + 1);
        buf.extend_from_slice(&(word | upper >> 2).to_le_bytes()[..chunk.len()]);
    }
    if !ascii {
        buf.truncate(start);
        buf.extend_from_slice(email(value)?.as_bytes());
        return Ok(());
    }
    let well_formed = match at {
        Some(at) if ats == 1 => {
            let domain = &bytes[at + 1..];
            at > 0
                && at <= 64
                && bytes.len() <= 254
                && whitespace == 0
                && domain.first() != Some(&b'.')
                && domain.last() != Some(&b'.')
                && domain.contains(&b'.')
                && !domain.windows(2).any(|w| w == b"..")
        }
        _ => false,
    };
    if well_formed {
        Ok(())
    } else {
        buf.truncate(start);
        Err(Invalid::EmailFormat)
    }
}

fn email(value: &str) -> Result<String, Invalid> {
    let lower = if value.is_ascii() {
        value.to_ascii_lowercase()
    } else {
        value.to_lowercase()
    };
    let (local, domain) = lower.split_once('@').ok_or(Invalid::EmailFormat)?;
    let well_formed = !local.is_empty()
        && local.len() <= 64
        && lower.len() <= 254
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && !domain.contains('@')
        && !lower.chars().any(char::is_whitespace);
    if well_formed {
        Ok(lower)
    } else {
        Err(Invalid::EmailFormat)
    }
}

/// The phone number's E.164 digits appended to `buf`: through `phone_fast` when the value has
/// a shape it reproduces, else through the crate (`phone_with_crate`). Both give the same
/// answer (the differential test, `phone_diff`).
fn phone_into(value: &str, rules: &Rules, buf: &mut Vec<u8>) -> Result<(), Invalid> {
    match crate::phone_fast::e164(value, rules.default_country, buf) {
        crate::phone_fast::Fast::Done(result) => result,
        crate::phone_fast::Fast::Defer => {
            buf.extend_from_slice(phone_with_crate(value, rules)?.as_bytes());
            Ok(())
        }
    }
}

/// The phone rule through the `phonenumber` crate alone: the reference the fast path is
/// compared with, and what it defers to. Public for the differential test and the benchmark.
pub fn phone_with_crate(value: &str, rules: &Rules) -> Result<String, Invalid> {
    use phonenumber::Mode;
    widen_the_crates_regex_cache();
    // A number with its country code is parsed without a default region: given one, the
    // `phonenumber` port (0.3.10) strips that region's national prefix from foreign numbers
    // ("+49 151 ..." with US as default lost the 1 of 151). International prefixes ("00", or
    // the default country's own, such as 011 in the US) are rewritten to "+" for the same reason.
    let international = international_form(value.trim(), rules);
    let parsed = match &international {
        Some(plus) => phonenumber::parse(None, plus),
        None => match rules.default_country {
            Some(country) => phonenumber::parse(Some(country), value),
            None if value.chars().any(|c| c.is_ascii_digit())
                && !value.chars().any(char::is_alphabetic) =>
            {
                return Err(Invalid::PhoneNoCountry)
            }
            None => return Err(Invalid::PhoneFormat),
        },
    };
    let number = parsed.map_err(|_| Invalid::PhoneFormat)?;
    if !number.is_valid() {
        return Err(Invalid::PhoneInvalid);
    }
    let e164 = number.format().mode(Mode::E164).to_string();
    Ok(e164.trim_start_matches('+').to_owned())
}

/// The crate compiles its metadata's regexes on demand into one LRU cache of 100, keyed by the
/// pattern's text. A country's parse, validity check and formatting touch 30 to 60 patterns, so
/// numbers of a few countries in one shard evicted each other's and recompiled them on nearly
/// every value (about 0.3 ms a number). Only what is cached changes, never a result; the memory
/// is that of the compiled patterns of the countries actually seen.
fn widen_the_crates_regex_cache() {
    /// Room for every pattern the 60-region mix of `ae-bench hashing` touches (400 did; 200
    /// still thrashed), at a few tens of kilobytes each.
    const CAPACITY: usize = 500;
    static WIDENED: std::sync::Once = std::sync::Once::new();
    WIDENED.call_once(|| {
        phonenumber::metadata::DATABASE
            .cache()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_capacity(CAPACITY);
    });
}

/// The value rewritten with a leading "+" when it carries its country code: written with "+",
/// or starting with "00" or with the default country's international prefix.
fn international_form(value: &str, rules: &Rules) -> Option<String> {
    if value.starts_with('+') {
        return Some(value.to_owned());
    }
    if let Some(rest) = value.strip_prefix("00") {
        return Some(format!("+{rest}"));
    }
    let country = rules.default_country?;
    let idd = phonenumber::metadata::DATABASE
        .by_id(country.as_ref())?
        .international_prefix()?;
    let found = idd.find(value)?;
    (found.start() == 0 && found.end() > 0).then(|| format!("+{}", &value[found.end()..]))
}

/// `madid`, into `buf`: the same checks on bytes (five hex groups of 8-4-4-4-12 is 36 bytes with
/// hyphens at 8, 13, 18 and 23), lowercased.
fn madid_into(value: &str, buf: &mut Vec<u8>) -> Result<(), Invalid> {
    let bytes = value.as_bytes();
    let shape_ok = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if !shape_ok {
        return Err(Invalid::MadidFormat);
    }
    if bytes.iter().all(|&b| b == b'0' || b == b'-') {
        return Err(Invalid::MadidZero);
    }
    buf.extend(bytes.iter().map(|b| b.to_ascii_lowercase()));
    Ok(())
}

/// The rule `madid_into` implements, written plainly: the reference its test compares with.
#[cfg(test)]
fn madid(value: &str) -> Result<String, Invalid> {
    let lower = value.to_ascii_lowercase();
    let groups: Vec<&str> = lower.split('-').collect();
    let shape_ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if !shape_ok {
        return Err(Invalid::MadidFormat);
    }
    if lower.bytes().all(|b| b == b'0' || b == b'-') {
        return Err(Invalid::MadidZero);
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(country: Option<&str>) -> Rules {
        Rules::new(country.map(|c| PhoneCountry::parse(c).expect("a known country")))
    }

    /// Golden vectors: (field, default country, raw value, normalized form or the reason it is
    /// invalid). Expected forms follow Meta's published rules, written by hand.
    #[test]
    fn golden_vectors() {
        use Field::*;
        let ok = |s: &str| Ok::<String, Invalid>(s.to_owned());
        type Case<'a> = (Field, Option<&'a str>, &'a str, Result<String, Invalid>);
        let cases: Vec<Case> = vec![
            (Email, None, "test@example.com", ok("test@example.com")),
            (Email, None, "  Test@Example.COM\t", ok("test@example.com")),
            (
                Email,
                None,
                "\u{2003}test@example.com\u{00a0}",
                ok("test@example.com"),
            ),
            (
                Email,
                None,
                "Jane.Doe+Promo@Gmail.com",
                ok("jane.doe+promo@gmail.com"),
            ),
            (
                Email,
                None,
                "User@B\u{dc}CHER.de",
                ok("user@b\u{fc}cher.de"),
            ),
            (Email, None, "no-at-sign", Err(Invalid::EmailFormat)),
            (Email, None, "a@b", Err(Invalid::EmailFormat)),
            (Email, None, "@example.com", Err(Invalid::EmailFormat)),
            (Email, None, "a@.com", Err(Invalid::EmailFormat)),
            (Email, None, "a b@example.com", Err(Invalid::EmailFormat)),
            (Email, None, "a@example.com.", Err(Invalid::EmailFormat)),
            (Email, None, "a@@example.com", Err(Invalid::EmailFormat)),
            (Email, None, " \t ", Err(Invalid::Empty)),
            (Phone, Some("US"), "(212) 736-5000", ok("12127365000")),
            (Phone, Some("US"), "+1 212-736-5000", ok("12127365000")),
            (Phone, None, "+1.212.736.5000", ok("12127365000")),
            (Phone, Some("US"), "212-736-5000 ext. 42", ok("12127365000")),
            (Phone, Some("US"), "011 44 20 7946 0958", ok("442079460958")),
            (Phone, Some("US"), "0044 20 7946 0958", ok("442079460958")),
            (Phone, None, "0044 20 7946 0958", ok("442079460958")),
            (Phone, Some("FR"), "+44 (0)20 7946 0958", ok("442079460958")),
            (Phone, Some("GB"), "020 7946 0958", ok("442079460958")),
            (Phone, Some("gb"), "07911 123456", ok("447911123456")),
            (Phone, Some("US"), "+33 6 12 34 56 78", ok("33612345678")),
            (Phone, Some("FR"), "06 12 34 56 78", ok("33612345678")),
            (Phone, Some("US"), "+49 151 234 56789", ok("4915123456789")),
            (
                Phone,
                Some("US"),
                "011 49 151 234 56789",
                ok("4915123456789"),
            ),
            (Phone, None, "2127365000", Err(Invalid::PhoneNoCountry)),
            (Phone, Some("US"), "n/a", Err(Invalid::PhoneFormat)),
            (
                Phone,
                Some("US"),
                "+1 212 736 50",
                Err(Invalid::PhoneInvalid),
            ),
            (
                Phone,
                Some("US"),
                "+1 (000) 000-0000",
                Err(Invalid::PhoneFormat),
            ),
            (
                Madid,
                None,
                "6D92078A-8246-4BA4-AE5B-76104861E7DC",
                ok("6d92078a-8246-4ba4-ae5b-76104861e7dc"),
            ),
            (
                Madid,
                None,
                " 6d92078a-8246-4ba4-ae5b-76104861e7dc ",
                ok("6d92078a-8246-4ba4-ae5b-76104861e7dc"),
            ),
            (
                Madid,
                None,
                "00000000-0000-0000-0000-000000000000",
                Err(Invalid::MadidZero),
            ),
            (
                Madid,
                None,
                "6d92078a82464ba4ae5b76104861e7dc",
                Err(Invalid::MadidFormat),
            ),
            (
                Madid,
                None,
                "6d92078a-8246-4ba4-ae5b-76104861e7dz",
                Err(Invalid::MadidFormat),
            ),
        ];
        for (field, country, raw, expected) in cases {
            let got = normalize(field, raw, &rules(country)).map(|n| n.normalized);
            assert_eq!(got, expected, "{field} {country:?} {raw:?}");
        }
    }

    /// What is sent is the SHA-256 of the normalized form, lowercase hex (computed with
    /// `printf '%s' VALUE | sha256sum`), except for MADIDs, which are sent as they are.
    #[test]
    fn hashes_are_lowercase_sha256_and_madids_are_not_hashed() {
        let us = rules(Some("US"));
        let sent = |field, raw| normalize(field, raw, &us).expect("valid").sent;
        assert_eq!(
            sent(Field::Email, " Test@Example.COM"),
            "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
        );
        assert_eq!(
            sent(Field::Phone, "(212) 736-5000"),
            "19b8135df3f09b5e492186fc900f9294c26dc81a0a63a6ddec5ad5b7007bd589"
        );
        assert_eq!(
            sent(Field::Email, "User@B\u{dc}CHER.de"),
            "a6667ab428f538753ae2bcb430005815a8dc028d87c4d53fe5ef7015a7a8e671"
        );
        assert_eq!(
            sent(Field::Madid, "6D92078A-8246-4BA4-AE5B-76104861E7DC"),
            "6d92078a-8246-4ba4-ae5b-76104861e7dc"
        );
    }

    /// `email_into` (bytes, one pass) against `email` (the rule written plainly) on values
    /// built from the characters the checks look at, around every length limit.
    #[test]
    fn the_byte_email_check_is_the_email_rule() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let pieces: &[&str] = &[
            "a", "Z", "0", "@", "@", ".", ".", "..", "-", "+", "_", " ", "\t", "\u{b}", "\u{c}",
            "\r", "\n", "\u{1c}", "\u{1f}", "\u{7f}", "ex", "COM", "\u{e9}", "\u{2003}",
        ];
        let mut values: Vec<String> = vec![
            "a@b.c".into(),
            ".a@b.c".into(),
            "a.@b.c".into(),
            "a..b@c.d".into(),
            "a@.b.c".into(),
            "a@b..c".into(),
            "a@b.c.".into(),
            "@b.c".into(),
            "a@b".into(),
            "a@b@c.d".into(),
            format!("{}@b.c", "a".repeat(64)),
            format!("{}@b.c", "a".repeat(65)),
            format!("a@{}.c", "b".repeat(250)),
            format!("a@{}.c", "b".repeat(249)),
        ];
        for b in 0u8..128 {
            values.push(format!("a{}b@c.d", char::from(b)));
            values.push(format!("a@c.d{}", char::from(b)));
        }
        for _ in 0..100_000 {
            let part = |rng: &mut rand::rngs::StdRng, max: usize| -> String {
                let n = rng.gen_range(0..max);
                (0..n)
                    .map(|_| pieces[rng.gen_range(0..pieces.len())])
                    .collect()
            };
            // Mostly `local@domain.tld`-shaped, with the pieces anywhere.
            let (a, b, c) = (part(&mut rng, 4), part(&mut rng, 3), part(&mut rng, 3));
            let mut v = format!("{a}Ab@{b}.cOm{c}");
            if rng.gen_bool(0.3) {
                v = part(&mut rng, 12);
            }
            if rng.gen_bool(0.05) {
                v = v.repeat(rng.gen_range(10..40));
            }
            values.push(v);
        }
        let mut valid = 0;
        for value in &values {
            let mut buf = b"kept".to_vec();
            let fast = email_into(value, &mut buf).map(|()| String::from_utf8(buf[4..].to_vec()));
            let plain = email(value).map(Ok);
            assert_eq!(fast, plain, "{value:?}");
            if plain.is_err() {
                assert_eq!(buf, b"kept", "an invalid value leaves the buffer as it was");
            }
            valid += usize::from(plain.is_ok());
        }
        assert!(valid > 5_000, "{valid} valid of {}", values.len());
    }

    #[test]
    fn the_byte_madid_check_is_the_madid_rule() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let base = "6D92078A-8246-4BA4-AE5B-76104861E7DC";
        let mut values = vec![
            base.to_owned(),
            "00000000-0000-0000-0000-000000000000".to_owned(),
            "00000000-0000-0000-0000-000000000001".to_owned(),
            "6d92078a-8246-4ba4-ae5b-76104861e7d".to_owned(),
            "6d92078a-8246-4ba4-ae5b-76104861e7dcc".to_owned(),
            "6d92078a8-246-4ba4-ae5b-76104861e7dc".to_owned(),
            "6d92078a--8246-4ba4-ae5b-76104861e7d".to_owned(),
            "6d92078a-8246-4ba4-ae5b-76104861e7d\u{e9}".to_owned(),
        ];
        let swaps = b"0aA9fFgG-xX ";
        for _ in 0..50_000 {
            let mut v = base.as_bytes().to_vec();
            for _ in 0..rng.gen_range(1..3) {
                let i = rng.gen_range(0..v.len());
                v[i] = swaps[rng.gen_range(0..swaps.len())];
            }
            values.push(String::from_utf8(v).expect("ASCII"));
        }
        for value in &values {
            let mut buf = Vec::new();
            let fast = madid_into(value, &mut buf).map(|()| String::from_utf8(buf).expect("ASCII"));
            assert_eq!(fast, madid(value), "{value:?}");
        }
    }

    /// The phone path appends the E.164 digits whether the fast path or the crate answers.
    #[test]
    fn phone_numbers_are_appended_to_the_buffer_by_either_path() {
        let us = rules(Some("US"));
        for (raw, expected) in [
            ("(212) 736-5000", "12127365000"),
            ("212-736-5000 ext. 42", "12127365000"),
        ] {
            let mut buf = b"x".to_vec();
            let written = normalize_into(Field::Phone, raw, &us, &mut buf);
            assert_eq!(written, Ok(Written::Hash));
            assert_eq!(buf, format!("x{expected}").as_bytes(), "{raw}");
        }
        let mut buf = b"x".to_vec();
        assert_eq!(
            normalize_into(Field::Phone, "+1 212 736 50", &us, &mut buf),
            Err(Invalid::PhoneInvalid)
        );
        assert_eq!(buf, b"x");
    }

    #[test]
    fn prehashed_values_pass_through_lowercased_and_are_counted() {
        let upper = "973DFE463EC85785F5F95AF5BA3906EEDB2D931C24E69824A89EA65DBA4E813B";
        for field in [Field::Email, Field::Phone] {
            let n = normalize(field, upper, &Rules::default()).expect("valid");
            assert!(n.prehashed, "{field}");
            assert_eq!(
                n.sent,
                upper.to_ascii_lowercase(),
                "{field}: never hashed twice"
            );
        }
        assert_eq!(
            normalize(Field::Madid, upper, &Rules::default()),
            Err(Invalid::MadidFormat),
            "a MADID is never a hash"
        );
    }
}
