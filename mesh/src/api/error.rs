//! OpenAI-shaped errors (for `/v1` and `/admin`): the serve path's errors mapped once to an
//! HTTP status and OpenAI's error JSON.

use axum::{
    extract::{FromRequest, Request},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use bytes::Bytes;
use flatmesh_runtime::RuntimeError;
use serde::de::DeserializeOwned;

use crate::{
    cache::CacheError,
    serve::{ErrorKind, ServeError},
};

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
    /// Extra headers (`x-ratelimit-*`).
    pub headers: Option<Box<Vec<(&'static str, String)>>>,
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
            headers: None,
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
            headers: None,
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
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
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
            headers: (!e.headers.is_empty()).then(|| Box::new(e.headers)),
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
        for (name, value) in self.headers.iter().flat_map(|h| h.iter()) {
            if let Ok(v) = HeaderValue::from_str(value) {
                resp.headers_mut().insert(*name, v);
            }
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
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
