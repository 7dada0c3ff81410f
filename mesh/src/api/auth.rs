//! Authentication at the edge: `Authorization: Bearer <key>` → tenant → tier, for HTTP
//! (middleware) and gRPC (interceptor). Each front end answers failures in its own shape.

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use super::{error::ApiError, AppState};
use crate::tenancy::{AuthError, Caller, Tenancy};

impl AuthError {
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Missing | AuthError::Invalid => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden { .. } => StatusCode::FORBIDDEN,
            AuthError::Conflict(_) => StatusCode::CONFLICT,
            AuthError::NotFound(_) => StatusCode::NOT_FOUND,
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (kind, code) = match e {
            AuthError::Missing | AuthError::Invalid => ("authentication_error", "invalid_api_key"),
            AuthError::Forbidden { .. } => ("permission_error", "model_not_allowed"),
            AuthError::Conflict(_) => ("invalid_request_error", "conflict"),
            AuthError::NotFound(_) => ("not_found_error", "not_found"),
        };
        ApiError::new(e.status(), kind, code, e.to_string())
    }
}

fn caller_of(state: &AppState, req: &Request) -> Result<Caller, AuthError> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    state.tenancy.authenticate(value)
}

/// For `/v1`: OpenAI-shaped 401s; the handlers check the model (it is in the body).
pub async fn openai(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    match caller_of(&state, &req) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// For `/v2`: `{"error": ...}` 401/403; the model in the path is checked here. Server health
/// and metadata stay open (liveness and readiness probes carry no key).
pub async fn v2(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/v2" || path.starts_with("/v2/health/") {
        return next.run(req).await;
    }
    let caller = match caller_of(&state, &req) {
        Ok(c) => c,
        Err(e) => return (e.status(), Json(json!({"error": e.to_string()}))).into_response(),
    };
    let path = req.uri().path().to_string();
    let model = path
        .strip_prefix("/v2/models/")
        .or_else(|| path.strip_prefix("/v2/repository/models/"))
        .and_then(|rest| rest.split('/').next());
    if let Some(m) = model {
        let resolved = state.cache.resolve(m).unwrap_or_else(|| m.to_string());
        if let Err(e) = Tenancy::check_model(&caller, &resolved) {
            return (e.status(), Json(json!({"error": e.to_string()}))).into_response();
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Check a model against the caller's tier (by the model a vmodel resolves to).
pub fn check(state: &AppState, caller: &Caller, model: &str) -> Result<(), AuthError> {
    let resolved = state
        .cache
        .resolve(model)
        .unwrap_or_else(|| model.to_string());
    Tenancy::check_model(caller, &resolved)
}

/// The gRPC interceptor: UNAUTHENTICATED for a wrong key; the caller rides in the request's
/// extensions. A call without a key passes without a caller, so server health and metadata
/// stay open; every call about a model requires the caller.
pub fn grpc(
    tenancy: Tenancy,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut req: tonic::Request<()>| {
        let value = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match tenancy.authenticate(value) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Ok(req)
            }
            Err(AuthError::Missing) => Ok(req),
            Err(e) => Err(tonic::Status::unauthenticated(e.to_string())),
        }
    }
}
