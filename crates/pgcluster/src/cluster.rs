use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::binaries::ServerBinaries;
use crate::error::ClusterError;
use crate::runas::RunAs;
use crate::spawner::spawn_with_pdeathsig;
use crate::sql::{conf_value, conninfo_value, dollar_tag, quote_ident, quote_literal};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);
const PORT_ATTEMPTS: usize = 5;
const LOG_TAIL_LINES: usize = 30;
const TEMP_BASE_NAME: &str = "pgferry-clusters";
const CONF_FILE: &str = "pgferry.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'pgferry.conf'";

/// How a cluster is created and configured.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Used in directory and log file names and in messages, e.g. `"pg1"`.
    /// Letters, digits, `_`, `-` and `.` only.
    pub name: String,
    /// Bootstrap superuser (default `"postgres"`).
    pub superuser: String,
    /// Its password (default `"postgres"`), stored as SCRAM-SHA-256. Only set
    /// by initdb: changing it for a reused directory has no effect.
    pub superuser_password: String,
    /// `None`: pick a free port (and retry on a bind race).
    pub port: Option<u16>,
    /// Extra `postgresql.conf` settings, written after the defaults. A value
    /// already wrapped in single quotes is written verbatim, anything else is
    /// quoted, so both `("log_statement", "all")` and `("log_statement", "'all'")` work.
    pub settings: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            name: "pg".to_owned(),
            superuser: "postgres".to_owned(),
            superuser_password: "postgres".to_owned(),
            port: None,
            settings: Vec::new(),
        }
    }
}

impl ClusterOptions {
    /// Defaults with the given name.
    pub fn named(name: impl Into<String>) -> Self {
        ClusterOptions {
            name: name.into(),
            ..Default::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ClusterError> {
        let name_ok = !self.name.is_empty()
            && self.name != "."
            && self.name != ".."
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok {
            return Err(ClusterError::InvalidOption(format!(
                "name {:?} must be non-empty and use only letters, digits, '_', '-' and '.'",
                self.name
            )));
        }
        if self.superuser.is_empty() || self.superuser.contains('\0') {
            return Err(ClusterError::InvalidOption(format!(
                "superuser {:?} must be non-empty and contain no NUL",
                self.superuser
            )));
        }
        if self.superuser_password.is_empty()
            || self.superuser_password.contains(['\0', '\n', '\r'])
        {
            return Err(ClusterError::InvalidOption(
                "superuser_password must be non-empty and one line without NUL".to_owned(),
            ));
        }
        if self.port == Some(0) {
            return Err(ClusterError::InvalidOption(
                "port 0: use None to pick a free port".to_owned(),
            ));
        }
        for (key, value) in &self.settings {
            let key_ok = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'));
            if !key_ok || value.contains(['\0', '\n', '\r']) {
                return Err(ClusterError::InvalidOption(format!(
                    "setting {key:?} = {value:?} is not a valid postgresql.conf line"
                )));
            }
        }
        Ok(())
    }
}

/// How to stop the postmaster (the signal sent to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM: wait for clients to disconnect.
    Smart,
    /// SIGINT: disconnect clients, checkpoint.
    Fast,
    /// SIGQUIT: quit at once, crash recovery on the next start.
    Immediate,
}

impl StopMode {
    fn signal(self) -> Signal {
        match self {
            StopMode::Smart => Signal::SIGTERM,
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        }
    }
}

/// A local PostgreSQL cluster whose postmaster this process started.
///
/// `Cluster` is `Send + Sync` and needs no async runtime, so it can live in a
/// `static OnceLock<Cluster>`. The postmaster dies with this process (see the
/// crate docs). Dropping the `Cluster` stops it — immediate mode and directory
/// removal for a [`Cluster::start_temp`] cluster, fast mode (data kept) for a
/// [`Cluster::start`] one.
#[derive(Debug)]
pub struct Cluster {
    bins: ServerBinaries,
    // pub(crate): the standby code in `replica` changes them.
    pub(crate) opts: ClusterOptions,
    pub(crate) port: u16,
    /// Absolute directory containing the data dir and the log.
    pub(crate) parent: PathBuf,
    pub(crate) data_dir: PathBuf,
    log_path: PathBuf,
    /// Directory removed on drop (start_temp only).
    temp_root: Option<PathBuf>,
    pub(crate) run_as: Option<RunAs>,
    child: Mutex<Option<Child>>,
    /// Serializes ensure_user_and_database within this process.
    admin_lock: Mutex<()>,
}

impl Cluster {
    /// Initializes `<parent_dir>/<name>` unless it already holds a cluster
    /// (`PG_VERSION` present: reused, e.g. across sandbox restarts), then starts it
    /// and waits until it accepts connections. `parent_dir` must exist.
    pub fn start(
        bins: &ServerBinaries,
        parent_dir: &Path,
        opts: ClusterOptions,
    ) -> Result<Cluster, ClusterError> {
        opts.validate()?;
        let parent = usable_parent(parent_dir)?;
        Self::start_in(bins, parent, None, opts)
    }

    /// Starts a cluster in a fresh directory
    /// `<temp_dir>/pgferry-clusters/<pid>-<name>-<random>`, removed on drop.
    /// First removes stale sibling directories left by processes that are gone.
    pub fn start_temp(
        bins: &ServerBinaries,
        opts: ClusterOptions,
    ) -> Result<Cluster, ClusterError> {
        opts.validate()?;
        let root = new_temp_root(&opts.name)?;
        Self::start_in(bins, root.clone(), Some(root), opts)
    }

    fn start_in(
        bins: &ServerBinaries,
        parent: PathBuf,
        temp_root: Option<PathBuf>,
        opts: ClusterOptions,
    ) -> Result<Cluster, ClusterError> {
        let mut cluster = Self::unstarted(bins, parent, temp_root, opts)?;
        cluster.init_if_needed()?;
        cluster.launch(cluster.opts.port)?;
        Ok(cluster)
    }

    /// The `Cluster` for `<parent>/<name>`, not started and its data dir not
    /// touched. Dropping it removes `temp_root`.
    pub(crate) fn unstarted(
        bins: &ServerBinaries,
        parent: PathBuf,
        temp_root: Option<PathBuf>,
        opts: ClusterOptions,
    ) -> Result<Cluster, ClusterError> {
        let run_as = RunAs::current()?;
        let data_dir = parent.join(&opts.name);
        let log_path = parent.join(format!("{}.log", opts.name));
        // From here on, Drop cleans up (temp dir, half-started server).
        let cluster = Cluster {
            bins: bins.clone(),
            port: opts.port.unwrap_or(0),
            opts,
            parent,
            data_dir,
            log_path,
            temp_root,
            run_as,
            child: Mutex::new(None),
            admin_lock: Mutex::new(()),
        };
        if let Some(ra) = &cluster.run_as {
            ra.check_traversable(&cluster.parent)?;
        }
        Ok(cluster)
    }

    pub fn name(&self) -> &str {
        &self.opts.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (`<parent>/<name>.log`, appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }

    pub fn bins(&self) -> &ServerBinaries {
        &self.bins
    }

    pub fn superuser(&self) -> &str {
        &self.opts.superuser
    }

    pub fn superuser_password(&self) -> &str {
        &self.opts.superuser_password
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// Whether this cluster lives in a temp dir that is removed on drop.
    pub fn is_temp(&self) -> bool {
        self.temp_root.is_some()
    }

    /// A libpq connection string for `user`/`database` on this cluster (no password).
    pub fn conninfo(&self, user: &str, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname={} sslmode=disable",
            self.port,
            conninfo_value(user),
            conninfo_value(database)
        )
    }

    /// Runs `sql` (one or more statements) with psql as the superuser over TCP
    /// (`-X -q -A -t -v ON_ERROR_STOP=1`, script on stdin) and returns its
    /// stdout, trimmed. Errors carry psql's stderr.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, ClusterError> {
        let out = self.run_psql(database, sql, Duration::from_secs(10))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(ClusterError::Psql {
                name: self.opts.name.clone(),
                database: database.to_owned(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// Creates login role `user` with `password` (or resets the password if the
    /// role exists) and database `database` owned by it (if missing). Safe to
    /// call concurrently, from several threads or processes.
    pub fn ensure_user_and_database(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<(), ClusterError> {
        for (what, v) in [
            ("user", user),
            ("password", password),
            ("database", database),
        ] {
            if v.is_empty() || v.contains('\0') {
                return Err(ClusterError::InvalidOption(format!(
                    "{what} must be non-empty and contain no NUL"
                )));
            }
        }
        let _guard = self
            .admin_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let role = quote_ident(user);
        let role_lit = quote_literal(user);
        let pw = quote_literal(password);
        let body = format!(
            "BEGIN\n\
             IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {role_lit}) THEN\n\
               ALTER ROLE {role} LOGIN PASSWORD {pw};\n\
             ELSE\n\
               BEGIN\n\
                 CREATE ROLE {role} LOGIN PASSWORD {pw};\n\
               EXCEPTION WHEN duplicate_object OR unique_violation THEN\n\
                 ALTER ROLE {role} LOGIN PASSWORD {pw};\n\
               END;\n\
             END IF;\n\
             END"
        );
        let tag = dollar_tag(&body);
        self.psql("postgres", &format!("DO {tag}{body}{tag};"))?;

        let exists_sql = format!(
            "SELECT count(*) FROM pg_catalog.pg_database WHERE datname = {}",
            quote_literal(database)
        );
        if self.psql("postgres", &exists_sql)? == "1" {
            return Ok(());
        }
        let create = format!("CREATE DATABASE {} OWNER {role}", quote_ident(database));
        match self.psql("postgres", &create) {
            Ok(_) => Ok(()),
            // Another process may have created it in between.
            Err(e) if self.psql("postgres", &exists_sql).ok().as_deref() == Some("1") => {
                tracing::debug!(error = %e, "CREATE DATABASE raced with another creator");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The SCRAM verifier (`SCRAM-SHA-256$...`) stored in `pg_authid` for `role`.
    pub fn scram_verifier(&self, role: &str) -> Result<String, ClusterError> {
        let out = self.psql(
            "postgres",
            &format!(
                "SELECT 'v:' || coalesce(rolpassword, '') FROM pg_catalog.pg_authid WHERE rolname = {}",
                quote_literal(role)
            ),
        )?;
        match out.strip_prefix("v:") {
            Some(v) if !v.is_empty() => Ok(v.to_owned()),
            _ => Err(ClusterError::NoVerifier {
                name: self.opts.name.clone(),
                role: role.to_owned(),
            }),
        }
    }

    /// Signals the postmaster and waits for it to exit; after 60 s it is
    /// SIGKILLed. Stopping a cluster that is not running is a no-op.
    pub fn stop(&mut self, mode: StopMode) -> Result<(), ClusterError> {
        let name = self.opts.name.clone();
        let mut guard = lock(&self.child);
        let Some(child) = guard.as_mut() else {
            return Ok(());
        };
        let proc_err = |what: &str, source: io::Error| ClusterError::Process {
            name: name.clone(),
            what: what.to_owned(),
            source,
        };
        if child
            .try_wait()
            .map_err(|e| proc_err("could not check the postmaster", e))?
            .is_some()
        {
            *guard = None;
            return Ok(());
        }
        let pid = child_pid(child)?;
        match kill(pid, mode.signal()) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => return Err(proc_err("could not signal the postmaster", e.into())),
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if child
                .try_wait()
                .map_err(|e| proc_err("could not wait for the postmaster", e))?
                .is_some()
            {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    cluster = %name,
                    ?mode,
                    "postmaster did not exit within {STOP_TIMEOUT:?}; sending SIGKILL"
                );
                let _ = child.kill();
                child
                    .wait()
                    .map_err(|e| proc_err("could not wait for the killed postmaster", e))?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *guard = None;
        tracing::debug!(cluster = %name, ?mode, "cluster stopped");
        Ok(())
    }

    /// Starts the server again on the same port (stopping it first, fast mode,
    /// if it is still running).
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        if self.is_running() {
            self.stop(StopMode::Fast)?;
        }
        self.launch(Some(self.port))
    }

    pub fn is_running(&self) -> bool {
        let mut guard = lock(&self.child);
        match guard.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) => {
                *guard = None;
                false
            }
            // try_wait failing means we cannot reap it; treat as not ours any more.
            Some(Err(_)) | None => false,
        }
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        if !self.is_running() {
            return None;
        }
        lock(&self.child).as_ref().map(|c| c.id())
    }

    // ----- internals -------------------------------------------------------

    /// A command for a PostgreSQL program: run as the unprivileged user when we
    /// are root, in the cluster's parent dir, with libpq environment cleared.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bins.path(program));
        cmd.current_dir(&self.parent).stdin(Stdio::null());
        let pg_vars: Vec<OsString> = std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| k.to_string_lossy().starts_with("PG"))
            .collect();
        for k in pg_vars {
            cmd.env_remove(k);
        }
        if let Some(ra) = &self.run_as {
            ra.apply(&mut cmd);
        }
        cmd
    }

    pub(crate) fn chown(&self, path: &Path) -> Result<(), ClusterError> {
        match &self.run_as {
            Some(ra) => ra.chown(path),
            None => Ok(()),
        }
    }

    fn init_if_needed(&self) -> Result<(), ClusterError> {
        if self.data_dir.join("PG_VERSION").is_file() {
            tracing::debug!(cluster = %self.opts.name, dir = %self.data_dir.display(), "reusing existing cluster");
            if let Some(ra) = &self.run_as {
                ra.chown_tree(&self.data_dir)?;
            }
            return Ok(());
        }
        match fs::create_dir(&self.data_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(ClusterError::io(
                    "could not create data dir",
                    &self.data_dir,
                    e,
                ))
            }
        }
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| ClusterError::io("could not chmod data dir", &self.data_dir, e))?;
        self.chown(&self.data_dir)?;

        let pwfile = PwFile::create(
            &self.parent.join(format!(".{}.pwfile", self.opts.name)),
            &self.opts.superuser_password,
            self.run_as.as_ref(),
        )?;
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-U")
            .arg(&self.opts.superuser)
            .arg(format!("--pwfile={}", pwfile.path.display()))
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]);
        tracing::info!(cluster = %self.opts.name, dir = %self.data_dir.display(), "running initdb");
        let out = cmd.output().map_err(|source| ClusterError::Spawn {
            program: self.bins.path("initdb"),
            source,
        })?;
        drop(pwfile);
        if !out.status.success() {
            return Err(ClusterError::command_failed(
                format!("initdb -D {}", self.data_dir.display()),
                &out,
            ));
        }

        let conf = self.data_dir.join("postgresql.conf");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(|e| ClusterError::io("could not open", &conf, e))?;
        writeln!(
            f,
            "\n# Added by pgferry-pgcluster: settings live in {CONF_FILE}, rewritten on every start.\n{INCLUDE_LINE}"
        )
        .map_err(|e| ClusterError::io("could not write", &conf, e))?;
        Ok(())
    }

    fn write_conf(&self, port: u16) -> Result<(), ClusterError> {
        let conf = self.data_dir.join("postgresql.conf");
        let text =
            fs::read_to_string(&conf).map_err(|e| ClusterError::io("could not read", &conf, e))?;
        if !text.lines().any(|l| l.trim() == INCLUDE_LINE) {
            // A reused data dir not initialized by us (or an edited one).
            let mut f = OpenOptions::new()
                .append(true)
                .open(&conf)
                .map_err(|e| ClusterError::io("could not open", &conf, e))?;
            writeln!(f, "\n{INCLUDE_LINE}")
                .map_err(|e| ClusterError::io("could not write", &conf, e))?;
        }

        let mut out =
            String::from("# Written by pgferry-pgcluster on every start; edits are overwritten.\n");
        let defaults: [(&str, String); 11] = [
            ("listen_addresses", "'127.0.0.1'".to_owned()),
            ("port", port.to_string()),
            // Everything uses TCP; no socket avoids socket path length limits.
            ("unix_socket_directories", "''".to_owned()),
            ("max_connections", "300".to_owned()),
            ("fsync", "off".to_owned()),
            ("synchronous_commit", "off".to_owned()),
            ("full_page_writes", "off".to_owned()),
            ("shared_buffers", "64MB".to_owned()),
            ("password_encryption", "'scram-sha-256'".to_owned()),
            ("log_min_messages", "warning".to_owned()),
            ("logging_collector", "off".to_owned()),
        ];
        for (k, v) in defaults {
            out.push_str(&format!("{k} = {v}\n"));
        }
        for (k, v) in &self.opts.settings {
            out.push_str(&format!("{k} = {}\n", conf_value(v)));
        }
        let path = self.data_dir.join(CONF_FILE);
        fs::write(&path, out).map_err(|e| ClusterError::io("could not write", &path, e))?;
        self.chown(&path)
    }

    /// Starts the postmaster on `port` (or a free one, retrying bind races) and
    /// waits for it to accept connections.
    pub(crate) fn launch(&mut self, port: Option<u16>) -> Result<(), ClusterError> {
        let attempts = if port.is_some() { 1 } else { PORT_ATTEMPTS };
        let mut last_err = None;
        for attempt in 1..=attempts {
            let port = match port {
                Some(p) => p,
                None => free_port().map_err(|e| ClusterError::Process {
                    name: self.opts.name.clone(),
                    what: "could not find a free port on 127.0.0.1".to_owned(),
                    source: e,
                })?,
            };
            match self.launch_on(port) {
                Ok(()) => return Ok(()),
                Err(LaunchError::BindFailed(e)) if attempt < attempts => {
                    tracing::debug!(cluster = %self.opts.name, port, attempt, "port taken, retrying");
                    last_err = Some(e);
                }
                Err(LaunchError::BindFailed(e)) | Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| ClusterError::InvalidOption("no start attempt made".to_owned())))
    }

    fn launch_on(&mut self, port: u16) -> Result<(), LaunchError> {
        self.write_conf(port)?;
        self.port = port;

        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| ClusterError::io("could not open server log", &self.log_path, e))?;
        self.chown(&self.log_path)?;
        let log_start = log
            .metadata()
            .map(|m| m.len())
            .map_err(|e| ClusterError::io("could not stat server log", &self.log_path, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| ClusterError::io("could not dup server log", &self.log_path, e))?;

        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            // Own process group: a terminal's Ctrl-C goes to the caller, which
            // decides how to stop the server (or dies, firing PDEATHSIG).
            .process_group(0);
        let child = spawn_with_pdeathsig(cmd).map_err(|source| ClusterError::Spawn {
            program: self.bins.path("postgres"),
            source,
        })?;
        tracing::debug!(cluster = %self.opts.name, port, pid = child.id(), "postmaster started");
        *lock(&self.child) = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = {
                let mut guard = lock(&self.child);
                match guard.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(None)) => None,
                    Some(Ok(Some(status))) => Some(status.to_string()),
                    Some(Err(e)) => Some(format!("could not wait for it: {e}")),
                    None => Some("it is gone".to_owned()),
                }
            };
            if let Some(status) = exited {
                *lock(&self.child) = None;
                let tail = self.log_tail(log_start);
                let err = self.start_failed(format!("postmaster exited ({status})"), tail.clone());
                let bind_failed = [
                    "could not bind",
                    "Address already in use",
                    "could not create any TCP/IP sockets",
                ]
                .iter()
                .any(|s| tail.contains(s));
                return Err(if bind_failed {
                    LaunchError::BindFailed(err)
                } else {
                    LaunchError::Other(err)
                });
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(500)).is_ok() {
                if let Ok(out) = self.run_psql("postgres", "select 1", Duration::from_secs(5)) {
                    if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1" {
                        tracing::info!(
                            cluster = %self.opts.name,
                            addr = %self.addr(),
                            dir = %self.data_dir.display(),
                            "cluster ready"
                        );
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                let _ = self.stop(StopMode::Immediate);
                let tail = self.log_tail(log_start);
                return Err(LaunchError::Other(self.start_failed(
                    format!(
                        "not accepting connections on {} after {START_TIMEOUT:?}",
                        self.addr()
                    ),
                    tail,
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn start_failed(&self, reason: String, tail: String) -> ClusterError {
        ClusterError::StartFailed {
            name: self.opts.name.clone(),
            reason,
            log: self.log_path.clone(),
            tail,
        }
    }

    /// The last lines the server wrote to its log since byte `from`.
    fn log_tail(&self, from: u64) -> String {
        let mut buf = Vec::new();
        let read = File::open(&self.log_path).and_then(|mut f| {
            f.seek(SeekFrom::Start(from))?;
            f.read_to_end(&mut buf)
        });
        if let Err(e) = read {
            return format!("(could not read the log: {e})");
        }
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(LOG_TAIL_LINES);
        let tail = lines[start..].join("\n");
        if tail.is_empty() {
            "(log is empty)".to_owned()
        } else {
            tail
        }
    }

    fn run_psql(
        &self,
        database: &str,
        sql: &str,
        connect_timeout: Duration,
    ) -> Result<Output, ClusterError> {
        let psql = self.bins.path("psql");
        let mut cmd = self.command("psql");
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            "-",
            "-d",
        ])
        .arg(format!(
            "{} connect_timeout={}",
            self.conninfo(&self.opts.superuser, database),
            connect_timeout.as_secs().max(1)
        ))
        .env("PGPASSWORD", &self.opts.superuser_password)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| ClusterError::Spawn {
            program: psql.clone(),
            source,
        })?;
        // Feed the script from a thread so a large script and a large result
        // cannot deadlock on full pipes.
        let writer = child.stdin.take().map(|mut stdin| {
            let sql = sql.to_owned();
            std::thread::spawn(move || {
                // psql exiting early (ON_ERROR_STOP) closes the pipe: ignore.
                let _ = stdin.write_all(sql.as_bytes());
            })
        });
        let out = child
            .wait_with_output()
            .map_err(|source| ClusterError::Spawn {
                program: psql.clone(),
                source,
            })?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        Ok(out)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.is_running() {
            // A temp cluster's data is discarded anyway; a kept directory
            // (sandbox) gets a fast shutdown so commits made with
            // synchronous_commit = off are not lost.
            let mode = if self.temp_root.is_some() {
                StopMode::Immediate
            } else {
                StopMode::Fast
            };
            if let Err(e) = self.stop(mode) {
                tracing::warn!(cluster = %self.opts.name, error = %e, "could not stop cluster on drop");
            }
        }
        if let Some(root) = self.temp_root.take() {
            if let Err(e) = fs::remove_dir_all(&root) {
                tracing::warn!(dir = %root.display(), error = %e, "could not remove cluster temp dir");
            }
        }
    }
}

// Callers keep clusters in `static OnceLock<Cluster>`.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cluster>();
};

enum LaunchError {
    /// The postmaster exited because it could not bind its port (retryable).
    BindFailed(ClusterError),
    Other(ClusterError),
}

impl From<ClusterError> for LaunchError {
    fn from(e: ClusterError) -> Self {
        LaunchError::Other(e)
    }
}

/// initdb's password file: 0600, owned by the user running initdb, removed on drop.
struct PwFile {
    path: PathBuf,
}

impl PwFile {
    fn create(path: &Path, password: &str, run_as: Option<&RunAs>) -> Result<PwFile, ClusterError> {
        let _ = fs::remove_file(path);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| ClusterError::io("could not create password file", path, e))?;
        let pw = PwFile {
            path: path.to_path_buf(),
        };
        writeln!(f, "{password}")
            .map_err(|e| ClusterError::io("could not write password file", path, e))?;
        if let Some(ra) = run_as {
            ra.chown(path)?;
        }
        Ok(pw)
    }
}

impl Drop for PwFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn child_pid(child: &Child) -> Result<Pid, ClusterError> {
    i32::try_from(child.id())
        .map(Pid::from_raw)
        .map_err(|_| ClusterError::InvalidOption(format!("pid {} out of range", child.id())))
}

fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// `parent_dir`, canonical, if it is an existing directory.
pub(crate) fn usable_parent(parent_dir: &Path) -> Result<PathBuf, ClusterError> {
    let parent = fs::canonicalize(parent_dir)
        .map_err(|e| ClusterError::io("cluster parent directory is not usable", parent_dir, e))?;
    if !parent.is_dir() {
        return Err(ClusterError::io(
            "cluster parent directory is not a directory",
            &parent,
            io::Error::from(io::ErrorKind::NotADirectory),
        ));
    }
    Ok(parent)
}

/// A fresh `<temp_dir>/pgferry-clusters/<pid>-<name>-<random>`, owned by the
/// server user, after sweeping stale siblings.
pub(crate) fn new_temp_root(name: &str) -> Result<PathBuf, ClusterError> {
    let run_as = RunAs::current()?;
    let removed = cleanup_stale_temp_dirs();
    if removed > 0 {
        tracing::debug!(removed, "removed stale pgferry cluster temp dirs");
    }
    let base = ensure_temp_base()?;
    let root = tempfile::Builder::new()
        .prefix(&format!("{}-{name}-", std::process::id()))
        .rand_bytes(8)
        .tempdir_in(&base)
        .map_err(|e| ClusterError::io("could not create cluster temp dir", &base, e))?
        .keep();
    if let Some(ra) = &run_as {
        if let Err(e) = ra.chown(&root) {
            let _ = fs::remove_dir_all(&root);
            return Err(e);
        }
    }
    Ok(root)
}

/// `<temp_dir>/pgferry-clusters`, where [`Cluster::start_temp`] puts clusters.
pub fn temp_base_dir() -> PathBuf {
    std::env::temp_dir().join(TEMP_BASE_NAME)
}

/// Creates the temp base dir (mode 1777 like /tmp, so clusters of any user and
/// the unprivileged server user can use it) and returns its canonical path.
fn ensure_temp_base() -> Result<PathBuf, ClusterError> {
    let base = temp_base_dir();
    match fs::create_dir_all(std::env::temp_dir()).and_then(|()| fs::create_dir(&base)) {
        Ok(()) => {
            fs::set_permissions(&base, fs::Permissions::from_mode(0o1777))
                .map_err(|e| ClusterError::io("could not chmod cluster temp base dir", &base, e))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(ClusterError::io(
                "could not create cluster temp base dir",
                &base,
                e,
            ))
        }
    }
    fs::canonicalize(&base)
        .map_err(|e| ClusterError::io("cluster temp base dir is not usable", &base, e))
}

/// Removes directories under [`temp_base_dir`] left behind by processes that no
/// longer exist (a `static` cluster is never dropped, so test binaries leak
/// their temp dirs; their postmasters die through PDEATHSIG). A directory is
/// kept while its creating pid or any postmaster pid recorded in it is alive.
/// Returns how many directories were removed. Errors are logged and skipped.
pub fn cleanup_stale_temp_dirs() -> usize {
    let base = temp_base_dir();
    let Ok(entries) = fs::read_dir(&base) else {
        return 0;
    };
    let own = std::process::id();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if pid == own || pid_alive(pid) || has_live_postmaster(&path) {
            continue;
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::debug!(dir = %path.display(), "removed stale cluster temp dir");
                removed += 1;
            }
            Err(e) => {
                tracing::debug!(dir = %path.display(), error = %e, "could not remove stale cluster temp dir")
            }
        }
    }
    removed
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    // EPERM: exists but belongs to someone else.
    matches!(kill(Pid::from_raw(raw), None), Ok(()) | Err(Errno::EPERM))
}

/// Whether any `<dir>/*/postmaster.pid` names a live process.
fn has_live_postmaster(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        fs::read_to_string(e.path().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
            .is_some_and(pid_alive)
    })
}
