use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while managing a local cluster. Messages say
/// what failed and where (paths, cluster names, program output).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable `initdb` + `postgres` pair was found.
    #[error(
        "no PostgreSQL server binaries found (looked in {looked_in}); install them with \
         `apt-get install -y postgresql` or set PGFERRY_PG_BINDIR"
    )]
    NoServerBinaries { looked_in: String },

    /// Programs or files the caller needs are missing and were not (or could
    /// not be) installed; the message says what to run (see
    /// [`crate::prerequisites`]).
    #[error("{message}")]
    MissingPrerequisites {
        /// The Debian packages that provide them.
        packages: Vec<String>,
        message: String,
    },

    /// A [`crate::ClusterOptions`] value or an argument is unusable.
    #[error("invalid cluster option: {0}")]
    InvalidOption(String),

    /// A filesystem operation failed.
    #[error("{what} ({}): {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A program could not be started at all.
    #[error("could not run {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A helper program (initdb, useradd, postgres --version, ...) ran but failed.
    #[error("{program} failed ({status}): {output}")]
    CommandFailed {
        program: String,
        status: String,
        output: String,
    },

    /// Running as root, but no unprivileged user could be found or created.
    #[error("cannot run PostgreSQL as root and no unprivileged user is usable: {0}")]
    RunAsUser(String),

    /// The unprivileged user that runs the server cannot reach the cluster directory.
    #[error(
        "{} is not traversable by user {user} (which runs the PostgreSQL server programs \
         because this process is root); make it and its parents searchable by that user \
         (e.g. chmod 0755) or use another directory",
        path.display()
    )]
    NotTraversable { path: PathBuf, user: String },

    /// The server did not become ready (exited early or timed out).
    #[error(
        "cluster {name}: server did not start: {reason}; last lines of {}:\n{tail}",
        log.display()
    )]
    StartFailed {
        name: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },

    /// `psql` returned an error.
    #[error("cluster {name}: psql on database {database:?} failed ({status}): {stderr}")]
    Psql {
        name: String,
        database: String,
        status: String,
        stderr: String,
    },

    /// Signalling or waiting for the postmaster failed.
    #[error("cluster {name}: {what}: {source}")]
    Process {
        name: String,
        what: String,
        #[source]
        source: io::Error,
    },

    /// The operation needs a running server.
    #[error("cluster {name} is not running")]
    NotRunning { name: String },

    /// A condition polled for did not come true in time.
    #[error("cluster {name}: {what} (gave up after {after:?})")]
    Timeout {
        name: String,
        what: String,
        after: Duration,
    },

    /// A query answered something it never should (parsing its result failed).
    #[error("cluster {name}: unexpected answer to {query:?}: {output:?}")]
    UnexpectedOutput {
        name: String,
        query: String,
        output: String,
    },

    /// The operation needs a standby (a server in recovery).
    #[error("cluster {name} is not a standby (not in recovery)")]
    NotStandby { name: String },

    /// [`crate::Cluster::scram_verifier`] found no password for the role.
    #[error("cluster {name}: role {role:?} does not exist or has no password")]
    NoVerifier { name: String, role: String },
}

impl ClusterError {
    /// `program` ran and exited with a failure: its status and its output
    /// (stdout then stderr, trimmed).
    pub(crate) fn command_failed(program: impl Into<String>, out: &std::process::Output) -> Self {
        ClusterError::CommandFailed {
            program: program.into(),
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_owned(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ClusterError::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }
}
