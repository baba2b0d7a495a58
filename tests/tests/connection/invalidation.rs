//! Meta refuses a workspace's token: mid-export (a worker's upload), to the producer (creating
//! the audience), or while the producer still streams the segment. The exports running on it
//! stop and fail with Meta's reason, the connection is marked invalid once per token (a replaced
//! token's late refusals are ignored), and people are told once each. And the system user
//! token: checked, never shown, used for every call of its workspace.

use crate::{
    changes, connect_and_select, connection_changed, enqueue, fingerprint, job, mails_to, metric,
    reason, recorded_refusal, segment, token, DEADLINE, MARKETER, OWNER,
};
use audience_export_core::connection::{Invalidated, NewToken, TokenKind};
use audience_export_core::contract::{ConnectionStatus, Event, ExportStatus, FinishedReport};
use audience_export_core::progress::now_ms;
use audience_export_harness::app::{
    eventually, spawn_app, spawn_app_with, ws, Roles, TestApp, AD_ACCOUNT, WORKSPACE,
};
use audience_export_harness::emulator::{self, Latency, TokenSeed};
use secrecy::SecretString;

/// The workspace connected by OAuth in the mid-export tests.
const WS: &str = "ws-oauth";

/// Two exports of `WS` (connected by OAuth by `OWNER`) upload when Meta revokes its token (460).
struct RefusedMidExport {
    app: TestApp,
    /// The refused long-lived token.
    long: String,
    /// The reports of `exp-a` and `exp-b`.
    reports: Vec<FinishedReport>,
}

async fn token_refused_mid_export() -> RefusedMidExport {
    let app = spawn_app_with(Roles::ALL, |s| {
        s.producer.shard_size = 20;
        s.worker.concurrency = 2;
        // About 5 s for the two exports' 48 shards: time to revoke the token mid-way.
        s.worker.calls_per_second_per_account = 10;
    })
    .await;
    let long = connect_and_select(&app, WS).await;
    let segment = segment(&app, "mid-export", 500, 61);
    app.emulator.set_latency(Latency {
        base_ms: 30,
        per_record_us: 0,
        jitter_ms: 0,
    });
    enqueue(&app, &job(&app, WS, "exp-a", &["email"], &segment)).await;
    enqueue(&app, &job(&app, WS, "exp-b", &["phone"], &segment)).await;
    // Both exports running: `exp-a` uploading, `exp-b` planned (its shards queued, behind or
    // among `exp-a`'s: the shard queue is first in, first out, so whether any of them uploads
    // before the revocation depends on how the two plans' publishing interleaved).
    let running = eventually(DEADLINE, || async {
        let a = app.progress_of("exp-a").await;
        let b = app.progress_of("exp-b").await;
        (a.shards_done >= 2 && b.sealed).then_some(())
    })
    .await;
    assert!(
        running.is_some(),
        "exp-a uploads and exp-b is planned before the revocation"
    );
    assert!(
        !app.progress_of("exp-a").await.is_complete(),
        "exp-a is mid-way at the revocation"
    );
    assert!(app.emulator.revoke(&long, 460));
    let mut reports = Vec::new();
    for export_id in ["exp-a", "exp-b"] {
        reports.push(app.finished(export_id, DEADLINE).await);
    }
    RefusedMidExport { app, long, reports }
}

/// Everything the refusal sets off has happened: the owner's email and the upstream platform's
/// event arrived, and a job enqueued after both was refused and its requester told. Counts of
/// "exactly one" are read after this.
async fn settled(app: &TestApp) {
    let owner = app
        .smtp
        .wait_for(DEADLINE, |m| {
            m.to.iter().any(|t| t.contains(OWNER)) && m.data.contains("must be reconnected")
        })
        .await;
    assert!(owner.is_some(), "the owner is told");
    assert!(
        connection_changed(app, WS, ConnectionStatus::Invalid)
            .await
            .is_some(),
        "the upstream platform is told"
    );
    let segment = segment(app, "settle", 20, 62);
    enqueue(app, &job(app, WS, "exp-settle", &["email"], &segment)).await;
    let marker = app.finished("exp-settle", DEADLINE).await;
    assert_eq!(marker.status, ExportStatus::Rejected, "{marker:?}");
    assert!(
        reason(&marker).starts_with("connection invalid"),
        "refused until reconnected: {marker:?}"
    );
    let told = app
        .smtp
        .wait_for(DEADLINE, |m| m.data.contains("exp-settle"))
        .await;
    assert!(told.is_some(), "the marker's requester is told");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_mid_export_fails_every_export_running_on_it_with_metas_reason() {
    let RefusedMidExport { app, reports, .. } = token_refused_mid_export().await;

    for report in &reports {
        assert_eq!(report.status, ExportStatus::Failed, "{report:?}");
        assert!(
            reason(report).starts_with("token invalid: Meta refused the Facebook connection"),
            "{report:?}"
        );
        let audience = &report.audiences[0];
        assert!(audience.shards_failed >= 1, "stopped: {audience:?}");
    }
    let first = &reports[0].audiences[0];
    assert!(
        first.shards > first.shards_failed,
        "exp-a stopped mid-way: {first:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_refusal_only_calls_already_in_flight_reach_meta() {
    let RefusedMidExport { app, long, .. } = token_refused_mid_export().await;

    let after = app.emulator.calls_after_revocation(&long);

    assert!(
        (1..=u64::from(app.settings.worker.concurrency)).contains(&after),
        "only calls already in flight reach Meta after the first refusal: {after}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_mid_export_marks_the_connection_invalid_with_metas_code() {
    let RefusedMidExport { app, .. } = token_refused_mid_export().await;

    let view = eventually(DEADLINE, || async {
        let view = app.connection_status(WS).await;
        (view.body["status"] == "invalid").then_some(view)
    })
    .await
    .expect("the connection is marked invalid");

    assert_eq!(view.status, 200, "{view}");
    assert_eq!(view.body["invalid"]["code"], 190, "{view}");
    assert_eq!(view.body["invalid"]["subcode"], 460, "{view}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_platform_is_told_once_that_the_connection_is_invalid() {
    let RefusedMidExport { app, .. } = token_refused_mid_export().await;

    let changed = connection_changed(&app, WS, ConnectionStatus::Invalid).await;

    assert!(
        matches!(
            changed,
            Some(Event::ConnectionChanged {
                code: Some(190),
                subcode: Some(460),
                ..
            })
        ),
        "{changed:?}"
    );
    settled(&app).await;
    assert_eq!(
        changes(&app, WS, ConnectionStatus::Invalid),
        1,
        "marked invalid once, however many reported it"
    );
    assert_eq!(
        metric(&app, "audience_export_connection_invalidations_total").await,
        Some(1.0)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requester_of_each_stopped_export_gets_one_report() {
    let RefusedMidExport { app, .. } = token_refused_mid_export().await;

    settled(&app).await;

    assert_eq!(mails_to(&app, MARKETER, "exp-a"), 1);
    assert_eq!(mails_to(&app, MARKETER, "exp-b"), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoever_connected_gets_one_email_saying_why_the_connection_broke() {
    let RefusedMidExport { app, .. } = token_refused_mid_export().await;

    settled(&app).await;

    let owner_mail = app
        .smtp
        .mails()
        .into_iter()
        .find(|m| m.to.iter().any(|t| t.contains(OWNER)) && m.data.contains("must be reconnected"))
        .expect("the owner is told");
    assert!(
        owner_mail
            .body()
            .contains("changed their Facebook password"),
        "{}",
        owner_mail.body()
    );
    assert!(owner_mail.body().contains(WS));
    assert_eq!(mails_to(&app, OWNER, "must be reconnected"), 1);
    assert_eq!(
        metric(
            &app,
            "audience_export_emails_total{kind=\"invalid\",outcome=\"sent\"}"
        )
        .await,
        Some(1.0)
    );
    app.stop().await;
}

/// Meta revoked `WORKSPACE`'s token (458, the app removed) before its first export; the
/// producer's first call with it is refused. Returns that export's report.
async fn token_refused_to_the_producer(app: &TestApp) -> FinishedReport {
    assert!(app.emulator.revoke(&app.token, 458));
    app.export(
        "exp-first",
        &["email"],
        &segment(app, "producer-refused", 50, 91),
    )
    .await;
    app.finished("exp-first", DEADLINE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_to_the_producer_rejects_the_job_with_metas_reason() {
    let app = spawn_app().await;

    let first = token_refused_to_the_producer(&app).await;

    assert_eq!(first.status, ExportStatus::Rejected, "{first:?}");
    assert!(reason(&first).starts_with("token invalid"), "{first:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_to_the_producer_marks_the_connection_invalid() {
    let app = spawn_app().await;

    token_refused_to_the_producer(&app).await;

    assert!(
        connection_changed(&app, WORKSPACE, ConnectionStatus::Invalid)
            .await
            .is_some(),
        "the producer's refusal invalidates the connection"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_to_the_producer_tells_whoever_connected_why() {
    let app = spawn_app().await;

    token_refused_to_the_producer(&app).await;

    let mail = app
        .smtp
        .wait_for(DEADLINE, |m| m.data.contains("must be reconnected"))
        .await
        .expect("the owner is told");
    assert!(mail.body().contains("removed the app"), "{}", mail.body());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_to_the_producer_is_recorded_for_the_workers() {
    let app = spawn_app().await;

    token_refused_to_the_producer(&app).await;

    assert!(
        recorded_refusal(&app, WORKSPACE, &app.token)
            .await
            .is_some(),
        "the producer records the refused token for the workers"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_producer_was_refused_the_next_job_never_reaches_meta() {
    let app = spawn_app().await;
    token_refused_to_the_producer(&app).await;
    let invalid = connection_changed(&app, WORKSPACE, ConnectionStatus::Invalid).await;
    assert!(invalid.is_some(), "the connection is marked invalid");

    app.export("exp-second", &["email"], &segment(&app, "second", 50, 91))
        .await;

    let second = app.finished("exp-second", DEADLINE).await;
    assert!(
        reason(&second).starts_with("connection invalid"),
        "{second:?}"
    );
    assert_eq!(
        app.emulator.calls_after_revocation(&app.token),
        1,
        "the second job never reached Meta"
    );
    app.stop().await;
}

/// What became of an export whose segment was still streaming when Meta refused its token.
struct Streamed {
    app: TestApp,
    /// The export's `stop_reason` once a worker's refusal stopped it.
    stop_reason: Option<String>,
    /// Members the upstream side wrote before the producer closed the segment.
    written: u64,
    /// Whether the producer closed the segment (a write failed) before all was written.
    closed: bool,
    report: FinishedReport,
}

/// Exports a segment that arrives through a FIFO, in batches, and revokes the token after the
/// first shard uploaded; then offers up to 10,000 more members.
async fn token_refused_while_streaming() -> Streamed {
    use std::io::Write;
    let app = spawn_app_with(Roles::ALL, |s| {
        s.producer.shard_size = 10;
    })
    .await;
    let fifo = app.dir.join("segment.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    // The upstream side of the segment: writes batches of members on request, until the
    // producer closes the FIFO (the write fails) or no more are asked for.
    let (more, batches) = std::sync::mpsc::channel::<u64>();
    let path = fifo.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("opening the FIFO");
        let mut written = 0u64;
        for batch in batches {
            for _ in 0..batch {
                let line = format!(
                    "{{\"external_id\":\"m{written}\",\"email\":\"person{written}@example.com\"}}\n"
                );
                if file.write_all(line.as_bytes()).is_err() {
                    return (written, true);
                }
                written += 1;
            }
        }
        (written, false)
    });
    app.export("exp-stream", &["email"], &fifo).await;
    more.send(100).expect("writer");
    let uploading = eventually(DEADLINE, || async {
        (app.progress_of("exp-stream").await.shards_done >= 1).then_some(())
    })
    .await;
    assert!(uploading.is_some(), "a shard uploads before the revocation");
    assert!(app.emulator.revoke(&app.token, 460));
    more.send(100).expect("writer");
    let stop_reason = eventually(DEADLINE, || async {
        app.progress_of("exp-stream").await.stop_reason
    })
    .await;
    // However much more the segment holds.
    for _ in 0..100 {
        if more.send(100).is_err() {
            break;
        }
    }
    drop(more);
    let (written, closed) = writer.await.expect("writer");
    let report = app.finished("exp-stream", DEADLINE).await;
    Streamed {
        app,
        stop_reason,
        written,
        closed,
        report,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_while_the_segment_streams_stops_reading_it() {
    let Streamed {
        app,
        stop_reason,
        written,
        closed,
        report,
    } = token_refused_while_streaming().await;

    assert!(stop_reason.is_some(), "a worker's refusal stops the export");
    assert!(
        closed,
        "the producer closed the segment after writing {written}"
    );
    assert!(
        report.members_read < 1_000,
        "stopped early: {} members read",
        report.members_read
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_stopped_while_its_segment_streams_fails_with_the_tokens_reason() {
    let Streamed { app, report, .. } = token_refused_while_streaming().await;

    assert_eq!(report.status, ExportStatus::Failed, "{report:?}");
    assert!(reason(&report).starts_with("token invalid"), "{report:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_for_a_workspace_without_a_connection_finds_nothing() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;

    let outcome = app
        .connections
        .invalidate(
            &ws("ws-unknown"),
            &fingerprint(&app.token),
            "r",
            190,
            None,
            1,
        )
        .await
        .expect("Redis");

    assert_eq!(outcome, Invalidated::Missing);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_of_a_token_the_connection_does_not_use_is_stale() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;

    let outcome = app
        .connections
        .invalidate(&ws(WORKSPACE), "0000000000000000", "r", 190, None, 1)
        .await
        .expect("Redis");

    assert_eq!(outcome, Invalidated::Stale);
    assert!(app
        .connections
        .view(&ws(WORKSPACE))
        .await
        .expect("view")
        .expect("some")
        .is_valid());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_marked_invalid_once_keeping_the_first_reason() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let (c, workspace, fp) = (&app.connections, ws(WORKSPACE), fingerprint(&app.token));

    let first = c
        .invalidate(&workspace, &fp, "token invalid: x", 190, Some(460), 5)
        .await
        .expect("Redis");
    let second = c
        .invalidate(&workspace, &fp, "token invalid: y", 190, Some(463), 6)
        .await
        .expect("Redis");

    assert_eq!(first, Invalidated::Now);
    assert_eq!(second, Invalidated::Already);
    let view = c.view(&workspace).await.expect("view").expect("some");
    let invalid = view.invalid.expect("invalid");
    assert_eq!(
        (invalid.reason.as_str(), invalid.subcode, invalid.at_ms),
        ("token invalid: x", Some(460), 5)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_of_an_invalid_connection_carries_the_reason() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let (c, workspace) = (&app.connections, ws(WORKSPACE));
    c.invalidate(
        &workspace,
        &fingerprint(&app.token),
        "token invalid: x",
        190,
        Some(460),
        5,
    )
    .await
    .expect("Redis");

    let active = c
        .active_token(&workspace)
        .await
        .expect("token")
        .expect("some");

    assert_eq!(active.kind, TokenKind::User);
    assert_eq!(active.invalid.as_deref(), Some("token invalid: x"));
    app.stop().await;
}

/// A system user token `EAAnewsystem` that Meta knows nothing about, as the store takes it.
fn new_system_token() -> NewToken {
    NewToken {
        token: SecretString::from("EAAnewsystem"),
        expires_at: 0,
        scopes: vec![],
        ad_accounts: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_system_user_token_makes_an_invalid_connection_valid() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let (c, workspace) = (&app.connections, ws(WORKSPACE));
    let marked = c
        .invalidate(&workspace, &fingerprint(&app.token), "x", 190, None, 5)
        .await
        .expect("Redis");
    assert_eq!(marked, Invalidated::Now);

    c.store_system_token(&workspace, &new_system_token(), None, now_ms())
        .await
        .expect("store");

    assert!(c
        .view(&workspace)
        .await
        .expect("view")
        .expect("some")
        .is_valid());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_refusal_of_a_replaced_token_is_ignored() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let (c, workspace, fp) = (&app.connections, ws(WORKSPACE), fingerprint(&app.token));
    let marked = c
        .invalidate(&workspace, &fp, "x", 190, None, 5)
        .await
        .expect("Redis");
    assert_eq!(marked, Invalidated::Now);
    c.store_system_token(&workspace, &new_system_token(), None, now_ms())
        .await
        .expect("store");

    let late = c
        .invalidate(&workspace, &fp, "late", 190, None, 7)
        .await
        .expect("Redis");

    assert_eq!(late, Invalidated::Stale);
    assert!(c
        .view(&workspace)
        .await
        .expect("view")
        .expect("some")
        .is_valid());
    app.stop().await;
}

/// A system user token for the test's ad account, known to the emulator.
fn system_user_token(app: &TestApp) -> String {
    let system = token(app, "system");
    app.emulator.add_token(TokenSeed {
        token: system.clone(),
        kind: emulator::TokenKind::SystemUser,
        ad_accounts: vec![AD_ACCOUNT.into()],
        user_id: None,
    });
    system
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_user_token_meta_does_not_know_is_refused() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let answer = app
        .set_system_user_token(WORKSPACE, "EAAnot-a-token", None)
        .await;

    assert_eq!(
        answer.status, 422,
        "Meta refuses an unknown token: {answer}"
    );
    let view = app.connection_status(WORKSPACE).await;
    assert_eq!(view.body["token_kind"], "user", "nothing replaced: {view}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_user_token_is_stored_beside_the_user_token_and_never_shown() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let system = system_user_token(&app);

    let view = app.set_system_user_token(WORKSPACE, &system, None).await;

    assert_eq!(view.status, 200, "{view}");
    assert_eq!(view.body["token_kind"], "system_user");
    assert_eq!(view.body["has_user_token"], true);
    assert!(!view.body.to_string().contains(&system), "never returned");
    let status = app.connection_status(WORKSPACE).await;
    assert!(!status.body.to_string().contains(&system), "never returned");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_user_token_set_with_connected_by_names_who_is_told() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let system = system_user_token(&app);

    let view = app
        .set_system_user_token(WORKSPACE, &system, Some(OWNER))
        .await;

    assert_eq!(view.status, 200, "{view}");
    let stored = app
        .connections
        .view(&ws(WORKSPACE))
        .await
        .expect("view")
        .expect("some");
    assert_eq!(stored.connected_by.as_deref(), Some(OWNER));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_user_token_is_used_for_every_call_of_its_workspace() {
    let app = spawn_app().await;
    let system = system_user_token(&app);
    let set = app.set_system_user_token(WORKSPACE, &system, None).await;
    assert_eq!(set.status, 200, "{set}");
    let first = app.emulator.calls().len();
    let selected = app.select_ad_accounts(WORKSPACE, &[AD_ACCOUNT]).await;
    assert_eq!(selected.status, 200, "{selected}");

    app.export(
        "exp-system",
        &["email", "phone"],
        &segment(&app, "system", 300, 71),
    )
    .await;

    let report = app.finished("exp-system", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    let calls = app.emulator.calls();
    let workspace_calls = &calls[first..];
    assert!(
        workspace_calls.len() >= 5,
        "terms check, two audiences, uploads: {workspace_calls:?}"
    );
    assert!(
        workspace_calls
            .iter()
            .all(|c| c.token.as_deref() == Some(system.as_str())),
        "every call of the workspace uses the system user token"
    );
    app.stop().await;
}
