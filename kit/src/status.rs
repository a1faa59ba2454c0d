//! Building `tonic::Status` values the way smartdb's API promises: the offending field named in
//! the message and in `google.rpc.BadRequest` details, retry hints on `RESOURCE_EXHAUSTED`.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `INVALID_ARGUMENT` naming `field`, with a `BadRequest` field violation attached.
pub fn invalid_argument(field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    let details = ErrorDetails::with_bad_request_violation(field, message.clone());
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {message}"),
        details,
    )
}

/// `RESOURCE_EXHAUSTED` with a `RetryInfo` hint telling the caller when to try again.
pub fn resource_exhausted(message: impl Into<String>, retry_after: Option<Duration>) -> Status {
    match retry_after {
        Some(delay) => Status::with_error_details(
            Code::ResourceExhausted,
            message,
            ErrorDetails::with_retry_info(Some(delay)),
        ),
        None => Status::resource_exhausted(message),
    }
}

/// True for codes a caller may retry (the request had no effect or is idempotent).
pub fn is_retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let status = invalid_argument("query", "must not be empty");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "query: must not be empty");
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("bad request details")
            .field_violations;
        assert_eq!(violations[0].field, "query");
    }

    #[test]
    fn resource_exhausted_carries_retry_hint() {
        let status = resource_exhausted("queue full", Some(Duration::from_millis(500)));
        let info = status
            .get_error_details()
            .retry_info()
            .cloned()
            .expect("retry info");
        assert_eq!(info.retry_delay, Some(Duration::from_millis(500)));
    }
}
