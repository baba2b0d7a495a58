//! One pace per ad account for the whole fleet (`worker::budget::FleetBudget`), on the real
//! Redis: workers that each keep their own schedule would together send N times the rate.

use audience_export_core::redis_conn::connect as connect_redis;
use audience_export_harness::app::account;
use audience_export_worker::budget::FleetBudget;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_one_schedule_per_ad_account() {
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let url = "redis://127.0.0.1:6379/";
    // Two "workers", each with its own connection, as two processes have.
    let a = FleetBudget::new(connect_redis(url).await.unwrap(), &ns, 20);
    let b = FleetBudget::new(connect_redis(url).await.unwrap(), &ns, 20);
    let (act, other) = (account("555"), account("556"));
    let mut waits = Vec::new();
    for i in 0..40 {
        let budget = if i % 2 == 0 { &a } else { &b };
        waits.push(budget.reserve(&act).await.unwrap());
    }
    // 40 calls at 20/s fleet-wide: the last slot is about 39 intervals (1.95 s) away. Two
    // schedules of 20/s each would put it at about 0.95 s.
    let last = *waits.last().unwrap();
    assert!(last >= Duration::from_millis(1_850), "{last:?}");
    assert!(last <= Duration::from_millis(2_100), "{last:?}");
    // Evenly spaced: each slot 50 ms after the one before (Redis's clock moves a little).
    for pair in waits.windows(2) {
        let gap = pair[1].saturating_sub(pair[0]);
        assert!(gap >= Duration::from_millis(40), "{waits:?}");
    }
    // Another ad account has its own schedule.
    assert!(a.reserve(&other).await.unwrap() < Duration::from_millis(10));
}
