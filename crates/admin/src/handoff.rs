//! `/v1/handoff`: restarting pgferry itself without dropping a session
//! (`POST`: start a new process from the binary on disk that takes this
//! one over), and what the last hand-off did (`GET`). The work is
//! `pgferry_proxy::handoff::start_successor`'s, shared with SIGUSR2.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgferry_proxy::handoff::{start_successor, Status};
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

/// One `POST /v1/handoff` at a time. `start_successor` only refuses once
/// the new process has connected, so two requests in quick succession
/// would otherwise both start one.
static STARTING: AtomicBool = AtomicBool::new(false);

/// Releases `STARTING` when the hand-off task ends, however it ends.
struct Claim;

impl Claim {
    fn take() -> Option<Self> {
        STARTING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then_some(Claim)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        STARTING.store(false, Ordering::Release);
    }
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
    let Some(claim) = Claim::take() else {
        return error(StatusCode::CONFLICT, "a hand-off is already running");
    };
    // In a task of its own: the hand-off must be followed to its end (the
    // status says "aborted" if the new process dies) even when the client
    // gives up or its connection drops, which cancels this handler.
    let ctx = state.proxy.clone();
    let mut task = tokio::spawn(async move {
        let result = start_successor(&ctx).await;
        drop(claim);
        result
    });
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
        Ok(Ok(status)) if status.phase == "done" => Json(status).into_response(),
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
        status.error = Some(format!("the hand-off ended {}", status.phase));
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
    fn one_claim_at_a_time() {
        let first = Claim::take().expect("free");
        assert!(Claim::take().is_none());
        drop(first);
        let again = Claim::take();
        assert!(again.is_some());
    }

    #[test]
    fn failed_statuses_carry_an_error() {
        let s = with_error(Status {
            phase: "aborted".into(),
            ..Status::default()
        });
        assert_eq!(s.error.as_deref(), Some("the hand-off ended aborted"));
        let s = with_error(Status {
            phase: "aborted".into(),
            error: Some("the new process is gone".into()),
            ..Status::default()
        });
        assert_eq!(s.error.as_deref(), Some("the new process is gone"));
    }
}
