//! The old backend dies in the middle of a transfer: the client gets the
//! server's own ErrorResponse, not a bare EOF nor a pgferry error, and the
//! metrics count a session ended by its backend, not a pgferry failure.
//! Its own test binary: it stops and kills a backend process, which must
//! not disturb other tests' clusters.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_backend_killed_during_a_transfer_gives_the_client_the_servers_error() {
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
        let path = format!("/v1/connections/{id}/transfer");
        admin_request(admin, "POST", &path, Some(r#"{"timeout_ms": 5000}"#), None)
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
    let (status, resp) = tokio::task::block_in_place(|| pending.join().expect("join"));
    assert_eq!(status, 410, "{resp}");
    assert!(resp.contains("\"outcome\":\"session_ended\""), "{resp}");
    let end = conn.await.expect("join");
    let e = end.expect_err("connection ended without an ErrorResponse");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert_eq!(msg, "terminating connection due to administrator command");
    assert_eq!(
        proxy.metric("pgferry_conn_migration_error_fatal_total"),
        0.0
    );
    assert_eq!(
        proxy.metric("pgferry_conn_migration_session_ended_total"),
        1.0
    );
    assert_eq!(proxy.metric("pgferry_conn_migration_attempted_total"), 1.0);
    // Everyone else is still served.
    let (other, _c) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    let row = other.query_one("select 1", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 1);
}

/// A notification that arrives while the capture query runs must reach the
/// client even though LISTEN then refuses the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_arriving_during_capture_is_delivered_when_listen_refuses_the_move() {
    use futures_util::StreamExt;
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let (client, mut connection) = tokio_config(&proxy, USER, PASSWORD)
        .application_name("listener")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    let rows = client
        .simple_query("LISTEN moving; select pg_backend_pid(), inet_server_port()")
        .await
        .expect("listen");
    let (pid, port): (i32, u16) = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                r.get(0).and_then(|v| v.parse().ok())?,
                r.get(1).and_then(|v| v.parse().ok())?,
            )),
            _ => None,
        })
        .expect("row");
    let backend = Pid::from_raw(pid);
    kill(backend, Signal::SIGSTOP).expect("SIGSTOP");
    cluster_by_port(port)
        .psql(DB, "NOTIFY moving, 'during-capture'")
        .expect("notify");
    let admin = proxy.admin;
    let id = proxy.connection_by_app("listener")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let pending = std::thread::spawn(move || {
        admin_request(
            admin,
            "POST",
            &format!("/v1/connections/{id}/transfer"),
            None,
            None,
        )
    });
    let p = &proxy;
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(10), "capture in progress", || {
            p.connection_by_app("listener")["state"] == "transferring"
        })
    });
    kill(backend, Signal::SIGCONT).expect("SIGCONT");
    let (status, resp) = tokio::task::block_in_place(|| pending.join().expect("join"));
    assert_eq!(status, 409, "{resp}");
    assert!(
        resp.contains("listening on notification channels"),
        "{resp}"
    );
    let payload = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("notification lost")
        .expect("channel");
    assert_eq!(payload, "during-capture");
    let row = client
        .query_one("select 1", &[])
        .await
        .expect("session works");
    assert_eq!(row.get::<_, i32>(0), 1);
}
