//! What a call costs: its share of the rate limits and its answer time. `charge` counts a call
//! against the token's user-level window (code 17 subcode 2446079 past `user_budget`) and the ad
//! account's sliding window (code 80003 past its budget), and reports the usage figures that go
//! into `X-Business-Use-Case-Usage`, `X-Ad-Account-Usage` and `X-App-Usage`; `delay` is the
//! latency model. A refused call is never counted in the window it was refused by, so a client
//! that waits out `estimated_time_to_regain_access` gets through.

use super::failure::GraphFailure;
use super::state::{AdAccount, State};
use rand::Rng;
use std::time::{Duration, Instant};

/// Usage figures for the headers of an answer about one ad account.
#[derive(Debug, Clone)]
pub(super) struct Usage {
    pub ad_account: String,
    pub call_pct: u64,
    pub regain_minutes: u64,
    pub reset_secs: u64,
}

impl State {
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
                regain_minutes: if used >= budget && self.config.regain_in_headers {
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
            return Err((GraphFailure::throttled_user(), u));
        }
        if used >= budget {
            account.throttled += 1;
            let u = usage(used, account);
            return Err((GraphFailure::throttled_ad_account(), u));
        }
        account.recent.push_back(now);
        Ok(usage(used + 1, account))
    }

    /// Answer time: `base_ms + per_record_us × records + uniform(0, jitter_ms)`, the jitter
    /// drawn from the seeded generator.
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
}
