//! One pace per ad account for the whole fleet, moved by Meta's usage (`worker::budget`), on
//! the real Redis: workers that each kept their own schedule would together send N times the
//! rate, and a pace that ignored the usage would either waste a budget that grew or run into a
//! budget that shrank. The controller is time-based (Redis's clock), so the waits below are the
//! time it steers by, not synchronisation.

use audience_export_core::graph::Usage;
use audience_export_core::redis_conn::connect as connect_redis;
use audience_export_harness::app::account;
use audience_export_worker::budget::{Controls, FleetBudget, Observed, Slot, Ticket};
use std::time::Duration;
use tokio::time::Instant;

const URL: &str = "redis://127.0.0.1:6379/";

async fn budget(controls: Controls) -> (FleetBudget, String) {
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let budget = FleetBudget::new(connect_redis(URL).await.unwrap(), &ns, controls);
    (budget, ns)
}

fn controls(start: u32, max: u32) -> Controls {
    Controls {
        start_per_sec: start,
        max_per_sec: max,
        target_pct: 96,
        band_pct: 16,
        first_throttle_pause: Duration::from_millis(100),
        longest_throttle_pause: Duration::from_millis(1_000),
        window: None,
    }
}

/// `controls`, with Meta's window known.
fn windowed(start: u32, max: u32, window: Duration) -> Controls {
    Controls {
        window: Some(window),
        longest_throttle_pause: Duration::from_secs(5),
        ..controls(start, max)
    }
}

fn usage(percent: u64) -> Usage {
    Usage {
        percent,
        ..Usage::default()
    }
}

/// Books the slots numbered `tickets`, in order, waiting for each.
async fn book(
    budget: &FleetBudget,
    act: &audience_export_core::contract::AdAccountId,
    tickets: std::ops::RangeInclusive<u64>,
) {
    for t in tickets {
        assert_eq!(budget.until_ready(act).await, Ticket(t));
    }
}

/// Feeds the answer to `ticket`; the pause it calls for.
async fn pause_after(
    budget: &FleetBudget,
    act: &audience_export_core::contract::AdAccountId,
    ticket: Ticket,
    usage: &Usage,
    throttled: bool,
) -> Duration {
    budget
        .observe(act, ticket, Some(usage), throttled)
        .await
        .unwrap()
        .and_then(|o| o.pause)
        .expect("a pause")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_one_schedule_per_ad_account() {
    let (a, ns) = budget(Controls::fixed(20)).await;
    // A second "worker", with its own connection, as a second process has.
    let b = FleetBudget::new(connect_redis(URL).await.unwrap(), &ns, Controls::fixed(20));
    let (act, other) = (account("555"), account("556"));
    let start = Instant::now();
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let budget = if i % 2 == 0 { a.clone() } else { b.clone() };
            let act = act.clone();
            tokio::spawn(async move {
                budget.until_ready(&act).await;
                Instant::now() - start
            })
        })
        .collect();
    let mut times = Vec::new();
    for call in calls {
        times.push(call.await.unwrap());
    }
    times.sort();
    // 40 calls at 20/s fleet-wide: the n-th never before n intervals (50 ms each, less Redis's
    // clock moving a little). Two schedules of 20/s each would let the 40th go at 0.95 s.
    for (n, t) in times.iter().enumerate() {
        let earliest =
            Duration::from_millis(50 * n as u64).saturating_sub(Duration::from_millis(15));
        assert!(*t >= earliest, "call {n} at {t:?}: {times:?}");
    }
    assert!(times[39] <= Duration::from_millis(3_000), "{times:?}");
    // Another ad account has its own schedule.
    assert_eq!(
        a.reserve(&other).await.unwrap(),
        Slot::Reserved(Duration::ZERO, Ticket(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_beyond_the_horizon_is_not_booked() {
    let (budget, _) = budget(Controls::fixed(50)).await;
    let act = account("557");
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(budget.reserve(&act).await.unwrap());
    }
    // 20 ms apart: slots 0, 20 and 40 ms are booked (within 50 ms); the fourth (60 ms) is
    // not, and asking again books nothing either: an answer meanwhile may change the rate.
    let booked = answers
        .iter()
        .filter(|a| matches!(a, Slot::Reserved(..)))
        .count();
    assert_eq!(booked, 3, "{answers:?}");
    assert!(
        matches!(answers[3], Slot::Later(w) if w <= Duration::from_millis(20)),
        "{answers:?}"
    );
    assert!(matches!(answers[5], Slot::Later(_)), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_grows_while_usage_stays_low_up_to_its_maximum() {
    let (budget, _) = budget(controls(10, 40)).await;
    let (low, busy, silent) = (account("560"), account("561"), account("562"));
    let start = Instant::now();
    let (mut grown, mut held) = (0.0, 0.0);
    while start.elapsed() < Duration::from_millis(2_500) {
        grown = read(&budget, &low, Ticket::UNKNOWN, 10).await.pace_per_sec;
        held = read(&budget, &busy, Ticket::UNKNOWN, 85).await.pace_per_sec;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Doubling every second from 10, capped at 40; inside the band (80-96%), no growth.
    assert!((39.0..=40.0).contains(&grown), "{grown}");
    assert_eq!(held, 10.0);
    // An answer without usage headers steers nothing.
    assert_eq!(
        budget
            .observe(&silent, Ticket::UNKNOWN, None, false)
            .await
            .unwrap(),
        None
    );
    // And a low usage lets slots go at the grown rate: 40/s, 25 ms apart.
    let first = budget.reserve(&low).await.unwrap();
    let second = budget.reserve(&low).await.unwrap();
    assert_eq!(first, Slot::Reserved(Duration::ZERO, Ticket(1)));
    assert!(
        matches!(second, Slot::Reserved(w, Ticket(2)) if w >= Duration::from_millis(20) && w <= Duration::from_millis(30)),
        "{second:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_the_target_the_pace_falls_to_its_floor() {
    let (budget, _) = budget(controls(60, 60)).await;
    let (full, half) = (account("563"), account("564"));
    read(&budget, &full, Ticket::UNKNOWN, 96).await;
    read(&budget, &half, Ticket::UNKNOWN, 88).await;
    // At the target: 5% of 60/s, 3 calls a second; the next slot (333 ms after the first,
    // less the time between the two calls) is beyond the 50 ms horizon.
    let first = Instant::now();
    assert_eq!(
        budget.reserve(&full).await.unwrap(),
        Slot::Reserved(Duration::ZERO, Ticket(1))
    );
    let next = budget.reserve(&full).await.unwrap();
    let between = first.elapsed().as_secs_f64();
    assert!(
        matches!(next, Slot::Later(w) if w.as_secs_f64() >= 0.283 - between - 0.002),
        "the floor is 3 calls a second: {next:?}"
    );
    // Halfway into the band: half the rate, 33 ms apart.
    let first = Instant::now();
    assert_eq!(
        budget.reserve(&half).await.unwrap(),
        Slot::Reserved(Duration::ZERO, Ticket(1))
    );
    let next = budget.reserve(&half).await.unwrap();
    let between = first.elapsed().as_secs_f64();
    assert!(
        matches!(next, Slot::Reserved(w, _) if w.as_secs_f64() >= 0.0333 - between - 0.002 && w <= Duration::from_millis(34)),
        "half the rate: {next:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttles_pause_the_account_longer_while_meta_keeps_refusing() {
    let (budget, _) = budget(controls(20, 20)).await;
    let act = account("565");
    let throttled = |b: &FleetBudget, u: Option<Usage>| {
        let (b, act) = (b.clone(), act.clone());
        async move {
            b.observe(&act, Ticket::UNKNOWN, u.as_ref(), true)
                .await
                .unwrap()
                .and_then(|o| o.pause)
                .expect("a pause")
        }
    };
    assert_eq!(throttled(&budget, None).await, Duration::from_millis(100));
    // Another call already on the wire, refused too: the same pause, not a longer one.
    assert!(throttled(&budget, None).await <= Duration::from_millis(100));
    // The probe after the pause refused again: twice as long, then four times.
    tokio::time::sleep(Duration::from_millis(110)).await;
    assert_eq!(throttled(&budget, None).await, Duration::from_millis(200));
    tokio::time::sleep(Duration::from_millis(210)).await;
    assert_eq!(throttled(&budget, None).await, Duration::from_millis(400));
    // Never longer than the longest pause...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1_010)).await;
        assert!(throttled(&budget, None).await <= Duration::from_millis(1_000));
    }
    // ...nor than Meta's regain estimate; and never shorter than its reset time.
    tokio::time::sleep(Duration::from_millis(1_010)).await;
    let regain = Usage {
        percent: 100,
        regain: Some(Duration::from_millis(300)),
        reset: None,
    };
    assert_eq!(
        throttled(&budget, Some(regain)).await,
        Duration::from_millis(300)
    );
    // A call through with room in the window: no pause, and the next throttle starts over...
    tokio::time::sleep(Duration::from_millis(310)).await;
    assert_eq!(read(&budget, &act, Ticket::UNKNOWN, 50).await.pause, None);
    let reset = Usage {
        percent: 100,
        regain: None,
        reset: Some(Duration::from_millis(700)),
    };
    assert_eq!(
        throttled(&budget, Some(reset)).await,
        Duration::from_millis(700)
    );
    // ...and a call through that filled the window pauses the account for a probe's time.
    tokio::time::sleep(Duration::from_millis(710)).await;
    assert_eq!(
        read(&budget, &act, Ticket::UNKNOWN, 100).await.pause,
        Some(Duration::from_millis(100))
    );
}

/// Reserves slots until the first refusal; the tickets booked.
async fn book_until_refused(
    budget: &FleetBudget,
    act: &audience_export_core::contract::AdAccountId,
) -> Vec<u64> {
    let mut tickets = Vec::new();
    while let Slot::Reserved(_, Ticket(t)) = budget.reserve(act).await.unwrap() {
        tickets.push(t);
    }
    tickets
}

/// A new account's controller at 10,000 calls/s (so that the 50 ms booking horizon never binds
/// here: what refuses a slot is the usage predicted from the calls on the wire), with five calls
/// answered 0% after the first and 4% after the fifth: a call costs 1% of the budget.
async fn one_percent_a_call() -> (FleetBudget, audience_export_core::contract::AdAccountId) {
    let (budget, _) = budget(controls(10_000, 10_000)).await;
    let act = account("566");
    for t in 1..=5 {
        assert!(
            matches!(budget.reserve(&act).await.unwrap(), Slot::Reserved(_, Ticket(n)) if n == t)
        );
    }
    read(&budget, &act, Ticket(1), 0).await;
    read(&budget, &act, Ticket(5), 4).await;
    (budget, act)
}

/// Feeds an answer with `percent` usage, to the call numbered `ticket`; what it did.
async fn read(
    budget: &FleetBudget,
    act: &audience_export_core::contract::AdAccountId,
    ticket: Ticket,
    percent: u64,
) -> Observed {
    budget
        .observe(act, ticket, Some(&usage(percent)), false)
        .await
        .unwrap()
        .expect("a usage to steer by")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_the_wire_count_against_the_ceiling() {
    let (budget, act) = one_percent_a_call().await;
    // At 4% with nothing else on the wire, 95 more calls fit under the ceiling (99%): tickets 6
    // to 100, and not one more until an answer says where the usage is. A pace that ignored the
    // calls on the wire would book on, at its floor but without end.
    assert_eq!(
        book_until_refused(&budget, &act).await,
        (6..=100).collect::<Vec<_>>()
    );
    // An older answer arriving late says nothing new, nor does one whose ticket this schedule
    // never handed out (from before its state expired): still refused.
    read(&budget, &act, Ticket(60), 59).await;
    read(&budget, &act, Ticket(10_000), 4).await;
    assert!(matches!(
        budget.reserve(&act).await.unwrap(),
        Slot::Later(_)
    ));
    // The answer to the last of them says the window emptied meanwhile (2%): 97 more fit.
    read(&budget, &act, Ticket(100), 2).await;
    assert_eq!(
        book_until_refused(&budget, &act).await,
        (101..=197).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_above_the_prediction_raises_the_cost_of_a_call() {
    let (budget, act) = one_percent_a_call().await;
    // The sixth call's answer says 10% where 5% was due: the budget halved (or someone else
    // spends it), a call now costs 2%, and only 44 more fit: 10 + 44 × 2 ≤ 99. At the old cost
    // 89 would have gone out, all of them into a window with no room.
    assert!(matches!(
        budget.reserve(&act).await.unwrap(),
        Slot::Reserved(_, Ticket(6))
    ));
    read(&budget, &act, Ticket(6), 10).await;
    assert_eq!(
        book_until_refused(&budget, &act).await,
        (7..=50).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_schedule_still_sends_a_probe_once_its_reading_is_stale() {
    let (budget, act) = one_percent_a_call().await;
    book_until_refused(&budget, &act).await;
    // Every call's answer may be lost (a worker killed mid-call): without a probe the account
    // would wait forever. One call goes once the freshest reading is a second old, then none
    // again for as long.
    let start = Instant::now();
    let ticket = tokio::time::timeout(Duration::from_secs(5), budget.until_ready(&act))
        .await
        .expect("a probe within 5 s");
    let waited = start.elapsed();
    assert_eq!(ticket, Ticket(101));
    assert!(
        waited >= Duration::from_millis(700) && waited <= Duration::from_millis(2_000),
        "{waited:?}"
    );
    assert!(matches!(
        budget.reserve(&act).await.unwrap(),
        Slot::Later(_)
    ));
}

/// A new account's controller at 20 calls/s at most (1 call/s at the target, its floor) whose
/// call costs 1% (90% after the first of five calls, 94% after the fifth), and the sixth call's
/// answer, a second later, at `percent`: the rate calls leave the window it reports, and how
/// long (at least) it was measured over.
async fn a_second_later_at(
    percent: u64,
    act: &audience_export_core::contract::AdAccountId,
) -> (FleetBudget, f64, f64) {
    let (budget, _) = budget(controls(20, 20)).await;
    book(&budget, act, 1..=5).await;
    read(&budget, act, Ticket(1), 90).await;
    assert_eq!(read(&budget, act, Ticket(5), 94).await.leave_per_sec, 0.0);
    // The controller's own time: the rate is measured over a second at least.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = Instant::now();
    assert_eq!(budget.until_ready(act).await, Ticket(6));
    let leave = read(&budget, act, Ticket(6), percent).await.leave_per_sec;
    (budget, leave, 1.0 + before.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_target_the_pace_keeps_up_with_the_calls_leaving_the_window() {
    // The sixth call's answer says 80%: one call more, 14 points less, so 15 calls left the
    // window in that second (half of it taken: the measure is smoothed).
    let act = account("567");
    let (budget, leave, span) = a_second_later_at(80, &act).await;
    assert!(
        leave >= 7.5 / span - 0.5 && leave <= 7.5,
        "{leave} calls/s leave, measured over {span:.2} s"
    );
    // The calls booked since take the predicted usage to the target (80 + 16 × 1%)...
    book(&budget, &act, 7..=22).await;
    // ...where the next calls go as fast as the window frees, not one a second: at a pace that
    // ignored the calls leaving, a full window stayed full while the export waited.
    let start = Instant::now();
    book(&budget, &act, 23..=24).await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs_f64(1.0 / leave) && waited <= Duration::from_millis(700),
        "two calls at the target took {waited:?}, at {leave} calls/s leaving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_calls_leave_never_takes_the_pace_past_its_maximum() {
    // The sixth call's answer says 10%: 85 calls left in that second (reservations a pause
    // deferred count as sent too), half of it taken, 42 calls/s, more than the fleet may ever
    // send to this account (20).
    let (_, leave, _) = a_second_later_at(10, &account("568")).await;
    assert_eq!(leave, 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pace_goes_little_above_what_the_budget_sustains() {
    // A 10 s window, and ten calls at up to 100 calls/s: the first answered at 1%, the tenth at
    // 10%. A call costs 1% and the usage is far below the target, so a pace read from the usage
    // alone would go on at 100 calls/s and fill the window in a second, to wait nine (and the
    // burst would come back every window). Ten calls in the window at 10%: the budget sustains
    // 100 calls per 10 s, 10 calls/s, and the pace goes at most 10% above it.
    let (budget, _) = budget(windowed(100, 100, Duration::from_secs(10))).await;
    let act = account("569");
    book(&budget, &act, 1..=10).await;
    read(&budget, &act, Ticket(1), 1).await;
    let sustained = read(&budget, &act, Ticket(10), 10).await.sustained_per_sec;
    assert!((9.9..=10.1).contains(&sustained), "{sustained} calls/s");
    let start = Instant::now();
    book(&budget, &act, 11..=13).await;
    // Three slots at 11 calls/s: the second and third 91 ms apart (10 ms at 100 calls/s).
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(170) && waited <= Duration::from_millis(400),
        "{waited:?}"
    );
}

/// A 2 s window and ten calls at 100 calls/s (10 ms apart), the tenth answered at `usage`: when
/// the pause it calls for ends, counted from the first call.
async fn pause_after_ten_calls(act: &str, usage: &Usage, throttled: bool) -> Duration {
    let (budget, _) = budget(windowed(100, 100, Duration::from_secs(2))).await;
    let act = account(act);
    let start = Instant::now();
    book(&budget, &act, 1..=10).await;
    start.elapsed() + pause_after(&budget, &act, Ticket(10), usage, throttled).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_window_is_waited_out_until_enough_of_its_calls_have_left() {
    // A 2 s window, ten calls 10 ms apart, and the tenth refused at 200%: the budget was cut
    // to half of what the window holds. Six of the ten must leave for the usage to fall under
    // the ceiling (200 - 6 × 20 = 80%), the sixth 2 s after it was sent. Probing instead after
    // the first pause (100 ms here) would be refused, again and again while the window drains.
    let until = pause_after_ten_calls("570", &usage(200), true).await;
    // The sixth slot went 50 ms after the first; the pause ends 100 ms after it leaves.
    assert!(
        until >= Duration::from_millis(2_100) && until <= Duration::from_millis(2_300),
        "the account waits until {until:?} after the first call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_an_answer_filled_is_waited_out_until_one_of_its_calls_has_left() {
    // A 2 s window, ten calls 10 ms apart, and the tenth answered (not refused) at 100%: it took
    // the window's last room. No call fits before the first of the ten leaves, 2 s after it was
    // sent: a probe after the first pause (100 ms here), or after Meta's `reset_time_duration`
    // (whole seconds, rounded down: 1 s here), would be refused.
    let full = Usage {
        percent: 100,
        reset: Some(Duration::from_secs(1)),
        ..Usage::default()
    };
    let until = pause_after_ten_calls("571", &full, false).await;
    assert!(
        until >= Duration::from_millis(2_050) && until <= Duration::from_millis(2_250),
        "the account waits until {until:?} after the first call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_account_books_no_slot() {
    // A slot booked during a pause is never used (the shard is deferred), yet it would count
    // among the fleet's calls in the window, and its number as a call on the wire: the window
    // would seem to empty before it does. So nothing is booked while either pause lasts: the
    // controller's (set with the answer that called for it) or the fleet-wide one.
    let (budget, ns) = budget(windowed(100, 100, Duration::from_secs(2))).await;
    let act = account("572");
    assert_eq!(budget.until_ready(&act).await, Ticket(1));
    let pause = pause_after(&budget, &act, Ticket(1), &usage(100), true).await;
    let paused = Instant::now();
    assert!(
        matches!(budget.reserve(&act).await.unwrap(), Slot::Paused(left) if left <= pause && left > pause / 2),
        "{pause:?}"
    );
    assert!(
        matches!(budget.until_ready_unless_paused(&act).await, Err(left) if left <= pause),
        "a shard is deferred rather than held through the pause"
    );
    // Waited out (to its end: Redis's clock and this one differ by a millisecond or two), the
    // pause costs no ticket.
    assert_eq!(budget.until_ready(&act).await, Ticket(2));
    assert!(
        paused.elapsed() + Duration::from_millis(5) >= pause,
        "{pause:?}"
    );

    // The fleet-wide pause (set by a worker, a round trip after the answer) holds it too.
    let pauses =
        audience_export_core::pause::AccountPauses::new(connect_redis(URL).await.unwrap(), &ns);
    pauses
        .pause(&act, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(matches!(
        budget.reserve(&act).await.unwrap(),
        Slot::Paused(left) if left > Duration::from_millis(200) && left <= Duration::from_millis(300)
    ));
    assert_eq!(budget.until_ready(&act).await, Ticket(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cost_of_a_call_is_read_net_of_the_calls_that_left_the_window() {
    // A 1 s window where a call costs 2%: ten calls at once, answered at 2% and 20%. A second
    // later they have all left, and twenty more are answered at 40%: 20 points over 20 calls
    // sent, but 10 of the 20 in the window are new ones only. Read as 1% (what a pace that
    // did not count the calls leaving learned), the calls on the wire would be counted at half
    // their cost, and twice as many sent into a window with no room.
    let (budget, _) = budget(windowed(10_000, 10_000, Duration::from_secs(1))).await;
    let act = account("573");
    book(&budget, &act, 1..=10).await;
    read(&budget, &act, Ticket(1), 2).await;
    let cost = read(&budget, &act, Ticket(10), 20).await.cost_pct;
    assert!((1.99..=2.01).contains(&cost), "{cost}% a call");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    book(&budget, &act, 11..=30).await;
    let cost = read(&budget, &act, Ticket(30), 40).await.cost_pct;
    assert!((1.9..=2.2).contains(&cost), "{cost}% a call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_left_the_window_make_room_but_calls_never_counted_do_not() {
    // A 1 s window, a call costing 1%, and 95 calls booked on a reading of 4%: the predicted
    // usage is at the ceiling, and no answer comes back. A window later those calls have left:
    // room for about as many again, where a gate that waited for an answer sent one probe a
    // second into an empty window. Ten of them were never sent (their shards deferred): they
    // never counted, and make no room.
    let (budget, _) = budget(windowed(10_000, 10_000, Duration::from_secs(1))).await;
    let act = account("574");
    book(&budget, &act, 1..=5).await;
    read(&budget, &act, Ticket(1), 0).await;
    read(&budget, &act, Ticket(5), 4).await;
    assert_eq!(
        book_until_refused(&budget, &act).await,
        (6..=100).collect::<Vec<_>>()
    );
    for t in 41..=50 {
        budget.unused(&act, Ticket(t)).await.unwrap();
    }
    // A window and the margin for the calls' answer time later (0.1 s), all 100 have left.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // 90 counted calls left: 4 + 95 - 90 = 9% predicted, 90 more fit under 99% (101 to 190),
    // and the reading being stale, one probe past them.
    assert_eq!(
        book_until_refused(&budget, &act).await,
        (101..=191).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_booked_at_once_are_read_as_sent_at_once() {
    // A 2 s window (the fleet's calls checkpointed every 8 ms), ten calls booked at once, and
    // the tenth refused half a second later at 150%: four of the ten must leave, all 2 s after
    // the first. Between checkpoints calls are taken as evenly spread, up to the last one
    // booked: spread until the answer instead, the fourth would seem sent 170 ms later, and
    // the account paused that much longer.
    let (budget, _) = budget(windowed(10_000, 10_000, Duration::from_secs(2))).await;
    let act = account("575");
    let start = Instant::now();
    book(&budget, &act, 1..=10).await;
    let booked = start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pause = pause_after(&budget, &act, Ticket(10), &usage(150), true).await;
    let until = start.elapsed() + pause;
    assert!(
        until >= Duration::from_millis(2_090) && until <= booked + Duration::from_millis(2_130),
        "the account waits until {until:?} after the first call (all booked within {booked:?})"
    );
}
