//! Restarting pgferry itself: `pgferry run --takeover` takes a running
//! pgferry's listeners and live sessions (plaintext and TLS, client and
//! backend side) over, against the shared real PostgreSQL clusters.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

/// Waits for the old process to exit and returns its exit code.
fn exit_code(mut old: Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = old.try_wait().expect("wait") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = old.kill();
            let _ = old.wait();
            panic!("the old pgferry did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

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
