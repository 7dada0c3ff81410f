//! HTTP errors: the serve path's error kinds mapped once to HTTP statuses and back-off headers,
//! and OpenAI's error JSON (for `/v1` and `/admin`).

use axum::{
    extract::{FromRequest, Request},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use bytes::Bytes;
use flatmesh_runtime::RuntimeError;
use serde::de::DeserializeOwned;

use crate::{
    cache::CacheError,
    serve::{ErrorKind, Outcome, ServeError},
    tenancy::limits::Quotas,
};

/// The HTTP status of a serve error, whatever the front door: the status the request metrics
/// count it under (`serve::Outcome::status`, the one table of kinds to numbers), so the
/// answer and the metrics cannot disagree. A policy denial answers with the status its policy
/// chose; one that is not an HTTP status answers 429.
pub fn http_status(e: &ServeError) -> StatusCode {
    StatusCode::from_u16(Outcome::failed(e).status()).unwrap_or(StatusCode::TOO_MANY_REQUESTS)
}

/// Tell a client to back off: OpenAI's `x-ratelimit-*` headers for the windows its tier sets
/// (`reset` in seconds, `"12s"`), and `Retry-After`.
pub fn back_off(headers: &mut HeaderMap, quotas: Option<&Quotas>, retry_after: Option<u64>) {
    let windows = quotas
        .into_iter()
        .flat_map(|q| [("requests", q.requests), ("tokens", q.tokens)]);
    for (kind, quota) in windows {
        let Some(q) = quota else { continue };
        let values = [
            ("limit", q.limit.to_string()),
            ("remaining", q.remaining.to_string()),
            ("reset", format!("{}s", q.reset)),
        ];
        for (what, value) in values {
            if let (Ok(name), Ok(value)) = (
                header::HeaderName::try_from(format!("x-ratelimit-{what}-{kind}")),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
    }
    if let Some(secs) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
}

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`, ...
    pub kind: &'static str,
    /// A stable code (also a metric label).
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub retry_after: Option<u64>,
    /// Where the tier's windows stood (rate-limit refusals): the `x-ratelimit-*` headers.
    pub quotas: Option<Box<Quotas>>,
}

impl ApiError {
    pub fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        let message = message.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "invalid_value",
            message: if param.is_empty() {
                message
            } else {
                format!("{param}: {message}")
            },
            param: (!param.is_empty()).then_some(param),
            retry_after: None,
            quotas: None,
        }
    }

    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: String,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            message,
            param: None,
            retry_after: None,
            quotas: None,
        }
    }

    pub fn not_found(message: String) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "model_not_found",
            message,
        )
    }

    pub fn unavailable(message: String, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "unavailable",
                message,
            )
        }
    }

    /// A request body over `server.max_body_bytes` (or a `Content-Length` that says so).
    pub fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            "request body is larger than the server accepts (server.max_body_bytes)".into(),
        )
    }

    pub fn internal(message: String) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }
}

/// The OpenAI mapping of the serve path's errors: the one place a `ServeError` becomes an
/// OpenAI status, `type` and `code`.
impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        let status = http_status(&e);
        let kind = match e.kind {
            ErrorKind::InvalidRequest | ErrorKind::Conflict | ErrorKind::TooLarge => {
                "invalid_request_error"
            }
            ErrorKind::Unauthenticated => "authentication_error",
            ErrorKind::Forbidden => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::PolicyDenied if status == StatusCode::TOO_MANY_REQUESTS => {
                "rate_limit_error"
            }
            ErrorKind::PolicyDenied => "invalid_request_error",
            ErrorKind::Unavailable
            | ErrorKind::Timeout
            | ErrorKind::Cancelled
            | ErrorKind::Internal => "server_error",
        };
        ApiError {
            status,
            kind,
            code: e.code,
            message: e.message,
            param: e.param,
            retry_after: e.retry_after,
            quotas: e.quotas,
        }
    }
}

/// Subsystem errors reach OpenAI clients through the serve path's mapping.
macro_rules! through_serve_error {
    ($($t:ty),*) => {$(
        impl From<$t> for ApiError {
            fn from(e: $t) -> Self {
                ServeError::from(e).into()
            }
        }
    )*};
}

through_serve_error!(
    CacheError,
    RuntimeError,
    crate::tenancy::AuthError,
    crate::tenancy::limits::LimitError,
    crate::policy::Refusal,
    crate::scheduler::Rejected
);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        back_off(resp.headers_mut(), self.quotas.as_deref(), self.retry_after);
        resp
    }
}

/// A JSON body whose errors name the field at fault (`temperature: invalid type ...`),
/// and whose size limit answers 413 in the same error shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large()
            } else {
                ApiError::bad_request("", e.body_text())
            }
        })?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request("", format!("request body is not valid JSON: {e}"))
        })?;
        parse(&value).map(ApiJson)
    }
}

/// Deserialize a part of a request body; errors name the field at fault.
pub fn parse<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::bad_request("", inner.to_string())
        } else {
            ApiError::bad_request(path, inner.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{serve::Outcome, tenancy::limits::Quota};

    #[test]
    fn the_http_status_of_each_kind_is_the_one_the_metrics_count() {
        for kind in ErrorKind::ALL {
            let e = ServeError::new(kind, "x", "m");
            assert_eq!(
                http_status(&e).as_u16(),
                Outcome::failed(&e).status(),
                "{kind:?}"
            );
        }
        let mut e = ServeError::new(ErrorKind::PolicyDenied, "policy_denied", "pay");
        e.policy_status = Some(402);
        assert_eq!(http_status(&e).as_u16(), 402);
        assert_eq!(Outcome::failed(&e).status(), 402);
        assert_eq!(Outcome::ClientLeft.status(), 499);
        assert_eq!(Outcome::Done.status(), 200);
    }

    #[test]
    fn a_refusal_names_its_windows_in_openai_headers() {
        let quotas = Quotas {
            requests: Some(Quota {
                limit: 5,
                remaining: 0,
                reset: 12,
            }),
            tokens: None,
        };
        let mut h = HeaderMap::new();
        back_off(&mut h, Some(&quotas), Some(12));
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
                "retry-after"
            ]
        );
        assert_eq!(h["x-ratelimit-reset-requests"], "12s");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["retry-after"], "12");
    }
}
