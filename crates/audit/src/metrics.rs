//! The audit log's Prometheus metrics, registered into the proxy's registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct AuditMetrics {
    pub events: IntCounterVec,
    pub rows_written: IntCounter,
    pub flushes: IntCounter,
    pub flush_errors: IntCounter,
    pub flush_duration: Histogram,
    pub pending_rows: IntGauge,
    pub rows_dropped: IntCounter,
    pub rows_expired: IntCounter,
}

impl AuditMetrics {
    /// Creates the metrics and registers them (registration fails only on
    /// duplicate names, which would be a programming error).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = AuditMetrics {
            events: IntCounterVec::new(
                Opts::new(
                    "pgferry_audit_events_total",
                    "Audit events recorded, by kind",
                ),
                &["kind"],
            )?,
            rows_written: IntCounter::new(
                "pgferry_audit_rows_written_total",
                "Audit rows written to the audit database",
            )?,
            flushes: IntCounter::new(
                "pgferry_audit_flushes_total",
                "Successful audit flushes (one statement per table each)",
            )?,
            flush_errors: IntCounter::new(
                "pgferry_audit_flush_errors_total",
                "Failed audit flushes",
            )?,
            flush_duration: Histogram::with_opts(HistogramOpts::new(
                "pgferry_audit_flush_duration_seconds",
                "Time to write one audit batch",
            ))?,
            pending_rows: IntGauge::new(
                "pgferry_audit_pending_rows",
                "Audit rows waiting to be written",
            )?,
            rows_dropped: IntCounter::new(
                "pgferry_audit_rows_dropped_total",
                "Audit events dropped because max_pending_rows was reached",
            )?,
            rows_expired: IntCounter::new(
                "pgferry_audit_rows_expired_total",
                "Audit rows deleted by the retention pass",
            )?,
        };
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.rows_written.clone()))?;
        registry.register(Box::new(m.flushes.clone()))?;
        registry.register(Box::new(m.flush_errors.clone()))?;
        registry.register(Box::new(m.flush_duration.clone()))?;
        registry.register(Box::new(m.pending_rows.clone()))?;
        registry.register(Box::new(m.rows_dropped.clone()))?;
        registry.register(Box::new(m.rows_expired.clone()))?;
        Ok(m)
    }
}
