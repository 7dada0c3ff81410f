//! Liveness, readiness and the Prometheus endpoint.

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;

use super::AppState;
use crate::cache::ModelState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
}

/// Ready once no model is still loading, and until shutdown begins: a yes or no (and the
/// status) for probes. The models — states, bytes, leases, why one failed — only for the
/// admin token (or for anyone where none is set), as `/admin/models` shows them.
async fn ready(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let models = state.serve.cache.status();
    let loading = models.iter().any(|m| m.state == ModelState::Loading);
    let draining = state.is_draining();
    let ready = !loading && !draining;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({"ready": ready, "draining": draining});
    let operator = match &state.admin_token {
        Some(token) => super::guard::has_bearer(&headers, token),
        None => true,
    };
    if operator {
        body["models"] = json!(models);
    }
    (status, Json(body))
}

/// The Prometheus text; with `server.metrics_token` set, only for `Authorization: Bearer`
/// with that token (per-tier usage is not for everyone).
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.metrics_token {
        if !super::guard::has_bearer(&headers, token) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "/metrics needs Authorization: Bearer <server.metrics_token>\n",
            )
                .into_response();
        }
    }
    state
        .serve
        .limits
        .publish_budgets(&state.tenancy, &state.serve.metrics);
    state.serve.cache.publish_driver_memory();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.serve.metrics.render(),
    )
        .into_response()
}
