//! The SQL admin console: `psql -h <pgferry> -U <admin> pgferry`.
//!
//! Owns the console's session after authentication (which is the same as
//! every client's): the simple query protocol, the command language
//! (`command`) and the tables it answers with. Every verb is
//! `crate::verbs`'s, shared with the HTTP API; this module only turns
//! their answers into RowDescription/DataRow/CommandComplete, and their
//! refusals into ErrorResponses with SQLSTATEs. A console connection is
//! not a session: it has no backend and never moves.

pub mod command;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use pgferry_wire::messages::{
    encode_backend_key_data, encode_error_response, encode_parameter_status,
    encode_ready_for_query, take_message,
};
use pgferry_wire::result_set::{
    encode_command_complete, encode_data_row, encode_empty_query_response, encode_notice,
    encode_row_description, ColumnType,
};
use pgferry_wire::{tag, CancelKey, CancelSecret, EncodeError, Severity, StartupMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use self::command::{parse, split_statements, Command, ParseError, Show, USAGE};
use crate::forwarder::TransferOutcome;
use crate::stream::Stream;
use crate::verbs::{self, VerbError};
use crate::ProxyContext;

/// A console answer bigger than this is refused rather than buffered.
const MAX_QUERY_LEN: u32 = 1 << 20;

/// One result: a table (maybe empty) or just a command tag.
struct Answer {
    columns: Vec<(&'static str, ColumnType)>,
    rows: Vec<Vec<Option<String>>>,
    tag: String,
    notices: Vec<String>,
}

impl Answer {
    fn table(columns: Vec<(&'static str, ColumnType)>, rows: Vec<Vec<Option<String>>>) -> Self {
        let tag = format!("SHOW {}", rows.len());
        Self {
            columns,
            rows,
            tag,
            notices: Vec::new(),
        }
    }

    fn tagged(mut self, tag: &str) -> Self {
        self.tag = tag.to_owned();
        self
    }

    fn done(tag: &str) -> Self {
        Self {
            columns: Vec::new(),
            rows: Vec::new(),
            tag: tag.to_owned(),
            notices: Vec::new(),
        }
    }
}

/// A failed command: SQLSTATE and the words for the client.
struct Refusal {
    sqlstate: &'static str,
    message: String,
}

impl From<VerbError> for Refusal {
    fn from(e: VerbError) -> Self {
        Self {
            sqlstate: e.sqlstate(),
            message: e.to_string(),
        }
    }
}

impl From<ParseError> for Refusal {
    fn from(e: ParseError) -> Self {
        Self {
            // syntax_error, for unknown commands and misused ones alike
            sqlstate: "42601",
            message: e.message(),
        }
    }
}

fn text(s: impl ToString) -> Option<String> {
    Some(s.to_string())
}

fn ms(d: Duration) -> Option<String> {
    Some(format!("{:.1}", d.as_secs_f64() * 1000.0))
}

fn time(t: SystemTime) -> Option<String> {
    Some(humantime::format_rfc3339_millis(t).to_string())
}

/// Serves an authenticated console connection until the client leaves.
pub async fn serve(
    ctx: Arc<ProxyContext>,
    mut client: Stream,
    startup: StartupMessage,
    peer: SocketAddr,
) {
    info!(%peer, user = startup.user(), "admin console connection");
    let mut out = BytesMut::with_capacity(1024);
    if greet(&mut out, &startup).is_err() || flush(&mut client, &mut out).await.is_err() {
        return;
    }
    let mut inbuf = BytesMut::with_capacity(1024);
    // After an extended-protocol message: everything up to Sync is skipped.
    let mut skipping = false;
    loop {
        let msg = match take_message(&mut inbuf, MAX_QUERY_LEN) {
            Ok(Some(m)) => m,
            Ok(None) => match client.read_buf(&mut inbuf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
            Err(e) => {
                // Framing is lost: say why and close, as PostgreSQL does.
                let _ = encode_error_response(&mut out, Severity::Fatal, "08P01", &e.to_string());
                let _ = flush(&mut client, &mut out).await;
                return;
            }
        };
        let step = match msg.tag {
            tag::TERMINATE => return,
            tag::QUERY => {
                skipping = false;
                let sql = std::str::from_utf8(msg.body.strip_suffix(b"\0").unwrap_or(&msg.body))
                    .map(str::to_owned);
                match sql {
                    Ok(sql) => run_query(&ctx, &sql, &startup, &mut out).await,
                    Err(_) => refuse(
                        &mut out,
                        &Refusal {
                            sqlstate: "22021",
                            message: "the query is not valid UTF-8".into(),
                        },
                    ),
                }
                .and_then(|_| encode_ready_for_query(&mut out, b'I'))
            }
            tag::SYNC => {
                skipping = false;
                encode_ready_for_query(&mut out, b'I')
            }
            tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::FLUSH
            | tag::FUNCTION_CALL => {
                if skipping {
                    Ok(())
                } else {
                    skipping = msg.tag != tag::FUNCTION_CALL;
                    let r = refuse(
                        &mut out,
                        &Refusal {
                            sqlstate: "0A000",
                            message: "the pgferry console speaks the simple query protocol only"
                                .into(),
                        },
                    );
                    // A function call is answered on its own, like a query.
                    if msg.tag == tag::FUNCTION_CALL {
                        r.and_then(|_| encode_ready_for_query(&mut out, b'I'))
                    } else {
                        r
                    }
                }
            }
            other => {
                let _ = encode_error_response(
                    &mut out,
                    Severity::Fatal,
                    "08P01",
                    &format!("unexpected message type {:?}", other as char),
                );
                let _ = flush(&mut client, &mut out).await;
                return;
            }
        };
        if let Err(e) = step {
            warn!(error = %e, "console: cannot encode an answer");
            out.clear();
            let _ = encode_error_response(
                &mut out,
                Severity::Fatal,
                "XX000",
                "cannot encode the answer",
            );
            let _ = flush(&mut client, &mut out).await;
            return;
        }
        if flush(&mut client, &mut out).await.is_err() {
            return;
        }
    }
}

/// What a server says after AuthenticationOk. The cancel key is random
/// and known to no one: the console's commands cannot be cancelled.
fn greet(out: &mut BytesMut, startup: &StartupMessage) -> Result<(), EncodeError> {
    let version = format!("pgferry {}", env!("CARGO_PKG_VERSION"));
    for (name, value) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        (
            "application_name",
            startup.param("application_name").unwrap_or(""),
        ),
    ] {
        encode_parameter_status(out, name, value)?;
    }
    let key = CancelKey {
        pid: i32::from_be_bytes(rand::random::<[u8; 4]>()) & i32::MAX,
        secret: CancelSecret::from_i32(i32::from_be_bytes(rand::random::<[u8; 4]>())),
    };
    encode_backend_key_data(out, &key)?;
    encode_ready_for_query(out, b'I')
}

async fn flush(client: &mut Stream, out: &mut BytesMut) -> std::io::Result<()> {
    // A console client that does not read its answers is not waited for.
    let r = tokio::time::timeout(Duration::from_secs(30), async {
        client.write_all(out).await?;
        client.flush().await
    })
    .await;
    out.clear();
    r.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

fn refuse(out: &mut BytesMut, r: &Refusal) -> Result<(), EncodeError> {
    encode_error_response(out, Severity::Error, r.sqlstate, &r.message)
}

/// Runs every statement of one Query; the first failure ends it, as in
/// PostgreSQL.
async fn run_query(
    ctx: &Arc<ProxyContext>,
    sql: &str,
    startup: &StartupMessage,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let statements = split_statements(sql);
    if statements.is_empty() {
        return encode_empty_query_response(out);
    }
    for statement in statements {
        let answer = match parse(statement) {
            Ok(cmd) => {
                info!(
                    user = startup.user(),
                    command = statement.trim(),
                    "admin console command"
                );
                run(ctx, cmd).await
            }
            Err(e) => Err(e.into()),
        };
        match answer {
            Ok(a) => write_answer(out, &a)?,
            Err(r) => return refuse(out, &r),
        }
    }
    Ok(())
}

fn write_answer(out: &mut BytesMut, a: &Answer) -> Result<(), EncodeError> {
    for n in &a.notices {
        encode_notice(out, n)?;
    }
    if !a.columns.is_empty() {
        encode_row_description(out, &a.columns)?;
        for row in &a.rows {
            let values: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
            encode_data_row(out, &values)?;
        }
    }
    encode_command_complete(out, &a.tag)
}

async fn run(ctx: &Arc<ProxyContext>, cmd: Command) -> Result<Answer, Refusal> {
    use ColumnType::{Int8, Text};
    Ok(match cmd {
        Command::Show(show) => self::show(ctx, show).await,
        Command::Set => Answer::done("SET"),
        Command::Transfer { id, to, timeout } => {
            let timeout = timeout.unwrap_or(verbs::DEFAULT_TRANSFER_TIMEOUT);
            match verbs::transfer(ctx, &id, to, timeout).await? {
                TransferOutcome::Success {
                    from,
                    to,
                    duration,
                    pause,
                } => Answer::table(
                    vec![
                        ("id", Text),
                        ("outcome", Text),
                        ("from", Text),
                        ("to", Text),
                        ("duration_ms", Text),
                        ("pause_ms", Text),
                    ],
                    vec![vec![
                        text(&id),
                        text("success"),
                        text(from),
                        text(to),
                        ms(duration),
                        ms(pause),
                    ]],
                )
                .tagged("TRANSFER"),
                other => return Err(transfer_refusal(&other)),
            }
        }
        Command::Drain { backend, timeout } => {
            let r = verbs::drain(ctx, &backend, timeout).await?;
            let mut a = Answer::table(
                vec![
                    ("backend", Text),
                    ("moved", Int8),
                    ("failed", Int8),
                    ("remaining", Int8),
                    ("duration_ms", Text),
                ],
                vec![vec![
                    text(&r.backend),
                    text(r.moved),
                    text(r.failed),
                    text(r.remaining),
                    ms(r.duration),
                ]],
            )
            .tagged("DRAIN");
            a.notices = r
                .failures
                .iter()
                .map(|(id, why)| format!("session {id} not moved: {why}"))
                .collect();
            a
        }
        Command::Activate { backend } => {
            let v = verbs::activate(ctx, &backend)?;
            backends_table(vec![v]).tagged("ACTIVATE")
        }
        Command::Rebalance { timeout } => {
            let timeout = timeout.unwrap_or(verbs::DEFAULT_REBALANCE_TIMEOUT);
            let report = crate::balancer::rebalance::rebalance(ctx, timeout).await;
            let rows = report
                .moves
                .iter()
                .map(|m| {
                    vec![
                        text(m.planned.id),
                        text(&m.planned.from),
                        text(&m.planned.to),
                        text(verbs::outcome_name(&m.outcome)),
                        verbs::outcome_reason(&m.outcome).map(str::to_owned),
                    ]
                })
                .collect();
            Answer::table(
                vec![
                    ("id", Text),
                    ("from", Text),
                    ("to", Text),
                    ("outcome", Text),
                    ("reason", Text),
                ],
                rows,
            )
            .tagged("REBALANCE")
        }
        Command::Reload => {
            let s = verbs::reload(ctx).await?;
            Answer::table(
                vec![("added", Text), ("removing", Text), ("users", Int8)],
                vec![vec![
                    text(s.added.join(",")),
                    text(s.removing.join(",")),
                    text(s.users),
                ]],
            )
            .tagged("RELOAD")
        }
        Command::Pause { backend, timeout } => {
            let r = verbs::pause(ctx, backend.as_deref(), timeout).await?;
            Answer::table(
                vec![("backend", Text), ("paused", Int8), ("until", Text)],
                vec![vec![
                    text(backend.as_deref().unwrap_or("*")),
                    text(r.paused),
                    time(r.until),
                ]],
            )
            .tagged("PAUSE")
        }
        Command::Resume { backend } => {
            let resumed = verbs::resume(ctx, backend.as_deref())?;
            Answer::table(
                vec![("backend", Text), ("resumed", Int8)],
                vec![vec![text(backend.as_deref().unwrap_or("*")), text(resumed)]],
            )
            .tagged("RESUME")
        }
        Command::Shutdown => {
            verbs::shutdown(ctx);
            Answer::done("SHUTDOWN")
        }
        Command::Switchover { from, to, timeout } => {
            let timeout = timeout.unwrap_or(ctx.config.switchover.default_timeout);
            let r = crate::switchover::switchover(ctx, &from, &to, timeout)
                .await
                .map_err(verbs::switchover_error)?;
            // "partial": switched over, with some sessions not moved (a
            // NOTICE each); "aborted" and "failed" changed no primary.
            if r.outcome != "success" && r.outcome != "partial" {
                return Err(Refusal {
                    sqlstate: "55000",
                    message: format!(
                        "switchover {}: {}",
                        r.outcome,
                        r.reason.as_deref().unwrap_or("no reason given")
                    ),
                });
            }
            let mut a = Answer::table(
                vec![
                    ("from", Text),
                    ("to", Text),
                    ("outcome", Text),
                    ("sessions_moved", Int8),
                    ("sessions_failed", Int8),
                ],
                vec![vec![
                    text(&r.from),
                    text(&r.to),
                    text(r.outcome),
                    text(r.sessions_moved),
                    text(r.sessions_failed),
                ]],
            )
            .tagged("SWITCHOVER");
            a.notices = r
                .failures
                .iter()
                .map(|f| format!("session {} not moved: {}", f.id, f.reason))
                .collect();
            a
        }
    })
}

/// A move that did not happen, as an error: the session stayed (55000),
/// was closed by the failure (58000), or ended on its own (08006).
fn transfer_refusal(o: &TransferOutcome) -> Refusal {
    let reason = verbs::outcome_reason(o).unwrap_or("");
    match o {
        TransferOutcome::RecoverableError(_) => Refusal {
            sqlstate: "55000",
            message: format!("not moved: {reason}"),
        },
        TransferOutcome::FatalError(_) => Refusal {
            sqlstate: "58000",
            message: format!("the move failed and the session was closed: {reason}"),
        },
        _ => Refusal {
            sqlstate: "08006",
            message: format!("the session ended during the move: {reason}"),
        },
    }
}

fn backends_table(views: Vec<verbs::BackendView>) -> Answer {
    use ColumnType::{Int8, Text};
    let rows = views
        .into_iter()
        .map(|b| {
            let (host, port) = split_addr(&b.address);
            vec![
                text(&b.name),
                text(host),
                port,
                text(b.state),
                text(b.healthy),
                text(b.role),
                b.cluster.clone(),
                text(b.sessions),
                text(b.dialect),
            ]
        })
        .collect();
    Answer::table(
        vec![
            ("name", Text),
            ("host", Text),
            ("port", Int8),
            ("state", Text),
            ("healthy", Text),
            ("role", Text),
            ("cluster", Text),
            ("sessions", Int8),
            ("dialect", Text),
        ],
        rows,
    )
}

async fn show(ctx: &Arc<ProxyContext>, what: Show) -> Answer {
    use ColumnType::{Int8, Text};
    match what {
        Show::Backends => backends_table(verbs::backends(ctx)),
        Show::Sessions => {
            let rows = verbs::sessions(ctx)
                .await
                .into_iter()
                .map(|s| {
                    let (addr, port) = split_addr(&s.client_addr);
                    vec![
                        text("C"),
                        text(&s.user),
                        text(&s.database),
                        text(s.state),
                        text(addr),
                        port,
                        text(&s.connected_at),
                        s.application_name.clone(),
                        text(&s.id),
                        text(&s.backend),
                        text(s.migrations),
                    ]
                })
                .collect();
            Answer::table(
                vec![
                    ("type", Text),
                    ("user", Text),
                    ("database", Text),
                    ("state", Text),
                    ("addr", Text),
                    ("port", Int8),
                    ("connect_time", Text),
                    ("application_name", Text),
                    ("id", Text),
                    ("backend", Text),
                    ("migrations", Int8),
                ],
                rows,
            )
        }
        Show::Servers => {
            let backends = verbs::backends(ctx);
            let rows = verbs::sessions(ctx)
                .await
                .into_iter()
                .map(|s| {
                    let address = backends
                        .iter()
                        .find(|b| b.name == s.backend)
                        .map(|b| b.address.clone())
                        .unwrap_or_default();
                    let (addr, port) = split_addr(&address);
                    vec![
                        text("S"),
                        text(&s.user),
                        text(&s.database),
                        text(s.state),
                        text(addr),
                        port,
                        text(&s.backend),
                        text(&s.id),
                    ]
                })
                .collect();
            Answer::table(
                vec![
                    ("type", Text),
                    ("user", Text),
                    ("database", Text),
                    ("state", Text),
                    ("addr", Text),
                    ("port", Int8),
                    ("backend", Text),
                    ("link", Text),
                ],
                rows,
            )
        }
        Show::Stats => {
            let m = &ctx.metrics;
            let (success, recoverable, fatal, ended) = m.migrations.read();
            Answer::table(
                vec![
                    ("database", Text),
                    ("total_received", Int8),
                    ("total_sent", Int8),
                    ("client_connections", Int8),
                    ("total_accepted", Int8),
                    ("auth_failures", Int8),
                    ("migrations_success", Int8),
                    ("migrations_recoverable", Int8),
                    ("migrations_fatal", Int8),
                    ("migrations_session_ended", Int8),
                    ("rebalance_moves", Int8),
                ],
                vec![vec![
                    text("*"),
                    text(m.bytes_client_to_server.get()),
                    text(m.bytes_server_to_client.get()),
                    text(m.client_connections.get()),
                    text(m.client_connections_accepted.get()),
                    text(m.auth_failures.get()),
                    text(success),
                    text(recoverable),
                    text(fatal),
                    text(ended),
                    text(m.rebalance_moves.get()),
                ]],
            )
        }
        Show::Migrations => {
            let rows = verbs::migrations(ctx)
                .into_iter()
                .map(|m| {
                    vec![
                        time(m.started_at),
                        text(m.session),
                        text(&m.from),
                        m.to.clone(),
                        text(m.outcome),
                        m.reason.clone(),
                        ms(m.duration),
                    ]
                })
                .collect();
            Answer::table(
                vec![
                    ("started_at", Text),
                    ("session", Text),
                    ("from", Text),
                    ("to", Text),
                    ("outcome", Text),
                    ("reason", Text),
                    ("duration_ms", Text),
                ],
                rows,
            )
        }
        Show::Config => {
            let rows = verbs::config_items(ctx)
                .into_iter()
                .map(|(k, v, changeable)| {
                    vec![
                        text(k),
                        text(v),
                        text(if changeable { "yes" } else { "no" }),
                    ]
                })
                .collect();
            Answer::table(
                vec![("key", Text), ("value", Text), ("changeable", Text)],
                rows,
            )
        }
        Show::Version => Answer::table(
            vec![("version", Text)],
            vec![vec![text(format!("pgferry {}", env!("CARGO_PKG_VERSION")))]],
        ),
        Show::Help => {
            let rows = USAGE
                .trim_start_matches("commands: ")
                .split("; ")
                .map(|c| vec![text(c)])
                .collect();
            Answer::table(vec![("command", Text)], rows)
        }
    }
}

/// `host:port` (or `[v6]:port`) as a host and a port (NULL when there is
/// none: the column is a bigint).
fn split_addr(a: &str) -> (String, Option<String>) {
    match a.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => {
            (h.trim_matches(['[', ']']).to_owned(), Some(p.to_owned()))
        }
        _ => (a.to_owned(), None),
    }
}
