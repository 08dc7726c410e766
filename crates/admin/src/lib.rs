//! pgferry's HTTP admin server.
//!
//! Owns the HTTP surface: `GET /healthz`, `GET /metrics` (Prometheus text),
//! and the `/v1` API for orchestrators (list and move sessions; list, add,
//! drain, activate and remove backends; rebalance; switch a primary over;
//! hand this process over to a new one). It reads
//! proxy state through the registry and must never touch a session's
//! sockets itself: it talks to sessions only through their control
//! channels. How connections are accepted and timed out is `server`'s.

mod backends;
mod connections;
mod handoff;
mod server;
mod switchover;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pgferry_proxy::{Metrics, ProxyContext};
use tokio::net::TcpListener;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub proxy: Arc<ProxyContext>,
}

pub fn router(state: AdminState) -> Router {
    let v1 = Router::new()
        .route("/v1/connections", get(connections::list))
        .route("/v1/connections/{id}", get(connections::get_one))
        .route("/v1/connections/{id}/transfer", post(connections::transfer))
        .route("/v1/backends", get(backends::list).post(backends::add))
        .route(
            "/v1/backends/{name}",
            get(backends::get_one).delete(backends::remove),
        )
        .route("/v1/backends/{name}/drain", post(backends::drain))
        .route("/v1/backends/{name}/activate", post(backends::activate))
        .route("/v1/rebalance", post(backends::rebalance))
        .route(
            "/v1/switchover",
            get(switchover::progress).post(switchover::start),
        )
        .route("/v1/handoff", get(handoff::progress).post(handoff::start))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(no_such_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A verb's refusal, as HTTP: the one mapping from `VerbError` to a status.
pub(crate) fn verb_error(e: &pgferry_proxy::verbs::VerbError) -> Response {
    use pgferry_proxy::verbs::VerbError;
    let status = match e {
        VerbError::NotFound(_) => StatusCode::NOT_FOUND,
        VerbError::Invalid(_) => StatusCode::BAD_REQUEST,
        VerbError::Conflict(_) => StatusCode::CONFLICT,
        VerbError::NoAnswer(_) => StatusCode::GATEWAY_TIMEOUT,
        VerbError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &e.to_string())
}

async fn no_such_route() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// `[proxy] admin_token`: every `/v1` route needs `Authorization: Bearer`.
async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.proxy.config.proxy.admin_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    next.run(req).await
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 9110 11.1), so `bearer` is as good as `Bearer`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Serves the admin API until `shutdown` resolves or this process has
/// handed everything over to a new one (the listener is the new one's
/// then), within `[proxy]`'s `admin_max_connections`,
/// `admin_header_timeout` and `admin_idle_timeout`.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let p = &state.proxy.config.proxy;
    let limits = server::Limits {
        header_timeout: p.admin_header_timeout,
        idle_timeout: p.admin_idle_timeout,
        max_connections: p.admin_max_connections,
    };
    let metrics = state.metrics.clone();
    let proxy = state.proxy.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = proxy.handoff.finished() => {}
        }
    };
    let accepting = state.proxy.handoff.accepting();
    server::serve(
        listener,
        router(state),
        limits,
        metrics,
        accepting,
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }
}
