//! The server side of a switchover, as `[backend_admin]`: checking roles,
//! fencing the old primary, comparing WAL positions, promoting the standby.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::SwitchoverError;
use crate::backend::admin_conn::{AdminConn, AdminSqlError};
use crate::backend::Backend;
use crate::config::PromoteMode;
use crate::ProxyContext;

/// Time allowed for one of these statements.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a WAL position or a recovery state is polled.
const POLL: Duration = Duration::from_millis(20);

/// A connection for pgferry's own SQL to `backend`.
pub async fn connect(
    ctx: &ProxyContext,
    backend: &Arc<Backend>,
) -> Result<AdminConn, SwitchoverError> {
    let login = ctx
        .admin_login
        .as_ref()
        .ok_or(SwitchoverError::NoAdminLogin)?;
    AdminConn::open(backend.clone(), login, &ctx.dial)
        .await
        .map_err(|e| SwitchoverError::Server {
            backend: backend.name.clone(),
            what: "log in",
            why: e.to_string(),
        })
}

fn server_error<'a>(
    backend: &'a Backend,
    what: &'static str,
) -> impl Fn(String) -> SwitchoverError + 'a {
    move |why| SwitchoverError::Server {
        backend: backend.name.clone(),
        what,
        why,
    }
}

/// `pg_is_in_recovery()`.
pub async fn in_recovery(conn: &mut AdminConn, backend: &Backend) -> Result<bool, SwitchoverError> {
    let v = conn
        .value("SELECT pg_catalog.pg_is_in_recovery()", STATEMENT_TIMEOUT)
        .await
        .map_err(|e| server_error(backend, "check its role")(e.to_string()))?;
    Ok(v.as_deref() == Some("t"))
}

/// Stops new write transactions on the old primary. Sessions pgferry
/// holds pick it up at their next statement (the capture), which is why
/// the capture relays, and the swap corrects, the ParameterStatus it
/// causes.
///
/// It lives in the server's `postgresql.auto.conf`, with a marker
/// (`pgferry.fenced`) saying it is pgferry's: a former primary that comes
/// back as a standby without a new base backup keeps it, and the health
/// check lifts it then (`lift_stale_fence`), so it cannot outlive its
/// switchover into a later promotion.
pub async fn fence(conn: &mut AdminConn, backend: &Backend) -> Result<(), SwitchoverError> {
    // ALTER SYSTEM only takes a custom setting its session knows (before
    // PostgreSQL 17): the SET makes it known.
    for sql in [
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SET pgferry.fenced = 'on'",
        "ALTER SYSTEM SET pgferry.fenced = 'on'",
    ] {
        conn.query(sql, STATEMENT_TIMEOUT)
            .await
            .map_err(|e| server_error(backend, "fence")(e.to_string()))?;
    }
    conn.query("SELECT pg_catalog.pg_reload_conf()", STATEMENT_TIMEOUT)
        .await
        .map_err(|e| server_error(backend, "fence")(e.to_string()))?;
    Ok(())
}

/// Undoes `fence` (an aborted switchover; a promoted standby that still
/// carries the fence of an earlier switchover in its copied config).
pub async fn unfence(conn: &mut AdminConn, backend: &Backend) -> Result<(), SwitchoverError> {
    // Each step on its own: a fence that failed half-way (the marker not
    // allowed) is undone as far as it got.
    let mut first_error = None;
    for sql in [
        "ALTER SYSTEM RESET default_transaction_read_only",
        "SET pgferry.fenced = ''",
        "ALTER SYSTEM RESET pgferry.fenced",
    ] {
        if let Err(e) = conn.query(sql, STATEMENT_TIMEOUT).await {
            first_error.get_or_insert(server_error(backend, "unfence")(e.to_string()));
        }
    }
    conn.query("SELECT pg_catalog.pg_reload_conf()", STATEMENT_TIMEOUT)
        .await
        .map_err(|e| server_error(backend, "unfence")(e.to_string()))?;
    first_error.map_or(Ok(()), Err)
}

/// After the fence: waits until no other connection to the old primary
/// (pgferry's held sessions are idle; these bypass pgferry) holds a
/// transaction that has written, or `deadline`. Such a transaction could
/// commit after the catch-up's mark and be missing on the new primary.
pub async fn wait_for_writers(
    conn: &mut AdminConn,
    backend: &Backend,
    deadline: Instant,
) -> Result<(), SwitchoverError> {
    loop {
        let v = conn
            .value(
                "SELECT string_agg(pid::text, ', ' ORDER BY pid) FROM pg_catalog.pg_stat_activity \
                 WHERE backend_xid IS NOT NULL AND backend_type = 'client backend' \
                   AND pid <> pg_catalog.pg_backend_pid()",
                STATEMENT_TIMEOUT,
            )
            .await
            .map_err(|e| {
                server_error(backend, "look for open write transactions")(e.to_string())
            })?;
        let Some(pids) = v else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(SwitchoverError::Writers(pids));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether the server carries pgferry's fence (its marker).
pub async fn fenced(conn: &mut AdminConn, backend: &Backend) -> Result<bool, SwitchoverError> {
    let v = conn
        .value(FENCE_MARKER_SQL, STATEMENT_TIMEOUT)
        .await
        .map_err(|e| server_error(backend, "read its settings")(e.to_string()))?;
    Ok(v.as_deref() == Some("on"))
}

/// The fence marker's value (empty when unset).
pub const FENCE_MARKER_SQL: &str = "SELECT coalesce(current_setting('pgferry.fenced', true), '')";

/// A WAL position on the old primary that every commit any client was
/// told about precedes, and that is flushed (so it will be streamed).
///
/// Its insert position alone would not do: with `synchronous_commit =
/// off` a commit returns before its WAL is flushed, and WAL nothing
/// flushes is not sent. So pgferry writes a small transactional message
/// and commits it synchronously (flushing everything before it), and waits
/// for the end of that message. Its own session overrides the fence.
pub async fn wal_end(conn: &mut AdminConn, backend: &Backend) -> Result<u64, SwitchoverError> {
    let v = conn
        .value(
            "SET synchronous_commit = on; SET default_transaction_read_only = off; \
             SELECT pg_catalog.pg_logical_emit_message(true, 'pgferry', 'switchover')::text",
            STATEMENT_TIMEOUT,
        )
        .await
        .map_err(|e| server_error(backend, "mark the end of its WAL")(e.to_string()))?;
    v.as_deref()
        .and_then(parse_lsn)
        .ok_or_else(|| server_error(backend, "mark the end of its WAL")(format!("{v:?} is no LSN")))
}

/// Waits until the standby has replayed WAL up to `end`, or `deadline`.
pub async fn catch_up(
    conn: &mut AdminConn,
    backend: &Backend,
    end: u64,
    deadline: Instant,
) -> Result<(), SwitchoverError> {
    loop {
        let v = conn
            .value(
                "SELECT pg_catalog.pg_last_wal_replay_lsn()::text",
                STATEMENT_TIMEOUT,
            )
            .await
            .map_err(|e| server_error(backend, "read its replay position")(e.to_string()))?;
        let replayed = v.as_deref().and_then(parse_lsn).ok_or_else(|| {
            server_error(backend, "read its replay position")(
                "it replays no WAL (not a streaming standby?)".into(),
            )
        })?;
        if replayed_through(replayed, end) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(SwitchoverError::CatchUpTimeout {
                behind_bytes: end.saturating_sub(replayed),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Promotes `to` as `[switchover] promote` says and waits until it has
/// left recovery, by `deadline`. Its own connections: an orchestrator may
/// end every connection to `to` as it promotes it (CloudNativePG does).
pub async fn promote(
    ctx: &ProxyContext,
    from: &Arc<Backend>,
    to: &Arc<Backend>,
    deadline: Instant,
) -> Result<(), SwitchoverError> {
    let cfg = &ctx.config.switchover;
    let left = deadline.saturating_duration_since(Instant::now());
    match cfg.promote {
        PromoteMode::Sql => {
            let mut conn = connect(ctx, to).await?;
            let wait = left.as_secs().clamp(1, 3600);
            let asked = conn
                .query(
                    &format!("SELECT pg_catalog.pg_promote(true, {wait})"),
                    left + STATEMENT_TIMEOUT,
                )
                .await;
            conn.close().await;
            match asked {
                // `false`: not done within the wait, but under way.
                Ok(_) => {}
                // The server refused to run it (no privilege, not a
                // standby): nothing was set in motion.
                Err(AdminSqlError::Server(f)) => {
                    return Err(SwitchoverError::PromoteRefused(format!(
                        "{} ({})",
                        f.message().unwrap_or("error"),
                        f.sqlstate().unwrap_or("?????")
                    )))
                }
                Err(e) => return Err(server_error(to, "promote")(e.to_string())),
            }
        }
        PromoteMode::Command => {
            let command = cfg.promote_command.as_deref().unwrap_or_default();
            run_command(command, from, to, left).await?;
        }
        PromoteMode::External => {}
    }
    loop {
        if promoted_now(ctx, to).await == Some(true) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(SwitchoverError::PromoteTimeout);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether `to` has left recovery, asked on a connection of its own;
/// `None` when it cannot be asked now.
pub async fn promoted_now(ctx: &ProxyContext, to: &Arc<Backend>) -> Option<bool> {
    let mut conn = connect(ctx, to).await.ok()?;
    let r = in_recovery(&mut conn, to).await.ok().map(|r| !r);
    conn.close().await;
    r
}

/// Runs the operator's promote command (`sh -c`), killed at `limit`.
async fn run_command(
    command: &str,
    from: &Backend,
    to: &Backend,
    limit: Duration,
) -> Result<(), SwitchoverError> {
    let failed = |why: String| SwitchoverError::PromoteCommand(why);
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("PGFERRY_FROM", &from.name)
        .env("PGFERRY_TO", &to.name)
        .env("PGFERRY_FROM_ADDRESS", &from.address)
        .env("PGFERRY_TO_ADDRESS", &to.address)
        .env("PGFERRY_CLUSTER", to.cluster.as_deref().unwrap_or(""))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("cannot start sh: {e}")))?;
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(failed(format!("exited with {status}"))),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => {
            let _ = child.kill().await;
            Err(failed(format!("still running after {limit:?}; killed")))
        }
    }
}

/// `X/Y` (hex) as a 64-bit WAL position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u64::from(u32::MAX) && lo <= u64::from(u32::MAX)).then_some((hi << 32) | lo)
}

/// WAL page and segment sizes PostgreSQL is built with by default.
const WAL_PAGE: u64 = 8192;
const WAL_SEGMENT: u64 = 16 * 1024 * 1024;
/// Headers at the start of a WAL page (short) and segment (long).
const SHORT_PAGE_HEADER: u64 = 24;
const LONG_PAGE_HEADER: u64 = 40;

/// Whether a standby that replayed through `replayed` has everything
/// before `end`. The insert position the primary reports skips the next
/// page's header when the last record ended on a page boundary, where the
/// standby's replay position stops; that header holds no record.
fn replayed_through(replayed: u64, end: u64) -> bool {
    if replayed >= end {
        return true;
    }
    let header = if end % WAL_SEGMENT == LONG_PAGE_HEADER {
        LONG_PAGE_HEADER
    } else if end % WAL_PAGE == SHORT_PAGE_HEADER {
        SHORT_PAGE_HEADER
    } else {
        return false;
    };
    replayed >= end - header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns() {
        assert_eq!(parse_lsn("0/3000148"), Some(0x3000148));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(parse_lsn("1/"), None);
    }

    #[test]
    fn page_headers_hold_no_records() {
        assert!(replayed_through(100, 100));
        assert!(!replayed_through(99, 100));
        // The last record ended at a page boundary.
        assert!(replayed_through(
            3 * WAL_PAGE,
            3 * WAL_PAGE + SHORT_PAGE_HEADER
        ));
        assert!(!replayed_through(
            3 * WAL_PAGE - 8,
            3 * WAL_PAGE + SHORT_PAGE_HEADER
        ));
        // ... or at a segment boundary.
        assert!(replayed_through(
            2 * WAL_SEGMENT,
            2 * WAL_SEGMENT + LONG_PAGE_HEADER
        ));
    }
}
