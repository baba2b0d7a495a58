//! What arrives broken: a handler that panics on a shard, a segment with bad bytes and a 10 MB
//! line, a shard that never arrives, a malformed copy of a running export's job, and a create
//! call Meta applied but never answered.

use crate::{assert_exact, emails_about, finished_events, metric, DEADLINE, QUIET, WORKER_BIN};
use audience_export_core::amqp::{header_str, Topology};
use audience_export_core::contract::ExportStatus;
use audience_export_core::Field;
use audience_export_harness::app::{eventually, spawn_app, spawn_app_with, Roles};
use audience_export_harness::emulator::Fault;
use audience_export_harness::fault::free_port;
use audience_export_harness::segment::generate;
use std::io::Write;

const FIELDS: [Field; 3] = [Field::Email, Field::Phone, Field::Madid];
const NAMES: [&str; 3] = ["email", "phone", "madid"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_dead_letters_its_shard_into_the_report_and_the_worker_goes_on() {
    let roles = Roles {
        producer: true,
        worker: false,
        finalizer: true,
    };
    let app = spawn_app_with(roles, |s| {
        s.producer.shard_size = 50;
        s.finalizer.sweep_interval_secs = 1;
    })
    .await;
    let port = free_port();
    let _worker = app.spawn_process(
        WORKER_BIN,
        &[
            ("FAILPOINTS", "worker::handle=1*panic".into()),
            ("AE_WORKER__OPS_ADDR", format!("127.0.0.1:{port}")),
        ],
    );
    let path = app.dir.join("panic.ndjson");
    generate(&path, 500, 83).expect("segment");
    app.export("exp-panic", &["email"], &path).await;
    let report = app.finished("exp-panic", DEADLINE).await;
    let email = &report.audiences[0];
    assert_eq!(report.status, ExportStatus::PartiallyFailed, "{report:?}");
    assert_eq!(
        email.shards_failed, 1,
        "the one shard whose handler panicked"
    );
    assert!(
        email
            .last_error
            .as_deref()
            .unwrap_or_default()
            .starts_with("dead-lettered: the worker handler panicked"),
        "{:?}",
        email.last_error
    );
    assert_eq!(
        app.progress_of("exp-panic").await.shards_done,
        email.shards - 1,
        "every other shard was uploaded: the worker went on consuming"
    );
    let gauged = eventually(DEADLINE, || async {
        let n = metric(app.ops[1], "audience_export_dead_letters{queue=\"shards\"}").await?;
        (n == 1.0).then_some(())
    })
    .await;
    assert!(gauged.is_some(), "the finalizer gauges the parked shard");
    let dead = app
        .get(&Topology::dead(&app.topology.shards()))
        .await
        .expect("the shard is in the dead-letter queue");
    let reason = header_str(&dead.delivery.properties, "x-rejection-reason").unwrap_or_default();
    assert!(reason.contains("panicked"), "{reason}");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    assert_eq!(
        metric(
            addr,
            "audience_export_deliveries_total{outcome=\"panicked\"}"
        )
        .await,
        Some(1.0)
    );
    let ready = reqwest::get(format!("http://{addr}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200, "still ready after the panic");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_a_10_mb_line_are_malformed_lines_and_the_rest_is_exact() {
    let app = spawn_app_with(Roles::ALL, |s| s.producer.shard_size = 200).await;
    let path = app.dir.join("bytes.ndjson");
    let generated = generate(&path, 2_000, 89).expect("segment");
    {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("segment");
        file.write_all(b"{\"email\":\"\xff\xfe\xfd@example.com\"}\n")
            .expect("write");
        let mut huge = b"{\"email\":\"".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 10 * 1024 * 1024));
        huge.extend_from_slice(b"@example.com\"}\n");
        file.write_all(&huge).expect("write");
    }
    app.export("exp-bytes", &NAMES, &path).await;
    let report = app.finished("exp-bytes", DEADLINE).await;
    let mut expected = generated;
    expected.malformed_lines += 2;
    assert_exact(&app, "exp-bytes", &report, &expected, &FIELDS, 200).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_never_arrives_is_named_by_the_sweep_and_the_export_ends() {
    let roles = Roles {
        producer: true,
        worker: false,
        finalizer: true,
    };
    let app = spawn_app_with(roles, |s| {
        s.producer.shard_size = 100;
        s.finalizer.stall_after_secs = 3;
        s.finalizer.sweep_interval_secs = 1;
    })
    .await;
    let path = app.dir.join("lost.ndjson");
    generate(&path, 1_000, 97).expect("segment");
    app.export("exp-lost", &["email"], &path).await;
    let sealed = eventually(DEADLINE, || async {
        app.progress_of("exp-lost").await.sealed.then_some(())
    })
    .await;
    assert!(sealed.is_some(), "planned");
    // One shard is lost on the way (taken off the queue and never handled).
    let lost = app.get(&app.topology.shards()).await.expect("a shard");
    let lost: audience_export_core::Shard =
        serde_json::from_slice(&lost.delivery.data).expect("a shard");
    let _worker = app.spawn_worker_process(WORKER_BIN);
    let report = app.finished("exp-lost", DEADLINE).await;
    let email = &report.audiences[0];
    assert_eq!(report.status, ExportStatus::PartiallyFailed, "{report:?}");
    let reason = report.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("stalled: no progress for"), "{reason}");
    assert!(
        reason.contains(&format!(
            "1 of {} batches never arrived (email #{})",
            email.shards, lost.shard_index
        )),
        "{reason}"
    );
    assert!(app.settled(QUIET).await);
    assert_eq!(emails_about(&app, "exp-lost"), 1, "exactly one email");
    assert_eq!(
        metric(
            app.ops[1],
            "audience_export_exports_abandoned_total{why=\"stalled\"}"
        )
        .await,
        Some(1.0)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_copy_of_a_running_exports_job_is_dead_lettered_and_leaves_it_alone() {
    let app = spawn_app().await;
    let path = app.dir.join("copy.ndjson");
    let generated = generate(&path, 1_000, 101).expect("segment");
    app.export("exp-copy", &NAMES, &path).await;
    let begun = eventually(DEADLINE, || async {
        app.progress_of("exp-copy")
            .await
            .status
            .is_some()
            .then_some(())
    })
    .await;
    assert!(begun.is_some());
    let mut broken = app.job("exp-copy", &NAMES, &path);
    broken["fields"] = serde_json::json!("everything");
    broken["notify"] = serde_json::json!({"emails": ["intruder@example.com"]});
    app.enqueue(broken.to_string().as_bytes()).await;
    let report = app.finished("exp-copy", DEADLINE).await;
    assert_exact(&app, "exp-copy", &report, &generated, &FIELDS, 10_000).await;
    let dead = app
        .get(&Topology::dead(&app.topology.jobs()))
        .await
        .expect("the copy is dead-lettered");
    assert!(header_str(&dead.delivery.properties, "x-rejection-reason")
        .unwrap_or_default()
        .contains("does not match the contract"));
    assert!(
        !app.smtp
            .mails()
            .iter()
            .any(|m| m.to.contains(&"intruder@example.com".to_owned())),
        "the copy's recipients are told nothing about someone else's export"
    );
    assert_eq!(finished_events(&app, "exp-copy"), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_call_meta_applied_but_never_answered_creates_no_second_audience() {
    let app = spawn_app_with(Roles::ALL, |s| {
        s.graph.timeout_ms = 1_000;
        s.producer.shard_size = 500;
    })
    .await;
    // The phone audience's create is applied, then answered after the client gave up.
    app.emulator
        .inject_on_create([Fault::SlowBody { ms: 0 }, Fault::Hang { ms: 3_000 }]);
    let path = app.dir.join("hang.ndjson");
    let generated = generate(&path, 1_500, 103).expect("segment");
    app.export("exp-hang", &NAMES, &path).await;
    let report = app.finished("exp-hang", DEADLINE).await;
    assert_exact(&app, "exp-hang", &report, &generated, &FIELDS, 500).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_planning_panics_ends_its_export_and_the_producer_goes_on() {
    let roles = Roles {
        producer: false,
        worker: true,
        finalizer: true,
    };
    let app = spawn_app_with(roles, |s| s.producer.shard_size = 100).await;
    let _producer = app.spawn_process(
        crate::PRODUCER_BIN,
        &[("FAILPOINTS", "producer::planning=1*panic".into())],
    );
    let path = app.dir.join("plan-panic.ndjson");
    let generated = generate(&path, 500, 107).expect("segment");
    app.export("exp-plan-panic", &["email"], &path).await;
    let report = app.finished("exp-plan-panic", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Rejected, "{report:?}");
    assert!(
        report.reason.as_deref().unwrap_or_default().starts_with(
            "planning failed and the job was dead-lettered: the producer handler panicked"
        ),
        "{:?}",
        report.reason
    );
    let dead = app
        .get(&Topology::dead(&app.topology.jobs()))
        .await
        .expect("the job is in the dead-letter queue");
    assert!(header_str(&dead.delivery.properties, "x-rejection-reason")
        .unwrap_or_default()
        .contains("panicked"));
    // The same producer plans the next job.
    app.export("exp-after-panic", &["email"], &path).await;
    let next = app.finished("exp-after-panic", DEADLINE).await;
    assert_exact(
        &app,
        "exp-after-panic",
        &next,
        &generated,
        &[Field::Email],
        100,
    )
    .await;
    app.stop().await;
}
