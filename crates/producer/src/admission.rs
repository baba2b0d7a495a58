//! Admission: whether a job may run on its workspace's Facebook connection (connected, valid,
//! the ad account selected by this workspace, usable and its terms accepted, the token usable),
//! and the reason a marketer reads when it may not. Only the job's own workspace is ever looked
//! at, so a job cannot reach another workspace's connection.
//!
//! Before an export starts the connection is checked with Meta (`health_check`: the token, and
//! each selected ad account still listed and not disabled), at most once a minute per workspace;
//! an account found unusable then, or earlier by a worker or a round, refuses the job with the
//! fix (who needs access, and to select the account again).

use crate::health_check::{Checker, Health, CHECK_TTL};
use crate::plan::{Deps, PlanError};
use audience_export_core::connection::{
    ActiveToken, AdAccountStatus, ConnectionError, ConnectionView,
};
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
    if view.selected(account).is_none() {
        return Err(refused(format!(
            "ad account {act} is not selected for workspace {ws}: select it in the workspace's Facebook connection, then export again."
        )));
    }
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
    let view = checked(deps, view, &token).await?;
    let Some(selected) = view.selected(account) else {
        return Err(refused(format!(
            "ad account {act} is not selected for workspace {ws}: select it in the workspace's Facebook connection, then export again."
        )));
    };
    if let Some(mark) = &selected.unusable {
        return Err(refused(format!(
            "ad account unusable: {}. {} Then export again.",
            mark.finding(account),
            mark.fix(account, &view.grantee())
        )));
    }
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

/// The connection as it stands after a health check, when none ran within `CHECK_TTL` (a burst
/// of jobs asks Meta once). A refused token refuses the job; Meta out of reach lets it go on
/// (its calls will tell) and leaves the check to the next job.
async fn checked(
    deps: &Deps,
    view: ConnectionView,
    token: &ActiveToken,
) -> Result<ConnectionView, PlanError> {
    let ws = view.workspace_id.clone();
    let claimed = deps
        .connections
        .claim_health_check(&ws, CHECK_TTL)
        .await
        .map_err(PlanError::Connection)?;
    if !claimed {
        return Ok(view);
    }
    let checker = Checker {
        graph: &deps.graph,
        connections: &deps.connections,
        revocations: &deps.revocations,
        publisher: &deps.publisher,
        topology: &deps.topology,
    };
    let health = match checker.check(&view, token).await {
        Ok(health) => health,
        Err(e) => {
            // Tried again by the next attempt of this job.
            let _ = deps.connections.forget_health_check(&ws).await;
            return Err(e.into());
        }
    };
    match health {
        Health::Checked { changed: false } => Ok(view),
        Health::Checked { changed: true } => deps
            .connections
            .view(&ws)
            .await
            .map_err(PlanError::Connection)?
            .ok_or_else(|| refused(format!("no Facebook connection: workspace {ws} was disconnected. Connect it, then export again."))),
        Health::TokenRefused { reason } => Err(refused(reason)),
        Health::Unknown(error) => {
            warn!(message = "Meta could not be asked about the connection before the export; going on.", %error);
            deps.connections
                .forget_health_check(&ws)
                .await
                .map_err(PlanError::Connection)?;
            Ok(view)
        }
    }
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
/// one; a refused token, or the token's access to the ad account refused (creating the audience,
/// checking the account), is also reported for the whole fleet (`revocation`: the connection
/// invalid, or the account marked unusable, and whoever connected told).
pub fn refusal(job: &ExportJob, token: &ActiveToken, what: &str, e: &GraphError) -> PlanError {
    let class = e.class();
    let reason = match class {
        ErrorClass::TokenInvalid | ErrorClass::PermissionLost | ErrorClass::TermsNotAccepted => {
            e.explain(&job.ad_account_id)
        }
        _ => format!("Meta refused to {what}: {}", e.user_message()),
    };
    let reported = matches!(class, ErrorClass::TokenInvalid | ErrorClass::PermissionLost);
    let token = reported.then(|| {
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
