//! A selected ad account found unusable (`ad_account.unusable`, from a worker or the producer:
//! Meta refused the connection's access to it, or the health check found it gone or disabled):
//! tell whoever connected the workspace, once per loss, with what was found and the fix. The
//! account was marked on the connection by whoever found it (`revocation`); the exports that
//! met it stopped by themselves and their requesters get their own reports; new exports to it
//! are refused by the producer until it is selected again.
//!
//! The upstream platform learns of it from the same event on the events exchange (it carries the
//! workspace, the account, the kind and Meta's reason): no `connection.changed` follows, since
//! the connection itself stays valid.
//!
//! The email is an `email::Notice`, like the connection's other notices.

use crate::email::{Email, Notice, Tone};
use crate::metrics::EmailKind;
use crate::{Deps, FinalizeError, Handled};
use audience_export_core::connection::{unusable_notice, AccountUnusable};
use audience_export_core::contract::{AdAccountId, WorkspaceId};
use audience_export_core::progress::Claim;
use tracing::info;

/// One report of a loss: the event's workspace, account and `at_ms` (which names the loss).
pub struct Report<'a> {
    pub workspace_id: &'a WorkspaceId,
    pub ad_account_id: &'a AdAccountId,
    pub at_ms: u64,
}

/// Handles one report. `Held`: another finalizer holds the notice; retry later.
pub async fn handle(deps: &Deps, r: &Report<'_>) -> Result<Handled, FinalizeError> {
    let (ws, account) = (r.workspace_id, r.ad_account_id);
    let view = deps.connections.view(ws).await?;
    // Only the loss still marked is told: a selection or reconnect since lifted it (or the
    // workspace disconnected), and a report of an older loss is not news.
    let marked = view.as_ref().and_then(|v| {
        v.selected(account)
            .and_then(|s| s.unusable.clone())
            .filter(|m| m.at_ms == r.at_ms)
    });
    let (Some(view), Some(mark)) = (view, marked) else {
        info!(message = "A report of an ad account that is not marked unusable (any more); ignored.", workspace_id = %ws, ad_account = %account);
        return Ok(Handled::Done);
    };
    let what = unusable_notice(account, r.at_ms);
    match deps
        .connections
        .claim_notice(ws, &what, &deps.owner, deps.lease)
        .await?
    {
        Claim::Done => return Ok(Handled::Done),
        Claim::Held { .. } => return Ok(Handled::Held),
        Claim::Won => {}
    }
    let email = unusable_email(ws, account, &mark, &view.grantee());
    let recipients: Vec<String> = view.connected_by.into_iter().collect();
    match deps
        .notifier
        .send(EmailKind::Unusable, &recipients, &email)
        .await
    {
        Ok(delivered) => {
            info!(message = "Owner told of an unusable ad account.", workspace_id = %ws, ad_account = %account, delivered = ?delivered);
            deps.connections.notice_sent(ws, &what).await?;
            Ok(Handled::Done)
        }
        Err(e) => {
            // Given back, so the retried event sends it at once.
            deps.connections
                .release_notice(ws, &what, &deps.owner)
                .await?;
            Err(e.into())
        }
    }
}

/// The email to whoever connected `workspace` when `ad_account` became unusable: what Meta
/// said, what it means for exports, and the fix naming who needs access (`grantee`).
pub fn unusable_email(
    workspace: &WorkspaceId,
    ad_account: &AdAccountId,
    mark: &AccountUnusable,
    grantee: &str,
) -> Email {
    let act = ad_account.act();
    let at = time::OffsetDateTime::from_unix_timestamp((mark.at_ms / 1000) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    Notice {
        subject: format!("Ad account {act} can no longer be used by workspace {workspace}"),
        tone: Tone::Bad,
        headline: format!("Ad account {act} can no longer be used"),
        paragraphs: vec![
            vec![format!(
                "Workspace {workspace} can no longer export to Facebook ad account {act}: {} (found at {at}).",
                mark.finding(ad_account)
            )],
            vec![format!(
                "Exports to {act} that were running have stopped; each export's requester gets its own report. New exports to {act} are refused until it is fixed. The workspace's other ad accounts are not affected."
            )],
        ],
        fix: vec![format!("To fix it: {}", mark.fix(ad_account, grantee))],
    }
    .email()
}

#[cfg(test)]
mod tests {
    use super::*;
    use audience_export_core::connection::UnusableKind;

    fn mark(kind: UnusableKind) -> AccountUnusable {
        AccountUnusable {
            kind,
            reason: "(#200) The user does not have permission to manage ad account act_1001, or it does not exist.".into(),
            code: Some(200),
            subcode: None,
            at_ms: 1_764_000_000_000,
            token_fingerprint: "0123456789abcdef".into(),
        }
    }

    #[test]
    fn the_email_names_the_account_metas_words_and_who_needs_access() {
        let ws = WorkspaceId::parse("ws-1").unwrap();
        let account = AdAccountId::parse("1001").unwrap();
        let email = unusable_email(
            &ws,
            &account,
            &mark(UnusableKind::PermissionLost),
            "admin@example.com",
        );
        assert_eq!(
            email.subject,
            "Ad account act_1001 can no longer be used by workspace ws-1"
        );
        for part in [
            "(code 200: (#200) The user does not have permission",
            "give admin@example.com access to it",
            "select act_1001 again",
            "2025-11-24T16:00:00Z",
        ] {
            assert!(email.text.contains(part), "{part}: {}", email.text);
        }
        let mut outside = mark(UnusableKind::PermissionLost);
        outside.reason = "<script>x</script>".into();
        let html = unusable_email(&ws, &account, &outside, "a@example.com").html;
        assert!(
            html.contains("&lt;script&gt;") && !html.contains("<script>"),
            "Meta's words are escaped: {html}"
        );
        let disabled = unusable_email(&ws, &account, &mark(UnusableKind::Disabled), "x");
        assert!(disabled.text.contains("Once Meta enables act_1001 again"));
    }
}
