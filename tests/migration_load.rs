//! Migration under load: pgbench, a pipelining client and a large COPY,
//! against two real PostgreSQL clusters.

mod common;

use std::time::{Duration, Instant};

use common::mover::Mover;
use common::*;

#[test]
fn pgbench_prepared_with_a_transfer_of_every_session_every_100ms() {
    let e = env();
    for c in [&e.pg1, &e.pg2] {
        pgbench(c.port(), &["-i", "-s", "1", "-q"]);
    }
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mover = Mover::start(
        proxy.admin,
        |app| app == "pgbench",
        Duration::from_millis(100),
        2000,
    );
    let out = pgbench(
        proxy.port(),
        &["-M", "prepared", "-c", "8", "-j", "2", "-T", "30", "-n"],
    );
    let moves = mover.stop();
    let (ok, fatal) = (moves.ok, moves.fatal);
    let failed = number_after(&out, "number of failed transactions:");
    let processed = number_after(&out, "number of transactions actually processed:");
    assert_eq!(failed, 0.0, "pgbench failures under migration:\n{out}");
    assert!(processed > 0.0);
    assert_eq!(fatal, 0, "fatal migrations");
    let success = proxy.metric("pgferry_conn_migration_success_total");
    let recoverable = proxy.metric("pgferry_conn_migration_error_recoverable_total");
    let fatal_metric = proxy.metric("pgferry_conn_migration_error_fatal_total");
    let attempted = proxy.metric("pgferry_conn_migration_attempted_total");
    eprintln!(
        "pgbench under migration: {processed} transactions, {success} migrations \
         ({recoverable} recoverable errors); {ok} HTTP 200s"
    );
    assert!(success >= 500.0, "only {success} successful migrations");
    assert_eq!(attempted, success + recoverable + fatal_metric);
    assert_eq!(success as usize, ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_client_gets_every_result_in_order_under_migrations_every_50ms() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let (client, conn) = tokio_config(&proxy, USER, PASSWORD)
        .application_name("pipeliner")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let stmt = client
        .prepare("select $1::int4 * 2, inet_server_port()")
        .await
        .expect("prepare");
    let mover = Mover::start(
        proxy.admin,
        |app| app == "pipeliner",
        Duration::from_millis(50),
        5000,
    );
    let mut ports = std::collections::HashSet::new();
    let started = Instant::now();
    let mut batches = 0;
    while started.elapsed() < Duration::from_secs(6) || batches < 3 {
        // 500 queries in flight at once on one connection.
        let futures: Vec<_> = (0..500i32)
            .map(|i| {
                let (client, stmt) = (&client, &stmt);
                async move { (i, client.query_one(stmt, &[&i]).await) }
            })
            .collect();
        for (i, r) in futures_util::future::join_all(futures).await {
            let row = r.unwrap_or_else(|e| panic!("query {i} in batch {batches} failed: {e}"));
            assert_eq!(row.get::<_, i32>(0), i * 2, "result out of order");
            ports.insert(row.get::<_, i32>(1));
        }
        batches += 1;
    }
    let moves = tokio::task::spawn_blocking(move || mover.stop())
        .await
        .expect("join");
    let (ok, fatal) = (moves.ok, moves.fatal);
    assert_eq!(fatal, 0);
    assert!(ok >= 5, "only {ok} migrations happened");
    assert_eq!(ports.len(), 2, "answers came from both backends: {ports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_50mb_delays_the_transfer_until_it_ends() {
    use futures_util::SinkExt;
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let (client, conn) = tokio_config(&proxy, USER, PASSWORD)
        .application_name("copier")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let before: i32 = client
        .query_one("select inet_server_port()", &[])
        .await
        .expect("port")
        .get(0);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS copy_target(line text); TRUNCATE copy_target")
        .await
        .expect("table");
    let sink = client
        .copy_in("COPY copy_target FROM STDIN")
        .await
        .expect("copy in");
    futures_util::pin_mut!(sink);
    let line = format!("{}\n", "x".repeat(99));
    let chunk: bytes::Bytes = line.repeat(10_000).into(); // 1 MB
    for _ in 0..5 {
        sink.send(chunk.clone()).await.expect("send");
    }
    let admin = proxy.admin;
    let id = tokio::task::spawn_blocking(move || sessions_of(admin, "copier"))
        .await
        .expect("join")
        .pop()
        .expect("session listed");
    let pending = tokio::task::spawn_blocking(move || {
        admin_json(
            admin,
            "POST",
            &format!("/v1/connections/{id}/transfer"),
            r#"{"timeout_ms": 120000}"#,
        )
    });
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(10), "transfer pending", || {
            has_session_in_state(admin, "copier", "transferring")
        })
    })
    .await
    .expect("join");
    for _ in 5..50 {
        sink.send(chunk.clone())
            .await
            .expect("send during pending transfer");
    }
    let rows = sink.finish().await.expect("finish copy");
    assert_eq!(rows, 500_000);
    let (status, out) = pending.await.expect("join");
    assert_eq!(status, 200, "{out}");
    let after: i32 = client
        .query_one("select inet_server_port()", &[])
        .await
        .expect("port")
        .get(0);
    assert_ne!(after, before, "session did not move after the copy");
    let count = cluster_by_port(before as u16)
        .psql(DB, "select count(*) from copy_target")
        .expect("count");
    assert_eq!(count, "500000", "the copy finished on the old backend");
}
