//! Meta's normalization rules, per field, and the hashing that follows them. This is the only
//! code that turns a raw identifier into what leaves the fleet; it never logs a value.
//!
//! Rules (reference/graph-api.md): email trimmed and lowercased, then SHA-256; phone reduced to
//! digits without leading zeros (so `+` and `00` prefixes keep the country code), then SHA-256;
//! MADID lowercased with hyphens kept and not hashed. A value that is already a SHA-256 hex
//! string is passed through lowercased, never hashed twice.

use audience_export_core::Field;
use sha2::{Digest, Sha256};

/// Why a value is not sent. The strings are bounded labels used in Redis counters, reports and
/// metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Invalid {
    Empty,
    EmailFormat,
    PhoneFormat,
    PhoneLength,
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
            Invalid::PhoneLength => "phone_length",
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

pub fn normalize(field: Field, raw: &str) -> Result<Normalized, Invalid> {
    let value = raw.trim();
    if value.is_empty() {
        return Err(Invalid::Empty);
    }
    if field != Field::Madid && is_sha256_hex(value) {
        let lower = value.to_ascii_lowercase();
        return Ok(Normalized {
            normalized: lower.clone(),
            sent: lower,
            prehashed: true,
        });
    }
    let normalized = match field {
        Field::Email => email(value)?,
        Field::Phone => phone(value)?,
        Field::Madid => {
            let id = madid(value)?;
            return Ok(Normalized {
                normalized: id.clone(),
                sent: id,
                prehashed: false,
            });
        }
    };
    let sent = sha256_hex(normalized.as_bytes());
    Ok(Normalized {
        normalized,
        sent,
        prehashed: false,
    })
}

fn email(value: &str) -> Result<String, Invalid> {
    let lower = value.to_lowercase();
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

fn phone(value: &str) -> Result<String, Invalid> {
    if value.chars().any(|c| c.is_alphabetic()) {
        return Err(Invalid::PhoneFormat);
    }
    let digits: String = value.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Err(Invalid::PhoneFormat);
    }
    // E.164 numbers have at most 15 digits; fewer than 8 cannot carry a country code and a
    // subscriber number.
    if !(8..=15).contains(&digits.len()) {
        return Err(Invalid::PhoneLength);
    }
    Ok(digits.to_owned())
}

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

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(field: Field, raw: &str) -> Result<String, Invalid> {
        normalize(field, raw).map(|n| n.sent)
    }

    /// Golden vectors: each expected hash was computed with `printf '%s' VALUE | sha256sum`.
    #[test]
    fn emails_are_trimmed_lowercased_and_hashed() {
        let h = "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"; // test@example.com
        assert_eq!(sent(Field::Email, "test@example.com").unwrap(), h);
        assert_eq!(sent(Field::Email, "  Test@Example.COM\t").unwrap(), h);
        assert_eq!(
            sent(Field::Email, "\u{2003}test@example.com\u{00a0}").unwrap(),
            h
        );
        assert_eq!(
            normalize(Field::Email, "A+Tag@X.io").unwrap().normalized,
            "a+tag@x.io"
        );
        for bad in [
            "no-at-sign",
            "a@b",
            "@example.com",
            "a@.com",
            "a b@example.com",
            "a@example.com.",
        ] {
            assert_eq!(sent(Field::Email, bad), Err(Invalid::EmailFormat), "{bad}");
        }
        assert_eq!(sent(Field::Email, "   "), Err(Invalid::Empty));
    }

    #[test]
    fn phones_keep_their_country_code_as_digits() {
        let canonical = normalize(Field::Phone, "15551234567").unwrap();
        // printf '%s' 15551234567 | sha256sum
        assert_eq!(
            canonical.sent,
            "d6736136ea896c1bfdc553e0e86e702c70d060d805696ca3e4e9e0961353860a"
        );
        for same in ["+1 (555) 123-4567", "001 555 123 4567", "+1.555.123.4567"] {
            assert_eq!(normalize(Field::Phone, same).unwrap(), canonical, "{same}");
        }
        assert_eq!(sent(Field::Phone, "n/a"), Err(Invalid::PhoneFormat));
        assert_eq!(sent(Field::Phone, "123"), Err(Invalid::PhoneLength));
        assert_eq!(
            sent(Field::Phone, "+1 555 123 4567 8901 23"),
            Err(Invalid::PhoneLength)
        );
        assert_eq!(sent(Field::Phone, "000"), Err(Invalid::PhoneFormat));
    }

    #[test]
    fn madids_are_lowercased_and_never_hashed() {
        let idfa = "6D92078A-8246-4BA4-AE5B-76104861E7DC";
        assert_eq!(
            sent(Field::Madid, idfa).unwrap(),
            "6d92078a-8246-4ba4-ae5b-76104861e7dc"
        );
        assert_eq!(
            sent(Field::Madid, "00000000-0000-0000-0000-000000000000"),
            Err(Invalid::MadidZero)
        );
        assert_eq!(
            sent(Field::Madid, "6d92078a82464ba4ae5b76104861e7dc"),
            Err(Invalid::MadidFormat)
        );
        assert_eq!(sent(Field::Madid, "not-a-uuid"), Err(Invalid::MadidFormat));
    }

    #[test]
    fn prehashed_values_pass_through_lowercased() {
        let upper = "973DFE463EC85785F5F95AF5BA3906EEDB2D931C24E69824A89EA65DBA4E813B";
        let n = normalize(Field::Email, upper).unwrap();
        assert!(n.prehashed);
        assert_eq!(n.sent, upper.to_ascii_lowercase());
        assert!(normalize(Field::Phone, upper).unwrap().prehashed);
    }
}
