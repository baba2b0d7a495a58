//! A workspace's Facebook connection, end to end, one behaviour per test: connecting through the
//! producer's API and Meta's OAuth dialog (played by the emulator) and reconnecting (`oauth`),
//! who may call the API and which OAuth states it accepts (`api_auth`), the checks a job must
//! pass before anything reaches Meta (`admission`), what happens when Meta refuses a token
//! (`invalidation`, with the system user token), expiry warnings (`expiry`), and that tokens
//! are sealed at rest and never written anywhere in clear (`secrets`).
//!
//! One test binary; every test spawns its own fleet under a fresh namespace and waits on
//! conditions with deadlines. This file holds the helpers the modules share, written once.

mod admission;
mod api_auth;
mod expiry;
mod invalidation;
mod oauth;
mod secrets;
mod upgrade;

use audience_export_core::connection::{revoked_key, token_fingerprint};
use audience_export_core::contract::{ConnectionStatus, Event, FinishedReport};
use audience_export_harness::api::ApiResponse;
use audience_export_harness::app::{eventually, ws, TestApp, AD_ACCOUNT};
use audience_export_harness::emulator::TokenSeed;
use audience_export_harness::segment::generate;
use secrecy::SecretString;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// How long any awaited condition may take.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// Who connects the workspaces these tests connect through the API.
pub const OWNER: &str = "owner@example.com";
/// Who requests `TestApp::job`'s exports.
pub const MARKETER: &str = "marketer@example.com";

/// The browser's part of OAuth: opens the dialog URL the API gave and returns where Meta sends
/// the browser back.
pub async fn follow_dialog(dialog_url: &url::Url) -> url::Url {
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let answer = browser
        .get(dialog_url.as_str())
        .send()
        .await
        .expect("the dialog");
    assert_eq!(answer.status().as_u16(), 302, "the dialog redirects back");
    let location = answer.headers()[reqwest::header::LOCATION]
        .to_str()
        .expect("ascii");
    url::Url::parse(location).expect("a URL")
}

/// A query parameter of `url`.
pub fn param(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// What the dialog sent the browser back with, after someone approved it.
pub struct Approved {
    pub code: String,
    pub state: String,
}

/// Starts connecting `ws` (connected by `OWNER`), has `token` approve the dialog (a user token
/// for the test's ad account), and returns what came back, before the callback.
pub async fn approve_dialog(app: &TestApp, ws: &str, token: &str) -> Approved {
    let start = app.start_oauth(ws, Some(OWNER)).await;
    assert_eq!(start.status, 200, "{start}");
    app.emulator
        .approve_next_dialog(TokenSeed::user(token, &[AD_ACCOUNT]));
    let back = follow_dialog(&start.dialog_url()).await;
    Approved {
        code: param(&back, "code").expect("a code"),
        state: param(&back, "state").expect("the state"),
    }
}

/// Connects `ws` through the API: start, the person approves as `short` (a user token for the
/// test's ad account; Meta makes `long_lived(short)` of it), the callback. Returns the
/// callback's answer.
pub async fn oauth_connect(app: &TestApp, ws: &str, short: &str) -> ApiResponse {
    let approved = approve_dialog(app, ws, short).await;
    app.oauth_callback(ws, &approved.code, &approved.state)
        .await
}

/// The long-lived token the emulator exchanges a short-lived `short` for.
pub fn long_lived(short: &str) -> String {
    format!("{short}LL")
}

/// A token unique to this app: `prefix` and its namespace.
pub fn token(app: &TestApp, prefix: &str) -> String {
    format!("EAA{prefix}{}", app.namespace())
}

/// Connects `ws` by OAuth with a fresh token and selects the test's ad account; returns the
/// long-lived token its calls use.
pub async fn connect_and_select(app: &TestApp, ws: &str) -> String {
    let short = token(app, "short");
    let connected = oauth_connect(app, ws, &short).await;
    assert_eq!(connected.status, 200, "{connected}");
    let selected = app.select_ad_accounts(ws, &[AD_ACCOUNT]).await;
    assert_eq!(selected.status, 200, "{selected}");
    long_lived(&short)
}

/// A generated segment of `members` in the app's folder.
pub fn segment(app: &TestApp, name: &str, members: u64, seed: u64) -> PathBuf {
    let path = app.dir.join(format!("{name}.ndjson"));
    generate(&path, members, seed).expect("segment");
    path
}

/// `TestApp::job` for workspace `ws`.
pub fn job(
    app: &TestApp,
    ws: &str,
    export_id: &str,
    fields: &[&str],
    segment: &std::path::Path,
) -> Value {
    let mut job = app.job(export_id, fields, segment);
    job["workspace_id"] = json!(ws);
    job
}

pub async fn enqueue(app: &TestApp, job: &Value) {
    app.enqueue(job.to_string().as_bytes()).await;
}

/// The report's reason, or "" when it has none.
pub fn reason(report: &FinishedReport) -> &str {
    report.reason.as_deref().unwrap_or_default()
}

/// Emails so far to `to` that contain `containing`.
pub fn mails_to(app: &TestApp, to: &str, containing: &str) -> usize {
    app.smtp
        .mails()
        .iter()
        .filter(|m| m.to.iter().any(|t| t.contains(to)) && m.data.contains(containing))
        .count()
}

/// Waits for the email about export `export_id` to its requester (its report, or why it could
/// not start); returns its subject.
pub async fn report_mail_subject(app: &TestApp, export_id: &str) -> String {
    let mail = app
        .smtp
        .wait_for(DEADLINE, |m| m.data.contains(export_id))
        .await
        .unwrap_or_else(|| panic!("the requester of {export_id} is told"));
    mail.subject().unwrap_or_default().to_owned()
}

/// Every role's `/metrics`, concatenated.
pub async fn metrics_text(app: &TestApp) -> String {
    let mut out = String::new();
    for addr in &app.ops {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        out.push_str(&text);
    }
    out
}

/// The value of one series (`name{labels}` exactly as exposed), summed over the roles that
/// expose it; None when none does.
pub async fn metric(app: &TestApp, series: &str) -> Option<f64> {
    let text = metrics_text(app).await;
    let values: Vec<f64> = text
        .lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Waits until `series` reads exactly `value`; false when it does not within the deadline.
pub async fn metric_reaches(app: &TestApp, series: &str, value: f64) -> bool {
    eventually(DEADLINE, || async {
        (metric(app, series).await == Some(value)).then_some(())
    })
    .await
    .is_some()
}

/// A token's fingerprint, as Redis, events and logs name it.
pub fn fingerprint(token: &str) -> String {
    token_fingerprint(&SecretString::from(token.to_owned()))
}

/// The refusal recorded for one of a workspace's tokens (what a worker or the producer writes
/// when Meta refuses it), if any.
pub async fn recorded_refusal(app: &TestApp, workspace: &str, token: &str) -> Option<String> {
    let mut redis = app.progress.connection();
    redis::cmd("GET")
        .arg(revoked_key(
            app.namespace(),
            &ws(workspace),
            &fingerprint(token),
        ))
        .query_async(&mut redis)
        .await
        .expect("Redis")
}

/// Records that Meta refused `token` moments ago, as a worker does (`Revocations::refused`)
/// without the event: the finalizer has not marked the connection invalid yet.
pub async fn record_refusal(app: &TestApp, workspace: &str, token: &str, reason: &str) {
    let mut redis = app.progress.connection();
    redis::cmd("SET")
        .arg(revoked_key(
            app.namespace(),
            &ws(workspace),
            &fingerprint(token),
        ))
        .arg(reason)
        .arg("EX")
        .arg(3600)
        .query_async::<()>(&mut redis)
        .await
        .expect("Redis");
}

/// Whether `e` is `connection.changed` for `workspace` with `status`.
pub fn is_change(e: &Event, workspace: &str, to: ConnectionStatus) -> bool {
    matches!(e, Event::ConnectionChanged { workspace_id, status, .. }
        if workspace_id == workspace && *status == to)
}

/// Waits for `connection.changed` of `workspace` to `status`.
pub async fn connection_changed(
    app: &TestApp,
    workspace: &str,
    status: ConnectionStatus,
) -> Option<Event> {
    app.wait_event(DEADLINE, |e| is_change(e, workspace, status))
        .await
}

/// How many `connection.changed` of `workspace` to `status` were published so far.
pub fn changes(app: &TestApp, workspace: &str, status: ConnectionStatus) -> usize {
    app.events()
        .iter()
        .filter(|e| is_change(e, workspace, status))
        .count()
}
