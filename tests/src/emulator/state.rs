//! The emulator's in-memory model and the rules it applies. Handlers in `graph.rs` translate
//! HTTP to calls here; nothing here awaits, so the lock is never held across an await.

use super::{AudienceView, CallRecord};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

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

/// A scripted answer for the next add-users call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// HTTP 500 with Meta's envelope, code 1.
    Http500,
    /// HTTP 502 with an HTML body, as proxies answer.
    HtmlBadGateway,
    /// Code 2, `is_transient: true`.
    Transient,
    /// Applied, but answered only after this long.
    Hang { ms: u64 },
    /// The connection is cut before an answer; not applied.
    Reset,
    /// Applied; the body arrives over this long.
    SlowBody { ms: u64 },
    /// Any Meta error.
    Error {
        http: u16,
        code: i64,
        subcode: Option<i64>,
        message: String,
    },
}

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
    pub budget: u64,
    pub recent: VecDeque<Instant>,
    pub total_calls: u64,
    pub throttled: u64,
}

pub(super) struct Audience {
    pub ad_account: String,
    pub name: String,
    pub subtype: String,
    pub customer_file_source: Option<String>,
    pub entries: HashMap<String, u32>,
    pub calls: u64,
}

pub(super) struct State {
    pub config: Config,
    pub tokens: HashMap<String, Token>,
    pub ad_accounts: HashMap<String, AdAccount>,
    pub audiences: BTreeMap<String, Audience>,
    pub calls: Vec<CallRecord>,
    pub scripted_faults: VecDeque<Fault>,
    /// OAuth dialog codes not yet exchanged: the token each yields, and the `redirect_uri` the
    /// dialog was opened with (the exchange must name the same one), if it came from the dialog.
    pub codes: HashMap<String, (TokenSeed, Option<String>)>,
    /// People who will approve the next OAuth dialogs, in order; none → the dialog is declined.
    pub dialog_approvals: VecDeque<TokenSeed>,
    /// Recent calls per token, for the user-level limit.
    user_calls: HashMap<String, VecDeque<Instant>>,
    next_id: u64,
    rng: StdRng,
}

/// A Graph error answer: HTTP status and Meta's envelope.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct GraphFailure {
    pub http: u16,
    pub code: i64,
    pub subcode: Option<i64>,
    pub kind: &'static str,
    pub message: String,
    pub transient: bool,
    /// An HTML body instead of JSON.
    pub html: bool,
}

impl GraphFailure {
    pub fn new(
        http: u16,
        code: i64,
        subcode: Option<i64>,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Self {
        GraphFailure {
            http,
            code,
            subcode,
            kind,
            message: message.into(),
            transient: false,
            html: false,
        }
    }

    /// Marks the failure `is_transient`, as Meta does for errors worth retrying.
    pub fn transient(mut self) -> Self {
        self.transient = true;
        self
    }

    pub fn envelope(&self) -> Value {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "code": self.code,
            "is_transient": self.transient,
            "fbtrace_id": "AEmulatorTrace",
        });
        if let Some(sub) = self.subcode {
            error["error_subcode"] = json!(sub);
            error["error_user_title"] = json!("Request failed");
            error["error_user_msg"] = json!(self.message);
        }
        json!({ "error": error })
    }
}

/// What a handler sends back: body, status, and how long to wait before answering.
pub(super) struct Answer {
    pub result: Result<Value, GraphFailure>,
    /// Entries in the request's payload, for the call log.
    pub records: usize,
    pub delay: Duration,
    pub usage: Option<Usage>,
    pub transport: Transport,
}

/// How the answer travels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Transport {
    Normal,
    /// Cut the connection instead of answering.
    Reset,
    /// Send the body in two halves, `Duration` apart.
    Slow(Duration),
}

/// Usage figures for the headers of an answer about one ad account.
#[derive(Debug, Clone)]
pub(super) struct Usage {
    pub ad_account: String,
    pub call_pct: u64,
    pub regain_minutes: u64,
    pub reset_secs: u64,
}

pub(super) type Params = HashMap<String, String>;

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
                budget,
                recent: VecDeque::new(),
                total_calls: 0,
                throttled: 0,
            },
        );
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
                subtype: a.subtype.clone(),
                customer_file_source: a.customer_file_source.clone(),
                entries: a.entries.clone(),
                calls: a.calls,
            })
            .collect()
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    pub fn check_version(&self, version: &str) -> Result<(), GraphFailure> {
        let major = version
            .strip_prefix('v')
            .and_then(|v| v.strip_suffix(".0"))
            .and_then(|v| v.parse::<u32>().ok());
        match major {
            Some(m) if (self.config.min_version..=self.config.max_version).contains(&m) => Ok(()),
            _ => Err(GraphFailure::new(
                400,
                2635,
                None,
                "OAuthException",
                format!("(#2635) You are calling a deprecated or unknown version of the Graph API ({version}). Please update to the latest version."),
            )),
        }
    }

    /// Checks the token (and `appsecret_proof`) and returns its name, counting calls made after
    /// a revocation.
    pub fn authenticate(
        &mut self,
        token: Option<&str>,
        proof: Option<&str>,
    ) -> Result<String, GraphFailure> {
        let Some(token) = token else {
            return Err(GraphFailure::new(
                400,
                104,
                None,
                "OAuthException",
                "An access token is required to request this resource.",
            ));
        };
        let Some(t) = self.tokens.get_mut(token) else {
            return Err(unparseable_token());
        };
        if let Some(subcode) = t.revoked {
            t.calls_after_revocation += 1;
            let message = match subcode {
                458 => "Error validating access token: The user has not authorized application.",
                460 => "Error validating access token: The session has been invalidated because the user changed their password or Facebook has changed the session for security reasons.",
                463 => "Error validating access token: Session has expired.",
                _ => "Error validating access token: The session is invalid.",
            };
            return Err(GraphFailure::new(
                400,
                190,
                Some(subcode),
                "OAuthException",
                message,
            ));
        }
        if let Some(secret) = &self.config.app_secret {
            match proof {
                Some(p) if p == appsecret_proof(secret, token) => {}
                Some(_) => {
                    return Err(GraphFailure::new(
                        400,
                        100,
                        None,
                        "GraphMethodException",
                        "Invalid appsecret_proof provided in the API argument",
                    ))
                }
                None if self.config.require_appsecret_proof => {
                    return Err(GraphFailure::new(
                        400,
                        100,
                        None,
                        "GraphMethodException",
                        "API calls from the server require an appsecret_proof argument",
                    ))
                }
                None => {}
            }
        }
        Ok(token.to_owned())
    }

    /// Counts a call against an ad account's window and throttles past 100%.
    /// Counts a call against the token's user-level window first (code 17 past `user_budget`),
    /// then the ad account's (code 80003 past its budget). Refused calls are not counted.
    pub fn charge(
        &mut self,
        token: &str,
        ad_account: &str,
    ) -> Result<Usage, (GraphFailure, Usage)> {
        let window = Duration::from_secs_f64(self.config.window_secs.max(0.001));
        let now = Instant::now();
        let user = self.user_calls.entry(token.to_owned()).or_default();
        while user
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            user.pop_front();
        }
        let user_limited = user.len() as u64 >= self.config.user_budget.max(1);
        if !user_limited {
            user.push_back(now);
        }
        let account = self
            .ad_accounts
            .get_mut(ad_account)
            .expect("checked by the caller");
        while account
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            account.recent.pop_front();
        }
        account.total_calls += 1;
        let budget = account.budget.max(1);
        let used = account.recent.len() as u64;
        let usage = |used: u64, account: &AdAccount| {
            let oldest = account
                .recent
                .front()
                .map(|t| window.saturating_sub(now.duration_since(*t)))
                .unwrap_or_default();
            Usage {
                ad_account: ad_account.to_owned(),
                call_pct: used * 100 / budget,
                regain_minutes: if used >= budget {
                    oldest.as_secs().div_ceil(60).max(1)
                } else {
                    0
                },
                reset_secs: oldest.as_secs(),
            }
        };
        if user_limited {
            account.throttled += 1;
            let u = usage(used, account);
            return Err((
                GraphFailure::new(
                    400,
                    17,
                    Some(2_446_079),
                    "OAuthException",
                    "(#17) User request limit reached",
                ),
                u,
            ));
        }
        if used >= budget {
            account.throttled += 1;
            let u = usage(used, account);
            return Err((
                GraphFailure::new(400, 80003, None, "OAuthException", "(#80003) There have been too many calls to this ad-account. Wait a bit and try again."),
                u,
            ));
        }
        account.recent.push_back(now);
        Ok(usage(used + 1, account))
    }

    pub fn delay(&mut self, records: usize) -> Duration {
        let l = &self.config.latency;
        let jitter = if l.jitter_ms > 0 {
            self.rng.gen_range(0..=l.jitter_ms)
        } else {
            0
        };
        Duration::from_millis(l.base_ms + jitter)
            + Duration::from_micros(l.per_record_us * records as u64)
    }

    fn account_for(&self, token: &str, ad_account: &str) -> Result<(), GraphFailure> {
        let allowed = self
            .tokens
            .get(token)
            .is_some_and(|t| t.ad_accounts.contains(ad_account));
        if !allowed || !self.ad_accounts.contains_key(ad_account) {
            return Err(GraphFailure::new(
                400,
                200,
                None,
                "OAuthException",
                format!("(#200) The user does not have permission to manage ad account act_{ad_account}, or it does not exist."),
            ));
        }
        Ok(())
    }

    fn tos_checked(&self, ad_account: &str) -> Result<(), GraphFailure> {
        if !self.ad_accounts[ad_account].tos_accepted {
            let mut f = GraphFailure::new(
                400,
                2655,
                Some(1_870_090),
                "OAuthException",
                format!("You must accept the Custom Audience terms: https://business.facebook.com/ads/manage/customaudiences/tos/?act={ad_account}"),
            );
            f.message = format!("(#2655) {}", f.message);
            return Err(f);
        }
        Ok(())
    }

    /// `POST /act_{id}/customaudiences`.
    pub fn create_audience(
        &mut self,
        token: &str,
        ad_account: &str,
        p: &Params,
    ) -> Result<Value, GraphFailure> {
        self.account_for(token, ad_account)?;
        self.tos_checked(ad_account)?;
        let name = p
            .get("name")
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| bad_param("name"))?;
        let subtype = p.get("subtype").cloned().unwrap_or_else(|| "CUSTOM".into());
        match subtype.as_str() {
            "CUSTOM" => {
                let source = p.get("customer_file_source").cloned();
                if let Some(s) = &source {
                    if ![
                        "USER_PROVIDED_ONLY",
                        "PARTNER_PROVIDED_ONLY",
                        "BOTH_USER_AND_PARTNER_PROVIDED",
                    ]
                    .contains(&s.as_str())
                    {
                        return Err(bad_param("customer_file_source"));
                    }
                }
                let id = self.new_id();
                self.audiences.insert(
                    id.clone(),
                    Audience {
                        ad_account: ad_account.into(),
                        name: name.clone(),
                        subtype,
                        customer_file_source: source,
                        entries: HashMap::new(),
                        calls: 0,
                    },
                );
                Ok(json!({ "id": id }))
            }
            "LOOKALIKE" => {
                let origin = p
                    .get("origin_audience_id")
                    .ok_or_else(|| bad_param("origin_audience_id"))?;
                let size = self
                    .audiences
                    .get(origin)
                    .map(|a| a.entries.len())
                    .ok_or_else(|| missing_object(origin))?;
                if size < 100 {
                    return Err(GraphFailure::new(
                        400,
                        2654,
                        Some(1_713_007),
                        "OAuthException",
                        "(#2654) The source audience must contain at least 100 people.",
                    ));
                }
                let id = self.new_id();
                self.audiences.insert(
                    id.clone(),
                    Audience {
                        ad_account: ad_account.into(),
                        name: name.clone(),
                        subtype,
                        customer_file_source: None,
                        entries: HashMap::new(),
                        calls: 0,
                    },
                );
                Ok(json!({ "id": id }))
            }
            _ => Err(bad_param("subtype")),
        }
    }

    /// The ad account of an audience the token may use.
    pub fn audience_account(&self, token: &str, audience_id: &str) -> Result<String, GraphFailure> {
        let account = self
            .audiences
            .get(audience_id)
            .map(|a| a.ad_account.clone())
            .ok_or_else(|| missing_object(audience_id))?;
        self.account_for(token, &account)
            .map_err(|_| missing_object(audience_id))?;
        Ok(account)
    }

    /// The next scripted or random fault for an add-users call, if any. Random faults draw from
    /// the seeded generator, so a run is reproducible.
    pub fn next_fault(&mut self) -> Option<Fault> {
        if let Some(f) = self.scripted_faults.pop_front() {
            return Some(f);
        }
        let c = &self.config;
        let table = [
            (c.error_rate_5xx, Fault::Http500),
            (c.error_rate_transient, Fault::Transient),
            (c.hang_rate, Fault::Hang { ms: c.hang_ms }),
            (c.reset_rate, Fault::Reset),
            (c.slow_rate, Fault::SlowBody { ms: c.slow_ms }),
        ];
        if table.iter().all(|(rate, _)| *rate <= 0.0) {
            return None;
        }
        let roll: f64 = self.rng.gen();
        let mut edge = 0.0;
        for (rate, fault) in table {
            edge += rate;
            if roll < edge {
                return Some(fault);
            }
        }
        None
    }

    /// The error answer of a fault that is one.
    pub fn failure(fault: &Fault) -> Option<GraphFailure> {
        Some(match fault {
            Fault::Http500 => {
                GraphFailure::new(500, 1, None, "OAuthException", "An unknown error occurred")
                    .transient()
            }
            Fault::HtmlBadGateway => {
                let mut f = GraphFailure::new(
                    502,
                    0,
                    None,
                    "",
                    "<html><body>502 Bad Gateway</body></html>",
                );
                f.html = true;
                f
            }
            Fault::Transient => GraphFailure::new(
                400,
                2,
                None,
                "OAuthException",
                "An unexpected error has occurred. Please retry your request later.",
            )
            .transient(),
            Fault::Error {
                http,
                code,
                subcode,
                message,
            } => GraphFailure::new(*http, *code, *subcode, "OAuthException", message.clone()),
            Fault::Hang { .. } | Fault::Reset | Fault::SlowBody { .. } => return None,
        })
    }

    /// `GET /oauth/access_token`: a dialog code for a short-lived user token, or
    /// `grant_type=fb_exchange_token` for a long-lived one. Authenticated by the app's id and
    /// secret, not a token.
    pub fn oauth(&mut self, p: &Params) -> Result<Value, GraphFailure> {
        let app_ok = p.get("client_id") == Some(&self.config.app_id)
            && match &self.config.app_secret {
                Some(secret) => p.get("client_secret") == Some(secret),
                None => p.contains_key("client_secret"),
            };
        if !app_ok {
            return Err(GraphFailure::new(
                400,
                101,
                None,
                "OAuthException",
                "Error validating client secret.",
            ));
        }
        if p.get("grant_type").map(String::as_str) == Some("fb_exchange_token") {
            let short = p.get("fb_exchange_token").cloned().unwrap_or_default();
            let (kind, accounts, user_id) = match self.tokens.get(&short) {
                Some(t) if t.revoked.is_none() => {
                    (t.kind, t.ad_accounts.clone(), t.user_id.clone())
                }
                _ => return Err(unparseable_token()),
            };
            let long = format!("{short}LL");
            self.tokens.insert(
                long.clone(),
                Token {
                    kind,
                    expires_at: now_secs() + 60 * 24 * 3600,
                    ad_accounts: accounts,
                    revoked: None,
                    calls_after_revocation: 0,
                    user_id,
                },
            );
            return Ok(
                json!({ "access_token": long, "token_type": "bearer", "expires_in": 60 * 24 * 3600 }),
            );
        }
        let code = p.get("code").cloned().unwrap_or_default();
        if !p.contains_key("redirect_uri") {
            return Err(bad_param("redirect_uri"));
        }
        let Some((_, dialog_redirect)) = self.codes.get(&code) else {
            return Err(GraphFailure::new(
                400,
                100,
                Some(36007),
                "OAuthException",
                "This authorization code has expired or has been used.",
            ));
        };
        if dialog_redirect
            .as_ref()
            .is_some_and(|r| Some(r) != p.get("redirect_uri"))
        {
            return Err(GraphFailure::new(
                400,
                100,
                Some(36008),
                "OAuthException",
                "Error validating verification code. Please make sure your redirect_uri is identical to the one you used in the OAuth dialog request",
            ));
        }
        let (seed, _) = self
            .codes
            .remove(&code)
            .expect("present: checked under the same lock");
        let token = seed.token.clone();
        self.add_token(seed);
        if let Some(t) = self.tokens.get_mut(&token) {
            t.expires_at = now_secs() + 2 * 3600;
        }
        Ok(json!({ "access_token": token, "token_type": "bearer", "expires_in": 2 * 3600 }))
    }

    /// `GET /dialog/oauth`: the consent dialog, played by the next queued approval. Returns where
    /// the browser is sent: `redirect_uri` with `code` and `state`, or with `error=access_denied`
    /// when nobody approves. An unknown app or a missing `redirect_uri` is an error page.
    pub fn dialog(&mut self, p: &Params) -> Result<String, String> {
        if p.get("client_id") != Some(&self.config.app_id) {
            return Err("Invalid App ID: the app does not exist.".into());
        }
        let Some(redirect) = p.get("redirect_uri").filter(|r| !r.is_empty()) else {
            return Err("URL blocked: redirect_uri is missing.".into());
        };
        let mut back = url::Url::parse(redirect).map_err(|_| "Invalid redirect_uri.".to_owned())?;
        {
            let mut q = back.query_pairs_mut();
            match self.dialog_approvals.pop_front() {
                Some(seed) => {
                    let code = format!("AQD{:016x}", self.rng.gen::<u64>());
                    self.codes
                        .insert(code.clone(), (seed, Some(redirect.clone())));
                    q.append_pair("code", &code);
                }
                None => {
                    q.append_pair("error", "access_denied")
                        .append_pair("error_reason", "user_denied")
                        .append_pair("error_description", "Permissions error");
                }
            }
            if let Some(state) = p.get("state") {
                q.append_pair("state", state);
            }
        }
        Ok(back.to_string())
    }

    /// `POST` (add) or `DELETE` (remove) `/{audience_id}/users`, with the payload parsed once by
    /// the caller.
    /// Applies a checked payload to an audience. Only this part runs under the state's lock:
    /// parsing and per-record validation happen before it, on the request's own task.
    pub fn users(
        &mut self,
        audience_id: &str,
        checked: &Checked<'_>,
        remove: bool,
        p: &Params,
    ) -> Result<Value, GraphFailure> {
        if let Some(refusal) = &checked.refusal {
            return Err(refusal.clone());
        }
        let record = self.config.record_entries;
        let audience = self
            .audiences
            .get_mut(audience_id)
            .ok_or_else(|| missing_object(audience_id))?;
        audience.calls += 1;
        if record {
            for entry in checked.accepted() {
                if remove {
                    audience.entries.remove(&entry);
                } else {
                    *audience.entries.entry(entry).or_default() += 1;
                }
            }
        }
        let session_id = p
            .get("session")
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .and_then(|s| s.get("session_id").cloned())
            .unwrap_or_else(|| json!(self.rng.gen::<u32>() as u64 * 1000));
        Ok(json!({
            "audience_id": audience_id,
            "session_id": session_id,
            "num_received": checked.payload.len(),
            "num_invalid_entries": checked.invalid,
            "invalid_entry_samples": checked.samples,
        }))
    }

    /// `GET /{audience_id}` with approximate counts.
    pub fn audience_info(&self, audience_id: &str) -> Result<Value, GraphFailure> {
        let a = self
            .audiences
            .get(audience_id)
            .ok_or_else(|| missing_object(audience_id))?;
        let n = a.entries.len() as u64;
        // Meta shows sizes only approximately: bounds around the real size.
        let (lower, upper) = if n < 1000 {
            (0, 1000)
        } else {
            (n * 9 / 10, n * 11 / 10)
        };
        Ok(json!({
            "id": audience_id,
            "name": a.name,
            "subtype": a.subtype,
            "approximate_count_lower_bound": lower,
            "approximate_count_upper_bound": upper,
            "operation_status": {"code": 200, "description": "Normal"},
        }))
    }

    pub fn tos(&self, ad_account: &str) -> Value {
        let accepted = self
            .ad_accounts
            .get(ad_account)
            .is_some_and(|a| a.tos_accepted);
        if accepted {
            json!({ "id": format!("act_{ad_account}"), "tos_accepted": { "custom_audience_tos": 1 } })
        } else {
            json!({ "id": format!("act_{ad_account}"), "tos_accepted": {} })
        }
    }

    pub fn my_ad_accounts(&self, token: &str) -> Value {
        let mut ids: Vec<&String> = self.tokens[token].ad_accounts.iter().collect();
        ids.sort();
        let data: Vec<Value> = ids
            .into_iter()
            .map(|id| json!({ "id": format!("act_{id}"), "account_id": id }))
            .collect();
        json!({ "data": data })
    }

    pub fn debug_token(&self, input: &str) -> Value {
        match self.tokens.get(input) {
            Some(t) => json!({ "data": {
                "app_id": self.config.app_id,
                "type": if t.kind == TokenKind::SystemUser { "SYSTEM_USER" } else { "USER" },
                "is_valid": t.revoked.is_none(),
                "expires_at": t.expires_at,
                "scopes": ["ads_management", "business_management"],
                "user_id": t.user_id,
            }}),
            None => {
                json!({ "data": { "is_valid": false, "error": { "code": 190, "message": "Invalid OAuth access token." } } })
            }
        }
    }
}

const KNOWN_KEYS: [&str; 17] = [
    "EMAIL",
    "EMAIL_SHA256",
    "PHONE",
    "PHONE_SHA256",
    "MOBILE_ADVERTISER_ID",
    "MADID",
    "EXTERN_ID",
    "FN",
    "LN",
    "FI",
    "CT",
    "ST",
    "ZIP",
    "COUNTRY",
    "GEN",
    "DOBY",
    "DOBM",
];

/// Meta's per-record checks: hashed keys must be SHA-256 hex; MADIDs must look like a device id.
const LOWER_HEX: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = matches!(b as u8, b'0'..=b'9' | b'a'..=b'f');
        b += 1;
    }
    table
};

fn valid_entry(key: &str, value: &str) -> bool {
    match key {
        "MOBILE_ADVERTISER_ID" | "MADID" => {
            value.len() == 36 && value.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        }
        "EXTERN_ID" => !value.is_empty(),
        // A branch-free fold over a table: this check reads every byte of every upload.
        _ => {
            value.len() == 64
                && value
                    .bytes()
                    .fold(true, |ok, b| ok & LOWER_HEX[usize::from(b)])
        }
    }
}

pub(super) fn bad_param(name: &str) -> GraphFailure {
    GraphFailure::new(
        400,
        100,
        None,
        "OAuthException",
        format!("(#100) The parameter {name} is required or invalid"),
    )
}

fn missing_object(id: &str) -> GraphFailure {
    GraphFailure::new(
        400,
        100,
        Some(33),
        "GraphMethodException",
        format!("Unsupported post request. Object with ID '{id}' does not exist, cannot be loaded due to missing permissions, or does not support this operation."),
    )
}

pub(super) fn appsecret_proof(secret: &str, token: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An add- or remove-users payload, parsed once and borrowing from the request where it can:
/// 10,000 entries per request make allocation the emulator's main cost.
pub(super) struct Payload<'a> {
    pub keys: Vec<Cow<'a, str>>,
    pub rows: Rows<'a>,
}

pub(super) enum Rows<'a> {
    Single(Vec<Cow<'a, str>>),
    Multi(Vec<Vec<Cow<'a, str>>>),
}

#[derive(Deserialize)]
struct SingleKey<'a> {
    #[serde(borrow)]
    schema: Cow<'a, str>,
    #[serde(borrow)]
    data: Vec<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct MultiKey<'a> {
    #[serde(borrow)]
    schema: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    data: Vec<Vec<Cow<'a, str>>>,
}

/// A payload after Meta's checks: the request-level refusal if any, and per row whether it is
/// valid, with the invalid count and samples.
pub(super) struct Checked<'a> {
    pub payload: Payload<'a>,
    pub refusal: Option<GraphFailure>,
    pub valid: Vec<bool>,
    pub invalid: u64,
    pub samples: serde_json::Map<String, Value>,
}

impl Checked<'_> {
    /// The valid rows as stored entries (multi-key rows joined with `|`).
    fn accepted(&self) -> Vec<String> {
        let keep = |i: usize| self.valid.get(i).copied().unwrap_or(false);
        match &self.payload.rows {
            Rows::Single(values) => values
                .iter()
                .enumerate()
                .filter(|(i, _)| keep(*i))
                .map(|(_, v)| v.to_string())
                .collect(),
            Rows::Multi(rows) => rows
                .iter()
                .enumerate()
                .filter(|(i, _)| keep(*i))
                .map(|(_, r)| r.join("|"))
                .collect(),
        }
    }
}

impl<'a> Payload<'a> {
    /// Meta's request- and record-level checks, done without the emulator's lock.
    pub fn check(self) -> Checked<'a> {
        let received = self.len();
        let refusal = if received > 10_000 {
            Some(GraphFailure::new(
                400,
                100,
                None,
                "OAuthException",
                format!("(#100) Too many entries in one request: {received} (at most 10000)"),
            ))
        } else if received == 0 {
            Some(GraphFailure::new(
                400,
                100,
                None,
                "OAuthException",
                "(#100) The data parameter is empty",
            ))
        } else {
            self.keys
                .iter()
                .find(|k| !KNOWN_KEYS.contains(&k.as_ref()))
                .map(|k| {
                    GraphFailure::new(
                        400,
                        100,
                        None,
                        "OAuthException",
                        format!("(#100) Invalid schema key: {k}"),
                    )
                })
        };
        let mut checked = Checked {
            valid: Vec::new(),
            invalid: 0,
            samples: serde_json::Map::new(),
            refusal,
            payload: self,
        };
        if checked.refusal.is_some() {
            return checked;
        }
        let keys = &checked.payload.keys;
        let verdicts: Vec<(bool, Option<String>)> = match &checked.payload.rows {
            Rows::Single(values) => values
                .iter()
                .map(|v| {
                    let ok = !v.is_empty() && valid_entry(&keys[0], v);
                    (ok, (!ok).then(|| v.to_string()))
                })
                .collect(),
            Rows::Multi(rows) => rows
                .iter()
                .map(|row| {
                    let ok = row.len() == keys.len()
                        && keys
                            .iter()
                            .zip(row)
                            .all(|(k, v)| v.is_empty() || valid_entry(k, v))
                        && row.iter().any(|v| !v.is_empty());
                    (ok, (!ok).then(|| format!("{row:?}")))
                })
                .collect(),
        };
        for (ok, sample) in verdicts {
            checked.valid.push(ok);
            if let Some(sample) = sample {
                checked.invalid += 1;
                if checked.samples.len() < 10 {
                    checked.samples.insert(sample, json!("Invalid format"));
                }
            }
        }
        checked
    }

    /// Single-key (`"schema": "EMAIL_SHA256"`) or multi-key (`"schema": [...]`) payloads. Entries
    /// that are not strings make the whole payload invalid (code 100).
    pub fn parse(raw: &'a str) -> Result<Payload<'a>, GraphFailure> {
        if let Ok(single) = serde_json::from_str::<SingleKey<'a>>(raw) {
            return Ok(Payload {
                keys: vec![single.schema],
                rows: Rows::Single(single.data),
            });
        }
        let multi: MultiKey<'a> = serde_json::from_str(raw).map_err(|_| bad_param("payload"))?;
        Ok(Payload {
            keys: multi.schema,
            rows: Rows::Multi(multi.data),
        })
    }

    pub fn len(&self) -> usize {
        match &self.rows {
            Rows::Single(v) => v.len(),
            Rows::Multi(v) => v.len(),
        }
    }
}

/// Meta's answer to a token it cannot read (unknown, or not a token at all).
fn unparseable_token() -> GraphFailure {
    GraphFailure::new(
        400,
        190,
        None,
        "OAuthException",
        "Invalid OAuth access token - Cannot parse access token",
    )
}
