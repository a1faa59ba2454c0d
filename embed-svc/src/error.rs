//! The one error type of embed-svc, mapped to `tonic::Status` in one place.

use std::time::Duration;

use smartdb_kit::status;

/// Everything that can go wrong in embed-svc.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something invalid; `field` names the offending request field.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// Request field at fault, e.g. `texts[2]`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Too much work queued; the caller should back off for `retry_after`.
    #[error("{message}")]
    ResourceExhausted {
        /// What is exhausted.
        message: String,
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// The model is not loaded yet or a provider is down; retryable.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an inference failure on our side.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Result with embed-svc's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument { field, message } => status::invalid_argument(&field, message),
            Error::ResourceExhausted {
                message,
                retry_after,
            } => status::resource_exhausted(message, Some(retry_after)),
            Error::Unavailable(m) => tonic::Status::unavailable(m),
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                tonic::Status::internal(m)
            }
        }
    }
}
