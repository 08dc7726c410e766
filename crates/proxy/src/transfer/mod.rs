//! Moving a live session to another backend.
//!
//! Runs inside the session's own task, at a safe point the forwarder
//! found, with exclusive ownership of both sockets: the backend's dialect
//! takes the state on the old backend and puts it on a new connection to
//! the target (`postgres`: a catalog query and a replay; `cockroach`: SHOW
//! TRANSFER STATE, a revival-token login and `deserialize_session`); then,
//! for both, the old backend's last words reach the client, changed
//! parameters are told, the server socket is swapped and the old one
//! closed. Anything that fails before the swap leaves the session
//! untouched (recoverable); losing the old backend in the middle of its
//! answer is fatal.

pub mod capture;
pub mod cockroach;
pub mod known_state;
pub mod postgres;
pub mod prepare_text;
pub mod replay;
pub mod spares;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pgferry_wire::messages::{encode_parameter_status, encode_terminate};
use pgferry_wire::{tag, CancelKey, ErrorFields, StartupMessage};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::backend::dial::{self, put_raw, read_message, DialError};
use crate::backend::dialect::Dialect;
use crate::backend::login::BackendCredentials;
use crate::backend::role::TargetSessionAttrs;
use crate::backend::{Backend, BackendLease};
use crate::cancel::CancelTarget;
use crate::forwarder::careful::Deferred;
use crate::forwarder::Forwarder;
use crate::ProxyContext;
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
    current: &Backend,
    to: Option<&str>,
    attrs: TargetSessionAttrs,
) -> Result<Arc<Backend>, TransferError> {
    let dialect = current.move_dialect();
    match to {
        Some(name) if name == current.name => {
            Err(Recoverable(format!("session is already on {name}")))
        }
        Some(name) => {
            let b = ctx
                .backends
                .get(name)
                .ok_or_else(|| Recoverable(format!("unknown backend {name:?}")))?;
            if !b.speaks(dialect) {
                Err(other_dialect(&b, dialect))
            } else if b.accepts_sessions() && !attrs.allows(b.role()) {
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

/// A target that speaks another dialect than the session's backend.
fn other_dialect(target: &Backend, dialect: Dialect) -> TransferError {
    Recoverable(format!(
        "backend {} is {} and this session is on {}",
        target.name,
        target.move_dialect().as_str(),
        dialect.as_str()
    ))
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
    let current = server.backend().clone();
    let dialect = current.move_dialect();
    let target = choose_target(ctx, &current, to, session.attrs)?;

    // 1–2. The dialect's own capture, dial and replay; the session's
    //      traffic is held throughout.
    let prepared = match dialect {
        Dialect::Postgres => {
            postgres::prepare(ctx, fwd, server, session, &target, old_may_end).await?
        }
        Dialect::Cockroach => cockroach::prepare(ctx, fwd, &current.name, session, &target).await?,
    };
    // A target no one had logged in to is known now.
    if target.move_dialect() != dialect {
        return Err(other_dialect(&target, dialect));
    }
    let Prepared {
        conn,
        params,
        deferred,
        old_may_have_ended,
    } = prepared;
    let current = current.name.clone();

    // 3. Whatever the old backend said meanwhile is the client's to hear;
    //    if it ended the session (an administrator's pg_terminate_backend
    //    during the move), the session ends, as it would have.
    if old_may_have_ended {
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

/// A connection to the target, logged in as the client with the session's
/// state in place, ready to be swapped in.
pub struct Prepared {
    pub conn: dial::ServerConnection,
    /// The session's parameters on it, as the client must know them.
    pub params: crate::parameters::ParameterList,
    /// Prepared statements re-created at their first use.
    pub deferred: Vec<Deferred>,
    /// A switchover's move with a state known before its hold: the old
    /// primary may have gone since, which the client need not hear.
    pub old_may_have_ended: bool,
}

/// A failed dial to a move's target: recoverable, counted when the target
/// could not be reached.
fn dial_failure(ctx: &ProxyContext, target: &Backend, e: DialError) -> TransferError {
    if matches!(e, DialError::Unreachable(_)) {
        ctx.metrics
            .backend_dial_errors
            .with_label_values(&[target.name.as_str()])
            .inc();
    }
    Recoverable(format!("could not connect to {}: {e}", target.name))
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
    match server.backend().move_dialect() {
        Dialect::Postgres => postgres::remember(ctx, fwd, server, session, any_size).await,
        // Its state comes with a token that expires in ten minutes; it is
        // asked for only when the session moves.
        Dialect::Cockroach => Ok(Remembered::Unknown(
            "a cockroachdb session's state is taken only when it moves".into(),
        )),
    }
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

/// Runs `fut`, recording how long it took.
async fn timed<F: std::future::Future>(h: prometheus::Histogram, fut: F) -> F::Output {
    let t = std::time::Instant::now();
    let r = fut.await;
    h.observe(t.elapsed().as_secs_f64());
    r
}

/// How long a late capture answer is waited for before the backend counts
/// as gone (its session is then closed: it cannot be resumed out of turn).
const LATE_CAPTURE_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Time allowed for a backend's last words once it is known to be leaving.
const GOODBYE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the old backend answered to one of pgferry's own exchanges.
#[derive(Debug, Default)]
struct Answer {
    /// The last RowDescription, DataRow and CommandComplete bodies.
    description: Option<Bytes>,
    row: Option<Bytes>,
    complete: Option<Bytes>,
    /// How many DataRows came.
    rows: usize,
    /// The first error (not a FATAL: that ends the session).
    error: Option<ErrorFields>,
}

/// One exchange of pgferry's own with the old backend: sends `out`, reads
/// until `ready` ReadyForQuery. A backend that closes before answering
/// ended the session (`BackendEnded`); one that closes in the middle of
/// its answer, or stays silent for `LATE_CAPTURE_LIMIT`, fails the move
/// (`Fatal`): the session cannot be resumed out of step with it.
async fn ask_old_backend(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    current: &str,
    out: &[u8],
    ready: usize,
) -> Result<Answer, TransferError> {
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
    let mut answer = Answer::default();
    // Whether the backend has begun answering pgferry's exchange.
    let mut answering = false;
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
            Ok(Err(e)) if answering => {
                relay(fwd, &mut for_client).await;
                return Err(old_dead(&format_args!("connection lost mid-answer: {e}")));
            }
            Ok(Err(_)) => {
                // Closed or reset: the session is over on that backend.
                relay(fwd, &mut for_client).await;
                return Err(BackendEnded { said_why: false });
            }
            Ok(Ok(m)) => m,
        };
        answering |= !meant_for_client(m.tag);
        match m.tag {
            tag::ROW_DESCRIPTION => answer.description = Some(m.body),
            tag::DATA_ROW => {
                answer.rows += 1;
                answer.row = Some(m.body);
            }
            tag::COMMAND_COMPLETE => answer.complete = Some(m.body),
            tag::ERROR_RESPONSE => {
                let f = ErrorFields::decode(&m.body).map_err(|e| old_dead(&e))?;
                if f.ends_session() {
                    put_raw(&mut for_client, m.tag, &m.body);
                    drain_goodbye(&mut fwd.server, &mut inbuf, &mut for_client, max_len).await;
                    relay(fwd, &mut for_client).await;
                    return Err(BackendEnded { said_why: true });
                }
                answer.error.get_or_insert(f);
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
    Ok(answer)
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
