//! Applying a re-read config file (SIGHUP) to a running proxy.
//!
//! Only what can change without a restart is applied: the userlist is
//! re-read (off the runtime's workers, deriving only new or changed
//! entries), backends new in the file are added, and backends the file
//! declared before but no longer does are drained, then removed (as the
//! admin API would). Backends added through the API are the
//! orchestrator's, and stay. Other sections are read at start only. A file
//! that does not load leaves everything as it was.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgferry_auth::UserList;
use tracing::{info, warn};

use crate::backend::{BackendMode, BackendOrigin};
use crate::balancer::drain::drain;
use crate::config::Config;
use crate::{ProxyContext, StartError};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    /// Being drained, then removed, in the background.
    pub removing: Vec<String>,
    pub users: usize,
    /// Plaintext entries whose verifier this reload derived (new or changed).
    pub users_derived: usize,
    /// Plaintext entries kept as they were.
    pub users_reused: usize,
    /// Time the userlist took to load.
    pub userlist_took: Duration,
}

/// Applies `new` (already parsed and validated). Fails, changing nothing,
/// if the userlist it names cannot be loaded.
pub async fn apply(ctx: &Arc<ProxyContext>, new: &Config) -> Result<ReloadSummary, StartError> {
    let started = Instant::now();
    let options = ctx.user_load_options(&new.auth);
    let path = new.auth.userlist.clone();
    // PBKDF2 for every new or changed plaintext entry (seconds for tens of thousands): on a
    // runtime worker it would stall the sessions that worker serves.
    let (users, stats) = tokio::task::spawn_blocking(move || UserList::load(&path, &options))
        .await
        .map_err(|e| StartError::UserListTask(e.to_string()))??;
    let mut summary = ReloadSummary {
        users: users.len(),
        users_derived: stats.derived,
        users_reused: stats.reused,
        userlist_took: started.elapsed(),
        ..Default::default()
    };
    ctx.set_users(users);

    let current = ctx.backends.all();
    for b in &new.backends {
        match current.iter().find(|c| c.name == b.name) {
            None => match ctx.backends.add(
                &b.name,
                &b.address,
                b.cluster.as_deref(),
                b.dialect,
                BackendOrigin::Config,
            ) {
                Ok(_) => summary.added.push(b.name.clone()),
                Err(e) => warn!(backend = %b.name, error = %e, "config reload: cannot add backend"),
            },
            Some(c) if c.dialect_setting != b.dialect => warn!(
                backend = %b.name,
                "config reload: a backend's dialect cannot change in place; \
                 remove it and add it under another name"
            ),
            Some(c) if c.cluster != b.cluster => warn!(
                backend = %b.name,
                "config reload: a backend's cluster cannot change in place; \
                 remove it and add it under another name"
            ),
            Some(c) if c.address != b.address => warn!(
                backend = %b.name,
                old = %c.address,
                new = %b.address,
                "config reload: a backend's address cannot change in place; \
                 remove it and add it under another name"
            ),
            Some(_) => {}
        }
    }
    for c in current.iter() {
        let declared = new.backends.iter().any(|b| b.name == c.name);
        if declared || c.origin != BackendOrigin::Config || ctx.balancer.draining(&c.name) {
            continue;
        }
        summary.removing.push(c.name.clone());
        let (ctx, name) = (ctx.clone(), c.name.clone());
        tokio::spawn(async move { drain_then_remove(&ctx, &name).await });
    }
    if !summary.added.is_empty() {
        crate::transfer::spares::refill_all(ctx);
    }
    Ok(summary)
}

async fn drain_then_remove(ctx: &ProxyContext, name: &str) {
    let timeout = ctx.config.balancer.drain_timeout;
    match drain(ctx, name, timeout).await {
        Ok(report) if report.remaining == 0 => {
            // An activate that came meanwhile means someone wants it.
            let still_drained = ctx
                .backends
                .get(name)
                .is_some_and(|b| b.mode() == BackendMode::Drained && b.sessions() == 0);
            if still_drained && ctx.backends.remove(name).is_some() {
                ctx.spares.discard_backend(name);
                info!(
                    backend = name,
                    moved = report.moved,
                    "config reload: backend removed"
                );
            }
        }
        Ok(report) => warn!(
            backend = name,
            remaining = report.remaining,
            "config reload: sessions are still on the backend after the drain timeout; \
             it stays draining (DELETE /v1/backends/{{name}}?force=true closes them)"
        ),
        Err(e) => warn!(backend = name, error = %e, "config reload: cannot drain backend"),
    }
}
