//! The notification email: what a marketer reads when an export ends. Plain text, per audience:
//! its id and link, and what was read, dropped (with reasons), sent and reported by Meta. Holds
//! no identifier and no token; only counts and ids.

use audience_export_core::contract::{ExportStatus, FinishedReport};
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
    pub fn is_retryable(&self) -> bool {
        matches!(self, EmailError::Smtp(_))
    }
}

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    pub fn new(host: &str, port: u16, from: &str) -> Result<Mailer, EmailError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .build();
        Ok(Mailer {
            transport,
            from: from.parse()?,
        })
    }

    /// Sends the report to the recipients that parse as addresses; skips the others.
    pub async fn send(
        &self,
        recipients: &[String],
        report: &FinishedReport,
    ) -> Result<(), EmailError> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(subject(report));
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
        let message = builder.header(ContentType::TEXT_PLAIN).body(body(report))?;
        self.transport.send(message).await?;
        Ok(())
    }
}

pub fn subject(report: &FinishedReport) -> String {
    let what = match report.status {
        ExportStatus::Succeeded => "is complete",
        ExportStatus::PartiallyFailed => "is complete, with errors",
        ExportStatus::Failed => "failed",
        ExportStatus::Rejected => "could not start",
    };
    let name = if report.segment_name.is_empty() {
        &report.export_id
    } else {
        &report.segment_name
    };
    format!("Facebook audience export of \"{name}\" {what}")
}

pub fn body(r: &FinishedReport) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "Export {} of segment \"{}\" to ad account act_{}: {}.",
        r.export_id,
        r.segment_name,
        r.ad_account_id,
        r.status.as_str()
    );
    if let Some(reason) = &r.reason {
        let _ = writeln!(out, "Reason: {reason}");
    }
    let _ = writeln!(out, "\nMembers read: {}", r.members_read);
    if r.malformed_records > 0 {
        let _ = writeln!(out, "Lines that were not a record: {}", r.malformed_records);
    }
    for a in &r.audiences {
        let label = a.field.map(|f| f.label()).unwrap_or("Audience");
        let _ = writeln!(
            out,
            "\n{label} audience \"{}\" (id {})",
            a.name, a.audience_id
        );
        if !a.audience_id.is_empty() {
            let _ = writeln!(
                out,
                "  Open: https://business.facebook.com/adsmanager/audiences?act={}&ids={}",
                r.ad_account_id, a.audience_id
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
        let _ = writeln!(out, "  Uploaded: {}", a.uploaded);
        let _ = writeln!(
            out,
            "  Meta received: {}, of which Meta found invalid: {}",
            a.meta_received, a.meta_invalid
        );
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
