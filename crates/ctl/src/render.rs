//! Human-readable output: aligned tables and one-line summaries. Pure
//! functions from answers to text, so they are tested without a server.

use crate::model::{
    Backend, Connection, Drain, Handoff, Rebalance, Removed, Switchover, SwitchoverProgress,
    Transfer,
};

/// Left-aligned columns, two spaces apart, no trailing blanks.
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = widths[c].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Keeps a cell on one line whatever the server put in it.
pub(crate) fn cell(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub(crate) fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// `12.3 ms` below a second, `2.35 s` above.
pub fn millis(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// RFC 3339 without the milliseconds: the column stays narrow and a
/// second is precise enough to tell sessions apart by age.
fn short_time(t: &str) -> String {
    match t.split_once('.') {
        Some((head, tail)) if tail.ends_with('Z') => format!("{head}Z"),
        Some((head, tail)) => {
            // An offset such as +02:00 follows the fraction.
            match tail.find(['+', '-']) {
                Some(i) => format!("{head}{}", &tail[i..]),
                None => head.to_owned(),
            }
        }
        None => t.to_owned(),
    }
}

pub(crate) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub fn backends(list: &[Backend]) -> String {
    let mut t = Table::new(&[
        "NAME", "ADDRESS", "STATE", "HEALTHY", "SESSIONS", "ROLE", "CLUSTER", "DIALECT",
    ]);
    for b in list {
        t.row(vec![
            cell(&b.name),
            cell(&b.address),
            cell(&b.state),
            yes_no(b.healthy),
            b.sessions.to_string(),
            cell(b.role.as_deref().unwrap_or("-")),
            cell(b.cluster.as_deref().unwrap_or("-")),
            cell(b.dialect.as_deref().unwrap_or("-")),
        ]);
    }
    t.render()
}

pub fn switchover(s: &Switchover) -> String {
    let mut out = if s.outcome == "aborted" {
        format!(
            "switchover {} -> {} aborted after {}, nothing changed: {}\n",
            cell(&s.from),
            cell(&s.to),
            millis(s.duration_ms),
            cell(s.reason.as_deref().unwrap_or("no reason given"))
        )
    } else {
        format!(
            "switchover {} -> {}: {}, moved {} of {} held, failed {} in {} (longest pause {})\n",
            cell(&s.from),
            cell(&s.to),
            cell(&s.outcome),
            s.sessions_moved,
            s.sessions_held,
            s.sessions_failed,
            millis(s.duration_ms),
            millis(s.longest_pause_ms)
        )
    };
    if !s.phases.is_empty() {
        let phases: Vec<String> = s
            .phases
            .iter()
            .map(|p| format!("{} {}", cell(&p.phase), millis(p.ms)))
            .collect();
        out.push_str(&format!("  phases: {}\n", phases.join(", ")));
    }
    if !s.blocked.is_empty() {
        out.push_str("\nblocked by:\n");
        for id in &s.blocked {
            out.push_str(&format!("  {}\n", cell(id)));
        }
    }
    if !s.failures.is_empty() {
        let mut t = Table::new(&["ID", "REASON"]);
        for f in &s.failures {
            t.row(vec![cell(&f.id), cell(&f.reason)]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

pub fn switchover_progress(p: &SwitchoverProgress) -> String {
    format!(
        "switchover: {}, {} of {} held",
        p.phase.as_deref().map(cell).unwrap_or_else(|| "?".into()),
        p.held,
        p.sessions
    )
}

pub fn connections(list: &[Connection]) -> String {
    let mut t = Table::new(&[
        "ID",
        "USER",
        "DATABASE",
        "APPLICATION",
        "BACKEND",
        "STATE",
        "MIGRATIONS",
        "CONNECTED",
    ]);
    for c in list {
        t.row(vec![
            cell(&c.id),
            cell(&c.user),
            cell(&c.database),
            match c.application_name.as_deref() {
                Some(a) if !a.is_empty() => cell(a),
                _ => "-".to_owned(),
            },
            cell(&c.backend),
            cell(&c.state),
            c.migrations.to_string(),
            cell(&short_time(&c.connected_at)),
        ]);
    }
    t.render()
}

pub fn transfer(id: &str, t: &Transfer) -> String {
    let mut line = format!(
        "moved {} from {} to {}",
        cell(id),
        cell(t.from.as_deref().unwrap_or("?")),
        cell(t.to.as_deref().unwrap_or("?"))
    );
    if let Some(d) = t.duration_ms {
        line.push_str(&format!(" in {}", millis(d)));
    }
    if let Some(p) = t.pause_ms {
        line.push_str(&format!(" (client paused {})", millis(p)));
    }
    line.push('\n');
    line
}

pub fn drain(d: &Drain) -> String {
    let mut out = format!(
        "drain {}: moved {}, failed {}, remaining {} in {}\n",
        cell(&d.backend),
        d.moved,
        d.failed,
        d.remaining,
        millis(d.duration_ms)
    );
    if !d.failures.is_empty() {
        let mut t = Table::new(&["ID", "REASON"]);
        for f in &d.failures {
            t.row(vec![cell(&f.id), cell(&f.reason)]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

pub fn rebalance(r: &Rebalance) -> String {
    let mut out = if r.moves.is_empty() {
        "rebalance: nothing to move\n".to_owned()
    } else {
        format!("rebalance: moved {}, failed {}\n", r.moved, r.failed)
    };
    if !r.moves.is_empty() {
        let mut t = Table::new(&["ID", "FROM", "TO", "OUTCOME", "REASON"]);
        for m in &r.moves {
            t.row(vec![
                cell(&m.id),
                cell(&m.from),
                cell(&m.to),
                cell(&m.outcome),
                cell(m.reason.as_deref().unwrap_or("-")),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if !r.backends.is_empty() {
        out.push('\n');
        out.push_str(&backends(&r.backends));
    }
    out
}

pub fn removed(r: &Removed) -> String {
    format!(
        "removed {} (closed {})\n",
        cell(&r.removed),
        plural(r.closed, "session", "sessions")
    )
}

/// One line of drain progress.
pub fn drain_progress(name: &str, sessions: u64) -> String {
    format!(
        "draining {}: {} left",
        cell(name),
        plural(sessions, "session", "sessions")
    )
}

/// A hand-off's status in one line, from the side of the process that
/// answered (`role`); also the progress lines.
pub fn handoff(h: &Handoff) -> String {
    let me = format!("pid {}", h.pid);
    let peer = h
        .peer_pid
        .map(|p| format!("pid {p}"))
        .unwrap_or_else(|| "the other process".to_owned());
    let error = cell(h.error.as_deref().unwrap_or("no reason given"));
    match (h.phase.as_str(), h.role.as_deref()) {
        ("idle", _) => format!("hand-off: none yet ({me} answered)"),
        ("taking_over", _) => format!(
            "hand-off: {me} is taking over from {peer}: adopted {}, refused {}",
            h.handed_over, h.kept
        ),
        ("done", Some("new")) => format!(
            "hand-off done: {me} serves, it took over from {peer} (adopted {}, refused {})",
            h.handed_over, h.kept
        ),
        ("done", _) => {
            let mut line = format!(
                "hand-off done: {peer} serves now, {me} handed over {}, resumed {}",
                plural(h.handed_over, "session", "sessions"),
                h.resumed
            );
            if h.kept > 0 {
                line.push_str(&format!(
                    "; {} stay with {me} until they end (57P01 after shutdown_timeout)",
                    h.kept
                ));
            }
            line
        }
        ("aborted", _) => format!(
            "hand-off aborted: {me} serves on, every session it did not hand over included \
             (handed over {}, resumed {}): {error}",
            h.handed_over, h.resumed
        ),
        (phase, _) => format!(
            "hand-off: {}, {me} -> {peer}: handed over {}, kept {}, {} left",
            cell(phase),
            h.handed_over,
            h.kept,
            h.remaining
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
    }

    #[test]
    fn backends_table_is_aligned() {
        let list: Vec<Backend> = parse(
            r#"[{"name":"pg1","address":"127.0.0.1:5432","state":"active","healthy":true,"sessions":12,
                 "role":"primary","cluster":"main","dialect":"postgres"},
                {"name":"replica-two","address":"10.0.0.2:5432","state":"draining","healthy":false,"sessions":3}]"#,
        );
        assert_eq!(
            backends(&list),
            "NAME         ADDRESS         STATE     HEALTHY  SESSIONS  ROLE     CLUSTER  DIALECT\n\
             pg1          127.0.0.1:5432  active    yes      12        primary  main     postgres\n\
             replica-two  10.0.0.2:5432   draining  no       3         -        -        -\n"
        );
    }

    #[test]
    fn empty_lists_still_show_headers() {
        assert_eq!(
            backends(&[]),
            "NAME  ADDRESS  STATE  HEALTHY  SESSIONS  ROLE  CLUSTER  DIALECT\n"
        );
        assert!(connections(&[]).starts_with("ID  USER  DATABASE  APPLICATION"));
    }

    #[test]
    fn connections_table_shows_every_column() {
        let list: Vec<Connection> = parse(
            r#"[{"id":"0b6f2c1e-3f4a-4c5d-9e8f-001122334455","client_addr":"127.0.0.1:50000",
                 "user":"app","database":"app","application_name":"psql","backend":"pg1",
                 "connected_at":"2025-03-01T10:20:30.456Z","migrations":2,"state":"idle"},
                {"id":"1c7f3d2f-4a5b-4d6e-8f90-112233445566","client_addr":"127.0.0.1:50001",
                 "user":"reporting","database":"app","application_name":null,"backend":"pg2",
                 "connected_at":"2025-03-01T10:21:00.000Z","migrations":0,"state":"in_transaction"}]"#,
        );
        let text = connections(&list);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            lines[0],
            "ID                                    USER       DATABASE  APPLICATION  BACKEND  STATE           MIGRATIONS  CONNECTED"
        );
        assert_eq!(
            lines[1],
            "0b6f2c1e-3f4a-4c5d-9e8f-001122334455  app        app       psql         pg1      idle            2           2025-03-01T10:20:30Z"
        );
        assert_eq!(
            lines[2],
            "1c7f3d2f-4a5b-4d6e-8f90-112233445566  reporting  app       -            pg2      in_transaction  0           2025-03-01T10:21:00Z"
        );
    }

    #[test]
    fn cells_stay_on_one_line() {
        let list: Vec<Backend> = parse(
            r#"[{"name":"evil\nname","address":"a\tb","state":"active","healthy":true,"sessions":0}]"#,
        );
        let text = backends(&list);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("evil name"), "{text}");
    }

    #[test]
    fn times_lose_only_the_fraction() {
        assert_eq!(
            short_time("2025-03-01T10:20:30.456Z"),
            "2025-03-01T10:20:30Z"
        );
        assert_eq!(
            short_time("2025-03-01T10:20:30.456+02:00"),
            "2025-03-01T10:20:30+02:00"
        );
        assert_eq!(short_time("2025-03-01T10:20:30Z"), "2025-03-01T10:20:30Z");
        assert_eq!(short_time("whenever"), "whenever");
    }

    #[test]
    fn transfer_summary() {
        let t: Transfer = parse(
            r#"{"outcome":"success","from":"pg1","to":"pg2","duration_ms":12.34,"pause_ms":4.06}"#,
        );
        assert_eq!(
            transfer("abc", &t),
            "moved abc from pg1 to pg2 in 12.3 ms (client paused 4.1 ms)\n"
        );
    }

    #[test]
    fn drain_summary_lists_failures() {
        let clean: Drain = parse(
            r#"{"backend":"pg1","moved":12,"failed":0,"remaining":0,"failures":[],"duration_ms":2345.6}"#,
        );
        assert_eq!(
            drain(&clean),
            "drain pg1: moved 12, failed 0, remaining 0 in 2.35 s\n"
        );
        let partial: Drain = parse(
            r#"{"backend":"pg1","moved":1,"failed":1,"remaining":1,
                "failures":[{"id":"0b6f","reason":"backend pg2 refused: too many connections"}],
                "duration_ms":60000.0}"#,
        );
        assert_eq!(
            drain(&partial),
            "drain pg1: moved 1, failed 1, remaining 1 in 60.00 s\n\
             \n\
             ID    REASON\n\
             0b6f  backend pg2 refused: too many connections\n"
        );
    }

    #[test]
    fn rebalance_summary_lists_moves_then_backends() {
        let r: Rebalance = parse(
            r#"{"moves":[{"id":"a1","from":"pg1","to":"pg2","outcome":"success","reason":null},
                         {"id":"b22","from":"pg1","to":"pg2","outcome":"recoverable_error","reason":"in COPY"}],
                "moved":1,"failed":1,
                "backends":[{"name":"pg1","address":"h:1","state":"active","healthy":true,"sessions":5},
                            {"name":"pg2","address":"h:2","state":"active","healthy":true,"sessions":4}]}"#,
        );
        assert_eq!(
            rebalance(&r),
            "rebalance: moved 1, failed 1\n\
             \n\
             ID   FROM  TO   OUTCOME            REASON\n\
             a1   pg1   pg2  success            -\n\
             b22  pg1   pg2  recoverable_error  in COPY\n\
             \n\
             NAME  ADDRESS  STATE   HEALTHY  SESSIONS  ROLE  CLUSTER  DIALECT\n\
             pg1   h:1      active  yes      5         -     -        -\n\
             pg2   h:2      active  yes      4         -     -        -\n"
        );
        let idle: Rebalance = parse(r#"{"moves":[],"moved":0,"failed":0,"backends":[]}"#);
        assert_eq!(rebalance(&idle), "rebalance: nothing to move\n");
    }

    #[test]
    fn small_summaries() {
        assert_eq!(
            removed(&parse(r#"{"removed":"pg3","closed":1}"#)),
            "removed pg3 (closed 1 session)\n"
        );
        assert_eq!(drain_progress("pg1", 12), "draining pg1: 12 sessions left");
        assert_eq!(drain_progress("pg1", 1), "draining pg1: 1 session left");
        assert_eq!(millis(0.04), "0.0 ms");
        assert_eq!(millis(999.94), "999.9 ms");
        assert_eq!(millis(1500.0), "1.50 s");
    }

    #[test]
    fn handoff_lines_say_who_serves() {
        let h: Handoff = parse(
            r#"{"phase":"done","role":"old","peer_pid":20,"handed_over":3,"kept":0,"resumed":1,
                "remaining":0,"error":null,"pid":10}"#,
        );
        assert_eq!(
            handoff(&h),
            "hand-off done: pid 20 serves now, pid 10 handed over 3 sessions, resumed 1"
        );
        let kept = Handoff {
            kept: 2,
            ..h.clone()
        };
        assert!(handoff(&kept)
            .ends_with("; 2 stay with pid 10 until they end (57P01 after shutdown_timeout)"));
        let aborted = Handoff {
            phase: "aborted".into(),
            error: Some("the new process ended the hand-off".into()),
            ..h.clone()
        };
        assert!(
            handoff(&aborted).starts_with("hand-off aborted: pid 10 serves on")
                && handoff(&aborted).ends_with(": the new process ended the hand-off"),
            "{}",
            handoff(&aborted)
        );
        let running = Handoff {
            phase: "handing_over".into(),
            remaining: 4,
            ..h.clone()
        };
        assert_eq!(
            handoff(&running),
            "hand-off: handing_over, pid 10 -> pid 20: handed over 3, kept 0, 4 left"
        );
        let new: Handoff = parse(r#"{"phase":"taking_over","role":"new","peer_pid":10,"pid":20}"#);
        assert_eq!(
            handoff(&new),
            "hand-off: pid 20 is taking over from pid 10: adopted 0, refused 0"
        );
        let idle: Handoff = parse(r#"{"phase":"idle","pid":10}"#);
        assert_eq!(handoff(&idle), "hand-off: none yet (pid 10 answered)");
    }
}
