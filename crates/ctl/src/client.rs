//! Blocking HTTP to the admin API: one request in, status and body out.
//! Every status comes back as a [`Reply`]; only failing to talk to the
//! server at all is an error.

use std::time::Duration;

/// Most answers are immediate; a server that says nothing this long is stuck.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Room on top of a server-side deadline for the server to answer after it.
const DEADLINE_SLACK: Duration = Duration::from_secs(30);
/// A connection list of a busy proxy is large, but not this large.
const MAX_BODY: u64 = 512 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Delete,
}

/// How long to wait for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// An immediate answer (listings and the like).
    Short,
    /// The server works until this deadline, then answers.
    Deadline(Duration),
    /// The server works until a deadline of its own configuration, which we
    /// do not know, so we wait for it however long it is.
    ServerDeadline,
    /// A background poll that must not hold anything up.
    Poll(Duration),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: Method,
    /// Starts with `/`, path segments already encoded.
    pub path: String,
    pub body: Option<serde_json::Value>,
    pub wait: Wait,
}

/// The server's answer, whatever its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url:?} is not an admin API URL: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("cannot reach the pgferry admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("no answer from the pgferry admin API at {url} within {waited}")]
    TimedOut { url: String, waited: String },
    #[error("cannot read the answer from the pgferry admin API at {url}: {reason}")]
    BadAnswer { url: String, reason: String },
}

/// A client of one admin API; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    auth: Option<String>,
    agent: ureq::Agent,
}

impl AdminClient {
    /// `base` is like `http://127.0.0.1:9930` (a bare `host:port` means
    /// http); an empty token means none.
    pub fn new(base: &str, token: Option<&str>) -> Result<Self, ClientError> {
        let base = normalize_base(base)?;
        let config = ureq::Agent::config_builder()
            // Error statuses carry the server's explanation; we read them.
            .http_status_as_error(false)
            // The admin API sits on a private address; an HTTP(S)_PROXY
            // meant for the internet would only get in the way.
            .proxy(None)
            .max_redirects(0)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(concat!("pgferry-ctl/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self {
            base,
            auth: token
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| format!("Bearer {t}")),
            agent: ureq::Agent::new_with_config(config),
        })
    }

    /// The normalized base URL, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn send(&self, req: &Request) -> Result<Reply, ClientError> {
        let url = format!("{}{}", self.base, req.path);
        let limit = match req.wait {
            Wait::Short => Some(DEFAULT_TIMEOUT),
            Wait::Deadline(d) => Some(d.saturating_add(DEADLINE_SLACK)),
            Wait::ServerDeadline => None,
            Wait::Poll(d) => Some(d),
        };
        let result = match req.method {
            Method::Get => self
                .with_auth(self.agent.get(&url))
                .config()
                .timeout_global(limit)
                .build()
                .call(),
            Method::Delete => self
                .with_auth(self.agent.delete(&url))
                .config()
                .timeout_global(limit)
                .build()
                .call(),
            Method::Post => {
                let builder = self
                    .with_auth(self.agent.post(&url))
                    .config()
                    .timeout_global(limit)
                    .build();
                match &req.body {
                    Some(body) => builder
                        .content_type("application/json")
                        .send(body.to_string()),
                    None => builder.send_empty(),
                }
            }
        };
        let mut response = result.map_err(|e| self.error(e, limit))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .lossy_utf8(true)
            .read_to_string()
            .map_err(|e| match self.error(e, limit) {
                ClientError::Unreachable { url, reason } => ClientError::BadAnswer { url, reason },
                other => other,
            })?;
        Ok(Reply { status, body })
    }

    fn with_auth<B>(&self, builder: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.auth {
            Some(value) => builder.header("Authorization", value),
            None => builder,
        }
    }

    fn error(&self, e: ureq::Error, limit: Option<Duration>) -> ClientError {
        let url = self.base.clone();
        let reason = match e {
            ureq::Error::Timeout(ureq::Timeout::Connect) => {
                return ClientError::TimedOut {
                    url,
                    waited: format!(
                        "{} (connecting)",
                        humantime::format_duration(CONNECT_TIMEOUT)
                    ),
                }
            }
            ureq::Error::Timeout(_) => {
                return ClientError::TimedOut {
                    url,
                    waited: limit
                        .map(|d| humantime::format_duration(d).to_string())
                        .unwrap_or_else(|| "the time allowed".into()),
                }
            }
            ureq::Error::Io(io) => io.to_string(),
            ureq::Error::HostNotFound => "host not found".into(),
            ureq::Error::ConnectionFailed => "connection failed".into(),
            other => other.to_string(),
        };
        ClientError::Unreachable { url, reason }
    }
}

/// Trims a trailing `/` and adds `http://` to a bare `host:port`; refuses
/// anything but plain http, which is all this client speaks.
fn normalize_base(raw: &str) -> Result<String, ClientError> {
    let bad = |reason| ClientError::BadUrl {
        url: raw.to_owned(),
        reason,
    };
    let (scheme, rest) = raw.trim().split_once("://").unwrap_or(("http", raw.trim()));
    if scheme.eq_ignore_ascii_case("https") {
        return Err(bad("pgferry ctl speaks plain http only"));
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(bad("it must start with http://"));
    }
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("it names no host"));
    }
    // A query or fragment would end up in the middle of every request path.
    if rest.contains(['?', '#']) || rest.contains(char::is_whitespace) {
        return Err(bad("it must be a plain http://host:port[/prefix]"));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// Percent-encodes one path segment (a backend name or a session id), so a
/// name with `/` or spaces still reaches the right route.
pub fn segment(raw: &str) -> String {
    // `.` and `..` alone would be read as "this" and "parent" directory.
    if raw == "." || raw == ".." {
        return raw.replace('.', "%2E");
    }
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalized() {
        let ok = |s: &str| normalize_base(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("http://127.0.0.1:9930"), "http://127.0.0.1:9930");
        assert_eq!(ok("http://127.0.0.1:9930/"), "http://127.0.0.1:9930");
        assert_eq!(ok("127.0.0.1:9930"), "http://127.0.0.1:9930");
        assert_eq!(ok("HTTP://h:1/pgferry/"), "HTTP://h:1/pgferry");
        for bad in [
            "",
            "/",
            "https://h:1",
            "ftp://h",
            "http://",
            "http://h:1/?x=1",
            "http://h 1",
        ] {
            assert!(normalize_base(bad).is_err(), "{bad:?} accepted");
        }
        let e = normalize_base("https://h:1").expect_err("https");
        assert!(e.to_string().contains("plain http"), "{e}");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(segment("pg1"), "pg1");
        assert_eq!(
            segment("0b6f2c1e-3f4a-4c5d-9e8f-001122334455"),
            "0b6f2c1e-3f4a-4c5d-9e8f-001122334455"
        );
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(segment("ü"), "%C3%BC");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("a..b"), "a..b");
    }

    #[test]
    fn empty_tokens_send_no_header() {
        let c = AdminClient::new("h:1", Some("  ")).expect("client");
        assert!(c.auth.is_none());
        let c = AdminClient::new("h:1", Some("s3cret")).expect("client");
        assert_eq!(c.auth.as_deref(), Some("Bearer s3cret"));
    }

    /// Answers one request with `status` and `body`; hands back the
    /// request as received.
    fn one_shot_server(
        status: &'static str,
        body: &'static str,
    ) -> (String, std::thread::JoinHandle<String>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let handle = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then as much body as Content-Length says.
            loop {
                let n = conn.read(&mut buf).expect("read");
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if got.len() >= end + 4 + len || n == 0 {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(answer.as_bytes()).expect("write");
            String::from_utf8_lossy(&got).into_owned()
        });
        (base, handle)
    }

    #[test]
    fn requests_carry_token_and_body_and_error_statuses_come_back() {
        let (base, server) = one_shot_server(
            "409 Conflict",
            r#"{"error":"a drain of it is already running"}"#,
        );
        let c = AdminClient::new(&format!("{base}/"), Some("s3cret")).expect("client");
        let reply = c
            .send(&Request {
                method: Method::Post,
                path: "/v1/backends/pg1/drain".into(),
                body: Some(serde_json::json!({"timeout_ms": 1000})),
                wait: Wait::Deadline(Duration::from_secs(1)),
            })
            .expect("reply");
        assert_eq!(reply.status, 409);
        assert!(!reply.is_success());
        assert_eq!(
            reply.body,
            r#"{"error":"a drain of it is already running"}"#
        );
        let request = server.join().expect("server");
        let lower = request.to_ascii_lowercase();
        assert!(
            request.starts_with("POST /v1/backends/pg1/drain HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            lower.contains("authorization: bearer s3cret\r\n"),
            "{request}"
        );
        assert!(
            lower.contains("content-type: application/json\r\n"),
            "{request}"
        );
        assert!(request.ends_with(r#"{"timeout_ms":1000}"#), "{request}");
    }

    #[test]
    fn a_get_without_token_sends_no_authorization() {
        let (base, server) = one_shot_server("200 OK", "[]");
        let c = AdminClient::new(&base, None).expect("client");
        let reply = c
            .send(&Request {
                method: Method::Get,
                path: "/v1/backends".into(),
                body: None,
                wait: Wait::Short,
            })
            .expect("reply");
        assert_eq!((reply.status, reply.body.as_str()), (200, "[]"));
        let request = server.join().expect("server");
        assert!(
            request.starts_with("GET /v1/backends HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            !request.to_ascii_lowercase().contains("authorization"),
            "{request}"
        );
    }

    #[test]
    fn an_unreachable_server_is_named_in_the_error() {
        // A port nothing listens on: bind one, learn it, free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let c = AdminClient::new(&format!("http://127.0.0.1:{port}"), None).expect("client");
        let err = c
            .send(&Request {
                method: Method::Get,
                path: "/v1/backends".into(),
                body: None,
                wait: Wait::Short,
            })
            .expect_err("nothing listens");
        let text = err.to_string();
        assert!(text.contains(&format!("http://127.0.0.1:{port}")), "{text}");
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    }
}
