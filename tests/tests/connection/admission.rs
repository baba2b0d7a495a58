//! The checks a job passes before anything reaches Meta: its workspace is connected, the
//! connection valid, the ad account selected by that workspace with its terms accepted, the
//! token not refused moments ago, and its export id not already naming another job. A refused
//! job creates no audience and its requester is told it could not start.

use crate::{
    enqueue, fingerprint, job, oauth_connect, reason, record_refusal, recorded_refusal,
    report_mail_subject, segment, token, DEADLINE, OWNER,
};
use audience_export_core::amqp::{header_str, Topology};
use audience_export_core::connection::{AdAccountStatus, NewToken};
use audience_export_core::contract::{Event, ExportStatus, FinishedReport};
use audience_export_core::progress::now_ms;
use audience_export_harness::app::{
    account, connect_workspace, eventually, spawn_app, spawn_app_with, ws, Roles, TestApp,
    AD_ACCOUNT, WORKSPACE,
};
use audience_export_harness::emulator::{AdAccountSeed, TokenSeed};
use secrecy::SecretString;
use serde_json::json;

/// Ad account of workspace `ws-2`, selected, terms accepted.
const OTHER: &str = "2002";
/// Ad account of workspace `ws-2` whose Custom Audience terms are not accepted.
const TERMS: &str = "3003";

/// Waits for `export_id`'s report and checks it was refused before anything reached Meta:
/// rejected with a reason starting with `expected`, its requester told it could not start, no
/// audience created.
async fn assert_refused(app: &TestApp, export_id: &str, expected: &str) -> FinishedReport {
    let report = app.finished(export_id, DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Rejected, "{report:?}");
    assert!(reason(&report).starts_with(expected), "{report:?}");
    let subject = report_mail_subject(app, export_id).await;
    assert!(subject.contains("could not start"), "{subject}");
    assert!(app.emulator.audiences().is_empty(), "no audience created");
    report
}

/// Workspace `ws-2`, connected with its own token for ad accounts `OTHER` (selected) and `TERMS`
/// (terms not accepted at Meta). Returns the token.
async fn second_workspace(app: &TestApp) -> String {
    let token2 = token(app, "ws2");
    app.emulator.add_ad_account(AdAccountSeed::new(OTHER));
    app.emulator.add_ad_account(AdAccountSeed {
        tos_accepted: false,
        ..AdAccountSeed::new(TERMS)
    });
    app.emulator
        .add_token(TokenSeed::user(&token2, &[OTHER, TERMS]));
    connect_workspace(&app.connections, "ws-2", &token2, OTHER).await;
    let both = NewToken {
        token: SecretString::from(token2.clone()),
        expires_at: now_ms() / 1000 + 60 * 86_400,
        scopes: vec!["ads_management".into()],
        ad_accounts: vec![account(OTHER), account(TERMS)],
    };
    app.connections
        .store_user_token(&ws("ws-2"), &both, None, now_ms())
        .await
        .expect("store");
    token2
}

/// `second_workspace` with both its ad accounts selected through the API.
async fn second_workspace_selecting_both(app: &TestApp) -> String {
    let token2 = second_workspace(app).await;
    let view = app.select_ad_accounts("ws-2", &[OTHER, TERMS]).await;
    assert_eq!(view.status, 200, "{view}");
    token2
}

/// A job of `ws-2` for ad account `TERMS`.
fn terms_job(app: &TestApp, export_id: &str) -> serde_json::Value {
    let segment = segment(app, export_id, 50, 81);
    let mut job = job(app, "ws-2", export_id, &["email"], &segment);
    job["ad_account_id"] = json!(format!("act_{TERMS}"));
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_a_workspace_without_a_connection_is_refused() {
    let app = spawn_app().await;
    let segment = segment(&app, "none", 50, 81);

    enqueue(
        &app,
        &job(&app, "ws-none", "exp-none", &["email"], &segment),
    )
    .await;

    assert_refused(
        &app,
        "exp-none",
        "no Facebook connection: workspace ws-none has not connected Facebook",
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_a_workspace_whose_connection_is_invalid_is_refused() {
    let app = spawn_app().await;
    app.connections
        .invalidate(
            &ws(WORKSPACE),
            &fingerprint(&app.token),
            "token invalid: Meta refused the Facebook connection (test)",
            190,
            Some(460),
            now_ms(),
        )
        .await
        .expect("Redis");
    let calls = app.emulator.calls().len();

    app.export(
        "exp-meanwhile",
        &["email"],
        &segment(&app, "invalid", 50, 61),
    )
    .await;

    let report = assert_refused(
        &app,
        "exp-meanwhile",
        &format!(
            "connection invalid: Meta refused the Facebook connection of workspace {WORKSPACE} on "
        ),
    )
    .await;
    assert!(
        reason(&report).contains("(code 190, subcode 460)"),
        "{report:?}"
    );
    assert_eq!(app.emulator.calls().len(), calls, "nothing reached Meta");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_an_ad_account_its_workspace_has_not_selected_is_refused() {
    let app = spawn_app().await;
    let connected = oauth_connect(&app, "ws-oauth", &token(&app, "short")).await;
    assert_eq!(connected.status, 200, "{connected}");
    let segment = segment(&app, "unselected", 500, 61);

    enqueue(
        &app,
        &job(&app, "ws-oauth", "exp-unselected", &["email"], &segment),
    )
    .await;

    assert_refused(
        &app,
        "exp-unselected",
        &format!("ad account act_{AD_ACCOUNT} is not selected for workspace ws-oauth"),
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_another_workspaces_ad_account_is_refused_without_using_its_token() {
    let app = spawn_app().await;
    let token2 = second_workspace(&app).await;
    let segment = segment(&app, "foreign", 50, 81);
    // ws-1 asks for ws-2's ad account.
    let mut foreign = app.job("exp-foreign", &["email"], &segment);
    foreign["ad_account_id"] = json!(format!("act_{OTHER}"));

    enqueue(&app, &foreign).await;

    assert_refused(
        &app,
        "exp-foreign",
        &format!("ad account act_{OTHER} is not selected for workspace {WORKSPACE}"),
    )
    .await;
    assert!(
        app.emulator
            .calls()
            .iter()
            .all(|c| c.token.as_deref() != Some(token2.as_str())),
        "ws-2's token was never used"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selecting_an_ad_account_without_accepted_terms_says_where_to_accept_them() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    second_workspace(&app).await;

    let view = app.select_ad_accounts("ws-2", &[OTHER, TERMS]).await;

    assert_eq!(view.status, 200, "{view}");
    let unaccepted = view.body["ad_accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .find(|a| a["id"] == TERMS)
        .cloned()
        .expect("listed");
    assert_eq!(unaccepted["tos_accepted"], false);
    assert_eq!(
        unaccepted["terms_url"],
        format!("https://business.facebook.com/ads/manage/customaudiences/tos/?act={TERMS}")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selecting_an_ad_account_the_token_cannot_use_is_refused() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    second_workspace(&app).await;

    let answer = app.select_ad_accounts("ws-2", &["9999"]).await;

    assert_eq!(answer.status, 422, "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_an_ad_account_whose_terms_are_not_accepted_is_refused() {
    let app = spawn_app().await;
    let token2 = second_workspace_selecting_both(&app).await;

    enqueue(&app, &terms_job(&app, "exp-terms")).await;

    assert_refused(
        &app,
        "exp-terms",
        &format!("terms not accepted: accept the Custom Audience terms for act_{TERMS} at https://business.facebook.com/ads/manage/customaudiences/tos/?act={TERMS}"),
    )
    .await;
    assert!(
        app.emulator
            .calls()
            .iter()
            .all(|c| c.token.as_deref() != Some(token2.as_str())
                || c.path == format!("act_{OTHER}")
                || c.path == format!("act_{TERMS}")
                || c.path == "me/adaccounts"
                || c.path == "debug_token"),
        "ws-2's token was used only for its own terms checks and the connection health check"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_rechecks_terms_accepted_since_the_selection_and_goes_through() {
    let app = spawn_app().await;
    second_workspace_selecting_both(&app).await;
    // Accepted at Meta since the selection recorded them as not accepted.
    app.emulator.add_ad_account(AdAccountSeed::new(TERMS));

    enqueue(&app, &terms_job(&app, "exp-terms-ok")).await;

    let report = app.finished("exp-terms-ok", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    let view = app
        .connections
        .view(&ws("ws-2"))
        .await
        .expect("view")
        .expect("some");
    assert!(
        view.selected(&account(TERMS))
            .expect("selected")
            .tos_accepted,
        "the fresh check is recorded"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terms_check_recorded_after_a_disconnect_does_not_bring_the_connection_back() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let workspace = ws(WORKSPACE);
    assert!(app.connections.disconnect(&workspace).await.expect("Redis"));

    let recorded = app
        .connections
        .update_terms(
            &workspace,
            AdAccountStatus::new(&account(AD_ACCOUNT), true, now_ms()),
        )
        .await
        .expect("Redis");

    assert!(!recorded);
    assert!(app
        .connections
        .view(&workspace)
        .await
        .expect("view")
        .is_none());
    app.stop().await;
}

/// Export `exp-reused` of ws-1 succeeds; then a job of `ws-2` (its own token and ad account
/// 2002) arrives under the same export id. Returns ws-2's token and the dead-lettered job's
/// rejection reason.
async fn reused_export_id(app: &TestApp) -> (String, String) {
    let token2 = token(app, "other");
    app.emulator.add_ad_account(AdAccountSeed::new(OTHER));
    app.emulator.add_token(TokenSeed::user(&token2, &[OTHER]));
    connect_workspace(&app.connections, "ws-2", &token2, OTHER).await;
    let segment = segment(app, "reuse", 40, 93);
    app.export("exp-reused", &["email"], &segment).await;
    let first = app.finished("exp-reused", DEADLINE).await;
    assert_eq!(first.status, ExportStatus::Succeeded, "{first:?}");

    let mut other = job(app, "ws-2", "exp-reused", &["email"], &segment);
    other["ad_account_id"] = json!(format!("act_{OTHER}"));
    enqueue(app, &other).await;
    let dead = Topology::dead(&app.topology.jobs());
    let reason = eventually(DEADLINE, || async {
        let message = app.get(&dead).await?;
        header_str(&message.delivery.properties, "x-rejection-reason")
    })
    .await
    .expect("the reused id's job is dead-lettered");
    (token2, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reusing_an_export_id_is_dead_lettered_with_the_reason() {
    let app = spawn_app().await;

    let (_, reason) = reused_export_id(&app).await;

    assert!(reason.contains("already names a different job"), "{reason}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reusing_an_export_id_does_not_finish_the_first_export_again() {
    let app = spawn_app().await;

    reused_export_id(&app).await;

    let finished = app
        .events()
        .iter()
        .filter(|e| matches!(e, Event::ExportFinished(r) if r.export_id == "exp-reused"))
        .count();
    assert_eq!(finished, 1, "the first export is not finished again");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reusing_an_export_id_never_uses_its_own_workspaces_token() {
    let app = spawn_app().await;

    let (token2, _) = reused_export_id(&app).await;

    assert!(
        app.emulator
            .calls()
            .iter()
            .all(|c| c.token.as_deref() != Some(token2.as_str())),
        "ws-2's token was never used"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_moments_ago_is_not_used_for_the_next_job() {
    let app = spawn_app().await;
    // A worker got a 190 and recorded it; the finalizer has not marked the connection yet.
    let refused = "token invalid: Meta refused the Facebook connection (test)";
    record_refusal(&app, WORKSPACE, &app.token, refused).await;
    let calls = app.emulator.calls().len();

    app.export("exp-marked", &["email"], &segment(&app, "marked", 20, 95))
        .await;

    assert_refused(&app, "exp-marked", refused).await;
    assert_eq!(
        app.emulator.calls().len(),
        calls,
        "no call with the refused token"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_entered_again_gets_another_chance() {
    let app = spawn_app().await;
    let refused = "token invalid: Meta refused the Facebook connection (test)";
    record_refusal(&app, WORKSPACE, &app.token, refused).await;
    assert!(recorded_refusal(&app, WORKSPACE, &app.token)
        .await
        .is_some());

    // The same token entered again, say as the system user token.
    let again = NewToken {
        token: SecretString::from(app.token.clone()),
        expires_at: 0,
        scopes: vec!["ads_management".into()],
        ad_accounts: vec![account(AD_ACCOUNT)],
    };
    app.connections
        .store_system_token(&ws(WORKSPACE), &again, Some(OWNER), now_ms())
        .await
        .expect("store");

    assert_eq!(recorded_refusal(&app, WORKSPACE, &app.token).await, None);
    app.export("exp-again", &["email"], &segment(&app, "again", 20, 95))
        .await;
    let report = app.finished("exp-again", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    app.stop().await;
}
