//! A workspace's Facebook connection, end to end: connecting through the producer's API and
//! Meta's OAuth dialog (played by the emulator), the system user token, the checks a job must
//! pass, invalidation when Meta refuses the token mid-export, reconnecting, expiry warnings, and
//! that no token is ever written anywhere in clear.

use audience_export_core::connection::{Connections, Invalidated, NewToken, TokenKind};
use audience_export_core::contract::{Event, ExportStatus, FinishedReport};
use audience_export_core::progress::now_ms;
use audience_export_core::token_cipher::TokenCipher;
use audience_export_finalizer::email::Mailer;
use audience_export_finalizer::expiry::Sweeper;
use audience_export_harness::app::{
    connect_workspace, eventually, spawn_app_with, Roles, TestApp, AD_ACCOUNT, APP_SECRET,
    WORKSPACE,
};
use audience_export_harness::emulator::{AdAccountSeed, Latency, TokenSeed};
use audience_export_harness::logs;
use audience_export_harness::segment::generate;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);
const OWNER: &str = "owner@example.com";
const MARKETER: &str = "marketer@example.com";

/// The browser's part of OAuth: opens the dialog URL the API gave and returns where Meta sends
/// the browser back.
async fn follow_dialog(dialog_url: &str) -> url::Url {
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let answer = browser.get(dialog_url).send().await.expect("the dialog");
    assert_eq!(answer.status().as_u16(), 302, "the dialog redirects back");
    let location = answer.headers()[reqwest::header::LOCATION]
        .to_str()
        .expect("ascii");
    url::Url::parse(location).expect("a URL")
}

fn param(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Connects `ws` through the API: start, the person approves as `short` (a user token for the
/// test's ad account), the callback. Returns the callback's answer.
async fn oauth_connect(app: &TestApp, ws: &str, short: &str) -> (u16, Value) {
    let (status, start) = app
        .api_call(
            Method::POST,
            &format!("/v1/workspaces/{ws}/connection/oauth"),
            Some(json!({ "connected_by": OWNER })),
        )
        .await;
    assert_eq!(status, 200, "{start}");
    let dialog = url::Url::parse(start["dialog_url"].as_str().expect("dialog_url")).expect("url");
    assert_eq!(param(&dialog, "scope").as_deref(), Some("ads_management"));
    assert_eq!(
        param(&dialog, "redirect_uri").as_deref(),
        Some(app.settings.oauth.redirect_uri.as_str())
    );
    assert_eq!(
        param(&dialog, "client_id").as_deref(),
        Some(app.settings.oauth.app_id.as_str())
    );
    let state = param(&dialog, "state").expect("state");
    assert!(
        !state.contains(ws) && !state.contains(OWNER),
        "the state is sealed"
    );

    app.emulator
        .approve_next_dialog(TokenSeed::user(short, &[AD_ACCOUNT]));
    let back = follow_dialog(dialog.as_str()).await;
    assert!(back.as_str().starts_with(&app.settings.oauth.redirect_uri));
    assert_eq!(param(&back, "state").as_deref(), Some(state.as_str()));
    app.api_call(
        Method::POST,
        &format!("/v1/workspaces/{ws}/connection/oauth/callback"),
        Some(json!({ "code": param(&back, "code").expect("code"), "state": state })),
    )
    .await
}

fn job(
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

/// The report's reason, or "" when it has none.
fn reason(report: &FinishedReport) -> &str {
    report.reason.as_deref().unwrap_or_default()
}

async fn enqueue(app: &TestApp, job: &Value) {
    app.enqueue(job.to_string().as_bytes()).await;
}

fn mails_to(app: &TestApp, to: &str, containing: &str) -> usize {
    app.smtp
        .mails()
        .iter()
        .filter(|m| m.to.iter().any(|t| t.contains(to)) && m.data.contains(containing))
        .count()
}

async fn metrics_text(app: &TestApp) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_by_oauth_lose_the_token_mid_export_and_reconnect() {
    let app = spawn_app_with(Roles::ALL, |s| {
        s.producer.shard_size = 20;
        s.worker.concurrency = 2;
        // About 5 s for the two exports' 48 shards: time to revoke the token mid-way.
        s.worker.calls_per_second_per_account = 10;
    })
    .await;
    let ws = "ws-oauth";
    let short = format!("EAAshort{}", app.namespace());
    let long = format!("{short}LL");

    // Connect.
    let (status, view) = oauth_connect(&app, ws, &short).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "valid");
    assert_eq!(view["token_kind"], "user");
    assert_eq!(view["connected_by"], OWNER);
    assert_eq!(view["available_ad_accounts"], json!([AD_ACCOUNT]));
    assert!(view["scopes"]
        .as_array()
        .expect("scopes")
        .contains(&json!("ads_management")));
    let expires = view["user_token_expires_at"].as_u64().expect("expiry");
    assert!(
        expires > now_ms() / 1000 + 59 * 86_400,
        "long-lived: {expires}"
    );
    let event = app
        .wait_event(DEADLINE, |e| {
            matches!(e, Event::ConnectionChanged { workspace_id, status, .. } if workspace_id == ws && status == "valid")
        })
        .await;
    assert!(
        event.is_some(),
        "the upstream platform hears of the connection"
    );

    // No ad account selected yet: refused.
    let segment = app.dir.join("oauth.ndjson");
    generate(&segment, 500, 61).expect("segment");
    enqueue(&app, &job(&app, ws, "exp-unselected", &["email"], &segment)).await;
    let refused = app.finished("exp-unselected", DEADLINE).await;
    assert_eq!(refused.status, ExportStatus::Rejected);
    assert!(
        reason(&refused).contains(&format!(
            "ad account act_{AD_ACCOUNT} is not selected for workspace {ws}"
        )),
        "{refused:?}"
    );

    let (status, view) = app
        .api_call(
            Method::PUT,
            &format!("/v1/workspaces/{ws}/connection/ad-accounts"),
            Some(json!({ "ad_account_ids": [format!("act_{AD_ACCOUNT}")] })),
        )
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["ad_accounts"][0]["id"], AD_ACCOUNT);
    assert_eq!(view["ad_accounts"][0]["tos_accepted"], true);

    // Two exports run; Meta revokes the token while they upload.
    app.emulator.set_latency(Latency {
        base_ms: 30,
        per_record_us: 0,
        jitter_ms: 0,
    });
    enqueue(&app, &job(&app, ws, "exp-a", &["email"], &segment)).await;
    enqueue(&app, &job(&app, ws, "exp-b", &["phone"], &segment)).await;
    let uploading = eventually(DEADLINE, || async {
        let a = app.progress.snapshot("exp-a").await.ok()?;
        let b = app.progress.snapshot("exp-b").await.ok()?;
        (a.count("shards_done") >= 2 && b.count("shards_done") >= 1).then_some(())
    })
    .await;
    assert!(
        uploading.is_some(),
        "both exports upload before the revocation"
    );
    assert!(app.emulator.revoke(&long, 460));

    for export_id in ["exp-a", "exp-b"] {
        let report = app.finished(export_id, DEADLINE).await;
        assert_eq!(report.status, ExportStatus::Failed, "{report:?}");
        assert!(
            reason(&report).starts_with("token invalid: Meta refused the Facebook connection"),
            "{report:?}"
        );
        let audience = &report.audiences[0];
        assert!(audience.shards_failed >= 1 && audience.shards > audience.shards_failed);
    }
    let after = app.emulator.calls_after_revocation(&long);
    assert!(
        (1..=u64::from(app.settings.worker.concurrency)).contains(&after),
        "only calls already in flight reach Meta after the first refusal: {after}"
    );

    // The connection is invalid, with Meta's reason, and the upstream platform is told once.
    let (status, view) = app
        .api_call(
            Method::GET,
            &format!("/v1/workspaces/{ws}/connection"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(view["status"], "invalid", "{view}");
    assert_eq!(view["invalid"]["code"], 190);
    assert_eq!(view["invalid"]["subcode"], 460);
    let changed = app
        .wait_event(DEADLINE, |e| {
            matches!(e, Event::ConnectionChanged { workspace_id, status, .. } if workspace_id == ws && status == "invalid")
        })
        .await;
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

    // New jobs are refused until it is reconnected.
    enqueue(&app, &job(&app, ws, "exp-meanwhile", &["email"], &segment)).await;
    let meanwhile = app.finished("exp-meanwhile", DEADLINE).await;
    assert_eq!(meanwhile.status, ExportStatus::Rejected);
    assert!(
        reason(&meanwhile).starts_with("connection invalid"),
        "{meanwhile:?}"
    );
    let told = app
        .smtp
        .wait_for(DEADLINE, |m| m.data.contains("exp-meanwhile"))
        .await;
    assert!(told.is_some(), "the requester of a refused job is told");

    // One email per export to its requester, one to whoever connected the workspace.
    let owner_mail = app
        .smtp
        .wait_for(DEADLINE, |m| {
            m.to.iter().any(|t| t.contains(OWNER)) && m.data.contains("must be reconnected")
        })
        .await
        .expect("the owner is told");
    assert!(owner_mail
        .body()
        .contains("changed their Facebook password"));
    assert!(owner_mail.body().contains(ws));
    assert_eq!(mails_to(&app, MARKETER, "exp-a"), 1);
    assert_eq!(mails_to(&app, MARKETER, "exp-b"), 1);
    assert_eq!(mails_to(&app, OWNER, "must be reconnected"), 1);
    let changes = app
        .events()
        .iter()
        .filter(|e| matches!(e, Event::ConnectionChanged { workspace_id, status, .. } if workspace_id == ws && status == "invalid"))
        .count();
    assert_eq!(changes, 1, "marked invalid once, however many reported it");

    // Reconnect: valid again, the selection kept.
    let short2 = format!("EAAagain{}", app.namespace());
    let long2 = format!("{short2}LL");
    let (status, view) = oauth_connect(&app, ws, &short2).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "valid");
    assert!(view.get("invalid").is_none());
    assert_eq!(view["ad_accounts"][0]["id"], AD_ACCOUNT);

    // The refused job is not resumed silently; a new export goes through with the new token.
    enqueue(&app, &job(&app, ws, "exp-meanwhile", &["email"], &segment)).await;
    let ignored = eventually(DEADLINE, || async {
        metrics_text(&app)
            .await
            .contains("audience_export_jobs_total{outcome=\"duplicate\"} 1")
            .then_some(())
    })
    .await;
    assert!(
        ignored.is_some(),
        "the repeated job is ignored as a duplicate"
    );
    let snapshot = app
        .progress
        .snapshot("exp-meanwhile")
        .await
        .expect("snapshot");
    assert_eq!(snapshot.get("status"), Some("rejected"));
    assert!(snapshot.get("email:audience_id").is_none());

    app.emulator.set_latency(Latency::default());
    enqueue(&app, &job(&app, ws, "exp-new", &["email"], &segment)).await;
    let report = app.finished("exp-new", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    let audience = report.audiences[0].audience_id.clone();
    let uploads: Vec<_> = app
        .emulator
        .calls()
        .into_iter()
        .filter(|c| c.path == format!("{audience}/users"))
        .collect();
    assert_eq!(uploads.len() as u64, report.audiences[0].shards);
    assert!(uploads
        .iter()
        .all(|c| c.token.as_deref() == Some(long2.as_str())));

    // No token, app secret or API key anywhere in clear.
    let secrets = [
        short.clone(),
        short2.clone(),
        APP_SECRET.to_owned(),
        app.settings
            .api
            .key
            .as_ref()
            .expect("key")
            .expose_secret()
            .to_owned(),
    ];
    let redis = app.redis_dump().await;
    assert!(
        redis.contains(&format!("{}:workspace:{ws}:connection", app.namespace()))
            && redis.contains("v1:test:"),
        "the connection is stored, sealed"
    );
    let captured = logs::captured();
    assert!(
        captured.contains("Workspace connected to Facebook."),
        "logs were captured"
    );
    let events = serde_json::to_string(&app.events()).expect("events");
    let mails: String = app.smtp.mails().iter().map(|m| m.data.clone()).collect();
    let metrics = metrics_text(&app).await;
    for secret in &secrets {
        for (place, text) in [
            ("Redis", &redis),
            ("logs", &captured),
            ("events", &events),
            ("emails", &mails),
            ("metrics", &metrics),
        ] {
            assert!(
                !text.contains(secret.as_str()),
                "a secret in clear in {place}"
            );
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_user_token_is_used_for_every_call_of_its_workspace() {
    let app = spawn_app_with(Roles::ALL, |_| {}).await;
    let system = format!("EAAsystem{}", app.namespace());
    app.emulator.add_token(TokenSeed {
        token: system.clone(),
        kind: audience_export_harness::emulator::TokenKind::SystemUser,
        ad_accounts: vec![AD_ACCOUNT.into()],
        user_id: None,
    });
    let path = format!("/v1/workspaces/{WORKSPACE}/connection/system-user-token");

    let (status, body) = app
        .api_call(
            Method::PUT,
            &path,
            Some(json!({ "token": "EAAnot-a-token" })),
        )
        .await;
    assert_eq!(status, 422, "Meta refuses an unknown token: {body}");
    let (status, view) = app
        .api_call(Method::PUT, &path, Some(json!({ "token": system })))
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["token_kind"], "system_user");
    assert_eq!(view["has_user_token"], true);
    assert!(!view.to_string().contains(&system), "never returned");

    let first = app.emulator.calls().len();
    let (status, _) = app
        .api_call(
            Method::PUT,
            &format!("/v1/workspaces/{WORKSPACE}/connection/ad-accounts"),
            Some(json!({ "ad_account_ids": [AD_ACCOUNT] })),
        )
        .await;
    assert_eq!(status, 200);
    let segment = app.dir.join("system.ndjson");
    generate(&segment, 300, 71).expect("segment");
    app.export("exp-system", &["email", "phone"], &segment)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_missing_or_wrong_keys_and_forged_or_expired_states() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let path = format!("/v1/workspaces/{WORKSPACE}/connection");
    let (status, body) = app.api_call_with_key(Method::GET, &path, None, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = app
        .api_call_with_key(Method::GET, &path, None, Some("not-the-key"))
        .await;
    assert_eq!(status, 401);
    let (status, _) = app
        .api_call_with_key(
            Method::POST,
            &format!("/v1/workspaces/{WORKSPACE}/connection/oauth/callback"),
            Some(json!({"code": "x", "state": "y"})),
            None,
        )
        .await;
    assert_eq!(status, 401, "the callback too");
    let (status, view) = app.api_call(Method::GET, &path, None).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "valid");
    let (status, _) = app
        .api_call(Method::GET, "/v1/workspaces/nobody/connection", None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = app
        .api_call(Method::GET, "/v1/workspaces/bad%20id/connection", None)
        .await;
    assert_eq!(status, 400);

    // A state altered, sealed by another deployment's key, or expired: refused, nothing stored.
    let (_, start) = app
        .api_call(
            Method::POST,
            "/v1/workspaces/ws-state/connection/oauth",
            Some(json!({})),
        )
        .await;
    let dialog = url::Url::parse(start["dialog_url"].as_str().expect("url")).expect("url");
    let state = param(&dialog, "state").expect("state");
    let mut forged = state.clone().into_bytes();
    let at = forged.len() - 5;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).expect("ascii");
    let other_key =
        TokenCipher::from_config(Some(&TokenCipher::generate_config("test"))).expect("cipher");
    let foreign = other_key.seal(
        &SecretString::from(
            json!({"workspace_id": "ws-state", "connected_by": null, "expires_at": now_ms() / 1000 + 600, "nonce": 1})
                .to_string(),
        ),
        "oauth-state",
    );
    for bad in [forged, foreign, "garbage".to_owned()] {
        let (status, body) = app
            .api_call(
                Method::POST,
                "/v1/workspaces/ws-state/connection/oauth/callback",
                Some(json!({ "code": "AQDcode", "state": bad })),
            )
            .await;
        assert_eq!(status, 403, "{body}");
    }
    // The dialog declined.
    let (status, body) = app
        .api_call(
            Method::POST,
            "/v1/workspaces/ws-state/connection/oauth/callback",
            Some(
                json!({ "error": "access_denied", "error_reason": "user_denied", "state": state }),
            ),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap_or_default()
        .contains("user_denied"));

    // The state names its workspace: someone else's connect link, approved by a person logged in
    // to another workspace, is refused there; and a state works once.
    app.emulator
        .approve_next_dialog(TokenSeed::user("EAAbound", &[AD_ACCOUNT]));
    let back = follow_dialog(dialog.as_str()).await;
    let answer = json!({ "code": param(&back, "code"), "state": param(&back, "state") });
    let (status, body) = app
        .api_call(
            Method::POST,
            "/v1/workspaces/ws-victim/connection/oauth/callback",
            Some(answer.clone()),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap_or_default()
        .contains("another workspace"));
    let callback = "/v1/workspaces/ws-state/connection/oauth/callback";
    let (status, body) = app
        .api_call(Method::POST, callback, Some(answer.clone()))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.api_call(Method::POST, callback, Some(answer)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap_or_default()
        .contains("used already"));
    let metrics = metrics_text(&app).await;
    assert!(
        metrics.contains(
            "audience_export_api_requests_total{route=\"/v1/workspaces/{ws}/connection\",status=\"401\"} 2"
        ),
        "requests are counted by route template, never by workspace: {metrics}"
    );
    app.stop().await;

    let expiring = spawn_app_with(Roles::PRODUCER, |s| s.oauth.state_ttl_secs = 0).await;
    let (_, start) = expiring
        .api_call(
            Method::POST,
            "/v1/workspaces/ws-state/connection/oauth",
            None,
        )
        .await;
    let dialog = url::Url::parse(start["dialog_url"].as_str().expect("url")).expect("url");
    expiring
        .emulator
        .approve_next_dialog(TokenSeed::user("EAAlate", &[AD_ACCOUNT]));
    let back = follow_dialog(dialog.as_str()).await;
    let (status, body) = expiring
        .api_call(
            Method::POST,
            "/v1/workspaces/ws-state/connection/oauth/callback",
            Some(json!({ "code": param(&back, "code"), "state": param(&back, "state") })),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap_or_default()
        .contains("expired"));
    let (status, _) = expiring
        .api_call(Method::GET, "/v1/workspaces/ws-state/connection", None)
        .await;
    assert_eq!(status, 404, "nothing was stored");
    expiring.stop().await;

    // No key and no dev mode: the producer does not start.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_refused_without_a_connection_a_selected_account_or_accepted_terms() {
    let app = spawn_app_with(Roles::ALL, |_| {}).await;
    let segment = app.dir.join("refusals.ndjson");
    generate(&segment, 50, 81).expect("segment");
    let other = "2002";
    let terms = "3003";
    let token2 = format!("EAAws2{}", app.namespace());
    app.emulator.add_ad_account(AdAccountSeed::new(other));
    app.emulator.add_ad_account(AdAccountSeed {
        tos_accepted: false,
        ..AdAccountSeed::new(terms)
    });
    app.emulator
        .add_token(TokenSeed::user(&token2, &[other, terms]));
    // Workspace ws-2 owns ad accounts 2002 and 3003, and selected 2002.
    connect_workspace(&app.connections, "ws-2", &token2, other).await;
    let both = NewToken {
        token: SecretString::from(token2.clone()),
        expires_at: now_ms() / 1000 + 60 * 86_400,
        scopes: vec!["ads_management".into()],
        ad_accounts: vec![other.into(), terms.into()],
    };
    app.connections
        .store_user_token("ws-2", &both, None, now_ms())
        .await
        .expect("store");

    let mut cases = vec![(
        job(&app, "ws-none", "exp-none", &["email"], &segment),
        "no Facebook connection: workspace ws-none has not connected Facebook".to_owned(),
    )];
    // ws-1 asks for ws-2's ad account: not its own, so refused; ws-2's token is never used.
    let mut foreign = app.job("exp-foreign", &["email"], &segment);
    foreign["ad_account_id"] = json!(format!("act_{other}"));
    cases.push((
        foreign,
        format!("ad account act_{other} is not selected for workspace {WORKSPACE}"),
    ));
    let (status, view) = app
        .api_call(
            Method::PUT,
            "/v1/workspaces/ws-2/connection/ad-accounts",
            Some(json!({ "ad_account_ids": [other, terms] })),
        )
        .await;
    assert_eq!(status, 200, "{view}");
    let unaccepted = view["ad_accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .find(|a| a["id"] == terms)
        .cloned()
        .expect("listed");
    assert_eq!(unaccepted["tos_accepted"], false);
    assert_eq!(
        unaccepted["terms_url"],
        format!("https://business.facebook.com/ads/manage/customaudiences/tos/?act={terms}")
    );
    let (status, _) = app
        .api_call(
            Method::PUT,
            "/v1/workspaces/ws-2/connection/ad-accounts",
            Some(json!({ "ad_account_ids": ["9999"] })),
        )
        .await;
    assert_eq!(status, 422, "an account the token cannot use is refused");
    let mut unaccepted_job = job(&app, "ws-2", "exp-terms", &["email"], &segment);
    unaccepted_job["ad_account_id"] = json!(format!("act_{terms}"));
    cases.push((
        unaccepted_job,
        format!("terms not accepted: accept the Custom Audience terms for act_{terms} at https://business.facebook.com/ads/manage/customaudiences/tos/?act={terms}"),
    ));

    let before = app.emulator.audiences().len();
    for (job, expected) in &cases {
        enqueue(&app, job).await;
        let export_id = job["export_id"].as_str().expect("id");
        let report = app.finished(export_id, DEADLINE).await;
        assert_eq!(report.status, ExportStatus::Rejected, "{report:?}");
        assert!(reason(&report).starts_with(expected.as_str()), "{report:?}");
        let mail = app
            .smtp
            .wait_for(DEADLINE, |m| m.data.contains(export_id))
            .await
            .expect("the requester is told");
        assert!(mail
            .subject()
            .unwrap_or_default()
            .contains("could not start"));
    }
    assert_eq!(
        app.emulator.audiences().len(),
        before,
        "no audience created"
    );
    assert!(
        app.emulator
            .calls()
            .iter()
            .all(|c| c.token.as_deref() != Some(token2.as_str())
                || c.path == format!("act_{other}")
                || c.path == format!("act_{terms}")),
        "ws-2's token was used only for its own terms checks"
    );

    // Terms accepted at Meta since: the job re-checks and goes through.
    app.emulator.add_ad_account(AdAccountSeed::new(terms));
    let mut accepted = job(&app, "ws-2", "exp-terms-ok", &["email"], &segment);
    accepted["ad_account_id"] = json!(format!("act_{terms}"));
    enqueue(&app, &accepted).await;
    let report = app.finished("exp-terms-ok", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    let view = app
        .connections
        .view("ws-2")
        .await
        .expect("view")
        .expect("some");
    assert!(view.selected(terms).expect("selected").tos_accepted);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_user_token_gets_one_warning_and_a_metric() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let soon = NewToken {
        token: SecretString::from("EAAsoon"),
        expires_at: now_ms() / 1000 + 3 * 86_400,
        scopes: vec!["ads_management".into()],
        ad_accounts: vec![AD_ACCOUNT.into()],
    };
    app.connections
        .store_user_token("ws-soon", &soon, Some(OWNER), now_ms())
        .await
        .expect("store");
    // Expiring too, but its exports use a system user token: no warning.
    app.connections
        .store_user_token("ws-system", &soon, Some(OWNER), now_ms())
        .await
        .expect("store");
    let system = NewToken {
        expires_at: 0,
        token: SecretString::from("EAAsys"),
        ..soon
    };
    app.connections
        .store_system_token("ws-system", &system, None, now_ms())
        .await
        .expect("store");

    let registry = prometheus::Registry::new();
    let metrics =
        audience_export_finalizer::metrics::Metrics::register(&registry).expect("metrics");
    let sweeper = Sweeper {
        connections: app.connections.clone(),
        mailer: Mailer::new("127.0.0.1", app.smtp.addr.port(), "fleet@example.com")
            .expect("mailer"),
        metrics: metrics.clone(),
        warn_within: Duration::from_secs(7 * 86_400),
        owner: "test".into(),
    };
    let now = now_ms() / 1000;
    // ws-1 (60 days left) is outside the window; ws-soon is inside.
    assert_eq!(sweeper.sweep(now).await.expect("sweep"), 1);
    assert_eq!(metrics.expiring.get(), 1);
    assert_eq!(sweeper.sweep(now).await.expect("sweep"), 1);
    let warnings: Vec<_> = app
        .smtp
        .mails()
        .into_iter()
        .filter(|m| m.subject().is_some_and(|s| s.contains("expires on")))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning, however many sweeps");
    assert!(warnings[0].to.iter().any(|t| t.contains(OWNER)));
    assert!(warnings[0].data.contains("ws-soon"));
    assert!(
        warnings[0].body().contains("in 2 day(s)") || warnings[0].body().contains("in 3 day(s)")
    );
    assert_eq!(metrics.notices.with_label_values(&["expiry"]).get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_is_once_per_token_and_ignores_a_replaced_token() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let c = &app.connections;
    let fp =
        audience_export_core::connection::token_fingerprint(&SecretString::from(app.token.clone()));
    assert_eq!(
        c.invalidate("ws-unknown", &fp, "r", 190, None, 1)
            .await
            .expect("redis"),
        Invalidated::Missing
    );
    assert_eq!(
        c.invalidate(WORKSPACE, "0000000000000000", "r", 190, None, 1)
            .await
            .expect("redis"),
        Invalidated::Stale
    );
    assert_eq!(
        c.invalidate(WORKSPACE, &fp, "token invalid: x", 190, Some(460), 5)
            .await
            .expect("redis"),
        Invalidated::Now
    );
    assert_eq!(
        c.invalidate(WORKSPACE, &fp, "token invalid: y", 190, Some(463), 6)
            .await
            .expect("redis"),
        Invalidated::Already
    );
    let view = c.view(WORKSPACE).await.expect("view").expect("some");
    let invalid = view.invalid.expect("invalid");
    assert_eq!(
        (invalid.reason.as_str(), invalid.subcode, invalid.at_ms),
        ("token invalid: x", Some(460), 5)
    );
    let active = c
        .active_token(WORKSPACE)
        .await
        .expect("token")
        .expect("some");
    assert_eq!(active.kind, TokenKind::User);
    assert_eq!(active.invalid.as_deref(), Some("token invalid: x"));

    // A new system user token makes it valid; the old token's late reports are stale.
    let system = NewToken {
        token: SecretString::from("EAAnewsystem"),
        expires_at: 0,
        scopes: vec![],
        ad_accounts: vec![],
    };
    c.store_system_token(WORKSPACE, &system, None, now_ms())
        .await
        .expect("store");
    assert!(c
        .view(WORKSPACE)
        .await
        .expect("view")
        .expect("some")
        .is_valid());
    assert_eq!(
        c.invalidate(WORKSPACE, &fp, "late", 190, None, 7)
            .await
            .expect("redis"),
        Invalidated::Stale
    );

    // Keys rotate: a new key first, re-seal, and the old key can go.
    let old_keys = app
        .settings
        .connections
        .encryption_keys
        .clone()
        .expect("keys");
    let new_key = TokenCipher::generate_config("next");
    let both = SecretString::from(format!(
        "{},{}",
        new_key.expose_secret(),
        old_keys.expose_secret()
    ));
    let rotating = Connections::new(
        app.progress.connection(),
        app.namespace(),
        TokenCipher::from_config(Some(&both)).expect("cipher"),
    );
    assert_eq!(
        rotating.reseal_all().await.expect("reseal"),
        2,
        "user and system tokens"
    );
    assert_eq!(rotating.reseal_all().await.expect("reseal"), 0);
    let only_new = Connections::new(
        app.progress.connection(),
        app.namespace(),
        TokenCipher::from_config(Some(&new_key)).expect("cipher"),
    );
    let token = only_new
        .active_token(WORKSPACE)
        .await
        .expect("opens")
        .expect("some");
    assert_eq!(token.token.expose_secret(), "EAAnewsystem");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_to_the_producer_invalidates_the_connection_too() {
    let app = spawn_app_with(Roles::ALL, |_| {}).await;
    let segment = app.dir.join("producer-refused.ndjson");
    generate(&segment, 50, 91).expect("segment");
    assert!(app.emulator.revoke(&app.token, 458));

    app.export("exp-first", &["email"], &segment).await;
    let first = app.finished("exp-first", DEADLINE).await;
    assert_eq!(first.status, ExportStatus::Rejected);
    assert!(reason(&first).starts_with("token invalid"), "{first:?}");
    let changed = app
        .wait_event(
            DEADLINE,
            |e| matches!(e, Event::ConnectionChanged { status, .. } if status == "invalid"),
        )
        .await;
    assert!(
        changed.is_some(),
        "the producer's refusal invalidates the connection"
    );
    let mail = app
        .smtp
        .wait_for(DEADLINE, |m| m.data.contains("must be reconnected"))
        .await
        .expect("the owner is told");
    assert!(mail.body().contains("removed the app"));
    let pauses =
        audience_export_core::pause::AccountPauses::new(app.progress.connection(), app.namespace());
    let fp =
        audience_export_core::connection::token_fingerprint(&SecretString::from(app.token.clone()));
    assert!(
        pauses
            .token_revoked(WORKSPACE, &fp)
            .await
            .expect("redis")
            .is_some(),
        "the producer records the refused token for the workers"
    );

    app.export("exp-second", &["email"], &segment).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_while_the_segment_streams_stops_reading_it() {
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
        let s = app.progress.snapshot("exp-stream").await.ok()?;
        (s.count("shards_done") >= 1).then_some(())
    })
    .await;
    assert!(uploading.is_some());
    assert!(app.emulator.revoke(&app.token, 460));
    more.send(100).expect("writer");
    let stopped = eventually(DEADLINE, || async {
        app.progress.stop_reason("exp-stream").await.ok()?
    })
    .await;
    assert!(stopped.is_some(), "a worker's refusal stops the export");

    // However much more the segment holds, the producer reads one more shard and stops.
    for _ in 0..100 {
        if more.send(100).is_err() {
            break;
        }
    }
    drop(more);
    let (written, closed) = writer.await.expect("writer");
    assert!(
        closed,
        "the producer closed the segment after writing {written}"
    );
    let report = app.finished("exp-stream", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Failed, "{report:?}");
    assert!(
        report.members_read < 1_000,
        "stopped early: {} members read",
        report.members_read
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_export_id_never_reaches_the_first_exports_workspace_or_audiences() {
    use audience_export_core::amqp::{header_str, Topology};
    let app = spawn_app_with(Roles::ALL, |_| {}).await;
    let token2 = format!("EAAother{}", app.namespace());
    app.emulator.add_ad_account(AdAccountSeed::new("2002"));
    app.emulator.add_token(TokenSeed::user(&token2, &["2002"]));
    connect_workspace(&app.connections, "ws-2", &token2, "2002").await;
    let segment = app.dir.join("reuse.ndjson");
    generate(&segment, 40, 93).expect("segment");
    app.export("exp-reused", &["email"], &segment).await;
    let first = app.finished("exp-reused", DEADLINE).await;
    assert_eq!(first.status, ExportStatus::Succeeded);

    // Same id, another workspace and ad account: dead-lettered with the reason, nothing else.
    let mut other = job(&app, "ws-2", "exp-reused", &["email"], &segment);
    other["ad_account_id"] = json!("act_2002");
    enqueue(&app, &other).await;
    let dead = Topology::dead(&app.topology.jobs());
    let reason = eventually(DEADLINE, || async {
        let message = app.get(&dead).await?;
        header_str(&message.delivery.properties, "x-rejection-reason")
    })
    .await
    .expect("dead-lettered");
    assert!(reason.contains("already names a different job"), "{reason}");
    let finished = app
        .events()
        .iter()
        .filter(|e| matches!(e, Event::ExportFinished(r) if r.export_id == "exp-reused"))
        .count();
    assert_eq!(finished, 1, "the first export is not finished again");
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
    use audience_export_core::pause::AccountPauses;
    let app = spawn_app_with(Roles::ALL, |_| {}).await;
    // A worker got a 190 and recorded it; the finalizer has not marked the connection yet.
    let pauses = AccountPauses::new(app.progress.connection(), app.namespace());
    let fp =
        audience_export_core::connection::token_fingerprint(&SecretString::from(app.token.clone()));
    pauses
        .revoke_token(
            WORKSPACE,
            &fp,
            "token invalid: Meta refused the Facebook connection (test)",
        )
        .await
        .expect("redis");
    let segment = app.dir.join("marker.ndjson");
    generate(&segment, 20, 95).expect("segment");
    let calls = app.emulator.calls().len();
    app.export("exp-marked", &["email"], &segment).await;
    let report = app.finished("exp-marked", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Rejected);
    assert!(
        reason(&report).starts_with("token invalid: Meta refused the Facebook connection (test)"),
        "{report:?}"
    );
    assert_eq!(
        app.emulator.calls().len(),
        calls,
        "no call with the refused token"
    );

    // The same token entered again (say, as the system user token) gets its chance again.
    let again = NewToken {
        token: SecretString::from(app.token.clone()),
        expires_at: 0,
        scopes: vec!["ads_management".into()],
        ad_accounts: vec![AD_ACCOUNT.into()],
    };
    app.connections
        .store_system_token(WORKSPACE, &again, Some(OWNER), now_ms())
        .await
        .expect("store");
    assert_eq!(
        pauses.token_revoked(WORKSPACE, &fp).await.expect("redis"),
        None
    );
    let view = app
        .connections
        .view(WORKSPACE)
        .await
        .expect("view")
        .expect("some");
    assert_eq!(view.connected_by.as_deref(), Some(OWNER));
    app.export("exp-again", &["email"], &segment).await;
    let report = app.finished("exp-again", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");

    // A terms check recorded after a disconnect does not bring the connection back.
    assert!(app.connections.disconnect(WORKSPACE).await.expect("redis"));
    let recorded = app
        .connections
        .update_terms(
            WORKSPACE,
            audience_export_core::connection::AdAccountStatus::new(AD_ACCOUNT, true, now_ms()),
        )
        .await
        .expect("redis");
    assert!(!recorded);
    assert!(app
        .connections
        .view(WORKSPACE)
        .await
        .expect("view")
        .is_none());
    app.stop().await;
}
