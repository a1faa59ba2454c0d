//! Admission of incoming calls, the first thing a server does with one: it gets a deadline (the
//! caller's, else the method's default, never more than the maximum; the handler sees it as
//! `grpc-timeout` and passes it on), and when the server already runs as many calls as it may,
//! the call is shed at once with RESOURCE_EXHAUSTED and a retry hint instead of queueing.
//!
//! Health checks and reflection are exempt: probes must answer under load, and `Health/Watch`
//! streams live as long as their client.
//!
//! tonic's own `Server::timeout` applies one timeout to every call and cannot tell "no deadline"
//! from "a long one", and tower's `LoadShed` surfaces as UNKNOWN: hence this small layer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::Semaphore;

use crate::context::parse_grpc_timeout;
use crate::limits::Limits;

/// How long a shed caller is told to wait before trying again.
const SHED_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Tower layer applying [`Limits`] deadlines and the in-flight bound to every call.
#[derive(Clone)]
pub struct AdmissionLayer {
    limits: Arc<Limits>,
    in_flight: Arc<Semaphore>,
}

impl AdmissionLayer {
    /// A layer enforcing `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            limits: Arc::new(limits.clone()),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
        }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            layer: self.clone(),
        }
    }
}

/// Service produced by [`AdmissionLayer`].
#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    layer: AdmissionLayer,
}

fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// Formats a duration as a `grpc-timeout` value (at most 8 digits, as the spec requires).
pub fn grpc_timeout_value(timeout: Duration) -> String {
    let millis = timeout.as_millis();
    if millis < 100_000_000 {
        format!("{}m", millis.max(1))
    } else {
        format!("{}S", timeout.as_secs().min(99_999_999))
    }
}

impl<S, B> tower::Service<http::Request<B>> for Admission<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if exempt(path) {
            return Box::pin(self.inner.call(request));
        }
        let Ok(permit) = self.layer.in_flight.clone().try_acquire_owned() else {
            ::metrics::counter!("grpc_server_shed_total").increment(1);
            let status = crate::status::resource_exhausted(
                "server overloaded: too many calls in flight; retry shortly",
                Some(SHED_RETRY_AFTER),
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let requested = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let deadline = self.layer.limits.deadline(path, requested);
        // The handler reads its deadline from this header and passes the rest on downstream.
        if let Ok(value) = HeaderValue::from_str(&grpc_timeout_value(deadline)) {
            request.headers_mut().insert("grpc-timeout", value);
        }
        let future = self.inner.call(request);
        Box::pin(async move {
            let _permit = permit;
            match tokio::time::timeout(deadline, future).await {
                Ok(result) => result,
                // Dropping the handler's future stops its work: nobody waits for the answer.
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "deadline of {deadline:?} exceeded"
                ))
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    type Reply = Result<http::Response<tonic::body::Body>, std::convert::Infallible>;
    type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

    /// A handler that reports the deadline it saw and answers after `delay`.
    fn slow(
        delay: Duration,
    ) -> impl tower::Service<
        http::Request<()>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = ReplyFuture,
    > + Clone {
        tower::service_fn(move |request: http::Request<()>| {
            let seen = request
                .headers()
                .get("grpc-timeout")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let mut response = http::Response::new(tonic::body::Body::empty());
                response
                    .headers_mut()
                    .insert("x-seen-timeout", seen.parse().unwrap());
                Ok(response)
            }) as ReplyFuture
        })
    }

    fn request(path: &str, timeout: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(path);
        if let Some(t) = timeout {
            builder = builder.header("grpc-timeout", t);
        }
        builder.body(()).unwrap()
    }

    fn grpc_status(response: &http::Response<tonic::body::Body>) -> Option<i32> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().parse().unwrap())
    }

    #[tokio::test]
    async fn calls_without_a_deadline_get_the_default_and_long_ones_are_cut() {
        // Real time, scaled down: the handler takes 300 ms, the default deadline is 200 ms.
        let limits = Limits {
            default_deadline: Duration::from_millis(200),
            max_deadline: Duration::from_millis(500),
            upload_deadline: Duration::from_millis(400),
            ..Limits::default()
        };
        let layer = AdmissionLayer::new(&limits);
        let mut svc = layer.layer(slow(Duration::from_millis(300)));

        let r = svc
            .ready()
            .await
            .unwrap()
            .call(request("/smartdb.v1.SearchService/Search", None))
            .await
            .unwrap();
        assert_eq!(grpc_status(&r), Some(tonic::Code::DeadlineExceeded as i32));

        // The caller's own deadline is kept, and the handler sees the effective one.
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(request("/smartdb.v1.SearchService/Search", Some("400m")))
            .await
            .unwrap();
        assert_eq!(grpc_status(&r), None);
        assert_eq!(r.headers()["x-seen-timeout"], "400m");

        // Uploads default to their own, longer deadline; nothing passes the maximum.
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(request("/smartdb.v1.DocumentService/IngestText", None))
            .await
            .unwrap();
        assert_eq!(r.headers()["x-seen-timeout"], "400m");
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(request("/smartdb.v1.SearchService/Search", Some("1H")))
            .await
            .unwrap();
        assert_eq!(r.headers()["x-seen-timeout"], "500m");
    }

    #[tokio::test]
    async fn calls_beyond_the_in_flight_bound_are_shed_but_health_is_not() {
        let limits = Limits {
            max_in_flight: 2,
            ..Limits::default()
        };
        let layer = AdmissionLayer::new(&limits);
        let svc = layer.layer(slow(Duration::from_millis(300)));
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    svc.call(request("/smartdb.v1.SearchService/Search", None))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut health = svc.clone();
        let probe = tokio::spawn(async move {
            health
                .call(request("/grpc.health.v1.Health/Check", None))
                .await
                .unwrap()
        });
        let mut codes = Vec::new();
        for call in calls {
            codes.push(grpc_status(&call.await.unwrap()));
        }
        codes.sort();
        assert_eq!(
            codes,
            vec![None, None, Some(tonic::Code::ResourceExhausted as i32)]
        );
        assert_eq!(grpc_status(&probe.await.unwrap()), None);
        // Once the calls are done, there is room again.
        let r = svc
            .clone()
            .call(request("/smartdb.v1.SearchService/Search", None))
            .await
            .unwrap();
        assert_eq!(grpc_status(&r), None);
    }

    #[test]
    fn timeout_values_fit_the_grpc_format() {
        assert_eq!(grpc_timeout_value(Duration::from_millis(250)), "250m");
        assert_eq!(grpc_timeout_value(Duration::from_micros(10)), "1m");
        assert_eq!(
            parse_grpc_timeout(&grpc_timeout_value(Duration::from_secs(200_000))),
            Some(Duration::from_secs(200_000))
        );
    }
}
