//! `pgferry sandbox` as a child process, for the tests that drive it.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The sandbox process; SIGINTed (which stops its clusters) if the test
/// fails half-way, so no postmaster outlives it.
pub struct Sandbox {
    child: Option<Child>,
    pub psql_url: String,
    pub admin: String,
    dir: tempfile::TempDir,
}

impl Sandbox {
    /// Starts it in a fresh state directory named after `prefix` and waits
    /// for its connection string and admin URL.
    pub fn start(prefix: &str) -> Self {
        Self::start_with(prefix, &[])
    }

    /// [`Sandbox::start`] with extra `pgferry sandbox` arguments (`--replica`).
    pub fn start_with(prefix: &str, extra_args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
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
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sandbox");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut url, mut admin) = (None, None);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("psql \"") {
                    url = Some(rest.trim_end_matches('"').to_owned());
                }
                if let Some(rest) = line.strip_prefix("admin:") {
                    admin = Some(rest.trim().trim_end_matches("/metrics").to_owned());
                }
                if let (Some(u), Some(a)) = (&url, &admin) {
                    let _ = tx.send((u.clone(), a.clone()));
                    url = None;
                }
            }
        });
        let mut sandbox = Sandbox {
            child: Some(child),
            psql_url: String::new(),
            admin: String::new(),
            dir,
        };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok((url, admin)) => {
                sandbox.psql_url = url;
                sandbox.admin = admin;
            }
            Err(_) => panic!("sandbox printed no connection string and admin URL"),
        }
        sandbox
    }

    /// Its state directory (clusters, config).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The sandbox's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGINT, and the exit status (None if it had to be killed).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = Pid::from_raw(child.id() as i32);
        let (done_tx, done_rx) = mpsc::channel();
        let _ = kill(pid, Signal::SIGINT);
        std::thread::spawn(move || {
            let _ = done_tx.send(child.wait());
        });
        match done_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = kill(pid, Signal::SIGKILL);
                None
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop();
    }
}
