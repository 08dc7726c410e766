//! End-to-end behaviour of the proxy against real PostgreSQL 15 clusters,
//! through the built `pgferry` binary.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

fn read_until_close(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
            Err(e) => panic!("proxy did not close the connection: {e}"),
        }
    }
}

fn assert_serves(proxy: &ProxyProcess) {
    let out = psql(
        &proxy.url(USER, PASSWORD, "sslmode=disable"),
        &["-Atc", "select 40 + 2"],
        &[],
    );
    assert!(out.status.success(), "psql failed: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "42");
}

#[test]
fn psql_over_tls_and_plain_runs_queries_copy_and_sees_server_version() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let backend_version = env()
        .pg1
        .psql("postgres", "show server_version")
        .expect("version");
    let dir = tempfile::tempdir().expect("tmp");
    let input = dir.path().join("in.csv");
    let rows: String = (1..=500).map(|i| format!("{i},row {i}\n")).collect();
    std::fs::write(&input, &rows).expect("write csv");

    for (mode, table) in [("require", "copy_tls"), ("disable", "copy_plain")] {
        let url = proxy.url(USER, PASSWORD, &format!("sslmode={mode}"));
        let output = dir.path().join(format!("{table}.csv"));
        let script = format!(
            "\\conninfo\n\
             show server_version;\n\
             drop table if exists {table};\n\
             create table {table}(id int, label text);\n\
             \\copy {table} from '{}' csv\n\
             select count(*), sum(id) from {table};\n\
             \\copy (select * from {table} order by id) to '{}' csv\n",
            input.display(),
            output.display()
        );
        let script_path = dir.path().join(format!("{table}.sql"));
        std::fs::write(&script_path, script).expect("script");
        let out = psql(
            &url,
            &[
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-f",
                script_path.to_str().expect("path"),
            ],
            &[],
        );
        assert!(out.status.success(), "sslmode={mode}: {}", stderr(&out));
        let text = stdout(&out);
        assert_eq!(
            text.contains("SSL connection"),
            mode == "require",
            "sslmode={mode} conninfo: {text}"
        );
        assert!(
            text.contains(backend_version.trim()),
            "server_version missing: {text}"
        );
        assert!(text.contains("500|125250"), "copy in: {text}");
        assert_eq!(std::fs::read_to_string(&output).expect("copy out"), rows);
    }
}

#[tokio::test]
async fn wrong_password_and_unknown_user_both_get_28p01() {
    // The answers are under test here, not the back-off (tests/auth_hardening.rs), which
    // would refuse the right password right after the wrong one below.
    let proxy = ProxyProcess::start(ProxyOptions {
        auth_extra: "throttle = false".into(),
        ..Default::default()
    });
    let before = proxy.metric("pgferry_auth_failures_total");
    let wrong = connect(&proxy, USER, "not-the-password")
        .await
        .expect_err("wrong password accepted");
    let unknown = connect(&proxy, "nobody", PASSWORD)
        .await
        .expect_err("unknown user accepted");
    for (e, user) in [(&wrong, USER), (&unknown, "nobody")] {
        assert_eq!(sqlstate(e).as_deref(), Some("28P01"), "{e}");
        let db = e.as_db_error().expect("db error");
        assert_eq!(
            db.message(),
            format!("password authentication failed for user \"{user}\"")
        );
    }
    assert_eq!(proxy.metric("pgferry_auth_failures_total") - before, 2.0);
    // The same psql-visible message for both.
    let out = psql(
        &proxy.url("nobody", "x", "sslmode=disable"),
        &["-c", "select 1"],
        &[],
    );
    assert!(stderr(&out).contains("password authentication failed for user \"nobody\""));
    assert_serves(&proxy);
}

#[tokio::test]
async fn tls_required_refuses_plaintext_with_28000() {
    let proxy = ProxyProcess::start(ProxyOptions {
        require_tls: true,
        ..Default::default()
    });
    let e = connect(&proxy, USER, PASSWORD)
        .await
        .expect_err("plaintext accepted");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e}");
    let out = psql(
        &proxy.url(USER, PASSWORD, "sslmode=require"),
        &["-Atc", "select 1"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test]
async fn backend_down_gives_08006() {
    let dead = RefusedPort::reserve();
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![("gone".into(), dead.addr.to_string())],
        ..Default::default()
    });
    let e = connect(&proxy, USER, PASSWORD)
        .await
        .expect_err("connected to nothing");
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{e}");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(
        msg.starts_with("could not connect to backend gone"),
        "{msg}"
    );
    assert!(
        !msg.contains(&dead.addr.port().to_string()),
        "backend addresses are not for clients: {msg}"
    );
    assert_eq!(
        proxy.metric("pgferry_backend_dial_errors_total{backend=\"gone\"}"),
        1.0
    );
}

#[tokio::test]
async fn one_backend_down_sessions_go_to_the_other() {
    let dead = RefusedPort::reserve();
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![
            ("gone".into(), dead.addr.to_string()),
            ("pg1".into(), env().pg1.addr().to_string()),
        ],
        ..Default::default()
    });
    let _open = sessions_all_on_pg1(&proxy, 3).await;
    // pg1 holding sessions puts "gone" first for every later choice.
    assert!(proxy.metric("pgferry_backend_dial_errors_total{backend=\"gone\"}") >= 2.0);
}

/// Opens `n` sessions, kept open, and checks each runs on pg1.
async fn sessions_all_on_pg1(proxy: &ProxyProcess, n: usize) -> Vec<tokio_postgres::Client> {
    let mut open = Vec::new();
    for _ in 0..n {
        let (c, _conn) = connect(proxy, USER, PASSWORD).await.expect("connect");
        let row = c
            .query_one("select inet_server_port()", &[])
            .await
            .expect("query");
        assert_eq!(row.get::<_, i32>(0) as u16, env().pg1.port());
        open.push(c);
    }
    open
}

/// A backend address that leads back to pgferry itself (an operator's
/// slip) must be refused at the dial, not followed: each hop would open
/// another session to itself until the process runs out of descriptors.
#[tokio::test]
async fn a_backend_pointing_at_the_proxy_itself_is_refused_not_followed() {
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![("pg1".into(), env().pg1.addr().to_string())],
        ..Default::default()
    });
    let body = format!(r#"{{"name": "itself", "address": "{}"}}"#, proxy.addr);
    let (status, out) = proxy.http("POST", "/v1/backends", Some(&body), None);
    assert_eq!(status, 201, "{out}");
    let _open = sessions_all_on_pg1(&proxy, 4).await;
    assert!(proxy.metric("pgferry_backend_dial_errors_total{backend=\"itself\"}") >= 3.0);
    assert!(
        proxy.log().contains("own listen address"),
        "{}",
        proxy.log()
    );
    // Only the four clients hold sessions: nothing recursed.
    let (_, conns) = proxy.http_get("/v1/connections");
    let conns: serde_json::Value = serde_json::from_str(&conns).expect("json");
    assert_eq!(conns.as_array().map(Vec::len), Some(4), "{conns}");
}

#[test]
fn garbage_and_bad_lengths_are_closed_and_the_proxy_keeps_serving() {
    let proxy = ProxyProcess::start(ProxyOptions {
        proxy_extra: "startup_timeout = \"1s\"".into(),
        ..Default::default()
    });
    let garbage: Vec<u8> = (0u8..20)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("20 garbage bytes", garbage),
        ("startup length 4", 4u32.to_be_bytes().to_vec()),
        (
            "startup length 2^31-1",
            0x7fff_ffffu32.to_be_bytes().to_vec(),
        ),
        ("startup length 10001", 10_001u32.to_be_bytes().to_vec()),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(proxy.addr).expect("connect");
        s.write_all(&bytes).expect("send");
        let reply = read_until_close(&mut s);
        assert!(
            reply.is_empty() || reply[0] == b'E',
            "{what}: unexpected reply {reply:?}"
        );
        assert_serves(&proxy);
    }
    // A client that sends nothing is closed at the startup deadline.
    let mut silent = TcpStream::connect(proxy.addr).expect("connect");
    let t = Instant::now();
    assert!(read_until_close(&mut silent).is_empty());
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
    // TLS garbage: SSLRequest, then bytes that are not a ClientHello.
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47])
        .expect("ssl request");
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"S");
    s.write_all(b"this is not TLS at all, just plaintext\n")
        .expect("send");
    let _ = read_until_close(&mut s);
    assert_serves(&proxy);
}

#[tokio::test]
async fn message_over_the_limit_gets_08p01_and_others_are_unaffected() {
    let proxy = ProxyProcess::start(ProxyOptions {
        proxy_extra: "max_message_length = 65536".into(),
        ..Default::default()
    });
    let (bystander, _c) = connect(&proxy, USER, PASSWORD).await.expect("bystander");
    let (client, conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let big = format!("select '{}'", "x".repeat(100_000));
    let e = client
        .simple_query(&big)
        .await
        .expect_err("oversized query accepted");
    let conn_result = conn.await.expect("join");
    let code = sqlstate(&e).or_else(|| conn_result.as_ref().err().and_then(sqlstate));
    assert_eq!(
        code.as_deref(),
        Some("08P01"),
        "query error {e}, connection {conn_result:?}"
    );
    let row = bystander
        .query_one("select 7", &[])
        .await
        .expect("bystander works");
    assert_eq!(row.get::<_, i32>(0), 7);
    assert_serves(&proxy);
}

#[tokio::test]
async fn cancel_reaches_the_backend_serving_the_session() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let (client, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let port: i32 = client
        .query_one("select inet_server_port()", &[])
        .await
        .expect("port")
        .get(0);
    let cluster = cluster_by_port(port as u16);
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = client.simple_query("select pg_sleep(60)").await;
        (r, Instant::now())
    });
    let c = cluster;
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(10), "pg_sleep to start", || {
            c.psql("postgres", "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'")
                .map(|s| s.trim() == "1")
                .unwrap_or(false)
        })
    })
    .await
    .expect("wait");
    let sent = Instant::now();
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let (result, finished) = sleeper.await.expect("join");
    let e = result.expect_err("pg_sleep was not cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    assert!(
        finished.duration_since(sent) < Duration::from_secs(1),
        "cancel took {:?}",
        finished.duration_since(sent)
    );

    // Unknown keys are ignored without an answer.
    let mut s = TcpStream::connect(proxy.addr).expect("connect");
    let mut packet = vec![0, 0, 0, 16, 4, 210, 22, 46];
    packet.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    s.write_all(&packet).expect("cancel");
    assert!(read_until_close(&mut s).is_empty());
    assert_serves(&proxy);
}

#[tokio::test]
async fn scram_pass_through_with_only_the_verifier_in_the_userlist() {
    let e = env();
    let proxy = ProxyProcess::start(ProxyOptions {
        userlist: Some(format!("\"{PT_USER}\" \"{}\"\n", e.pt_verifier)),
        ..Default::default()
    });
    let mut ports = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (client, conn) = tokio_config(&proxy, PT_USER, PT_PASSWORD)
            .dbname(PT_USER)
            .connect(tokio_postgres::NoTls)
            .await
            .expect("pass-through login");
        let conn = tokio::spawn(conn);
        let row = client
            .query_one("select current_user::text, inet_server_port()", &[])
            .await
            .expect("query");
        assert_eq!(row.get::<_, String>(0), PT_USER);
        ports.push(row.get::<_, i32>(1) as u16);
        // Held open so the second login goes to the other backend.
        clients.push((client, conn));
    }
    ports.sort();
    let mut expected = vec![e.pg1.port(), e.pg2.port()];
    expected.sort();
    assert_eq!(
        ports, expected,
        "both backends accepted the recovered ClientKey"
    );
    let err = tokio_config(&proxy, PT_USER, "wrong")
        .dbname(PT_USER)
        .connect(tokio_postgres::NoTls)
        .await
        .map(|_| ())
        .expect_err("wrong password accepted");
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
}

#[tokio::test]
async fn sessions_spread_by_least_connections_and_startup_params_pass_through() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mut cfg = tokio_config(&proxy, USER, PASSWORD);
    cfg.application_name("spread-test")
        .options("-c search_path=pg_catalog,public -c statement_timeout=4321");
    let mut held = Vec::new();
    let mut per_port = std::collections::HashMap::new();
    for _ in 0..4 {
        let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.expect("connect");
        let _task = tokio::spawn(conn);
        let row = c
            .query_one(
                "select inet_server_port(), current_setting('application_name'), \
                 current_setting('search_path'), current_setting('statement_timeout')",
                &[],
            )
            .await
            .expect("query");
        *per_port.entry(row.get::<_, i32>(0)).or_insert(0) += 1;
        assert_eq!(row.get::<_, String>(1), "spread-test");
        assert_eq!(row.get::<_, String>(2), "pg_catalog,public");
        assert_eq!(row.get::<_, String>(3), "4321ms");
        held.push(c);
    }
    assert_eq!(per_port.len(), 2, "{per_port:?}");
    assert!(per_port.values().all(|&n| n == 2), "{per_port:?}");
    assert_eq!(
        proxy.metric("pgferry_backend_sessions{backend=\"pg1\"}"),
        2.0
    );
    assert_eq!(proxy.metric("pgferry_client_connections"), 4.0);
}

#[tokio::test]
async fn backend_terminated_mid_session_the_client_gets_an_error_response() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let (client, conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let row = client
        .query_one("select inet_server_port(), pg_backend_pid()", &[])
        .await
        .expect("query");
    let cluster = cluster_by_port(row.get::<_, i32>(0) as u16);
    let pid: i32 = row.get(1);
    cluster
        .psql("postgres", &format!("select pg_terminate_backend({pid})"))
        .expect("terminate");
    // The connection ends with PostgreSQL's own FATAL, relayed intact.
    let result = conn.await.expect("join");
    let e = result.expect_err("connection ended without an error");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    assert_serves(&proxy);
}

/// A scripted backend that accepts the login and then drops the socket as
/// soon as a query arrives: a real server cannot be made to vanish without
/// a word mid-session without disturbing the shared clusters.
#[tokio::test]
async fn backend_vanishing_without_a_word_gives_08006() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).is_err() {
                continue;
            }
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            if s.read_exact(&mut body).is_err() {
                continue;
            }
            let mut hello = Vec::new();
            hello.extend_from_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]); // AuthenticationOk
            hello.extend_from_slice(&[b'K', 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 2]);
            hello.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
            let _ = s.write_all(&hello);
            let mut first = [0u8; 1];
            let _ = s.read_exact(&mut first);
            drop(s);
        }
    });
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![("flaky".into(), addr.to_string())],
        ..Default::default()
    });
    let (client, conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let e = client
        .simple_query("select 1")
        .await
        .expect_err("query succeeded");
    let conn_result = conn.await.expect("join");
    let code = sqlstate(&e).or_else(|| conn_result.as_ref().err().and_then(sqlstate));
    assert_eq!(
        code.as_deref(),
        Some("08006"),
        "query: {e}; connection: {conn_result:?}"
    );
}

#[tokio::test]
async fn max_client_connections_refuses_with_53300() {
    let proxy = ProxyProcess::start(ProxyOptions {
        proxy_extra: "max_client_connections = 2".into(),
        ..Default::default()
    });
    let a = connect(&proxy, USER, PASSWORD).await.expect("first");
    let _b = connect(&proxy, USER, PASSWORD).await.expect("second");
    let e = connect(&proxy, USER, PASSWORD)
        .await
        .expect_err("third accepted");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    drop(a.0);
    a.1.await.expect("join").expect("clean close");
    // The slot is released once the first session has fully ended.
    let mut ok = None;
    for _ in 0..100 {
        match connect(&proxy, USER, PASSWORD).await {
            Ok(c) => {
                ok = Some(c);
                break;
            }
            Err(e) => {
                assert_eq!(sqlstate(&e).as_deref(), Some("53300"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(ok.is_some(), "slot never released");
    assert!(proxy.metric("pgferry_client_connections_rejected_total") >= 1.0);
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    assert_eq!(proxy.http_get("/healthz").0, 200);
    let (c, _conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let rows = c
        .query("select generate_series(1, 1000)", &[])
        .await
        .expect("query");
    assert_eq!(rows.len(), 1000);
    let (status, body) = proxy.http_get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "pgferry_client_connections ",
        "pgferry_client_connections_accepted_total ",
        "pgferry_auth_failures_total ",
        "pgferry_backend_sessions{backend=",
        "pgferry_bytes_total{direction=\"client_to_server\"}",
        "pgferry_bytes_total{direction=\"server_to_client\"}",
    ] {
        assert!(body.contains(name), "missing {name} in\n{body}");
    }
    assert_eq!(proxy.metric("pgferry_client_connections"), 1.0);
    assert!(proxy.metric("pgferry_bytes_total{direction=\"server_to_client\"}") > 5000.0);
    assert!(proxy.metric("pgferry_bytes_total{direction=\"client_to_server\"}") > 20.0);
}

#[tokio::test]
async fn sigterm_lets_sessions_finish_then_closes_them_with_57p01_and_exits_zero() {
    let proxy = ProxyProcess::start(ProxyOptions::default()); // shutdown_timeout = 1s
    let (client, conn) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let addr = proxy.addr;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || proxy.terminate())
        .await
        .expect("join");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "did not wait for the session"
    );
    assert!(TcpStream::connect(addr).is_err(), "still accepting");
    // The open session was told why, with PostgreSQL's admin_shutdown code.
    let end = conn.await.expect("join");
    let e = end.expect_err("session closed without an error");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    assert!(client.is_closed());
}

#[test]
fn psql_ctrl_c_cancels_through_the_proxy() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let child = std::process::Command::new(psql_bin())
        .arg(proxy.url(
            USER,
            PASSWORD,
            "sslmode=disable&application_name=ctrl-c-test",
        ))
        .args(["-X", "-c", "select pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    let e = env();
    wait_until(Duration::from_secs(10), "pg_sleep to run", || {
        [&e.pg1, &e.pg2].iter().any(|c| {
            c.psql(
                "postgres",
                "select count(*) from pg_stat_activity where application_name = 'ctrl-c-test' and state = 'active'",
            )
            .map(|n| n.trim() == "1")
            .unwrap_or(false)
        })
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send((out, Instant::now()));
    });
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let (out, exited) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("psql did not exit");
    let out = out.expect("psql output");
    let took = exited.duration_since(sent);
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    assert!(
        stderr(&out).contains("canceling statement due to user request"),
        "psql said: {}",
        stderr(&out)
    );
}

/// The accept queue length of the socket listening on `port`: for a
/// listening socket, `ss` reports it as Send-Q.
fn listen_backlog_of(port: u16) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-ltnH", "sport", "=", &format!(":{port}")])
        .output()
        .expect("run ss (iproute2)");
    assert!(out.status.success(), "ss failed: {}", stderr(&out));
    let text = stdout(&out);
    let fields: Vec<&str> = text.split_whitespace().collect();
    // State Recv-Q Send-Q Local Peer
    assert_eq!(fields.len(), 5, "one listening socket expected:\n{text}");
    assert_eq!(fields[0], "LISTEN", "{text}");
    fields[2].parse().expect("Send-Q")
}

#[test]
fn the_listen_backlog_is_configurable_and_defaults_like_postgresql() {
    let proxy = ProxyProcess::start(ProxyOptions {
        proxy_extra: "listen_backlog = 700".into(),
        ..Default::default()
    });
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("somaxconn")
        .trim()
        .parse()
        .expect("a number");
    assert!(
        somaxconn >= 700,
        "this test needs net.core.somaxconn >= 700"
    );
    assert_eq!(listen_backlog_of(proxy.port()), 700);
    assert!(proxy.log().contains("backlog=700"), "{}", proxy.log());
    drop(proxy);

    // The default: twice max_client_connections (10,000), at least 1,024,
    // capped by the kernel's somaxconn.
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let expected = 20_000.min(somaxconn);
    assert_eq!(listen_backlog_of(proxy.port()), expected);
    assert!(expected >= 1024 || expected == somaxconn);
    assert!(
        proxy.log().contains(&format!("backlog={expected}")),
        "{}",
        proxy.log()
    );
}
