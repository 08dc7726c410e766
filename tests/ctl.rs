//! `pgferry ctl` against a real pgferry (the sandbox): every command's JSON
//! says what happened, tables have their headers, a live session survives
//! a transfer and a drain, and an unreachable server fails with its URL.
//! `pgferry ctl handoff` against pgferry started from a config file: a
//! live session goes on in the new process, an aborted hand-off and a
//! refused one fail with the server's reason.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::sandbox::{free_port, Sandbox};

struct Ctl {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    fn ok_json(&self, what: &str) -> Value {
        assert_eq!(
            self.code,
            Some(0),
            "{what}: stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self.json()
    }
}

fn ctl(admin: &str, args: &[&str]) -> Ctl {
    let out = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["ctl", "--admin", admin])
        .args(args)
        .env_remove("PGFERRY_ADMIN_URL")
        .env_remove("PGFERRY_ADMIN_TOKEN")
        .env_remove("RUST_LOG")
        .output()
        .expect("run pgferry ctl");
    Ctl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn psql_bin() -> std::path::PathBuf {
    common::server_binaries().path("psql")
}

/// A psql session through the proxy, kept open until its stdin closes.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Session {
    fn open(url: &str) -> Self {
        let mut child = Command::new(psql_bin())
            .arg(url)
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
            .env_remove("PGPASSWORD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        let stdin = child.stdin.take();
        Session { child, stdin }
    }

    /// Runs `sql` (its output comes with `finish`'s).
    fn send(&mut self, sql: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            stdin.write_all(sql.as_bytes()).expect("write to psql");
            stdin.write_all(b"\n").expect("write to psql");
            stdin.flush().expect("flush psql");
        }
    }

    /// Runs the last statements and waits for psql to exit.
    fn finish(mut self, sql: &str) -> (bool, String, String) {
        if let Some(mut stdin) = self.stdin.take() {
            stdin.write_all(sql.as_bytes()).expect("write to psql");
            stdin.write_all(b"\n\\q\n").expect("write to psql");
        }
        let out = self.child.wait_with_output().expect("psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or_else(|| panic!("no {key:?} in {v}"))
}

fn backend_of(admin: &str, id: &str) -> String {
    let list = ctl(admin, &["--json", "connections"]).ok_json("connections");
    let conn = list
        .as_array()
        .expect("connections array")
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("session {id} not listed: {list}"));
    field(conn, "backend").as_str().expect("backend").to_owned()
}

fn transfer(admin: &str, id: &str, to: &str) {
    let t = ctl(
        admin,
        &["--json", "transfer", id, "--to", to, "--timeout", "15s"],
    );
    let v = t.ok_json("transfer");
    assert_eq!(v["outcome"], "success", "{v}");
    assert_eq!(v["to"], to, "{v}");
    assert_eq!(backend_of(admin, id), to);
}

#[test]
fn ctl_lists_moves_drains_and_activates_against_a_real_pgferry() {
    let mut sandbox = Sandbox::start("pgferry-ctl-test");
    let admin = sandbox.admin.clone();
    let session = Session::open(&sandbox.psql_url);

    // The session shows up once psql has logged in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let conn = loop {
        let list = ctl(&admin, &["--json", "connections"]).ok_json("connections");
        if let Some(c) = list.as_array().and_then(|a| a.first()) {
            break c.clone();
        }
        assert!(Instant::now() < deadline, "the psql session never appeared");
        std::thread::sleep(Duration::from_millis(100));
    };
    let id = field(&conn, "id").as_str().expect("id").to_owned();
    assert_eq!(conn["user"], "app", "{conn}");
    assert_eq!(conn["database"], "app", "{conn}");

    // Tables: headers, and the session's row.
    let table = ctl(&admin, &["connections"]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    let header = table.stdout.lines().next().unwrap_or_default();
    for col in [
        "ID",
        "USER",
        "DATABASE",
        "APPLICATION",
        "BACKEND",
        "STATE",
        "MIGRATIONS",
        "CONNECTED",
    ] {
        assert!(header.contains(col), "no {col} in {header:?}");
    }
    assert!(table.stdout.contains(&id), "{}", table.stdout);

    // Transfer to the other backend, and end up on pg1 for the drain.
    let first = backend_of(&admin, &id);
    let other = if first == "pg1" { "pg2" } else { "pg1" };
    transfer(&admin, &id, other);
    if other != "pg1" {
        transfer(&admin, &id, "pg1");
    }
    let table = ctl(&admin, &["transfer", &id, "--to", "pg2"]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert!(
        table
            .stdout
            .starts_with(&format!("moved {id} from pg1 to pg2")),
        "{}",
        table.stdout
    );
    transfer(&admin, &id, "pg1");

    // A session that does not exist: the server's 404, body on stdout.
    let missing = ctl(
        &admin,
        &["--json", "transfer", "00000000-0000-4000-8000-000000000000"],
    );
    assert_eq!(missing.code, Some(1), "{}", missing.stderr);
    assert!(missing.json().get("error").is_some(), "{}", missing.stdout);
    assert!(missing.stderr.contains("HTTP 404"), "{}", missing.stderr);

    // Backends: both, in config order, the session counted on pg1.
    let backends = ctl(&admin, &["--json", "backends"]).ok_json("backends");
    let list = backends.as_array().expect("backends array");
    assert_eq!(list.len(), 2, "{backends}");
    assert_eq!(list[0]["name"], "pg1", "{backends}");
    assert_eq!(list[1]["name"], "pg2", "{backends}");
    assert_eq!(list[0]["sessions"], 1, "{backends}");
    for b in list {
        assert_eq!(b["state"], "active", "{backends}");
    }
    let pg2_port = field(&list[1], "address")
        .as_str()
        .and_then(|a| a.rsplit_once(':'))
        .map(|(_, p)| p.to_owned())
        .expect("pg2 address");
    let table = ctl(&admin, &["backends"]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    let header = table.stdout.lines().next().unwrap_or_default();
    for col in ["NAME", "ADDRESS", "STATE", "HEALTHY", "SESSIONS"] {
        assert!(header.contains(col), "no {col} in {header:?}");
    }
    assert_eq!(table.stdout.lines().count(), 3, "{}", table.stdout);

    // Drain pg1: the session moves to pg2, nothing is left.
    let drain = ctl(&admin, &["--json", "drain", "pg1", "--timeout", "30s"]);
    let d = drain.ok_json("drain");
    assert_eq!(d["backend"], "pg1", "{d}");
    assert_eq!(d["moved"], 1, "{d}");
    assert_eq!(d["failed"], 0, "{d}");
    assert_eq!(d["remaining"], 0, "{d}");
    assert_eq!(backend_of(&admin, &id), "pg2");
    let backends = ctl(&admin, &["--json", "backends"]).ok_json("backends");
    assert_eq!(backends[0]["state"], "drained", "{backends}");
    assert_eq!(backends[0]["sessions"], 0, "{backends}");

    // Activate: pg1 takes sessions again.
    let a = ctl(&admin, &["--json", "activate", "pg1"]).ok_json("activate");
    assert_eq!(a["name"], "pg1", "{a}");
    assert_eq!(a["state"], "active", "{a}");

    // Rebalance: one session on two backends is within the band.
    let r = ctl(&admin, &["--json", "rebalance"]).ok_json("rebalance");
    assert!(r["moves"].is_array(), "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["backends"].as_array().map(Vec::len), Some(2), "{r}");
    let table = ctl(&admin, &["rebalance"]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert!(table.stdout.starts_with("rebalance: "), "{}", table.stdout);

    // Errors from the backend routes: exit 1 with the server's reason.
    let nope = ctl(&admin, &["drain", "nope"]);
    assert_eq!(nope.code, Some(1), "{}", nope.stdout);
    assert!(nope.stderr.contains("HTTP 404"), "{}", nope.stderr);
    assert!(nope.stdout.is_empty(), "{}", nope.stdout);

    // The session lived through it all and is on pg2.
    let (ok, out, err) = session.finish("select inet_server_port();");
    assert!(ok, "psql: {err}");
    assert_eq!(out.trim(), pg2_port, "stderr: {err}");

    // Nobody listening: exit 1, naming the URL.
    let gone = format!("http://127.0.0.1:{}", free_port());
    let unreachable = ctl(&gone, &["--json", "backends"]);
    assert_eq!(unreachable.code, Some(1));
    assert!(unreachable.stdout.is_empty(), "{}", unreachable.stdout);
    assert!(
        unreachable.stderr.contains(&gone) && unreachable.stderr.contains("cannot reach"),
        "{}",
        unreachable.stderr
    );

    let status = sandbox.stop().expect("sandbox did not exit on SIGINT");
    assert!(status.success(), "{status:?}");
}

/// Kills a process the test did not start itself (the new pgferry is the
/// old one's child) when the test ends, however it ends.
/// A psql session through `proxy` that has logged in and run
/// `select pg_backend_pid()`.
fn logged_in_session(proxy: &common::ProxyProcess, app: &str) -> Session {
    let url = proxy.url(
        common::USER,
        common::PASSWORD,
        &format!("sslmode=disable&application_name={app}"),
    );
    let mut session = Session::open(&url);
    session.send("select pg_backend_pid();");
    common::wait_until(Duration::from_secs(30), "the psql session", || {
        let (status, body) = proxy.http_get("/v1/connections");
        status == 200 && body.contains(app)
    });
    session
}

fn handoff_status(admin: &str) -> Value {
    ctl(admin, &["--json", "handoff", "--status"]).ok_json("handoff --status")
}

#[test]
fn ctl_handoff_restarts_pgferry_under_a_live_session() {
    let mut proxy = common::ProxyProcess::start(common::ProxyOptions::default());
    let admin = format!("http://{}", proxy.admin);
    let old_pid = i64::from(proxy.pid());
    let session = logged_in_session(&proxy, "ctl-handoff");

    let before = handoff_status(&admin);
    assert_eq!(before["phase"], "idle", "{before}");
    assert_eq!(before["pid"], old_pid, "{before}");

    let run = ctl(&admin, &["--json", "handoff", "--timeout", "60s"]);
    let outcome = run.ok_json("handoff");
    // The old process answers before it exits (it waits for its admin
    // API's last answers).
    assert_eq!(outcome["role"], "old", "{outcome}");
    assert_eq!(outcome["phase"], "done", "{outcome}");
    assert_eq!(outcome["pid"], old_pid, "{outcome}");
    assert_eq!(outcome["kept"], 0, "{outcome}");
    let new_pid = outcome["peer_pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no new pid in {outcome}"));
    let _new = common::KillOnDrop(i32::try_from(new_pid).expect("pid"));
    assert_ne!(new_pid, old_pid);

    // The old process had nothing left: it exits 0.
    assert_eq!(proxy.wait_exit(Duration::from_secs(30)), Some(0));

    // The same admin address is the new process's now.
    let after = handoff_status(&admin);
    assert_eq!(after["pid"], new_pid, "{after}");
    assert_eq!(after["role"], "new", "{after}");
    assert_eq!(after["peer_pid"], old_pid, "{after}");
    assert_eq!(after["handed_over"], 1, "{after}");
    let table = ctl(&admin, &["handoff", "--status"]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert!(
        table.stdout.contains(&format!(
            "pid {new_pid} serves, it took over from pid {old_pid}"
        )) || table
            .stdout
            .contains(&format!("pid {new_pid} is taking over from pid {old_pid}")),
        "{}",
        table.stdout
    );

    // The session went on, on the same server process.
    let (ok, out, err) = session.finish("select pg_backend_pid();");
    assert!(ok, "psql: {err}");
    let pids: Vec<&str> = out.lines().collect();
    assert_eq!(pids.len(), 2, "{out}");
    assert_eq!(pids[0], pids[1], "the session changed server process");
}

#[test]
fn ctl_handoff_fails_with_the_reason_when_it_aborts_or_is_refused() {
    // The new process dies as the first session reaches it: the old one
    // gets the session back and serves on.
    let mut proxy = common::ProxyProcess::start(common::ProxyOptions::default());
    proxy.restart_with_env(&[("PGFERRY_TEST_HANDOFF_DIE_AT_SESSION", "1")]);
    let admin = format!("http://{}", proxy.admin);
    let old_pid = i64::from(proxy.pid());
    let session = logged_in_session(&proxy, "ctl-handoff-abort");

    let run = ctl(&admin, &["handoff", "--timeout", "60s"]);
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains("hand-off refused (HTTP 409)"),
        "{}",
        run.stderr
    );
    let status = handoff_status(&admin);
    assert_eq!(status["pid"], old_pid, "{status}");
    assert_eq!(status["phase"], "aborted", "{status}");
    let (ok, out, err) = session.finish("select pg_backend_pid();");
    assert!(ok, "psql: {err}");
    let pids: Vec<&str> = out.lines().collect();
    assert_eq!(pids.len(), 2, "{out}");
    assert_eq!(pids[0], pids[1], "the session changed server process");

    // Hand-offs off: refused before any process is started.
    let off = common::ProxyProcess::start(common::ProxyOptions {
        proxy_extra: "handoff_socket = \"\"".into(),
        ..common::ProxyOptions::default()
    });
    let run = ctl(&format!("http://{}", off.admin), &["--json", "handoff"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("handoff_socket")));
    assert!(run.stderr.contains("HTTP 409"), "{}", run.stderr);
}
