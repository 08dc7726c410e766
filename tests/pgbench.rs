//! pgbench through pgferry in every query mode: zero failed transactions.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn pgbench_select_only_in_all_query_modes_has_no_failures() {
    // One backend so that `pgbench -i` and the runs see the same tables.
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![("pg1".into(), env().pg1.addr().to_string())],
        ..Default::default()
    });
    pgbench(proxy.port(), &["-i", "-s", "2", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(
            proxy.port(),
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
    // pgbench has exited; the proxy ends the last sessions right after.
    wait_until(Duration::from_secs(10), "every session to close", || {
        proxy.metric("pgferry_client_connections") == 0.0
    });
}
