//! `pgferry ctl`: the operators' command-line client of pgferry's HTTP admin
//! API (`/v1/backends`, `/v1/connections`, `/v1/rebalance`, `/v1/switchover`,
//! `/v1/handoff`, `/metrics`; described in docs/admin-api.md).
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
//! `progress` (the drain, switchover and hand-off progress poller), `top`
//! (the live terminal view; the only part that owns the terminal).

pub mod args;
mod client;
mod commands;
mod model;
mod progress;
mod render;
mod top;

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
    if let CtlCommand::Top { interval, once } = &args.command {
        if args.json {
            eprintln!(
                "pgferry ctl: top has no --json; `pgferry ctl --json backends` and GET /metrics \
                 give the same data"
            );
            return ExitCode::from(2);
        }
        return top::run(
            client,
            top::Options {
                interval: interval.duration(),
                once: *once,
            },
        );
    }
    let request = commands::plan(&args.command);
    let handoff = matches!(args.command, CtlCommand::Handoff { status: false, .. });
    // Which process serves before a hand-off: its answer may be lost when
    // it exits right after handing over, and then the new one's status
    // tells whether it took over from this one.
    let old_pid = if handoff { handoff_pid(&client) } else { None };
    // Only drains, switchovers and hand-offs run long enough to be worth
    // watching.
    let progress = match &args.command {
        CtlCommand::Drain { name, .. } => {
            Some(progress::Progress::drain(client.clone(), name.clone()))
        }
        CtlCommand::Switchover { .. } => Some(progress::Progress::switchover(client.clone())),
        CtlCommand::Handoff { status: false, .. } => {
            Some(progress::Progress::handoff(client.clone()))
        }
        _ => None,
    };
    let reply = client.send(&request);
    if let Some(p) = progress {
        p.stop();
    }
    let lost = match (&reply, old_pid) {
        (Err(e @ (ClientError::Unreachable { .. } | ClientError::BadAnswer { .. })), Some(pid)) => {
            Some((pid, e))
        }
        _ => None,
    };
    let outcome = match lost {
        Some((pid, e)) => {
            commands::handoff_answer_lost(pid, e, follow_handoff(&client).as_ref(), args.json)
        }
        None => commands::interpret(&args.command, client.base(), reply, args.json),
    };
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

/// The admin API's `GET /v1/handoff`, unless it cannot be had quickly.
fn handoff_status(client: &AdminClient) -> Option<client::Reply> {
    client
        .send(&client::Request {
            method: client::Method::Get,
            path: "/v1/handoff".into(),
            body: None,
            wait: client::Wait::Poll(HANDOFF_POLL),
        })
        .ok()
        .filter(client::Reply::is_success)
}

/// Short: only a hint, and the command goes on without it.
const HANDOFF_POLL: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a new process gets to answer after the old one went silent.
const HANDOFF_FOLLOW_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// The id of the process serving the admin API now.
fn handoff_pid(client: &AdminClient) -> Option<i64> {
    let reply = handoff_status(client)?;
    let status: model::Handoff = serde_json::from_str(&reply.body).ok()?;
    Some(status.pid)
}

/// After a lost answer: the first `GET /v1/handoff` answered by a process
/// that says it is the new one, or the last answer within
/// `HANDOFF_FOLLOW_UP` (connections kept alive to the old process fail
/// first, so one failure proves nothing).
fn follow_handoff(client: &AdminClient) -> Option<client::Reply> {
    let deadline = std::time::Instant::now() + HANDOFF_FOLLOW_UP;
    let mut last = None;
    while std::time::Instant::now() < deadline {
        if let Some(reply) = handoff_status(client) {
            let new = serde_json::from_str::<model::Handoff>(&reply.body)
                .is_ok_and(|h| h.role.as_deref() == Some("new"));
            if new {
                return Some(reply);
            }
            last = Some(reply);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    last
}
