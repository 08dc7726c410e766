//! The `pgferry ctl` command line, and the durations it accepts.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// `pgferry ctl [--admin URL] [--token TOKEN] [--json] <command>`.
/// Longer help for `pgferry ctl --help`; the binary attaches it to its
/// `ctl` subcommand, whose doc comment would otherwise replace it.
pub const LONG_ABOUT: &str = "Inspect and steer a running pgferry through its HTTP admin API: \
list backends and sessions, move a session, drain, activate, add or remove a backend, \
rebalance, switch a primary over to its standby, restart pgferry itself (handoff), or watch it \
live (top).\n\n\
`pgferry ctl top` redraws once a second (--interval) until q, Esc or Ctrl-C: sessions per \
backend, migrations per second by outcome with totals, the migration pause's p50 and p99 \
(estimated from the histogram's buckets over the last interval, or since pgferry started when \
the interval had none), and drains in progress. When the admin API cannot be reached it shows \
the error and keeps trying. When stdout is not a terminal, or with --once, it prints one frame \
as plain text (two readings an interval apart) and exits 0, or 1 when the API did not \
answer.\n\n\
Exit status: 0 on success; 1 when the server answers an error or cannot be reached, a \
transfer does not succeed, a drain leaves sessions behind or fails to move some, a \
switchover aborts or cannot move every session, or a hand-off aborts, is not over within \
--timeout or leaves sessions with the old process; 2 on a usage error.";

#[derive(clap::Args, Debug, Clone)]
pub struct CtlArgs {
    /// Base URL of pgferry's admin API ([proxy] admin_listen).
    #[arg(
        long = "admin",
        value_name = "URL",
        env = "PGFERRY_ADMIN_URL",
        default_value = "http://127.0.0.1:9930",
        global = true
    )]
    pub admin: String,
    /// Bearer token for the /v1 routes ([proxy] admin_token).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "PGFERRY_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// Print the server's JSON answer as it came, on stdout, instead of a
    /// table (also when the server answers an error).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlCommand {
    /// List backends: address, state, health and session count.
    Backends,
    /// List client sessions and the backend each one is on.
    Connections,
    /// Move one session to another backend.
    Transfer {
        /// The session's id (from `pgferry ctl connections`).
        id: String,
        /// Backend to move it to (default: the server picks one).
        #[arg(long, value_name = "NAME")]
        to: Option<String>,
        /// How long the move may take, e.g. 15s (server default: 15s).
        #[arg(long, value_name = "DURATION")]
        timeout: Option<Timeout>,
    },
    /// Stop sending new sessions to a backend and move its sessions away;
    /// answers when none is left or at the deadline.
    Drain {
        /// The backend's name.
        name: String,
        /// Deadline for the whole drain, e.g. 60s or 1m30s (server default:
        /// [balancer] drain_timeout).
        #[arg(long, value_name = "DURATION")]
        timeout: Option<Timeout>,
    },
    /// Let a drained or draining backend take new sessions again.
    Activate {
        /// The backend's name.
        name: String,
    },
    /// Move sessions from over- to under-loaded backends.
    Rebalance {
        /// How long each move may take, e.g. 15s (server default: 15s).
        #[arg(long, value_name = "DURATION")]
        timeout: Option<Timeout>,
    },
    /// Add a backend; it takes new sessions at once.
    Add {
        /// A name not yet in use.
        name: String,
        /// host:port of the PostgreSQL server.
        address: String,
    },
    /// Switch a cluster's primary over to its standby, keeping every
    /// session: hold them at safe points, fence, catch up, promote, move.
    Switchover {
        /// The primary now.
        from: String,
        /// The standby to promote.
        to: String,
        /// How long sessions may take to reach a safe point, e.g. 30s
        /// (server default: [switchover] default_timeout).
        #[arg(long, value_name = "DURATION")]
        timeout: Option<Timeout>,
    },
    /// Restart pgferry without dropping a session: a new process started
    /// from the binary on disk takes the listeners and every session over
    /// (as SIGUSR2 does); answers when it is over.
    Handoff {
        /// How long to wait for the outcome, e.g. 2m; the hand-off goes on
        /// after it (default: until it is over).
        #[arg(long, value_name = "DURATION", conflicts_with = "status")]
        timeout: Option<Timeout>,
        /// Only show the last hand-off's status, as the process that
        /// answers sees it.
        #[arg(long)]
        status: bool,
    },
    /// A live view, redrawn every interval until q: sessions per backend,
    /// migrations per second by outcome, pause p50/p99, drains in progress.
    Top {
        /// How often to poll and redraw, e.g. 1s or 500ms (at least 100ms).
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
        interval: Timeout,
        /// Print one frame as plain text and exit (also what happens when
        /// stdout is not a terminal).
        #[arg(long)]
        once: bool,
    },
    /// Remove a backend that has no sessions (drain it first).
    Remove {
        /// The backend's name.
        name: String,
        /// Remove it even with sessions on it; they are closed (57P01).
        #[arg(long)]
        force: bool,
    },
}

/// A positive duration given as humantime text (`15s`, `1m30s`, `500ms`),
/// sent to the server in whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(Duration);

impl Timeout {
    pub fn duration(self) -> Duration {
        self.0
    }

    /// The `timeout_ms` the server expects.
    pub fn millis(self) -> u64 {
        // Parsing already refused anything that does not fit.
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

/// `top --interval`: a duration of 100ms or more, so the view cannot
/// flood the admin API.
fn parse_interval(s: &str) -> Result<Timeout, String> {
    let t: Timeout = s.parse().map_err(|e: TimeoutError| e.to_string())?;
    if t.duration() < Duration::from_millis(100) {
        return Err("the interval must be at least 100ms".into());
    }
    Ok(t)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeoutError {
    #[error("{0}; write it like 15s, 1m30s or 500ms")]
    Syntax(String),
    #[error("a timeout must be at least 1ms")]
    TooShort,
    #[error("a timeout that long does not fit in milliseconds")]
    TooLong,
}

impl FromStr for Timeout {
    type Err = TimeoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d =
            humantime::parse_duration(s.trim()).map_err(|e| TimeoutError::Syntax(e.to_string()))?;
        // The server counts in milliseconds; less than one would be a
        // deadline that has passed before the request arrives.
        let ms = d.as_millis();
        if ms == 0 {
            return Err(TimeoutError::TooShort);
        }
        if u64::try_from(ms).is_err() {
            return Err(TimeoutError::TooLong);
        }
        Ok(Timeout(d))
    }
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Top {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        Top::try_parse_from(std::iter::once("ctl").chain(args.iter().copied())).map(|t| t.ctl)
    }

    #[test]
    fn durations_become_milliseconds() {
        let cases = [
            ("60s", 60_000),
            ("1m30s", 90_000),
            ("500ms", 500),
            ("2m", 120_000),
            (" 15s ", 15_000),
            ("1h", 3_600_000),
        ];
        for (text, ms) in cases {
            let t: Timeout = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(t.millis(), ms, "{text}");
        }
    }

    #[test]
    fn bad_durations_are_refused_with_a_reason() {
        assert_eq!("0s".parse::<Timeout>(), Err(TimeoutError::TooShort));
        assert_eq!("10us".parse::<Timeout>(), Err(TimeoutError::TooShort));
        for text in ["", "60", "soon", "-5s", "5 parsecs"] {
            let err = text.parse::<Timeout>().expect_err(text);
            assert!(err.to_string().contains("1m30s"), "{text}: {err}");
        }
        // Fits a Duration, not u64 milliseconds.
        assert_eq!(
            "100000000000000000s".parse::<Timeout>(),
            Err(TimeoutError::TooLong)
        );
    }

    #[test]
    fn global_options_have_defaults_and_go_anywhere() {
        let a = parse(&["backends"]).expect("parse");
        assert_eq!(a.command, CtlCommand::Backends);
        assert!(!a.json);
        // The environment may set these; only check the flag wins.
        let a = parse(&[
            "--admin",
            "http://h:1",
            "connections",
            "--json",
            "--token",
            "t",
        ])
        .expect("parse");
        assert_eq!(a.admin, "http://h:1");
        assert_eq!(a.token.as_deref(), Some("t"));
        assert!(a.json);
    }

    #[test]
    fn subcommands_parse_their_arguments() {
        let a = parse(&["transfer", "abc", "--to", "pg2", "--timeout", "1m30s"]).expect("parse");
        assert_eq!(
            a.command,
            CtlCommand::Transfer {
                id: "abc".into(),
                to: Some("pg2".into()),
                timeout: Some(Timeout(Duration::from_secs(90))),
            }
        );
        let a = parse(&["drain", "pg1"]).expect("parse");
        assert_eq!(
            a.command,
            CtlCommand::Drain {
                name: "pg1".into(),
                timeout: None
            }
        );
        let a = parse(&["remove", "pg3", "--force"]).expect("parse");
        assert_eq!(
            a.command,
            CtlCommand::Remove {
                name: "pg3".into(),
                force: true
            }
        );
        let a = parse(&["handoff", "--timeout", "2m"]).expect("parse");
        assert_eq!(
            a.command,
            CtlCommand::Handoff {
                timeout: Some(Timeout(Duration::from_secs(120))),
                status: false
            }
        );
        let a = parse(&["handoff", "--status"]).expect("parse");
        assert_eq!(
            a.command,
            CtlCommand::Handoff {
                timeout: None,
                status: true
            }
        );
        let a = parse(&["top"]).expect("parse");
        assert_eq!(
            a.command,
            CtlCommand::Top {
                interval: Timeout(Duration::from_secs(1)),
                once: false
            }
        );
        let a = parse(&["top", "--interval", "250ms", "--once"]).expect("parse");
        assert_eq!(
            a.command,
            CtlCommand::Top {
                interval: Timeout(Duration::from_millis(250)),
                once: true
            }
        );
        let a = parse(&["add", "pg3", "127.0.0.1:5434"]).expect("parse");
        assert_eq!(
            a.command,
            CtlCommand::Add {
                name: "pg3".into(),
                address: "127.0.0.1:5434".into()
            }
        );
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        let err = parse(&["drain", "pg1", "--timeout", "forever"]).expect_err("bad timeout");
        assert!(err.to_string().contains("forever"), "{err}");
        assert!(parse(&["drain"]).is_err());
        assert!(parse(&["transfer"]).is_err());
        assert!(parse(&["add", "pg3"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
        assert!(parse(&["handoff", "--status", "--timeout", "5s"]).is_err());
        let err = parse(&["top", "--interval", "10ms"]).expect_err("too short");
        assert!(err.to_string().contains("at least 100ms"), "{err}");
        assert!(parse(&["top", "--interval", "often"]).is_err());
    }
}
