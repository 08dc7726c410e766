//! Connection-scale benchmark: how much resident memory pgferry needs per
//! idle client connection, at N = 1,000, 5,000 and 20,000 idle connections
//! (issue 15 asks for <= 1.5 KiB per idle session at 10,000, and no growth
//! after 100,000 migrations of them; a machine whose hard open-file limit
//! is 20,000 fits N = 9,900 at most, see below).
//!
//!   cargo bench --bench scale                          # N = 1000 5000 20000
//!   COUNTS="1000 5000" cargo bench --bench scale       # choose the N values
//!   CONNECT_CONCURRENCY=16 cargo bench --bench scale   # logins in flight (64)
//!   PGFERRY_BIN=/path/to/pgferry cargo bench --bench scale  # another build
//!   MIGRATE_ROUNDS=10 COUNTS=9900 cargo bench --bench scale  # then move them all 10 times
//!   PGFERRY_BENCH_SMOKE=1 cargo bench --bench scale    # N = 50, 2 rounds, checks only
//!   cargo test --bench scale                           # the same smoke run (in the suite)
//!
//! Setup: one throw-away PostgreSQL cluster; PgBouncer in transaction mode
//! in front of it as pgferry's only backend (so PostgreSQL holds a few
//! server processes, not N); pgferry as the built binary in its own
//! process. pgferry and PgBouncer are started afresh for every N, so no
//! allocator high-water mark carries over from a smaller N. The bench
//! process opens N clients (tokio-postgres, SCRAM, no TLS), a bounded
//! number at a time; each runs `SELECT 1` once and then stays idle.
//!
//! Measured: pgferry's VmRSS (`/proc/<pid>/status`) after 10 warm-up
//! connections have come and gone ("before"), and after the N clients are
//! connected, pgferry's `pgferry_client_connections` is N and RSS has
//! settled ("after"). Per connection = (after - before) / N. Kernel socket
//! memory is not part of RSS and so not counted. Also printed: VmHWM,
//! `Private_Dirty` from `smaps_rollup`, thread count, and PgBouncer's own
//! RSS growth per client as a reference (it holds the same N connections).
//!
//! Migration rounds (`MIGRATE_ROUNDS=R`, 2 in the smoke run): pgferry has
//! two backend names for the same PgBouncer, `backend` and `backend2`
//! (drained before the first login, so every session starts on `backend`).
//! Each round activates the empty one and drains the other through the
//! admin API (`POST /v1/backends/{name}/drain`), moving all N sessions;
//! pgferry's RSS is read after each round. R rounds are N x R migrations
//! (9,900 x 10 = 99,000). Afterwards every session must still answer
//! `SELECT 1`.
//!
//! Needs the PostgreSQL server binaries and PgBouncer (`apt-get install -y
//! pgbouncer`; `PGBOUNCER=/path/to/pgbouncer` picks one). The smoke run
//! points pgferry straight at PostgreSQL when PgBouncer is missing (or
//! `PGBOUNCER=none`). As root, PgBouncer runs as the user the clusters run
//! as (`postgres`, else `pgferry`). pgferry holds two sockets per session, so N needs 2N + 200
//! open files: the limit is raised for this process (root with
//! CAP_SYS_RESOURCE may raise the hard limit) and inherited by pgferry and
//! PgBouncer; an N that still does not fit is reported as not run (with
//! the largest N that fits) rather than measured wrongly.

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env_usize, http, raise_fd_limit, scrape, smoke};
use futures_util::stream::{self, StreamExt};
use nix::unistd::User;
use pgferry_pgcluster::{Cluster, ClusterOptions, ServerBinaries};

const USER: &str = "bench";
const PASSWORD: &str = "bench-password";
const DB: &str = "bench";
const WARMUP_CONNECTIONS: usize = 10;
/// Issue 15's goal.
const GOAL_KIB: f64 = 1.5;
const SMOKE_ROUNDS: usize = 2;
/// The two names pgferry has for PgBouncer (sessions move between them).
const BACKENDS: [&str; 2] = ["backend", "backend2"];
const SMOKE_N: usize = 50;
const LOG_LINES_KEPT: usize = 60;
/// Open files pgferry needs besides two per session (listeners, epoll, log).
const FD_MARGIN: usize = 200;

fn main() {
    let smoke = smoke();
    let counts: Vec<usize> = if smoke {
        vec![SMOKE_N]
    } else {
        let spec = std::env::var("COUNTS").unwrap_or_else(|_| "1000 5000 20000".into());
        spec.split_whitespace()
            .map(|s| {
                s.parse()
                    .unwrap_or_else(|_| panic!("COUNTS: {s:?} is not a number"))
            })
            .collect()
    };
    assert!(
        counts.iter().all(|&n| n > 0),
        "COUNTS must be positive numbers"
    );
    let max_n = counts.iter().copied().max().expect("COUNTS is empty");
    let concurrency = env_usize("CONNECT_CONCURRENCY", 64).max(1);
    let rounds = if smoke {
        SMOKE_ROUNDS
    } else {
        env_usize("MIGRATE_ROUNDS", 0)
    };
    let started = Instant::now();

    // pgferry holds 2 sockets per session, this process and PgBouncer one
    // each; the children inherit the limit. An N whose 2N don't fit is
    // reported as not run.
    let fds = raise_fd_limit((3 * max_n + 1000) as u64) as usize;
    let fits = |n: usize| 2 * n + FD_MARGIN <= fds;
    let max_run = counts
        .iter()
        .copied()
        .filter(|&n| fits(n))
        .max()
        .unwrap_or(0);
    check_port_range(max_run);

    let bins = ServerBinaries::find().expect("PostgreSQL server binaries");
    let pg = Cluster::start_temp(&bins, ClusterOptions::named("scale")).expect("start PostgreSQL");
    pg.ensure_user_and_database(USER, PASSWORD, DB)
        .expect("create the bench user and database");

    let bouncer_bin = find_pgbouncer();
    if bouncer_bin.is_none() {
        assert!(
            smoke,
            "pgbouncer not found (PATH, /usr/sbin/pgbouncer or $PGBOUNCER); install it with:\n  \
             apt-get install -y pgbouncer"
        );
        println!(
            "note: pgbouncer not found; the smoke run points pgferry straight at PostgreSQL \
             (`apt-get install -y pgbouncer` for the real setup)"
        );
    }
    let bouncer_version = bouncer_bin.as_deref().map(version_of);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for &n in &counts {
        if !fits(n) {
            println!(
                "N = {n}: not run: pgferry needs {} open files, the limit is {fds}",
                2 * n + FD_MARGIN
            );
            skipped.push(n);
            continue;
        }
        let bouncer = bouncer_bin
            .as_deref()
            .map(|bin| Bouncer::start(bin, pg.addr(), n));
        let backend = bouncer.as_ref().map_or(pg.addr(), |b| b.addr);
        let ferry = Ferry::start(backend, n);
        let row = rt.block_on(measure(&ferry, bouncer.as_ref(), n, concurrency, rounds));
        println!(
            "N = {n}: connected in {:.1} s ({:.0}/s), pgferry RSS {:.1} -> {:.1} MiB, \
             {:.2} KiB per connection",
            row.connect_secs,
            n as f64 / row.connect_secs.max(f64::EPSILON),
            mib(row.before.rss_kib),
            mib(row.after.rss_kib),
            row.per_conn_kib()
        );
        if smoke {
            check_smoke(&row, n);
        }
        rows.push(row);
        // Clients are gone (closed in `measure`); now pgferry and PgBouncer.
        drop(ferry);
        drop(bouncer);
    }
    drop(rt);
    drop(pg);
    report(
        &rows,
        &skipped,
        fds,
        smoke,
        bouncer_version.as_deref(),
        started.elapsed(),
    );
    if !skipped.is_empty() {
        let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(0, |l| l.1);
        eprintln!(
            "\nNOT MEASURED: N = {skipped:?}. pgferry holds two sockets per session (client and \
             backend), so N sessions need 2N + {FD_MARGIN} open files; this process's limit is \
             {fds} (hard limit {hard}) and could not be raised (raising the hard limit needs \
             root with CAP_SYS_RESOURCE). Largest N that fits: {}. Raise the limit (e.g. \
             `ulimit -Hn 65536` as root, or LimitNOFILE=) or choose COUNTS.",
            fds.saturating_sub(FD_MARGIN) / 2
        );
    }
}

/// What one N produced.
struct Row {
    n: usize,
    before: Mem,
    after: Mem,
    settled: bool,
    connect_secs: f64,
    /// PgBouncer's RSS before and after, when it is in the path.
    bouncer: Option<(Mem, Mem)>,
    selects_ok: usize,
    gauge: f64,
    /// One per migration round.
    rounds: Vec<Round>,
    /// Sessions that answered `SELECT 1` after the last round.
    selects_after_rounds: usize,
}

/// One migration round: every session moved once.
struct Round {
    moved: u64,
    secs: f64,
    mem: Mem,
}

impl Row {
    fn per_conn_kib(&self) -> f64 {
        (self.after.rss_kib as f64 - self.before.rss_kib as f64) / self.n as f64
    }
}

fn check_smoke(row: &Row, n: usize) {
    assert_eq!(row.selects_ok, n, "every client answered SELECT 1");
    assert_eq!(row.gauge, n as f64, "pgferry_client_connections reached N");
    assert!(
        row.before.rss_kib > 0 && row.after.rss_kib > 0,
        "VmRSS was read: {:?} {:?}",
        row.before,
        row.after
    );
    assert!(row.after.threads > 0, "Threads was read");
    assert_eq!(row.rounds.len(), SMOKE_ROUNDS, "migration rounds ran");
    for r in &row.rounds {
        assert_eq!(r.moved, n as u64, "every session moved in each round");
    }
    assert_eq!(
        row.selects_after_rounds, n,
        "every session answered SELECT 1 after the migration rounds"
    );
}

async fn measure(
    ferry: &Ferry,
    bouncer: Option<&Bouncer>,
    n: usize,
    concurrency: usize,
    rounds: usize,
) -> Row {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(ferry.addr.port())
        .user(USER)
        .password(PASSWORD)
        .dbname(DB)
        .application_name("scale-bench")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(30));

    // Every session starts on `backend`: the other name takes none until
    // the first round.
    drain(ferry, BACKENDS[1], 0).await;
    // Warm-up: the first logins derive SCRAM keys, start the runtime's
    // threads and fill the allocator's caches; then measure from there.
    let warm = connect_all(&cfg, WARMUP_CONNECTIONS, concurrency).await;
    let (warm, errors) = split_ok(warm);
    assert!(
        errors.is_empty(),
        "warm-up connections failed: {errors:?}\npgferry log:\n{}",
        ferry.log_tail()
    );
    drop(warm);
    wait_gauge(ferry, 0).await;
    let before = settle(ferry.pid).await.0;
    let bouncer_before = bouncer.map(|b| read_mem(b.pid()));

    let t = Instant::now();
    let results = connect_all(&cfg, n, concurrency).await;
    let connect_secs = t.elapsed().as_secs_f64();
    let (clients, errors) = split_ok(results);
    assert!(
        errors.is_empty(),
        "{} of {n} connections failed; first errors: {:?}\npgferry log:\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        ferry.log_tail()
    );
    let selects_ok = clients.len();
    let gauge = wait_gauge(ferry, n).await;
    let (after, settled) = settle(ferry.pid).await;
    let bouncer = bouncer.zip(bouncer_before).map(|(b, before)| {
        let after = read_mem(b.pid());
        (before, after)
    });
    // The idle sessions still work (after the measurement: a query may take
    // read buffers).
    let sample: Vec<_> = clients.iter().step_by((n / 100).max(1)).collect();
    for (c, _) in &sample {
        c.simple_query("SELECT 1")
            .await
            .expect("an idle session still answers SELECT 1");
    }
    // Migration rounds: all N sessions move from one name to the other.
    let mut done = Vec::new();
    for round in 0..rounds {
        let (from, to) = (BACKENDS[round % 2], BACKENDS[(round + 1) % 2]);
        let (status, body) = http(
            ferry.admin,
            "POST",
            &format!("/v1/backends/{to}/activate"),
            "",
        )
        .await;
        assert_eq!(status, 200, "activate {to}: {body}");
        let t = Instant::now();
        let moved = drain(ferry, from, n).await;
        let secs = t.elapsed().as_secs_f64();
        let mem = settle(ferry.pid).await.0;
        println!(
            "N = {n}: round {}: {moved} sessions moved {from} -> {to} in {secs:.1} s, \
             RSS {:.1} MiB ({:.2} KiB per session over the idle baseline)",
            round + 1,
            mib(mem.rss_kib),
            delta_per_conn(before.rss_kib, mem.rss_kib, n)
        );
        done.push(Round { moved, secs, mem });
    }
    let selects_after_rounds = if rounds > 0 {
        let answered = stream::iter(clients.iter())
            .map(|(c, _)| async move { c.simple_query("SELECT 1").await.is_ok() })
            .buffer_unordered(concurrency)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        assert_eq!(
            answered,
            n,
            "sessions that answered SELECT 1 after {rounds} migration rounds\npgferry log:\n{}",
            ferry.log_tail()
        );
        answered
    } else {
        0
    };
    drop(clients);
    Row {
        n,
        before,
        after,
        settled,
        connect_secs,
        bouncer,
        selects_ok,
        gauge,
        rounds: done,
        selects_after_rounds,
    }
}

/// Drains `backend` (its sessions move to the other name) and returns how
/// many moved; `expect` sessions must have moved, none failed or left.
async fn drain(ferry: &Ferry, backend: &str, expect: usize) -> u64 {
    let (status, report) = http(
        ferry.admin,
        "POST",
        &format!("/v1/backends/{backend}/drain"),
        "{\"timeout_ms\": 600000}",
    )
    .await;
    assert_eq!(status, 200, "drain {backend}: {report}");
    let moved = report["moved"].as_u64().unwrap_or(0);
    assert!(
        moved == expect as u64 && report["remaining"] == 0 && report["failed"] == 0,
        "drain {backend}: expected {expect} moved, none failed or left: {report}\npgferry log:\n{}",
        ferry.log_tail()
    );
    moved
}

type ClientTask = (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
);

/// Opens `n` connections, `concurrency` logins at a time; each runs
/// `SELECT 1` once and then stays open (idle) while it is held.
async fn connect_all(
    cfg: &tokio_postgres::Config,
    n: usize,
    concurrency: usize,
) -> Vec<Result<ClientTask, String>> {
    stream::iter(0..n)
        .map(|_| connect_one(cfg))
        .buffer_unordered(concurrency)
        .collect()
        .await
}

async fn connect_one(cfg: &tokio_postgres::Config) -> Result<ClientTask, String> {
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let task = tokio::spawn(conn);
    let answer = client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| format!("SELECT 1: {e}"))?;
    let one = answer.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
        _ => None,
    });
    if one != Some("1") {
        return Err(format!("SELECT 1 answered {one:?}"));
    }
    Ok((client, task))
}

fn split_ok<T>(results: Vec<Result<T, String>>) -> (Vec<T>, Vec<String>) {
    let mut ok = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(x) => ok.push(x),
            Err(e) => errors.push(e),
        }
    }
    (ok, errors)
}

/// Waits until pgferry reports exactly `n` client connections.
async fn wait_gauge(ferry: &Ferry, n: usize) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = scrape(ferry.admin, "pgferry_client_connections").await;
        if v == n as f64 {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "pgferry_client_connections is {v}, expected {n}\npgferry log:\n{}",
            ferry.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads RSS every 200 ms until two reads in a row agree within 1 %
/// (at most ~10 s); `false` if it never did.
async fn settle(pid: u32) -> (Mem, bool) {
    let mut last = read_mem(pid);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = read_mem(pid);
        let diff = now.rss_kib.abs_diff(last.rss_kib) as f64;
        if diff <= 0.01 * last.rss_kib as f64 {
            return (now, true);
        }
        last = now;
    }
    (last, false)
}

/// A process's memory as the kernel reports it, in KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
    threads: u64,
    /// From smaps_rollup; 0 if unavailable.
    private_dirty_kib: u64,
}

fn read_mem(pid: u32) -> Mem {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Mem {
        rss_kib: proc_field(&status, "VmRSS:").expect("VmRSS in /proc/<pid>/status"),
        hwm_kib: proc_field(&status, "VmHWM:").unwrap_or(0),
        threads: proc_field(&status, "Threads:").unwrap_or(0),
        private_dirty_kib: proc_field(&rollup, "Private_Dirty:").unwrap_or(0),
    }
}

/// `Key:   123 kB` -> 123.
fn proc_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn delta_per_conn(before: u64, after: u64, n: usize) -> f64 {
    (after as f64 - before as f64) / n as f64
}

/// N connections to one address each need their own local port.
fn check_port_range(max_n: usize) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut it = text
        .split_whitespace()
        .filter_map(|v| v.parse::<usize>().ok());
    if let (Some(lo), Some(hi)) = (it.next(), it.next()) {
        let ports = hi.saturating_sub(lo) + 1;
        assert!(
            max_n + 1000 <= ports,
            "net.ipv4.ip_local_port_range has {ports} ports, too few for {max_n} connections \
             to one address: widen it (sysctl -w net.ipv4.ip_local_port_range='1024 65535')"
        );
    }
}

/// Kills and reaps a child process on drop (also on panic).
struct Reaped {
    child: Child,
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// pgferry as the built binary, with its log's last lines.
struct Ferry {
    proc: Reaped,
    pid: u32,
    addr: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
    _dir: tempfile::TempDir,
}

impl Ferry {
    fn start(backend: SocketAddr, n: usize) -> Ferry {
        let dir = tempfile::Builder::new()
            .prefix("pgferry-scale-")
            .tempdir()
            .expect("temp dir for pgferry");
        std::fs::write(
            dir.path().join("users.txt"),
            format!("\"{USER}\" \"{PASSWORD}\"\n"),
        )
        .expect("write pgferry userlist");
        let config = dir.path().join("pgferry.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 max_client_connections = {}\nshutdown_timeout = \"1s\"\n\
                 [auth]\nuserlist = \"users.txt\"\n\
                 [[backend]]\nname = \"{}\"\naddress = \"{backend}\"\n\
                 [[backend]]\nname = \"{}\"\naddress = \"{backend}\"\n",
                (n + 100).max(30_000),
                BACKENDS[0],
                BACKENDS[1],
            ),
        )
        .expect("write pgferry config");
        let bin = std::env::var_os("PGFERRY_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_pgferry")),
            PathBuf::from,
        );
        let mut child = Command::new(&bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let pid = child.id();
        let stderr = child.stderr.take().expect("pgferry stderr");
        let proc = Reaped { child };
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                for (marker, kind) in [
                    ("admin API listening", "admin"),
                    ("pgferry listening", "proxy"),
                ] {
                    if line.contains(marker) {
                        if let Some(addr) = address_field(&line) {
                            let _ = tx.send((kind, addr));
                        }
                    }
                }
                let mut l = log2.lock().unwrap_or_else(|p| p.into_inner());
                if l.len() == LOG_LINES_KEPT {
                    l.pop_front();
                }
                l.push_back(line);
            }
        });
        let mut ferry = Ferry {
            proc,
            pid,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
            _dir: dir,
        };
        let (mut addr, mut admin) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while addr.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("proxy", a)) => addr = Some(a),
                Ok((_, a)) => admin = Some(a),
                Err(_) => panic!(
                    "pgferry did not start (exit status {:?}); log:\n{}",
                    ferry.proc.child.try_wait().ok().flatten(),
                    ferry.log_tail()
                ),
            }
        }
        ferry.addr = addr.expect("pgferry address");
        ferry.admin = admin.expect("admin address");
        let fd_limit = open_file_limit(pid);
        assert!(
            fd_limit >= (2 * n + 200) as u64,
            "pgferry's open-file limit is {fd_limit}, too low for {n} sessions"
        );
        ferry
    }

    fn log_tail(&self) -> String {
        let l = self.log.lock().unwrap_or_else(|p| p.into_inner());
        l.iter().map(|s| format!("{s}\n")).collect()
    }
}

/// `address=127.0.0.1:1234` in a tracing line.
fn address_field(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("address="))
        .and_then(|v| v.parse().ok())
}

/// The soft "Max open files" of a process.
fn open_file_limit(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Max open files"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// PgBouncer (transaction pooling) in front of the cluster.
struct Bouncer {
    proc: Reaped,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Bouncer {
    fn start(bin: &Path, pg: SocketAddr, n: usize) -> Bouncer {
        // A port picked by bind-and-close can be taken before PgBouncer
        // binds it; then try another.
        let mut last_err = String::new();
        for _ in 0..3 {
            match Self::try_start(bin, pg, n) {
                Ok(b) => return b,
                Err(e) => last_err = e,
            }
        }
        panic!("PgBouncer did not start: {last_err}");
    }

    fn try_start(bin: &Path, pg: SocketAddr, n: usize) -> Result<Bouncer, String> {
        let user = unprivileged_user();
        let dir = tempfile::Builder::new()
            .prefix("pgferry-scale-bouncer-")
            .tempdir()
            .expect("temp dir for PgBouncer");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a free port")
            .port();
        let users = dir.path().join("users.txt");
        let ini = dir.path().join("pgbouncer.ini");
        let log = dir.path().join("pgbouncer.log");
        let stderr_path = dir.path().join("pgbouncer.stderr");
        // trust: pgferry is the only client and logs in without a password;
        // the auth_file's plaintext password is what PgBouncer logs in to
        // PostgreSQL with (SCRAM).
        std::fs::write(&users, format!("\"{USER}\" \"{PASSWORD}\"\n"))
            .expect("write PgBouncer auth_file");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n{DB} = host={} port={} dbname={DB}\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
                 pool_mode = transaction\ndefault_pool_size = 4\n\
                 max_client_conn = {}\nlogfile = {}\n\
                 log_connections = 0\nlog_disconnections = 0\n\
                 ignore_startup_parameters = extra_float_digits\n",
                pg.ip(),
                pg.port(),
                users.display(),
                n + 200,
                log.display()
            ),
        )
        .expect("write pgbouncer.ini");
        let stderr = std::fs::File::create(&stderr_path).expect("create PgBouncer stderr file");
        let mut cmd = Command::new(bin);
        cmd.arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(u) = &user {
            // PgBouncer refuses to run as root.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod PgBouncer dir");
            for p in [dir.path(), &users, &ini] {
                nix::unistd::chown(p, Some(u.uid), Some(u.gid))
                    .unwrap_or_else(|e| panic!("chown {} to {}: {e}", p.display(), u.name));
            }
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut bouncer = Bouncer {
            proc: Reaped { child },
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = bouncer.proc.child.try_wait() {
                return Err(format!("exited with {status}:\n{}", bouncer.logs()));
            }
            if std::net::TcpStream::connect(bouncer.addr).is_ok() {
                return Ok(bouncer);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not listening on {} after 15 s:\n{}",
                    bouncer.addr,
                    bouncer.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    fn logs(&self) -> String {
        ["pgbouncer.stderr", "pgbouncer.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.path().join(f)).ok())
            .map(|t| {
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// PgBouncer in PATH, in /usr/sbin, or `$PGBOUNCER` (`none`: as if it
/// were not installed).
fn find_pgbouncer() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PGBOUNCER") {
        if p == "none" {
            return None;
        }
        let p = PathBuf::from(p);
        assert!(
            is_executable(&p),
            "PGBOUNCER={} is not executable",
            p.display()
        );
        return Some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("pgbouncer"))
        .chain([PathBuf::from("/usr/sbin/pgbouncer")])
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The user PgBouncer runs as when we are root: the one the clusters run
/// as (pgferry-pgcluster's choice: `postgres`, else `pgferry`).
fn unprivileged_user() -> Option<User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let found = ["postgres", "pgferry"]
        .iter()
        .find_map(|name| User::from_name(name).ok().flatten());
    Some(found.expect("running as root needs a `postgres` or `pgferry` user for PgBouncer"))
}

fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown version".into())
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn report(
    rows: &[Row],
    skipped: &[usize],
    fds: usize,
    smoke: bool,
    bouncer: Option<&str>,
    elapsed: Duration,
) {
    let cmd = if smoke {
        "PGFERRY_BENCH_SMOKE=1 cargo bench --bench scale (or cargo test --bench scale)".to_owned()
    } else {
        match std::env::var("COUNTS") {
            Ok(c) => format!("COUNTS=\"{c}\" cargo bench --bench scale"),
            Err(_) => "cargo bench --bench scale".to_owned(),
        }
    };
    println!();
    println!("### pgferry RSS per idle client connection");
    println!();
    println!("- command: `{cmd}`");
    println!(
        "- date: {} (run took {:.0} s)",
        command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        elapsed.as_secs_f64()
    );
    println!(
        "- machine: {} CPUs, kernel {}",
        command_output("nproc", &[]),
        command_output("uname", &["-r"])
    );
    println!(
        "- build: {}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    match bouncer {
        Some(v) => println!(
            "- backend: {v}, pool_mode = transaction, default_pool_size = 4, in front of one \
             PostgreSQL cluster"
        ),
        None => println!("- backend: PostgreSQL directly (no PgBouncer installed)"),
    }
    println!(
        "- clients: tokio-postgres, SCRAM, no TLS, {} logins at a time, each `SELECT 1` once \
         then idle; pgferry and PgBouncer restarted for every N",
        env_usize("CONNECT_CONCURRENCY", 64).max(1)
    );
    println!();
    println!(
        "| N | RSS before (MiB) | RSS after (MiB) | per connection (KiB) | goal {GOAL_KIB} KiB |"
    );
    println!("|---:|---:|---:|---:|---|");
    for r in rows {
        let per = r.per_conn_kib();
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {} |",
            r.n,
            mib(r.before.rss_kib),
            mib(r.after.rss_kib),
            per,
            if per <= GOAL_KIB { "met" } else { "not met" }
        );
    }
    if rows.iter().any(|r| !r.rounds.is_empty()) {
        println!();
        println!(
            "| N | round | moved | seconds | RSS after the round (MiB) | per session over the \
             idle baseline (KiB) |"
        );
        println!("|---:|---:|---:|---:|---:|---:|");
        for r in rows {
            println!(
                "| {} | 0 (idle, before any move) | - | - | {:.1} | {:.2} |",
                r.n,
                mib(r.after.rss_kib),
                r.per_conn_kib()
            );
            for (i, round) in r.rounds.iter().enumerate() {
                println!(
                    "| {} | {} | {} | {:.1} | {:.1} | {:.2} |",
                    r.n,
                    i + 1,
                    round.moved,
                    round.secs,
                    mib(round.mem.rss_kib),
                    delta_per_conn(r.before.rss_kib, round.mem.rss_kib, r.n)
                );
            }
        }
    }
    for n in skipped {
        println!(
            "| {n} | - | - | not run: needs {} open files, limit {fds} | not measured |",
            2 * n + FD_MARGIN
        );
    }
    println!();
    println!(
        "| N | Private_Dirty per conn (KiB) | VmHWM after (MiB) | threads before / after | \
         RSS settled | connect rate (/s) | PgBouncer RSS per client (KiB) |"
    );
    println!("|---:|---:|---:|---|---|---:|---:|");
    for r in rows {
        let bouncer = r.bouncer.map_or("-".to_owned(), |(b, a)| {
            format!("{:.2}", delta_per_conn(b.rss_kib, a.rss_kib, r.n))
        });
        println!(
            "| {} | {:.2} | {:.1} | {} / {} | {} | {:.0} | {} |",
            r.n,
            delta_per_conn(r.before.private_dirty_kib, r.after.private_dirty_kib, r.n),
            mib(r.after.hwm_kib),
            r.before.threads,
            r.after.threads,
            if r.settled { "yes" } else { "no (10 s)" },
            r.n as f64 / r.connect_secs.max(f64::EPSILON),
            bouncer
        );
    }
}
