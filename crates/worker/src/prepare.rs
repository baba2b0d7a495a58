//! Turns a shard's raw values into the entries of one upload: normalized, hashed, deduplicated,
//! with every dropped value counted by reason. Pure CPU work, run on the blocking pool.

use crate::normalize::{normalize_to_entry, Entry, Invalid, Rules};
use audience_export_core::progress::ShardCounts;
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
    /// What this shard adds to its field's counters, whatever the upload's fate.
    pub fn counts(&self) -> ShardCounts {
        ShardCounts {
            duplicates: self.duplicates,
            prehashed: self.prehashed,
            invalid: self
                .invalid
                .iter()
                .map(|(reason, &n)| (reason.as_str(), n))
                .collect(),
            ..ShardCounts::default()
        }
    }
}

pub fn prepare(field: Field, records: &[String], rules: &Rules) -> Prepared {
    // Dedup on digests for hashed fields: 32 bytes, no copy of the hex text, and keyed by their
    // own first bytes (SHA-256 output needs no further hashing).
    let mut seen_digests: HashSet<[u8; 32], BuildDigestHasher> =
        HashSet::with_capacity_and_hasher(records.len(), BuildDigestHasher);
    let mut seen_plain: HashSet<String> = HashSet::new();
    let mut out = Prepared {
        data: Vec::with_capacity(records.len()),
        ..Prepared::default()
    };
    for raw in records {
        match normalize_to_entry(field, raw, rules) {
            Ok(Entry::Hashed {
                digest, prehashed, ..
            }) => {
                out.prehashed += u64::from(prehashed);
                if seen_digests.insert(digest) {
                    out.data.push(lower_hex(&digest));
                } else {
                    out.duplicates += 1;
                }
            }
            Ok(Entry::Plain(id)) => {
                if seen_plain.insert(id.clone()) {
                    out.data.push(id);
                } else {
                    out.duplicates += 1;
                }
            }
            Err(reason) => *out.invalid.entry(reason).or_default() += 1,
        }
    }
    out
}

/// Lowercase hex of a digest, written through a table: the `hex` crate's char iterator cost a
/// tenth of the shard's time.
fn lower_hex(digest: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(64);
    for b in digest {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0x0f)]);
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Hashes a SHA-256 digest by its first eight bytes, which are already uniformly distributed.
#[derive(Clone, Copy, Default)]
struct BuildDigestHasher;

#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::BuildHasher for BuildDigestHasher {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

impl std::hash::Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length (a usize, through write_usize) then its bytes.
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(first);
    }
    fn write_usize(&mut self, _: usize) {}
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_written_as_lowercase_hex() {
        let digest: [u8; 32] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        assert_eq!(lower_hex(&digest), hex::encode(digest));
    }

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
        let counts = p.counts();
        assert_eq!(counts.invalid.get("email_format"), Some(&1));
        assert_eq!(counts.duplicates, 1);
    }
}
