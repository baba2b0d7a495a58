//! The fault suite: an export finishes exactly once, into exactly one set of audiences, whatever
//! fails. Each test breaks one thing on real processes or real servers of its own (a producer,
//! worker or finalizer killed at a named point, the test's own Redis killed and restarted, the
//! broker connection cut by a proxy, the SMTP relay down, a handler that panics, a segment with
//! bad bytes, a shard that never arrives, a job published twice) and checks, independently of
//! the code under test: the entries at the emulator equal the segment's expected set, exactly one
//! audience per field exists at Meta, exactly one email was sent (after the namespace's queues
//! settled, not at the first arrival), the report's counts are exact, and how long recovery took.

mod cluster;
mod crashes;
mod infrastructure;
mod input;

use audience_export_core::contract::{ExportStatus, FinishedReport};
use audience_export_core::Field;
use audience_export_harness::app::{TestApp, AD_ACCOUNT};
use audience_export_harness::segment::Generated;
use std::time::Duration;

pub const DEADLINE: Duration = Duration::from_secs(120);
pub const WORKER_BIN: &str = env!("CARGO_BIN_EXE_audience-worker-under-test");
pub const PRODUCER_BIN: &str = env!("CARGO_BIN_EXE_audience-producer-under-test");
pub const FINALIZER_BIN: &str = env!("CARGO_BIN_EXE_audience-finalizer-under-test");

/// The settle period: the finalizer's retry delay (5 s) and then some.
pub const QUIET: Duration = Duration::from_secs(6);

/// Everything that must hold once an export of `generated` for `fields` finished, whatever
/// happened on the way: succeeded, one audience per field at Meta and no other, every expected
/// entry there and nothing else (a shard in flight at a crash may have been sent twice, so the
/// entries are compared as sets), exact counts in the report (counted once), and exactly one
/// email and one `export.finished` after the queues settled.
pub async fn assert_exact(
    app: &TestApp,
    export_id: &str,
    report: &FinishedReport,
    generated: &Generated,
    fields: &[Field],
    shard_size: usize,
) {
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    assert_eq!(report.members_read, generated.members, "members read");
    assert_eq!(
        report.malformed_records, generated.malformed_lines,
        "malformed lines"
    );
    let at_meta: Vec<_> = app
        .emulator
        .audiences()
        .into_iter()
        .filter(|a| a.ad_account == AD_ACCOUNT)
        .collect();
    assert_eq!(
        at_meta.len(),
        fields.len(),
        "exactly one audience per field at Meta: {:?}",
        at_meta.iter().map(|a| &a.name).collect::<Vec<_>>()
    );
    for &field in fields {
        let want = generated.expectation(field, shard_size);
        let got = report
            .audiences
            .iter()
            .find(|a| a.field == Some(field))
            .expect("a report per field");
        let audience = app
            .emulator
            .audience(&got.audience_id)
            .expect("the reported audience exists at Meta");
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
        assert_eq!(got.duplicates, want.duplicates, "{field} duplicates");
        assert_eq!(
            got.uploaded, want.uploaded,
            "{field} uploaded, counted once"
        );
        assert_eq!(got.shards_failed, 0, "{field}: no shard failed");
    }
    assert!(app.settled(QUIET).await, "the namespace's queues settle");
    assert_eq!(finished_events(app, export_id), 1, "one export.finished");
    assert_eq!(emails_about(app, export_id), 1, "exactly one email");
}

/// `export.finished` events of the export seen so far.
pub fn finished_events(app: &TestApp, export_id: &str) -> usize {
    app.events()
        .iter()
        .filter(|e| {
            matches!(e, audience_export_core::contract::Event::ExportFinished(r) if r.export_id == export_id)
        })
        .count()
}

/// Report emails naming the export.
pub fn emails_about(app: &TestApp, export_id: &str) -> usize {
    app.smtp
        .mails()
        .iter()
        .filter(|m| m.body().contains(&format!("Export {export_id} ")))
        .count()
}

/// One sample of a Prometheus scrape, e.g. `audience_export_deliveries_total{outcome="panicked"}`.
pub async fn metric(ops: std::net::SocketAddr, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{ops}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|v| v.trim().parse::<f64>().ok())
    })
}
