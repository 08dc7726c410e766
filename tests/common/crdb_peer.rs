//! A scripted multi-node CockroachDB wire peer, for the tests of pgferry's
//! CockroachDB dialect (`tests/crdb.rs`, design in `docs/crdb-design.md`).
//!
//! No CockroachDB binary can be installed on the machines these tests run
//! on (no package in the distribution, no network download of release
//! binaries), so this peer stands in for a cluster: N "nodes", each a
//! listener on 127.0.0.1:0, sharing one registry of issued session revival
//! tokens and serialized session states, as the nodes of one CockroachDB
//! cluster share its signing certificates. It behaves as the CockroachDB
//! source describes (section 1 of the design document); the files it
//! follows:
//!
//! - `pkg/sql/conn_executor_exec.go` (`runShowTransferState`): `SHOW
//!   TRANSFER STATE [WITH 'k']` is an observer statement (it never changes
//!   the transaction state); 3 text columns `error`,
//!   `session_state_base64`, `session_revival_token_base64`, and
//!   `transfer_key` last when a key is given; exactly one row; failures are
//!   a value in the `error` column, with NULL state and token; tag
//!   `SHOW TRANSFER STATE 1`.
//! - `pkg/sql/session_state.go` (`serializeSessionState`,
//!   `DeserializeSessionState`) and `pkg/sql/session_revival_token.go`
//!   (`createSessionRevivalToken`): the error texts and the order they are
//!   checked in; `crdb_internal.deserialize_session`'s refusals;
//!   `crdb_internal.serialize_session()` (the state alone, for any user on
//!   any tenant, its refusals as SQL errors).
//! - `pkg/security/sessionrevival/token.go`: tokens name the session user
//!   and live 10 minutes; they are not one-shot.
//! - `pkg/sql/pgwire/pre_serve_options.go` (the
//!   `crdb:session_revival_token_base64` startup parameter, standard
//!   base64, a decoding error is 08P01), `pkg/sql/pgwire/auth.go` and
//!   `auth_methods.go` (`authSessionRevivalToken`: no authentication
//!   request, `invalid session revival token: <why>`; `authPassword` asks
//!   for a cleartext password), `pkg/sql/pgwire/conn.go`
//!   (`statusReportParams`, the ParameterStatus sent at login, with
//!   `crdb_version`), `pkg/sql/pgwire/pgwirecancel/backend_key_data.go`
//!   (the node id in the top bits of BackendKeyData).
//! - `pkg/ccl/sqlproxyccl/conn_migration.go` and `authentication.go`: the
//!   reply framing sqlproxy (CockroachDB's own proxy) expects.
//!
//! Where it knowingly differs: the token and state are random bytes kept
//! in the shared registry, not signed protobufs; `deserialize_session`
//! refuses a state this cluster did not issue (CockroachDB checks only that
//! it decodes), which catches a pgferry that sends the wrong bytes; only
//! the simple query protocol and a handful of statements are understood;
//! the exact SQLSTATE of a refused token login (28000) is inferred.
//!
//! Faults ([`Fault`]) can be set per node while it runs; every login,
//! query, cancel and closed session is recorded ([`Event`]) for the tests
//! to assert on. Threads are std threads on blocking sockets; every read
//! has a timeout so that they notice the cluster being dropped and end.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// The startup parameter a token login carries.
pub const TOKEN_PARAM: &str = "crdb:session_revival_token_base64";
/// What the nodes report as `crdb_version`.
pub const CRDB_VERSION: &str = "CockroachDB CCL v24.1.0 (scripted peer)";
/// `tokenLifetime` in `pkg/security/sessionrevival/token.go`.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// How often blocked reads wake up to look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// How long a client may take over its startup and password messages.
const LOGIN_LIMIT: Duration = Duration::from_secs(10);
/// Writes that take longer than this end the connection.
const WRITE_LIMIT: Duration = Duration::from_secs(10);
/// Larger messages are a protocol violation here.
const MAX_MESSAGE: usize = 1 << 20;

const PROTOCOL_3_0: u32 = 196_608;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

const TEXT: u32 = 25;
const BOOL: u32 = 16;
const INT8: u32 = 20;

/// Per-node fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// On SHOW TRANSFER STATE: send the RowDescription, then reset the
    /// connection.
    DropInTransferState,
    /// Never answer SHOW TRANSFER STATE (nor anything after it); the
    /// connection stays open.
    SilentOnTransferState,
    /// Answer SHOW TRANSFER STATE as usual, but only after this long (a
    /// node under load).
    SlowTransferState(Duration),
    /// On SHOW TRANSFER STATE: close the connection without a word (a
    /// node that dies before it answers).
    CloseOnTransferState,
    /// Refuse every token login: `invalid session revival token`.
    RefuseTokens,
    /// `crdb_internal.deserialize_session` fails with 22023.
    FailDeserialize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    Password,
    Token,
}

/// What the peer saw. Node numbers are 1-based, as in `n1`, `n2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Login { node: u32, user: String, how: Login },
    Query { node: u32, sql: String },
    Cancel { node: u32, matched: bool },
    Closed { node: u32 },
}

pub struct CrdbNode {
    pub id: u32,
    pub addr: SocketAddr,
}

pub struct CrdbCluster {
    shared: Arc<Shared>,
    nodes: Vec<CrdbNode>,
    acceptors: Vec<JoinHandle<()>>,
}

struct TokenEntry {
    user: String,
    expires: Instant,
}

struct StateEntry {
    user: String,
    vars: BTreeMap<String, String>,
}

#[derive(Default)]
struct Registry {
    tokens: HashMap<Vec<u8>, TokenEntry>,
    states: HashMap<Vec<u8>, StateEntry>,
    issued: Vec<String>,
}

struct LiveSession {
    node: u32,
    pid: i32,
    secret: [u8; 4],
    cancel: Arc<AtomicBool>,
}

struct Shared {
    stop: AtomicBool,
    revival_enabled: AtomicBool,
    users: HashMap<String, String>,
    faults: Mutex<Vec<Fault>>,
    registry: Mutex<Registry>,
    events: Mutex<Vec<Event>>,
    event_added: Condvar,
    sessions: Mutex<HashMap<u64, LiveSession>>,
    next_session: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking peer thread must not hide everything else.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        v.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    v.truncate(n);
    v
}

fn random_u32() -> u32 {
    let b = random_bytes(4);
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Shared {
    fn record(&self, e: Event) {
        lock(&self.events).push(e);
        self.event_added.notify_all();
    }

    fn fault(&self, node: u32) -> Fault {
        lock(&self.faults)
            .get(node as usize - 1)
            .copied()
            .unwrap_or(Fault::None)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

impl CrdbCluster {
    /// `nodes` nodes (n1, n2, ...); `users`: (name, password).
    pub fn start(nodes: usize, users: &[(&str, &str)]) -> Self {
        assert!((1..4096).contains(&nodes), "node ids fit in 12 bits");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            revival_enabled: AtomicBool::new(true),
            users: users
                .iter()
                .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
                .collect(),
            faults: Mutex::new(vec![Fault::None; nodes]),
            registry: Mutex::new(Registry::default()),
            events: Mutex::new(Vec::new()),
            event_added: Condvar::new(),
            sessions: Mutex::new(HashMap::new()),
            next_session: std::sync::atomic::AtomicU64::new(1),
        });
        let mut list = Vec::new();
        let mut acceptors = Vec::new();
        for i in 0..nodes {
            let id = i as u32 + 1;
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind a peer node");
            let addr = listener.local_addr().expect("node address");
            let sh = shared.clone();
            acceptors.push(
                std::thread::Builder::new()
                    .name(format!("crdb-n{id}-accept"))
                    .spawn(move || accept_loop(sh, id, listener))
                    .expect("spawn acceptor"),
            );
            list.push(CrdbNode { id, addr });
        }
        CrdbCluster {
            shared,
            nodes: list,
            acceptors,
        }
    }

    /// Node `i`, 1-based (`node(1)` is n1).
    pub fn node(&self, i: usize) -> &CrdbNode {
        &self.nodes[i - 1]
    }

    /// ("n1", "127.0.0.1:port"), ... for `ProxyOptions::bare`.
    pub fn backends(&self) -> Vec<(String, String)> {
        self.nodes
            .iter()
            .map(|n| (format!("n{}", n.id), n.addr.to_string()))
            .collect()
    }

    /// Sets node `i`'s fault (1-based); it applies to what the node does
    /// from now on, on every connection.
    pub fn set_fault(&self, i: usize, f: Fault) {
        lock(&self.shared.faults)[i - 1] = f;
    }

    /// The cluster setting `server.user_login.session_revival_token.enabled`
    /// (on by default here).
    pub fn set_revival_enabled(&self, on: bool) {
        self.shared.revival_enabled.store(on, Ordering::Relaxed);
    }

    pub fn events(&self) -> Vec<Event> {
        lock(&self.shared.events).clone()
    }

    /// Waits (on the event log, no polling) until `cond` holds for it;
    /// fails the test after `limit`. Returns the log at that point.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        mut cond: impl FnMut(&[Event]) -> bool,
    ) -> Vec<Event> {
        let deadline = Instant::now() + limit;
        let mut events = lock(&self.shared.events);
        loop {
            if cond(&events) {
                return events.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; peer events: {:#?}",
                *events
            );
            events = self
                .shared
                .event_added
                .wait_timeout(events, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Every revival token issued so far, base64 as sent.
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.shared.registry).issued.clone()
    }

    /// Logged-in sessions open on node `i` (1-based).
    pub fn sessions_on(&self, i: usize) -> usize {
        lock(&self.shared.sessions)
            .values()
            .filter(|s| s.node as usize == i)
            .count()
    }

    /// Logins on node `i` made the way `how`.
    pub fn logins(&self, i: usize, how: Login) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Login { node, how: h, .. } if *node as usize == i && *h == how))
            .count()
    }

    /// The queries node `i` received, in order.
    pub fn queries_on(&self, i: usize) -> Vec<String> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Query { node, sql } if node as usize == i => Some(sql),
                _ => None,
            })
            .collect()
    }
}

impl Drop for CrdbCluster {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the acceptors up; session threads see the flag within POLL.
        for n in &self.nodes {
            let _ = TcpStream::connect_timeout(&n.addr, Duration::from_secs(1));
        }
        for a in self.acceptors.drain(..) {
            let _ = a.join();
        }
    }
}

fn accept_loop(shared: Arc<Shared>, node: u32, listener: TcpListener) {
    for stream in listener.incoming() {
        if shared.stopping() {
            return;
        }
        let Ok(stream) = stream else { continue };
        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name(format!("crdb-n{node}-conn"))
            .spawn(move || {
                let mut c = Conn::new(stream, sh.clone(), node);
                c.serve();
            });
    }
}

/// Why a connection loop stops.
enum End {
    /// EOF, reset, timeout, stop flag, or a message that ended it.
    Closed,
}

type Res<T> = Result<T, End>;

/// An ErrorResponse's fields.
struct SqlError {
    code: &'static str,
    message: String,
}

fn err(code: &'static str, message: impl Into<String>) -> SqlError {
    SqlError {
        code,
        message: message.into(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Txn {
    Idle,
    InBlock,
    Failed,
}

impl Txn {
    fn status(self) -> u8 {
        match self {
            Txn::Idle => b'I',
            Txn::InBlock => b'T',
            Txn::Failed => b'E',
        }
    }
}

/// One statement's result.
enum Outcome {
    /// Rows: columns (name, type oid), rows of optional text, tag.
    Rows(Vec<(String, u32)>, Vec<Vec<Option<String>>>, String),
    Done(String),
    Error(SqlError),
    /// The statement left the connection (a fault): stop answering.
    Gone,
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    out: Vec<u8>,
    shared: Arc<Shared>,
    node: u32,
    /// Set once logged in: the key in the shared session table.
    session: Option<u64>,
    cancel: Arc<AtomicBool>,
    user: String,
    vars: BTreeMap<String, String>,
    txn: Txn,
    temp_schema: bool,
}

/// Session variables a SET changes, with their defaults (lowercase names).
const DEFAULT_VARS: &[(&str, &str)] = &[
    ("application_name", ""),
    ("client_encoding", "UTF8"),
    ("datestyle", "ISO, MDY"),
    ("intervalstyle", "postgres"),
    ("timezone", "UTC"),
    ("search_path", "\"$user\", public"),
    ("statement_timeout", "0"),
    ("database", ""),
    ("extra_float_digits", "1"),
    ("default_transaction_isolation", "serializable"),
    ("bytea_output", "hex"),
    ("client_min_messages", "notice"),
    ("idle_in_transaction_session_timeout", "0"),
    ("lock_timeout", "0"),
    ("standard_conforming_strings", "on"),
];

/// Read-only variables (SHOW works, SET is refused).
const FIXED_VARS: &[(&str, &str)] = &[
    ("server_version", "13.0.0"),
    ("server_encoding", "UTF8"),
    ("crdb_version", CRDB_VERSION),
    ("integer_datetimes", "on"),
    ("is_superuser", "off"),
];

/// `statusReportParams`: reported at login and when SET changes them;
/// (lowercase name, name as reported).
const STATUS_PARAMS: &[(&str, &str)] = &[
    ("server_version", "server_version"),
    ("server_encoding", "server_encoding"),
    ("client_encoding", "client_encoding"),
    ("application_name", "application_name"),
    ("datestyle", "DateStyle"),
    ("intervalstyle", "IntervalStyle"),
    ("is_superuser", "is_superuser"),
    ("timezone", "TimeZone"),
    ("integer_datetimes", "integer_datetimes"),
    ("standard_conforming_strings", "standard_conforming_strings"),
    ("crdb_version", "crdb_version"),
];

fn status_name(lower: &str) -> Option<&'static str> {
    STATUS_PARAMS
        .iter()
        .find(|(l, _)| *l == lower)
        .map(|(_, n)| *n)
}

impl Conn {
    fn new(stream: TcpStream, shared: Arc<Shared>, node: u32) -> Self {
        let _ = stream.set_read_timeout(Some(POLL));
        let _ = stream.set_write_timeout(Some(WRITE_LIMIT));
        let _ = stream.set_nodelay(true);
        Conn {
            stream,
            buf: Vec::new(),
            out: Vec::new(),
            shared,
            node,
            session: None,
            cancel: Arc::new(AtomicBool::new(false)),
            user: String::new(),
            vars: BTreeMap::new(),
            txn: Txn::Idle,
            temp_schema: false,
        }
    }

    fn serve(&mut self) {
        let _ = self.run();
        if let Some(id) = self.session.take() {
            lock(&self.shared.sessions).remove(&id);
            self.shared.record(Event::Closed { node: self.node });
        }
    }

    fn run(&mut self) -> Res<()> {
        if !self.startup()? {
            return Ok(());
        }
        self.query_loop()
    }

    // ---- framing ----

    /// Fills the buffer to at least `n` bytes; `deadline` bounds the wait
    /// (None: as long as the cluster lives).
    fn fill(&mut self, n: usize, deadline: Option<Instant>) -> Res<()> {
        let mut chunk = [0u8; 8192];
        while self.buf.len() < n {
            if self.shared.stopping() {
                return Err(End::Closed);
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(End::Closed);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(End::Closed),
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(End::Closed),
            }
        }
        Ok(())
    }

    /// A length-prefixed startup-phase packet's body.
    fn read_startup_packet(&mut self, deadline: Instant) -> Res<Vec<u8>> {
        self.fill(4, Some(deadline))?;
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if !(8..=10_000).contains(&len) {
            return Err(End::Closed);
        }
        self.fill(len, Some(deadline))?;
        let body = self.buf[4..len].to_vec();
        self.buf.drain(..len);
        Ok(body)
    }

    /// A tagged message.
    fn read_msg(&mut self, deadline: Option<Instant>) -> Res<(u8, Vec<u8>)> {
        self.fill(5, deadline)?;
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(End::Closed);
        }
        self.fill(1 + len, deadline)?;
        let tag = self.buf[0];
        let body = self.buf[5..1 + len].to_vec();
        self.buf.drain(..1 + len);
        Ok((tag, body))
    }

    fn push(&mut self, tag: u8, body: &[u8]) {
        self.out.push(tag);
        self.out
            .extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        self.out.extend_from_slice(body);
    }

    fn flush(&mut self) -> Res<()> {
        let out = std::mem::take(&mut self.out);
        self.stream.write_all(&out).map_err(|_| End::Closed)
    }

    fn push_error(&mut self, severity: &str, e: &SqlError) {
        let mut b = Vec::new();
        for (k, v) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', e.code),
            (b'M', e.message.as_str()),
        ] {
            b.push(k);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        self.push(b'E', &b);
    }

    /// A FATAL ErrorResponse, then the connection ends.
    fn fatal(&mut self, e: SqlError) -> Res<bool> {
        self.push_error("FATAL", &e);
        let _ = self.flush();
        Ok(false)
    }

    fn push_param(&mut self, name: &str, value: &str) {
        let mut b = Vec::new();
        cstr(&mut b, name);
        cstr(&mut b, value);
        self.push(b'S', &b);
    }

    fn push_ready(&mut self) {
        let s = self.txn.status();
        self.push(b'Z', &[s]);
    }

    // ---- startup ----

    /// Runs the startup phase; true when logged in.
    fn startup(&mut self) -> Res<bool> {
        let deadline = Instant::now() + LOGIN_LIMIT;
        let body = loop {
            let body = self.read_startup_packet(deadline)?;
            let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            match code {
                SSL_REQUEST | GSSENC_REQUEST => {
                    self.stream.write_all(b"N").map_err(|_| End::Closed)?;
                }
                CANCEL_REQUEST => {
                    self.cancel_request(&body[4..]);
                    return Ok(false);
                }
                _ => break body,
            }
        };
        let protocol = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        if protocol >> 16 != 3 {
            return self.fatal(err(
                "08P01",
                format!("unsupported protocol version {protocol:#x}"),
            ));
        }
        let Some(params) = parse_params(&body[4..]) else {
            return self.fatal(err("08P01", "malformed startup message"));
        };
        let mut unknown_options = Vec::new();
        let mut token = None;
        let mut user = None;
        let mut vars: BTreeMap<String, String> = DEFAULT_VARS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for (k, v) in params {
            match k.as_str() {
                "user" => user = Some(v),
                TOKEN_PARAM => token = Some(v),
                "crdb:remote_addr" => {
                    return self.fatal(err(
                        "28000",
                        "server not configured to accept remote address override",
                    ))
                }
                k if k.starts_with("_pq_.") => unknown_options.push(k.to_owned()),
                "options" | "replication" => {}
                _ => {
                    vars.insert(k.to_lowercase(), v);
                }
            }
        }
        // Protocol 3.2 (or any 3.x, x > 0): offer 3.0, as a server that
        // knows only 3.0 does.
        if protocol & 0xffff != 0 || !unknown_options.is_empty() {
            // The newest minor version supported, then the options not
            // recognized.
            let mut b = (PROTOCOL_3_0 & 0xffff).to_be_bytes().to_vec();
            b.extend_from_slice(&(unknown_options.len() as u32).to_be_bytes());
            for o in &unknown_options {
                cstr(&mut b, o);
            }
            self.push(b'v', &b);
        }
        let Some(user) = user.filter(|u| !u.is_empty()) else {
            return self.fatal(err("28000", "no username specified"));
        };
        let how = if let Some(token) = token {
            let raw = match B64.decode(token.as_bytes()) {
                Ok(r) => r,
                Err(e) => {
                    return self.fatal(err(
                        "08P01",
                        format!("{TOKEN_PARAM}: invalid base64 value: {e}"),
                    ))
                }
            };
            if let Err(why) = self.check_token(&raw, &user) {
                return self.fatal(err("28000", why));
            }
            Login::Token
        } else {
            self.push(b'R', &3u32.to_be_bytes());
            self.flush()?;
            let (tag, body) = self.read_msg(Some(deadline))?;
            if tag != b'p' {
                return self.fatal(err(
                    "08P01",
                    format!("expected a password message, got {:?}", tag as char),
                ));
            }
            let password = body.split(|&b| b == 0).next().unwrap_or(&[]);
            let ok = self
                .shared
                .users
                .get(&user)
                .is_some_and(|p| p.as_bytes() == password);
            if !ok {
                return self.fatal(err(
                    "28P01",
                    format!("password authentication failed for user {user}"),
                ));
            }
            Login::Password
        };

        // Logged in.
        self.user = user;
        self.vars = vars;
        let pid = ((self.node << 20) | (random_u32() & 0xf_ffff)) as i32;
        let secret: [u8; 4] = random_u32().to_be_bytes();
        let id = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.sessions).insert(
            id,
            LiveSession {
                node: self.node,
                pid,
                secret,
                cancel: self.cancel.clone(),
            },
        );
        self.session = Some(id);
        self.push(b'R', &0u32.to_be_bytes());
        for (lower, name) in STATUS_PARAMS {
            let v = self.var(lower).unwrap_or_default();
            self.push_param(name, &v);
        }
        let mut k = pid.to_be_bytes().to_vec();
        k.extend_from_slice(&secret);
        self.push(b'K', &k);
        self.push_ready();
        self.flush()?;
        self.shared.record(Event::Login {
            node: self.node,
            user: self.user.clone(),
            how,
        });
        Ok(true)
    }

    /// `authSessionRevivalToken` and `ValidateSessionRevivalToken`.
    fn check_token(&self, raw: &[u8], user: &str) -> Result<(), String> {
        if !self.shared.revival_enabled.load(Ordering::Relaxed) {
            return Err("session revival tokens are not supported on this cluster".into());
        }
        if self.shared.fault(self.node) == Fault::RefuseTokens {
            return Err("invalid session revival token: invalid signature".into());
        }
        let reg = lock(&self.shared.registry);
        let Some(t) = reg.tokens.get(raw) else {
            return Err("invalid session revival token: invalid signature".into());
        };
        if Instant::now() > t.expires {
            return Err(
                "invalid session revival token: token expiration time is in the past".into(),
            );
        }
        if t.user != user {
            return Err(format!(
                "invalid session revival token: token is for the wrong user {:?}, wanted {:?}",
                t.user, user
            ));
        }
        Ok(())
    }

    fn cancel_request(&mut self, key: &[u8]) {
        let target = if key.len() >= 8 {
            let pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
            let secret = &key[4..];
            lock(&self.shared.sessions)
                .values()
                .find(|s| s.node == self.node && s.pid == pid && s.secret[..] == *secret)
                .map(|s| s.cancel.clone())
        } else {
            None
        };
        // Recorded before the query is interrupted, so that a test that
        // has seen the query fail finds the cancel in the log.
        self.shared.record(Event::Cancel {
            node: self.node,
            matched: target.is_some(),
        });
        if let Some(flag) = target {
            flag.store(true, Ordering::Relaxed);
        }
    }

    // ---- queries ----

    fn query_loop(&mut self) -> Res<()> {
        // After an extended-protocol message: skip until Sync.
        let mut skipping = false;
        loop {
            let (tag, body) = self.read_msg(None)?;
            match tag {
                b'Q' => {
                    let sql =
                        String::from_utf8_lossy(body.split(|&b| b == 0).next().unwrap_or(&[]))
                            .into_owned();
                    if !self.simple_query(&sql)? {
                        return self.go_silent();
                    }
                }
                b'X' => return Ok(()),
                b'S' => {
                    skipping = false;
                    self.push_ready();
                    self.flush()?;
                }
                b'H' => {}
                b'P' | b'B' | b'D' | b'E' | b'C' | b'F' => {
                    if !skipping {
                        skipping = true;
                        self.push_error(
                            "ERROR",
                            &err(
                                "0A000",
                                "extended protocol not supported by the scripted peer",
                            ),
                        );
                        self.flush()?;
                    }
                }
                b'd' | b'c' | b'f' => {}
                other => {
                    self.push_error(
                        "FATAL",
                        &err("08P01", format!("invalid frontend message type {other}")),
                    );
                    let _ = self.flush();
                    return Ok(());
                }
            }
        }
    }

    /// Reads and drops everything until the peer goes away or the cluster
    /// stops (SilentOnTransferState).
    fn go_silent(&mut self) -> Res<()> {
        loop {
            self.buf.clear();
            self.fill(1, None)?;
        }
    }

    /// Runs one Query message; false when the connection is to go silent
    /// (or was dropped: then the next read fails).
    fn simple_query(&mut self, sql: &str) -> Res<bool> {
        self.cancel.store(false, Ordering::Relaxed);
        self.shared.record(Event::Query {
            node: self.node,
            sql: sql.to_owned(),
        });
        let statements = split_statements(sql);
        if statements.is_empty() {
            self.push(b'I', &[]);
        }
        for stmt in statements {
            let outcome = self.statement(&stmt);
            match outcome {
                Outcome::Rows(cols, rows, tag) => {
                    self.push_row_description(&cols);
                    for r in &rows {
                        self.push_data_row(r);
                    }
                    self.push_complete(&tag);
                }
                Outcome::Done(tag) => self.push_complete(&tag),
                Outcome::Error(e) => {
                    if self.txn == Txn::InBlock {
                        self.txn = Txn::Failed;
                    }
                    self.push_error("ERROR", &e);
                    break;
                }
                Outcome::Gone => return Ok(false),
            }
        }
        self.push_ready();
        self.flush()?;
        Ok(true)
    }

    fn push_row_description(&mut self, cols: &[(String, u32)]) {
        let mut b = (cols.len() as u16).to_be_bytes().to_vec();
        for (name, oid) in cols {
            cstr(&mut b, name);
            b.extend_from_slice(&0u32.to_be_bytes()); // table
            b.extend_from_slice(&0u16.to_be_bytes()); // column
            b.extend_from_slice(&oid.to_be_bytes());
            let len: i16 = match *oid {
                BOOL => 1,
                INT8 => 8,
                _ => -1,
            };
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes()); // typmod
            b.extend_from_slice(&0u16.to_be_bytes()); // text
        }
        self.push(b'T', &b);
    }

    fn push_data_row(&mut self, row: &[Option<String>]) {
        let mut b = (row.len() as u16).to_be_bytes().to_vec();
        for v in row {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        self.push(b'D', &b);
    }

    fn push_complete(&mut self, tag: &str) {
        let mut b = Vec::new();
        cstr(&mut b, tag);
        self.push(b'C', &b);
    }

    fn var(&self, lower: &str) -> Option<String> {
        if let Some(v) = self.vars.get(lower) {
            return Some(v.clone());
        }
        if lower == "is_superuser" {
            return Some(if self.user == "root" { "on" } else { "off" }.into());
        }
        if lower == "session_user" || lower == "current_user" {
            return Some(self.user.clone());
        }
        FIXED_VARS
            .iter()
            .find(|(k, _)| *k == lower)
            .map(|(_, v)| (*v).to_owned())
    }

    fn statement(&mut self, stmt: &str) -> Outcome {
        let upper = stmt.to_uppercase();
        let words: Vec<&str> = upper.split_whitespace().collect();
        // Observer statements run in any transaction state.
        if words.starts_with(&["SHOW", "TRANSFER", "STATE"]) {
            return self.show_transfer_state(stmt, &words);
        }
        if self.txn == Txn::Failed
            && !matches!(
                words.first(),
                Some(&"COMMIT" | &"ROLLBACK" | &"END" | &"ABORT")
            )
        {
            return Outcome::Error(err(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        }
        match words.as_slice() {
            ["BEGIN", ..] | ["START", "TRANSACTION", ..] => {
                self.txn = Txn::InBlock;
                Outcome::Done("BEGIN".into())
            }
            ["COMMIT" | "END"] | ["COMMIT" | "END", "TRANSACTION" | "WORK"] => {
                let tag = if self.txn == Txn::Failed {
                    "ROLLBACK"
                } else {
                    "COMMIT"
                };
                self.txn = Txn::Idle;
                Outcome::Done(tag.into())
            }
            ["ROLLBACK" | "ABORT"] | ["ROLLBACK" | "ABORT", "TRANSACTION" | "WORK"] => {
                self.txn = Txn::Idle;
                Outcome::Done("ROLLBACK".into())
            }
            ["SET", ..] => self.set(stmt),
            ["SHOW", name] => {
                let lower = name.to_lowercase();
                match self.var(&lower) {
                    Some(v) => {
                        Outcome::Rows(vec![(lower, TEXT)], vec![vec![Some(v)]], "SHOW 1".into())
                    }
                    None => Outcome::Error(err(
                        "42704",
                        format!("unrecognized configuration parameter {lower:?}"),
                    )),
                }
            }
            ["CREATE", "TEMP" | "TEMPORARY", "TABLE", ..] => {
                self.temp_schema = true;
                Outcome::Done("CREATE TABLE".into())
            }
            ["SELECT", "1"] => Outcome::Rows(
                vec![("?column?".into(), INT8)],
                vec![vec![Some("1".into())]],
                "SELECT 1".into(),
            ),
            ["SELECT", "CRDB_INTERNAL.NODE_ID()"] => Outcome::Rows(
                vec![("crdb_internal.node_id".into(), INT8)],
                vec![vec![Some(self.node.to_string())]],
                "SELECT 1".into(),
            ),
            ["SELECT", f, ..] if f.starts_with("PG_SLEEP(") => self.pg_sleep(&upper),
            ["SELECT", f, ..] if f.starts_with("CRDB_INTERNAL.DESERIALIZE_SESSION(") => {
                self.deserialize(stmt)
            }
            ["SELECT", f, ..] if f.starts_with("ENCODE(CRDB_INTERNAL.SERIALIZE_SESSION()") => {
                self.serialize()
            }
            _ => Outcome::Error(err(
                "42601",
                format!(
                    "at or near \"{}\": syntax error",
                    words.first().unwrap_or(&"")
                ),
            )),
        }
    }

    fn set(&mut self, stmt: &str) -> Outcome {
        // SET [SESSION] name {= | TO} value ; SET TIME ZONE value
        let rest = stmt.trim()[3..].trim_start();
        let rest = strip_prefix_ci(rest, "SESSION ")
            .unwrap_or(rest)
            .trim_start();
        let (name, value) = if let Some(v) = strip_prefix_ci(rest, "TIME ZONE ") {
            ("timezone".to_owned(), v.trim())
        } else {
            let Some(pos) = rest.find(|c: char| c == '=' || c.is_whitespace()) else {
                return Outcome::Error(err("42601", "at or near \"EOF\": syntax error"));
            };
            let name = rest[..pos].to_lowercase();
            let after = rest[pos..].trim_start();
            let value = after
                .strip_prefix('=')
                .or_else(|| strip_prefix_ci(after, "TO "))
                .map(str::trim);
            let Some(value) = value else {
                return Outcome::Error(err("42601", "at or near \"SET\": syntax error"));
            };
            (name, value)
        };
        let value = unquote(value);
        let known = DEFAULT_VARS.iter().any(|(k, _)| *k == name);
        if FIXED_VARS.iter().any(|(k, _)| *k == name) {
            return Outcome::Error(err(
                "55P02",
                format!("parameter {name:?} cannot be changed"),
            ));
        }
        if !known && !name.contains('.') {
            return Outcome::Error(err(
                "42704",
                format!("unrecognized configuration parameter {name:?}"),
            ));
        }
        let changed = self.vars.get(&name) != Some(&value);
        self.vars.insert(name.clone(), value.clone());
        if changed {
            if let Some(reported) = status_name(&name) {
                self.push_param(reported, &value);
            }
        }
        Outcome::Done("SET".into())
    }

    fn pg_sleep(&mut self, upper: &str) -> Outcome {
        let arg = upper
            .split_once('(')
            .and_then(|(_, r)| r.split_once(')'))
            .map(|(a, _)| a.trim().trim_matches('\''));
        let Some(secs) = arg.and_then(|a| a.parse::<f64>().ok()) else {
            return Outcome::Error(err("22P02", "could not parse pg_sleep's argument"));
        };
        let end = Instant::now() + Duration::from_secs_f64(secs.clamp(0.0, 600.0));
        loop {
            if self.cancel.swap(false, Ordering::Relaxed) {
                return Outcome::Error(err("57014", "query execution canceled"));
            }
            if self.shared.stopping() {
                return Outcome::Gone;
            }
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(5)));
        }
        Outcome::Rows(
            vec![("pg_sleep".into(), BOOL)],
            vec![vec![Some("t".into())]],
            "SELECT 1".into(),
        )
    }

    fn show_transfer_state(&mut self, stmt: &str, words: &[&str]) -> Outcome {
        let key = match words.len() {
            3 => None,
            _ if words.get(3) == Some(&"WITH") => {
                // The key as written (case kept), between quotes.
                let raw = stmt.trim();
                let at = raw.find('\'');
                let key = at.and_then(|a| {
                    let rest = &raw[a + 1..];
                    rest.find('\'').map(|b| rest[..b].to_owned())
                });
                match key {
                    Some(k) => Some(k),
                    None => {
                        return Outcome::Error(err("42601", "at or near \"WITH\": syntax error"))
                    }
                }
            }
            _ => return Outcome::Error(err("42601", "at or near \"STATE\": syntax error")),
        };
        let mut cols: Vec<(String, u32)> = [
            "error",
            "session_state_base64",
            "session_revival_token_base64",
        ]
        .iter()
        .map(|n| ((*n).to_owned(), TEXT))
        .collect();
        if key.is_some() {
            cols.push(("transfer_key".into(), TEXT));
        }
        match self.shared.fault(self.node) {
            Fault::DropInTransferState => {
                self.push_row_description(&cols);
                let _ = self.flush();
                // A reset, not an orderly close.
                let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
                return Outcome::Gone;
            }
            Fault::SilentOnTransferState => return Outcome::Gone,
            Fault::CloseOnTransferState => {
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
                return Outcome::Gone;
            }
            // The node is slow, not the test waiting on it.
            Fault::SlowTransferState(d) => std::thread::sleep(d),
            _ => {}
        }
        let failure = if self.txn != Txn::Idle {
            Some("cannot serialize a session which is inside a transaction")
        } else if self.temp_schema {
            Some("cannot serialize session with temporary schemas")
        } else if !self.shared.revival_enabled.load(Ordering::Relaxed) {
            Some("session revival tokens are not supported on this cluster")
        } else if self.user == "root" {
            Some("cannot create token for root user")
        } else {
            None
        };
        let mut row = match failure {
            Some(e) => vec![Some(e.to_owned()), None, None],
            None => {
                let (state, token) = self.issue();
                vec![None, Some(state), Some(token)]
            }
        };
        if let Some(k) = key {
            row.push(Some(k));
        }
        Outcome::Rows(cols, vec![row], "SHOW TRANSFER STATE 1".into())
    }

    /// `SELECT encode(crdb_internal.serialize_session(), 'base64')`: the
    /// state alone, no token, so no tenant or root check; the same
    /// serialization checks as SHOW TRANSFER STATE, as SQL errors
    /// (`serializeSessionState`, pkg/sql/session_state.go).
    fn serialize(&mut self) -> Outcome {
        if self.txn != Txn::Idle {
            return Outcome::Error(err(
                "25000",
                "cannot serialize a session which is inside a transaction",
            ));
        }
        if self.temp_schema {
            return Outcome::Error(err(
                "25000",
                "cannot serialize session with temporary schemas",
            ));
        }
        let state = self.register_state();
        Outcome::Rows(
            vec![("encode".into(), TEXT)],
            vec![vec![Some(state)]],
            "SELECT 1".into(),
        )
    }

    /// Registers a state and a token; both base64.
    fn issue(&mut self) -> (String, String) {
        let s64 = self.register_state();
        let token = random_bytes(32);
        let t64 = B64.encode(&token);
        let mut reg = lock(&self.shared.registry);
        reg.tokens.insert(
            token,
            TokenEntry {
                user: self.user.clone(),
                expires: Instant::now() + TOKEN_LIFETIME,
            },
        );
        reg.issued.push(t64.clone());
        (s64, t64)
    }

    /// Registers the session's state; base64.
    fn register_state(&mut self) -> String {
        let mut state = b"scripted-peer-session\0".to_vec();
        state.extend_from_slice(&random_bytes(16));
        state.extend_from_slice(
            serde_json::to_string(&(&self.user, &self.vars))
                .unwrap_or_default()
                .as_bytes(),
        );
        let s64 = B64.encode(&state);
        lock(&self.shared.registry).states.insert(
            state,
            StateEntry {
                user: self.user.clone(),
                vars: self.vars.clone(),
            },
        );
        s64
    }

    fn deserialize(&mut self, stmt: &str) -> Outcome {
        if self.txn != Txn::Idle {
            return Outcome::Error(err(
                "25000",
                "cannot deserialize a session whilst inside a multi-statement transaction",
            ));
        }
        let upper = stmt.to_uppercase();
        let compact: String = upper.split_whitespace().collect();
        if !compact.starts_with("SELECTCRDB_INTERNAL.DESERIALIZE_SESSION(DECODE('")
            || !compact.ends_with("','BASE64'))")
        {
            return Outcome::Error(err(
                "42601",
                "the scripted peer understands only deserialize_session(decode('...', 'base64'))",
            ));
        }
        let b64 = stmt
            .split_once('\'')
            .and_then(|(_, r)| r.split_once('\''))
            .map(|(v, _)| v)
            .unwrap_or("");
        if self.shared.fault(self.node) == Fault::FailDeserialize {
            return Outcome::Error(err(
                "22023",
                "error deserializing session: unexpected EOF (fault injected by the scripted peer)",
            ));
        }
        let Ok(raw) = B64.decode(b64.as_bytes()) else {
            return Outcome::Error(err(
                "22023",
                "error deserializing session: not valid base64",
            ));
        };
        let reg = lock(&self.shared.registry);
        let Some(state) = reg.states.get(&raw) else {
            return Outcome::Error(err(
                "22023",
                "error deserializing session: not a session state this cluster issued",
            ));
        };
        if state.user != self.user {
            return Outcome::Error(err("42501", "can only deserialize matching session users"));
        }
        let vars = state.vars.clone();
        drop(reg);
        // The whole session data is replaced; no ParameterStatus (1.4).
        self.vars = vars;
        Outcome::Rows(
            vec![("crdb_internal.deserialize_session".into(), BOOL)],
            vec![vec![Some("t".into())]],
            "SELECT 1".into(),
        )
    }
}

fn cstr(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(s.as_bytes());
    v.push(0);
}

fn parse_params(mut b: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    loop {
        let nul = b.iter().position(|&c| c == 0)?;
        if nul == 0 {
            return Some(out);
        }
        let k = String::from_utf8_lossy(&b[..nul]).into_owned();
        b = &b[nul + 1..];
        let nul = b.iter().position(|&c| c == 0)?;
        let v = String::from_utf8_lossy(&b[..nul]).into_owned();
        b = &b[nul + 1..];
        out.push((k, v));
    }
}

/// Splits on `;` outside single quotes; drops empty statements.
fn split_statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                cur.push(c);
            }
            ';' if !quoted => {
                out.push(std::mem::take(&mut cur));
            }
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
        v[1..v.len() - 1].replace("''", "'")
    } else {
        v.to_owned()
    }
}
