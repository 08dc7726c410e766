//! The SQL admin console (`psql ... pgferry`) against a real pgferry in
//! front of the shared clusters: every SHOW prints a table through psql,
//! the verbs move real sessions (checked on the servers and in the
//! session list), PAUSE holds a session's next query until RESUME, and
//! the refusals carry their SQLSTATEs (28000, 42601, 55000, 57014).

use std::time::{Duration, Instant};

mod common;

use common::{connect, env, psql, stderr, stdout, ProxyOptions, ProxyProcess, DB, PASSWORD, USER};

const ADMIN: &str = "opsadmin";
const ADMIN_PASSWORD: &str = "ops-secret";

fn start() -> ProxyProcess {
    let e = env();
    ProxyProcess::start(ProxyOptions {
        userlist: Some(format!(
            "\"{USER}\" \"{PASSWORD}\"\n\"{ADMIN}\" \"{ADMIN_PASSWORD}\"\n"
        )),
        extra_sections: format!(
            "[admin]\nconsole_users = [\"{ADMIN}\"]\npause_limit = \"60s\"\n\
             [balancer]\ncooldown = \"0s\"\n"
        ),
        ..ProxyOptions::bare(vec![
            ("pg1".into(), e.pg1.addr().to_string()),
            ("pg2".into(), e.pg2.addr().to_string()),
        ])
    })
}

fn console_url(proxy: &ProxyProcess) -> String {
    format!(
        "postgresql://{ADMIN}:{ADMIN_PASSWORD}@127.0.0.1:{}/pgferry?sslmode=disable",
        proxy.port()
    )
}

/// psql's aligned table output for one console command; fails on error.
fn console(proxy: &ProxyProcess, command: &str) -> String {
    let out = psql(
        &console_url(proxy),
        &["-v", "ON_ERROR_STOP=1", "-c", command],
        &[],
    );
    assert!(
        out.status.success(),
        "{command}: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Unaligned rows (`|`-separated) for one console command.
fn console_rows(proxy: &ProxyProcess, command: &str) -> Vec<Vec<String>> {
    let out = psql(
        &console_url(proxy),
        &["-v", "ON_ERROR_STOP=1", "-At", "-F", "|", "-c", command],
        &[],
    );
    assert!(out.status.success(), "{command}: {}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect()
}

/// The console's error for `command`: (SQLSTATE, message).
async fn console_error(proxy: &ProxyProcess, command: &str) -> (String, String) {
    let (client, _conn) = connect_console(proxy).await;
    let e = client
        .simple_query(command)
        .await
        .expect_err("the command should fail");
    let db = e.as_db_error().expect("a server error");
    (db.code().code().to_owned(), db.message().to_owned())
}

async fn connect_console(
    proxy: &ProxyProcess,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let mut c = common::tokio_config(proxy, ADMIN, ADMIN_PASSWORD);
    c.dbname("pgferry");
    let (client, conn) = c
        .connect(tokio_postgres::NoTls)
        .await
        .expect("console login");
    (
        client,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

/// An app session with a name of its own; its backend's port.
async fn app_session(
    proxy: &ProxyProcess,
    app: &str,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let mut c = common::tokio_config(proxy, USER, PASSWORD);
    c.application_name(app);
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.expect("app login");
    (
        client,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

async fn server_port(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("inet_server_port")
        .get(0)
}

/// The console's row for the session named `app` (SHOW SESSIONS).
fn session_row(proxy: &ProxyProcess, app: &str) -> Vec<String> {
    console_rows(proxy, "SHOW SESSIONS")
        .into_iter()
        .find(|r| r.get(7).map(String::as_str) == Some(app))
        .unwrap_or_else(|| panic!("no session {app} in SHOW SESSIONS"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_show_command_prints_a_table() {
    let proxy = start();
    let (app, _c) = app_session(&proxy, "console-show").await;
    server_port(&app).await;

    let backends = console(&proxy, "SHOW BACKENDS");
    for header in ["name", "host", "port", "state", "sessions"] {
        assert!(
            backends.contains(header),
            "SHOW BACKENDS header: {backends}"
        );
    }
    assert!(
        backends.contains("pg1") && backends.contains("pg2"),
        "{backends}"
    );
    assert!(backends.contains("(2 rows)"), "{backends}");

    // SHOW CLIENTS is SHOW SESSIONS, with PgBouncer's column names.
    for cmd in ["SHOW SESSIONS", "show clients"] {
        let out = console(&proxy, cmd);
        for header in [
            "type",
            "user",
            "database",
            "state",
            "addr",
            "connect_time",
            "backend",
        ] {
            assert!(out.contains(header), "{cmd} header {header}: {out}");
        }
        assert!(out.contains("console-show"), "{cmd}: {out}");
    }
    let row = session_row(&proxy, "console-show");
    assert_eq!(
        (row[0].as_str(), row[1].as_str(), row[2].as_str()),
        ("C", USER, DB)
    );
    assert_eq!(row[3], "idle", "{row:?}");

    let servers = console(&proxy, "SHOW SERVERS");
    assert!(
        servers.contains("link") && servers.contains(&row[8]),
        "{servers}"
    );

    let stats = console(&proxy, "SHOW STATS");
    for header in ["total_received", "total_sent", "migrations_success"] {
        assert!(stats.contains(header), "{stats}");
    }
    let version = console(&proxy, "SHOW VERSION");
    assert!(
        version.contains(&format!("pgferry {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let config = console(&proxy, "SHOW CONFIG");
    assert!(
        config.contains("admin.console_users") && config.contains(ADMIN),
        "{config}"
    );
    // Secrets are not shown.
    assert!(
        !config.contains(PASSWORD) && !config.contains(ADMIN_PASSWORD),
        "{config}"
    );
    let help = console(&proxy, "SHOW HELP");
    assert!(help.contains("TRANSFER"), "{help}");
    let migrations = console(&proxy, "SHOW MIGRATIONS");
    assert!(
        migrations.contains("outcome") && migrations.contains("(0 rows)"),
        "{migrations}"
    );
    // Several statements in one query, each answered.
    let both = console(&proxy, "SHOW VERSION; SHOW BACKENDS;");
    assert!(both.contains("pg1"), "{both}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbs_move_real_sessions() {
    let proxy = start();
    let e = env();
    let (app, _c) = app_session(&proxy, "console-move").await;
    app.batch_execute("SET application_name = 'console-move'; SET work_mem = '7MB'")
        .await
        .expect("set");
    let before = server_port(&app).await;
    let row = session_row(&proxy, "console-move");
    let (id, on) = (row[8].clone(), row[9].clone());
    let other = if on == "pg1" { "pg2" } else { "pg1" };

    let moved = console_rows(&proxy, &format!("TRANSFER '{id}' TO {other}"));
    assert_eq!(
        moved[0][..4],
        [id.clone(), "success".into(), on.clone(), other.into()]
    );
    let after = server_port(&app).await;
    assert_ne!(before, after, "the session is on another server now");
    let wm: String = app.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(wm, "7MB", "its settings came along");
    let migrations = console_rows(&proxy, "SHOW MIGRATIONS");
    assert_eq!(migrations[0][1], id);
    assert_eq!(migrations[0][4], "success");

    // Moving it where it is: refused, and it stays (55000).
    let (state, msg) = console_error(&proxy, &format!("TRANSFER '{id}' TO {other}")).await;
    assert_eq!(state, "55000", "{msg}");
    let (state, _) = console_error(&proxy, "TRANSFER 'no-such-id'").await;
    assert_eq!(state, "42704");

    // DRAIN the backend it is on now: it comes back, and ACTIVATE reopens.
    let drained = console_rows(&proxy, &format!("DRAIN {other} TIMEOUT 10"));
    assert_eq!(drained[0][0], other);
    assert!(drained[0][1].parse::<u64>().unwrap() >= 1, "{drained:?}");
    assert_eq!(drained[0][3], "0", "nothing left on {other}: {drained:?}");
    assert_eq!(server_port(&app).await, before);
    let backends = console_rows(&proxy, "SHOW BACKENDS");
    let state_of =
        |rows: &[Vec<String>], name: &str| rows.iter().find(|r| r[0] == name).map(|r| r[3].clone());
    assert_eq!(state_of(&backends, other).as_deref(), Some("drained"));
    let activated = console_rows(&proxy, &format!("ACTIVATE {other}"));
    assert_eq!(activated[0][3], "active");

    // REBALANCE: four sessions on one backend, none on the other (the
    // balancer's band leaves 2-0 and 3-0 alone).
    let mut extra = Vec::new();
    for i in 0..3 {
        let name = format!("console-move-{i}");
        let (c, conn) = app_session(&proxy, &name).await;
        server_port(&c).await;
        let r = session_row(&proxy, &name);
        if r[9] != on {
            console_rows(&proxy, &format!("TRANSFER '{}' TO {on}", r[8]));
        }
        extra.push((c, conn));
    }
    let count_on = |name: &str| -> u64 {
        console_rows(&proxy, "SHOW BACKENDS")
            .into_iter()
            .find(|r| r[0] == name)
            .map(|r| r[7].parse().unwrap())
            .unwrap()
    };
    assert_eq!((count_on(&on), count_on(other)), (4, 0));
    let rebalanced = console_rows(&proxy, "REBALANCE TIMEOUT 10");
    assert!(!rebalanced.is_empty(), "4-0 is out of balance");
    assert!(
        rebalanced.iter().all(|r| r[3] == "success"),
        "{rebalanced:?}"
    );
    assert_eq!(count_on(other), rebalanced.len() as u64);
    let mut ports = vec![server_port(&app).await];
    for (c, _) in &extra {
        ports.push(server_port(c).await);
    }
    assert!(ports.contains(&(e.pg1.addr().port() as i32)));
    assert!(ports.contains(&(e.pg2.addr().port() as i32)));

    // RELOAD re-reads the file: a third backend appears.
    let config = proxy.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}[[backend]]\nname = \"pg1b\"\naddress = \"{}\"\n",
            e.pg1.addr()
        ),
    )
    .unwrap();
    let reloaded = console_rows(&proxy, "RELOAD");
    assert_eq!(reloaded[0][0], "pg1b");
    assert!(console(&proxy, "SHOW BACKENDS").contains("pg1b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_the_next_query_until_resume() {
    let proxy = start();
    let (app, _c) = app_session(&proxy, "console-pause").await;
    server_port(&app).await;

    let paused = console_rows(&proxy, "PAUSE TIMEOUT 5");
    assert_eq!(paused[0][0], "*");
    let held: u64 = paused[0][1].parse().unwrap();
    assert!(held >= 1, "{paused:?}");
    // A second PAUSE is refused while this one is in force.
    let (state, _) = console_error(&proxy, "PAUSE").await;
    assert_eq!(state, "55000");

    let mut query = tokio::spawn(async move {
        let v: i32 = app.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
        (v, app)
    });
    // Held: no answer while paused (it would take a millisecond).
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut query)
            .await
            .is_err(),
        "the query was answered during the pause"
    );
    let resumed = console_rows(&proxy, "RESUME");
    assert_eq!(resumed[0][1], held.to_string());
    let (v, app) = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("answered after RESUME")
        .unwrap();
    assert_eq!(v, 42);
    let (state, _) = console_error(&proxy, "RESUME").await;
    assert_eq!(state, "55000", "nothing is paused now");

    // A session inside a transaction never reaches a safe point: PAUSE
    // gives up at its deadline, undoes itself, and the session goes on.
    app.batch_execute("BEGIN").await.unwrap();
    let started = Instant::now();
    let (state, msg) = console_error(&proxy, "PAUSE TIMEOUT 1").await;
    assert_eq!(state, "57014", "{msg}");
    assert!(msg.contains("pause undone"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(10));
    app.batch_execute("SELECT 1; COMMIT")
        .await
        .expect("not held");
    // A pause of one backend holds only that backend's sessions.
    let on = session_row(&proxy, "console-pause")[9].clone();
    let other = if on == "pg1" { "pg2" } else { "pg1" };
    let paused_other = console_rows(&proxy, &format!("PAUSE {other}"));
    assert_eq!(paused_other[0][1], "0");
    app.batch_execute("SELECT 1")
        .await
        .expect("not held by another backend's pause");
    let (state, _) = console_error(&proxy, "RESUME").await;
    assert_eq!(state, "22023", "RESUME must name the paused backend");
    console_rows(&proxy, &format!("RESUME {other}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_their_sqlstates() {
    let proxy = start();
    // A user not in console_users: 28000, though the password is right.
    let mut c = common::tokio_config(&proxy, USER, PASSWORD);
    c.dbname("pgferry");
    let Err(e) = c.connect(tokio_postgres::NoTls).await else {
        panic!("refused")
    };
    assert_eq!(common::sqlstate(&e).as_deref(), Some("28000"), "{e}");

    let (state, msg) = console_error(&proxy, "SELECT 1").await;
    assert_eq!(state, "42601");
    assert!(
        msg.contains("SHOW BACKENDS") && msg.contains("DRAIN"),
        "{msg}"
    );
    let (state, msg) = console_error(&proxy, "DRAIN").await;
    assert_eq!(state, "42601");
    assert!(msg.contains("usage: DRAIN"), "{msg}");
    let (state, _) = console_error(&proxy, "DRAIN nosuch").await;
    assert_eq!(state, "42704");
    // No [backend_admin]: the switchover verb refuses before anything.
    let (state, msg) = console_error(&proxy, "SWITCHOVER pg1 TO pg2").await;
    assert_eq!(state, "22023", "{msg}");
    // The extended protocol is refused cleanly; the connection goes on.
    let (client, _conn) = connect_console(&proxy).await;
    let e = client.prepare("SHOW BACKENDS").await.expect_err("refused");
    assert_eq!(common::sqlstate(&e).as_deref(), Some("0A000"));
    let rows = client
        .simple_query("SHOW VERSION")
        .await
        .expect("still usable");
    assert!(!rows.is_empty());
    // And the proxy serves everyone else meanwhile.
    let (app, _c) = connect(&proxy, USER, PASSWORD).await.expect("app login");
    server_port(&app).await;
    // A wrong password for an admin: like any client's (last: it starts
    // the back-off for this user).
    let mut c = common::tokio_config(&proxy, ADMIN, "wrong");
    c.dbname("pgferry");
    let Err(e) = c.connect(tokio_postgres::NoTls).await else {
        panic!("refused")
    };
    assert_eq!(common::sqlstate(&e).as_deref(), Some("28P01"), "{e}");
}

#[test]
fn shutdown_stops_pgferry_like_sigterm() {
    let mut proxy = start();
    let out = console(&proxy, "SHUTDOWN");
    assert!(out.contains("SHUTDOWN"), "{out}");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0));
}
