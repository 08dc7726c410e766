//! `pgferry sandbox`: prints a working psql connection string, and Ctrl-C
//! (SIGINT) stops the proxy and every cluster it started.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

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
    let dir = tempfile::Builder::new()
        .prefix("pgferry-sandbox-test")
        .tempdir()
        .expect("tmp");
    // The clusters run as an unprivileged user when we are root.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["sandbox", "--dir"])
        .arg(dir.path())
        .args([
            "--port",
            &free_port().to_string(),
            "--admin-port",
            &free_port().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn sandbox");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.trim().strip_prefix("psql \"") {
                let _ = tx.send(rest.trim_end_matches('"').to_owned());
            }
        }
    });
    let url = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(u) => u,
        Err(_) => {
            let _ = child.kill();
            panic!("sandbox printed no connection string");
        }
    };
    assert!(url.contains("sslmode=require"), "{url}");
    let pids = [
        postmaster_pid(dir.path(), "pg1"),
        postmaster_pid(dir.path(), "pg2"),
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
    let config = std::fs::read_to_string(dir.path().join("pgferry.toml")).expect("config");
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

    let pid = Pid::from_raw(child.id() as i32);
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    kill(pid, Signal::SIGINT).expect("SIGINT");
    let status = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("sandbox did not exit on SIGINT")
        .expect("wait");
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
