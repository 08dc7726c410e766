//! Protocol 3.2 (PostgreSQL 18) end to end: a client asking for it through
//! pgferry with `max_protocol = "3.2"` gets it, with a 32-byte cancel key
//! that cancels its queries wherever the session has moved. The servers
//! are PostgreSQL 18 clusters of this binary's own (the shared ones are
//! PostgreSQL 15), installed by the harness when missing.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::raw::{self, RawClient};
use common::*;
use pgferry_pgcluster::{Cluster, ClusterOptions};

struct Pg18 {
    pg1: Cluster,
    pg2: Cluster,
}

fn pg18() -> &'static Pg18 {
    static ENV: OnceLock<Pg18> = OnceLock::new();
    ENV.get_or_init(|| {
        let bins = pg18_binaries();
        assert_eq!(bins.major_version(), Some(18), "{bins:?}");
        let start = |name: &str| {
            let c = Cluster::start_temp(&bins, ClusterOptions::named(name)).expect("start cluster");
            c.ensure_user_and_database(USER, PASSWORD, DB)
                .expect("create app user");
            c
        };
        Pg18 {
            pg1: start("pg18a"),
            pg2: start("pg18b"),
        }
    })
}

fn proxy_on(backends: Vec<(String, String)>, max_protocol: &str) -> ProxyProcess {
    ProxyProcess::start(ProxyOptions {
        tls: false,
        proxy_extra: format!("max_protocol = \"{max_protocol}\""),
        ..ProxyOptions::bare(backends)
    })
}

fn proxy_32() -> ProxyProcess {
    let e = pg18();
    proxy_on(
        vec![
            ("pg1".into(), e.pg1.addr().to_string()),
            ("pg2".into(), e.pg2.addr().to_string()),
        ],
        "3.2",
    )
}

fn startup(protocol: u32, app: &str) -> Vec<u8> {
    raw::startup_packet(
        protocol,
        &[("user", USER), ("database", DB), ("application_name", app)],
    )
}

fn cluster_named(name: &str) -> &'static Cluster {
    match name {
        "pg1" => &pg18().pg1,
        "pg2" => &pg18().pg2,
        other => panic!("unexpected backend {other:?}"),
    }
}

fn backend_name(proxy: &ProxyProcess, app: &str) -> String {
    proxy.connection_by_app(app)["backend"]
        .as_str()
        .expect("backend")
        .to_owned()
}

/// Runs `pg_sleep(60)` on `c`, cancels it with `secret` and returns what
/// the query answered.
fn sleep_and_cancel(proxy: &ProxyProcess, c: &mut RawClient, app: &str, secret: &[u8]) -> String {
    c.send(&raw::query("SELECT pg_sleep(60)"));
    let running = cluster_named(&backend_name(proxy, app));
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' AND state = 'active'"
    );
    wait_until(Duration::from_secs(10), "query running", || {
        running
            .psql("postgres", &sql)
            .is_ok_and(|n| n.trim() == "1")
    });
    raw::send_cancel_key(proxy.addr, c.pid, secret);
    let answer = c.recv_until(b'Z');
    answer
        .iter()
        .find(|m| m.tag == b'E')
        .and_then(|m| m.sqlstate())
        .unwrap_or_default()
}

#[test]
fn a_3_2_client_gets_3_2_and_a_long_key_that_cancels_wherever_the_session_runs() {
    let proxy = proxy_32();
    let (mut c, before) =
        RawClient::connect_with(proxy.addr, &startup(raw::PROTOCOL_3_2, "p32"), PASSWORD);
    // Granted as asked: no NegotiateProtocolVersion.
    assert_eq!(raw::tags(&before), "");
    assert_eq!(c.secret_bytes.len(), 32, "{:?}", c.secret_bytes);
    assert_eq!(c.value("SELECT pg_backend_pid()"), c.pid.to_string());
    assert!(
        c.value("SHOW server_version").starts_with("18"),
        "server_version"
    );
    let key = c.secret_bytes.clone();
    assert_eq!(sleep_and_cancel(&proxy, &mut c, "p32", &key), "57014");

    // A key differing in its last byte, or its first four bytes alone,
    // cancel nothing.
    let mut wrong = key.clone();
    wrong[31] ^= 1;
    for bad in [&wrong[..], &key[..4]] {
        c.send(&raw::query("SELECT pg_sleep(0.3), 1"));
        raw::send_cancel_key(proxy.addr, c.pid, bad);
        let answer = c.recv_until(b'Z');
        assert!(answer.iter().all(|m| m.tag != b'E'), "{answer:?}");
    }

    // Moved, the session keeps its key and the cancel follows it.
    let from = backend_name(&proxy, "p32");
    let to = if from == "pg1" { "pg2" } else { "pg1" };
    let id = proxy.connection_by_app("p32")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, body) = admin_json(
        proxy.admin,
        "POST",
        &format!("/v1/connections/{id}/transfer"),
        &format!("{{\"to\": \"{to}\", \"timeout_ms\": 5000}}"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(backend_name(&proxy, "p32"), to);
    assert_eq!(sleep_and_cancel(&proxy, &mut c, "p32", &key), "57014");
    assert_eq!(c.value("SELECT 41 + 1"), "42");
}

#[test]
fn a_3_0_client_of_a_3_2_proxy_is_served_as_before() {
    let proxy = proxy_32();
    let (mut c, before) =
        RawClient::connect_with(proxy.addr, &startup(raw::PROTOCOL_3_0, "p30"), PASSWORD);
    assert_eq!(raw::tags(&before), "");
    assert_eq!(c.secret_bytes.len(), 4);
    assert_eq!(c.value("SELECT pg_backend_pid()"), c.pid.to_string());
    let key = c.secret_bytes.clone();
    assert_eq!(sleep_and_cancel(&proxy, &mut c, "p30", &key), "57014");
}

#[test]
fn asking_for_more_than_3_2_or_for_options_is_answered_with_3_2() {
    let proxy = proxy_32();
    let packet = raw::startup_packet(
        (3 << 16) | 3,
        &[("user", USER), ("database", DB), ("_pq_.some_option", "on")],
    );
    let (mut c, before) = RawClient::connect_with(proxy.addr, &packet, PASSWORD);
    assert_eq!(raw::tags(&before), "v");
    let v = &before[0].body;
    assert_eq!(&v[0..4], &raw::PROTOCOL_3_2.to_be_bytes(), "newest, whole");
    assert_eq!(&v[4..8], &1u32.to_be_bytes());
    assert_eq!(&v[8..], b"_pq_.some_option\0");
    assert_eq!(c.secret_bytes.len(), 32);
    assert_eq!(c.value("SELECT 1"), "1");
}

#[test]
fn with_max_protocol_3_0_a_3_2_client_is_told_3_0_and_gets_a_short_key() {
    let e = pg18();
    let proxy = proxy_on(vec![("pg1".into(), e.pg1.addr().to_string())], "3.0");
    let (mut c, before) =
        RawClient::connect_with(proxy.addr, &startup(raw::PROTOCOL_3_2, "p30only"), PASSWORD);
    assert_eq!(raw::tags(&before), "v");
    assert_eq!(&before[0].body[0..4], &raw::PROTOCOL_3_0.to_be_bytes());
    assert_eq!(c.secret_bytes.len(), 4);
    assert_eq!(c.value("SELECT 1"), "1");
}

#[test]
fn a_3_2_session_skips_and_will_not_move_to_a_backend_speaking_only_3_0() {
    let e = pg18();
    // PostgreSQL 15 (the suite's usual servers) answers a 3.2 startup with
    // NegotiateProtocolVersion naming 3.0.
    let old = own_cluster("pg15");
    let proxy = proxy_on(
        vec![
            ("old".into(), old.addr().to_string()),
            ("pg1".into(), e.pg1.addr().to_string()),
        ],
        "3.2",
    );
    // Whichever backend is tried first, every 3.2 session lands on pg1.
    let mut clients = Vec::new();
    for i in 0..3 {
        let app = format!("skip{i}");
        let (mut c, before) =
            RawClient::connect_with(proxy.addr, &startup(raw::PROTOCOL_3_2, &app), PASSWORD);
        assert_eq!(raw::tags(&before), "");
        assert_eq!(c.secret_bytes.len(), 32);
        assert!(c.value("SHOW server_version").starts_with("18"));
        assert_eq!(backend_name(&proxy, &app), "pg1");
        clients.push(c);
    }
    // A 3.0 session may still use the old backend.
    let mut old_client = RawClient::connect(proxy.addr, USER, PASSWORD, DB, "old30");
    assert_eq!(old_client.value("SELECT 1"), "1");

    let id = proxy.connection_by_app("skip0")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, body) = admin_json(
        proxy.admin,
        "POST",
        &format!("/v1/connections/{id}/transfer"),
        "{\"to\": \"old\", \"timeout_ms\": 5000}",
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["outcome"], "recoverable_error", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("protocol 3.0")),
        "{body}"
    );
    // Refused before anything changed: the session goes on where it was.
    assert_eq!(backend_name(&proxy, "skip0"), "pg1");
    assert_eq!(clients[0].value("SELECT 2"), "2");
}

/// psycopg with its bundled libpq (18 in psycopg-binary 3.3.9, pinned by
/// tests/drivers/requirements.txt), in target/pg18/python.
fn psycopg_path() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("pg18/python");
    let want = "psycopg==3.3.9 psycopg-binary==3.3.9 typing_extensions==4.16.0";
    let stamp = dir.join("installed");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(want) {
        let out = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .arg("--target")
            .arg(&dir)
            .args(want.split(' '))
            .output()
            .expect("run pip");
        assert!(out.status.success(), "pip: {}", stderr(&out));
        std::fs::write(&stamp, want).expect("stamp");
    }
    dir
}

#[test]
fn libpq_18_with_max_protocol_version_latest_gets_3_2_and_cancels() {
    // One backend: the watching session sees the sleeping one.
    let proxy = proxy_on(vec![("pg1".into(), pg18().pg1.addr().to_string())], "3.2");
    let script = format!(
        r#"
import psycopg, threading
assert psycopg.pq.version() >= 180000, psycopg.pq.version()
c = psycopg.connect("host=127.0.0.1 port={port} user={USER} password={PASSWORD} dbname={DB} sslmode=disable max_protocol_version=latest application_name=psy")
print(c.pgconn.full_protocol_version, c.info.backend_pid, c.execute("SELECT pg_backend_pid()").fetchone()[0])
def cancel_when_running():
    # Cancels once the sleep runs (seen from a second session), not on a timer.
    with psycopg.connect("host=127.0.0.1 port={port} user={USER} password={PASSWORD} dbname={DB} sslmode=disable", autocommit=True) as w:
        while w.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'psy' AND state = 'active'").fetchone()[0] != 1:
            pass
    c.cancel_safe()
threading.Thread(target=cancel_when_running).start()
try:
    c.execute("SELECT pg_sleep(60)")
    print("not cancelled")
except psycopg.errors.QueryCanceled:
    print("cancelled")
"#,
        port = proxy.port()
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("PYTHONPATH", psycopg_path())
        .output()
        .expect("run python");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let first: Vec<&str> = lines.next().expect("line").split(' ').collect();
    // PQfullProtocolVersion: 30002 for 3.2 (libpq 18 asked for the newest).
    assert_eq!(first[0], "30002", "{text}");
    assert_eq!(
        first[1], first[2],
        "PQbackendPID is pg_backend_pid(): {text}"
    );
    assert_eq!(lines.next(), Some("cancelled"), "{text}");
}
