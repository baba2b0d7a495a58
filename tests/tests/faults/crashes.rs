//! Processes that die at the worst moments (abort at a named fail point: no destructor, nothing
//! flushed, as SIGKILL), and a job published twice to two producers at once.

use crate::{assert_exact, DEADLINE, FINALIZER_BIN, PRODUCER_BIN, WORKER_BIN};
use audience_export_core::Field;
use audience_export_harness::app::{eventually, spawn_app_with, Roles, TestApp};
use audience_export_harness::fault::free_port;
use audience_export_harness::segment::{generate, Generated};
use std::time::{Duration, Instant};

const FIELDS: [Field; 3] = [Field::Email, Field::Phone, Field::Madid];
const NAMES: [&str; 3] = ["email", "phone", "madid"];

async fn fleet(roles: Roles, shard_size: usize) -> TestApp {
    spawn_app_with(roles, |s| {
        s.producer.shard_size = shard_size;
        s.finalizer.claim_lease_secs = 4;
        s.finalizer.smtp_timeout_secs = 2;
    })
    .await
}

fn segment(app: &TestApp, members: u64, seed: u64) -> (std::path::PathBuf, Generated) {
    let path = app.dir.join(format!("segment-{seed}.ndjson"));
    let generated = generate(&path, members, seed).expect("segment written");
    (path, generated)
}

/// A role's process that dies at `point` (FAILPOINTS), with its ops endpoints on `ops_port`.
fn doomed(app: &TestApp, binary: &str, point: &str) -> tokio::process::Child {
    app.spawn_process(binary, &[("FAILPOINTS", format!("{point}=return"))])
}

/// Waits for a process to die by itself (at its fail point): aborted, not exited cleanly.
async fn died(mut child: tokio::process::Child, what: &str) {
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} did not reach its fail point"))
        .expect("wait");
    assert!(!status.success(), "{what} died at its fail point: {status}");
}

/// Waits until a process's `/readyz` answers 200 (it consumes).
async fn ready(port: u16) {
    let up = eventually(DEADLINE, || async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    assert!(up.is_some(), "the process on {port} becomes ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_published_twice_at_once_to_two_producers_creates_one_set_of_audiences() {
    let app = fleet(Roles::ALL, 100).await;
    let port = free_port();
    let _second = app.spawn_process(
        PRODUCER_BIN,
        &[("AE_PRODUCER__OPS_ADDR", format!("127.0.0.1:{port}"))],
    );
    ready(port).await;
    let (path, generated) = segment(&app, 3_000, 41);
    let job = app.job("exp-twice", &NAMES, &path).to_string();
    app.enqueue(job.as_bytes()).await;
    app.enqueue(job.as_bytes()).await;
    let report = app.finished("exp-twice", DEADLINE).await;
    assert_exact(&app, "exp-twice", &report, &generated, &FIELDS, 100).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_between_creating_an_audience_and_recording_it_leaves_no_second_audience()
{
    let roles = Roles {
        producer: false,
        worker: true,
        finalizer: true,
    };
    let app = fleet(roles, 100).await;
    let (path, generated) = segment(&app, 2_000, 43);
    let first = doomed(&app, PRODUCER_BIN, "producer::audience-created");
    app.export("exp-created", &NAMES, &path).await;
    died(first, "the first producer").await;
    assert_eq!(
        app.emulator.audiences().len(),
        1,
        "the audience was created at Meta before the crash"
    );
    assert_eq!(
        app.progress_of("exp-created")
            .await
            .field(Field::Email)
            .audience_id,
        None,
        "and never recorded"
    );
    let restarted = Instant::now();
    let _second = app.spawn_producer_process(PRODUCER_BIN);
    let report = app.finished("exp-created", DEADLINE).await;
    eprintln!(
        "audience-created crash: finished {:.1} s after the replacement started",
        restarted.elapsed().as_secs_f64()
    );
    assert_exact(&app, "exp-created", &report, &generated, &FIELDS, 100).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_between_sealing_and_announcing_still_finishes_once() {
    let roles = Roles {
        producer: false,
        worker: true,
        finalizer: true,
    };
    let app = fleet(roles, 100).await;
    let (path, generated) = segment(&app, 2_000, 47);
    let first = doomed(&app, PRODUCER_BIN, "producer::sealed");
    app.export("exp-sealed", &NAMES, &path).await;
    died(first, "the first producer").await;
    assert!(
        app.progress_of("exp-sealed").await.sealed,
        "sealed before the crash"
    );
    let _second = app.spawn_producer_process(PRODUCER_BIN);
    let report = app.finished("exp-sealed", DEADLINE).await;
    assert_exact(&app, "exp-sealed", &report, &generated, &FIELDS, 100).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_mid_plan_resumes_from_its_checkpoints_with_its_own_shard_size() {
    let roles = Roles {
        producer: false,
        worker: true,
        finalizer: true,
    };
    let app = fleet(roles, 50).await;
    let (path, generated) = segment(&app, 3_000, 53);
    // Dies after the 7th confirmed shard's checkpoint.
    let first = app.spawn_process(
        PRODUCER_BIN,
        &[("FAILPOINTS", "producer::checkpointed=6*off->return".into())],
    );
    app.export("exp-resume", &NAMES, &path).await;
    died(first, "the first producer").await;
    let at_crash = app.progress_of("exp-resume").await;
    assert!(!at_crash.sealed && at_crash.has_shards(), "killed mid-plan");
    // The replacement is configured with another shard size: the plan keeps its own, so the
    // shards it publishes again are the same shards, and none is skipped.
    let _second = app.spawn_process(PRODUCER_BIN, &[("AE_PRODUCER__SHARD_SIZE", "120".into())]);
    let report = app.finished("exp-resume", DEADLINE).await;
    assert_exact(&app, "exp-resume", &report, &generated, &FIELDS, 50).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_upload_and_record_loses_nothing_and_counts_once() {
    let roles = Roles {
        producer: true,
        worker: false,
        finalizer: true,
    };
    let app = fleet(roles, 100).await;
    let (path, generated) = segment(&app, 2_000, 59);
    let first = doomed(&app, WORKER_BIN, "worker::uploaded");
    app.export("exp-uploaded", &NAMES, &path).await;
    died(first, "the first worker").await;
    let _second = app.spawn_worker_process(WORKER_BIN);
    let report = app.finished("exp-uploaded", DEADLINE).await;
    assert_exact(&app, "exp-uploaded", &report, &generated, &FIELDS, 100).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_record_and_ack_counts_once() {
    let roles = Roles {
        producer: true,
        worker: false,
        finalizer: true,
    };
    let app = fleet(roles, 100).await;
    let (path, generated) = segment(&app, 2_000, 61);
    let first = doomed(&app, WORKER_BIN, "worker::recorded");
    app.export("exp-recorded", &NAMES, &path).await;
    died(first, "the first worker").await;
    let _second = app.spawn_worker_process(WORKER_BIN);
    let report = app.finished("exp-recorded", DEADLINE).await;
    assert_exact(&app, "exp-recorded", &report, &generated, &FIELDS, 100).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finalizer_killed_between_the_email_and_completion_sends_one_email() {
    let roles = Roles {
        producer: true,
        worker: true,
        finalizer: false,
    };
    let app = fleet(roles, 100).await;
    let (path, generated) = segment(&app, 1_000, 67);
    let first = doomed(&app, FINALIZER_BIN, "finalizer::emailed");
    app.export("exp-emailed", &NAMES, &path).await;
    died(first, "the first finalizer").await;
    assert_eq!(
        crate::emails_about(&app, "exp-emailed"),
        1,
        "the email went out before the crash"
    );
    let restarted = Instant::now();
    let _second = app.spawn_process(FINALIZER_BIN, &[]);
    let report = app.finished("exp-emailed", DEADLINE).await;
    eprintln!(
        "emailed crash: finished {:.1} s after the replacement started (claim lease 4 s)",
        restarted.elapsed().as_secs_f64()
    );
    assert!(restarted.elapsed() < Duration::from_secs(30));
    assert_exact(&app, "exp-emailed", &report, &generated, &FIELDS, 100).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_refused_on_a_resume_fails_the_export_it_never_rejects_it() {
    use audience_export_core::connection::token_fingerprint;
    use audience_export_core::contract::ExportStatus;
    use audience_export_harness::app::{ws, WORKSPACE};
    let roles = Roles {
        producer: false,
        worker: true,
        finalizer: true,
    };
    let app = fleet(roles, 100).await;
    let (path, _) = segment(&app, 500, 109);
    let first = doomed(&app, PRODUCER_BIN, "producer::audience-created");
    app.export("exp-refused-resume", &NAMES, &path).await;
    died(first, "the first producer").await;
    // Meta refused the workspace's token meanwhile; the finalizer marked it invalid.
    let fingerprint = token_fingerprint(&secrecy::SecretString::from(app.token.clone()));
    app.connections
        .invalidate(
            &ws(WORKSPACE),
            &fingerprint,
            "token invalid: the password changed",
            190,
            Some(460),
            audience_export_core::progress::now_ms(),
        )
        .await
        .expect("marked invalid");
    let _second = app.spawn_producer_process(PRODUCER_BIN);
    let report = app.finished("exp-refused-resume", DEADLINE).await;
    assert_eq!(
        report.status,
        ExportStatus::Failed,
        "an audience exists at Meta: failed, not rejected: {report:?}"
    );
    assert!(
        report
            .reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("connection invalid"),
        "{:?}",
        report.reason
    );
    let email = &report.audiences[0];
    assert!(
        email.name.contains("(exp-refused-resume)") && email.audience_id.is_empty(),
        "the report names the audience that may exist, whose id was never recorded: {email:?}"
    );
    assert_eq!(
        app.emulator.audiences().len(),
        1,
        "and nothing more was created"
    );
    assert!(app.settled(crate::QUIET).await);
    assert_eq!(crate::emails_about(&app, "exp-refused-resume"), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_replaced_while_its_plan_was_interrupted_fails_the_export_with_the_reason() {
    use audience_export_core::contract::ExportStatus;
    let roles = Roles {
        producer: false,
        worker: true,
        finalizer: true,
    };
    let app = fleet(roles, 50).await;
    let (path, _) = segment(&app, 3_000, 113);
    let first = app.spawn_process(
        PRODUCER_BIN,
        &[("FAILPOINTS", "producer::checkpointed=6*off->return".into())],
    );
    app.export("exp-replaced", &NAMES, &path).await;
    died(first, "the first producer").await;
    // The platform rewrites the file under the same URL.
    generate(&path, 2_500, 127).expect("another segment");
    let _second = app.spawn_producer_process(PRODUCER_BIN);
    let report = app.finished("exp-replaced", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::PartiallyFailed, "{report:?}");
    assert!(
        report
            .reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("the segment changed while this export was being planned"),
        "{:?}",
        report.reason
    );
    assert_eq!(
        app.emulator.audiences().len(),
        3,
        "one audience per field, no more"
    );
    app.stop().await;
}
