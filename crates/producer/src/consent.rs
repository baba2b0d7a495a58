//! The consent filter: which members of a segment may be exported, decided by the producer
//! before sharding so an excluded member's values never reach a shard, a worker or Meta.
//!
//! A member is exported only if every `require` attribute is true and no `exclude` attribute is
//! true; absent (or not a boolean) is not true. An excluded member is counted once, under the
//! first attribute that excluded it, `require` in order and then `exclude`, so the counts add
//! up to the members left out.

use crate::source::SegmentRecord;
use audience_export_core::contract::Consent;
use std::collections::BTreeMap;

pub struct ConsentFilter {
    require: Vec<String>,
    exclude: Vec<String>,
    /// Members left out so far, by attribute; every attribute of the rule is present (at zero
    /// when it excluded nobody), so a report shows the rule that ran.
    excluded: BTreeMap<String, u64>,
}

impl ConsentFilter {
    pub fn new(consent: &Consent) -> ConsentFilter {
        ConsentFilter {
            require: consent.require.clone(),
            exclude: consent.exclude.clone(),
            excluded: consent.attributes().map(|a| (a.to_owned(), 0)).collect(),
        }
    }

    /// Whether the member may be exported; when not, it is counted under the attribute that
    /// excluded it.
    pub fn admits(&mut self, record: &SegmentRecord) -> bool {
        let excluded_by = self
            .require
            .iter()
            .find(|a| record.flag(a) != Some(true))
            .or_else(|| self.exclude.iter().find(|a| record.flag(a) == Some(true)));
        match excluded_by {
            None => true,
            Some(attribute) => {
                if let Some(n) = self.excluded.get_mut(attribute) {
                    *n += 1;
                }
                false
            }
        }
    }

    /// Members left out, by attribute.
    pub fn excluded(&self) -> &BTreeMap<String, u64> {
        &self.excluded
    }

    pub fn excluded_total(&self) -> u64 {
        self.excluded.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> SegmentRecord {
        serde_json::from_str(json).unwrap()
    }

    fn rule(require: &[&str], exclude: &[&str]) -> ConsentFilter {
        ConsentFilter::new(&Consent {
            require: require.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn each_member_is_counted_once_under_the_first_attribute_that_excludes_it() {
        let mut f = rule(&["ads", "email_opt_in"], &["dnss", "minor"]);
        let members = [
            (r#"{"ads":true,"email_opt_in":true}"#, true),
            (r#"{"ads":true,"email_opt_in":true,"dnss":false}"#, true),
            // Fails both requires and both excludes: counted under the first require only.
            (
                r#"{"ads":false,"email_opt_in":false,"dnss":true,"minor":true}"#,
                false,
            ),
            // Absent is not true; a string "true" is not a boolean.
            (r#"{"email_opt_in":true}"#, false),
            (r#"{"ads":"true","email_opt_in":true}"#, false),
            (r#"{"ads":true}"#, false),
            (
                r#"{"ads":true,"email_opt_in":true,"dnss":true,"minor":true}"#,
                false,
            ),
            (
                r#"{"ads":true,"email_opt_in":true,"dnss":null,"minor":true}"#,
                false,
            ),
        ];
        for (json, admitted) in members {
            assert_eq!(f.admits(&record(json)), admitted, "{json}");
        }
        let want: BTreeMap<String, u64> =
            [("ads", 3), ("email_opt_in", 1), ("dnss", 1), ("minor", 1)]
                .into_iter()
                .map(|(a, n)| (a.to_owned(), n))
                .collect();
        assert_eq!(f.excluded(), &want);
        assert_eq!(f.excluded_total(), 6);
    }

    #[test]
    fn the_default_rule_leaves_out_only_who_opted_out_of_sale() {
        let mut f = ConsentFilter::new(&Consent::default());
        assert!(f.admits(&record(r#"{"email":"a@x.io"}"#)));
        assert!(f.admits(&record(r#"{"do_not_sell_or_share":false}"#)));
        assert!(!f.admits(&record(r#"{"do_not_sell_or_share":true}"#)));
        assert_eq!(f.excluded().get("do_not_sell_or_share"), Some(&1));
    }
}
