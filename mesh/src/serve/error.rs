//! The serve path's one error type: a stable `kind()` and data that each protocol maps once
//! at its edge (`api::error` for HTTP, `api::v2::status` for gRPC).

use flatmesh_runtime::RuntimeError;

use crate::{
    cache::CacheError,
    cluster::placement::Confined,
    policy::Refusal,
    scheduler::Rejected,
    tenancy::{
        limits::{LimitError, Quotas},
        AuthError,
    },
};

/// What went wrong, as every protocol tells it (also the `kind` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or asks for something the model cannot do.
    InvalidRequest,
    /// No key, or a key nobody issued.
    Unauthenticated,
    /// The caller may not do this (its tier may not use the model; operators only).
    Forbidden,
    NotFound,
    /// The request clashes with the current state (a name taken, a model in use).
    Conflict,
    /// The request is larger than the server accepts.
    TooLarge,
    /// Over a tier's limit, queue or budget: retry after a while.
    RateLimited,
    /// A pricing policy refused the request (its status is the policy's own).
    PolicyDenied,
    /// The model cannot serve now (loading failed, no room, a policy slot failed closed).
    Unavailable,
    /// The request ran past its time bound.
    Timeout,
    /// The client went away.
    Cancelled,
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::InvalidRequest,
        ErrorKind::Unauthenticated,
        ErrorKind::Forbidden,
        ErrorKind::NotFound,
        ErrorKind::Conflict,
        ErrorKind::TooLarge,
        ErrorKind::RateLimited,
        ErrorKind::PolicyDenied,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::Cancelled,
        ErrorKind::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::PolicyDenied => "policy_denied",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An error of the serve path, with what a client needs to act on it.
#[derive(Debug, Clone)]
pub struct ServeError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A finer, stable code (OpenAI's `code`), e.g. `model_not_found`, `context_overflow`.
    pub code: &'static str,
    /// Seconds to wait before retrying, where retrying makes sense.
    pub retry_after: Option<u64>,
    /// Where the tier's per-minute windows stood (rate-limit refusals only).
    pub quotas: Option<Box<Quotas>>,
    /// The status a pricing policy chose for its denial (policy denials only): the policy
    /// contract speaks HTTP statuses, and the edges pass it on.
    pub policy_status: Option<u16>,
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServeError {}

impl ServeError {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        ServeError {
            kind,
            message: message.into(),
            param: None,
            code,
            retry_after: None,
            quotas: None,
            policy_status: None,
        }
    }

    /// A bad request; `param` names the field at fault (empty when none does).
    pub fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        let (param, message) = (param.into(), message.into());
        let mut e = ServeError::new(
            ErrorKind::InvalidRequest,
            "invalid_value",
            if param.is_empty() {
                message
            } else {
                format!("{param}: {message}")
            },
        );
        e.param = (!param.is_empty()).then_some(param);
        e
    }

    /// A bad request without a single field at fault.
    pub fn invalid(message: impl Into<String>) -> Self {
        ServeError::bad_request("", message)
    }

    /// The client's deadline passed.
    pub fn past_deadline() -> Self {
        ServeError::new(
            ErrorKind::Timeout,
            "deadline_exceeded",
            "the client's deadline (x-request-timeout, grpc-timeout) passed",
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ServeError::new(ErrorKind::NotFound, "model_not_found", message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        ServeError::new(ErrorKind::Unavailable, "unavailable", message).retry(retry_after)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ServeError::new(ErrorKind::Internal, "internal_error", message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        ServeError::new(ErrorKind::Forbidden, code, message)
    }

    pub fn retry(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether the client's request was at fault (a 4xx that is not about limits).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::InvalidRequest | ErrorKind::NotFound | ErrorKind::TooLarge
        )
    }
}

impl From<Confined> for ServeError {
    /// 503: the tier's pools have no node that can take it now (never run elsewhere).
    fn from(e: Confined) -> Self {
        ServeError::new(ErrorKind::Unavailable, "no_node_in_pools", e.to_string()).retry(5)
    }
}

impl From<CacheError> for ServeError {
    fn from(e: CacheError) -> Self {
        let message = e.to_string();
        match &e {
            CacheError::NotFound(_) => {
                let mut err = ServeError::not_found(message);
                err.param = Some("model".into());
                err
            }
            CacheError::VmodelNotFound(_) => ServeError::not_found(message),
            CacheError::Failed { .. } | CacheError::NoRoom { .. } | CacheError::Unavailable(_) => {
                ServeError::unavailable(message, e.retry_after().unwrap_or(1))
            }
            CacheError::TooLarge { .. } | CacheError::Invalid(_) => ServeError::invalid(message),
            CacheError::Conflict(_) => ServeError::new(ErrorKind::Conflict, "conflict", message),
        }
    }
}

impl From<LimitError> for ServeError {
    fn from(e: LimitError) -> Self {
        let mut err = ServeError::new(ErrorKind::RateLimited, "rate_limit_exceeded", e.message)
            .retry(e.retry_after);
        err.quotas = Some(Box::new(e.quotas));
        err
    }
}

impl From<Refusal> for ServeError {
    fn from(r: Refusal) -> Self {
        let mut e = match r.status {
            400..=499 => {
                let mut e = ServeError::new(ErrorKind::PolicyDenied, "policy_denied", r.message);
                e.policy_status = Some(r.status);
                e
            }
            _ => ServeError::new(ErrorKind::Unavailable, "policy_failed", r.message),
        };
        e.retry_after = r.retry_after;
        e
    }
}

impl From<Rejected> for ServeError {
    fn from(e: Rejected) -> Self {
        ServeError::new(ErrorKind::RateLimited, "queue_full", e.to_string()).retry(1)
    }
}

impl From<AuthError> for ServeError {
    fn from(e: AuthError) -> Self {
        let (kind, code) = match e {
            AuthError::Missing | AuthError::Invalid => {
                (ErrorKind::Unauthenticated, "invalid_api_key")
            }
            AuthError::Forbidden { .. } => (ErrorKind::Forbidden, "model_not_allowed"),
            AuthError::Conflict(_) => (ErrorKind::Conflict, "conflict"),
            AuthError::NotFound(_) => (ErrorKind::NotFound, "not_found"),
        };
        ServeError::new(kind, code, e.to_string())
    }
}

impl From<RuntimeError> for ServeError {
    fn from(e: RuntimeError) -> Self {
        let code = e.kind();
        if e.is_client_error() {
            let mut err = ServeError::new(ErrorKind::InvalidRequest, code, e.to_string());
            if let RuntimeError::ContextOverflow { .. } = e {
                err.param = Some("messages".into());
            }
            err
        } else {
            ServeError::new(ErrorKind::Internal, code, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_distinct_name() {
        let names: std::collections::BTreeSet<_> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }

    #[test]
    fn subsystem_errors_keep_their_meaning() {
        let e: ServeError = CacheError::NotFound("m".into()).into();
        assert_eq!(e.kind, ErrorKind::NotFound);
        let e: ServeError = CacheError::Conflict("taken".into()).into();
        assert_eq!(e.kind, ErrorKind::Conflict);
        let e: ServeError = Refusal {
            status: 402,
            message: "pay".into(),
            retry_after: None,
        }
        .into();
        assert_eq!(
            (e.kind, e.policy_status),
            (ErrorKind::PolicyDenied, Some(402))
        );
        let e: ServeError = Refusal {
            status: 503,
            message: "closed".into(),
            retry_after: Some(2),
        }
        .into();
        assert_eq!(
            (e.kind, e.retry_after, e.policy_status),
            (ErrorKind::Unavailable, Some(2), None)
        );
        let quotas = Quotas {
            requests: Some(crate::tenancy::limits::Quota {
                limit: 5,
                remaining: 0,
                reset: 7,
            }),
            tokens: None,
        };
        let e: ServeError = LimitError {
            message: "slow down".into(),
            retry_after: 7,
            quotas,
        }
        .into();
        assert_eq!(
            (e.kind, e.retry_after, e.quotas.as_deref()),
            (ErrorKind::RateLimited, Some(7), Some(&quotas))
        );
        let e: ServeError = AuthError::Missing.into();
        assert_eq!(e.kind, ErrorKind::Unauthenticated);
    }
}
