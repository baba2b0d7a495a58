//! Fleet-wide pauses of an ad account, in Redis: when Meta's usage headers pass the threshold or
//! Meta throttles, one worker pauses the account for every worker, and shards for it wait in the
//! delay queues instead of calling Meta (or being held unacked). A key holds only a deadline (its
//! TTL). Refused tokens are `revocation`'s.

use crate::contract::AdAccountId;
use crate::redis_conn::RedisConn;
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

/// The key of an ad account's pause: it shares the account's hash tag, so the pace's scripts
/// (`worker::budget`) read it in the same slot.
pub fn pause_key(namespace: &str, ad_account: &AdAccountId) -> String {
    crate::redis_conn::account_key(namespace, ad_account, "pause")
}

#[derive(Clone)]
pub struct AccountPauses {
    redis: RedisConn,
    ns: String,
    extend: redis::Script,
}

impl AccountPauses {
    /// On a shared connection (`ProgressStore::connection`).
    pub fn new(redis: RedisConn, namespace: &str) -> AccountPauses {
        AccountPauses {
            redis,
            ns: namespace.to_owned(),
            extend: redis::Script::new(EXTEND),
        }
    }

    fn key(&self, ad_account: &AdAccountId) -> String {
        pause_key(&self.ns, ad_account)
    }

    /// How long the account stays paused, if it is.
    pub async fn remaining(
        &self,
        ad_account: &AdAccountId,
    ) -> redis::RedisResult<Option<Duration>> {
        let mut c = self.redis.clone();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(self.key(ad_account))
            .query_async(&mut c)
            .await?;
        Ok((ttl > 0).then(|| Duration::from_millis(ttl as u64)))
    }

    /// Pauses the account for at least `for_`. Returns whether this call set or extended it.
    pub async fn pause(
        &self,
        ad_account: &AdAccountId,
        for_: Duration,
    ) -> redis::RedisResult<bool> {
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
