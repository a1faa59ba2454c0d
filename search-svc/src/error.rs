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
    /// A dependency is down or overloaded; the call may be retried.
    #[error("{0}")]
    Unavailable(String),
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

/// Result with search-svc's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument { field, message } => status::invalid_argument(&field, message),
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::Unavailable(m) => tonic::Status::unavailable(m),
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                tonic::Status::internal(m)
            }
        }
    }
}
