//! Prometheus metrics: one process-wide recorder, one tower layer that records every gRPC call
//! (count, errors by code, latency), and the HTTP endpoint that serves `/metrics`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
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

/// Every metric this process records, in the Prometheus text format, with the process's
/// memory figures read just before.
pub fn render() -> String {
    // The recorder first: gauges set before it is installed go nowhere.
    let handle = handle();
    record_memory();
    handle.render()
}

/// An HTTP router with `GET /metrics`; services merge their own HTTP routes into it.
pub fn router() -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| std::future::ready(render())),
    )
}

/// Sets `process_resident_memory_bytes` and, when the process runs under a cgroup memory limit
/// (a container), `process_memory_limit_bytes`: what the memory alert compares.
///
/// Read straight from `/proc` and `/sys/fs/cgroup` (Linux; elsewhere nothing is set): the
/// process-metrics crates read these files too, but bring dozens of metrics we don't use and
/// none of them knows the cgroup limit.
fn record_memory() {
    if let Some(rss) = resident_bytes() {
        ::metrics::gauge!("process_resident_memory_bytes").set(rss as f64);
    }
    if let Some(limit) = memory_limit_bytes() {
        ::metrics::gauge!("process_memory_limit_bytes").set(limit as f64);
    }
}

/// Resident set size: the second field of `/proc/self/statm`, in pages.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|p| *p > 0)?)
}

/// The memory limit of the process's cgroup (v2 `memory.max`, else v1
/// `memory.limit_in_bytes`); None when unlimited or unknown.
fn memory_limit_bytes() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut candidates = Vec::new();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            candidates.push(format!("/sys/fs/cgroup{path}/memory.max"));
            candidates.push("/sys/fs/cgroup/memory.max".to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
            candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".to_owned());
        }
    }
    candidates.into_iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        // "max" (v2) or a huge number (v1) mean no limit.
        text.trim()
            .parse::<u64>()
            .ok()
            .filter(|limit| *limit < (1 << 62))
    })
}

/// Serves `router` over HTTP on `addr` until `shutdown` resolves.
pub async fn serve_http(
    addr: SocketAddr,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<SocketAddr> {
    let listener = crate::server::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("HTTP endpoint: {e}"))?;
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

/// The gRPC methods a server serves, by path (`/package.Service/Method`), with the `service`
/// and `method` labels their series get. Anything else is counted under `unknown`, so that
/// callers cannot create series (and grow memory and `/metrics`) by sending made-up paths.
#[derive(Debug, Clone, Default)]
pub struct KnownMethods {
    paths: Arc<HashMap<String, (&'static str, &'static str)>>,
}

impl KnownMethods {
    /// The methods of `services` (full names) found in the encoded `FileDescriptorSet`s.
    pub fn from_descriptors(descriptor_sets: &[&[u8]], services: &[&str]) -> Self {
        use prost::Message;
        let mut paths = HashMap::new();
        for bytes in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*bytes) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let full = match package.as_str() {
                        "" => service.name().to_owned(),
                        p => format!("{p}.{}", service.name()),
                    };
                    if !services.contains(&full.as_str()) {
                        continue;
                    }
                    // Leaked once per method at start-up: labels are then free to clone.
                    let service_label: &'static str = Box::leak(full.clone().into_boxed_str());
                    for method in service.method {
                        let name: &'static str =
                            Box::leak(method.name().to_owned().into_boxed_str());
                        paths.insert(format!("/{full}/{name}"), (service_label, name));
                    }
                }
            }
        }
        Self {
            paths: Arc::new(paths),
        }
    }

    /// The labels of `path`: its service and method if known, else `unknown` twice.
    pub fn labels(&self, path: &str) -> (&'static str, &'static str) {
        self.paths
            .get(path)
            .copied()
            .unwrap_or(("unknown", "unknown"))
    }

    /// Number of known methods.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// True if no method is known.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// Tower layer recording `grpc_server_requests_total{service,method,code}` and
/// `grpc_server_request_duration_seconds{service,method}` for every call, labelled only with
/// known methods.
///
/// Each call also runs in a server span (`rpc`, named `<service>/<method>`) that continues the
/// caller's trace and carries the request id (one is made and added to the request when the
/// caller sent none) and the trace id into every log line; health checks and reflection get no
/// span, or every probe would be a trace.
///
/// The code is read from the response headers: tonic answers a failed unary call with a
/// trailers-only response that carries `grpc-status` there, and a successful one without it.
/// That is exact for unary and client-streaming calls, which is all smartdb's API has.
#[derive(Debug, Clone, Default)]
pub struct GrpcMetricsLayer {
    known: KnownMethods,
}

impl GrpcMetricsLayer {
    /// A layer labelling the methods in `known`.
    pub fn new(known: KnownMethods) -> Self {
        Self { known }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            known: self.known.clone(),
        }
    }
}

/// Service produced by [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    known: KnownMethods,
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

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let (service, method) = self.known.labels(request.uri().path());
        let started = Instant::now();
        let span = server_span(&mut request, service, method);
        let future = span.in_scope(|| self.inner.call(request));
        let finished = span.clone();
        let call = async move {
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
            let code = code_label(code);
            ::metrics::counter!("grpc_server_requests_total", "service" => service, "method" => method, "code" => code).increment(1);
            if code != "Ok" {
                ::metrics::counter!("grpc_server_errors_total", "service" => service, "method" => method, "code" => code).increment(1);
            }
            ::metrics::histogram!("grpc_server_request_duration_seconds", "service" => service, "method" => method)
                .record(started.elapsed().as_secs_f64());
            finished.record("rpc.grpc.status_code", code);
            if code != "Ok" {
                finished.record("otel.status_code", "ERROR");
            }
            result
        };
        Box::pin(tracing::Instrument::instrument(call, span))
    }
}

/// Longest request id taken from a caller; a longer one is replaced, so that a client cannot
/// flood every log line.
const MAX_REQUEST_ID: usize = 128;

/// The span a served call runs in (see [`GrpcMetricsLayer`]), named by the method's labels so
/// that made-up paths cannot name spans.
fn server_span<B>(
    request: &mut http::Request<B>,
    service: &'static str,
    method: &'static str,
) -> tracing::Span {
    if request.uri().path().starts_with("/grpc.") {
        return tracing::Span::none();
    }
    let headers = request.headers_mut();
    let request_id = match headers
        .get(crate::context::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID)
    {
        Some(id) => id.to_owned(),
        None => {
            let id = crate::context::new_request_id();
            if let Ok(value) = id.parse() {
                headers.insert(crate::context::REQUEST_ID_HEADER, value);
            }
            id
        }
    };
    let span = tracing::info_span!(
        target: "smartdb::rpc",
        "rpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if let Some(trace_id) = crate::telemetry::continue_trace(&span, headers) {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}

/// The label of a status code: a closed set of static names.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_metrics_carry_the_process_memory() {
        let text = render();
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .expect("resident memory is reported on Linux");
        assert!(rss.parse::<f64>().unwrap() > 1e6, "{rss}");
        if let Some(limit) = memory_limit_bytes() {
            assert!(limit > 0);
        }
    }

    #[test]
    fn a_call_gets_a_request_id_unless_it_brings_a_sane_one() {
        let id_of = |request: &http::Request<()>| {
            request
                .headers()
                .get(crate::context::REQUEST_ID_HEADER)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let mut request = http::Request::new(());
        *request.uri_mut() = "/smartdb.v1.SearchService/Search".parse().unwrap();
        let _span = server_span(&mut request, "smartdb.v1.SearchService", "Search");
        let made = id_of(&request).expect("one is made");
        assert!(!made.is_empty());

        request.headers_mut().insert(
            crate::context::REQUEST_ID_HEADER,
            "caller-42".parse().unwrap(),
        );
        let _span = server_span(&mut request, "smartdb.v1.SearchService", "Search");
        assert_eq!(id_of(&request).as_deref(), Some("caller-42"), "kept");

        let flood = "x".repeat(MAX_REQUEST_ID + 1);
        request
            .headers_mut()
            .insert(crate::context::REQUEST_ID_HEADER, flood.parse().unwrap());
        let _span = server_span(&mut request, "smartdb.v1.SearchService", "Search");
        let replaced = id_of(&request).unwrap();
        assert!(
            replaced.len() <= MAX_REQUEST_ID,
            "too long ids are replaced"
        );

        // Health checks make no span and are left alone.
        let mut probe = http::Request::new(());
        *probe.uri_mut() = "/grpc.health.v1.Health/Check".parse().unwrap();
        assert!(server_span(&mut probe, "grpc.health.v1.Health", "Check").is_none());
        assert_eq!(id_of(&probe), None);
    }

    #[test]
    fn only_served_methods_get_their_own_labels() {
        let known = KnownMethods::from_descriptors(
            &[smartdb_proto::FILE_DESCRIPTOR_SET],
            &["smartdb.v1.SearchService"],
        );
        assert_eq!(
            known.labels("/smartdb.v1.SearchService/Search"),
            ("smartdb.v1.SearchService", "Search")
        );
        // Served by someone else, or made up: one shared series.
        assert_eq!(
            known.labels("/smartdb.v1.IndexService/UpsertPoints"),
            ("unknown", "unknown")
        );
        assert_eq!(known.labels("/x.Y/Z"), ("unknown", "unknown"));
        assert_eq!(known.len(), 1);
    }
}
