//! `/v1/backends` and `/v1/rebalance`: the backend set, drain, activate,
//! remove, and evening out the load.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgferry_proxy::backend::dialect::DialectSetting;
use pgferry_proxy::backend::{AddBackendError, Backend, BackendMode, BackendOrigin};
use pgferry_proxy::balancer::rebalance::rebalance as run_rebalance;
use pgferry_proxy::errors::SessionError;
use pgferry_proxy::forwarder::TransferOutcome;
use pgferry_proxy::transfer::spares::refill_all;
use pgferry_proxy::verbs::{self, BackendView};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use crate::{error, verb_error, AdminState};

/// How long a forced removal waits for its sessions to close.
const FORCE_CLOSE_WAIT: Duration = Duration::from_secs(5);
const DEFAULT_REBALANCE_TIMEOUT_MS: u64 = 15_000;

fn view(b: &Backend) -> BackendView {
    BackendView::of(b)
}

fn no_such_backend(name: &str) -> Response {
    error(StatusCode::NOT_FOUND, &format!("no such backend {name:?}"))
}

/// An empty body means "all defaults"; the error is the 400 answer's.
pub(crate) fn parse_body<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

pub async fn list(State(state): State<AdminState>) -> Json<Vec<BackendView>> {
    Json(verbs::backends(&state.proxy))
}

pub async fn get_one(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match verbs::backend(&state.proxy, &name) {
        Ok(v) => Json(v).into_response(),
        Err(e) => verb_error(&e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AddBody {
    name: String,
    address: String,
    #[serde(default)]
    cluster: Option<String>,
    /// "auto" (the default), "postgres" or "cockroachdb".
    #[serde(default)]
    dialect: Option<String>,
}

pub async fn add(State(state): State<AdminState>, body: Bytes) -> Response {
    let body: AddBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("body must be {{\"name\": ..., \"address\": \"host:port\"}}: {e}"),
            )
        }
    };
    let dialect = match body.dialect.as_deref().map(DialectSetting::parse) {
        None => DialectSetting::Auto,
        Some(Ok(d)) => d,
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, &e),
    };
    match state.proxy.backends.add(
        &body.name,
        &body.address,
        body.cluster.as_deref(),
        dialect,
        BackendOrigin::Api,
    ) {
        Ok(b) => {
            info!(backend = %b.name, address = %b.address, "backend added");
            refill_all(&state.proxy);
            (StatusCode::CREATED, Json(view(&b))).into_response()
        }
        Err(e @ AddBackendError::Exists(_)) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ AddBackendError::Invalid(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TimeoutBody {
    timeout_ms: Option<u64>,
}

pub async fn drain(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let body: TimeoutBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let timeout = body.timeout_ms.map(Duration::from_millis);
    match verbs::drain(&state.proxy, &name, timeout).await {
        Ok(r) => Json(json!({
            "backend": r.backend,
            "moved": r.moved,
            "failed": r.failed,
            "remaining": r.remaining,
            "failures": r.failures.iter().map(|(id, reason)| json!({
                "id": id.to_string(),
                "reason": reason,
            })).collect::<Vec<_>>(),
            "duration_ms": r.duration.as_secs_f64() * 1000.0,
        }))
        .into_response(),
        Err(e) => verb_error(&e),
    }
}

pub async fn activate(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match verbs::activate(&state.proxy, &name) {
        Ok(v) => Json(v).into_response(),
        Err(e) => verb_error(&e),
    }
}

/// `?force=true`: the only query this API takes, parsed here so that a
/// bad value gets the same JSON error as everything else.
fn force_flag(query: Option<&str>) -> Result<bool, String> {
    let mut force = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "true")) {
            ("force", "true" | "1") => force = true,
            ("force", "false" | "0") => force = false,
            ("force", v) => return Err(format!("force must be true or false, not {v:?}")),
            (k, _) => return Err(format!("unknown query parameter {k:?}")),
        }
    }
    Ok(force)
}

pub async fn remove(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let force = match force_flag(query.as_deref()) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let ctx = &state.proxy;
    let Some(b) = ctx.backends.get(&name) else {
        return no_such_backend(&name);
    };
    let sessions = b.sessions();
    if sessions > 0 && !force {
        return (
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!(
                    "backend {name} still has {sessions} sessions; drain it first or use ?force=true"
                ),
                "sessions": sessions,
            })),
        )
            .into_response();
    }
    // No new sessions while the others are being closed.
    b.set_mode(BackendMode::Draining);
    let closed = if sessions > 0 {
        let asked = ctx
            .registry
            .terminate_on(&name, || SessionError::AdminShutdown);
        // Sessions close at their next message boundary; wait a little so
        // the answer can say they are gone.
        let deadline = tokio::time::Instant::now() + FORCE_CLOSE_WAIT;
        while b.sessions() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        asked
    } else {
        0
    };
    ctx.backends.remove(&name);
    ctx.spares.discard_backend(&name);
    info!(backend = %name, closed, "backend removed");
    Json(json!({ "removed": name, "closed": closed })).into_response()
}

pub async fn rebalance(State(state): State<AdminState>, body: Bytes) -> Response {
    let body: TimeoutBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let timeout = Duration::from_millis(body.timeout_ms.unwrap_or(DEFAULT_REBALANCE_TIMEOUT_MS));
    let report = run_rebalance(&state.proxy, timeout).await;
    let moves: Vec<_> = report
        .moves
        .iter()
        .map(|m| {
            let (outcome, reason) = match &m.outcome {
                TransferOutcome::Success { .. } => ("success", None),
                TransferOutcome::RecoverableError(r) => ("recoverable_error", Some(r.clone())),
                TransferOutcome::FatalError(r) => ("fatal_error", Some(r.clone())),
                TransferOutcome::SessionEnded(r) => ("session_ended", Some(r.clone())),
            };
            json!({
                "id": m.planned.id.to_string(),
                "from": m.planned.from,
                "to": m.planned.to,
                "outcome": outcome,
                "reason": reason,
            })
        })
        .collect();
    let moved = report.moved();
    Json(json!({
        "moves": moves,
        "moved": moved,
        "failed": report.moves.len() - moved,
        "backends": verbs::backends(&state.proxy),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::force_flag;

    #[test]
    fn force_query() {
        assert_eq!(force_flag(None), Ok(false));
        assert_eq!(force_flag(Some("force=true")), Ok(true));
        assert_eq!(force_flag(Some("force")), Ok(true));
        assert_eq!(force_flag(Some("force=0")), Ok(false));
        assert!(force_flag(Some("force=yes")).is_err());
        assert!(force_flag(Some("forse=true")).is_err());
    }
}
