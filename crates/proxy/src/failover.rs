//! A session whose primary went away without a word (a crash, an
//! immediate shutdown, a lost host), in a cluster where a standby may take
//! over (docs/switchover.md, "Unplanned failover").
//!
//! Which sessions survive: those that were idle, outside a transaction,
//! with nothing in flight, and whose state pgferry knows (their client has
//! sent nothing since they logged in, or since their last capture or
//! replay). They wait, their traffic held, for a primary of the cluster
//! (the health check sees a promotion within one interval), get their
//! state replayed there, and go on. Every other one is closed with an
//! error saying what became of its work: 08007 when a request was in
//! flight (it may have committed), 08006 inside a transaction (it is
//! gone), 57P01 otherwise. A server that said why it closed (its own
//! FATAL) is not a failover: its word reaches the client as it is.

use std::time::Duration;

use bytes::BytesMut;
use pgferry_wire::tag;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::backend::dial;
use crate::backend::login::LoginAuth;
use crate::backend::BackendLease;
use crate::errors::SessionError;
use crate::forwarder::tracker::TxStatus;
use crate::forwarder::Forwarder;
use crate::transfer::capture::SessionState;
use crate::transfer::{self, replay, ServerSide, SessionIdentity};
use crate::ProxyContext;

/// How often a waiting session looks for its cluster's new primary.
const LOOK_AGAIN: Duration = Duration::from_millis(200);

pub enum AfterLoss {
    /// The session runs on this backend now.
    Rehomed(String),
    /// It cannot go on; the client gets this error.
    Close(SessionError),
}

/// What becomes of a session whose server connection closed or failed.
/// `None`: not a failover (no cluster, the server said why, the client
/// was leaving); the session ends as it would without pgferry.
pub async fn after_server_loss(
    ctx: &ProxyContext,
    fwd: &mut Forwarder<'_>,
    server: &mut ServerSide,
    session: &SessionIdentity<'_>,
) -> Option<AfterLoss> {
    let dead = server.backend().clone();
    let cluster = dead.cluster.clone()?;
    let said_why = fwd.tracker.last_response().map(|s| s.tag) == Some(tag::ERROR_RESPONSE);
    if fwd.tracker.client_terminated() || said_why {
        return None;
    }
    let close = |err: SessionError| {
        ctx.metrics
            .failover_sessions
            .with_label_values(&["closed"])
            .inc();
        Some(AfterLoss::Close(err))
    };
    if !fwd.can_rehome() {
        let t = &fwd.tracker;
        let err = if t.outstanding() > 0 && t.tx_status() != TxStatus::Failed {
            SessionError::FailoverOutcomeUnknown { cluster }
        } else if t.tx_status() != TxStatus::Idle {
            SessionError::FailoverInTransaction { cluster }
        } else {
            SessionError::FailoverNotRehomed {
                cluster,
                why: "it was in the middle of an exchange with the server".into(),
            }
        };
        return close(err);
    }
    let custom = transfer::postgres::custom_setting_names(ctx, fwd);
    let last_request = fwd.tracker.last_request();
    let known = server
        .known
        .take()
        .and_then(|k| k.still_holds(last_request, &custom));
    // Nothing sent since the login: the state is the startup's, which the
    // new login reproduces.
    let state = match (known, last_request) {
        (Some(state), _) => state,
        (None, None) => SessionState::default(),
        (None, Some(_)) => {
            return close(SessionError::FailoverNotRehomed {
                cluster,
                why: "its client sent statements since pgferry last knew its state".into(),
            })
        }
    };
    info!(session = %session.id, backend = %dead.name, %cluster, "server connection lost while idle: waiting for a primary");
    let deadline = Instant::now() + ctx.config.failover.rehome_timeout;
    loop {
        for b in ctx.backends.primaries_of(&cluster, &dead.name) {
            match rehome_on(ctx, &b, &state, session).await {
                Ok((conn, params)) => {
                    let name = b.name.clone();
                    let old =
                        transfer::swap(ctx, fwd, server, session, conn, params, Vec::new()).await;
                    drop(old);
                    fwd.replace_lost_server_after_swap();
                    ctx.metrics
                        .failover_sessions
                        .with_label_values(&["rehomed"])
                        .inc();
                    info!(session = %session.id, from = %dead.name, to = %name, "session rehomed on the new primary");
                    return Some(AfterLoss::Rehomed(name));
                }
                Err(why) => {
                    warn!(session = %session.id, backend = %b.name, %why, "could not rehome the session here")
                }
            }
        }
        if Instant::now() >= deadline {
            return close(SessionError::FailoverNotRehomed {
                cluster,
                why: format!(
                    "no primary took it within {:?}",
                    ctx.config.failover.rehome_timeout
                ),
            });
        }
        tokio::time::sleep(LOOK_AGAIN).await;
    }
}

/// A login on `b` as the client, with `state` replayed.
async fn rehome_on(
    ctx: &ProxyContext,
    b: &std::sync::Arc<crate::backend::Backend>,
    state: &SessionState,
    session: &SessionIdentity<'_>,
) -> Result<(dial::ServerConnection, crate::parameters::ParameterList), String> {
    let mut chatter = BytesMut::new();
    let mut conn = dial::connect(
        BackendLease::new(b.clone()),
        &ctx.dial,
        session.startup,
        LoginAuth::Credentials(session.credentials),
        &mut chatter,
    )
    .await
    .map_err(|e| e.to_string())?;
    let max_len = ctx.config.proxy.max_message_length;
    let replayed = tokio::time::timeout(
        ctx.config.proxy.connect_timeout,
        replay::replay(&mut conn, state, max_len),
    )
    .await
    .map_err(|_| "replay timed out".to_owned())??;
    // A statement that does not parse here cannot be checked against the
    // server that is gone: the session must not go on without it.
    if let Some(u) = replayed.unparsed.first() {
        return Err(format!(
            "prepared statement {:?} cannot be re-created: {}",
            u.statement.name,
            replay::describe(&u.error)
        ));
    }
    Ok((conn, replayed.parameters))
}

/// Every `remember_state_after`, asks each session on a clustered backend
/// to have its state captured if it has been idle since the last round
/// (the session decides: `ControlCommand::Remember`). Runs until `stop`.
pub async fn remember_sweep(
    ctx: std::sync::Arc<ProxyContext>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let cfg = &ctx.config.failover;
    if !cfg.remember_idle_state {
        return;
    }
    let mut tick = tokio::time::interval(cfg.remember_state_after);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for b in ctx.backends.all().iter().filter(|b| b.cluster.is_some()) {
            for (_, control) in ctx.registry.on_backend(&b.name) {
                // A full queue means the session is busy with commands:
                // it is not idle either.
                let _ = control.try_send(crate::forwarder::ControlCommand::Remember);
            }
        }
    }
}
