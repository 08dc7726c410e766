//! `/v1/switchover`: switching a cluster's primary over to a standby
//! (`POST`), and the running one's progress (`GET`). The verb itself is
//! `pgferry_proxy::switchover`'s.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgferry_proxy::switchover::{switchover as run_switchover, SwitchoverError};
use serde::Deserialize;

use crate::backends::parse_body;
use crate::{error, AdminState};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SwitchoverBody {
    from: String,
    to: String,
    timeout_ms: Option<u64>,
}

pub async fn start(State(state): State<AdminState>, body: Bytes) -> Response {
    let body: SwitchoverBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    if body.from.is_empty() || body.to.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be {\"from\": \"pg1\", \"to\": \"pg2\", \"timeout_ms\": 30000}",
        );
    }
    let timeout = body
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(state.proxy.config.switchover.default_timeout);
    match run_switchover(&state.proxy, &body.from, &body.to, timeout).await {
        Ok(report) if report.outcome == "aborted" => {
            (StatusCode::CONFLICT, Json(report)).into_response()
        }
        // The promotion was asked for and did not finish.
        Ok(report) if report.outcome == "failed" => {
            (StatusCode::BAD_GATEWAY, Json(report)).into_response()
        }
        Ok(report) => Json(report).into_response(),
        Err(e) => {
            let status = match &e {
                SwitchoverError::UnknownBackend(_) => StatusCode::NOT_FOUND,
                SwitchoverError::Invalid(_) | SwitchoverError::NoAdminLogin => {
                    StatusCode::BAD_REQUEST
                }
                SwitchoverError::AlreadyRunning | SwitchoverError::Draining(_) => {
                    StatusCode::CONFLICT
                }
                // A server pgferry could not ask before anything changed.
                _ => StatusCode::BAD_GATEWAY,
            };
            error(status, &e.to_string())
        }
    }
}

pub async fn progress(State(state): State<AdminState>) -> Response {
    Json(state.proxy.switchover.progress()).into_response()
}
