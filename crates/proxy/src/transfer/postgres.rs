//! The PostgreSQL dialect of a move: capture the session's state with one
//! catalog query on the old backend while dialing the target as the client
//! (a warm spare if one is ready), then replay it there (`set_config` for
//! each setting, Parse for each prepared statement). A state captured
//! earlier and still true (`known_state`) is reused instead of asked again.

use std::sync::Arc;

use bytes::BytesMut;
use pgferry_wire::messages::{encode_parse, encode_sync};
use pgferry_wire::tag;

use super::capture::{self, capture_query, parse_capture, UnnamedStatement, OWN_STATEMENT};
use super::known_state::{self, KnownState};
use super::{
    ask_old_backend, dial_failure, prepare_text, replay, timed, Prepared, Remembered, ServerSide,
    SessionIdentity, TransferError,
};
use crate::backend::dial::{self, put_raw, DialError};
use crate::backend::login::LoginAuth;
use crate::backend::{Backend, BackendLease};
use crate::forwarder::careful::Deferred;
use crate::forwarder::extended::{decode_unnamed_parse, Unnamed, MAX_UNNAMED_STATEMENT};
use crate::forwarder::Forwarder;
use crate::ProxyContext;
use TransferError::Recoverable;

/// Captures (or reuses) the state, dials `target` and replays it there.
/// Any failure drops the new connection and leaves the session as it was.
pub(super) async fn prepare(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    server: &mut ServerSide,
    session: &SessionIdentity<'_>,
    target: &Arc<Backend>,
    old_may_end: bool,
) -> Result<Prepared, TransferError> {
    let max_len = ctx.config.proxy.max_message_length;
    let current = server.backend().name.clone();

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
        target_connection(ctx, target, session, &mut startup_chatter),
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
    let mut conn = dialed.map_err(|e| dial_failure(ctx, target, e))?;

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

    Ok(Prepared {
        conn,
        params,
        deferred,
        old_may_have_ended: old_may_end && reused,
    })
}

/// `transfer::remember` for a PostgreSQL session.
pub(super) async fn remember(
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
        LoginAuth::Credentials(session.credentials),
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
    let answer = ask_old_backend(ctx, fwd, current, &out, 2).await?;
    if let Some(e) = answer.error {
        return Err(Recoverable(format!(
            "capture failed: {}",
            e.message().unwrap_or("error")
        )));
    }
    answer
        .row
        .ok_or_else(|| Recoverable("capture returned no row".into()))
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
    let error = ask_old_backend(ctx, fwd, current, &out, 2).await?.error;
    Ok(error.is_some_and(|e| e.sqlstate().is_some() && e.sqlstate() == u.error.sqlstate()))
}
