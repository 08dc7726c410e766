//! The few series of `GET /metrics` that `ctl top` shows, read from the
//! Prometheus text format, and what it computes from two readings: rates
//! of the migration counters and quantiles of the pause histogram.

use std::collections::BTreeMap;

/// The migration outcome counters (`pgferry_conn_migration_*_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Outcomes {
    pub attempted: f64,
    pub success: f64,
    pub recoverable: f64,
    pub fatal: f64,
    pub session_ended: f64,
}

impl Outcomes {
    /// (label, value) in display order.
    pub fn rows(&self) -> [(&'static str, f64); 5] {
        [
            ("attempted", self.attempted),
            ("success", self.success),
            ("recoverable error", self.recoverable),
            ("fatal error", self.fatal),
            ("session ended", self.session_ended),
        ]
    }

    /// Per second between `prev` and `self`, `secs` apart. A counter that
    /// went down was reset (pgferry restarted, or a new process took
    /// over): all it counted since is new, as PromQL's `rate` reads it.
    pub fn rate_since(&self, prev: &Outcomes, secs: f64) -> Outcomes {
        let r = |cur: f64, old: f64| {
            if secs <= 0.0 {
                0.0
            } else {
                counter_delta(cur, old) / secs
            }
        };
        Outcomes {
            attempted: r(self.attempted, prev.attempted),
            success: r(self.success, prev.success),
            recoverable: r(self.recoverable, prev.recoverable),
            fatal: r(self.fatal, prev.fatal),
            session_ended: r(self.session_ended, prev.session_ended),
        }
    }
}

fn counter_delta(cur: f64, old: f64) -> f64 {
    if cur >= old {
        cur - old
    } else {
        cur
    }
}

/// A cumulative histogram: `(le, count)` sorted by `le`, the last one
/// `+Inf` when the source had it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// Observations in it (the `+Inf` bucket).
    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// The observations made after `prev`; `None` when the buckets differ
    /// or a count went down (a reset: then `self` is all there is since).
    pub fn since(&self, prev: &Histogram) -> Option<Histogram> {
        if self.buckets.len() != prev.buckets.len() {
            return None;
        }
        let mut out = Vec::with_capacity(self.buckets.len());
        for (&(le, cur), &(ple, old)) in self.buckets.iter().zip(&prev.buckets) {
            if le.to_bits() != ple.to_bits() || cur < old {
                return None;
            }
            out.push((le, cur - old));
        }
        Some(Histogram { buckets: out })
    }

    /// The `q` quantile (0..=1) estimated as PromQL's `histogram_quantile`
    /// does: linear interpolation inside the bucket the rank falls in, the
    /// first bucket starting at 0, and the highest finite bound when the
    /// rank falls in the `+Inf` bucket. `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total.is_nan() || total <= 0.0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        // Tolerate a non-monotonic scrape (buckets read at slightly
        // different moments) as Prometheus does.
        let mut running = 0.0f64;
        let buckets: Vec<(f64, f64)> = self
            .buckets
            .iter()
            .map(|&(le, c)| {
                running = running.max(c);
                (le, running)
            })
            .collect();
        let rank = q * total;
        let i = buckets.iter().position(|&(_, c)| c >= rank)?;
        let (upper, count) = buckets[i];
        if upper.is_infinite() {
            // Above every finite bound: the highest one is all we know.
            return Some(if i == 0 { 0.0 } else { buckets[i - 1].0 });
        }
        let (lower, below) = if i == 0 {
            (0.0f64.min(upper), 0.0)
        } else {
            buckets[i - 1]
        };
        let inside = count - below;
        if inside <= 0.0 {
            return Some(upper);
        }
        Some(lower + (upper - lower) * (rank - below) / inside)
    }
}

/// What `ctl top` reads from one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub outcomes: Outcomes,
    /// `pgferry_conn_migration_pause_seconds`.
    pub pause: Histogram,
    /// `pgferry_drain_in_progress{backend}`, by backend.
    pub drains: BTreeMap<String, bool>,
}

pub const ATTEMPTED: &str = "pgferry_conn_migration_attempted_total";
pub const SUCCESS: &str = "pgferry_conn_migration_success_total";
pub const RECOVERABLE: &str = "pgferry_conn_migration_error_recoverable_total";
pub const FATAL: &str = "pgferry_conn_migration_error_fatal_total";
pub const SESSION_ENDED: &str = "pgferry_conn_migration_session_ended_total";
pub const PAUSE_BUCKET: &str = "pgferry_conn_migration_pause_seconds_bucket";
pub const DRAIN_IN_PROGRESS: &str = "pgferry_drain_in_progress";

/// Reads the series `ctl top` needs out of Prometheus text; anything else,
/// and any line it cannot read, is skipped. A series that is absent counts
/// as 0 (pgferry exports them all from the start).
pub fn parse(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = sample_line(line) else {
            continue;
        };
        match name {
            ATTEMPTED => s.outcomes.attempted = value,
            SUCCESS => s.outcomes.success = value,
            RECOVERABLE => s.outcomes.recoverable = value,
            FATAL => s.outcomes.fatal = value,
            SESSION_ENDED => s.outcomes.session_ended = value,
            PAUSE_BUCKET => {
                if let Some(le) = label(&labels, "le").and_then(parse_value) {
                    s.pause.buckets.push((le, value));
                }
            }
            DRAIN_IN_PROGRESS => {
                if let Some(b) = label(&labels, "backend") {
                    s.drains.insert(b.to_owned(), value > 0.0);
                }
            }
            _ => {}
        }
    }
    s.pause.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    s
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Prometheus writes `+Inf`, `-Inf` and `NaN`.
fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

type Labels = Vec<(String, String)>;

/// `name{k="v",...} value [timestamp]` into its parts.
fn sample_line(line: &str) -> Option<(&str, Labels, f64)> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = label_set(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some((name, labels, value))
}

/// The labels up to the closing `}`, and what follows it.
fn label_set(mut s: &str) -> Option<(Labels, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP pgferry_conn_migration_attempted_total Session migrations attempted
# TYPE pgferry_conn_migration_attempted_total counter
pgferry_conn_migration_attempted_total 12
pgferry_conn_migration_success_total 9
pgferry_conn_migration_error_recoverable_total 2
pgferry_conn_migration_error_fatal_total 0
pgferry_conn_migration_session_ended_total 1
# TYPE pgferry_conn_migration_pause_seconds histogram
pgferry_conn_migration_pause_seconds_bucket{le="0.0001"} 0
pgferry_conn_migration_pause_seconds_bucket{le="0.0002"} 0
pgferry_conn_migration_pause_seconds_bucket{le="0.0004"} 2
pgferry_conn_migration_pause_seconds_bucket{le="0.0008"} 8
pgferry_conn_migration_pause_seconds_bucket{le="+Inf"} 9
pgferry_conn_migration_pause_seconds_sum 0.01
pgferry_conn_migration_pause_seconds_count 9
pgferry_conn_migration_pause_seconds_other{le="1"} 100
pgferry_drain_in_progress{backend="pg1"} 1
pgferry_drain_in_progress{backend="we\"ird, {one}"} 0
pgferry_backend_sessions{backend="pg1"} 3
"#;

    #[test]
    fn a_scrape_gives_counters_buckets_and_drains() {
        let s = parse(SCRAPE);
        assert_eq!(
            s.outcomes,
            Outcomes {
                attempted: 12.0,
                success: 9.0,
                recoverable: 2.0,
                fatal: 0.0,
                session_ended: 1.0
            }
        );
        assert_eq!(
            s.pause.buckets,
            vec![
                (0.0001, 0.0),
                (0.0002, 0.0),
                (0.0004, 2.0),
                (0.0008, 8.0),
                (f64::INFINITY, 9.0)
            ]
        );
        assert_eq!(s.pause.count(), 9.0);
        assert_eq!(s.drains.get("pg1"), Some(&true));
        assert_eq!(s.drains.get("we\"ird, {one}"), Some(&false));
        assert_eq!(s.drains.len(), 2);
    }

    #[test]
    fn garbage_is_skipped_and_absent_series_are_zero() {
        let s = parse("not a metric line\npgferry_conn_migration_success_total\n{}\npgferry_conn_migration_attempted_total{x=\"1 2\n\u{0}");
        assert_eq!(s, Sample::default());
        let s = parse("pgferry_conn_migration_success_total 3 1700000000000\n");
        assert_eq!(s.outcomes.success, 3.0);
        assert_eq!(parse("").pause.quantile(0.5), None);
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile() {
        let h = parse(SCRAPE).pause;
        // rank 4.5 of 9: 2.5 of the 6 in (0.0004, 0.0008].
        let p50 = h.quantile(0.5).expect("p50");
        assert!((p50 - (0.0004 + 0.0004 * 2.5 / 6.0)).abs() < 1e-12, "{p50}");
        // rank 8.91: in the +Inf bucket, so the highest finite bound.
        assert_eq!(h.quantile(0.99), Some(0.0008));
        // The first bucket starts at 0.
        let one = Histogram {
            buckets: vec![(0.001, 2.0), (f64::INFINITY, 2.0)],
        };
        assert_eq!(one.quantile(0.5), Some(0.0005));
        assert_eq!(Histogram::default().quantile(0.5), None);
        assert_eq!(h.quantile(1.5), None);
    }

    #[test]
    fn interval_histograms_and_rates_handle_resets() {
        let before = Histogram {
            buckets: vec![(0.001, 1.0), (0.002, 3.0), (f64::INFINITY, 3.0)],
        };
        let after = Histogram {
            buckets: vec![(0.001, 1.0), (0.002, 5.0), (f64::INFINITY, 5.0)],
        };
        let d = after.since(&before).expect("delta");
        assert_eq!(d.count(), 2.0);
        assert_eq!(d.quantile(0.5), Some(0.0015));
        // A reset (counts went down), or other buckets: no delta.
        assert_eq!(before.since(&after), None);
        assert_eq!(after.since(&Histogram::default()), None);

        let prev = Outcomes {
            attempted: 10.0,
            success: 8.0,
            ..Outcomes::default()
        };
        let cur = Outcomes {
            attempted: 14.0,
            success: 2.0,
            ..Outcomes::default()
        };
        let r = cur.rate_since(&prev, 2.0);
        assert_eq!(r.attempted, 2.0);
        // 8 -> 2: reset, the 2 are new.
        assert_eq!(r.success, 1.0);
        assert_eq!(cur.rate_since(&prev, 0.0).attempted, 0.0);
    }
}
