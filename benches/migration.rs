//! Migration pause benchmark: idle sessions moved back and forth between
//! two local PostgreSQL clusters through the admin API, pgferry running
//! in-process (release build under `cargo bench`).
//!
//!   cargo bench --bench migration                      # 20 sessions, 500 moves
//!   SESSIONS=100 MOVES=2000 cargo bench --bench migration
//!   PGFERRY_BENCH_SMOKE=1 cargo bench --bench migration  # a few moves, checks only
//!
//! Prints p50/p90/p99/max of the pause (time a session's traffic is held)
//! and of the whole transfer (request to resume), as the API reports them.

use std::net::SocketAddr;
use std::time::Instant;

use pgferry_admin::AdminState;
use pgferry_pgcluster::{Cluster, ClusterOptions, ServerBinaries};
use pgferry_proxy::{Config, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const USER: &str = "bench";
const PASSWORD: &str = "bench-password";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn http(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(admin).await.expect("admin");
    let req = format!(
        "{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = resp
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let smoke = std::env::var("PGFERRY_BENCH_SMOKE").is_ok_and(|v| v == "1");
    let sessions = if smoke { 2 } else { env_usize("SESSIONS", 20) };
    let moves = if smoke { 10 } else { env_usize("MOVES", 500) };

    let bins = ServerBinaries::find().expect("PostgreSQL server binaries");
    let pg1 = Cluster::start_temp(&bins, ClusterOptions::named("bench1")).expect("pg1");
    let pg2 = Cluster::start_temp(&bins, ClusterOptions::named("bench2")).expect("pg2");
    for c in [&pg1, &pg2] {
        c.ensure_user_and_database(USER, PASSWORD, USER)
            .expect("user");
    }
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("users.txt"),
        format!("\"{USER}\" \"{PASSWORD}\"\n"),
    )
    .expect("userlist");
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [auth]\nuserlist = \"users.txt\"\n\
         [[backend]]\nname = \"pg1\"\naddress = \"{}\"\n\
         [[backend]]\nname = \"pg2\"\naddress = \"{}\"\n",
        pg1.addr(),
        pg2.addr()
    );
    let config = Config::parse(&toml, "bench.toml", dir.path()).expect("config");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let proxy = Proxy::new(config).expect("proxy");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let admin = admin_listener.local_addr().expect("admin addr");
        let state = AdminState {
            metrics: proxy.metrics(),
            proxy: proxy.context().clone(),
        };
        tokio::spawn(pgferry_admin::serve(admin_listener, state, std::future::pending()));
        tokio::spawn(async move { proxy.serve(listener, std::future::pending()).await });

        let mut clients = Vec::new();
        for i in 0..sessions {
            let (c, conn) = tokio_postgres::Config::new()
                .host("127.0.0.1")
                .port(addr.port())
                .user(USER)
                .password(PASSWORD)
                .dbname(USER)
                .application_name(format!("bench-{i}"))
                .connect(tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            c.simple_query("SET search_path = public; PREPARE p(int) AS SELECT $1")
                .await
                .expect("session state");
            clients.push(c);
        }
        let (_, list) = http(admin, "GET", "/v1/connections", "").await;
        let ids: Vec<String> = list
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(ids.len(), sessions);

        let mut pauses = Vec::with_capacity(moves);
        let mut totals = Vec::with_capacity(moves);
        let started = Instant::now();
        for m in 0..moves {
            let id = &ids[m % ids.len()];
            let (status, out) = http(admin, "POST", &format!("/v1/connections/{id}/transfer"), "").await;
            assert_eq!(status, 200, "move {m}: {out}");
            pauses.push(out["pause_ms"].as_f64().expect("pause_ms"));
            totals.push(out["duration_ms"].as_f64().expect("duration_ms"));
        }
        let elapsed = started.elapsed();
        // Every session still works, with its state.
        for c in &clients {
            let rows = c.simple_query("EXECUTE p(7)").await.expect("session works after moves");
            assert!(!rows.is_empty());
        }
        pauses.sort_by(f64::total_cmp);
        totals.sort_by(f64::total_cmp);
        println!(
            "migration pause, idle sessions: {sessions} sessions, {moves} moves in {:.1?} ({:.0} moves/s)",
            elapsed,
            moves as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
        );
        println!("| ms | p50 | p90 | p99 | max |");
        println!("|---|---|---|---|---|");
        for (name, v) in [("pause (traffic held)", &pauses), ("transfer (request to resume)", &totals)] {
            println!(
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
                percentile(v, 0.5),
                percentile(v, 0.9),
                percentile(v, 0.99),
                percentile(v, 1.0)
            );
        }
    });
    drop(pg1);
    drop(pg2);
}
