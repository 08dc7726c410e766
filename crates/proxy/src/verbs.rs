//! Every admin verb, implemented once.
//!
//! The HTTP API (`pgferry-admin`, and `pgferry ctl` through it) and the
//! SQL console (`console`) call these and only translate the answer: a
//! status code and JSON there, rows or an ErrorResponse here. What a verb
//! checks, does and reports is decided in this module alone. The longer
//! verbs live with their machinery (`balancer::drain`, `rebalance`,
//! `switchover`, `handoff`); the views and the small verbs live here.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::backend::{Backend, BackendMode};
use crate::balancer::drain::{drain as run_drain, DrainError, DrainReport};
use crate::balancer::mover::{request_transfer, MoveError};
use crate::forwarder::tracker::TxStatus;
use crate::forwarder::{ControlCommand, TransferOutcome, TRANSFER_IN_PROGRESS};
use crate::registry::SessionInfo;
use crate::reload::ReloadSummary;
use crate::transfer::spares::refill_all;
use crate::{Config, ProxyContext};

/// A move's wait for its safe point when the caller gives none.
pub const DEFAULT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(15);
/// A rebalance's whole deadline when the caller gives none.
pub const DEFAULT_REBALANCE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a session may take to answer "what state are you in".
const INSPECT_TIMEOUT: Duration = Duration::from_millis(250);
/// Migrations `SHOW MIGRATIONS` remembers.
const RECENT_MIGRATIONS: usize = 100;

/// Why a verb did nothing (or not all of it). One enum for every verb, so
/// that each surface maps it once: HTTP to a status, the console to a
/// SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerbError {
    /// No such session or backend.
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong (unknown target backend, bad value).
    #[error("{0}")]
    Invalid(String),
    /// Not now: something else is running, or the state forbids it.
    #[error("{0}")]
    Conflict(String),
    /// Asked, and no answer came in time.
    #[error("{0}")]
    NoAnswer(String),
    /// Tried and failed.
    #[error("{0}")]
    Failed(String),
}

impl VerbError {
    /// The console's SQLSTATE for it.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // undefined_object
            VerbError::NotFound(_) => "42704",
            // invalid_parameter_value
            VerbError::Invalid(_) => "22023",
            // object_not_in_prerequisite_state
            VerbError::Conflict(_) => "55000",
            // query_canceled: a deadline passed
            VerbError::NoAnswer(_) => "57014",
            // system_error
            VerbError::Failed(_) => "58000",
        }
    }
}

/// What the admin surfaces share besides the proxy's own state: the config
/// file to re-read, the way to stop, and the recent migrations.
pub struct AdminHooks {
    config_path: OnceLock<PathBuf>,
    shutdown: watch::Sender<bool>,
    recent: Mutex<VecDeque<MigrationView>>,
    /// The PAUSE in force, if any.
    pause: Mutex<Option<Paused>>,
}

/// A PAUSE in force: dropping `release` (or sending true) lets its
/// sessions go.
struct Paused {
    backend: Option<String>,
    release: watch::Sender<bool>,
    sessions: usize,
    until: std::time::Instant,
}

impl Default for AdminHooks {
    fn default() -> Self {
        Self {
            config_path: OnceLock::new(),
            shutdown: watch::channel(false).0,
            recent: Mutex::new(VecDeque::with_capacity(RECENT_MIGRATIONS)),
            pause: Mutex::new(None),
        }
    }
}

impl AdminHooks {
    /// The file `RELOAD` (and SIGHUP) re-read; set once at start.
    pub fn set_config_path(&self, path: PathBuf) {
        let _ = self.config_path.set(path);
    }

    /// Resolves when a `SHUTDOWN` was asked for.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Remembers a finished migration for `SHOW MIGRATIONS`.
    pub fn record_migration(&self, m: MigrationView) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_MIGRATIONS {
            recent.pop_front();
        }
        recent.push_back(m);
    }
}

/// The last migrations (at most 100), newest first.
pub fn migrations(ctx: &ProxyContext) -> Vec<MigrationView> {
    let recent = ctx.hooks.recent.lock().unwrap_or_else(|p| p.into_inner());
    recent.iter().rev().cloned().collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    pub name: String,
    pub address: String,
    pub state: &'static str,
    pub healthy: bool,
    pub sessions: usize,
    /// `primary`, `standby` or `unknown` (no `[backend_admin]`, or not
    /// checked yet).
    pub role: &'static str,
    pub cluster: Option<String>,
    /// `postgres`, `cockroachdb`, or `unknown` (`dialect = "auto"` and no
    /// login yet).
    pub dialect: &'static str,
}

impl BackendView {
    pub fn of(b: &Backend) -> Self {
        Self {
            name: b.name.clone(),
            address: b.address.clone(),
            state: b.state().as_str(),
            healthy: b.healthy(),
            sessions: b.sessions(),
            role: b.role().as_str(),
            cluster: b.cluster.clone(),
            dialect: b.dialect().map_or("unknown", |d| d.as_str()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    pub id: String,
    pub client_addr: String,
    pub user: String,
    pub database: String,
    pub application_name: Option<String>,
    pub backend: String,
    pub connected_at: String,
    pub migrations: u32,
    /// "idle" | "active" | "in_transaction" | "transferring"
    pub state: &'static str,
}

/// One finished migration, for `SHOW MIGRATIONS`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationView {
    pub session: Uuid,
    pub from: String,
    pub to: Option<String>,
    pub started_at: SystemTime,
    pub duration: Duration,
    pub outcome: &'static str,
    pub reason: Option<String>,
}

fn no_such_backend(name: &str) -> VerbError {
    VerbError::NotFound(format!("no such backend {name:?}"))
}

fn no_such_session() -> VerbError {
    VerbError::NotFound("no such connection".into())
}

pub fn backends(ctx: &ProxyContext) -> Vec<BackendView> {
    ctx.backends
        .all()
        .iter()
        .map(|b| BackendView::of(b))
        .collect()
}

pub fn backend(ctx: &ProxyContext, name: &str) -> Result<BackendView, VerbError> {
    ctx.backends
        .get(name)
        .map(|b| BackendView::of(&b))
        .ok_or_else(|| no_such_backend(name))
}

/// Every session, oldest first, each asked what it is doing.
pub async fn sessions(ctx: &Arc<ProxyContext>) -> Vec<SessionView> {
    let mut infos = ctx.registry.list();
    infos.sort_by_key(|s| s.connected_at);
    // Asked all at once: each answers within INSPECT_TIMEOUT.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, info) in infos.into_iter().enumerate() {
        let ctx = ctx.clone();
        tasks.spawn(async move { (i, session_view(&ctx, info).await) });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(v) = r {
            out.push(v);
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, v)| v).collect()
}

/// A malformed id names no connection.
pub async fn session(ctx: &ProxyContext, id: &str) -> Result<SessionView, VerbError> {
    let id = Uuid::parse_str(id).map_err(|_| no_such_session())?;
    match ctx.registry.get(id) {
        Some((info, _)) => Ok(session_view(ctx, info).await),
        None => Err(no_such_session()),
    }
}

async fn session_view(ctx: &ProxyContext, info: SessionInfo) -> SessionView {
    let state = if info.transferring {
        "transferring"
    } else {
        inspect_state(ctx, info.id).await
    };
    SessionView {
        id: info.id.to_string(),
        client_addr: info.client_addr.to_string(),
        user: info.user,
        database: info.database,
        application_name: info.application_name,
        backend: info.backend,
        connected_at: humantime::format_rfc3339_millis(info.connected_at).to_string(),
        migrations: info.migrations,
        state,
    }
}

async fn inspect_state(ctx: &ProxyContext, id: Uuid) -> &'static str {
    let Some((_, control)) = ctx.registry.get(id) else {
        return "idle";
    };
    let (tx, rx) = oneshot::channel();
    // Sending may wait too if the session's control queue is full.
    let asked = async {
        control.send(ControlCommand::Inspect(tx)).await.ok()?;
        rx.await.ok()
    };
    match tokio::time::timeout(INSPECT_TIMEOUT, asked).await {
        Ok(Some(snap)) => {
            if snap.transfer_pending {
                "transferring"
            } else if snap.tx_status != TxStatus::Idle {
                "in_transaction"
            } else if snap.outstanding > 0 || !snap.at_message_boundary {
                "active"
            } else {
                "idle"
            }
        }
        // Busy enough not to answer at once (or moving right now).
        _ => "active",
    }
}

/// Moves session `id` to `to` (or the least-loaded other backend) at its
/// next safe point within `timeout`. `Ok` carries every outcome the
/// session reported, failures included; `Err` is a refusal before it was
/// asked.
pub async fn transfer(
    ctx: &ProxyContext,
    id: &str,
    to: Option<String>,
    timeout: Duration,
) -> Result<TransferOutcome, VerbError> {
    let id = Uuid::parse_str(id).map_err(|_| no_such_session())?;
    let (info, control) = ctx.registry.get(id).ok_or_else(no_such_session)?;
    // At once, not queued behind the running move (the session would move
    // again right after it).
    if info.transferring {
        return Ok(TransferOutcome::RecoverableError(
            TRANSFER_IN_PROGRESS.into(),
        ));
    }
    if let Some(to) = &to {
        if ctx.backends.get(to).is_none() {
            return Err(VerbError::Invalid(format!("unknown backend {to:?}")));
        }
        if *to == info.backend {
            return Ok(TransferOutcome::RecoverableError(format!(
                "session is already on {to}"
            )));
        }
    }
    match request_transfer(&control, to, timeout).await {
        Ok(o) => Ok(o),
        Err(MoveError::SessionGone) => Err(no_such_session()),
        Err(MoveError::NoAnswer) => Err(VerbError::NoAnswer("session did not answer".into())),
    }
}

/// Moves every session off `name` (which takes no new ones meanwhile).
pub async fn drain(
    ctx: &ProxyContext,
    name: &str,
    timeout: Option<Duration>,
) -> Result<DrainReport, VerbError> {
    let timeout = timeout.unwrap_or(ctx.config.balancer.drain_timeout);
    run_drain(ctx, name, timeout).await.map_err(|e| match e {
        DrainError::UnknownBackend(_) => no_such_backend(name),
        e @ DrainError::AlreadyDraining(_) => VerbError::Conflict(e.to_string()),
    })
}

/// Lets `name` take new sessions again (after a drain).
pub fn activate(ctx: &Arc<ProxyContext>, name: &str) -> Result<BackendView, VerbError> {
    let b = ctx
        .backends
        .get(name)
        .ok_or_else(|| no_such_backend(name))?;
    b.set_mode(BackendMode::Active);
    tracing::info!(backend = %b.name, "backend activated");
    refill_all(ctx);
    Ok(BackendView::of(&b))
}

/// Re-reads the config file pgferry was started with and applies what a
/// reload can change (backends, userlist); SIGHUP does the same.
pub async fn reload(ctx: &Arc<ProxyContext>) -> Result<ReloadSummary, VerbError> {
    let path =
        ctx.hooks.config_path.get().ok_or_else(|| {
            VerbError::Conflict("pgferry was not started from a config file".into())
        })?;
    let applied = match Config::load(path) {
        Ok(c) => crate::reload::apply(ctx, &c)
            .await
            .map_err(|e| VerbError::Failed(format!("{e:#}"))),
        Err(e) => Err(VerbError::Failed(e.to_string())),
    };
    match &applied {
        Ok(s) => tracing::info!(
            file = %path.display(),
            added = ?s.added,
            removing = ?s.removing,
            users = s.users,
            users_derived = s.users_derived,
            users_reused = s.users_reused,
            userlist_ms = s.userlist_took.as_millis() as u64,
            "config reloaded (backends and userlist; other settings need a restart)"
        ),
        Err(e) => tracing::error!(
            file = %path.display(),
            error = %e,
            "config reload failed; keeping the current config"
        ),
    }
    applied
}

/// Stops pgferry as SIGTERM does: no new connections, sessions end at
/// their next message boundary within `shutdown_timeout`.
pub fn shutdown(ctx: &ProxyContext) {
    tracing::info!("shutdown asked for by an admin command");
    let _ = ctx.hooks.shutdown.send(true);
}

/// A migration outcome's name, as the API and the audit log spell it.
pub fn outcome_name(o: &TransferOutcome) -> &'static str {
    match o {
        TransferOutcome::Success { .. } => "success",
        TransferOutcome::RecoverableError(_) => "recoverable_error",
        TransferOutcome::FatalError(_) => "fatal_error",
        TransferOutcome::SessionEnded(_) => "session_ended",
    }
}

/// Makes `mode` lasting for `name` (the HTTP API's DELETE uses it first).
pub fn set_mode(ctx: &ProxyContext, name: &str, mode: BackendMode) -> Result<(), VerbError> {
    let b = ctx
        .backends
        .get(name)
        .ok_or_else(|| no_such_backend(name))?;
    b.set_mode(mode);
    Ok(())
}

/// A move's failure reason (`None` for a success).
pub fn outcome_reason(o: &TransferOutcome) -> Option<&str> {
    match o {
        TransferOutcome::Success { .. } => None,
        TransferOutcome::RecoverableError(r)
        | TransferOutcome::FatalError(r)
        | TransferOutcome::SessionEnded(r) => Some(r),
    }
}

/// A switchover's refusal as a verb error.
pub fn switchover_error(e: crate::switchover::SwitchoverError) -> VerbError {
    use crate::switchover::SwitchoverError as E;
    match &e {
        E::UnknownBackend(_) => VerbError::NotFound(e.to_string()),
        E::Invalid(_) | E::NoAdminLogin => VerbError::Invalid(e.to_string()),
        E::AlreadyRunning | E::Draining(_) => VerbError::Conflict(e.to_string()),
        _ => VerbError::Failed(e.to_string()),
    }
}

/// What PAUSE did.
#[derive(Debug, Clone, Serialize)]
pub struct PauseReport {
    /// Sessions held now.
    pub paused: usize,
    /// When they go on by themselves (`[admin] pause_limit`).
    pub until: SystemTime,
}

/// Holds every session (or `backend`'s) at its next safe point: its
/// client's next request waits until RESUME, or until `[admin]
/// pause_limit`. Returns once all are held. If one does not get to a safe
/// point within `timeout` (a long transaction), the pause is undone and
/// the verb fails: PgBouncer's PAUSE would hang there. Sessions that log
/// in later are not held.
pub async fn pause(
    ctx: &ProxyContext,
    backend: Option<&str>,
    timeout: Option<Duration>,
) -> Result<PauseReport, VerbError> {
    if let Some(b) = backend {
        if ctx.backends.get(b).is_none() {
            return Err(no_such_backend(b));
        }
    }
    let timeout = timeout.unwrap_or(ctx.config.admin.pause_timeout);
    let limit = ctx.config.admin.pause_limit;
    let now = std::time::Instant::now();
    let (release, released) = watch::channel(false);
    {
        let mut current = ctx.hooks.pause.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|p| p.until > now) {
            return Err(VerbError::Conflict(
                "a pause is in force; RESUME first".into(),
            ));
        }
        // Claimed now, so that two PAUSEs cannot both run; `sessions` is
        // set once they are held.
        *current = Some(Paused {
            backend: backend.map(str::to_owned),
            release: release.clone(),
            sessions: 0,
            until: now + timeout + limit,
        });
    }
    let targets: Vec<_> = ctx
        .registry
        .list()
        .into_iter()
        .filter(|s| backend.is_none_or(|b| s.backend == b))
        .filter_map(|s| ctx.registry.get(s.id))
        .collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let until = now + timeout + limit;
    let mut waiting = Vec::with_capacity(targets.len());
    for (_, control) in &targets {
        let (held_tx, held_rx) = oneshot::channel();
        let (reply, answer) = oneshot::channel();
        let cmd = ControlCommand::Pause {
            timeout,
            reply,
            pause: crate::forwarder::PauseHold {
                held: held_tx,
                release: released.clone(),
                until,
            },
        };
        match tokio::time::timeout_at(deadline, control.send(cmd)).await {
            Ok(Ok(())) => waiting.push((held_rx, answer)),
            // Gone meanwhile: nothing to hold.
            Ok(Err(_)) => {}
            Err(_) => break,
        }
    }
    let asked = waiting.len();
    let mut held = 0;
    let mut not_held = Vec::new();
    for (held_rx, answer) in waiting {
        match tokio::time::timeout_at(deadline, held_rx).await {
            Ok(Ok(())) => held += 1,
            // Ended (or refused) without being held: gone, or say why.
            Ok(Err(_)) => {
                if let Ok(TransferOutcome::RecoverableError(why)) = answer.await {
                    if why != "session ended before a safe point" {
                        not_held.push(why);
                    }
                }
            }
            Err(_) => not_held.push("no safe point in time".into()),
        }
    }
    let mut current = ctx.hooks.pause.lock().unwrap_or_else(|p| p.into_inner());
    if !not_held.is_empty() || asked < targets.len() {
        // Undone: every held session goes on.
        let _ = release.send(true);
        *current = None;
        return Err(VerbError::NoAnswer(format!(
            "pause undone: {} of {} sessions were not held within {:?} ({})",
            targets.len() - held,
            targets.len(),
            timeout,
            not_held
                .first()
                .map(String::as_str)
                .unwrap_or("not asked in time"),
        )));
    }
    if let Some(p) = current.as_mut() {
        p.sessions = held;
    }
    tracing::info!(backend = backend.unwrap_or("*"), sessions = held, "paused");
    Ok(PauseReport {
        paused: held,
        until: SystemTime::now() + until.saturating_duration_since(std::time::Instant::now()),
    })
}

/// Ends the PAUSE in force (it must be `backend`'s, or the whole proxy's
/// when `None`); the number of sessions it held.
pub fn resume(ctx: &ProxyContext, backend: Option<&str>) -> Result<usize, VerbError> {
    let mut current = ctx.hooks.pause.lock().unwrap_or_else(|p| p.into_inner());
    let now = std::time::Instant::now();
    match current.as_ref() {
        Some(p) if p.until > now => {
            if p.backend.as_deref() != backend {
                return Err(VerbError::Invalid(format!(
                    "the pause in force is {}'s; RESUME {}",
                    p.backend.as_deref().unwrap_or("the whole proxy"),
                    p.backend.as_deref().unwrap_or(""),
                )));
            }
        }
        _ => {
            *current = None;
            return Err(VerbError::Conflict("nothing is paused".into()));
        }
    }
    let p = current.take();
    let n = p.as_ref().map_or(0, |p| p.sessions);
    if let Some(p) = p {
        let _ = p.release.send(true);
    }
    tracing::info!(backend = backend.unwrap_or("*"), sessions = n, "resumed");
    Ok(n)
}

/// `SHOW CONFIG`: the settings in force (key, value, changed by RELOAD).
/// Secrets (admin token, passwords) are not shown.
pub fn config_items(ctx: &ProxyContext) -> Vec<(String, String, bool)> {
    let c = &ctx.config;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let mut items = vec![
        ("proxy.listen", c.proxy.listen.to_string(), false),
        (
            "proxy.admin_listen",
            c.proxy
                .admin_listen
                .map(|a| a.to_string())
                .unwrap_or_default(),
            false,
        ),
        (
            "proxy.max_client_connections",
            c.proxy.max_client_connections.to_string(),
            false,
        ),
        ("proxy.startup_timeout", d(c.proxy.startup_timeout), false),
        ("proxy.connect_timeout", d(c.proxy.connect_timeout), false),
        ("proxy.shutdown_timeout", d(c.proxy.shutdown_timeout), false),
        ("proxy.tcp_keepalive", d(c.proxy.tcp_keepalive), false),
        (
            "proxy.max_message_length",
            c.proxy.max_message_length.to_string(),
            false,
        ),
        (
            "proxy.handoff_socket",
            c.proxy
                .handoff_socket
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            false,
        ),
        ("tls", c.tls.is_some().to_string(), false),
        ("auth.userlist", c.auth.userlist.display().to_string(), true),
        (
            "auth.auth_user",
            c.auth.auth_user.clone().unwrap_or_default(),
            false,
        ),
        ("auth.auth_query_ttl", d(c.auth.auth_query_ttl), false),
        (
            "migration.warm_spares",
            c.migration.warm_spares.to_string(),
            false,
        ),
        (
            "migration.capture_timeout",
            d(c.migration.capture_timeout),
            false,
        ),
        ("balancer.drain_timeout", d(c.balancer.drain_timeout), false),
        (
            "balancer.health_check_interval",
            d(c.balancer.health_check_interval),
            false,
        ),
        ("audit", c.audit.is_some().to_string(), false),
        (
            "admin.console_users",
            c.admin.console_users.join(","),
            false,
        ),
        (
            "admin.console_database",
            c.admin.console_database.clone(),
            false,
        ),
        ("admin.pause_timeout", d(c.admin.pause_timeout), false),
        ("admin.pause_limit", d(c.admin.pause_limit), false),
    ];
    let backends: Vec<String> = ctx
        .backends
        .all()
        .iter()
        .map(|b| format!("{}={}", b.name, b.address))
        .collect();
    items.push(("backend", backends.join(","), true));
    items
        .into_iter()
        .map(|(k, v, r)| (k.to_owned(), v, r))
        .collect()
}
