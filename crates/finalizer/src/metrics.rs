//! The finalizer's metrics, declared in one place, with bounded, typed labels only.

use audience_export_core::amqp::WorkQueue;
use audience_export_core::contract::ExportStatus;
use audience_export_core::telemetry::{Counters, Gauges, Label};
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
    /// A selected ad account the connection can no longer use, to whoever connected it.
    Unusable,
}

impl Label for EmailKind {
    const ALL: &'static [EmailKind] = &[
        EmailKind::Report,
        EmailKind::Invalid,
        EmailKind::Expiry,
        EmailKind::Unusable,
    ];
    fn as_str(self) -> &'static str {
        match self {
            EmailKind::Report => "report",
            EmailKind::Invalid => "invalid",
            EmailKind::Expiry => "expiry",
            EmailKind::Unusable => "unusable",
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
    /// Messages in each work queue's dead-letter queue, at the last sweep.
    pub dead_letters: Gauges<WorkQueue>,
    /// Exports the sweep finished, by why: stalled or past their deadline.
    pub abandoned: Counters<Abandoned>,
    /// Exports begun and not finished, at the last sweep.
    pub unfinished: IntGauge,
}

/// Why the sweep finished an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    /// No progress for `stall_after_secs`.
    Stalled,
    /// Not finished `export_deadline_secs` after it began.
    PastDeadline,
}

impl Label for Abandoned {
    const ALL: &'static [Abandoned] = &[Abandoned::Stalled, Abandoned::PastDeadline];
    fn as_str(self) -> &'static str {
        match self {
            Abandoned::Stalled => "stalled",
            Abandoned::PastDeadline => "past_deadline",
        }
    }
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
        let unfinished = IntGauge::new(
            "audience_export_exports_unfinished",
            "Exports begun and not finished, at the last sweep.",
        )?;
        registry.register(Box::new(invalidations.clone()))?;
        registry.register(Box::new(expiring.clone()))?;
        registry.register(Box::new(unfinished.clone()))?;
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
            dead_letters: Gauges::register(
                registry,
                "audience_export_dead_letters",
                "Messages in each work queue's dead-letter queue.",
                &["queue"],
            )?,
            abandoned: Counters::register(
                registry,
                "audience_export_exports_abandoned_total",
                "Exports the sweep finished because they stalled or passed their deadline.",
                &["why"],
            )?,
            unfinished,
        })
    }
}
