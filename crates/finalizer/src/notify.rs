//! The one notification sender: every email the finalizer sends (reports, invalid connections,
//! expiry warnings) goes through `Notifier::send`, with one policy. Sent, or nobody to send it
//! to, or refused for good (a bad address): done, counted, never retried. The SMTP server down
//! or refusing for now: an error the caller retries later (a delayed event, the next sweep),
//! after giving back whatever claim it holds.

use crate::email::{Email, EmailError, Mailer};
use crate::metrics::{EmailKind, EmailOutcome, Metrics};
use tracing::{info, warn};

#[derive(Clone)]
pub struct Notifier {
    mailer: Mailer,
    metrics: Metrics,
}

/// What `send` did, when it is done with the email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    Sent,
    NoRecipient,
    /// Refused for good; logged and counted.
    Failed,
}

impl Notifier {
    pub fn new(mailer: Mailer, metrics: Metrics) -> Notifier {
        Notifier { mailer, metrics }
    }

    /// Sends one email (text and HTML, `multipart/alternative`) to the recipients that parse as
    /// addresses. `Err` only when trying again later may work.
    pub async fn send(
        &self,
        kind: EmailKind,
        recipients: &[String],
        email: &Email,
    ) -> Result<Delivered, EmailError> {
        let (outcome, result) = match self.mailer.send(recipients, email).await {
            Ok(()) => (EmailOutcome::Sent, Ok(Delivered::Sent)),
            Err(EmailError::NoRecipient) => {
                info!(message = "Nobody to send the email to.", kind = ?kind);
                (EmailOutcome::NoRecipient, Ok(Delivered::NoRecipient))
            }
            Err(e) if e.is_retryable() => {
                warn!(message = "The email could not be sent now; retrying later.", kind = ?kind, error = %e);
                (EmailOutcome::Deferred, Err(e))
            }
            Err(e) => {
                warn!(message = "The email could not be sent.", kind = ?kind, error = %e);
                (EmailOutcome::Failed, Ok(Delivered::Failed))
            }
        };
        self.metrics.emails.with((kind, outcome)).inc();
        result
    }
}
