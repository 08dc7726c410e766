//! Streaming standbys: a [`Cluster`] made with `pg_basebackup -R` from a
//! running primary, promoted with `pg_promote`, and a former primary
//! re-attached to the new one with a fresh base backup.
//!
//! A standby is an ordinary [`Cluster`] whose data dir holds a base backup
//! and `standby.signal`. Its `pgferry.conf` is rewritten on every start like
//! any other (the copied one carries the primary's port), and it is a hot
//! standby (PostgreSQL's default), so clients can log in and read. The
//! primary needs nothing special: `wal_level = replica` and
//! `max_wal_senders = 10` are PostgreSQL's defaults, and initdb's `pg_hba.conf`
//! allows `host replication all 127.0.0.1/32 scram-sha-256`.
//!
//! Settings a standby must not have lower than its primary
//! (`max_connections`, `max_worker_processes`, `max_wal_senders`,
//! `max_prepared_transactions`, `max_locks_per_transaction`) come from the
//! same defaults on both sides; extra [`ClusterOptions::settings`] must keep
//! it that way.
//!
//! `pg_rewind` is not offered: it needs `full_page_writes = on` and
//! `wal_log_hints` or data checksums, and these clusters run without them
//! (for speed), so a former primary always gets a fresh base backup.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::cluster::{
    new_temp_root, pid_alive, usable_parent, Cluster, ClusterOptions, StopMode, POLL_INTERVAL,
};
use crate::error::ClusterError;
use crate::sql::{conninfo_value, quote_literal};

/// A base backup of a test-sized cluster takes seconds; this is for slow CI disks.
const BASE_BACKUP_TIMEOUT: Duration = Duration::from_secs(300);
/// libpq `connect_timeout` of the standby's replication connection.
const REPLICATION_CONNECT_TIMEOUT_SECS: u32 = 10;

impl Cluster {
    /// Starts a streaming standby of `primary` in a fresh temp dir (like
    /// [`Cluster::start_temp`]: removed on drop) on its own port
    /// (`opts.port`, or a free one).
    ///
    /// The data dir is `pg_basebackup -R -c fast -X stream` from `primary`,
    /// which must be running and not in recovery (a base backup of a standby
    /// would need `full_page_writes = on`, which these clusters turn off). The
    /// superuser and password are `primary`'s (the copy has its roles):
    /// `opts.superuser` and `opts.superuser_password` are ignored. The
    /// replication connection (in `primary_conninfo`, written by `-R`)
    /// carries that password, so the standby reconnects by itself after the
    /// primary restarts on the same port. Returns once it accepts
    /// connections (it has reached a consistent state).
    pub fn start_standby_temp(
        primary: &Cluster,
        opts: ClusterOptions,
    ) -> Result<Cluster, ClusterError> {
        let opts = standby_options(primary, opts);
        opts.validate()?;
        let root = new_temp_root(&opts.name)?;
        // From here on, dropping `standby` removes the temp dir.
        let mut standby = Cluster::unstarted(primary.bins(), root.clone(), Some(root), opts)?;
        standby.replace_with_base_backup(primary)?;
        standby.launch(standby.opts.port)?;
        Ok(standby)
    }

    /// Like [`Cluster::start_standby_temp`], in the kept directory
    /// `<parent_dir>/<name>` (for the sandbox; `parent_dir` must exist).
    ///
    /// If that directory already holds a cluster (`PG_VERSION` present) it is
    /// started as it is, whatever it is (a standby, or a former primary): no
    /// base backup is taken. Its `primary_conninfo` may then name an old
    /// port of `primary`; [`Cluster::follow`] repoints it. An empty leftover
    /// directory is replaced; a non-empty one without `PG_VERSION` is an error
    /// (it is not ours to delete).
    pub fn start_standby(
        parent_dir: &Path,
        primary: &Cluster,
        opts: ClusterOptions,
    ) -> Result<Cluster, ClusterError> {
        let opts = standby_options(primary, opts);
        opts.validate()?;
        let parent = usable_parent(parent_dir)?;
        let mut standby = Cluster::unstarted(primary.bins(), parent, None, opts)?;
        if standby.data_dir.join("PG_VERSION").is_file() {
            tracing::debug!(cluster = %standby.opts.name, dir = %standby.data_dir.display(), "reusing existing cluster as is");
            if let Some(ra) = &standby.run_as {
                ra.chown_tree(&standby.data_dir)?;
            }
        } else {
            match fs::remove_dir(&standby.data_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ClusterError::io(
                        "data dir exists but holds no cluster (no PG_VERSION) and could not be \
                         removed as empty; not replacing it",
                        &standby.data_dir,
                        e,
                    ))
                }
            }
            standby.replace_with_base_backup(primary)?;
        }
        standby.launch(standby.opts.port)?;
        Ok(standby)
    }

    /// Whether the server is in recovery, i.e. a standby
    /// (`SELECT pg_is_in_recovery()`).
    pub fn is_in_recovery(&self) -> Result<bool, ClusterError> {
        const QUERY: &str = "SELECT pg_is_in_recovery()";
        let out = self.psql("postgres", QUERY)?;
        match out.as_str() {
            "t" => Ok(true),
            "f" => Ok(false),
            _ => Err(self.unexpected(QUERY, out)),
        }
    }

    /// Promotes this standby (`SELECT pg_promote(true, <timeout in s>)`) and
    /// polls until it has left recovery, for at most about `timeout`.
    /// [`ClusterError::NotStandby`] if it is not in recovery.
    pub fn promote(&self, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        if !self.is_in_recovery()? {
            return Err(ClusterError::NotStandby {
                name: self.opts.name.clone(),
            });
        }
        // pg_promote waits in the server for at most this long; what decides
        // is the poll below (it may answer false if the wait ran out).
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64);
        self.psql("postgres", &format!("SELECT pg_promote(true, {secs})"))?;
        loop {
            if !self.is_in_recovery()? {
                tracing::info!(cluster = %self.opts.name, "promoted");
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout {
                    name: self.opts.name.clone(),
                    what: "still in recovery after pg_promote".to_owned(),
                    after: timeout,
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Makes this standby stream from `primary` at its current address:
    /// `ALTER SYSTEM SET primary_conninfo` (with `primary`'s superuser and
    /// password, as `pg_basebackup -R` writes it) and a reload, which
    /// restarts the WAL receiver. For a kept standby whose primary came back
    /// on another port. Does not wait: follow with [`Cluster::wait_replayed`]
    /// to know it streams. [`ClusterError::NotStandby`] if not in recovery.
    pub fn follow(&self, primary: &Cluster) -> Result<(), ClusterError> {
        if !self.is_in_recovery()? {
            return Err(ClusterError::NotStandby {
                name: self.opts.name.clone(),
            });
        }
        let conninfo = format!(
            "{} password={}",
            replication_conninfo(primary, &self.opts.name),
            conninfo_value(primary.superuser_password())
        );
        self.psql(
            "postgres",
            &format!(
                "ALTER SYSTEM SET primary_conninfo = {};\nSELECT pg_reload_conf();",
                quote_literal(&conninfo)
            ),
        )?;
        Ok(())
    }

    /// Re-attaches this cluster (typically a former primary after a
    /// switchover) as a streaming standby of `primary`: stops it (fast; fine
    /// if it is stopped already), replaces its data dir with a fresh base
    /// backup of `primary` (as [`Cluster::start_standby_temp`] takes it) and
    /// starts it again on the same port. Its superuser and password become
    /// `primary`'s. The old data dir is only removed once the backup has
    /// succeeded, so a failed rebuild leaves it as it was (stopped).
    pub fn rebuild_as_standby_of(&mut self, primary: &Cluster) -> Result<(), ClusterError> {
        if self.data_dir == primary.data_dir {
            return Err(ClusterError::InvalidOption(format!(
                "cluster {} cannot be rebuilt as a standby of itself",
                self.opts.name
            )));
        }
        self.stop(StopMode::Fast)?;
        // stop() only knows the postmaster this Cluster forked; never replace
        // a data dir some other postmaster still runs on.
        if let Some(pid) = postmaster_pid(&self.data_dir).filter(|p| pid_alive(*p)) {
            return Err(ClusterError::InvalidOption(format!(
                "cluster {}: postmaster {pid} still runs on {}; not replacing it",
                self.opts.name,
                self.data_dir.display()
            )));
        }
        self.opts.superuser = primary.superuser().to_owned();
        self.opts.superuser_password = primary.superuser_password().to_owned();
        self.replace_with_base_backup(primary)?;
        let port = (self.port != 0).then_some(self.port);
        self.launch(port)?;
        tracing::info!(cluster = %self.opts.name, primary = %primary.name(), "rebuilt as standby");
        Ok(())
    }

    /// Waits until this standby has replayed everything `primary` committed
    /// before the call (for tests: assert on the standby only after this).
    ///
    /// It writes one tiny WAL record on `primary` (a transactional logical
    /// message, no table touched) with `synchronous_commit = on`, and polls
    /// `pg_last_wal_replay_lsn()` here until it has reached the end of that
    /// record. Reading `pg_current_wal_lsn()` instead is not enough: with
    /// `synchronous_commit = off` (the cluster default) it can trail commits
    /// that have already returned, and WAL that nothing flushes is not sent.
    /// `primary` must not be in recovery; one fenced with
    /// `default_transaction_read_only = on` will do (the message is allowed
    /// in a read-only transaction). [`ClusterError::NotStandby`] if this
    /// cluster is (or becomes) not in recovery, [`ClusterError::Timeout`]
    /// after `timeout`.
    pub fn wait_replayed(&self, primary: &Cluster, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        const MARK: &str = "SET synchronous_commit = on;\n\
             SELECT pg_logical_emit_message(true, 'pgferry-pgcluster', 'wait_replayed');";
        let target = primary.psql("postgres", MARK)?;
        if !is_lsn(&target) {
            return Err(primary.unexpected(MARK, target));
        }
        let check = format!(
            "SELECT pg_is_in_recovery(), \
             coalesce(pg_last_wal_replay_lsn() >= '{target}'::pg_lsn, false)"
        );
        loop {
            let out = self.psql("postgres", &check)?;
            match out.as_str() {
                "t|t" => return Ok(()),
                "t|f" => {}
                "f|t" | "f|f" => {
                    return Err(ClusterError::NotStandby {
                        name: self.opts.name.clone(),
                    })
                }
                _ => return Err(self.unexpected(&check, out)),
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout {
                    name: self.opts.name.clone(),
                    what: format!("has not replayed {} up to {target}", primary.opts.name),
                    after: timeout,
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    // ----- internals -------------------------------------------------------

    /// Takes a base backup of `primary` into `<parent>/.<name>.basebackup`
    /// and, once it is complete, puts it in place of the data dir. A
    /// directory with `PG_VERSION` is thus always a whole backup, even if
    /// this process dies half-way.
    fn replace_with_base_backup(&self, primary: &Cluster) -> Result<(), ClusterError> {
        let staging = self.parent.join(format!(".{}.basebackup", self.opts.name));
        remove_tree_if_exists(&staging)?;
        fs::create_dir(&staging)
            .map_err(|e| ClusterError::io("could not create base backup dir", &staging, e))?;
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o700))
            .map_err(|e| ClusterError::io("could not chmod base backup dir", &staging, e))?;
        self.chown(&staging)?;

        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-D")
            .arg(&staging)
            .args(["-R", "-c", "fast", "-X", "stream", "--no-sync", "-d"])
            .arg(replication_conninfo(primary, &self.opts.name))
            // Not on the command line (ps shows it); -R writes it into
            // primary_conninfo all the same.
            .env("PGPASSWORD", primary.superuser_password());
        tracing::info!(
            cluster = %self.opts.name,
            primary = %primary.name(),
            addr = %primary.addr(),
            "taking a base backup"
        );
        let what = format!(
            "pg_basebackup from {} ({}) into {}",
            primary.name(),
            primary.addr(),
            staging.display()
        );
        let out = match output_with_deadline(cmd, BASE_BACKUP_TIMEOUT, &self.opts.name, &what) {
            Ok(out) => out,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        if !out.status.success() {
            let _ = fs::remove_dir_all(&staging);
            return Err(ClusterError::command_failed(what, &out));
        }
        if !staging.join("standby.signal").is_file() {
            let _ = fs::remove_dir_all(&staging);
            return Err(ClusterError::CommandFailed {
                program: what,
                status: "no standby.signal written".to_owned(),
                output: String::new(),
            });
        }
        remove_tree_if_exists(&self.data_dir)?;
        fs::rename(&staging, &self.data_dir)
            .map_err(|e| ClusterError::io("could not move the base backup into place", &staging, e))
    }

    fn unexpected(&self, query: &str, output: String) -> ClusterError {
        ClusterError::UnexpectedOutput {
            name: self.opts.name.clone(),
            query: query.to_owned(),
            output,
        }
    }
}

/// `opts` with the primary's superuser and password (the copy has its roles).
fn standby_options(primary: &Cluster, mut opts: ClusterOptions) -> ClusterOptions {
    opts.superuser = primary.superuser().to_owned();
    opts.superuser_password = primary.superuser_password().to_owned();
    opts
}

/// The replication connection to `primary`, without the password.
fn replication_conninfo(primary: &Cluster, application_name: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={} application_name={} connect_timeout={REPLICATION_CONNECT_TIMEOUT_SECS}",
        primary.port(),
        conninfo_value(primary.superuser()),
        conninfo_value(application_name)
    )
}

/// `X/Y` with hex digits, as PostgreSQL prints a `pg_lsn`.
fn is_lsn(s: &str) -> bool {
    s.split_once('/').is_some_and(|(hi, lo)| {
        [hi, lo]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 8 && p.chars().all(|c| c.is_ascii_hexdigit()))
    })
}

/// The pid in `<data_dir>/postmaster.pid`, if there is one.
fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
}

fn remove_tree_if_exists(path: &Path) -> Result<(), ClusterError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ClusterError::io("could not remove", path, e)),
    }
}

/// Runs `cmd` to completion and collects its output, killing its whole
/// process group (pg_basebackup forks a WAL streaming child) after `timeout`.
fn output_with_deadline(
    mut cmd: Command,
    timeout: Duration,
    name: &str,
    what: &str,
) -> Result<Output, ClusterError> {
    let program = PathBuf::from(cmd.get_program());
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|source| ClusterError::Spawn {
        program: program.clone(),
        source,
    })?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                return Err(ClusterError::Spawn { program, source });
            }
        }
        if Instant::now() >= deadline {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            return Err(ClusterError::Timeout {
                name: name.to_owned(),
                what: format!("{what} did not finish"),
                after: timeout,
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    let collect =
        |h: Option<JoinHandle<Vec<u8>>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Reads a pipe to its end on a thread, so a chatty child cannot block on it.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut r| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_shape() {
        assert!(is_lsn("0/3000060"));
        assert!(is_lsn("1A/FF"));
        assert!(!is_lsn(""));
        assert!(!is_lsn("0/"));
        assert!(!is_lsn("0/30'; drop"));
        assert!(!is_lsn("t"));
    }
}
