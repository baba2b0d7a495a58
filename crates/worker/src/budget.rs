//! One pace per ad account for the whole fleet. Meta's budget is per ad account, whatever the
//! number of workers: N workers each allowing themselves R calls/s would send N×R. So every call
//! takes its slot from one schedule in Redis: a GCRA ("generic cell rate algorithm") whose only
//! state is the account's theoretical arrival time (TAT). Each caller reserves the next slot in
//! one script (`RESERVE`) and waits until it comes: calls leave the fleet evenly spaced at R,
//! first come first served, however many workers share the account; no burst, as before.
//!
//! The clock is Redis's own (`TIME`), so workers' clocks do not matter. A slot reserved by a
//! worker that dies before using it is lost (the account runs a little under R for one
//! interval), never doubled. The key expires once the schedule is in the past.

use audience_export_core::contract::AdAccountId;
use audience_export_core::redis_conn::RedisConn;
use std::time::Duration;

/// Reserves the next slot of an account's schedule. KEYS[1] the account's TAT (µs, Redis
/// clock); ARGV[1] the interval between calls (µs). Answers how long to wait for the slot (µs).
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local interval = tonumber(ARGV[1])
local ttl = math.floor((tat + interval - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', tat + interval), 'PX', ttl)
return math.floor(tat - now)
"#;

#[derive(Clone)]
pub struct FleetBudget {
    redis: RedisConn,
    ns: String,
    reserve: redis::Script,
    /// Microseconds between two calls to one ad account, fleet-wide.
    interval_us: u64,
}

impl FleetBudget {
    /// A schedule of `calls_per_second` per ad account for every worker of namespace `ns`.
    pub fn new(redis: RedisConn, ns: &str, calls_per_second: u32) -> FleetBudget {
        FleetBudget {
            redis,
            ns: ns.to_owned(),
            reserve: redis::Script::new(RESERVE),
            interval_us: 1_000_000 / u64::from(calls_per_second.max(1)),
        }
    }

    fn key(&self, account: &AdAccountId) -> String {
        audience_export_core::redis_conn::account_key(&self.ns, account.as_str(), "pace")
    }

    /// Waits for this call's slot of the account's fleet-wide schedule. When Redis cannot be
    /// asked, it waits one interval instead: this worker alone then keeps to R, and the call's
    /// effect cannot be recorded until Redis is back anyway.
    pub async fn until_ready(&self, account: &AdAccountId) {
        let wait = match self.reserve(account).await {
            Ok(wait) => wait,
            Err(error) => {
                tracing::warn!(message = "The fleet's pace could not be read; pacing this worker alone.", %error);
                Duration::from_micros(self.interval_us)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Reserves the next slot; how long until it comes.
    pub async fn reserve(&self, account: &AdAccountId) -> redis::RedisResult<Duration> {
        let mut c = self.redis.clone();
        let wait_us: i64 = self
            .reserve
            .key(self.key(account))
            .arg(self.interval_us)
            .invoke_async(&mut c)
            .await?;
        Ok(Duration::from_micros(wait_us.max(0) as u64))
    }
}
