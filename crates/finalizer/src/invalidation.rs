//! A workspace's token refused by Meta (`connection.invalidated`, from any worker or the
//! producer): mark the connection invalid once, however many report it; tell whoever connected
//! the workspace, once; tell the upstream platform (`connection.changed`). The exports running on
//! it stop by themselves: workers drop their remaining shards (see `worker::upload`), and each
//! finishes `failed` with the token's reason, through the usual completion path and its email.

use crate::email;
use crate::metrics::EmailKind;
use crate::{Deps, FinalizeError, Handled};
use audience_export_core::connection::Invalidated;
use audience_export_core::contract::{ConnectionStatus, Event, WorkspaceId};
use audience_export_core::progress::{now_ms, Claim};
use tracing::{info, warn};

pub struct Refusal<'a> {
    pub workspace_id: &'a WorkspaceId,
    pub token_fingerprint: &'a str,
    pub code: i64,
    pub subcode: Option<i64>,
    pub message: &'a str,
}

/// Handles one report. `Held`: a notice is held by another finalizer; retry later.
pub async fn handle(deps: &Deps, r: &Refusal<'_>) -> Result<Handled, FinalizeError> {
    let ws = r.workspace_id;
    let reason = format!(
        "token invalid: Meta refused the Facebook connection ({}). Reconnect Facebook for this workspace.",
        r.message
    );
    let at_ms = now_ms();
    match deps
        .connections
        .invalidate(ws, r.token_fingerprint, &reason, r.code, r.subcode, at_ms)
        .await?
    {
        Invalidated::Now => {
            warn!(message = "Meta refused a workspace's token; connection marked invalid.", workspace_id = %ws, code = r.code, subcode = ?r.subcode);
            deps.metrics.invalidations.inc();
        }
        Invalidated::Already => {}
        Invalidated::Stale => {
            info!(message = "A refusal of a token the workspace no longer uses; ignored.", workspace_id = %ws);
            return Ok(Handled::Done);
        }
        Invalidated::Missing => {
            info!(message = "A refusal for a workspace that is not connected; ignored.", workspace_id = %ws);
            return Ok(Handled::Done);
        }
    }
    // Read once for both notices: when it was marked (not when this, possibly repeated, report
    // arrived), and who connected the workspace.
    let view = deps.connections.view(ws).await?;
    let at_ms = view
        .as_ref()
        .and_then(|v| v.invalid.as_ref())
        .map_or(at_ms, |i| i.at_ms);
    let owner: Vec<String> = view.and_then(|v| v.connected_by).into_iter().collect();
    // Two notices, each once: the email must not go twice because the event failed after it.
    let base = format!("invalid:{}", r.token_fingerprint);
    let emailed = once(
        deps,
        ws,
        &format!("{base}:email"),
        email_owner(deps, r, &owner, at_ms),
    )
    .await?;
    let announced = once(
        deps,
        ws,
        &format!("{base}:event"),
        announce(deps, r, &reason, at_ms),
    )
    .await?;
    Ok(if emailed && announced {
        Handled::Done
    } else {
        Handled::Held
    })
}

/// Runs `action` unless it ran already for this notice. Ok(false): another finalizer holds the
/// notice; try again later. A failed action gives the notice back.
async fn once(
    deps: &Deps,
    ws: &WorkspaceId,
    what: &str,
    action: impl std::future::Future<Output = Result<(), FinalizeError>>,
) -> Result<bool, FinalizeError> {
    match deps
        .connections
        .claim_notice(ws, what, &deps.owner, deps.lease)
        .await?
    {
        Claim::Done => return Ok(true),
        Claim::Held { .. } => return Ok(false),
        Claim::Won => {}
    }
    match action.await {
        Ok(()) => {
            deps.connections.notice_sent(ws, what).await?;
            Ok(true)
        }
        Err(e) => {
            deps.connections
                .release_notice(ws, what, &deps.owner)
                .await?;
            Err(e)
        }
    }
}

async fn email_owner(
    deps: &Deps,
    r: &Refusal<'_>,
    recipients: &[String],
    at_ms: u64,
) -> Result<(), FinalizeError> {
    let ws = r.workspace_id;
    let at = time::OffsetDateTime::from_unix_timestamp((at_ms / 1000) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let email = email::connection_invalid(ws, r.code, r.subcode, r.message, &at);
    deps.notifier
        .send(EmailKind::Invalid, recipients, &email)
        .await?;
    Ok(())
}

async fn announce(
    deps: &Deps,
    r: &Refusal<'_>,
    reason: &str,
    at_ms: u64,
) -> Result<(), FinalizeError> {
    deps.publisher
        .event(
            &deps.topology,
            &Event::ConnectionChanged {
                workspace_id: r.workspace_id.clone(),
                status: ConnectionStatus::Invalid,
                reason: Some(reason.to_owned()),
                code: Some(r.code),
                subcode: r.subcode,
                at_ms,
            },
        )
        .await?;
    Ok(())
}
