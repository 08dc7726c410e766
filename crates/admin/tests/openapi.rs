//! `docs/openapi.yaml` and the admin router agree: every documented
//! (path, method) is served, answers one of its documented status codes,
//! and needs the bearer token exactly when the document says so.
//!
//! Path parameters are filled with values that name nothing (a fresh UUID,
//! "no-such-backend"), so no call moves, drains or removes anything.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use pgferry_admin::{router, AdminState};
use pgferry_proxy::{Config, Proxy};
use tower::ServiceExt;
use yaml_rust2::{Yaml, YamlLoader};

const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml");
const TOKEN: &str = "openapi-test-token";
const NO_SUCH_ROUTE: &str = "no such route";
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

#[derive(Debug)]
struct Operation {
    method: Method,
    /// As documented, with `{param}` placeholders.
    path: String,
    /// Documented response codes.
    statuses: BTreeSet<u16>,
    /// Needs `Authorization: Bearer`.
    secured: bool,
}

impl Operation {
    fn label(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// The path with every parameter naming something that does not exist.
    fn uri(&self) -> String {
        let mut uri = String::new();
        for (i, segment) in self.path.split('/').enumerate() {
            if i > 0 {
                uri.push('/');
            }
            match segment {
                "{id}" => uri.push_str(&uuid::Uuid::new_v4().to_string()),
                "{name}" => uri.push_str("no-such-backend"),
                s if s.starts_with('{') => {
                    panic!("{}: no test value for path parameter {s}", self.label())
                }
                s => uri.push_str(s),
            }
        }
        uri
    }
}

fn has_security(requirements: &Yaml) -> Option<bool> {
    match requirements {
        Yaml::Array(list) => Some(!list.is_empty()),
        Yaml::BadValue => None,
        other => panic!("openapi.yaml: security is not a list: {other:?}"),
    }
}

fn operations() -> Vec<Operation> {
    let text = std::fs::read_to_string(SPEC).unwrap_or_else(|e| panic!("{SPEC}: {e}"));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{SPEC}: {e}"));
    let spec = &docs[0];
    let secured_by_default = has_security(&spec["security"]).unwrap_or(false);
    let paths = spec["paths"]
        .as_hash()
        .expect("openapi.yaml: `paths` is not a mapping");
    let mut ops = Vec::new();
    for (path, item) in paths {
        let path = path.as_str().expect("openapi.yaml: path is not a string");
        let item = item
            .as_hash()
            .unwrap_or_else(|| panic!("openapi.yaml: {path} is not a mapping"));
        for (key, op) in item {
            let key = key.as_str().unwrap_or_default();
            if !METHODS.contains(&key) {
                continue; // parameters, summary, ...
            }
            let statuses = op["responses"]
                .as_hash()
                .unwrap_or_else(|| panic!("openapi.yaml: {key} {path} has no responses"))
                .keys()
                .map(|code| match code {
                    Yaml::Integer(n) => u16::try_from(*n).expect("status code"),
                    Yaml::String(s) => s.parse().unwrap_or_else(|_| {
                        panic!("openapi.yaml: {key} {path}: response {s:?} is not a status code")
                    }),
                    other => panic!("openapi.yaml: {key} {path}: response key {other:?}"),
                })
                .collect();
            ops.push(Operation {
                method: Method::from_bytes(key.to_ascii_uppercase().as_bytes()).unwrap(),
                path: path.to_owned(),
                statuses,
                secured: has_security(&op["security"]).unwrap_or(secured_by_default),
            });
        }
    }
    assert!(
        ops.len() >= 12,
        "openapi.yaml documents only {} operations: {ops:?}",
        ops.len()
    );
    ops
}

/// An admin router over a proxy that is never served, with one backend
/// nothing listens on.
fn admin(dir: &Path) -> Router {
    std::fs::write(dir.join("users.txt"), "\"app\" \"app-password\"\n").unwrap();
    let toml = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
admin_token = "{TOKEN}"

[auth]
userlist = "users.txt"

[[backend]]
name = "pg1"
address = "127.0.0.1:1"
"#
    );
    let config = Config::parse(&toml, "openapi-test.toml", dir).expect("config");
    let proxy = Proxy::new(config).expect("proxy");
    router(AdminState {
        metrics: proxy.metrics(),
        proxy: proxy.context().clone(),
    })
}

struct Answer {
    status: StatusCode,
    body: Vec<u8>,
}

impl Answer {
    fn error_message(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        Some(v.get("error")?.as_str()?.to_owned())
    }

    /// The router's answer for a path it does not serve. A 404 without a
    /// JSON `error` (axum's bare default) counts too: resource 404s always
    /// carry their own message.
    fn is_no_such_route(&self) -> bool {
        self.status == StatusCode::NOT_FOUND
            && self
                .error_message()
                .is_none_or(|message| message == NO_SUCH_ROUTE)
    }

    fn describe(&self) -> String {
        format!("{} {}", self.status, String::from_utf8_lossy(&self.body))
    }
}

async fn send(app: &Router, method: Method, uri: &str, token: Option<&str>) -> Answer {
    let mut req = Request::builder().method(method.clone()).uri(uri);
    if let Some(token) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = if method == Method::POST || method == Method::PUT || method == Method::PATCH {
        req = req.header(header::CONTENT_TYPE, "application/json");
        Body::from("{}")
    } else {
        Body::empty()
    };
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        app.clone().oneshot(req.body(body).unwrap()),
    )
    .await
    .unwrap_or_else(|_| panic!("{method} {uri}: no answer within 10 s"))
    .unwrap();
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes()
        .to_vec();
    Answer { status, body }
}

#[tokio::test]
async fn every_documented_route_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let app = admin(dir.path());
    let mut problems = Vec::new();
    for op in operations() {
        let uri = op.uri();
        let answer = send(&app, op.method.clone(), &uri, Some(TOKEN)).await;
        if answer.status == StatusCode::METHOD_NOT_ALLOWED {
            problems.push(format!(
                "{}: method not served: {}",
                op.label(),
                answer.describe()
            ));
        } else if answer.is_no_such_route() {
            problems.push(format!(
                "{}: route not served: {}",
                op.label(),
                answer.describe()
            ));
        } else if !op.statuses.contains(&answer.status.as_u16()) {
            problems.push(format!(
                "{} ({uri}): answered {}, documented only {:?}",
                op.label(),
                answer.describe(),
                op.statuses
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/openapi.yaml and the admin router disagree:\n  {}",
        problems.join("\n  ")
    );
}

#[tokio::test]
async fn undocumented_routes_and_methods_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = admin(dir.path());

    let answer = send(&app, Method::GET, "/v1/nope", Some(TOKEN)).await;
    assert_eq!(
        answer.status,
        StatusCode::NOT_FOUND,
        "{}",
        answer.describe()
    );
    assert_eq!(
        answer.error_message().as_deref(),
        Some(NO_SUCH_ROUTE),
        "{}",
        answer.describe()
    );
    assert!(answer.is_no_such_route());

    // A path that exists with a method it does not have.
    let ops = operations();
    let documented: BTreeSet<(String, Method)> = ops
        .iter()
        .map(|op| (op.path.clone(), op.method.clone()))
        .collect();
    assert!(!documented.contains(&("/v1/backends".to_owned(), Method::PUT)));
    let answer = send(&app, Method::PUT, "/v1/backends", Some(TOKEN)).await;
    assert_eq!(
        answer.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "{}",
        answer.describe()
    );
}

#[tokio::test]
async fn the_token_is_needed_exactly_where_documented() {
    let dir = tempfile::tempdir().unwrap();
    let app = admin(dir.path());
    let mut problems = Vec::new();
    for op in operations() {
        let uri = op.uri();
        for token in [None, Some("wrong-token")] {
            let answer = send(&app, op.method.clone(), &uri, token).await;
            let refused = answer.status == StatusCode::UNAUTHORIZED;
            if op.secured && !refused {
                problems.push(format!(
                    "{} with token {token:?}: answered {}, expected 401",
                    op.label(),
                    answer.describe()
                ));
            }
            if !op.secured && refused {
                problems.push(format!(
                    "{}: documented without security but answered 401",
                    op.label()
                ));
            }
        }
        if op.secured && !op.statuses.contains(&401) {
            problems.push(format!("{}: 401 is not documented", op.label()));
        }
        if !op.path.starts_with("/v1/") && op.secured {
            problems.push(format!("{}: documented as needing a token", op.label()));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
