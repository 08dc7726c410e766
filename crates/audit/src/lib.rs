//! Connection audit log for pgferry.
//!
//! Owns: the audit events sessions emit (connect, migrated, disconnect),
//! the batcher that merges them per connection, and the PostgreSQL sink
//! that writes each batch as one statement per table. It must never make
//! the connection path wait on the database: recording an event is a short
//! in-memory merge, and all IO happens in the batcher's own task. Memory is
//! bounded (`max_pending_rows`); past the bound events are dropped and
//! counted, or new connections are refused, never both unbounded memory
//! and silent loss.

mod batch;
mod metrics;
mod sink;

pub use batch::{AuditHandle, Batcher, ConnectInfo, HandedRow, MigrationRecord, Overflow};
pub use metrics::AuditMetrics;
pub use sink::{PgSink, SinkError, PROXY_RESTARTED};

use std::time::Duration;

/// Settings of the audit log (`[audit]` in pgferry.toml).
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// libpq-style connection string of the audit database.
    pub url: String,
    /// Schema for the tables (created if missing); `None` = `public`.
    pub schema: Option<String>,
    /// Identifies this pgferry process in every row.
    pub proxy_id: String,
    pub flush_interval: Duration,
    pub batch_size: usize,
    pub max_pending_rows: usize,
    pub on_overflow: Overflow,
    /// Deadline of the final flush at shutdown.
    pub shutdown_flush_timeout: Duration,
    /// Bound on connecting (with the DDL) and on every statement.
    pub write_timeout: Duration,
    /// Delete finished connections (and migration rows) older than this.
    pub retention: Option<Duration>,
    /// How often the retention pass runs.
    pub retention_interval: Duration,
}
