//! Hostile input and bad days: each case gets a clean error, and nobody
//! else is hurt. Real pgferry, real PostgreSQL 15; raw clients where the
//! input is bytes no driver would send.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

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
