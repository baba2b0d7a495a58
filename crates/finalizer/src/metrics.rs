//! The finalizer's metrics, declared in one place, with bounded, typed labels only.

use audience_export_core::contract::ExportStatus;
use audience_export_core::telemetry::{Counters, Label};
use prometheus::{IntCounter, IntGauge, Registry};

/// Which email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailKind {
    /// An export's report, to its requesters.
    Report,
    /// A connection Meta refused, to whoever connected it.
    Invalid,
    /// A user token about to expire, to whoever connected it.
    Expiry,
}

impl Label for EmailKind {
    const ALL: &'static [EmailKind] = &[EmailKind::Report, EmailKind::Invalid, EmailKind::Expiry];
    fn as_str(self) -> &'static str {
        match self {
            EmailKind::Report => "report",
            EmailKind::Invalid => "invalid",
            EmailKind::Expiry => "expiry",
        }
    }
}

/// What became of an email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailOutcome {
    Sent,
    /// Refused for good (a bad address, a message that cannot be built): not retried.
    Failed,
    /// The SMTP server could not be reached or refused for now: retried later.
    Deferred,
    /// Nobody to send it to.
    NoRecipient,
}

impl Label for EmailOutcome {
    const ALL: &'static [EmailOutcome] = &[
        EmailOutcome::Sent,
        EmailOutcome::Failed,
        EmailOutcome::Deferred,
        EmailOutcome::NoRecipient,
    ];
    fn as_str(self) -> &'static str {
        match self {
            EmailOutcome::Sent => "sent",
            EmailOutcome::Failed => "failed",
            EmailOutcome::Deferred => "deferred",
            EmailOutcome::NoRecipient => "no_recipient",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    /// Exports finished, by status.
    pub exports: Counters<ExportStatus>,
    /// Notification emails, by kind and outcome.
    pub emails: Counters<(EmailKind, EmailOutcome)>,
    /// Connections marked invalid (once per refused token, however many reported it).
    pub invalidations: IntCounter,
    /// Connections whose user token expires within the warning window, at the last sweep.
    pub expiring: IntGauge,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let invalidations = IntCounter::new(
            "audience_export_connection_invalidations_total",
            "Connections marked invalid because Meta refused their token.",
        )?;
        let expiring = IntGauge::new(
            "audience_export_connections_expiring",
            "Connections whose user token expires within the warning window.",
        )?;
        registry.register(Box::new(invalidations.clone()))?;
        registry.register(Box::new(expiring.clone()))?;
        Ok(Metrics {
            exports: Counters::register(
                registry,
                "audience_export_exports_finished_total",
                "Exports finished, by status.",
                &["status"],
            )?,
            emails: Counters::register(
                registry,
                "audience_export_emails_total",
                "Notification emails, by kind and outcome.",
                &["kind", "outcome"],
            )?,
            invalidations,
            expiring,
        })
    }
}
