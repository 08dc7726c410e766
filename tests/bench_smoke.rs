//! The pgbench macro benchmark (`benches/pgbench.sh`) in its smoke mode:
//! direct, pgferry (this build) and PgBouncer, 2 s each, so that the
//! script cannot rot. The Rust benchmarks run their own smoke modes as
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
    for target in ["direct", "pgferry", "pgbouncer"] {
        for mode in ["simple", "extended"] {
            let row = text
                .lines()
                .find(|l| l.starts_with(&format!("| {mode} | {target} |")))
                .unwrap_or_else(|| panic!("no {mode}/{target} row:\n{text}"));
            let tps: f64 = row
                .split('|')
                .nth(3)
                .and_then(|c| c.trim().parse().ok())
                .unwrap_or_else(|| panic!("no TPS in {row:?}"));
            assert!(tps > 0.0, "{row}");
        }
    }
}
