//! Moving a live session to another backend (PostgreSQL dialect).
//!
//! Runs inside the session's own task, at a safe point the forwarder
//! found, with exclusive ownership of both sockets: capture the state on
//! the old backend (one query), dial and log in to the target exactly as
//! for a new session, replay the state, tell the client about changed
//! parameters, swap the server socket, and close the old one. Anything
//! that fails before the swap leaves the session untouched (recoverable);
//! losing the old backend mid-capture is fatal.

pub mod capture;
pub mod known_state;
pub mod prepare_text;
pub mod replay;
pub mod spares;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use pgferry_wire::messages::{
    encode_parameter_status, encode_parse, encode_sync, encode_terminate,
};
use pgferry_wire::{tag, CancelKey, ErrorFields, StartupMessage};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::backend::dial::{self, put_raw, read_message, DialError};
use crate::backend::login::BackendCredentials;
use crate::backend::role::TargetSessionAttrs;
use crate::backend::{Backend, BackendLease};
use crate::cancel::CancelTarget;
use crate::forwarder::careful::Deferred;
use crate::forwarder::extended::{decode_unnamed_parse, Unnamed, MAX_UNNAMED_STATEMENT};
use crate::forwarder::Forwarder;
use crate::ProxyContext;
use capture::{capture_query, parse_capture, UnnamedStatement, OWN_STATEMENT};
use known_state::KnownState;

/// Who the session is, for dialing a target as the client.
pub struct SessionIdentity<'a> {
    pub id: Uuid,
    pub startup: &'a StartupMessage,
    pub credentials: &'a BackendCredentials,
    /// The key the client holds (pgferry's own); it does not change.
    pub cancel_key: &'a CancelKey,
    /// Its warm-spare key, when spares are on.
    pub spare_params: Option<&'a spares::Params>,
    /// Which roles it may run on.
    pub attrs: TargetSessionAttrs,
}

/// The backend end of the session, besides its socket (which the
/// forwarder owns).
pub struct ServerSide {
    pub lease: BackendLease,
    pub peer: SocketAddr,
    pub key: CancelKey,
    /// The session's state here as of its last capture or replay, kept
    /// for the next migration (boxed: most sessions never have one).
    pub known: Option<Box<KnownState>>,
}

impl ServerSide {
    pub fn backend(&self) -> &Arc<Backend> {
        self.lease.backend()
    }
}

#[derive(Debug)]
pub enum TransferError {
    /// The session is where it was, untouched.
    Recoverable(String),
    /// The session cannot go on.
    Fatal(String),
    /// The old backend ended the session itself (`pg_terminate_backend`,
    /// `idle_session_timeout`, a shutdown) as the move started or while it
    /// ran. What it said has reached the client unchanged (`said_why`: it
    /// sent an ErrorResponse); the session ends as it would have without
    /// pgferry. Not a pgferry failure.
    BackendEnded { said_why: bool },
}

/// How a move that met `TransferError::BackendEnded` is reported.
pub const BACKEND_ENDED: &str = "backend ended the session";

use TransferError::{BackendEnded, Fatal, Recoverable};

/// The target for a transfer: the named backend, or the least-loaded
/// other one; either must be taking sessions.
pub fn choose_target(
    ctx: &ProxyContext,
    current: &str,
    to: Option<&str>,
    attrs: TargetSessionAttrs,
) -> Result<Arc<Backend>, TransferError> {
    match to {
        Some(name) if name == current => Err(Recoverable(format!("session is already on {name}"))),
        Some(name) => {
            let b = ctx
                .backends
                .get(name)
                .ok_or_else(|| Recoverable(format!("unknown backend {name:?}")))?;
            if b.accepts_sessions() && !attrs.allows(b.role()) {
                Err(Recoverable(format!(
                    "backend {name} is a {} and this session is {}",
                    b.role().as_str(),
                    attrs.as_str()
                )))
            } else if b.accepts_sessions() {
                Ok(b)
            } else {
                Err(Recoverable(format!(
                    "backend {name} is {} and takes no sessions",
                    b.state().as_str()
                )))
            }
        }
        None => ctx
            .backends
            .migration_targets(current, attrs)
            .into_iter()
            .next()
            .ok_or_else(|| Recoverable("no other active backend to move to".into())),
    }
}

/// Moves the session; on success returns the new backend's name.
///
/// `old_may_end`: a switchover's move, whose state was captured during the
/// hold. Its old primary may have been shut down since by the orchestrator
/// that promoted the standby; what that server said on the way out (its
/// FATAL) is about a connection pgferry replaces, so the move goes on with
/// the known state and the client is not told (it lost nothing).
pub async fn transfer(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    server: &mut ServerSide,
    session: &SessionIdentity<'_>,
    to: Option<&str>,
    old_may_end: bool,
) -> Result<String, TransferError> {
    let max_len = ctx.config.proxy.max_message_length;
    let current = server.backend().name.clone();
    let target = choose_target(ctx, &current, to, session.attrs)?;

    // 1. Capture on the old backend while dialing the target: the two are
    //    independent, and the session's traffic is held during both.
    let mut startup_chatter = BytesMut::new();
    let phase = |name: &str| ctx.metrics.migration_phase.with_label_values(&[name]);
    let custom = custom_setting_names(ctx, fwd);
    let last_request = fwd.tracker.last_request();
    let unnamed = match fwd.tracker.unnamed_statement() {
        Unnamed::None => None,
        Unnamed::Known(body) => Some(decode_unnamed_parse(body).ok_or_else(|| {
            Recoverable("the session's unnamed prepared statement is unreadable".into())
        })?),
        Unnamed::TooLarge => {
            return Err(Recoverable(format!(
                "the session's unnamed prepared statement is over {MAX_UNNAMED_STATEMENT} bytes"
            )))
        }
        Unnamed::Unknown => {
            return Err(Recoverable(
                "the session's unnamed prepared statement is not known".into(),
            ))
        }
    };
    let unnamed = unnamed.map(|(query, oids)| (query.to_owned(), oids));
    let unnamed = unnamed.as_ref().map(|(query, oids)| UnnamedStatement {
        query,
        parameter_oids: oids,
    });
    // Reused only while the old backend has nothing unread to say: the
    // capture would relay that to the client; a swap would drop it.
    let known = server
        .known
        .take()
        .and_then(|k| k.still_holds(last_request, &custom))
        .or_else(|| known_state::login_state(last_request))
        .filter(|_| old_may_end || fwd.server.is_silent());
    let reused = known.is_some();
    let connect = timed(
        phase("connect"),
        target_connection(ctx, &target, session, &mut startup_chatter),
    );
    let (captured, dialed) = match known {
        Some(state) => {
            ctx.metrics.migration_state_reused.inc();
            (Ok(state), connect.await)
        }
        None => {
            let captured = timed(
                phase("capture"),
                capture(ctx, fwd, &current, session, &custom, unnamed),
            );
            let (captured, dialed) = tokio::join!(captured, connect);
            if let Ok(state) = &captured {
                ctx.metrics.migration_state_bytes.observe(state.size as f64);
            }
            (captured, dialed)
        }
    };
    // A failed capture drops the new connection, whatever its state.
    let mut state = captured?;
    let backslash_escapes = fwd
        .tracker
        .parameters()
        .contains("standard_conforming_strings", "off");
    prepare_text::isolate_prepares(&mut state, backslash_escapes).map_err(Recoverable)?;
    // True here whatever happens next, and on the target after a replay.
    server.known = KnownState::keep(last_request, &custom, &state, false);
    let mut conn = match dialed {
        Ok(c) => c,
        Err(e) => {
            if matches!(e, DialError::Unreachable(_)) {
                ctx.metrics
                    .backend_dial_errors
                    .with_label_values(&[target.name.as_str()])
                    .inc();
            }
            return Err(Recoverable(format!(
                "could not connect to {}: {e}",
                target.name
            )));
        }
    };

    // 2. Replay; any error drops the new connection.
    let replayed = timed(
        phase("replay"),
        tokio::time::timeout(
            ctx.config.proxy.connect_timeout,
            replay::replay(&mut conn, &state, max_len),
        ),
    )
    .await
    .map_err(|_| Recoverable(format!("replay on {} timed out", target.name)))?
    .map_err(|e| Recoverable(format!("{} on {}", e, target.name)))?;
    let params = replayed.parameters;
    let mut deferred = Vec::new();
    for u in replayed.unparsed {
        if !broken_on_old_backend(ctx, fwd, &current, &u).await? {
            return Err(Recoverable(format!(
                "prepared statement {:?} cannot be re-created on {}: {}",
                u.statement.name,
                target.name,
                replay::describe(&u.error)
            )));
        }
        let mut parse = BytesMut::new();
        pgferry_wire::messages::encode_parse(
            &mut parse,
            &u.statement.name,
            &u.statement.statement,
            &u.oids,
        )
        .map_err(|e| Recoverable(e.to_string()))?;
        // The body: what follows the 5-byte header.
        deferred.push(Deferred {
            name: u.statement.name,
            parse: parse.get(5..).unwrap_or_default().into(),
        });
    }

    // 3. Whatever the old backend said meanwhile is the client's to hear;
    //    if it ended the session (an administrator's pg_terminate_backend
    //    during the move), the session ends, as it would have.
    if old_may_end && reused {
        farewell_unheard(fwd, &current, max_len).await;
    } else {
        last_words(fwd, max_len).await?;
    }

    // 4. Swap. From here on the session runs on the target.
    let mut old_stream = swap(ctx, fwd, server, session, conn, params, deferred).await;
    // Say goodbye to the old backend off the session's path.
    let session_id = session.id;
    tokio::spawn(async move {
        let mut x = BytesMut::new();
        if encode_terminate(&mut x).is_ok() {
            let _ = old_stream.write_all(&x).await;
        }
        // A FATAL now means a kill raced the swap by microseconds: the
        // session lives on elsewhere, which only the log can tell.
        let mut inbuf = BytesMut::new();
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            while let Ok(m) = read_message(&mut old_stream, &mut inbuf, max_len).await {
                if m.tag == tag::ERROR_RESPONSE
                    && ErrorFields::decode(&m.body).is_ok_and(|f| f.ends_session())
                {
                    tracing::warn!(session = %session_id, "the old backend ended the session as it moved; it goes on on the new backend");
                }
            }
        })
        .await;
        let _ = old_stream.shutdown().await;
    });
    Ok(target.name.clone())
}

/// What `remember` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Remembered {
    /// Known already (the client has sent nothing since).
    AlreadyKnown,
    /// Captured now and kept.
    Captured,
    /// Not known, and why: a move would be refused for the same reason.
    Unknown(String),
}

/// Captures and keeps the session's state (it is at a safe point, its
/// traffic held) unless it is known already: for an idle session on a
/// clustered backend (`[failover] remember_state_after`), so it can be
/// rehomed if its primary dies; for a session a switchover holds, while
/// its old primary is surely up (an orchestrator may shut it down before
/// the move), then kept whatever its size. `Fatal` and `BackendEnded` end
/// the session as a failed capture during a move would.
pub async fn remember(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    server: &mut ServerSide,
    session: &SessionIdentity<'_>,
    any_size: bool,
) -> Result<Remembered, TransferError> {
    let custom = custom_setting_names(ctx, fwd);
    let last_request = fwd.tracker.last_request();
    let known = server
        .known
        .take()
        .and_then(|k| k.still_holds(last_request, &custom))
        .or_else(|| known_state::login_state(last_request));
    if let Some(state) = known {
        server.known = KnownState::keep(last_request, &custom, &state, true);
        return Ok(Remembered::AlreadyKnown);
    }
    let unnamed = match fwd.tracker.unnamed_statement() {
        Unnamed::None => None,
        Unnamed::Known(body) => decode_unnamed_parse(body).map(|(q, o)| (q.to_owned(), o)),
        Unnamed::TooLarge => {
            return Ok(Remembered::Unknown(format!(
                "the session's unnamed prepared statement is over {MAX_UNNAMED_STATEMENT} bytes"
            )))
        }
        Unnamed::Unknown => {
            return Ok(Remembered::Unknown(
                "the session's unnamed prepared statement is not known".into(),
            ))
        }
    };
    let unnamed_ref = unnamed.as_ref().map(|(query, oids)| UnnamedStatement {
        query,
        parameter_oids: oids,
    });
    let current = server.backend().name.clone();
    let mut state = match capture(ctx, fwd, &current, session, &custom, unnamed_ref).await {
        Ok(state) => state,
        Err(Recoverable(why)) => return Ok(Remembered::Unknown(why)),
        Err(e) => return Err(e),
    };
    let backslash_escapes = fwd
        .tracker
        .parameters()
        .contains("standard_conforming_strings", "off");
    if let Err(why) = prepare_text::isolate_prepares(&mut state, backslash_escapes) {
        return Ok(Remembered::Unknown(why));
    }
    server.known = KnownState::keep(last_request, &custom, &state, any_size);
    Ok(if server.known.is_some() {
        Remembered::Captured
    } else {
        Remembered::Unknown("its state is too large to keep".into())
    })
}

/// Puts `conn` (logged in and replayed) under the session: the client
/// hears of changed parameters, cancels go to the new backend. Returns the
/// old server socket.
pub async fn swap(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    server: &mut ServerSide,
    session: &SessionIdentity<'_>,
    conn: dial::ServerConnection,
    params: crate::parameters::ParameterList,
    deferred: Vec<Deferred>,
) -> crate::stream::Stream {
    let mut for_client = BytesMut::new();
    for (name, value) in params.iter() {
        let known = fwd.tracker.parameters().contains(name, value);
        if !known && encode_parameter_status(&mut for_client, name, value).is_err() {
            tracing::warn!(%name, "could not relay parameter status");
        }
    }
    let target = conn.backend().name.clone();
    let dial::ServerConnection {
        stream,
        lease,
        peer,
        key,
        ..
    } = conn;
    let old_stream = std::mem::replace(&mut fwd.server, stream);
    let known = server.known.take();
    let _old = std::mem::replace(
        server,
        ServerSide {
            lease,
            peer,
            key: key.clone(),
            known,
        },
    );
    ctx.cancel_map.retarget(
        session.cancel_key,
        CancelTarget {
            backend: target,
            address: peer,
            key,
        },
    );
    fwd.tracker.set_parameters(params);
    if !deferred.is_empty() {
        tracing::info!(
            count = deferred.len(),
            "statements that do not parse here are re-created at their first use"
        );
        fwd.defer_statements(deferred);
    }
    if !for_client.is_empty() {
        // A client that is gone will be noticed by the forwarder.
        let _ = fwd.client.write_all(&for_client).await;
        let _ = fwd.client.flush().await;
    }
    old_stream
}

/// Custom settings (placeholders such as `app.tenant`) a capture asks for:
/// the configured ones and those the client was seen setting.
pub fn custom_setting_names(ctx: &ProxyContext, fwd: &Forwarder<'_>) -> Vec<String> {
    let mut custom: Vec<String> = ctx.config.migration.carry_settings.clone();
    for n in fwd.tracker.custom_settings() {
        if !custom.contains(n) {
            custom.push(n.clone());
        }
    }
    custom
}

/// Runs `fut`, recording how long it took.
async fn timed<F: std::future::Future>(h: prometheus::Histogram, fut: F) -> F::Output {
    let t = std::time::Instant::now();
    let r = fut.await;
    h.observe(t.elapsed().as_secs_f64());
    r
}

/// A logged-in connection to `target` as the client: a warm spare when
/// one is ready, else a fresh dial.
pub async fn target_connection(
    ctx: &ProxyContext,
    target: &Arc<Backend>,
    session: &SessionIdentity<'_>,
    chatter: &mut BytesMut,
) -> Result<dial::ServerConnection, DialError> {
    // A spare was reset (DISCARD ALL) before it was parked and nothing has
    // been sent on it since (`take` checks it is still silent), so it is
    // used as it is: a second reset here would only compete with the
    // capture for the CPU.
    if let Some(params) = session.spare_params {
        if let Some(conn) = ctx.spares.take(&target.name, params) {
            ctx.metrics.spares_taken.inc();
            return Ok(conn);
        }
    }
    dial::connect(
        BackendLease::new(target.clone()),
        &ctx.dial,
        session.startup,
        session.credentials,
        chatter,
    )
    .await
}

/// Runs the capture query on the old backend and reads the session state.
/// Messages meant for the client that arrive meanwhile are delivered.
async fn capture(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    current: &str,
    session: &SessionIdentity<'_>,
    custom: &[String],
    unnamed: Option<UnnamedStatement<'_>>,
) -> Result<capture::SessionState, TransferError> {
    let row = query_old_backend(ctx, fwd, current, &capture_query(custom, unnamed)).await?;
    let cols =
        pgferry_wire::messages::decode_data_row(&row).map_err(|e| Recoverable(e.to_string()))?;
    let parsed = parse_capture(&cols, custom, unnamed, session.startup.user());
    let state = match parsed.map_err(Recoverable)? {
        Ok(state) => state,
        Err(blocker) => return Err(Recoverable(blocker.reason().into())),
    };
    // Only a session that once made a temporary object has a temporary
    // schema; whether it still holds any is asked apart, so that other
    // sessions' captures need not plan a pg_class scan.
    if let Some(schema) = state.temp_schema {
        let row =
            query_old_backend(ctx, fwd, current, &capture::temp_relations_query(schema)).await?;
        if count_of(&row)? > 0 {
            return Err(Recoverable(capture::Blocker::TempTables.reason().into()));
        }
    }
    // PREPARE TRANSACTION leaves the transaction on this server, for this
    // session (or its transaction manager) to COMMIT PREPARED here: not on
    // another backend. Only a server that allows them can have any.
    if state.two_phase {
        let row =
            query_old_backend(ctx, fwd, current, capture::prepared_transactions_query()).await?;
        if count_of(&row)? > 0 {
            return Err(Recoverable(
                capture::Blocker::PreparedTransactions.reason().into(),
            ));
        }
    }
    Ok(state)
}

/// The one number of a one-column count row.
fn count_of(row: &[u8]) -> Result<i64, TransferError> {
    let cols =
        pgferry_wire::messages::decode_data_row(row).map_err(|e| Recoverable(e.to_string()))?;
    cols.first()
        .copied()
        .flatten()
        .and_then(|c| std::str::from_utf8(c).ok()?.parse::<i64>().ok())
        .ok_or_else(|| Recoverable("count row unreadable".into()))
}

/// How long a late capture answer is waited for before the backend counts
/// as gone (its session is then closed: it cannot be resumed out of turn).
const LATE_CAPTURE_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Time allowed for a backend's last words once it is known to be leaving.
const GOODBYE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs one query on the session's current backend (its traffic held), as
/// a named statement of the extended protocol, and returns its one row. Messages meant for the client that
/// arrive meanwhile are delivered. A backend that ends the session here
/// (its FATAL relayed) gives `BackendEnded`; one that stops answering is
/// fatal.
async fn query_old_backend(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    current: &str,
    sql: &str,
) -> Result<bytes::Bytes, TransferError> {
    let enc = |e: pgferry_wire::EncodeError| Recoverable(e.to_string());
    let mut out = BytesMut::new();
    encode_parse(&mut out, OWN_STATEMENT, sql, &[]).map_err(enc)?;
    let mut bind = vec![0u8];
    bind.extend_from_slice(OWN_STATEMENT.as_bytes());
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
    put_raw(&mut out, tag::BIND, &bind);
    put_raw(&mut out, tag::EXECUTE, &[0, 0, 0, 0, 0]);
    encode_sync(&mut out).map_err(enc)?;
    // Closed after the Sync, so an error above cannot skip it.
    close_own_statement(&mut out).map_err(enc)?;
    let (row, error) = ask_old_backend(ctx, fwd, current, &out, 2).await?;
    if let Some(e) = error {
        return Err(Recoverable(format!(
            "capture failed: {}",
            e.message().unwrap_or("error")
        )));
    }
    row.ok_or_else(|| Recoverable("capture returned no row".into()))
}

/// Close of `OWN_STATEMENT` and a Sync (closing one that does not exist
/// is no error).
fn close_own_statement(out: &mut BytesMut) -> Result<(), pgferry_wire::EncodeError> {
    let mut close = vec![b'S'];
    close.extend_from_slice(OWN_STATEMENT.as_bytes());
    close.push(0);
    put_raw(out, tag::CLOSE, &close);
    encode_sync(out)
}

/// One exchange of pgferry's own with the old backend: sends `out`, reads
/// until `ready` ReadyForQuery; the last row and the first (non-FATAL)
/// error.
async fn ask_old_backend(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    current: &str,
    out: &[u8],
    ready: usize,
) -> Result<(Option<bytes::Bytes>, Option<ErrorFields>), TransferError> {
    let max_len = ctx.config.proxy.max_message_length;
    let old_dead =
        |e: &dyn std::fmt::Display| Fatal(format!("backend {current} failed during capture: {e}"));
    let mut inbuf = BytesMut::new();
    // Messages the client must still get (notices, notifications, the
    // server's own FATAL).
    let mut for_client = BytesMut::new();
    let sent = async {
        fwd.server.write_all(out).await?;
        fwd.server.flush().await
    }
    .await;
    if sent.is_err() {
        // The backend had closed: it may have said why before it went.
        let said_why = drain_goodbye(&mut fwd.server, &mut inbuf, &mut for_client, max_len).await;
        relay(fwd, &mut for_client).await;
        return Err(BackendEnded { said_why });
    }
    let mut row = None;
    let mut error = None;
    // Past `capture_timeout` the move is abandoned, but the answer is still
    // awaited: it must not reach the client out of turn, and a backend that
    // is only slow keeps the session (the client's own next query would
    // have waited for it too). Only one silent for LATE_CAPTURE_LIMIT is
    // given up on.
    let started = tokio::time::Instant::now();
    let mut deadline = started + ctx.config.migration.capture_timeout;
    let mut seen = 0;
    let mut late = false;
    loop {
        let m = match tokio::time::timeout_at(
            deadline,
            read_message(&mut fwd.server, &mut inbuf, max_len),
        )
        .await
        {
            Err(_) if !late => {
                tracing::warn!(
                    backend = %current,
                    "capture answer late; the move is abandoned, waiting for the backend"
                );
                late = true;
                deadline = started + LATE_CAPTURE_LIMIT;
                continue;
            }
            Err(_) => return Err(old_dead(&"no answer to the capture query")),
            Ok(Err(_)) => {
                // Closed or reset: the session is over on that backend.
                relay(fwd, &mut for_client).await;
                return Err(BackendEnded { said_why: false });
            }
            Ok(Ok(m)) => m,
        };
        match m.tag {
            tag::DATA_ROW => row = Some(m.body),
            tag::ERROR_RESPONSE => {
                let f = ErrorFields::decode(&m.body).map_err(|e| old_dead(&e))?;
                if f.ends_session() {
                    put_raw(&mut for_client, m.tag, &m.body);
                    drain_goodbye(&mut fwd.server, &mut inbuf, &mut for_client, max_len).await;
                    relay(fwd, &mut for_client).await;
                    return Err(BackendEnded { said_why: true });
                }
                error.get_or_insert(f);
            }
            tag::READY_FOR_QUERY => {
                seen += 1;
                if seen == ready {
                    break;
                }
            }
            t if meant_for_client(t) => keep_for_client(fwd, &mut for_client, t, &m.body),
            _ => {}
        }
    }
    // Whatever happens next, the client gets what arrived meanwhile (a
    // LISTENing session's notification must not be lost to a refused move).
    relay(fwd, &mut for_client).await;
    if late {
        return Err(Recoverable(format!(
            "capture answer later than capture_timeout ({:?}): backend {current} is slow",
            ctx.config.migration.capture_timeout
        )));
    }
    Ok((row, error))
}

/// Whether `u` fails to parse on the old backend too, with the same
/// SQLSTATE: then it is the session's own state (its table was dropped),
/// which PostgreSQL keeps until the statement is used, and the session may
/// move with it deferred. Otherwise the backends differ, and it must not.
async fn broken_on_old_backend(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    current: &str,
    u: &replay::Unparsed,
) -> Result<bool, TransferError> {
    let enc = |e: pgferry_wire::EncodeError| Recoverable(e.to_string());
    // The parameter types by name, resolved here as the replay resolved
    // them on the target.
    let oids = match replay::type_resolution_sql(&[&u.statement]) {
        Some(sql) => {
            let row = query_old_backend(ctx, fwd, current, &sql).await?;
            let cols = pgferry_wire::messages::decode_data_row(&row)
                .map_err(|e| Recoverable(e.to_string()))?;
            let text = cols
                .first()
                .copied()
                .flatten()
                .and_then(|c| std::str::from_utf8(c).ok())
                .ok_or_else(|| Recoverable("type resolution returned no types".into()))?;
            replay::parse_oids(text).map_err(Recoverable)?
        }
        None => Vec::new(),
    };
    let mut out = BytesMut::new();
    encode_parse(&mut out, OWN_STATEMENT, &u.statement.statement, &oids).map_err(enc)?;
    encode_sync(&mut out).map_err(enc)?;
    close_own_statement(&mut out).map_err(enc)?;
    let (_, error) = ask_old_backend(ctx, fwd, current, &out, 2).await?;
    Ok(error.is_some_and(|e| e.sqlstate().is_some() && e.sqlstate() == u.error.sqlstate()))
}

/// Reads what a closing backend still has to say, until it is gone or
/// `GOODBYE_TIMEOUT`, keeping what is meant for the client. True if that
/// includes an ErrorResponse.
async fn drain_goodbye(
    server: &mut crate::stream::Stream,
    inbuf: &mut BytesMut,
    for_client: &mut BytesMut,
    max_len: u32,
) -> bool {
    let mut said_why = false;
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        while let Ok(m) = read_message(server, inbuf, max_len).await {
            if matches!(
                m.tag,
                tag::ERROR_RESPONSE | tag::NOTICE_RESPONSE | tag::NOTIFICATION_RESPONSE
            ) {
                said_why |= m.tag == tag::ERROR_RESPONSE;
                put_raw(for_client, m.tag, &m.body);
            }
        }
    })
    .await;
    said_why
}

/// Checks, without waiting, whether the old backend said anything while
/// the move ran: notices and notifications go to the client; a FATAL (or
/// the connection gone) ends the session with `BackendEnded`.
async fn last_words(fwd: &mut Forwarder<'_>, max_len: u32) -> Result<(), TransferError> {
    if fwd.server.is_silent() {
        return Ok(());
    }
    let mut inbuf = BytesMut::new();
    let mut for_client = BytesMut::new();
    let mut ended = None;
    loop {
        // One look without waiting, unless a message is half-read.
        let limit = if inbuf.is_empty() {
            std::time::Duration::ZERO
        } else {
            GOODBYE_TIMEOUT
        };
        match tokio::time::timeout(limit, read_message(&mut fwd.server, &mut inbuf, max_len)).await
        {
            Err(_) => break,
            Ok(Err(_)) => {
                ended.get_or_insert(false);
                break;
            }
            Ok(Ok(m)) => match m.tag {
                tag::ERROR_RESPONSE => {
                    put_raw(&mut for_client, m.tag, &m.body);
                    if ErrorFields::decode(&m.body).is_ok_and(|f| f.ends_session()) {
                        ended = Some(true);
                    }
                }
                t if meant_for_client(t) => keep_for_client(fwd, &mut for_client, t, &m.body),
                _ => {}
            },
        }
    }
    if let Some(true) = ended {
        drain_goodbye(&mut fwd.server, &mut inbuf, &mut for_client, max_len).await;
    }
    relay(fwd, &mut for_client).await;
    match ended {
        Some(said_why) => Err(BackendEnded { said_why }),
        None => Ok(()),
    }
}

/// Reads, without waiting, what the old backend of a switchover's move said
/// since the hold, for the log only (see `transfer`'s `old_may_end`).
async fn farewell_unheard(fwd: &mut Forwarder<'_>, current: &str, max_len: u32) {
    if fwd.server.is_silent() {
        return;
    }
    let mut inbuf = BytesMut::new();
    while let Ok(Ok(m)) = tokio::time::timeout(
        GOODBYE_TIMEOUT / 10,
        read_message(&mut fwd.server, &mut inbuf, max_len),
    )
    .await
    {
        if m.tag == tag::ERROR_RESPONSE {
            let f = ErrorFields::decode(&m.body).ok();
            tracing::info!(
                backend = %current,
                said = f.as_ref().and_then(|f| f.message()).unwrap_or(""),
                "the old primary closed the session during the switchover; it moves on with its state"
            );
        }
    }
}

/// Messages of the old backend's that the client must get even though
/// pgferry's own exchange is running: notices, notifications, parameter
/// changes.
fn meant_for_client(t: u8) -> bool {
    matches!(
        t,
        tag::PARAMETER_STATUS | tag::NOTICE_RESPONSE | tag::NOTIFICATION_RESPONSE
    )
}

/// Keeps such a message for the client; a parameter change is noted as
/// the client's, so the swap tells it the target's value if that differs.
fn keep_for_client(fwd: &mut Forwarder<'_>, for_client: &mut BytesMut, t: u8, body: &[u8]) {
    if t == tag::PARAMETER_STATUS {
        fwd.tracker.note_parameter(body);
    }
    put_raw(for_client, t, body);
}

/// Sends whole messages to the client (both directions are at a message
/// boundary during a move) and notes the last one as the latest response.
async fn relay(fwd: &mut Forwarder<'_>, for_client: &mut BytesMut) {
    if for_client.is_empty() {
        return;
    }
    if let Some(tag) = last_tag(for_client) {
        fwd.tracker.note_relayed(tag);
    }
    let _ = fwd.client.write_all(for_client).await;
    let _ = fwd.client.flush().await;
    for_client.clear();
}

/// The tag of the last whole message in `buf`.
fn last_tag(buf: &[u8]) -> Option<u8> {
    let mut pos = 0;
    let mut last = None;
    while let Some(header) = buf.get(pos..pos + 5) {
        last = Some(header[0]);
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        pos += 1 + len;
    }
    last
}
