//! The finalizer's metrics, declared in one place, with bounded labels only.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    /// Exports finished, by status.
    pub exports: IntCounterVec,
    /// Notification emails, by outcome: sent, failed, no_recipient.
    pub emails: IntCounterVec,
    /// Connections marked invalid (once per refused token, however many reported it).
    pub invalidations: IntCounter,
    /// Connection emails sent, by kind: invalid, expiry.
    pub notices: IntCounterVec,
    /// Connections whose user token expires within the warning window, at the last sweep.
    pub expiring: IntGauge,
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
            "Connections marked invalid because Meta refused their token.",
        )?;
        let notices = IntCounterVec::new(
            Opts::new(
                "audience_export_connection_notices_total",
                "Connection emails sent, by kind.",
            ),
            &["kind"],
        )?;
        let expiring = IntGauge::new(
            "audience_export_connections_expiring",
            "Connections whose user token expires within the warning window.",
        )?;
        registry.register(Box::new(notices.clone()))?;
        registry.register(Box::new(expiring.clone()))?;
        registry.register(Box::new(exports.clone()))?;
        registry.register(Box::new(emails.clone()))?;
        registry.register(Box::new(invalidations.clone()))?;
        Ok(Metrics {
            exports,
            emails,
            invalidations,
            notices,
            expiring,
        })
    }
}
