//! The operator files in `deploy/`: the Grafana dashboard and the
//! Prometheus alerts name only metrics a real pgferry exports; the
//! Kubernetes manifests parse and fit together (probes on the ConfigMap's
//! admin port, a preStop, a grace period above the shutdown, the PDB and
//! the Services selecting the Deployment's pods), the config inside the
//! ConfigMap loads with pgferry's own loader; the systemd unit reloads with
//! SIGHUP and keeps what the hand-off needs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgferry_proxy::config::Config;
use pgferry_proxy::Metrics;
use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a YAML file, as JSON values (empty documents left
/// out).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: document {}: {e}", path.display(), i + 1))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

// ---------------------------------------------------------------------------
// Metric names in PromQL

/// The `pgferry_*` and `process_*` identifiers in a PromQL expression (or
/// a Grafana variable query), outside string literals.
fn metric_refs(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = expr.char_indices().peekable();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut prev_ident = false;
    while let Some((i, c)) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            // A string literal (label values): skip to its end.
            let mut escaped = false;
            for (_, d) in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if d == '\\' && c != '`' {
                    escaped = true;
                } else if d == c {
                    break;
                }
            }
            prev_ident = false;
            continue;
        }
        if ident(c) && !prev_ident {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if !ident(d) {
                    break;
                }
                end = j + d.len_utf8();
                chars.next();
            }
            let word = &expr[i..end];
            if word.starts_with("pgferry_") || word.starts_with("process_") {
                out.push(word.to_owned());
            }
            prev_ident = true;
            continue;
        }
        prev_ident = ident(c) || c == '$';
    }
    out
}

/// Brackets balance outside string literals: a cheap syntax check that
/// catches a truncated or mangled expression.
fn assert_balanced(expr: &str, what: &str) {
    let mut stack = Vec::new();
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' && q != '`' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = stack.pop();
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                assert_eq!(open, Some(want), "{what}: unbalanced '{c}' in {expr}");
            }
            _ => {}
        }
    }
    assert!(quote.is_none(), "{what}: unterminated string in {expr}");
    assert!(stack.is_empty(), "{what}: unclosed {stack:?} in {expr}");
}

#[test]
fn metric_refs_finds_names_and_skips_strings_and_variables() {
    let expr = "histogram_quantile(0.99, sum by (le) (rate(pgferry_conn_migration_pause_seconds_bucket{instance=~\"$instance\", x=\"pgferry_no\"}[$__rate_interval])))\n  / process_max_fds and on(job) pgferry_client_connections";
    assert_eq!(
        metric_refs(expr),
        [
            "pgferry_conn_migration_pause_seconds_bucket",
            "process_max_fds",
            "pgferry_client_connections"
        ]
    );
    // Part of a longer word, or a Grafana variable: not a reference.
    assert!(metric_refs("my_pgferry_x + $pgferry_y + label_values(up, job)").is_empty());
    assert_balanced(expr, "example");
}

/// What pgferry exports: metric names, and the type of those whose type
/// is known (histograms matter: PromQL names their `_bucket`, `_sum` and
/// `_count` series).
struct Exported {
    names: BTreeSet<String>,
    types: BTreeMap<String, String>,
}

impl Exported {
    /// Whether `series` (as PromQL names it) is one pgferry exports.
    fn knows(&self, series: &str) -> bool {
        if self.names.contains(series) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            series
                .strip_suffix(suffix)
                .is_some_and(|stem| self.types.get(stem).map(String::as_str) == Some("histogram"))
        })
    }

    /// Names and types from a Prometheus text exposition.
    fn add_exposition(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                    self.names.insert(name.to_owned());
                    self.types.insert(name.to_owned(), kind.to_owned());
                }
            }
        }
    }
}

/// The proxy's metrics in this process: every registered name (labelled
/// ones without samples too), and with the audit log's registered beside
/// them as `[audit]` does; the labelled histograms get a sample so that
/// their type shows.
fn in_process_metrics() -> (Metrics, Exported) {
    let metrics = Metrics::new();
    let audit = pgferry_audit::AuditMetrics::register(&metrics.registry).expect("audit metrics");
    audit.events.with_label_values(&["connect"]);
    metrics.migration_phase.with_label_values(&["capture"]);
    metrics.switchover_phase.with_label_values(&["hold"]);
    let mut exported = Exported {
        names: metrics.metric_names().into_iter().collect(),
        types: BTreeMap::new(),
    };
    exported.add_exposition(&metrics.render());
    (metrics, exported)
}

#[test]
fn metric_names_lists_every_registered_metric() {
    let metrics = Metrics::new();
    let names: BTreeSet<String> = metrics.metric_names().into_iter().collect();
    // Labelled metrics without a sample yet are absent from /metrics but
    // registered; they are listed.
    for name in [
        "pgferry_drain_in_progress",
        "pgferry_backend_sessions",
        "pgferry_conn_migration_phase_seconds",
        "pgferry_conn_migration_success_total",
        "pgferry_conn_migration_error_fatal_total",
        "pgferry_conn_migration_pause_seconds",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    #[cfg(target_os = "linux")]
    for name in ["process_open_fds", "process_max_fds"] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    // Whatever the registry serves is listed.
    let mut served = Exported {
        names: BTreeSet::new(),
        types: BTreeMap::new(),
    };
    served.add_exposition(&metrics.render());
    assert!(!served.names.is_empty());
    let unlisted: Vec<_> = served.names.difference(&names).collect();
    assert!(unlisted.is_empty(), "served but not listed: {unlisted:?}");
}

#[cfg(target_os = "linux")]
#[test]
fn process_metrics_count_this_process_fds() {
    let metrics = Metrics::new();
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} sample in:\n{text}"))
    };
    let before = value(&metrics.render(), "process_open_fds");
    // 200 more open files are 200 more descriptors (other tests of this
    // binary open and close a few meanwhile).
    let files: Vec<_> = (0..200)
        .map(|_| std::fs::File::open("/proc/self/status").expect("open"))
        .collect();
    let text = metrics.render();
    let during = value(&text, "process_open_fds");
    drop(files);
    assert!(
        (150.0..=250.0).contains(&(during - before)),
        "before {before}, with 200 more files {during}"
    );
    let max = value(&text, "process_max_fds");
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    assert_eq!(max, soft as f64);
    assert!(value(&text, "process_resident_memory_bytes") > 1e6);
    assert!(value(&text, "process_threads") >= 1.0);
    assert!(value(&text, "process_cpu_seconds_total") > 0.0);
}

/// A real pgferry (with the audit log on, its database unreachable, and a
/// backend that refuses): what its /metrics says, added to what the proxy
/// registers.
fn exported_by_real_pgferry() -> Exported {
    let refused = common::RefusedPort::reserve();
    let mut opts = common::ProxyOptions::bare(vec![("pg1".into(), refused.addr.to_string())]);
    opts.tls = false;
    opts.extra_sections = format!(
        "[audit]\nurl = \"postgresql://pgferry@{}/audit\"\nwrite_timeout = \"1s\"\n",
        refused.addr
    );
    let proxy = common::ProxyProcess::start(opts);
    let (status, text) = proxy.http_get("/metrics");
    assert_eq!(status, 200, "{text}");
    let (_metrics, mut exported) = in_process_metrics();
    let before = exported.names.clone();
    exported.add_exposition(&text);
    // The running binary serves nothing the in-process list lacks: the
    // list is what pgferry exports.
    let extra: Vec<_> = exported.names.difference(&before).collect();
    assert!(
        extra.is_empty(),
        "served by pgferry but not in Metrics::metric_names or the audit metrics: {extra:?}"
    );
    for name in [
        "pgferry_backend_sessions",
        "pgferry_backend_up",
        "pgferry_audit_pending_rows",
        "pgferry_conn_migration_error_fatal_total",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "{name} not served:\n{text}"
        );
    }
    #[cfg(target_os = "linux")]
    {
        let sample = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} sample in:\n{text}"))
        };
        let (open, max) = (sample("process_open_fds"), sample("process_max_fds"));
        // Listeners, the backend and audit attempts, the log pipe.
        assert!(open >= 3.0 && open < max, "open fds {open}, max {max}");
    }
    exported
}

/// Every `pgferry_*`/`process_*` name in `exprs` ((where, expression)
/// pairs) is exported; returns the names.
fn check_refs(exprs: &[(String, String)], exported: &Exported) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    let mut unknown = Vec::new();
    for (what, expr) in exprs {
        let refs = metric_refs(expr);
        assert!(!refs.is_empty(), "{what}: names no pgferry metric: {expr}");
        for r in refs {
            if !exported.knows(&r) {
                unknown.push(format!("{what}: {r}"));
            }
            all.insert(r);
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics pgferry does not export:\n{}",
        unknown.join("\n")
    );
    all
}

// ---------------------------------------------------------------------------
// Grafana

/// (where, expression) of every PromQL expression in the dashboard:
/// panel targets and query variables.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel {title:?} target {}", t["refId"]),
                str_of(&t["expr"], "target expr").to_owned(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = match &v["query"] {
                Value::String(s) => s.clone(),
                q => str_of(&q["query"], "variable query").to_owned(),
            };
            out.push((format!("variable {}", v["name"]), q));
        }
    }
    out
}

/// Every panel, those inside collapsed rows too.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

fn load_dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/pgferry.json")).expect("dashboard is JSON")
}

#[test]
fn grafana_dashboard_is_a_dashboard_model() {
    let dash = load_dashboard();
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion: {}",
        dash["schemaVersion"]
    );
    assert!(!str_of(&dash["title"], "title").is_empty());
    assert!(!str_of(&dash["uid"], "uid").is_empty());
    // A datasource variable, so that the dashboard imports into any
    // Grafana whatever its Prometheus is called.
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .expect("a datasource variable of type prometheus");
    let ds_name = str_of(&ds["name"], "datasource variable name");
    let var_names: BTreeSet<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
    let ds_refs = [format!("${ds_name}"), format!("${{{ds_name}}}")];

    let mut ids = BTreeSet::new();
    let mut graphs = 0;
    for p in panels(&dash) {
        let title = str_of(&p["title"], "panel title");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().expect("x"), g["w"].as_u64().expect("w"));
        assert!(
            w > 0 && x + w <= 24 && g["h"].as_u64().is_some_and(|h| h > 0),
            "{title}: gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        graphs += 1;
        assert!(
            ds_refs.iter().any(|r| p["datasource"]["uid"] == **r),
            "{title}: datasource {} is not the variable",
            p["datasource"]
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            assert!(
                ref_ids.insert(str_of(&t["refId"], "refId")),
                "{title}: refId"
            );
            let expr = str_of(&t["expr"], "expr");
            assert!(!expr.trim().is_empty(), "{title}: empty expr");
            assert_balanced(expr, title);
            if !t["datasource"].is_null() {
                assert!(ds_refs.iter().any(|r| t["datasource"]["uid"] == **r));
            }
            // Every $variable is one the dashboard defines ($__ ones are
            // Grafana's own).
            for var in expr.split('$').skip(1) {
                let name: String = var
                    .trim_start_matches('{')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || var_names.contains(name.as_str()),
                    "{title}: ${name} is no variable of the dashboard"
                );
            }
        }
    }
    assert!(graphs >= 8, "only {graphs} panels");
}

#[test]
fn grafana_dashboard_covers_what_issue_14_asks() {
    let dash = load_dashboard();
    let refs: BTreeSet<String> = dashboard_exprs(&dash)
        .iter()
        .flat_map(|(_, e)| metric_refs(e))
        .collect();
    for (what, name) in [
        ("sessions per backend", "pgferry_backend_sessions"),
        (
            "migrations by outcome",
            "pgferry_conn_migration_success_total",
        ),
        (
            "migrations by outcome",
            "pgferry_conn_migration_error_recoverable_total",
        ),
        (
            "migrations by outcome",
            "pgferry_conn_migration_error_fatal_total",
        ),
        (
            "pause histogram",
            "pgferry_conn_migration_pause_seconds_bucket",
        ),
        (
            "phase histogram",
            "pgferry_conn_migration_phase_seconds_bucket",
        ),
        ("drains", "pgferry_drain_in_progress"),
        ("audit queue", "pgferry_audit_pending_rows"),
        ("auth failures", "pgferry_auth_failures_total"),
        ("fd use", "process_open_fds"),
    ] {
        assert!(refs.contains(name), "{what}: no panel uses {name}");
    }
    // Per backend: the sessions panel keeps the label.
    let by_backend = dashboard_exprs(&dash).into_iter().any(|(_, e)| {
        e.contains("pgferry_backend_sessions") && e.replace(' ', "").contains("by(backend)")
    });
    assert!(by_backend, "sessions are not shown per backend");
}

// ---------------------------------------------------------------------------
// Prometheus

fn load_alerts() -> Value {
    let docs = yaml_docs(&repo().join("deploy/prometheus/alerts.yml"));
    assert_eq!(docs.len(), 1, "alerts.yml: one document");
    docs.into_iter().next().expect("document")
}

/// (alert, expr) of every rule.
fn alert_exprs(rules: &Value) -> Vec<(String, String)> {
    rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .map(|r| {
            (
                format!("alert {}", r["alert"]),
                str_of(&r["expr"], "expr").to_owned(),
            )
        })
        .collect()
}

/// A Prometheus duration: `5m`, `1h30m`, `0s`.
fn is_prom_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

#[test]
fn prometheus_alerts_are_rules() {
    assert!(is_prom_duration("1h30m") && is_prom_duration("0m") && !is_prom_duration("5 m"));
    let rules = load_alerts();
    let groups = rules["groups"].as_array().expect("groups");
    assert!(!groups.is_empty());
    let mut names = BTreeSet::new();
    for g in groups {
        assert!(!str_of(&g["name"], "group name").is_empty());
        let list = g["rules"].as_array().expect("rules");
        assert!(!list.is_empty());
        for r in list {
            let name = str_of(&r["alert"], "alert").to_owned();
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric()) && names.insert(name.clone()),
                "alert name {name:?}: CamelCase and unique"
            );
            for key in r.as_object().expect("rule").keys() {
                assert!(
                    [
                        "alert",
                        "expr",
                        "for",
                        "keep_firing_for",
                        "labels",
                        "annotations"
                    ]
                    .contains(&key.as_str()),
                    "{name}: unknown key {key}"
                );
            }
            let expr = str_of(&r["expr"], "expr");
            assert_balanced(expr, &name);
            assert!(
                is_prom_duration(str_of(&r["for"], "for")),
                "{name}: for {}",
                r["for"]
            );
            let severity = str_of(&r["labels"]["severity"], "labels.severity");
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity {severity}"
            );
            assert!(!str_of(&r["annotations"]["summary"], "annotations.summary").is_empty());
        }
    }
    // What issue 14 asks to alert on.
    let exprs = alert_exprs(&rules);
    for (what, names) in [
        (
            "fatal migrations",
            &["pgferry_conn_migration_error_fatal_total"][..],
        ),
        ("backend down", &["pgferry_backend_up"][..]),
        (
            "audit flush errors",
            &["pgferry_audit_flush_errors_total"][..],
        ),
        ("fd use", &["process_open_fds", "process_max_fds"][..]),
    ] {
        assert!(
            exprs.iter().any(|(_, e)| {
                let refs = metric_refs(e);
                names.iter().all(|n| refs.iter().any(|r| r == n))
            }),
            "no alert on {what} ({names:?})"
        );
    }
}

/// The acceptance test: what the dashboard and the alerts name is what a
/// running pgferry exports.
#[test]
fn dashboard_and_alerts_name_only_metrics_pgferry_exports() {
    let exported = exported_by_real_pgferry();
    let dash = check_refs(&dashboard_exprs(&load_dashboard()), &exported);
    let alerts = check_refs(&alert_exprs(&load_alerts()), &exported);
    assert!(dash.len() >= 15, "dashboard names {dash:?}");
    assert!(alerts.len() >= 5, "alerts name {alerts:?}");
    // The check itself can fail.
    assert!(!exported.knows("pgferry_backend_sessions_bucket"));
    assert!(!exported.knows("pgferry_no_such_metric"));
    assert!(exported.knows("pgferry_conn_migration_phase_seconds_count"));
}

// ---------------------------------------------------------------------------
// Kubernetes

struct Manifests {
    /// (file name, document)
    docs: Vec<(String, Value)>,
}

impl Manifests {
    fn load() -> Self {
        let dir = repo().join("deploy/kubernetes");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("deploy/kubernetes")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        let mut docs = Vec::new();
        for f in &files {
            let name = f.file_name().expect("name").to_string_lossy().into_owned();
            let parsed = yaml_docs(f);
            assert!(!parsed.is_empty(), "{name}: no document");
            for d in parsed {
                let kind = str_of(&d["kind"], &format!("{name}: kind"));
                assert!(
                    d["apiVersion"].is_string(),
                    "{name}: {kind} without apiVersion"
                );
                if kind != "Kustomization" {
                    assert!(
                        d["metadata"]["name"].is_string(),
                        "{name}: {kind} without metadata.name"
                    );
                }
                docs.push((name.clone(), d));
            }
        }
        Manifests { docs }
    }

    fn find(&self, kind: &str, name: &str) -> (&str, &Value) {
        self.docs
            .iter()
            .find(|(_, d)| d["kind"] == kind && d["metadata"]["name"] == name)
            .map(|(f, d)| (f.as_str(), d))
            .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .filter(|(_, d)| d["kind"] == kind)
            .map(|(_, d)| d)
            .collect()
    }
}

/// `sub` ⊆ `labels` (both label maps), and `sub` is not empty.
fn selects(sub: &Value, labels: &Value) -> bool {
    let (Some(sub), Some(labels)) = (sub.as_object(), labels.as_object()) else {
        return false;
    };
    !sub.is_empty() && sub.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A container port given by name or number, as its number.
fn container_port(container: &Value, port: &Value) -> u64 {
    match port {
        Value::Number(n) => n.as_u64().expect("port"),
        Value::String(name) => container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port named {name}")),
        other => panic!("port {other}"),
    }
}

/// Seconds a preStop hook waits: `sleep.seconds`, or `exec` of `sleep N`.
fn pre_stop_seconds(pre_stop: &Value) -> u64 {
    if let Some(s) = pre_stop["sleep"]["seconds"].as_u64() {
        return s;
    }
    let cmd: Vec<&str> = pre_stop["exec"]["command"]
        .as_array()
        .expect("preStop: sleep or exec")
        .iter()
        .map(|c| str_of(c, "command"))
        .collect();
    assert!(!cmd.is_empty(), "preStop: empty command");
    cmd.iter()
        .position(|c| c.ends_with("sleep"))
        .and_then(|i| cmd.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn kubernetes_manifests_parse_and_fit_together() {
    let m = Manifests::load();
    // The CloudNativePG example parses too (the loop above) and is still
    // there.
    assert!(m.docs.iter().any(|(f, _)| f == "cnpg-switchover-job.yaml"));
    for kind in [
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceAccount",
    ] {
        assert!(!m.all(kind).is_empty(), "no {kind}");
    }

    let (deploy_file, deploy) = m.find("Deployment", "pgferry");
    let ns = str_of(&deploy["metadata"]["namespace"], "namespace");
    let spec = &deploy["spec"];
    let pod = &spec["template"];
    let pod_labels = &pod["metadata"]["labels"];
    assert!(
        selects(&spec["selector"]["matchLabels"], pod_labels),
        "{deploy_file}: the selector does not match the pod template's labels"
    );
    assert!(spec["replicas"].as_u64().is_some_and(|r| r >= 2));
    let containers = pod["spec"]["containers"].as_array().expect("containers");
    let c = containers
        .iter()
        .find(|c| c["name"] == "pgferry")
        .expect("container pgferry");

    // The config: `run --config PATH`, PATH in a volume of the ConfigMap.
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert_eq!(args.first(), Some(&"run"), "args {args:?}");
    let config_path = args
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(Path::new)
        .expect("--config PATH");
    let config_dir = config_path.parent().expect("dir");
    let mount = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|v| Path::new(str_of(&v["mountPath"], "mountPath")) == config_dir)
        .expect("a volume mounted at the config's directory");
    let volume = pod["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the config volume");
    let cm_name = str_of(&volume["configMap"]["name"], "config volume's configMap");
    let (cm_file, cm) = m.find("ConfigMap", cm_name);
    assert_eq!(cm["metadata"]["namespace"], ns, "{cm_file}: namespace");
    let key = config_path.file_name().expect("file").to_string_lossy();
    let toml = str_of(&cm["data"][key.as_ref()], "the ConfigMap's config file");
    let origin = format!("{cm_file}: {key}");
    let config = Config::parse(toml, &origin, config_dir).unwrap_or_else(|e| panic!("{e}"));

    // Every Secret or ConfigMap path the config names is in a mount.
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|v| str_of(&v["mountPath"], "mountPath"))
        .collect();
    let mut paths = vec![&config.auth.userlist, &config.auth.secret_file];
    if let Some(t) = &config.tls {
        paths.extend([&t.cert, &t.key]);
    }
    for p in paths {
        assert!(
            mounts.iter().any(|m| p.parent() == Some(Path::new(m))),
            "{} is in no mounted volume ({mounts:?})",
            p.display()
        );
    }
    // A read-only root and a container: no hand-off (its socket would be
    // in a read-only place, and the old process's exit ends the container).
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"], true,
        "{deploy_file}: readOnlyRootFilesystem"
    );
    assert_eq!(
        config.proxy.handoff_socket.as_deref(),
        Some(Path::new("")),
        "{origin}: handoff_socket = \"\" (hand-offs off in a container)"
    );
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());

    // Probes on /healthz of the admin listener.
    let admin = config.proxy.admin_listen.expect("admin_listen");
    assert!(
        admin.ip().is_unspecified(),
        "admin_listen {admin}: the kubelet probes the pod's IP"
    );
    assert!(config.proxy.listen.ip().is_unspecified());
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], "/healthz", "{probe}");
        assert_eq!(
            container_port(c, &get["port"]),
            u64::from(admin.port()),
            "{probe}: not on admin_listen's port"
        );
    }
    assert_eq!(
        container_port(c, &Value::String("postgres".into())),
        u64::from(config.proxy.listen.port())
    );

    // preStop, then SIGTERM: the grace period covers the pause, the
    // sessions' shutdown_timeout and the audit log's last flush.
    let pause = pre_stop_seconds(&c["lifecycle"]["preStop"]);
    assert!(pause > 0, "{deploy_file}: the preStop pauses");
    let flush = match &config.audit {
        Some(a) => a.shutdown_flush_timeout,
        None => {
            let with_audit = format!("{toml}\n[audit]\nurl = \"postgresql://x@h/db\"\n");
            Config::parse(&with_audit, &origin, config_dir)
                .expect("with [audit]")
                .audit
                .expect("audit")
                .shutdown_flush_timeout
        }
    };
    let grace = Duration::from_secs(
        pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    let needed = Duration::from_secs(pause) + config.proxy.shutdown_timeout + flush;
    assert!(
        grace > needed,
        "terminationGracePeriodSeconds {grace:?} <= preStop {pause}s + shutdown_timeout {:?} + shutdown_flush_timeout {flush:?}",
        config.proxy.shutdown_timeout
    );

    // The ServiceAccount it names exists.
    let sa = str_of(&pod["spec"]["serviceAccountName"], "serviceAccountName");
    m.find("ServiceAccount", sa);

    // Services: every one in the namespace selects the pods, on ports the
    // container has; the client one on `listen`.
    let services: Vec<&Value> = m
        .all("Service")
        .into_iter()
        .filter(|s| s["metadata"]["namespace"] == ns)
        .collect();
    assert!(!services.is_empty());
    let mut service_ports = BTreeSet::new();
    for s in &services {
        let name = str_of(&s["metadata"]["name"], "name");
        assert!(
            selects(&s["spec"]["selector"], pod_labels),
            "Service {name} does not select the pgferry pods"
        );
        for p in s["spec"]["ports"].as_array().expect("ports") {
            let target = if p["targetPort"].is_null() {
                &p["port"]
            } else {
                &p["targetPort"]
            };
            service_ports.insert(container_port(c, target));
        }
    }
    assert!(service_ports.contains(&u64::from(config.proxy.listen.port())));
    assert!(service_ports.contains(&u64::from(admin.port())));

    // The CloudNativePG Job's admin URL is an admin Service of these.
    let (_, job) = m.find("Job", "pgferry-switchover");
    let url = job["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "PGFERRY_ADMIN_URL")
        .map(|e| str_of(&e["value"], "PGFERRY_ADMIN_URL"))
        .expect("PGFERRY_ADMIN_URL");
    let host_port = url.trim_start_matches("http://").trim_end_matches('/');
    let (host, port) = host_port.split_once(':').expect("host:port");
    let mut labels = host.split('.');
    let (svc, svc_ns) = (labels.next().expect("service"), labels.next().expect("ns"));
    assert_eq!(svc_ns, ns, "{url}");
    let (_, admin_svc) = m.find("Service", svc);
    assert!(
        admin_svc["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(
                |p| p["port"].as_u64().map(|n| n.to_string()).as_deref() == Some(port)
                    && container_port(c, &p["targetPort"]) == u64::from(admin.port())
            ),
        "{url}: no such port on Service {svc}"
    );

    // The PodDisruptionBudget covers these pods and lets one go at a time.
    let pdbs: Vec<&Value> = m
        .all("PodDisruptionBudget")
        .into_iter()
        .filter(|p| selects(&p["spec"]["selector"]["matchLabels"], pod_labels))
        .collect();
    assert_eq!(pdbs.len(), 1, "one PodDisruptionBudget selects the pods");
    let pdb = &pdbs[0]["spec"];
    let replicas = spec["replicas"].as_u64().expect("replicas");
    let allows = match (pdb["maxUnavailable"].as_u64(), pdb["minAvailable"].as_u64()) {
        (Some(n), None) => n >= 1,
        (None, Some(n)) => n < replicas,
        _ => false,
    };
    assert!(
        allows,
        "the PDB blocks every eviction, or is not a count: {pdb}"
    );

    // `kubectl apply -k` applies pgferry, never the switchover Job.
    let kustomization = m.all("Kustomization");
    assert_eq!(kustomization.len(), 1);
    let listed: BTreeSet<&str> = kustomization[0]["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| str_of(r, "resource"))
        .collect();
    for (file, d) in &m.docs {
        let kind = d["kind"].as_str().unwrap_or("");
        if kind == "Job" {
            assert!(
                !listed.contains(file.as_str()),
                "{file} is in the kustomization"
            );
        }
        if d["metadata"]["namespace"] == ns && kind != "Job" {
            assert!(
                listed.contains(file.as_str()),
                "{file} is not in the kustomization"
            );
        }
    }
    for f in &listed {
        assert!(
            m.docs.iter().any(|(name, _)| name == f),
            "{f} does not exist"
        );
    }
}

// ---------------------------------------------------------------------------
// systemd

/// `[section]` -> key -> values (a key may repeat), comments left out.
fn ini(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        assert!(!section.is_empty(), "{line} outside a section");
        out.entry(section.clone())
            .or_default()
            .entry(k.trim().to_owned())
            .or_default()
            .push(v.trim().to_owned());
    }
    out
}

/// A systemd time span such as `90s`, `2min`, `1min 30s`.
fn systemd_span(s: &str) -> Duration {
    let mut total = 0;
    for part in s.split_whitespace() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        let n: u64 = digits.parse().unwrap_or_else(|_| panic!("time span {s}"));
        let unit = &part[digits.len()..];
        total += n * match unit {
            "" | "s" | "sec" => 1,
            "m" | "min" => 60,
            "h" | "hr" => 3600,
            _ => panic!("time span {s}: unit {unit}"),
        };
    }
    Duration::from_secs(total)
}

#[test]
fn systemd_unit_reloads_with_sighup_and_keeps_the_handoff_path() {
    let text = read("deploy/systemd/pgferry.service");
    let unit = ini(&text);
    for s in ["Unit", "Service", "Install"] {
        assert!(unit.contains_key(s), "no [{s}]");
    }
    let service = &unit["Service"];
    let one = |key: &str| -> &str {
        let v = service
            .get(key)
            .unwrap_or_else(|| panic!("[Service] has no {key}"));
        assert_eq!(v.len(), 1, "{key} given {} times", v.len());
        &v[0]
    };
    assert_eq!(one("Type"), "notify");
    // The successor of a hand-off sends MAINPID=.
    assert_eq!(one("NotifyAccess"), "all");
    // Both processes of a hand-off get SIGTERM on stop.
    assert_eq!(one("KillMode"), "control-group");

    // `systemctl reload` sends SIGHUP to the main process, nothing else.
    let reload: Vec<&str> = one("ExecReload").split_whitespace().collect();
    assert!(
        reload.first().is_some_and(|c| c.ends_with("/kill")),
        "ExecReload {reload:?}"
    );
    let signal: Vec<&str> = reload[1..reload.len() - 1].to_vec();
    assert!(
        matches!(
            signal.as_slice(),
            ["-HUP"] | ["-SIGHUP"] | ["-s", "HUP"] | ["-s", "SIGHUP"] | ["-1"]
        ),
        "ExecReload sends {signal:?}, not SIGHUP"
    );
    assert_eq!(reload.last(), Some(&"$MAINPID"));

    // The config the unit runs, parsed for its defaults.
    let exec = one("ExecStart");
    assert!(
        exec.contains(" run ") && exec.contains("--config "),
        "ExecStart {exec}"
    );
    let defaults = Config::parse(
        "[proxy]\nlisten = \"127.0.0.1:6432\"\n[auth]\nuserlist = \"u\"\n\
         [[backend]]\nname = \"a\"\naddress = \"127.0.0.1:5432\"\n\
         [audit]\nurl = \"postgresql://x@h/db\"\n",
        "defaults",
        Path::new("/etc/pgferry"),
    )
    .expect("defaults");

    // Two descriptors per session at the default connection limit, plus
    // the 256 pgferry wants besides (it warns at start with less).
    let nofile: u64 = one("LimitNOFILE").parse().expect("LimitNOFILE is a number");
    let sessions = defaults.proxy.max_client_connections as u64;
    assert!(
        nofile >= 2 * sessions + 256,
        "LimitNOFILE {nofile} < 2 x {sessions} + 256"
    );
    // A stop is never a SIGKILL with the default timeouts.
    let stop = systemd_span(one("TimeoutStopSec"));
    let audit = defaults.audit.expect("audit");
    assert!(
        stop > defaults.proxy.shutdown_timeout + audit.shutdown_flush_timeout,
        "TimeoutStopSec {stop:?}"
    );
    assert_eq!(systemd_span("1min 30s"), Duration::from_secs(90));

    // The restart that keeps sessions is documented where operators look.
    for (file, text) in [
        ("deploy/systemd/pgferry.service", text.as_str()),
        (
            "deploy/systemd/README.md",
            read("deploy/systemd/README.md").as_str(),
        ),
        ("docs/operations.md", read("docs/operations.md").as_str()),
    ] {
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            flat.contains("systemctl kill --kill-whom=main -s USR2 pgferry"),
            "{file}: the hand-off command"
        );
        assert!(flat.contains("pgferry ctl handoff"), "{file}: ctl handoff");
    }
}

#[test]
fn operations_guide_walks_through_the_deploy_files() {
    let ops = read("docs/operations.md");
    for f in [
        "deploy/systemd/pgferry.service",
        "deploy/kubernetes/pgferry-deployment.yaml",
        "deploy/kubernetes/pgferry-configmap.yaml",
        "deploy/grafana/pgferry.json",
        "deploy/prometheus/alerts.yml",
    ] {
        assert!(repo().join(f).is_file(), "{f} missing");
        assert!(ops.contains(f), "docs/operations.md does not mention {f}");
    }
}
