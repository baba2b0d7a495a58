//! Admission: whether a job may run on its workspace's Facebook connection (connected, valid,
//! the ad account selected by this workspace and its terms accepted, the token usable), and the
//! reason a marketer reads when it may not. Only the job's own workspace is ever looked at, so a
//! job cannot reach another workspace's connection.

use crate::plan::{Deps, PlanError};
use audience_export_core::connection::{ActiveToken, AdAccountStatus, ConnectionError};
use audience_export_core::contract::{AdAccountId, ExportJob};
use audience_export_core::graph::{ErrorClass, GraphError};
use audience_export_core::progress::now_ms;
use audience_export_core::revocation::{Refusal, Unusable};
use tracing::warn;

/// The workspace's token for this job, once the job passes the connection's checks.
pub async fn resolve(deps: &Deps, job: &ExportJob) -> Result<ActiveToken, PlanError> {
    let ws = &job.workspace_id;
    let account = &job.ad_account_id;
    let act = account.act();
    let stored = |e: ConnectionError| {
        if e.is_retryable() {
            PlanError::Connection(e)
        } else {
            warn!(message = "The workspace's connection cannot be read.", error = %e);
            refused(Unusable::Unreadable(e).reason(ws))
        }
    };
    let Some(view) = deps.connections.view(ws).await.map_err(stored)? else {
        return Err(refused(format!(
            "no Facebook connection: workspace {ws} has not connected Facebook. Connect it and select ad account {act}, then export again."
        )));
    };
    if let Some(invalid) = &view.invalid {
        let when = time::OffsetDateTime::from_unix_timestamp((invalid.at_ms / 1000) as i64)
            .map(|t| t.date().to_string())
            .unwrap_or_default();
        return Err(refused(format!(
            "connection invalid: Meta refused the Facebook connection of workspace {ws} on {when} (code {}{}). Reconnect Facebook, then export again.",
            invalid.code,
            invalid.subcode.map(|s| format!(", subcode {s}")).unwrap_or_default()
        )));
    }
    let Some(selected) = view.selected(account) else {
        return Err(refused(format!(
            "ad account {act} is not selected for workspace {ws}: select it in the workspace's Facebook connection, then export again."
        )));
    };
    // Refused by Meta moments ago (before the finalizer marked the connection invalid), or
    // changed since the view was read: the one usability check the workers make too.
    let token = match deps
        .revocations
        .usable_token(ws)
        .await
        .map_err(PlanError::Connection)?
    {
        Ok(token) => token,
        Err(unusable) => return Err(refused(unusable.reason(ws))),
    };
    if !selected.tos_accepted {
        // Accepted since the last check? Ask Meta rather than refuse on stale news.
        let accepted = deps.graph.tos_accepted(&token.token, account).await;
        match accepted {
            Ok(true) => {
                let status = AdAccountStatus::new(account, true, now_ms());
                deps.connections
                    .update_terms(ws, status)
                    .await
                    .map_err(stored)?;
            }
            Ok(false) => return Err(terms_not_accepted(account)),
            Err(e) => return Err(refusal(job, &token, "check the Custom Audience terms", &e)),
        }
    }
    Ok(token)
}

/// A dry run's one call to Meta: the token still works, it may read the ad account, and the
/// account's Custom Audience terms are accepted (what creating an audience would need).
pub async fn check_with_meta(
    deps: &Deps,
    job: &ExportJob,
    token: &ActiveToken,
) -> Result<(), PlanError> {
    match deps
        .graph
        .tos_accepted(&token.token, &job.ad_account_id)
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err(terms_not_accepted(&job.ad_account_id)),
        Err(e) => Err(refusal(job, token, "check the ad account", &e)),
    }
}

fn terms_not_accepted(account: &AdAccountId) -> PlanError {
    refused(format!(
        "terms not accepted: accept the Custom Audience terms for {} at {}, then export again.",
        account.act(),
        account.terms_url()
    ))
}

/// A refusal with no token refused: the reason alone.
pub fn refused(reason: String) -> PlanError {
    PlanError::Refused {
        reason,
        token: None,
    }
}

/// The reason a marketer reads when Meta refuses a call (`what`), naming the fix where there is
/// one; a refused token is also reported for the whole fleet (`revocation`).
pub fn refusal(job: &ExportJob, token: &ActiveToken, what: &str, e: &GraphError) -> PlanError {
    let class = e.class();
    let reason = match class {
        ErrorClass::TokenInvalid | ErrorClass::PermissionLost | ErrorClass::TermsNotAccepted => {
            e.explain(&job.ad_account_id)
        }
        _ => format!("Meta refused to {what}: {}", e.user_message()),
    };
    let token = (class == ErrorClass::TokenInvalid).then(|| {
        Refusal::new(
            &job.workspace_id,
            Some(&job.export_id),
            token,
            e,
            &job.ad_account_id,
        )
    });
    PlanError::Refused { reason, token }
}
