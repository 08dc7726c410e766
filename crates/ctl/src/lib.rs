//! `pgferry ctl`: the operators' command-line client of pgferry's HTTP admin
//! API (`/v1/backends`, `/v1/connections`, `/v1/rebalance`, `/v1/switchover`; described in
//! docs/admin-api.md).
//!
//! This crate owns the `ctl` arguments, the blocking HTTP calls to the admin
//! API, the human-readable tables, and the exit status. It talks to a running
//! pgferry only over HTTP: it must not depend on `pgferry-proxy` or on tokio,
//! must not log through `tracing` (stdout is for the answer, stderr for
//! errors and progress, so scripts using `--json` get clean stdout),
//! and must not panic on anything the network or the user hands it.
//!
//! Layout: [`args`] (clap types and duration parsing), `client` (HTTP),
//! `model` (the JSON answers), `render` (tables), `commands` (what each
//! subcommand sends and how its answer becomes output and an exit status),
//! `progress` (the drain and switchover progress poller).

pub mod args;
mod client;
mod commands;
mod model;
mod progress;
mod render;

use std::io::Write;
use std::process::ExitCode;

pub use args::{CtlArgs, CtlCommand, Timeout, LONG_ABOUT};
pub use client::{AdminClient, ClientError};

/// Runs one `pgferry ctl` command to completion and says how it went.
///
/// Synchronous on purpose: the caller dispatches here before it builds an
/// async runtime or installs a log subscriber.
pub fn run(args: CtlArgs) -> ExitCode {
    let client = match AdminClient::new(&args.admin, args.token.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgferry ctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let request = commands::plan(&args.command);
    // Only drains and switchovers run long enough to be worth watching.
    let progress = match &args.command {
        CtlCommand::Drain { name, .. } => {
            Some(progress::Progress::drain(client.clone(), name.clone()))
        }
        CtlCommand::Switchover { .. } => Some(progress::Progress::switchover(client.clone())),
        _ => None,
    };
    let reply = client.send(&request);
    if let Some(p) = progress {
        p.stop();
    }
    let outcome = commands::interpret(&args.command, client.base(), reply, args.json);
    // A closed stdout (`| head`) is not worth a panic; the status still says
    // how the command went.
    let mut stdout = std::io::stdout().lock();
    if let Some(text) = outcome.stdout.as_deref().filter(|t| !t.is_empty()) {
        let _ = stdout.write_all(text.as_bytes());
        if !text.ends_with('\n') {
            let _ = stdout.write_all(b"\n");
        }
    }
    let _ = stdout.flush();
    let mut stderr = std::io::stderr().lock();
    for line in &outcome.stderr {
        let _ = writeln!(stderr, "pgferry ctl: {line}");
    }
    if outcome.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
