//! The one error type of ingest-svc, mapped to `tonic::Status` in one place.

use std::time::Duration;

use smartdb_kit::status;

/// Everything that can go wrong in ingest-svc.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something invalid; `field` names the offending request field.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// Request field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The named thing exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is too large, or too much is going on; retry later or send less.
    #[error("{message}")]
    ResourceExhausted {
        /// What is exhausted.
        message: String,
        /// When retrying may help; `None` when only a smaller request will.
        retry_after: Option<Duration>,
    },
    /// The request cannot be served in the current state (e.g. a knowledge base being deleted).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency is down; retryable.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an I/O failure on our side.
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

    /// True if trying the same work again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_)
                | Error::ResourceExhausted {
                    retry_after: Some(_),
                    ..
                }
        )
    }

    /// A failed call to another smartdb service named `service`, by the shared classification:
    /// outages and overload are transient (jobs wait them out), refusals keep their code.
    pub fn from_downstream(service: &str, status: tonic::Status) -> Self {
        use smartdb_kit::status::{Failure, classify};
        // Failures made by the client stack name the service already.
        let message = if status.message().starts_with(service) {
            status.message().to_owned()
        } else {
            format!("{service}: {}", status.message())
        };
        match classify(&status) {
            Failure::Unavailable | Failure::DeadlineExceeded => Error::Unavailable(message),
            Failure::Overloaded { retry_after } => Error::ResourceExhausted {
                message,
                retry_after: Some(retry_after.max(Duration::from_millis(100))),
            },
            Failure::Rejected => match status.code() {
                tonic::Code::InvalidArgument => Error::InvalidArgument {
                    field: String::new(),
                    message,
                },
                tonic::Code::NotFound => Error::NotFound(message),
                tonic::Code::AlreadyExists => Error::AlreadyExists(message),
                tonic::Code::ResourceExhausted => Error::ResourceExhausted {
                    message,
                    retry_after: None,
                },
                _ => Error::FailedPrecondition(message),
            },
            Failure::Fault => Error::Internal(message),
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        Error::Internal(format!("catalog database: {err}"))
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::Internal(format!("file storage: {err}"))
    }
}

/// Result with ingest-svc's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument { field, message } if field.is_empty() => {
                tonic::Status::invalid_argument(message)
            }
            Error::InvalidArgument { field, message } => status::invalid_argument(&field, message),
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::AlreadyExists(m) => tonic::Status::already_exists(m),
            Error::ResourceExhausted {
                message,
                retry_after,
            } => status::resource_exhausted(message, retry_after),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            // Already retried here: callers should not retry at once (see dependency_unavailable).
            Error::Unavailable(m) => status::dependency_unavailable(m),
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                tonic::Status::internal(m)
            }
        }
    }
}
