//! Tokens at rest are sealed (`TokenCipher`, AES-GCM with key ids), and no token, app secret or
//! API key is ever written in clear: not in Redis, the logs, the events, the emails or the
//! metrics. Rotating the encryption key re-seals every token so that the old key can go.

use crate::{
    connection_changed, enqueue, job, long_lived, metrics_text, oauth_connect, segment, token,
    DEADLINE, OWNER,
};
use audience_export_core::connection::{Connections, NewToken};
use audience_export_core::contract::{ConnectionStatus, ExportStatus};
use audience_export_core::progress::now_ms;
use audience_export_core::token_cipher::TokenCipher;
use audience_export_harness::app::{
    eventually, spawn_app_with, ws, Roles, TestApp, AD_ACCOUNT, APP_SECRET, WORKSPACE,
};
use audience_export_harness::emulator::{self, Latency, TokenSeed};
use audience_export_harness::logs;
use secrecy::{ExposeSecret, SecretString};

const WS: &str = "ws-oauth";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_stored_with_its_token_sealed() {
    let app = spawn_app_with(Roles::PRODUCER, |_| {}).await;
    let short = token(&app, "short");

    let connected = oauth_connect(&app, WS, &short).await;

    assert_eq!(connected.status, 200, "{connected}");
    let redis = app.redis_dump().await;
    let connection = redis
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "{}:workspace:{{{WS}}}:connection ",
                app.namespace()
            ))
        })
        .expect("the connection is stored");
    assert!(connection.contains("v1:test:"), "sealed: {connection}");
    assert!(!connection.contains(&short), "not in clear");
    app.stop().await;
}

/// Everything a connection goes through, so that every place a secret could leak has been
/// written to: connected by OAuth; a token refused mid-export (a worker's refusal) and one
/// refused to the producer, with their emails and events; reconnected; a system user token set;
/// an export through. Returns every secret involved.
async fn a_connections_whole_life(app: &TestApp) -> Vec<String> {
    let short = token(app, "short");
    let connected = oauth_connect(app, WS, &short).await;
    assert_eq!(connected.status, 200, "{connected}");
    let selected = app.select_ad_accounts(WS, &[AD_ACCOUNT]).await;
    assert_eq!(selected.status, 200, "{selected}");
    let long = long_lived(&short);

    // Refused mid-export, reported by a worker.
    app.emulator.set_latency(Latency {
        base_ms: 30,
        per_record_us: 0,
        jitter_ms: 0,
    });
    let segment = segment(app, "life", 500, 61);
    enqueue(app, &job(app, WS, "exp-a", &["email"], &segment)).await;
    let uploading = eventually(DEADLINE, || async {
        (app.progress_of("exp-a").await.shards_done >= 1).then_some(())
    })
    .await;
    assert!(uploading.is_some(), "the export uploads");
    assert!(app.emulator.revoke(&long, 460));
    let failed = app.finished("exp-a", DEADLINE).await;
    assert_eq!(failed.status, ExportStatus::Failed, "{failed:?}");
    assert!(connection_changed(app, WS, ConnectionStatus::Invalid)
        .await
        .is_some());
    app.emulator.set_latency(Latency::default());

    // Refused to the producer.
    assert!(app.emulator.revoke(&app.token, 458));
    app.export("exp-first", &["email"], &segment).await;
    app.finished("exp-first", DEADLINE).await;
    assert!(
        connection_changed(app, WORKSPACE, ConnectionStatus::Invalid)
            .await
            .is_some()
    );

    // Reconnected, a system user token elsewhere, an export through.
    let short2 = token(app, "again");
    let reconnected = oauth_connect(app, WS, &short2).await;
    assert_eq!(reconnected.status, 200, "{reconnected}");
    let system = token(app, "system");
    app.emulator.add_token(TokenSeed {
        token: system.clone(),
        kind: emulator::TokenKind::SystemUser,
        ad_accounts: vec![AD_ACCOUNT.into()],
        user_id: None,
    });
    let set = app
        .set_system_user_token("ws-system", &system, Some(OWNER))
        .await;
    assert_eq!(set.status, 200, "{set}");
    enqueue(app, &job(app, WS, "exp-new", &["email"], &segment)).await;
    let through = app.finished("exp-new", DEADLINE).await;
    assert_eq!(through.status, ExportStatus::Succeeded, "{through:?}");
    let told = app
        .smtp
        .wait_for(DEADLINE, |m| m.data.contains("must be reconnected"))
        .await;
    assert!(told.is_some(), "the owner was told");

    let key = app.settings.api.key.as_ref().expect("key").expose_secret();
    vec![
        short,
        long,
        short2.clone(),
        long_lived(&short2),
        system,
        app.token.clone(),
        APP_SECRET.to_owned(),
        key.to_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_app_secret_or_api_key_is_written_anywhere_in_clear() {
    let app = spawn_app_with(Roles::ALL, |s| {
        s.producer.shard_size = 20;
        s.worker.concurrency = 2;
        s.worker.calls_per_second_per_account = 10;
    })
    .await;

    let secrets = a_connections_whole_life(&app).await;

    let redis = app.redis_dump().await;
    assert!(
        redis.contains(&format!(
            "{}:workspace:{{{WS}}}:connection",
            app.namespace()
        )) && redis.contains("v1:test:"),
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

/// `WORKSPACE` with its user token and a system user token `EAAnewsystem`, both sealed with the
/// app's key `test`; and a key `next`.
async fn two_tokens_and_a_new_key(app: &TestApp) -> SecretString {
    let system = NewToken {
        token: SecretString::from("EAAnewsystem"),
        expires_at: 0,
        scopes: vec![],
        ad_accounts: vec![],
    };
    app.connections
        .store_system_token(&ws(WORKSPACE), &system, None, now_ms())
        .await
        .expect("store");
    TokenCipher::generate_config("next")
}

/// Connections whose cipher holds `keys` (the first one seals).
fn with_keys(app: &TestApp, keys: &SecretString) -> Connections {
    Connections::new(
        app.progress.connection(),
        app.namespace(),
        TokenCipher::from_config(Some(keys)).expect("cipher"),
    )
}

/// The new key first, the old one still there: what an operator deploys to rotate.
fn new_then_old(app: &TestApp, new: &SecretString) -> SecretString {
    let old = app
        .settings
        .connections
        .encryption_keys
        .clone()
        .expect("keys");
    SecretString::from(format!("{},{}", new.expose_secret(), old.expose_secret()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_key_reseals_every_token_once() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let new = two_tokens_and_a_new_key(&app).await;
    let rotating = with_keys(&app, &new_then_old(&app, &new));

    assert_eq!(
        rotating.reseal_all().await.expect("reseal"),
        2,
        "user and system tokens"
    );
    assert_eq!(rotating.reseal_all().await.expect("reseal"), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_resealing_the_old_key_can_go() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let new = two_tokens_and_a_new_key(&app).await;
    with_keys(&app, &new_then_old(&app, &new))
        .reseal_all()
        .await
        .expect("reseal");

    let only_new = with_keys(&app, &new);

    let token = only_new
        .active_token(&ws(WORKSPACE))
        .await
        .expect("opens with the new key alone")
        .expect("some");
    assert_eq!(token.token.expose_secret(), "EAAnewsystem");
    app.stop().await;
}
