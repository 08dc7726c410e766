//! Planned switchover of a cluster's primary to one of its standbys, with
//! every session kept (docs/switchover.md).
//!
//! 1. hold: every session on `from` stops at its next safe point and
//!    waits there, its traffic held (new client messages wait, in order);
//!    new read-write logins wait too. A session not at a safe point by the
//!    deadline aborts it all: everyone is released, nothing changed.
//! 2. fence (`[switchover] fence`): no new write transactions on `from`.
//! 3. catch-up: wait until `to` has replayed all of `from`'s WAL.
//! 4. promote (`[switchover] promote`).
//! 5. move: each held session moves to `to` with its state (the ordinary
//!    transfer, run by the session itself), then goes on; `from` ends
//!    drained.
//!
//! Until `to` is promoted any failure aborts (fence undone); after it,
//! sessions that cannot be moved are closed with 57P01 rather than left on
//! a fenced server. pgferry never runs, commits or rolls back anything of
//! a client's: sessions are only ever moved between statements.

pub mod primary;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use crate::backend::admin_conn::AdminConn;
use crate::backend::role::Role;
use crate::backend::{Backend, BackendMode};
use crate::balancer::mover::request_transfer;
use crate::config::FenceMode;
use crate::errors::SessionError;
use crate::forwarder::{ControlCommand, ControlSender, Hold, HoldWord, TransferOutcome};
use crate::ProxyContext;

/// How often the hold looks for sessions that reached `from` since.
const RESCAN: Duration = Duration::from_millis(20);
/// Moves retried after the promotion, for sessions whose first move failed.
const MOVE_ATTEMPTS: usize = 3;
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Beyond its phases' own limits, what a held session waits before it lets
/// itself go (a switchover that vanished).
const HOLD_MARGIN: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum SwitchoverError {
    #[error("no such backend {0:?}")]
    UnknownBackend(String),
    #[error("{0}")]
    Invalid(String),
    #[error("switchovers need [backend_admin] (pgferry's own login to the servers)")]
    NoAdminLogin,
    #[error("a switchover is already running")]
    AlreadyRunning,
    #[error("backend {0} is being drained")]
    Draining(String),
    #[error("backend {backend}: could not {what}: {why}")]
    Server {
        backend: String,
        what: &'static str,
        why: String,
    },
    #[error("the standby did not catch up in time ({behind_bytes} bytes of WAL behind)")]
    CatchUpTimeout { behind_bytes: u64 },
    #[error("the standby did not leave recovery within promote_timeout")]
    PromoteTimeout,
    #[error("promote_command failed: {0}")]
    PromoteCommand(String),
    #[error("write transactions that bypass pgferry are still open on the old primary (server pids {0}); they could commit after the catch-up")]
    Writers(String),
    /// `pg_promote()` was refused by the server: nothing was set in motion.
    #[error("the standby refused pg_promote(): {0}")]
    PromoteRefused(String),
}

impl SwitchoverError {
    /// Refused before anything was touched (the request itself is wrong,
    /// or the moment is), as opposed to an aborted switchover.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::UnknownBackend(_)
                | Self::Invalid(_)
                | Self::NoAdminLogin
                | Self::AlreadyRunning
                | Self::Draining(_)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Hold,
    Fence,
    CatchUp,
    Promote,
    Move,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hold => "hold",
            Self::Fence => "fence",
            Self::CatchUp => "catch_up",
            Self::Promote => "promote",
            Self::Move => "move",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseTime {
    pub phase: Phase,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub id: Uuid,
    pub reason: String,
}

/// What a switchover did.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchoverReport {
    /// `success`, `partial` (promoted, but some sessions could not be
    /// moved and were closed), `aborted` (nothing changed) or `failed`
    /// (the promotion was asked for and did not finish in time: the old
    /// primary stays fenced, its sessions released there).
    pub outcome: &'static str,
    pub from: String,
    pub to: String,
    pub cluster: Option<String>,
    /// Why it aborted.
    pub reason: Option<String>,
    pub phases: Vec<PhaseTime>,
    pub sessions_held: usize,
    pub sessions_moved: usize,
    pub sessions_failed: usize,
    pub failures: Vec<Failure>,
    /// Sessions that did not reach a safe point by the deadline.
    pub blocked: Vec<Uuid>,
    /// The longest time any session's traffic was held (hold + move).
    pub longest_pause_ms: f64,
    pub duration_ms: f64,
}

/// What `GET /v1/switchover` shows.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Progress {
    pub running: bool,
    pub phase: Option<Phase>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub held: usize,
    pub sessions: usize,
    pub elapsed_ms: f64,
    pub last: Option<SwitchoverReport>,
}

struct Current {
    from: String,
    to: String,
    phase: Phase,
    held: usize,
    sessions: usize,
    started: Instant,
}

/// The running switchover (at most one), the last one's report, and the
/// gate new read-write logins wait at while sessions are held.
pub struct Switchovers {
    running: tokio::sync::Mutex<()>,
    current: Mutex<Option<Current>>,
    last: Mutex<Option<SwitchoverReport>>,
    /// True while new read-write logins must wait.
    gate: watch::Sender<bool>,
    /// Their longest wait.
    gate_limit: Mutex<Duration>,
}

impl Default for Switchovers {
    fn default() -> Self {
        Self {
            running: tokio::sync::Mutex::new(()),
            current: Mutex::new(None),
            last: Mutex::new(None),
            gate: watch::channel(false).0,
            gate_limit: Mutex::new(Duration::ZERO),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain assignments under these locks cannot be left half-done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Switchovers {
    /// Whether a switchover is between its hold and its promotion.
    pub fn is_holding(&self) -> bool {
        *self.gate.borrow()
    }

    /// Waits while a switchover holds its sessions (bounded): a login now
    /// would land on the fenced old primary or find no primary at all.
    pub async fn wait_for_new_primary(&self) {
        if !*self.gate.borrow() {
            return;
        }
        let limit = *lock(&self.gate_limit);
        let mut rx = self.gate.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|closed| !*closed)).await;
    }

    pub fn progress(&self) -> Progress {
        let last = lock(&self.last).clone();
        match &*lock(&self.current) {
            Some(c) => Progress {
                running: true,
                phase: Some(c.phase),
                from: Some(c.from.clone()),
                to: Some(c.to.clone()),
                held: c.held,
                sessions: c.sessions,
                elapsed_ms: ms(c.started.elapsed()),
                last,
            },
            None => Progress {
                last,
                ..Progress::default()
            },
        }
    }

    fn update(&self, f: impl FnOnce(&mut Current)) {
        if let Some(c) = lock(&self.current).as_mut() {
            f(c);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One held session.
struct Held {
    word: oneshot::Sender<HoldWord>,
    outcome: oneshot::Receiver<TransferOutcome>,
    control: ControlSender,
}

/// One session asked to hold, not held yet.
struct Asked {
    word: oneshot::Sender<HoldWord>,
    outcome: oneshot::Receiver<TransferOutcome>,
    control: ControlSender,
}

/// Why the hold failed.
struct HoldFailed {
    blocked: Vec<Uuid>,
    held: usize,
    reason: String,
}

/// Clears the running state however the switchover ends.
struct RunningGuard<'a> {
    ctx: &'a ProxyContext,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let s = &self.ctx.switchover;
        *lock(&s.current) = None;
        s.gate.send_replace(false);
        self.ctx.metrics.switchover_sessions_held.set(0);
    }
}

/// Switches `from` (the primary) over to `to` (its standby). `timeout`
/// bounds the hold (and, again, the catch-up); `promote_timeout` the
/// promotion. `Ok` with outcome `aborted` when it was started and undone.
pub async fn switchover(
    ctx: &Arc<ProxyContext>,
    from: &str,
    to: &str,
    timeout: Duration,
) -> Result<SwitchoverReport, SwitchoverError> {
    let (from_b, to_b) = validate(ctx, from, to)?;
    if ctx.handoff.in_progress() {
        return Err(SwitchoverError::Invalid(
            "pgferry is handing its sessions over to a new process; try again after it".into(),
        ));
    }
    let _one = ctx
        .switchover
        .running
        .try_lock()
        .map_err(|_| SwitchoverError::AlreadyRunning)?;
    // The servers' own word on their roles, not the last check's.
    let mut from_conn = primary::connect(ctx, &from_b).await?;
    let mut to_conn = primary::connect(ctx, &to_b).await?;
    if primary::in_recovery(&mut from_conn, &from_b).await? {
        return Err(SwitchoverError::Invalid(format!(
            "{from} is not a primary (it is in recovery)"
        )));
    }
    if !primary::in_recovery(&mut to_conn, &to_b).await? {
        return Err(SwitchoverError::Invalid(format!(
            "{to} is not a standby (it is not in recovery)"
        )));
    }
    if ctx.balancer.draining(from) {
        return Err(SwitchoverError::Draining(from.to_owned()));
    }

    let started = Instant::now();
    let cfg = &ctx.config.switchover;
    let hold_until = started + timeout * 2 + cfg.promote_timeout + HOLD_MARGIN;
    *lock(&ctx.switchover.current) = Some(Current {
        from: from.to_owned(),
        to: to.to_owned(),
        phase: Phase::Hold,
        held: 0,
        sessions: ctx.registry.on_backend(from).len(),
        started,
    });
    *lock(&ctx.switchover.gate_limit) = hold_until.saturating_duration_since(started);
    ctx.switchover.gate.send_replace(true);
    let _running = RunningGuard { ctx };
    let was_mode = from_b.mode();
    from_b.set_mode(BackendMode::Draining);
    ctx.spares.discard_backend(from);
    info!(%from, %to, ?timeout, "switchover started: holding sessions");

    let mut run = Run {
        ctx,
        from: from_b.clone(),
        to: to_b.clone(),
        started,
        phases: Vec::new(),
        phase: Phase::Hold,
        phase_started: started,
    };

    // 1. hold
    let held = match run.hold(started + timeout, hold_until).await {
        Ok(held) => held,
        Err(failed) => {
            from_b.change_mode(BackendMode::Draining, was_mode);
            return Ok(run.aborted(failed.reason, failed.blocked, failed.held));
        }
    };
    let held_count = held.len();
    run.next(Phase::Fence);

    // 2, 3: any failure releases everyone and undoes the fence.
    let fenced = cfg.fence == FenceMode::ReadOnly;
    let prepared = async {
        if fenced {
            primary::fence(&mut from_conn, &from_b).await?;
            primary::wait_for_writers(&mut from_conn, &from_b, Instant::now() + timeout).await?;
        }
        run.next(Phase::CatchUp);
        let end = primary::wal_end(&mut from_conn, &from_b).await?;
        primary::catch_up(&mut to_conn, &to_b, end, Instant::now() + timeout).await
    };
    if let Err(e) = prepared.await {
        if fenced {
            undo_fence(ctx, &mut from_conn, &from_b).await;
        }
        release(held);
        from_b.change_mode(BackendMode::Draining, was_mode);
        return Ok(run.aborted(e.to_string(), Vec::new(), held_count));
    }

    // 4. From the promotion request on there is no way back: a promotion
    //    that did not finish in time may still finish, and undoing the
    //    fence then would make two writable primaries.
    run.next(Phase::Promote);
    // pgferry's connection to `to` from before may not outlive the
    // promotion (CloudNativePG ends them all): new ones from here on.
    to_conn.close().await;
    let promoted =
        primary::promote(ctx, &from_b, &to_b, Instant::now() + cfg.promote_timeout).await;
    if let Err(e) = promoted {
        let done = primary::promoted_now(ctx, &to_b).await == Some(true);
        if done {
            warn!(%to, error = %e, "the standby was promoted although the promotion reported an error; moving on");
        } else if matches!(e, SwitchoverError::PromoteRefused(_)) {
            if fenced {
                undo_fence(ctx, &mut from_conn, &from_b).await;
            }
            release(held);
            from_b.change_mode(BackendMode::Draining, was_mode);
            return Ok(run.aborted(e.to_string(), Vec::new(), held_count));
        } else {
            // Sessions go on on the old primary, fenced: they read, and
            // their writes get the server's own 25006.
            release(held);
            from_b.change_mode(BackendMode::Draining, was_mode);
            tracing::error!(%from, %to, error = %e,
                "switchover failed after the promotion was requested: {from} stays fenced read-only; \
                 once {to} is a primary (or is known not to become one) switch over again or unfence {from} by hand");
            return Ok(run.failed(e.to_string(), held_count));
        }
    }
    // The new primary takes sessions from now on.
    to_b.set_role(Role::Primary);
    to_b.mark_healthy();
    to_b.set_mode(BackendMode::Active);
    // A fence of an earlier switchover may have come with its copied
    // configuration (a former primary re-attached without a new base
    // backup); its marker says it is pgferry's to lift, whatever `fence`
    // says now.
    match primary::connect(ctx, &to_b).await {
        Ok(mut conn) => {
            match primary::fenced(&mut conn, &to_b).await {
                Ok(true) => {
                    if let Err(e) = primary::unfence(&mut conn, &to_b).await {
                        warn!(backend = %to, error = %e, "the new primary is fenced read-only and could not be unfenced");
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(backend = %to, error = %e, "could not check the new primary's fence")
                }
            }
            conn.close().await;
        }
        Err(e) => warn!(backend = %to, error = %e, "could not check the new primary's fence"),
    }
    ctx.switchover.gate.send_replace(false);
    run.next(Phase::Move);

    // 5. move
    let (moved, failures, longest_pause) = run.move_all(held).await;
    from_b.change_mode(BackendMode::Draining, BackendMode::Drained);
    from_conn.close().await;
    run.end_phase();
    let outcome = if failures.is_empty() {
        "success"
    } else {
        "partial"
    };
    ctx.metrics
        .switchover_total
        .with_label_values(&[outcome])
        .inc();
    let report = SwitchoverReport {
        outcome,
        from: from.to_owned(),
        to: to.to_owned(),
        cluster: to_b.cluster.clone(),
        reason: None,
        phases: run.phases.clone(),
        sessions_held: held_count,
        sessions_moved: moved,
        sessions_failed: failures.len(),
        failures,
        blocked: Vec::new(),
        longest_pause_ms: ms(longest_pause),
        duration_ms: ms(started.elapsed()),
    };
    info!(%from, %to, outcome, moved, held = held_count, longest_pause_ms = report.longest_pause_ms, "switchover finished");
    *lock(&ctx.switchover.last) = Some(report.clone());
    Ok(report)
}

fn validate(
    ctx: &ProxyContext,
    from: &str,
    to: &str,
) -> Result<(Arc<Backend>, Arc<Backend>), SwitchoverError> {
    let get = |n: &str| {
        ctx.backends
            .get(n)
            .ok_or_else(|| SwitchoverError::UnknownBackend(n.to_owned()))
    };
    let (f, t) = (get(from)?, get(to)?);
    if from == to {
        return Err(SwitchoverError::Invalid(
            "from and to are the same backend".into(),
        ));
    }
    if !f.same_cluster(&t) {
        return Err(SwitchoverError::Invalid(format!(
            "{from} and {to} are not in one cluster (set `cluster` on both [[backend]]s)"
        )));
    }
    if ctx.config.backend_admin.is_none() {
        return Err(SwitchoverError::NoAdminLogin);
    }
    Ok((f, t))
}

/// Lifts the fence of an aborted switchover, on a new connection if the
/// old one broke (a timed-out statement).
async fn undo_fence(ctx: &ProxyContext, conn: &mut AdminConn, backend: &Arc<Backend>) {
    let fresh = if conn.is_broken() {
        match primary::connect(ctx, backend).await {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(backend = %backend.name, error = %e,
                    "could not undo the fence: reset default_transaction_read_only and pgferry.fenced by hand");
                return;
            }
        }
    } else {
        None
    };
    let mut fresh = fresh;
    let conn = fresh.as_mut().unwrap_or(conn);
    if let Err(e) = primary::unfence(conn, backend).await {
        warn!(backend = %backend.name, error = %e,
            "could not fully undo the fence: check default_transaction_read_only and pgferry.fenced on it");
    }
    if let Some(c) = fresh {
        c.close().await;
    }
}

/// Tells every held session to go on where it is.
fn release(held: HashMap<Uuid, Held>) {
    for (_, h) in held {
        let _ = h.word.send(HoldWord::Release);
    }
}

struct Run<'a> {
    ctx: &'a Arc<ProxyContext>,
    from: Arc<Backend>,
    to: Arc<Backend>,
    started: Instant,
    phases: Vec<PhaseTime>,
    phase: Phase,
    phase_started: Instant,
}

impl Run<'_> {
    fn end_phase(&mut self) {
        let phase = self.phase;
        let took = self.phase_started.elapsed();
        self.ctx
            .metrics
            .switchover_phase
            .with_label_values(&[phase.as_str()])
            .observe(took.as_secs_f64());
        self.phases.push(PhaseTime {
            phase,
            ms: ms(took),
        });
        self.phase_started = Instant::now();
    }

    fn next(&mut self, phase: Phase) {
        self.end_phase();
        self.phase = phase;
        self.ctx.switchover.update(|c| c.phase = phase);
        info!(from = %self.from.name, to = %self.to.name, phase = phase.as_str(), "switchover phase");
    }

    fn aborted(&mut self, reason: String, blocked: Vec<Uuid>, held: usize) -> SwitchoverReport {
        self.ended("aborted", reason, blocked, held)
    }

    fn failed(&mut self, reason: String, held: usize) -> SwitchoverReport {
        self.ended("failed", reason, Vec::new(), held)
    }

    fn ended(
        &mut self,
        outcome: &'static str,
        reason: String,
        mut blocked: Vec<Uuid>,
        held: usize,
    ) -> SwitchoverReport {
        self.end_phase();
        blocked.sort();
        self.ctx
            .metrics
            .switchover_total
            .with_label_values(&[outcome])
            .inc();
        let report = SwitchoverReport {
            outcome,
            from: self.from.name.clone(),
            to: self.to.name.clone(),
            cluster: self.to.cluster.clone(),
            reason: Some(reason),
            phases: self.phases.clone(),
            sessions_held: held,
            sessions_moved: 0,
            sessions_failed: 0,
            failures: Vec::new(),
            blocked,
            longest_pause_ms: 0.0,
            duration_ms: ms(self.started.elapsed()),
        };
        warn!(from = %report.from, to = %report.to, outcome, reason = report.reason.as_deref().unwrap_or(""),
            blocked = report.blocked.len(), "switchover did not complete");
        *lock(&self.ctx.switchover.last) = Some(report.clone());
        report
    }

    /// Holds every session on `from` at its safe point by `deadline`, each
    /// with its state captured. `Err`: some did not get there in time, or
    /// one cannot be moved at all (temporary tables, LISTEN...); everyone
    /// is released.
    async fn hold(
        &mut self,
        deadline: Instant,
        until: Instant,
    ) -> Result<HashMap<Uuid, Held>, HoldFailed> {
        let ctx = self.ctx;
        let (held_tx, mut held_rx) = mpsc::unbounded_channel::<(Uuid, Result<(), String>)>();
        let mut asked: HashMap<Uuid, Asked> = HashMap::new();
        let mut held: HashMap<Uuid, Held> = HashMap::new();
        loop {
            let listed: HashSet<Uuid> = {
                let sessions = ctx.registry.on_backend(&self.from.name);
                let mut ids = HashSet::with_capacity(sessions.len());
                for (info, control) in sessions {
                    ids.insert(info.id);
                    if asked.contains_key(&info.id) || held.contains_key(&info.id) {
                        continue;
                    }
                    // A little past the hold's deadline: the session must
                    // not give up before the switchover has decided.
                    let left = deadline.saturating_duration_since(Instant::now()) + RESCAN * 5;
                    let (word_tx, word_rx) = oneshot::channel();
                    let (reply_tx, reply_rx) = oneshot::channel();
                    let (ack_tx, ack_rx) = oneshot::channel();
                    let cmd = ControlCommand::Transfer {
                        to: None,
                        timeout: left,
                        reply: reply_tx,
                        hold: Some(Hold {
                            held: ack_tx,
                            word: word_rx,
                            until: until.into_std(),
                        }),
                    };
                    if control.try_send(cmd).is_err() {
                        continue; // gone (or its queue full: asked again next scan)
                    }
                    let (id, tx) = (info.id, held_tx.clone());
                    tokio::spawn(async move {
                        if let Ok(r) = ack_rx.await {
                            let _ = tx.send((id, r));
                        }
                    });
                    asked.insert(
                        info.id,
                        Asked {
                            word: word_tx,
                            outcome: reply_rx,
                            control,
                        },
                    );
                }
                ids
            };
            // Sessions that ended while asked are nobody's concern; one that
            // refused at once (another move of it was pending) is asked
            // again at the next scan.
            asked.retain(|id, a| {
                listed.contains(id)
                    && matches!(
                        a.outcome.try_recv(),
                        Err(oneshot::error::TryRecvError::Empty)
                    )
            });
            let all_held = asked.is_empty() && self.from.sessions() <= held.len();
            ctx.switchover.update(|c| {
                c.held = held.len();
                c.sessions = listed.len().max(held.len());
            });
            ctx.metrics.switchover_sessions_held.set(held.len() as i64);
            if all_held {
                return Ok(held);
            }
            if Instant::now() >= deadline {
                // Every session still on `from` that is not held: asked and
                // not there yet, or refused (its own wait ran out too).
                let blocked: Vec<Uuid> = listed
                    .iter()
                    .filter(|id| !held.contains_key(id))
                    .copied()
                    .collect();
                for (_, a) in asked {
                    let _ = a.word.send(HoldWord::Release);
                }
                let count = held.len();
                release(held);
                let reason = format!(
                    "{} session(s) not at a safe point within the deadline",
                    blocked.len()
                );
                return Err(HoldFailed {
                    blocked,
                    held: count,
                    reason,
                });
            }
            let wake = (Instant::now() + RESCAN).min(deadline);
            let mut acks = Vec::new();
            tokio::select! {
                Some(ack) = held_rx.recv() => {
                    acks.push(ack);
                    // Every ack already queued, before rescanning.
                    while let Ok(ack) = held_rx.try_recv() {
                        acks.push(ack);
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            let mut unmovable = Vec::new();
            for (id, r) in acks {
                let Some(a) = asked.remove(&id) else { continue };
                match r {
                    Ok(()) => {
                        held.insert(
                            id,
                            Held {
                                word: a.word,
                                outcome: a.outcome,
                                control: a.control,
                            },
                        );
                    }
                    // It has released itself; the switchover cannot take it.
                    Err(why) => unmovable.push((id, why)),
                }
            }
            if let Some((first, why)) = unmovable.first().cloned() {
                for (_, a) in asked {
                    let _ = a.word.send(HoldWord::Release);
                }
                let count = held.len();
                release(held);
                let blocked = unmovable.into_iter().map(|(id, _)| id).collect();
                return Err(HoldFailed {
                    blocked,
                    held: count,
                    reason: format!("session {first} cannot be moved: {why}"),
                });
            }
        }
    }

    /// Moves every held session to `to`: (moved, failures, longest pause).
    async fn move_all(&mut self, held: HashMap<Uuid, Held>) -> (usize, Vec<Failure>, Duration) {
        let ctx = self.ctx;
        let to = self.to.name.clone();
        let limit = ctx.config.proxy.connect_timeout * 3 + ctx.config.migration.capture_timeout;
        let mut moves = JoinSet::new();
        for (id, h) in held {
            let _ = h.word.send(HoldWord::MoveTo(to.clone()));
            let to = to.clone();
            moves.spawn(async move {
                let mut outcome = match tokio::time::timeout(limit, h.outcome).await {
                    Ok(Ok(o)) => o,
                    Ok(Err(_)) => TransferOutcome::SessionEnded("session ended".into()),
                    Err(_) => TransferOutcome::RecoverableError("no answer".into()),
                };
                for _ in 1..MOVE_ATTEMPTS {
                    if !matches!(outcome, TransferOutcome::RecoverableError(_)) {
                        break;
                    }
                    tokio::time::sleep(RETRY_AFTER).await;
                    outcome = match request_transfer(&h.control, Some(to.clone()), limit).await {
                        Ok(o) => o,
                        Err(e) => TransferOutcome::SessionEnded(e.to_string()),
                    };
                }
                (id, outcome, h.control)
            });
        }
        let mut moved = 0;
        let mut failures = Vec::new();
        let mut longest = Duration::ZERO;
        while let Some(done) = moves.join_next().await {
            let Ok((id, outcome, control)) = done else {
                continue;
            };
            match outcome {
                TransferOutcome::Success { pause, .. } => {
                    moved += 1;
                    longest = longest.max(pause);
                }
                // Gone by itself (its client left, its backend ended it).
                TransferOutcome::SessionEnded(_) => {}
                TransferOutcome::RecoverableError(reason) => {
                    // Left on a fenced former primary it would fail every
                    // write: closed, between statements, with a clear word.
                    let _ = control.try_send(ControlCommand::Terminate(
                        SessionError::SwitchoverNotMoved(reason.clone()),
                    ));
                    failures.push(Failure { id, reason });
                }
                TransferOutcome::FatalError(reason) => failures.push(Failure { id, reason }),
            }
        }
        failures.sort_by_key(|f| f.id);
        (moved, failures, longest)
    }
}
