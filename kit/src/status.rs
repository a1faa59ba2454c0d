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

/// What a failed call to another service means for the caller: the one classification of
/// downstream status codes that every client (retry, breaker, ingest jobs, search degradation)
/// uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The service is not reachable or not answering (refused, reset, UNAVAILABLE, or no answer
    /// within the time an attempt was given): trying again, maybe on another replica, may work.
    Unavailable,
    /// The service is alive but overloaded and said when to come back.
    Overloaded {
        /// The server's retry hint.
        retry_after: Duration,
    },
    /// The time allowed ran out. Not worth retrying within the same deadline.
    DeadlineExceeded,
    /// The caller's request is wrong or refers to something missing, or the service is in a
    /// state where the call cannot work; the same request will fail again.
    Rejected,
    /// A fault in the called service (INTERNAL, UNKNOWN, DATA_LOSS …); retrying the same
    /// request is not known to help.
    Fault,
}

/// Metadata by which a server tells its clients whether and when to retry (gRFC A6): a
/// negative value means "do not retry".
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// `UNAVAILABLE` because a dependency of the answering service is unavailable. That service
/// already retried its dependency, so the status tells callers not to retry again: retries at
/// every hop would multiply the load on the dependency (3 hops × 3 attempts = 27 calls).
pub fn dependency_unavailable(message: impl Into<String>) -> Status {
    let mut status = Status::unavailable(message);
    status.metadata_mut().insert(
        RETRY_PUSHBACK,
        tonic::metadata::MetadataValue::from_static("-1"),
    );
    status
}

/// The server's retry pushback, if it sent one: `Some(None)` means "do not retry",
/// `Some(Some(d))` "retry after `d`".
pub fn retry_pushback(status: &Status) -> Option<Option<Duration>> {
    let value: i64 = status
        .metadata()
        .get(RETRY_PUSHBACK)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(u64::try_from(value).ok().map(Duration::from_millis))
}

/// Classifies a status returned by (or on the way to) another service.
pub fn classify(status: &Status) -> Failure {
    match status.code() {
        Code::Unavailable => Failure::Unavailable,
        Code::ResourceExhausted => match status.get_error_details().retry_info() {
            Some(info) => Failure::Overloaded {
                retry_after: info.retry_delay.unwrap_or_default(),
            },
            // No hint: a size or quota limit, which retrying does not change.
            None => Failure::Rejected,
        },
        // tonic reports a client-side timeout as CANCELLED ("Timeout expired").
        Code::DeadlineExceeded | Code::Cancelled => Failure::DeadlineExceeded,
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Aborted => Failure::Rejected,
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => Failure::Fault,
    }
}

impl Failure {
    /// True if the same call may succeed later, given time (an outage or overload).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Failure::Unavailable | Failure::Overloaded { .. } | Failure::DeadlineExceeded
        )
    }
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
    fn downstream_statuses_are_classified_once() {
        assert_eq!(
            classify(&Status::unavailable("connection refused")),
            Failure::Unavailable
        );
        assert_eq!(
            classify(&resource_exhausted(
                "queue full",
                Some(Duration::from_millis(300))
            )),
            Failure::Overloaded {
                retry_after: Duration::from_millis(300)
            }
        );
        // Too large a document: no retry hint, retrying changes nothing.
        assert_eq!(
            classify(&resource_exhausted("too large", None)),
            Failure::Rejected
        );
        assert_eq!(
            classify(&Status::cancelled("Timeout expired")),
            Failure::DeadlineExceeded
        );
        assert_eq!(
            classify(&invalid_argument("query", "empty")),
            Failure::Rejected
        );
        assert_eq!(classify(&Status::not_found("kb")), Failure::Rejected);
        assert_eq!(classify(&Status::internal("bug")), Failure::Fault);
        assert!(Failure::Unavailable.is_transient());
        assert!(!Failure::Rejected.is_transient());
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
