//! Fleet-wide stops, in Redis. Pauses of an ad account: when Meta's usage headers pass the
//! threshold or Meta throttles, one worker pauses the account for every worker, and shards for it
//! wait in the delay queues instead of calling Meta (or being held unacked). Revoked tokens: once
//! Meta refuses a workspace's token, no worker calls Meta with it again. Keys hold a deadline or a
//! reason, and name a token only by a fingerprint, never the token.

use redis::aio::ConnectionManager;
use std::time::Duration;

/// Sets the pause unless a longer one is already in place.
const EXTEND: &str = r#"
local current = redis.call('PTTL', KEYS[1])
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  return 1
end
return 0
"#;

/// How long a revoked token stays recorded: longer than a user token lives (about 60 days).
const REVOCATION_TTL_SECS: u64 = 90 * 24 * 3600;

#[derive(Clone)]
pub struct AccountPauses {
    redis: ConnectionManager,
    ns: String,
    extend: redis::Script,
}

impl AccountPauses {
    /// On a shared connection (`ProgressStore::connection`).
    pub fn new(redis: ConnectionManager, namespace: &str) -> AccountPauses {
        AccountPauses {
            redis,
            ns: namespace.to_owned(),
            extend: redis::Script::new(EXTEND),
        }
    }

    fn key(&self, ad_account: &str) -> String {
        format!("{}:account:{ad_account}:pause", self.ns)
    }

    /// How long the account stays paused, if it is.
    pub async fn remaining(&self, ad_account: &str) -> redis::RedisResult<Option<Duration>> {
        let mut c = self.redis.clone();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(self.key(ad_account))
            .query_async(&mut c)
            .await?;
        Ok((ttl > 0).then(|| Duration::from_millis(ttl as u64)))
    }

    fn revoked_key(&self, workspace: &str, fingerprint: &str) -> String {
        crate::connection::revoked_key(&self.ns, workspace, fingerprint)
    }

    /// Records that Meta refused this workspace's token, with the reason the reports show.
    /// A new token has another fingerprint, so reconnecting lifts the stop by itself.
    pub async fn revoke_token(
        &self,
        workspace: &str,
        fingerprint: &str,
        reason: &str,
    ) -> redis::RedisResult<()> {
        let mut c = self.redis.clone();
        redis::cmd("SET")
            .arg(self.revoked_key(workspace, fingerprint))
            .arg(reason)
            .arg("EX")
            .arg(REVOCATION_TTL_SECS)
            .query_async(&mut c)
            .await
    }

    /// Why this workspace's token was refused, if it was.
    pub async fn token_revoked(
        &self,
        workspace: &str,
        fingerprint: &str,
    ) -> redis::RedisResult<Option<String>> {
        let mut c = self.redis.clone();
        redis::cmd("GET")
            .arg(self.revoked_key(workspace, fingerprint))
            .query_async(&mut c)
            .await
    }

    /// Pauses the account for at least `for_`. Returns whether this call set or extended it.
    pub async fn pause(&self, ad_account: &str, for_: Duration) -> redis::RedisResult<bool> {
        let mut c = self.redis.clone();
        let set: i64 = self
            .extend
            .key(self.key(ad_account))
            .arg(for_.as_millis().max(1) as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(set == 1)
    }
}
