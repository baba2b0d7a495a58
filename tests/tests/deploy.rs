//! The dashboard and the alerts cannot drift from the code: every metric a Grafana panel or a
//! Prometheus rule names must be one the three roles actually export, read from their live
//! `/metrics` after a small export (so series that appear with traffic, like Meta's usage per ad
//! account, are there too).

use audience_export_harness::app::{spawn_app, WORKSPACE};
use audience_export_harness::segment::generate;
use std::collections::BTreeSet;
use std::time::Duration;

/// The metric names the dashboard and the alerts use, as written (histogram series with their
/// `_bucket`/`_sum`/`_count` suffix), from the one reader of PromQL the deploy checks use too.
fn used_metric_names() -> BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("python3")
        .arg(root.join("scripts/metric-names.py"))
        .arg("--as-used")
        .output()
        .expect("python3 scripts/metric-names.py");
    assert!(
        out.status.success(),
        "scripts/metric-names.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_use_is_exported() {
    let app = spawn_app().await;
    let segment = app.dir.join("deploy.ndjson");
    generate(&segment, 200, 131).expect("segment");
    app.export("exp-deploy", &["email", "phone", "madid"], &segment)
        .await;
    app.finished("exp-deploy", Duration::from_secs(60)).await;
    // The API's request counter has a series only once the API has answered a request.
    assert_eq!(app.connection_status(WORKSPACE).await.status, 200);

    let mut exported = BTreeSet::new();
    for ops in &app.ops {
        let scrape = reqwest::get(format!("http://{ops}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        for line in scrape.lines().filter(|l| !l.starts_with('#')) {
            if let Some(name) = line.split(['{', ' ']).next() {
                exported.insert(name.to_owned());
            }
        }
    }
    assert!(exported.contains("audience_export_meta_usage_percent"));

    let used = used_metric_names();
    assert!(used.contains("audience_export_upload_duration_seconds_bucket"));
    let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "used by the dashboard or the alerts but exported by no role: {unknown:?}"
    );
    app.stop().await;
}
