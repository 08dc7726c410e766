//! Hostile input and bad days: each case gets a clean error, and nobody
//! else is hurt. Real pgferry, real PostgreSQL 15; raw clients where the
//! input is bytes no driver would send.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::raw::{self, read_msg};
use common::*;

#[test]
fn a_startup_packet_repeating_a_key_is_refused_before_authentication() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    for (key, params) in [
        (
            "user",
            [("user", USER), ("database", DB), ("user", "postgres")],
        ),
        (
            "database",
            [("user", USER), ("database", DB), ("database", "postgres")],
        ),
    ] {
        let mut s = TcpStream::connect(proxy.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(&raw::startup_packet(raw::PROTOCOL_3_0, &params))
            .expect("send startup");
        let m = read_msg(&mut s).expect("an answer");
        assert_eq!(
            m.tag, b'E',
            "no authentication request for a repeated {key}"
        );
        assert_eq!(m.sqlstate().as_deref(), Some("08P01"));
        assert_eq!(m.field(b'S').as_deref(), Some("FATAL"));
        assert!(
            m.field(b'M').is_some_and(|t| t.contains(key)),
            "{:?}",
            m.field(b'M')
        );
        assert!(read_msg(&mut s).is_none(), "then the connection is closed");
    }
    // Everyone else is served as before.
    let mut c = raw::RawClient::connect(proxy.addr, USER, PASSWORD, DB, "after");
    assert_eq!(c.value("SELECT current_user"), USER);
}

#[test]
fn transfer_requests_during_a_move_are_refused_at_once_and_never_carried_out_later() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mut c = raw::RawClient::connect(proxy.addr, USER, PASSWORD, DB, "pingpong");
    // Spoken: its move runs the capture on the (frozen) old backend.
    assert_eq!(c.value("SELECT 1"), "1");
    let info = proxy.connection_by_app("pingpong");
    let id = info["id"].as_str().expect("id").to_owned();
    let cluster = backend_of(&proxy, "pingpong");
    let admin = proxy.admin;
    let path = format!("/v1/connections/{id}/transfer");
    let body = "{\"timeout_ms\": 5000}";
    // The first move is held in its capture by a frozen backend.
    let frozen = Frozen::new(server_pid(cluster, "pingpong"));
    let first = {
        let path = path.clone();
        std::thread::spawn(move || admin_json(admin, "POST", &path, body))
    };
    wait_until(Duration::from_secs(10), "the move running", || {
        has_session_in_state(admin, "pingpong", "transferring")
    });
    let others: Vec<(u16, serde_json::Value)> = (0..9)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || admin_json(admin, "POST", &path, body))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("request"))
        .collect();
    // All answered while the first move is still running.
    drop(frozen);
    for (status, body) in &others {
        assert_eq!(*status, 409, "{body}");
        assert_eq!(
            body["reason"],
            "another transfer of this session is in progress"
        );
    }
    let (status, body) = first.join().expect("first");
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.value("SELECT 1"), "1");
    assert_eq!(proxy.connection_by_app("pingpong")["migrations"], 1);
    assert_eq!(proxy.metric("pgferry_conn_migration_success_total"), 1.0);
}

#[test]
fn the_soft_limit_on_open_files_is_raised_to_the_hard_one() {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    assert!(
        hard > 1024,
        "this test needs a hard limit above 1024 (it is {hard})"
    );
    let proxy = ProxyProcess::start(ProxyOptions {
        soft_nofile: Some(1024),
        ..Default::default()
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let soft: u64 = line
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .expect("soft limit");
    assert_eq!(soft, hard, "{line}");
    assert!(proxy.log().contains("raised the soft limit on open files"));
}

#[test]
fn a_slow_source_backend_abandons_the_move_and_keeps_the_session() {
    let proxy = ProxyProcess::start(ProxyOptions {
        migration_extra: "capture_timeout = \"300ms\"".into(),
        ..Default::default()
    });
    let mut c = raw::RawClient::connect(proxy.addr, USER, PASSWORD, DB, "slow");
    // Spoken: its move runs the capture on the (frozen) old backend.
    assert_eq!(c.value("SELECT 1"), "1");
    let info = proxy.connection_by_app("slow");
    let cluster = backend_of(&proxy, "slow");
    let id = info["id"].as_str().expect("id").to_owned();
    let admin = proxy.admin;
    let frozen = Frozen::new(server_pid(cluster, "slow"));
    let mover = std::thread::spawn(move || {
        admin_json(
            admin,
            "POST",
            &format!("/v1/connections/{id}/transfer"),
            "{\"timeout_ms\": 5000}",
        )
    });
    // Frozen past capture_timeout: the backend is slow, not gone.
    wait_until(Duration::from_secs(20), "the late capture", || {
        proxy.log().contains("capture answer late")
    });
    drop(frozen);
    let (status, body) = mover.join().expect("mover");
    assert_eq!(status, 409, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("capture answer later")),
        "{body}"
    );
    // The session is where it was and answers in turn.
    assert_eq!(c.value("SELECT 'still here'"), "still here");
    assert_eq!(proxy.connection_by_app("slow")["backend"], info["backend"]);
    assert_eq!(
        proxy.metric("pgferry_conn_migration_error_fatal_total"),
        0.0
    );
}

#[test]
fn logins_during_a_backends_shutdown_go_to_the_other_backend() {
    let mut stopping = own_cluster("stopping");
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![
            ("stopping".into(), stopping.addr().to_string()),
            ("pg2".into(), env().pg2.addr().to_string()),
        ],
        ..Default::default()
    });
    // A session of its own keeps the smart shutdown waiting: meanwhile the
    // server answers every login with 57P03.
    let mut holder = raw::RawClient::connect(stopping.addr(), USER, PASSWORD, DB, "holder");
    let postmaster = stopping.pid().expect("postmaster") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(postmaster),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("smart shutdown");
    wait_until(Duration::from_secs(10), "logins refused", || {
        let mut s = TcpStream::connect(stopping.addr()).expect("connect");
        s.write_all(&raw::startup_packet(
            raw::PROTOCOL_3_0,
            &[("user", USER), ("database", DB)],
        ))
        .expect("startup");
        read_msg(&mut s).is_some_and(|m| m.sqlstate().as_deref() == Some("57P03"))
    });
    for i in 0..20 {
        let mut c = raw::RawClient::connect(proxy.addr, USER, PASSWORD, DB, &format!("login{i}"));
        assert_eq!(c.value("SELECT 1"), "1");
    }
    assert_eq!(proxy.backends()["stopping"]["state"], "unhealthy");
    assert!(proxy.log().contains("backend refuses logins (57P03)"));
    // The shutdown goes on once its last session leaves.
    holder.send(&raw::terminate());
    let _ = stopping.stop(pgferry_pgcluster::StopMode::Fast);
}

/// Half a request header: what a slowloris client sends, then nothing.
const HALF_HEADER: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: local";

/// An admin connection that has sent half a request header.
fn half_open(admin: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
    s.write_all(HALF_HEADER)?;
    Ok(s)
}

/// Waits until pgferry closes `s` (EOF or reset, after any answer it
/// sends first); false if `s` is still open after `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).expect("read timeout");
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) => panic!("reading an admin connection: {e}"),
        }
    }
}

/// pgferry has not closed `s` (yet); does not wait.
fn still_open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let r = s.peek(&mut [0u8; 1]);
    s.set_nonblocking(false).expect("blocking");
    matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

/// One HTTP/1.0 GET; None when the connection is closed without an answer
/// (as over `admin_max_connections`).
fn try_admin_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, resp.split_once("\r\n\r\n")?.1.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_admin_connections_are_timed_out_capped_and_never_lock_clients_out() {
    const CAP: usize = 16;
    // Over the cap, and more than the fds pgferry has: without the cap,
    // these alone would use up its open files limit.
    const EXTRA: usize = 100;
    const NOFILE: u64 = 64;
    let header_timeout = Duration::from_secs(2);
    let proxy = ProxyProcess::start(ProxyOptions {
        nofile: Some(NOFILE),
        proxy_extra: format!(
            "max_client_connections = 8\nadmin_max_connections = {CAP}\n\
             admin_header_timeout = \"{}ms\"",
            header_timeout.as_millis()
        ),
        ..Default::default()
    });
    let admin = proxy.admin;

    // (b) The first CAP are held; every one after them is closed at once,
    // while the first are still open.
    let started = Instant::now();
    let mut held: Vec<TcpStream> = (0..CAP)
        .map(|_| half_open(admin).expect("admin connection"))
        .collect();
    let mut extra: Vec<TcpStream> = (0..EXTRA)
        .map(|_| half_open(admin).expect("admin connection"))
        .collect();
    for (i, s) in extra.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "admin connection {} (over admin_max_connections = {CAP}) was left open",
            CAP + i
        );
    }
    assert!(
        started.elapsed() < header_timeout,
        "the machine is too slow for this test: {:?} to open and see closed {EXTRA} connections",
        started.elapsed()
    );
    for (i, s) in held.iter().enumerate() {
        assert!(
            still_open(s),
            "admin connection {i} closed before its header timeout"
        );
    }

    // (a) Those held are closed by the header timeout, not before.
    for (i, s) in held.iter_mut().enumerate() {
        assert!(
            closed_within(s, header_timeout + Duration::from_secs(5)),
            "half-open admin connection {i} not closed after admin_header_timeout"
        );
    }
    let waited = started.elapsed();
    assert!(
        waited >= header_timeout - Duration::from_millis(50),
        "closed after {waited:?}, before admin_header_timeout ({header_timeout:?})"
    );
    drop((held, extra));

    // (c) A flood that keeps every admin slot taken and more knocking does
    // not keep a database client out.
    let stop = Arc::new(AtomicBool::new(false));
    let (flooding_tx, flooding) = mpsc::channel();
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut open: Vec<TcpStream> = Vec::new();
            let (mut tried, mut opened) = (0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                open.retain(still_open);
                // Tops up 50 at a time: pressure, not a port exhaustion test.
                for _ in 0..50.min(200usize.saturating_sub(open.len())) {
                    tried += 1;
                    // Short: a full accept queue must not stall the flood.
                    let s = TcpStream::connect_timeout(&admin, Duration::from_millis(200))
                        .and_then(|mut s| s.write_all(HALF_HEADER).map(|()| s));
                    if let Ok(s) = s {
                        open.push(s);
                        opened += 1;
                    }
                }
                if tried >= 200 {
                    let _ = flooding_tx.send(());
                }
                // Paces the flood; nothing waits on it.
                std::thread::sleep(Duration::from_millis(20));
            }
            opened
        })
    };
    flooding
        .recv_timeout(Duration::from_secs(30))
        .expect("the flood started");
    let query = async {
        let (client, _conn) = connect(&proxy, USER, PASSWORD).await?;
        client.query_one("SELECT 'served'::text", &[]).await
    };
    let row = tokio::time::timeout(Duration::from_secs(20), query)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "a database client was kept out by the admin flood; log:\n{}",
                proxy.log()
            )
        })
        .expect("query through pgferry during the flood");
    assert_eq!(row.get::<_, String>(0), "served");
    stop.store(true, Ordering::Relaxed);
    let opened = flood.join().expect("flood thread");
    assert!(opened >= 200, "{opened}");

    // (d) Once the flood is gone (its connections end as their sockets
    // close), the admin API answers as before.
    wait_until(Duration::from_secs(10), "the admin API answering", || {
        try_admin_get(admin, "/healthz").is_some_and(|(status, _)| status == 200)
    });
    let (status, text) = try_admin_get(admin, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    assert!(value("pgferry_admin_connections_rejected_total") >= EXTRA as f64);
    assert!(value("pgferry_admin_connections_timed_out_total{phase=\"header\"}") >= CAP as f64);
    assert!(value("pgferry_admin_connections") >= 1.0);
    let log = proxy.log();
    assert!(
        log.contains("admin connection limit reached"),
        "no warning about the admin connection limit:\n{log}"
    );
    assert!(!log.contains("Too many open files"), "{log}");
}

#[test]
fn kept_alive_admin_connections_close_after_the_idle_timeout_and_requests_are_never_cut() {
    let header_timeout = Duration::from_millis(300);
    let idle_timeout = Duration::from_millis(1500);
    let proxy = ProxyProcess::start(ProxyOptions {
        proxy_extra: format!(
            "admin_header_timeout = \"{}ms\"\nadmin_idle_timeout = \"{}ms\"",
            header_timeout.as_millis(),
            idle_timeout.as_millis()
        ),
        // Longer than both timeouts: a move held by a frozen backend takes
        // this long to be answered.
        migration_extra: "capture_timeout = \"2s\"".into(),
        ..Default::default()
    });
    let mut s = TcpStream::connect(proxy.admin).expect("admin connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut last_answer = Instant::now();
    // Two requests on one kept-alive connection, the second sent after more
    // than the header timeout of idling.
    for round in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .expect("request");
        let mut resp = Vec::new();
        let mut buf = [0u8; 512];
        while !resp.ends_with(b"ok\n") {
            let n = s.read(&mut buf).expect("answer");
            assert!(n > 0, "closed instead of answering request {round}");
            resp.extend_from_slice(&buf[..n]);
        }
        assert!(resp.starts_with(b"HTTP/1.1 200"), "{resp:?}");
        last_answer = Instant::now();
        if round == 0 {
            // No event to wait for: the point is to let time pass, idle.
            std::thread::sleep(header_timeout * 2);
            assert!(
                still_open(&s),
                "an idle connection closed by the header timeout"
            );
        }
    }
    assert!(
        closed_within(&mut s, idle_timeout + Duration::from_secs(5)),
        "an idle kept-alive admin connection was never closed"
    );
    let idled = last_answer.elapsed();
    assert!(
        idled >= idle_timeout - Duration::from_millis(50),
        "closed after {idled:?} idle, before admin_idle_timeout"
    );
    assert_eq!(
        proxy.metric("pgferry_admin_connections_timed_out_total{phase=\"idle\"}"),
        1.0
    );

    // A request whose handler takes longer than both timeouts (a move held
    // by a frozen backend until capture_timeout) still gets its answer.
    let mut c = raw::RawClient::connect(proxy.addr, USER, PASSWORD, DB, "slow-handler");
    // Spoken: its move runs the capture on the (frozen) old backend.
    assert_eq!(c.value("SELECT 1"), "1");
    let info = proxy.connection_by_app("slow-handler");
    let cluster = if info["backend"] == "pg1" {
        &env().pg1
    } else {
        &env().pg2
    };
    let id = info["id"].as_str().expect("id").to_owned();
    let frozen = Frozen::new(server_pid(cluster, "slow-handler"));
    let admin = proxy.admin;
    let asked = Instant::now();
    let mover = std::thread::spawn(move || {
        let answer = admin_json(
            admin,
            "POST",
            &format!("/v1/connections/{id}/transfer"),
            "{\"timeout_ms\": 5000}",
        );
        (answer, asked.elapsed())
    });
    // The move answers once the frozen backend has answered its capture.
    wait_until(Duration::from_secs(20), "the late capture", || {
        proxy.log().contains("capture answer late")
    });
    drop(frozen);
    let ((status, body), took) = mover.join().expect("mover");
    assert_eq!(status, 409, "{body}");
    assert!(took > idle_timeout, "{took:?}");
}
