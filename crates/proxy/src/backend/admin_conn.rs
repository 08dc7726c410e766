//! pgferry's own SQL on a backend: role checks, and the switchover's
//! fence, WAL positions and promotion, as `[backend_admin]`; user lookups
//! as `[auth] auth_user` (`client::auth_query`).
//!
//! One connection type for all of it: a `ServerConnection` dialed and
//! logged in exactly like a session's (TLS, SCRAM, 57P03 handling), with
//! simple queries whose rows come back as text (`simple_query`, which the
//! warm-spare reset uses on its own connections too), and queries with
//! text parameters over the extended protocol (`query_params`), so that a
//! value never has to be spliced into SQL text.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgferry_auth::DerivedKeys;
use pgferry_wire::messages::{
    decode_data_row, decode_parameter_status, decode_row_description, encode_bind, encode_describe,
    encode_execute, encode_parse, encode_query, encode_sync, DescribeTarget,
};
use pgferry_wire::{tag, ErrorFields, StartupMessage};
use tokio::io::AsyncWriteExt;
use zeroize::Zeroizing;

use super::dial::{self, read_message, DialError, DialSettings, ServerConnection};
use super::login::{BackendCredentials, LoginAuth};
use super::{Backend, BackendLease};
use crate::config::BackendAdminSection;

/// Who pgferry logs in as for its own SQL.
pub struct AdminLogin {
    startup: StartupMessage,
    credentials: BackendCredentials,
}

impl AdminLogin {
    pub fn new(cfg: &BackendAdminSection) -> Self {
        let startup = StartupMessage {
            minor_version: 0,
            params: vec![
                ("user".into(), cfg.user.clone()),
                ("database".into(), cfg.database.clone()),
                ("application_name".into(), "pgferry".into()),
            ],
            protocol_options: Vec::new(),
        };
        let credentials = BackendCredentials::Password {
            password: Zeroizing::new(cfg.password.clone().unwrap_or_default()),
            keys: Arc::new(DerivedKeys::default()),
        };
        Self {
            startup,
            credentials,
        }
    }

    /// `user` on `database` with `credentials` (a userlist entry's: see
    /// `client::auth_query`).
    pub fn for_user(user: &str, database: &str, credentials: BackendCredentials) -> Self {
        let startup = StartupMessage {
            minor_version: 0,
            params: vec![
                ("user".into(), user.to_owned()),
                ("database".into(), database.to_owned()),
                ("application_name".into(), "pgferry".into()),
            ],
            protocol_options: Vec::new(),
        };
        Self {
            startup,
            credentials,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminSqlError {
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error("{}", describe(.0))]
    Server(ErrorFields),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

fn describe(e: &ErrorFields) -> String {
    format!(
        "{} ({})",
        e.message().unwrap_or("error"),
        e.sqlstate().unwrap_or("?????")
    )
}

/// Rows of text columns (`None`: NULL).
pub type Rows = Vec<Vec<Option<String>>>;

/// What `query_params` returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ParamResult {
    /// Column names; empty for a statement that returns no rows.
    pub columns: Vec<String>,
    pub rows: Rows,
    /// More rows were there than asked for.
    pub truncated: bool,
}

/// An authenticated connection for pgferry's own SQL.
pub struct AdminConn {
    conn: ServerConnection,
    max_len: u32,
    /// A query timed out or the socket failed: what comes next on it may
    /// be the late answer to the earlier query, so it takes no more.
    broken: bool,
}

impl AdminConn {
    /// Dials `backend` as `login`; the connection counts as no session.
    pub async fn open(
        backend: Arc<Backend>,
        login: &AdminLogin,
        dial_settings: &DialSettings,
    ) -> Result<Self, DialError> {
        let mut chatter = BytesMut::new();
        let conn = dial::connect(
            BackendLease::idle(backend),
            dial_settings,
            &login.startup,
            LoginAuth::Credentials(&login.credentials),
            &mut chatter,
        )
        .await?;
        Ok(Self {
            conn,
            max_len: dial_settings.max_message_len,
            broken: false,
        })
    }

    /// Runs `sql` (one simple Query, possibly several statements) within
    /// `timeout`; the rows of its last result.
    /// After a timeout or a failed socket the connection is broken and
    /// every further query fails (`is_broken`): open a new one.
    pub async fn query(&mut self, sql: &str, timeout: Duration) -> Result<Rows, AdminSqlError> {
        if self.broken {
            return Err(AdminSqlError::Dial(DialError::Unreachable(
                "connection broken by an earlier failure".into(),
            )));
        }
        let r = match tokio::time::timeout(timeout, simple_query(&mut self.conn, sql, self.max_len))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(AdminSqlError::Timeout(timeout)),
        };
        // A server error leaves the connection in step (ReadyForQuery came).
        if matches!(r, Err(AdminSqlError::Timeout(_) | AdminSqlError::Dial(_))) {
            self.broken = true;
        }
        r
    }

    /// Runs `sql` with `params` (text; `None`: NULL) as `$1`, `$2`... over
    /// the extended protocol, within `timeout`; at most `max_rows` rows
    /// (0: all) come back. Broken afterwards on the same terms as `query`.
    pub async fn query_params(
        &mut self,
        sql: &str,
        params: &[Option<&str>],
        max_rows: u32,
        timeout: Duration,
    ) -> Result<ParamResult, AdminSqlError> {
        if self.broken {
            return Err(AdminSqlError::Dial(DialError::Unreachable(
                "connection broken by an earlier failure".into(),
            )));
        }
        let fut = extended_query(&mut self.conn, sql, params, max_rows, self.max_len);
        let r = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(AdminSqlError::Timeout(timeout)),
        };
        if matches!(r, Err(AdminSqlError::Timeout(_) | AdminSqlError::Dial(_))) {
            self.broken = true;
        }
        r
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The first column of the first row (`None` for no row or NULL).
    pub async fn value(
        &mut self,
        sql: &str,
        timeout: Duration,
    ) -> Result<Option<String>, AdminSqlError> {
        let rows = self.query(sql, timeout).await?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()))
    }

    /// Says goodbye (best effort, bounded).
    pub async fn close(mut self) {
        let mut x = BytesMut::new();
        if pgferry_wire::messages::encode_terminate(&mut x).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = self.conn.stream.write_all(&x).await;
                let _ = self.conn.stream.shutdown().await;
            })
            .await;
        }
    }
}

/// Runs `sql` as one simple Query on `conn` and reads to ReadyForQuery,
/// keeping ParameterStatus changes. The rows of the last result set; an
/// ErrorResponse fails it (after ReadyForQuery, so the connection stays
/// usable).
pub async fn simple_query(
    conn: &mut ServerConnection,
    sql: &str,
    max_len: u32,
) -> Result<Rows, AdminSqlError> {
    let protocol = |e: String| AdminSqlError::Dial(DialError::Protocol(e));
    let mut out = BytesMut::new();
    encode_query(&mut out, sql).map_err(|e| protocol(e.to_string()))?;
    let io = |e: std::io::Error| AdminSqlError::Dial(DialError::Unreachable(e.to_string()));
    conn.stream.write_all(&out).await.map_err(io)?;
    conn.stream.flush().await.map_err(io)?;
    let mut inbuf = BytesMut::new();
    let mut failed = None;
    let mut rows = Vec::new();
    loop {
        let m = read_message(&mut conn.stream, &mut inbuf, max_len).await?;
        match m.tag {
            tag::ERROR_RESPONSE => {
                failed = Some(ErrorFields::decode(&m.body).map_err(|e| protocol(e.to_string()))?)
            }
            tag::PARAMETER_STATUS => {
                if let Ok((n, v)) = decode_parameter_status(&m.body) {
                    conn.parameters.set(&n, &v);
                }
            }
            // A new result set: only the last one's rows are kept.
            tag::ROW_DESCRIPTION => rows.clear(),
            tag::DATA_ROW => {
                let cols = decode_data_row(&m.body).map_err(|e| protocol(e.to_string()))?;
                rows.push(
                    cols.into_iter()
                        .map(|c| c.map(|b| String::from_utf8_lossy(b).into_owned()))
                        .collect(),
                );
            }
            tag::READY_FOR_QUERY => break,
            _ => {}
        }
    }
    match failed {
        Some(f) => Err(AdminSqlError::Server(f)),
        None if !inbuf.is_empty() => Err(protocol("data after ReadyForQuery".into())),
        None => Ok(rows),
    }
}

/// Parse, Bind, Describe (portal), Execute, Sync on `conn`, read to
/// ReadyForQuery. An ErrorResponse fails it (after ReadyForQuery, so the
/// connection stays usable).
async fn extended_query(
    conn: &mut ServerConnection,
    sql: &str,
    params: &[Option<&str>],
    max_rows: u32,
    max_len: u32,
) -> Result<ParamResult, AdminSqlError> {
    let protocol = |e: String| AdminSqlError::Dial(DialError::Protocol(e));
    let values: Vec<Option<&[u8]>> = params.iter().map(|p| p.map(str::as_bytes)).collect();
    let mut out = BytesMut::new();
    encode_parse(&mut out, "", sql, &[])
        .and_then(|()| encode_bind(&mut out, "", "", &values))
        .and_then(|()| encode_describe(&mut out, DescribeTarget::Portal, ""))
        .and_then(|()| encode_execute(&mut out, "", max_rows))
        .and_then(|()| encode_sync(&mut out))
        .map_err(|e| protocol(e.to_string()))?;
    let io = |e: std::io::Error| AdminSqlError::Dial(DialError::Unreachable(e.to_string()));
    conn.stream.write_all(&out).await.map_err(io)?;
    conn.stream.flush().await.map_err(io)?;
    let mut inbuf = BytesMut::new();
    let mut failed = None;
    let mut result = ParamResult::default();
    loop {
        let m = read_message(&mut conn.stream, &mut inbuf, max_len).await?;
        match m.tag {
            tag::ERROR_RESPONSE => {
                failed = Some(ErrorFields::decode(&m.body).map_err(|e| protocol(e.to_string()))?)
            }
            tag::PARAMETER_STATUS => {
                if let Ok((n, v)) = decode_parameter_status(&m.body) {
                    conn.parameters.set(&n, &v);
                }
            }
            tag::ROW_DESCRIPTION => {
                result.columns =
                    decode_row_description(&m.body).map_err(|e| protocol(e.to_string()))?;
            }
            tag::DATA_ROW => {
                let cols = decode_data_row(&m.body).map_err(|e| protocol(e.to_string()))?;
                if cols.len() != result.columns.len() {
                    return Err(protocol(format!(
                        "a row of {} columns under a description of {}",
                        cols.len(),
                        result.columns.len()
                    )));
                }
                result.rows.push(
                    cols.into_iter()
                        .map(|c| c.map(|b| String::from_utf8_lossy(b).into_owned()))
                        .collect(),
                );
            }
            tag::PORTAL_SUSPENDED => result.truncated = true,
            tag::READY_FOR_QUERY => break,
            // ParseComplete, BindComplete, NoData, CommandComplete, notices.
            _ => {}
        }
    }
    match failed {
        Some(f) => Err(AdminSqlError::Server(f)),
        None if !inbuf.is_empty() => Err(protocol("data after ReadyForQuery".into())),
        None => Ok(result),
    }
}
