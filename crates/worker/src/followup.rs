//! A complete export's follow-up, done by a worker because workers hold the tokens (the finalizer
//! never does): read back the size Meta shows for each audience, and make the lookalikes the job
//! asked for once the export succeeded. Then `followed_up` is recorded and `export.followed_up`
//! announced, and the finalizer finishes the export with what was read and made.
//!
//! Nothing here may keep an export from finishing: a size Meta will not give is left out, a
//! lookalike Meta refuses is reported with Meta's reason, and Meta failing for now is tried
//! `ATTEMPTS` times and then reported the same way. Redelivered, it does nothing twice: a
//! lookalike's name is recorded before its create call, and after an answer that may have been
//! applied the ad account's audiences are searched for it (by its description) before creating.

use crate::upload::Deps;
use audience_export_core::connection::ActiveToken;
use audience_export_core::consumer::Outcome;
use audience_export_core::contract::{Event, ExportJob, FollowUp, Lookalike};
use audience_export_core::graph::GraphError;
use audience_export_core::naming::bounded_name;
use audience_export_core::progress::{ExportProgress, ProgressError};
use audience_export_core::Field;
use std::time::Duration;
use tracing::{info, warn, Instrument};

/// Tries of one Graph call that fails for now, a second apart.
const ATTEMPTS: u32 = 3;

pub async fn handle(deps: &Deps, body: &[u8]) -> Outcome {
    let follow_up: FollowUp = match serde_json::from_slice(body) {
        Ok(f) => f,
        Err(e) => {
            return Outcome::Reject {
                reason: format!("not a follow-up message: {e}"),
            }
        }
    };
    let span = tracing::info_span!("follow_up", export_id = %follow_up.export_id);
    match follow(deps, &follow_up).instrument(span).await {
        Ok(outcome) => outcome,
        Err(error) => {
            warn!(message = "Follow-up not recorded; retrying shortly.", %error);
            Outcome::Retry
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    Publish(#[from] audience_export_core::amqp::PublishError),
    #[error(transparent)]
    Connection(#[from] audience_export_core::connection::ConnectionError),
}

async fn follow(deps: &Deps, follow_up: &FollowUp) -> Result<Outcome, FollowError> {
    let id = &follow_up.export_id;
    let Some(job) = deps
        .progress
        .job(id)
        .await?
        .and_then(|json| serde_json::from_str::<ExportJob>(&json).ok())
    else {
        warn!(message = "A follow-up of an export without a job any more; dropped.");
        return Ok(Outcome::Ack);
    };
    let progress = deps.progress.progress(id).await?;
    if !progress.followed_up {
        match deps.revocations.usable_token(&job.workspace_id).await? {
            Ok(token) => follow_with(deps, &job, &progress, &token).await?,
            Err(unusable) => {
                let reason = unusable.reason(&job.workspace_id);
                warn!(message = "The follow-up cannot call Meta; the export finishes without it.", %reason);
                if job.lookalike.is_some() && succeeded(&progress) {
                    for &field in &job.fields {
                        deps.progress.set_lookalike(id, field, Err(&reason)).await?;
                    }
                }
            }
        }
        deps.progress.mark_followed_up(id).await?;
    }
    let event = Event::ExportFollowedUp {
        export_id: id.clone(),
    };
    deps.publisher.event(&deps.topology, &event).await?;
    Ok(Outcome::Ack)
}

/// Whether the export delivered everything: only then are lookalikes made of it.
fn succeeded(p: &ExportProgress) -> bool {
    p.shards_failed == 0 && p.stop_reason.is_none() && p.plan_error.is_none()
}

async fn follow_with(
    deps: &Deps,
    job: &ExportJob,
    progress: &ExportProgress,
    token: &ActiveToken,
) -> Result<(), FollowError> {
    for &field in &job.fields {
        let f = progress.field(field);
        let Some(audience) = f.audience_id.as_deref() else {
            continue;
        };
        match retried(|| deps.graph.audience_size(&token.token, audience)).await {
            Ok((lower, upper)) => {
                deps.progress
                    .set_size(&job.export_id, field, lower, upper)
                    .await?
            }
            Err(error) => {
                warn!(message = "Meta's size of an audience could not be read.", %field, %error)
            }
        }
        if let (Some(spec), true) = (&job.lookalike, succeeded(progress)) {
            if f.lookalike_id.is_none() && f.lookalike_error.is_none() {
                let name = f.audience_name.as_deref().unwrap_or(audience);
                let made = lookalike(deps, job, token, field, audience, name, spec).await?;
                let made = made.as_deref().map_err(String::as_str);
                deps.progress
                    .set_lookalike(&job.export_id, field, made)
                    .await?;
            }
        }
    }
    Ok(())
}

/// Makes (or finds, after an answer that may have been applied) the lookalike of one audience:
/// its id, or Meta's reason in words a marketer can act on.
async fn lookalike(
    deps: &Deps,
    job: &ExportJob,
    token: &ActiveToken,
    field: Field,
    origin: &str,
    origin_name: &str,
    spec: &Lookalike,
) -> Result<Result<String, String>, FollowError> {
    let percent = spec.ratio * 100.0;
    let suffix = format!(" - Lookalike {} {percent:.0}%", spec.countries.join(","));
    let name = bounded_name(origin_name, &suffix);
    let description = format!(
        "Lookalike of audience {origin} by audience-export, export {} field {field}",
        job.export_id
    );
    let (name, first) = deps
        .progress
        .intend_lookalike(&job.export_id, field, &name)
        .await?;
    let account = &job.ad_account_id;
    let mut last: Option<GraphError> = None;
    for attempt in 0..ATTEMPTS {
        if !first || attempt > 0 {
            // An earlier try may have made it: adopt it rather than make a second.
            if let Ok(Some(id)) = deps
                .graph
                .find_audience(&token.token, account, &description)
                .await
            {
                return Ok(Ok(id));
            }
        }
        deps.budget.until_ready(account).await;
        match deps
            .graph
            .create_lookalike(&token.token, account, &name, &description, origin, spec)
            .await
        {
            Ok(id) => {
                info!(message = "Lookalike made.", %field);
                return Ok(Ok(id));
            }
            Err(e) if e.is_retryable() => {
                last = Some(e);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Ok(Err(e.explain(account))),
        }
    }
    Ok(Err(last.map_or_else(String::new, |e| {
        format!("Meta did not answer in time: {}", e.user_message())
    })))
}

/// A read that fails for now, tried again a second later, `ATTEMPTS` times in all.
async fn retried<T, F, Fut>(mut call: F) -> Result<T, GraphError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, GraphError>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}
