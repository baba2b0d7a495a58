//! Turns a shard's raw values into the entries of one upload: normalized, hashed, deduplicated,
//! with every dropped value counted by reason. Pure CPU work, run on the blocking pool.

use crate::normalize::{normalize_into, Invalid, Rules, Written};
use audience_export_core::progress::ShardCounts;
use audience_export_core::Field;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
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

/// A shard's entries go back to the pool when it is done with (uploaded, dropped or failed), for
/// the next shard to write its entries into.
impl Drop for Prepared {
    fn drop(&mut self) {
        recycle::give_back(std::mem::take(&mut self.data));
    }
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
    SEEN.with(|seen| {
        let mut seen = seen.borrow_mut();
        let seen = &mut *seen;
        seen.digests.clear();
        seen.ids.clear();
        let out = prepare_with(field, records, rules, seen);
        // A shard far larger than usual leaves no large table behind on this thread.
        if seen.digests.capacity() > KEPT_CAPACITY || seen.ids.capacity() > KEPT_CAPACITY {
            *seen = Seen::default();
        }
        out
    })
}

/// Values seen in the current shard. Kept per thread and cleared per shard: a 10,000-value
/// table is half a megabyte, and allocating it for every shard (fresh pages, faulted in) cost
/// more than hashing.
#[derive(Default)]
struct Seen {
    /// Digests of hashed fields, keyed by their own first bytes (SHA-256 output needs no
    /// further hashing).
    digests: HashSet<[u8; 32], Spread>,
    /// MADIDs, by their 128 bits.
    ids: HashSet<u128, Spread>,
}

/// The largest table (entries) a thread keeps between shards.
const KEPT_CAPACITY: usize = 1 << 16;

thread_local! {
    static SEEN: RefCell<Seen> = RefCell::new(Seen::default());
}

fn prepare_with(field: Field, records: &[String], rules: &Rules, seen: &mut Seen) -> Prepared {
    let mut out = Prepared::default();
    let mut entries = Entries::new(records.len());
    if field == Field::Madid {
        seen.ids.reserve(records.len());
    } else {
        seen.digests.reserve(records.len());
    }
    // Every value is normalized into this one buffer: no allocation per record.
    let mut buf = Vec::with_capacity(256);
    for raw in records {
        buf.clear();
        let digest = match normalize_into(field, raw, rules, &mut buf) {
            Ok(Written::Hash) => sha256(&buf),
            Ok(Written::Prehashed(digest)) => {
                out.prehashed += 1;
                digest
            }
            Ok(Written::Plain) => {
                let id = std::str::from_utf8(&buf).expect("normalized values are UTF-8");
                if seen.ids.insert(madid_bits(id)) {
                    entries.push(id);
                } else {
                    out.duplicates += 1;
                }
                continue;
            }
            Err(reason) => {
                *out.invalid.entry(reason).or_default() += 1;
                continue;
            }
        };
        if seen.digests.insert(digest) {
            entries.push(lower_hex(&digest, &mut [0; 64]));
        } else {
            out.duplicates += 1;
        }
    }
    out.data = entries.finish();
    out
}

/// The entries of one shard, written into the strings of an earlier shard where there are any.
struct Entries {
    data: Vec<String>,
    /// How many of `data` hold this shard's entries; the rest are an earlier shard's.
    used: usize,
}

impl Entries {
    fn new(records: usize) -> Entries {
        let mut data = recycle::take();
        data.reserve(records.saturating_sub(data.len()));
        Entries { data, used: 0 }
    }

    fn push(&mut self, entry: &str) {
        match self.data.get_mut(self.used) {
            Some(old) => {
                old.clear();
                old.push_str(entry);
            }
            None => self.data.push(entry.to_owned()),
        }
        self.used += 1;
    }

    fn finish(mut self) -> Vec<String> {
        self.data.truncate(self.used);
        self.data
    }
}

/// The sent entries of shards already done with, kept for the next shards: a shard's 10,000
/// strings allocated and freed for every shard cost a third of hashing one (malloc, free, and
/// glibc handing the heap back to the kernel after each shard, to fault it in again for the
/// next). Bounded: a few shards' worth, a few megabytes at most.
mod recycle {
    use std::sync::Mutex;

    /// Shards' entries kept at most: beyond it they are freed as before.
    const KEPT_SHARDS: usize = 4;
    /// Larger shards' entries are not kept.
    const KEPT_ENTRIES: usize = 1 << 15;
    /// Entries whose string grew beyond this are not reused (ours are 64 bytes at most).
    const KEPT_STRING: usize = 64;

    static POOL: Mutex<Vec<Vec<String>>> = Mutex::new(Vec::new());

    /// Strings to write a shard's entries into (empty when none are kept).
    pub fn take() -> Vec<String> {
        POOL.lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    pub fn give_back(mut data: Vec<String>) {
        if data.is_empty() || data.capacity() > KEPT_ENTRIES {
            return;
        }
        data.retain(|s| s.capacity() <= KEPT_STRING);
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < KEPT_SHARDS {
            pool.push(data);
        }
    }
}

/// SHA-256. A value that fits one block (55 bytes or fewer: nearly every email and phone
/// number) is padded here and given to the compression function directly, which skips the
/// `Digest` wrapper's buffering; longer ones go through `Sha256`.
fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::digest::generic_array::GenericArray;
    /// FIPS 180-4, 5.3.3.
    const INITIAL: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    if bytes.len() > 55 {
        return Sha256::digest(bytes).into();
    }
    let mut block = [0u8; 64];
    block[..bytes.len()].copy_from_slice(bytes);
    block[bytes.len()] = 0x80;
    block[56..].copy_from_slice(&(bytes.len() as u64 * 8).to_be_bytes());
    let mut state = INITIAL;
    sha2::compress256(
        &mut state,
        std::slice::from_ref(GenericArray::from_slice(&block)),
    );
    let mut digest = [0u8; 32];
    for (out, word) in digest.chunks_exact_mut(4).zip(state) {
        out.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

/// A normalized MADID's 128 bits: two equal MADIDs (lowercase, hyphens at fixed places) have
/// equal bits and two different ones different bits.
fn madid_bits(id: &str) -> u128 {
    let b = id.as_bytes();
    // A lowercase hex digit's value without a branch: '0'-'9' are 0x30-0x39, 'a'-'f' 0x61-0x66.
    let digits = |bits: u64, group: &[u8]| {
        group.iter().fold(bits, |bits, &c| {
            bits << 4 | u64::from((c & 0x0f) + 9 * (c >> 6))
        })
    };
    if b.len() == 36 && [b[8], b[13], b[18], b[23]] == [b'-'; 4] {
        let high = digits(digits(digits(0, &b[..8]), &b[9..13]), &b[14..18]);
        let low = digits(digits(0, &b[19..23]), &b[24..]);
        return u128::from(high) << 64 | u128::from(low);
    }
    // Not the normalized shape (`normalize` only ever gives that one): the slow, general way.
    id.bytes().filter(|&b| b != b'-').fold(0u128, |bits, b| {
        let nibble = match b {
            b'0'..=b'9' => b - b'0',
            _ => b - b'a' + 10,
        };
        bits << 4 | u128::from(nibble)
    })
}

/// Lowercase hex of a digest, computed per nibble without a table (the compiler vectorizes it):
/// the `hex` crate's char iterator cost a tenth of the shard's time.
fn lower_hex<'a>(digest: &[u8; 32], out: &'a mut [u8; 64]) -> &'a str {
    let digit = |n: u8| n + b'0' + u8::from(n > 9) * (b'a' - b'0' - 10);
    for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
        pair[0] = digit(b >> 4);
        pair[1] = digit(b & 0x0f);
    }
    std::str::from_utf8(out).expect("hex digits are ASCII")
}

/// The dedup sets' hasher: their keys' bits are spread already, so no SipHash (which took an
/// eighth of a MADID shard's time). A SHA-256 digest is hashed by its first eight bytes; a
/// MADID's 128 bits are folded and mixed with one multiply (a segment of MADIDs built to collide
/// would only slow its own shards).
type Spread = std::hash::BuildHasherDefault<SpreadHasher>;

#[derive(Default)]
struct SpreadHasher(u64);

impl std::hash::Hasher for SpreadHasher {
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length (a usize, through write_usize) then its bytes.
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(first);
    }
    fn write_usize(&mut self, _: usize) {}
    fn write_u128(&mut self, bits: u128) {
        self.0 = (bits as u64 ^ (bits >> 64) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_block_sha256_is_sha256() {
        for len in 0..=130 {
            let value: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let expected: [u8; 32] = Sha256::digest(&value).into();
            assert_eq!(sha256(&value), expected, "{len} bytes");
        }
    }

    #[test]
    fn madid_bits_tell_madids_apart_exactly() {
        let a = madid_bits("6d92078a-8246-4ba4-ae5b-76104861e7dc");
        assert_eq!(a, 0x6d92078a_8246_4ba4_ae5b_76104861e7dc);
        assert_ne!(a, madid_bits("6d92078a-8246-4ba4-ae5b-76104861e7dd"));
        assert_eq!(
            madid_bits("ffffffff-ffff-ffff-ffff-ffffffffffff"),
            u128::MAX
        );
        // Every digit in every place, through the fast path and the general one alike.
        for seed in 0..2_000u128 {
            let bits = seed.wrapping_mul(0x2545_f491_4f6c_dd1d_9e37_79b9_7f4a_7c15) ^ seed;
            let hex = format!("{bits:032x}");
            let id = format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            );
            assert_eq!(madid_bits(&id), bits, "{id}");
            assert_eq!(madid_bits(&hex), bits, "{hex} (no hyphens)");
        }
    }

    #[test]
    fn digests_are_written_as_lowercase_hex() {
        let digest: [u8; 32] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        assert_eq!(lower_hex(&digest, &mut [0; 64]), hex::encode(digest));
    }

    /// Shard after shard, growing and shrinking, hashed and plain, on one thread: what is sent
    /// is always `normalize`'s answer for each value, whatever strings it was written into.
    #[test]
    fn entries_written_into_earlier_shards_strings_are_the_shards_own() {
        use crate::normalize::normalize;
        let us = Rules::new(audience_export_core::contract::PhoneCountry::parse("US").ok());
        let emails = |n: usize, tag: &str| -> Vec<String> {
            (0..n).map(|i| format!(" {tag}{i}@Example.COM")).collect()
        };
        let madids = |n: usize| -> Vec<String> {
            (0..n)
                .map(|i| format!("6D92078A-8246-4BA4-AE5B-{:012X}", i + 1))
                .collect()
        };
        let shards: Vec<(Field, Vec<String>)> = vec![
            (Field::Email, emails(300, "a")),
            (Field::Madid, madids(100)),
            (Field::Email, emails(50, "b")),
            (Field::Email, emails(700, "c")),
            (Field::Phone, vec!["(212) 736-5000".into(), "bad".into()]),
            (Field::Madid, madids(900)),
            (Field::Email, vec![]),
        ];
        for round in 0..3 {
            for (field, records) in &shards {
                let expected: Vec<String> = records
                    .iter()
                    .filter_map(|r| normalize(*field, r, &us).ok())
                    .map(|n| n.sent)
                    .collect();
                let p = prepare(*field, records, &us);
                assert_eq!(p.data, expected, "round {round}, {field}");
            }
        }
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
