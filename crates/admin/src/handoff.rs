//! `/v1/handoff`: restarting pgferry itself without dropping a session
//! (`POST`: start a new process from the binary on disk that takes this
//! one over), and what the last hand-off did (`GET`). The work is
//! `pgferry_proxy::handoff::start_successor`'s, shared with SIGUSR2.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgferry_proxy::handoff::{start_successor, Phase, Status};
use serde::Deserialize;

use crate::backends::parse_body;
use crate::{error, AdminState};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HandoffBody {
    /// How long this request waits for the outcome; the hand-off itself
    /// goes on after it (202).
    timeout_ms: Option<u64>,
}

pub async fn start(State(state): State<AdminState>, body: Bytes) -> Response {
    let body: HandoffBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    if body.timeout_ms == Some(0) {
        return error(
            StatusCode::BAD_REQUEST,
            "timeout_ms must be at least 1 (or left out: wait for the end)",
        );
    }
    // Without the socket the new process could only fail to start.
    if state.proxy.config.proxy.handoff_socket.is_none() {
        return error(
            StatusCode::CONFLICT,
            "hand-offs are off: [proxy] handoff_socket is \"\" (or this pgferry was not started from a config file)",
        );
    }
    // In a task of its own: the hand-off must be followed to its end (the
    // status says "aborted" if the new process dies) even when the client
    // gives up or its connection drops, which cancels this handler.
    let ctx = state.proxy.clone();
    // (start_successor refuses a second one while this one runs.)
    let mut task = tokio::spawn(async move { start_successor(&ctx).await });
    let joined = match body.timeout_ms {
        None => (&mut task).await,
        Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                return (StatusCode::ACCEPTED, Json(state.proxy.handoff.status())).into_response()
            }
        },
    };
    match joined {
        Ok(Ok(status)) if status.phase == Phase::Done => Json(status).into_response(),
        // Aborted: this process serves on, every session it did not hand
        // over included. The status says how far it got.
        Ok(Ok(status)) => (StatusCode::CONFLICT, Json(with_error(status))).into_response(),
        Ok(Err(why)) => error(StatusCode::CONFLICT, &why),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the hand-off task failed: {e}"),
        ),
    }
}

/// A status that went wrong always says why, like every error body.
fn with_error(mut status: Status) -> Status {
    if status.error.is_none() {
        status.error = Some(format!("the hand-off ended {}", status.phase.as_str()));
    }
    status
}

pub async fn progress(State(state): State<AdminState>) -> Response {
    Json(state.proxy.handoff.status()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_statuses_carry_an_error() {
        let s = with_error(Status {
            phase: Phase::Aborted,
            ..Status::default()
        });
        assert_eq!(s.error.as_deref(), Some("the hand-off ended aborted"));
        let s = with_error(Status {
            phase: Phase::Aborted,
            error: Some("the new process is gone".into()),
            ..Status::default()
        });
        assert_eq!(s.error.as_deref(), Some("the new process is gone"));
    }
}
