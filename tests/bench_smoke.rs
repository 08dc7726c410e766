//! The pgbench macro benchmark (`benches/pgbench.sh`) in its smoke mode:
//! direct, pgferry (this build) and PgBouncer, 1 s each at two client
//! counts, every program pinned to CPU 0 (the CPU-set options of the
//! scaling runs), so that the script cannot rot. The Rust benchmarks run their own smoke modes as
//! bench targets under `cargo test` (`test = true` in Cargo.toml).

use std::process::Command;

#[test]
fn pgbench_macro_benchmark_smoke_run_reports_every_target() {
    use pgferry_pgcluster::prerequisites::{ensure_debian_packages, PGBOUNCER, POSTGRESQL};
    // Installed when missing (as root on Debian), else the exact command.
    if let Err(e) = ensure_debian_packages(&[POSTGRESQL, PGBOUNCER]) {
        panic!("{e}");
    }
    let bindir = pgferry_pgcluster::ServerBinaries::find_or_install()
        .unwrap_or_else(|e| panic!("{e}"))
        .bindir;
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/benches/pgbench.sh"))
        .env("SMOKE", "1")
        .env("DURATION", "1")
        .env("CLIENTS", "2 4")
        .env("PGBENCH_CPUS", "0")
        .env("PG_CPUS", "0")
        .env("PROXY_CPUS", "0")
        .env("PGFERRY_BIN", env!("CARGO_BIN_EXE_pgferry"))
        .env("PG_BINDIR", &bindir)
        .output()
        .expect("run benches/pgbench.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench.sh failed:\n{text}");
    assert!(
        text.contains("CPU sets: pgbench 0, PostgreSQL 0, proxies 0"),
        "{text}"
    );
    for clients in [2, 4] {
        for target in ["direct", "pgferry", "pgbouncer"] {
            for mode in ["simple", "extended"] {
                let row = text
                    .lines()
                    .find(|l| l.starts_with(&format!("| {clients} | {mode} | {target} |")))
                    .unwrap_or_else(|| panic!("no {clients}/{mode}/{target} row:\n{text}"));
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                let number = |i: usize| -> f64 {
                    cells
                        .get(i)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or_else(|| panic!("no number in column {i} of {row:?}"))
                };
                assert!(number(4) > 0.0, "TPS: {row}");
                assert!(number(cells.len() - 2) > 0.0, "machine CPU: {row}");
                if target != "direct" {
                    assert!(number(cells.len() - 3) > 0.0, "proxy CPU: {row}");
                }
            }
        }
    }
}
