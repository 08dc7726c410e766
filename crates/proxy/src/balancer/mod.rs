//! Keeping sessions spread over the backends: draining one (`drain`),
//! evening out the load (`rebalance`), watching health (`health`), and the
//! background loops that run the last two.
//!
//! Everything here moves a session only by asking it, over its control
//! channel, to transfer itself at its next safe point (`mover`); it never
//! touches a session's sockets.

pub mod drain;
pub mod health;
pub mod mover;
pub mod rebalance;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::info;

use crate::ProxyContext;

/// Which balancer operations are running, so that two of a kind do not
/// fight over the same sessions.
#[derive(Default)]
pub struct BalancerState {
    drains: Mutex<HashSet<String>>,
    rebalancing: tokio::sync::Mutex<()>,
}

impl BalancerState {
    pub fn draining(&self, backend: &str) -> bool {
        self.lock_drains().contains(backend)
    }

    fn lock_drains(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // Single inserts/removes cannot leave the set half-updated.
        self.drains.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs the health checks, and rebalancing when `rebalance_interval` is
/// set, until `stop` turns true.
pub async fn run_background(ctx: Arc<ProxyContext>, stop: watch::Receiver<bool>) {
    let health = tokio::spawn(health::run(ctx.clone(), stop.clone()));
    let sweep = tokio::spawn(crate::failover::remember_sweep(ctx.clone(), stop.clone()));
    if let Some(every) = ctx.config.balancer.rebalance_interval {
        info!(interval = ?every, "automatic rebalancing on");
        rebalance::run_periodically(ctx.clone(), every, stop).await;
    }
    let _ = health.await;
    let _ = sweep.await;
}
