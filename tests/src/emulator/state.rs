//! The emulator's in-memory model: tokens, ad accounts, audiences, the call log and the queues a
//! test scripts (faults, OAuth codes and dialog approvals), with how it is seeded and inspected.
//! The rules Meta applies live in the modules named for them (`auth`, `accounts`, `oauth`,
//! `limits`, `audiences`, `listing`, `faults`), each an `impl State` block. Nothing here or there
//! awaits: handlers in `graph.rs` hold the lock only around these calls, never across an await.

use super::faults::Fault;
use super::seed::{AdAccountSeed, Config, Seed, TokenKind, TokenSeed};
use super::{AudienceView, CallRecord};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Instant;

/// Query and body parameters of a call, merged.
pub(super) type Params = HashMap<String, String>;

pub(super) struct Token {
    pub kind: TokenKind,
    /// Unix seconds; 0 for tokens that do not expire (system users).
    pub expires_at: u64,
    pub ad_accounts: HashSet<String>,
    pub revoked: Option<i64>,
    pub calls_after_revocation: u64,
    pub user_id: String,
}

pub(super) struct AdAccount {
    pub tos_accepted: bool,
    /// Meta's `account_status`: 1 active, 2 disabled, 101 closed, ... (`accounts.rs`).
    pub status: i64,
    pub budget: u64,
    pub recent: VecDeque<Instant>,
    pub total_calls: u64,
    pub throttled: u64,
}

pub(super) struct Audience {
    pub ad_account: String,
    pub name: String,
    /// As sent at creation; listed under `fields=description`.
    pub description: Option<String>,
    pub subtype: String,
    pub customer_file_source: Option<String>,
    /// Unix seconds of the creation, as Meta's `time_created`.
    pub time_created: u64,
    pub entries: HashMap<String, u32>,
    pub calls: u64,
}

pub(super) struct State {
    pub config: Config,
    pub tokens: HashMap<String, Token>,
    pub ad_accounts: HashMap<String, AdAccount>,
    /// By id. Ids are issued in increasing order with the same number of digits, so this order
    /// is creation order: the listing reads it backwards for newest first.
    pub audiences: BTreeMap<String, Audience>,
    pub calls: Vec<CallRecord>,
    /// Faults for the next add-users calls, in order, before any random one.
    pub scripted_faults: VecDeque<Fault>,
    /// Faults for the next create-audience calls, in order; creates draw no random faults.
    pub create_faults: VecDeque<Fault>,
    /// OAuth dialog codes not yet exchanged: the token each yields, and the `redirect_uri` the
    /// dialog was opened with (the exchange must name the same one), if it came from the dialog.
    pub codes: HashMap<String, (TokenSeed, Option<String>)>,
    /// People who will approve the next OAuth dialogs, in order; none → the dialog is declined.
    pub dialog_approvals: VecDeque<TokenSeed>,
    /// Recent calls per token, for the user-level limit.
    pub(super) user_calls: HashMap<String, VecDeque<Instant>>,
    pub(super) next_id: u64,
    /// Every random choice (jitter, random faults, OAuth codes, session ids), seeded from
    /// `config.seed` so a run is reproducible.
    pub(super) rng: StdRng,
}

impl State {
    pub fn new(config: Config, seed: Seed) -> State {
        let rng = StdRng::seed_from_u64(config.seed);
        let mut state = State {
            config,
            tokens: HashMap::new(),
            ad_accounts: HashMap::new(),
            audiences: BTreeMap::new(),
            calls: Vec::new(),
            scripted_faults: VecDeque::new(),
            create_faults: VecDeque::new(),
            codes: HashMap::new(),
            dialog_approvals: VecDeque::new(),
            user_calls: HashMap::new(),
            next_id: 23_850_000_000_000_000,
            rng,
        };
        for t in seed.tokens {
            state.add_token(t);
        }
        for a in seed.ad_accounts {
            state.add_ad_account(a);
        }
        state
    }

    pub fn add_token(&mut self, seed: TokenSeed) {
        self.tokens.insert(
            seed.token,
            Token {
                expires_at: match seed.kind {
                    TokenKind::SystemUser => 0,
                    TokenKind::User => now_secs() + 60 * 24 * 3600,
                },
                kind: seed.kind,
                ad_accounts: seed.ad_accounts.into_iter().collect(),
                revoked: None,
                calls_after_revocation: 0,
                user_id: seed.user_id.unwrap_or_else(|| "10000000000001".into()),
            },
        );
    }

    pub fn add_ad_account(&mut self, seed: AdAccountSeed) {
        let budget = seed.budget.unwrap_or(self.config.default_budget);
        self.ad_accounts.insert(
            seed.id,
            AdAccount {
                tos_accepted: seed.tos_accepted,
                status: ACTIVE,
                budget,
                recent: VecDeque::new(),
                total_calls: 0,
                throttled: 0,
            },
        );
    }

    /// Takes `ad_account` out of what `token` may use, as a Business Manager admin removing
    /// the person (or system user) from the account does; false for an unknown token.
    pub fn remove_access(&mut self, token: &str, ad_account: &str) -> bool {
        self.tokens
            .get_mut(token)
            .is_some_and(|t| t.ad_accounts.remove(ad_account))
    }

    /// Gives `token` the use of `ad_account` (again); false for an unknown token or account.
    pub fn grant_access(&mut self, token: &str, ad_account: &str) -> bool {
        if !self.ad_accounts.contains_key(ad_account) {
            return false;
        }
        match self.tokens.get_mut(token) {
            Some(t) => {
                t.ad_accounts.insert(ad_account.to_owned());
                true
            }
            None => false,
        }
    }

    /// Sets an ad account's `account_status` (2 disables it, 1 enables it again); false for an
    /// unknown account.
    pub fn set_account_status(&mut self, ad_account: &str, status: i64) -> bool {
        match self.ad_accounts.get_mut(ad_account) {
            Some(a) => {
                a.status = status;
                true
            }
            None => false,
        }
    }

    pub fn revoke(&mut self, token: &str, subcode: i64) -> bool {
        match self.tokens.get_mut(token) {
            Some(t) => {
                t.revoked = Some(subcode);
                true
            }
            None => false,
        }
    }

    pub fn audience_views(&self) -> Vec<AudienceView> {
        self.audiences
            .iter()
            .map(|(id, a)| AudienceView {
                id: id.clone(),
                ad_account: a.ad_account.clone(),
                name: a.name.clone(),
                description: a.description.clone(),
                subtype: a.subtype.clone(),
                customer_file_source: a.customer_file_source.clone(),
                time_created: a.time_created,
                entries: a.entries.clone(),
                calls: a.calls,
            })
            .collect()
    }

    pub(super) fn new_id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }
}

/// `account_status` of an ad account in good standing.
pub(super) const ACTIVE: i64 = 1;

pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
