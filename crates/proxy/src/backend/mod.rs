//! Backends: the configured servers, how many sessions each serves, and
//! which one a new session goes to (least connections).

pub mod dial;
pub mod login;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

use crate::config::{split_host_port, BackendConfig};
use crate::metrics::Metrics;

#[derive(Debug)]
pub struct Backend {
    pub name: String,
    /// As configured: `host:port`.
    pub address: String,
    pub host: String,
    pub port: u16,
    sessions: AtomicUsize,
    gauge: IntGauge,
}

impl Backend {
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
}

/// Counts one session on a backend for as long as it lives.
#[derive(Debug)]
pub struct BackendLease {
    backend: Arc<Backend>,
}

impl BackendLease {
    pub fn new(backend: Arc<Backend>) -> Self {
        backend.sessions.fetch_add(1, Ordering::Relaxed);
        backend.gauge.inc();
        Self { backend }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for BackendLease {
    fn drop(&mut self) {
        self.backend.sessions.fetch_sub(1, Ordering::Relaxed);
        self.backend.gauge.dec();
    }
}

#[derive(Debug)]
pub struct BackendSet {
    backends: Vec<Arc<Backend>>,
    rotation: AtomicUsize,
}

impl BackendSet {
    /// `configs` were validated by `Config::parse`.
    pub fn new(configs: &[BackendConfig], metrics: &Metrics) -> Result<Self, String> {
        let mut backends = Vec::with_capacity(configs.len());
        for c in configs {
            let (host, port) = split_host_port(&c.address)?;
            // Create the series now so they read 0 rather than be absent.
            metrics
                .backend_dial_errors
                .with_label_values(&[c.name.as_str()]);
            backends.push(Arc::new(Backend {
                name: c.name.clone(),
                address: c.address.clone(),
                host,
                port,
                sessions: AtomicUsize::new(0),
                gauge: metrics
                    .backend_connections
                    .with_label_values(&[c.name.as_str()]),
            }));
        }
        Ok(Self {
            backends,
            rotation: AtomicUsize::new(0),
        })
    }

    pub fn all(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// Backends in the order a new session should try them: fewest
    /// sessions first, ties broken round-robin so an idle cluster still
    /// spreads its first sessions.
    pub fn candidates(&self) -> Vec<Arc<Backend>> {
        let n = self.backends.len();
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<(usize, usize, Arc<Backend>)> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                (
                    b.sessions(),
                    (i + n - start % n.max(1)) % n.max(1),
                    b.clone(),
                )
            })
            .collect();
        order.sort_by_key(|(s, r, _)| (*s, *r));
        order.into_iter().map(|(_, _, b)| b).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> BackendSet {
        let cfgs: Vec<_> = (0..n)
            .map(|i| BackendConfig {
                name: format!("pg{i}"),
                address: format!("127.0.0.1:{}", 5000 + i),
            })
            .collect();
        BackendSet::new(&cfgs, &Metrics::new()).unwrap()
    }

    #[test]
    fn least_connections_with_round_robin_ties() {
        let s = set(3);
        let mut leases = Vec::new();
        for _ in 0..9 {
            let b = s.candidates()[0].clone();
            leases.push(BackendLease::new(b));
        }
        for b in s.all() {
            assert_eq!(b.sessions(), 3, "{}", b.name);
        }
        // pg0 is the busiest: it comes last.
        leases.push(BackendLease::new(s.get("pg0").unwrap().clone()));
        assert_eq!(s.candidates().last().unwrap().name, "pg0");
        drop(leases);
        assert!(s.all().iter().all(|b| b.sessions() == 0));
    }
}
