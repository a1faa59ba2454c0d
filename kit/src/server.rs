//! Server bootstrap shared by every service: gRPC on TCP with `grpc.health.v1` and
//! `grpc.reflection.v1`, the metrics layer, an HTTP endpoint for `/metrics`, and graceful
//! shutdown (stop accepting, report NOT_SERVING, let in-flight calls finish, exit).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admission::AdmissionLayer;
use crate::config::ServerArgs;
use crate::metrics::{GrpcMetricsLayer, KnownMethods};

/// Health of one server: the overall status (`""`) and one per gRPC service it serves.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<&'static str>,
    /// Whether the server is ready; the lock orders status writes, so a late "starting" write
    /// can never overwrite "ready".
    ready: Arc<tokio::sync::Mutex<bool>>,
    /// Set once shutdown began: nothing may report SERVING again.
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl Health {
    /// Marks the server and all its services SERVING: it can really answer now (never once it
    /// is draining).
    pub async fn set_serving(&self) {
        let mut ready = self.ready.lock().await;
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        *ready = true;
        self.set_all(ServingStatus::Serving).await;
    }

    /// Marks the server and all its services NOT_SERVING (draining, or lost a dependency).
    pub async fn set_not_serving(&self) {
        let mut ready = self.ready.lock().await;
        *ready = false;
        self.set_all(ServingStatus::NotServing).await;
    }

    /// Keeps readiness equal to `check`, asked every `every`: SERVING while it passes,
    /// NOT_SERVING while it fails (one log line per change). Only a service's own hard
    /// dependencies belong in `check` (its stores, its model): another smartdb service being
    /// away must make answers degrade or fail fast, never make this one unready. Stops when the
    /// server starts draining.
    pub fn follow<F, Fut>(&self, every: Duration, check: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        let health = self.clone();
        tokio::spawn(async move {
            let mut was_ok = None;
            loop {
                let result = check().await;
                if health.draining.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                let ok = result.is_ok();
                if was_ok != Some(ok) {
                    match &result {
                        Ok(()) => {
                            if was_ok.is_some() {
                                tracing::info!("a hard dependency is back: SERVING");
                            }
                            health.set_serving().await;
                        }
                        Err(why) => {
                            tracing::error!(reason = %why, "a hard dependency failed: NOT_SERVING");
                            health.set_not_serving().await;
                        }
                    }
                    was_ok = Some(ok);
                }
                tokio::time::sleep(every).await;
            }
        })
    }

    /// Reports NOT_SERVING for every service unless the server already became ready.
    async fn init(&self) {
        let ready = self.ready.lock().await;
        if !*ready {
            self.set_all(ServingStatus::NotServing).await;
        }
    }

    /// Sets the status of one named service (e.g. the gateway mirroring a downstream).
    pub async fn set_service(&self, service: &str, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(service, status).await;
    }

    async fn set_all(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for service in &self.services {
            self.reporter.set_service_status(*service, status).await;
        }
    }
}

/// Builder for one service's gRPC server.
pub struct ServiceServer {
    name: &'static str,
    routes: RoutesBuilder,
    services: Vec<&'static str>,
    http: axum::Router,
    reporter: HealthReporter,
    ready: Arc<tokio::sync::Mutex<bool>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Serve `smartdb.v1.TelemetryService` (off for a public port).
    telemetry: bool,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

impl ServiceServer {
    /// A server for the service called `name` (e.g. `search-svc`), NOT_SERVING until told.
    pub async fn new(name: &'static str) -> Self {
        let reporter = HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        // tonic-health starts the overall status at SERVING; we only claim that once ready.
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        Self {
            name,
            routes: RoutesBuilder::default(),
            services: Vec::new(),
            http: crate::metrics::router(),
            reporter,
            ready: Arc::default(),
            draining: Arc::default(),
            telemetry: true,
            health_service,
        }
    }

    /// Leaves out the internal `TelemetryService` (every server has it unless told): for a
    /// port that the public reaches.
    pub fn without_telemetry(&mut self) -> &mut Self {
        self.telemetry = false;
        self
    }

    /// Adds a gRPC service; it gets a health entry under its full name and is listed by reflection.
    pub fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.services.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Adds HTTP routes served next to `/metrics` on the HTTP endpoint.
    pub fn http_routes(&mut self, router: axum::Router) -> &mut Self {
        self.http = std::mem::take(&mut self.http).merge(router);
        self
    }

    /// Handle to flip this server's health.
    pub fn health(&self) -> Health {
        Health {
            reporter: self.reporter.clone(),
            services: self.services.clone(),
            ready: self.ready.clone(),
            draining: self.draining.clone(),
        }
    }

    /// Binds the addresses in `args` and serves until `shutdown` resolves, then drains.
    pub async fn run(
        self,
        args: &ServerArgs,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let listener = bind(args.listen).await?;
        self.run_on(listener, args, shutdown).await
    }

    /// Like [`ServiceServer::run`] on an already bound listener.
    pub async fn run_on(
        mut self,
        listener: TcpListener,
        args: &ServerArgs,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        args.limits.validate()?;
        let health = self.health();
        health.init().await;
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(smartdb_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so grpcurl can decode BadRequest and RetryInfo.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection");
        if self.telemetry {
            self.services.push(smartdb_proto::names::TELEMETRY);
            self.routes.add_service(
                smartdb_proto::v1::telemetry_service_server::TelemetryServiceServer::new(Telemetry),
            );
        }
        for service in &self.services {
            reflection = reflection.with_service_name(*service);
        }
        let mut reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(smartdb_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so grpcurl can decode BadRequest and RetryInfo.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for service in &self.services {
            reflection_alpha = reflection_alpha.with_service_name(*service);
        }
        self.routes.add_service(self.health_service.clone());
        self.routes.add_service(reflection.build_v1()?);
        self.routes.add_service(reflection_alpha.build_v1alpha()?);

        // One broadcast of the shutdown signal to the gRPC server, the HTTP endpoint and the drain timer.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        if let Some(http_addr) = args.http_listen {
            let bound =
                crate::metrics::serve_http(http_addr, self.http.clone(), stopped(stop_rx.clone()))
                    .await?;
            tracing::info!(service = self.name, addr = %bound, "HTTP endpoint (/metrics) listening");
        }

        let local = listener.local_addr()?;
        tracing::info!(service = self.name, addr = %local, version = crate::VERSION, "gRPC listening");

        let name = self.name;
        let drain_timeout = args.drain_timeout;
        let health_on_stop = health.clone();
        let on_stop = {
            let rx = stop_rx.clone();
            async move {
                stopped(rx).await;
                // Tell load balancers and probes first, then stop accepting.
                health_on_stop
                    .draining
                    .store(true, std::sync::atomic::Ordering::Release);
                health_on_stop.set_not_serving().await;
                tracing::info!(service = name, "draining in-flight calls");
            }
        };
        let mut served = self.services.clone();
        served.extend([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]);
        let known = KnownMethods::from_descriptors(
            &[
                smartdb_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
            &served,
        );
        let limits = &args.limits;
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            // tonic leaves HTTP/2 streams per connection unlimited unless told.
            .max_concurrent_streams(limits.max_concurrent_streams)
            // Outermost first: metrics see the final outcome, including shed and expired calls.
            .layer(GrpcMetricsLayer::new(known))
            .layer(AdmissionLayer::new(limits))
            .add_routes(self.routes.routes());
        let server: std::pin::Pin<
            Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
        > = match args.tls.acceptor()? {
            Some(acceptor) => {
                tracing::info!(service = self.name, "serving TLS");
                Box::pin(router.serve_with_incoming_shutdown(
                    crate::tls::incoming(listener, acceptor),
                    on_stop,
                ))
            }
            None => Box::pin(router.serve_with_incoming_shutdown(
                // Server::tcp_nodelay only applies to sockets tonic binds itself; without it on
                // our own listener, Nagle + delayed ACK add ~40 ms to every small response.
                tokio_stream::StreamExt::map(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    |accepted| accepted.map(crate::cork::Corked::new),
                ),
                on_stop,
            )),
        };

        // In-flight calls get `drain_timeout` after the signal; then we stop waiting for them.
        let drain_deadline = async move {
            stopped(stop_rx).await;
            tokio::time::sleep(drain_timeout).await;
        };
        tokio::select! {
            result = server => result?,
            _ = drain_deadline => tracing::warn!(service = name, "drain timeout reached, exiting with calls in flight"),
        }
        tracing::info!(service = name, "stopped");
        Ok(())
    }
}

/// `smartdb.v1.TelemetryService`: this process's metrics for the gateway's cluster view.
struct Telemetry;

#[tonic::async_trait]
impl smartdb_proto::v1::telemetry_service_server::TelemetryService for Telemetry {
    async fn get_metrics_text(
        &self,
        _: tonic::Request<smartdb_proto::v1::GetMetricsTextRequest>,
    ) -> Result<tonic::Response<smartdb_proto::v1::GetMetricsTextResponse>, tonic::Status> {
        Ok(tonic::Response::new(
            smartdb_proto::v1::GetMetricsTextResponse {
                text: crate::metrics::render(),
            },
        ))
    }
}

/// Binds a TCP listener, with a readable error naming the address; takes the listener for
/// exactly this address if the parent process handed one over ([`crate::listeners`]).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    if let Some(listener) = crate::listeners::take(addr) {
        listener.set_nonblocking(true)?;
        return Ok(TcpListener::from_std(listener)?);
    }
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// A loopback port that was free a moment ago (for tests and `smartdb up` with port 0).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tonic_health::pb::health_server::Health as _;

    async fn status(service: &tonic_health::server::HealthService, name: &str) -> i32 {
        service
            .check(tonic::Request::new(tonic_health::pb::HealthCheckRequest {
                service: name.to_owned(),
            }))
            .await
            .map_or(-1, |r| r.into_inner().status)
    }

    #[tokio::test]
    async fn readiness_follows_the_hard_dependency_and_stops_when_draining() {
        let (reporter, _) = tonic_health::server::health_reporter();
        let service = Arc::new(tonic_health::server::HealthService::from_health_reporter(
            reporter.clone(),
        ));
        let health = Health {
            reporter,
            services: vec!["smartdb.v1.Thing"],
            ready: Arc::new(tokio::sync::Mutex::new(false)),
            draining: Arc::new(AtomicBool::new(false)),
        };
        let up = Arc::new(AtomicBool::new(true));
        let follower = {
            let up = up.clone();
            health.follow(Duration::from_millis(10), move || {
                let ok = up.load(Ordering::SeqCst);
                async move { if ok { Ok(()) } else { Err("disk gone".into()) } }
            })
        };
        let serving = ServingStatus::Serving as i32;
        let not_serving = ServingStatus::NotServing as i32;
        let wait_for = |want: i32| {
            let service = service.clone();
            async move {
                for _ in 0..200 {
                    if status(&service, "").await == want
                        && status(&service, "smartdb.v1.Thing").await == want
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                panic!("status never became {want}");
            }
        };
        wait_for(serving).await;
        up.store(false, Ordering::SeqCst);
        wait_for(not_serving).await;
        up.store(true, Ordering::SeqCst);
        wait_for(serving).await;
        // Draining: nothing reports SERVING again, and the follower ends.
        health.draining.store(true, Ordering::Release);
        health.set_not_serving().await;
        health.set_serving().await;
        assert_eq!(status(&service, "").await, not_serving);
        tokio::time::timeout(Duration::from_secs(1), follower)
            .await
            .expect("the follower stops once draining")
            .unwrap();
    }
}
