//! A workspace's Facebook connection, in Redis: its tokens (sealed with `TokenCipher`, never in
//! clear), the ad accounts it may export to with their Custom Audience terms status, and whether
//! Meta still accepts it. The producer resolves a job's token here, workers resolve each shard's,
//! the finalizer marks a connection invalid, and the HTTP API and the operators' CLI write it.
//!
//! One hash per workspace, `{ns}:workspace:<id>:connection`, and an index set `{ns}:connections`
//! of the workspaces that have one (for the expiry sweep, key rotation and the health check).
//!
//! A selected ad account can become unusable while the connection stays valid: its Business
//! Manager admin removes the person (or system user) from it, or Meta disables it. That is
//! recorded per account, `unusable:<digits>` beside `selected` (`AccountUnusable`: what was found,
//! Meta's code, when, with which token), by one script (`mark_unusable`) that exactly one caller
//! sees succeed; a new selection clears it, and so does the health check once a reconnected
//! token can use the account again (`clear_unusable`).

use crate::contract::{AdAccountId, ConnectionStatus, WorkspaceId};
use crate::progress::{claim, release, set_nx_px, Claim};
use crate::redis_conn::{workspace_key, RedisConn};
use crate::telemetry::Label;
use crate::token_cipher::{CipherError, TokenCipher};
use redis::AsyncCommands;
use schemars::JsonSchema;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// A token's name in Redis, events and logs: the first 16 hex digits of its SHA-256. Tells two
/// tokens apart without revealing either.
pub fn token_fingerprint(token: &SecretString) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.expose_secret().as_bytes());
    hex::encode(&digest[..8])
}

/// The one-time notice (`Connections::claim_notice`) of the email telling whoever connected a
/// workspace that `ad_account` became unusable at `at_ms`: one per loss.
pub fn unusable_notice(ad_account: &AdAccountId, at_ms: u64) -> String {
    format!("unusable:{ad_account}:{at_ms}:email")
}

/// The key recording that Meta refused one of a workspace's tokens (`revocation` writes and
/// reads it; storing a token lifts its own).
pub fn revoked_key(namespace: &str, workspace: &WorkspaceId, fingerprint: &str) -> String {
    workspace_key(namespace, workspace, &format!("revoked:{fingerprint}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// From the OAuth dialog, long-lived (about 60 days); tied to a person's session.
    User,
    /// From Business Manager; does not expire with a person's session. Preferred when present.
    SystemUser,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::User => "user",
            TokenKind::SystemUser => "system_user",
        }
    }

    fn slot(self) -> &'static str {
        match self {
            TokenKind::User => "user",
            TokenKind::SystemUser => "system",
        }
    }
}

/// An ad account the workspace selected, whether its Custom Audience terms were accepted when
/// last checked, and whether it can be used at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdAccountStatus {
    pub id: AdAccountId,
    pub tos_accepted: bool,
    /// When it was selected or its terms last checked: a report of a loss found before this is
    /// stale (the selection re-checked it with Meta since).
    pub checked_at_ms: u64,
    /// Where to accept the terms, when they are not accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms_url: Option<String>,
    /// Set when the connection can no longer export to it (stored beside the selection, never
    /// in it: `Connections::view` fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unusable: Option<AccountUnusable>,
}

impl AdAccountStatus {
    pub fn new(id: &AdAccountId, tos_accepted: bool, checked_at_ms: u64) -> AdAccountStatus {
        AdAccountStatus {
            id: id.clone(),
            tos_accepted,
            checked_at_ms,
            terms_url: (!tos_accepted).then(|| id.terms_url()),
            unusable: None,
        }
    }
}

/// Why a selected ad account cannot be exported to: the class of what was found, a bounded
/// metric label and part of the `ad_account.unusable` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UnusableKind {
    /// Meta refused a call on the account with a permission error (codes 10, 200-299), or the
    /// token lost the `ads_management` permission.
    PermissionLost,
    /// The token's `/me/adaccounts` no longer lists the account: whoever connected was removed
    /// from it or from its Business Manager.
    NotListed,
    /// Meta reports the account disabled or closed (`account_status` 2, 100 or 101).
    Disabled,
}

impl Label for UnusableKind {
    const ALL: &'static [UnusableKind] = &[
        UnusableKind::PermissionLost,
        UnusableKind::NotListed,
        UnusableKind::Disabled,
    ];
    fn as_str(self) -> &'static str {
        match self {
            UnusableKind::PermissionLost => "permission_lost",
            UnusableKind::NotListed => "not_listed",
            UnusableKind::Disabled => "disabled",
        }
    }
}

/// A selected ad account found unusable: what was found, Meta's words, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountUnusable {
    pub kind: UnusableKind,
    /// What Meta said or the health check read (Meta's message when a call was refused).
    pub reason: String,
    /// Meta's error code and subcode, when a call was refused; None for what the health check
    /// read (`/me/adaccounts`, `account_status`).
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub subcode: Option<i64>,
    /// When it was marked: names this loss (the owner's one notice is keyed by it).
    pub at_ms: u64,
    /// The token that was refused: a reconnect brings another, which the health check tries.
    pub token_fingerprint: String,
}

impl AccountUnusable {
    /// What was found, as a clause: "Meta refused the connection's access to ad account
    /// act_1 (code 200: ...)".
    pub fn finding(&self, ad_account: &AdAccountId) -> String {
        let act = ad_account.act();
        let meta = match (self.code, self.subcode) {
            (Some(code), Some(sub)) => format!(" (code {code}, subcode {sub}: {})", self.reason),
            (Some(code), None) => format!(" (code {code}: {})", self.reason),
            _ => format!(" ({})", self.reason),
        };
        match self.kind {
            UnusableKind::PermissionLost => {
                format!("Meta refused the connection's access to ad account {act}{meta}")
            }
            UnusableKind::NotListed => format!(
                "ad account {act} is no longer among the ad accounts the workspace's Facebook connection can use{meta}"
            ),
            UnusableKind::Disabled => format!("Meta reports ad account {act} as disabled{meta}"),
        }
    }

    /// The fix, naming who needs access (`ConnectionView::grantee`).
    pub fn fix(&self, ad_account: &AdAccountId, grantee: &str) -> String {
        let act = ad_account.act();
        match self.kind {
            UnusableKind::PermissionLost | UnusableKind::NotListed => format!(
                "Ask an admin of the Business Manager that owns {act} to give {grantee} access to it (a role that may manage campaigns), then select {act} again in the workspace's Facebook connection (or reconnect Facebook)."
            ),
            UnusableKind::Disabled => format!(
                "Once Meta enables {act} again (Account Quality in Meta Business Suite says why it was disabled and how to request a review), select it again in the workspace's Facebook connection."
            ),
        }
    }
}

/// What `mark_unusable` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Marked {
    /// This call marked it: the caller counts it. The record as stored.
    Now(AccountUnusable),
    /// It was marked already (by another worker, or earlier): the record stored then.
    Already(AccountUnusable),
    /// The refused token is not the connection's any more, or the account was selected again
    /// after the finding: nothing was marked.
    Stale,
    /// No connection, or the account is not selected.
    Missing,
}

/// Why and when Meta refused the connection's token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invalidation {
    pub reason: String,
    pub code: i64,
    pub subcode: Option<i64>,
    pub at_ms: u64,
}

/// What the status API and the CLI show: everything but the tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionView {
    pub workspace_id: WorkspaceId,
    /// `valid` or `invalid`.
    pub status: ConnectionStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<Invalidation>,
    /// The kind of token every call uses: the system user's when there is one.
    pub token_kind: TokenKind,
    pub has_user_token: bool,
    pub has_system_user_token: bool,
    /// When the user token expires (Unix seconds); None for none, or one that does not expire.
    pub user_token_expires_at: Option<u64>,
    pub scopes: Vec<String>,
    /// Who connected the workspace: told when the connection breaks or is about to expire.
    pub connected_by: Option<String>,
    pub connected_at_ms: u64,
    /// Ad accounts the active token can use (`/me/adaccounts`).
    pub available_ad_accounts: Vec<AdAccountId>,
    /// Ad accounts the workspace selected for exports.
    pub ad_accounts: Vec<AdAccountStatus>,
}

impl ConnectionView {
    pub fn is_valid(&self) -> bool {
        self.status == ConnectionStatus::Valid
    }

    pub fn selected(&self, ad_account: &AdAccountId) -> Option<&AdAccountStatus> {
        self.ad_accounts.iter().find(|a| &a.id == ad_account)
    }

    /// Who must be given access to an ad account for this connection's calls to reach it: the
    /// system user whose token is used, or whoever connected.
    pub fn grantee(&self) -> String {
        match (self.token_kind, &self.connected_by) {
            (TokenKind::SystemUser, _) => {
                "the Business Manager system user whose token the workspace uses".to_owned()
            }
            (TokenKind::User, Some(who)) => who.clone(),
            (TokenKind::User, None) => "the person who connected the workspace".to_owned(),
        }
    }
}

/// The token calls of a workspace use, resolved for one job or one shard.
pub struct ActiveToken {
    pub token: SecretString,
    pub kind: TokenKind,
    pub fingerprint: String,
    /// Set when Meta refused the connection: nothing may be sent with it.
    pub invalid: Option<String>,
}

/// A freshly authorized token and what Meta said about it.
pub struct NewToken {
    pub token: SecretString,
    /// Unix seconds; 0 when it does not expire.
    pub expires_at: u64,
    pub scopes: Vec<String>,
    pub ad_accounts: Vec<AdAccountId>,
}

/// What `invalidate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidated {
    /// This call marked it invalid: the caller tells people, exactly once.
    Now,
    /// It was invalid already.
    Already,
    /// The refused token is not the connection's token any more (replaced or reconnected).
    Stale,
    /// The workspace has no connection.
    Missing,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Cipher(#[from] CipherError),
    #[error("the stored connection is corrupt: {0}")]
    Corrupt(String),
}

impl ConnectionError {
    /// Redis may come back; a key or a ciphertext will not fix itself.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConnectionError::Redis(_))
    }
}

/// Marks a connection invalid unless its active token changed or it is invalid already.
/// KEYS[1] = connection hash; ARGV = fingerprint, reason, code, subcode, at_ms.
const INVALIDATE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local active = redis.call('HGET', KEYS[1], 'system_fp')
if not active then active = redis.call('HGET', KEYS[1], 'user_fp') end
if active ~= ARGV[1] then return 'stale' end
if redis.call('HGET', KEYS[1], 'status') == 'invalid' then return 'already' end
redis.call('HSET', KEYS[1], 'status', 'invalid', 'invalid_reason', ARGV[2], 'invalid_code', ARGV[3],
  'invalid_subcode', ARGV[4], 'invalid_at_ms', ARGV[5], 'invalid_fp', ARGV[1])
return 'now'
"#;

/// Sets a hash field only if it still holds what the caller read: a read-modify-write that
/// loses to any concurrent write instead of undoing it. KEYS[1] hash; ARGV field, expected, new.
const HSET_IF: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"#;

/// Marks one selected ad account unusable unless the connection's token changed, the account is
/// not selected (or was selected again after the finding), or it is marked already: exactly one
/// caller sees `now`. KEYS[1] = connection hash; ARGV = account digits, token fingerprint,
/// record JSON, finding time (ms). Returns {outcome, stored record}.
const MARK_UNUSABLE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local active = redis.call('HGET', KEYS[1], 'system_fp')
if not active then active = redis.call('HGET', KEYS[1], 'user_fp') end
if active ~= ARGV[2] then return {'stale'} end
local selected = redis.call('HGET', KEYS[1], 'selected')
if not selected then return {'missing'} end
local found = nil
for _, a in ipairs(cjson.decode(selected)) do
  if a['id'] == ARGV[1] then found = a end
end
if not found then return {'missing'} end
if tonumber(found['checked_at_ms'] or 0) > tonumber(ARGV[4]) then return {'stale'} end
local field = 'unusable:' .. ARGV[1]
if redis.call('HSETNX', KEYS[1], field, ARGV[3]) == 1 then return {'now', ARGV[3]} end
return {'already', redis.call('HGET', KEYS[1], field)}
"#;

/// Lifts one account's mark if it is still the one the caller read (its `at_ms`), so a newer
/// finding is never erased by an older check. KEYS[1] hash; ARGV account digits, at_ms.
const CLEAR_UNUSABLE: &str = r#"
local field = 'unusable:' .. ARGV[1]
local stored = redis.call('HGET', KEYS[1], field)
if not stored then return 0 end
if tonumber(cjson.decode(stored)['at_ms']) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[1], field)
return 1
"#;

/// Replaces the selection and lifts every account's mark: a selection is checked with Meta
/// first (listed, active, terms), so what it names is usable now. KEYS[1] hash; ARGV selection.
const SELECT: &str = r#"
redis.call('HSET', KEYS[1], 'selected', ARGV[1])
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 9) == 'unusable:' then redis.call('HDEL', KEYS[1], f) end
end
return 1
"#;

/// Records the ad accounts a token can use now (the health check's `/me/adaccounts`), in the
/// slot of that token, if it is still stored. KEYS[1] hash; ARGV fingerprint, JSON list.
const REFRESH_AVAILABLE: &str = r#"
local slot = nil
if redis.call('HGET', KEYS[1], 'system_fp') == ARGV[1] then slot = 'system_available'
elseif redis.call('HGET', KEYS[1], 'user_fp') == ARGV[1] then slot = 'user_available' end
if not slot then return 0 end
redis.call('HSET', KEYS[1], slot, ARGV[2])
return 1
"#;

/// How long a sent notice is remembered: longer than a user token lives (about 60 days).
const NOTICE_TTL_SECS: u64 = 90 * 24 * 3600;

const INVALID_FIELDS: [&str; 5] = [
    "invalid_reason",
    "invalid_code",
    "invalid_subcode",
    "invalid_at_ms",
    "invalid_fp",
];

#[derive(Clone)]
pub struct Connections {
    redis: RedisConn,
    ns: String,
    /// None for roles that never see a token (the finalizer): they cannot open or seal one.
    cipher: Option<TokenCipher>,
    invalidate: redis::Script,
    hset_if: redis::Script,
    scripts: UnusableScripts,
}

/// The scripts of ad accounts' usability (see the module's doc).
#[derive(Clone)]
struct UnusableScripts {
    mark: redis::Script,
    clear: redis::Script,
    select: redis::Script,
    refresh_available: redis::Script,
}

impl UnusableScripts {
    fn new() -> UnusableScripts {
        UnusableScripts {
            mark: redis::Script::new(MARK_UNUSABLE),
            clear: redis::Script::new(CLEAR_UNUSABLE),
            select: redis::Script::new(SELECT),
            refresh_available: redis::Script::new(REFRESH_AVAILABLE),
        }
    }
}

impl Connections {
    /// On a shared connection (`ProgressStore::connection`).
    pub fn new(redis: RedisConn, namespace: &str, cipher: TokenCipher) -> Connections {
        Connections {
            redis,
            ns: namespace.to_owned(),
            cipher: Some(cipher),
            invalidate: redis::Script::new(INVALIDATE),
            hset_if: redis::Script::new(HSET_IF),
            scripts: UnusableScripts::new(),
        }
    }

    /// For a role that reads and marks connections but never uses a token (the finalizer): it
    /// needs no encryption key, so it holds none. Opening or storing a token fails with `NoKey`.
    pub fn without_tokens(redis: RedisConn, namespace: &str) -> Connections {
        Connections {
            redis,
            ns: namespace.to_owned(),
            cipher: None,
            invalidate: redis::Script::new(INVALIDATE),
            hset_if: redis::Script::new(HSET_IF),
            scripts: UnusableScripts::new(),
        }
    }

    fn cipher(&self) -> Result<&TokenCipher, CipherError> {
        self.cipher.as_ref().ok_or(CipherError::NoKey)
    }

    fn key(&self, workspace: &WorkspaceId) -> String {
        workspace_key(&self.ns, workspace, "connection")
    }

    fn index(&self) -> String {
        format!("{}:connections", self.ns)
    }

    /// Set while a workspace's connection was checked with Meta recently (see
    /// `claim_health_check`).
    fn health_key(&self, workspace: &WorkspaceId) -> String {
        workspace_key(&self.ns, workspace, "health-checked")
    }

    /// The associated data of a sealed token: its workspace and slot.
    fn context(workspace: &WorkspaceId, kind: TokenKind) -> String {
        format!("{workspace}/{}", kind.as_str())
    }

    async fn fields(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<HashMap<String, String>, ConnectionError> {
        let mut c = self.redis.clone();
        Ok(c.hgetall(self.key(workspace)).await?)
    }

    /// The connection without its tokens, or None when the workspace never connected.
    pub async fn view(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<Option<ConnectionView>, ConnectionError> {
        let f = self.fields(workspace).await?;
        if f.is_empty() {
            return Ok(None);
        }
        let get = |k: &str| f.get(k).map(String::as_str);
        let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
        let json_list = |k: &str| -> Result<Vec<AdAccountId>, ConnectionError> {
            get(k)
                .map(|v| {
                    serde_json::from_str(v).map_err(|e| ConnectionError::Corrupt(e.to_string()))
                })
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let system = get("system_token").is_some();
        let status = match get("status") {
            None | Some("valid") => ConnectionStatus::Valid,
            Some("invalid") => ConnectionStatus::Invalid,
            Some(other) => {
                return Err(ConnectionError::Corrupt(format!(
                    "status `{other}` is neither valid nor invalid"
                )))
            }
        };
        let invalid = (status == ConnectionStatus::Invalid).then(|| Invalidation {
            reason: get("invalid_reason").unwrap_or_default().to_owned(),
            code: get("invalid_code")
                .and_then(|v| v.parse().ok())
                .unwrap_or(190),
            subcode: get("invalid_subcode").and_then(|v| v.parse().ok()),
            at_ms: num("invalid_at_ms").unwrap_or(0),
        });
        let mut ad_accounts: Vec<AdAccountStatus> = get("selected")
            .map(|v| serde_json::from_str(v).map_err(|e| ConnectionError::Corrupt(e.to_string())))
            .transpose()?
            .unwrap_or_default();
        for account in &mut ad_accounts {
            account.unusable = get(&format!("{UNUSABLE_PREFIX}{}", account.id))
                .map(decode_unusable)
                .transpose()?;
        }
        Ok(Some(ConnectionView {
            workspace_id: workspace.clone(),
            status,
            invalid,
            token_kind: if system {
                TokenKind::SystemUser
            } else {
                TokenKind::User
            },
            has_user_token: get("user_token").is_some(),
            has_system_user_token: system,
            user_token_expires_at: num("user_expires_at").filter(|&e| e > 0),
            scopes: get("scopes")
                .map(|s| {
                    s.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            connected_by: get("connected_by")
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            connected_at_ms: num("connected_at_ms").unwrap_or(0),
            available_ad_accounts: json_list(if system {
                "system_available"
            } else {
                "user_available"
            })?,
            ad_accounts,
        }))
    }

    /// The token this workspace's calls use (the system user's when present), or None when the
    /// workspace has no connection.
    pub async fn active_token(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<Option<ActiveToken>, ConnectionError> {
        let mut c = self.redis.clone();
        let (status, system, user, reason): (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = redis::cmd("HMGET")
            .arg(self.key(workspace))
            .arg(&["status", "system_token", "user_token", "invalid_reason"])
            .query_async(&mut c)
            .await?;
        let (sealed, kind) = match (system, user) {
            (Some(s), _) => (s, TokenKind::SystemUser),
            (None, Some(u)) => (u, TokenKind::User),
            (None, None) => return Ok(None),
        };
        let token = self
            .cipher()?
            .open(&sealed, &Self::context(workspace, kind))?;
        Ok(Some(ActiveToken {
            fingerprint: token_fingerprint(&token),
            token,
            kind,
            invalid: (status.as_deref() == Some(ConnectionStatus::Invalid.as_str()))
                .then(|| reason.unwrap_or_else(|| "token invalid".to_owned())),
        }))
    }

    /// Stores a user token from the OAuth dialog; the connection is valid again. A system user
    /// token that Meta refused is dropped, so the new user token is the one used.
    pub async fn store_user_token(
        &self,
        workspace: &WorkspaceId,
        new: &NewToken,
        connected_by: Option<&str>,
        now_ms: u64,
    ) -> Result<(), ConnectionError> {
        let current = self.fields(workspace).await?;
        let system_refused = current.get("status").map(String::as_str)
            == Some(ConnectionStatus::Invalid.as_str())
            && current.contains_key("invalid_fp")
            && current.get("invalid_fp") == current.get("system_fp");
        let drop: &[&str] = if system_refused {
            &["system_token", "system_fp", "system_available"]
        } else {
            &[]
        };
        let fields = vec![
            ("user_expires_at", new.expires_at.to_string()),
            ("scopes", new.scopes.join(",")),
            ("connected_by", connected_by.unwrap_or_default().to_owned()),
            ("connected_at_ms", now_ms.to_string()),
        ];
        self.store_token(workspace, TokenKind::User, new, fields, drop)
            .await
    }

    /// Sets or replaces the Business Manager system user token, used for every call from now
    /// on; the connection is valid again. `connected_by`, when given, becomes who is told when
    /// the connection breaks.
    pub async fn store_system_token(
        &self,
        workspace: &WorkspaceId,
        new: &NewToken,
        connected_by: Option<&str>,
        now_ms: u64,
    ) -> Result<(), ConnectionError> {
        let mut fields = vec![("system_set_at_ms", now_ms.to_string())];
        if let Some(who) = connected_by {
            fields.push(("connected_by", who.to_owned()));
        }
        self.store_token(workspace, TokenKind::SystemUser, new, fields, &[])
            .await
    }

    /// Writes a token into its slot with `fields`, in one transaction: the connection becomes
    /// valid, `drop` fields go, and a refused-token marker of this very token is lifted (a token
    /// entered again gets its chance again: Meta will say).
    async fn store_token(
        &self,
        workspace: &WorkspaceId,
        kind: TokenKind,
        new: &NewToken,
        fields: Vec<(&str, String)>,
        drop: &[&str],
    ) -> Result<(), ConnectionError> {
        let key = self.key(workspace);
        let slot = kind.slot();
        let fingerprint = token_fingerprint(&new.token);
        let sealed = self
            .cipher()?
            .seal(&new.token, &Self::context(workspace, kind));
        let mut all: Vec<(String, String)> = vec![
            ("status".into(), ConnectionStatus::Valid.as_str().into()),
            (format!("{slot}_token"), sealed),
            (format!("{slot}_fp"), fingerprint.clone()),
            (format!("{slot}_available"), json(&new.ad_accounts)),
        ];
        all.extend(fields.into_iter().map(|(k, v)| (k.to_owned(), v)));
        let mut c = self.redis.clone();
        // Listed outside the transaction (the index is one namespace-wide key, in another
        // cluster slot), before and again after it: an entry whose connection is missing is
        // skipped by its readers, a connection missing from the index would never be
        // health-checked, and the second SADD relists it after a concurrent `disconnect`.
        let _: () = c.sadd(self.index(), workspace.as_str()).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !drop.is_empty() {
            pipe.hdel(&key, drop);
        }
        // A new token is checked with Meta again before the next export (health check).
        pipe.del(revoked_key(&self.ns, workspace, &fingerprint))
            .del(self.health_key(workspace))
            .hdel(&key, &INVALID_FIELDS)
            .hset_multiple(&key, &all);
        let _: () = pipe.query_async(&mut c).await?;
        let _: () = c.sadd(self.index(), workspace.as_str()).await?;
        Ok(())
    }

    /// Replaces the workspace's selection of ad accounts, lifting every unusable mark (the
    /// caller checked what it selects with Meta), and forgets the last health check so the next
    /// export asks Meta again.
    pub async fn select_ad_accounts(
        &self,
        workspace: &WorkspaceId,
        accounts: &[AdAccountStatus],
    ) -> Result<(), ConnectionError> {
        let mut c = self.redis.clone();
        // The marks live beside the selection, never in it.
        let stored: Vec<AdAccountStatus> = accounts
            .iter()
            .map(|a| AdAccountStatus {
                unusable: None,
                ..a.clone()
            })
            .collect();
        let selected = serde_json::to_string(&stored).expect("statuses serialize");
        let _: i64 = self
            .scripts
            .select
            .key(self.key(workspace))
            .arg(selected)
            .invoke_async(&mut c)
            .await?;
        self.forget_health_check(workspace).await
    }

    /// Marks a selected ad account unusable (see `MARK_UNUSABLE`): `Now` for exactly one caller
    /// per loss, `Already` with the stored record for the others.
    pub async fn mark_unusable(
        &self,
        workspace: &WorkspaceId,
        ad_account: &AdAccountId,
        record: &AccountUnusable,
    ) -> Result<Marked, ConnectionError> {
        let mut c = self.redis.clone();
        let json = serde_json::to_string(record).expect("a record serializes");
        let answer: Vec<String> = self
            .scripts
            .mark
            .key(self.key(workspace))
            .arg(ad_account.as_str())
            .arg(&record.token_fingerprint)
            .arg(json)
            .arg(record.at_ms)
            .invoke_async(&mut c)
            .await?;
        let stored = || -> Result<AccountUnusable, ConnectionError> {
            decode_unusable(answer.get(1).map(String::as_str).unwrap_or_default())
        };
        Ok(match answer.first().map(String::as_str) {
            Some("now") => Marked::Now(stored()?),
            Some("already") => Marked::Already(stored()?),
            Some("stale") => Marked::Stale,
            _ => Marked::Missing,
        })
    }

    /// Lifts an account's mark if it is still the one marked at `at_ms`; true when lifted.
    pub async fn clear_unusable(
        &self,
        workspace: &WorkspaceId,
        ad_account: &AdAccountId,
        at_ms: u64,
    ) -> Result<bool, ConnectionError> {
        let mut c = self.redis.clone();
        let cleared: i64 = self
            .scripts
            .clear
            .key(self.key(workspace))
            .arg(ad_account.as_str())
            .arg(at_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(cleared == 1)
    }

    /// Records the ad accounts the token `fingerprint` can use now, if it is still stored.
    pub async fn refresh_available(
        &self,
        workspace: &WorkspaceId,
        fingerprint: &str,
        accounts: &[AdAccountId],
    ) -> Result<bool, ConnectionError> {
        let mut c = self.redis.clone();
        let done: i64 = self
            .scripts
            .refresh_available
            .key(self.key(workspace))
            .arg(fingerprint)
            .arg(json(accounts))
            .invoke_async(&mut c)
            .await?;
        Ok(done == 1)
    }

    /// Claims the connection's health check for `ttl`: true when it was not checked within it,
    /// so this caller asks Meta (a burst of jobs asks once). Lifted by a new token, a new
    /// selection and `forget_health_check`.
    pub async fn claim_health_check(
        &self,
        workspace: &WorkspaceId,
        ttl: Duration,
    ) -> Result<bool, ConnectionError> {
        let mut c = self.redis.clone();
        Ok(set_nx_px(&mut c, &self.health_key(workspace), "1", ttl).await?)
    }

    /// Forgets the last health check: the next export asks Meta again.
    pub async fn forget_health_check(
        &self,
        workspace: &WorkspaceId,
    ) -> Result<(), ConnectionError> {
        let mut c = self.redis.clone();
        let _: i64 = c.del(self.health_key(workspace)).await?;
        Ok(())
    }

    /// Claims one round of the fleet's periodic health check for `lease`: true for one producer
    /// of the fleet per round.
    pub async fn claim_health_round(
        &self,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, ConnectionError> {
        let mut c = self.redis.clone();
        let key = format!("{}:connections:health-round", self.ns);
        Ok(set_nx_px(&mut c, &key, owner, lease).await?)
    }

    /// Records a fresh terms check of one selected ad account. Only if the selection did not
    /// change meanwhile (a marketer's new selection, a disconnect) — then the check is simply
    /// not recorded, and the next job asks Meta again.
    pub async fn update_terms(
        &self,
        workspace: &WorkspaceId,
        status: AdAccountStatus,
    ) -> Result<bool, ConnectionError> {
        let Some(before) = self.fields(workspace).await?.remove("selected") else {
            return Ok(false);
        };
        let mut accounts: Vec<AdAccountStatus> =
            serde_json::from_str(&before).map_err(|e| ConnectionError::Corrupt(e.to_string()))?;
        for a in accounts.iter_mut().filter(|a| a.id == status.id) {
            *a = AdAccountStatus {
                unusable: None,
                ..status.clone()
            };
        }
        let after = serde_json::to_string(&accounts).expect("statuses serialize");
        self.set_if(workspace, "selected", &before, &after).await
    }

    async fn set_if(
        &self,
        workspace: &WorkspaceId,
        field: &str,
        expected: &str,
        new: &str,
    ) -> Result<bool, ConnectionError> {
        let mut c = self.redis.clone();
        let set: i64 = self
            .hset_if
            .key(self.key(workspace))
            .arg(field)
            .arg(expected)
            .arg(new)
            .invoke_async(&mut c)
            .await?;
        Ok(set == 1)
    }

    /// Marks the connection invalid because Meta refused the token `fingerprint`, once.
    pub async fn invalidate(
        &self,
        workspace: &WorkspaceId,
        fingerprint: &str,
        reason: &str,
        code: i64,
        subcode: Option<i64>,
        at_ms: u64,
    ) -> Result<Invalidated, ConnectionError> {
        let mut c = self.redis.clone();
        let result: String = self
            .invalidate
            .key(self.key(workspace))
            .arg(fingerprint)
            .arg(reason)
            .arg(code)
            .arg(subcode.map(|s| s.to_string()).unwrap_or_default())
            .arg(at_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(match result.as_str() {
            "now" => Invalidated::Now,
            "already" => Invalidated::Already,
            "stale" => Invalidated::Stale,
            _ => Invalidated::Missing,
        })
    }

    /// Deletes the connection and its tokens.
    pub async fn disconnect(&self, workspace: &WorkspaceId) -> Result<bool, ConnectionError> {
        let mut c = self.redis.clone();
        let (deleted, _): (i64, i64) = redis::pipe()
            .atomic()
            .del(self.key(workspace))
            .del(self.health_key(workspace))
            .query_async(&mut c)
            .await?;
        // Unlisted after, outside the transaction (another cluster slot): see `store`.
        let _: () = c.srem(self.index(), workspace.as_str()).await?;
        Ok(deleted == 1)
    }

    /// Consumes a connect attempt's nonce: true the first time, false after. Kept `ttl`, as long
    /// as the attempt may be used.
    pub async fn consume_nonce(
        &self,
        nonce: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, ConnectionError> {
        let mut c = self.redis.clone();
        let key = format!("{}:oauth-state:{nonce}", self.ns);
        Ok(set_nx_px(&mut c, &key, "1", ttl).await?)
    }

    fn notice_key(&self, workspace: &WorkspaceId, what: &str) -> String {
        workspace_key(&self.ns, workspace, &format!("notice:{what}"))
    }

    /// Claims the one-time notice `what` (e.g. `invalid:<fingerprint>`, `expiry:<expires_at>`)
    /// of a workspace: whoever wins sends it, then calls `notice_sent`; a sender that dies
    /// leaves the lease to expire and the notice to the next one.
    pub async fn claim_notice(
        &self,
        workspace: &WorkspaceId,
        what: &str,
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<Claim, ConnectionError> {
        let mut c = self.redis.clone();
        Ok(claim(&mut c, &self.notice_key(workspace, what), owner, lease).await?)
    }

    /// Whether the notice `what` was sent already.
    pub async fn notice_done(
        &self,
        workspace: &WorkspaceId,
        what: &str,
    ) -> Result<bool, ConnectionError> {
        let mut c = self.redis.clone();
        let value: Option<String> = c.get(self.notice_key(workspace, what)).await?;
        Ok(value.as_deref() == Some("done"))
    }

    /// Records a notice as sent; kept longer than a user token lives.
    pub async fn notice_sent(
        &self,
        workspace: &WorkspaceId,
        what: &str,
    ) -> Result<(), ConnectionError> {
        let mut c = self.redis.clone();
        let _: () = c
            .set_ex(self.notice_key(workspace, what), "done", NOTICE_TTL_SECS)
            .await?;
        Ok(())
    }

    /// Gives a notice back after a failed attempt, so the next try may send it at once.
    pub async fn release_notice(
        &self,
        workspace: &WorkspaceId,
        what: &str,
        owner: &str,
    ) -> Result<(), ConnectionError> {
        let mut c = self.redis.clone();
        Ok(release(&mut c, &self.notice_key(workspace, what), owner).await?)
    }

    /// Workspaces that have a connection.
    pub async fn workspaces(&self) -> Result<Vec<WorkspaceId>, ConnectionError> {
        let mut c = self.redis.clone();
        let ids: Vec<String> = c.smembers(self.index()).await?;
        let mut ids: Vec<WorkspaceId> = ids
            .into_iter()
            .map(|id| WorkspaceId::parse(id).map_err(|e| ConnectionError::Corrupt(e.to_string())))
            .collect::<Result<_, _>>()?;
        ids.sort();
        Ok(ids)
    }

    /// Re-seals every stored token with the active key; returns how many were re-sealed. Run
    /// after putting a new key first in `AE_CONNECTIONS__ENCRYPTION_KEYS`; the old key may be
    /// removed once this reports nothing left.
    pub async fn reseal_all(&self) -> Result<u64, ConnectionError> {
        let mut count = 0;
        for workspace in self.workspaces().await? {
            let fields = self.fields(&workspace).await?;
            for kind in [TokenKind::User, TokenKind::SystemUser] {
                let field = format!("{}_token", kind.slot());
                let Some(stored) = fields.get(&field) else {
                    continue;
                };
                if TokenCipher::key_id_of(stored) == Some(self.cipher()?.active_key_id()) {
                    continue;
                }
                let context = Self::context(&workspace, kind);
                let token = self.cipher()?.open(stored, &context)?;
                let resealed = self.cipher()?.seal(&token, &context);
                // Not over a token stored meanwhile (a reconnect): that one is sealed already.
                if self.set_if(&workspace, &field, stored, &resealed).await? {
                    count += 1;
                }
            }
        }
        Ok(count)
    }
}

fn json(list: &[AdAccountId]) -> String {
    serde_json::to_string(list).expect("ids serialize")
}

/// The hash field of an ad account's unusable mark, before its digits.
const UNUSABLE_PREFIX: &str = "unusable:";

fn decode_unusable(stored: &str) -> Result<AccountUnusable, ConnectionError> {
    serde_json::from_str(stored)
        .map_err(|e| ConnectionError::Corrupt(format!("unusable mark: {e}")))
}
