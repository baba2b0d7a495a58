//! Our own infrastructure failing under a running export: Redis killed and restarted, the broker
//! connection cut, the SMTP relay down. Each is the test's own (a `redis-server` on a free port
//! with AOF, a TCP proxy in front of the broker, the test's SMTP sink): never the shared ones.

use crate::{assert_exact, emails_about, finished_events, DEADLINE, QUIET};
use audience_export_core::contract::ExportStatus;
use audience_export_core::Field;
use audience_export_harness::app::{eventually, export, spawn_app_with, Roles, TestApp};
use audience_export_harness::emulator::Latency;
use audience_export_harness::fault::{set_appendonly, RedisServer, TcpProxy};
use audience_export_harness::segment::{generate, Generated};
use std::time::{Duration, Instant};

const FIELDS: [Field; 3] = [Field::Email, Field::Phone, Field::Madid];
const NAMES: [&str; 3] = ["email", "phone", "madid"];

/// Slow enough uploads that the export is still running when the fault hits.
fn slow(app: &TestApp) {
    app.emulator.set_latency(Latency {
        base_ms: 60,
        per_record_us: 0,
        jitter_ms: 20,
    });
}

/// The fleet on `tune`d settings with slow uploads, an export of 20,000 members running, and
/// ten of its shards uploaded: the moment to break something.
async fn export_under_way(
    export_id: &str,
    seed: u64,
    tune: impl FnOnce(&mut audience_export_core::config::Settings),
) -> (TestApp, Generated) {
    let app = spawn_app_with(Roles::ALL, move |s| {
        s.producer.shard_size = 250;
        s.worker.concurrency = 2;
        tune(s);
    })
    .await;
    slow(&app);
    let path = app.dir.join(format!("{export_id}.ndjson"));
    let generated = generate(&path, 20_000, seed).expect("segment");
    app.export(export_id, &NAMES, &path).await;
    let some_done = eventually(DEADLINE, || async {
        let p = app.progress.progress(&export(export_id)).await.ok()?;
        (p.shards_done >= 10).then_some(())
    })
    .await;
    assert!(some_done.is_some(), "a few shards upload first");
    (app, generated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_export_is_waited_out_and_the_export_is_exact() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let (app, generated) = export_under_way("exp-redis", 71, move |s| s.redis_url = url).await;

    redis.kill();
    // Readiness says so while Redis is away.
    let worker_ops = app.ops[1];
    let unready = eventually(Duration::from_secs(10), || async move {
        let r = reqwest::get(format!("http://{worker_ops}/readyz"))
            .await
            .ok()?;
        (r.status().as_u16() == 503).then_some(())
    })
    .await;
    assert!(unready.is_some(), "/readyz is 503 while Redis is down");
    // The outage itself: two seconds of Redis being away (a duration, not a synchronisation).
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart().await;
    let restarted = Instant::now();

    let report = app.finished("exp-redis", DEADLINE).await;
    let recovery = restarted.elapsed();
    eprintln!(
        "Redis restart: export finished {:.1} s after Redis came back",
        recovery.as_secs_f64()
    );
    assert!(
        recovery < Duration::from_secs(20),
        "finished within 20 s of the restart: {recovery:?}"
    );
    assert_exact(&app, "exp-redis", &report, &generated, &FIELDS, 250).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_connection_cut_mid_export_is_waited_out_and_the_export_is_exact() {
    let proxy = TcpProxy::start(([127, 0, 0, 1], 5672).into()).await;
    let url = proxy.amqp_url();
    let (app, generated) = export_under_way("exp-amqp", 73, move |s| s.amqp_url = url).await;
    proxy.cut();
    let cut = Instant::now();
    let report = app.finished("exp-amqp", DEADLINE).await;
    eprintln!(
        "broker connection cut: export finished {:.1} s later",
        cut.elapsed().as_secs_f64()
    );
    assert_exact(&app, "exp-amqp", &report, &generated, &FIELDS, 250).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_relay_down_for_a_while_gets_the_report_once_it_is_back() {
    let app = spawn_app_with(Roles::ALL, |s| s.producer.shard_size = 100).await;
    app.smtp.set_down(true);
    let path = app.dir.join("smtp.ndjson");
    generate(&path, 500, 79).expect("segment");
    app.export("exp-smtp", &NAMES, &path).await;
    // Every shard arrives; the finish waits for the email.
    let complete = eventually(DEADLINE, || async {
        let p = app.progress_of("exp-smtp").await;
        p.is_complete().then_some(())
    })
    .await;
    assert!(complete.is_some(), "the export's shards all arrive");
    let deferred = eventually(DEADLINE, || async {
        let n = crate::metric(
            app.ops[2],
            "audience_export_emails_total{kind=\"report\",outcome=\"deferred\"}",
        )
        .await?;
        (n >= 1.0).then_some(())
    })
    .await;
    assert!(deferred.is_some(), "the finalizer tried and will try again");
    assert_eq!(
        finished_events(&app, "exp-smtp"),
        0,
        "not finished without its email"
    );
    app.smtp.set_down(false);
    let report = app.finished("exp-smtp", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded);
    assert!(app.settled(QUIET).await);
    assert_eq!(emails_about(&app, "exp-smtp"), 1, "exactly one email");
    assert_eq!(finished_events(&app, "exp-smtp"), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_refuses_to_start_on_a_redis_that_does_not_persist_writes() {
    let redis = RedisServer::start().await;
    set_appendonly(&redis.url(), false).await;
    let mut settings = audience_export_core::config::Settings::for_namespace(format!(
        "tvol{}",
        rand::random::<u32>()
    ));
    settings.redis_url = redis.url();
    settings.finalizer.ops_addr = ([127, 0, 0, 1], 0).into();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refused = audience_export_finalizer::start(settings.clone(), shutdown.clone())
        .await
        .err()
        .expect("no start on a Redis that forgets");
    assert!(
        format!("{refused:#}").contains("Redis does not persist writes"),
        "{refused:#}"
    );
    settings.allow_volatile_redis = true;
    let running = audience_export_finalizer::start(settings, shutdown.clone())
        .await
        .expect("starts when the operator says so");
    shutdown.cancel();
    running.task.await.expect("joins").expect("stops cleanly");
}
