//! Clients of other smartdb services, built in one place so every hop behaves the same. One
//! stack of small tower layers, outermost first:
//!
//! 1. **metrics** of the final outcome per downstream and method ([`Downstream::call`]);
//! 2. **retry** of typed requests ([`retry`]): idempotent calls only, retryable failures only,
//!    backoff with full jitter, a retry budget, never past the caller's deadline;
//! 3. **power-of-two-choices balancing** over the downstream's endpoints ([`balance`]), which
//!    come from an address list or a DNS name re-resolved periodically ([`discovery`]);
//! 4. per endpoint: a **concurrency limit** that sheds load at once when reached (counted by the
//!    balancer), a **circuit breaker** ([`breaker`]), and a **per-attempt timeout**
//!    ([`timeout`]) over the connection.
//!
//! A retry can land on a healthy replica, and a sick replica's breaker takes it out of the set.
//! Deadlines travel with every call (`grpc-timeout`, the caller's remaining time minus a margin,
//! see [`crate::context`]).

pub mod balance;
pub mod breaker;
pub mod discovery;
pub mod retry;
pub mod timeout;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tower::retry::budget::{Budget, TpsBudget};

pub use balance::Balancer;
pub use breaker::{Breaker, BreakerNames, BreakerSettings};
pub use retry::RetrySettings;

use crate::context::CallContext;
use crate::status::{Failure, classify};

/// An HTTP request as tonic clients send it.
pub type HttpRequest = http::Request<tonic::body::Body>;
/// An HTTP response as tonic clients receive it.
pub type HttpResponse = http::Response<tonic::body::Body>;
/// Errors inside the client stack (tonic turns them into a `Status`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How clients connect, retry, break and bound their calls.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// Longest a single attempt may take (a retry may follow if time is left).
    pub attempt_timeout: Duration,
    /// Calls in flight to one endpoint; beyond it, calls are shed at once.
    pub max_in_flight_per_endpoint: usize,
    /// Retries.
    pub retry: RetrySettings,
    /// Circuit breakers of endpoints.
    pub breaker: BreakerSettings,
    /// How often DNS names are resolved again.
    pub refresh: Duration,
    /// Largest message sent or received.
    pub max_message_bytes: usize,
    /// Deadline of a call when the caller has none.
    pub default_timeout: Duration,
    /// TLS for calls to other services (`https`), if configured.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(10),
            max_in_flight_per_endpoint: 256,
            retry: RetrySettings::default(),
            breaker: BreakerSettings::default(),
            refresh: Duration::from_secs(5),
            max_message_bytes: crate::limits::Limits::default().message_bytes(),
            default_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// One RPC as the client stack sees it: its name (for metrics) and whether repeating it is
/// harmless (only such calls are retried).
#[derive(Debug, Clone, Copy)]
pub struct Rpc {
    /// Method name, e.g. `Embed`.
    pub method: &'static str,
    /// True if sending it twice has the effect of sending it once.
    pub idempotent: bool,
}

impl Rpc {
    /// An RPC that may be retried.
    pub const fn idempotent(method: &'static str) -> Self {
        Self {
            method,
            idempotent: true,
        }
    }

    /// An RPC that must not be repeated (e.g. a create that answers ALREADY_EXISTS the second time).
    pub const fn once(method: &'static str) -> Self {
        Self {
            method,
            idempotent: false,
        }
    }
}

/// A client of one downstream service (all its replicas).
#[derive(Clone)]
pub struct Downstream {
    name: &'static str,
    target: Arc<str>,
    balancer: Balancer,
    settings: Arc<ClientSettings>,
    budget: Arc<TpsBudget>,
    methods: Arc<std::sync::RwLock<std::collections::HashMap<&'static str, Arc<MethodMetrics>>>>,
    _discovery: Arc<discovery::Refresh>,
}

/// Handles of a method's metrics: successful calls and durations.
struct MethodMetrics {
    ok: metrics::Counter,
    duration: metrics::Histogram,
}

impl Downstream {
    /// A client of `name` at `target`: `host:port`, a comma-separated list of them, or a DNS
    /// name resolving to several addresses (a Kubernetes headless Service). Connections are made
    /// lazily, so a service can start before its dependencies.
    pub async fn connect(
        name: &'static str,
        target: &str,
        settings: &ClientSettings,
    ) -> anyhow::Result<Self> {
        let parsed = discovery::Target::parse(target)?;
        let balancer = Balancer::new(name);
        let settings = Arc::new(settings.clone());
        let factory = {
            let settings = settings.clone();
            move |addr: &discovery::Resolved| endpoint(name, addr, &settings)
        };
        let refresh =
            discovery::Refresh::start(parsed, balancer.clone(), settings.refresh, factory).await;
        Ok(Self {
            name,
            target: target.into(),
            budget: retry::budget(&settings.retry),
            balancer,
            settings,
            methods: Arc::default(),
            _discovery: Arc::new(refresh),
        })
    }

    /// The downstream's name, e.g. `embed-svc`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The address it was configured with.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The balanced stack as a tonic transport, for generated clients: calls through it are
    /// balanced, broken and bounded, but not retried (use [`Downstream::call`] for that).
    pub fn channel(&self) -> Balancer {
        self.balancer.clone()
    }

    /// Largest message to send or accept (set it on generated clients).
    pub fn max_message_bytes(&self) -> usize {
        self.settings.max_message_bytes
    }

    /// The resolved endpoints now, with whether their breaker is open.
    pub fn endpoints(&self) -> Vec<(String, bool)> {
        self.balancer
            .endpoints()
            .iter()
            .map(|e| (e.addr.clone(), e.breaker().is_open()))
            .collect()
    }

    /// Calls `rpc` with `message` through the whole stack: `send` makes one attempt (build the
    /// generated client on the given transport and call the method). The request carries the
    /// caller's context (tenant, request id, remaining deadline); idempotent calls are retried
    /// per the retry policy.
    pub async fn call<M, R, F, Fut>(
        &self,
        ctx: &CallContext,
        rpc: Rpc,
        message: M,
        send: F,
    ) -> Result<R, tonic::Status>
    where
        M: Clone + Send + 'static,
        R: Send + 'static,
        F: Fn(Balancer, tonic::Request<M>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>> + Send + 'static,
    {
        let started = Instant::now();
        let timeout = ctx
            .remaining(self.settings.default_timeout)
            .saturating_sub(crate::context::DEADLINE_MARGIN);
        let span = tracing::info_span!(
            target: "smartdb::rpc",
            "call",
            otel.name = %format_args!("{}/{}", self.name, rpc.method),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
        );
        // Built inside the span, so the callee's span becomes this one's child.
        let request = span.in_scope(|| ctx.request(message, self.settings.default_timeout));
        self.budget.deposit();
        let policy = retry::policy(
            self.name,
            rpc.method,
            rpc.idempotent,
            started + timeout,
            &self.settings.retry,
            self.budget.clone(),
        );
        let result = tracing::Instrument::instrument(
            retry::run(policy, request, |request| {
                send(self.balancer.clone(), request)
            }),
            span.clone(),
        )
        .await
        .map(tonic::Response::into_inner);
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        let method = self.method_metrics(rpc.method);
        match &result {
            Ok(_) => method.ok.increment(1),
            Err(status) => {
                metrics::counter!("client_requests_total", "downstream" => self.name, "method" => rpc.method, "code" => crate::metrics::code_label(status.code())).increment(1)
            }
        }
        method.duration.record(started.elapsed().as_secs_f64());
        result
    }

    /// The metrics of one method, looked up in the registry once rather than on every call.
    fn method_metrics(&self, method: &'static str) -> Arc<MethodMetrics> {
        if let Some(found) = self
            .methods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(method)
        {
            return found.clone();
        }
        let made = Arc::new(MethodMetrics {
            ok: metrics::counter!("client_requests_total", "downstream" => self.name, "method" => method, "code" => crate::metrics::code_label(tonic::Code::Ok)),
            duration: metrics::histogram!("client_request_duration_seconds", "downstream" => self.name, "method" => method),
        });
        self.methods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(method)
            .or_insert(made)
            .clone()
    }
}

/// Builds one endpoint's stack: breaker → attempt timeout → a lazily connecting channel (the
/// balancer sheds calls beyond the endpoint's in-flight limit before they reach it).
fn endpoint(
    downstream: &'static str,
    addr: &discovery::Resolved,
    settings: &ClientSettings,
) -> anyhow::Result<Arc<balance::Endpoint>> {
    let what: Arc<str> = format!("{downstream} at {}", addr.addr).into();
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", addr.addr))
        .map_err(|e| anyhow::anyhow!("invalid address of {downstream}: {e}"))?
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(host) = &addr.host {
        // Keep the configured name as the authority (virtual hosting, TLS names).
        endpoint = endpoint.origin(
            format!("{scheme}://{host}:{}", addr.addr.port())
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid host of {downstream}: {e}"))?,
        );
    }
    if let Some(tls) = &settings.tls {
        // The certificate is checked against the configured name, else the address.
        let name = addr
            .host
            .clone()
            .unwrap_or_else(|| addr.addr.ip().to_string());
        endpoint = endpoint
            .tls_config(tls.clone().domain_name(name))
            .map_err(|e| anyhow::anyhow!("TLS to {downstream}: {e}"))?;
    }
    let channel: Channel =
        endpoint.connect_with_connector_lazy(crate::cork::Connector::new(settings.connect_timeout));
    let breaker = Breaker::new(
        &settings.breaker,
        BreakerNames {
            gauge: "client_breaker_open",
            rejected: "client_rejected_total",
            labels: vec![
                ("downstream", downstream.to_owned()),
                ("endpoint", addr.addr.to_string()),
            ],
        },
    );
    let shed_what = what.clone();
    let stack = tower::ServiceBuilder::new()
        .layer(breaker::BreakerLayer::new(breaker.clone(), what.clone()))
        .map_err(move |error: BoxError| to_status_error(&shed_what, error))
        .layer(timeout::AttemptTimeoutLayer::new(
            settings.attempt_timeout,
            what,
        ))
        .service(channel);
    Ok(Arc::new(
        balance::Endpoint::new(
            addr.addr.to_string(),
            tower::util::BoxCloneSyncService::new(stack),
            breaker,
        )
        .with_max_in_flight(settings.max_in_flight_per_endpoint),
    ))
}

/// Turns an error from inside an endpoint's stack into a `Status` that names the endpoint.
fn to_status_error(what: &str, error: BoxError) -> BoxError {
    let status = match error.downcast::<tonic::Status>() {
        Ok(status) => *status,
        // tonic's own enforcement of `grpc-timeout` may fire before ours.
        Err(error) if is_timeout(&*error) => {
            tonic::Status::deadline_exceeded(format!("{what}: no answer within the deadline"))
        }
        // Refused or broken connections and the like: the endpoint is not reachable.
        Err(error) => tonic::Status::unavailable(format!("{what}: {}", error_chain(&*error))),
    };
    Box::new(status)
}

/// True if `error` or one of its causes is tonic's client-side deadline expiry.
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tonic::TimeoutExpired>() {
            return true;
        }
        cause = error.source();
    }
    false
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The failure an error inside the stack means.
pub(crate) fn error_failure(error: &BoxError) -> Failure {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) => classify(status),
        None if is_timeout(&**error) => Failure::DeadlineExceeded,
        None => Failure::Unavailable,
    }
}

/// The deadline a request carries (`grpc-timeout`), if any.
pub(crate) fn request_timeout(request: &HttpRequest) -> Option<Duration> {
    request
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::context::parse_grpc_timeout)
}

/// Options for a plain channel (health checks of one specific address, CLI tools).
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// TLS, if the service at the address speaks it.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// A lazily connecting plain channel to one address (`host:port` or a full `http://` URI),
/// without the resilience layers: for probing one specific replica.
pub fn channel(addr: &str, options: &ChannelOptions) -> anyhow::Result<Channel> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = match addr.split_once("://") {
        Some((_, rest)) => format!("{scheme}://{rest}"),
        None => format!("{scheme}://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| anyhow::anyhow!("invalid service address {addr:?}: {e}"))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(tls) = &options.tls {
        let host = endpoint.uri().host().unwrap_or_default().to_owned();
        endpoint = endpoint
            .tls_config(tls.clone().domain_name(host))
            .map_err(|e| anyhow::anyhow!("TLS to {addr}: {e}"))?;
    }
    Ok(endpoint.connect_with_connector_lazy(crate::cork::Connector::new(options.connect_timeout)))
}

/// Awaits a call to another service, giving up with DEADLINE_EXCEEDED once `timeout` passes
/// (for calls outside the stack).
pub async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bare_host_port_and_uri_are_accepted() {
        assert!(channel("127.0.0.1:1", &ChannelOptions::default()).is_ok());
        assert!(channel("http://127.0.0.1:1", &ChannelOptions::default()).is_ok());
        assert!(channel("not a uri", &ChannelOptions::default()).is_err());
    }

    #[tokio::test]
    async fn calls_give_up_at_their_deadline() {
        let never = std::future::pending::<Result<(), tonic::Status>>();
        let started = std::time::Instant::now();
        let err = within(Duration::from_millis(50), never).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            within(Duration::from_secs(1), async { Ok(7) })
                .await
                .unwrap(),
            7
        );
    }

    #[test]
    fn tonic_timeouts_are_deadlines_not_outages() {
        // As tonic's channel reports it: "transport error" caused by TimeoutExpired.
        #[derive(Debug)]
        struct Transport(tonic::TimeoutExpired);
        impl std::fmt::Display for Transport {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Transport {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrapped: BoxError = Box::new(Transport(tonic::TimeoutExpired(())));
        assert_eq!(error_failure(&wrapped), Failure::DeadlineExceeded);
        let status = to_status_error("embed-svc at x", wrapped);
        let status = status.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        let refused: BoxError =
            Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(error_failure(&refused), Failure::Unavailable);
    }

    #[tokio::test]
    async fn a_refused_connection_is_unavailable_naming_the_service_and_fails_fast_once_open() {
        // A port nobody listens on.
        let port = crate::server::free_port().unwrap();
        let settings = ClientSettings {
            breaker: BreakerSettings {
                consecutive_failures: 3,
                open: Duration::from_secs(60),
                ..BreakerSettings::default()
            },
            ..ClientSettings::default()
        };
        let downstream = Downstream::connect("embed-svc", &format!("127.0.0.1:{port}"), &settings)
            .await
            .unwrap();
        let call = |d: Downstream| async move {
            let ctx = CallContext::background("t", Duration::from_secs(5));
            d.call(
                &ctx,
                Rpc::idempotent("Check"),
                tonic_health::pb::HealthCheckRequest::default(),
                |ch, req| async move {
                    tonic_health::pb::health_client::HealthClient::new(ch)
                        .check(req)
                        .await
                },
            )
            .await
        };
        let err = call(downstream.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("embed-svc at 127.0.0.1:"), "{err:?}");
        // The first call and its retries opened the breaker: now it fails without connecting.
        let started = Instant::now();
        let err = call(downstream.clone()).await.unwrap_err();
        assert!(err.message().contains("circuit open"), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_millis(20),
            "{:?}",
            started.elapsed()
        );
        assert!(downstream.endpoints()[0].1, "reported open");
    }
}
