//! Shared by the macro benchmarks: knobs from the environment, smoke-mode
//! detection, a tiny HTTP client for the admin API, metrics and
//! percentiles. Benchmarks run pgferry in-process or as the built binary
//! against throw-away clusters; nothing here is measured.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `cargo bench` passes `--bench`; `cargo test` (the suite) does not, and
/// gets the smoke run, as does `PGFERRY_BENCH_SMOKE=1`.
pub fn smoke() -> bool {
    std::env::var("PGFERRY_BENCH_SMOKE").is_ok_and(|v| v == "1")
        || !std::env::args().any(|a| a == "--bench")
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One HTTP/1.0 request: (status, body).
pub async fn http_text(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
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
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `http_text` with the body parsed as JSON (Null if it is not).
pub async fn http(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, text) = http_text(admin, method, path, body).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// A sample's value in Prometheus text (0 when absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

pub async fn scrape(admin: SocketAddr, series: &str) -> f64 {
    metric(&http_text(admin, "GET", "/metrics", "").await.1, series)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Raises this process's open-file limit as far as allowed (benchmarks
/// hold thousands of sockets).
pub fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    // Root may raise the hard limit too.
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|l| l.0)
        .unwrap_or(soft)
}

/// pgferry in this process, with its admin API, on free ports, serving
/// until the runtime ends: (proxy address, admin address).
pub async fn serve_in_process(config: pgferry_proxy::Config) -> (SocketAddr, SocketAddr) {
    use tokio::net::TcpListener;
    let proxy = pgferry_proxy::Proxy::new(config).expect("proxy");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let admin = admin_listener.local_addr().expect("admin addr");
    let state = pgferry_admin::AdminState {
        metrics: proxy.metrics(),
        proxy: proxy.context().clone(),
    };
    tokio::spawn(pgferry_admin::serve(
        admin_listener,
        state,
        std::future::pending(),
    ));
    tokio::spawn(async move { proxy.serve(listener, std::future::pending()).await });
    (addr, admin)
}

pub const USER: &str = "bench";
pub const PASSWORD: &str = "bench-password";

/// Two throw-away clusters with the bench user and database, named
/// `{prefix}1` and `{prefix}2`, with extra postgresql.conf `settings`.
pub fn two_clusters(
    prefix: &str,
    settings: &[(&str, String)],
) -> (pgferry_pgcluster::Cluster, pgferry_pgcluster::Cluster) {
    use pgferry_pgcluster::{Cluster, ClusterOptions, ServerBinaries};
    let bins = ServerBinaries::find().expect("PostgreSQL server binaries");
    let opts = |n: u8| {
        let mut o = ClusterOptions::named(format!("{prefix}{n}"));
        o.settings = settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        o
    };
    let pg1 = Cluster::start_temp(&bins, opts(1)).expect("pg1");
    let pg2 = Cluster::start_temp(&bins, opts(2)).expect("pg2");
    for c in [&pg1, &pg2] {
        c.ensure_user_and_database(USER, PASSWORD, USER)
            .expect("user");
    }
    (pg1, pg2)
}

/// A temp dir holding `users.txt` with the bench user's password, for a
/// config's `[auth] userlist = "users.txt"`.
pub fn userlist_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("users.txt"),
        format!("\"{USER}\" \"{PASSWORD}\"\n"),
    )
    .expect("userlist");
    dir
}

/// CPU time (user + system) used so far by a cluster: its postmaster, the
/// processes it started that have exited (reaped: the postmaster's
/// children totals) and those still running. Linux only (/proc).
pub fn cluster_cpu(cluster: &pgferry_pgcluster::Cluster) -> std::time::Duration {
    // /proc reports in USER_HZ, 100 on Linux.
    const TICK_MS: u64 = 10;
    let Some(postmaster) = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return std::time::Duration::ZERO;
    };
    let mut ticks = 0u64;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return std::time::Duration::ZERO;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state is
        // field 3, so field n is at index n - 3.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if f.len() < 15 {
            continue;
        }
        let (ppid, utime, stime, cutime, cstime) = (f[1], f[11], f[12], f[13], f[14]);
        if pid == postmaster {
            ticks += utime + stime + cutime + cstime;
        } else if ppid == u64::from(postmaster) {
            ticks += utime + stime;
        }
    }
    std::time::Duration::from_millis(ticks * TICK_MS)
}

/// CPU time (user + system) of this process so far.
pub fn own_cpu() -> std::time::Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| {
                std::time::Duration::from_secs(tv.tv_sec() as u64)
                    + std::time::Duration::from_micros(tv.tv_usec() as u64)
            };
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => std::time::Duration::ZERO,
    }
}
