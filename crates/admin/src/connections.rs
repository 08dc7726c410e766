//! `/v1/connections`: live sessions, and moving one to another backend.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgferry_proxy::balancer::mover::{request_transfer, MoveError};
use pgferry_proxy::forwarder::tracker::TxStatus;
use pgferry_proxy::forwarder::{ControlCommand, TransferOutcome};
use pgferry_proxy::registry::SessionInfo;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::{error, AdminState};

/// How long a session may take to answer "what state are you in".
const INSPECT_TIMEOUT: Duration = Duration::from_millis(250);
const DEFAULT_TRANSFER_TIMEOUT_MS: u64 = 15_000;

#[derive(Serialize)]
pub struct ConnectionView {
    id: String,
    client_addr: String,
    user: String,
    database: String,
    application_name: Option<String>,
    backend: String,
    connected_at: String,
    migrations: u32,
    /// "idle" | "active" | "in_transaction" | "transferring"
    state: &'static str,
}

async fn view(state: &AdminState, info: SessionInfo) -> ConnectionView {
    let session_state = if info.transferring {
        "transferring"
    } else {
        inspect_state(state, info.id).await
    };
    ConnectionView {
        id: info.id.to_string(),
        client_addr: info.client_addr.to_string(),
        user: info.user,
        database: info.database,
        application_name: info.application_name,
        backend: info.backend,
        connected_at: humantime::format_rfc3339_millis(info.connected_at).to_string(),
        migrations: info.migrations,
        state: session_state,
    }
}

async fn inspect_state(state: &AdminState, id: Uuid) -> &'static str {
    let Some((_, control)) = state.proxy.registry.get(id) else {
        return "idle";
    };
    let (tx, rx) = oneshot::channel();
    // Sending may wait too if the session's control queue is full.
    let asked = async {
        control.send(ControlCommand::Inspect(tx)).await.ok()?;
        rx.await.ok()
    };
    match tokio::time::timeout(INSPECT_TIMEOUT, asked).await {
        Ok(Some(snap)) => {
            if snap.transfer_pending {
                "transferring"
            } else if snap.tx_status != TxStatus::Idle {
                "in_transaction"
            } else if snap.outstanding > 0 || !snap.at_message_boundary {
                "active"
            } else {
                "idle"
            }
        }
        // Busy enough not to answer at once (or moving right now).
        _ => "active",
    }
}

pub async fn list(State(state): State<AdminState>) -> Json<Vec<ConnectionView>> {
    let mut sessions = state.proxy.registry.list();
    sessions.sort_by_key(|s| s.connected_at);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, info) in sessions.into_iter().enumerate() {
        let st = state.clone();
        tasks.spawn(async move { (i, view(&st, info).await) });
    }
    let mut out: Vec<(usize, ConnectionView)> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(v) = r {
            out.push(v);
        }
    }
    out.sort_by_key(|(i, _)| *i);
    Json(out.into_iter().map(|(_, v)| v).collect())
}

/// A malformed id names no connection.
fn parse_id(id: &str) -> Option<Uuid> {
    Uuid::parse_str(id).ok()
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such connection")
}

pub async fn get_one(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    let Some(id) = parse_id(&id) else {
        return not_found();
    };
    match state.proxy.registry.get(id) {
        Some((info, _)) => Json(view(&state, info).await).into_response(),
        None => not_found(),
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
    let Some(id) = parse_id(&id) else {
        return not_found();
    };
    let body: TransferBody = match crate::backends::parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let Some((info, control)) = state.proxy.registry.get(id) else {
        return not_found();
    };
    // At once, not queued behind the running move (the session would move
    // again right after it).
    if info.transferring {
        return outcome_json(
            StatusCode::CONFLICT,
            serde_json::json!({
                "outcome": "recoverable_error",
                "reason": pgferry_proxy::forwarder::TRANSFER_IN_PROGRESS,
            }),
        );
    }
    if let Some(to) = &body.to {
        if state.proxy.backends.get(to).is_none() {
            return error(StatusCode::BAD_REQUEST, &format!("unknown backend {to:?}"));
        }
        if *to == info.backend {
            return outcome_json(
                StatusCode::CONFLICT,
                serde_json::json!({
                    "outcome": "recoverable_error",
                    "reason": format!("session is already on {to}"),
                }),
            );
        }
    }
    let timeout = Duration::from_millis(body.timeout_ms.unwrap_or(DEFAULT_TRANSFER_TIMEOUT_MS));
    let outcome = match request_transfer(&control, body.to, timeout).await {
        Ok(o) => o,
        Err(MoveError::SessionGone) => return not_found(),
        Err(MoveError::NoAnswer) => {
            return error(StatusCode::GATEWAY_TIMEOUT, "session did not answer")
        }
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
