//! Sending a shard's entries, and isolating the bad ones when Meta refuses a whole request for
//! what a few records hold. Meta answers some payload problems with a request-level error
//! (code 100) that names no record: then the entries are split in halves and each half sent
//! again, down to single entries, so every good record still arrives and only the records Meta
//! refuses on their own are left out (counted `meta_refused`, never their values).
//!
//! Adding users is a set operation at Meta, so a half sent twice (a retry of the whole shard after
//! a transient failure mid-way) adds nothing twice; the counts are recorded once per shard by the
//! done-set as always.

use crate::budget::Ticket;
use crate::upload::Deps;
use audience_export_core::connection::ActiveToken;
use audience_export_core::graph::{AddUsersResponse, ErrorClass, GraphError, Usage};
use audience_export_core::Shard;
use std::collections::BTreeMap;

/// The most calls one shard may spend isolating bad records. A shard with one bad record needs
/// about 2 × log2(10,000) ≈ 28; past this budget the entries not yet sent are counted refused
/// rather than splitting on (a payload where most records are bad is not worth 10,000 calls).
pub const MAX_ISOLATION_CALLS: usize = 64;

/// What the calls for one shard achieved.
#[derive(Debug, Default)]
pub struct Sent {
    /// Entries in requests Meta accepted.
    pub uploaded: u64,
    /// Meta's `num_received`, summed.
    pub meta_received: u64,
    /// Meta's `num_invalid_entries`, summed.
    pub meta_invalid: u64,
    /// Meta's samples of invalid entries, counted by its reason (the values dropped).
    pub meta_invalid_reasons: BTreeMap<String, u64>,
    /// Entries left out because Meta refused every request that held them (alone, or past the
    /// isolation budget).
    pub refused: u64,
    /// Meta's message for the refused entries.
    pub refusal: Option<String>,
    /// The last answer's usage headers...
    pub usage: Option<Usage>,
    /// ...and the ticket of the call they answered (`budget`).
    pub ticket: Ticket,
    /// Calls made (one, unless records were isolated).
    pub calls: usize,
}

impl Sent {
    fn add(&mut self, answer: AddUsersResponse, entries: usize, ticket: Ticket) {
        self.uploaded += entries as u64;
        self.meta_received += answer.num_received;
        self.meta_invalid += answer.num_invalid_entries;
        for reason in sample_reasons(&answer.invalid_entry_samples) {
            *self.meta_invalid_reasons.entry(reason).or_default() += 1;
        }
        if answer.usage.is_some() {
            self.usage = answer.usage;
            self.ticket = ticket;
        }
    }
}

/// The reasons of Meta's `invalid_entry_samples` (an object of sample → reason, or a list of
/// reasons); the samples themselves are values and are dropped here.
fn sample_reasons(samples: &serde_json::Value) -> Vec<String> {
    let reason = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match samples {
        serde_json::Value::Object(map) => map.values().map(reason).collect(),
        serde_json::Value::Array(list) => list.iter().map(reason).collect(),
        _ => Vec::new(),
    }
}

/// Whether an answer refuses the whole request for its content, so that a part of it may pass:
/// a bad request with code 100 ("invalid parameter") and no subcode. Code 100 with a subcode
/// says something about the audience or the call (flagged for integrity: 1713230; a missing
/// object: 33), which no split mends.
fn refuses_payload(error: &GraphError) -> bool {
    error.class() == ErrorClass::BadRequest
        && error
            .meta()
            .is_some_and(|m| m.code == Some(100) && m.error_subcode.is_none())
}

/// Sends `data` to the shard's audience: one call, or, when Meta refuses the request for its
/// content, halves down to single entries. `first` is the ticket of the slot the caller waited
/// for; every further call waits for its own. Any other failure (throttled, transient, token,
/// permission) ends it with that error and the failed call's ticket, for the caller to handle
/// as a failed upload of the whole shard.
pub async fn send(
    deps: &Deps,
    token: &ActiveToken,
    shard: &Shard,
    data: &[String],
    first: Ticket,
) -> Result<Sent, (GraphError, Ticket)> {
    let mut sent = Sent::default();
    let mut refusal: Option<GraphError> = None;
    let mut pending: Vec<&[String]> = vec![data];
    let mut ticket = first;
    while let Some(part) = pending.pop() {
        if sent.calls >= MAX_ISOLATION_CALLS {
            sent.refused += part.len() as u64 + pending.iter().map(|p| p.len() as u64).sum::<u64>();
            break;
        }
        if sent.calls > 0 {
            // Every call of the isolation takes a permit like any upload.
            ticket = deps.budget.until_ready(&shard.ad_account_id).await;
        }
        sent.calls += 1;
        let answer = deps
            .graph
            .add_users(&token.token, &shard.audience_id, shard.field.schema(), part)
            .await;
        match answer {
            Ok(answer) => sent.add(answer, part.len(), ticket),
            Err(error) if refuses_payload(&error) => {
                if part.len() == 1 {
                    sent.refused += 1;
                    sent.refusal = Some(error.user_message());
                    refusal = Some(error);
                } else {
                    refusal.get_or_insert(error);
                    let (left, right) = part.split_at(part.len() / 2);
                    // Left first: the stack is last in, first out.
                    pending.push(right);
                    pending.push(left);
                }
            }
            Err(error) => return Err((error, ticket)),
        }
    }
    match refusal {
        // Nothing got through: the shard fails with Meta's answer rather than "succeeding" empty.
        Some(error) if sent.uploaded == 0 => Err((error, ticket)),
        _ => Ok(sent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_reasons_drop_the_values() {
        let samples = serde_json::json!({"abc123": "Invalid format", "def456": "Invalid format", "x": "Too long"});
        let mut reasons = sample_reasons(&samples);
        reasons.sort();
        assert_eq!(
            reasons,
            vec!["Invalid format", "Invalid format", "Too long"]
        );
        assert!(sample_reasons(&serde_json::json!(null)).is_empty());
        assert_eq!(sample_reasons(&serde_json::json!(["Bad"])), vec!["Bad"]);
    }
}
