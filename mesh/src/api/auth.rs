//! Authentication at the edge: `Authorization: Bearer <key>` → tenant → tier, for HTTP
//! (middleware) and gRPC (interceptor); the admin token marks an operator; the client's
//! deadline is read here too. Each front end answers failures through its own mapping of
//! `ServeError`.

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{deadline::Deadline, error::ApiError, v2::rest::V2Error, AppState};
use crate::{
    serve::ServeError,
    tenancy::{AuthError, Caller, Tenancy},
};

/// A caller that presented the admin token (`server.admin_token`).
#[derive(Debug, Clone, Copy)]
pub struct Operator;

/// The bearer token of an `Authorization` value.
fn bearer(value: Option<&str>) -> Option<&str> {
    value.map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim())
}

/// Whether an `Authorization` value carries the admin token (compared in constant time).
pub fn is_operator(admin_token: Option<&str>, authorization: Option<&str>) -> bool {
    match (admin_token, bearer(authorization)) {
        (Some(token), Some(given)) => super::guard::same_secret(given, token),
        _ => false,
    }
}

/// Repository load and unload change what every tenant is served: operator actions once
/// tenancy is on. Single-tenant (no tiers), anyone may; else only the admin token.
pub fn repository_change(
    tenancy: &Tenancy,
    operator: bool,
    caller: Option<&Caller>,
) -> Result<(), ServeError> {
    if tenancy.is_open() || operator {
        return Ok(());
    }
    Err(match caller {
        None => AuthError::Missing.into(),
        Some(_) => ServeError::forbidden(
            "operator_only",
            "loading and unloading models are operator actions: send the admin token \
             (server.admin_token)",
        ),
    })
}

fn authorization(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// The client's deadline (`x-request-timeout`); a value that is not text is no number either.
fn deadline(req: &Request) -> Result<Deadline, ServeError> {
    let value = req.headers().get(super::deadline::HTTP);
    Deadline::http(value.map(|v| v.to_str().unwrap_or("?")))
}

/// For `/v1`: OpenAI-shaped 401s; the serve path checks the model (it is in the body).
pub async fn openai(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let caller = match state.tenancy.authenticate(authorization(&req)) {
        Ok(c) => c,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match deadline(&req) {
        Ok(d) => {
            req.extensions_mut().insert(caller);
            req.extensions_mut().insert(d);
            next.run(req).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// For `/v2`: the model in the path is checked here against the caller's tier; repository
/// load/unload need an operator once tenancy is on. Server health and metadata stay open
/// (liveness and readiness probes carry no key).
pub async fn v2(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if path == "/v2" || path.starts_with("/v2/health/") {
        return next.run(req).await;
    }
    let repository_change = path.starts_with("/v2/repository/models/")
        && (path.ends_with("/load") || path.ends_with("/unload"));
    let value = authorization(&req);
    if repository_change && is_operator(state.admin_token.as_deref(), value) {
        return next.run(req).await;
    }
    let caller = match state.tenancy.authenticate(value) {
        Ok(c) => c,
        Err(e) => return V2Error::from(e).into_response(),
    };
    if repository_change {
        if let Err(e) = repository_change_allowed(&state, &caller) {
            return V2Error(e).into_response();
        }
    }
    let model = path
        .strip_prefix("/v2/models/")
        .or_else(|| path.strip_prefix("/v2/repository/models/"))
        .and_then(|rest| rest.split('/').next());
    if let Some(m) = model {
        if let Err(e) = check(&state, &caller, m) {
            return V2Error::from(e).into_response();
        }
    }
    match deadline(&req) {
        Ok(d) => req.extensions_mut().insert(d),
        Err(e) => return V2Error(e).into_response(),
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

fn repository_change_allowed(state: &AppState, caller: &Caller) -> Result<(), ServeError> {
    repository_change(&state.tenancy, false, Some(caller))
}

/// Check a model against the caller's tier (by the model a vmodel resolves to).
pub fn check(state: &AppState, caller: &Caller, model: &str) -> Result<(), AuthError> {
    let resolved = state
        .serve
        .cache
        .resolve(model)
        .unwrap_or_else(|| model.to_string());
    Tenancy::check_model(caller, &resolved)
}

/// The gRPC interceptor: UNAUTHENTICATED for a wrong key; the caller (or the operator mark)
/// and the call's deadline (`grpc-timeout`) ride in the request's extensions. A call without
/// a key passes without a caller, so server health and metadata stay open; every other call
/// requires one (`grpc::caller_of`).
pub fn grpc(
    tenancy: Tenancy,
    admin_token: Option<String>,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut req: tonic::Request<()>| {
        let timeout = req.metadata().get(super::deadline::GRPC);
        let deadline = Deadline::grpc(timeout.map(|v| v.to_str().unwrap_or("?")))?;
        req.extensions_mut().insert(deadline);
        let value = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if is_operator(admin_token.as_deref(), value) {
            req.extensions_mut().insert(Operator);
            return Ok(req);
        }
        match tenancy.authenticate(value) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Ok(req)
            }
            Err(AuthError::Missing) => Ok(req),
            Err(e) => Err(ServeError::from(e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::ErrorKind;

    #[test]
    fn only_the_exact_admin_token_is_an_operator() {
        assert!(is_operator(Some("s3cret"), Some("Bearer s3cret")));
        assert!(!is_operator(Some("s3cret"), Some("Bearer s3cre")));
        assert!(!is_operator(Some("s3cret"), Some("Bearer s3cret!")));
        assert!(!is_operator(Some("s3cret"), None));
        assert!(!is_operator(None, Some("Bearer anything")));
    }

    #[test]
    fn repository_changes_are_for_operators_once_tenancy_is_on() {
        let open = Tenancy::new(&Default::default(), None).unwrap();
        assert!(repository_change(&open, false, None).is_ok());
        let config: crate::tenancy::TenancyConfig = toml::from_str(
            "[[tiers]]\nname = 'basic'\nmodels = ['*']\n[[tenants]]\nid = 'a'\ntier = 'basic'\n",
        )
        .unwrap();
        let on = Tenancy::new(&config, None).unwrap();
        assert!(repository_change(&on, true, None).is_ok());
        let e = repository_change(&on, false, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthenticated);
        let caller = on.tiers().into_iter().next().map(|tier| Caller {
            tenant: "a".into(),
            tier,
            authorization: None,
        });
        let e = repository_change(&on, false, caller.as_ref()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Forbidden);
    }
}
