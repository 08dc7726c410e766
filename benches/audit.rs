//! Audit batcher throughput: connect + disconnect events for N connections
//! recorded as fast as possible, merged and written by the real batcher to
//! a local PostgreSQL 15.
//!
//!   cargo bench --bench audit                      # 100,000 connections
//!   CONNECTIONS=300000 cargo bench --bench audit
//!   PGFERRY_BENCH_SMOKE=1 cargo bench --bench audit  # 2,000, checks the rows
//!   cargo test --bench audit                         # the same smoke run (in the suite)

use std::time::{Duration, Instant, SystemTime};

use pgferry_audit::{
    AuditHandle, AuditMetrics, AuditSettings, Batcher, ConnectInfo, Overflow, PgSink,
};
use pgferry_pgcluster::{Cluster, ClusterOptions, ServerBinaries};

fn main() {
    // `cargo test` (the suite) runs bench targets without --bench: smoke.
    let smoke = std::env::var("PGFERRY_BENCH_SMOKE").is_ok_and(|v| v == "1")
        || !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke {
        2_000
    } else {
        std::env::var("CONNECTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000)
    };
    let bins = ServerBinaries::find().expect("server binaries");
    let db = Cluster::start_temp(&bins, ClusterOptions::named("auditbench")).expect("cluster");
    let url = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=postgres",
        db.port(),
        db.superuser(),
        db.superuser_password()
    );
    let settings = AuditSettings {
        url: url.clone(),
        schema: None,
        proxy_id: "bench".into(),
        flush_interval: Duration::from_millis(100),
        batch_size: 1000,
        max_pending_rows: 1_000_000,
        on_overflow: Overflow::Drop,
        shutdown_flush_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(60),
        retention: None,
        retention_interval: Duration::from_secs(60),
    };
    let registry = prometheus::Registry::new();
    let metrics = AuditMetrics::register(&registry).expect("metrics");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let handle = AuditHandle::new(&settings, metrics.clone());
        let mut sink = PgSink::new(&url, None, "bench", settings.write_timeout).expect("sink");
        sink.ensure_ready().await.expect("schema");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let batcher = tokio::spawn(
            Batcher::new(handle.clone(), sink, &settings, metrics.clone()).run(stop_rx),
        );

        let started = Instant::now();
        for _ in 0..n {
            let id = uuid::Uuid::new_v4();
            let now = SystemTime::now();
            handle.connect(ConnectInfo {
                id,
                at: now,
                client_addr: Some([127, 0, 0, 1].into()),
                user: "app".into(),
                database: "app".into(),
                application_name: Some("bench".into()),
            });
            handle.backend(id, "pg1");
            handle.disconnect(id, now, "client_closed", 120, 4_000);
        }
        let recorded = started.elapsed();
        while handle.pending() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let written = started.elapsed();
        let _ = stop_tx.send(true);
        let _ = batcher.await;
        let events = 3 * n;
        let rows = db
            .psql("postgres", "select count(*) from pgferry_connection_log")
            .expect("count");
        assert_eq!(rows, n.to_string(), "every connection has its row");
        println!("audit batcher: {n} connections, {events} events (connect, backend, disconnect)");
        println!("| measure | value |");
        println!("|---|---:|");
        println!(
            "| recording (in memory) | {:.0} events/s |",
            events as f64 / recorded.as_secs_f64()
        );
        println!(
            "| recorded to written | {:.0} events/s, {:.0} rows/s |",
            events as f64 / written.as_secs_f64(),
            n as f64 / written.as_secs_f64()
        );
        println!("| time until every row was written | {:.2?} |", written);
        println!("| flushes (1 statement each) | {} |", metrics.flushes.get());
        println!(
            "| rows per flush | {:.0} |",
            n as f64 / metrics.flushes.get().max(1) as f64
        );
        println!(
            "| mean flush time | {:.1} ms |",
            metrics.flush_duration.get_sample_sum() * 1000.0
                / metrics.flush_duration.get_sample_count().max(1) as f64
        );
    });
}
