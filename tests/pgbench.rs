//! pgbench through pgferry in every query mode: zero failed transactions.

mod common;

use std::process::Command;

use common::*;

fn pgbench(proxy: &ProxyProcess, args: &[&str]) -> String {
    let bin = env().pg1.bins().path("pgbench");
    let out = Command::new(bin)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.port().to_string(),
            "-U",
            USER,
        ])
        .args(args)
        .arg(DB)
        .env("PGPASSWORD", PASSWORD)
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

fn number_after(text: &str, label: &str) -> f64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in pgbench output:\n{text}"))
}

#[test]
fn pgbench_select_only_in_all_query_modes_has_no_failures() {
    // One backend so that `pgbench -i` and the runs see the same tables.
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![("pg1".into(), env().pg1.addr().to_string())],
        ..Default::default()
    });
    pgbench(&proxy, &["-i", "-s", "2", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(
            &proxy,
            &["-S", "-c", "16", "-j", "2", "-T", "20", "-n", "-M", mode],
        );
        let processed = number_after(&out, "number of transactions actually processed:");
        let failed = number_after(&out, "number of failed transactions:");
        let tps = number_after(&out, "tps =");
        assert_eq!(failed, 0.0, "-M {mode}:\n{out}");
        assert!(
            processed > 1000.0 && tps > 0.0,
            "-M {mode} did almost nothing:\n{out}"
        );
        eprintln!("pgbench -S -M {mode}: {tps:.0} tps through pgferry");
    }
    assert_eq!(proxy.metric("pgferry_client_connections"), 0.0);
}
