//! User tokens expire about 60 days after the OAuth dialog: the finalizer's sweep counts the
//! connections whose token expires within the warning window and warns whoever connected each
//! one, once per expiry date. Workspaces whose exports use a system user token are skipped.
//! The sweep is driven by hand here, at a chosen `now`.

use crate::OWNER;
use audience_export_core::connection::NewToken;
use audience_export_core::progress::now_ms;
use audience_export_finalizer::email::Mailer;
use audience_export_finalizer::expiry::Sweeper;
use audience_export_finalizer::metrics::{EmailKind, EmailOutcome, Metrics};
use audience_export_finalizer::notify::Notifier;
use audience_export_harness::app::{account, spawn_app_with, ws, Roles, TestApp, AD_ACCOUNT};
use audience_export_harness::smtp::Mail;
use secrecy::SecretString;
use std::time::Duration;

/// A user token that expires in three days.
fn expiring_soon() -> NewToken {
    NewToken {
        token: SecretString::from("EAAsoon"),
        expires_at: now_ms() / 1000 + 3 * 86_400,
        scopes: vec!["ads_management".into()],
        ad_accounts: vec![account(AD_ACCOUNT)],
    }
}

/// Connects `workspace` with `expiring_soon`, connected by `OWNER`.
async fn connect_expiring(app: &TestApp, workspace: &str) {
    app.connections
        .store_user_token(&ws(workspace), &expiring_soon(), Some(OWNER), now_ms())
        .await
        .expect("store");
}

/// A sweeper on the app's connections and SMTP sink, warning 7 days ahead, with its metrics.
fn sweeper(app: &TestApp) -> (Sweeper, Metrics) {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).expect("metrics");
    let mailer = Mailer::new(
        "127.0.0.1",
        app.smtp.addr.port(),
        "fleet@example.com",
        std::time::Duration::from_secs(10),
    )
    .expect("mailer");
    let sweeper = Sweeper {
        connections: app.connections.clone(),
        notifier: Notifier::new(mailer, metrics.clone()),
        metrics: metrics.clone(),
        warn_within: Duration::from_secs(7 * 86_400),
        owner: "test".into(),
    };
    (sweeper, metrics)
}

fn warnings(app: &TestApp) -> Vec<Mail> {
    app.smtp
        .mails()
        .into_iter()
        .filter(|m| m.subject().is_some_and(|s| s.contains("expires on")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_token_expiring_within_the_window_is_counted() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    // ws-1 (60 days left) is outside the window; ws-soon is inside.
    connect_expiring(&app, "ws-soon").await;
    let (sweeper, metrics) = sweeper(&app);

    let expiring = sweeper.sweep(now_ms() / 1000).await.expect("sweep");

    assert_eq!(expiring, 1);
    assert_eq!(metrics.expiring.get(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_using_a_system_user_token_gets_no_expiry_warning() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    // Expiring too, but its exports use a system user token.
    connect_expiring(&app, "ws-system").await;
    let system = NewToken {
        expires_at: 0,
        token: SecretString::from("EAAsys"),
        ..expiring_soon()
    };
    app.connections
        .store_system_token(&ws("ws-system"), &system, None, now_ms())
        .await
        .expect("store");
    let (sweeper, metrics) = sweeper(&app);

    let expiring = sweeper.sweep(now_ms() / 1000).await.expect("sweep");

    assert_eq!(expiring, 0);
    assert_eq!(metrics.expiring.get(), 0);
    assert!(warnings(&app).is_empty(), "{:?}", warnings(&app));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_is_warned_about_once_however_many_sweeps() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    connect_expiring(&app, "ws-soon").await;
    let (sweeper, metrics) = sweeper(&app);
    let now = now_ms() / 1000;

    assert_eq!(sweeper.sweep(now).await.expect("sweep"), 1);
    // Each sweep sends before it returns: after the second, nothing more is on its way.
    assert_eq!(sweeper.sweep(now).await.expect("sweep"), 1, "still counted");

    assert_eq!(warnings(&app).len(), 1, "one warning, however many sweeps");
    assert_eq!(
        metrics
            .emails
            .with((EmailKind::Expiry, EmailOutcome::Sent))
            .get(),
        1
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiry_warning_tells_whoever_connected_which_workspace_and_when() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    connect_expiring(&app, "ws-soon").await;
    let (sweeper, _) = sweeper(&app);

    sweeper.sweep(now_ms() / 1000).await.expect("sweep");

    let warnings = warnings(&app);
    let warning = warnings.first().expect("a warning");
    assert!(warning.to.iter().any(|t| t.contains(OWNER)), "{warning:?}");
    assert!(warning.data.contains("ws-soon"));
    assert!(
        warning.body().contains("in 2 day(s)") || warning.body().contains("in 3 day(s)"),
        "{}",
        warning.body()
    );
    app.stop().await;
}
