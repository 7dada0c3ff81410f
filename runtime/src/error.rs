//! Errors the runtime reports to its caller.

use std::path::PathBuf;

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("model file not found: {0}")]
    NotFound(PathBuf),
    #[error("{path}: not a valid {format} model: {reason}")]
    BadFormat {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("unsupported model architecture {0:?}")]
    UnsupportedArchitecture(String),
    #[error(
        "this model's maximum context length is {context} tokens, but the request needs \
         {prompt_tokens} prompt tokens{}",
        if *.max_tokens > 0 { format!(" plus {} completion tokens", .max_tokens) } else { String::new() }
    )]
    ContextOverflow {
        prompt_tokens: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("this model does not support {0}")]
    Unsupported(&'static str),
    #[error("inference failed: {0}")]
    Inference(String),
}

impl RuntimeError {
    /// A stable, low-cardinality name for this error (metric label, API error code).
    pub fn kind(&self) -> &'static str {
        match self {
            RuntimeError::NotFound(_) => "model_file_not_found",
            RuntimeError::BadFormat { .. } => "bad_model_format",
            RuntimeError::UnsupportedArchitecture(_) => "unsupported_architecture",
            RuntimeError::ContextOverflow { .. } => "context_length_exceeded",
            RuntimeError::InvalidRequest(_) => "invalid_request",
            RuntimeError::Unsupported(_) => "unsupported_operation",
            RuntimeError::Inference(_) => "inference_error",
        }
    }

    /// Whether the caller (rather than the model or the server) is at fault.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            RuntimeError::ContextOverflow { .. }
                | RuntimeError::InvalidRequest(_)
                | RuntimeError::Unsupported(_)
        )
    }
}

impl From<candle_core::Error> for RuntimeError {
    fn from(e: candle_core::Error) -> Self {
        RuntimeError::Inference(message(e))
    }
}

/// What a dependency's error says, reduced to its message: no backtrace (it would name the
/// agent's source paths in a response, and printing one costs a symbolization of the whole
/// binary) and one line.
pub fn message(e: candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => message(*inner),
        E::Context { inner, context } => format!("{context}: {}", message(*inner)),
        E::WithPath { inner, .. } => message(*inner),
        e => first_line(&e.to_string()),
    }
}

/// The first line of a message from elsewhere (the rest may be a backtrace).
pub fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}
