//! Restarting pgferry itself: `pgferry run --takeover` takes a running
//! pgferry's listeners and live sessions (plaintext and TLS, client and
//! backend side) over, against the shared real PostgreSQL clusters.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

/// A session with settings and prepared statements of its own, and what
/// the server says about it.
struct Idle {
    client: tokio_postgres::Client,
    app: String,
    select: tokio_postgres::Statement,
    /// (pg_backend_pid, backend_start) as the server reported them.
    backend: (i32, String),
}

impl Idle {
    async fn open(client: tokio_postgres::Client, app: &str) -> Self {
        client
            .batch_execute(&format!(
                "SET application_name = '{app}'; SET work_mem = '7MB'; SET app.tag = '{app}'"
            ))
            .await
            .expect("set");
        let select = client
            .prepare("SELECT current_setting('work_mem'), current_setting('app.tag'), $1::int + 1")
            .await
            .expect("prepare");
        let backend = Self::backend(&client).await;
        Self {
            client,
            app: app.to_owned(),
            select,
            backend,
        }
    }

    async fn backend(client: &tokio_postgres::Client) -> (i32, String) {
        let row = client
            .query_one(
                "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("backend");
        (row.get(0), row.get(1))
    }

    /// The session answers with its settings, its prepared statement and
    /// the same server process as before.
    async fn check(&self) {
        let row = self
            .client
            .query_one(&self.select, &[&41i32])
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.app));
        assert_eq!(row.get::<_, String>(0), "7MB", "{}", self.app);
        assert_eq!(row.get::<_, String>(1), self.app);
        assert_eq!(row.get::<_, i32>(2), 42);
        assert_eq!(
            Self::backend(&self.client).await,
            self.backend,
            "{}: not the same server process",
            self.app
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_plaintext_sessions_keep_their_backend_through_a_takeover() {
    let mut proxy = ProxyProcess::start(ProxyOptions::default());
    let mut sessions = Vec::new();
    for i in 0..5 {
        let (client, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
        sessions.push(Idle::open(client, &format!("plain{i}")).await);
    }
    let old = proxy.take_over(&[]);
    assert_eq!(exit_code(old, Duration::from_secs(30)), Some(0));
    for s in &sessions {
        s.check().await;
    }
    assert_eq!(
        proxy.metric("pgferry_handoff_sessions_total{outcome=\"adopted\"}"),
        5.0
    );
    // New connections reach the new process on the same port.
    let (fresh, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    fresh.simple_query("SELECT 1").await.expect("query");
}

/// psql (libpq, OpenSSL) in one long session over TLS, fed line by line.
struct PsqlSession {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    name: String,
}

impl PsqlSession {
    fn open(url: &str, name: &str) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(psql_bin())
            .arg(url)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = std::sync::mpsc::channel();
        for out in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Self {
            child,
            stdin,
            lines,
            name: name.to_owned(),
        }
    }

    /// Sends statements that print nothing.
    fn send(&mut self, sql: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{sql}").expect("write to psql");
        self.stdin.flush().expect("flush psql");
    }

    /// Sends one statement; returns the next line psql prints.
    fn query(&mut self, sql: &str) -> String {
        self.send(sql);
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{}: no answer to {sql}", self.name))
    }
}

impl Drop for PsqlSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PSQL_SETUP: &str = "SET work_mem = '3MB'; PREPARE who(int) AS SELECT $1 + 1, \
    current_setting('work_mem'), pid, backend_start::text FROM pg_stat_activity \
    WHERE pid = pg_backend_pid();";

#[test]
fn pgbench_and_idle_tls_and_plaintext_sessions_through_a_takeover() {
    let e = env();
    for c in [&e.pg1, &e.pg2] {
        pgbench(c.port(), &["-i", "-s", "1", "-q"]);
    }
    let mut proxy = ProxyProcess::start(ProxyOptions {
        proxy_extra: "max_client_connections = 200\nshutdown_timeout = \"20s\"".into(),
        ..ProxyOptions::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // 20 plaintext sessions (tokio-postgres: protocol-level prepared
    // statements) and 20 TLS ones (psql: SQL-level PREPARE).
    let plain: Vec<Idle> = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..20 {
            let (client, conn) = tokio_config(&proxy, USER, PASSWORD)
                .connect(tokio_postgres::NoTls)
                .await
                .expect("connect");
            rt_spawn(conn);
            v.push(Idle::open(client, &format!("plain{i}")).await);
        }
        v
    });
    let mut tls: Vec<(PsqlSession, String)> = (0..20)
        .map(|i| {
            let name = format!("tls{i}");
            let mut s = PsqlSession::open(
                &proxy.url(
                    USER,
                    PASSWORD,
                    &format!("sslmode=require&application_name={name}"),
                ),
                &name,
            );
            s.send(PSQL_SETUP);
            let before = s.query("EXECUTE who(1);");
            assert!(before.starts_with("2|3MB|"), "{name}: {before}");
            (s, before)
        })
        .collect();

    // Connection attempts all through the hand-off: none may be refused.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = proxy.port();
    let connector = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = psql(
                    &format!(
                        "postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/{DB}?sslmode=disable"
                    ),
                    &["-X", "-A", "-t", "-c", "SELECT 1"],
                    &[],
                );
                if out.status.success() && stdout(&out).trim() == "1" {
                    ok += 1;
                } else {
                    failed.push(stderr(&out));
                }
            }
            (ok, failed)
        })
    };
    let bench = std::thread::spawn(move || {
        pgbench(
            port,
            &["-M", "prepared", "-c", "16", "-j", "2", "-T", "8", "-n"],
        )
    });
    // All 16 of pgbench's own (the client gauge also counts the
    // connector's, which let a take-over start with 15 of them: 55
    // adopted, the 16th logged in to the new process).
    wait_until(Duration::from_secs(10), "pgbench sessions", || {
        sessions_of(proxy.admin, "pgbench").len() == 16
    });
    let old = proxy.take_over(&[]);
    let code = exit_code(old, Duration::from_secs(40));
    let out = bench.join().expect("pgbench");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (connects, refused) = connector.join().expect("connector");

    assert_eq!(
        code,
        Some(0),
        "old process exit code; new log:\n{}",
        proxy.log()
    );
    let failed = number_after(&out, "number of failed transactions:");
    let processed = number_after(&out, "number of transactions actually processed:");
    assert_eq!(failed, 0.0, "{out}");
    assert!(!out.contains("aborted"), "a pgbench client aborted:\n{out}");
    assert!(processed > 0.0);
    assert!(
        refused.is_empty(),
        "refused connection attempts: {refused:?}"
    );
    assert!(connects > 0);
    rt.block_on(async {
        for s in &plain {
            s.check().await;
        }
    });
    for (s, before) in &mut tls {
        let after = s.query("EXECUTE who(1);");
        assert_eq!(
            &after, before,
            "{}: settings, statement or server process changed",
            s.name
        );
    }
    // Every session of the old process was adopted: 16 pgbench, 40 idle.
    let adopted = proxy.metric("pgferry_handoff_sessions_total{outcome=\"adopted\"}");
    assert!(adopted >= 56.0, "adopted {adopted}");
    eprintln!("takeover under pgbench: {processed} transactions, {connects} connection attempts, {adopted} sessions adopted");
}

fn rt_spawn<F>(f: F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_dies_midway_leaves_every_session_with_the_old_process() {
    let mut proxy = ProxyProcess::start(ProxyOptions::default());
    let mut sessions = Vec::new();
    for i in 0..6 {
        let (client, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
        sessions.push(Idle::open(client, &format!("stay{i}")).await);
    }
    let mut tls = PsqlSession::open(
        &proxy.url(USER, PASSWORD, "sslmode=require&application_name=staytls"),
        "staytls",
    );
    tls.send(PSQL_SETUP);
    let tls_before = tls.query("EXECUTE who(1);");
    // The new process takes the listeners, then dies as the first session
    // arrives, before answering it.
    let mut old = proxy.take_over(&[("PGFERRY_TEST_HANDOFF_DIE_AT_SESSION", "1")]);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(70));
    assert!(
        old.try_wait().expect("wait").is_none(),
        "the old process must go on"
    );
    for s in &sessions {
        s.check().await;
    }
    assert_eq!(tls.query("EXECUTE who(1);"), tls_before);
    // The old process accepts again on the same listener.
    let (fresh, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    fresh.simple_query("SELECT 1").await.expect("query");
    drop(fresh);
    // Those in flight (up to handoff_window) came back; none was lost.
    let resumed = proxy.metric("pgferry_handoff_sessions_total{outcome=\"resumed\"}");
    assert!(resumed >= 1.0, "resumed {resumed}");
    assert_eq!(
        proxy.metric("pgferry_handoff_sessions_total{outcome=\"handed_over\"}"),
        0.0
    );
    // And a later takeover goes through.
    drop(proxy.replace_child(old));
    let old = proxy.take_over(&[]);
    assert_eq!(exit_code(old, Duration::from_secs(30)), Some(0));
    for s in &sessions {
        s.check().await;
    }
    assert_eq!(tls.query("EXECUTE who(1);"), tls_before);
}

/// The sleeper's query runs on its server: not just forwarded by pgferry,
/// since a cancel that reaches a backend before it has read the query is
/// ignored by PostgreSQL (the test then waited out the whole sleep).
fn sleeping_on_a_server() -> bool {
    let e = env();
    [&e.pg1, &e.pg2].iter().any(|c| {
        c.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sleeper' \
             AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
        )
        .is_ok_and(|n| n.trim() == "1")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_reach_queries_in_either_process_and_audit_rows_move_with_their_sessions() {
    use pgferry_pgcluster::{Cluster, ClusterOptions};
    let audit = Cluster::start_temp(&server_binaries(), ClusterOptions::named("handoff-audit"))
        .expect("audit cluster");
    let proxy_id = "handoff-audit";
    let mut proxy = ProxyProcess::start(ProxyOptions {
        // The busy session stays with the old process until its query is
        // cancelled: its shutdown_timeout must not end it first (the
        // harness's 1 s did, under load: 57P01 instead of 57014).
        proxy_extra: "handoff_timeout = \"100ms\"\nshutdown_timeout = \"60s\"".into(),
        extra_sections: format!(
            "[audit]\nurl = \"host=127.0.0.1 port={} user={} password={} dbname=postgres\"\n\
             proxy_id = \"{proxy_id}\"\nflush_interval = \"100ms\"\n",
            audit.port(),
            audit.superuser(),
            audit.superuser_password()
        ),
        ..ProxyOptions::default()
    });
    let rows = |condition: &str| -> i64 {
        audit
            .psql(
                "postgres",
                &format!(
                    "select count(*) from pgferry_connection_log \
                     where proxy_id = '{proxy_id}' and ({condition})"
                ),
            )
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1)
    };
    let idle: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(connect(&proxy, USER, PASSWORD).await.expect("connect").0);
        }
        v
    };
    // One session is busy through the takeover: it stays with the old
    // process until its query ends, and a cancel for it, arriving at the
    // new process, is passed back to the old one.
    let (busy, conn) = tokio_config(&proxy, USER, PASSWORD)
        .application_name("sleeper")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let busy_cancel = busy.cancel_token();
    let sleeping = tokio::spawn(async move {
        let r = busy.simple_query("SELECT pg_sleep(60)").await;
        (busy, r)
    });
    wait_until(
        Duration::from_secs(10),
        "the sleep to start",
        sleeping_on_a_server,
    );
    wait_until(
        Duration::from_secs(10),
        "audit rows of the open sessions",
        || rows("disconnect_time IS NULL") == 4,
    );
    let old = proxy.take_over(&[]);
    busy_cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel request");
    let (busy, r) = sleeping.await.expect("task");
    let err = r.expect_err("the sleep was cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert_eq!(exit_code(old, Duration::from_secs(30)), Some(0));
    // Every session runs in the new process now, and cancels find it there.
    let busy_cancel = busy.cancel_token();
    let sleeping = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(60)").await });
    wait_until(
        Duration::from_secs(10),
        "the second sleep to start",
        sleeping_on_a_server,
    );
    busy_cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel request");
    let err = sleeping
        .await
        .expect("task")
        .expect_err("the sleep was cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    for c in &idle {
        c.simple_query("SELECT 1").await.expect("idle session");
    }
    drop(idle);
    // One row per session (the sleeper's task ended with its client), none
    // closed by a restart sweep, each closed once, by the new process,
    // when its client left.
    let deadline = Instant::now() + Duration::from_secs(10);
    drop(busy_cancel);
    while rows("disconnect_time IS NOT NULL") != 4 {
        assert!(
            Instant::now() < deadline,
            "closed rows: {}, all rows: {}; log:\n{}",
            rows("disconnect_time IS NOT NULL"),
            rows("true"),
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rows("true"), 4, "one row per session");
    assert_eq!(rows("disconnect_reason = 'proxy_restarted'"), 0);
    assert_eq!(rows("disconnect_reason = 'client_closed'"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_with_an_unknown_state_format_is_refused_and_the_old_one_goes_on() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let (client, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let session = Idle::open(client, "skew").await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["run", "--takeover", "--config"])
        .arg(proxy.config_path())
        .env("PGFERRY_TEST_HANDOFF_STATE", "99-99")
        .output()
        .expect("run pgferry");
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no common version"), "{err}");
    session.check().await;
    let (fresh, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    fresh.simple_query("SELECT 1").await.expect("query");
    // A plain second start beside a running pgferry is refused too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["run", "--config"])
        .arg(proxy.config_path())
        .output()
        .expect("run pgferry");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--takeover"), "{}", stderr(&out));
    session.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_never_reaches_a_safe_point_stays_with_the_old_process_until_shutdown_timeout(
) {
    let mut proxy = ProxyProcess::start(ProxyOptions::default());
    let (moved, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let moved = Idle::open(moved, "moved").await;
    let (stuck, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    stuck.batch_execute("BEGIN").await.expect("begin");
    let old = proxy.take_over(&[]);
    // shutdown_timeout (1 s in these tests) of asking, then as much again
    // to finish, then 57P01: the old process exits 0 all the same.
    assert_eq!(exit_code(old, Duration::from_secs(30)), Some(0));
    let err = stuck
        .simple_query("SELECT 1")
        .await
        .expect_err("its process has ended");
    assert!(
        sqlstate(&err).as_deref() == Some("57P01") || err.is_closed(),
        "{err}"
    );
    moved.check().await;
    assert_eq!(
        proxy.metric("pgferry_handoff_sessions_total{outcome=\"adopted\"}"),
        1.0
    );
}

/// A cluster of its own with TLS on (a self-signed certificate).
fn tls_cluster() -> pgferry_pgcluster::Cluster {
    use pgferry_pgcluster::{Cluster, ClusterOptions};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let cluster = Cluster::start_temp(&server_binaries(), ClusterOptions::named("handoff-tls"))
        .expect("cluster");
    cluster
        .ensure_user_and_database(USER, PASSWORD, DB)
        .expect("user");
    let dir = cluster.data_dir();
    let owner = std::fs::metadata(dir).expect("data dir");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("certificate");
    for (file, body) in [
        ("server.crt", ck.cert.pem()),
        ("server.key", ck.signing_key.serialize_pem()),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, body).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        nix::unistd::chown(
            &path,
            Some(nix::unistd::Uid::from_raw(owner.uid())),
            Some(nix::unistd::Gid::from_raw(owner.gid())),
        )
        .expect("chown");
    }
    cluster
        .psql("postgres", "ALTER SYSTEM SET ssl = on")
        .expect("ssl on");
    cluster
        .psql("postgres", "SELECT pg_reload_conf()")
        .expect("reload");
    wait_until(Duration::from_secs(10), "ssl on", || {
        cluster.psql("postgres", "SHOW ssl").ok().as_deref() == Some("on")
    });
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_sessions_go_on_through_two_takeovers_in_a_row() {
    let cluster = tls_cluster();
    let mut proxy = ProxyProcess::start(ProxyOptions {
        extra_sections: "[backend_tls]\nmode = \"require\"\n".into(),
        ..ProxyOptions::bare(vec![("pgtls".into(), cluster.addr().to_string())])
    });
    let mut sessions = Vec::new();
    for i in 0..4 {
        let (client, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("pg_stat_ssl")
            .get(0);
        assert!(ssl, "pgferry's connection to the server is TLS");
        sessions.push(Idle::open(client, &format!("btls{i}")).await);
    }
    let mut tls = PsqlSession::open(
        &proxy.url(USER, PASSWORD, "sslmode=require&application_name=both"),
        "both",
    );
    tls.send(PSQL_SETUP);
    let before = tls.query("EXECUTE who(1);");
    // A -> B -> C: the second hand-off exports streams the first one
    // continued (pgferry's own record layer, both sides of the proxy).
    for round in 0..2 {
        let old = proxy.take_over(&[]);
        assert_eq!(
            exit_code(old, Duration::from_secs(30)),
            Some(0),
            "round {round}"
        );
        for s in &sessions {
            s.check().await;
        }
        // Large answers: many TLS records each way.
        let big: String = sessions[0]
            .client
            .query_one("SELECT repeat('x', 300000)", &[])
            .await
            .expect("big")
            .get(0);
        assert_eq!(big.len(), 300_000);
        assert_eq!(tls.query("EXECUTE who(1);"), before, "round {round}");
        assert_eq!(
            tls.query("SELECT length(repeat('y', 200000) || $$z$$);"),
            "200001"
        );
    }
}

/// `connect` as `user` (to its own database) with an application_name.
async fn connect_as(
    proxy: &ProxyProcess,
    user: &str,
    password: &str,
    db: &str,
    app: &str,
) -> tokio_postgres::Client {
    let (c, conn) = tokio_config(proxy, user, password)
        .dbname(db)
        .application_name(app)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_over_sessions_can_still_move_and_a_user_gone_from_the_userlist_stays_behind() {
    let e = env();
    for c in [&e.pg1, &e.pg2] {
        c.ensure_user_and_database("leaver", "leaver-secret", "leaver")
            .expect("user");
    }
    let userlist = |with_leaver: bool| {
        format!(
            "\"{USER}\" \"{PASSWORD}\"\n\"{PT_USER}\" \"{}\"\n{}",
            e.pt_verifier,
            if with_leaver {
                "\"leaver\" \"leaver-secret\"\n"
            } else {
                ""
            }
        )
    };
    let mut proxy = ProxyProcess::start(ProxyOptions {
        proxy_extra: "shutdown_timeout = \"3s\"".into(),
        userlist: Some(userlist(true)),
        ..ProxyOptions::default()
    });
    // SCRAM pass-through (ptuser has a verifier in the userlist: the
    // ClientKey from its login travels) and a userlist password (app):
    // both must log in to another backend after the hand-off, as a move
    // does.
    let pt = connect_as(&proxy, PT_USER, PT_PASSWORD, DB, "pt").await;
    let app = connect_as(&proxy, USER, PASSWORD, DB, "app").await;
    let leaver = connect_as(&proxy, "leaver", "leaver-secret", "leaver", "leaver").await;
    // The successor reads a userlist without "leaver": it cannot take that
    // session (it could never log it in anywhere), which stays behind.
    std::fs::write(proxy.dir.path().join("users.txt"), userlist(false)).expect("userlist");
    let mut old = proxy.take_over(&[]);
    wait_until(Duration::from_secs(10), "the refusal", || {
        proxy.metric("pgferry_handoff_sessions_total{outcome=\"refused\"}") == 1.0
    });
    assert!(old.try_wait().expect("wait").is_none());
    leaver
        .simple_query("SELECT 1")
        .await
        .expect("the old process still serves it");
    for (client, app_name) in [(&pt, "pt"), (&app, "app")] {
        let before: i32 = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .expect("port")
            .get(0);
        let id = proxy.connection_by_app(app_name)["id"]
            .as_str()
            .expect("id")
            .to_owned();
        let admin = proxy.admin;
        let (status, body) = tokio::task::spawn_blocking(move || {
            admin_json(
                admin,
                "POST",
                &format!("/v1/connections/{id}/transfer"),
                "{}",
            )
        })
        .await
        .expect("join");
        assert_eq!(status, 200, "{app_name}: {body}");
        let after: i32 = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .expect("port")
            .get(0);
        assert_ne!(before, after, "{app_name} moved to the other backend");
    }
    // shutdown_timeout of asking, as much again to finish, then 57P01.
    assert_eq!(exit_code(old, Duration::from_secs(30)), Some(0));
    let err = leaver
        .simple_query("SELECT 1")
        .await
        .expect_err("its process is gone");
    assert!(
        sqlstate(&err).as_deref() == Some("57P01") || err.is_closed(),
        "{err}"
    );
    let _ = &mut proxy;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_a_successor_from_the_same_binary_and_config() {
    let mut proxy = ProxyProcess::start(ProxyOptions::default());
    let old_pid = proxy.pid();
    let (client, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let session = Idle::open(client, "usr2").await;
    proxy.signal(nix::sys::signal::Signal::SIGUSR2);
    assert_eq!(proxy.wait_exit(Duration::from_secs(30)), Some(0));
    // The admin listener moved too: the new process answers on it.
    let (_, status) = admin_json(proxy.admin, "GET", "/v1/handoff", "");
    let new_pid = status["pid"].as_i64().expect("pid");
    let _new = KillOnDrop(i32::try_from(new_pid).expect("pid"));
    assert_ne!(new_pid, i64::from(old_pid), "{status}");
    assert_eq!(status["role"], "new", "{status}");
    assert_eq!(status["peer_pid"], i64::from(old_pid), "{status}");
    session.check().await;
}
