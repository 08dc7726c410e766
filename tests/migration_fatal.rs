//! The old backend dies in the middle of a transfer: the client gets an
//! ErrorResponse, not a bare EOF, and the metrics count one fatal error.
//! Its own test binary: it stops and kills a backend process, which must
//! not disturb other tests' clusters.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_backend_killed_during_a_transfer_gives_the_client_an_error_response() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let (client, conn) = tokio_config(&proxy, USER, PASSWORD)
        .application_name("doomed")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    let conn = tokio::spawn(conn);
    // A simple query: tokio-postgres's prepared path sends a Close + Sync
    // after the fact, which would still be outstanding when we freeze the
    // backend (and the proxy would rightly wait for its answer).
    let rows = client
        .simple_query("select pg_backend_pid()")
        .await
        .expect("pid");
    let pid: i32 = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .expect("pid row");
    let backend = Pid::from_raw(pid);
    // Frozen, the backend receives the capture query but cannot answer.
    kill(backend, Signal::SIGSTOP).expect("SIGSTOP");
    let admin = proxy.admin;
    let id = proxy.connection_by_app("doomed")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let pending = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).expect("admin");
        let body = r#"{"timeout_ms": 5000}"#;
        write!(
            s,
            "POST /v1/connections/{id}/transfer HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        resp
    });
    let p = &proxy;
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), "migration in progress", || {
            p.connection_by_app("doomed")["state"] == "transferring"
        })
    });
    // Now it dies, mid-capture, as pg_terminate_backend would do it.
    kill(backend, Signal::SIGTERM).expect("SIGTERM");
    kill(backend, Signal::SIGCONT).expect("SIGCONT");
    let resp = tokio::task::block_in_place(|| pending.join().expect("join"));
    assert!(resp.starts_with("HTTP/1.0 500"), "{resp}");
    assert!(resp.contains("\"outcome\":\"fatal_error\""), "{resp}");
    let end = conn.await.expect("join");
    let e = end.expect_err("connection ended without an ErrorResponse");
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{e}");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(msg.contains("migration"), "{msg}");
    assert_eq!(
        proxy.metric("pgferry_conn_migration_error_fatal_total"),
        1.0
    );
    assert_eq!(proxy.metric("pgferry_conn_migration_attempted_total"), 1.0);
    // Everyone else is still served.
    let (other, _c) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let row = other.query_one("select 1", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 1);
}
