//! What kernel forwarding buys: `pgbench -S` directly against PostgreSQL,
//! through a thread-per-session relay that forwards in userspace, and
//! through the same relay with the sockmap attached after login; modes and
//! targets in alternating order. Reports TPS, the relay process's CPU per
//! transaction (from /proc/self/stat) and the whole machine's CPU per
//! transaction (from /proc/stat: redirected bytes are processed in the
//! sender's softirq and a kworker, which the relay's own figure misses).
//!
//!   cargo run --release -p pgferry-kernel --example pgbench
//!
//! Environment: DURATION [10] s per run, ROUNDS [2], MODES ["simple
//! prepared"], CLIENTS [16], THREADS [2], SCALE [10]. Needs root (or
//! CAP_BPF + CAP_NET_ADMIN) for the kernel target; without it, that target
//! is skipped with the reason.

#[path = "relay/mod.rs"]
mod relay;

use std::process::Command;
use std::sync::Arc;

use pgferry_kernel::KernelForwarder;
use pgferry_pgcluster::{Cluster, ClusterOptions, ServerBinaries};
use relay::{Mode, Relay};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// utime + stime of this process, in clock ticks.
fn self_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime and
    // stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// (busy, total) clock ticks of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest counted in user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

struct Run {
    tps: f64,
    txns: u64,
    relay_us: f64,
    machine_us: f64,
    softirq_share: f64,
}

fn softirq_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    line.split_whitespace()
        .nth(7)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

fn pgbench(
    pg: &Cluster,
    port: u16,
    mode: &str,
    duration: &str,
    clients: &str,
    threads: &str,
) -> Run {
    let hz = 100.0; // USER_HZ
    let t0 = self_ticks();
    let (b0, _) = machine_ticks();
    let s0 = softirq_ticks();
    let out = Command::new(pg.bins().path("pgbench"))
        .args([
            "-S", "-n", "-M", mode, "-c", clients, "-j", threads, "-T", duration,
        ])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            pg.superuser(),
            "postgres",
        ])
        .env("PGPASSWORD", pg.superuser_password())
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench");
    let t1 = self_ticks();
    let (b1, _) = machine_ticks();
    let s1 = softirq_ticks();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "pgbench failed: {}\n{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let num = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let tps = num("tps =");
    let txns = num("number of transactions actually processed:") as u64;
    let per = |ticks: u64| ticks as f64 / hz * 1e6 / txns.max(1) as f64;
    Run {
        tps,
        txns,
        relay_us: per(t1 - t0),
        machine_us: per(b1 - b0),
        softirq_share: (s1 - s0) as f64 / (b1 - b0).max(1) as f64,
    }
}

fn main() {
    let duration = env("DURATION", "10");
    let rounds: usize = env("ROUNDS", "2").parse().unwrap_or(2);
    let modes = env("MODES", "simple prepared");
    let clients = env("CLIENTS", "16");
    let threads = env("THREADS", "2");
    let scale = env("SCALE", "10");

    let bins = ServerBinaries::find_or_install().expect("PostgreSQL binaries");
    let mut opts = ClusterOptions::named("kbench");
    opts.settings
        .push(("shared_buffers".into(), "128MB".into()));
    opts.settings
        .push(("synchronous_commit".into(), "off".into()));
    opts.settings
        .push(("full_page_writes".into(), "off".into()));
    let pg = Cluster::start_temp(&bins, opts).expect("start PostgreSQL");
    let init = Command::new(pg.bins().path("pgbench"))
        .args([
            "-i",
            "-q",
            "-s",
            &scale,
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
        ])
        .args(["-U", pg.superuser(), "postgres"])
        .env("PGPASSWORD", pg.superuser_password())
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    let user = Relay::start(pg.addr(), Mode::Userspace).expect("userspace relay");
    let kernel = match KernelForwarder::new() {
        Ok(f) => Some(Relay::start(pg.addr(), Mode::Kernel(Arc::new(f))).expect("kernel relay")),
        Err(e) => {
            eprintln!("kernel target skipped: {e}");
            None
        }
    };
    let mut targets: Vec<(&str, u16)> =
        vec![("direct", pg.port()), ("userspace", user.addr.port())];
    if let Some(k) = &kernel {
        targets.push(("sockmap", k.addr.port()));
    }
    println!(
        "pgbench -S -c {clients} -j {threads} -T {duration}, scale {scale}, {rounds} rounds, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "| mode | target | round | TPS | relay CPU µs/txn | machine CPU µs/txn | softirq share |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut sums: Vec<(String, String, f64, f64, f64, u32)> = Vec::new();
    for mode in modes.split_whitespace() {
        for round in 0..rounds {
            let mut order = targets.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for (name, port) in order {
                let r = pgbench(&pg, port, mode, &duration, &clients, &threads);
                println!(
                    "| {mode} | {name} | {} | {:.0} | {:.1} | {:.1} | {:.0} % |",
                    round + 1,
                    r.tps,
                    if name == "direct" { 0.0 } else { r.relay_us },
                    r.machine_us,
                    r.softirq_share * 100.0
                );
                let _ = r.txns;
                match sums.iter_mut().find(|s| s.0 == mode && s.1 == name) {
                    Some(s) => {
                        s.2 += r.tps;
                        s.3 += r.relay_us;
                        s.4 += r.machine_us;
                        s.5 += 1;
                    }
                    None => {
                        sums.push((mode.into(), name.into(), r.tps, r.relay_us, r.machine_us, 1))
                    }
                }
            }
        }
    }
    println!("\nmeans:");
    println!("| mode | target | TPS | × direct | relay CPU µs/txn | machine CPU µs/txn |");
    println!("|---|---|---:|---:|---:|---:|");
    for s in &sums {
        let n = f64::from(s.5);
        let direct = sums
            .iter()
            .find(|d| d.0 == s.0 && d.1 == "direct")
            .map(|d| d.2 / f64::from(d.5))
            .unwrap_or(1.0);
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.1} | {:.1} |",
            s.0,
            s.1,
            s.2 / n,
            s.2 / n / direct,
            if s.1 == "direct" { 0.0 } else { s.3 / n },
            s.4 / n
        );
    }
}
