//! What each subcommand asks the server ([`plan`]), and how the answer
//! becomes output and an exit status ([`interpret`]). Both are pure, so the
//! exit rules are tested without a server.

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use crate::args::{CtlCommand, Timeout};
use crate::client::{segment, ClientError, Method, Reply, Request, Wait};
use crate::model::{
    Backend, Connection, Drain, ErrorBody, Handoff, Rebalance, Removed, Switchover, Transfer,
};
use crate::render;

/// What to print and how the command went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: Option<String>,
    /// Lines for stderr, printed after a `pgferry ctl: ` prefix.
    pub stderr: Vec<String>,
    pub ok: bool,
}

pub fn plan(cmd: &CtlCommand) -> Request {
    let req = |method, path: String, body, wait| Request {
        method,
        path,
        body,
        wait,
    };
    match cmd {
        // `top` runs a loop of its own (crate::top) and comes here only if
        // someone sends it through `run`'s one-request path: a backend
        // list is then the closest one-shot answer.
        CtlCommand::Backends | CtlCommand::Top { .. } => {
            req(Method::Get, "/v1/backends".into(), None, Wait::Short)
        }
        CtlCommand::Connections => req(Method::Get, "/v1/connections".into(), None, Wait::Short),
        CtlCommand::Transfer { id, to, timeout } => {
            let mut body = Map::new();
            if let Some(to) = to {
                body.insert("to".into(), json!(to));
            }
            add_timeout(&mut body, *timeout);
            req(
                Method::Post,
                format!("/v1/connections/{}/transfer", segment(id)),
                Some(Value::Object(body)),
                long_wait(*timeout),
            )
        }
        CtlCommand::Drain { name, timeout } => {
            let mut body = Map::new();
            add_timeout(&mut body, *timeout);
            req(
                Method::Post,
                format!("/v1/backends/{}/drain", segment(name)),
                Some(Value::Object(body)),
                long_wait(*timeout),
            )
        }
        CtlCommand::Activate { name } => req(
            Method::Post,
            format!("/v1/backends/{}/activate", segment(name)),
            None,
            Wait::Short,
        ),
        CtlCommand::Rebalance { timeout } => {
            let mut body = Map::new();
            add_timeout(&mut body, *timeout);
            req(
                Method::Post,
                "/v1/rebalance".into(),
                Some(Value::Object(body)),
                long_wait(*timeout),
            )
        }
        CtlCommand::Add { name, address } => req(
            Method::Post,
            "/v1/backends".into(),
            Some(json!({ "name": name, "address": address })),
            Wait::Short,
        ),
        CtlCommand::Switchover { from, to, timeout } => {
            let mut body = Map::new();
            body.insert("from".into(), json!(from));
            body.insert("to".into(), json!(to));
            add_timeout(&mut body, *timeout);
            // Catch-up and promotion come after the hold's deadline, on
            // limits of the server's own.
            req(
                Method::Post,
                "/v1/switchover".into(),
                Some(Value::Object(body)),
                Wait::ServerDeadline,
            )
        }
        CtlCommand::Handoff { status: true, .. } => {
            req(Method::Get, "/v1/handoff".into(), None, Wait::Short)
        }
        CtlCommand::Handoff { timeout, .. } => {
            let mut body = Map::new();
            add_timeout(&mut body, *timeout);
            // Without a timeout the server answers when it is over: the new
            // process's start plus up to its shutdown_timeout.
            req(
                Method::Post,
                "/v1/handoff".into(),
                Some(Value::Object(body)),
                long_wait(*timeout),
            )
        }
        CtlCommand::Remove { name, force } => req(
            Method::Delete,
            format!(
                "/v1/backends/{}{}",
                segment(name),
                if *force { "?force=true" } else { "" }
            ),
            None,
            // Closing sessions is quick, but not instant with many of them.
            Wait::ServerDeadline,
        ),
    }
}

/// Without a timeout the server's own default applies, so we send none.
fn add_timeout(body: &mut Map<String, Value>, timeout: Option<Timeout>) {
    if let Some(t) = timeout {
        body.insert("timeout_ms".into(), json!(t.millis()));
    }
}

fn long_wait(timeout: Option<Timeout>) -> Wait {
    match timeout {
        Some(t) => Wait::Deadline(t.duration()),
        None => Wait::ServerDeadline,
    }
}

/// Turns the server's answer (or the failure to get one) into output.
pub fn interpret(
    cmd: &CtlCommand,
    base: &str,
    reply: Result<Reply, ClientError>,
    json_out: bool,
) -> Outcome {
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            return Outcome {
                stdout: None,
                stderr: vec![e.to_string()],
                ok: false,
            }
        }
    };
    // Scripts get the body whatever the status.
    let stdout = json_out.then(|| reply.body.clone());
    if !reply.is_success() {
        return Outcome {
            stdout,
            stderr: vec![refusal(cmd, &reply)],
            ok: false,
        };
    }
    match success(cmd, base, &reply) {
        Ok((text, problem)) => Outcome {
            stdout: if json_out { stdout } else { Some(text) },
            ok: problem.is_none(),
            stderr: problem.into_iter().collect(),
        },
        Err(e) => Outcome {
            stdout,
            stderr: vec![e],
            ok: false,
        },
    }
}

/// The table or summary of a 2xx answer, and what makes it a failure
/// anyway (a drain that left sessions, a transfer that did not succeed).
fn success(
    cmd: &CtlCommand,
    base: &str,
    reply: &Reply,
) -> Result<(String, Option<String>), String> {
    let parse_err = |e: serde_json::Error| {
        format!(
            "unexpected answer from {base} (HTTP {}): {e}: {}",
            reply.status,
            excerpt(&reply.body)
        )
    };
    fn parse<T: DeserializeOwned>(body: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(body)
    }
    Ok(match cmd {
        CtlCommand::Backends | CtlCommand::Top { .. } => (
            render::backends(&parse::<Vec<Backend>>(&reply.body).map_err(parse_err)?),
            None,
        ),
        CtlCommand::Connections => (
            render::connections(&parse::<Vec<Connection>>(&reply.body).map_err(parse_err)?),
            None,
        ),
        CtlCommand::Activate { .. } | CtlCommand::Add { .. } => {
            let b: Backend = parse(&reply.body).map_err(parse_err)?;
            (render::backends(std::slice::from_ref(&b)), None)
        }
        CtlCommand::Remove { .. } => {
            let r: Removed = parse(&reply.body).map_err(parse_err)?;
            (render::removed(&r), None)
        }
        CtlCommand::Rebalance { .. } => {
            let r: Rebalance = parse(&reply.body).map_err(parse_err)?;
            (render::rebalance(&r), None)
        }
        CtlCommand::Transfer { id, .. } => {
            let t: Transfer = parse(&reply.body).map_err(parse_err)?;
            if t.outcome == "success" {
                (render::transfer(id, &t), None)
            } else {
                (
                    String::new(),
                    Some(format!(
                        "transfer of {id} failed ({}): {}",
                        t.outcome,
                        t.reason.as_deref().unwrap_or("no reason given")
                    )),
                )
            }
        }
        CtlCommand::Switchover { from, to, .. } => {
            let r: Switchover = parse(&reply.body).map_err(parse_err)?;
            let problem = (r.outcome != "success").then(|| {
                format!(
                    "switchover {from} -> {to}: {} of {} sessions could not be moved and were closed",
                    r.sessions_failed, r.sessions_held
                )
            });
            (render::switchover(&r), problem)
        }
        CtlCommand::Handoff { status, timeout } => {
            let h: Handoff = parse(&reply.body).map_err(parse_err)?;
            let problem = if *status {
                None
            } else if reply.status == 202 {
                Some(format!(
                    "the hand-off is not over after {}; it goes on: follow it with \
                     `pgferry ctl handoff --status`",
                    timeout.map_or_else(|| "the time allowed".to_owned(), |t| t.to_string())
                ))
            } else if h.phase != "done" {
                Some(format!("the hand-off ended {}", h.phase))
            } else if h.kept > 0 && h.role.as_deref() != Some("new") {
                Some(format!(
                    "{} session(s) were not at a safe point in time and stay with pid {} \
                     until they end (closed with 57P01 after shutdown_timeout)",
                    h.kept, h.pid
                ))
            } else {
                None
            };
            (render::handoff(&h), problem)
        }
        CtlCommand::Drain { name, .. } => {
            let d: Drain = parse(&reply.body).map_err(parse_err)?;
            let problem = (d.remaining > 0 || d.failed > 0).then(|| {
                format!(
                    "drain of {name} incomplete: {} still on it, {} failed to move; \
                     it takes no new sessions until `pgferry ctl activate {name}`",
                    d.remaining, d.failed
                )
            });
            (render::drain(&d), problem)
        }
    })
}

/// `POST /v1/handoff` got no answer: the old process may have handed
/// everything over and exited before writing it. `followup` is a later
/// `GET /v1/handoff`; when a new process answers it, having taken over
/// from `old_pid`, the hand-off went through.
pub fn handoff_answer_lost(
    old_pid: i64,
    error: &ClientError,
    followup: Option<&Reply>,
    json_out: bool,
) -> Outcome {
    let taken_over = followup
        .filter(|r| r.is_success())
        .and_then(|r| Some((r, serde_json::from_str::<Handoff>(&r.body).ok()?)))
        .filter(|(_, h)| {
            h.pid != old_pid && h.role.as_deref() == Some("new") && h.peer_pid == Some(old_pid)
        });
    match taken_over {
        Some((reply, h)) => Outcome {
            stdout: Some(if json_out {
                reply.body.clone()
            } else {
                format!(
                    "hand-off done: pid {} serves now; pid {old_pid} ended before it could \
                     answer\n  {}\n",
                    h.pid,
                    render::handoff(&h)
                )
            }),
            stderr: Vec::new(),
            ok: true,
        },
        None => Outcome {
            stdout: None,
            stderr: vec![
                error.to_string(),
                "the hand-off may still be running or be over: `pgferry ctl handoff --status` \
                 says where it stands"
                    .to_owned(),
            ],
            ok: false,
        },
    }
}

/// One line saying what the server refused and why.
fn refusal(cmd: &CtlCommand, reply: &Reply) -> String {
    let body: ErrorBody = serde_json::from_str(&reply.body).unwrap_or_default();
    let why = body
        .error
        .clone()
        .or_else(|| body.reason.clone())
        .unwrap_or_else(|| {
            let text = excerpt(&reply.body);
            if text.is_empty() {
                "no explanation given".to_owned()
            } else {
                text
            }
        });
    let what = match cmd {
        CtlCommand::Backends | CtlCommand::Top { .. } => "listing backends".to_owned(),
        CtlCommand::Connections => "listing connections".to_owned(),
        CtlCommand::Transfer { id, .. } => format!("transfer of {id}"),
        CtlCommand::Drain { name, .. } => format!("drain of {name}"),
        CtlCommand::Activate { name } => format!("activating {name}"),
        CtlCommand::Rebalance { .. } => "rebalance".to_owned(),
        CtlCommand::Add { name, .. } => format!("adding {name}"),
        CtlCommand::Remove { name, .. } => format!("removing {name}"),
        CtlCommand::Switchover { from, to, .. } => format!("switchover {from} -> {to}"),
        CtlCommand::Handoff { status: true, .. } => "hand-off status".to_owned(),
        CtlCommand::Handoff { .. } => "hand-off".to_owned(),
    };
    // 4xx: the server would not; 5xx: it tried and could not.
    let verb = if reply.status < 500 {
        "refused"
    } else {
        "failed"
    };
    let mut line = format!("{what} {verb} (HTTP {}): {why}", reply.status);
    // What the status means for the session or backend, when it says more
    // than the message does.
    match (cmd, body.outcome.as_deref(), body.sessions) {
        (CtlCommand::Transfer { .. }, Some("recoverable_error"), _) => {
            line.push_str(" (the session was not touched)")
        }
        (CtlCommand::Transfer { .. }, Some("fatal_error"), _) => {
            line.push_str(" (the session was closed)")
        }
        (CtlCommand::Transfer { .. }, Some("session_ended"), _) => {
            line.push_str(" (its backend ended the session; the client got the server's error)")
        }
        (CtlCommand::Remove { force: false, .. }, _, Some(n)) if n > 0 => {
            line.push_str(" (--force closes them)")
        }
        (CtlCommand::Switchover { from, .. }, Some("failed"), _) => line.push_str(&format!(
            " (the promotion was asked for and did not finish: {from} stays fenced read-only, \
             its sessions were released there; see docs/switchover.md)"
        )),
        (CtlCommand::Handoff { .. }, _, _)
            if serde_json::from_str::<Handoff>(&reply.body).is_ok_and(|h| h.phase == "aborted") =>
        {
            line.push_str(
                " (this pgferry serves on, every session it did not hand over included; \
                 it accepts connections again)",
            )
        }
        (CtlCommand::Switchover { .. }, Some("aborted"), _) => {
            line.push_str(" (nothing changed; every session was released)");
            if let Ok(r) = serde_json::from_str::<Switchover>(&reply.body) {
                if !r.blocked.is_empty() {
                    line.push_str(&format!("; blocked by: {}", r.blocked.join(", ")));
                }
            }
        }
        _ => {}
    }
    if reply.status == 401 {
        line.push_str(" (set --token or PGFERRY_ADMIN_TOKEN)");
    }
    line
}

/// The start of a body that is not the JSON we expected, on one line.
fn excerpt(body: &str) -> String {
    let one_line: String = body
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const BASE: &str = "http://127.0.0.1:9930";

    fn reply(status: u16, body: &str) -> Result<Reply, ClientError> {
        Ok(Reply {
            status,
            body: body.to_owned(),
        })
    }

    fn drain_cmd() -> CtlCommand {
        CtlCommand::Drain {
            name: "pg1".into(),
            timeout: None,
        }
    }

    fn transfer_cmd() -> CtlCommand {
        CtlCommand::Transfer {
            id: "abc".into(),
            to: Some("pg2".into()),
            timeout: None,
        }
    }

    #[test]
    fn requests_carry_timeouts_in_milliseconds() {
        let t: Timeout = "1m30s".parse().expect("timeout");
        let r = plan(&CtlCommand::Drain {
            name: "pg 1".into(),
            timeout: Some(t),
        });
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.path, "/v1/backends/pg%201/drain");
        assert_eq!(r.body, Some(json!({"timeout_ms": 90_000})));
        assert_eq!(r.wait, Wait::Deadline(Duration::from_secs(90)));

        let r = plan(&drain_cmd());
        assert_eq!(r.body, Some(json!({})));
        assert_eq!(r.wait, Wait::ServerDeadline);

        let r = plan(&CtlCommand::Transfer {
            id: "abc".into(),
            to: Some("pg2".into()),
            timeout: Some("15s".parse().expect("timeout")),
        });
        assert_eq!(r.path, "/v1/connections/abc/transfer");
        assert_eq!(r.body, Some(json!({"to": "pg2", "timeout_ms": 15_000})));

        let r = plan(&CtlCommand::Rebalance { timeout: None });
        assert_eq!((r.method, r.path.as_str()), (Method::Post, "/v1/rebalance"));
    }

    #[test]
    fn other_requests() {
        let r = plan(&CtlCommand::Add {
            name: "pg3".into(),
            address: "127.0.0.1:5434".into(),
        });
        assert_eq!((r.method, r.path.as_str()), (Method::Post, "/v1/backends"));
        assert_eq!(
            r.body,
            Some(json!({"name": "pg3", "address": "127.0.0.1:5434"}))
        );
        let r = plan(&CtlCommand::Remove {
            name: "pg3".into(),
            force: true,
        });
        assert_eq!(
            (r.method, r.path.as_str()),
            (Method::Delete, "/v1/backends/pg3?force=true")
        );
        let r = plan(&CtlCommand::Remove {
            name: "pg3".into(),
            force: false,
        });
        assert_eq!(r.path, "/v1/backends/pg3");
        let r = plan(&CtlCommand::Activate { name: "pg1".into() });
        assert_eq!(
            (r.method, r.path.as_str(), r.body),
            (Method::Post, "/v1/backends/pg1/activate", None)
        );
        assert_eq!(plan(&CtlCommand::Backends).method, Method::Get);
        assert_eq!(plan(&CtlCommand::Connections).path, "/v1/connections");
    }

    fn switchover_cmd() -> CtlCommand {
        CtlCommand::Switchover {
            from: "pg1".into(),
            to: "pg2".into(),
            timeout: Some("5s".parse().expect("timeout")),
        }
    }

    #[test]
    fn switchovers() {
        let r = plan(&switchover_cmd());
        assert_eq!(
            (r.method, r.path.as_str()),
            (Method::Post, "/v1/switchover")
        );
        assert_eq!(
            r.body,
            Some(json!({"from": "pg1", "to": "pg2", "timeout_ms": 5_000}))
        );
        let done = r#"{"outcome":"success","from":"pg1","to":"pg2","phases":[{"phase":"hold","ms":2.0}],
            "sessions_held":3,"sessions_moved":3,"sessions_failed":0,"failures":[],"blocked":[],
            "longest_pause_ms":120.0,"duration_ms":130.0}"#;
        let o = interpret(&switchover_cmd(), BASE, reply(200, done), false);
        assert!(o.ok, "{o:?}");
        let text = o.stdout.unwrap_or_default();
        assert!(
            text.contains("moved 3 of 3 held") && text.contains("hold 2.0 ms"),
            "{text}"
        );

        let partial = done
            .replace("\"success\"", "\"partial\"")
            .replace("\"sessions_moved\":3", "\"sessions_moved\":2")
            .replace("\"sessions_failed\":0", "\"sessions_failed\":1");
        let o = interpret(&switchover_cmd(), BASE, reply(200, &partial), false);
        assert!(!o.ok, "a partial switchover fails the command");

        let aborted = r#"{"outcome":"aborted","from":"pg1","to":"pg2","reason":"1 session(s) not at a safe point",
            "phases":[],"sessions_held":2,"sessions_moved":0,"sessions_failed":0,"failures":[],
            "blocked":["4b0c6a8e"],"longest_pause_ms":0.0,"duration_ms":5000.0}"#;
        let o = interpret(&switchover_cmd(), BASE, reply(409, aborted), false);
        assert!(!o.ok);
        let line = o.stderr.join("\n");
        assert!(
            line.contains("nothing changed") && line.contains("4b0c6a8e"),
            "{line}"
        );
    }

    fn handoff_cmd() -> CtlCommand {
        CtlCommand::Handoff {
            timeout: None,
            status: false,
        }
    }

    #[test]
    fn handoffs() {
        let r = plan(&handoff_cmd());
        assert_eq!((r.method, r.path.as_str()), (Method::Post, "/v1/handoff"));
        assert_eq!(r.body, Some(json!({})));
        assert_eq!(r.wait, Wait::ServerDeadline);
        let r = plan(&CtlCommand::Handoff {
            timeout: Some("2m".parse().expect("timeout")),
            status: false,
        });
        assert_eq!(r.body, Some(json!({"timeout_ms": 120_000})));
        assert_eq!(r.wait, Wait::Deadline(Duration::from_secs(120)));
        let r = plan(&CtlCommand::Handoff {
            timeout: None,
            status: true,
        });
        assert_eq!(
            (r.method, r.path.as_str(), r.body),
            (Method::Get, "/v1/handoff", None)
        );

        let done = r#"{"phase":"done","role":"old","peer_pid":20,"handed_over":3,"kept":0,
            "resumed":0,"remaining":0,"error":null,"pid":10}"#;
        let o = interpret(&handoff_cmd(), BASE, reply(200, done), false);
        assert!(o.ok, "{o:?}");
        assert!(
            o.stdout
                .as_deref()
                .is_some_and(|t| t.starts_with("hand-off done: pid 20 serves now")),
            "{o:?}"
        );
        let o = interpret(&handoff_cmd(), BASE, reply(200, done), true);
        assert_eq!((o.ok, o.stdout.as_deref()), (true, Some(done)));

        // Done, but some sessions stay behind: the command fails.
        let kept = done.replace("\"kept\":0", "\"kept\":2");
        let o = interpret(&handoff_cmd(), BASE, reply(200, &kept), false);
        assert!(!o.ok);
        assert!(o.stderr[0].contains("2 session(s)"), "{o:?}");

        let aborted = r#"{"phase":"aborted","role":"old","peer_pid":20,"handed_over":1,"kept":0,
            "resumed":2,"remaining":5,"error":"the new process ended the hand-off","pid":10}"#;
        let o = interpret(&handoff_cmd(), BASE, reply(409, aborted), false);
        assert!(!o.ok);
        assert_eq!(o.stdout, None);
        assert!(
            o.stderr[0].starts_with(
                "hand-off refused (HTTP 409): the new process ended the hand-off (this pgferry serves on"
            ),
            "{o:?}"
        );
        let busy = r#"{"error":"a hand-off is already running"}"#;
        let o = interpret(&handoff_cmd(), BASE, reply(409, busy), true);
        assert!(!o.ok);
        assert_eq!(o.stdout.as_deref(), Some(busy));
        assert_eq!(
            o.stderr,
            vec!["hand-off refused (HTTP 409): a hand-off is already running"]
        );

        // Not over within --timeout: the server says where it is.
        let running = r#"{"phase":"handing_over","role":"old","peer_pid":20,"handed_over":1,
            "kept":0,"resumed":0,"remaining":4,"error":null,"pid":10}"#;
        let cmd = CtlCommand::Handoff {
            timeout: Some("5s".parse().expect("timeout")),
            status: false,
        };
        let o = interpret(&cmd, BASE, reply(202, running), false);
        assert!(!o.ok);
        assert!(
            o.stderr[0].contains("not over after 5s") && o.stderr[0].contains("--status"),
            "{o:?}"
        );

        // --status: any phase is an answer.
        let status = CtlCommand::Handoff {
            timeout: None,
            status: true,
        };
        let o = interpret(&status, BASE, reply(200, running), false);
        assert!(o.ok, "{o:?}");
        assert!(o.stdout.as_deref().is_some_and(|t| t.contains("4 left")));
    }

    #[test]
    fn a_handoff_whose_answer_was_lost_is_judged_by_who_serves_now() {
        let lost = ClientError::Unreachable {
            url: BASE.into(),
            reason: "connection reset".into(),
        };
        let new = Reply {
            status: 200,
            body: r#"{"phase":"taking_over","role":"new","peer_pid":10,"handed_over":3,"kept":0,
                "resumed":0,"remaining":0,"error":null,"pid":20}"#
                .into(),
        };
        let o = handoff_answer_lost(10, &lost, Some(&new), false);
        assert!(o.ok, "{o:?}");
        assert!(
            o.stdout
                .as_deref()
                .is_some_and(|t| t.starts_with("hand-off done: pid 20 serves now")),
            "{o:?}"
        );
        let o = handoff_answer_lost(10, &lost, Some(&new), true);
        assert_eq!(o.stdout.as_deref(), Some(new.body.as_str()));

        // The old process itself, or a new one that took over from someone
        // else, or nobody: not known to be done.
        let old = Reply {
            status: 200,
            body: r#"{"phase":"handing_over","role":"old","peer_pid":20,"pid":10}"#.into(),
        };
        let stranger = Reply {
            status: 200,
            body: r#"{"phase":"taking_over","role":"new","peer_pid":7,"pid":20}"#.into(),
        };
        for followup in [Some(&old), Some(&stranger), None] {
            let o = handoff_answer_lost(10, &lost, followup, false);
            assert!(!o.ok, "{followup:?}");
            assert!(o.stderr[0].contains("connection reset"), "{o:?}");
            assert!(o.stderr[1].contains("--status"), "{o:?}");
        }
    }

    #[test]
    fn a_clean_drain_succeeds() {
        let body = r#"{"backend":"pg1","moved":2,"failed":0,"remaining":0,"failures":[],"duration_ms":5.0}"#;
        let o = interpret(&drain_cmd(), BASE, reply(200, body), false);
        assert!(o.ok, "{o:?}");
        assert!(o.stderr.is_empty());
        assert_eq!(
            o.stdout.as_deref(),
            Some("drain pg1: moved 2, failed 0, remaining 0 in 5.0 ms\n")
        );
        let o = interpret(&drain_cmd(), BASE, reply(200, body), true);
        assert!(o.ok);
        assert_eq!(o.stdout.as_deref(), Some(body));
    }

    #[test]
    fn a_drain_that_leaves_sessions_or_failures_fails() {
        for (remaining, failed) in [(1, 0), (0, 1), (3, 2)] {
            let body = format!(
                r#"{{"backend":"pg1","moved":0,"failed":{failed},"remaining":{remaining},"failures":[],"duration_ms":60000.0}}"#
            );
            for json_out in [false, true] {
                let o = interpret(&drain_cmd(), BASE, reply(200, &body), json_out);
                assert!(!o.ok, "{o:?}");
                assert_eq!(o.stderr.len(), 1);
                assert!(o.stderr[0].contains("incomplete"), "{o:?}");
                if json_out {
                    assert_eq!(o.stdout.as_deref(), Some(body.as_str()));
                }
            }
        }
    }

    #[test]
    fn transfer_outcomes() {
        let ok =
            r#"{"outcome":"success","from":"pg1","to":"pg2","duration_ms":3.0,"pause_ms":1.0}"#;
        let o = interpret(&transfer_cmd(), BASE, reply(200, ok), false);
        assert!(o.ok);
        assert!(o
            .stdout
            .as_deref()
            .is_some_and(|s| s.starts_with("moved abc from pg1 to pg2")));

        let busy = r#"{"outcome":"recoverable_error","reason":"session is in COPY"}"#;
        let o = interpret(&transfer_cmd(), BASE, reply(409, busy), true);
        assert!(!o.ok);
        assert_eq!(
            o.stdout.as_deref(),
            Some(busy),
            "--json prints error bodies too"
        );
        assert_eq!(
            o.stderr,
            vec!["transfer of abc refused (HTTP 409): session is in COPY (the session was not touched)"]
        );

        let dead = r#"{"outcome":"fatal_error","reason":"backend went away"}"#;
        let o = interpret(&transfer_cmd(), BASE, reply(500, dead), false);
        assert!(!o.ok);
        assert_eq!(o.stdout, None);
        assert_eq!(
            o.stderr,
            vec!["transfer of abc failed (HTTP 500): backend went away (the session was closed)"]
        );

        // A 200 that is not a success still fails.
        let odd = r#"{"outcome":"recoverable_error","reason":"why not"}"#;
        let o = interpret(&transfer_cmd(), BASE, reply(200, odd), false);
        assert!(!o.ok);
        assert!(o.stderr[0].contains("why not"), "{o:?}");
    }

    #[test]
    fn error_statuses_fail_with_the_servers_message() {
        let o = interpret(
            &CtlCommand::Activate {
                name: "nope".into(),
            },
            BASE,
            reply(404, r#"{"error":"no such backend"}"#),
            false,
        );
        assert!(!o.ok);
        assert_eq!(o.stdout, None);
        assert_eq!(
            o.stderr,
            vec!["activating nope refused (HTTP 404): no such backend"]
        );

        let o = interpret(
            &CtlCommand::Remove {
                name: "pg1".into(),
                force: false,
            },
            BASE,
            reply(409, r#"{"error":"backend has sessions","sessions":4}"#),
            false,
        );
        assert_eq!(
            o.stderr,
            vec!["removing pg1 refused (HTTP 409): backend has sessions (--force closes them)"]
        );

        let o = interpret(
            &CtlCommand::Backends,
            BASE,
            reply(401, r#"{"error":"missing or wrong bearer token"}"#),
            false,
        );
        assert!(o.stderr[0].contains("PGFERRY_ADMIN_TOKEN"), "{o:?}");

        // Not JSON at all, or nothing.
        let o = interpret(
            &CtlCommand::Backends,
            BASE,
            reply(502, "Bad Gateway\n"),
            false,
        );
        assert_eq!(
            o.stderr,
            vec!["listing backends failed (HTTP 502): Bad Gateway"]
        );
        let o = interpret(
            &CtlCommand::Rebalance { timeout: None },
            BASE,
            reply(405, ""),
            true,
        );
        assert!(!o.ok);
        assert_eq!(o.stdout.as_deref(), Some(""));
        assert!(o.stderr[0].contains("no explanation"), "{o:?}");
    }

    #[test]
    fn unexpected_bodies_fail_without_panicking() {
        for body in ["", "[", "{}", r#"[{"name":1}]"#, "null"] {
            let o = interpret(&CtlCommand::Backends, BASE, reply(200, body), false);
            assert!(!o.ok, "{body}");
            assert!(o.stderr[0].contains("unexpected answer from http://127.0.0.1:9930"));
        }
    }

    #[test]
    fn unreachable_servers_fail_with_the_url() {
        let e = ClientError::Unreachable {
            url: BASE.into(),
            reason: "Connection refused (os error 111)".into(),
        };
        let o = interpret(&CtlCommand::Backends, BASE, Err(e), true);
        assert!(!o.ok);
        assert_eq!(o.stdout, None);
        assert!(o.stderr[0].contains(BASE) && o.stderr[0].contains("refused"));
    }

    #[test]
    fn listings_render_tables_or_pass_json_through() {
        let body =
            r#"[{"name":"pg1","address":"h:1","state":"active","healthy":true,"sessions":0}]"#;
        let o = interpret(&CtlCommand::Backends, BASE, reply(200, body), false);
        assert!(o.ok);
        assert!(o.stdout.as_deref().is_some_and(|s| s.starts_with("NAME")));
        let o = interpret(&CtlCommand::Backends, BASE, reply(200, body), true);
        assert_eq!(o.stdout.as_deref(), Some(body));
        // A rebalance with failed moves is still a finished rebalance.
        let r = r#"{"moves":[{"id":"a","from":"pg1","to":"pg2","outcome":"fatal_error","reason":"x"}],"moved":0,"failed":1,"backends":[]}"#;
        assert!(
            interpret(
                &CtlCommand::Rebalance { timeout: None },
                BASE,
                reply(200, r),
                false
            )
            .ok
        );
    }

    #[test]
    fn excerpts_are_short_and_on_one_line() {
        assert_eq!(excerpt("  a\nb  "), "a b");
        let long = "é".repeat(500);
        let e = excerpt(&long);
        assert_eq!(e.chars().count(), 203);
    }
}
