//! `pgferry sandbox`: prints a working psql connection string, and Ctrl-C
//! (SIGINT) stops the proxy and every cluster it started.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::sandbox::Sandbox;
use nix::sys::signal::kill;
use nix::unistd::Pid;

fn postmaster_pid(dir: &Path, cluster: &str) -> i32 {
    let text =
        std::fs::read_to_string(dir.join(cluster).join("postmaster.pid")).expect("postmaster.pid");
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid")
}

fn psql_bin() -> PathBuf {
    Path::new("/usr/lib/postgresql")
        .read_dir()
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.path().join("bin/psql"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "psql".into())
}

/// Runs one statement with psql on `conn` and returns its output, trimmed.
fn psql(conn: &str, sql: &str) -> String {
    let out = Command::new(psql_bin())
        .arg(conn)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-Atc", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql:?} on {conn}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The port of backend `name` in the config the sandbox wrote.
fn backend_port(config: &str, name: &str) -> u16 {
    let mut lines = config.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{name}\"") {
            return lines
                .next()
                .and_then(|l| l.strip_prefix("address = \""))
                .and_then(|a| a.trim_end_matches('"').rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no address after backend {name} in\n{config}"));
        }
    }
    panic!("no backend {name} in\n{config}");
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

    let psql = psql_bin();
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

/// `pgferry sandbox --replica`: pg2 streams from pg1, and a switchover
/// through `pgferry ctl` makes pg2 the primary behind the same URL.
#[test]
fn sandbox_replica_switchover() {
    let mut sandbox = Sandbox::start_with("pgferry-sandbox-replica-test", &["--replica"]);
    let url = sandbox.psql_url.clone();
    let replica_dir = sandbox.dir().join("replica");
    let pids = ["pg1", "pg2", "audit"].map(|c| postmaster_pid(&replica_dir, c));
    let config = std::fs::read_to_string(sandbox.dir().join("pgferry.toml")).expect("config");
    let (port1, port2) = (backend_port(&config, "pg1"), backend_port(&config, "pg2"));
    // The sandbox's clusters' superuser, as pgferry's [backend_admin] uses it.
    let direct = |port: u16, db: &str| {
        format!(
            "host=127.0.0.1 port={port} user=postgres password=postgres dbname={db} sslmode=disable"
        )
    };
    assert_eq!(
        psql(&direct(port1, "postgres"), "select pg_is_in_recovery()"),
        "f"
    );
    assert_eq!(
        psql(&direct(port2, "postgres"), "select pg_is_in_recovery()"),
        "t"
    );

    // Writes through pgferry go to the primary.
    psql(
        &url,
        "create table switched(x int); insert into switched values (1)",
    );
    assert_eq!(psql(&url, "select inet_server_port()"), port1.to_string());

    let out = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["ctl", "--admin", &sandbox.admin, "switchover", "pg1", "pg2"])
        .output()
        .expect("pgferry ctl");
    assert!(
        out.status.success(),
        "ctl switchover: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        psql(&direct(port2, "postgres"), "select pg_is_in_recovery()"),
        "f"
    );

    // The same URL still works, and writes land on pg2.
    psql(&url, "insert into switched values (2)");
    assert_eq!(psql(&url, "select inet_server_port()"), port2.to_string());
    assert_eq!(
        psql(
            &direct(port2, "app"),
            "select string_agg(x::text, ',' order by x) from switched"
        ),
        "1,2"
    );

    // Ctrl-C stops all three clusters.
    let status = sandbox.stop().expect("sandbox did not exit on SIGINT");
    assert!(status.success(), "{status:?}");
    for pid in pids {
        assert!(
            kill(Pid::from_raw(pid), None).is_err(),
            "postmaster {pid} still running"
        );
    }
}
