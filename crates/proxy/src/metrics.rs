//! The proxy's Prometheus metrics, in one registry that `/metrics` serves.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub client_connections: IntGauge,
    pub client_connections_accepted: IntCounter,
    pub client_connections_rejected: IntCounter,
    pub auth_failures: IntCounter,
    pub backend_connections: IntGaugeVec,
    pub backend_dial_errors: IntCounterVec,
    pub bytes_client_to_server: IntCounter,
    pub bytes_server_to_client: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let bytes = IntCounterVec::new(
            Opts::new("pgferry_bytes_total", "Bytes forwarded, by direction"),
            &["direction"],
        )
        .expect("static metric definition");
        let m = Metrics {
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
            auth_failures: IntCounter::new(
                "pgferry_auth_failures_total",
                "Client authentications that failed (wrong password or unknown user)",
            )
            .expect("static metric definition"),
            backend_connections: IntGaugeVec::new(
                Opts::new(
                    "pgferry_backend_connections",
                    "Open server connections per backend",
                ),
                &["backend"],
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
            registry,
        };
        // Registration only fails on duplicate names, which are static here.
        let r = &m.registry;
        for c in [
            Box::new(m.client_connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.client_connections_accepted.clone()),
            Box::new(m.client_connections_rejected.clone()),
            Box::new(m.auth_failures.clone()),
            Box::new(m.backend_connections.clone()),
            Box::new(m.backend_dial_errors.clone()),
            Box::new(bytes),
        ] {
            r.register(c).expect("unique metric names");
        }
        m
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
