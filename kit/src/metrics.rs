//! Prometheus metrics: one process-wide recorder, one tower layer that records every gRPC call
//! (count, errors by code, latency), and the HTTP endpoint that serves `/metrics`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, from sub-millisecond cache hits to slow ingests.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .expect("valid buckets")
                .install_recorder()
                .expect("install the Prometheus recorder once")
        })
        .clone()
}

/// An HTTP router with `GET /metrics`; services merge their own HTTP routes into it.
pub fn router() -> axum::Router {
    let handle = handle();
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(handle.render())),
    )
}

/// Serves `router` over HTTP on `addr` until `shutdown` resolves.
pub async fn serve_http(
    addr: SocketAddr,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("bind HTTP {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %err, "HTTP endpoint stopped");
        }
    });
    Ok(local)
}

/// Tower layer recording `grpc_server_requests_total{service,method,code}` and
/// `grpc_server_request_duration_seconds{service,method}` for every call.
///
/// The code is read from the response headers: tonic answers a failed unary call with a
/// trailers-only response that carries `grpc-status` there, and a successful one without it.
/// That is exact for unary and client-streaming calls, which is all smartdb's API has.
#[derive(Debug, Clone, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// Service produced by [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = split_path(request.uri().path());
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Unknown,
            };
            let code = format!("{code:?}");
            ::metrics::counter!("grpc_server_requests_total", "service" => service.clone(), "method" => method.clone(), "code" => code.clone()).increment(1);
            if code != "Ok" {
                ::metrics::counter!("grpc_server_errors_total", "service" => service.clone(), "method" => method.clone(), "code" => code).increment(1);
            }
            ::metrics::histogram!("grpc_server_request_duration_seconds", "service" => service, "method" => method)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

fn split_path(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default().to_owned();
    let method = parts.next().unwrap_or_default().to_owned();
    (service, method)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/smartdb.v1.SearchService/Search"),
            ("smartdb.v1.SearchService".to_owned(), "Search".to_owned())
        );
    }
}
