//! Drain benchmark: N idle sessions on one backend moved off it by one
//! `POST /v1/backends/pg1/drain`, pgferry running in-process (release
//! build under `cargo bench`) between two local PostgreSQL clusters.
//!
//!   cargo bench --bench drain                          # 1,000 sessions
//!   SESSIONS=2000 DRAIN_CONCURRENCY=64 cargo bench --bench drain
//!   WARM_SPARES=1 cargo bench --bench drain            # spares for the targets
//!   SETUP=none cargo bench --bench drain               # sessions that never spoke
//!   SETUP="SELECT 1" cargo bench --bench drain         # any one statement per session
//!   PROFILE=drain.perf cargo bench --bench drain       # `perf record -a -g` of the drain alone
//!   cargo test --bench drain                           # smoke: 20 sessions (in the suite)
//!
//! Each session runs `SETUP` once after its login (default `SET
//! search_path = public`; `none`: nothing, so its state is what the login
//! gave and the move needs no capture). Prints the drain's own duration
//! (as the API reports it), moved/failed/remaining, how many moves
//! captured, the mean pause from /metrics, and where the CPU went.

mod common;

use std::time::{Duration, Instant};

use common::{
    cluster_cpu, env_usize, http, own_cpu, raise_fd_limit, scrape, serve_in_process, smoke,
    two_clusters, userlist_dir, PASSWORD, USER,
};
use pgferry_proxy::Config;
use tokio::sync::Semaphore;

fn main() {
    let smoke = smoke();
    let sessions = if smoke {
        20
    } else {
        env_usize("SESSIONS", 1000)
    };
    let concurrency = env_usize("DRAIN_CONCURRENCY", 32);
    let spares = env_usize("WARM_SPARES", 0);
    let setup = match std::env::var("SETUP") {
        Ok(s) if s == "none" || s.is_empty() => None,
        Ok(s) => Some(s),
        Err(_) => Some("SET search_path = public".to_owned()),
    };
    let setup = &*Box::leak(Box::new(setup));
    // Client sockets, proxy sockets on both sides, and the old backends'
    // sockets while they close.
    raise_fd_limit((sessions as u64) * 4 + 1000);

    let max_connections = [("max_connections", (sessions + 50).to_string())];
    let (pg1, pg2) = two_clusters("drainbench", &max_connections);
    let dir = userlist_dir();
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         max_client_connections = {}\n\
         [auth]\nuserlist = \"users.txt\"\n\
         [migration]\nwarm_spares = {spares}\n\
         [balancer]\ndrain_concurrency = {concurrency}\n\
         [[backend]]\nname = \"pg1\"\naddress = \"{}\"\n\
         [[backend]]\nname = \"pg2\"\naddress = \"{}\"\n",
        sessions + 100,
        pg1.addr(),
        pg2.addr()
    );
    let config = Config::parse(&toml, "bench.toml", dir.path()).expect("config");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (pg1_ref, pg2_ref) = (&pg1, &pg2);
    rt.block_on(async move {
        let (addr, admin) = serve_in_process(config).await;

        // Every session on pg1: pg2 takes none until the drain starts.
        let (status, r) = http(admin, "POST", "/v1/backends/pg2/drain", "").await;
        assert_eq!(status, 200, "{r}");
        let started = Instant::now();
        let limit = std::sync::Arc::new(Semaphore::new(64));
        let mut connecting = tokio::task::JoinSet::new();
        for _ in 0..sessions {
            let limit = limit.clone();
            connecting.spawn(async move {
                let _permit = limit.acquire_owned().await.expect("semaphore");
                let (c, conn) = tokio_postgres::Config::new()
                    .host("127.0.0.1")
                    .port(addr.port())
                    .user(USER)
                    .password(PASSWORD)
                    .dbname(USER)
                    .application_name("drain-bench")
                    .connect(tokio_postgres::NoTls)
                    .await
                    .expect("connect");
                tokio::spawn(conn);
                if let Some(sql) = setup {
                    c.simple_query(sql).await.expect("session setup");
                }
                c
            });
        }
        let mut clients = Vec::with_capacity(sessions);
        while let Some(c) = connecting.join_next().await {
            clients.push(c.expect("connect task"));
        }
        println!(
            "{sessions} idle sessions on pg1 in {:.1?}",
            started.elapsed()
        );
        let (status, r) = http(admin, "POST", "/v1/backends/pg2/activate", "").await;
        assert_eq!(status, 200, "{r}");
        if spares > 0 {
            // One parameter set: activating pg2 fills its spares.
            let by = Instant::now() + Duration::from_secs(30);
            while scrape(admin, "pgferry_warm_spares_idle").await < (2 * spares) as f64 {
                assert!(Instant::now() < by, "spares never filled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        let captures_before =
            scrape(admin, "pgferry_conn_migration_phase_seconds_count{phase=\"capture\"}").await;
        let body = r#"{"timeout_ms": 60000}"#;
        let cpu_before = (cluster_cpu(pg1_ref), cluster_cpu(pg2_ref), own_cpu());
        let profiler = std::env::var("PROFILE").ok().map(start_profiler);
        // /proc shows a live server process's CPU only partly until it
        // exits (its whole life then lands in the postmaster's reaped
        // total), which skews the /proc split between the two clusters;
        // `perf stat` on each cluster's processes (new children included)
        // counts what each spends during the drain.
        let meters = (CpuMeter::start(pg1_ref), CpuMeter::start(pg2_ref));
        let t = Instant::now();
        let (status, report) = http(admin, "POST", "/v1/backends/pg1/drain", body).await;
        let wall = t.elapsed();
        if let Some(p) = profiler {
            stop_profiler(p);
        }
        let measured = (meters.0.and_then(CpuMeter::stop), meters.1.and_then(CpuMeter::stop));
        let cpu = (
            cluster_cpu(pg1_ref).saturating_sub(cpu_before.0),
            cluster_cpu(pg2_ref).saturating_sub(cpu_before.1),
            own_cpu().saturating_sub(cpu_before.2),
        );
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["remaining"], 0, "{report}");
        assert_eq!(report["failed"], 0, "{report}");
        assert_eq!(report["moved"].as_u64(), Some(sessions as u64), "{report}");
        // Every session still works, now on pg2.
        for c in clients.iter().step_by((sessions / 20).max(1)) {
            let rows = c.simple_query("SELECT 1").await.expect("session works after the drain");
            assert!(!rows.is_empty());
        }
        let captures =
            scrape(admin, "pgferry_conn_migration_phase_seconds_count{phase=\"capture\"}").await
                - captures_before;
        if setup.is_none() {
            assert_eq!(captures, 0.0, "sessions that never spoke move on their login state");
        } else {
            assert_eq!(captures, sessions as f64, "every session that spoke is captured");
        }
        let pause_sum = scrape(admin, "pgferry_conn_migration_pause_seconds_sum").await;
        let pause_n = scrape(admin, "pgferry_conn_migration_pause_seconds_count").await;
        println!(
            "drain of {sessions} idle sessions, concurrency {concurrency}, warm_spares {spares}, \
             setup {:?}:",
            setup.as_deref().unwrap_or("none")
        );
        println!("| sessions | drain (API duration_ms) | wall (client) | moved | failed | remaining | captured | mean pause |");
        println!("|---|---|---|---|---|---|---|---|");
        println!(
            "| {sessions} | {:.0} ms | {:.0} ms | {} | {} | {} | {captures} | {:.2} ms |",
            report["duration_ms"].as_f64().unwrap_or(f64::NAN),
            wall.as_secs_f64() * 1000.0,
            report["moved"],
            report["failed"],
            report["remaining"],
            pause_sum / pause_n.max(1.0) * 1000.0,
        );
        // Where the drain's CPU went (the old backends' exits are counted
        // in their postmaster's children totals once reaped).
        println!(
            "CPU during the drain ({:.2} s wall, 2 CPUs = {:.2} CPU-s): PostgreSQL pg1 {:.2} s \
             (captures, {:.2} ms per session), pg2 {:.2} s (new server processes and logins, \
             {:.2} ms per session), this process (pgferry + idle clients) {:.2} s",
            wall.as_secs_f64(),
            2.0 * wall.as_secs_f64(),
            cpu.0.as_secs_f64(),
            cpu.0.as_secs_f64() * 1000.0 / sessions as f64,
            cpu.1.as_secs_f64(),
            cpu.1.as_secs_f64() * 1000.0 / sessions as f64,
            cpu.2.as_secs_f64(),
        );
        if let (Some(pg1_ms), Some(pg2_ms)) = measured {
            println!(
                "CPU during the drain by perf stat (task-clock of each cluster's processes): \
                 pg1 {:.2} s ({:.2} ms per session), pg2 {:.2} s ({:.2} ms per session)",
                pg1_ms / 1000.0,
                pg1_ms / sessions as f64,
                pg2_ms / 1000.0,
                pg2_ms / sessions as f64,
            );
        } else {
            println!("(perf stat not available: no per-cluster CPU from it)");
        }
        drop(clients);
    });
    drop(pg1);
    drop(pg2);
}

/// `perf record -a -g` (whole machine: PostgreSQL's processes are where
/// a drain's time goes) into `path`, started before the drain.
fn start_profiler(path: String) -> std::process::Child {
    let child = std::process::Command::new("perf")
        .args(["record", "-a", "-g", "-F", "999", "-o", &path])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("perf record (apt-get install -y linux-perf)");
    // perf needs a moment to set up its buffers on every CPU.
    std::thread::sleep(Duration::from_millis(500));
    child
}

fn stop_profiler(mut child: std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = child.wait();
}

/// `perf stat -e task-clock` on a cluster's postmaster and every server
/// process it has now (children it forks meanwhile are inherited).
struct CpuMeter {
    child: std::process::Child,
    out: tempfile::NamedTempFile,
}

impl CpuMeter {
    fn start(cluster: &pgferry_pgcluster::Cluster) -> Option<Self> {
        let postmaster: u32 = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()?;
        let mut pids = vec![postmaster.to_string()];
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(postmaster) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        let out = tempfile::NamedTempFile::new().ok()?;
        let child = std::process::Command::new("perf")
            .args(["stat", "-x,", "-e", "task-clock", "-o"])
            .arg(out.path())
            .args(["-p", &pids.join(",")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        // Attaching to a thousand processes takes a moment.
        std::thread::sleep(Duration::from_millis(500));
        Some(Self { child, out })
    }

    /// Milliseconds of CPU counted.
    fn stop(mut self) -> Option<f64> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let text = std::fs::read_to_string(self.out.path()).ok()?;
        text.lines()
            .find(|l| l.contains("task-clock"))?
            .split(',')
            .next()?
            .parse()
            .ok()
    }
}
