//! Segment sources end to end: a gzip CSV over HTTP behind a header from a source secret, an
//! NDJSON object on a local S3 (moto), `file://` sources outside the producer's file root, and
//! the producer's memory staying flat while it streams a segment twenty times larger. Every
//! expected figure comes from the segment generator, never from the code under test.

use audience_export_core::contract::{Event, ExportStatus, FinishedReport};
use audience_export_core::Field;
use audience_export_harness::app::{spawn_app, spawn_app_with, Roles, TestApp, AD_ACCOUNT};
use audience_export_harness::s3::S3Server;
use audience_export_harness::segment::{generate, Generated};
use axum::http::{HeaderMap, StatusCode};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;

const DEADLINE: Duration = Duration::from_secs(120);
const PRODUCER_BIN: &str = env!("CARGO_BIN_EXE_audience-producer-under-test");
const FIELDS: [&str; 3] = ["email", "phone", "madid"];

/// The header the test's segments server requires, sent by the producer from a source secret.
const KEY_HEADER: &str = "x-segments-key";

/// The generator's NDJSON segment rewritten as CSV (CRLF, every text cell quoted): the same
/// members with the same values, each malformed line a row of one cell (a ragged row).
fn to_csv(ndjson: &Path) -> Vec<u8> {
    const COLUMNS: [&str; 6] = [
        "external_id",
        "email",
        "phone",
        "idfa",
        "madid",
        "ads_tracking_enabled",
    ];
    let mut out = COLUMNS.join(",").into_bytes();
    out.extend_from_slice(b"\r\n");
    let file = std::io::BufReader::new(std::fs::File::open(ndjson).expect("the segment"));
    for line in file.lines() {
        let line = line.expect("a line");
        let Ok(serde_json::Value::Object(record)) = serde_json::from_str(&line) else {
            out.extend_from_slice(b"\"not, a record\"\r\n");
            continue;
        };
        let cells: Vec<String> = COLUMNS
            .iter()
            .map(|c| match record.get(*c) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => format!("\"{}\"", s.replace('"', "\"\"")),
                Some(other) => other.to_string(),
            })
            .collect();
        out.extend_from_slice(cells.join(",").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    async_compression::tokio::bufread::GzipEncoder::new(bytes)
        .read_to_end(&mut out)
        .await
        .expect("gzip in memory");
    out
}

/// A segments server: `GET /<name>` answers the bytes published under that name, only to a
/// request carrying `KEY_HEADER: <key>` when a key is set (401 otherwise).
struct SegmentsServer {
    base: String,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

impl SegmentsServer {
    async fn start(key: Option<String>) -> SegmentsServer {
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let served = files.clone();
        let app = axum::Router::new().route(
            "/{name}",
            axum::routing::get(
                move |axum::extract::Path(name): axum::extract::Path<String>,
                      headers: HeaderMap| {
                    let (files, key) = (served.clone(), key.clone());
                    async move {
                        if let Some(key) = key {
                            if headers.get(KEY_HEADER).is_none_or(|k| k != key.as_str()) {
                                return (StatusCode::UNAUTHORIZED, Vec::new());
                            }
                        }
                        match files.lock().expect("files").get(&name) {
                            Some(bytes) => (StatusCode::OK, bytes.clone()),
                            None => (StatusCode::NOT_FOUND, Vec::new()),
                        }
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let base = format!("http://{}", listener.local_addr().expect("bound"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        SegmentsServer { base, files }
    }

    /// Publishes `bytes` as `name`; returns its URL.
    fn publish(&self, name: &str, bytes: Vec<u8>) -> String {
        self.files
            .lock()
            .expect("files")
            .insert(name.to_owned(), bytes);
        format!("{}/{name}", self.base)
    }
}

/// A job of the test's app reading `source` (the `source` object of the contract).
fn job_with_source(app: &TestApp, export_id: &str, source: serde_json::Value) -> Vec<u8> {
    let mut job = app.job(export_id, &FIELDS, Path::new("/unused"));
    job["source"] = source;
    job.to_string().into_bytes()
}

/// The export succeeded and Meta holds exactly what the generated segment must give, field by
/// field, with the report's counts exact.
fn assert_exact(app: &TestApp, report: &FinishedReport, generated: &Generated) {
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    assert_eq!(report.members_read, generated.members, "members read");
    assert_eq!(
        report.malformed_records, generated.malformed_lines,
        "malformed lines"
    );
    assert!(generated.malformed_lines > 0, "the segment has bad lines");
    for field in Field::ALL {
        let want = generated.expectation(field, 10_000);
        let got = report
            .audiences
            .iter()
            .find(|a| a.field == Some(field))
            .expect("a report per field");
        let audience = app
            .emulator
            .audience(&got.audience_id)
            .expect("the reported audience exists at Meta");
        assert_eq!(audience.ad_account, AD_ACCOUNT);
        let mut received: Vec<&String> = audience.entries.keys().collect();
        let mut expected: Vec<&String> = want.entries.keys().collect();
        received.sort();
        expected.sort();
        assert!(
            received == expected,
            "{field}: {} distinct entries at Meta, {} expected",
            received.len(),
            expected.len()
        );
        assert_eq!(got.with_value, want.with_value, "{field} with value");
        assert_eq!(got.missing, want.missing, "{field} missing");
        assert_eq!(got.invalid_total(), want.invalid, "{field} invalid");
        assert_eq!(got.prehashed, want.prehashed, "{field} prehashed");
        assert_eq!(got.duplicates, want.duplicates, "{field} duplicates");
        assert_eq!(got.uploaded, want.uploaded, "{field} uploaded");
    }
}

/// A directory of the test's own (not the app's: the producer must read it from settings).
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ae-{what}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_csv_over_http_with_a_header_from_a_secret_exports_exactly() {
    let key = format!("key-{:016x}", rand::random::<u64>());
    let secrets = TempDir::new("source-secrets");
    let mut secret = std::fs::File::create(secrets.0.join("segments-api")).expect("secret");
    writeln!(
        secret,
        "# mounted from a Kubernetes Secret\n{KEY_HEADER}: {key}"
    )
    .expect("secret");
    let dir = secrets.0.clone();
    let app = spawn_app_with(Roles::ALL, |s| s.producer.source_secrets_dir = Some(dir)).await;
    let ndjson = app.dir.join("segment.ndjson");
    let generated = generate(&ndjson, 12_000, 17).expect("segment written");
    let server = SegmentsServer::start(Some(key.clone())).await;
    let compressed = gzip(&to_csv(&ndjson)).await;
    assert_eq!(&compressed[..2], &[0x1f, 0x8b]);
    let url = server.publish("segment.csv.gz", compressed);

    let anonymous = reqwest::get(&url).await.expect("the server answers");
    assert_eq!(anonymous.status(), 401, "the segment needs the key");

    // No `compression`: the gzip stream is recognised by its first bytes.
    let source = serde_json::json!({"url": url, "format": "csv", "headers_secret": "segments-api"});
    app.enqueue(&job_with_source(&app, "exp-http-csv", source))
        .await;
    let report = app.finished("exp-http-csv", DEADLINE).await;
    assert_exact(&app, &report, &generated);

    // Without the secret the server refuses: a refusal with the reason, nothing created.
    let audiences = app.emulator.audiences().len();
    let source = serde_json::json!({"url": url, "format": "csv"});
    app.enqueue(&job_with_source(&app, "exp-http-no-key", source))
        .await;
    let report = app.finished("exp-http-no-key", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Rejected, "{report:?}");
    let reason = report.reason.unwrap_or_default();
    assert!(reason.contains("HTTP 401"), "{reason}");
    assert_eq!(app.emulator.audiences().len(), audiences, "no new audience");

    // The key's value is in no log line and no report (captured at debug, every role).
    assert!(
        !audience_export_harness::logs::captured().contains(&key),
        "a header value from a source secret was logged"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ndjson_object_on_s3_exports_exactly() {
    let s3 = S3Server::start().await;
    s3.create_bucket("segments").await;
    // The producer runs as a process of its own: S3's endpoint and credentials reach it the
    // standard way (AWS_* variables), without touching this test process' environment.
    let app = spawn_app_with(
        Roles {
            producer: false,
            worker: true,
            finalizer: true,
        },
        |_| {},
    )
    .await;
    let ndjson = app.dir.join("segment.ndjson");
    let generated = generate(&ndjson, 12_000, 23).expect("segment written");
    let bytes = std::fs::read(&ndjson).expect("the segment");
    s3.put("segments", "exports/2026/seg-7.ndjson", bytes).await;
    let env: Vec<(&str, String)> = s3.env();
    let _producer = app.spawn_process(PRODUCER_BIN, &env);

    let source =
        serde_json::json!({"url": "s3://segments/exports/2026/seg-7.ndjson", "format": "ndjson"});
    app.enqueue(&job_with_source(&app, "exp-s3", source)).await;
    let report = app.finished("exp-s3", DEADLINE).await;
    assert_exact(&app, &report, &generated);

    // A missing object is a refusal with the reason, not something to retry.
    let source =
        serde_json::json!({"url": "s3://segments/exports/2026/nope.ndjson", "format": "ndjson"});
    app.enqueue(&job_with_source(&app, "exp-s3-missing", source))
        .await;
    let report = app.finished("exp-s3-missing", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Rejected, "{report:?}");
    assert!(
        report
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("s3://segments/exports/2026/nope.ndjson does not exist"),
        "{report:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sources_outside_the_root_are_rejected_and_nothing_is_created() {
    let app = spawn_app().await;
    // A good segment outside the root, reachable through a symlink inside it.
    let outside = TempDir::new("outside-root");
    let elsewhere = outside.0.join("segment.ndjson");
    generate(&elsewhere, 100, 5).expect("segment written");
    let link = app.dir.join("link.ndjson");
    std::os::unix::fs::symlink(&elsewhere, &link).expect("a symlink");

    for (export_id, path, expect) in [
        (
            "exp-passwd",
            PathBuf::from("/etc/passwd"),
            "outside AE_PRODUCER__FILE_ROOT",
        ),
        ("exp-symlink", link, "through a symlink"),
    ] {
        app.export(export_id, &FIELDS, &path).await;
        let report = app.finished(export_id, DEADLINE).await;
        assert_eq!(report.status, ExportStatus::Rejected, "{report:?}");
        let reason = report.reason.unwrap_or_default();
        assert!(reason.contains(expect), "{export_id}: {reason}");
    }
    assert!(
        app.emulator.audiences().is_empty(),
        "nothing was created at Meta"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_file_root_every_file_source_is_rejected() {
    let app = spawn_app_with(Roles::ALL, |s| s.producer.file_root = None).await;
    let segment = app.dir.join("segment.ndjson");
    generate(&segment, 100, 3).expect("segment written");
    app.export("exp-no-root", &FIELDS, &segment).await;
    let report = app.finished("exp-no-root", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Rejected, "{report:?}");
    let reason = report.reason.unwrap_or_default();
    assert!(reason.contains("AE_PRODUCER__FILE_ROOT"), "{reason}");
    assert!(app.emulator.audiences().is_empty());
    app.stop().await;
}

/// The peak resident memory (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Plans one export of `url` in a fresh producer process and returns that process' peak RSS.
async fn planned_peak_rss(app: &TestApp, export_id: &str, url: &str) -> u64 {
    let mut producer = app.spawn_producer_process(PRODUCER_BIN);
    let pid = producer.id().expect("the producer runs");
    let source = serde_json::json!({"url": url, "format": "csv", "compression": "gzip"});
    app.enqueue(&job_with_source(app, export_id, source)).await;
    let sealed = app
        .wait_event(
            Duration::from_secs(300),
            |e| matches!(e, Event::ExportSealed { export_id: id } if id.as_str() == export_id),
        )
        .await;
    assert!(
        sealed.is_some(),
        "{export_id} was planned: {:?}",
        app.events()
    );
    let peak = peak_rss_kib(pid);
    producer.kill().await.expect("the producer stops");
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_streams_a_twenty_times_larger_segment_in_the_same_memory() {
    // The producer alone, as a process (its peak RSS is its own); no worker: the shards wait in
    // the queue, the plan is sealed once the broker confirmed them.
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let server = SegmentsServer::start(None).await;
    let mut urls = Vec::new();
    for (name, members) in [("small", 20_000), ("large", 400_000)] {
        let ndjson = app.dir.join(format!("{name}.ndjson"));
        generate(&ndjson, members, 29).expect("segment written");
        let csv = to_csv(&ndjson);
        let compressed = gzip(&csv).await;
        eprintln!(
            "{name}: {members} members, {} bytes of CSV, {} gzipped",
            csv.len(),
            compressed.len()
        );
        drop(csv);
        std::fs::remove_file(&ndjson).expect("removed");
        urls.push(server.publish(&format!("{name}.csv.gz"), compressed));
    }
    let small = planned_peak_rss(&app, "exp-mem-small", &urls[0]).await;
    let large = planned_peak_rss(&app, "exp-mem-large", &urls[1]).await;
    eprintln!("Producer peak RSS: {small} KiB for 20,000 members, {large} KiB for 400,000.");
    // The large segment is 36 MB of CSV, 15 MB gzipped. Measured (this 2-core machine, debug build): the
    // streaming producer's peak grows by 3 to 4.5 MiB between the two (the allocator's arenas
    // after twenty times more allocations, more shards in flight), while a reader that held just
    // the compressed body grew it by 16 MiB (the decompressed text would be 34 MiB). 8 MiB sits
    // between the two with room on both sides.
    let bound_kib = 8 * 1024;
    assert!(
        large.saturating_sub(small) < bound_kib,
        "peak RSS grew by {} KiB (small {small} KiB, large {large} KiB)",
        large.saturating_sub(small)
    );
    app.stop().await;
}
