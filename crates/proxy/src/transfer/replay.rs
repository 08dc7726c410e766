//! Replaying captured state on the target backend: identity first, then
//! settings (search_path before everything else), then prepared statements,
//! because name resolution at Parse time depends on search_path.

use bytes::BytesMut;
use pgferry_wire::messages::{
    decode_data_row, decode_parameter_status, encode_parse, encode_query, encode_sync,
};
use pgferry_wire::{tag, ErrorFields};
use tokio::io::AsyncWriteExt;

use super::capture::{quote_ident, quote_literal, PreparedStatement, SessionState};
use crate::backend::dial::{read_message, ServerConnection};
use crate::parameters::ParameterList;

/// The statement that restores identity and settings, if any is needed.
pub fn settings_sql(state: &SessionState) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(user) = &state.session_authorization {
        parts.push(format!("SET SESSION AUTHORIZATION {}", quote_ident(user)));
    }
    if let Some(role) = &state.role {
        parts.push(format!("SET ROLE {}", quote_ident(role)));
    }
    let mut settings: Vec<&(String, String)> = state.settings.iter().chain(&state.custom).collect();
    // search_path first: later values may be resolved through it.
    settings.sort_by_key(|(n, _)| n != "search_path");
    if !settings.is_empty() {
        let calls: Vec<String> = settings
            .iter()
            .map(|(n, v)| {
                format!(
                    "set_config({}, {}, false)",
                    quote_literal(n),
                    quote_literal(v)
                )
            })
            .collect();
        parts.push(format!("SELECT {}", calls.join(", ")));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// One row with, per protocol-level statement, its parameter type OIDs on
/// this server as `{oid,oid}`.
pub fn type_resolution_sql(statements: &[&PreparedStatement]) -> Option<String> {
    if statements.is_empty() {
        return None;
    }
    let cols: Vec<String> = statements
        .iter()
        .map(|p| {
            let names: Vec<String> = p.parameter_types.iter().map(|t| quote_literal(t)).collect();
            format!(
                "ARRAY[{}]::text[]::regtype[]::oid[]::text",
                names.join(", ")
            )
        })
        .collect();
    Some(format!("SELECT {}", cols.join(", ")))
}

pub fn parse_oids(text: &str) -> Result<Vec<u32>, String> {
    let inner = text.trim_start_matches('{').trim_end_matches('}');
    if inner.is_empty() {
        return Ok(Vec::new());
    }
    inner
        .split(',')
        .map(|o| o.parse().map_err(|_| format!("bad type oid {o:?}")))
        .collect()
}

/// A protocol-level statement whose Parse fails on the target: what the
/// client's statement is, with its parameter type OIDs on the target, and
/// the target's error.
#[derive(Debug, Clone)]
pub struct Unparsed {
    pub statement: PreparedStatement,
    pub oids: Vec<u32>,
    pub error: ErrorFields,
}

/// What a replay left on the target.
#[derive(Debug)]
pub struct Replayed {
    /// ParameterStatus values after the replay.
    pub parameters: ParameterList,
    /// Protocol-level statements that would not parse (their table was
    /// dropped, say): the caller decides whether the session may move.
    pub unparsed: Vec<Unparsed>,
}

/// Runs the replay on `conn`. Any error but a protocol-level statement
/// that does not parse means the target connection must be dropped.
pub async fn replay(
    conn: &mut ServerConnection,
    state: &SessionState,
    max_len: u32,
) -> Result<Replayed, String> {
    let mut params = conn.parameters.clone();
    let mut out = BytesMut::new();
    let mut queries = 0;
    let enc = |e: pgferry_wire::EncodeError| e.to_string();
    if let Some(sql) = settings_sql(state) {
        encode_query(&mut out, &sql).map_err(enc)?;
        queries += 1;
    }
    for p in state.prepared.iter().filter(|p| p.from_sql) {
        encode_query(&mut out, &p.statement).map_err(enc)?;
        queries += 1;
    }
    let protocol: Vec<&PreparedStatement> = state.prepared.iter().filter(|p| !p.from_sql).collect();
    let types_sql = type_resolution_sql(&protocol);
    if let Some(sql) = &types_sql {
        encode_query(&mut out, sql).map_err(enc)?;
        queries += 1;
    }
    let done = |parameters| Replayed {
        parameters,
        unparsed: Vec::new(),
    };
    if queries == 0 {
        return Ok(done(params));
    }
    let (errors, types_row) = exchange(
        conn,
        &out,
        queries,
        max_len,
        &mut params,
        types_sql.is_some(),
    )
    .await?;
    if let Some(e) = errors.into_iter().flatten().next() {
        return Err(format!("replay failed: {}", describe(&e)));
    }
    if protocol.is_empty() {
        return Ok(done(params));
    }
    let row = types_row.ok_or("type resolution returned no row")?;
    out.clear();
    // One Sync each: a statement that does not parse must not hide the
    // ones after it, and its error must be its own.
    let mut oids = Vec::with_capacity(protocol.len());
    for (p, o) in protocol.iter().zip(row) {
        let o = parse_oids(&o)?;
        encode_parse(&mut out, &p.name, &p.statement, &o).map_err(enc)?;
        encode_sync(&mut out).map_err(enc)?;
        oids.push(o);
    }
    let (errors, _) = exchange(conn, &out, protocol.len(), max_len, &mut params, false).await?;
    let unparsed = protocol
        .iter()
        .zip(oids)
        .zip(errors)
        .filter_map(|((p, oids), e)| {
            e.map(|error| Unparsed {
                statement: (*p).clone(),
                oids,
                error,
            })
        })
        .collect();
    Ok(Replayed {
        parameters: params,
        unparsed,
    })
}

/// "message (SQLSTATE)", for reasons.
pub fn describe(e: &ErrorFields) -> String {
    format!(
        "{} ({})",
        e.message().unwrap_or("error"),
        e.sqlstate().unwrap_or("?????")
    )
}

/// Sends `out` and reads until `ready` ReadyForQuery messages arrived.
/// Returns the first error of each of those exchanges and, if
/// `want_last_row`, the text columns of the last exchange's DataRow.
async fn exchange(
    conn: &mut ServerConnection,
    out: &[u8],
    ready: usize,
    max_len: u32,
    params: &mut ParameterList,
    want_last_row: bool,
) -> Result<(Vec<Option<ErrorFields>>, Option<Vec<String>>), String> {
    conn.stream
        .write_all(out)
        .await
        .map_err(|e| e.to_string())?;
    conn.stream.flush().await.map_err(|e| e.to_string())?;
    let mut inbuf = BytesMut::new();
    let mut errors = vec![None; ready];
    let mut seen = 0;
    let mut last_row = None;
    while seen < ready {
        let m = read_message(&mut conn.stream, &mut inbuf, max_len)
            .await
            .map_err(|e| e.to_string())?;
        match m.tag {
            tag::READY_FOR_QUERY => seen += 1,
            tag::ERROR_RESPONSE => {
                let f = ErrorFields::decode(&m.body).map_err(|e| e.to_string())?;
                errors[seen].get_or_insert(f);
            }
            tag::PARAMETER_STATUS => {
                let (n, v) = decode_parameter_status(&m.body).map_err(|e| e.to_string())?;
                params.set(&n, &v);
            }
            tag::DATA_ROW if want_last_row && seen + 1 == ready => {
                let cols = decode_data_row(&m.body).map_err(|e| e.to_string())?;
                last_row = Some(
                    cols.into_iter()
                        .map(|c| String::from_utf8_lossy(c.unwrap_or_default()).into_owned())
                        .collect(),
                );
            }
            _ => {}
        }
    }
    Ok((errors, last_row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_order_identity_then_search_path() {
        let state = SessionState {
            settings: vec![
                ("TimeZone".into(), "UTC".into()),
                ("search_path".into(), "s1, public".into()),
            ],
            role: Some("reader".into()),
            session_authorization: Some("bob".into()),
            custom: vec![("app.tenant".into(), "it's".into())],
            ..Default::default()
        };
        assert_eq!(
            settings_sql(&state).unwrap(),
            "SET SESSION AUTHORIZATION \"bob\"; SET ROLE \"reader\"; SELECT \
             set_config(E'search_path', E's1, public', false), set_config(E'TimeZone', E'UTC', false), \
             set_config(E'app.tenant', E'it''s', false)"
        );
        assert_eq!(settings_sql(&SessionState::default()), None);
    }

    #[test]
    fn oids() {
        assert_eq!(parse_oids("{23,25}").unwrap(), vec![23, 25]);
        assert_eq!(parse_oids("{}").unwrap(), Vec::<u32>::new());
        assert!(parse_oids("{x}").is_err());
    }
}
