//! A Graph API emulator for customer-list Custom Audiences, faithful to the behaviour in
//! `shared/reference/graph-api.md`: versioned paths, Meta's error envelope and codes, token and
//! ad-account checks, the 10,000-record limit, per-record validation, per-ad-account rate limits
//! with the real usage headers, a latency model, and injectable faults. Tests embed it on a free
//! port and inspect what each audience received; the `graph-emulator` binary serves the same
//! thing for the demo and the benchmarks, with a control API under `/_emulator/`.
//!
//! It never forwards anything anywhere: it is a closed, in-memory model.

mod accounts;
mod audiences;
mod auth;
mod control;
mod failure;
mod faults;
mod graph;
mod limits;
mod listing;
mod oauth;
mod payload;
mod seed;
mod state;

pub use faults::Fault;
pub use seed::{AdAccountSeed, Config, Latency, Seed, TokenKind, TokenSeed};

use state::State;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// A running emulator. Dropping it does not stop it; call `stop` or cancel its token.
#[derive(Clone)]
pub struct Emulator {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

/// What one audience holds, for assertions.
#[derive(Debug, Clone, PartialEq)]
pub struct AudienceView {
    pub id: String,
    pub ad_account: String,
    pub name: String,
    pub description: Option<String>,
    pub subtype: String,
    pub customer_file_source: Option<String>,
    /// Unix seconds of the creation.
    pub time_created: u64,
    /// Entry (hash or MADID) → times it was sent.
    pub entries: HashMap<String, u32>,
    pub calls: u64,
}

/// One Graph call as the emulator saw it, for assertions on who called what.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    pub method: String,
    /// The path without the version, e.g. `act_1/customaudiences`.
    pub path: String,
    pub token: Option<String>,
    pub ad_account: Option<String>,
    /// Meta's error code, or None on success.
    pub error_code: Option<i64>,
    pub records: usize,
    /// When the call arrived (after authentication, when it was charged).
    pub at: std::time::Instant,
}

impl Emulator {
    /// Starts on `addr` (port 0 for a free one) with `config` and `seed`.
    pub async fn start(addr: SocketAddr, config: Config, seed: Seed) -> std::io::Result<Emulator> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::new(config, seed)));
        let stop = CancellationToken::new();
        let app = graph::router(state.clone()).merge(control::router(state.clone()));
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
        });
        Ok(Emulator { addr, state, stop })
    }

    /// An emulator on a free loopback port with one user token that may use `ad_account`.
    pub async fn with_token(token: &str, ad_account: &str) -> Emulator {
        let seed = Seed {
            tokens: vec![TokenSeed::user(token, &[ad_account])],
            ad_accounts: vec![AdAccountSeed::new(ad_account)],
        };
        Emulator::start(([127, 0, 0, 1], 0).into(), Config::default(), seed)
            .await
            .expect("binding a loopback port")
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A poisoned lock means a handler panicked; the emulator's state is then suspect anyway.
        let mut state = self.state.lock().expect("emulator state lock");
        f(&mut state)
    }

    pub fn audiences(&self) -> Vec<AudienceView> {
        self.with(|s| s.audience_views())
    }

    pub fn audience(&self, id: &str) -> Option<AudienceView> {
        self.with(|s| s.audience_views().into_iter().find(|a| a.id == id))
    }

    pub fn calls(&self) -> Vec<CallRecord> {
        self.with(|s| s.calls.clone())
    }

    pub fn add_token(&self, seed: TokenSeed) {
        self.with(|s| s.add_token(seed))
    }

    pub fn add_ad_account(&self, seed: AdAccountSeed) {
        self.with(|s| s.add_ad_account(seed))
    }

    /// Takes `ad_account` out of `token`'s access, as a Business Manager admin removing whoever
    /// connected does: `/me/adaccounts` no longer lists it, calls on it answer code 200, uploads
    /// to its audiences code 100 subcode 33. False for an unknown token or an account it could
    /// not use anyway.
    pub fn remove_access(&self, token: &str, ad_account: &str) -> bool {
        self.with(|s| s.remove_access(token, ad_account))
    }

    /// Gives `token` the use of `ad_account` (again).
    pub fn grant_access(&self, token: &str, ad_account: &str) -> bool {
        self.with(|s| s.grant_access(token, ad_account))
    }

    /// Sets `ad_account`'s `account_status`: 2 disables it (still listed, with that status; calls
    /// on it refused), 1 enables it again.
    pub fn set_account_status(&self, ad_account: &str, status: i64) -> bool {
        self.with(|s| s.set_account_status(ad_account, status))
    }

    /// Every later call with `token` answers code 190 with `subcode`.
    pub fn revoke(&self, token: &str, subcode: i64) -> bool {
        self.with(|s| s.revoke(token, subcode))
    }

    /// Calls made with `token` after it was revoked.
    pub fn calls_after_revocation(&self, token: &str) -> u64 {
        self.with(|s| {
            s.tokens
                .get(token)
                .map(|t| t.calls_after_revocation)
                .unwrap_or(0)
        })
    }

    /// Registers an OAuth dialog code: exchanging it yields `seed`'s token (a simulated dialog).
    pub fn authorize(&self, code: &str, seed: TokenSeed) {
        self.with(|s| s.codes.insert(code.to_owned(), (seed, None)));
    }

    /// The next OAuth dialog is approved by the person whose token `seed` describes: the
    /// browser comes back to `redirect_uri` with a code that exchanges for that token.
    pub fn approve_next_dialog(&self, seed: TokenSeed) {
        self.with(|s| s.dialog_approvals.push_back(seed))
    }

    /// Queues faults answered, in order, to the next add-users calls.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.with(|s| s.scripted_faults.extend(faults))
    }

    /// Queues faults answered, in order, to the next create-audience calls
    /// (`POST /act_{id}/customaudiences`): a `Hang` creates the audience and answers past the
    /// client's timeout, the case listing the account's audiences recovers from.
    pub fn inject_on_create(&self, faults: impl IntoIterator<Item = Fault>) {
        self.with(|s| s.create_faults.extend(faults))
    }

    /// Changes the configuration in place (window, user budget, fault rates...).
    pub fn configure(&self, change: impl FnOnce(&mut Config)) {
        self.with(|s| change(&mut s.config))
    }

    pub fn set_latency(&self, latency: Latency) {
        self.with(|s| s.config.latency = latency)
    }

    pub fn set_budget(&self, ad_account: &str, calls_per_window: u64) {
        self.with(|s| {
            if let Some(a) = s.ad_accounts.get_mut(ad_account) {
                a.budget = calls_per_window;
            }
        })
    }

    /// (calls, throttled calls) of an ad account.
    pub fn account_stats(&self, ad_account: &str) -> (u64, u64) {
        self.with(|s| {
            s.ad_accounts
                .get(ad_account)
                .map(|a| (a.total_calls, a.throttled))
                .unwrap_or((0, 0))
        })
    }
}
