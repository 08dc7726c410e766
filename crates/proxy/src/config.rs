//! The `pgferry.toml` file: shape, defaults and validation.
//!
//! Errors name the file, the key and the reason. Relative paths inside the
//! file are resolved against the file's own directory, so a config works
//! wherever pgferry is started from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

use pgferry_wire::DEFAULT_MAX_MESSAGE_LEN;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {key}: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxySection,
    #[serde(default)]
    pub tls: Option<TlsSection>,
    pub auth: AuthSection,
    #[serde(default)]
    pub backend_tls: BackendTlsSection,
    #[serde(rename = "backend", default)]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub migration: MigrationSection,
    /// The connection audit log; off when absent.
    #[serde(default)]
    pub audit: Option<AuditSection>,
    /// Drain, rebalance and health checks.
    #[serde(default)]
    pub balancer: BalancerSection,
    /// pgferry's own login to backends (role checks, switchovers); role
    /// checks and switchovers are off without it.
    #[serde(default)]
    pub backend_admin: Option<BackendAdminSection>,
    #[serde(default)]
    pub switchover: SwitchoverSection,
    #[serde(default)]
    pub failover: FailoverSection,
    #[serde(default)]
    pub routing: RoutingSection,
    /// The SQL admin console (`psql ... pgferry`).
    #[serde(default)]
    pub admin: AdminSection,
    /// Log output.
    #[serde(default)]
    pub log: LogSection,
}

/// The SQL admin console: a client that logs in (like any client, through
/// the userlist) to `console_database` is served by pgferry itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Users allowed on the console; anyone else asking for
    /// `console_database` is refused with 28000.
    #[serde(default)]
    pub console_users: Vec<String>,
    /// The database name that means "the console" (never forwarded).
    #[serde(default = "defaults::console_database")]
    pub console_database: String,
    /// How long `PAUSE` waits for sessions to reach a safe point, when the
    /// command gives no `TIMEOUT`.
    #[serde(default = "defaults::pause_timeout", deserialize_with = "duration")]
    pub pause_timeout: Duration,
    /// The longest a pause holds sessions before they go on by themselves
    /// (PgBouncer's PAUSE has no such limit, and hangs clients forever).
    #[serde(default = "defaults::pause_limit", deserialize_with = "duration")]
    pub pause_limit: Duration,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            console_users: Vec::new(),
            console_database: defaults::console_database(),
            pause_timeout: defaults::pause_timeout(),
            pause_limit: defaults::pause_limit(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (tracing's default format).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default)]
    pub format: LogFormat,
}

/// The role pgferry logs in as for its own SQL on a backend.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendAdminSection {
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    /// Read at load (first line); instead of `password`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "defaults::health_check_database")]
    pub database: String,
}

impl std::fmt::Debug for BackendAdminSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendAdminSection")
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// How the standby becomes the primary in a planned switchover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromoteMode {
    /// `SELECT pg_promote()` on the target, as `[backend_admin]`.
    #[default]
    Sql,
    /// The operator's `promote_command`, then wait for the target to
    /// leave recovery.
    Command,
    /// Someone else promotes it; wait for it to leave recovery.
    External,
}

/// What stops writes on the old primary once every session is held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceMode {
    /// `ALTER SYSTEM SET default_transaction_read_only = on` and a reload
    /// (undone if the switchover aborts).
    #[default]
    ReadOnly,
    /// Nothing but pgferry's own hold.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverSection {
    #[serde(default)]
    pub promote: PromoteMode,
    #[serde(default)]
    pub promote_command: Option<String>,
    #[serde(default = "defaults::promote_timeout", deserialize_with = "duration")]
    pub promote_timeout: Duration,
    #[serde(default)]
    pub fence: FenceMode,
    /// Deadline of the hold for calls that give none.
    #[serde(
        default = "defaults::switchover_timeout",
        deserialize_with = "duration"
    )]
    pub default_timeout: Duration,
}

impl Default for SwitchoverSection {
    fn default() -> Self {
        Self {
            promote: PromoteMode::default(),
            promote_command: None,
            promote_timeout: defaults::promote_timeout(),
            fence: FenceMode::default(),
            default_timeout: defaults::switchover_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverSection {
    /// How long a session idle on a primary that died waits for a new
    /// primary of its cluster before it is closed.
    #[serde(default = "defaults::rehome_timeout", deserialize_with = "duration")]
    pub rehome_timeout: Duration,
    /// Sessions on clustered backends idle this long get their state
    /// captured and kept (one query each, once per idle spell), so they
    /// survive their primary's death.
    #[serde(
        default = "defaults::remember_state_after",
        deserialize_with = "duration"
    )]
    pub remember_state_after: Duration,
    #[serde(default = "defaults::remember_idle_state")]
    pub remember_idle_state: bool,
}

impl Default for FailoverSection {
    fn default() -> Self {
        Self {
            rehome_timeout: defaults::rehome_timeout(),
            remember_state_after: defaults::remember_state_after(),
            remember_idle_state: defaults::remember_idle_state(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSection {
    /// Users whose sessions go to a standby when one is up
    /// (`target_session_attrs=prefer-standby`).
    #[serde(default)]
    pub read_only_users: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerSection {
    /// Rebalance automatically this often; off when absent.
    #[serde(default, deserialize_with = "optional_duration")]
    pub rebalance_interval: Option<Duration>,
    /// A session moved by rebalancing is left where it is this long.
    #[serde(default = "defaults::cooldown", deserialize_with = "duration")]
    pub cooldown: Duration,
    /// Transfers a drain or rebalance runs at once.
    #[serde(default = "defaults::drain_concurrency")]
    pub drain_concurrency: usize,
    /// Default deadline of a drain (API calls without `timeout_ms`, and
    /// backends removed from the config file).
    #[serde(default = "defaults::drain_timeout", deserialize_with = "duration")]
    pub drain_timeout: Duration,
    #[serde(
        default = "defaults::health_check_interval",
        deserialize_with = "duration"
    )]
    pub health_check_interval: Duration,
    #[serde(
        default = "defaults::health_check_timeout",
        deserialize_with = "duration"
    )]
    pub health_check_timeout: Duration,
    /// Failed checks in a row that make a backend unhealthy.
    #[serde(default = "defaults::unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that make it healthy again.
    #[serde(default = "defaults::healthy_threshold")]
    pub healthy_threshold: u32,
    /// User and database named in the probe's StartupMessage; the probe
    /// hangs up before authenticating, so neither needs to exist.
    #[serde(default = "defaults::health_check_user")]
    pub health_check_user: String,
    #[serde(default = "defaults::health_check_database")]
    pub health_check_database: String,
}

impl Default for BalancerSection {
    fn default() -> Self {
        Self {
            rebalance_interval: None,
            cooldown: defaults::cooldown(),
            drain_concurrency: defaults::drain_concurrency(),
            drain_timeout: defaults::drain_timeout(),
            health_check_interval: defaults::health_check_interval(),
            health_check_timeout: defaults::health_check_timeout(),
            unhealthy_threshold: defaults::unhealthy_threshold(),
            healthy_threshold: defaults::healthy_threshold(),
            health_check_user: defaults::health_check_user(),
            health_check_database: defaults::health_check_database(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnOverflow {
    #[default]
    Drop,
    RejectConnections,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Connection string of the audit database (libpq URL or key=value).
    pub url: String,
    /// Schema for the audit tables (created if missing); default `public`.
    #[serde(default)]
    pub schema: Option<String>,
    /// Names this pgferry process in every row; default: host name and
    /// listen address.
    #[serde(default)]
    pub proxy_id: Option<String>,
    #[serde(default = "defaults::flush_interval", deserialize_with = "duration")]
    pub flush_interval: Duration,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    #[serde(default = "defaults::max_pending_rows")]
    pub max_pending_rows: usize,
    #[serde(default)]
    pub on_overflow: OnOverflow,
    /// Deadline of the final flush on SIGTERM/SIGINT.
    #[serde(
        default = "defaults::shutdown_flush_timeout",
        deserialize_with = "duration"
    )]
    pub shutdown_flush_timeout: Duration,
    /// Bound on connecting to the audit database and on every statement
    /// there: a server that accepts but never answers becomes a counted,
    /// retried flush error instead of a hang.
    #[serde(
        default = "defaults::audit_write_timeout",
        deserialize_with = "duration"
    )]
    pub write_timeout: Duration,
    /// Delete finished rows older than this (e.g. "30d"); keep all when
    /// absent.
    #[serde(default, deserialize_with = "optional_duration")]
    pub retention: Option<Duration>,
    /// How often the retention pass runs.
    #[serde(
        default = "defaults::retention_interval",
        deserialize_with = "duration"
    )]
    pub retention_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSection {
    /// Custom settings (placeholders such as `app.tenant`) to carry on
    /// every migration, in addition to those seen in `SET`/`set_config`.
    #[serde(default)]
    pub carry_settings: Vec<String>,
    /// Authenticated server connections kept ready per (backend, client
    /// startup parameters) for migrations to land on; 0 = dial on demand.
    #[serde(default)]
    pub warm_spares: usize,
    /// How long a move waits for the capture query's answer. A later answer
    /// abandons the move (recoverable): the session stays where it is once
    /// the slow backend has answered.
    #[serde(default = "defaults::capture_timeout", deserialize_with = "duration")]
    pub capture_timeout: Duration,
}

impl Default for MigrationSection {
    fn default() -> Self {
        Self {
            carry_settings: Vec::new(),
            warm_spares: 0,
            capture_timeout: defaults::capture_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    pub listen: SocketAddr,
    /// HTTP admin API (`/healthz`, `/metrics`); off when absent.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    #[serde(default = "defaults::max_client_connections")]
    pub max_client_connections: usize,
    /// Sessions run on this many threads of their own, each a
    /// single-threaded runtime a session never leaves (accepted
    /// connections are dealt out in turn); 0 (the default): on the
    /// process's shared multi-threaded runtime, with work stealing.
    /// docs/performance.md compares the two.
    #[serde(default)]
    pub session_threads: usize,
    /// Deadline for a client to finish TLS, startup and authentication.
    #[serde(default = "defaults::startup_timeout", deserialize_with = "duration")]
    pub startup_timeout: Duration,
    /// Deadline for dialing and authenticating to a backend.
    #[serde(default = "defaults::connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Largest message accepted from a client or a backend, in bytes.
    #[serde(default = "defaults::max_message_length")]
    pub max_message_length: u32,
    /// TCP keepalive idle time on client and backend sockets.
    #[serde(default = "defaults::tcp_keepalive", deserialize_with = "duration")]
    pub tcp_keepalive: Duration,
    /// When set, every `/v1` admin route needs `Authorization: Bearer <token>`.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// How long SIGTERM/SIGINT lets sessions finish before closing them.
    #[serde(default = "defaults::shutdown_timeout", deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// Accept queue of `listen`; absent: derived from
    /// `max_client_connections` (see `listener::Backlog`).
    #[serde(default)]
    pub listen_backlog: Option<u32>,
    /// Time an admin connection has to send a complete request header,
    /// from its accept or from the first byte of a later request.
    #[serde(
        default = "defaults::admin_header_timeout",
        deserialize_with = "duration"
    )]
    pub admin_header_timeout: Duration,
    /// Time a kept-alive admin connection may wait for its next request.
    #[serde(
        default = "defaults::admin_idle_timeout",
        deserialize_with = "duration"
    )]
    pub admin_idle_timeout: Duration,
    /// Admin connections open at once; further ones are closed unread.
    #[serde(default = "defaults::admin_max_connections")]
    pub admin_max_connections: usize,
    /// The newest protocol version offered to clients and asked of
    /// backends. "3.2" only when every backend speaks it (PostgreSQL 18+).
    #[serde(default)]
    pub max_protocol: MaxProtocol,
    /// Unix socket on which a running pgferry waits for a new process to
    /// take it over (`pgferry run --takeover`). `Config::load` defaults it
    /// to `<config file stem>.handoff.sock` beside the config; "" turns
    /// it off.
    #[serde(default)]
    pub handoff_socket: Option<PathBuf>,
    /// Sessions being handed over to a new process at once.
    #[serde(default = "defaults::handoff_window")]
    pub handoff_window: usize,
    /// How long one ask waits for a session's safe point during a
    /// hand-off; sessions not there yet are asked again in the next round.
    #[serde(default = "defaults::handoff_timeout", deserialize_with = "duration")]
    pub handoff_timeout: Duration,
}

/// `[proxy] max_protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum MaxProtocol {
    /// Every PostgreSQL version speaks it; the default until the backends
    /// are known to speak 3.2.
    #[default]
    #[serde(rename = "3.0")]
    V3_0,
    /// PostgreSQL 18's version: cancel keys of up to 256 bytes.
    #[serde(rename = "3.2")]
    V3_2,
}

impl MaxProtocol {
    /// The minor version a session speaks when its client asks for
    /// `requested`: 3.2 if both allow it, else 3.0 (3.1 was never used).
    pub fn session_minor(self, requested: u16) -> u16 {
        match self {
            MaxProtocol::V3_2 if requested >= 2 => 2,
            _ => 0,
        }
    }
}

/// Largest `admin_max_connections`: its semaphore is waited on as a whole
/// (`u32` permits) at shutdown, and more makes no sense for an admin API.
pub const MAX_ADMIN_CONNECTIONS: usize = 100_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Refuse clients that do not ask for TLS (SQLSTATE 28000).
    #[serde(default)]
    pub require: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// PgBouncer-format userlist: `"user" "password-or-SCRAM-verifier"`.
    pub userlist: PathBuf,
    /// 32 random bytes (64 hex digits) keying user salts and mock verifiers; created (mode
    /// 0600) when absent, so salts stay the same across restarts.
    #[serde(default = "defaults::secret_file")]
    pub secret_file: PathBuf,
    /// Iteration count of plaintext entries and of unknown users' mock verifiers; by default
    /// the userlist's most common verifier count (4096 without verifiers).
    #[serde(default)]
    pub scram_iterations: Option<u32>,
    /// Back-off per (client IP, user) after failed authentications.
    #[serde(default = "defaults::throttle")]
    pub throttle: bool,
    #[serde(default = "defaults::throttle_initial", deserialize_with = "duration")]
    pub throttle_initial: Duration,
    #[serde(default = "defaults::throttle_max", deserialize_with = "duration")]
    pub throttle_max: Duration,
    /// (IP, user) pairs remembered at most; the one closest to expiry goes first.
    #[serde(default = "defaults::throttle_max_entries")]
    pub throttle_max_entries: usize,
    /// PgBouncer's auth_user: a userlist user pgferry logs in as to look up
    /// users the userlist does not have (`auth_query`); off when absent.
    #[serde(default)]
    pub auth_user: Option<String>,
    /// Returns (name, SCRAM verifier) for `$1`; a SECURITY DEFINER
    /// function works too.
    #[serde(default = "defaults::auth_query")]
    pub auth_query: String,
    /// The database `auth_query` runs in.
    #[serde(default = "defaults::auth_dbname")]
    pub auth_dbname: String,
    /// How long a looked-up verifier (or "no such user") is reused.
    #[serde(default = "defaults::auth_query_ttl", deserialize_with = "duration")]
    pub auth_query_ttl: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTlsMode {
    #[default]
    Disable,
    /// Encrypt, do not verify the certificate (like libpq's sslmode=require).
    Require,
    /// Encrypt, verify the chain against `ca` and the host name.
    VerifyFull,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsSection {
    #[serde(default)]
    pub mode: BackendTlsMode,
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    /// `host:port`; the host is also the name checked under verify-full.
    pub address: String,
    /// Backends of one cluster are a primary and its streaming standbys.
    #[serde(default)]
    pub cluster: Option<String>,
    /// `auto` (detected at the first login), `postgres` or `cockroachdb`.
    #[serde(default)]
    pub dialect: crate::backend::dialect::DialectSetting,
}

mod defaults {
    use std::time::Duration;
    pub fn console_database() -> String {
        "pgferry".into()
    }
    pub fn pause_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn pause_limit() -> Duration {
        Duration::from_secs(60)
    }
    pub fn auth_query() -> String {
        "SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into()
    }
    pub fn auth_dbname() -> String {
        "postgres".into()
    }
    pub fn auth_query_ttl() -> Duration {
        Duration::from_secs(60)
    }
    pub fn secret_file() -> std::path::PathBuf {
        "pgferry.secret".into()
    }
    pub fn throttle() -> bool {
        true
    }
    pub fn throttle_initial() -> Duration {
        Duration::from_secs(1)
    }
    pub fn throttle_max() -> Duration {
        Duration::from_secs(60)
    }
    pub fn throttle_max_entries() -> usize {
        100_000
    }
    pub fn max_client_connections() -> usize {
        10_000
    }
    pub fn startup_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn capture_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_message_length() -> u32 {
        super::DEFAULT_MAX_MESSAGE_LEN
    }
    pub fn tcp_keepalive() -> Duration {
        Duration::from_secs(60)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn handoff_window() -> usize {
        // benches/handoff.rs: 1 and 2 keep an idle session's pause p99 near
        // 1 ms for 1,000 sessions at about the same total time as 4 or 16,
        // which queue sessions behind each other (docs/performance.md).
        2
    }
    pub fn handoff_timeout() -> Duration {
        Duration::from_millis(250)
    }
    pub fn admin_header_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn admin_idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn admin_max_connections() -> usize {
        64
    }
    pub fn flush_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn batch_size() -> usize {
        1000
    }
    pub fn max_pending_rows() -> usize {
        1_000_000
    }
    pub fn shutdown_flush_timeout() -> Duration {
        Duration::from_secs(15)
    }
    pub fn audit_write_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn retention_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn cooldown() -> Duration {
        Duration::from_secs(60)
    }
    pub fn drain_concurrency() -> usize {
        32
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn health_check_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_check_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn unhealthy_threshold() -> u32 {
        3
    }
    pub fn healthy_threshold() -> u32 {
        2
    }
    pub fn health_check_user() -> String {
        "pgferry_health".into()
    }
    pub fn health_check_database() -> String {
        "postgres".into()
    }
    pub fn promote_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn switchover_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn rehome_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn remember_state_after() -> Duration {
        Duration::from_secs(2)
    }
    pub fn remember_idle_state() -> bool {
        true
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like \"10s\": {e}")))
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::parse(&text, &path.display().to_string(), base)?;
        config.proxy.handoff_socket = match config.proxy.handoff_socket.take() {
            // Beside the config: each config file its own socket.
            None => path
                .file_stem()
                .map(|stem| base.join(format!("{}.handoff.sock", stem.to_string_lossy()))),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p),
        };
        Ok(config)
    }

    /// Parses and validates; `origin` names the file in errors, `base` is
    /// where relative paths point from.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            file: origin.to_owned(),
            key,
            reason,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| invalid("(syntax)".into(), one_line(&e.to_string())))?;
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            invalid(
                if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                one_line(&e.into_inner().to_string()),
            )
        })?;
        cfg.resolve_paths(base);
        cfg.read_secrets().map_err(|(k, r)| invalid(k, r))?;
        cfg.validate().map_err(|(k, r)| invalid(k, r))?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.auth.userlist);
        fix(&mut self.auth.secret_file);
        if let Some(p) = self
            .proxy
            .handoff_socket
            .as_mut()
            .filter(|p| !p.as_os_str().is_empty())
        {
            fix(p);
        }
        if let Some(tls) = &mut self.tls {
            fix(&mut tls.cert);
            fix(&mut tls.key);
        }
        if let Some(ca) = &mut self.backend_tls.ca {
            fix(ca);
        }
        if let Some(f) = self
            .backend_admin
            .as_mut()
            .and_then(|a| a.password_file.as_mut())
        {
            fix(f);
        }
    }

    /// Reads `[backend_admin] password_file` into `password`.
    fn read_secrets(&mut self) -> Result<(), (String, String)> {
        let Some(a) = &mut self.backend_admin else {
            return Ok(());
        };
        match (&a.password, &a.password_file) {
            (Some(_), Some(_)) => Err((
                "backend_admin".into(),
                "give password or password_file, not both".into(),
            )),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f).map_err(|e| {
                    (
                        "backend_admin.password_file".into(),
                        format!("cannot read {}: {e}", f.display()),
                    )
                })?;
                a.password = Some(text.lines().next().unwrap_or("").to_owned());
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if self.backends.is_empty() {
            return Err((
                "backend".into(),
                "at least one [[backend]] is required".into(),
            ));
        }
        for (i, b) in self.backends.iter().enumerate() {
            if b.name.is_empty() {
                return Err((format!("backend[{i}].name"), "must not be empty".into()));
            }
            if self.backends[..i].iter().any(|o| o.name == b.name) {
                return Err((
                    format!("backend[{i}].name"),
                    format!("duplicate backend name {:?}", b.name),
                ));
            }
            split_host_port(&b.address).map_err(|r| (format!("backend[{i}].address"), r))?;
            if b.cluster.as_deref().is_some_and(|c| c.is_empty()) {
                return Err((format!("backend[{i}].cluster"), "must not be empty".into()));
            }
        }
        if let Some(a) = &self.backend_admin {
            if a.user.is_empty() {
                return Err(("backend_admin.user".into(), "must not be empty".into()));
            }
            if a.password.is_none() {
                return Err((
                    "backend_admin".into(),
                    "give password or password_file (password = \"\" for a server that asks none)"
                        .into(),
                ));
            }
        }
        let s = &self.switchover;
        if s.promote == PromoteMode::Command
            && s.promote_command
                .as_deref()
                .is_none_or(|c| c.trim().is_empty())
        {
            return Err((
                "switchover.promote_command".into(),
                "promote = \"command\" needs a promote_command".into(),
            ));
        }
        for (key, d) in [
            ("switchover.promote_timeout", s.promote_timeout),
            ("switchover.default_timeout", s.default_timeout),
            ("failover.rehome_timeout", self.failover.rehome_timeout),
            (
                "failover.remember_state_after",
                self.failover.remember_state_after,
            ),
        ] {
            if d.is_zero() {
                return Err((key.into(), "must be more than 0".into()));
            }
        }
        if self.proxy.max_client_connections == 0 {
            return Err((
                "proxy.max_client_connections".into(),
                "must be at least 1".into(),
            ));
        }
        if self.proxy.listen_backlog == Some(0) {
            return Err((
                "proxy.listen_backlog".into(),
                "must be at least 1 (leave it out for the default)".into(),
            ));
        }
        if !(1..=MAX_ADMIN_CONNECTIONS).contains(&self.proxy.admin_max_connections) {
            return Err((
                "proxy.admin_max_connections".into(),
                format!("must be from 1 to {MAX_ADMIN_CONNECTIONS}"),
            ));
        }
        for (key, d) in [
            (
                "proxy.admin_header_timeout",
                self.proxy.admin_header_timeout,
            ),
            ("proxy.admin_idle_timeout", self.proxy.admin_idle_timeout),
        ] {
            if d.is_zero() {
                return Err((key.into(), "must be more than 0".into()));
            }
        }
        if self.proxy.max_message_length < 1024 {
            return Err((
                "proxy.max_message_length".into(),
                "must be at least 1024 bytes".into(),
            ));
        }
        if self.migration.warm_spares > 64 {
            return Err((
                "migration.warm_spares".into(),
                "at most 64 per backend and client parameter set".into(),
            ));
        }
        for (i, name) in self.migration.carry_settings.iter().enumerate() {
            let ok = name.contains('.')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !ok {
                return Err((
                    format!("migration.carry_settings[{i}]"),
                    format!("{name:?} is not a custom setting name like \"app.tenant\""),
                ));
            }
        }
        if let Some(a) = &self.audit {
            if a.batch_size == 0 || a.max_pending_rows == 0 {
                return Err((
                    "audit".into(),
                    "batch_size and max_pending_rows must be at least 1".into(),
                ));
            }
            if a.flush_interval.is_zero() {
                return Err(("audit.flush_interval".into(), "must be more than 0".into()));
            }
            if a.write_timeout.is_zero() {
                return Err(("audit.write_timeout".into(), "must be more than 0".into()));
            }
        }
        let a = &self.auth;
        if a.scram_iterations == Some(0) {
            return Err(("auth.scram_iterations".into(), "must be at least 1".into()));
        }
        if a.throttle_initial.is_zero() {
            return Err(("auth.throttle_initial".into(), "must be more than 0".into()));
        }
        if a.throttle_max < a.throttle_initial {
            return Err((
                "auth.throttle_max".into(),
                "must be at least throttle_initial".into(),
            ));
        }
        if a.throttle_max_entries == 0 {
            return Err((
                "auth.throttle_max_entries".into(),
                "must be at least 1".into(),
            ));
        }
        // (That auth_user has a password in the userlist is checked where
        // the userlist is loaded: client::auth_query.)
        if a.auth_user.as_deref().is_some_and(str::is_empty) {
            return Err(("auth.auth_user".into(), "must not be empty".into()));
        }
        if a.auth_user.is_some() {
            if !a.auth_query.contains("$1") {
                return Err((
                    "auth.auth_query".into(),
                    "must take the user name as $1".into(),
                ));
            }
            if a.auth_dbname.is_empty() {
                return Err(("auth.auth_dbname".into(), "must not be empty".into()));
            }
        }
        let b = &self.balancer;
        if b.drain_concurrency == 0 {
            return Err((
                "balancer.drain_concurrency".into(),
                "must be at least 1".into(),
            ));
        }
        for (key, d) in [
            ("balancer.health_check_interval", b.health_check_interval),
            ("balancer.health_check_timeout", b.health_check_timeout),
            ("balancer.drain_timeout", b.drain_timeout),
        ] {
            if d.is_zero() {
                return Err((key.into(), "must be more than 0".into()));
            }
        }
        if b.rebalance_interval.is_some_and(|d| d.is_zero()) {
            return Err((
                "balancer.rebalance_interval".into(),
                "must be more than 0 (leave it out to turn rebalancing off)".into(),
            ));
        }
        if b.unhealthy_threshold == 0 || b.healthy_threshold == 0 {
            return Err((
                "balancer".into(),
                "unhealthy_threshold and healthy_threshold must be at least 1".into(),
            ));
        }
        if self.backend_tls.mode == BackendTlsMode::VerifyFull && self.backend_tls.ca.is_none() {
            return Err((
                "backend_tls.ca".into(),
                "verify-full needs a CA file".into(),
            ));
        }
        Ok(())
    }
}

/// Splits `host:port` (IPv6 as `[::1]:5432`).
pub fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{address:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{address:?}: port {port:?} is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(format!("{address:?}: port must not be 0"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{address:?}: host is empty"));
    }
    Ok((host.to_owned(), port))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[proxy]
listen = "127.0.0.1:6432"
admin_listen = "127.0.0.1:9930"
startup_timeout = "3s"
[tls]
cert = "certs/server.crt"
key = "/abs/server.key"
[auth]
userlist = "users.txt"
[[backend]]
name = "pg1"
address = "127.0.0.1:5432"
[[backend]]
name = "pg2"
address = "localhost:5433"
"#;

    #[test]
    fn parses_and_resolves_paths() {
        let c = Config::parse(GOOD, "t.toml", Path::new("/etc/pgferry")).unwrap();
        assert_eq!(c.proxy.startup_timeout, Duration::from_secs(3));
        assert_eq!(c.proxy.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.proxy.max_client_connections, 10_000);
        assert_eq!(c.auth.userlist, Path::new("/etc/pgferry/users.txt"));
        assert_eq!(c.auth.secret_file, Path::new("/etc/pgferry/pgferry.secret"));
        assert_eq!(c.auth.scram_iterations, None);
        assert!(c.auth.throttle);
        assert_eq!(c.auth.throttle_initial, Duration::from_secs(1));
        assert_eq!(c.auth.throttle_max, Duration::from_secs(60));
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert, Path::new("/etc/pgferry/certs/server.crt"));
        assert_eq!(tls.key, Path::new("/abs/server.key"));
        assert!(!tls.require);
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backend_tls.mode, BackendTlsMode::Disable);
        assert_eq!(c.balancer.rebalance_interval, None);
        assert_eq!(c.balancer.health_check_interval, Duration::from_secs(5));
        assert_eq!(c.balancer.drain_concurrency, 32);
        assert_eq!(c.proxy.listen_backlog, None);
        assert_eq!(c.proxy.admin_header_timeout, Duration::from_secs(5));
        assert_eq!(c.proxy.admin_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.proxy.admin_max_connections, 64);
    }

    #[test]
    fn listen_backlog_and_admin_limits() {
        let with = |lines: &str| GOOD.replace("[tls]", &format!("{lines}\n[tls]"));
        let c = Config::parse(
            &with(
                "listen_backlog = 700\nadmin_header_timeout = \"500ms\"\nadmin_max_connections = 8",
            ),
            "t.toml",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.proxy.listen_backlog, Some(700));
        assert_eq!(c.proxy.admin_header_timeout, Duration::from_millis(500));
        assert_eq!(c.proxy.admin_max_connections, 8);
        for (line, key) in [
            ("listen_backlog = 0", "proxy.listen_backlog"),
            ("listen_backlog = -1", "proxy.listen_backlog"),
            ("admin_max_connections = 0", "proxy.admin_max_connections"),
            (
                "admin_max_connections = 100001",
                "proxy.admin_max_connections",
            ),
            (
                "admin_header_timeout = \"0s\"",
                "proxy.admin_header_timeout",
            ),
            ("admin_idle_timeout = \"0s\"", "proxy.admin_idle_timeout"),
        ] {
            let e = err(&with(line));
            assert!(e.contains(key), "{line}: {e}");
        }
        assert_eq!(c.proxy.max_protocol, MaxProtocol::V3_0);
    }

    #[test]
    fn max_protocol() {
        let with = |v: &str| {
            let text = GOOD.replacen("[proxy]\n", &format!("[proxy]\nmax_protocol = {v}\n"), 1);
            Config::parse(&text, "t.toml", Path::new("/etc/pgferry"))
        };
        let c = with("\"3.2\"").unwrap();
        assert_eq!(c.proxy.max_protocol, MaxProtocol::V3_2);
        assert_eq!(
            with("\"3.0\"").unwrap().proxy.max_protocol,
            MaxProtocol::V3_0
        );
        for bad in ["\"3.1\"", "\"3\"", "3.2"] {
            assert!(with(bad).is_err(), "{bad}");
        }
        // A client asking for 3.2 (or more) gets 3.2 only when allowed;
        // 3.1 was never a PostgreSQL version.
        assert_eq!(MaxProtocol::V3_2.session_minor(2), 2);
        assert_eq!(MaxProtocol::V3_2.session_minor(7), 2);
        assert_eq!(MaxProtocol::V3_2.session_minor(1), 0);
        assert_eq!(MaxProtocol::V3_2.session_minor(0), 0);
        assert_eq!(MaxProtocol::V3_0.session_minor(2), 0);
    }

    #[test]
    fn balancer_section() {
        let c = Config::parse(
            &format!("{GOOD}\n[balancer]\nrebalance_interval = \"30s\"\ncooldown = \"2m\"\n"),
            "t.toml",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.balancer.rebalance_interval, Some(Duration::from_secs(30)));
        assert_eq!(c.balancer.cooldown, Duration::from_secs(120));
        let e = err(&format!("{GOOD}\n[balancer]\ndrain_concurrency = 0\n"));
        assert!(e.contains("balancer.drain_concurrency"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[balancer]\nhealth_check_interval = \"0s\"\n"
        ));
        assert!(e.contains("balancer.health_check_interval"), "{e}");
    }

    fn err(text: &str) -> String {
        Config::parse(text, "t.toml", Path::new("."))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = err(&GOOD.replace("127.0.0.1:6432", "nope"));
        assert!(e.starts_with("t.toml: proxy.listen: "), "{e}");
        let e = err(&GOOD.replace("\"3s\"", "\"soon\""));
        assert!(
            e.contains("proxy.startup_timeout") && e.contains("soon"),
            "{e}"
        );
        let e = err(&GOOD.replace("5433", "99999"));
        assert!(e.contains("backend[1].address"), "{e}");
        let e = err(&GOOD.replace("name = \"pg2\"", "name = \"pg1\""));
        assert!(e.contains("duplicate backend name"), "{e}");
        let e = err(&GOOD.replace("[auth]", "[auth]\nbogus = 1"));
        assert!(e.contains("auth") && e.contains("bogus"), "{e}");
        let e = err("[proxy\n");
        assert!(e.starts_with("t.toml: (syntax)"), "{e}");
        let e = err(&GOOD
            .replace("[backend_tls]", "")
            .replace("[auth]", "[backend_tls]\nmode = \"verify-full\"\n[auth]"));
        assert!(e.contains("backend_tls.ca"), "{e}");
    }

    #[test]
    fn auth_section() {
        let c = Config::parse(
            &GOOD.replace(
                "[auth]",
                "[auth]\nsecret_file = \"/run/s\"\nscram_iterations = 8192\nthrottle = false\n\
                 throttle_initial = \"300ms\"\nthrottle_max = \"5s\"",
            ),
            "t.toml",
            Path::new("/etc"),
        )
        .unwrap();
        assert_eq!(c.auth.secret_file, Path::new("/run/s"));
        assert_eq!(c.auth.scram_iterations, Some(8192));
        assert!(!c.auth.throttle);
        assert_eq!(c.auth.throttle_initial, Duration::from_millis(300));
        let e = err(&GOOD.replace("[auth]", "[auth]\nthrottle_max = \"10ms\""));
        assert!(e.contains("auth.throttle_max"), "{e}");
        let e = err(&GOOD.replace("[auth]", "[auth]\nscram_iterations = 0"));
        assert!(e.contains("auth.scram_iterations"), "{e}");
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("[::1]:5432").unwrap(), ("::1".into(), 5432));
        assert!(split_host_port("host").is_err());
        assert!(split_host_port(":5").is_err());
    }

    #[test]
    fn clusters_admin_login_and_switchover() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.pw"), "s3cret\nignored\n").unwrap();
        let base = format!(
            "{GOOD}cluster = \"main\"\n[backend_admin]\nuser = \"pgferry\"\npassword_file = \"admin.pw\"\n"
        );
        let c = Config::parse(&base, "t.toml", dir.path()).unwrap();
        assert_eq!(c.backends[1].cluster.as_deref(), Some("main"));
        assert_eq!(c.backends[0].cluster, None);
        let admin = c.backend_admin.as_ref().unwrap();
        assert_eq!(admin.password.as_deref(), Some("s3cret"));
        assert_eq!(admin.database, "postgres");
        assert_eq!(c.switchover.promote, PromoteMode::Sql);
        assert_eq!(c.switchover.fence, FenceMode::ReadOnly);
        assert_eq!(c.failover.remember_state_after, Duration::from_secs(2));
        assert!(
            !format!("{admin:?}").contains("s3cret"),
            "no password in Debug"
        );

        let bad = |extra: &str| {
            Config::parse(&format!("{GOOD}{extra}"), "t.toml", dir.path())
                .unwrap_err()
                .to_string()
        };
        assert!(bad("[backend_admin]\nuser = \"x\"\n").contains("password"));
        assert!(bad("[switchover]\npromote = \"command\"\n").contains("promote_command"));
        assert!(bad("[switchover]\npromote = \"maybe\"\n").contains("switchover.promote"));
        assert!(bad("[failover]\nrehome_timeout = \"0s\"\n").contains("rehome_timeout"));
    }

    #[test]
    fn auth_query_settings() {
        let with = |lines: &str| {
            GOOD.replace(
                "userlist = \"users.txt\"",
                &format!("userlist = \"users.txt\"\n{lines}"),
            )
        };
        let c = Config::parse(&with(""), "t.toml", Path::new(".")).unwrap();
        assert_eq!(c.auth.auth_user, None);
        assert_eq!(
            c.auth.auth_query,
            "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"
        );
        assert_eq!(c.auth.auth_dbname, "postgres");
        assert_eq!(c.auth.auth_query_ttl, Duration::from_secs(60));
        let c = Config::parse(
            &with("auth_user = \"lookup\"\nauth_query = \"SELECT * FROM pgbouncer.get_auth($1)\"\nauth_query_ttl = \"0s\""),
            "t.toml",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.auth.auth_user.as_deref(), Some("lookup"));
        assert_eq!(c.auth.auth_query_ttl, Duration::ZERO);
        for (lines, key) in [
            ("auth_user = \"\"", "auth.auth_user"),
            (
                "auth_user = \"x\"\nauth_query = \"SELECT 'a', 'b'\"",
                "auth.auth_query",
            ),
            ("auth_user = \"x\"\nauth_dbname = \"\"", "auth.auth_dbname"),
        ] {
            let e = err(&with(lines));
            assert!(e.contains(key), "{lines}: {e}");
        }
        // Without auth_user the others are not read.
        assert!(
            Config::parse(&with("auth_query = \"SELECT 1\""), "t.toml", Path::new(".")).is_ok()
        );
    }
}
