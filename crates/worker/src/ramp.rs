//! Slow start after a pause. When an ad account's fleet-wide pause ends, every worker that held
//! shards back would otherwise resume at its full rate at the same moment, and the burst pushes
//! Meta's usage straight back over the threshold (or into a throttle, which costs a minute).
//! So each process, once it has seen a pause of an account, starts that account again at
//! `START_PER_SEC` calls per second and doubles the rate every `DOUBLING` until it reaches its
//! configured rate: a few seconds of ramp per pause. Per process and in memory: a process that
//! saw no pause has nothing to slow down.

use audience_export_core::contract::AdAccountId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Calls per second per process right after a pause ends.
const START_PER_SEC: f64 = 1.0;
/// How long each doubling of the rate takes.
const DOUBLING: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Ramping {
    /// When the pause ends (the latest seen).
    resume_at: Instant,
    /// When the next call may go.
    next: Instant,
}

pub struct Ramp {
    /// The configured rate per account, where the ramp ends.
    full_per_sec: f64,
    accounts: Mutex<HashMap<AdAccountId, Ramping>>,
}

impl Ramp {
    pub fn new(full_per_sec: u32) -> Ramp {
        Ramp {
            full_per_sec: f64::from(full_per_sec.max(1)),
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// The account is paused for `remaining`: ramp up once it ends.
    pub fn paused(&self, account: &AdAccountId, remaining: Duration) {
        let resume_at = Instant::now() + remaining;
        // A poisoned lock only means another upload panicked mid-update: the map is still a map.
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let entry = accounts.entry(account.clone()).or_insert(Ramping {
            resume_at,
            next: resume_at,
        });
        entry.resume_at = entry.resume_at.max(resume_at);
        entry.next = entry.next.max(entry.resume_at);
    }

    /// The rate `since` after the pause ended, or None once the ramp is over.
    fn rate(&self, since: Duration) -> Option<f64> {
        let rate = START_PER_SEC * 2f64.powf(since.as_secs_f64() / DOUBLING.as_secs_f64());
        (rate < self.full_per_sec).then_some(rate)
    }

    /// When this call may go, reserving its slot: now outside a ramp (or before the pause ends,
    /// where the caller's pause check defers the shard anyway).
    fn slot(&self, account: &AdAccountId, now: Instant) -> Option<Instant> {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let ramping = accounts.get_mut(account)?;
        if now < ramping.resume_at {
            return None;
        }
        let Some(rate) = self.rate(now - ramping.resume_at) else {
            accounts.remove(account);
            return None;
        };
        let slot = ramping.next.max(now);
        ramping.next = slot + Duration::from_secs_f64(1.0 / rate);
        Some(slot)
    }

    /// Waits for this call's turn while the account ramps up.
    pub async fn until_ready(&self, account: &AdAccountId) {
        if let Some(slot) = self.slot(account, Instant::now()) {
            tokio::time::sleep_until(slot).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn after_a_pause_calls_start_slow_and_double_until_the_full_rate() {
        let ramp = Ramp::new(10);
        let account = AdAccountId::parse("1").unwrap();
        let other = AdAccountId::parse("2").unwrap();
        let start = Instant::now();
        ramp.paused(&account, Duration::from_secs(5));
        // Before the pause ends, nothing is held here (the pause check defers).
        assert_eq!(ramp.slot(&account, start), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut calls = Vec::new();
        for _ in 0..12 {
            ramp.until_ready(&account).await;
            calls.push(Instant::now() - start - Duration::from_secs(5));
        }
        // 1 call/s at first, then faster: the first gaps are long, later ones short.
        let gaps: Vec<f64> = calls
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        assert!(gaps[0] >= 0.99, "{gaps:?}");
        assert!(gaps.last().unwrap() < &0.2, "{gaps:?}");
        assert!(gaps.windows(2).all(|g| g[1] <= g[0] + 1e-9), "{gaps:?}");
        // About log2(10) seconds later the ramp is over: no wait at all.
        tokio::time::advance(Duration::from_secs(5)).await;
        let before = Instant::now();
        ramp.until_ready(&account).await;
        assert_eq!(Instant::now(), before);
        // Another account never paused is never held.
        assert_eq!(ramp.slot(&other, Instant::now()), None);
    }
}
