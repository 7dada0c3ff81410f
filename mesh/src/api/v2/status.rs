//! The gRPC mapping of the serve path's errors: each kind's code, and `retry-after` metadata.

use tonic::{metadata::MetadataMap, Code, Status};

use crate::serve::{ErrorKind, ServeError};

/// The gRPC code of a serve error (a policy denial's by the status its policy chose).
pub fn grpc_code(e: &ServeError) -> Code {
    match e.kind {
        ErrorKind::PolicyDenied => match e.policy_status.unwrap_or(429) {
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            429 => Code::ResourceExhausted,
            400..=499 => Code::InvalidArgument,
            _ => Code::Unavailable,
        },
        ErrorKind::InvalidRequest => Code::InvalidArgument,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::Forbidden => Code::PermissionDenied,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Conflict => Code::Aborted,
        ErrorKind::TooLarge | ErrorKind::RateLimited => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Timeout => Code::DeadlineExceeded,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Internal => Code::Internal,
    }
}

/// A serve error as a gRPC status: its code, and `retry-after` metadata where the client
/// should back off.
impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        let mut md = MetadataMap::new();
        if let Some(secs) = e.retry_after {
            md.insert("retry-after", secs.into());
        }
        Status::with_metadata(grpc_code(&e), e.message, md)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{api::error::http_status, cache::CacheError, policy::Refusal, tenancy::AuthError};

    #[test]
    fn the_code_and_the_http_status_of_each_kind_agree_on_retrying() {
        for k in ErrorKind::ALL {
            let e = ServeError::new(k, "x", "m");
            let (status, code) = (http_status(&e).as_u16(), grpc_code(&e));
            let retryable = matches!(code, Code::ResourceExhausted | Code::Unavailable);
            assert_eq!(
                retryable,
                status == 429 || status == 503 || status == 413,
                "{k:?}"
            );
        }
    }

    #[test]
    fn subsystem_errors_keep_their_codes() {
        let e: ServeError = CacheError::Conflict("taken".into()).into();
        assert_eq!(grpc_code(&e), Code::Aborted);
        let e: ServeError = Refusal {
            status: 402,
            message: "pay".into(),
            retry_after: None,
        }
        .into();
        assert_eq!(
            (http_status(&e).as_u16(), grpc_code(&e)),
            (402, Code::InvalidArgument)
        );
        let e: ServeError = AuthError::Missing.into();
        assert_eq!(grpc_code(&e), Code::Unauthenticated);
    }
}
