//! Why the cache cannot do what was asked.

use std::time::Duration;

/// Why the cache cannot hand out a copy (or change a model).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("model {0:?} does not exist")]
    NotFound(String),
    #[error("vmodel {0:?} does not exist")]
    VmodelNotFound(String),
    #[error("model {id:?} failed to load: {reason}")]
    Failed {
        id: String,
        reason: String,
        retry_after: Duration,
    },
    #[error("no room for model {id:?}: every device is full of copies in use (waited {waited:?})")]
    NoRoom { id: String, waited: Duration },
    #[error("model {id:?} needs {need} bytes but the largest device holds {largest}")]
    TooLarge { id: String, need: u64, largest: u64 },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The shared store (etcd, in a mesh) cannot take the change now.
    #[error("{0}")]
    Unavailable(String),
}

impl CacheError {
    /// Seconds a client should wait before trying again, where that makes sense.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            CacheError::Failed { retry_after, .. } => Some(retry_after.as_secs().max(1)),
            CacheError::NoRoom { .. } => Some(5),
            CacheError::Unavailable(_) => Some(1),
            _ => None,
        }
    }
}
