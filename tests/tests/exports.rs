//! The upstream platform's side of an export, end to end on the real services: consent filters,
//! segments with nobody to export, the export API (submit, status, list, cancel) and its CLI,
//! and dry runs. Expected figures come from the test's own model of the segment, never from the
//! code under test.

use audience_export_core::contract::ExportStatus;
use audience_export_harness::app::{spawn_app, spawn_app_with, Roles, TestApp, WORKSPACE};
use audience_export_harness::emulator::Latency;
use audience_export_harness::segment::generate;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);
const PRODUCER_BIN: &str = env!("CARGO_BIN_EXE_audience-producer-under-test");

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A segment whose members' consent attributes follow `i`: what each consent rule must do to it
/// is computed by `expect` below from the same arithmetic, not by the producer's filter.
struct ConsentSegment {
    members: Vec<(String, Option<bool>, Option<bool>)>,
}

impl ConsentSegment {
    fn write(path: &std::path::Path, n: usize) -> ConsentSegment {
        let mut members = Vec::new();
        let mut text = String::new();
        for i in 0..n {
            let email = format!("member{i}@example.com");
            // ads_tracking_enabled: absent for every 7th, false for every 5th, else true.
            let ads = match (i % 7, i % 5) {
                (0, _) => None,
                (_, 0) => Some(false),
                _ => Some(true),
            };
            // do_not_sell_or_share: true for every 3rd, absent for every 4th, else false.
            let dnss = match (i % 3, i % 4) {
                (0, _) => Some(true),
                (_, 0) => None,
                _ => Some(false),
            };
            let mut record = json!({"external_id": format!("u{i}"), "email": format!(" {} ", email.to_uppercase())});
            if let Some(a) = ads {
                record["ads_tracking_enabled"] = json!(a);
            }
            if let Some(d) = dnss {
                record["do_not_sell_or_share"] = json!(d);
            }
            text.push_str(&record.to_string());
            text.push('\n');
            members.push((email, ads, dnss));
        }
        std::fs::write(path, text).expect("segment written");
        ConsentSegment { members }
    }

    /// The excluded counts and the entries a rule must produce.
    fn expect(&self, require_ads: bool) -> (BTreeMap<String, u64>, HashSet<String>) {
        let mut excluded = BTreeMap::new();
        if require_ads {
            excluded.insert("ads_tracking_enabled".to_owned(), 0);
        }
        excluded.insert("do_not_sell_or_share".to_owned(), 0);
        let mut entries = HashSet::new();
        for (email, ads, dnss) in &self.members {
            if require_ads && *ads != Some(true) {
                *excluded.get_mut("ads_tracking_enabled").unwrap() += 1;
            } else if *dnss == Some(true) {
                *excluded.get_mut("do_not_sell_or_share").unwrap() += 1;
            } else {
                entries.insert(sha(email));
            }
        }
        (excluded, entries)
    }
}

/// Sum of a counter over every role's scrape, for one label value.
async fn counter(app: &TestApp, name: &str, label: &str) -> f64 {
    let mut total = 0.0;
    for ops in &app.ops {
        let text = reqwest::get(format!("http://{ops}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        for line in text.lines() {
            if line.starts_with(&format!("{name}{{")) && line.contains(label) {
                total += line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_excludes_exactly_per_attribute_and_excluded_values_never_reach_meta() {
    let app = spawn_app().await;
    let path = app.dir.join("consent.ndjson");
    let segment = ConsentSegment::write(&path, 420);

    // The job's own rule.
    let mut job = app.job("exp-consent", &["email"], &path);
    job["consent"] =
        json!({"require": ["ads_tracking_enabled"], "exclude": ["do_not_sell_or_share"]});
    app.enqueue(job.to_string().as_bytes()).await;
    let report = app.finished("exp-consent", DEADLINE).await;
    let (excluded, entries) = segment.expect(true);
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    assert_eq!(report.members_read, 420);
    assert_eq!(report.excluded, excluded);
    assert!(
        excluded.values().all(|&n| n > 0),
        "both attributes exclude someone: {excluded:?}"
    );
    let email = &report.audiences[0];
    assert_eq!(
        email.with_value,
        entries.len() as u64,
        "only admitted members are counted per field"
    );
    let sent: HashSet<String> = app
        .emulator
        .audience(&email.audience_id)
        .expect("the audience")
        .entries
        .keys()
        .cloned()
        .collect();
    assert_eq!(sent, entries, "exactly the admitted members reached Meta");
    let metric = counter(
        &app,
        "audience_export_members_excluded_total",
        "attribute=\"ads_tracking_enabled\"",
    )
    .await;
    assert_eq!(metric, excluded["ads_tracking_enabled"] as f64);
    let mail = app
        .smtp
        .wait_for(DEADLINE, |m| {
            m.subject().is_some_and(|s| s.contains("Spring buyers"))
        })
        .await
        .expect("the report email");
    let body = mail.body();
    assert!(
        body.contains(&format!(
            "ads_tracking_enabled: {}",
            excluded["ads_tracking_enabled"]
        )),
        "{body}"
    );

    // No consent block: the default leaves out only who opted out of sale or sharing.
    app.export("exp-default", &["email"], &path).await;
    let report = app.finished("exp-default", DEADLINE).await;
    let (excluded, entries) = segment.expect(false);
    assert_eq!(report.excluded, excluded);
    let sent: HashSet<String> = app
        .emulator
        .audience(&report.audiences[0].audience_id)
        .expect("the audience")
        .entries
        .keys()
        .cloned()
        .collect();
    assert_eq!(sent, entries);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_with_nobody_to_export_fails_with_the_reason_and_creates_nothing() {
    let app = spawn_app().await;
    let garbage = app.dir.join("garbage.ndjson");
    std::fs::write(&garbage, "not json\n{\"email\": \n[1,2]\n").unwrap();
    app.export("exp-garbage", &["email", "phone"], &garbage)
        .await;
    let report = app.finished("exp-garbage", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Failed, "{report:?}");
    let reason = report.reason.clone().unwrap_or_default();
    assert!(reason.contains("holds no member"), "{reason}");
    assert_eq!((report.members_read, report.malformed_records), (0, 3));
    assert!(report.audiences.is_empty(), "{report:?}");

    let opted_out = app.dir.join("opted-out.ndjson");
    std::fs::write(
        &opted_out,
        "{\"email\":\"a@x.io\",\"do_not_sell_or_share\":true}\n{\"email\":\"b@x.io\",\"do_not_sell_or_share\":true}\n",
    )
    .unwrap();
    app.export("exp-opted-out", &["email"], &opted_out).await;
    let report = app.finished("exp-opted-out", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Failed, "{report:?}");
    assert!(
        report
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("no member is left after the consent filter"),
        "{report:?}"
    );
    assert_eq!(report.excluded.get("do_not_sell_or_share"), Some(&2));
    assert!(
        app.emulator.audiences().is_empty(),
        "no audience is created for nobody"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_over_http_completes_once_and_can_be_followed() {
    let app = spawn_app().await;
    let path = app.dir.join("http.ndjson");
    let generated = generate(&path, 2_000, 21).expect("segment");
    let job = app.job("exp-http", &["email", "madid"], &path);

    let (status, body) = app
        .api_call(Method::POST, "/v1/exports", Some(job.clone()))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["export_id"].as_str(), body["created"].as_bool()),
        (Some("exp-http"), Some(true))
    );
    // A client's retry: accepted again, runs once.
    let (status, body) = app
        .api_call(Method::POST, "/v1/exports", Some(job.clone()))
        .await;
    assert_eq!(
        (status, body["created"].as_bool()),
        (202, Some(false)),
        "{body}"
    );
    // Another job under the same id: refused at once.
    let mut other = job.clone();
    other["fields"] = json!(["phone"]);
    let (status, body) = app.api_call(Method::POST, "/v1/exports", Some(other)).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("different job"),
        "{body}"
    );
    // A job that does not validate: 400 with the reason.
    let mut bad = job.clone();
    bad["fields"] = json!(["fax"]);
    let (status, body) = app.api_call(Method::POST, "/v1/exports", Some(bad)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("fax"),
        "{body}"
    );

    let report = app.finished("exp-http", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    assert_eq!(report.members_read, generated.members);
    assert_eq!(
        app.emulator.audiences().len(),
        2,
        "one audience per field, once"
    );

    let (status, view) = app
        .api_call(Method::GET, "/v1/exports/exp-http", None)
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "succeeded");
    assert_eq!(view["members_read"], generated.members);
    assert_eq!(view["workspace_id"], WORKSPACE);
    assert_eq!(view["shards"]["done"], view["shards"]["planned"]);
    let email = generated.expectation(audience_export_core::Field::Email, 10_000);
    assert_eq!(view["audiences"][0]["field"], "email");
    assert_eq!(view["audiences"][0]["uploaded"], email.uploaded);
    assert!(
        view["started_at"].is_string() && view["finished_at"].is_string(),
        "{view}"
    );

    let (status, list) = app
        .api_call(
            Method::GET,
            &format!("/v1/exports?workspace_id={WORKSPACE}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["export_id"].as_str())
        .collect();
    assert_eq!(ids, vec!["exp-http"]);
    let (status, _) = app
        .api_call(Method::GET, "/v1/exports/exp-nope", None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = app
        .api_call_with_key(Method::GET, "/v1/exports/exp-http", None, Some("wrong"))
        .await;
    assert_eq!(status, 401, "the export API wants the key too");
    let (status, body) = app
        .api_call(Method::POST, "/v1/exports/exp-http/cancel", None)
        .await;
    assert_eq!(status, 409, "a finished export cannot be cancelled: {body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_follows_and_lists_like_the_api() {
    let app = spawn_app().await;
    let path = app.dir.join("cli.ndjson");
    generate(&path, 500, 5).expect("segment");
    let job_file = app.dir.join("job.json");
    std::fs::write(&job_file, app.job("exp-cli", &["email"], &path).to_string()).unwrap();
    let run = |args: Vec<String>| {
        let mut command = app.command(PRODUCER_BIN);
        command.arg("exports").args(args);
        async move {
            let out = command.output().await.expect("the CLI runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Value>(&out.stdout).expect("JSON out")
        }
    };
    let submitted = run(vec!["submit".into(), job_file.display().to_string()]).await;
    assert_eq!(submitted["export_id"], "exp-cli");
    let report = app.finished("exp-cli", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded);
    let status = run(vec!["status".into(), "exp-cli".into()]).await;
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["members_read"], 500);
    let list = run(vec!["list".into(), WORKSPACE.into()]).await;
    assert_eq!(list[0]["export_id"], "exp-cli");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_export_stops_the_calls_to_meta_and_finishes_cancelled_with_one_email() {
    // 400 shards of 50 emails, each call 150 ms: about 8 s of uploads, cancelled after the first.
    let app = spawn_app_with(Roles::ALL, |s| s.producer.shard_size = 50).await;
    app.emulator.set_latency(Latency {
        base_ms: 150,
        per_record_us: 0,
        jitter_ms: 0,
    });
    let path = app.dir.join("cancel.ndjson");
    let n = 20_000;
    let text: String = (0..n)
        .map(|i| format!("{{\"email\":\"c{i}@example.com\"}}\n"))
        .collect();
    std::fs::write(&path, text).unwrap();
    let job = app.job("exp-cancel", &["email"], &path);
    let (status, _) = app.api_call(Method::POST, "/v1/exports", Some(job)).await;
    assert_eq!(status, 202);

    let uploads = |app: &TestApp| {
        app.emulator
            .calls()
            .into_iter()
            .filter(|c| c.method == "POST" && c.path.ends_with("/users") && c.error_code.is_none())
            .count()
    };
    audience_export_harness::app::eventually(DEADLINE, || async {
        (uploads(&app) > 0).then_some(())
    })
    .await
    .expect("uploads begin");
    let cancelled_at = Instant::now();
    let (status, view) = app
        .api_call(
            Method::POST,
            "/v1/exports/exp-cancel/cancel",
            Some(json!({"cancelled_by": "ops@example.com"})),
        )
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["reason"], "cancelled by ops@example.com");

    let report = app.finished("exp-cancel", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Cancelled, "{report:?}");
    assert_eq!(
        report.reason.as_deref(),
        Some("cancelled by ops@example.com")
    );
    let after_cancel = app
        .emulator
        .calls()
        .into_iter()
        .filter(|c| c.path.ends_with("/users") && c.at > cancelled_at)
        .count();
    // Uploads already past their gate when the cancel landed may finish: at most the worker's
    // concurrency. Without the cancel, ~380 more would have followed.
    let concurrency = app.settings.worker.concurrency as usize;
    eprintln!(
        "cancel: {} uploads before, {after_cancel} after the cancel; {} of {n} entries at Meta",
        uploads(&app) - after_cancel,
        app.emulator
            .audience(&report.audiences[0].audience_id)
            .map_or(0, |a| a.entries.len())
    );
    assert!(
        after_cancel <= concurrency,
        "{after_cancel} uploads after the cancel"
    );
    let audience = app
        .emulator
        .audience(&report.audiences[0].audience_id)
        .expect("audience");
    assert_eq!(
        report.audiences[0].uploaded,
        audience.entries.len() as u64,
        "the report counts what Meta holds"
    );
    assert!(
        audience.entries.len() < n / 2,
        "{} entries arrived",
        audience.entries.len()
    );

    assert!(app.settled(Duration::from_secs(6)).await, "queues settle");
    let calls_after_settle = uploads(&app);
    let mails: Vec<_> = app
        .smtp
        .mails()
        .into_iter()
        .filter(|m| m.subject().is_some_and(|s| s.contains("was cancelled")))
        .collect();
    assert_eq!(mails.len(), 1, "exactly one email, after a settle period");
    assert!(mails[0]
        .body()
        .contains("Nothing more was sent after the cancellation"));
    assert_eq!(uploads(&app), calls_after_settle);
    let (_, view) = app
        .api_call(Method::GET, "/v1/exports/exp-cancel", None)
        .await;
    assert_eq!(view["status"], "cancelled");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_planning_begins_creates_nothing() {
    let app = spawn_app().await;
    let path = app.dir.join("early.ndjson");
    generate(&path, 100, 3).expect("segment");
    // Recorded as submitted, not yet planned: the status says queued.
    let job = app.job("exp-early", &["email"], &path);
    app.progress
        .submit(
            &audience_export_harness::app::export("exp-early"),
            &audience_export_harness::app::ws(WORKSPACE),
            &serde_json::to_string(
                &audience_export_core::ExportJob::parse(job.to_string().as_bytes()).unwrap(),
            )
            .unwrap(),
            audience_export_core::progress::now_ms(),
            Duration::from_secs(3600),
        )
        .await
        .expect("submitted");
    let (_, view) = app
        .api_call(Method::GET, "/v1/exports/exp-early", None)
        .await;
    assert_eq!(view["status"], "queued", "{view}");
    let (status, _) = app
        .api_call(Method::POST, "/v1/exports/exp-early/cancel", None)
        .await;
    assert_eq!(status, 200);
    // The job arrives after the cancel: nothing is created, it finishes cancelled.
    app.enqueue(job.to_string().as_bytes()).await;
    let report = app.finished("exp-early", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Cancelled, "{report:?}");
    assert!(app.emulator.audiences().is_empty());
    assert!(
        app.emulator.calls().is_empty(),
        "not even a connection check: {:?}",
        app.emulator.calls()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_creates_nothing_and_reports_what_the_real_run_does() {
    let app = spawn_app().await;
    let path = app.dir.join("dry.ndjson");
    generate(&path, 6_000, 99).expect("segment");
    let fields = ["email", "phone", "madid"];
    let mut dry = app.job("exp-dry", &fields, &path);
    dry["dry_run"] = json!(true);
    app.enqueue(dry.to_string().as_bytes()).await;
    let dry = app.finished("exp-dry", DEADLINE).await;
    assert_eq!(dry.status, ExportStatus::Succeeded, "{dry:?}");
    assert!(dry.dry_run);
    assert!(
        app.emulator.audiences().is_empty(),
        "a dry run creates no audience"
    );
    let calls = app.emulator.calls();
    assert!(
        calls.iter().all(|c| c.method == "GET"),
        "a dry run only reads from Meta: {calls:?}"
    );
    assert!(!calls.is_empty(), "it checks the connection with Meta");
    let mail = app
        .smtp
        .wait_for(DEADLINE, |m| {
            m.subject().is_some_and(|s| s.contains("dry run"))
        })
        .await
        .expect("the dry run's email");
    assert!(mail.body().contains("Would upload"), "{}", mail.body());

    app.export("exp-real", &fields, &path).await;
    let real = app.finished("exp-real", DEADLINE).await;
    assert_eq!(real.status, ExportStatus::Succeeded);
    assert_eq!(
        (dry.members_read, dry.malformed_records, &dry.excluded),
        (real.members_read, real.malformed_records, &real.excluded)
    );
    assert_eq!(dry.audiences.len(), 3);
    for (d, r) in dry.audiences.iter().zip(&real.audiences) {
        assert_eq!(d.field, r.field);
        assert_eq!(
            (
                d.with_value,
                d.missing,
                &d.invalid,
                d.prehashed,
                d.duplicates,
                d.uploaded,
                d.shards
            ),
            (
                r.with_value,
                r.missing,
                &r.invalid,
                r.prehashed,
                r.duplicates,
                r.uploaded,
                r.shards
            ),
            "{:?}",
            d.field
        );
        assert!(d.uploaded > 0);
        assert!(d.audience_id.is_empty() && !r.audience_id.is_empty());
    }
    app.stop().await;
}
