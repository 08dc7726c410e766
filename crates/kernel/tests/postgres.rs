//! The sockmap against a real PostgreSQL: a relay logs the session in
//! (password auth, relayed in userspace), puts both sockets in the sockmap,
//! and tokio-postgres runs queries through it. Skipped (with the reason)
//! where BPF is refused.

#[path = "../examples/relay/mod.rs"]
mod relay;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgferry_kernel::{KernelForwarder, Side};
use pgferry_pgcluster::{Cluster, ClusterOptions, ServerBinaries};
use relay::{Mode, Relay};

fn forwarder() -> Option<Arc<KernelForwarder>> {
    match KernelForwarder::with_capacity(64) {
        Ok(f) => Some(Arc::new(f)),
        Err(e) if e.is_unavailable() => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn cluster() -> Cluster {
    let bins = ServerBinaries::find_or_install().expect("PostgreSQL binaries");
    Cluster::start_temp(&bins, ClusterOptions::named("kernel")).expect("start PostgreSQL")
}

async fn connect(relay: &Relay, cluster: &Cluster) -> tokio_postgres::Client {
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=postgres sslmode=disable",
        relay.addr.port(),
        cluster.superuser(),
        cluster.superuser_password()
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect through the relay");
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection: {e}");
        }
    });
    client
}

/// Waits until the verdict has seen as many ReadyForQuery as sync points
/// (the client got its answer before the counters are read otherwise).
fn settled(fwd: &KernelForwarder, conn: &relay::Conn) -> pgferry_kernel::SlotState {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let guard = conn.slot.lock().expect("slot");
        let st = fwd.state(guard.as_ref().expect("attached")).expect("state");
        if st.client_syncs == st.server_ready || Instant::now() > deadline {
            return st;
        }
        drop(guard);
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_transactions_hold_and_detach_through_the_sockmap() {
    let Some(fwd) = forwarder() else { return };
    let pg = cluster();
    let relay = Relay::start(pg.addr(), Mode::Kernel(fwd.clone())).expect("relay");
    let client = Arc::new(connect(&relay, &pg).await);
    let conn = relay.conns.lock().expect("conns")[0].clone();
    // The relay attaches right after login.
    let deadline = Instant::now() + Duration::from_secs(5);
    while conn.slot.lock().expect("slot").is_none() {
        assert!(Instant::now() < deadline, "never attached");
        std::thread::sleep(Duration::from_millis(5));
    }

    // Simple and extended protocol.
    let row = client.simple_query("SELECT 41 + 1").await.expect("simple");
    assert!(
        matches!(&row[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("42"))
    );
    let n: i32 = client
        .query_one("SELECT $1::int * 2", &[&21i32])
        .await
        .expect("extended")
        .get(0);
    assert_eq!(n, 42);

    // A result much bigger than 64 KiB, and one message bigger than a frame.
    let rows = client
        .query(
            "SELECT i, repeat(md5(i::text), 8) FROM generate_series(1, 20000) i",
            &[],
        )
        .await
        .expect("big result");
    assert_eq!(rows.len(), 20000);
    for (k, r) in rows.iter().enumerate() {
        let i: i32 = r.get(0);
        assert_eq!(i as usize, k + 1);
        assert_eq!(r.get::<_, String>(1).len(), 256);
    }
    let big: String = client
        .query_one("SELECT repeat('x', 1000000)", &[])
        .await
        .expect("1 MB value")
        .get(0);
    assert_eq!(big.len(), 1_000_000);

    // Transaction status from the verdict's ReadyForQuery count.
    client.batch_execute("BEGIN").await.expect("begin");
    let st = settled(&fwd, &conn);
    assert_eq!(st.last_status, b'T', "{st:?}");
    client.batch_execute("COMMIT").await.expect("commit");
    let st = settled(&fwd, &conn);
    assert_eq!(st.last_status, b'I', "{st:?}");
    assert_eq!(st.client_syncs, st.server_ready, "{st:?}");
    assert_eq!(st.bad_headers, 0, "{st:?}");
    assert!(st.idle());
    eprintln!("after the queries: {st:?}");

    // Hold the client at this safe point: its next query stays queued in
    // the kernel, the server never sees it.
    {
        let guard = conn.slot.lock().expect("slot");
        fwd.hold(guard.as_ref().expect("attached"), Side::Client)
            .expect("hold");
    }
    let q = {
        let client = client.clone();
        tokio::spawn(async move {
            let msgs = client.simple_query("SELECT 7").await.expect("held query");
            match &msgs[1] {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0) == Some("7"),
                _ => false,
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!q.is_finished(), "a held query was answered");
    let before = settled(&fwd, &conn);
    // Detach: the relay goes on in userspace; the held query is answered.
    conn.detach_requested.store(true, Ordering::SeqCst);
    let v = tokio::time::timeout(Duration::from_secs(10), q)
        .await
        .expect("held query answered after the detach")
        .expect("task");
    assert!(v, "held query's answer");
    assert!(conn.detached.load(Ordering::SeqCst));
    eprintln!("held query answered after detach; counters at detach: {before:?}");
    // And userspace forwarding carries on, big results included.
    let rows = client
        .query("SELECT i FROM generate_series(1, 50000) i", &[])
        .await
        .expect("after detach");
    assert_eq!(rows.len(), 50000);
}
