//! The connection audit log, written to a real PostgreSQL audit database.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use pgferry_pgcluster::{Cluster, ClusterOptions, StopMode};

/// The audit database shared by tests that do not stop it.
fn shared_audit() -> &'static Cluster {
    static AUDIT: OnceLock<Cluster> = OnceLock::new();
    AUDIT.get_or_init(|| own_audit("audit"))
}

/// A fresh audit database cluster (for tests that stop it or need it empty).
fn own_audit(name: &str) -> Cluster {
    let bins = server_binaries();
    Cluster::start_temp(&bins, ClusterOptions::named(name)).expect("audit cluster")
}

fn audit_section(audit: &Cluster, proxy_id: &str, extra: &str) -> String {
    // Short by default so tests see rows soon; a test may set its own.
    let interval = if extra.contains("flush_interval") {
        ""
    } else {
        "flush_interval = \"200ms\"\n"
    };
    format!(
        "[audit]\nurl = \"host=127.0.0.1 port={} user={} password={} dbname=postgres\"\n\
         proxy_id = \"{proxy_id}\"\n{interval}{extra}\n",
        audit.port(),
        audit.superuser(),
        audit.superuser_password()
    )
}

fn audited_proxy(audit: &Cluster, proxy_id: &str, extra: &str) -> ProxyProcess {
    ProxyProcess::start(ProxyOptions {
        extra_sections: audit_section(audit, proxy_id, extra),
        ..Default::default()
    })
}

fn rows(audit: &Cluster, proxy_id: &str, condition: &str) -> i64 {
    audit
        .psql(
            "postgres",
            &format!(
                "select count(*) from pgferry_connection_log where proxy_id = '{proxy_id}' and ({condition})"
            ),
        )
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

fn wait_for_rows(audit: &Cluster, proxy_id: &str, condition: &str, n: i64, limit: Duration) {
    wait_until(limit, &format!("{n} audit rows where {condition}"), || {
        rows(audit, proxy_id, condition) == n
    });
}

/// Opens and closes `n` connections, `concurrency` at a time, each
/// running one query; returns how many failed.
async fn churn(proxy: &ProxyProcess, n: usize, concurrency: usize, app: &str) -> usize {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let cfg = {
            let mut c = tokio_config(proxy, USER, PASSWORD);
            c.application_name(app);
            c
        };
        tasks.spawn(async move {
            let _permit = permit;
            let (client, conn) = cfg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let conn = tokio::spawn(conn);
            client
                .simple_query("select 1")
                .await
                .map_err(|e| e.to_string())?;
            drop(client);
            conn.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        });
    }
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        if !matches!(r, Ok(Ok(()))) {
            failed += 1;
        }
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_leave_ten_thousand_rows_in_few_statements() {
    let audit = shared_audit();
    let proxy = audited_proxy(audit, "p-10k", "");
    let failed = churn(&proxy, 10_000, 32, "churn").await;
    assert_eq!(failed, 0);
    let p = &proxy;
    tokio::task::block_in_place(|| {
        wait_for_rows(
            audit,
            "p-10k",
            "disconnect_time is not null",
            10_000,
            Duration::from_secs(60),
        );
        assert_eq!(rows(audit, "p-10k", "true"), 10_000);
        let wrong = rows(
            audit,
            "p-10k",
            "connect_time > disconnect_time or user_name <> 'app' or database_name <> 'app' \
             or client_addr <> '127.0.0.1' or backend not in ('pg1', 'pg2') \
             or disconnect_reason <> 'client_closed' or bytes_from_client = 0 or bytes_to_client = 0",
        );
        assert_eq!(wrong, 0, "rows with wrong contents");
        let flushes = p.metric("pgferry_audit_flushes_total");
        let events = p.metric("pgferry_audit_events_total{kind=\"connect\"}")
            + p.metric("pgferry_audit_events_total{kind=\"disconnect\"}");
        assert_eq!(events, 20_000.0);
        assert!(
            flushes > 0.0 && flushes * 50.0 < events,
            "{flushes} flushes for {events} events"
        );
        assert!(p.metric("pgferry_audit_rows_written_total") >= 10_000.0);
        assert_eq!(p.metric("pgferry_audit_rows_dropped_total"), 0.0);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_session_keeps_its_real_connect_time() {
    let audit = shared_audit();
    let proxy = audited_proxy(audit, "p-short", "flush_interval = \"5s\"");
    let before = std::time::SystemTime::now();
    let (client, conn) = tokio_config(&proxy, USER, PASSWORD)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    let conn = tokio::spawn(conn);
    // The session's own lifetime, well inside one flush interval.
    tokio::time::sleep(Duration::from_millis(400)).await;
    client.simple_query("select 1").await.expect("query");
    drop(client);
    conn.await.expect("join").expect("clean close");
    tokio::task::block_in_place(|| {
        wait_for_rows(audit, "p-short", "true", 1, Duration::from_secs(20));
        let lived = audit
            .psql(
                "postgres",
                "select extract(epoch from disconnect_time - connect_time)::float8, \
                 extract(epoch from connect_time)::float8 \
                 from pgferry_connection_log where proxy_id = 'p-short'",
            )
            .expect("row");
        let (lived, connect): (f64, f64) = lived
            .split_once('|')
            .map(|(a, b)| (a.parse().expect("lived"), b.parse().expect("connect")))
            .expect("two columns");
        let before = before
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(lived >= 0.35, "connect and disconnect times {lived}s apart");
        assert!(
            connect >= before - 1.0,
            "connect time is not the session's start"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_update_the_row_and_are_logged_with_their_outcome() {
    let audit = shared_audit();
    let proxy = audited_proxy(audit, "p-mig", "");
    let (client, conn) = tokio_config(&proxy, USER, PASSWORD)
        .application_name("audited-mover")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    let conn = tokio::spawn(conn);
    let id = proxy.connection_by_app("audited-mover")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let admin = proxy.admin;
    let path = format!("/v1/connections/{id}/transfer");
    let (status, moved) = tokio::task::block_in_place(|| admin_json(admin, "POST", &path, ""));
    assert_eq!(status, 200, "{moved}");
    client
        .batch_execute("CREATE TEMP TABLE pinned(v int)")
        .await
        .expect("temp");
    let (status, _) = tokio::task::block_in_place(|| admin_json(admin, "POST", &path, ""));
    assert_eq!(status, 409);
    drop(client);
    conn.await.expect("join").expect("close");
    let to = moved["to"].as_str().expect("to").to_owned();
    tokio::task::block_in_place(|| {
        wait_for_rows(
            audit,
            "p-mig",
            &format!("connection_id = '{id}' and migrations = 1 and backend = '{to}' and disconnect_time is not null"),
            1,
            Duration::from_secs(20),
        );
        let outcomes = audit
            .psql(
                "postgres",
                &format!(
                    "select string_agg(outcome || ':' || coalesce(to_backend, '-'), ',' order by started_at) \
                     from pgferry_migration_log where connection_id = '{id}'"
                ),
            )
            .expect("migration rows");
        assert_eq!(outcomes, format!("success:{to},recoverable_error:-"));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_database_down_for_20s_loses_no_row_and_refuses_no_client() {
    let mut audit = own_audit("audit-down");
    let proxy = audited_proxy(&audit, "p-down", "");
    // The schema exists before the outage.
    let failed = churn(&proxy, 10, 4, "warmup").await;
    assert_eq!(failed, 0);
    tokio::task::block_in_place(|| {
        wait_for_rows(&audit, "p-down", "true", 10, Duration::from_secs(20))
    });
    tokio::task::block_in_place(|| audit.stop(StopMode::Fast)).expect("stop audit db");
    let down_at = Instant::now();
    let failed = churn(&proxy, 2_000, 16, "during-outage").await;
    assert_eq!(
        failed, 0,
        "clients refused while the audit database was down"
    );
    assert!(proxy.metric("pgferry_audit_flush_errors_total") >= 1.0);
    assert!(proxy.metric("pgferry_audit_pending_rows") > 0.0);
    // Keep it down for 20 s in all.
    if let Some(rest) = Duration::from_secs(20).checked_sub(down_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    tokio::task::block_in_place(|| audit.restart()).expect("restart audit db");
    tokio::task::block_in_place(|| {
        wait_for_rows(&audit, "p-down", "true", 2_010, Duration::from_secs(60));
        assert_eq!(
            rows(
                &audit,
                "p-down",
                "application_name = 'during-outage' and disconnect_time is not null"
            ),
            2_000
        );
    });
    assert_eq!(proxy.metric("pgferry_audit_rows_dropped_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_pending_rows_drop_counts_and_reject_refuses_until_recovery() {
    let mut audit = own_audit("audit-bound");
    let drop_proxy = audited_proxy(&audit, "p-drop", "max_pending_rows = 100");
    let reject_proxy = audited_proxy(
        &audit,
        "p-reject",
        "max_pending_rows = 100\non_overflow = \"reject_connections\"",
    );
    assert_eq!(churn(&drop_proxy, 5, 2, "warm").await, 0);
    assert_eq!(churn(&reject_proxy, 5, 2, "warm").await, 0);
    tokio::task::block_in_place(|| {
        wait_for_rows(&audit, "p-drop", "true", 5, Duration::from_secs(20));
        wait_for_rows(&audit, "p-reject", "true", 5, Duration::from_secs(20));
        audit.stop(StopMode::Fast)
    })
    .expect("stop");

    // drop: every client is served, the excess is counted.
    assert_eq!(churn(&drop_proxy, 150, 8, "over").await, 0);
    assert!(drop_proxy.metric("pgferry_audit_rows_dropped_total") >= 50.0);

    // reject: clients get 53300 once 100 rows are held.
    assert_eq!(churn(&reject_proxy, 100, 8, "fill").await, 0);
    let e = connect(&reject_proxy, USER, PASSWORD)
        .await
        .map(|_| ())
        .expect_err("accepted past the bound");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");

    tokio::task::block_in_place(|| audit.restart()).expect("restart");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match connect(&reject_proxy, USER, PASSWORD).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
                assert!(Instant::now() < deadline, "never accepted again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[test]
fn two_proxies_starting_at_once_on_an_empty_database_both_write() {
    let audit = own_audit("audit-race");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| audited_proxy(&audit, "p-a", ""));
        let b = s.spawn(|| audited_proxy(&audit, "p-b", ""));
        (a.join().expect("a"), b.join().expect("b"))
    });
    for p in [&a, &b] {
        let out = psql(
            &p.url(USER, PASSWORD, "sslmode=disable"),
            &["-Atc", "select 1"],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    wait_for_rows(&audit, "p-a", "true", 1, Duration::from_secs(20));
    wait_for_rows(&audit, "p-b", "true", 1, Duration::from_secs(20));
    for p in [&a, &b] {
        assert_eq!(
            p.metric("pgferry_audit_flush_errors_total"),
            0.0,
            "{}",
            p.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_500_connections_writes_all_500_rows() {
    let audit = shared_audit();
    // Nothing is flushed on the interval: the final flush must do it.
    let proxy = audited_proxy(
        audit,
        "p-term",
        "flush_interval = \"1h\"\nbatch_size = 10000",
    );
    assert_eq!(churn(&proxy, 500, 16, "before-term").await, 0);
    let status = tokio::task::block_in_place(|| proxy.terminate());
    assert!(status.success(), "{status:?}");
    assert_eq!(rows(audit, "p-term", "disconnect_time is not null"), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_finished_rows_in_chunks_and_keeps_the_rest() {
    let audit = own_audit("audit-retention");
    let proxy = audited_proxy(
        &audit,
        "p-ret",
        "retention = \"30d\"\nretention_interval = \"200ms\"",
    );
    assert_eq!(churn(&proxy, 3, 1, "recent").await, 0);
    tokio::task::block_in_place(|| {
        wait_for_rows(
            &audit,
            "p-ret",
            "disconnect_time is not null",
            3,
            Duration::from_secs(20),
        );
        // Rows of another replica: old and finished (to delete), old but
        // still connected, and old migration rows.
        audit
            .psql(
                "postgres",
                "INSERT INTO pgferry_connection_log (connection_id, proxy_id, user_name, database_name, \
                   connect_time, disconnect_time, disconnect_reason, updated_at) \
                 SELECT gen_random_uuid(), 'old', 'u', 'd', now() - interval '40 days', \
                   now() - interval '40 days' + interval '1 minute', 'client_closed', now() \
                 FROM generate_series(1, 25000); \
                 INSERT INTO pgferry_connection_log (connection_id, proxy_id, user_name, database_name, \
                   connect_time, updated_at) \
                 SELECT gen_random_uuid(), 'old-open', 'u', 'd', now() - interval '40 days', now() \
                 FROM generate_series(1, 5); \
                 INSERT INTO pgferry_migration_log (id, connection_id, proxy_id, from_backend, started_at, \
                   duration_ms, outcome) \
                 SELECT gen_random_uuid(), gen_random_uuid(), 'old', 'pg1', now() - interval '40 days', 1, 'success' \
                 FROM generate_series(1, 12000)",
            )
            .expect("old rows");
        wait_for_rows(&audit, "old", "true", 0, Duration::from_secs(60));
        wait_until(
            Duration::from_secs(60),
            "old migration rows deleted",
            || {
                audit
                    .psql(
                        "postgres",
                        "select count(*) from pgferry_migration_log where proxy_id = 'old'",
                    )
                    .map(|n| n == "0")
                    .unwrap_or(false)
            },
        );
        assert_eq!(
            rows(&audit, "old-open", "true"),
            5,
            "connections still open are kept"
        );
        assert_eq!(rows(&audit, "p-ret", "true"), 3, "recent rows are kept");
    });
    assert!(proxy.metric("pgferry_audit_rows_expired_total") >= 37_000.0);
}

/// Freezes the audit database: every client backend (pgferry's audit
/// connection among them) and the postmaster, so open connections get no
/// answer and new ones are accepted by the kernel but never served.
/// Thawed when the guards drop.
fn freeze(audit: &Cluster) -> Vec<Frozen> {
    let pids = audit
        .psql(
            "postgres",
            "select coalesce(string_agg(pid::text, ','), '') from pg_stat_activity \
             where backend_type = 'client backend' and pid <> pg_backend_pid()",
        )
        .expect("audit backends");
    let mut frozen: Vec<Frozen> = pids
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| Frozen::new(p.parse().expect("a pid")))
        .collect();
    assert!(
        !frozen.is_empty(),
        "pgferry has no audit connection to freeze"
    );
    frozen.push(Frozen::new(
        audit.pid().expect("audit postmaster running") as i32
    ));
    frozen
}

/// Sessions whose rows reach the audit database, then nothing pending:
/// the state every frozen-database test starts from.
async fn warm_up(audit: &Cluster, proxy: &ProxyProcess, proxy_id: &str) {
    assert_eq!(churn(proxy, 2, 1, "warm").await, 0);
    tokio::task::block_in_place(|| {
        wait_for_rows(
            audit,
            proxy_id,
            "disconnect_time is not null",
            2,
            Duration::from_secs(20),
        );
        wait_until(Duration::from_secs(20), "nothing pending", || {
            proxy.metric("pgferry_audit_pending_rows") == 0.0
        });
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_audit_database_is_a_counted_flush_error_and_its_rows_are_kept() {
    // The audit database is this test's own: freezing it disturbs no one.
    let audit = own_audit("audit-frozen");
    let proxy = audited_proxy(&audit, "p-frozen", "write_timeout = \"1s\"");
    warm_up(&audit, &proxy, "p-frozen").await;
    let frozen = tokio::task::block_in_place(|| freeze(&audit));
    assert_eq!(churn(&proxy, 3, 1, "while-frozen").await, 0);
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(20), "a failed audit flush", || {
            proxy.metric("pgferry_audit_flush_errors_total") > 0.0
        })
    });
    assert!(
        proxy.metric("pgferry_audit_pending_rows") >= 3.0,
        "rows of a timed-out flush are kept"
    );
    assert_eq!(proxy.metric("pgferry_audit_rows_dropped_total"), 0.0);
    let log = proxy.log();
    assert!(
        log.lines()
            .any(|l| l.contains("audit flush failed") && l.contains("did not answer within")),
        "{log}"
    );
    drop(frozen);
    tokio::task::block_in_place(|| {
        wait_for_rows(
            &audit,
            "p-frozen",
            "application_name = 'while-frozen' and disconnect_time is not null",
            3,
            Duration::from_secs(60),
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_audit_database_frozen_exits_in_time_and_logs_unwritten_rows() {
    let audit = own_audit("audit-frozen-term");
    // The default write_timeout (10s) is longer than this deadline: the
    // final flush must give up at the deadline, not at the write timeout.
    let proxy = audited_proxy(&audit, "p-frozen-term", "shutdown_flush_timeout = \"2s\"");
    warm_up(&audit, &proxy, "p-frozen-term").await;
    let frozen = tokio::task::block_in_place(|| freeze(&audit));
    assert_eq!(churn(&proxy, 3, 1, "while-frozen").await, 0);
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(20), "all disconnects recorded", || {
            proxy.metric("pgferry_audit_events_total{kind=\"disconnect\"}") == 5.0
        })
    });
    let log = proxy.log.clone();
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| proxy.terminate());
    let took = started.elapsed();
    let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(status.success(), "{status:?}\n{log}");
    // 2s flush deadline, 1s session shutdown_timeout (no session is
    // open), and a margin for a loaded machine.
    assert!(took < Duration::from_secs(8), "exit took {took:?}\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains("audit rows not written at shutdown"))
        .unwrap_or_else(|| panic!("no unwritten-rows line:\n{log}"));
    assert!(line.contains("ERROR") && line.contains("rows=3"), "{line}");
    drop(frozen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_left_open_by_a_killed_pgferry_are_closed_by_its_successor() {
    let audit = own_audit("audit-restart");
    let first = audited_proxy(&audit, "p-restart", "");
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(connect(&first, USER, PASSWORD).await.expect("connect"));
    }
    tokio::task::block_in_place(|| {
        wait_for_rows(
            &audit,
            "p-restart",
            "disconnect_time is null",
            3,
            Duration::from_secs(20),
        );
        // A session of another pgferry, still open: not ours to close.
        audit
            .psql(
                "postgres",
                "INSERT INTO pgferry_connection_log (connection_id, proxy_id, user_name, \
                   database_name, connect_time, updated_at) \
                 VALUES (gen_random_uuid(), 'p-other', 'u', 'd', now(), now())",
            )
            .expect("other proxy's row");
    });
    // Dropping a ProxyProcess SIGKILLs it: no disconnect is ever written.
    drop(first);
    drop(sessions);
    tokio::task::block_in_place(|| {
        assert_eq!(rows(&audit, "p-restart", "disconnect_time is null"), 3);
    });
    let second = audited_proxy(&audit, "p-restart", "");
    tokio::task::block_in_place(|| {
        wait_for_rows(
            &audit,
            "p-restart",
            "disconnect_reason = 'proxy_restarted' and disconnect_time >= connect_time",
            3,
            Duration::from_secs(20),
        );
        assert_eq!(rows(&audit, "p-restart", "disconnect_time is null"), 0);
        assert_eq!(
            rows(
                &audit,
                "p-other",
                "disconnect_time is null and disconnect_reason is null"
            ),
            1,
            "another proxy's open row was touched"
        );
    });
    assert!(
        second
            .log()
            .lines()
            .any(|l| l.contains("closed audit rows left open") && l.contains("rows=3")),
        "{}",
        second.log()
    );
}
