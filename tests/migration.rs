//! Live migration between two real PostgreSQL clusters with the same roles
//! and schema, driven through the admin API of the built binary.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn other_port(port: u16) -> u16 {
    let e = env();
    if port == e.pg1.port() {
        e.pg2.port()
    } else {
        e.pg1.port()
    }
}

async fn server_port(c: &tokio_postgres::Client) -> u16 {
    let row = c
        .query_one("select inet_server_port()", &[])
        .await
        .expect("port");
    row.get::<_, i32>(0) as u16
}

async fn setting(c: &tokio_postgres::Client, name: &str) -> String {
    c.query_one("select current_setting($1)", &[&name])
        .await
        .expect("setting")
        .get(0)
}

/// Runs `sleep` (a `pg_sleep` query unique to the test) on `c`, waits until
/// `cluster` shows it running, cancels it with the client's key and
/// checks that it ended with 57014. Returns when the cancel was sent.
async fn cancel_a_sleep(
    c: tokio_postgres::Client,
    cluster: &'static pgferry_pgcluster::Cluster,
    sleep: &'static str,
) -> Instant {
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move { (c.simple_query(sleep).await.map(|_| ()), c) });
    tokio::task::spawn_blocking(move || {
        wait_until(
            Duration::from_secs(10),
            "pg_sleep on the new backend",
            || {
                cluster
                    .psql(
                        "postgres",
                        &format!("select count(*) from pg_stat_activity where query = '{sleep}'"),
                    )
                    .map(|n| n.trim() == "1")
                    .unwrap_or(false)
            },
        )
    })
    .await
    .expect("join");
    let sent = Instant::now();
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let (result, _c) = sleeper.await.expect("join");
    let e = result.expect_err("not cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"));
    sent
}

fn migration_proxy() -> ProxyProcess {
    ProxyProcess::start(ProxyOptions {
        proxy_extra: String::new(),
        migration_extra: "carry_settings = [\"app.region\"]".into(),
        ..Default::default()
    })
}

/// Transfers the session named `app` via the admin API, off the runtime.
async fn transfer(proxy: &ProxyProcess, app: &str, body: &str) -> (u16, serde_json::Value) {
    let id = proxy.connection_by_app(app)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let body = body.to_owned();
    let admin = proxy.admin;
    tokio::task::spawn_blocking(move || {
        admin_json(
            admin,
            "POST",
            &format!("/v1/connections/{id}/transfer"),
            &body,
        )
    })
    .await
    .expect("join")
}

async fn connect_app(proxy: &ProxyProcess, app: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_config(proxy, USER, PASSWORD)
        .application_name(app)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c
}

#[tokio::test]
async fn idle_session_moves_with_settings_role_prepared_statements_and_cancel_key() {
    let proxy = migration_proxy();
    let c = connect_app(&proxy, "mover").await;
    let before = server_port(&c).await;
    c.batch_execute(
        "SET search_path = shop, public; SET TimeZone = 'Asia/Tokyo'; \
         SET statement_timeout = '12s'; SET application_name = 'mover'; \
         SET ROLE reader; SET app.tenant = 'acme'; \
         SELECT set_config(n, 'eu-west', false) FROM (SELECT 'app' || '.region' AS n) s; \
         PREPARE doubled(int) AS SELECT $1 * 2",
    )
    .await
    .expect("set up session");
    let stmt = c
        .prepare("select $1::int + 1, current_schema()")
        .await
        .expect("prepare");

    let (status, out) = transfer(&proxy, "mover", "").await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outcome"], "success");
    assert!(out["duration_ms"].as_f64().expect("duration") >= 0.0);

    let after = server_port(&c).await;
    assert_eq!(after, other_port(before), "session did not move");
    assert_eq!(
        out["to"],
        if after == env().pg1.port() {
            "pg1"
        } else {
            "pg2"
        }
    );
    assert_eq!(setting(&c, "search_path").await, "shop, public");
    assert_eq!(setting(&c, "TimeZone").await, "Asia/Tokyo");
    assert_eq!(setting(&c, "statement_timeout").await, "12s");
    assert_eq!(setting(&c, "application_name").await, "mover");
    assert_eq!(setting(&c, "role").await, "reader");
    assert_eq!(setting(&c, "app.tenant").await, "acme");
    assert_eq!(setting(&c, "app.region").await, "eu-west", "carry_settings");
    let row = c
        .query_one(&stmt, &[&41i32])
        .await
        .expect("protocol-level statement");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "shop");
    let row = c
        .query_one("EXECUTE doubled(21)", &[])
        .await
        .expect("SQL PREPARE");
    assert_eq!(row.get::<_, i32>(0), 42);

    // The client's cancel key now cancels on the new backend.
    let sent = cancel_a_sleep(c, cluster_by_port(after), "select pg_sleep(60)").await;
    assert!(sent.elapsed() < Duration::from_secs(1));

    let view = proxy.connection_by_app("mover");
    assert_eq!(view["migrations"], 1);
    assert_eq!(view["backend"], out["to"]);
    assert_eq!(proxy.metric("pgferry_conn_migration_success_total"), 1.0);
    assert_eq!(proxy.metric("pgferry_conn_migration_attempted_total"), 1.0);
    assert_eq!(
        proxy.metric("pgferry_conn_migration_pause_seconds_count"),
        1.0
    );
}

#[tokio::test]
async fn transfer_inside_a_transaction_completes_right_after_commit() {
    let proxy = migration_proxy();
    let c = connect_app(&proxy, "txn-commit").await;
    let before = server_port(&c).await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS moved_rows(v int)")
        .await
        .expect("table");
    c.batch_execute("BEGIN; INSERT INTO moved_rows VALUES (1)")
        .await
        .expect("begin");
    let id = proxy.connection_by_app("txn-commit")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let admin = proxy.admin;
    let pending = tokio::task::spawn_blocking(move || {
        let path = format!("/v1/connections/{id}/transfer");
        admin_json(admin, "POST", &path, r#"{"timeout_ms": 20000}"#)
    });
    // The request is held until the transaction ends.
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(10), "state transferring", || {
            has_session_in_state(admin, "txn-commit", "transferring")
        })
    })
    .await
    .expect("join");
    assert_eq!(server_port(&c).await, before, "moved inside a transaction");
    c.batch_execute("INSERT INTO moved_rows VALUES (2); COMMIT")
        .await
        .expect("commit");
    let (status, out) = pending.await.expect("join");
    assert_eq!(status, 200, "{out}");
    assert_eq!(server_port(&c).await, other_port(before));
    let committed = cluster_by_port(before)
        .psql(DB, "select count(*) from moved_rows where v in (1, 2)")
        .expect("count");
    assert_eq!(
        committed, "2",
        "the transaction committed on the old backend"
    );
}

#[tokio::test]
async fn no_safe_point_before_deadline_gives_409_and_the_transaction_goes_on() {
    let proxy = migration_proxy();
    let c = connect_app(&proxy, "txn-deadline").await;
    let before = server_port(&c).await;
    c.batch_execute("BEGIN; SELECT 1").await.expect("begin");
    let (status, out) = transfer(&proxy, "txn-deadline", r#"{"timeout_ms": 300}"#).await;
    assert_eq!(status, 409, "{out}");
    assert_eq!(out["outcome"], "recoverable_error");
    assert_eq!(out["reason"], "no safe point before deadline");
    let row = c
        .query_one("select 40 + 2", &[])
        .await
        .expect("still in transaction");
    assert_eq!(row.get::<_, i32>(0), 42);
    c.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(server_port(&c).await, before);
    assert_eq!(
        proxy.metric("pgferry_conn_migration_error_recoverable_total"),
        1.0
    );
    assert_eq!(proxy.metric("pgferry_conn_migration_attempted_total"), 1.0);
}

#[tokio::test]
async fn state_that_cannot_move_is_refused_with_its_own_reason() {
    let proxy = migration_proxy();
    let cases = [
        (
            "CREATE TEMP TABLE scratch(v int)",
            "session has temporary tables",
            // The temporary schema stays after this; its emptiness is
            // what lets the session move.
            "DROP TABLE scratch",
        ),
        (
            "SELECT pg_advisory_lock(4242)",
            "session holds advisory locks",
            "SELECT pg_advisory_unlock_all()",
        ),
        (
            "LISTEN some_channel",
            "session is listening on notification channels",
            "UNLISTEN *",
        ),
        (
            "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT 1; COMMIT",
            "session has WITH HOLD cursors",
            "CLOSE held",
        ),
    ];
    for (i, (setup, reason, undo)) in cases.iter().enumerate() {
        let app = format!("blocked-{i}");
        let c = connect_app(&proxy, &app).await;
        let before = server_port(&c).await;
        c.batch_execute(setup).await.expect("setup");
        let (status, out) = transfer(&proxy, &app, "").await;
        assert_eq!(status, 409, "{setup}: {out}");
        assert_eq!(out["reason"], *reason, "{setup}");
        // Untouched: same backend, still working, state intact.
        assert_eq!(server_port(&c).await, before);
        let row = c
            .query_one("select 1 + 1", &[])
            .await
            .expect("session works");
        assert_eq!(row.get::<_, i32>(0), 2);
        if !undo.is_empty() {
            c.batch_execute(undo).await.expect("undo");
            let (status, out) = transfer(&proxy, &app, "").await;
            assert_eq!(status, 200, "after {undo}: {out}");
            assert_eq!(server_port(&c).await, other_port(before));
        }
    }
}

#[tokio::test]
async fn target_down_gives_409_and_the_session_is_unharmed() {
    let dead = RefusedPort::reserve();
    let e = env();
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![
            ("pg1".into(), e.pg1.addr().to_string()),
            ("dead".into(), dead.addr.to_string()),
        ],
        ..Default::default()
    });
    let c = connect_app(&proxy, "to-dead").await;
    assert_eq!(server_port(&c).await, e.pg1.port());
    c.batch_execute("SET search_path = shop")
        .await
        .expect("set");
    let (status, out) = transfer(&proxy, "to-dead", r#"{"to": "dead"}"#).await;
    assert_eq!(status, 409, "{out}");
    assert!(
        out["reason"]
            .as_str()
            .unwrap_or("")
            .contains("could not connect to dead"),
        "{out}"
    );
    assert_eq!(server_port(&c).await, e.pg1.port());
    assert_eq!(setting(&c, "search_path").await, "shop");
}

#[tokio::test]
async fn admin_api_errors_and_bearer_token() {
    let proxy = ProxyProcess::start(ProxyOptions {
        proxy_extra: "admin_token = \"s3cret\"".into(),
        ..Default::default()
    });
    let _c = connect_app(&proxy, "api").await;
    assert_eq!(proxy.http("GET", "/v1/connections", None, None).0, 401);
    assert_eq!(
        proxy.http("GET", "/v1/connections", None, Some("wrong")).0,
        401
    );
    assert_eq!(proxy.http_get("/healthz").0, 200);
    assert_eq!(proxy.http_get("/metrics").0, 200);
    // The scheme is case-insensitive (RFC 9110 11.1); the token is not.
    for (header, expected) in [
        ("Authorization: bearer s3cret\r\n", 200),
        ("Authorization: BEARER s3cret\r\n", 200),
        ("authorization: Bearer s3cret\r\n", 200),
        ("Authorization: bearer S3CRET\r\n", 401),
        ("Authorization: Basic s3cret\r\n", 401),
        ("Authorization: bearers3cret\r\n", 401),
    ] {
        let (status, body) =
            admin_request_with(proxy.admin, "GET", "/v1/connections", header, None);
        assert_eq!(status, expected, "{header:?}: {body}");
    }
    let (status, body) = proxy.http("GET", "/v1/connections", None, Some("s3cret"));
    assert_eq!(status, 200);
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).expect("json");
    let me = list
        .iter()
        .find(|c| c["application_name"] == "api")
        .expect("listed");
    for key in [
        "id",
        "client_addr",
        "user",
        "database",
        "backend",
        "connected_at",
        "migrations",
        "state",
    ] {
        assert!(!me[key].is_null(), "{key} missing in {me}");
    }
    assert_eq!(me["state"], "idle");
    assert_eq!(me["user"], USER);
    let id = me["id"].as_str().expect("id");
    let (status, one) = proxy.http(
        "GET",
        &format!("/v1/connections/{id}"),
        None,
        Some("s3cret"),
    );
    assert_eq!(status, 200, "{one}");
    let unknown = "00000000-0000-4000-8000-000000000000";
    assert_eq!(
        proxy
            .http(
                "GET",
                &format!("/v1/connections/{unknown}"),
                None,
                Some("s3cret")
            )
            .0,
        404
    );
    let post = |id: &str, body: &str| {
        proxy.http(
            "POST",
            &format!("/v1/connections/{id}/transfer"),
            Some(body),
            Some("s3cret"),
        )
    };
    assert_eq!(post(unknown, "").0, 404);
    assert_eq!(post(id, r#"{"to": "nowhere"}"#).0, 400);
    assert_eq!(post(id, "{not json").0, 400);
    let current = me["backend"].as_str().expect("backend");
    let (status, body) = post(id, &format!(r#"{{"to": "{current}"}}"#));
    assert_eq!(status, 409, "{body}");
}

#[tokio::test]
async fn replay_failing_on_the_target_is_recoverable_and_leaves_the_session_alone() {
    let proxy = migration_proxy();
    let c = connect_app(&proxy, "replay-fails").await;
    let before = server_port(&c).await;
    // A table only the current backend has: the statement cannot be
    // prepared on the other one.
    cluster_by_port(before)
        .psql(
            DB,
            "CREATE TABLE IF NOT EXISTS only_here(v int); GRANT ALL ON only_here TO app",
        )
        .expect("table");
    c.batch_execute("PREPARE from_only_here AS SELECT count(*) FROM only_here")
        .await
        .expect("prepare");
    let (status, out) = transfer(&proxy, "replay-fails", "").await;
    assert_eq!(status, 409, "{out}");
    let reason = out["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("only_here") && reason.contains("replay failed"),
        "{reason}"
    );
    assert_eq!(server_port(&c).await, before);
    let row = c
        .query_one("EXECUTE from_only_here", &[])
        .await
        .expect("still prepared");
    assert_eq!(row.get::<_, i64>(0), 0);
    // The target's half-built connection was dropped: only this session's
    // server connection is counted.
    let e = env();
    let (target, port) = if before == e.pg1.port() {
        ("pg2", e.pg2.port())
    } else {
        ("pg1", e.pg1.port())
    };
    assert_eq!(port, other_port(before));
    assert_eq!(
        proxy.metric(&format!("pgferry_backend_sessions{{backend=\"{target}\"}}")),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_spares_take_the_dial_out_of_a_migration_and_dead_ones_are_replaced() {
    let proxy = ProxyProcess::start(ProxyOptions {
        migration_extra: "warm_spares = 2".into(),
        ..Default::default()
    });
    let app = "spares-test";
    let c = connect_app(&proxy, app).await;
    c.batch_execute("SET search_path = shop, public; PREPARE q AS SELECT 7")
        .await
        .expect("state");
    // Two spares on each backend for this session's parameters.
    let p = &proxy;
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), "4 warm spares", || {
            p.metric("pgferry_warm_spares_idle") == 4.0
        })
    });
    // Spares are not sessions.
    let sessions: f64 = proxy
        .backends()
        .values()
        .map(|b| b["sessions"].as_f64().expect("sessions"))
        .sum();
    assert_eq!(sessions, 1.0);

    let before = server_port(&c).await;
    let (status, r) = transfer(&proxy, app, "{}").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(server_port(&c).await, other_port(before));
    assert_eq!(proxy.metric("pgferry_warm_spares_taken_total"), 1.0);
    assert_eq!(setting(&c, "search_path").await, "shop, public");
    let v: i32 = c.query_one("EXECUTE q", &[]).await.expect("execute").get(0);
    assert_eq!(v, 7);
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), "spares refilled", || {
            p.metric("pgferry_warm_spares_idle") == 4.0
        })
    });

    // Kill the spares on the other backend behind pgferry's back: the next
    // move finds them dead and dials instead.
    let here = server_port(&c).await;
    let target = cluster_by_port(other_port(here));
    let killed = target
        .psql(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = '{app}'"
            ),
        )
        .expect("terminate spares");
    assert_eq!(killed, "2");
    // Gone once their processes have exited (after telling pgferry).
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), "killed spares gone", || {
            target
                .psql(
                    "postgres",
                    &format!(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"
                    ),
                )
                .map(|n| n == "0")
                .unwrap_or(false)
        })
    });
    let (status, r) = transfer(&proxy, app, "{}").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(server_port(&c).await, other_port(here));
    assert_eq!(
        proxy.metric("pgferry_warm_spares_taken_total"),
        1.0,
        "dead spares were used"
    );
    let v: i32 = c.query_one("EXECUTE q", &[]).await.expect("execute").get(0);
    assert_eq!(v, 7);

    // The last session with these parameters gone: its spares go too.
    drop(c);
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), "spares closed", || {
            p.metric("pgferry_warm_spares_idle") == 0.0
        })
    });
    for cluster in [&env().pg1, &env().pg2] {
        let p2 = cluster;
        tokio::task::block_in_place(|| {
            wait_until(
                Duration::from_secs(10),
                "no spare left on the server",
                || {
                    p2.psql(
                    "postgres",
                    &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"),
                )
                .map(|n| n == "0")
                .unwrap_or(false)
                },
            )
        });
    }
}

/// A session the client has not touched since its last move is moved
/// again without the capture query (its state is known); any message from
/// the client makes the state unknown again, and blockers are checked.
#[tokio::test]
async fn an_untouched_session_moves_again_on_known_state_until_the_client_speaks() {
    let proxy = migration_proxy();
    let c = connect_app(&proxy, "known-state").await;
    c.batch_execute("SET search_path = shop; PREPARE k(int) AS SELECT $1 + 1")
        .await
        .expect("state");
    let reused = || proxy.metric("pgferry_conn_migration_state_reused_total");
    let captures = || proxy.metric("pgferry_conn_migration_phase_seconds_count{phase=\"capture\"}");

    // First move: captured.
    let (status, out) = transfer(&proxy, "known-state", "").await;
    assert_eq!(status, 200, "{out}");
    assert_eq!((captures(), reused()), (1.0, 0.0));
    // Second, with nothing sent in between: the known state is replayed.
    let (status, out) = transfer(&proxy, "known-state", "").await;
    assert_eq!(status, 200, "{out}");
    assert_eq!((captures(), reused()), (1.0, 1.0));
    // It was the right state: it is there on the backend it came back to.
    assert_eq!(setting(&c, "search_path").await, "shop");
    let row = c.query_one("EXECUTE k(41)", &[]).await.expect("execute");
    assert_eq!(row.get::<_, i32>(0), 42);

    // The client spoke (the queries above): the next move captures, and
    // sees a change made since.
    c.batch_execute("SET search_path = other")
        .await
        .expect("set");
    let before = server_port(&c).await;
    let (status, out) = transfer(&proxy, "known-state", "").await;
    assert_eq!(status, 200, "{out}");
    assert_eq!((captures(), reused()), (2.0, 1.0));
    assert_ne!(server_port(&c).await, before);
    assert_eq!(setting(&c, "search_path").await, "other");

    // State that cannot move is found even right after a move.
    let (status, out) = transfer(&proxy, "known-state", "").await;
    assert_eq!(status, 200, "{out}");
    c.batch_execute("CREATE TEMP TABLE pinned(v int)")
        .await
        .expect("temp");
    let (status, out) = transfer(&proxy, "known-state", "").await;
    assert_eq!(status, 409, "{out}");
    assert!(
        out["reason"]
            .as_str()
            .unwrap_or("")
            .contains("temporary tables"),
        "{out}"
    );
}

/// A session whose client has sent nothing since it logged in moves on
/// the state a login gives, without the capture query: the startup
/// packet's settings and the role's `ALTER ROLE ... SET` come back by the
/// target's own login. Its first message makes the next move capture.
#[tokio::test]
async fn a_session_that_never_spoke_moves_on_its_login_state() {
    let proxy = migration_proxy();
    let e = env();
    for pg in [&e.pg1, &e.pg2] {
        pg.psql(
            DB,
            &format!("ALTER ROLE {USER} IN DATABASE {DB} SET pgferry_test.login = 'yes'"),
        )
        .expect("role setting");
    }
    let app = "never-spoke";
    let (c, conn) = tokio_config(&proxy, USER, PASSWORD)
        .application_name(app)
        .options("-c search_path=shop")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let reused = || proxy.metric("pgferry_conn_migration_state_reused_total");
    let captures = || proxy.metric("pgferry_conn_migration_phase_seconds_count{phase=\"capture\"}");
    let (captured, kept) = (captures(), reused());
    let (status, out) = transfer(&proxy, app, "").await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        (captures(), reused()),
        (captured, kept + 1.0),
        "moved on its login state"
    );
    let (status, out) = transfer(&proxy, app, "").await;
    assert_eq!(status, 200, "{out}");
    assert_eq!((captures(), reused()), (captured, kept + 2.0));
    // What a login gave it is there after two moves.
    assert_eq!(setting(&c, "search_path").await, "shop");
    assert_eq!(setting(&c, "pgferry_test.login").await, "yes");
    assert_eq!(setting(&c, "application_name").await, app);
    // It has spoken (the queries above): the next move captures, and
    // finds what a statement made that cannot move.
    c.batch_execute("SELECT pg_advisory_lock(4343)")
        .await
        .expect("lock");
    let (status, out) = transfer(&proxy, app, "").await;
    assert_eq!(status, 409, "{out}");
    assert_eq!(out["reason"], "session holds advisory locks");
    assert_eq!(captures(), captured + 1.0);
    c.batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .expect("unlock");
    for pg in [&e.pg1, &e.pg2] {
        pg.psql(
            DB,
            &format!("ALTER ROLE {USER} IN DATABASE {DB} RESET pgferry_test.login"),
        )
        .expect("role setting");
    }
}

/// The pending prepared transactions of the session's user are asked
/// apart, where the server allows them (the test servers have
/// `max_prepared_transactions = 10`): one pending for the session's role
/// refuses the move, and once it is resolved the session moves.
#[tokio::test]
async fn a_pending_prepared_transaction_of_the_sessions_role_refuses_the_move() {
    let proxy = migration_proxy();
    let e = env();
    // A role of this test's own, so that the pending transaction refuses
    // no other test's moves.
    for pg in [&e.pg1, &e.pg2] {
        pg.psql(
            DB,
            &format!(
                "DO $$BEGIN CREATE ROLE twophase_owner; \
                 EXCEPTION WHEN duplicate_object THEN NULL; END$$; \
                 GRANT twophase_owner TO {USER}"
            ),
        )
        .expect("role");
    }
    let app = "two-phase";
    let c = connect_app(&proxy, app).await;
    let before = server_port(&c).await;
    c.batch_execute("SET ROLE twophase_owner; BEGIN; PREPARE TRANSACTION 'pgferry-test-2pc'")
        .await
        .expect("prepare");
    let (status, out) = transfer(&proxy, app, "").await;
    assert_eq!(status, 409, "{out}");
    assert_eq!(
        out["reason"],
        "the session's user has prepared transactions here (two-phase commit pending)"
    );
    assert_eq!(server_port(&c).await, before);
    c.batch_execute("ROLLBACK PREPARED 'pgferry-test-2pc'")
        .await
        .expect("resolve");
    let (status, out) = transfer(&proxy, app, "").await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(server_port(&c).await, other_port(before));
    assert_eq!(setting(&c, "role").await, "twophase_owner");
}

/// `pg_prepared_statements` shows an SQL PREPARE with the whole query
/// string it came in; a move replays only the PREPARE, never the other
/// statements of that string (here an INSERT and a SET).
#[tokio::test]
async fn a_prepare_sent_with_other_statements_moves_without_running_them_again() {
    let proxy = migration_proxy();
    let e = env();
    for pg in [&e.pg1, &e.pg2] {
        pg.psql(
            DB,
            "CREATE TABLE IF NOT EXISTS replay_guard(app text); \
             GRANT ALL ON replay_guard TO PUBLIC",
        )
        .expect("table");
    }
    let c = connect_app(&proxy, "multi-prepare").await;
    c.batch_execute(
        "SET search_path = shop; \
         INSERT INTO public.replay_guard VALUES ('multi-prepare'); \
         PREPARE \"Twice\"(int) AS SELECT $1 * 2; \
         SELECT ';'",
    )
    .await
    .expect("batch");
    c.batch_execute("SET search_path = public")
        .await
        .expect("set");
    let before = server_port(&c).await;
    let (status, out) = transfer(&proxy, "multi-prepare", "").await;
    assert_eq!(status, 200, "{out}");
    assert_ne!(server_port(&c).await, before);
    assert_eq!(setting(&c, "search_path").await, "public");
    let row = c
        .query_one("EXECUTE \"Twice\"(21)", &[])
        .await
        .expect("execute");
    assert_eq!(row.get::<_, i32>(0), 42);
    let text: String = c
        .query_one(
            "SELECT statement FROM pg_prepared_statements WHERE name = 'Twice'",
            &[],
        )
        .await
        .expect("statement")
        .get(0);
    assert_eq!(text, "PREPARE \"Twice\"(int) AS SELECT $1 * 2");
    // Both servers share nothing: count the rows where the INSERT ran.
    let rows = |port: u16| {
        cluster_by_port(port)
            .psql(
                DB,
                "SELECT count(*) FROM replay_guard WHERE app = 'multi-prepare'",
            )
            .expect("count")
    };
    assert_eq!(rows(before), "1");
    assert_eq!(rows(other_port(before)), "0");
}

/// `[proxy] session_threads`: sessions run on threads of their own
/// (single-threaded runtimes), and what a session does works there:
/// queries from several clients, a move (capture, dial, replay, swap), a
/// cancel after the move.
#[tokio::test]
async fn sessions_on_session_threads_run_queries_move_and_cancel() {
    let proxy = ProxyProcess::start(ProxyOptions {
        proxy_extra: "session_threads = 2".into(),
        ..Default::default()
    });
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(connect_app(&proxy, &format!("threaded-{i}")).await);
    }
    for (i, c) in clients.iter().enumerate() {
        let row = c
            .query_one("select $1::int * 2", &[&(i as i32)])
            .await
            .expect("query");
        assert_eq!(row.get::<_, i32>(0), 2 * i as i32);
    }
    // The two threads exist (thread names are cut to 15 bytes).
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", proxy.pid()))
        .expect("task dir")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|n| n.starts_with("pgferry-session"))
        .collect();
    assert_eq!(threads.len(), 2, "{threads:?}");

    let c = clients.pop().expect("client");
    c.batch_execute("SET search_path = shop")
        .await
        .expect("set");
    let before = server_port(&c).await;
    let (status, out) = transfer(&proxy, "threaded-3", "").await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(server_port(&c).await, other_port(before));
    assert_eq!(setting(&c, "search_path").await, "shop");

    cancel_a_sleep(
        c,
        cluster_by_port(other_port(before)),
        "select pg_sleep(61)",
    )
    .await;
    // The other sessions were not disturbed.
    for c in &clients {
        assert_eq!(
            c.query_one("select 1", &[])
                .await
                .expect("still works")
                .get::<_, i32>(0),
            1
        );
    }
}
