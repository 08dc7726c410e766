//! The driver-compatibility matrix: real client drivers (psycopg 3,
//! node-postgres, pgjdbc, tokio-postgres, psql/libpq) run the same cases
//! three ways — straight to PostgreSQL, through pgferry, and through pgferry
//! while a mover asks for a transfer of every session every 100 ms — and
//! what each case observes must be the same all three ways. The moves each
//! case saw are counted; a case that saw none proves nothing about
//! migration, so most cases must see some.
//!
//! Driver scripts live in tests/drivers/; each prints one JSON object per
//! case. Their packages are installed under target/drivers/ (see
//! `install_*`). Run alone: `cargo test --test drivers -- --nocapture`.
//!
//! The same drivers also hold TLS sessions through `pgferry run --takeover`
//! (`drivers_keep_tls_sessions_through_a_takeover`, with tests/drivers/
//! hold.py, node/hold.js and java/Hold.java).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::mover::{Mover, MoverStats};
use common::*;
use serde_json::{json, Value};

/// What a client can still tell after its session moved, as docs/migration.md
/// ("What a moved client can still tell") lists it: these cases may differ
/// in the moving mode only, and are printed with their reason; through
/// pgferry without moves they must be the same as direct.
const AFTER_A_MOVE: &[(&str, &str, &str)] = &[
    (
        "psycopg",
        "backend_pid",
        "after a move conn.info.backend_pid names the first backend; pg_backend_pid() the current one",
    ),
    (
        "node-pg",
        "process_id",
        "after a move client.processID names the first backend; pg_backend_pid() the current one",
    ),
    (
        "psycopg",
        "terminate",
        "pg_terminate_backend(conn.info.backend_pid) after a move names the first backend's \
         process, which is no longer the session's: nothing is terminated",
    ),
];

/// Pacing of the mover: a transfer request per session this often.
const MOVE_PERIOD: Duration = Duration::from_millis(100);
/// How long one case (one process) may take; a case that hangs is killed
/// and reported as hung. (They take a few seconds.)
const RUN_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Direct,
    Proxy,
    Moving,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Direct, Mode::Proxy, Mode::Moving];

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Proxy => "pgferry",
            Mode::Moving => "moving",
        }
    }

    /// application_name prefix of this mode's sessions; the mover moves
    /// the sessions of `m3.` only.
    fn prefix(self, driver: &str) -> String {
        let n = match self {
            Mode::Direct => 1,
            Mode::Proxy => 2,
            Mode::Moving => 3,
        };
        format!("m{n}.{driver}.")
    }
}

/// Where a run connects.
#[derive(Clone)]
struct Target {
    port: u16,
    prefix: String,
    /// Ports of the clusters themselves, for checks of server-side state.
    check_ports: String,
    admin_url: String,
}

impl Target {
    fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PGHOST", "127.0.0.1".into()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", USER.into()),
            ("PGPASSWORD", PASSWORD.into()),
            ("PGDATABASE", DB.into()),
            ("DRIVER_APP_PREFIX", self.prefix.clone()),
            ("CHECK_PORTS", self.check_ports.clone()),
            ("PGFERRY_ADMIN_URL", self.admin_url.clone()),
        ]
    }
}

/// One case's outcome in one mode: its result, or the error it died of.
type Outcomes = BTreeMap<String, Value>;

struct Driver {
    name: &'static str,
    run: fn(&Target) -> Result<Outcomes, String>,
}

const DRIVERS: &[Driver] = &[
    Driver {
        name: "psycopg",
        run: run_psycopg,
    },
    Driver {
        name: "node-pg",
        run: run_node,
    },
    Driver {
        name: "pgjdbc",
        run: run_pgjdbc,
    },
    Driver {
        name: "tokio-pg",
        run: run_tokio_postgres,
    },
    Driver {
        name: "psql",
        run: run_psql,
    },
];

// ---------------------------------------------------------------- installs

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scripts() -> PathBuf {
    repo().join("tests/drivers")
}

/// target/drivers: the drivers' packages, kept between runs.
fn cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("drivers")
}

fn run_install(what: &str, cmd: &mut Command, manual: &str) {
    eprintln!("driver matrix: installing {what}: {cmd:?}");
    let out = cmd.output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "could not install {what} ({}):\n{}{}\ninstall it by hand with:\n  {manual}",
            o.status,
            stdout(&o),
            stderr(&o)
        ),
        Err(e) => panic!("could not run {cmd:?}: {e}\ninstall {what} by hand with:\n  {manual}"),
    }
}

/// psycopg, pinned by tests/drivers/requirements.txt, in a venv at
/// target/drivers/python. Returns its python.
fn install_python() -> PathBuf {
    let venv = cache().join("python");
    let python = venv.join("bin/python");
    let req = scripts().join("requirements.txt");
    let stamp = venv.join("requirements.installed");
    let wanted = std::fs::read_to_string(&req).expect("requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) && python.exists() {
        return python;
    }
    let manual = format!(
        "python3 -m venv {v} && {v}/bin/python -m pip install -r {r}",
        v = venv.display(),
        r = req.display()
    );
    if !python.exists() {
        run_install(
            "a Python venv",
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            &manual,
        );
    }
    run_install(
        "psycopg",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&req),
        &manual,
    );
    std::fs::write(&stamp, wanted).expect("write stamp");
    python
}

/// node-postgres and pg-cursor, pinned by tests/drivers/node/package-lock.json,
/// in target/drivers/node. Returns its node_modules.
fn install_node() -> PathBuf {
    let dir = cache().join("node");
    let lock = std::fs::read_to_string(scripts().join("node/package-lock.json"))
        .expect("package-lock.json");
    let stamp = dir.join("package-lock.installed");
    let modules = dir.join("node_modules");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(lock.as_str()) && modules.exists() {
        return modules;
    }
    std::fs::create_dir_all(&dir).expect("mkdir target/drivers/node");
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(scripts().join("node").join(f), dir.join(f)).expect("copy package files");
    }
    let manual = format!(
        "cp tests/drivers/node/package*.json {d}/ && npm ci --prefix {d} --no-audit --no-fund",
        d = dir.display()
    );
    run_install(
        "node-postgres",
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir),
        &manual,
    );
    std::fs::write(&stamp, lock).expect("write stamp");
    modules
}

const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// pgjdbc from Debian's package; Cases.java and Hold.java compiled into
/// target/drivers/java. Returns the class path.
fn install_java() -> String {
    assert!(Path::new(JDBC_JAR).exists(), "{JDBC_JAR} is missing");
    let classes = cache().join("java");
    std::fs::create_dir_all(&classes).expect("mkdir target/drivers/java");
    let out = Command::new("javac")
        .args(["-encoding", "UTF-8", "-d"])
        .arg(&classes)
        .args(["-cp", JDBC_JAR])
        .arg(scripts().join("java/Cases.java"))
        .arg(scripts().join("java/Hold.java"))
        .output()
        .unwrap_or_else(|e| panic!("javac: {e}"));
    assert!(
        out.status.success(),
        "javac Cases.java Hold.java failed:\n{}",
        stderr(&out)
    );
    format!("{}:{JDBC_JAR}", classes.display())
}

struct Installed {
    python: PathBuf,
    node_modules: PathBuf,
    classpath: String,
}

fn installed() -> &'static Installed {
    static I: std::sync::OnceLock<Installed> = std::sync::OnceLock::new();
    I.get_or_init(|| {
        // Debian's packages first (installed when missing, as root on
        // Debian; else a panic with the command), then the drivers.
        use pgferry_pgcluster::prerequisites::{JDK, NODEJS, NPM, PGJDBC, PYTHON_VENV};
        require(&[PYTHON_VENV, NODEJS, NPM, JDK, PGJDBC]);
        Installed {
            python: install_python(),
            node_modules: install_node(),
            classpath: install_java(),
        }
    })
}

// ------------------------------------------------------------ the drivers

/// Runs `cmd` with the target's environment, killing it after RUN_LIMIT:
/// (exit status, stdout, stderr).
fn run_limited(
    mut cmd: Command,
    target: &Target,
    what: &str,
) -> Result<(std::process::ExitStatus, String, String), String> {
    cmd.env_remove("PGSSLMODE")
        .env_remove("PGAPPNAME")
        .envs(target.envs())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("{what}: spawn: {e}"))?;
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    // stdout ends when the process exits (or closes it).
    let text = match rx.recv_timeout(RUN_LIMIT) {
        Ok(s) => s,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what}: no end after {RUN_LIMIT:?}; killed"));
        }
    };
    let status = child.wait().map_err(|e| format!("{what}: wait: {e}"))?;
    Ok((status, text, errs.join().unwrap_or_default()))
}

/// Runs a driver script and parses the one JSON object per case that it
/// prints.
fn run_script(cmd: Command, target: &Target, what: &str) -> Result<Outcomes, String> {
    let (status, text, errs) = run_limited(cmd, target, what)?;
    let mut outcomes = Outcomes::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("{what}: bad line {line:?}: {e}"))?;
        let case = v["case"].as_str().unwrap_or("?").to_owned();
        let outcome = match v.get("result") {
            Some(r) => r.clone(),
            None => json!({ "error": v["error"], "trace": v["trace"] }),
        };
        outcomes.insert(case, outcome);
    }
    if !status.success() || outcomes.is_empty() {
        return Err(format!(
            "{what}: {status}; stdout:\n{text}\nstderr:\n{errs}"
        ));
    }
    Ok(outcomes)
}

/// Runs each case of a driver script in a process of its own, so that a
/// case that hangs (killed after RUN_LIMIT) costs only itself.
fn run_cases(script: impl Fn() -> Command, t: &Target, what: &str) -> Result<Outcomes, String> {
    let mut list = script();
    list.arg("--list");
    let (status, names, errs) = run_limited(list, t, what)?;
    if !status.success() || names.trim().is_empty() {
        return Err(format!("{what} --list: {status}\n{names}{errs}"));
    }
    let mut outcomes = Outcomes::new();
    for case in names.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut cmd = script();
        cmd.arg(case);
        match run_script(cmd, t, &format!("{what} {case}")) {
            Ok(o) => outcomes.extend(o),
            Err(e) => {
                outcomes.insert(case.to_owned(), json!({ "error": e }));
            }
        }
    }
    Ok(outcomes)
}

fn run_psycopg(t: &Target) -> Result<Outcomes, String> {
    let script = || {
        let mut cmd = Command::new(&installed().python);
        cmd.arg(scripts().join("psycopg_cases.py"));
        cmd
    };
    run_cases(script, t, "psycopg")
}

fn run_node(t: &Target) -> Result<Outcomes, String> {
    let script = || {
        let mut cmd = Command::new("node");
        cmd.arg("--no-deprecation")
            .arg(scripts().join("node/cases.js"))
            .env("NODE_PATH", &installed().node_modules);
        cmd
    };
    run_cases(script, t, "node-postgres")
}

fn run_pgjdbc(t: &Target) -> Result<Outcomes, String> {
    let script = || {
        let mut cmd = Command::new("java");
        cmd.args(["-Xshare:auto", "-XX:TieredStopAtLevel=1", "-cp"])
            .arg(&installed().classpath)
            .arg("Cases");
        cmd
    };
    run_cases(script, t, "pgjdbc")
}

fn run_psql(t: &Target) -> Result<Outcomes, String> {
    let app = format!("{}script", t.prefix);
    let mut cmd = Command::new(psql_bin());
    cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-v"])
        .arg(format!("run={app}"))
        .arg("-f")
        .arg(scripts().join("cases.psql"))
        .arg(format!("application_name={app}"));
    let (status, out, err) = run_limited(cmd, t, "psql")?;
    let mut outcomes = Outcomes::new();
    outcomes.insert(
        "script".into(),
        json!({
            "exit": status.code(),
            "stdout": out.lines().collect::<Vec<_>>(),
            "stderr": err.lines().collect::<Vec<_>>(),
        }),
    );
    Ok(outcomes)
}

/// Pacing, not synchronization: an idle gap that gives the mover a chance
/// to move the session.
async fn pace() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

fn run_tokio_postgres(t: &Target) -> Result<Outcomes, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut outcomes = Outcomes::new();
    for (name, result) in [
        ("pipelined", rt.block_on(tokio_pipelined(t))),
        ("prepared_reuse", rt.block_on(tokio_prepared_reuse(t))),
    ] {
        let v = result.unwrap_or_else(|e| json!({ "error": e.to_string() }));
        outcomes.insert(name.into(), v);
    }
    Ok(outcomes)
}

async fn tokio_client(
    t: &Target,
    case: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(t.port)
        .user(USER)
        .password(PASSWORD)
        .dbname(DB)
        .application_name(format!("{}{case}", t.prefix))
        .connect_timeout(Duration::from_secs(10));
    let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Several queries in flight at once on one connection, joined.
async fn tokio_pipelined(t: &Target) -> Result<Value, tokio_postgres::Error> {
    let client = tokio_client(t, "pipelined").await?;
    let mut rounds = Vec::new();
    for r in 0..6i32 {
        let futures: Vec<_> = (0..8i32)
            .map(|i| {
                let client = &client;
                async move {
                    client
                        .query("select $1::int4 * $2::int4, $3::text", &[&i, &r, &"ß"])
                        .await
                }
            })
            .collect();
        let mut got = Vec::new();
        for rows in futures_util::future::join_all(futures).await {
            let row = &rows?[0];
            got.push(json!([row.get::<_, i32>(0), row.get::<_, String>(1)]));
        }
        rounds.push(Value::Array(got));
        pace().await;
    }
    Ok(Value::Array(rounds))
}

/// One prepared statement, executed across many round trips.
async fn tokio_prepared_reuse(t: &Target) -> Result<Value, tokio_postgres::Error> {
    let client = tokio_client(t, "prepared_reuse").await?;
    let stmt = client
        .prepare("select $1::int8 + 100, repeat('x', $2::int4)")
        .await?;
    let mut out = Vec::new();
    for i in 0..10i64 {
        let row = client.query_one(&stmt, &[&i, &(i as i32)]).await?;
        out.push(json!([row.get::<_, i64>(0), row.get::<_, String>(1).len()]));
        pace().await;
    }
    let n: i64 = client
        .query_one(
            "select count(*) from pg_prepared_statements where statement like 'select $1::int8 + 100%'",
            &[],
        )
        .await?
        .get(0);
    Ok(json!({ "values": out, "server_prepared": n }))
}

// ------------------------------------------------------------- the matrix

fn setup_schema() {
    let e = env();
    for c in [&e.pg1, &e.pg2] {
        c.psql(
            DB,
            "CREATE TABLE IF NOT EXISTS drv_items(\
               run text NOT NULL DEFAULT current_setting('application_name'), \
               k int NOT NULL, v text, PRIMARY KEY (run, k)); \
             ALTER TABLE drv_items OWNER TO app",
        )
        .expect("create drv_items");
    }
}

/// Prepared transactions left behind (a tpc case whose COMMIT PREPARED ran
/// elsewhere), rolled back so they hold no locks. Returns their gids.
fn roll_back_prepared_transactions() -> Vec<String> {
    let e = env();
    let mut left = Vec::new();
    for c in [&e.pg1, &e.pg2] {
        let gids = c
            .psql(DB, "select gid from pg_prepared_xacts")
            .expect("list prepared transactions");
        for gid in gids.lines().filter(|l| !l.is_empty()) {
            c.psql(
                DB,
                &format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''")),
            )
            .expect("rollback prepared");
            left.push(format!("{gid} on {}", c.port()));
        }
    }
    left
}

fn known(driver: &str, case: &str) -> Option<&'static str> {
    AFTER_A_MOVE
        .iter()
        .find(|(d, c, _)| *d == driver && *c == case)
        .map(|(_, _, why)| *why)
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 700 {
        let mut end = 700;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

#[test]
fn driver_matrix() {
    let started = Instant::now();
    let e = env();
    installed();
    setup_schema();
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mover = Mover::start(proxy.admin, |app| app.starts_with("m3."), MOVE_PERIOD, 5000);
    let check_ports = format!("{},{}", e.pg1.port(), e.pg2.port());
    let admin_url = format!("http://{}", proxy.admin);

    // Drivers in parallel, each one's modes one after the other.
    let runs: Vec<_> = DRIVERS
        .iter()
        .map(|d| {
            let (proxy_port, pg1) = (proxy.port(), e.pg1.port());
            let (check_ports, admin_url) = (check_ports.clone(), admin_url.clone());
            std::thread::spawn(move || {
                Mode::ALL
                    .iter()
                    .map(|&mode| {
                        let target = Target {
                            port: if mode == Mode::Direct {
                                pg1
                            } else {
                                proxy_port
                            },
                            prefix: mode.prefix(d.name),
                            check_ports: check_ports.clone(),
                            admin_url: admin_url.clone(),
                        };
                        let t0 = Instant::now();
                        let r = (d.run)(&target);
                        (mode, r, t0.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<_> = runs
        .into_iter()
        .map(|h| h.join().expect("driver thread"))
        .collect();
    let moves: MoverStats = mover.stop();
    let left_prepared = roll_back_prepared_transactions();

    let mut failures = Vec::new();
    let mut known_seen = Vec::new();
    let (mut cases, mut unmoved) = (0, 0);
    let mut table = String::from(
        "\nDRIVER MATRIX (= same as direct, DIFF differs; moves: successful transfers in mode 3)\n",
    );
    table.push_str(&format!(
        "{:<10} {:<18} {:<7} {:<7} {:<7} {:>5}\n",
        "driver", "case", "direct", "pgferry", "moving", "moves"
    ));
    for (d, runs) in DRIVERS.iter().zip(&results) {
        let mut by_mode = BTreeMap::new();
        for (mode, r, took) in runs {
            eprintln!("driver matrix: {} {} took {took:.1?}", d.name, mode.name());
            match r {
                Ok(o) => {
                    by_mode.insert(*mode, o.clone());
                }
                Err(err) => failures.push(format!("{} {}: run failed: {err}", d.name, mode.name())),
            }
        }
        let Some(direct) = by_mode.get(&Mode::Direct) else {
            continue;
        };
        for (case, want) in direct {
            cases += 1;
            if want.get("error").is_some() {
                failures.push(format!(
                    "{} {case}: fails even straight to PostgreSQL: {}",
                    d.name,
                    short(want)
                ));
            }
            let mut cells = Vec::new();
            let mut differs = Vec::new();
            let mut differs_unmoved = false;
            for mode in [Mode::Proxy, Mode::Moving] {
                let got = by_mode.get(&mode).and_then(|o| o.get(case));
                let same = got == Some(want);
                cells.push(if same { "=" } else { "DIFF" });
                if !same {
                    differs_unmoved |= mode == Mode::Proxy;
                    differs.push(format!(
                        "    {}: {}",
                        mode.name(),
                        got.map(short).unwrap_or_else(|| "(no result)".into())
                    ));
                }
            }
            let n = moves.moves_of(&format!("{}{case}", Mode::Moving.prefix(d.name)));
            if n == 0 {
                unmoved += 1;
            }
            table.push_str(&format!(
                "{:<10} {:<18} {:<7} {:<7} {:<7} {:>5}{}\n",
                d.name,
                case,
                "=",
                cells[0],
                cells[1],
                n,
                match (differs.is_empty(), known(d.name, case)) {
                    (false, Some(_)) => "  (differs after a move, documented)",
                    (true, Some(_)) => "  (may differ after a move; the same in this run)",
                    _ => "",
                }
            ));
            if differs.is_empty() {
                continue;
            }
            let detail = format!(
                "{} {case}:\n    direct: {}\n{}",
                d.name,
                short(want),
                differs.join("\n")
            );
            match known(d.name, case) {
                Some(why) if !differs_unmoved => {
                    known_seen.push(format!("{detail}\n    documented: {why}"))
                }
                _ => failures.push(detail),
            }
        }
    }
    eprintln!("{table}");
    eprintln!(
        "mover: {} moves, {} refused or without a safe point, {} fatal; matrix took {:.1?}",
        moves.ok,
        moves.refused,
        moves.fatal,
        started.elapsed()
    );
    if !moves.fatal_by_app.is_empty() {
        let log = proxy.log();
        let lines: Vec<_> = log.lines().filter(|l| l.contains("fatal_error")).collect();
        eprintln!(
            "!!!!!!!! fatal migrations (session closed) by application_name: {:?}\n{}",
            moves.fatal_by_app,
            lines.join("\n")
        );
    }
    if !left_prepared.is_empty() {
        eprintln!("prepared transactions left behind (rolled back now): {left_prepared:?}");
    }
    if !known_seen.is_empty() {
        eprintln!(
            "\nDifferences after a move, as docs/migration.md documents them ({}):\n{}\n",
            known_seen.len(),
            known_seen.join("\n")
        );
    }
    assert!(
        unmoved * 2 <= cases,
        "{unmoved} of {cases} cases saw no move in mode 3: the matrix proves little\n{table}"
    );
    assert!(
        failures.is_empty(),
        "{} difference(s) in the driver matrix:\n{}\n{table}\npgferry log tail:\n{}",
        failures.len(),
        failures.join("\n"),
        tail(&proxy.log(), 40)
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------- TLS sessions through a takeover

/// How long a holder may take to print a line (a JVM's start and the TLS
/// handshake included) or to exit after its last one.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

/// A driver process holding one TLS session through a takeover
/// (tests/drivers/hold.py, node/hold.js, java/Hold.java): it prints a JSON
/// line, waits for a line on stdin, prints a second JSON line and exits 0.
struct Holder {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// stdout lines that are not JSON (none are expected).
    noise: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Holder {
    fn start(name: &'static str, mut cmd: Command, target: &Target) -> Self {
        cmd.env_remove("PGSSLMODE")
            .env_remove("PGAPPNAME")
            .envs(target.envs())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: spawn {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        Holder {
            name,
            child,
            stdin,
            lines,
            noise: Vec::new(),
            stderr,
        }
    }

    /// The next JSON line it prints, by `deadline`.
    fn next(&mut self, deadline: Instant) -> Result<Value, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with('{') => {
                    return serde_json::from_str(&line)
                        .map_err(|e| self.failure(&format!("bad line {line:?}: {e}")));
                }
                Ok(line) => self.noise.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(self.failure("no line by the deadline"));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(deadline);
                    return Err(self.failure(&format!("stdout closed; exit: {status:?}")));
                }
            }
        }
    }

    /// The line it waits for before its second round.
    fn go(&mut self) -> Result<(), String> {
        let mut stdin = self.stdin.take().expect("go once");
        writeln!(stdin, "go")
            .and_then(|()| stdin.flush())
            .map_err(|e| self.failure(&format!("write to stdin: {e}")))
    }

    /// Its exit status, by `deadline` (killed after it).
    fn wait_exit(&mut self, deadline: Instant) -> Result<ExitStatus, String> {
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    // Another process's exit: nothing to await but polling.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("no exit by the deadline; killed".into());
                }
                Err(e) => return Err(format!("wait: {e}")),
            }
        }
    }

    fn failure(&self, what: &str) -> String {
        let stderr = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        format!(
            "{}: {what}\n  other stdout: {:?}\n  stderr:\n{}",
            self.name, self.noise, *stderr
        )
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What is wrong with a holder's first line: its session must run over
/// TLS, with work_mem set and the prepared statement answering.
fn check_before(v: &Value) -> Vec<String> {
    let mut wrong = Vec::new();
    if v["work_mem"] != "5MB" {
        wrong.push(format!("work_mem {}", v["work_mem"]));
    }
    if v["stmt"] != json!([42, "5MB"]) {
        wrong.push(format!("statement answered {}", v["stmt"]));
    }
    if v["server_prepared"].as_i64().unwrap_or(0) < 1 {
        wrong.push(format!(
            "{} server-side prepared statements",
            v["server_prepared"]
        ));
    }
    if !v["pid"].is_i64() || !v["backend_start"].is_string() {
        wrong.push("no backend pid or backend_start".into());
    }
    // The driver's own view of its socket, where it has one.
    if let Some(tls) = v["tls"].as_str() {
        if !tls.starts_with("TLS") {
            wrong.push(format!("not over TLS: {tls}"));
        }
    }
    wrong
}

/// What is wrong with a holder's second line, after the takeover, given
/// its first.
fn check_after(before: &Value, after: &Value) -> Vec<String> {
    let mut wrong = Vec::new();
    for key in ["pid", "backend_start", "tls", "server_prepared"] {
        if before[key] != after[key] {
            wrong.push(format!(
                "{key} was {} and is {} after the takeover",
                before[key], after[key]
            ));
        }
    }
    for (key, want) in [
        ("work_mem", json!("5MB")),
        ("stmt", json!([43, "5MB"])),
        ("stmt_again", json!([44, "5MB"])),
        ("big_len", json!(200_000)),
        ("big_all_x", json!(true)),
    ] {
        if after[key] != want {
            wrong.push(format!("{key} is {}, not {want}", after[key]));
        }
    }
    wrong
}

/// psycopg, node-postgres and pgjdbc each hold a TLS session (a setting,
/// a server-side prepared statement) through `pgferry run --takeover`: the
/// new process continues the TLS connections (for TLS 1.3 with a KeyUpdate
/// to the client), and each driver goes on on the very same connection and
/// server process, its statement still prepared, a result of many TLS
/// records arriving whole.
#[test]
fn drivers_keep_tls_sessions_through_a_takeover() {
    let started = Instant::now();
    let e = env();
    let inst = installed();
    let mut proxy = ProxyProcess::start(ProxyOptions::default());
    let target = Target {
        port: proxy.port(),
        prefix: "hold.".into(),
        check_ports: format!("{},{}", e.pg1.port(), e.pg2.port()),
        admin_url: format!("http://{}", proxy.admin),
    };
    let mut python = Command::new(&inst.python);
    python.arg(scripts().join("hold.py"));
    let mut node = Command::new("node");
    node.arg("--no-deprecation")
        .arg(scripts().join("node/hold.js"))
        .env("NODE_PATH", &inst.node_modules);
    let mut java = Command::new("java");
    java.args(["-Xshare:auto", "-XX:TieredStopAtLevel=1", "-cp"])
        .arg(&inst.classpath)
        .arg("Hold");
    let mut holders = [
        Holder::start("psycopg", python, &target),
        Holder::start("node-pg", node, &target),
        Holder::start("pgjdbc", java, &target),
    ];

    // Each session is up, over TLS, with its setting and its statement.
    let deadline = Instant::now() + HOLD_LIMIT;
    let before: Vec<Value> = holders
        .iter_mut()
        .map(|h| {
            let v = h.next(deadline).unwrap_or_else(|err| {
                panic!(
                    "before the takeover: {err}\npgferry log tail:\n{}",
                    tail(&proxy.log(), 40)
                )
            });
            let wrong = check_before(&v);
            assert!(
                wrong.is_empty(),
                "{} before the takeover: {}\n{v}",
                h.name,
                wrong.join("; ")
            );
            v
        })
        .collect();
    eprintln!(
        "takeover: holders up after {:.1?}: {}",
        started.elapsed(),
        before
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n  ")
    );

    let old_log = proxy.log.clone();
    let t0 = Instant::now();
    let old = proxy.take_over(&[]);
    let code = exit_code(old, Duration::from_secs(30));
    let old_tail = || tail(&old_log.lock().unwrap_or_else(|p| p.into_inner()), 40);
    assert_eq!(
        code,
        Some(0),
        "the old pgferry's exit code\nold pgferry log tail:\n{}\nnew pgferry log tail:\n{}",
        old_tail(),
        tail(&proxy.log(), 40)
    );
    eprintln!(
        "takeover: the old pgferry exited 0 after {:.1?}",
        t0.elapsed()
    );
    let adopted = proxy.metric("pgferry_handoff_sessions_total{outcome=\"adopted\"}");

    // The event each holder waits for: the takeover is done.
    let mut failures = Vec::new();
    let ready: Vec<bool> = holders
        .iter_mut()
        .map(|h| h.go().map_err(|e| failures.push(e)).is_ok())
        .collect();
    let deadline = Instant::now() + HOLD_LIMIT;
    let mut table = String::from("\nTLS SESSIONS THROUGH A TAKEOVER\n");
    for ((h, before), ready) in holders.iter_mut().zip(&before).zip(ready) {
        if !ready {
            table.push_str(&format!("{:<8} FAILED (stdin)\n", h.name));
            continue;
        }
        let outcome = h.next(deadline).and_then(|after| {
            let mut wrong = check_after(before, &after);
            match h.wait_exit(deadline) {
                Ok(status) if status.success() => {}
                Ok(status) => wrong.push(format!("exited {status}")),
                Err(e) => wrong.push(e),
            }
            if wrong.is_empty() {
                Ok(after)
            } else {
                Err(h.failure(&format!(
                    "{}\n  before: {before}\n  after:  {after}",
                    wrong.join("; ")
                )))
            }
        });
        let verdict = match &outcome {
            Ok(_) => "kept its session",
            Err(_) => "FAILED",
        };
        table.push_str(&format!(
            "{:<8} {:<16} pid {:<8} {}\n",
            h.name,
            verdict,
            before["pid"],
            before["tls"].as_str().unwrap_or("(TLS version not known)")
        ));
        if let Err(e) = outcome {
            failures.push(e);
        }
    }
    eprintln!(
        "{table}adopted sessions: {adopted}; test took {:.1?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} driver(s) lost their session through the takeover:\n{}\n{table}\
         old pgferry log tail:\n{}\nnew pgferry log tail:\n{}",
        failures.len(),
        failures.join("\n"),
        old_tail(),
        tail(&proxy.log(), 60)
    );
    assert!(
        adopted >= 3.0,
        "pgferry_handoff_sessions_total{{outcome=\"adopted\"}} is {adopted}, not >= 3\n\
         new pgferry log tail:\n{}",
        tail(&proxy.log(), 60)
    );
}
