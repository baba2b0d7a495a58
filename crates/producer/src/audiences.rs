//! One new audience per field, created exactly once at Meta whatever fails. The name is recorded
//! first (the intent); an answer that may have been applied although it did not arrive (a
//! timeout, a 5xx, a cut connection, a crash before the id was recorded) is followed by a look
//! at the ad account's audiences for the one carrying this export's marker (its description),
//! which is adopted rather than created twice. A second planner that created one anyway adopts
//! the first recorded.

use crate::admission::refusal;
use crate::plan::{Deps, PlanError};
use audience_export_core::connection::ActiveToken;
use audience_export_core::contract::ExportJob;
use audience_export_core::graph::{ErrorClass, GraphError};
use audience_export_core::naming::bounded_name;
use audience_export_core::telemetry::backoff;
use audience_export_core::Field;
use std::time::Duration;
use tracing::{info, warn};

/// Attempts at creating one audience when Meta answers with a retryable error.
const CREATE_ATTEMPTS: u32 = 5;

/// "<segment> - Email - 2026-11-29 (<export id>)", or the job's own name with the field and the
/// export appended: unique per export, so two exports of one segment on one day never share a
/// name, and a marketer can tell them apart in Ads Manager. A long segment name is shortened
/// (with "…") so the whole stays within `naming::MAX_AUDIENCE_NAME_CHARS`; the field and the export id,
/// what makes it unique, are never cut.
pub fn audience_name(job: &ExportJob, field: Field) -> String {
    let date = time::OffsetDateTime::now_utc().date();
    match &job.audience_name {
        Some(name) => bounded_name(name, &format!(" - {} ({})", field.label(), job.export_id)),
        None => bounded_name(
            &job.segment.name,
            &format!(" - {} - {date} ({})", field.label(), job.export_id),
        ),
    }
}

/// The audience's description: what people read, and the marker this export finds its own
/// audience by (the export id and field are in no other audience's).
pub fn description(job: &ExportJob, field: Field) -> String {
    format!(
        "Exported from segment {} ({}) by audience-export, export {} field {field}",
        job.segment.name, job.segment.id, job.export_id
    )
}

/// The field's audience: the one recorded, else the one a previous attempt created (found by its
/// marker), else a new one.
pub async fn audience_for(
    deps: &Deps,
    job: &ExportJob,
    token: &ActiveToken,
    field: Field,
) -> Result<String, PlanError> {
    if let Some(id) = deps.progress.audience(&job.export_id, field).await? {
        return Ok(id);
    }
    let (name, first) = deps
        .progress
        .intend_audience(&job.export_id, field, &audience_name(job, field))
        .await?;
    let description = description(job, field);
    if !first {
        // An earlier attempt meant to create it: it may have, and died before recording it.
        if let Some(id) = find(deps, job, token, field, &description).await? {
            return adopt(deps, job, field, id, "found after an interrupted attempt").await;
        }
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = deps
            .graph
            .create_custom_audience(
                &token.token,
                &job.ad_account_id,
                &name,
                &description,
                &deps.customer_file_source,
            )
            .await;
        let error = match result {
            Ok(id) => {
                audience_export_core::crash_point("producer::audience-created");
                return adopt(deps, job, field, id, "created").await;
            }
            Err(e) => e,
        };
        let retry = error.is_retryable() && attempt < CREATE_ATTEMPTS;
        if retry || may_have_applied(&error) {
            let wait = backoff(attempt, Duration::from_millis(500), Duration::from_secs(15));
            warn!(message = "Creating the audience failed; looking for it, then retrying.", %field, class = error.class().as_str(), wait_ms = wait.as_millis() as u64, %error);
            tokio::time::sleep(wait).await;
        }
        if may_have_applied(&error) {
            if let Some(id) = find(deps, job, token, field, &description).await? {
                return adopt(deps, job, field, id, "found after an unanswered create").await;
            }
        }
        if !retry {
            if first && !may_have_applied(&error) {
                // Refused outright: nothing exists at Meta, so the export can still end as a
                // clean `rejected`. (An intent left by an earlier attempt stays: that attempt's
                // audience may exist.)
                deps.progress
                    .forget_audience_intent(&job.export_id, field)
                    .await?;
            }
            let what = format!("create the {} audience", field.label());
            return Err(refusal(job, token, &what, &error));
        }
    }
}

/// Whether Meta may have created the audience although the answer said otherwise or did not
/// arrive: a transport failure (timeout, reset) or a server error. A throttling or a refusal
/// was not applied.
fn may_have_applied(error: &GraphError) -> bool {
    match error {
        GraphError::Transport(_) => true,
        GraphError::Unexpected { status, .. } => *status == 0 || *status >= 500,
        GraphError::Meta { status, .. } => *status >= 500 || error.class() == ErrorClass::Transient,
    }
}

/// The audience carrying this export's marker, if Meta lists one.
async fn find(
    deps: &Deps,
    job: &ExportJob,
    token: &ActiveToken,
    field: Field,
    description: &str,
) -> Result<Option<String>, PlanError> {
    deps.graph
        .find_audience(&token.token, &job.ad_account_id, description)
        .await
        .map_err(|e| {
            if e.is_retryable() {
                // Planning is tried again shortly; the intent makes it look again first.
                PlanError::Lookup(e)
            } else {
                refusal(
                    job,
                    token,
                    &format!("list the {} audiences", field.label()),
                    &e,
                )
            }
        })
}

/// Records the audience unless one is recorded, and answers the one that counts.
async fn adopt(
    deps: &Deps,
    job: &ExportJob,
    field: Field,
    id: String,
    how: &'static str,
) -> Result<String, PlanError> {
    let recorded = deps
        .progress
        .set_audience(&job.export_id, field, &id)
        .await?;
    if recorded == id {
        info!(message = "Audience ready.", %field, audience_id = %id, how);
    } else {
        // Only possible if two planners ran at once despite the lease (one outlived it).
        warn!(message = "Another planner recorded this field's audience first; adopting it. The audience created here stays empty.", %field, audience_id = %recorded, orphan = %id);
    }
    Ok(recorded)
}
