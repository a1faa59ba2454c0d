//! The one error type of search-svc, mapped to `tonic::Status` in one place.

use smartdb_kit::status;

/// Everything that can go wrong in search-svc.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something invalid; `field` names the offending request field.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// Request field at fault, e.g. `query`.
        field: std::borrow::Cow<'static, str>,
        /// What is wrong with it.
        message: String,
    },
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A dependency is down or overloaded (and was already retried here): callers should not
    /// retry at once.
    #[error("{0}")]
    Unavailable(String),
    /// The call's time ran out (waiting on a dependency).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug or an I/O failure on our side.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// [`Error::InvalidArgument`] for a field whose name is built at run time (e.g. `filter[k]`).
    pub fn invalid_field(field: String, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl Error {
    /// True for failures of a dependency that a search can answer around (degrading).
    pub fn is_degradable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::DeadlineExceeded(_))
    }

    /// Short label of the failure kind, for metrics.
    pub fn reason_label(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::NotFound(_) => "not_found",
            Error::Unavailable(_) => "unavailable",
            Error::DeadlineExceeded(_) => "deadline_exceeded",
            Error::Internal(_) => "internal",
        }
    }

    /// A failed call to another smartdb service named `service`, by the shared classification;
    /// an INVALID_ARGUMENT from it is blamed on the caller's `field`.
    pub fn from_downstream(service: &str, status: tonic::Status, field: &'static str) -> Self {
        use smartdb_kit::status::{Failure, classify};
        // Failures made by the client stack name the service already.
        let message = if status.message().starts_with(service) {
            status.message().to_owned()
        } else {
            format!("{service}: {}", status.message())
        };
        match classify(&status) {
            Failure::Unavailable | Failure::Overloaded { .. } => Error::Unavailable(message),
            Failure::DeadlineExceeded => Error::DeadlineExceeded(message),
            Failure::Rejected if status.code() == tonic::Code::InvalidArgument => {
                Error::invalid(field, message)
            }
            Failure::Rejected if status.code() == tonic::Code::NotFound => Error::NotFound(message),
            Failure::Rejected | Failure::Fault => Error::Internal(message),
        }
    }
}

/// Result with search-svc's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument { field, message } => status::invalid_argument(&field, message),
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::Unavailable(m) => status::dependency_unavailable(m),
            Error::DeadlineExceeded(m) => tonic::Status::deadline_exceeded(m),
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                tonic::Status::internal(m)
            }
        }
    }
}
