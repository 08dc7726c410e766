//! Capturing a PostgreSQL session's state in one round trip, while the
//! session is at a safe point and its pumps are held.

use serde::Deserialize;

/// A prepared statement as `pg_prepared_statements` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PreparedStatement {
    pub name: String,
    pub statement: String,
    /// Type names (`regtype` text), resolved to OIDs on the target: OIDs of
    /// user-defined types differ between servers that are not copies.
    pub parameter_types: Vec<String>,
    /// Created by SQL `PREPARE` (replayed by running that text), not by a
    /// protocol-level Parse.
    pub from_sql: bool,
}

/// What moves with a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    /// Settings changed in the session (`pg_settings.source = 'session'`).
    pub settings: Vec<(String, String)>,
    /// `SET ROLE`, if any.
    pub role: Option<String>,
    /// `SET SESSION AUTHORIZATION`, when it differs from the login user.
    pub session_authorization: Option<String>,
    /// Custom settings (placeholders) with a value in this session.
    pub custom: Vec<(String, String)>,
    pub prepared: Vec<PreparedStatement>,
    /// Bytes of the captured row.
    pub size: usize,
    /// The session's temporary schema, if it ever made one: whether it
    /// still holds relations is a second, rarer question
    /// (`temp_relations_query`).
    pub temp_schema: Option<u32>,
    /// The server allows prepared transactions (`max_prepared_transactions`
    /// is not 0): whether the session's user has any pending is asked apart
    /// (`prepared_transactions_query`). With 0 (PostgreSQL's default)
    /// `PREPARE TRANSACTION` fails, so there can be none.
    pub two_phase: bool,
}

/// Session state that cannot move: each one refuses the transfer, and the
/// session stays where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocker {
    TempTables,
    AdvisoryLocks,
    Listen,
    HoldCursors,
    PreparedTransactions,
}

impl Blocker {
    pub fn reason(self) -> &'static str {
        match self {
            Blocker::TempTables => "session has temporary tables",
            Blocker::AdvisoryLocks => "session holds advisory locks",
            Blocker::Listen => "session is listening on notification channels",
            Blocker::HoldCursors => "session has WITH HOLD cursors",
            Blocker::PreparedTransactions => {
                "the session's user has prepared transactions here (two-phase commit pending)"
            }
        }
    }
}

/// Settings that are not session state or are replayed another way.
const NOT_REPLAYED: &[&str] = &[
    "role",
    "session_authorization",
    "is_superuser",
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
];

/// Name of the statement pgferry's own queries on a session's backend run
/// as. Never a simple Query: that would drop the client's unnamed
/// prepared statement, which a refused move must leave as it was.
pub const OWN_STATEMENT: &str = "pgferry_own_query";

/// The unnamed prepared statement as the proxy saw the client create it
/// (PostgreSQL does not list it in `pg_prepared_statements`).
#[derive(Debug, Clone, Copy)]
pub struct UnnamedStatement<'a> {
    pub query: &'a str,
    /// As the client's Parse gave them (0: left to the server).
    pub parameter_oids: &'a [u32],
}

/// The capture query (run as pgferry's own statement `pgferry_own_query`,
/// which it leaves out of the session's statements). Placeholders (`app.tenant`) are invisible in
/// `pg_settings`, so their names come from the caller; so does the
/// unnamed statement, whose parameter type OIDs are turned into names here
/// (`-` for 0) to be resolved on the target like the named ones'.
///
/// It is planned on every move, often in a server process that has never
/// planned anything like it (a drain's idle sessions), where the cost is
/// mostly page faults on the catalogs and code each part touches. So it
/// calls the set-returning functions behind the `pg_settings`/
/// `pg_prepared_statements`/`pg_locks`/`pg_cursors` views directly (no view
/// expansion), and leaves to second queries what most sessions never
/// need: the `pg_class` scan for temporary tables (only with a temporary
/// schema) and the pending prepared transactions of the user (only where
/// the server allows them; its `pg_database`/`pg_roles` lookups were 40 %
/// of the capture's page faults in a fresh server process).
/// docs/performance.md has the figures.
pub fn capture_query(custom_names: &[String], unnamed: Option<UnnamedStatement<'_>>) -> String {
    let custom: Vec<String> = custom_names
        .iter()
        .map(|n| format!("current_setting({}, true)", quote_literal(n)))
        .collect();
    let custom = if custom.is_empty() {
        "'[]'".to_owned()
    } else {
        format!("json_build_array({})::text", custom.join(", "))
    };
    let unnamed_types = match unnamed {
        Some(u) => {
            let oids: Vec<String> = u.parameter_oids.iter().map(u32::to_string).collect();
            format!(
                "to_json('{{{}}}'::pg_catalog.oid[]::pg_catalog.regtype[]::text[])::text",
                oids.join(",")
            )
        }
        None => "NULL".to_owned(),
    };
    format!(
        "SELECT \
         (SELECT coalesce(json_agg(json_build_array(s.name, current_setting(s.name)) ORDER BY s.name), '[]') \
            FROM pg_catalog.pg_show_all_settings() s WHERE s.source = 'session')::text, \
         current_setting('role'), \
         session_user::text, \
         (SELECT coalesce(json_agg(json_build_object('name', p.name, 'statement', p.statement, \
            'parameter_types', p.parameter_types::text[], 'from_sql', p.from_sql) ORDER BY p.prepare_time), '[]') \
            FROM pg_catalog.pg_prepared_statement() p WHERE p.name <> '{OWN_STATEMENT}')::text, \
         pg_catalog.pg_my_temp_schema()::bigint, \
         (SELECT count(*) FROM pg_catalog.pg_lock_status() l \
            WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid())::int, \
         (SELECT count(*) FROM pg_catalog.pg_listening_channels())::int, \
         (SELECT count(*) FROM pg_catalog.pg_cursor() c WHERE c.is_holdable)::int, \
         {custom}, \
         {unnamed_types}, \
         current_setting('max_prepared_transactions')"
    )
}

/// Counts the prepared transactions pending in the session's database for
/// its user (login or `SET ROLE`): asked only where the server allows
/// them (`SessionState::two_phase`).
pub fn prepared_transactions_query() -> &'static str {
    "SELECT count(*) FROM pg_catalog.pg_prepared_xact() x \
       WHERE x.dbid = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database()) \
         AND x.ownerid IN (SELECT r.oid FROM pg_catalog.pg_roles r \
                            WHERE r.rolname IN (session_user, current_user))"
}

/// Counts the relations in the session's temporary schema.
pub fn temp_relations_query(schema: u32) -> String {
    format!("SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = {schema}")
}

/// Reads the capture row. `Ok(Err(blocker))`: the state cannot move.
pub fn parse_capture(
    row: &[Option<&[u8]>],
    custom_names: &[String],
    unnamed: Option<UnnamedStatement<'_>>,
    login_user: &str,
) -> Result<Result<SessionState, Blocker>, String> {
    let col = |i: usize| -> Result<&str, String> {
        let bytes = row
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("capture column {i} is missing"))?;
        std::str::from_utf8(bytes).map_err(|_| format!("capture column {i} is not UTF-8"))
    };
    let count = |i: usize| -> Result<i64, String> {
        col(i)?
            .parse()
            .map_err(|_| format!("capture column {i} is not a number"))
    };
    for (i, blocker) in [
        (5, Blocker::AdvisoryLocks),
        (6, Blocker::Listen),
        (7, Blocker::HoldCursors),
    ] {
        if count(i)? > 0 {
            return Ok(Err(blocker));
        }
    }
    let settings: Vec<(String, String)> =
        serde_json::from_str(col(0)?).map_err(|e| format!("capture settings: {e}"))?;
    let settings = settings
        .into_iter()
        .filter(|(n, _)| !NOT_REPLAYED.contains(&n.as_str()))
        .collect();
    let role = match col(1)? {
        "none" | "" => None,
        r => Some(r.to_owned()),
    };
    let session_user = col(2)?;
    let session_authorization = (session_user != login_user).then(|| session_user.to_owned());
    let mut prepared: Vec<PreparedStatement> =
        serde_json::from_str(col(3)?).map_err(|e| format!("capture prepared statements: {e}"))?;
    let mut size: usize = row.iter().map(|c| c.map_or(0, |b| b.len())).sum();
    if let Some(u) = unnamed {
        let parameter_types: Vec<String> = serde_json::from_str(col(9)?)
            .map_err(|e| format!("capture unnamed statement types: {e}"))?;
        size += u.query.len();
        prepared.push(PreparedStatement {
            name: String::new(),
            statement: u.query.to_owned(),
            parameter_types,
            from_sql: false,
        });
    }
    let values: Vec<Option<String>> =
        serde_json::from_str(col(8)?).map_err(|e| format!("capture custom settings: {e}"))?;
    let custom = custom_names
        .iter()
        .zip(values)
        .filter_map(|(n, v)| Some((n.clone(), v?)))
        .collect();
    let temp_schema =
        u32::try_from(count(4)?).map_err(|_| "capture column 4 is not an OID".to_owned())?;
    let two_phase = count(10)? > 0;
    Ok(Ok(SessionState {
        settings,
        role,
        session_authorization,
        custom,
        prepared,
        size,
        temp_schema: (temp_schema != 0).then_some(temp_schema),
        two_phase,
    }))
}

/// A string literal that means the same whatever
/// `standard_conforming_strings` says.
pub fn quote_literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(cols: &'a [&'a str]) -> Vec<Option<&'a [u8]>> {
        cols.iter().map(|c| Some(c.as_bytes())).collect()
    }

    #[test]
    fn parses_state_and_blockers() {
        let names = vec!["app.tenant".to_owned(), "app.unset".to_owned()];
        let r = row(&[
            r#"[["search_path","a, b"],["transaction_isolation","read committed"]]"#,
            "reporter",
            "alice",
            r#"[{"name":"s1","statement":"select $1","parameter_types":["integer"],"from_sql":false}]"#,
            "0",
            "0",
            "0",
            "0",
            r#"["acme", null]"#,
            r#"["integer","-"]"#,
            "0",
        ]);
        let st = parse_capture(&r, &names, None, "alice").unwrap().unwrap();
        assert_eq!(st.settings, vec![("search_path".into(), "a, b".into())]);
        assert_eq!(st.role.as_deref(), Some("reporter"));
        assert_eq!(st.session_authorization, None);
        assert_eq!(st.custom, vec![("app.tenant".into(), "acme".into())]);
        assert_eq!(st.prepared[0].parameter_types, vec!["integer".to_owned()]);
        let mut blocked = r.clone();
        assert_eq!(st.temp_schema, None);
        let mut with_temp = r.clone();
        with_temp[4] = Some(b"16390");
        let st = parse_capture(&with_temp, &names, None, "alice")
            .unwrap()
            .unwrap();
        assert_eq!(st.temp_schema, Some(16390));
        blocked[6] = Some(b"2");
        assert_eq!(
            parse_capture(&blocked, &names, None, "alice").unwrap(),
            Err(Blocker::Listen)
        );
        assert!(!st.two_phase, "max_prepared_transactions = 0");
        let mut two_phase = r.clone();
        two_phase[10] = Some(b"10");
        let st = parse_capture(&two_phase, &names, None, "alice")
            .unwrap()
            .unwrap();
        assert!(st.two_phase, "asked apart");
        let mut other_user = r.clone();
        other_user[2] = Some(b"bob");
        let st = parse_capture(&other_user, &names, None, "alice")
            .unwrap()
            .unwrap();
        assert_eq!(st.session_authorization.as_deref(), Some("bob"));
        assert!(parse_capture(&r[..3], &names, None, "alice").is_err());
        // The unnamed statement joins the protocol-level ones, its types
        // by name.
        let unnamed = UnnamedStatement {
            query: "select $1, $2",
            parameter_oids: &[23, 0],
        };
        let st = parse_capture(&r, &names, Some(unnamed), "alice")
            .unwrap()
            .unwrap();
        let last = st.prepared.last().unwrap();
        assert_eq!(
            (last.name.as_str(), last.statement.as_str(), last.from_sql),
            ("", "select $1, $2", false)
        );
        assert_eq!(last.parameter_types, vec!["integer".to_owned(), "-".into()]);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal(r"it's a \\ path"), r"E'it''s a \\\\ path'");
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
    }
}
