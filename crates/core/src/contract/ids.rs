//! The ids every contract carries, parsed once at the edge (a job, a shard, an API path, a CLI
//! argument) and impossible to hold invalid afterwards: an `ExportId` or a `WorkspaceId` is safe
//! inside a Redis key, an AMQP header and a URL; an `AdAccountId` has one representation (its
//! digits), and prints `act_<digits>` only where the Graph API wants it; a `PhoneCountry` is a
//! region libphonenumber has a numbering plan for. Each serializes as its plain string. Their JSON
//! Schemas (`contract::schema`) state these rules as patterns, tested against `parse`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why an id was refused: the sentence an integrator reads (job rejection, HTTP 400, CLI).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(String);

/// Ids that are safe inside Redis keys, AMQP headers and URLs: 1-128 of letters, digits, `-`,
/// `_`, `.`.
fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An opaque id of the upstream platform (`export_id`, `workspace_id`).
macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<$name, IdError> {
                let s = s.into();
                if is_identifier(&s) {
                    Ok($name(s))
                } else {
                    Err(IdError(concat!(
                        $what,
                        " must be 1-128 characters of letters, digits, '-', '_' or '.'"
                    ).to_owned()))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<$name, IdError> {
                $name::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<$name, IdError> {
                $name::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

identifier!(
    /// An export's id: the job's idempotency key, chosen by the upstream platform.
    ExportId,
    "export_id"
);
identifier!(
    /// A workspace of the upstream platform: the owner of one Facebook connection.
    WorkspaceId,
    "workspace_id"
);

/// A Meta ad account, held as its digits. `Display` prints the digits (reports, Redis keys,
/// metrics never see it); `act()` gives the `act_<digits>` node the Graph API addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AdAccountId(String);

impl AdAccountId {
    /// Accepts `1234` and `act_1234` (how Meta's UI and `/me/adaccounts` spell it).
    pub fn parse(s: &str) -> Result<AdAccountId, IdError> {
        let digits = s.trim().strip_prefix("act_").unwrap_or(s.trim());
        if !digits.is_empty() && digits.len() <= 32 && digits.bytes().all(|b| b.is_ascii_digit()) {
            Ok(AdAccountId(digits.to_owned()))
        } else {
            Err(IdError(format!(
                "ad_account_id `{s}` must be digits, optionally prefixed by act_"
            )))
        }
    }

    /// The digits alone.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The Graph API node: `act_<digits>`.
    pub fn act(&self) -> String {
        format!("act_{}", self.0)
    }

    /// Where Meta's Custom Audience terms for this ad account are accepted.
    pub fn terms_url(&self) -> String {
        format!(
            "https://business.facebook.com/ads/manage/customaudiences/tos/?act={}",
            self.0
        )
    }
}

impl TryFrom<String> for AdAccountId {
    type Error = IdError;
    fn try_from(s: String) -> Result<AdAccountId, IdError> {
        AdAccountId::parse(&s)
    }
}

impl From<AdAccountId> for String {
    fn from(id: AdAccountId) -> String {
        id.0
    }
}

impl std::str::FromStr for AdAccountId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<AdAccountId, IdError> {
        AdAccountId::parse(s)
    }
}

impl PartialEq<&str> for AdAccountId {
    /// Equal to its digits, with or without `act_`.
    fn eq(&self, other: &&str) -> bool {
        AdAccountId::parse(other).is_ok_and(|o| o == *self)
    }
}

impl fmt::Display for AdAccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The country of phone numbers written without their country code: an ISO 3166-1 alpha-2
/// code that libphonenumber has a numbering plan for, held uppercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhoneCountry(phonenumber::country::Id);

impl PhoneCountry {
    pub fn parse(s: &str) -> Result<PhoneCountry, IdError> {
        let upper = s.trim().to_ascii_uppercase();
        match upper.parse::<phonenumber::country::Id>() {
            Ok(id) if upper.len() == 2 => Ok(PhoneCountry(id)),
            _ => Err(IdError(format!(
                "phone country `{s}` is not an ISO 3166-1 alpha-2 code with a numbering plan, e.g. US"
            ))),
        }
    }

    /// libphonenumber's region.
    pub fn id(self) -> phonenumber::country::Id {
        self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }
}

impl TryFrom<String> for PhoneCountry {
    type Error = IdError;
    fn try_from(s: String) -> Result<PhoneCountry, IdError> {
        PhoneCountry::parse(&s)
    }
}

impl From<PhoneCountry> for String {
    fn from(c: PhoneCountry) -> String {
        c.as_str().to_owned()
    }
}

impl std::str::FromStr for PhoneCountry {
    type Err = IdError;
    fn from_str(s: &str) -> Result<PhoneCountry, IdError> {
        PhoneCountry::parse(s)
    }
}

impl fmt::Display for PhoneCountry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_keep_to_a_safe_alphabet() {
        assert_eq!(ExportId::parse("exp-1.a_B").unwrap().as_str(), "exp-1.a_B");
        for bad in ["", "a b", "a:b", "a{b}", "ü", &"x".repeat(129)] {
            let err = WorkspaceId::parse(bad).expect_err(bad).to_string();
            assert!(err.starts_with("workspace_id must be"), "{err}");
        }
        assert!(ExportId::parse("x".repeat(128)).is_ok());
        let from_json: Result<ExportId, _> = serde_json::from_str("\"a/b\"");
        assert!(from_json.unwrap_err().to_string().contains("export_id"));
    }

    #[test]
    fn an_ad_account_has_one_representation() {
        let a = AdAccountId::parse("act_1234").unwrap();
        assert_eq!(a, AdAccountId::parse("1234").unwrap());
        assert_eq!(a.to_string(), "1234");
        assert_eq!(a.act(), "act_1234");
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"1234\"");
        for bad in ["", "act_", "act_x1", "12a", "act_act_1", "-1"] {
            assert!(AdAccountId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_phone_country_needs_a_numbering_plan() {
        assert_eq!(PhoneCountry::parse("us").unwrap().as_str(), "US");
        assert_eq!(PhoneCountry::parse("GB").unwrap().to_string(), "GB");
        for bad in ["XX", "USA", "", "1", "u"] {
            let err = PhoneCountry::parse(bad).expect_err(bad).to_string();
            assert!(err.contains("ISO 3166-1"), "{err}");
        }
        let c: PhoneCountry = serde_json::from_str("\"de\"").unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"DE\"");
    }
}
