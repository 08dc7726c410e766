//! Backends: the servers sessions run on, their state (active, draining,
//! drained, unhealthy), their role (primary, standby: `role`), how many
//! sessions each serves, and which one a new session goes to (least
//! connections among the active, healthy ones its role rules allow).
//!
//! The set changes at run time (admin API, config reload); readers take a
//! snapshot, so a session never holds a lock while it dials or forwards.

pub mod admin_conn;
pub mod dial;
pub mod dialect;
pub mod login;
pub mod role;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use prometheus::IntGauge;
use thiserror::Error;

use crate::config::{split_host_port, BackendConfig};
use crate::metrics::Metrics;
use dialect::{Dialect, DialectSetting};
use role::{Role, TargetSessionAttrs};

/// What the operator asked of a backend; health is tracked apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BackendMode {
    /// Takes new sessions (when healthy).
    Active = 0,
    /// No new sessions; its sessions are being (or were being) moved away.
    Draining = 1,
    /// A drain left no session on it; no new sessions.
    Drained = 2,
}

impl BackendMode {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Draining,
            2 => Self::Drained,
            _ => Self::Active,
        }
    }
}

/// The state reported to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Active,
    Draining,
    Drained,
    Unhealthy,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Drained => "drained",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// Where a backend came from: config reloads only remove the ones the
/// file declared, never those an orchestrator added through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendOrigin {
    Config,
    Api,
}

#[derive(Debug)]
pub struct Backend {
    pub name: String,
    /// As configured: `host:port`.
    pub address: String,
    pub host: String,
    pub port: u16,
    pub origin: BackendOrigin,
    /// Backends of one cluster are a primary and its standbys.
    pub cluster: Option<String>,
    /// As configured; `Auto` is resolved by the first login.
    pub dialect_setting: DialectSetting,
    /// `Dialect as u8`, 0 while unknown.
    dialect: AtomicU8,
    sessions: AtomicUsize,
    role: AtomicU8,
    mode: AtomicU8,
    healthy: AtomicBool,
    dialect_warned: AtomicBool,
    removed: AtomicBool,
    /// Consecutive health-check results of the current streak.
    check_failures: AtomicU32,
    check_successes: AtomicU32,
    gauge: IntGauge,
    up_gauge: IntGauge,
    /// One per role, in `Role::ALL` order.
    role_gauges: [IntGauge; 3],
}

impl Backend {
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    pub fn mode(&self) -> BackendMode {
        BackendMode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    pub fn set_mode(&self, mode: BackendMode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    /// Sets the mode only if it is `from` now (a drain finishing must not
    /// undo an activate that came meanwhile).
    pub fn change_mode(&self, from: BackendMode, to: BackendMode) -> bool {
        self.mode
            .compare_exchange(from as u8, to as u8, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::Relaxed))
    }

    /// The server kind, if configured or seen at a login.
    pub fn dialect(&self) -> Option<Dialect> {
        Dialect::from_u8(self.dialect.load(Ordering::Relaxed))
    }

    /// What a session's moves must speak here; a backend no one has logged
    /// in to yet (impossible for a live session's own) counts as PostgreSQL.
    pub fn move_dialect(&self) -> Dialect {
        self.dialect().unwrap_or(Dialect::Postgres)
    }

    /// Notes what a login found the server to be. A configured dialect
    /// wins; a contradiction is logged once.
    pub fn note_login(&self, seen: Dialect) {
        match self.dialect_setting.fixed() {
            None => {
                let _ = self.dialect.compare_exchange(
                    0,
                    seen as u8,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            Some(fixed) if fixed != seen => {
                if !self.dialect_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        backend = %self.name,
                        configured = fixed.as_str(),
                        seen = seen.as_str(),
                        "backend's configured dialect differs from what its login reports; the configured one is used"
                    );
                }
            }
            Some(_) => {}
        }
    }

    /// Whether a session of `dialect` may move here: the same dialect, or
    /// not known yet (the move's own login then tells, and refuses).
    pub fn speaks(&self, dialect: Dialect) -> bool {
        self.dialect().is_none_or(|d| d == dialect)
    }

    /// Records the role a check (or a promotion) found; the old one.
    pub fn set_role(&self, role: Role) -> Role {
        let old = Role::from_u8(self.role.swap(role as u8, Ordering::Relaxed));
        for (r, g) in Role::ALL.iter().zip(&self.role_gauges) {
            g.set(i64::from(*r == role));
        }
        old
    }

    /// Brings it back at once (a promotion pgferry itself saw succeed).
    pub fn mark_healthy(&self) {
        self.check_failures.store(0, Ordering::Relaxed);
        self.set_healthy(true);
    }

    /// In the same cluster as `other` (a backend without one is alone).
    pub fn same_cluster(&self, other: &Backend) -> bool {
        self.cluster.is_some() && self.cluster == other.cluster
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> BackendState {
        match self.mode() {
            BackendMode::Draining => BackendState::Draining,
            BackendMode::Drained => BackendState::Drained,
            BackendMode::Active if !self.healthy() => BackendState::Unhealthy,
            BackendMode::Active => BackendState::Active,
        }
    }

    /// May new sessions and migrations land here?
    pub fn accepts_sessions(&self) -> bool {
        self.mode() == BackendMode::Active && self.healthy() && !self.is_removed()
    }

    /// Records one health-check result; returns the new health when it
    /// changed (after `down_after` failures or `up_after` successes in a row).
    pub fn record_check(&self, ok: bool, down_after: u32, up_after: u32) -> Option<bool> {
        let healthy = self.healthy();
        if ok {
            self.check_failures.store(0, Ordering::Relaxed);
            let n = self.check_successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !healthy && n >= up_after {
                self.set_healthy(true);
                return Some(true);
            }
        } else {
            self.check_successes.store(0, Ordering::Relaxed);
            let n = self.check_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if healthy && n >= down_after {
                self.set_healthy(false);
                return Some(false);
            }
        }
        None
    }

    /// The server answered a login with 57P03 (starting up, shutting down,
    /// not yet accepting connections): out of the candidates at once, not
    /// after `unhealthy_threshold` checks; the health check brings it back.
    /// True if it was healthy until now.
    pub fn refuses_logins(&self) -> bool {
        self.check_successes.store(0, Ordering::Relaxed);
        let was = self.healthy();
        if was {
            self.set_healthy(false);
        }
        was
    }

    fn set_healthy(&self, on: bool) {
        self.healthy.store(on, Ordering::Relaxed);
        self.up_gauge.set(i64::from(on));
    }
}

/// Counts one session on a backend for as long as it lives. A warm spare
/// connection holds an idle lease, which counts for nothing until a
/// migration takes it.
#[derive(Debug)]
pub struct BackendLease {
    backend: Arc<Backend>,
    counted: bool,
}

impl BackendLease {
    /// Counts from now: taken before dialing, so sessions still logging
    /// in steer the next least-connections choice (a burst of new clients
    /// spreads instead of landing on one backend).
    pub fn new(backend: Arc<Backend>) -> Self {
        backend.sessions.fetch_add(1, Ordering::Relaxed);
        backend.gauge.inc();
        Self {
            backend,
            counted: true,
        }
    }

    /// Counts for nothing (a warm spare being opened).
    pub fn idle(backend: Arc<Backend>) -> Self {
        Self {
            backend,
            counted: false,
        }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Counts again (a spare becomes a session's connection).
    pub fn into_counted(mut self) -> Self {
        if !self.counted {
            self.backend.sessions.fetch_add(1, Ordering::Relaxed);
            self.backend.gauge.inc();
            self.counted = true;
        }
        self
    }

    fn uncount(&mut self) {
        self.backend.sessions.fetch_sub(1, Ordering::Relaxed);
        self.backend.gauge.dec();
        self.counted = false;
    }
}

impl Drop for BackendLease {
    fn drop(&mut self) {
        if self.counted {
            self.uncount();
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddBackendError {
    #[error("a backend named {0:?} exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
}

pub struct BackendSet {
    /// Replaced whole on every change; readers clone the `Arc`.
    list: RwLock<Arc<Vec<Arc<Backend>>>>,
    rotation: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for BackendSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.all().iter()).finish()
    }
}

impl BackendSet {
    /// `configs` were validated by `Config::parse`.
    pub fn new(configs: &[BackendConfig], metrics: Arc<Metrics>) -> Result<Self, String> {
        let set = Self {
            list: RwLock::new(Arc::new(Vec::new())),
            rotation: AtomicUsize::new(0),
            metrics,
        };
        for c in configs {
            set.add(
                &c.name,
                &c.address,
                c.cluster.as_deref(),
                c.dialect,
                BackendOrigin::Config,
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(set)
    }

    /// Every backend, in the order they were added.
    pub fn all(&self) -> Arc<Vec<Arc<Backend>>> {
        // Replacing the Vec cannot leave it half-written.
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Backend>> {
        self.all().iter().find(|b| b.name == name).cloned()
    }

    pub fn add(
        &self,
        name: &str,
        address: &str,
        cluster: Option<&str>,
        dialect: DialectSetting,
        origin: BackendOrigin,
    ) -> Result<Arc<Backend>, AddBackendError> {
        if cluster.is_some_and(|c| c.is_empty() || c.len() > 63) {
            return Err(AddBackendError::Invalid(
                "cluster must be 1 to 63 characters".into(),
            ));
        }
        if name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_control()) {
            return Err(AddBackendError::Invalid(
                "name must be 1 to 63 printable characters".into(),
            ));
        }
        let (host, port) = split_host_port(address).map_err(AddBackendError::Invalid)?;
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        if list.iter().any(|b| b.name == name) {
            return Err(AddBackendError::Exists(name.to_owned()));
        }
        let m = &self.metrics;
        // Create the series now so they read 0 rather than be absent.
        m.backend_dial_errors.with_label_values(&[name]);
        m.drain_in_progress.with_label_values(&[name]).set(0);
        let up_gauge = m.backend_up.with_label_values(&[name]);
        up_gauge.set(1);
        let role_gauges = Role::ALL.map(|r| m.backend_role.with_label_values(&[name, r.as_str()]));
        role_gauges[0].set(1);
        let backend = Arc::new(Backend {
            name: name.to_owned(),
            address: address.to_owned(),
            host,
            port,
            origin,
            cluster: cluster.map(str::to_owned),
            dialect_setting: dialect,
            dialect: AtomicU8::new(dialect.fixed().map_or(0, |d| d as u8)),
            dialect_warned: AtomicBool::new(false),
            sessions: AtomicUsize::new(0),
            role: AtomicU8::new(Role::Unknown as u8),
            mode: AtomicU8::new(BackendMode::Active as u8),
            // Healthy until checks say otherwise: a new backend must not
            // wait a check interval before it can serve.
            healthy: AtomicBool::new(true),
            removed: AtomicBool::new(false),
            check_failures: AtomicU32::new(0),
            check_successes: AtomicU32::new(0),
            gauge: m.backend_sessions.with_label_values(&[name]),
            up_gauge,
            role_gauges,
        });
        let mut next = Vec::clone(&list);
        next.push(backend.clone());
        *list = Arc::new(next);
        Ok(backend)
    }

    /// Takes the backend out of the set. Sessions still on it keep running
    /// (they hold their own reference); it gets no new ones.
    pub fn remove(&self, name: &str) -> Option<Arc<Backend>> {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        let gone = list.iter().find(|b| b.name == name).cloned()?;
        gone.removed.store(true, Ordering::Relaxed);
        let next: Vec<_> = list.iter().filter(|b| b.name != name).cloned().collect();
        *list = Arc::new(next);
        let m = &self.metrics;
        let _ = m.backend_sessions.remove_label_values(&[name]);
        let _ = m.backend_up.remove_label_values(&[name]);
        let _ = m.backend_dial_errors.remove_label_values(&[name]);
        let _ = m.drain_in_progress.remove_label_values(&[name]);
        for r in Role::ALL {
            let _ = m.backend_role.remove_label_values(&[name, r.as_str()]);
        }
        Some(gone)
    }

    /// Backends in the order a new session with `attrs` should try them:
    /// the active, healthy ones its role rules allow, fewest sessions
    /// first, ties broken round-robin so an idle cluster still spreads its
    /// first sessions (standbys before the others for `prefer-standby`).
    /// Active backends whose health check fails come last, as a last
    /// resort: a check can lag, and trying costs less than refusing the
    /// client for sure.
    pub fn candidates(&self, attrs: TargetSessionAttrs) -> Vec<Arc<Backend>> {
        let all = self.all();
        // One step of the rotation per choice: stepping once per list would
        // bring a two-backend set back to the same tie order every time.
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let mut order = Vec::new();
        if attrs == TargetSessionAttrs::PreferStandby {
            order = least_loaded(&all, start, |b| {
                b.accepts_sessions() && b.role() == Role::Standby
            });
        }
        for b in least_loaded(&all, start, |b| {
            b.accepts_sessions() && attrs.allows(b.role())
        }) {
            if !order.iter().any(|o| Arc::ptr_eq(o, &b)) {
                order.push(b);
            }
        }
        order.extend(least_loaded(&all, start, |b| {
            b.mode() == BackendMode::Active
                && !b.healthy()
                && !b.is_removed()
                && attrs.allows(b.role())
        }));
        order
    }

    /// Where a session with `attrs` on `current` may be moved: active,
    /// healthy, other, of a role it may run on.
    pub fn migration_targets(
        &self,
        current: &Backend,
        attrs: TargetSessionAttrs,
    ) -> Vec<Arc<Backend>> {
        let all = self.all();
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        least_loaded(&all, start, |b| {
            b.accepts_sessions()
                && b.name != current.name
                && attrs.allows(b.role())
                && b.speaks(current.move_dialect())
        })
    }

    /// The primaries of `cluster` that take sessions, `last` (the one
    /// that just went away, back by now or not) after the others.
    pub fn primaries_of(&self, cluster: &str, last: &str) -> Vec<Arc<Backend>> {
        let mut found: Vec<Arc<Backend>> = self
            .all()
            .iter()
            .filter(|b| {
                b.cluster.as_deref() == Some(cluster)
                    && b.role() == Role::Primary
                    && b.accepts_sessions()
            })
            .cloned()
            .collect();
        found.sort_by_key(|b| b.name == last);
        found
    }
}

/// The backends `keep` accepts, fewest sessions first; ties in the order
/// of the list rotated by `start`.
fn least_loaded(
    all: &[Arc<Backend>],
    start: usize,
    keep: impl Fn(&Backend) -> bool,
) -> Vec<Arc<Backend>> {
    let n = all.len().max(1);
    let start = start % n;
    let mut order: Vec<(usize, usize, Arc<Backend>)> = all
        .iter()
        .enumerate()
        .filter(|(_, b)| keep(b))
        .map(|(i, b)| (b.sessions(), (i + n - start) % n, b.clone()))
        .collect();
    order.sort_by_key(|(s, r, _)| (*s, *r));
    order.into_iter().map(|(_, _, b)| b).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> BackendSet {
        let cfgs: Vec<_> = (0..n)
            .map(|i| BackendConfig {
                name: format!("pg{i}"),
                address: format!("127.0.0.1:{}", 5000 + i),
                cluster: None,
                dialect: DialectSetting::Auto,
            })
            .collect();
        BackendSet::new(&cfgs, Arc::new(Metrics::new())).unwrap()
    }

    #[test]
    fn least_connections_with_round_robin_ties() {
        let s = set(3);
        let mut leases = Vec::new();
        for _ in 0..9 {
            let b = s.candidates(TargetSessionAttrs::ReadWrite)[0].clone();
            leases.push(BackendLease::new(b));
        }
        for b in s.all().iter() {
            assert_eq!(b.sessions(), 3, "{}", b.name);
        }
        // pg0 is the busiest: it comes last.
        leases.push(BackendLease::new(s.get("pg0").unwrap()));
        assert_eq!(
            s.candidates(TargetSessionAttrs::ReadWrite)
                .last()
                .unwrap()
                .name,
            "pg0"
        );
        drop(leases);
        assert!(s.all().iter().all(|b| b.sessions() == 0));
    }

    #[test]
    fn ties_alternate_between_two_backends() {
        let s = set(2);
        let firsts: Vec<_> = (0..4)
            .map(|_| s.candidates(TargetSessionAttrs::ReadWrite)[0].name.clone())
            .collect();
        assert_eq!(firsts, ["pg0", "pg1", "pg0", "pg1"]);
    }

    #[test]
    fn draining_and_removed_backends_get_no_sessions_unhealthy_only_as_last_resort() {
        let s = set(3);
        s.get("pg0").unwrap().set_mode(BackendMode::Draining);
        let pg1 = s.get("pg1").unwrap();
        assert_eq!(pg1.record_check(false, 3, 2), None);
        assert_eq!(pg1.record_check(false, 3, 2), None);
        assert_eq!(pg1.record_check(false, 3, 2), Some(false));
        assert_eq!(pg1.state(), BackendState::Unhealthy);
        let names: Vec<_> = s
            .candidates(TargetSessionAttrs::ReadWrite)
            .iter()
            .map(|b| b.name.clone())
            .collect();
        assert_eq!(names, ["pg2", "pg1"]);
        assert_eq!(
            s.migration_targets(&s.get("pg0").unwrap(), TargetSessionAttrs::ReadWrite)
                .len(),
            1
        );
        assert!(s.remove("pg2").is_some());
        let names: Vec<_> = s
            .candidates(TargetSessionAttrs::ReadWrite)
            .iter()
            .map(|b| b.name.clone())
            .collect();
        assert_eq!(names, ["pg1"]);
        assert!(s
            .migration_targets(&s.get("pg0").unwrap(), TargetSessionAttrs::ReadWrite)
            .is_empty());
        // Two successes bring it back.
        assert_eq!(pg1.record_check(true, 3, 2), None);
        assert_eq!(pg1.record_check(true, 3, 2), Some(true));
        assert_eq!(pg1.state(), BackendState::Active);
    }

    #[test]
    fn read_write_sessions_avoid_standbys_read_only_ones_need_them() {
        let s = set(3);
        s.get("pg0").unwrap().set_role(Role::Primary);
        s.get("pg1").unwrap().set_role(Role::Standby);
        let names = |v: Vec<Arc<Backend>>| v.iter().map(|b| b.name.clone()).collect::<Vec<_>>();
        let rw = names(s.candidates(TargetSessionAttrs::ReadWrite));
        assert!(!rw.contains(&"pg1".to_owned()) && rw.len() == 2, "{rw:?}");
        assert_eq!(names(s.candidates(TargetSessionAttrs::ReadOnly)), ["pg1"]);
        assert_eq!(
            s.candidates(TargetSessionAttrs::PreferStandby)[0].name,
            "pg1"
        );
        assert_eq!(s.candidates(TargetSessionAttrs::Any).len(), 3);
        assert!(
            !names(s.migration_targets(&s.get("pg0").unwrap(), TargetSessionAttrs::ReadWrite))
                .contains(&"pg1".to_owned())
        );
    }

    #[test]
    fn health_needs_a_streak() {
        let s = set(1);
        let b = s.get("pg0").unwrap();
        assert_eq!(b.record_check(false, 3, 2), None);
        assert_eq!(b.record_check(false, 3, 2), None);
        assert_eq!(b.record_check(true, 3, 2), None, "streak broken");
        assert_eq!(b.record_check(false, 3, 2), None);
        assert_eq!(b.record_check(false, 3, 2), None);
        assert_eq!(b.record_check(false, 3, 2), Some(false));
        assert_eq!(b.record_check(false, 3, 2), None, "already down");
        assert_eq!(b.record_check(true, 3, 2), None);
        assert_eq!(b.record_check(false, 3, 2), None);
        assert_eq!(b.record_check(true, 3, 2), None);
        assert_eq!(b.record_check(true, 3, 2), Some(true));
    }

    #[test]
    fn add_rejects_duplicates_and_bad_addresses() {
        let s = set(1);
        assert_eq!(
            s.add(
                "pg0",
                "127.0.0.1:1",
                None,
                DialectSetting::Auto,
                BackendOrigin::Api
            )
            .unwrap_err(),
            AddBackendError::Exists("pg0".into())
        );
        assert!(matches!(
            s.add(
                "pg9",
                "nope",
                None,
                DialectSetting::Auto,
                BackendOrigin::Api
            ),
            Err(AddBackendError::Invalid(_))
        ));
        assert!(matches!(
            s.add(
                "",
                "127.0.0.1:1",
                None,
                DialectSetting::Auto,
                BackendOrigin::Api
            ),
            Err(AddBackendError::Invalid(_))
        ));
        let b = s
            .add(
                "pg9",
                "127.0.0.1:9",
                None,
                DialectSetting::Auto,
                BackendOrigin::Api,
            )
            .unwrap();
        assert_eq!(b.state(), BackendState::Active);
        assert_eq!(s.all().len(), 2);
    }
}
