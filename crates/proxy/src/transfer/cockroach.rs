//! The CockroachDB dialect of a move, as CockroachDB's own sqlproxy does it
//! (`pkg/ccl/sqlproxyccl/conn_migration.go`): the old node serializes the
//! session (`SHOW TRANSFER STATE WITH '<key>'`), the target is logged in to
//! with the revival token it issued instead of a password, and
//! `crdb_internal.deserialize_session` puts the state there.
//!
//! Where pgferry differs from sqlproxy (docs/crdb-design.md, section 2):
//! the statement is sent only at a quiescent point, so the first answer
//! that is not asynchronous is its answer and an ErrorResponse is not
//! ambiguous; a complete answer of any kind leaves the session untouched
//! (recoverable); only losing the old node in the middle of it is fatal.
//! The token is a bearer credential: it is kept in a `RevivalToken`, which
//! nothing prints, and dropped (zeroed) once the login is written.
//!
//! Where a node will not issue tokens (the system tenant of every
//! self-hosted cluster, the setting off, the root user) but has serialized
//! the session, pgferry, which holds the client's credentials, takes the
//! state with `crdb_internal.serialize_session()` and logs in to the target
//! as it would for a new session; `deserialize_session` asks only that the
//! session user match (`DeserializeSessionState`, pkg/sql/session_state.go).

use std::sync::Arc;

use bytes::BytesMut;
use pgferry_wire::messages::{
    decode_command_complete, decode_data_row, decode_row_description, encode_query,
};
use uuid::Uuid;

use super::{ask_old_backend, dial_failure, timed, Answer, Prepared, SessionIdentity};
use super::{TransferError, TransferError::Recoverable};
use crate::backend::admin_conn::{simple_query, AdminSqlError};
use crate::backend::dial::{self, ServerConnection};
use crate::backend::login::{is_base64, LoginAuth, RevivalToken};
use crate::backend::{Backend, BackendLease};
use crate::forwarder::Forwarder;
use crate::ProxyContext;

/// Column names of the answer, in CockroachDB's order (`transfer_key` is
/// there because a key is given, and always last).
const COLUMNS: [&str; 4] = [
    "error",
    "session_state_base64",
    "session_revival_token_base64",
    "transfer_key",
];

/// The serialized session, standard base64; Debug shows its length only.
struct SerializedSession(String);

impl std::fmt::Debug for SerializedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SerializedSession({} bytes)", self.0.len())
    }
}

/// What a successful SHOW TRANSFER STATE gave.
#[derive(Debug)]
struct TransferState {
    session: SerializedSession,
    token: RevivalToken,
}

/// Why SHOW TRANSFER STATE gave no state and token.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// The node serialized the session but would not issue a token for it
    /// (`createSessionRevivalToken`, pkg/sql/session_revival_token.go,
    /// runs after the serialization's own checks passed).
    NoToken(String),
    /// Anything else: CockroachDB's reason, or what was wrong with the
    /// answer.
    Other(String),
}

/// The `error` texts of a node that serialized the session but issues no
/// token: revival tokens off or the system tenant, and the root user.
const NO_TOKEN: [&str; 2] = [
    "session revival tokens are not supported on this cluster",
    "cannot create token for root user",
];

/// The state alone, as base64 text.
const SERIALIZE: &str = "SELECT encode(crdb_internal.serialize_session(), 'base64')";

/// Takes the state on the old node, logs in to `target` (with the token,
/// or as for a new session where the node issues none) and deserializes
/// it there. Any failure drops the new connection and leaves
/// the session as it was, except the old node dying mid-answer (`Fatal`,
/// from `ask_old_backend`).
pub(super) async fn prepare(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    current: &str,
    session: &SessionIdentity<'_>,
    target: &Arc<Backend>,
) -> Result<Prepared, TransferError> {
    let max_len = ctx.config.proxy.max_message_length;
    let phase = |name: &str| ctx.metrics.migration_phase.with_label_values(&[name]);

    // 1. The state, on the old node. Asynchronous messages meanwhile go to
    //    the client (ask_old_backend).
    let key = Uuid::new_v4().to_string();
    let sql = format!("SHOW TRANSFER STATE WITH '{key}'");
    let answer = ask(ctx, fwd, current, &sql).await?;
    let (serialized, token) = match read_transfer_state(&answer, &key) {
        Ok(TransferState { session, token }) => {
            observe_state(ctx, &answer);
            (session, Some(token))
        }
        Err(Refused::NoToken(why)) => {
            tracing::debug!(reason = %why, "no revival token; the state moves with a password login");
            let answer = ask(ctx, fwd, current, SERIALIZE).await?;
            let state = read_serialized(&answer).map_err(Recoverable)?;
            observe_state(ctx, &answer);
            (state, None)
        }
        Err(Refused::Other(why)) => return Err(Recoverable(why)),
    };
    drop(answer);

    // 2. A login to the target: with the token, no password and no HBA
    //    rule (the node checks the token was issued for this user); without
    //    one, as for a new session.
    let auth = match &token {
        Some(token) => LoginAuth::RevivalToken(token),
        None => LoginAuth::Credentials(session.credentials),
    };
    let mut chatter = BytesMut::new();
    let dialed = timed(
        phase("connect"),
        dial::connect(
            BackendLease::new(target.clone()),
            &ctx.dial,
            session.startup,
            auth,
            &mut chatter,
        ),
    )
    .await;
    drop(token);
    let mut conn = dialed.map_err(|e| dial_failure(ctx, target, e))?;

    // 3. The state, on the target. The client keeps the parameters it
    //    knows; any the target reports changing on the way are told.
    conn.parameters = fwd.tracker.parameters().clone();
    timed(
        phase("replay"),
        deserialize(
            &mut conn,
            &serialized,
            ctx.config.proxy.connect_timeout,
            max_len,
        ),
    )
    .await
    .map_err(|why| Recoverable(format!("deserialize_session on {}: {why}", target.name)))?;
    let params = conn.parameters.clone();
    Ok(Prepared {
        conn,
        params,
        deferred: Vec::new(),
        old_may_have_ended: false,
    })
}

/// One simple Query of pgferry's own on the old node, timed as the capture.
async fn ask(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    current: &str,
    sql: &str,
) -> Result<Answer, TransferError> {
    let mut out = BytesMut::new();
    encode_query(&mut out, sql).map_err(|e| Recoverable(e.to_string()))?;
    let phase = ctx.metrics.migration_phase.with_label_values(&["capture"]);
    timed(phase, ask_old_backend(ctx, fwd, current, &out, 1)).await
}

/// Checks the answer is CockroachDB's: one row under the four columns, for
/// this key, tagged `SHOW TRANSFER STATE 1`. Its `error` column is the
/// node's refusal (in a transaction, temporary schemas, root, revival
/// tokens off), given verbatim.
fn read_transfer_state(answer: &Answer, key: &str) -> Result<TransferState, Refused> {
    read_transfer_answer(answer, key).map_err(|why| {
        if NO_TOKEN.contains(&why.as_str()) {
            Refused::NoToken(why)
        } else {
            Refused::Other(why)
        }
    })
}

fn read_transfer_answer(answer: &Answer, key: &str) -> Result<TransferState, String> {
    if let Some(e) = &answer.error {
        return Err(format!(
            "SHOW TRANSFER STATE failed: {}",
            e.message().unwrap_or("error")
        ));
    }
    let unexpected = |what: &str| format!("unexpected SHOW TRANSFER STATE answer: {what}");
    let names = answer
        .description
        .as_deref()
        .map(decode_row_description)
        .transpose()
        .map_err(|e| unexpected(&e.to_string()))?
        .ok_or_else(|| unexpected("no RowDescription"))?;
    if names != COLUMNS {
        return Err(unexpected(&format!("columns {names:?}")));
    }
    let complete = answer
        .complete
        .as_deref()
        .map(decode_command_complete)
        .transpose()
        .map_err(|e| unexpected(&e.to_string()))?;
    if complete != Some("SHOW TRANSFER STATE 1") || answer.rows != 1 {
        return Err(unexpected(&format!(
            "{} rows, tag {complete:?}",
            answer.rows
        )));
    }
    let row = answer.row.as_deref().unwrap_or_default();
    let cols = decode_data_row(row).map_err(|e| unexpected(&e.to_string()))?;
    let [error, state, token, echoed] = cols[..] else {
        return Err(unexpected(&format!("{} values", cols.len())));
    };
    if echoed != Some(key.as_bytes()) {
        return Err(unexpected("another transfer key"));
    }
    if let Some(why) = error.filter(|e| !e.is_empty()) {
        return Err(String::from_utf8_lossy(why).into_owned());
    }
    let (Some(state), Some(token)) = (state, token) else {
        return Err(unexpected("no state or no token"));
    };
    Ok(TransferState {
        session: SerializedSession::from_column(state).map_err(|e| unexpected(&e))?,
        token: RevivalToken::from_column(token).map_err(|e| unexpected(&e))?,
    })
}

/// The one value of `SERIALIZE`'s answer; the node's error as it said it
/// (the same checks as SHOW TRANSFER STATE's: a transaction, temporary
/// schemas, portals, the size limit).
fn read_serialized(answer: &Answer) -> Result<SerializedSession, String> {
    if let Some(e) = &answer.error {
        return Err(e.message().unwrap_or("serialize_session failed").to_owned());
    }
    let row = answer.row.as_deref().filter(|_| answer.rows == 1);
    let cols = row
        .map(decode_data_row)
        .transpose()
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    match cols[..] {
        [Some(state)] => SerializedSession::from_column(state),
        _ => Err(format!(
            "unexpected serialize_session answer: {} rows",
            answer.rows
        )),
    }
}

impl SerializedSession {
    /// Base64 (line breaks, which an `encode` may add, dropped), checked
    /// before it is put between quotes in the deserialize query.
    fn from_column(b: &[u8]) -> Result<Self, String> {
        let text: Vec<u8> = b
            .iter()
            .copied()
            .filter(|c| !matches!(c, b'\n' | b'\r'))
            .collect();
        if text.is_empty() || !is_base64(&text) {
            return Err("the state is not base64".into());
        }
        Ok(Self(String::from_utf8_lossy(&text).into_owned()))
    }
}

/// Records the size of the answer that carried the state.
fn observe_state(ctx: &ProxyContext, answer: &Answer) {
    if let Some(row) = &answer.row {
        ctx.metrics.migration_state_bytes.observe(row.len() as f64);
    }
}

/// `crdb_internal.deserialize_session` on `conn`; it must answer `t`.
async fn deserialize(
    conn: &mut ServerConnection,
    state: &SerializedSession,
    limit: std::time::Duration,
    max_len: u32,
) -> Result<(), String> {
    let sql = format!(
        "SELECT crdb_internal.deserialize_session(decode('{}', 'base64'))",
        state.0
    );
    let rows = match tokio::time::timeout(limit, simple_query(conn, &sql, max_len)).await {
        Err(_) => return Err(format!("no answer within {limit:?}")),
        Ok(Err(AdminSqlError::Server(f))) => return Err(f.message().unwrap_or("error").to_owned()),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(rows)) => rows,
    };
    match &rows[..] {
        [row] if matches!(&row[..], [Some(t)] if t == "t") => Ok(()),
        _ => Err(format!("unexpected answer {rows:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes};

    fn description(names: &[&str]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i16(names.len() as i16);
        for n in names {
            b.put_slice(n.as_bytes());
            b.put_u8(0);
            b.put_slice(&[0; 18]);
        }
        b.freeze()
    }

    fn row(values: &[Option<&str>]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v.as_bytes());
                }
            }
        }
        b.freeze()
    }

    fn answer(values: &[Option<&str>]) -> Answer {
        Answer {
            description: Some(description(&COLUMNS)),
            row: Some(row(values)),
            complete: Some(Bytes::from_static(b"SHOW TRANSFER STATE 1\0")),
            rows: 1,
            error: None,
        }
    }

    #[test]
    fn a_good_answer_gives_state_and_token() {
        let a = answer(&[None, Some("c3RhdGU="), Some("dG9rZW4="), Some("k")]);
        let s = read_transfer_state(&a, "k").unwrap();
        assert_eq!(s.session.0, "c3RhdGU=");
        assert_eq!(s.token.expose(), "dG9rZW4=");
        // Neither shows in a log line made of it.
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("dG9rZW4") && !shown.contains("c3RhdGU"),
            "{shown}"
        );
    }

    #[test]
    fn the_error_column_is_the_reason_verbatim() {
        let a = answer(&[
            Some("cannot serialize session with temporary schemas"),
            None,
            None,
            Some("k"),
        ]);
        assert_eq!(
            read_transfer_state(&a, "k").unwrap_err(),
            Refused::Other("cannot serialize session with temporary schemas".into())
        );
        for why in NO_TOKEN {
            let a = answer(&[Some(why), None, None, Some("k")]);
            assert_eq!(
                read_transfer_state(&a, "k").unwrap_err(),
                Refused::NoToken(why.into())
            );
        }
    }

    #[test]
    fn a_serialized_state_loses_its_line_breaks() {
        let a = Answer {
            row: Some(row(&[Some("c3Rh\ndGU=")])),
            rows: 1,
            ..Answer::default()
        };
        assert_eq!(read_serialized(&a).unwrap().0, "c3RhdGU=");
        let a = Answer {
            row: Some(row(&[Some("c3'--")])),
            rows: 1,
            ..Answer::default()
        };
        assert!(read_serialized(&a).is_err());
        assert!(read_serialized(&Answer::default()).is_err());
    }

    #[test]
    fn anything_else_is_refused() {
        let ok = [None, Some("c3RhdGU="), Some("dG9rZW4="), Some("k")];
        assert!(read_transfer_state(&answer(&ok), "other").is_err());
        let quote = [None, Some("c3'); DROP"), Some("dG9rZW4="), Some("k")];
        assert!(read_transfer_state(&answer(&quote), "k").is_err());
        let mut a = answer(&ok);
        a.rows = 2;
        assert!(read_transfer_state(&a, "k").is_err());
        let mut a = answer(&ok);
        a.description = Some(description(&COLUMNS[..3]));
        assert!(read_transfer_state(&a, "k").is_err());
        let mut a = answer(&ok);
        a.complete = Some(Bytes::from_static(b"SELECT 1\0"));
        assert!(read_transfer_state(&a, "k").is_err());
    }
}
