//! A client must not be able to tell pgferry is there, least of all while
//! it moves the session: unsynced pipelines, Terminate, the server's own
//! FATALs, cancel requests during a move, the backend's process id, the
//! unnamed statement, protocol negotiation. Real pgferry, real PostgreSQL
//! 15 servers; the client is `common::raw` where the exact message order is
//! the point (drivers are proven by the driver matrix).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::raw::{self, RawClient};
use common::*;

fn raw_client(proxy: &ProxyProcess, app: &str) -> RawClient {
    RawClient::connect(proxy.addr, USER, PASSWORD, DB, app)
}

/// Asks for a transfer of the session named `app` on a thread of its own;
/// the handle gives (status, body).
fn transfer_async(
    proxy: &ProxyProcess,
    app: &str,
    timeout_ms: u64,
) -> std::thread::JoinHandle<(u16, serde_json::Value)> {
    let id = proxy.connection_by_app(app)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let admin = proxy.admin;
    std::thread::spawn(move || {
        admin_json(
            admin,
            "POST",
            &format!("/v1/connections/{id}/transfer"),
            &format!("{{\"timeout_ms\": {timeout_ms}}}"),
        )
    })
}

/// A raw client named `app` and the server process serving it.
fn client_and_server_pid(
    proxy: &ProxyProcess,
    app: &str,
) -> (RawClient, &'static pgferry_pgcluster::Cluster, i32) {
    let mut c = raw_client(proxy, app);
    // A session that has spoken: its move runs the capture on the old
    // backend (one that never did moves on its login state, without a
    // word to the old backend).
    assert_eq!(c.value("SELECT 1"), "1");
    let cluster = backend_of(proxy, app);
    let pid = server_pid(cluster, app);
    (c, cluster, pid)
}

fn wait_for_state(proxy: &ProxyProcess, app: &str, state: &str) {
    wait_until(Duration::from_secs(20), state, || {
        has_session_in_state(proxy.admin, app, state)
    });
}

fn count_on_both(table: &str) -> (String, String) {
    let e = env();
    let q = format!("SELECT count(*) FROM {table}");
    (
        e.pg1.psql(DB, &q).expect("count pg1").trim().to_owned(),
        e.pg2.psql(DB, &q).expect("count pg2").trim().to_owned(),
    )
}

fn create_on_both(sql: &str) {
    let e = env();
    for c in [&e.pg1, &e.pg2] {
        c.psql(DB, sql).expect("create table");
    }
}

#[test]
fn a_move_asked_for_after_a_flush_waits_for_sync_and_the_failed_batch_rolls_back() {
    create_on_both("CREATE TABLE IF NOT EXISTS pipeline_t (v int); GRANT ALL ON pipeline_t TO app");
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mut c = raw_client(&proxy, "pipeline");
    // First half of one implicit transaction, flushed but not synced.
    c.send(
        &[
            raw::parse("", "INSERT INTO pipeline_t VALUES (1)", &[]),
            raw::bind("", &[]),
            raw::execute(),
            raw::flush(),
        ]
        .concat(),
    );
    assert_eq!(raw::tags(&c.recv_until(b'C')), "12C");
    let mover = transfer_async(&proxy, "pipeline", 10_000);
    // Not a safe point: the transfer must wait (not capture, which would
    // commit the open implicit transaction).
    wait_for_state(&proxy, "pipeline", "transferring");
    c.send(
        &[
            raw::parse("", "INSERT INTO pipeline_t VALUES (1/0)", &[]),
            raw::bind("", &[]),
            raw::execute(),
            raw::sync(),
        ]
        .concat(),
    );
    let answer = c.recv_until(b'Z');
    let err = answer.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(err.sqlstate().as_deref(), Some("22012"));
    let (status, body) = mover.join().expect("mover");
    assert_eq!(status, 200, "the move happens after the Sync: {body}");
    assert_eq!(c.value("SELECT count(*) FROM pipeline_t"), "0");
    assert_eq!(
        count_on_both("pipeline_t"),
        ("0".into(), "0".into()),
        "the failed batch left a row"
    );
}

#[test]
fn a_session_that_sent_terminate_is_never_moved() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let (mut c, _, pid) = client_and_server_pid(&proxy, "leaving");
    {
        // The server has not read the Terminate yet: to pgferry the session
        // looks idle.
        let _frozen = Frozen::new(pid);
        c.send(&raw::terminate());
        wait_until(Duration::from_secs(10), "Terminate forwarded", || {
            proxy.metric("pgferry_bytes_total{direction=\"client_to_server\"}") >= 5.0
        });
        let (status, body) = transfer_async(&proxy, "leaving", 5_000)
            .join()
            .expect("mover");
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["reason"], "session is closing");
    }
    assert_eq!(
        proxy.metric("pgferry_conn_migration_error_fatal_total"),
        0.0
    );
    assert!(c.try_recv().is_none(), "the session ends quietly");
}

#[test]
fn a_kill_as_the_move_starts_reaches_the_client_as_the_servers_own_error() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let (mut c, cluster, pid) = client_and_server_pid(&proxy, "killed");
    let mover;
    {
        let _frozen = Frozen::new(pid);
        // The kill is pending in the frozen process; the capture query
        // reaches it before it runs.
        assert_eq!(
            cluster
                .psql(
                    "postgres",
                    &format!("SELECT pg_terminate_backend({pid}, 0)")
                )
                .expect("terminate")
                .trim(),
            "t"
        );
        mover = transfer_async(&proxy, "killed", 5_000);
        wait_for_state(&proxy, "killed", "transferring");
    }
    let (status, body) = mover.join().expect("mover");
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["outcome"], "session_ended");
    let m = c.recv();
    assert_eq!(m.tag, b'E');
    assert_eq!(
        m.sqlstate().as_deref(),
        Some("57P01"),
        "{:?}",
        m.field(b'M')
    );
    assert_eq!(
        m.field(b'M').as_deref(),
        Some("terminating connection due to administrator command")
    );
    assert!(c.try_recv().is_none(), "one error, then the end");
    assert_eq!(
        proxy.metric("pgferry_conn_migration_error_fatal_total"),
        0.0
    );
    assert_eq!(
        proxy.metric("pgferry_conn_migration_session_ended_total"),
        1.0
    );
}

#[test]
fn a_kill_while_the_move_is_in_flight_ends_the_session_with_the_servers_error() {
    // The target of this move is a cluster of the test's own, whose
    // postmaster is frozen to hold the move between capture and swap.
    let target = own_cluster("inflight");
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![
            ("pg1".into(), env().pg1.addr().to_string()),
            ("slow".into(), target.addr().to_string()),
        ],
        ..Default::default()
    });
    // Both backends are empty: the first session goes to pg1 only if
    // slow is busier, so make sure by asking.
    let mut c = raw_client(&proxy, "inflight");
    if proxy.connection_by_app("inflight")["backend"] != "pg1" {
        let (status, body) = transfer_async(&proxy, "inflight", 5_000)
            .join()
            .expect("mover");
        assert_eq!(status, 200, "{body}");
    }
    // Spoken: the move captures.
    assert_eq!(c.value("SELECT 1"), "1");
    let pid = server_pid(&env().pg1, "inflight");
    let captures = || proxy.metric("pgferry_conn_migration_phase_seconds_count{phase=\"capture\"}");
    let before = captures();
    let mover;
    {
        let _frozen = Frozen::new(target.pid().expect("postmaster") as i32);
        mover = transfer_async(&proxy, "inflight", 5_000);
        wait_until(Duration::from_secs(10), "capture done", || {
            captures() > before
        });
        // Captured, still dialing the frozen target: the kill lands now.
        assert_eq!(
            env()
                .pg1
                .psql(
                    "postgres",
                    &format!("SELECT pg_terminate_backend({pid}, 5000)")
                )
                .expect("terminate")
                .trim(),
            "t"
        );
    }
    let (status, body) = mover.join().expect("mover");
    assert_eq!(status, 410, "{body}");
    let m = c.recv();
    assert_eq!(
        m.sqlstate().as_deref(),
        Some("57P01"),
        "{:?}",
        m.field(b'M')
    );
    assert!(
        c.try_recv().is_none(),
        "the session must not live on elsewhere"
    );
}

#[test]
fn a_cancel_during_a_move_waits_and_never_cancels_the_capture() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let (mut c, _, pid) = client_and_server_pid(&proxy, "cancelled");
    let mover;
    let canceller;
    {
        let _frozen = Frozen::new(pid);
        mover = transfer_async(&proxy, "cancelled", 10_000);
        wait_for_state(&proxy, "cancelled", "transferring");
        let (addr, key_pid, secret): (SocketAddr, i32, i32) = (proxy.addr, c.pid, c.secret);
        canceller = std::thread::spawn(move || raw::send_cancel(addr, key_pid, secret));
        wait_until(Duration::from_secs(10), "cancel held", || {
            proxy
                .log()
                .contains("cancel request held while its session moves")
        });
    }
    let (status, body) = mover.join().expect("mover");
    assert_eq!(status, 200, "the capture must not be cancelled: {body}");
    canceller.join().expect("canceller");
    // The session is fine where it went.
    assert_eq!(c.value("SELECT 41 + 1"), "42");
}

#[test]
fn the_client_sees_the_servers_process_id_and_cancels_still_reach_a_moved_session() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mut c = raw_client(&proxy, "pid");
    assert_eq!(c.value("SELECT pg_backend_pid()"), c.pid.to_string());
    let first = backend_of(&proxy, "pid");
    assert_eq!(server_pid(first, "pid"), c.pid);
    let (status, body) = transfer_async(&proxy, "pid", 5_000).join().expect("mover");
    assert_eq!(status, 200, "{body}");
    // A key with the right pid and a wrong secret cancels nothing. (Asked
    // before the real cancel: a cancel signal that lands just as its query
    // ends can stay pending in PostgreSQL and hit the next query.)
    c.send(&raw::query("SELECT pg_sleep(0.5), 1"));
    raw::send_cancel(proxy.addr, c.pid, c.secret.wrapping_add(1));
    let answer = c.recv_until(b'Z');
    assert!(answer.iter().all(|m| m.tag != b'E'), "{answer:?}");
    // After a move the pid names the first backend (docs/migration.md); a
    // cancel with the client's key reaches the query where it runs now.
    c.send(&raw::query("SELECT pg_sleep(60)"));
    let running = backend_of(&proxy, "pid");
    wait_until(Duration::from_secs(10), "query running", || {
        running
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pid' AND state = 'active'",
            )
            .is_ok_and(|n| n.trim() == "1")
    });
    raw::send_cancel(proxy.addr, c.pid, c.secret);
    let answer = c.recv_until(b'Z');
    let err = answer.iter().find(|m| m.tag == b'E').expect("cancelled");
    assert_eq!(err.sqlstate().as_deref(), Some("57014"));
}

#[test]
fn the_unnamed_statement_moves_with_the_session() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mut c = raw_client(&proxy, "unnamed");
    // libpq's PQsendPrepare("") then, in a later round trip,
    // PQsendQueryPrepared(""). The second Parse of "" comes in an exchange
    // that fails later on, which does not undo it.
    c.send(&[raw::parse("", "SELECT $1::int + 1", &[23]), raw::sync()].concat());
    assert_eq!(raw::tags(&c.recv_until(b'Z')), "1Z");
    let (status, body) = transfer_async(&proxy, "unnamed", 5_000)
        .join()
        .expect("mover");
    assert_eq!(status, 200, "{body}");
    c.send(&[raw::bind("", &["41"]), raw::execute(), raw::sync()].concat());
    let answer = c.recv_until(b'Z');
    assert_eq!(
        raw::tags(&answer),
        "2DCZ",
        "{:?}",
        answer.first().and_then(|m| m.field(b'M'))
    );
    assert_eq!(answer[1].first_column().as_deref(), Some("42"));

    c.send(
        &[
            raw::parse("", "SELECT 10 / $1", &[0]),
            raw::bind("", &["0"]),
            raw::execute(),
            raw::sync(),
        ]
        .concat(),
    );
    let answer = c.recv_until(b'Z');
    // Bind plans the unnamed statement with its value: 10 / 0 fails there,
    // after the Parse succeeded.
    assert_eq!(raw::tags(&answer), "1EZ");
    assert_eq!(answer[1].sqlstate().as_deref(), Some("22012"));
    let (status, body) = transfer_async(&proxy, "unnamed", 5_000)
        .join()
        .expect("mover");
    assert_eq!(status, 200, "{body}");
    c.send(&[raw::bind("", &["5"]), raw::execute(), raw::sync()].concat());
    let answer = c.recv_until(b'Z');
    assert_eq!(raw::tags(&answer), "2DCZ");
    assert_eq!(answer[1].first_column().as_deref(), Some("2"));

    // A simple query drops it, on the new backend as on the old.
    c.simple("SELECT 1");
    let (status, body) = transfer_async(&proxy, "unnamed", 5_000)
        .join()
        .expect("mover");
    assert_eq!(status, 200, "{body}");
    c.send(&[raw::bind("", &["5"]), raw::execute(), raw::sync()].concat());
    let answer = c.recv_until(b'Z');
    assert_eq!(answer[0].sqlstate().as_deref(), Some("26000"));
}

#[test]
fn protocol_negotiation_names_version_3_0_as_postgresql_does() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let packet = raw::startup_packet(
        (3 << 16) | 2,
        &[("user", USER), ("database", DB), ("_pq_.some_option", "on")],
    );
    let (mut c, before) = RawClient::connect_with(proxy.addr, &packet, PASSWORD);
    assert_eq!(raw::tags(&before), "v");
    let v = &before[0].body;
    assert_eq!(
        &v[0..4],
        &raw::PROTOCOL_3_0.to_be_bytes(),
        "newest version, whole"
    );
    assert_eq!(&v[4..8], &1u32.to_be_bytes());
    assert_eq!(&v[8..], b"_pq_.some_option\0");
    assert_eq!(c.value("SELECT 1"), "1");
}

/// Moves the session named `app` to `to` (if it is not there) and waits.
fn move_to(proxy: &ProxyProcess, app: &str, to: &str) -> (u16, serde_json::Value) {
    let c = proxy.connection_by_app(app);
    admin_json(
        proxy.admin,
        "POST",
        &format!("/v1/connections/{}/transfer", c["id"].as_str().expect("id")),
        &format!("{{\"to\": \"{to}\", \"timeout_ms\": 5000}}"),
    )
}

fn bind_and_run(c: &mut RawClient, statement: &str) -> Vec<raw::Msg> {
    c.send(&[raw::bind(statement, &[]), raw::execute(), raw::sync()].concat());
    c.recv_until(b'Z')
}

#[test]
fn a_statement_whose_table_was_dropped_moves_and_fails_on_use_as_the_old_server_would() {
    create_on_both(
        "DROP TABLE IF EXISTS gone_t; CREATE TABLE gone_t (v int); ALTER TABLE gone_t OWNER TO app",
    );
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mut c = raw_client(&proxy, "dropped");
    // The same statement on a direct connection says what PostgreSQL says.
    let mut direct = RawClient::connect(env().pg1.addr(), USER, PASSWORD, DB, "direct");
    for client in [&mut c, &mut direct] {
        client.send(
            &[
                raw::parse("s_gone", "SELECT v FROM gone_t", &[]),
                raw::sync(),
            ]
            .concat(),
        );
        assert_eq!(raw::tags(&client.recv_until(b'Z')), "1Z");
    }
    create_on_both("DROP TABLE gone_t");
    let want = bind_and_run(&mut direct, "s_gone");
    assert_eq!(raw::tags(&want), "EZ");
    assert_eq!(want[0].sqlstate().as_deref(), Some("42P01"));

    for round in 0..2 {
        let (status, body) = transfer_async(&proxy, "dropped", 5_000)
            .join()
            .expect("mover");
        assert_eq!(status, 200, "round {round}: {body}");
        let got = bind_and_run(&mut c, "s_gone");
        assert_eq!(raw::tags(&got), "EZ", "round {round}");
        assert_eq!(got[0].sqlstate(), want[0].sqlstate());
        assert_eq!(got[0].field(b'M'), want[0].field(b'M'));
    }
    // The table is back: the statement works, and the client never sees
    // the ParseComplete of the Parse pgferry sent for it.
    create_on_both("CREATE TABLE gone_t (v int); ALTER TABLE gone_t OWNER TO app; INSERT INTO gone_t VALUES (7)");
    let got = bind_and_run(&mut c, "s_gone");
    assert_eq!(raw::tags(&got), "2DCZ");
    assert_eq!(got[1].first_column().as_deref(), Some("7"));
    // From now on it moves like any statement.
    let (status, body) = transfer_async(&proxy, "dropped", 5_000)
        .join()
        .expect("mover");
    assert_eq!(status, 200, "{body}");
    let got = bind_and_run(&mut c, "s_gone");
    assert_eq!(raw::tags(&got), "2DCZ");
}

#[test]
fn a_statement_that_parses_only_on_the_old_backend_refuses_the_move_and_a_refused_move_changes_nothing(
) {
    env()
        .pg1
        .psql(DB, "DROP TABLE IF EXISTS only_pg1; CREATE TABLE only_pg1 (v int); ALTER TABLE only_pg1 OWNER TO app; INSERT INTO only_pg1 VALUES (3)")
        .expect("create");
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mut c = raw_client(&proxy, "only");
    if proxy.connection_by_app("only")["backend"] != "pg1" {
        let (status, body) = move_to(&proxy, "only", "pg1");
        assert_eq!(status, 200, "{body}");
    }
    c.send(
        &[
            raw::parse("s_only", "SELECT v FROM only_pg1", &[]),
            raw::parse("", "SELECT 5", &[]),
            raw::sync(),
        ]
        .concat(),
    );
    assert_eq!(raw::tags(&c.recv_until(b'Z')), "11Z");
    let (status, body) = move_to(&proxy, "only", "pg2");
    assert_eq!(status, 409, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot be re-created")),
        "{body}"
    );
    // Both statements are as they were, the unnamed one included (pgferry's
    // own queries never drop it).
    let got = bind_and_run(&mut c, "s_only");
    assert_eq!(raw::tags(&got), "2DCZ");
    assert_eq!(got[1].first_column().as_deref(), Some("3"));
    let got = bind_and_run(&mut c, "");
    assert_eq!(raw::tags(&got), "2DCZ", "{:?}", got[0].field(b'M'));
    assert_eq!(got[1].first_column().as_deref(), Some("5"));
    assert_eq!(proxy.connection_by_app("only")["backend"], "pg1");
}
