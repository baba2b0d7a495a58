//! What Meta makes of an export, end to end on the real services: records Meta refuses are
//! isolated so the rest arrive, the report carries the size Meta shows and the lookalike the job
//! asked for, and audience names are unique and within Meta's limit. Expected figures come from
//! the test's own segment, never from the code under test.

use audience_export_core::contract::ExportStatus;
use audience_export_harness::app::{spawn_app, TestApp};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// `n` members with an email each and, for the first `madids`, a MADID.
fn write_segment(app: &TestApp, name: &str, n: usize, madids: usize) -> std::path::PathBuf {
    let path = app.dir.join(name);
    let text: String = (0..n)
        .map(|i| {
            let mut m = json!({"email": format!("person{i}@example.com")});
            if i < madids {
                m["madid"] = json!(format!("6f1c2a3b-1d2e-4f50-8a9b-{i:012x}"));
            }
            m.to_string() + "\n"
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_meta_refuses_are_isolated_and_the_rest_arrive() {
    let app = spawn_app().await;
    let path = write_segment(&app, "poison.ndjson", 1_000, 0);
    let poisoned = [sha("person17@example.com"), sha("person700@example.com")];
    app.emulator
        .configure(|c| c.poison_entries = poisoned.to_vec());
    app.export("exp-poison", &["email"], &path).await;
    let report = app.finished("exp-poison", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    let email = &report.audiences[0];
    assert_eq!(email.uploaded, 998, "{email:?}");
    assert_eq!(email.invalid.get("meta_refused"), Some(&2), "{email:?}");
    let audience = app.emulator.audience(&email.audience_id).expect("audience");
    let want: HashSet<String> = (0..1_000)
        .map(|i| sha(&format!("person{i}@example.com")))
        .filter(|h| !poisoned.contains(h))
        .collect();
    let got: HashSet<String> = audience.entries.keys().cloned().collect();
    assert_eq!(got, want, "every good record arrived, no refused one did");
    let calls = app
        .emulator
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("/users"))
        .count();
    // Two bad records in 1,000: each costs about 2 × log2(1,000) calls to corner.
    assert!(calls <= 45, "{calls} calls to isolate two records");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_carries_meta_sizes_and_the_lookalikes_asked_for() {
    let app = spawn_app().await;
    // 400 emails (enough for a lookalike), 60 MADIDs (under Meta's 100-person minimum).
    let path = write_segment(&app, "lookalike.ndjson", 400, 60);
    let mut job = app.job("exp-lookalike", &["email", "madid"], &path);
    job["lookalike"] = json!({"countries": ["US", "CA"], "ratio": 0.02});
    app.enqueue(job.to_string().as_bytes()).await;
    let report = app.finished("exp-lookalike", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");

    let email = &report.audiences[0];
    let (lower, upper) = (
        email.approximate_count_lower_bound.expect("a lower bound"),
        email.approximate_count_upper_bound.expect("an upper bound"),
    );
    assert!(lower <= 400 && 400 <= upper, "{lower}..{upper}");
    let lookalike = email
        .lookalike
        .as_ref()
        .expect("a lookalike of the email audience");
    let id = lookalike.audience_id.as_deref().expect("made");
    let made = app
        .emulator
        .audience(id)
        .expect("the lookalike exists at Meta");
    assert_eq!(made.subtype, "LOOKALIKE");
    assert_eq!(made.name, lookalike.name);
    assert!(made.name.contains("Lookalike US,CA 2%"), "{}", made.name);

    let madid = &report.audiences[1];
    let refused = madid
        .lookalike
        .as_ref()
        .expect("the MADID lookalike's outcome");
    assert!(refused.audience_id.is_none());
    assert!(
        refused.error.is_some(),
        "Meta's reason is reported: {refused:?}"
    );
    let lookalikes = app
        .emulator
        .audiences()
        .into_iter()
        .filter(|a| a.subtype == "LOOKALIKE")
        .count();
    assert_eq!(lookalikes, 1, "one lookalike, made once");

    // Without `lookalike`, none is made; the sizes are read all the same.
    app.export("exp-plain", &["email"], &path).await;
    let plain = app.finished("exp-plain", DEADLINE).await;
    assert!(plain.audiences[0].lookalike.is_none());
    assert!(plain.audiences[0].approximate_count_upper_bound.is_some());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_names_are_unique_per_export_and_within_meta_limit() {
    let app = spawn_app().await;
    let path = write_segment(&app, "names.ndjson", 50, 0);
    app.export("exp-a", &["email"], &path).await;
    app.export("exp-b", &["email"], &path).await;
    let a = app.finished("exp-a", DEADLINE).await;
    let b = app.finished("exp-b", DEADLINE).await;
    assert_ne!(a.audiences[0].name, b.audiences[0].name);
    assert!(a.audiences[0].name.starts_with("Spring buyers - Email - "));

    let mut long = app.job("exp-long", &["email"], &path);
    long["segment"]["name"] = json!("Très long segment ".repeat(20));
    app.enqueue(long.to_string().as_bytes()).await;
    let report = app.finished("exp-long", DEADLINE).await;
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    let name = &report.audiences[0].name;
    let chars = name.chars().count();
    assert!((190..=200).contains(&chars), "{chars}: {name}");
    assert!(name.contains("…"), "{name}");
    assert!(name.ends_with("(exp-long)"), "{name}");
    app.stop().await;
}
