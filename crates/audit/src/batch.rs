//! Events in, batches out.
//!
//! Sessions call an [`AuditHandle`]: a short merge into shared in-memory
//! state under a mutex, no IO, no waiting on the database. The [`Batcher`]
//! task takes the changed rows (sorted by connection id, so concurrent
//! replicas lock rows in the same order), writes them through the sink and,
//! only once that succeeded, forgets the rows of finished connections. A
//! failed, timed-out or abandoned write keeps everything; newer events keep
//! merging meanwhile. Its first step closes the rows an earlier run of the
//! same `proxy_id` left open (see `PgSink::close_stale`).
//!
//! In a hand-off of live sessions a row moves with its session: the old
//! process gives it up (`hand_over`), the new one takes it (`adopt`), and
//! the new process's batcher writes nothing until the old one has made its
//! final flush (`Batcher::hold_writes`), so the two never write one row.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch, Notify};
use uuid::Uuid;

use crate::metrics::AuditMetrics;
use crate::sink::PgSink;
use crate::AuditSettings;

/// What to do when `max_pending_rows` is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Drop the newest events and count them.
    Drop,
    /// Refuse new client connections (SQLSTATE 53300) until the backlog
    /// is below the bound.
    RejectConnections,
}

/// A client connection as it starts (after its startup packet).
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    pub id: Uuid,
    pub at: SystemTime,
    pub client_addr: Option<IpAddr>,
    pub user: String,
    pub database: String,
    pub application_name: Option<String>,
}

/// One migration attempt of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationRecord {
    pub id: Uuid,
    pub connection_id: Uuid,
    pub from_backend: String,
    pub to_backend: Option<String>,
    pub started_at: SystemTime,
    pub duration_ms: f64,
    pub outcome: String,
    pub reason: Option<String>,
}

/// The latest full row of one connection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConnRow {
    pub id: Uuid,
    pub client_addr: Option<IpAddr>,
    pub user: String,
    pub database: String,
    pub application_name: Option<String>,
    pub backend: Option<String>,
    pub connect_time: SystemTime,
    pub disconnect_time: Option<SystemTime>,
    pub disconnect_reason: Option<String>,
    pub migrations: i32,
    pub bytes_from_client: i64,
    pub bytes_to_client: i64,
}

/// A connection's audit row on its way from the old process to the new one
/// in a hand-off (it travels in the session's state). The old process no
/// longer writes it; the new one writes it as its own from then on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandedRow {
    pub id: Uuid,
    pub client_addr: Option<IpAddr>,
    pub user: String,
    pub database: String,
    pub application_name: Option<String>,
    pub backend: Option<String>,
    pub connect_time: SystemTime,
    pub disconnect_time: Option<SystemTime>,
    pub disconnect_reason: Option<String>,
    pub migrations: i32,
    pub bytes_from_client: i64,
    pub bytes_to_client: i64,
}

impl From<ConnRow> for HandedRow {
    fn from(r: ConnRow) -> Self {
        Self {
            id: r.id,
            client_addr: r.client_addr,
            user: r.user,
            database: r.database,
            application_name: r.application_name,
            backend: r.backend,
            connect_time: r.connect_time,
            disconnect_time: r.disconnect_time,
            disconnect_reason: r.disconnect_reason,
            migrations: r.migrations,
            bytes_from_client: r.bytes_from_client,
            bytes_to_client: r.bytes_to_client,
        }
    }
}

impl From<HandedRow> for ConnRow {
    fn from(r: HandedRow) -> Self {
        Self {
            id: r.id,
            client_addr: r.client_addr,
            user: r.user,
            database: r.database,
            application_name: r.application_name,
            backend: r.backend,
            connect_time: r.connect_time,
            disconnect_time: r.disconnect_time,
            disconnect_reason: r.disconnect_reason,
            migrations: r.migrations,
            bytes_from_client: r.bytes_from_client,
            bytes_to_client: r.bytes_to_client,
        }
    }
}

/// Rows taken for one write.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub connections: Vec<ConnRow>,
    pub migrations: Vec<MigrationRecord>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.connections.len() + self.migrations.len()
    }
}

#[derive(Default)]
struct State {
    /// Connections whose row may still change (not finished, or finished
    /// but not yet written).
    live: HashMap<Uuid, ConnRow>,
    /// Connections whose row changed since it was last written.
    dirty: BTreeSet<Uuid>,
    migrations: Vec<MigrationRecord>,
    drops_unlogged: u64,
    last_drop_log: Option<Instant>,
}

impl State {
    fn held(&self) -> usize {
        self.live.len() + self.migrations.len()
    }
    fn pending(&self) -> usize {
        self.dirty.len() + self.migrations.len()
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the batcher when a full batch is pending.
    wake: Notify,
    batch_size: usize,
    max_pending_rows: usize,
    overflow: Overflow,
    metrics: AuditMetrics,
}

/// The sessions' side of the audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditHandle {
    shared: Arc<Shared>,
}

impl AuditHandle {
    pub fn new(settings: &AuditSettings, metrics: AuditMetrics) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake: Notify::new(),
                batch_size: settings.batch_size.max(1),
                max_pending_rows: settings.max_pending_rows.max(1),
                overflow: settings.on_overflow,
                metrics,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a whole-row insert or field assignment: a panic
        // elsewhere cannot leave a half-merged row behind.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// False while new connections must be refused (`reject_connections`
    /// with the backlog at its bound).
    pub fn admits_new_connection(&self) -> bool {
        self.shared.overflow != Overflow::RejectConnections
            || self.lock().held() < self.shared.max_pending_rows
    }

    fn after_change(&self, st: &State) {
        self.shared.metrics.pending_rows.set(st.pending() as i64);
        if st.pending() >= self.shared.batch_size {
            self.shared.wake.notify_one();
        }
    }

    fn drop_event(&self, st: &mut State, what: &str) {
        self.shared.metrics.rows_dropped.inc();
        st.drops_unlogged += 1;
        let due = st
            .last_drop_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            tracing::error!(
                dropped = st.drops_unlogged,
                last = what,
                max_pending_rows = self.shared.max_pending_rows,
                "audit backlog full: dropping audit events"
            );
            st.drops_unlogged = 0;
            st.last_drop_log = Some(Instant::now());
        }
    }

    pub fn connect(&self, info: ConnectInfo) {
        self.shared
            .metrics
            .events
            .with_label_values(&["connect"])
            .inc();
        let mut st = self.lock();
        if st.held() >= self.shared.max_pending_rows {
            self.drop_event(&mut st, "connect");
            return;
        }
        st.live.insert(
            info.id,
            ConnRow {
                id: info.id,
                client_addr: info.client_addr,
                user: info.user,
                database: info.database,
                application_name: info.application_name,
                backend: None,
                connect_time: info.at,
                disconnect_time: None,
                disconnect_reason: None,
                migrations: 0,
                bytes_from_client: 0,
                bytes_to_client: 0,
            },
        );
        st.dirty.insert(info.id);
        self.after_change(&st);
    }

    /// The session reached a backend.
    pub fn backend(&self, id: Uuid, backend: &str) {
        self.update(id, "backend", |row| row.backend = Some(backend.to_owned()));
    }

    /// A migration attempt ended; on success the row's backend and count
    /// change too.
    pub fn migrated(&self, record: MigrationRecord) {
        self.shared
            .metrics
            .events
            .with_label_values(&["migration"])
            .inc();
        let mut st = self.lock();
        if st.held() >= self.shared.max_pending_rows {
            self.drop_event(&mut st, "migration");
            return;
        }
        if record.outcome == "success" {
            if let Some(row) = st.live.get_mut(&record.connection_id) {
                row.backend = record.to_backend.clone();
                row.migrations += 1;
                st.dirty.insert(record.connection_id);
            }
        }
        st.migrations.push(record);
        self.after_change(&st);
    }

    /// The connection ended. Counts are the session's totals.
    pub fn disconnect(
        &self,
        id: Uuid,
        at: SystemTime,
        reason: &str,
        bytes_from_client: u64,
        bytes_to_client: u64,
    ) {
        self.shared
            .metrics
            .events
            .with_label_values(&["disconnect"])
            .inc();
        let reason = reason.to_owned();
        self.update(id, "disconnect", |row| {
            // Never before the connect (clocks can step back).
            row.disconnect_time = Some(at.max(row.connect_time));
            row.disconnect_reason = Some(reason);
            row.bytes_from_client = i64::try_from(bytes_from_client).unwrap_or(i64::MAX);
            row.bytes_to_client = i64::try_from(bytes_to_client).unwrap_or(i64::MAX);
        });
    }

    /// A login that failed: one row whose disconnect time is its connect
    /// time.
    pub fn auth_failed(&self, info: ConnectInfo) {
        let (id, at) = (info.id, info.at);
        self.connect(info);
        self.disconnect(id, at, "auth_failed", 0, 0);
    }

    /// Gives up the row of `id` for a hand-off: this process will not write
    /// it again (a write already in flight may still land; the sink never
    /// lets an open row overwrite a closed one). `None` if there is no row
    /// (its connect was dropped at the bound). Pending migration rows of
    /// the connection stay here and are written by this process. If the
    /// hand-off of the session fails, `adopt` the row back.
    pub fn hand_over(&self, id: Uuid) -> Option<HandedRow> {
        let mut st = self.lock();
        let row = st.live.remove(&id)?;
        st.dirty.remove(&id);
        self.shared.metrics.pending_rows.set(st.pending() as i64);
        Some(row.into())
    }

    /// Takes over a row handed over by another process: live and dirty, as
    /// if this process had seen the connect; later events update it as
    /// usual. It counts against `max_pending_rows` but is never dropped for
    /// it: the session exists already and must keep its row.
    pub fn adopt(&self, row: HandedRow) {
        let mut st = self.lock();
        let id = row.id;
        st.live.insert(id, row.into());
        st.dirty.insert(id);
        self.after_change(&st);
    }

    fn update(&self, id: Uuid, what: &str, f: impl FnOnce(&mut ConnRow)) {
        let mut st = self.lock();
        match st.live.get_mut(&id) {
            Some(row) => {
                f(row);
                st.dirty.insert(id);
                self.after_change(&st);
            }
            // Its connect was dropped at the bound: already counted once.
            None => tracing::debug!(%id, what, "audit event for a connection without a row"),
        }
    }

    /// Rows to write next: up to `batch_size` changed connections, in id
    /// order, and pending migration rows.
    pub(crate) fn take_batch(&self) -> Batch {
        let mut st = self.lock();
        let ids: Vec<Uuid> = st
            .dirty
            .iter()
            .take(self.shared.batch_size)
            .copied()
            .collect();
        let mut connections = Vec::with_capacity(ids.len());
        for id in ids {
            st.dirty.remove(&id);
            if let Some(row) = st.live.get(&id) {
                connections.push(row.clone());
            }
        }
        let n = st.migrations.len().min(self.shared.batch_size);
        let migrations = st.migrations.drain(..n).collect();
        Batch {
            connections,
            migrations,
        }
    }

    /// After a successful write: finished connections whose row has not
    /// changed again are forgotten.
    pub(crate) fn written(&self, batch: &Batch) {
        let mut st = self.lock();
        for row in &batch.connections {
            if row.disconnect_time.is_some() && !st.dirty.contains(&row.id) {
                st.live.remove(&row.id);
            }
        }
        self.shared.metrics.pending_rows.set(st.pending() as i64);
    }

    /// After a failed write: everything is pending again (rows may have
    /// newer values merged meanwhile, which is what will be written),
    /// except rows handed over meanwhile: no longer ours to write.
    pub(crate) fn failed(&self, batch: Batch) {
        let mut st = self.lock();
        for row in &batch.connections {
            if st.live.contains_key(&row.id) {
                st.dirty.insert(row.id);
            }
        }
        let newer = std::mem::replace(&mut st.migrations, batch.migrations);
        st.migrations.extend(newer);
        self.shared.metrics.pending_rows.set(st.pending() as i64);
    }

    pub fn pending(&self) -> usize {
        self.lock().pending()
    }

    /// Ids of the connections this process still holds a row for: every
    /// open connection, and finished ones not yet written.
    pub(crate) fn live_ids(&self) -> Vec<Uuid> {
        self.lock().live.keys().copied().collect()
    }

    /// Rows held in memory (the quantity `max_pending_rows` bounds).
    pub fn held(&self) -> usize {
        self.lock().held()
    }
}

/// The task that writes batches.
pub struct Batcher {
    handle: AuditHandle,
    sink: PgSink,
    flush_interval: Duration,
    shutdown_flush_timeout: Duration,
    retention: Option<(Duration, Duration)>,
    metrics: AuditMetrics,
    /// When this process began auditing: the disconnect time given to rows
    /// an earlier run left open.
    started: SystemTime,
    /// Whether those rows have been closed (retried each round until so),
    /// or must not be (see `pass_gate`).
    stale_closed: bool,
    /// Set by `hold_writes`: nothing is written until it resolves.
    gate: Option<oneshot::Receiver<()>>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A batch being written. Dropped without `written`/`failed` (the write
/// was abandoned: shutdown began, or the final flush's deadline passed)
/// its rows go back to pending, so they are retried or counted as not
/// written, never forgotten.
struct InFlight {
    handle: AuditHandle,
    batch: Batch,
}

impl InFlight {
    /// Ends the guard: the caller settles the batch itself.
    fn settle(mut self) -> Batch {
        std::mem::take(&mut self.batch)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.batch.len() > 0 {
            self.handle.failed(std::mem::take(&mut self.batch));
        }
    }
}

impl Batcher {
    pub fn new(
        handle: AuditHandle,
        sink: PgSink,
        settings: &AuditSettings,
        metrics: AuditMetrics,
    ) -> Self {
        Self {
            handle,
            sink,
            flush_interval: settings.flush_interval,
            shutdown_flush_timeout: settings.shutdown_flush_timeout,
            retention: settings
                .retention
                .map(|keep| (keep, settings.retention_interval)),
            metrics,
            started: SystemTime::now(),
            stale_closed: false,
            gate: None,
        }
    }

    /// The new process of a hand-off: `run` writes nothing and closes no
    /// stale rows until `until` resolves, sent or dropped (both mean the
    /// old process has made its final flush or is gone). Until then the
    /// old process may still write rows of this `proxy_id`, among them
    /// sessions it has not handed over, which `close_stale` would close.
    pub fn hold_writes(&mut self, until: oneshot::Receiver<()>) {
        self.gate = Some(until);
    }

    /// Closes stale rows at once, then flushes every `flush_interval` or
    /// when a full batch is pending, until `stop` turns true; then a final
    /// flush with a deadline. A write in progress when `stop` turns true
    /// is abandoned (its rows stay pending), so shutdown never waits on a
    /// database that does not answer longer than `shutdown_flush_timeout`.
    /// With `hold_writes`, all of this starts only once the gate opens.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        if self.pass_gate(&mut stop).await {
            self.serve(&mut stop).await;
        }
        self.final_flush().await;
    }

    /// Waits for the gate of `hold_writes`, if any. True if it opened (or
    /// there was none) before `stop`. If `stop` came first, the gate gets
    /// up to `shutdown_flush_timeout` more; if it stays shut, the final
    /// flush writes this process's rows anyway (else they are lost; the
    /// sink never lets them reopen a closed row) but closes no stale rows,
    /// which may be the old process's open sessions.
    async fn pass_gate(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let Some(mut gate) = self.gate.take() else {
            return true;
        };
        tracing::info!("audit writes held until the previous process has flushed");
        let stopped = tokio::select! {
            _ = &mut gate => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopped
            && tokio::time::timeout(self.shutdown_flush_timeout, &mut gate)
                .await
                .is_err()
        {
            tracing::warn!(
                timeout = ?self.shutdown_flush_timeout,
                "shutting down before the previous process finished its audit flush: \
                 not closing stale audit rows"
            );
            self.stale_closed = true;
            return false;
        }
        // The previous process was alive until now: rows it left open
        // (it died) were closed no earlier than this.
        self.started = SystemTime::now();
        tracing::info!("audit writes released");
        !stopped
    }

    /// The main loop of `run`, until `stop`.
    async fn serve(&mut self, stop: &mut watch::Receiver<bool>) {
        let mut backoff = Duration::ZERO;
        let mut next_expiry = tokio::time::Instant::now();
        let mut first = true;
        loop {
            if first {
                // Only the stale rows: the first batch still waits for the
                // interval, as every batch does.
                first = false;
                let closed = tokio::select! {
                    r = self.close_stale() => r,
                    _ = stop.wait_for(|s| *s) => break,
                };
                if closed.is_err() {
                    backoff = Duration::from_millis(200);
                }
                continue;
            }
            let wait = self.flush_interval.max(backoff);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.handle.shared.wake.notified(), if backoff.is_zero() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            let round = tokio::select! {
                r = self.flush_round() => r,
                _ = stop.wait_for(|s| *s) => break,
            };
            match round {
                Ok(()) => backoff = Duration::ZERO,
                Err(()) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(200), MAX_BACKOFF);
                }
            }
            if let Some((keep, every)) = self.retention {
                if backoff.is_zero() && tokio::time::Instant::now() >= next_expiry {
                    next_expiry = tokio::time::Instant::now() + every;
                    let expired = tokio::select! {
                        r = self.sink.expire(keep) => r,
                        _ = stop.wait_for(|s| *s) => break,
                    };
                    match expired {
                        Ok(Some(n)) => self.metrics.rows_expired.inc_by(n),
                        Ok(None) => tracing::debug!("another pgferry runs the audit retention"),
                        Err(e) => tracing::warn!(error = %e, "audit retention failed"),
                    }
                }
            }
        }
    }

    /// The last flush, bounded by `shutdown_flush_timeout`.
    async fn final_flush(&mut self) {
        let deadline = tokio::time::Instant::now() + self.shutdown_flush_timeout;
        let done = tokio::time::timeout_at(deadline, async {
            while self.handle.pending() > 0 {
                if self.flush_round().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
        .await;
        // The timeout dropped any write in flight, which put its rows
        // back: `pending` is everything not written.
        let left = self.handle.pending();
        if done.is_err() || left > 0 {
            tracing::error!(
                rows = left,
                timeout = ?self.shutdown_flush_timeout,
                "audit rows not written at shutdown"
            );
        } else {
            tracing::info!("audit log flushed");
        }
    }

    /// One round: close the rows an earlier run left open (until that has
    /// worked once), then write what is pending. A failure to close them
    /// makes the round a failure (so retries back off) but does not hold
    /// back the batches.
    async fn flush_round(&mut self) -> Result<(), ()> {
        let stale = if self.stale_closed {
            Ok(())
        } else {
            self.close_stale().await
        };
        let written = self.flush_pending().await;
        stale.and(written)
    }

    /// Closes the rows of this `proxy_id` an earlier run left open, except
    /// those of connections this process holds; a failure is logged and
    /// counted as a flush error.
    async fn close_stale(&mut self) -> Result<(), ()> {
        let live = self.handle.live_ids();
        match self.sink.close_stale(&live, self.started).await {
            Ok(n) => {
                self.stale_closed = true;
                if n > 0 {
                    tracing::warn!(
                        rows = n,
                        reason = crate::sink::PROXY_RESTARTED,
                        "closed audit rows left open by an earlier run of this proxy_id"
                    );
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.flush_errors.inc();
                tracing::warn!(
                    error = %e,
                    "closing audit rows left open by an earlier run failed; will retry"
                );
                Err(())
            }
        }
    }

    /// Writes what is pending: one batch, and more only while full batches
    /// are waiting (so steady traffic is written once per interval, not in
    /// a trickle of tiny statements). Stops at the first failed write.
    async fn flush_pending(&mut self) -> Result<(), ()> {
        let mut first = true;
        loop {
            if !first && self.handle.pending() < self.handle.shared.batch_size {
                return Ok(());
            }
            first = false;
            let batch = self.handle.take_batch();
            if batch.len() == 0 {
                return Ok(());
            }
            let in_flight = InFlight {
                handle: self.handle.clone(),
                batch,
            };
            let started = Instant::now();
            let result = self.sink.write(&in_flight.batch).await;
            let batch = in_flight.settle();
            match result {
                Ok(()) => {
                    self.metrics
                        .flush_duration
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.flushes.inc();
                    self.metrics.rows_written.inc_by(batch.len() as u64);
                    self.handle.written(&batch);
                }
                Err(e) => {
                    self.metrics.flush_errors.inc();
                    tracing::warn!(error = %e, rows = batch.len(), "audit flush failed; will retry");
                    self.handle.failed(batch);
                    return Err(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(max: usize, overflow: Overflow) -> AuditHandle {
        let settings = AuditSettings {
            url: String::new(),
            schema: None,
            proxy_id: "t".into(),
            flush_interval: Duration::from_secs(1),
            batch_size: 1000,
            max_pending_rows: max,
            on_overflow: overflow,
            shutdown_flush_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            retention: None,
            retention_interval: Duration::from_secs(60),
        };
        AuditHandle::new(
            &settings,
            AuditMetrics::register(&prometheus::Registry::new()).unwrap(),
        )
    }

    fn info(id: Uuid, at: SystemTime) -> ConnectInfo {
        ConnectInfo {
            id,
            at,
            client_addr: Some([127, 0, 0, 1].into()),
            user: "u".into(),
            database: "d".into(),
            application_name: None,
        }
    }

    #[test]
    fn connect_and_disconnect_in_one_batch_keep_the_connect_time() {
        let h = handle(100, Overflow::Drop);
        let id = Uuid::new_v4();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let t1 = t0 + Duration::from_secs(5);
        h.connect(info(id, t0));
        h.backend(id, "pg1");
        h.disconnect(id, t1, "client_closed", 10, 0);
        let b = h.take_batch();
        assert_eq!(b.connections.len(), 1);
        let row = &b.connections[0];
        assert_eq!(row.connect_time, t0);
        assert_eq!(row.disconnect_time, Some(t1));
        assert_eq!(row.backend.as_deref(), Some("pg1"));
        assert_eq!(
            (row.bytes_from_client, row.bytes_to_client),
            (10, 0),
            "0 stays 0"
        );
        h.written(&b);
        assert_eq!(h.held(), 0, "finished and written: forgotten");
    }

    #[test]
    fn disconnect_after_the_connect_was_written_is_an_update_of_the_full_row() {
        let h = handle(100, Overflow::Drop);
        let id = Uuid::new_v4();
        let t0 = SystemTime::now();
        h.connect(info(id, t0));
        let first = h.take_batch();
        h.written(&first);
        assert_eq!(h.pending(), 0);
        assert_eq!(h.held(), 1, "still open: kept");
        h.migrated(MigrationRecord {
            id: Uuid::new_v4(),
            connection_id: id,
            from_backend: "pg1".into(),
            to_backend: Some("pg2".into()),
            started_at: t0,
            duration_ms: 3.0,
            outcome: "success".into(),
            reason: None,
        });
        h.disconnect(id, t0 + Duration::from_secs(1), "server_closed", 1, 2);
        let b = h.take_batch();
        assert_eq!(b.migrations.len(), 1);
        let row = &b.connections[0];
        assert_eq!((row.user.as_str(), row.connect_time), ("u", t0));
        assert_eq!(row.backend.as_deref(), Some("pg2"));
        assert_eq!(row.migrations, 1);
    }

    #[test]
    fn failed_write_keeps_rows_and_newer_events_merge() {
        let h = handle(100, Overflow::Drop);
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let t0 = SystemTime::now();
        for id in &ids {
            h.connect(info(*id, t0));
        }
        let b = h.take_batch();
        let order: Vec<Uuid> = b.connections.iter().map(|r| r.id).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(order, sorted, "rows go out sorted by connection id");
        h.disconnect(ids[0], t0, "client_closed", 0, 0);
        h.failed(b);
        assert_eq!(h.pending(), 5);
        let again = h.take_batch();
        let row0 = again.connections.iter().find(|r| r.id == ids[0]).unwrap();
        assert_eq!(row0.disconnect_reason.as_deref(), Some("client_closed"));
    }

    #[test]
    fn bound_drops_or_rejects() {
        let h = handle(3, Overflow::Drop);
        for _ in 0..5 {
            h.connect(info(Uuid::new_v4(), SystemTime::now()));
        }
        assert_eq!(h.held(), 3);
        assert_eq!(h.shared.metrics.rows_dropped.get(), 2);
        assert!(h.admits_new_connection(), "drop mode never refuses");

        let r = handle(3, Overflow::RejectConnections);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            r.connect(info(*id, SystemTime::now()));
        }
        assert!(!r.admits_new_connection());
        for id in &ids {
            r.disconnect(*id, SystemTime::now(), "client_closed", 0, 0);
        }
        let b = r.take_batch();
        r.written(&b);
        assert!(r.admits_new_connection(), "accepting again below the bound");
    }

    #[test]
    fn auth_failed_is_one_row_with_equal_times() {
        let h = handle(10, Overflow::Drop);
        let id = Uuid::new_v4();
        let t = SystemTime::now();
        h.auth_failed(info(id, t));
        let b = h.take_batch();
        assert_eq!(b.connections.len(), 1);
        assert_eq!(b.connections[0].disconnect_time, Some(t));
        assert_eq!(
            b.connections[0].disconnect_reason.as_deref(),
            Some("auth_failed")
        );
    }

    #[test]
    fn an_abandoned_write_puts_its_rows_back() {
        let h = handle(10, Overflow::Drop);
        let id = Uuid::new_v4();
        h.connect(info(id, SystemTime::now()));
        let in_flight = InFlight {
            handle: h.clone(),
            batch: h.take_batch(),
        };
        assert_eq!(h.pending(), 0, "taken for writing");
        drop(in_flight);
        assert_eq!(h.pending(), 1, "abandoned: pending again");

        let settled = InFlight {
            handle: h.clone(),
            batch: h.take_batch(),
        };
        let batch = settled.settle();
        h.written(&batch);
        assert_eq!(h.pending(), 0, "settled batches are not put back");
    }

    #[test]
    fn live_ids_are_the_connections_still_held() {
        let h = handle(10, Overflow::Drop);
        let (open, done) = (Uuid::new_v4(), Uuid::new_v4());
        h.connect(info(open, SystemTime::now()));
        h.connect(info(done, SystemTime::now()));
        h.disconnect(done, SystemTime::now(), "client_closed", 0, 0);
        let mut ids = h.live_ids();
        ids.sort();
        let mut both = vec![open, done];
        both.sort();
        assert_eq!(ids, both, "finished but not written: still ours");
        let b = h.take_batch();
        h.written(&b);
        assert_eq!(h.live_ids(), vec![open]);
    }

    #[test]
    fn hand_over_gives_the_row_up() {
        let h = handle(10, Overflow::Drop);
        let (moved, stays) = (Uuid::new_v4(), Uuid::new_v4());
        let t0 = SystemTime::now();
        h.connect(info(moved, t0));
        h.connect(info(stays, t0));
        h.backend(moved, "pg1");
        let row = h.hand_over(moved).unwrap();
        assert_eq!((row.id, row.connect_time), (moved, t0));
        assert_eq!(row.backend.as_deref(), Some("pg1"));
        assert!(h.hand_over(moved).is_none(), "given up once");
        assert_eq!(h.live_ids(), vec![stays]);
        assert_eq!(h.pending(), 1);
        let b = h.take_batch();
        assert_eq!(
            b.connections.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![stays],
            "the handed-over row is not written here"
        );
        // Later events of the moved session are not ours either.
        h.disconnect(moved, SystemTime::now(), "client_closed", 1, 1);
        assert_eq!(h.pending(), 0);
    }

    #[test]
    fn a_failed_write_does_not_take_back_a_handed_over_row() {
        let h = handle(10, Overflow::Drop);
        let id = Uuid::new_v4();
        h.connect(info(id, SystemTime::now()));
        let in_flight = h.take_batch();
        assert!(h.hand_over(id).is_some());
        h.failed(in_flight);
        assert_eq!(h.pending(), 0);
        assert!(h.take_batch().connections.is_empty());
    }

    #[test]
    fn adopt_then_disconnect_is_one_row_with_the_adopted_connect_time() {
        let old = handle(10, Overflow::Drop);
        let new = handle(10, Overflow::Drop);
        let id = Uuid::new_v4();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        old.connect(info(id, t0));
        old.backend(id, "pg1");
        old.migrated(MigrationRecord {
            id: Uuid::new_v4(),
            connection_id: id,
            from_backend: "pg1".into(),
            to_backend: Some("pg2".into()),
            started_at: t0,
            duration_ms: 1.0,
            outcome: "success".into(),
            reason: None,
        });
        let written = old.take_batch();
        old.written(&written);
        let handed = old.hand_over(id).unwrap();
        assert_eq!(old.held(), 0);

        // It travels as JSON in the session's state.
        let json = serde_json::to_string(&handed).unwrap();
        let handed: HandedRow = serde_json::from_str(&json).unwrap();

        new.adopt(handed);
        assert_eq!(new.live_ids(), vec![id]);
        let t1 = t0 + Duration::from_secs(60);
        new.disconnect(id, t1, "client_closed", 123, 456);
        let b = new.take_batch();
        assert_eq!(b.connections.len(), 1);
        let row = &b.connections[0];
        assert_eq!(row.connect_time, t0, "the session's own connect time");
        assert_eq!(row.disconnect_time, Some(t1));
        assert_eq!((row.bytes_from_client, row.bytes_to_client), (123, 456));
        assert_eq!((row.backend.as_deref(), row.migrations), (Some("pg2"), 1));
        assert_eq!(row.user, "u");
        assert!(
            b.migrations.is_empty(),
            "migration rows stay with the old process"
        );
        new.written(&b);
        assert_eq!(new.held(), 0, "closed and written: forgotten");
    }

    #[test]
    fn adopt_counts_against_the_bound_but_is_never_dropped() {
        let h = handle(2, Overflow::RejectConnections);
        let rows: Vec<HandedRow> = (0..3)
            .map(|_| {
                let src = handle(10, Overflow::Drop);
                let id = Uuid::new_v4();
                src.connect(info(id, SystemTime::now()));
                src.hand_over(id).unwrap()
            })
            .collect();
        for row in rows {
            h.adopt(row);
        }
        assert_eq!(h.held(), 3, "over the bound, all adopted");
        assert_eq!(h.shared.metrics.rows_dropped.get(), 0);
        assert!(!h.admits_new_connection(), "they count against it");
    }

    /// A stand-in for the audit database that only counts connection
    /// attempts: the batcher cannot write a row or close stale ones
    /// without connecting first.
    struct FakeDb {
        listener: tokio::net::TcpListener,
        url: String,
    }

    impl FakeDb {
        async fn start() -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let url = format!("host=127.0.0.1 port={port} user=u dbname=d");
            Self { listener, url }
        }

        /// Whether the batcher connects within `within` (the connection is
        /// dropped at once: the write fails and stays pending).
        async fn contacted_within(&self, within: Duration) -> bool {
            tokio::time::timeout(within, self.listener.accept())
                .await
                .is_ok()
        }
    }

    fn batcher(h: &AuditHandle, db: &FakeDb, shutdown_flush_timeout: Duration) -> Batcher {
        let settings = AuditSettings {
            url: db.url.clone(),
            schema: None,
            proxy_id: "t".into(),
            flush_interval: Duration::from_millis(10),
            batch_size: 1000,
            max_pending_rows: 100,
            on_overflow: Overflow::Drop,
            shutdown_flush_timeout,
            write_timeout: Duration::from_millis(200),
            retention: None,
            retention_interval: Duration::from_secs(60),
        };
        let sink = PgSink::new(&db.url, None, "t", settings.write_timeout).unwrap();
        Batcher::new(
            h.clone(),
            sink,
            &settings,
            AuditMetrics::register(&prometheus::Registry::new()).unwrap(),
        )
    }

    #[tokio::test]
    async fn without_a_gate_the_batcher_goes_to_the_database_at_once() {
        let db = FakeDb::start().await;
        let h = handle(10, Overflow::Drop);
        let b = batcher(&h, &db, Duration::from_secs(1));
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(b.run(stop));
        assert!(db.contacted_within(Duration::from_secs(5)).await);
        stop_tx.send_replace(true);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_gate_holds_every_write_until_it_opens() {
        for send in [true, false] {
            let db = FakeDb::start().await;
            let h = handle(10, Overflow::Drop);
            let src = handle(10, Overflow::Drop);
            let id = Uuid::new_v4();
            src.connect(info(id, SystemTime::now()));
            h.adopt(src.hand_over(id).unwrap());
            h.connect(info(Uuid::new_v4(), SystemTime::now()));

            let mut b = batcher(&h, &db, Duration::from_secs(1));
            let (gate_tx, gate) = oneshot::channel();
            b.hold_writes(gate);
            let (stop_tx, stop) = watch::channel(false);
            let task = tokio::spawn(b.run(stop));
            assert!(
                !db.contacted_within(Duration::from_millis(400)).await,
                "no write and no close_stale while the gate is shut"
            );
            assert_eq!(h.pending(), 2, "rows wait in memory");
            if send {
                gate_tx.send(()).unwrap();
            } else {
                drop(gate_tx); // the old process died without a word
            }
            assert!(
                db.contacted_within(Duration::from_secs(5)).await,
                "writes once the gate opened (sent: {send})"
            );
            stop_tx.send_replace(true);
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn stop_before_the_gate_opens_waits_for_it_then_flushes() {
        let db = FakeDb::start().await;
        let h = handle(10, Overflow::Drop);
        h.connect(info(Uuid::new_v4(), SystemTime::now()));
        let timeout = Duration::from_millis(600);
        let mut b = batcher(&h, &db, timeout);
        let (_gate_tx, gate) = oneshot::channel();
        b.hold_writes(gate);
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(b.run(stop));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stopped = Instant::now();
        stop_tx.send_replace(true);
        assert!(
            !db.contacted_within(Duration::from_millis(400)).await,
            "still waiting for the gate"
        );
        assert!(
            db.contacted_within(Duration::from_secs(5)).await,
            "the final flush runs once the gate's wait timed out"
        );
        assert!(stopped.elapsed() >= timeout);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("run ends: the final flush has its own deadline")
            .unwrap();
        assert_eq!(h.pending(), 1, "nothing could be written: still pending");
    }

    #[tokio::test]
    async fn pass_gate_decides_what_the_final_flush_may_do() {
        let db = FakeDb::start().await;
        let h = handle(10, Overflow::Drop);
        let (stop_tx, mut stop) = watch::channel(false);
        stop_tx.send_replace(true);

        // Stop, and the gate stays shut: no stale rows closed.
        let mut b = batcher(&h, &db, Duration::from_millis(100));
        let (_gate_tx, gate) = oneshot::channel();
        b.hold_writes(gate);
        assert!(!b.pass_gate(&mut stop).await);
        assert!(b.stale_closed, "close_stale is skipped");

        // Stop, and the gate opens within the timeout: the final flush
        // may close stale rows, from the time the gate opened.
        let mut b = batcher(&h, &db, Duration::from_secs(5));
        let before = b.started;
        let (gate_tx, gate) = oneshot::channel();
        b.hold_writes(gate);
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            gate_tx.send(()).unwrap();
        });
        assert!(!b.pass_gate(&mut stop).await, "stopped: no main loop");
        opener.await.unwrap();
        assert!(!b.stale_closed);
        assert!(b.started > before);

        // No gate: straight on.
        let mut b = batcher(&h, &db, Duration::from_secs(5));
        let (_tx, mut running) = watch::channel(false);
        assert!(b.pass_gate(&mut running).await);
    }
}
