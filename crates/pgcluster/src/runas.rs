//! Which user runs initdb/postgres/psql.
//!
//! PostgreSQL refuses to run as root. When this process is root the server
//! programs run as the `postgres` system user if it exists, else as a `pgferry`
//! system user that is created on first use. Otherwise they run as ourselves.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use nix::unistd::{Gid, Uid, User};

use crate::error::ClusterError;

const FALLBACK_USER: &str = "pgferry";

/// An unprivileged user the server programs are run as (only when we are root).
#[derive(Clone, Debug)]
pub(crate) struct RunAs {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

impl RunAs {
    /// `None` when not root (run as ourselves). Resolved once per process.
    pub fn current() -> Result<Option<RunAs>, ClusterError> {
        static CACHE: OnceLock<Result<Option<RunAs>, String>> = OnceLock::new();
        CACHE
            .get_or_init(resolve)
            .clone()
            .map_err(ClusterError::RunAsUser)
    }

    /// Makes `cmd` run as this user. std applies setgid/setuid in the child
    /// before any `pre_exec` closure runs, and drops supplementary groups.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.uid(self.uid.as_raw()).gid(self.gid.as_raw());
    }

    pub fn chown(&self, path: &Path) -> Result<(), ClusterError> {
        nix::unistd::chown(path, Some(self.uid), Some(self.gid)).map_err(|e| {
            ClusterError::io(
                format!("could not chown to user {}", self.name),
                path,
                e.into(),
            )
        })
    }

    /// Recursive chown (does not follow symlinks).
    pub fn chown_tree(&self, path: &Path) -> Result<(), ClusterError> {
        let md =
            fs::symlink_metadata(path).map_err(|e| ClusterError::io("could not stat", path, e))?;
        if md.file_type().is_symlink() {
            return Ok(());
        }
        if md.uid() != self.uid.as_raw() || md.gid() != self.gid.as_raw() {
            self.chown(path)?;
        }
        if md.is_dir() {
            let entries =
                fs::read_dir(path).map_err(|e| ClusterError::io("could not list", path, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| ClusterError::io("could not list", path, e))?;
                self.chown_tree(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Errors unless every ancestor of `dir` (and `dir` itself) is searchable by
    /// this user, judged by mode bits with the user's primary group only (std
    /// drops supplementary groups when switching uid).
    pub fn check_traversable(&self, dir: &Path) -> Result<(), ClusterError> {
        for anc in dir.ancestors() {
            let md = fs::metadata(anc).map_err(|e| ClusterError::io("could not stat", anc, e))?;
            let mode = md.mode();
            let ok = if md.uid() == self.uid.as_raw() {
                mode & 0o100 != 0
            } else if md.gid() == self.gid.as_raw() {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !ok {
                return Err(ClusterError::NotTraversable {
                    path: anc.to_path_buf(),
                    user: self.name.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Errors ([`ClusterError::NotTraversable`]) unless the user that runs the
/// server programs can reach `dir` (an existing directory): every ancestor
/// searchable. Always fine when not root (the programs run as ourselves).
/// When root, this resolves (and may create) that user.
pub fn check_server_access(dir: &Path) -> Result<(), ClusterError> {
    match RunAs::current()? {
        Some(run_as) => run_as.check_traversable(dir),
        None => Ok(()),
    }
}

fn resolve() -> Result<Option<RunAs>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    if let Some(user) = lookup("postgres")? {
        return Ok(Some(user));
    }
    if let Some(user) = lookup(FALLBACK_USER)? {
        return Ok(Some(user));
    }
    tracing::info!("creating system user {FALLBACK_USER} to run PostgreSQL (we are root)");
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            FALLBACK_USER,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("no `postgres` user, and running useradd failed: {e}"))?;
    // Exit status 9 = the user already exists (another process raced us).
    if !out.status.success() && out.status.code() != Some(9) {
        return Err(format!(
            "no `postgres` user, and `useradd --system {FALLBACK_USER}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    lookup(FALLBACK_USER)?
        .map(Some)
        .ok_or_else(|| format!("useradd succeeded but user {FALLBACK_USER} is not found"))
}

fn lookup(name: &str) -> Result<Option<RunAs>, String> {
    let user = User::from_name(name).map_err(|e| format!("looking up user {name}: {e}"))?;
    Ok(user.map(|u| RunAs {
        name: u.name,
        uid: u.uid,
        gid: u.gid,
    }))
}
