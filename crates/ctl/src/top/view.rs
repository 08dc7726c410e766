//! What `ctl top` knows (the last polls) and the screen it makes of it.
//! Pure: no terminal and no network, so the screen is tested as text.

use std::time::{Duration, Instant};

use super::metrics::{Histogram, Sample};
use crate::model::Backend;
use crate::render::{cell, plural, yes_no, Table};

/// One round of requests to the admin API.
#[derive(Debug, Clone)]
pub struct Poll {
    pub at: Instant,
    /// `GET /v1/backends`, or why it could not be had.
    pub backends: Result<Vec<Backend>, String>,
    /// `GET /metrics`, or why it could not be had.
    pub metrics: Result<Sample, String>,
}

impl Poll {
    pub fn ok(&self) -> bool {
        self.backends.is_ok() && self.metrics.is_ok()
    }
}

/// The last good answers and the last errors.
#[derive(Debug)]
pub struct State {
    admin: String,
    interval: Duration,
    backends: Option<Vec<Backend>>,
    /// The scrape before `current`, and `current` (each with its time).
    previous: Option<(Instant, Sample)>,
    current: Option<(Instant, Sample)>,
    /// The last poll's errors, by source.
    errors: Vec<String>,
    /// When the polls started to fail (none failing: `None`).
    failing_since: Option<Instant>,
    /// Polls that failed in a row.
    failures: u64,
}

impl State {
    pub fn new(admin: &str, interval: Duration) -> Self {
        Self {
            admin: admin.to_owned(),
            interval,
            backends: None,
            previous: None,
            current: None,
            errors: Vec::new(),
            failing_since: None,
            failures: 0,
        }
    }

    /// Takes a poll in; what failed keeps its last good answer.
    pub fn update(&mut self, poll: Poll) {
        self.errors.clear();
        let ok = poll.ok();
        match poll.backends {
            Ok(list) => self.backends = Some(list),
            Err(e) => self.errors.push(format!("backends: {e}")),
        }
        match poll.metrics {
            Ok(sample) => self.previous = self.current.replace((poll.at, sample)),
            Err(e) => self.errors.push(format!("metrics: {e}")),
        }
        if ok {
            self.failing_since = None;
            self.failures = 0;
        } else {
            self.failing_since.get_or_insert(poll.at);
            self.failures += 1;
        }
    }

    /// The screen, one string per line (not cut to any width). `clock` is
    /// the wall-clock time to show.
    pub fn lines(&self, now: Instant, clock: &str) -> Vec<String> {
        let mut out = vec![format!(
            "pgferry top  {}  {clock}  every {}  (q quits)",
            cell(&self.admin),
            humantime::format_duration(self.interval)
        )];
        out.push(String::new());
        if !self.errors.is_empty() {
            let since = self
                .failing_since
                .map(|t| now.saturating_duration_since(t).as_secs())
                .unwrap_or(0);
            for e in &self.errors {
                out.push(format!("ERROR {}", cell(e)));
            }
            out.push(format!(
                "retrying every {}: {} in a row, for {since}s; below is the last good answer",
                humantime::format_duration(self.interval),
                plural(self.failures, "failed poll", "failed polls")
            ));
            out.push(String::new());
        }
        self.backend_lines(&mut out);
        out.push(String::new());
        self.migration_lines(&mut out);
        out.push(String::new());
        self.pause_line(&mut out);
        self.drain_line(&mut out);
        out
    }

    fn drains(&self) -> Option<&std::collections::BTreeMap<String, bool>> {
        self.current.as_ref().map(|(_, s)| &s.drains)
    }

    fn draining(&self, name: &str) -> bool {
        self.drains()
            .and_then(|d| d.get(name))
            .copied()
            .unwrap_or(false)
    }

    fn backend_lines(&self, out: &mut Vec<String>) {
        let Some(list) = &self.backends else {
            out.push("BACKENDS  (no answer yet)".to_owned());
            return;
        };
        let mut t = Table::new(&[
            "BACKEND", "ADDRESS", "STATE", "HEALTHY", "ROLE", "CLUSTER", "SESSIONS", "DRAIN",
        ]);
        for b in list {
            t.row(vec![
                cell(&b.name),
                cell(&b.address),
                cell(&b.state),
                yes_no(b.healthy),
                cell(b.role.as_deref().unwrap_or("-")),
                cell(b.cluster.as_deref().unwrap_or("-")),
                b.sessions.to_string(),
                if self.draining(&b.name) {
                    "running"
                } else {
                    "-"
                }
                .to_owned(),
            ]);
        }
        let total: u64 = list.iter().map(|b| b.sessions).sum();
        let mut total_row = vec![String::new(); 8];
        total_row[0] = "total".to_owned();
        total_row[6] = total.to_string();
        t.row(total_row);
        out.extend(t.render().lines().map(str::to_owned));
    }

    fn migration_lines(&self, out: &mut Vec<String>) {
        let Some((at, cur)) = &self.current else {
            out.push("MIGRATIONS  (no answer yet)".to_owned());
            return;
        };
        let rates = self
            .previous
            .as_ref()
            .map(|(pat, prev)| {
                let secs = at.saturating_duration_since(*pat).as_secs_f64();
                (secs, cur.outcomes.rate_since(&prev.outcomes, secs))
            })
            .filter(|(secs, _)| *secs > 0.0);
        let per = match &rates {
            Some((secs, _)) => format!("PER SECOND (last {secs:.1}s)"),
            None => "PER SECOND".to_owned(),
        };
        let mut t = Table::new(&["MIGRATIONS", &per, "TOTAL"]);
        let rate_rows = rates.map(|(_, r)| r.rows());
        for (i, (label, total)) in cur.outcomes.rows().into_iter().enumerate() {
            t.row(vec![
                label.to_owned(),
                rate_rows
                    .as_ref()
                    .map(|r| format!("{:.1}", r[i].1))
                    .unwrap_or_else(|| "-".to_owned()),
                count(total),
            ]);
        }
        out.extend(t.render().lines().map(str::to_owned));
    }

    fn pause_line(&self, out: &mut Vec<String>) {
        let Some((at, cur)) = &self.current else {
            return;
        };
        // Observations of the last interval when there were any; else all
        // since pgferry started (a cumulative estimate, as
        // histogram_quantile over the raw buckets gives).
        let recent = self
            .previous
            .as_ref()
            .and_then(|(pat, prev)| {
                let d = cur.pause.since(&prev.pause)?;
                let secs = at.saturating_duration_since(*pat).as_secs_f64();
                Some((d, secs))
            })
            .filter(|(d, _)| d.count() > 0.0);
        let (h, over): (&Histogram, String) = match &recent {
            Some((d, secs)) => (
                d,
                format!(
                    "last {secs:.1}s, {}",
                    plural(d.count() as u64, "migration", "migrations")
                ),
            ),
            None if cur.pause.count() > 0.0 => (
                &cur.pause,
                format!(
                    "since pgferry started, {}; none in the last interval",
                    plural(cur.pause.count() as u64, "migration", "migrations")
                ),
            ),
            None => {
                out.push("PAUSE  p50 -  p99 -  (no migration yet)".to_owned());
                return;
            }
        };
        let q = |q| h.quantile(q).map_or_else(|| "-".to_owned(), seconds);
        out.push(format!("PAUSE  p50 {}  p99 {}  ({over})", q(0.5), q(0.99)));
    }

    fn drain_line(&self, out: &mut Vec<String>) {
        let Some(drains) = self.drains() else {
            return;
        };
        let running: Vec<String> = drains
            .iter()
            .filter(|(_, on)| **on)
            .map(|(name, _)| {
                let left = self
                    .backends
                    .as_ref()
                    .and_then(|l| l.iter().find(|b| &b.name == name))
                    .map(|b| format!(" ({} left)", plural(b.sessions, "session", "sessions")))
                    .unwrap_or_default();
                format!("{}{left}", cell(name))
            })
            .collect();
        out.push(if running.is_empty() {
            "DRAINS IN PROGRESS  none".to_owned()
        } else {
            format!("DRAINS IN PROGRESS  {}", running.join(", "))
        });
    }
}

/// A counter's value: whole numbers without a fraction.
fn count(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.1}")
    }
}

/// A pause: `0.42 ms`, `12.3 ms`, `1.20 s`.
fn seconds(s: f64) -> String {
    let ms = s * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{s:.2} s")
    }
}

/// `HH:MM:SS UTC` of a Unix time in seconds.
pub fn utc_clock(unix_secs: u64) -> String {
    let day = unix_secs % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        day / 3600,
        day % 3600 / 60,
        day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::metrics::{self, Outcomes};

    fn backend(name: &str, state: &str, sessions: u64) -> Backend {
        Backend {
            name: name.into(),
            address: format!("10.0.0.{}:5432", name.len()),
            state: state.into(),
            healthy: true,
            sessions,
            role: Some("primary".into()),
            cluster: None,
            dialect: Some("postgres".into()),
        }
    }

    fn scrape(success: u64, pause_counts: [u64; 3], drain_pg2: bool) -> Sample {
        metrics::parse(&format!(
            "pgferry_conn_migration_attempted_total {a}\n\
             pgferry_conn_migration_success_total {success}\n\
             pgferry_conn_migration_error_recoverable_total 1\n\
             pgferry_conn_migration_pause_seconds_bucket{{le=\"0.001\"}} {}\n\
             pgferry_conn_migration_pause_seconds_bucket{{le=\"0.004\"}} {}\n\
             pgferry_conn_migration_pause_seconds_bucket{{le=\"+Inf\"}} {}\n\
             pgferry_drain_in_progress{{backend=\"pg1\"}} 0\n\
             pgferry_drain_in_progress{{backend=\"pg2\"}} {}\n",
            pause_counts[0],
            pause_counts[1],
            pause_counts[2],
            u8::from(drain_pg2),
            a = success + 1,
        ))
    }

    fn words(line: &str) -> Vec<&str> {
        line.split_whitespace().collect()
    }

    fn find<'a>(lines: &'a [String], start: &str) -> &'a str {
        lines
            .iter()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in\n{}", lines.join("\n")))
    }

    #[test]
    fn the_first_poll_shows_totals_without_rates() {
        let t0 = Instant::now();
        let mut s = State::new("http://h:1", Duration::from_secs(1));
        s.update(Poll {
            at: t0,
            backends: Ok(vec![
                backend("pg1", "active", 3),
                backend("pg2", "active", 2),
            ]),
            metrics: Ok(scrape(4, [0, 4, 4], false)),
        });
        let lines = s.lines(t0, "12:00:00 UTC");
        assert!(lines[0].starts_with("pgferry top  http://h:1  12:00:00 UTC  every 1s"));
        assert!(!lines.iter().any(|l| l.starts_with("ERROR")));
        assert_eq!(
            words(find(&lines, "BACKEND")),
            ["BACKEND", "ADDRESS", "STATE", "HEALTHY", "ROLE", "CLUSTER", "SESSIONS", "DRAIN"]
        );
        assert_eq!(
            words(find(&lines, "pg1 ")),
            [
                "pg1",
                "10.0.0.3:5432",
                "active",
                "yes",
                "primary",
                "-",
                "3",
                "-"
            ]
        );
        assert_eq!(words(find(&lines, "total")), ["total", "5"]);
        assert_eq!(words(find(&lines, "success")), ["success", "-", "4"]);
        assert_eq!(words(find(&lines, "attempted")), ["attempted", "-", "5"]);
        assert_eq!(
            words(find(&lines, "recoverable error")),
            ["recoverable", "error", "-", "1"]
        );
        // All 4 in (0.001, 0.004]: p50 at half of it, cumulative.
        assert_eq!(
            find(&lines, "PAUSE"),
            "PAUSE  p50 2.50 ms  p99 3.97 ms  (since pgferry started, 4 migrations; none in the last interval)"
        );
        assert_eq!(find(&lines, "DRAINS"), "DRAINS IN PROGRESS  none");
    }

    #[test]
    fn later_polls_show_rates_interval_quantiles_and_drains() {
        let t0 = Instant::now();
        let mut s = State::new("http://h:1", Duration::from_secs(1));
        s.update(Poll {
            at: t0,
            backends: Ok(vec![
                backend("pg1", "active", 3),
                backend("pg2", "active", 2),
            ]),
            metrics: Ok(scrape(4, [0, 4, 4], false)),
        });
        let t1 = t0 + Duration::from_secs(2);
        s.update(Poll {
            at: t1,
            backends: Ok(vec![
                backend("pg1", "active", 4),
                backend("pg2", "draining", 1),
            ]),
            metrics: Ok(scrape(8, [4, 8, 8], true)),
        });
        let lines = s.lines(t1, "12:00:02 UTC");
        assert!(find(&lines, "MIGRATIONS").contains("PER SECOND (last 2.0s)"));
        assert_eq!(words(find(&lines, "success")), ["success", "2.0", "8"]);
        assert_eq!(
            words(find(&lines, "fatal error")),
            ["fatal", "error", "0.0", "0"]
        );
        // The 4 new ones all in (0, 0.001].
        assert_eq!(
            find(&lines, "PAUSE"),
            "PAUSE  p50 0.50 ms  p99 0.99 ms  (last 2.0s, 4 migrations)"
        );
        assert_eq!(
            words(find(&lines, "pg2 ")),
            [
                "pg2",
                "10.0.0.3:5432",
                "draining",
                "yes",
                "primary",
                "-",
                "1",
                "running"
            ]
        );
        assert_eq!(
            find(&lines, "DRAINS"),
            "DRAINS IN PROGRESS  pg2 (1 session left)"
        );
    }

    #[test]
    fn errors_are_shown_and_the_last_good_answer_kept() {
        let t0 = Instant::now();
        let mut s = State::new("http://h:1", Duration::from_secs(1));
        let lines = s.lines(t0, "x");
        assert!(lines.iter().any(|l| l == "BACKENDS  (no answer yet)"));
        s.update(Poll {
            at: t0,
            backends: Ok(vec![backend("pg1", "active", 3)]),
            metrics: Ok(Sample {
                outcomes: Outcomes {
                    success: 1.0,
                    ..Outcomes::default()
                },
                ..Sample::default()
            }),
        });
        for i in 1..=3 {
            s.update(Poll {
                at: t0 + Duration::from_secs(i),
                backends: Err("cannot reach the pgferry admin API: refused".into()),
                metrics: Err("cannot reach the pgferry admin API: refused".into()),
            });
        }
        let lines = s.lines(t0 + Duration::from_secs(3), "x");
        assert_eq!(
            find(&lines, "ERROR backends"),
            "ERROR backends: cannot reach the pgferry admin API: refused"
        );
        assert_eq!(
            find(&lines, "retrying every 1s"),
            "retrying every 1s: 3 failed polls in a row, for 2s; below is the last good answer"
        );
        assert_eq!(words(find(&lines, "pg1 "))[6], "3");
        assert_eq!(words(find(&lines, "success")), ["success", "-", "1"]);
        assert_eq!(
            find(&lines, "PAUSE"),
            "PAUSE  p50 -  p99 -  (no migration yet)"
        );
        // Back: the error is gone.
        s.update(Poll {
            at: t0 + Duration::from_secs(4),
            backends: Ok(vec![]),
            metrics: Ok(Sample::default()),
        });
        let lines = s.lines(t0 + Duration::from_secs(4), "x");
        assert!(!lines.iter().any(|l| l.starts_with("ERROR")), "{lines:?}");
    }

    #[test]
    fn the_clock_is_utc() {
        assert_eq!(utc_clock(0), "00:00:00 UTC");
        assert_eq!(utc_clock(1_700_000_000), "22:13:20 UTC");
    }
}
