use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::ClusterError;

/// Environment variable that overrides where the server binaries are looked up.
pub const BINDIR_ENV: &str = "PGFERRY_PG_BINDIR";

/// Where Debian/Ubuntu install versioned server binaries.
const DEBIAN_LIB_DIR: &str = "/usr/lib/postgresql";

/// A directory holding `initdb`, `postgres`, `psql`, ... of one PostgreSQL version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerBinaries {
    pub bindir: PathBuf,
    /// The server version, e.g. `"15.18"`, from `postgres --version`.
    pub version: String,
}

impl ServerBinaries {
    /// Finds the server binaries. Order:
    /// 1. env `PGFERRY_PG_BINDIR` (used exclusively when set);
    /// 2. `pg_config --bindir`, if that directory has `initdb` and `postgres`;
    /// 3. the highest-versioned `/usr/lib/postgresql/*/bin` with `initdb` and `postgres`.
    pub fn find() -> Result<Self, ClusterError> {
        if let Some(dir) = std::env::var_os(BINDIR_ENV) {
            let dir = PathBuf::from(dir);
            if has_server_programs(&dir) {
                return Self::from_bindir(dir);
            }
            return Err(ClusterError::NoServerBinaries {
                looked_in: format!(
                    "{BINDIR_ENV}={} (it has no initdb and postgres)",
                    dir.display()
                ),
            });
        }

        let mut looked_in = Vec::new();
        match pg_config_bindir() {
            Some(dir) => {
                if has_server_programs(&dir) {
                    return Self::from_bindir(dir);
                }
                looked_in.push(format!("{} (from `pg_config --bindir`)", dir.display()));
            }
            None => looked_in.push("`pg_config --bindir` (not available)".to_owned()),
        }

        for dir in debian_bindirs() {
            if has_server_programs(&dir) {
                return Self::from_bindir(dir);
            }
        }
        looked_in.push(format!("{DEBIAN_LIB_DIR}/*/bin"));

        Err(ClusterError::NoServerBinaries {
            looked_in: looked_in.join(", "),
        })
    }

    /// [`find`](Self::find), after installing Debian's `postgresql` (server
    /// programs, psql, pgbench) when they are missing: as root on Debian it
    /// runs `apt-get install -y postgresql` (and says so on stderr);
    /// otherwise it fails at once with the exact command to run (see
    /// [`crate::prerequisites`]). With `PGFERRY_PG_BINDIR` set it is `find`:
    /// the directory named there is used or nothing.
    pub fn find_or_install() -> Result<Self, ClusterError> {
        if std::env::var_os(BINDIR_ENV).is_none() {
            crate::prerequisites::ensure_debian_packages(&[crate::prerequisites::POSTGRESQL])?;
        }
        Self::find()
    }

    /// Uses an explicit directory; reads the version from `<bindir>/postgres --version`.
    pub fn from_bindir(bindir: impl Into<PathBuf>) -> Result<Self, ClusterError> {
        let bindir = bindir.into();
        let postgres = bindir.join("postgres");
        let out = Command::new(&postgres)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ClusterError::Spawn {
                program: postgres.clone(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(ClusterError::CommandFailed {
                program: format!("{} --version", postgres.display()),
                status: out.status.to_string(),
                output: format!("{}{}", stdout, String::from_utf8_lossy(&out.stderr)),
            });
        }
        let version = parse_version(&stdout).ok_or_else(|| ClusterError::CommandFailed {
            program: format!("{} --version", postgres.display()),
            status: "unexpected output".to_owned(),
            output: stdout.trim().to_owned(),
        })?;
        Ok(ServerBinaries { bindir, version })
    }

    /// `<bindir>/<program>`.
    pub fn path(&self, program: &str) -> PathBuf {
        self.bindir.join(program)
    }

    /// The major version (`15` for `"15.18"`), if the version string starts with a number.
    pub fn major_version(&self) -> Option<u32> {
        self.version
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|m| m.parse().ok())
    }
}

fn has_server_programs(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `/usr/lib/postgresql/<version>/bin`, highest version first.
fn debian_bindirs() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(DEBIAN_LIB_DIR) else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let key = name
                .split('.')
                .map(|p| p.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((key, e.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, p)| p).collect()
}

/// `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` -> `15.18`.
fn parse_version(output: &str) -> Option<String> {
    let line = output.lines().next()?;
    let rest = line.split_once("(PostgreSQL)")?.1;
    let version = rest.split_whitespace().next()?;
    version
        .starts_with(|c: char| c.is_ascii_digit())
        .then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n").as_deref(),
            Some("15.18")
        );
        assert_eq!(
            parse_version("postgres (PostgreSQL) 17beta1").as_deref(),
            Some("17beta1")
        );
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn error_message_says_what_to_install() {
        let e = ClusterError::NoServerBinaries {
            looked_in: "/x".into(),
        };
        assert_eq!(
            e.to_string(),
            "no PostgreSQL server binaries found (looked in /x); install them with \
             `apt-get install -y postgresql` or set PGFERRY_PG_BINDIR"
        );
    }
}
