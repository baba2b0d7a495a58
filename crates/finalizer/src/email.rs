//! The notification email: what a marketer reads when an export ends. Plain text, per audience:
//! its id and link, and what was read, dropped (with reasons), sent and reported by Meta. Holds
//! no identifier and no token; only counts and ids.

use audience_export_core::contract::{ExportStatus, FinishedReport, WorkspaceId};
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::{AsyncTransport, Message, Tokio1Executor};
use std::fmt::Write;

/// Why an email was not sent. SMTP failures are retryable; a bad address is not.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    #[error("no valid recipient")]
    NoRecipient,
    #[error("the email could not be built: {0}")]
    Build(#[from] lettre::error::Error),
    #[error("the SMTP server refused or could not be reached: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("the sender address is invalid: {0}")]
    From(#[from] lettre::address::AddressError),
}

impl EmailError {
    /// An SMTP failure is worth retrying unless the server answered with a permanent (5xx)
    /// refusal: a relay that is down comes back, a mailbox that does not exist does not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, EmailError::Smtp(e) if !e.is_permanent())
    }
}

#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    /// A mailer for the relay at `host:port`; an SMTP exchange taking longer than `timeout`
    /// fails (and is retried later), always inside the finalization lease.
    pub fn new(
        host: &str,
        port: u16,
        from: &str,
        timeout: std::time::Duration,
    ) -> Result<Mailer, EmailError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(timeout))
            .build();
        Ok(Mailer {
            transport,
            from: from.parse()?,
        })
    }

    /// Sends a plain-text email to the recipients that parse as addresses; skips the others.
    pub async fn send_text(
        &self,
        recipients: &[String],
        subject: String,
        body: String,
    ) -> Result<(), EmailError> {
        let mut builder = Message::builder().from(self.from.clone()).subject(subject);
        let mut any = false;
        for r in recipients {
            match r.parse::<Mailbox>() {
                Ok(mailbox) => {
                    builder = builder.to(mailbox);
                    any = true;
                }
                Err(_) => tracing::warn!(
                    message = "Skipping a notification recipient that is not an address."
                ),
            }
        }
        if !any {
            return Err(EmailError::NoRecipient);
        }
        // lettre picks the transfer encoding: 7bit, or quoted-printable for the long link lines.
        let message = builder.header(ContentType::TEXT_PLAIN).body(body)?;
        self.transport.send(message).await?;
        Ok(())
    }
}

/// What a token-error subcode means, in words a marketer can act on.
pub fn token_subcode_meaning(subcode: Option<i64>) -> &'static str {
    match subcode {
        Some(458) => "the person who connected removed the app from their Facebook account",
        Some(459) => "Facebook asks the person who connected to log in to facebook.com and pass a security checkpoint",
        Some(460) => "the person who connected changed their Facebook password, or Facebook reset their session",
        Some(463) => "the token expired",
        Some(464) => "the person who connected has an unconfirmed Facebook account",
        Some(467) => "the token is no longer valid (logged out, or revoked)",
        Some(492) => "the session is invalid (the person may have lost their role in the business)",
        _ => "Meta no longer accepts the token",
    }
}

/// The email to whoever connected a workspace when Meta refuses its connection.
pub fn connection_invalid(
    workspace: &WorkspaceId,
    code: i64,
    subcode: Option<i64>,
    message: &str,
    at: &str,
) -> (String, String) {
    let subject = format!("Facebook connection of workspace {workspace} must be reconnected");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Meta refused the Facebook connection of workspace {workspace} at {at}: {}.",
        token_subcode_meaning(subcode)
    );
    let _ = writeln!(
        out,
        "Meta said: {message} (code {code}{}).",
        subcode
            .map(|s| format!(", subcode {s}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "\nExports running on this connection have stopped; each export's requester gets its own report."
    );
    let _ = writeln!(
        out,
        "New exports to Facebook from this workspace are refused until it is reconnected."
    );
    let _ = writeln!(
        out,
        "\nTo reconnect: open the workspace's Facebook integration and connect again, or set a new Business Manager system user token."
    );
    let _ = writeln!(
        out,
        "Exports refused meanwhile do not restart by themselves: export those segments again once reconnected."
    );
    (subject, out)
}

/// The email to whoever connected a workspace when its user token is about to expire.
pub fn expiry_warning(
    workspace: &WorkspaceId,
    expires_on: &str,
    days_left: i64,
) -> (String, String) {
    let subject = format!("Facebook connection of workspace {workspace} expires on {expires_on}");
    let mut out = String::new();
    if days_left > 0 {
        let _ = writeln!(
            out,
            "The Facebook connection of workspace {workspace} expires on {expires_on}, in {days_left} day(s)."
        );
    } else {
        let _ = writeln!(
            out,
            "The Facebook connection of workspace {workspace} expired on {expires_on}."
        );
    }
    let _ = writeln!(
        out,
        "After that, exports to Facebook from this workspace fail until it is reconnected."
    );
    let _ = writeln!(
        out,
        "\nTo renew it: open the workspace's Facebook integration and connect again. A Business Manager system user token does not expire this way; setting one avoids renewals."
    );
    (subject, out)
}

pub fn subject(report: &FinishedReport) -> String {
    let what = match report.status {
        ExportStatus::Succeeded => "is complete",
        ExportStatus::PartiallyFailed => "is complete, with errors",
        ExportStatus::Failed => "failed",
        ExportStatus::Rejected => "could not start",
        ExportStatus::Cancelled => "was cancelled",
    };
    let what = if report.dry_run {
        match report.status {
            ExportStatus::Succeeded => "dry run is complete".to_owned(),
            _ => format!("dry run {what}"),
        }
    } else {
        what.to_owned()
    };
    let name = if report.segment_name.is_empty() {
        report.export_id.as_str()
    } else {
        &report.segment_name
    };
    format!("Facebook audience export of \"{name}\" {what}")
}

pub fn body(r: &FinishedReport) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let account = r.ad_account_id.as_ref().map_or_else(
        || "an unknown ad account".to_owned(),
        |a| format!("ad account {}", a.act()),
    );
    let _ = writeln!(
        out,
        "Export {} of segment \"{}\" to {account}: {}.",
        r.export_id, r.segment_name, r.status
    );
    if let Some(reason) = &r.reason {
        let _ = writeln!(out, "Reason: {reason}");
    }
    if r.dry_run {
        let _ = writeln!(
            out,
            "This was a dry run: no audience was created and nothing was sent to Meta. \"Would upload\" is what a real export of this segment would send."
        );
    }
    if r.status == ExportStatus::Cancelled {
        let _ = writeln!(
            out,
            "Nothing more was sent after the cancellation; what was uploaded before it stays in the audiences below (delete them in Ads Manager if they must go)."
        );
    }
    let _ = writeln!(out, "\nMembers read: {}", r.members_read);
    if r.malformed_records > 0 {
        let _ = writeln!(out, "Lines that were not a record: {}", r.malformed_records);
    }
    let excluded: u64 = r.excluded.values().sum();
    if !r.excluded.is_empty() {
        let _ = writeln!(out, "Left out by consent: {excluded}");
        for (attribute, n) in &r.excluded {
            let _ = writeln!(out, "  {attribute}: {n}");
        }
    }
    for a in &r.audiences {
        let label = a.field.map(|f| f.label()).unwrap_or("Audience");
        if r.dry_run {
            let _ = writeln!(out, "\n{label} audience (dry run: not created)");
        } else if a.audience_id.is_empty() {
            let _ = writeln!(
                out,
                "\n{label} audience \"{}\" (not created, or Meta never confirmed its id: look for this name in Ads Manager)",
                a.name
            );
        } else {
            let _ = writeln!(
                out,
                "\n{label} audience \"{}\" (id {})",
                a.name, a.audience_id
            );
        }
        if let (false, Some(account)) = (a.audience_id.is_empty(), &r.ad_account_id) {
            let _ = writeln!(
                out,
                "  Open: https://business.facebook.com/adsmanager/audiences?act={account}&ids={}",
                a.audience_id
            );
        }
        let _ = writeln!(out, "  Members with a value: {}", a.with_value);
        let _ = writeln!(out, "  Members without one: {}", a.missing);
        let _ = writeln!(out, "  Invalid, not sent: {}", a.invalid_total());
        for (reason, n) in &a.invalid {
            let _ = writeln!(out, "    {reason}: {n}");
        }
        if a.prehashed > 0 {
            let _ = writeln!(out, "  Already hashed, passed through: {}", a.prehashed);
        }
        let _ = writeln!(out, "  Duplicates, sent once: {}", a.duplicates);
        if r.dry_run {
            let _ = writeln!(out, "  Would upload: {}", a.uploaded);
        } else {
            let _ = writeln!(out, "  Uploaded: {}", a.uploaded);
            let _ = writeln!(
                out,
                "  Meta received: {}, of which Meta found invalid: {}",
                a.meta_received, a.meta_invalid
            );
        }
        if a.shards_failed > 0 {
            let _ = writeln!(
                out,
                "  Batches failed: {} of {} ({})",
                a.shards_failed,
                a.shards,
                a.last_error.as_deref().unwrap_or("no message")
            );
        }
    }
    let _ = writeln!(
        out,
        "\nMeta matches the uploaded people within about 24 hours; it never tells who matched."
    );
    out
}
