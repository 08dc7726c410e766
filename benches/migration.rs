//! Migration pause benchmark: idle sessions moved back and forth between
//! two local PostgreSQL clusters through the admin API, pgferry running
//! in-process (release build under `cargo bench`).
//!
//!   cargo bench --bench migration                      # 20 sessions, 500 moves
//!   SESSIONS=100 MOVES=2000 cargo bench --bench migration
//!   WARM_SPARES=1 cargo bench --bench migration        # targets from warm spares
//!   WARM_SPARES=1 BACK_TO_BACK=1 cargo bench --bench migration  # no wait for refills
//!   TOUCH=1 WARM_SPARES=1 cargo bench --bench migration  # a statement before every move,
//!                                                        # so every move captures
//!   PGFERRY_BENCH_SMOKE=1 cargo bench --bench migration  # a few moves, checks only
//!   cargo test --bench migration                         # the same smoke run (in the suite)
//!
//! Prints p50/p90/p99/max of the pause (time a session's traffic is held)
//! and of the whole transfer (request to resume), as the API reports them.

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::{
    env_usize, http, percentile, scrape, serve_in_process, smoke, two_clusters, userlist_dir,
    PASSWORD, USER,
};
use pgferry_proxy::Config;

async fn idle_spares(admin: SocketAddr) -> f64 {
    scrape(admin, "pgferry_warm_spares_idle").await
}

fn main() {
    // `cargo bench` passes --bench; `cargo test` (the suite) does not, and
    // gets the smoke run.
    let smoke = smoke();
    let sessions = if smoke { 2 } else { env_usize("SESSIONS", 20) };
    let moves = if smoke { 10 } else { env_usize("MOVES", 500) };
    let spares = if smoke {
        1
    } else {
        env_usize("WARM_SPARES", 0)
    };

    let (pg1, pg2) = two_clusters("bench", &[]);
    let dir = userlist_dir();
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [auth]\nuserlist = \"users.txt\"\n\
         [migration]\nwarm_spares = {spares}\n\
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
        let (addr, admin) = serve_in_process(config).await;

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
        // (id, client), matched by application_name.
        let ids: Vec<(String, usize)> = list
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| {
                let id = c["id"].as_str()?.to_owned();
                let i = c["application_name"].as_str()?.strip_prefix("bench-")?.parse().ok()?;
                Some((id, i))
            })
            .collect();
        assert_eq!(ids.len(), sessions);
        // TOUCH=1: each session runs a statement before each of its moves,
        // so every move captures (an untouched session moved again replays
        // the state pgferry already knows).
        let touch = std::env::var("TOUCH").is_ok_and(|v| v == "1");
        // Each session's parameters get `spares` ready on both backends.
        let want = (sessions * 2 * spares) as f64;
        let ready_by = Instant::now() + std::time::Duration::from_secs(30);
        while spares > 0 && idle_spares(admin).await < want {
            assert!(Instant::now() < ready_by, "warm spares never filled");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }

        let mut pauses = Vec::with_capacity(moves);
        let mut totals = Vec::with_capacity(moves);
        let started = Instant::now();
        // With spares, each move starts once the previous move's refill
        // is done (steady state), unless BACK_TO_BACK=1: on a 2-core box a
        // refill (a new PostgreSQL process and its login) otherwise
        // competes with the next move for the CPU.
        let back_to_back = std::env::var("BACK_TO_BACK").is_ok_and(|v| v == "1");
        for m in 0..moves {
            while spares > 0 && !back_to_back && idle_spares(admin).await < want {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            let (id, client) = &ids[m % ids.len()];
            if touch {
                clients[*client].simple_query("SELECT 1").await.expect("touch");
            }
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
        let taken = scrape(admin, "pgferry_warm_spares_taken_total").await;
        let reused = scrape(admin, "pgferry_conn_migration_state_reused_total").await;
        let expected_reuse = if touch { 0 } else { moves.saturating_sub(sessions) };
        assert_eq!(reused as usize, expected_reuse, "moves that replayed a known state");
        if spares > 0 {
            assert!(taken > 0.0, "no migration used a warm spare");
        }
        println!(
            "warm_spares = {spares}{}: {taken} of {moves} moves landed on a spare",
            if spares > 0 && back_to_back { " (back to back)" } else { "" }
        );
        println!(
            "{reused} of {moves} moves replayed a known state (TOUCH={})",
            u8::from(touch)
        );
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
        // Where the pause goes, from pgferry's own phase histograms.
        let mut phases = Vec::new();
        for phase in ["capture", "connect", "replay"] {
            let series = |part: &str| {
                format!("pgferry_conn_migration_phase_seconds_{part}{{phase=\"{phase}\"}}")
            };
            let sum = scrape(admin, &series("sum")).await;
            let count = scrape(admin, &series("count")).await;
            let expected = if phase == "capture" { moves - reused as usize } else { moves };
            assert_eq!(count as usize, expected, "{phase} observed once per move that ran it");
            if count > 0.0 {
                phases.push(format!("{phase} {:.2} ms", 1000.0 * sum / count));
            }
        }
        println!("mean per phase (capture and connect overlap): {}", phases.join(", "));
    });
    drop(pg1);
    drop(pg2);
}
