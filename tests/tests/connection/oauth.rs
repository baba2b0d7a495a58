//! Connecting a workspace through Meta's OAuth dialog, reconnecting it after Meta refused its
//! token, and disconnecting it.

use crate::{
    connect_and_select, connection_changed, enqueue, fingerprint, follow_dialog, job, long_lived,
    metric_reaches, oauth_connect, param, segment, token, DEADLINE, OWNER,
};
use audience_export_core::contract::{ConnectionStatus, Event, ExportStatus};
use audience_export_core::progress::{now_ms, ProgressStatus};
use audience_export_core::Field;
use audience_export_harness::app::{spawn_app, spawn_app_with, ws, Roles, TestApp, AD_ACCOUNT};
use audience_export_harness::emulator::TokenSeed;
use serde_json::json;

const WS: &str = "ws-oauth";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_oauth_gives_metas_dialog_for_this_app_asking_for_ads_management() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let start = app.start_oauth(WS, Some(OWNER)).await;

    assert_eq!(start.status, 200, "{start}");
    let dialog = start.dialog_url();
    assert_eq!(param(&dialog, "scope").as_deref(), Some("ads_management"));
    assert_eq!(
        param(&dialog, "redirect_uri").as_deref(),
        Some(app.settings.oauth.redirect_uri.as_str())
    );
    assert_eq!(
        param(&dialog, "client_id").as_deref(),
        Some(app.settings.oauth.app_id.as_str())
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_oauth_needs_no_body() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let start = app.start_oauth(WS, None).await;

    assert_eq!(start.status, 200, "{start}");
    assert!(param(&start.dialog_url(), "state").is_some(), "{start}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oauth_state_is_sealed() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let start = app.start_oauth(WS, Some(OWNER)).await;

    let state = param(&start.dialog_url(), "state").expect("a state");
    assert!(
        !state.contains(WS) && !state.contains(OWNER),
        "neither the workspace nor who connects travels in clear: {state}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approved_dialog_sends_the_browser_back_to_the_redirect_uri_with_the_state() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let dialog = app.start_oauth(WS, Some(OWNER)).await.dialog_url();
    app.emulator
        .approve_next_dialog(TokenSeed::user(&token(&app, "short"), &[AD_ACCOUNT]));

    let back = follow_dialog(&dialog).await;

    assert!(
        back.as_str().starts_with(&app.settings.oauth.redirect_uri),
        "{back}"
    );
    assert_eq!(param(&back, "state"), param(&dialog, "state"));
    assert!(param(&back, "code").is_some(), "{back}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_by_oauth_stores_a_valid_long_lived_user_token_with_its_scopes() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let view = oauth_connect(&app, WS, &token(&app, "short")).await;

    assert_eq!(view.status, 200, "{view}");
    assert_eq!(view.body["status"], "valid");
    assert_eq!(view.body["token_kind"], "user");
    assert!(view.body["scopes"]
        .as_array()
        .expect("scopes")
        .contains(&json!("ads_management")));
    let expires = view.body["user_token_expires_at"]
        .as_u64()
        .expect("an expiry");
    assert!(
        expires > now_ms() / 1000 + 59 * 86_400,
        "long-lived: {expires}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_by_oauth_lists_the_ad_accounts_the_token_can_use() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let view = oauth_connect(&app, WS, &token(&app, "short")).await;

    assert_eq!(view.status, 200, "{view}");
    assert_eq!(view.body["available_ad_accounts"], json!([AD_ACCOUNT]));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_by_oauth_remembers_who_connected() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let view = oauth_connect(&app, WS, &token(&app, "short")).await;

    assert_eq!(view.status, 200, "{view}");
    assert_eq!(view.body["connected_by"], OWNER);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_by_oauth_tells_the_upstream_platform() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let view = oauth_connect(&app, WS, &token(&app, "short")).await;

    assert_eq!(view.status, 200, "{view}");
    assert!(
        connection_changed(&app, WS, ConnectionStatus::Valid)
            .await
            .is_some(),
        "the upstream platform hears of the connection"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selecting_an_ad_account_records_that_its_terms_are_accepted() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let connected = oauth_connect(&app, WS, &token(&app, "short")).await;
    assert_eq!(connected.status, 200, "{connected}");

    let view = app
        .select_ad_accounts(WS, &[&format!("act_{AD_ACCOUNT}")])
        .await;

    assert_eq!(view.status, 200, "{view}");
    assert_eq!(view.body["ad_accounts"][0]["id"], AD_ACCOUNT);
    assert_eq!(view.body["ad_accounts"][0]["tos_accepted"], true);
    app.stop().await;
}

/// `WS` connected by OAuth with its ad account selected, then its token refused by Meta and the
/// connection marked invalid, as the finalizer marks it. Returns the refused long-lived token.
async fn connected_then_refused(app: &TestApp) -> String {
    let long = connect_and_select(app, WS).await;
    assert!(app.emulator.revoke(&long, 460));
    app.connections
        .invalidate(
            &ws(WS),
            &fingerprint(&long),
            "token invalid: Meta refused the Facebook connection (test)",
            190,
            Some(460),
            now_ms(),
        )
        .await
        .expect("Redis");
    let status = app.connection_status(WS).await;
    assert_eq!(status.body["status"], "invalid", "{status}");
    long
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_by_oauth_makes_an_invalid_connection_valid() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    connected_then_refused(&app).await;

    let view = oauth_connect(&app, WS, &token(&app, "again")).await;

    assert_eq!(view.status, 200, "{view}");
    assert_eq!(view.body["status"], "valid");
    assert!(view.body.get("invalid").is_none(), "{view}");
    assert_eq!(app.connection_status(WS).await.body["status"], "valid");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_by_oauth_keeps_the_selected_ad_accounts() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    connected_then_refused(&app).await;

    let view = oauth_connect(&app, WS, &token(&app, "again")).await;

    assert_eq!(view.status, 200, "{view}");
    assert_eq!(view.body["ad_accounts"][0]["id"], AD_ACCOUNT);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_resume_an_export_refused_meanwhile() {
    let app = spawn_app().await;
    connected_then_refused(&app).await;
    let segment = segment(&app, "meanwhile", 100, 61);
    let meanwhile = job(&app, WS, "exp-meanwhile", &["email"], &segment);
    enqueue(&app, &meanwhile).await;
    let refused = app.finished("exp-meanwhile", DEADLINE).await;
    assert_eq!(refused.status, ExportStatus::Rejected, "{refused:?}");
    let reconnected = oauth_connect(&app, WS, &token(&app, "again")).await;
    assert_eq!(reconnected.status, 200, "{reconnected}");

    enqueue(&app, &meanwhile).await;

    let duplicate = "audience_export_jobs_total{outcome=\"duplicate\"}";
    assert!(
        metric_reaches(&app, duplicate, 1.0).await,
        "the repeated job is ignored as a duplicate"
    );
    let progress = app.progress_of("exp-meanwhile").await;
    assert_eq!(
        progress.status,
        Some(ProgressStatus::Finished(ExportStatus::Rejected))
    );
    assert!(progress.field(Field::Email).audience_id.is_none());
    let finished = app
        .events()
        .iter()
        .filter(|e| matches!(e, Event::ExportFinished(r) if r.export_id == "exp-meanwhile"))
        .count();
    assert_eq!(finished, 1, "not finished again");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_reconnecting_every_upload_uses_the_new_token() {
    let app = spawn_app().await;
    connected_then_refused(&app).await;
    let again = token(&app, "again");
    let reconnected = oauth_connect(&app, WS, &again).await;
    assert_eq!(reconnected.status, 200, "{reconnected}");
    let segment = segment(&app, "after", 500, 61);

    enqueue(&app, &job(&app, WS, "exp-new", &["email"], &segment)).await;

    let report = app.finished("exp-new", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    let audience = &report.audiences[0].audience_id;
    let uploads: Vec<_> = app
        .emulator
        .calls()
        .into_iter()
        .filter(|c| c.path == format!("{audience}/users"))
        .collect();
    assert_eq!(uploads.len() as u64, report.audiences[0].shards);
    let new = long_lived(&again);
    assert!(uploads
        .iter()
        .all(|c| c.token.as_deref() == Some(new.as_str())));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_deletes_the_connection_and_tells_the_upstream_platform() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    connect_and_select(&app, WS).await;

    let answer = app.disconnect(WS).await;

    assert_eq!(answer.status, 204, "{answer}");
    assert_eq!(app.connection_status(WS).await.status, 404);
    assert!(app
        .connections
        .view(&ws(WS))
        .await
        .expect("Redis")
        .is_none());
    assert!(
        connection_changed(&app, WS, ConnectionStatus::Disconnected)
            .await
            .is_some(),
        "the upstream platform hears of it"
    );
    assert_eq!(
        app.disconnect(WS).await.status,
        404,
        "nothing left to delete"
    );
    app.stop().await;
}
