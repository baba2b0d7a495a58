//! Turns a shard's raw values into the entries of one upload: normalized, hashed, deduplicated,
//! with every dropped value counted by reason. Pure CPU work, run on the blocking pool.

use crate::normalize::{normalize, Invalid, Rules};
use audience_export_core::Field;
use std::collections::{BTreeMap, HashSet};

/// One shard, ready to upload.
#[derive(Debug, Default, PartialEq)]
pub struct Prepared {
    /// Entries to send, in first-seen order.
    pub data: Vec<String>,
    pub invalid: BTreeMap<Invalid, u64>,
    pub duplicates: u64,
    pub prehashed: u64,
}

impl Prepared {
    /// The Redis counters this shard adds to its export, whatever the upload's fate.
    pub fn counters(&self, field: Field) -> Vec<(String, u64)> {
        let mut out = vec![
            (format!("{field}:duplicates"), self.duplicates),
            (format!("{field}:prehashed"), self.prehashed),
        ];
        for (reason, n) in &self.invalid {
            out.push((format!("{field}:invalid:{}", reason.as_str()), *n));
        }
        out
    }
}

pub fn prepare(field: Field, records: &[String], rules: &Rules) -> Prepared {
    let mut seen = HashSet::with_capacity(records.len());
    let mut out = Prepared {
        data: Vec::with_capacity(records.len()),
        ..Prepared::default()
    };
    for raw in records {
        match normalize(field, raw, rules) {
            Ok(n) => {
                if n.prehashed {
                    out.prehashed += 1;
                }
                if seen.insert(n.sent.clone()) {
                    out.data.push(n.sent);
                } else {
                    out.duplicates += 1;
                }
            }
            Err(reason) => *out.invalid.entry(reason).or_default() += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_sent_once_and_invalid_values_counted() {
        let records: Vec<String> = ["A@x.io", " a@x.io ", "bad", "", "b@x.io"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = prepare(Field::Email, &records, &Rules::default());
        assert_eq!(p.data.len(), 2);
        assert_eq!(p.duplicates, 1);
        assert_eq!(p.invalid.get(&Invalid::EmailFormat), Some(&1));
        assert_eq!(p.invalid.get(&Invalid::Empty), Some(&1));
        let counters = p.counters(Field::Email);
        assert!(counters.contains(&("email:invalid:email_format".into(), 1)));
        assert!(counters.contains(&("email:duplicates".into(), 1)));
    }
}
