//! Per-attempt timeout: each attempt gets the caller's remaining time (the request's
//! `grpc-timeout`) but at most the attempt timeout, so a stalled endpoint costs one attempt and
//! a retry can still go elsewhere. tonic sends `grpc-timeout` but does not enforce it on the
//! client side for every stack, so it is enforced here, and a stalled server can never hang a
//! caller.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;

use super::{BoxError, HttpRequest, HttpResponse, request_timeout};
use crate::admission::grpc_timeout_value;

/// Tower layer bounding each attempt.
#[derive(Clone)]
pub struct AttemptTimeoutLayer {
    max: Duration,
    what: Arc<str>,
}

impl AttemptTimeoutLayer {
    /// Attempts take at most `max` (less if the caller has less time); `what` names the endpoint
    /// in errors.
    pub fn new(max: Duration, what: impl Into<Arc<str>>) -> Self {
        Self {
            max,
            what: what.into(),
        }
    }
}

impl<S> tower::Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AttemptTimeout {
            inner,
            max: self.max,
            what: self.what.clone(),
        }
    }
}

/// Service produced by [`AttemptTimeoutLayer`].
#[derive(Clone)]
pub struct AttemptTimeout<S> {
    inner: S,
    max: Duration,
    what: Arc<str>,
}

impl<S> tower::Service<HttpRequest> for AttemptTimeout<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: HttpRequest) -> Self::Future {
        let callers = request_timeout(&request);
        let (limit, attempt_bound) = match callers {
            Some(t) if t <= self.max => (t, false),
            _ => (self.max, true),
        };
        if attempt_bound {
            // Tell the server too, so it stops working when this attempt is given up.
            if let Ok(value) = HeaderValue::from_str(&grpc_timeout_value(limit)) {
                request.headers_mut().insert("grpc-timeout", value);
            }
        }
        let what = self.what.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(limit, future).await {
                Ok(result) => result.map_err(Into::into),
                // The attempt's own bound ran out: the endpoint is not answering, and a retry
                // (maybe elsewhere) may; the caller's deadline ran out: nothing more to do.
                Err(_) if attempt_bound => Err(Box::new(tonic::Status::unavailable(format!(
                    "{what}: no answer within the attempt timeout of {limit:?}"
                ))) as BoxError),
                Err(_) => Err(Box::new(tonic::Status::deadline_exceeded(format!(
                    "{what}: no answer within the deadline ({limit:?} left)"
                ))) as BoxError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    fn stalled() -> impl tower::Service<
        HttpRequest,
        Response = HttpResponse,
        Error = BoxError,
        Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>,
    > + Clone {
        tower::service_fn(|request: HttpRequest| {
            let seen = request.headers().get("grpc-timeout").cloned();
            Box::pin(async move {
                if seen.as_ref().is_some_and(|v| v == "5m") {
                    // Answers quickly when given little time, to show the header reached it.
                    return Ok(http::Response::new(tonic::body::Body::empty()));
                }
                std::future::pending::<()>().await;
                unreachable!()
            }) as Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>
        })
    }

    fn request(timeout: Option<&str>) -> HttpRequest {
        let mut request = http::Request::new(tonic::body::Body::empty());
        if let Some(t) = timeout {
            request
                .headers_mut()
                .insert("grpc-timeout", t.parse().unwrap());
        }
        request
    }

    fn code(err: BoxError) -> (tonic::Code, String) {
        let status = err.downcast::<tonic::Status>().unwrap();
        (status.code(), status.message().to_owned())
    }

    #[tokio::test]
    async fn the_callers_deadline_or_the_attempt_bound_ends_a_stalled_call() {
        let layer = AttemptTimeoutLayer::new(Duration::from_millis(150), "svc at x");
        let started = std::time::Instant::now();
        let err = layer
            .layer(stalled())
            .oneshot(request(Some("50m")))
            .await
            .unwrap_err();
        assert_eq!(code(err).0, tonic::Code::DeadlineExceeded);
        assert!(started.elapsed() < Duration::from_millis(140));

        let started = std::time::Instant::now();
        let (code_, message) = code(
            layer
                .layer(stalled())
                .oneshot(request(Some("10S")))
                .await
                .unwrap_err(),
        );
        assert_eq!(code_, tonic::Code::Unavailable, "{message}");
        assert!(message.contains("svc at x: no answer within the attempt timeout"));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(2),
            "{took:?}"
        );

        // No deadline at all: the attempt bound still applies.
        let err = layer
            .layer(stalled())
            .oneshot(request(None))
            .await
            .unwrap_err();
        assert_eq!(code(err).0, tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn a_shorter_attempt_bound_is_passed_on_to_the_server() {
        let layer = AttemptTimeoutLayer::new(Duration::from_millis(5), "svc");
        layer
            .layer(stalled())
            .oneshot(request(Some("1S")))
            .await
            .expect("the server saw the 5 ms attempt deadline");
    }
}
