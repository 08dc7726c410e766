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
use pgferry_wire::messages::{encode_parameter_status, encode_query, encode_terminate};
use pgferry_wire::{tag, CancelKey, ErrorFields, StartupMessage};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::backend::dial::{self, put_raw, read_message, DialError};
use crate::backend::login::BackendCredentials;
use crate::backend::{Backend, BackendLease};
use crate::cancel::CancelTarget;
use crate::forwarder::Forwarder;
use crate::ProxyContext;
use capture::{capture_query, parse_capture};
use known_state::KnownState;

/// Who the session is, for dialing a target as the client.
pub struct SessionIdentity<'a> {
    pub id: Uuid,
    pub startup: &'a StartupMessage,
    pub credentials: &'a BackendCredentials,
    /// The key the client holds (pgferry's own); it does not change.
    pub cancel_key: CancelKey,
    /// Its warm-spare key, when spares are on.
    pub spare_params: Option<&'a spares::Params>,
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
}

use TransferError::{Fatal, Recoverable};

/// The target for a transfer: the named backend, or the least-loaded
/// other one; either must be taking sessions.
pub fn choose_target(
    ctx: &ProxyContext,
    current: &str,
    to: Option<&str>,
) -> Result<Arc<Backend>, TransferError> {
    match to {
        Some(name) if name == current => Err(Recoverable(format!("session is already on {name}"))),
        Some(name) => {
            let b = ctx
                .backends
                .get(name)
                .ok_or_else(|| Recoverable(format!("unknown backend {name:?}")))?;
            if b.accepts_sessions() {
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
            .migration_targets(current)
            .into_iter()
            .next()
            .ok_or_else(|| Recoverable("no other active backend to move to".into())),
    }
}

/// Moves the session; on success returns the new backend's name.
pub async fn transfer(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    server: &mut ServerSide,
    session: &SessionIdentity<'_>,
    to: Option<&str>,
) -> Result<String, TransferError> {
    let max_len = ctx.config.proxy.max_message_length;
    let current = server.backend().name.clone();
    let target = choose_target(ctx, &current, to)?;

    // 1. Capture on the old backend while dialing the target: the two are
    //    independent, and the session's traffic is held during both.
    let mut startup_chatter = BytesMut::new();
    let phase = |name: &str| ctx.metrics.migration_phase.with_label_values(&[name]);
    let custom = custom_setting_names(ctx, fwd);
    let last_request = fwd.tracker.last_request();
    // Reused only while the old backend has nothing unread to say: the
    // capture would relay that to the client; a swap would drop it.
    let known = server
        .known
        .take()
        .and_then(|k| k.still_holds(last_request, &custom))
        .filter(|_| fwd.server.is_silent());
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
                capture(ctx, fwd, &current, session, &custom),
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
    server.known = KnownState::keep(last_request, &custom, &state);
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
    let params = timed(
        phase("replay"),
        tokio::time::timeout(
            ctx.config.proxy.connect_timeout,
            replay::replay(&mut conn, &state, max_len),
        ),
    )
    .await
    .map_err(|_| Recoverable(format!("replay on {} timed out", target.name)))?
    .map_err(|e| Recoverable(format!("{} on {}", e, target.name)))?;

    // 3. Swap. From here on the session runs on the target.
    let mut for_client = BytesMut::new();
    for (name, value) in params.iter() {
        let known = fwd.tracker.parameters().contains(name, value);
        if !known && encode_parameter_status(&mut for_client, name, value).is_err() {
            tracing::warn!(%name, "could not relay parameter status");
        }
    }
    let dial::ServerConnection {
        stream,
        lease,
        peer,
        key,
        ..
    } = conn;
    let mut old_stream = std::mem::replace(&mut fwd.server, stream);
    let known = server.known.take();
    let _old = std::mem::replace(
        server,
        ServerSide {
            lease,
            peer,
            key,
            known,
        },
    );
    ctx.cancel_map.retarget(
        session.cancel_key,
        CancelTarget {
            backend: target.name.clone(),
            address: peer,
            key,
        },
    );
    fwd.tracker.set_parameters(params);
    if !for_client.is_empty() {
        // A client that is gone will be noticed by the forwarder.
        let _ = fwd.client.write_all(&for_client).await;
        let _ = fwd.client.flush().await;
    }
    // Say goodbye to the old backend off the session's path.
    tokio::spawn(async move {
        let mut x = BytesMut::new();
        if encode_terminate(&mut x).is_ok() {
            let _ = old_stream.write_all(&x).await;
        }
        let _ = old_stream.shutdown().await;
    });
    Ok(target.name.clone())
}

/// Custom settings (placeholders such as `app.tenant`) a capture asks for:
/// the configured ones and those the client was seen setting.
fn custom_setting_names(ctx: &ProxyContext, fwd: &Forwarder<'_>) -> Vec<String> {
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
async fn target_connection(
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
) -> Result<capture::SessionState, TransferError> {
    let row = query_old_backend(ctx, fwd, current, &capture_query(custom)).await?;
    let cols =
        pgferry_wire::messages::decode_data_row(&row).map_err(|e| Recoverable(e.to_string()))?;
    let state = match parse_capture(&cols, custom, session.startup.user()).map_err(Recoverable)? {
        Ok(state) => state,
        Err(blocker) => return Err(Recoverable(blocker.reason().into())),
    };
    // Only a session that once made a temporary object has a temporary
    // schema; whether it still holds any is asked apart, so that other
    // sessions' captures need not plan a pg_class scan.
    if let Some(schema) = state.temp_schema {
        let row =
            query_old_backend(ctx, fwd, current, &capture::temp_relations_query(schema)).await?;
        let cols = pgferry_wire::messages::decode_data_row(&row)
            .map_err(|e| Recoverable(e.to_string()))?;
        let count = cols
            .first()
            .copied()
            .flatten()
            .and_then(|c| std::str::from_utf8(c).ok()?.parse::<i64>().ok())
            .ok_or_else(|| Recoverable("temporary relation count unreadable".into()))?;
        if count > 0 {
            return Err(Recoverable(capture::Blocker::TempTables.reason().into()));
        }
    }
    Ok(state)
}

/// Runs one simple query on the session's current backend (its traffic
/// held) and returns its one row. Messages meant for the client that
/// arrive meanwhile are delivered. Losing the backend here is fatal.
async fn query_old_backend(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    current: &str,
    sql: &str,
) -> Result<bytes::Bytes, TransferError> {
    let max_len = ctx.config.proxy.max_message_length;
    let mut out = BytesMut::new();
    encode_query(&mut out, sql).map_err(|e| Recoverable(e.to_string()))?;
    let old_dead =
        |e: &dyn std::fmt::Display| Fatal(format!("backend {current} failed during capture: {e}"));
    fwd.server.write_all(&out).await.map_err(|e| old_dead(&e))?;
    fwd.server.flush().await.map_err(|e| old_dead(&e))?;
    let mut inbuf = BytesMut::new();
    let mut row = None;
    let mut error = None;
    // Messages the client must still get (notices, notifications).
    let mut for_client = BytesMut::new();
    // A backend that stops answering mid-capture cannot be handed the
    // session back (its answer would arrive later, out of turn).
    let capture_deadline = tokio::time::Instant::now() + ctx.config.proxy.connect_timeout;
    loop {
        let m = tokio::time::timeout_at(
            capture_deadline,
            read_message(&mut fwd.server, &mut inbuf, max_len),
        )
        .await
        .map_err(|_| old_dead(&"no answer before connect_timeout"))?
        .map_err(|e| old_dead(&e))?;
        match m.tag {
            tag::DATA_ROW => row = Some(m.body),
            tag::ERROR_RESPONSE => {
                let f = ErrorFields::decode(&m.body).map_err(|e| old_dead(&e))?;
                error = Some(f.message().unwrap_or("error").to_owned());
            }
            tag::READY_FOR_QUERY => break,
            tag::NOTICE_RESPONSE | b'A' | tag::PARAMETER_STATUS => {
                put_raw(&mut for_client, m.tag, &m.body)
            }
            _ => {}
        }
    }
    // Whatever happens next, the client gets what arrived meanwhile (a
    // LISTENing session's notification must not be lost to a refused move).
    // Both directions are at a message boundary, so whole messages may go.
    if !for_client.is_empty() {
        let _ = fwd.client.write_all(&for_client).await;
        let _ = fwd.client.flush().await;
        for_client.clear();
    }
    if let Some(e) = error {
        return Err(Recoverable(format!("capture failed: {e}")));
    }
    row.ok_or_else(|| Recoverable("capture returned no row".into()))
}
