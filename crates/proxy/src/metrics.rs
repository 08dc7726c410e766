//! The proxy's Prometheus metrics, in one registry that `/metrics` serves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub client_connections: IntGauge,
    pub client_connections_accepted: IntCounter,
    pub client_connections_rejected: IntCounter,
    /// Admin API connections open now.
    pub admin_connections: IntGauge,
    /// Admin connections closed unread because `admin_max_connections`
    /// were open.
    pub admin_connections_rejected: IntCounter,
    /// Admin connections closed by `admin_header_timeout` (`phase="header"`)
    /// or `admin_idle_timeout` (`phase="idle"`).
    pub admin_connections_timed_out: IntCounterVec,
    pub auth_failures: IntCounter,
    pub auth_throttled: IntCounter,
    /// Logins of users the userlist lacks, by what `[auth] auth_query`
    /// said (`found`, `no_such_user`, `failed`); cache hits included.
    pub auth_query: IntCounterVec,
    pub backend_sessions: IntGaugeVec,
    pub backend_up: IntGaugeVec,
    pub backend_dial_errors: IntCounterVec,
    pub drain_in_progress: IntGaugeVec,
    pub rebalance_moves: IntCounter,
    pub spares_idle: IntGauge,
    pub spares_taken: IntCounter,
    pub bytes_client_to_server: IntCounter,
    pub bytes_server_to_client: IntCounter,
    pub migrations: Arc<MigrationOutcomes>,
    pub migration_duration: Histogram,
    pub migration_pause: Histogram,
    /// Sessions by what became of them in a hand-off of this process to a
    /// new one (`handed_over`, `kept`, `resumed`) or from an old one
    /// (`adopted`, `refused`).
    pub handoff_sessions: IntCounterVec,
    /// Each adopted session's pause: its safe point in the old process to
    /// forwarding in this one (new process).
    pub handoff_pause: Histogram,
    /// 1 while this process hands itself over or takes another one over.
    pub handoff_in_progress: IntGauge,
    pub migration_state_bytes: Histogram,
    /// Where a pause goes: `capture` (old backend), `connect` (target
    /// connection: a spare or a dial, concurrent with capture), `replay`.
    pub migration_phase: HistogramVec,
    /// Migrations that reused the state known from the session's previous
    /// capture or replay (the client had sent nothing since).
    pub migration_state_reused: IntCounter,
    /// 1 for the backend's current role (`primary`, `standby`, `unknown`).
    pub backend_role: IntGaugeVec,
    pub switchover_total: IntCounterVec,
    pub switchover_phase: HistogramVec,
    pub switchover_sessions_held: IntGauge,
    /// Sessions whose primary died, by what became of them (`rehomed`,
    /// `closed`).
    pub failover_sessions: IntCounterVec,
    /// Idle sessions whose state was captured and kept by the sweep.
    pub state_remembered: IntCounter,
    /// The name of every metric registered by `new` (see `metric_names`).
    names: Vec<String>,
}

/// How a migration ended, for the outcome counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationResult {
    Success,
    Recoverable,
    Fatal,
    /// The backend ended the session during the move.
    SessionEnded,
}

/// The migration outcome counters, exported together so that
/// `attempted == success + recoverable + fatal + session_ended` holds in every scrape
/// (separate counters read at different moments could disagree).
#[derive(Default)]
pub struct MigrationOutcomes {
    success: AtomicU64,
    recoverable: AtomicU64,
    fatal: AtomicU64,
    session_ended: AtomicU64,
}

impl MigrationOutcomes {
    pub fn record(&self, result: MigrationResult) {
        let c = match result {
            MigrationResult::Success => &self.success,
            MigrationResult::Recoverable => &self.recoverable,
            MigrationResult::Fatal => &self.fatal,
            MigrationResult::SessionEnded => &self.session_ended,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (success, recoverable, fatal, session_ended) read once.
    pub fn read(&self) -> (u64, u64, u64, u64) {
        (
            self.success.load(Ordering::Relaxed),
            self.recoverable.load(Ordering::Relaxed),
            self.fatal.load(Ordering::Relaxed),
            self.session_ended.load(Ordering::Relaxed),
        )
    }

    const NAMES: [(&'static str, &'static str); 5] = [
        (
            "pgferry_conn_migration_attempted_total",
            "Session migrations attempted",
        ),
        (
            "pgferry_conn_migration_success_total",
            "Session migrations that moved the session",
        ),
        (
            "pgferry_conn_migration_error_recoverable_total",
            "Session migrations that failed and left the session where it was",
        ),
        (
            "pgferry_conn_migration_error_fatal_total",
            "Session migrations that failed and closed the session",
        ),
        (
            "pgferry_conn_migration_session_ended_total",
            "Session migrations cut short because the backend ended the session itself",
        ),
    ];
}

struct MigrationCollector {
    outcomes: Arc<MigrationOutcomes>,
    descs: Vec<Desc>,
}

impl Collector for MigrationCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (s, r, f, e) = self.outcomes.read();
        let values = [s + r + f + e, s, r, f, e];
        MigrationOutcomes::NAMES
            .iter()
            .zip(values)
            .filter_map(|((name, help), v)| {
                let c = IntCounter::new(*name, *help).ok()?;
                c.inc_by(v);
                c.collect().pop()
            })
            .collect()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let bytes = IntCounterVec::new(
            Opts::new("pgferry_bytes_total", "Bytes forwarded, by direction"),
            &["direction"],
        )
        .expect("static metric definition");
        let mut m = Metrics {
            client_connections: IntGauge::new(
                "pgferry_client_connections",
                "Client connections currently open",
            )
            .expect("static metric definition"),
            client_connections_accepted: IntCounter::new(
                "pgferry_client_connections_accepted_total",
                "Client connections accepted",
            )
            .expect("static metric definition"),
            client_connections_rejected: IntCounter::new(
                "pgferry_client_connections_rejected_total",
                "Client connections refused because max_client_connections was reached",
            )
            .expect("static metric definition"),
            admin_connections: IntGauge::new(
                "pgferry_admin_connections",
                "Admin API connections currently open",
            )
            .expect("static metric definition"),
            admin_connections_rejected: IntCounter::new(
                "pgferry_admin_connections_rejected_total",
                "Admin API connections closed unread because admin_max_connections were open",
            )
            .expect("static metric definition"),
            admin_connections_timed_out: IntCounterVec::new(
                Opts::new(
                    "pgferry_admin_connections_timed_out_total",
                    "Admin API connections closed by admin_header_timeout (phase=header) \
                     or admin_idle_timeout (phase=idle)",
                ),
                &["phase"],
            )
            .expect("static metric definition"),
            auth_failures: IntCounter::new(
                "pgferry_auth_failures_total",
                "Client authentications that failed (wrong password or unknown user)",
            )
            .expect("static metric definition"),
            auth_throttled: IntCounter::new(
                "pgferry_auth_throttled_total",
                "Client authentications refused by the back-off after failed attempts from the \
                 same (client IP, user)",
            )
            .expect("static metric definition"),
            auth_query: IntCounterVec::new(
                Opts::new(
                    "pgferry_auth_query_total",
                    "Logins of users not in the userlist, by what auth_query said (found, \
                     no_such_user, failed; answers kept for auth_query_ttl included)",
                ),
                &["result"],
            )
            .expect("static metric definition"),
            backend_sessions: IntGaugeVec::new(
                Opts::new(
                    "pgferry_backend_sessions",
                    "Sessions (server connections) open per backend",
                ),
                &["backend"],
            )
            .expect("static metric definition"),
            backend_up: IntGaugeVec::new(
                Opts::new(
                    "pgferry_backend_up",
                    "1 while the backend's health check passes, 0 while it fails",
                ),
                &["backend"],
            )
            .expect("static metric definition"),
            drain_in_progress: IntGaugeVec::new(
                Opts::new(
                    "pgferry_drain_in_progress",
                    "1 while a drain of the backend is running",
                ),
                &["backend"],
            )
            .expect("static metric definition"),
            spares_idle: IntGauge::new(
                "pgferry_warm_spares_idle",
                "Warm spare server connections ready for migrations",
            )
            .expect("static metric definition"),
            spares_taken: IntCounter::new(
                "pgferry_warm_spares_taken_total",
                "Migrations that landed on a warm spare instead of dialing",
            )
            .expect("static metric definition"),
            rebalance_moves: IntCounter::new(
                "pgferry_rebalance_moves_total",
                "Sessions moved by rebalancing (API or automatic)",
            )
            .expect("static metric definition"),
            backend_dial_errors: IntCounterVec::new(
                Opts::new(
                    "pgferry_backend_dial_errors_total",
                    "Failed attempts to connect to a backend",
                ),
                &["backend"],
            )
            .expect("static metric definition"),
            bytes_client_to_server: bytes.with_label_values(&["client_to_server"]),
            bytes_server_to_client: bytes.with_label_values(&["server_to_client"]),
            migrations: Arc::new(MigrationOutcomes::default()),
            migration_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "pgferry_conn_migration_duration_seconds",
                    "Time from a transfer request to the session running on its new backend",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("static buckets")),
            )
            .expect("static metric definition"),
            migration_pause: Histogram::with_opts(
                HistogramOpts::new(
                    "pgferry_conn_migration_pause_seconds",
                    "Time a migrating session's traffic was held",
                )
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16).expect("static buckets")),
            )
            .expect("static metric definition"),
            handoff_sessions: IntCounterVec::new(
                Opts::new(
                    "pgferry_handoff_sessions_total",
                    "Sessions in a hand-off between pgferry processes, by outcome: handed_over, \
                     kept (could not be handed over now), resumed (the new process refused or \
                     died; served on here), adopted, refused",
                ),
                &["outcome"],
            )
            .expect("static metric definition"),
            handoff_pause: Histogram::with_opts(
                HistogramOpts::new(
                    "pgferry_handoff_pause_seconds",
                    "Time a session's traffic was held while it was handed over to this process \
                     (from its safe point in the old process to forwarding here)",
                )
                .buckets(prometheus::exponential_buckets(0.0001, 1.5, 24).expect("static buckets")),
            )
            .expect("static metric definition"),
            handoff_in_progress: IntGauge::new(
                "pgferry_handoff_in_progress",
                "1 while this process hands itself over to a new one or takes an old one over",
            )
            .expect("static metric definition"),
            migration_state_bytes: Histogram::with_opts(
                HistogramOpts::new(
                    "pgferry_conn_migration_state_bytes",
                    "Size of the session state captured for a migration",
                )
                .buckets(prometheus::exponential_buckets(64.0, 4.0, 10).expect("static buckets")),
            )
            .expect("static metric definition"),
            migration_phase: HistogramVec::new(
                HistogramOpts::new(
                    "pgferry_conn_migration_phase_seconds",
                    "Time spent in each phase of a migration: capture and connect run \
                     concurrently, replay after both",
                )
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16).expect("static buckets")),
                &["phase"],
            )
            .expect("static metric definition"),
            migration_state_reused: IntCounter::new(
                "pgferry_conn_migration_state_reused_total",
                "Migrations that skipped the capture query: the client had sent nothing since \
                 the session's state was last captured or replayed",
            )
            .expect("static metric definition"),
            backend_role: IntGaugeVec::new(
                Opts::new(
                    "pgferry_backend_role",
                    "1 for the backend's role as its last check saw it (primary, standby, unknown)",
                ),
                &["backend", "role"],
            )
            .expect("static metric definition"),
            switchover_total: IntCounterVec::new(
                Opts::new(
                    "pgferry_switchover_total",
                    "Planned switchovers by outcome (success, partial, aborted, failed)",
                ),
                &["outcome"],
            )
            .expect("static metric definition"),
            switchover_phase: HistogramVec::new(
                HistogramOpts::new(
                    "pgferry_switchover_phase_seconds",
                    "Time spent in each phase of a switchover: hold, fence, catch_up, promote, move",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 17).expect("static buckets")),
                &["phase"],
            )
            .expect("static metric definition"),
            switchover_sessions_held: IntGauge::new(
                "pgferry_switchover_sessions_held",
                "Sessions held at a safe point by a running switchover",
            )
            .expect("static metric definition"),
            failover_sessions: IntCounterVec::new(
                Opts::new(
                    "pgferry_failover_sessions_total",
                    "Sessions whose primary went away: rehomed on the new primary, or closed",
                ),
                &["outcome"],
            )
            .expect("static metric definition"),
            state_remembered: IntCounter::new(
                "pgferry_conn_state_remembered_total",
                "Idle sessions on clustered backends whose state was captured and kept, so they \
                 can be rehomed if their primary dies",
            )
            .expect("static metric definition"),
            registry,
            names: Vec::new(),
        };
        // Registration only fails on duplicate names, which are static here.
        let r = &m.registry;
        let mut collectors = vec![
            Box::new(m.client_connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.client_connections_accepted.clone()),
            Box::new(m.client_connections_rejected.clone()),
            Box::new(m.admin_connections.clone()),
            Box::new(m.admin_connections_rejected.clone()),
            Box::new(m.admin_connections_timed_out.clone()),
            Box::new(m.auth_failures.clone()),
            Box::new(m.auth_throttled.clone()),
            Box::new(m.auth_query.clone()),
            Box::new(m.backend_sessions.clone()),
            Box::new(m.backend_up.clone()),
            Box::new(m.backend_dial_errors.clone()),
            Box::new(m.drain_in_progress.clone()),
            Box::new(m.rebalance_moves.clone()),
            Box::new(m.spares_idle.clone()),
            Box::new(m.spares_taken.clone()),
            Box::new(bytes),
            Box::new(m.migration_duration.clone()),
            Box::new(m.migration_pause.clone()),
            Box::new(m.migration_phase.clone()),
            Box::new(m.migration_state_reused.clone()),
            Box::new(m.migration_state_bytes.clone()),
            Box::new(m.handoff_sessions.clone()),
            Box::new(m.handoff_pause.clone()),
            Box::new(m.handoff_in_progress.clone()),
            Box::new(m.backend_role.clone()),
            Box::new(m.switchover_total.clone()),
            Box::new(m.switchover_phase.clone()),
            Box::new(m.switchover_sessions_held.clone()),
            Box::new(m.failover_sessions.clone()),
            Box::new(m.state_remembered.clone()),
            Box::new(MigrationCollector {
                outcomes: m.migrations.clone(),
                descs: MigrationOutcomes::NAMES
                    .iter()
                    .filter_map(|(n, h)| {
                        Desc::new((*n).into(), (*h).into(), vec![], Default::default()).ok()
                    })
                    .collect(),
            }),
        ];
        #[cfg(target_os = "linux")]
        collectors.push(Box::new(process::ProcessCollector::new()));
        for c in collectors {
            m.names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            r.register(c).expect("unique metric names");
        }
        // Both series exist from the start, so a rate() sees the first one.
        for phase in ["header", "idle"] {
            m.admin_connections_timed_out.with_label_values(&[phase]);
        }
        for outcome in ["success", "partial", "aborted", "failed"] {
            m.switchover_total.with_label_values(&[outcome]);
        }
        for outcome in ["handed_over", "kept", "resumed", "adopted", "refused"] {
            m.handoff_sessions.with_label_values(&[outcome]);
        }
        for outcome in ["rehomed", "closed"] {
            m.failover_sessions.with_label_values(&[outcome]);
        }
        m
    }

    /// The name of every metric the proxy registers in `registry`, sorted,
    /// whether or not it has a sample yet (a labelled metric appears in
    /// `/metrics` only once one of its label sets was used). Histograms
    /// are named without their `_bucket`, `_sum` and `_count` series. The
    /// audit log's metrics (`pgferry_audit_*`) are registered by
    /// `pgferry_audit::AuditMetrics` when `[audit]` is on and are not here.
    pub fn metric_names(&self) -> Vec<String> {
        let mut names = self.names.clone();
        names.sort();
        names.dedup();
        names
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The standard `process_*` metrics (as Prometheus' client libraries name
/// them), read from `/proc/self` and `getrusage` at each scrape: open file
/// descriptors against their limit, above all, since every session holds
/// two.
#[cfg(target_os = "linux")]
mod process {
    use prometheus::core::{Collector, Desc};
    use prometheus::proto::MetricFamily;
    use prometheus::{Counter, Gauge};

    const OPEN_FDS: &str = "process_open_fds";
    const MAX_FDS: &str = "process_max_fds";
    const RESIDENT: &str = "process_resident_memory_bytes";
    const THREADS: &str = "process_threads";
    const CPU: &str = "process_cpu_seconds_total";

    const METRICS: [(&str, &str); 5] = [
        (OPEN_FDS, "Open file descriptors"),
        (
            MAX_FDS,
            "Limit on open file descriptors (the soft RLIMIT_NOFILE)",
        ),
        (RESIDENT, "Resident memory size in bytes"),
        (THREADS, "Threads of the process"),
        (CPU, "User and system CPU time spent, in seconds"),
    ];

    pub(super) struct ProcessCollector {
        descs: Vec<Desc>,
    }

    impl ProcessCollector {
        pub(super) fn new() -> Self {
            Self {
                descs: METRICS
                    .iter()
                    .filter_map(|(n, h)| {
                        Desc::new((*n).into(), (*h).into(), vec![], Default::default()).ok()
                    })
                    .collect(),
            }
        }
    }

    /// Open descriptors, without the one that reads the directory.
    fn open_fds() -> Option<f64> {
        let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
        Some(n.saturating_sub(1) as f64)
    }

    fn max_fds() -> Option<f64> {
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
        Some(soft as f64)
    }

    /// `VmRSS` (kB) and `Threads` from `/proc/self/status`.
    fn status() -> (Option<f64>, Option<f64>) {
        let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
            return (None, None);
        };
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        (field("VmRSS:").map(|kb| kb * 1024.0), field("Threads:"))
    }

    fn cpu_seconds() -> Option<f64> {
        let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).ok()?;
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        Some(secs(u.user_time()) + secs(u.system_time()))
    }

    fn gauge(name: &str, help: &str, value: Option<f64>) -> Option<MetricFamily> {
        let g = Gauge::new(name, help).ok()?;
        g.set(value?);
        g.collect().pop()
    }

    impl Collector for ProcessCollector {
        fn desc(&self) -> Vec<&Desc> {
            self.descs.iter().collect()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let (resident, threads) = status();
            let help = |name: &str| {
                METRICS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or("", |(_, h)| *h)
            };
            let mut out: Vec<MetricFamily> = [
                (OPEN_FDS, open_fds()),
                (MAX_FDS, max_fds()),
                (RESIDENT, resident),
                (THREADS, threads),
            ]
            .into_iter()
            .filter_map(|(name, value)| gauge(name, help(name), value))
            .collect();
            // A failed read leaves the series out of this scrape.
            if let Some(cpu) = cpu_seconds().and_then(|v| {
                let c = Counter::new(CPU, help(CPU)).ok()?;
                c.inc_by(v);
                c.collect().pop()
            }) {
                out.push(cpu);
            }
            out
        }
    }
}
