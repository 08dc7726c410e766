//! `/v1/connections`: live sessions, and moving one to another backend.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgferry_proxy::forwarder::TransferOutcome;
use pgferry_proxy::verbs::{self, SessionView};
use serde::Deserialize;

use crate::{verb_error, AdminState};

const DEFAULT_TRANSFER_TIMEOUT_MS: u64 = 15_000;

pub async fn list(State(state): State<AdminState>) -> Json<Vec<SessionView>> {
    Json(verbs::sessions(&state.proxy).await)
}

pub async fn get_one(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match verbs::session(&state.proxy, &id).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => verb_error(&e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    to: Option<String>,
    timeout_ms: Option<u64>,
}

fn outcome_json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

pub async fn transfer(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let body: TransferBody = match crate::backends::parse_body(&body) {
        Ok(b) => b,
        Err(e) => return crate::error(StatusCode::BAD_REQUEST, &e),
    };
    let timeout = Duration::from_millis(body.timeout_ms.unwrap_or(DEFAULT_TRANSFER_TIMEOUT_MS));
    let outcome = match verbs::transfer(&state.proxy, &id, body.to, timeout).await {
        Ok(o) => o,
        Err(e) => return verb_error(&e),
    };
    match outcome {
        TransferOutcome::Success {
            from,
            to,
            duration,
            pause,
        } => outcome_json(
            StatusCode::OK,
            serde_json::json!({
                "outcome": "success",
                "from": from,
                "to": to,
                "duration_ms": duration.as_secs_f64() * 1000.0,
                "pause_ms": pause.as_secs_f64() * 1000.0,
            }),
        ),
        TransferOutcome::RecoverableError(reason) => outcome_json(
            StatusCode::CONFLICT,
            serde_json::json!({ "outcome": "recoverable_error", "reason": reason }),
        ),
        TransferOutcome::FatalError(reason) => outcome_json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "outcome": "fatal_error", "reason": reason }),
        ),
        // The backend ended the session itself: gone, like a 500, but not
        // pgferry's failure.
        TransferOutcome::SessionEnded(reason) => outcome_json(
            StatusCode::GONE,
            serde_json::json!({ "outcome": "session_ended", "reason": reason }),
        ),
    }
}
