//! `pgferry sandbox`: prints a working psql connection string, and Ctrl-C
//! (SIGINT) stops the proxy and every cluster it started.

mod common;

use std::process::Command;
use std::time::Duration;

use common::sandbox::Sandbox;
use nix::sys::signal::kill;
use nix::unistd::Pid;

fn postmaster_pid(dir: &std::path::Path, cluster: &str) -> i32 {
    let text =
        std::fs::read_to_string(dir.join(cluster).join("postmaster.pid")).expect("postmaster.pid");
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid")
}

#[test]
fn sandbox_prints_a_working_connection_string_and_cleans_up_on_ctrl_c() {
    let mut sandbox = Sandbox::start("pgferry-sandbox-test");
    let url = sandbox.psql_url.clone();
    assert!(url.contains("sslmode=require"), "{url}");
    let pids = [
        postmaster_pid(sandbox.dir(), "pg1"),
        postmaster_pid(sandbox.dir(), "pg2"),
    ];

    let psql = std::path::Path::new("/usr/lib/postgresql")
        .read_dir()
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.path().join("bin/psql"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "psql".into());
    let out = Command::new(&psql)
        .arg(&url)
        .args([
            "-X",
            "-Atc",
            "select current_user || '@' || current_database()",
        ])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app@app");

    // The sandbox audits to a database on its first cluster.
    let config = std::fs::read_to_string(sandbox.dir().join("pgferry.toml")).expect("config");
    let audit_url = config
        .lines()
        .find_map(|l| l.strip_prefix("url = \""))
        .map(|u| u.trim_end_matches('"').to_owned())
        .expect("[audit] url in the sandbox config");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new(&psql)
            .arg(&audit_url)
            .args(["-X", "-Atc", "select count(*) from pgferry_connection_log where user_name = 'app' and disconnect_time is not null"])
            .output()
            .expect("psql audit");
        if String::from_utf8_lossy(&out.stdout).trim() == "1" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit row: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Ctrl-C.
    let status = sandbox.stop().expect("sandbox did not exit on SIGINT");
    assert!(status.success(), "{status:?}");
    for pid in pids {
        // The postmaster is a child of the sandbox and has been reaped, so
        // no process with its pid is left (pids are not reused this fast).
        assert!(
            kill(Pid::from_raw(pid), None).is_err(),
            "postmaster {pid} still running"
        );
    }
}
