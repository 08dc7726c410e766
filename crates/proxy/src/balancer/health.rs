//! Health checks: every interval, each backend gets a TCP connect and a
//! PostgreSQL startup probe. A server that answers a StartupMessage with
//! an authentication request (or a login error about the probe's user) is
//! serving logins; one that refuses the connection, times out, or answers
//! "starting up"/"shutting down" (SQLSTATE class 57P) is not. The probe
//! hangs up before authenticating, which PostgreSQL does not log.
//!
//! With `[backend_admin]`, the probe logs in instead and asks
//! `pg_is_in_recovery()`: that is how a backend's role (primary, standby)
//! is known, and how a promotion by someone else is noticed within one
//! interval.
//!
//! `unhealthy_threshold` failures in a row take a backend out of the
//! candidates for new sessions and migrations; `healthy_threshold`
//! successes bring it back.

use std::sync::Arc;

use bytes::BytesMut;
use pgferry_wire::messages::take_message;
use pgferry_wire::{tag, ErrorFields, StartupMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::backend::admin_conn::{AdminConn, AdminLogin, AdminSqlError};
use crate::backend::dial::{DialError, DialSettings};
use crate::backend::role::Role;
use crate::backend::Backend;
use crate::config::BalancerSection;
use crate::ProxyContext;

/// The probe reads one message; anything bigger than this is not a
/// PostgreSQL server's first answer.
const MAX_PROBE_MESSAGE: u32 = 64 * 1024;

/// One probe: `Ok` when the server is taking logins, else why not.
pub async fn probe(
    backend: &Backend,
    cfg: &BalancerSection,
    dial: &DialSettings,
) -> Result<(), String> {
    let fut = async {
        let mut tcp = TcpStream::connect((backend.host.as_str(), backend.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let peer = tcp.peer_addr().map_err(|e| format!("connect: {e}"))?;
        dial.refuse_own_listener(&tcp, peer)?;
        let startup = StartupMessage {
            minor_version: 0,
            params: vec![
                ("user".into(), cfg.health_check_user.clone()),
                ("database".into(), cfg.health_check_database.clone()),
                ("application_name".into(), "pgferry health check".into()),
            ],
            protocol_options: Vec::new(),
        };
        let mut out = BytesMut::new();
        startup.encode_for_backend(&mut out);
        tcp.write_all(&out)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut inbuf = BytesMut::with_capacity(512);
        loop {
            match take_message(&mut inbuf, MAX_PROBE_MESSAGE) {
                Ok(Some(m)) => return judge(m.tag, &m.body),
                Ok(None) => {}
                Err(e) => return Err(format!("not a PostgreSQL answer: {e}")),
            }
            match tcp.read_buf(&mut inbuf).await {
                Ok(0) => return Err("connection closed without an answer".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    };
    match tokio::time::timeout(cfg.health_check_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", cfg.health_check_timeout)),
    }
}

/// The probe with `[backend_admin]`: a login and `pg_is_in_recovery()`.
/// `Ok(None)`: serving logins, but pgferry's own was refused (its role
/// stays unknown).
pub async fn probe_role(
    backend: &Arc<Backend>,
    login: &AdminLogin,
    cfg: &BalancerSection,
    dial: &DialSettings,
) -> Result<Option<Role>, String> {
    let fut = async {
        let mut conn = match AdminConn::open(backend.clone(), login, dial).await {
            Ok(c) => c,
            Err(DialError::NotAcceptingLogins(f)) => {
                return Err(format!(
                    "server refuses logins: {} (57P03)",
                    f.message().unwrap_or("no message")
                ))
            }
            // A server that answers a login with an error (a wrong
            // password for pgferry's own role) is serving logins.
            Err(e @ (DialError::Server(_) | DialError::Login(_))) => {
                warn!(backend = %backend.name, error = %e, "[backend_admin] login refused: the backend's role is unknown");
                return Ok(None);
            }
            Err(e) => return Err(e.to_string()),
        };
        let v = conn
            .query(
                "SELECT pg_catalog.pg_is_in_recovery(), \
                 coalesce(current_setting('pgferry.fenced', true), '')",
                cfg.health_check_timeout,
            )
            .await;
        let result = match v.map(|rows| rows.into_iter().next().unwrap_or_default()) {
            Ok(row) if row.len() == 2 => {
                let standby = row[0].as_deref() == Some("t");
                if standby && row[1].as_deref() == Some("on") {
                    lift_stale_fence(&mut conn, backend).await;
                }
                Ok(Some(Role::from_in_recovery(standby)))
            }
            Ok(_) => Err("the role check returned no row".into()),
            Err(AdminSqlError::Server(f)) => {
                warn!(backend = %backend.name, error = %f.message().unwrap_or(""), "role check failed");
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        };
        conn.close().await;
        result
    };
    match tokio::time::timeout(cfg.health_check_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", cfg.health_check_timeout)),
    }
}

/// A standby carrying the fence of an earlier switchover (a former primary
/// re-attached without a new base backup): lifted, or its next promotion
/// would refuse every write.
async fn lift_stale_fence(conn: &mut AdminConn, backend: &Backend) {
    match crate::switchover::primary::unfence(conn, backend).await {
        Ok(()) => {
            info!(backend = %backend.name, "lifted the read-only fence of an earlier switchover from this standby")
        }
        Err(e) => {
            warn!(backend = %backend.name, error = %e, "this standby carries an earlier switchover's read-only fence and it could not be lifted")
        }
    }
}

/// What a server's first answer to a StartupMessage says about it.
fn judge(message_tag: u8, body: &[u8]) -> Result<(), String> {
    match message_tag {
        tag::AUTHENTICATION => Ok(()),
        tag::ERROR_RESPONSE => {
            let fields =
                ErrorFields::decode(body).map_err(|e| format!("bad ErrorResponse: {e}"))?;
            let code = fields.sqlstate().unwrap_or("");
            if code.starts_with("57P") {
                Err(format!(
                    "server refuses logins: {} ({code})",
                    fields.message().unwrap_or("no message")
                ))
            } else {
                // A login error about the probe's user or database: the
                // server is processing logins.
                Ok(())
            }
        }
        other => Err(format!("unexpected message type {:?}", other as char)),
    }
}

/// Checks every backend each interval until `stop` turns true.
pub async fn run(ctx: Arc<ProxyContext>, mut stop: watch::Receiver<bool>) {
    let cfg = &ctx.config.balancer;
    let mut tick = tokio::time::interval(cfg.health_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        check_all(&ctx).await;
    }
}

/// One round of checks of every backend, recording health and roles.
pub async fn check_all(ctx: &Arc<ProxyContext>) {
    let cfg = &ctx.config.balancer;
    let mut checks = JoinSet::new();
    for b in ctx.backends.all().iter() {
        let (b, ctx) = (b.clone(), ctx.clone());
        checks.spawn(async move {
            let r = match &ctx.admin_login {
                Some(login) => probe_role(&b, login, &ctx.config.balancer, &ctx.dial).await,
                None => probe(&b, &ctx.config.balancer, &ctx.dial)
                    .await
                    .map(|()| None),
            };
            (b, r)
        });
    }
    while let Some(done) = checks.join_next().await {
        let Ok((b, result)) = done else { continue };
        if b.is_removed() {
            continue;
        }
        if let Ok(Some(role)) = result {
            let old = b.set_role(role);
            if old != role {
                info!(backend = %b.name, from = old.as_str(), to = role.as_str(), "backend role changed");
            }
        }
        let changed = b.record_check(
            result.is_ok(),
            cfg.unhealthy_threshold,
            cfg.healthy_threshold,
        );
        match (changed, &result) {
            (Some(false), Err(reason)) => {
                warn!(
                    backend = %b.name,
                    address = %b.address,
                    %reason,
                    failures = cfg.unhealthy_threshold,
                    "backend is unhealthy: no new sessions until it passes its health check"
                );
                ctx.spares.discard_backend(&b.name);
            }
            (Some(true), _) => {
                info!(
                    backend = %b.name,
                    address = %b.address,
                    "backend is healthy again"
                );
                crate::transfer::spares::refill_all(ctx);
            }
            (_, Err(reason)) => debug!(backend = %b.name, %reason, "health check failed"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgferry_wire::messages::encode_error_response;

    fn error_body(code: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_error_response(&mut b, pgferry_wire::Severity::Fatal, code, "msg").unwrap();
        b[5..].to_vec()
    }

    #[test]
    fn judging_first_answers() {
        assert!(judge(tag::AUTHENTICATION, &[0, 0, 0, 10]).is_ok());
        assert!(judge(tag::ERROR_RESPONSE, &error_body("28000")).is_ok());
        assert!(judge(tag::ERROR_RESPONSE, &error_body("3D000")).is_ok());
        let e = judge(tag::ERROR_RESPONSE, &error_body("57P03")).unwrap_err();
        assert!(e.contains("57P03"), "{e}");
        assert!(judge(tag::ERROR_RESPONSE, b"garbage-without-nul").is_err());
        assert!(judge(b'Z', b"I").is_err());
    }
}
