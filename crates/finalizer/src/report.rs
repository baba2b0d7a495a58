//! Builds the finished report (what the email and the `export.finished` event say) from an
//! export's progress hash and its job. Pure: no I/O, so its arithmetic is tested on its own.

use audience_export_core::contract::{
    AudienceReport, ExportId, ExportStatus, FinishedReport, LookalikeReport,
};
use audience_export_core::progress::{ExportProgress, FieldProgress};
use audience_export_core::{ExportJob, Field};

/// The terminal status an export's counters imply.
pub fn status_of(progress: &ExportProgress) -> ExportStatus {
    match (progress.shards_done, progress.shards_failed) {
        (_, 0) => ExportStatus::Succeeded,
        (0, _) => ExportStatus::Failed,
        _ => ExportStatus::PartiallyFailed,
    }
}

pub fn build(
    export_id: &ExportId,
    job: Option<&ExportJob>,
    progress: &ExportProgress,
    status: ExportStatus,
    reason: Option<String>,
    now_ms: u64,
) -> FinishedReport {
    let fields: &[Field] = job.map_or(&[], |j| &j.fields);
    let dry_run = job.is_some_and(|j| j.dry_run);
    let audiences = fields
        .iter()
        .map(|&field| (field, progress.field(field)))
        // Only audiences that exist, or were about to (a name recorded, the id never answered),
        // are named; a dry run names every field's would-be audience.
        .filter(|(_, f)| f.audience_id.is_some() || f.audience_name.is_some() || dry_run)
        .map(|(field, f)| audience(field, f))
        .collect();
    let reason = reason.or_else(|| {
        (status != ExportStatus::Succeeded)
            .then(|| fields.iter().find_map(|&f| progress.field(f).last_error))
            .flatten()
    });
    FinishedReport {
        export_id: export_id.clone(),
        status,
        reason,
        segment_name: job.map(|j| j.segment.name.clone()).unwrap_or_default(),
        ad_account_id: job.map(|j| j.ad_account_id.clone()),
        members_read: progress.members_read,
        malformed_records: progress.malformed_records,
        excluded: progress.excluded.clone(),
        dry_run,
        audiences,
        duration_ms: progress
            .started_at_ms
            .map_or(0, |started| now_ms.saturating_sub(started)),
    }
}

fn audience(field: Field, f: FieldProgress) -> AudienceReport {
    AudienceReport {
        field: Some(field),
        audience_id: f.audience_id.unwrap_or_default(),
        name: f.audience_name.unwrap_or_default(),
        with_value: f.with_value,
        missing: f.missing,
        invalid: f.invalid,
        prehashed: f.prehashed,
        duplicates: f.duplicates,
        uploaded: f.uploaded,
        meta_received: f.meta_received,
        meta_invalid: f.meta_invalid,
        shards: f.shards,
        shards_failed: f.shards_failed,
        last_error: f.last_error,
        meta_invalid_reasons: f.meta_invalid_reasons,
        approximate_count_lower_bound: f.approx_lower,
        approximate_count_upper_bound: f.approx_upper,
        lookalike: (f.lookalike_id.is_some() || f.lookalike_error.is_some()).then(|| {
            LookalikeReport {
                audience_id: f.lookalike_id,
                name: f.lookalike_name.unwrap_or_default(),
                error: f.lookalike_error,
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(done: u64, failed: u64) -> ExportProgress {
        ExportProgress {
            shards_done: done,
            shards_failed: failed,
            ..ExportProgress::default()
        }
    }

    #[test]
    fn status_follows_the_shard_counts() {
        assert_eq!(status_of(&counts(3, 0)), ExportStatus::Succeeded);
        assert_eq!(status_of(&counts(0, 0)), ExportStatus::Succeeded);
        assert_eq!(status_of(&counts(2, 1)), ExportStatus::PartiallyFailed);
        assert_eq!(status_of(&counts(0, 1)), ExportStatus::Failed);
    }

    #[test]
    fn a_field_report_carries_its_counters() {
        let f = FieldProgress {
            audience_id: Some("42".into()),
            with_value: 10,
            invalid: [("email_format".to_owned(), 2), ("empty".to_owned(), 1)].into(),
            uploaded: 7,
            meta_received: 7,
            ..FieldProgress::default()
        };
        let a = audience(Field::Email, f);
        assert_eq!(a.audience_id, "42");
        assert_eq!(a.invalid_total(), 3);
        assert_eq!(a.invalid.get("email_format"), Some(&2));
        assert_eq!(a.uploaded, 7);
    }
}
