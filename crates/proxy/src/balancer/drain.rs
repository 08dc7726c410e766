//! Draining a backend: no new sessions, and every session on it moved to
//! the other active backends, a bounded number at a time.
//!
//! Sessions inside a transaction are asked like the others; they move at
//! their next safe point or not before the deadline. A move that fails
//! recoverably is retried after a short pause, and sessions that reach the
//! backend while the drain runs (a login or a migration that chose it
//! just before) are picked up by the next scan.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::task::JoinSet;
use tracing::{info, warn};
use uuid::Uuid;

use super::mover::{request_transfer, MoveError};
use crate::backend::role::TargetSessionAttrs;
use crate::backend::BackendMode;
use crate::forwarder::{ControlSender, TransferOutcome};
use crate::registry::SessionInfo;
use crate::ProxyContext;

/// How often the drain looks for sessions it has not asked yet.
const RESCAN: Duration = Duration::from_millis(50);
/// Pause before asking a session again after a refused move.
const RETRY_AFTER: Duration = Duration::from_millis(200);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DrainError {
    #[error("no such backend {0:?}")]
    UnknownBackend(String),
    #[error("a drain of {0} is already running")]
    AlreadyDraining(String),
}

#[derive(Debug, Clone)]
pub struct DrainReport {
    pub backend: String,
    pub moved: usize,
    /// Sessions whose last move failed (still on the backend, or closed
    /// by a fatal migration error).
    pub failed: usize,
    /// Sessions still on the backend.
    pub remaining: usize,
    pub failures: Vec<(Uuid, String)>,
    pub duration: Duration,
}

/// Marks the drain as running (one per backend) for as long as it lives.
struct DrainGuard<'a> {
    ctx: &'a ProxyContext,
    backend: String,
}

impl<'a> DrainGuard<'a> {
    fn begin(ctx: &'a ProxyContext, backend: &str) -> Result<Self, DrainError> {
        if !ctx.balancer.lock_drains().insert(backend.to_owned()) {
            return Err(DrainError::AlreadyDraining(backend.to_owned()));
        }
        ctx.metrics
            .drain_in_progress
            .with_label_values(&[backend])
            .set(1);
        Ok(Self {
            ctx,
            backend: backend.to_owned(),
        })
    }
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        self.ctx.balancer.lock_drains().remove(&self.backend);
        // A backend removed meanwhile must not get its series back.
        if self.ctx.backends.get(&self.backend).is_some() {
            self.ctx
                .metrics
                .drain_in_progress
                .with_label_values(&[self.backend.as_str()])
                .set(0);
        }
    }
}

type MoveResult = (Uuid, Result<TransferOutcome, MoveError>);

/// Drains `name`, answering when no session is left on it or at
/// `timeout`, whichever comes first.
pub async fn drain(
    ctx: &ProxyContext,
    name: &str,
    timeout: Duration,
) -> Result<DrainReport, DrainError> {
    let backend = ctx
        .backends
        .get(name)
        .ok_or_else(|| DrainError::UnknownBackend(name.to_owned()))?;
    let _guard = DrainGuard::begin(ctx, name)?;
    backend.set_mode(BackendMode::Draining);
    ctx.spares.discard_backend(name);
    let started = Instant::now();
    let deadline = started + timeout;
    let limit = ctx.config.balancer.drain_concurrency;
    info!(backend = name, sessions = backend.sessions(), timeout = ?timeout, "drain started");

    let mut in_flight: JoinSet<MoveResult> = JoinSet::new();
    let mut asked: HashSet<Uuid> = HashSet::new();
    let mut retry_at: HashMap<Uuid, Instant> = HashMap::new();
    let mut failures: HashMap<Uuid, String> = HashMap::new();
    let mut closed: HashSet<Uuid> = HashSet::new();
    let mut moved = 0usize;
    let mut no_target = false;
    // Sessions not yet asked, from the last scan of the registry; scanning
    // per finished move would cost O(n^2) on a big backend.
    let mut queue: Vec<(SessionInfo, ControlSender)> = Vec::new();
    let mut last_scan: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if queue.is_empty() || last_scan.is_none_or(|t| now - t >= RESCAN) {
            last_scan = Some(now);
            let sessions = ctx.registry.on_backend(name);
            // Leases also count sessions still logging in to it.
            if sessions.is_empty() && backend.sessions() == 0 && in_flight.is_empty() {
                break;
            }
            no_target = ctx
                .backends
                .migration_targets(&backend, TargetSessionAttrs::Any)
                .is_empty();
            if no_target {
                for (info, _) in &sessions {
                    failures
                        .entry(info.id)
                        .or_insert_with(|| "no other active backend to move to".into());
                }
            }
            queue = sessions
                .into_iter()
                .filter(|(i, _)| {
                    !asked.contains(&i.id) && retry_at.get(&i.id).is_none_or(|t| *t <= now)
                })
                .collect();
            // Oldest last, so that `pop` takes them first.
            queue.sort_by_key(|(i, _)| std::cmp::Reverse(i.connected_at));
        }
        if now < deadline && !no_target {
            while in_flight.len() < limit {
                let Some((info, control)) = queue.pop() else {
                    break;
                };
                asked.insert(info.id);
                let left = deadline.saturating_duration_since(now);
                in_flight
                    .spawn(async move { (info.id, request_transfer(&control, None, left).await) });
            }
        } else if in_flight.is_empty() {
            break;
        }
        tokio::select! {
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                let Ok((id, result)) = done else { continue };
                asked.remove(&id);
                match result {
                    Ok(TransferOutcome::Success { .. }) => {
                        moved += 1;
                        failures.remove(&id);
                    }
                    Ok(TransferOutcome::RecoverableError(reason)) => {
                        failures.insert(id, reason);
                        retry_at.insert(id, Instant::now() + RETRY_AFTER);
                    }
                    Ok(TransferOutcome::FatalError(reason)) => {
                        failures.insert(id, reason);
                        closed.insert(id);
                    }
                    // Its backend ended it: nothing left to move.
                    Ok(TransferOutcome::SessionEnded(_)) | Err(MoveError::SessionGone) => {
                        failures.remove(&id);
                    }
                    Err(e @ MoveError::NoAnswer) => {
                        failures.insert(id, e.to_string());
                    }
                }
            }
            _ = tokio::time::sleep(RESCAN) => {}
        }
    }
    let still_here: HashSet<Uuid> = ctx
        .registry
        .on_backend(name)
        .into_iter()
        .map(|(i, _)| i.id)
        .collect();
    let remaining = still_here.len().max(backend.sessions());
    // A failure counts if its session is still here or was closed by it;
    // one that ended on its own meanwhile is nobody's failure.
    let mut failures: Vec<(Uuid, String)> = failures
        .into_iter()
        .filter(|(id, _)| still_here.contains(id) || closed.contains(id))
        .collect();
    failures.sort();
    let report = DrainReport {
        backend: name.to_owned(),
        moved,
        failed: failures.len(),
        remaining,
        failures,
        duration: started.elapsed(),
    };
    if remaining == 0 {
        backend.change_mode(BackendMode::Draining, BackendMode::Drained);
        info!(backend = name, moved, duration = ?report.duration, "drain finished: no session left");
    } else {
        warn!(
            backend = name,
            moved,
            failed = report.failed,
            remaining,
            "drain ended with sessions left on the backend; it stays draining"
        );
    }
    Ok(report)
}
