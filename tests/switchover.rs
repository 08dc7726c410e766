//! Primary switchover and failover against a real primary and its real
//! streaming standby (pg_basebackup -R), PostgreSQL 15: pgbench through
//! two switchovers loses nothing, sessions keep their state, a long
//! transaction makes a switchover abort with nothing changed, and a
//! primary killed with `pg_ctl stop -m immediate` leaves idle sessions
//! running on the promoted standby while the others get clear errors.
//!
//! Each test has its own pair of servers: they change roles.

mod common;

use std::time::{Duration, Instant};

use common::raw::{self, RawClient};
use common::{
    admin_json, pgbench_with, wait_until, ProxyOptions, ProxyProcess, DB, PASSWORD, USER,
};
use pgferry_pgcluster::{Cluster, ClusterOptions, StopMode};

/// A primary (named `<name>-1`, backend pg1) with a streaming standby
/// (`<name>-2`, backend pg2), the app user and database on both.
fn pair(name: &str) -> (Cluster, Cluster) {
    let bins = common::server_binaries();
    let primary =
        Cluster::start_temp(&bins, ClusterOptions::named(format!("{name}-1"))).expect("primary");
    primary
        .ensure_user_and_database(USER, PASSWORD, DB)
        .expect("app user");
    let standby = Cluster::start_standby_temp(&primary, ClusterOptions::named(format!("{name}-2")))
        .expect("standby");
    standby
        .wait_replayed(&primary, Duration::from_secs(30))
        .expect("standby caught up");
    (primary, standby)
}

/// pgferry in front of the pair, as one cluster, with pgferry's own login.
fn proxy(pg1: &Cluster, pg2: &Cluster, extra: &str) -> ProxyProcess {
    let proxy = ProxyProcess::start(ProxyOptions {
        backend_cluster: Some("main".into()),
        extra_sections: format!(
            "[backend_admin]\nuser = \"postgres\"\npassword = \"postgres\"\n\
             [balancer]\nhealth_check_interval = \"300ms\"\n{extra}\n"
        ),
        ..ProxyOptions::bare(vec![
            ("pg1".into(), pg1.addr().to_string()),
            ("pg2".into(), pg2.addr().to_string()),
        ])
    });
    wait_for_roles(&proxy, "primary", "standby");
    proxy
}

fn wait_for_roles(proxy: &ProxyProcess, pg1: &str, pg2: &str) {
    wait_until(
        Duration::from_secs(20),
        "roles seen by the health check",
        || {
            let b = proxy.backends();
            b["pg1"]["role"] == pg1 && b["pg2"]["role"] == pg2
        },
    );
}

fn switchover(
    proxy: &ProxyProcess,
    from: &str,
    to: &str,
    timeout_ms: u64,
) -> (u16, serde_json::Value) {
    admin_json(
        proxy.admin,
        "POST",
        "/v1/switchover",
        &format!(r#"{{"from": "{from}", "to": "{to}", "timeout_ms": {timeout_ms}}}"#),
    )
}

/// Session ids and migration counts of the sessions named `app`.
fn sessions(proxy: &ProxyProcess, app: &str) -> Vec<(String, u64, String)> {
    let (status, list) = admin_json(proxy.admin, "GET", "/v1/connections", "");
    assert_eq!(status, 200, "{list}");
    let mut v: Vec<_> = list
        .as_array()
        .expect("list")
        .iter()
        .filter(|c| c["application_name"] == app)
        .map(|c| {
            (
                c["id"].as_str().unwrap_or("").to_owned(),
                c["migrations"].as_u64().unwrap_or(0),
                c["backend"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

fn psql_value(cluster: &Cluster, sql: &str) -> String {
    cluster.psql(DB, sql).expect("psql")
}

#[test]
fn pgbench_through_two_switchovers_fails_nothing_and_loses_nothing() {
    let (mut pg1, pg2) = pair("sw-bench");
    let pgbench = pg1.bins().path("pgbench");
    // Initialised on the primary itself; the standby replicates it.
    pgbench_with(&pgbench, pg1.port(), &["-i", "-s", "1", "-q"]);
    pg2.wait_replayed(&pg1, Duration::from_secs(30))
        .expect("replayed");
    let proxy = proxy(&pg1, &pg2, "");
    let port = proxy.port();
    let bench = std::thread::spawn(move || {
        std::process::Command::new(&pgbench)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER])
            .args(["-M", "prepared", "-c", "16", "-j", "2", "-T", "30", "-n"])
            .arg(DB)
            .env("PGPASSWORD", PASSWORD)
            .env("PGSSLMODE", "disable")
            .env("PGAPPNAME", "bench")
            .output()
            .expect("run pgbench")
    });
    wait_until(Duration::from_secs(20), "16 pgbench sessions", || {
        sessions(&proxy, "bench").len() == 16
    });
    let before: Vec<String> = sessions(&proxy, "bench").into_iter().map(|s| s.0).collect();
    let started = Instant::now();

    // Load, not synchronisation: the switchovers run at seconds 10 and 20
    // of the benchmark, as the acceptance asks.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(started.elapsed()));
    let (status, first) = switchover(&proxy, "pg1", "pg2", 30_000);
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["outcome"], "success", "{first}");
    assert_eq!(first["sessions_moved"], 16, "{first}");
    assert!(!pg2.is_in_recovery().expect("pg2 role"), "pg2 was promoted");
    assert_eq!(proxy.backends()["pg1"]["state"], "drained");
    assert!(sessions(&proxy, "bench").iter().all(|s| s.2 == "pg2"));

    // The old primary comes back as the new one's standby, and serves again.
    pg1.rebuild_as_standby_of(&pg2).expect("pg1 re-attached");
    let (status, body) = admin_json(proxy.admin, "POST", "/v1/backends/pg1/activate", "");
    assert_eq!(status, 200, "{body}");
    wait_until(Duration::from_secs(20), "pg1 healthy as a standby", || {
        let b = proxy.backends();
        b["pg1"]["role"] == "standby" && b["pg1"]["healthy"] == true
    });
    pg1.wait_replayed(&pg2, Duration::from_secs(30))
        .expect("pg1 caught up");

    std::thread::sleep(Duration::from_secs(20).saturating_sub(started.elapsed()));
    let (status, second) = switchover(&proxy, "pg2", "pg1", 30_000);
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["outcome"], "success", "{second}");
    assert_eq!(second["sessions_moved"], 16, "{second}");
    // No session was reconnected: the same 16, each moved twice (pgbench
    // is still running).
    let after = sessions(&proxy, "bench");
    let ids: Vec<String> = after.iter().map(|s| s.0.clone()).collect();
    assert_eq!(ids, before, "the same sessions");
    assert!(after.iter().all(|s| s.1 >= 2 && s.2 == "pg1"), "{after:?}");

    let out = bench.join().expect("pgbench thread");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench failed:\n{text}");
    assert!(!text.contains("aborted"), "a client aborted:\n{text}");
    assert_eq!(
        common::number_after(&text, "number of failed transactions:"),
        0.0,
        "{text}"
    );
    let processed = common::number_after(&text, "number of transactions actually processed:");
    assert!(processed > 0.0, "{text}");
    // Every transaction pgbench counted is on the final primary.
    let history: f64 = psql_value(&pg1, "SELECT count(*) FROM pgbench_history")
        .parse()
        .expect("count");
    assert_eq!(history, processed, "pgbench_history on the final primary");

    eprintln!(
        "switchover pauses: pg1->pg2 longest {} ms (phases {}), pg2->pg1 longest {} ms (phases {})",
        first["longest_pause_ms"], first["phases"], second["longest_pause_ms"], second["phases"]
    );
}

/// The messages, after checking none is an error.
fn ok(msgs: Vec<raw::Msg>) -> Vec<raw::Msg> {
    if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
        panic!("unexpected error: {:?}", e.field(b'M'));
    }
    msgs
}

fn id_of(proxy: &ProxyProcess, app: &str) -> String {
    proxy.connection_by_app(app)["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

#[test]
fn a_switchover_keeps_state_and_a_long_transaction_makes_it_abort_with_nothing_changed() {
    let (pg1, pg2) = pair("sw-state");
    let proxy = proxy(&pg1, &pg2, "");
    // Routing by role: a read-only session goes to the standby, the others
    // to the primary; a bad value is the client's error.
    let startup = |app: &str, attrs: &str| {
        raw::startup_packet(
            raw::PROTOCOL_3_0,
            &[
                ("user", USER),
                ("database", DB),
                ("application_name", app),
                (
                    "options",
                    &format!("-c pgferry.target_session_attrs={attrs}"),
                ),
            ],
        )
    };
    let (mut ro, _) = RawClient::connect_with(proxy.addr, &startup("ro", "read-only"), PASSWORD);
    assert_eq!(ro.value("SELECT pg_is_in_recovery()"), "t");
    assert_eq!(proxy.connection_by_app("ro")["backend"], "pg2");
    let (mut rw, _) = RawClient::connect_with(proxy.addr, &startup("rw", "read-write"), PASSWORD);
    assert_eq!(rw.value("SELECT pg_is_in_recovery()"), "f");
    let out = std::process::Command::new(pg1.bins().path("psql"))
        .arg(format!(
            "host=127.0.0.1 port={} user={USER} dbname={DB} sslmode=disable \
             options='-c pgferry.target_session_attrs=sometimes'",
            proxy.port()
        ))
        .args(["-X", "-Atc", "SELECT 1"])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("psql");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("invalid value for pgferry.target_session_attrs"),
        "{said}"
    );
    drop((ro, rw));

    let mut a = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "stateful");
    ok(a.simple("SET work_mem = '7MB'"));
    ok(a.simple("SET TIME ZONE 'Asia/Tokyo'"));
    ok(a.simple("SET app.tenant = 'acme'"));
    ok(a.simple("PREPARE doubled(int) AS SELECT $1 * 2"));
    a.send(
        &[
            raw::parse("tripled", "SELECT $1::int * 3", &[]),
            raw::sync(),
        ]
        .concat(),
    );
    ok(a.recv_until(b'Z'));

    // A session whose state cannot move makes it abort at once, before
    // anything is fenced.
    let mut temp = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "temp");
    ok(temp.simple("CREATE TEMP TABLE scratch (x int)"));
    let temp_id = id_of(&proxy, "temp");
    let (status, r) = switchover(&proxy, "pg1", "pg2", 30_000);
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["blocked"], serde_json::json!([temp_id]), "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("temporary tables"),
        "{r}"
    );
    assert!(
        r["duration_ms"].as_f64().unwrap_or(1e9) < 10_000.0,
        "at once: {r}"
    );
    assert!(pg2.is_in_recovery().expect("pg2"), "pg2 still a standby");
    assert_eq!(
        psql_value(&pg1, "SHOW default_transaction_read_only"),
        "off"
    );
    assert_eq!(temp.value("SELECT count(*) FROM scratch"), "0");
    temp.send(&raw::terminate());
    drop(temp);
    wait_until(Duration::from_secs(10), "the temp session gone", || {
        sessions(&proxy, "temp").is_empty()
    });

    // A transaction that outlasts the deadline: the switchover must abort.
    let mut long = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "long");
    ok(long.simple("BEGIN"));
    ok(long.simple("CREATE TABLE t_long (x int)"));
    ok(long.simple("INSERT INTO t_long VALUES (1)"));
    let long_id = id_of(&proxy, "long");
    let (status, r) = switchover(&proxy, "pg1", "pg2", 5_000);
    assert_eq!(status, 409, "{r}");
    assert_eq!(r["outcome"], "aborted", "{r}");
    assert_eq!(r["blocked"], serde_json::json!([long_id]), "{r}");
    assert_eq!(r["sessions_moved"], 0, "{r}");
    // Nothing changed: roles, fence, backends, sessions.
    assert!(pg2.is_in_recovery().expect("pg2"), "pg2 still a standby");
    assert!(!pg1.is_in_recovery().expect("pg1"), "pg1 still the primary");
    assert_eq!(
        psql_value(&pg1, "SHOW default_transaction_read_only"),
        "off"
    );
    let b = proxy.backends();
    assert_eq!(b["pg1"]["state"], "active");
    assert_eq!(b["pg1"]["role"], "primary");
    assert_eq!(sessions(&proxy, "stateful")[0].1, 0, "not moved");
    assert_eq!(sessions(&proxy, "stateful")[0].2, "pg1");
    // The long transaction goes on, untouched, and commits.
    ok(long.simple("INSERT INTO t_long VALUES (2)"));
    ok(long.simple("COMMIT"));
    assert_eq!(psql_value(&pg1, "SELECT count(*) FROM t_long"), "2");
    assert_eq!(a.value("EXECUTE doubled(4)"), "8");

    // A standby that still carries the fence of an earlier switchover (a
    // former primary re-attached without a new base backup) is unfenced by
    // the health check, or its promotion would refuse every write.
    pg2.psql(
        "postgres",
        "ALTER SYSTEM SET default_transaction_read_only = on; SET pgferry.fenced = 'on'; \
         ALTER SYSTEM SET pgferry.fenced = 'on'; SELECT pg_reload_conf()",
    )
    .expect("fence the standby as an old switchover would have");
    wait_until(Duration::from_secs(10), "the stale fence lifted", || {
        pg2.psql("postgres", "SHOW default_transaction_read_only")
            .is_ok_and(|v| v == "off")
    });

    let (status, r) = switchover(&proxy, "pg1", "pg2", 30_000);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["outcome"], "success", "{r}");
    assert_eq!(r["sessions_moved"], 2, "{r}");
    // The old primary stays fenced (it is no standby), with pgferry's mark.
    assert_eq!(psql_value(&pg1, "SHOW default_transaction_read_only"), "on");
    assert_eq!(
        psql_value(&pg1, "SELECT current_setting('pgferry.fenced', true)"),
        "on"
    );
    let phases: Vec<&str> = r["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p["phase"].as_str())
        .collect();
    assert_eq!(phases, ["hold", "fence", "catch_up", "promote", "move"]);

    // What the client was told of default_transaction_read_only (the fence
    // on the old primary) ends as the new primary has it: off.
    let msgs = ok(a.simple("SELECT 1"));
    let told: Vec<String> = msgs
        .iter()
        .filter(|m| m.tag == b'S' && m.body.starts_with(b"default_transaction_read_only\0"))
        .map(|m| String::from_utf8_lossy(&m.body[30..m.body.len() - 1]).into_owned())
        .collect();
    assert!(told.last().is_none_or(|v| v == "off"), "{told:?}");
    // Its state came along.
    assert_eq!(a.value("SHOW work_mem"), "7MB");
    assert_eq!(a.value("SHOW TimeZone"), "Asia/Tokyo");
    assert_eq!(a.value("SELECT current_setting('app.tenant')"), "acme");
    assert_eq!(a.value("EXECUTE doubled(21)"), "42");
    a.send(&[raw::bind("tripled", &["5"]), raw::execute(), raw::sync()].concat());
    let rows = ok(a.recv_until(b'Z'));
    let row = rows.iter().find(|m| m.tag == b'D').expect("a row");
    assert_eq!(row.first_column().as_deref(), Some("15"));
    // On the new primary, writing.
    assert_eq!(a.value("SELECT inet_server_port()"), pg2.port().to_string());
    assert_eq!(a.value("SELECT pg_is_in_recovery()"), "f");
    ok(a.simple("INSERT INTO t_long VALUES (3)"));
    assert_eq!(long.value("SELECT count(*) FROM t_long"), "3");
    assert_eq!(proxy.backends()["pg1"]["state"], "drained");
    assert!(proxy.metric("pgferry_switchover_total{outcome=\"success\"}") >= 1.0);
    assert!(proxy.metric("pgferry_switchover_total{outcome=\"aborted\"}") >= 1.0);
}

/// The next ErrorResponse the client gets; a bare EOF fails the test.
fn next_error(c: &mut RawClient) -> raw::Msg {
    loop {
        let m = c.try_recv().expect("an ErrorResponse, not a bare EOF");
        if m.tag == b'E' {
            return m;
        }
    }
}

#[test]
fn a_killed_primary_leaves_idle_sessions_running_on_the_promoted_standby() {
    let (mut pg1, pg2) = pair("sw-fail");
    let proxy = proxy(
        &pg1,
        &pg2,
        "[failover]\nremember_state_after = \"1s\"\nrehome_timeout = \"30s\"\n",
    );
    // Idle with a state pgferry has captured (after a whole idle interval).
    let mut known = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "known");
    ok(known.simple("SET work_mem = '9MB'"));
    ok(known.simple("PREPARE answer AS SELECT 42"));
    wait_until(
        Duration::from_secs(20),
        "the idle session's state remembered",
        || proxy.metric("pgferry_conn_state_remembered_total") >= 1.0,
    );
    // Idle since its login.
    let mut fresh = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "fresh");
    // Idle inside a transaction.
    let mut in_tx = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "in-tx");
    ok(in_tx.simple("BEGIN"));
    ok(in_tx.simple("SELECT 1"));
    // A statement in flight.
    let mut in_flight = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "in-flight");
    in_flight.send(&raw::query("SELECT pg_sleep(60)"));
    wait_until(Duration::from_secs(10), "the sleep running on pg1", || {
        psql_value(
            &pg1,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'in-flight' AND state = 'active'",
        ) == "1"
    });
    // Its state changed a moment ago: not known.
    let mut changed = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "changed");
    ok(changed.simple("SET work_mem = '1MB'"));

    pg1.stop(StopMode::Immediate).expect("kill pg1");
    pg2.promote(Duration::from_secs(30)).expect("promote pg2");

    let e = next_error(&mut in_tx);
    assert_eq!(
        e.sqlstate().as_deref(),
        Some("08006"),
        "{:?}",
        e.field(b'M')
    );
    assert!(e.field(b'M').unwrap_or_default().contains("failover"));
    let e = next_error(&mut in_flight);
    assert_eq!(
        e.sqlstate().as_deref(),
        Some("08007"),
        "{:?}",
        e.field(b'M')
    );
    let e = next_error(&mut changed);
    assert_eq!(
        e.sqlstate().as_deref(),
        Some("57P01"),
        "{:?}",
        e.field(b'M')
    );
    assert!(e.field(b'M').unwrap_or_default().contains("failover"));

    // The idle ones go on, on the new primary, with their state.
    let new_port = pg2.port().to_string();
    assert_eq!(known.value("SHOW work_mem"), "9MB");
    assert_eq!(known.value("EXECUTE answer"), "42");
    assert_eq!(known.value("SELECT inet_server_port()"), new_port);
    assert_eq!(fresh.value("SELECT inet_server_port()"), new_port);
    assert_eq!(fresh.value("SELECT pg_is_in_recovery()"), "f");
    assert_eq!(proxy.connection_by_app("known")["backend"], "pg2");

    // New sessions land on the new primary once a check has seen it.
    wait_until(Duration::from_secs(10), "pg2 seen as the primary", || {
        proxy.backends()["pg2"]["role"] == "primary"
    });
    let mut new = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "new");
    assert_eq!(new.value("SELECT inet_server_port()"), new_port);
    ok(new.simple("CREATE TABLE after_failover (x int)"));
    assert_eq!(
        proxy.metric("pgferry_failover_sessions_total{outcome=\"rehomed\"}"),
        2.0
    );
    assert_eq!(
        proxy.metric("pgferry_failover_sessions_total{outcome=\"closed\"}"),
        3.0
    );
}

#[test]
fn a_promote_command_that_stops_the_old_primary_first_keeps_every_session() {
    let (pg1, pg2) = pair("sw-cmd");
    // What Patroni's and CloudNativePG's switchovers do: shut the old
    // primary down (its sessions get FATAL 57P01), then promote.
    let pid = pg1.pid().expect("pg1 runs");
    let psql = pg1.bins().path("psql");
    // (The postmaster is this test's child: a zombie until reaped, so the
    // wait is for its pid file, which it removes as it exits.)
    let command = format!(
        "kill -INT {pid}; while [ -e {}/postmaster.pid ]; do sleep 0.05; done; \
         PGPASSWORD=postgres {} -h 127.0.0.1 -p {} -U postgres -d postgres -Atc 'SELECT pg_promote()'",
        pg1.data_dir().display(),
        psql.display(),
        pg2.port()
    );
    let proxy = proxy(
        &pg1,
        &pg2,
        &format!(
            "[switchover]\npromote = \"command\"\npromote_command = {}\n",
            toml_string(&command)
        ),
    );
    let mut a = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "cmd-a");
    ok(a.simple("SET work_mem = '5MB'"));
    a.send(
        &[
            raw::parse("sq", "SELECT $1::int * $1::int", &[]),
            raw::sync(),
        ]
        .concat(),
    );
    ok(a.recv_until(b'Z'));
    let mut b = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "cmd-b");
    ok(b.simple("CREATE TABLE IF NOT EXISTS cmd_t (x int)"));

    let (status, r) = switchover(&proxy, "pg1", "pg2", 30_000);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["outcome"], "success", "{r}");
    assert_eq!(r["sessions_moved"], 2, "{r}");
    assert!(
        !pg1.is_running() || pg1.is_in_recovery().is_err(),
        "pg1 was stopped"
    );

    // Neither client heard the old primary's FATAL; both go on, on pg2.
    let msgs = ok(a.simple("SHOW work_mem"));
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a row");
    assert_eq!(row.first_column().as_deref(), Some("5MB"));
    a.send(&[raw::bind("sq", &["7"]), raw::execute(), raw::sync()].concat());
    let rows = ok(a.recv_until(b'Z'));
    let row = rows.iter().find(|m| m.tag == b'D').expect("a row");
    assert_eq!(row.first_column().as_deref(), Some("49"));
    ok(b.simple("INSERT INTO cmd_t VALUES (1)"));
    assert_eq!(b.value("SELECT inet_server_port()"), pg2.port().to_string());
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The console's SWITCHOVER is the HTTP API's: the primary changes, the
/// session moves, and psql prints the report as a table.
#[test]
fn the_console_switches_over_too() {
    let (pg1, pg2) = pair("sw-console");
    let proxy = proxy(
        &pg1,
        &pg2,
        &format!("[admin]\nconsole_users = [\"{USER}\"]\n"),
    );
    let mut a = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "console-a");
    ok(a.simple("SET work_mem = '6MB'"));
    assert_eq!(a.value("SELECT inet_server_port()"), pg1.port().to_string());
    let console = format!(
        "postgresql://{USER}:{PASSWORD}@127.0.0.1:{}/pgferry?sslmode=disable",
        proxy.port()
    );
    let out = common::psql(
        &console,
        &[
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "SWITCHOVER pg1 TO pg2 TIMEOUT 30",
        ],
        &[],
    );
    let text = common::stdout(&out);
    assert!(out.status.success(), "{text}{}", common::stderr(&out));
    for column in ["from", "to", "outcome", "sessions_moved"] {
        assert!(text.contains(column), "{text}");
    }
    assert!(
        text.contains("success") && text.contains("(1 row)"),
        "{text}"
    );
    wait_until(Duration::from_secs(20), "pg2 seen as the primary", || {
        proxy.backends()["pg2"]["role"] == "primary"
    });
    let msgs = ok(a.simple("SHOW work_mem"));
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a row");
    assert_eq!(row.first_column().as_deref(), Some("6MB"));
    assert_eq!(a.value("SELECT inet_server_port()"), pg2.port().to_string());
    // A second one the other way round is refused: pg1 is fenced now.
    let out = common::psql(&console, &["-c", "SWITCHOVER pg1 TO pg2"], &[]);
    assert!(!out.status.success());
}
