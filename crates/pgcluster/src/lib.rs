//! Throw-away local PostgreSQL clusters started from the installed server binaries.
//!
//! # What this crate owns
//!
//! Creating (`initdb`), configuring, starting, stopping and removing *local*
//! PostgreSQL clusters for the three non-serving callers of pgferry:
//!
//! * `pgferry sandbox` — a long-running development environment
//!   ([`Cluster::start`] into a directory it keeps across restarts);
//! * the integration tests — clusters shared by all tests of one test binary
//!   through a `static OnceLock<Cluster>` ([`Cluster::start_temp`]);
//! * benchmarks.
//!
//! A cluster can also be a streaming standby of another one
//! ([`Cluster::start_standby_temp`], [`Cluster::start_standby`]), be promoted
//! ([`Cluster::promote`]) and be re-attached to a new primary after a
//! switchover ([`Cluster::rebuild_as_standby_of`]); see the `replica` module.
//!
//! The API is synchronous and uses only `std` threads and processes, so a
//! cluster does not belong to any particular async runtime and can live in a
//! `static`. Every postmaster is forked from one long-lived spawner thread with
//! `PR_SET_PDEATHSIG = SIGQUIT`, so it shuts down (immediate mode) when the
//! process that started it dies — even on `SIGKILL` or when destructors of
//! statics never run. Temp directories leaked that way are removed by the next
//! [`Cluster::start_temp`] (see [`cleanup_stale_temp_dirs`]).
//!
//! [`ServerBinaries::find_or_install`] installs the server binaries when they
//! are missing and this process is root on Debian, or says exactly what to
//! run; [`prerequisites`] does the same for the other programs the test
//! suite needs (PgBouncer, tmux, a JDK, ...).
//!
//! When running as root (sessions and CI do), the server programs are run as an
//! unprivileged user: `postgres` if it exists, else a `pgferry` system user that
//! is created on first use.
//!
//! # What it must not do
//!
//! * It is never used in the proxy's serving path: nothing here is async,
//!   everything blocks, and it shells out to `initdb`/`postgres`/`psql`.
//! * It never touches clusters it did not create: it only signals postmasters it
//!   forked itself, and only removes temp directories under its own
//!   `pgferry-clusters` directory whose creating process is gone.

mod binaries;
mod cluster;
mod error;
pub mod prerequisites;
mod replica;
mod runas;
mod spawner;
mod sql;

pub use binaries::ServerBinaries;
pub use cluster::{cleanup_stale_temp_dirs, temp_base_dir, Cluster, ClusterOptions, StopMode};
pub use error::ClusterError;
pub use runas::check_server_access;
pub use sql::{quote_ident, quote_literal};
