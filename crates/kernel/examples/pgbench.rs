//! What kernel forwarding buys: `pgbench -S` directly against PostgreSQL,
//! through a thread-per-session relay that forwards in userspace, and
//! through the same relay with the sockmap attached after login (three
//! framings: `sockmap` = stream parser per message, `sockmap-segments` =
//! verdict per skb unread, `sockmap-counted` = verdict per skb walking the
//! headers); modes and
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

use pgferry_kernel::{Framing, KernelForwarder};
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

/// utime + stime (+ cutime + cstime when `children`) of a process, ticks.
fn pid_ticks(pid: &str, children: bool) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12) + if children { get(13) + get(14) } else { 0 }
}

/// CPU that this experiment can be charged with, whatever else runs on the
/// machine: this process (the relay), pgbench (our children), the
/// postmaster with its backends (live ones, and the reaped ones through its
/// cutime/cstime), and every kworker and ksoftirqd thread (the sockmap's
/// redirect work runs in kworkers; softirq time is charged to the task it
/// interrupts: no CONFIG_IRQ_TIME_ACCOUNTING here). Per-pid snapshot, so
/// that threads exiting in between (kworkers do) do not count negative.
fn attributable_snapshot(postmaster: u32) -> std::collections::HashMap<String, u64> {
    let mut snap = std::collections::HashMap::new();
    let pm = postmaster.to_string();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str() else { continue };
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let comm = stat
                .split_once('(')
                .and_then(|(_, r)| r.rsplit_once(')'))
                .map(|(c, _)| c)
                .unwrap_or("");
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, a)| a.split_whitespace().nth(1))
                .unwrap_or("");
            if comm.starts_with("kworker") || comm.starts_with("ksoftirqd") || ppid == pm {
                snap.insert(pid.to_owned(), pid_ticks(pid, false));
            }
        }
    }
    snap.insert("postmaster".into(), pid_ticks(&pm, true));
    snap.insert("self".into(), pid_ticks("self", true));
    snap
}

fn attributable_delta(
    a: &std::collections::HashMap<String, u64>,
    b: &std::collections::HashMap<String, u64>,
) -> u64 {
    b.iter()
        .map(|(pid, t)| t.saturating_sub(a.get(pid).copied().unwrap_or(0)))
        .sum()
}

struct Run {
    tps: f64,
    txns: u64,
    relay_us: f64,
    machine_us: f64,
    attributable_us: f64,
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
    let pm = pg.pid().unwrap_or(0);
    let a0 = attributable_snapshot(pm);
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
    // Let the backends exit and the postmaster reap them (their CPU moves
    // into its cutime), or a backend reaped mid-scan counts twice.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let a1 = attributable_snapshot(pm);
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
        attributable_us: per(attributable_delta(&a0, &a1)),
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
    let mut targets: Vec<(&str, u16)> =
        vec![("direct", pg.port()), ("userspace", user.addr.port())];
    let mut relays = Vec::new();
    for (name, framing) in [
        ("sockmap", Framing::Messages),
        ("sockmap-segments", Framing::Segments),
        ("sockmap-counted", Framing::SegmentsCounted),
    ] {
        match KernelForwarder::with_framing(4096, framing) {
            Ok(f) => {
                let r = Relay::start(pg.addr(), Mode::Kernel(Arc::new(f))).expect("kernel relay");
                targets.push((name, r.addr.port()));
                relays.push(r);
            }
            Err(e) => eprintln!("{name} target skipped: {e}"),
        }
    }
    if let Ok(only) = std::env::var("TARGETS") {
        targets.retain(|(n, _)| only.split_whitespace().any(|o| o == *n));
    }
    println!(
        "pgbench -S -c {clients} -j {threads} -T {duration}, scale {scale}, {rounds} rounds, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "| mode | target | round | TPS | relay CPU µs/txn | attributable CPU µs/txn | machine CPU µs/txn | softirq share |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    // (mode, target, tps, relay, attributable, machine, n)
    type Sum = (String, String, f64, f64, f64, f64, u32);
    let mut sums: Vec<Sum> = Vec::new();
    for mode in modes.split_whitespace() {
        for round in 0..rounds {
            let mut order = targets.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for (name, port) in order {
                let r = pgbench(&pg, port, mode, &duration, &clients, &threads);
                let relay_us = if name == "direct" { 0.0 } else { r.relay_us };
                println!(
                    "| {mode} | {name} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} % |",
                    round + 1,
                    r.tps,
                    relay_us,
                    r.attributable_us,
                    r.machine_us,
                    r.softirq_share * 100.0
                );
                let _ = r.txns;
                match sums.iter_mut().find(|s| s.0 == mode && s.1 == name) {
                    Some(s) => {
                        s.2 += r.tps;
                        s.3 += relay_us;
                        s.4 += r.attributable_us;
                        s.5 += r.machine_us;
                        s.6 += 1;
                    }
                    None => sums.push((
                        mode.into(),
                        name.into(),
                        r.tps,
                        relay_us,
                        r.attributable_us,
                        r.machine_us,
                        1,
                    )),
                }
            }
        }
    }
    println!("\nmeans:");
    println!(
        "| mode | target | TPS | × direct | relay CPU µs/txn | attributable CPU µs/txn | machine CPU µs/txn |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for s in &sums {
        let n = f64::from(s.6);
        let direct = sums
            .iter()
            .find(|d| d.0 == s.0 && d.1 == "direct")
            .map(|d| d.2 / f64::from(d.6))
            .unwrap_or(1.0);
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} |",
            s.0,
            s.1,
            s.2 / n,
            s.2 / n / direct,
            s.3 / n,
            s.4 / n,
            s.5 / n
        );
    }
}
