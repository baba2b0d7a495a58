//! A workspace's Facebook connection, in Redis: its tokens (sealed with `TokenCipher`, never in
//! clear), the ad accounts it may export to with their Custom Audience terms status, and whether
//! Meta still accepts it. The producer resolves a job's token here, workers resolve each shard's,
//! the finalizer marks a connection invalid, and the HTTP API and the operators' CLI write it.
//!
//! One hash per workspace, `{ns}:workspace:<id>:connection`, and an index set `{ns}:connections`
//! of the workspaces that have one (for the expiry sweep and key rotation).

use crate::contract::{AdAccountId, ConnectionStatus, WorkspaceId};
use crate::progress::{claim, release, Claim};
use crate::token_cipher::{CipherError, TokenCipher};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A token's name in Redis, events and logs: the first 16 hex digits of its SHA-256. Tells two
/// tokens apart without revealing either.
pub fn token_fingerprint(token: &SecretString) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.expose_secret().as_bytes());
    hex::encode(&digest[..8])
}

/// The key recording that Meta refused one of a workspace's tokens (`revocation` writes and
/// reads it; storing a token lifts its own).
pub fn revoked_key(namespace: &str, workspace: &WorkspaceId, fingerprint: &str) -> String {
    format!("{namespace}:workspace:{workspace}:revoked:{fingerprint}")
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

/// An ad account the workspace selected, and whether its Custom Audience terms were accepted
/// when last checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdAccountStatus {
    pub id: AdAccountId,
    pub tos_accepted: bool,
    pub checked_at_ms: u64,
    /// Where to accept the terms, when they are not accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms_url: Option<String>,
}

impl AdAccountStatus {
    pub fn new(id: &AdAccountId, tos_accepted: bool, checked_at_ms: u64) -> AdAccountStatus {
        AdAccountStatus {
            id: id.clone(),
            tos_accepted,
            checked_at_ms,
            terms_url: (!tos_accepted).then(|| id.terms_url()),
        }
    }
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
    redis: ConnectionManager,
    ns: String,
    /// None for roles that never see a token (the finalizer): they cannot open or seal one.
    cipher: Option<TokenCipher>,
    invalidate: redis::Script,
    hset_if: redis::Script,
}

impl Connections {
    /// On a shared connection (`ProgressStore::connection`).
    pub fn new(redis: ConnectionManager, namespace: &str, cipher: TokenCipher) -> Connections {
        Connections {
            redis,
            ns: namespace.to_owned(),
            cipher: Some(cipher),
            invalidate: redis::Script::new(INVALIDATE),
            hset_if: redis::Script::new(HSET_IF),
        }
    }

    /// For a role that reads and marks connections but never uses a token (the finalizer): it
    /// needs no encryption key, so it holds none. Opening or storing a token fails with `NoKey`.
    pub fn without_tokens(redis: ConnectionManager, namespace: &str) -> Connections {
        Connections {
            redis,
            ns: namespace.to_owned(),
            cipher: None,
            invalidate: redis::Script::new(INVALIDATE),
            hset_if: redis::Script::new(HSET_IF),
        }
    }

    fn cipher(&self) -> Result<&TokenCipher, CipherError> {
        self.cipher.as_ref().ok_or(CipherError::NoKey)
    }

    fn key(&self, workspace: &WorkspaceId) -> String {
        format!("{}:workspace:{workspace}:connection", self.ns)
    }

    fn index(&self) -> String {
        format!("{}:connections", self.ns)
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
        let ad_accounts: Vec<AdAccountStatus> = get("selected")
            .map(|v| serde_json::from_str(v).map_err(|e| ConnectionError::Corrupt(e.to_string())))
            .transpose()?
            .unwrap_or_default();
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
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !drop.is_empty() {
            pipe.hdel(&key, drop);
        }
        pipe.del(revoked_key(&self.ns, workspace, &fingerprint))
            .hdel(&key, &INVALID_FIELDS)
            .hset_multiple(&key, &all)
            .sadd(self.index(), workspace.as_str());
        let mut c = self.redis.clone();
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Replaces the workspace's selection of ad accounts.
    pub async fn select_ad_accounts(
        &self,
        workspace: &WorkspaceId,
        accounts: &[AdAccountStatus],
    ) -> Result<(), ConnectionError> {
        let mut c = self.redis.clone();
        let selected = serde_json::to_string(accounts).expect("statuses serialize");
        let _: () = c.hset(self.key(workspace), "selected", selected).await?;
        Ok(())
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
            *a = status.clone();
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
            .srem(self.index(), workspace.as_str())
            .query_async(&mut c)
            .await?;
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
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("{}:oauth-state:{nonce}", self.ns))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut c)
            .await?;
        Ok(set.is_some())
    }

    fn notice_key(&self, workspace: &WorkspaceId, what: &str) -> String {
        format!("{}:workspace:{workspace}:notice:{what}", self.ns)
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
