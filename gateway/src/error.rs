//! The one error type of the gateway's own work (the edge and its store), mapped to
//! `tonic::Status` in one place. Calls forwarded downstream keep the owner's status.

use std::time::Duration;

use smartdb_kit::status;
use tonic::Status;

/// Everything the gateway itself can refuse or fail with.
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
    /// No valid API key.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid key without the right.
    #[error("{0}")]
    PermissionDenied(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The named thing exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// Over a rate limit, or blocked for a while.
    #[error("{message}")]
    Exhausted {
        /// Which limit.
        message: String,
        /// When trying again may succeed.
        retry_after: Duration,
    },
    /// The gateway's store failed.
    #[error("gateway store: {0}")]
    Store(String),
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

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        match error {
            Error::InvalidArgument { field, message } => status::invalid_argument(&field, message),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::Exhausted {
                message,
                retry_after,
            } => {
                let mut s = status::resource_exhausted(message, Some(retry_after));
                // The same hint as gRPC retry pushback, for clients that read metadata only.
                if let Ok(v) = retry_after.as_millis().max(1).to_string().parse() {
                    s.metadata_mut().insert(status::RETRY_PUSHBACK, v);
                }
                s
            }
            Error::Store(m) => {
                tracing::error!(error = %m, "gateway store failed");
                Status::unavailable(format!("gateway store: {m}"))
            }
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
    }
}

/// Result of the gateway's own work.
pub type Result<T, E = Error> = std::result::Result<T, E>;
