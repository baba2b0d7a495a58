//! The finalizer's metrics, declared in one place, with bounded labels only.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    /// Exports finished, by status.
    pub exports: IntCounterVec,
    /// Notification emails, by outcome: sent, failed, no_recipient.
    pub emails: IntCounterVec,
    /// `connection.invalidated` events received.
    pub invalidations: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let exports = IntCounterVec::new(
            Opts::new(
                "audience_export_exports_finished_total",
                "Exports finished, by status.",
            ),
            &["status"],
        )?;
        let emails = IntCounterVec::new(
            Opts::new(
                "audience_export_emails_total",
                "Notification emails, by outcome.",
            ),
            &["outcome"],
        )?;
        let invalidations = IntCounter::new(
            "audience_export_connection_invalidations_total",
            "Token rejections reported by the fleet.",
        )?;
        registry.register(Box::new(exports.clone()))?;
        registry.register(Box::new(emails.clone()))?;
        registry.register(Box::new(invalidations.clone()))?;
        Ok(Metrics {
            exports,
            emails,
            invalidations,
        })
    }
}
