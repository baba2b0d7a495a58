//! Permission loss: the connection stays valid, but one of its ad accounts can no longer be
//! used (a Business Manager admin removed whoever connected from it, or Meta disabled it). End
//! to end, one behaviour per test: a loss met mid-export stops the exports on that account with
//! Meta's reason, marks the account unusable (the status API shows it), tells the owner exactly
//! once however many calls met it, and refuses new exports naming the fix; the health check
//! before an export finds a loss that happened while idle, before any audience is created; the
//! periodic check finds it with no export at all; selecting the account again once access is
//! back makes exports work again. Then the emulator's answers, on the wire, and the scripts
//! behind the mark, against the real Redis.

use audience_export_core::connection::{
    token_fingerprint, AccountUnusable, AdAccountStatus, Marked, UnusableKind,
};
use audience_export_core::contract::{Event, ExportStatus, FinishedReport};
use audience_export_core::progress::now_ms;
use audience_export_harness::app::{
    account, eventually, spawn_app, spawn_app_with, ws, Roles, TestApp, AD_ACCOUNT, CONNECTED_BY,
    WORKSPACE,
};
use audience_export_harness::emulator::{
    AdAccountSeed, Config, Emulator, Latency, Seed, TokenSeed,
};
use audience_export_harness::segment::generate;
use secrecy::SecretString;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// How long any awaited condition may take.
const DEADLINE: Duration = Duration::from_secs(60);
/// Longer than the finalizer's 5 s retry delay: a second email would have gone by then.
const SETTLE: Duration = Duration::from_secs(6);
/// The subject of the owner's email about the test's ad account.
const OWNER_SUBJECT: &str = "Ad account act_1001 can no longer be used by workspace ws-1";

fn segment(app: &TestApp, name: &str, members: u64, seed: u64) -> PathBuf {
    let path = app.dir.join(format!("{name}.ndjson"));
    generate(&path, members, seed).expect("segment");
    path
}

fn reason(report: &FinishedReport) -> &str {
    report.reason.as_deref().unwrap_or_default()
}

/// Emails to the workspace's owner about the test's ad account becoming unusable.
fn owner_mails(app: &TestApp) -> usize {
    app.smtp
        .mails()
        .iter()
        .filter(|m| {
            m.to.iter().any(|t| t.contains(CONNECTED_BY)) && m.subject() == Some(OWNER_SUBJECT)
        })
        .count()
}

/// Waits for the owner's email; then, the queues quiet past a retry, returns how many came.
async fn owner_told(app: &TestApp) -> usize {
    let mail = app
        .smtp
        .wait_for(DEADLINE, |m| m.subject() == Some(OWNER_SUBJECT))
        .await;
    assert!(
        mail.is_some(),
        "the owner is told; mails: {:?}",
        app.smtp.mails()
    );
    assert!(app.settled(SETTLE).await, "the queues settle");
    owner_mails(app)
}

/// The test ad account's entry in the status API's `ad_accounts`.
async fn account_status(app: &TestApp) -> Value {
    let status = app.connection_status(WORKSPACE).await;
    assert_eq!(status.status, 200, "{status}");
    status.body["ad_accounts"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["id"] == AD_ACCOUNT).cloned())
        .unwrap_or_else(|| panic!("{AD_ACCOUNT} is selected: {status}"))
}

/// Waits until the status API shows the test ad account unusable; returns its `unusable`.
async fn shown_unusable(app: &TestApp) -> Value {
    eventually(DEADLINE, || async {
        let status = account_status(app).await;
        (!status["unusable"].is_null()).then(|| status["unusable"].clone())
    })
    .await
    .expect("the status API shows the ad account unusable")
}

fn unusable_events(app: &TestApp) -> Vec<(String, u64)> {
    app.events()
        .into_iter()
        .filter_map(|e| match e {
            Event::AdAccountUnusable {
                ad_account_id,
                kind,
                at_ms,
                ..
            } if ad_account_id == AD_ACCOUNT => {
                Some((serde_json::to_value(kind).unwrap().to_string(), at_ms))
            }
            _ => None,
        })
        .collect()
}

/// Graph calls the emulator saw after `since` on `path` (e.g. `me/adaccounts`).
fn calls_to(app: &TestApp, method: &str, path: &str, since: std::time::Instant) -> usize {
    app.emulator
        .calls()
        .iter()
        .filter(|c| c.at >= since && c.method == method && c.path == path)
        .count()
}

/// The value of one series, summed over the fleet's roles.
async fn metric(app: &TestApp, series: &str) -> f64 {
    let mut sum = 0.0;
    for addr in &app.ops {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        sum += text
            .lines()
            .filter_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
            .sum::<f64>();
    }
    sum
}

/// The fix named for an account whose access was removed: who needs access, then select it.
const ACCESS_FIX: &str = "give admin@example.com access to it";

/// A new export to the test's ad account is refused before reaching Meta, naming what was
/// found and the fix.
async fn assert_refused_naming_the_fix(app: &TestApp, export_id: &str, finding: &str, fix: &str) {
    let audiences = app.emulator.audiences().len();
    let segment = segment(app, export_id, 20, 99);
    app.export(export_id, &["email"], &segment).await;
    let report = app.finished(export_id, DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Rejected, "{report:?}");
    let why = reason(&report);
    for part in [
        "ad account unusable: ",
        finding,
        fix,
        "again in the workspace's Facebook connection",
    ] {
        assert!(why.contains(part), "`{part}` in: {why}");
    }
    assert_eq!(
        app.emulator.audiences().len(),
        audiences,
        "no audience created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_removed_mid_export_stops_it_marks_the_account_tells_the_owner_once_and_refuses_new_exports(
) {
    let app = spawn_app_with(Roles::ALL, |s| {
        s.producer.shard_size = 20;
        s.worker.concurrency = 2;
        // About 5 s for the two exports' 50 shards: time to remove access mid-way.
        s.worker.calls_per_second_per_account = 10;
    })
    .await;
    let segment = segment(&app, "mid-export", 500, 71);
    app.emulator.set_latency(Latency {
        base_ms: 30,
        per_record_us: 0,
        jitter_ms: 0,
    });
    app.export("exp-a", &["email"], &segment).await;
    app.export("exp-b", &["phone"], &segment).await;
    let uploading = eventually(DEADLINE, || async {
        let a = app.progress_of("exp-a").await;
        let b = app.progress_of("exp-b").await;
        (a.shards_done >= 2 && b.shards_done >= 1).then_some(())
    })
    .await;
    assert!(uploading.is_some(), "both exports upload first");
    assert!(app.emulator.remove_access(&app.token, AD_ACCOUNT));

    for export_id in ["exp-a", "exp-b"] {
        let report = app.finished(export_id, DEADLINE).await;
        assert_eq!(report.status, ExportStatus::Failed, "{report:?}");
        assert!(
            reason(&report).starts_with("permission lost: ")
                && reason(&report).contains("act_1001"),
            "{report:?}"
        );
        let audience = &report.audiences[0];
        assert!(
            audience.shards_failed >= 1 && audience.shards > audience.shards_failed,
            "stopped mid-way: {audience:?}"
        );
    }
    let unusable = shown_unusable(&app).await;
    assert_eq!(unusable["kind"], "permission_lost", "{unusable}");
    assert_eq!(unusable["code"], 200, "Meta's code: {unusable}");
    assert!(
        unusable["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("(#200)"),
        "Meta's message: {unusable}"
    );

    assert_eq!(owner_told(&app).await, 1, "exactly one email to the owner");
    // Each export met the refusal on its own call: reported at least twice, one loss.
    let events = unusable_events(&app);
    assert!(events.len() >= 2, "{events:?}");
    assert!(events.iter().all(|e| e == &events[0]), "{events:?}");
    assert_eq!(
        metric(
            &app,
            "audience_export_ad_accounts_unusable_total{kind=\"permission_lost\"}"
        )
        .await,
        1.0,
        "counted once"
    );

    assert_refused_naming_the_fix(
        &app,
        "exp-after",
        "Meta refused the connection's access",
        ACCESS_FIX,
    )
    .await;
    assert_eq!(
        owner_mails(&app),
        1,
        "no second email for the refused export"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_before_an_export_finds_access_removed_while_idle_before_any_audience_is_created()
{
    let app = spawn_app().await;
    let removed = std::time::Instant::now();
    assert!(app.emulator.remove_access(&app.token, AD_ACCOUNT));

    assert_refused_naming_the_fix(
        &app,
        "exp-idle",
        "is no longer among the ad accounts",
        ACCESS_FIX,
    )
    .await;
    assert!(app.emulator.audiences().is_empty(), "nothing created");
    assert_eq!(
        calls_to(&app, "POST", "act_1001/customaudiences", removed),
        0,
        "refused before any create call"
    );
    assert!(calls_to(&app, "GET", "me/adaccounts", removed) >= 1);
    assert!(calls_to(&app, "GET", "debug_token", removed) >= 1);
    assert_eq!(shown_unusable(&app).await["kind"], "not_listed");
    assert_eq!(owner_told(&app).await, 1, "exactly one email to the owner");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_check_finds_access_removed_without_any_export() {
    let app = spawn_app_with(Roles::ALL, |s| {
        s.connections.health_check_interval_secs = 1;
    })
    .await;
    assert!(app.emulator.remove_access(&app.token, AD_ACCOUNT));

    let unusable = shown_unusable(&app).await;
    assert_eq!(unusable["kind"], "not_listed", "{unusable}");
    assert_eq!(owner_told(&app).await, 1, "exactly one email to the owner");
    // Rounds went on meanwhile (one a second): still one email; no export ever ran.
    assert!(app.emulator.audiences().is_empty());
    assert!(app
        .emulator
        .calls()
        .iter()
        .all(|c| !c.path.ends_with("customaudiences")));
    let status = app.connection_status(WORKSPACE).await;
    assert_eq!(status.body["status"], "valid", "the connection stays valid");
    assert_eq!(
        status.body["available_ad_accounts"],
        serde_json::json!([]),
        "the token's ad accounts as Meta lists them now"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_ad_account_is_found_before_the_export_and_refused() {
    let app = spawn_app().await;
    assert!(app.emulator.set_account_status(AD_ACCOUNT, 2));

    assert_refused_naming_the_fix(
        &app,
        "exp-disabled",
        "Meta reports ad account act_1001 as disabled",
        "Once Meta enables act_1001 again",
    )
    .await;
    assert_eq!(shown_unusable(&app).await["kind"], "disabled");
    assert_eq!(owner_told(&app).await, 1, "exactly one email to the owner");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selecting_the_account_again_once_access_is_back_makes_exports_work_again() {
    let app = spawn_app().await;
    assert!(app.emulator.remove_access(&app.token, AD_ACCOUNT));
    assert_refused_naming_the_fix(
        &app,
        "exp-lost",
        "is no longer among the ad accounts",
        ACCESS_FIX,
    )
    .await;

    // Not while access is still missing: Meta is asked again, not the connect time's list.
    let early = app.select_ad_accounts(WORKSPACE, &[AD_ACCOUNT]).await;
    assert_eq!(early.status, 422, "{early}");
    assert!(early
        .error()
        .contains("act_1001 is not an ad account this connection can use"));
    assert!(
        !account_status(&app).await["unusable"].is_null(),
        "still marked"
    );

    assert!(app.emulator.grant_access(&app.token, AD_ACCOUNT));
    let selected = app.select_ad_accounts(WORKSPACE, &[AD_ACCOUNT]).await;
    assert_eq!(selected.status, 200, "{selected}");
    assert!(
        account_status(&app).await["unusable"].is_null(),
        "the mark is lifted"
    );

    let segment = segment(&app, "back", 50, 72);
    app.export("exp-back", &["email"], &segment).await;
    let report = app.finished("exp-back", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    let audience = &report.audiences[0];
    assert!(
        audience.uploaded > 0 && audience.shards_failed == 0,
        "{report:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_exports_is_checked_with_meta_once() {
    let app = spawn_app().await;
    let segment = segment(&app, "burst", 20, 73);
    let started = std::time::Instant::now();
    let ids: Vec<String> = (0..5).map(|i| format!("exp-burst-{i}")).collect();
    for id in &ids {
        app.export(id, &["email"], &segment).await;
    }
    for id in &ids {
        let report = app.finished(id, DEADLINE).await;
        assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    }
    assert_eq!(calls_to(&app, "GET", "debug_token", started), 1);
    assert_eq!(calls_to(&app, "GET", "me/adaccounts", started), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_check_finds_refused_goes_the_refused_token_way() {
    let app = spawn_app().await;
    assert!(app.emulator.revoke(&app.token, 460));
    let segment = segment(&app, "revoked", 20, 74);
    app.export("exp-revoked", &["email"], &segment).await;

    let report = app.finished("exp-revoked", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Rejected, "{report:?}");
    assert!(
        reason(&report).starts_with("token invalid: Meta refused the Facebook connection"),
        "{report:?}"
    );
    let invalid = eventually(DEADLINE, || async {
        let status = app.connection_status(WORKSPACE).await;
        (status.body["status"] == "invalid").then_some(status.body["invalid"].clone())
    })
    .await
    .expect("the connection is marked invalid");
    assert_eq!(
        (invalid["code"].as_i64(), invalid["subcode"].as_i64()),
        (Some(190), Some(460))
    );
    assert!(
        app.emulator
            .calls()
            .iter()
            .all(|c| !c.path.ends_with("customaudiences")),
        "refused at the check, before any audience call"
    );
    assert!(
        account_status(&app).await["unusable"].is_null(),
        "no ad account is blamed"
    );
    app.stop().await;
}

// The emulator, on the wire: what Meta answers once access is removed or the account disabled.

const TOKEN: &str = "EAApermissiontest";

async fn get(e: &Emulator, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}/v27.0/{path}", e.base_url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("the emulator answers")
        .json()
        .await
        .expect("JSON")
}

async fn post(e: &Emulator, path: &str, form: &[(&str, String)]) -> Value {
    reqwest::Client::new()
        .post(format!("{}/v27.0/{path}", e.base_url()))
        .bearer_auth(TOKEN)
        .form(form)
        .send()
        .await
        .expect("the emulator answers")
        .json()
        .await
        .expect("JSON")
}

fn error(answer: &Value) -> (i64, Option<i64>, String) {
    let e = &answer["error"];
    (
        e["code"].as_i64().unwrap_or(-1),
        e["error_subcode"].as_i64(),
        format!("{} {}", e["type"], e["message"]),
    )
}

#[tokio::test]
async fn the_emulator_answers_a_removed_or_disabled_account_as_meta_does() {
    let seed = Seed {
        tokens: vec![TokenSeed::user(TOKEN, &["2002", "3003"])],
        ad_accounts: vec![AdAccountSeed::new("2002"), AdAccountSeed::new("3003")],
    };
    let e = Emulator::start(([127, 0, 0, 1], 0).into(), Config::default(), seed)
        .await
        .expect("emulator");
    let created = post(
        &e,
        "act_2002/customaudiences",
        &[
            ("name", "A".into()),
            ("subtype", "CUSTOM".into()),
            ("customer_file_source", "USER_PROVIDED_ONLY".into()),
        ],
    )
    .await;
    let audience = created["id"].as_str().expect("an audience").to_owned();
    let listed = get(&e, "me/adaccounts?fields=account_id,account_status").await;
    assert_eq!(listed["data"][0]["account_status"], 1, "{listed}");

    assert!(e.remove_access(TOKEN, "2002"));
    let listed = get(&e, "me/adaccounts").await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed["data"][0]["account_id"], "3003");
    let (code, subcode, said) = error(&get(&e, "act_2002?fields=tos_accepted").await);
    assert_eq!((code, subcode), (200, None), "{said}");
    assert!(
        said.contains("OAuthException") && said.contains("(#200)"),
        "{said}"
    );
    let payload = format!(r#"{{"schema":"EMAIL_SHA256","data":["{:064x}"]}}"#, 1);
    let upload = post(
        &e,
        &format!("{audience}/users"),
        &[("payload", payload.clone())],
    )
    .await;
    let (code, subcode, said) = error(&upload);
    assert_eq!((code, subcode), (100, Some(33)), "{said}");

    assert!(e.set_account_status("3003", 2));
    let listed = get(&e, "me/adaccounts?fields=account_id,account_status").await;
    assert_eq!(
        listed["data"][0]["account_status"], 2,
        "still listed: {listed}"
    );
    let (code, subcode, _) = error(&get(&e, "act_3003?fields=tos_accepted").await);
    assert_eq!((code, subcode), (200, Some(1_885_016)));

    assert!(e.grant_access(TOKEN, "2002"));
    let upload = post(&e, &format!("{audience}/users"), &[("payload", payload)]).await;
    assert_eq!(upload["num_received"], 1, "{upload}");

    // The same through the control API, for the demo and out-of-process tests.
    let control = |method: reqwest::Method, path: String| {
        reqwest::Client::new().request(method, format!("{}/_emulator/{path}", e.base_url()))
    };
    let removed: Value = control(
        reqwest::Method::DELETE,
        format!("tokens/{TOKEN}/ad_accounts/2002"),
    )
    .send()
    .await
    .expect("answers")
    .json()
    .await
    .expect("JSON");
    assert_eq!(removed["removed"], true);
    let listed = get(&e, "me/adaccounts").await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    let granted: Value = control(
        reqwest::Method::POST,
        format!("tokens/{TOKEN}/ad_accounts/2002"),
    )
    .send()
    .await
    .expect("answers")
    .json()
    .await
    .expect("JSON");
    assert_eq!(granted["granted"], true);
    let enabled: Value = control(reqwest::Method::POST, "ad_accounts/3003/status".into())
        .json(&serde_json::json!({"account_status": 1}))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(enabled["ok"], true);
    let listed = get(&e, "me/adaccounts?fields=account_id,account_status").await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2), "{listed}");
    assert!(listed["data"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|a| a["account_status"] == 1));
    e.stop();
}

// The scripts behind the mark, against the real Redis (no role runs).

fn mark(at_ms: u64, fingerprint: &str) -> AccountUnusable {
    AccountUnusable {
        kind: UnusableKind::PermissionLost,
        reason: "(#200) Permissions error".into(),
        code: Some(200),
        subcode: None,
        at_ms,
        token_fingerprint: fingerprint.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_marks_a_loss_the_others_read_its_record_and_a_new_selection_lifts_it() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let (w, a) = (ws(WORKSPACE), account(AD_ACCOUNT));
    let fp = token_fingerprint(&SecretString::from(app.token.clone()));
    let later = now_ms() + 1_000;

    // Eight callers at once (several workers meeting the refusal): one `Now`, seven `Already`
    // with that caller's record.
    let marks = (0..8u64).map(|i| {
        let connections = app.connections.clone();
        let (w, a, m) = (w.clone(), a.clone(), mark(later + i, &fp));
        tokio::spawn(async move { connections.mark_unusable(&w, &a, &m).await.expect("Redis") })
    });
    let outcomes: Vec<Marked> = futures::future::join_all(marks)
        .await
        .into_iter()
        .map(|r| r.expect("joins"))
        .collect();
    let now: Vec<&AccountUnusable> = outcomes
        .iter()
        .filter_map(|o| match o {
            Marked::Now(m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(now.len(), 1, "{outcomes:?}");
    for o in &outcomes {
        match o {
            Marked::Now(m) | Marked::Already(m) => assert_eq!(m, now[0]),
            other => panic!("{other:?}"),
        }
    }
    let view = app
        .connections
        .view(&w)
        .await
        .expect("Redis")
        .expect("a view");
    assert_eq!(
        view.selected(&a).and_then(|s| s.unusable.as_ref()),
        Some(now[0])
    );

    // A replaced token's report, an unselected account, a finding older than the selection.
    let other = mark(later, "0000000000000000");
    assert_eq!(
        app.connections.mark_unusable(&w, &a, &other).await.unwrap(),
        Marked::Stale
    );
    let unselected = account("9009");
    assert_eq!(
        app.connections
            .mark_unusable(&w, &unselected, &mark(later, &fp))
            .await
            .unwrap(),
        Marked::Missing
    );

    // Lifted only by its own `at_ms`.
    assert!(!app
        .connections
        .clear_unusable(&w, &a, now[0].at_ms + 100)
        .await
        .unwrap());
    assert!(app
        .connections
        .clear_unusable(&w, &a, now[0].at_ms)
        .await
        .unwrap());
    let view = app.connections.view(&w).await.unwrap().unwrap();
    assert_eq!(view.selected(&a).and_then(|s| s.unusable.clone()), None);

    // A selection lifts every mark, and a finding from before it is stale.
    let found = now_ms();
    assert!(matches!(
        app.connections
            .mark_unusable(&w, &a, &mark(found, &fp))
            .await
            .unwrap(),
        Marked::Now(_)
    ));
    let selected_at = found + 10;
    app.connections
        .select_ad_accounts(&w, &[AdAccountStatus::new(&a, true, selected_at)])
        .await
        .unwrap();
    let view = app.connections.view(&w).await.unwrap().unwrap();
    assert_eq!(view.selected(&a).and_then(|s| s.unusable.clone()), None);
    assert_eq!(
        app.connections
            .mark_unusable(&w, &a, &mark(found, &fp))
            .await
            .unwrap(),
        Marked::Stale,
        "found before the selection re-checked it"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_exports_asks_meta_once_until_a_selection_or_a_new_token() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let w = ws(WORKSPACE);
    let ttl = Duration::from_secs(60);
    assert!(app.connections.claim_health_check(&w, ttl).await.unwrap());
    assert!(!app.connections.claim_health_check(&w, ttl).await.unwrap());
    app.connections
        .select_ad_accounts(
            &w,
            &[AdAccountStatus::new(&account(AD_ACCOUNT), true, now_ms())],
        )
        .await
        .unwrap();
    assert!(
        app.connections.claim_health_check(&w, ttl).await.unwrap(),
        "after a selection"
    );
    app.stop().await;
}
