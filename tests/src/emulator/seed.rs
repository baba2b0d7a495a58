//! What the emulator starts from and how it behaves: `Config` (versions, app credentials, rate
//! limits, latency, fault rates) and `Seed` (the tokens and ad accounts present at start). Plain
//! serde data, read from the `graph-emulator` binary's `--config` file and the control API; it
//! holds no rules and never changes the running model by itself (`State::new` reads it).

use serde::{Deserialize, Serialize};

/// Behaviour settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Lowest and highest accepted API major versions; others answer code 2635.
    pub min_version: u32,
    pub max_version: u32,
    pub app_id: String,
    /// When set, `appsecret_proof` is checked whenever sent.
    pub app_secret: Option<String>,
    /// Refuse calls without `appsecret_proof`.
    pub require_appsecret_proof: bool,
    /// Calls per window for ad accounts that do not set their own.
    pub default_budget: u64,
    /// Calls per window per token across all accounts (user-level limit, code 17).
    pub user_budget: u64,
    /// Length of the rate-limit window, in seconds (Meta's is an hour).
    pub window_secs: f64,
    pub latency: Latency,
    /// Seed of every random choice (jitter, fault rates), for reproducible runs.
    pub seed: u64,
    /// Share of add-users calls answered HTTP 500 (0.0 to 1.0).
    pub error_rate_5xx: f64,
    /// Share of add-users calls answered code 2, `is_transient`.
    pub error_rate_transient: f64,
    /// Share of add-users calls applied but answered only after `hang_ms` (past a client's
    /// timeout).
    pub hang_rate: f64,
    pub hang_ms: u64,
    /// Share of add-users calls whose connection is cut before the answer (not applied).
    pub reset_rate: f64,
    /// Share of add-users calls applied and answered with a body that takes `slow_ms` to arrive.
    pub slow_rate: f64,
    pub slow_ms: u64,
    /// Keep every received entry (tests); off for large benchmarks to save memory.
    pub record_entries: bool,
    /// Send `estimated_time_to_regain_access` (whole minutes, at least 1, as Meta does) when an
    /// account is over its budget. Off, it is 0: a client then waits its own pause, which lets a
    /// test with a 2-second window throttle for real without a minute-long wait.
    pub regain_in_headers: bool,
    /// Entries (as sent: hashes, MADIDs) for which Meta refuses a whole add-users request
    /// (code 100), the payload-level refusal one bad record can cause: what the workers'
    /// isolation of bad records is tested against.
    pub poison_entries: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_version: 22,
            max_version: 27,
            app_id: "1000000000000001".into(),
            app_secret: None,
            require_appsecret_proof: false,
            default_budget: 1_000_000,
            user_budget: 10_000_000,
            window_secs: 3600.0,
            latency: Latency::default(),
            seed: 1,
            error_rate_5xx: 0.0,
            error_rate_transient: 0.0,
            hang_rate: 0.0,
            hang_ms: 60_000,
            reset_rate: 0.0,
            slow_rate: 0.0,
            slow_ms: 2_000,
            record_entries: true,
            regain_in_headers: true,
            poison_entries: Vec::new(),
        }
    }
}

/// Answer time of a call: `base_ms + per_record_us * records + uniform(0, jitter_ms)`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Latency {
    pub base_ms: u64,
    pub per_record_us: u64,
    pub jitter_ms: u64,
}

/// Tokens and ad accounts present at start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Seed {
    pub tokens: Vec<TokenSeed>,
    pub ad_accounts: Vec<AdAccountSeed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    User,
    SystemUser,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSeed {
    pub token: String,
    pub kind: TokenKind,
    /// Ad account numbers (without `act_`) this token may use.
    pub ad_accounts: Vec<String>,
    #[serde(default)]
    pub user_id: Option<String>,
}

impl TokenSeed {
    pub fn user(token: &str, ad_accounts: &[&str]) -> TokenSeed {
        TokenSeed {
            token: token.into(),
            kind: TokenKind::User,
            ad_accounts: ad_accounts.iter().map(|a| a.to_string()).collect(),
            user_id: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdAccountSeed {
    pub id: String,
    #[serde(default = "yes")]
    pub tos_accepted: bool,
    /// Calls per window; the config's default when absent.
    #[serde(default)]
    pub budget: Option<u64>,
}

fn yes() -> bool {
    true
}

impl AdAccountSeed {
    pub fn new(id: &str) -> AdAccountSeed {
        AdAccountSeed {
            id: id.into(),
            tos_accepted: true,
            budget: None,
        }
    }
}
