//! Builds the finished report (what the email and the `export.finished` event say) from an
//! export's progress hash and its job. Pure: no I/O, so its arithmetic is tested on its own.

use audience_export_core::contract::{AudienceReport, ExportStatus, FinishedReport};
use audience_export_core::progress::Snapshot;
use audience_export_core::{ExportJob, Field};

/// The terminal status an export's counters imply.
pub fn status_of(snapshot: &Snapshot) -> ExportStatus {
    let (done, failed) = (
        snapshot.count("shards_done"),
        snapshot.count("shards_failed"),
    );
    match (done, failed) {
        (_, 0) => ExportStatus::Succeeded,
        (0, _) => ExportStatus::Failed,
        _ => ExportStatus::PartiallyFailed,
    }
}

pub fn build(
    export_id: &str,
    job: Option<&ExportJob>,
    snapshot: &Snapshot,
    status: ExportStatus,
    reason: Option<String>,
    now_ms: u64,
) -> FinishedReport {
    let fields: Vec<Field> = match job {
        Some(job) => job.fields.clone(),
        None => Vec::new(),
    };
    let audiences = fields
        .iter()
        .filter(|f| {
            snapshot.get(&format!("{f}:audience_id")).is_some() || status != ExportStatus::Rejected
        })
        .map(|&field| audience(snapshot, field))
        .collect();
    let started = snapshot.count("started_at_ms");
    let reason = reason.or_else(|| {
        (status != ExportStatus::Succeeded)
            .then(|| {
                fields
                    .iter()
                    .find_map(|f| snapshot.get(&format!("{f}:last_error")).map(str::to_owned))
            })
            .flatten()
    });
    FinishedReport {
        export_id: export_id.to_owned(),
        status,
        reason,
        segment_name: job.map(|j| j.segment.name.clone()).unwrap_or_default(),
        ad_account_id: job
            .map(|j| j.ad_account_number().to_owned())
            .unwrap_or_default(),
        members_read: snapshot.count("members_read"),
        malformed_records: snapshot.count("malformed_records"),
        audiences,
        duration_ms: if started > 0 {
            now_ms.saturating_sub(started)
        } else {
            0
        },
    }
}

fn audience(s: &Snapshot, field: Field) -> AudienceReport {
    AudienceReport {
        field: Some(field),
        audience_id: s
            .get(&format!("{field}:audience_id"))
            .unwrap_or_default()
            .to_owned(),
        name: s
            .get(&format!("{field}:audience_name"))
            .unwrap_or_default()
            .to_owned(),
        with_value: s.field_count(field, "with_value"),
        missing: s.field_count(field, "missing"),
        invalid: s.invalid_by_reason(field).into_iter().collect(),
        prehashed: s.field_count(field, "prehashed"),
        duplicates: s.field_count(field, "duplicates"),
        uploaded: s.field_count(field, "uploaded"),
        meta_received: s.field_count(field, "meta_received"),
        meta_invalid: s.field_count(field, "meta_invalid"),
        shards: s.field_count(field, "shards"),
        shards_failed: s.field_count(field, "shards_failed"),
        last_error: s.get(&format!("{field}:last_error")).map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn snap(pairs: &[(&str, &str)]) -> Snapshot {
        Snapshot(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        )
    }

    #[test]
    fn status_follows_the_shard_counts() {
        assert_eq!(
            status_of(&snap(&[("shards_done", "3")])),
            ExportStatus::Succeeded
        );
        assert_eq!(status_of(&snap(&[])), ExportStatus::Succeeded);
        assert_eq!(
            status_of(&snap(&[("shards_done", "2"), ("shards_failed", "1")])),
            ExportStatus::PartiallyFailed
        );
        assert_eq!(
            status_of(&snap(&[("shards_failed", "1")])),
            ExportStatus::Failed
        );
    }

    #[test]
    fn a_field_report_reads_its_counters() {
        let s = snap(&[
            ("email:audience_id", "42"),
            ("email:with_value", "10"),
            ("email:invalid:email_format", "2"),
            ("email:invalid:empty", "1"),
            ("email:uploaded", "7"),
            ("email:meta_received", "7"),
            ("phone:uploaded", "99"),
        ]);
        let a = audience(&s, Field::Email);
        assert_eq!(a.audience_id, "42");
        assert_eq!(a.invalid_total(), 3);
        assert_eq!(a.invalid.get("email_format"), Some(&2));
        assert_eq!(a.uploaded, 7);
    }
}
