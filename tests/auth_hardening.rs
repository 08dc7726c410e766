//! Client authentication under attack: no user enumeration through the SCRAM
//! challenge, back-off after failed logins, and reloads of a large userlist
//! that do not stall traffic. Real pgferry, real PostgreSQL 15.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{self, read_msg};
use common::*;
use nix::sys::signal::Signal;
use pgferry_auth::ScramVerifier;

/// What a prober learns about `user` without a password: the salt and
/// iteration count of the server-first-message. Hangs up after it.
fn probe(addr: SocketAddr, user: &str) -> (String, u32) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(&raw::startup_packet(
        raw::PROTOCOL_3_0,
        &[("user", user), ("database", DB)],
    ))
    .expect("startup");
    let m = read_msg(&mut s).expect("authentication request");
    assert_eq!((m.tag, &m.body[..4]), (b'R', &10i32.to_be_bytes()[..]));
    let client_first = b"n,,n=,r=probeprobeprobeprobe";
    let mut b = b"SCRAM-SHA-256\0".to_vec();
    b.extend_from_slice(&(client_first.len() as i32).to_be_bytes());
    b.extend_from_slice(client_first);
    s.write_all(&raw::message(b'p', &b))
        .expect("initial response");
    let m = read_msg(&mut s).expect("SASL continue");
    assert_eq!((m.tag, &m.body[..4]), (b'R', &11i32.to_be_bytes()[..]));
    let server_first = String::from_utf8(m.body[4..].to_vec()).expect("ascii");
    let attr = |name: &str| {
        server_first
            .split(',')
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {server_first}"))
            .to_owned()
    };
    (attr("s="), attr("i=").parse().expect("iteration count"))
}

fn log_count(proxy: &ProxyProcess, needle: &str) -> usize {
    proxy.log().matches(needle).count()
}

/// SIGHUP and wait for the reload's log line; returns that line.
fn reload(proxy: &ProxyProcess) -> String {
    let before = log_count(proxy, "config reloaded");
    proxy.signal(Signal::SIGHUP);
    wait_until(Duration::from_secs(120), "the reload", || {
        log_count(proxy, "config reloaded") > before
    });
    proxy
        .log()
        .lines()
        .filter(|l| l.contains("config reloaded"))
        .nth(before)
        .expect("reload line")
        .to_owned()
}

/// `key=value` (a number) from a log line.
fn number(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn a_prober_cannot_tell_real_users_from_made_up_ones_across_reloads_and_restarts() {
    let e = env();
    // Verifiers made with a non-default iteration count (as copied from a
    // server with another scram_iterations): the dominant count.
    let v = |name: &str| {
        ScramVerifier::from_password(name, format!("salt-{name}").as_bytes(), 10_000).to_pg_string()
    };
    let userlist = format!(
        "\"{USER}\" \"{PASSWORD}\"\n\"{PT_USER}\" \"{}\"\n\"copied1\" \"{}\"\n\"copied2\" \"{}\"\n",
        e.pt_verifier,
        v("copied1"),
        v("copied2")
    );
    let mut proxy = ProxyProcess::start(ProxyOptions {
        userlist: Some(userlist.clone()),
        ..Default::default()
    });
    let names = [USER, "copied1", "nobody", "mallory"];
    let probe_all = |proxy: &ProxyProcess| -> Vec<(String, u32)> {
        names.iter().map(|n| probe(proxy.addr, n)).collect()
    };
    let first = probe_all(&proxy);
    for (name, (_, iterations)) in names.iter().zip(&first) {
        assert_eq!(*iterations, 10_000, "{name}: {first:?}");
    }
    let salts: std::collections::HashSet<_> = first.iter().map(|p| &p.0).collect();
    assert_eq!(salts.len(), names.len(), "one salt per name: {first:?}");

    // A reload (with a user added) changes nobody's challenge.
    std::fs::write(
        proxy.dir.path().join("users.txt"),
        format!("{userlist}\"added\" \"pw\"\n"),
    )
    .expect("rewrite userlist");
    reload(&proxy);
    assert_eq!(probe_all(&proxy), first, "after a reload");

    // Nor does a restart.
    proxy.restart();
    assert_eq!(probe_all(&proxy), first, "after a restart");
    // The plaintext user still logs in (its verifier is its password's).
    let mut c = raw::RawClient::connect(proxy.addr, USER, PASSWORD, DB, "after-restart");
    assert_eq!(c.value("SELECT current_user"), USER);

    // The secret lives next to the config, private, and is never logged.
    let secret_path = proxy.dir.path().join("pgferry.secret");
    let mode = std::fs::metadata(&secret_path)
        .expect("secret file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let secret = std::fs::read_to_string(&secret_path).expect("read secret");
    assert_eq!(secret.trim().len(), 64);
    assert!(!proxy.log().contains(secret.trim()));
}

#[tokio::test]
async fn failed_logins_make_the_same_ip_and_user_back_off() {
    let initial = Duration::from_secs(2);
    let proxy = ProxyProcess::start(ProxyOptions {
        auth_extra: format!("throttle_initial = \"{}ms\"", initial.as_millis()),
        ..Default::default()
    });
    let refused = |r: Result<_, tokio_postgres::Error>, user: &str| {
        let e = r.map(|_| ()).expect_err("login accepted");
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
        let db = e.as_db_error().expect("db error");
        assert_eq!(
            db.message(),
            format!("password authentication failed for user \"{user}\"")
        );
    };
    let wrong = connect(&proxy, USER, "wrong").await;
    let failed_at = Instant::now();
    refused(wrong, USER);
    assert_eq!(proxy.metric("pgferry_auth_throttled_total"), 0.0);
    // Within the back-off: a wrong and then the right password are refused
    // alike, without an exchange.
    refused(connect(&proxy, USER, "wrong").await, USER);
    assert_eq!(proxy.metric("pgferry_auth_throttled_total"), 1.0);
    refused(connect(&proxy, USER, PASSWORD).await, USER);
    assert_eq!(proxy.metric("pgferry_auth_throttled_total"), 2.0);
    assert!(
        failed_at.elapsed() < initial,
        "the machine is too slow for this test: {:?} passed",
        failed_at.elapsed()
    );
    assert_eq!(proxy.metric("pgferry_auth_failures_total"), 1.0);
    // Unknown users back off the same way.
    refused(connect(&proxy, "nobody", "x").await, "nobody");
    refused(connect(&proxy, "nobody", "x").await, "nobody");
    assert_eq!(proxy.metric("pgferry_auth_throttled_total"), 3.0);
    // Other users from the same address are not affected.
    let (c, _conn) = connect(&proxy, PT_USER, PT_PASSWORD)
        .await
        .expect("another user logs in");
    drop(c);
    assert!(proxy.log().contains("authentication throttled"));

    // Once the back-off has passed, the right password works.
    tokio::time::sleep_until((failed_at + initial).into()).await;
    let (c, _conn) = connect(&proxy, USER, PASSWORD)
        .await
        .expect("logs in after the back-off");
    let row = c.query_one("SELECT 1", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(proxy.metric("pgferry_auth_throttled_total"), 3.0);
}

#[test]
fn reloading_a_large_userlist_does_not_stall_sessions() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mut c = raw::RawClient::connect(proxy.addr, USER, PASSWORD, DB, "pinger");
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut worst, mut queries) = (Duration::ZERO, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(c.value("SELECT 1"), "1");
                worst = worst.max(t.elapsed());
                queries += 1;
            }
            (worst, queries)
        })
    };
    let base = format!(
        "\"{USER}\" \"{PASSWORD}\"\n\"{PT_USER}\" \"{}\"\n",
        env().pt_verifier
    );
    let users = |changed: &str| {
        let mut text = base.clone();
        for i in 0..5_000 {
            let pw = if i == 0 { changed } else { "pw" };
            text.push_str(&format!("\"user{i}\" \"{pw}\"\n"));
        }
        text
    };
    let userlist = proxy.dir.path().join("users.txt");
    std::fs::write(&userlist, users("pw")).expect("write userlist");
    let line = reload(&proxy);
    stop.store(true, Ordering::Relaxed);
    let (worst, queries) = pinger.join().expect("pinger");
    let took = Duration::from_millis(number(&line, "userlist_ms"));
    assert_eq!(number(&line, "users_derived"), 5_000, "{line}");
    assert_eq!(number(&line, "users_reused"), 1, "{line}");
    assert!(
        took > Duration::from_secs(1),
        "the reload was too quick ({took:?}) to show a stall"
    );
    // Without a stall a query waits for CPU at worst; with one it waits for
    // (nearly) the whole reload.
    assert!(
        worst < took / 4,
        "a query took {worst:?} while the reload took {took:?} ({queries} queries)"
    );

    // One entry changed: one derivation; nothing changed: none.
    std::fs::write(&userlist, users("changed")).expect("write userlist");
    let line = reload(&proxy);
    assert_eq!(number(&line, "users_derived"), 1, "{line}");
    assert_eq!(number(&line, "users_reused"), 5_000, "{line}");
    let line = reload(&proxy);
    assert_eq!(number(&line, "users_derived"), 0, "{line}");
}
