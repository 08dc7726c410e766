//! Evening out the load: sessions move from the busiest active, healthy
//! backends to the least busy until each is within 15% of the mean (and
//! at least within one session). Sessions moved by the balancer less than
//! `cooldown` ago, and sessions being moved now, are left alone.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};
use uuid::Uuid;

use super::mover::request_transfer;
use crate::backend::dialect::Dialect;
use crate::backend::role::Role;
use crate::forwarder::{ControlSender, TransferOutcome};
use crate::ProxyContext;

/// How far from the mean a backend's session count may be, as a share of
/// the mean.
pub const BAND: f64 = 0.15;

/// One backend's load for planning: its session count and the sessions
/// that may be moved, best candidates first.
#[derive(Debug, Clone)]
pub struct Load {
    pub backend: String,
    pub sessions: usize,
    pub movable: VecDeque<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMove {
    pub id: Uuid,
    pub from: String,
    pub to: String,
}

/// Is every count within the band around the mean?
pub fn balanced(counts: &[usize]) -> bool {
    if counts.is_empty() {
        return true;
    }
    let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
    let band = (BAND * mean).max(1.0);
    counts.iter().all(|&c| (c as f64 - mean).abs() <= band)
}

/// The moves that bring the loads within the band: one at a time from the
/// busiest backend that has a movable session to the least busy one.
pub fn plan(mut loads: Vec<Load>) -> Vec<PlannedMove> {
    let mut moves = Vec::new();
    loop {
        let counts: Vec<usize> = loads.iter().map(|l| l.sessions).collect();
        if balanced(&counts) {
            break;
        }
        let Some(from) = (0..loads.len())
            .filter(|&i| !loads[i].movable.is_empty())
            .max_by_key(|&i| loads[i].sessions)
        else {
            break;
        };
        let Some(to) = (0..loads.len()).min_by_key(|&i| loads[i].sessions) else {
            break;
        };
        // Moving between counts one apart only swaps which one is higher.
        if loads[from].sessions <= loads[to].sessions + 1 {
            break;
        }
        let Some(id) = loads[from].movable.pop_front() else {
            break;
        };
        loads[from].sessions -= 1;
        loads[to].sessions += 1;
        moves.push(PlannedMove {
            id,
            from: loads[from].backend.clone(),
            to: loads[to].backend.clone(),
        });
    }
    moves
}

#[derive(Debug, Clone)]
pub struct MoveReport {
    pub planned: PlannedMove,
    pub outcome: TransferOutcome,
}

#[derive(Debug, Clone, Default)]
pub struct RebalanceReport {
    pub moves: Vec<MoveReport>,
}

impl RebalanceReport {
    pub fn moved(&self) -> usize {
        self.moves
            .iter()
            .filter(|m| matches!(m.outcome, TransferOutcome::Success { .. }))
            .count()
    }
}

/// Plans from the live registry and runs the moves, a bounded number at
/// a time, each waiting at most `timeout` for its session's safe point.
pub async fn rebalance(ctx: &ProxyContext, timeout: Duration) -> RebalanceReport {
    // One rebalance at a time: two would plan from the same counts.
    let _one = ctx.balancer.rebalancing.lock().await;
    let cooldown = ctx.config.balancer.cooldown;
    let mut controls: Vec<(Uuid, ControlSender)> = Vec::new();
    // Standbys and the others are evened out apart (a read-write session
    // never moves to a standby), and so are the dialects (a session moves
    // only between backends of its own).
    let mut groups: Vec<((Dialect, bool), Vec<Load>)> = Vec::new();
    for b in ctx.backends.all().iter().filter(|b| b.accepts_sessions()) {
        let group = (b.move_dialect(), b.role() == Role::Standby);
        let at = match groups.iter().position(|(g, _)| *g == group) {
            Some(at) => at,
            None => {
                groups.push((group, Vec::new()));
                groups.len() - 1
            }
        };
        let loads = &mut groups[at].1;
        let mut sessions = ctx.registry.on_backend(&b.name);
        // Never-moved sessions first, then the longest-settled ones.
        sessions.sort_by_key(|(i, _)| (i.last_migrated.is_some(), i.last_migrated));
        let count = sessions.len();
        let mut movable = VecDeque::new();
        for (info, control) in sessions {
            let cooling = info.last_migrated.is_some_and(|t| t.elapsed() < cooldown);
            if !info.transferring && !cooling {
                movable.push_back(info.id);
                controls.push((info.id, control));
            }
        }
        loads.push(Load {
            backend: b.name.clone(),
            sessions: count,
            movable,
        });
    }
    let planned: Vec<PlannedMove> = groups
        .into_iter()
        .flat_map(|(_, loads)| plan(loads))
        .collect();
    if planned.is_empty() {
        return RebalanceReport::default();
    }
    info!(moves = planned.len(), "rebalancing");
    let limit = Arc::new(Semaphore::new(ctx.config.balancer.drain_concurrency));
    let mut tasks = JoinSet::new();
    for (index, m) in planned.iter().enumerate() {
        let Some(control) = controls
            .iter()
            .find(|(id, _)| *id == m.id)
            .map(|(_, c)| c.clone())
        else {
            continue;
        };
        let (to, limit) = (m.to.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let outcome = match request_transfer(&control, Some(to), timeout).await {
                Ok(o) => o,
                Err(e) => TransferOutcome::RecoverableError(e.to_string()),
            };
            (index, outcome)
        });
    }
    let mut moves: Vec<Option<MoveReport>> = vec![None; planned.len()];
    while let Some(done) = tasks.join_next().await {
        if let Ok((index, outcome)) = done {
            if matches!(outcome, TransferOutcome::Success { .. }) {
                ctx.metrics.rebalance_moves.inc();
            }
            moves[index] = Some(MoveReport {
                planned: planned[index].clone(),
                outcome,
            });
        }
    }
    let report = RebalanceReport {
        moves: moves.into_iter().flatten().collect(),
    };
    info!(
        moved = report.moved(),
        failed = report.moves.len() - report.moved(),
        "rebalance finished"
    );
    report
}

/// Automatic rebalancing every `every` until `stop`.
pub async fn run_periodically(
    ctx: Arc<ProxyContext>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let started = Instant::now();
        let report = rebalance(&ctx, every.min(Duration::from_secs(15))).await;
        let failed = report.moves.len() - report.moved();
        if failed > 0 {
            warn!(failed, took = ?started.elapsed(), "automatic rebalance: some moves failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, n: usize) -> Load {
        Load {
            backend: name.into(),
            sessions: n,
            movable: (0..n).map(|_| Uuid::new_v4()).collect(),
        }
    }

    fn after(loads: &[Load], moves: &[PlannedMove]) -> Vec<usize> {
        loads
            .iter()
            .map(|l| {
                l.sessions + moves.iter().filter(|m| m.to == l.backend).count()
                    - moves.iter().filter(|m| m.from == l.backend).count()
            })
            .collect()
    }

    #[test]
    fn a_new_empty_backend_gets_its_share() {
        let loads = vec![load("pg1", 10), load("pg2", 10), load("pg3", 0)];
        let moves = plan(loads.clone());
        let counts = after(&loads, &moves);
        assert!(balanced(&counts), "{counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), 20);
        assert!(moves.iter().all(|m| m.to == "pg3"), "{moves:?}");
        assert_eq!(moves.len(), 6, "{moves:?}");
    }

    #[test]
    fn balanced_loads_are_left_alone() {
        assert!(plan(vec![load("a", 10), load("b", 11), load("c", 9)]).is_empty());
        assert!(plan(vec![load("a", 1), load("b", 0)]).is_empty());
        assert!(plan(vec![]).is_empty());
    }

    #[test]
    fn sessions_in_cooldown_are_not_moved() {
        let mut busy = load("a", 10);
        busy.movable.truncate(2);
        let loads = vec![busy, load("b", 0)];
        let moves = plan(loads.clone());
        assert_eq!(moves.len(), 2);
        let counts = after(&loads, &moves);
        assert_eq!(counts, vec![8, 2]);
    }

    #[test]
    fn the_band_is_fifteen_percent_of_the_mean_and_at_least_one() {
        assert!(balanced(&[115, 85]));
        assert!(!balanced(&[116, 84]));
        assert!(balanced(&[2, 1, 0]));
        assert!(!balanced(&[3, 0, 0]));
    }
}
