//! Who may call the producer's API (the key, on every route, the OAuth callback included), how
//! it answers for workspaces it does not know, and which OAuth states it accepts: only its own,
//! unaltered, unexpired, for the workspace that started it, once.

use crate::{approve_dialog, metric, metrics_text, param, token, Approved};
use audience_export_core::progress::now_ms;
use audience_export_core::token_cipher::TokenCipher;
use audience_export_harness::app::{spawn_app_with, Roles, TestApp, WORKSPACE};
use secrecy::SecretString;
use serde_json::json;

const WS: &str = "ws-state";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_api_key_is_refused() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let answer = app.without_key().connection_status(WORKSPACE).await;

    assert_eq!(answer.status, 401, "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_wrong_api_key_is_refused() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let answer = app
        .with_key("not-the-key")
        .connection_status(WORKSPACE)
        .await;

    assert_eq!(answer.status, 401, "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oauth_callback_needs_the_api_key_too() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let answer = app.without_key().oauth_callback(WORKSPACE, "x", "y").await;

    assert_eq!(answer.status, 401, "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_the_api_key_is_answered() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let view = app.connection_status(WORKSPACE).await;

    assert_eq!(view.status, 200, "{view}");
    assert_eq!(view.body["status"], "valid");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_that_never_connected_is_not_found() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let answer = app.connection_status("nobody").await;

    assert_eq!(answer.status, 404, "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_id_that_cannot_be_one_is_a_bad_request() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    let answer = app.connection_status("bad%20id").await;

    assert_eq!(answer.status, 400, "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requests_are_counted_by_route_template_never_by_workspace() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    app.without_key().connection_status("ws-count-1").await;
    app.with_key("not-the-key")
        .connection_status("ws-count-2")
        .await;

    let series = "audience_export_api_requests_total{route=\"/v1/workspaces/{ws}/connection\",status=\"401\"}";
    assert_eq!(metric(&app, series).await, Some(2.0));
    let metrics = metrics_text(&app).await;
    assert!(
        !metrics.contains("ws-count-"),
        "no workspace id in the metrics: {metrics}"
    );
    app.stop().await;
}

/// A state this producer issued for `WS`.
async fn issued_state(app: &TestApp) -> String {
    let start = app.start_oauth(WS, None).await;
    assert_eq!(start.status, 200, "{start}");
    param(&start.dialog_url(), "state").expect("a state")
}

/// Sends `state` to `WS`'s callback; asserts it is refused and that nothing was stored.
async fn assert_refused_state(app: &TestApp, state: &str) {
    let answer = app.oauth_callback(WS, "AQDcode", state).await;
    assert_eq!(answer.status, 403, "{answer}");
    assert!(
        answer.error().contains("not issued by this service"),
        "{answer}"
    );
    assert_eq!(
        app.connection_status(WS).await.status,
        404,
        "nothing stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_state_is_refused() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let mut altered = issued_state(&app).await.into_bytes();
    let at = altered.len() - 5;
    altered[at] = if altered[at] == b'A' { b'B' } else { b'A' };

    assert_refused_state(&app, &String::from_utf8(altered).expect("ascii")).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_sealed_by_another_deployments_key_is_refused() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let other_key =
        TokenCipher::from_config(Some(&TokenCipher::generate_config("test"))).expect("cipher");
    let state = json!({
        "workspace_id": WS,
        "connected_by": null,
        "expires_at": now_ms() / 1000 + 600,
        "nonce": 1
    });
    let foreign = other_key.seal(&SecretString::from(state.to_string()), "oauth-state");

    assert_refused_state(&app, &foreign).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_is_no_sealed_state_at_all_is_refused() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;

    assert_refused_state(&app, "garbage").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_dialog_connects_nothing_and_says_why() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let state = issued_state(&app).await;

    let answer = app
        .oauth_declined(WS, "access_denied", "user_denied", &state)
        .await;

    assert_eq!(answer.status, 422, "{answer}");
    assert!(answer.error().contains("user_denied"), "{answer}");
    assert_eq!(
        app.connection_status(WS).await.status,
        404,
        "nothing stored"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_issued_for_another_workspace_is_refused() {
    // Someone else's connect link, approved by a person logged in to another workspace.
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let Approved { code, state } = approve_dialog(&app, WS, &token(&app, "bound")).await;

    let answer = app.oauth_callback("ws-victim", &code, &state).await;

    assert_eq!(answer.status, 403, "{answer}");
    assert!(answer.error().contains("another workspace"), "{answer}");
    assert_eq!(app.connection_status("ws-victim").await.status, 404);
    assert_eq!(app.connection_status(WS).await.status, 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_refused_at_another_workspace_still_works_at_its_own() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let Approved { code, state } = approve_dialog(&app, WS, &token(&app, "bound")).await;
    let elsewhere = app.oauth_callback("ws-victim", &code, &state).await;
    assert_eq!(elsewhere.status, 403, "{elsewhere}");

    let answer = app.oauth_callback(WS, &code, &state).await;

    assert_eq!(answer.status, 200, "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_works_once() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let Approved { code, state } = approve_dialog(&app, WS, &token(&app, "once")).await;
    let first = app.oauth_callback(WS, &code, &state).await;
    assert_eq!(first.status, 200, "{first}");

    let again = app.oauth_callback(WS, &code, &state).await;

    assert_eq!(again.status, 403, "{again}");
    assert!(again.error().contains("used already"), "{again}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_state_is_refused_and_nothing_is_stored() {
    let app = spawn_app_with(Roles::PRODUCER, |s| s.oauth.state_ttl_secs = 0).await;
    let Approved { code, state } = approve_dialog(&app, WS, &token(&app, "late")).await;

    let answer = app.oauth_callback(WS, &code, &state).await;

    assert_eq!(answer.status, 403, "{answer}");
    assert!(answer.error().contains("expired"), "{answer}");
    assert_eq!(
        app.connection_status(WS).await.status,
        404,
        "nothing stored"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_does_not_start_without_an_api_key() {
    // No key and no dev mode.
    let mut settings = audience_export_core::config::Settings::for_namespace("no-key-test");
    settings.connections.encryption_keys = Some(TokenCipher::generate_config("k"));
    settings.producer.ops_addr = ([127, 0, 0, 1], 0).into();
    settings.api.addr = ([127, 0, 0, 1], 0).into();
    let shutdown = tokio_util::sync::CancellationToken::new();

    let refused = audience_export_producer::start(settings, shutdown.clone()).await;

    shutdown.cancel();
    let error = refused.err().expect("refuses to start").to_string();
    assert!(error.contains("AE_API__KEY"), "{error}");
}
