//! Cluster health as the gateway sees it: `AdminService.GetClusterStatus` (every replica of
//! every service), and the gateway's per-service health following each owner's health through
//! `grpc.health.v1.Health/Watch` streams (no polling).
//!
//! A downstream being away never makes the gateway itself unready (its overall status `""`
//! stays SERVING): only the public services that downstream owns report NOT_SERVING.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use smartdb_kit::client::{ChannelOptions, Downstream as Client, channel};
use smartdb_kit::server::Health;
use smartdb_proto::v1 as pb;

use crate::alerts;
use crate::cluster_metrics::ClusterMetrics;
use crate::edge::Edge;
use crate::edge::store::{AuditFilter, AuditRecord, KeyRecord, Role, TenantRecord};
use crate::error::Error;
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Time allowed for one health check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Window the alerts judge rates and ratios on.
const ALERT_WINDOW: Duration = Duration::from_secs(300);
/// Largest metrics text read from one replica.
const METRICS_TEXT_BYTES: usize = 16 << 20;
/// Wait before watching an endpoint again after its stream broke.
const REWATCH: Duration = Duration::from_secs(1);

/// One service the gateway depends on.
pub struct Downstream {
    name: &'static str,
    client: Client,
    /// Public services (full names) that this downstream owns.
    serves: &'static [&'static str],
    /// Plain channels to each replica, for health checks of that very replica.
    channels: Mutex<HashMap<String, Channel>>,
    /// How those channels connect (TLS).
    options: ChannelOptions,
}

impl Downstream {
    /// A downstream called `name`, reached through `client`, owning the public services `serves`.
    pub fn new(
        name: &'static str,
        client: Client,
        serves: &'static [&'static str],
        options: ChannelOptions,
    ) -> Self {
        Self {
            name,
            client,
            serves,
            channels: Mutex::default(),
            options,
        }
    }

    fn channel(&self, addr: &str) -> Option<Channel> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(channel) = channels.get(addr) {
            return Some(channel.clone());
        }
        let channel = channel(addr, &self.options).ok()?;
        channels.insert(addr.to_owned(), channel.clone());
        Some(channel)
    }

    /// Every replica's metrics (Prometheus text) through `TelemetryService`, or why not.
    async fn read_metrics(&self) -> Vec<(&'static str, String, Result<String, String>)> {
        let reads = self
            .client
            .endpoints()
            .into_iter()
            .map(|(addr, _)| async move {
                let text = match self.channel(&addr) {
                    None => Err("invalid address".to_owned()),
                    Some(channel) => {
                        let mut request = Request::new(pb::GetMetricsTextRequest {});
                        request.set_timeout(CHECK_TIMEOUT);
                        let mut client =
                            pb::telemetry_service_client::TelemetryServiceClient::new(channel)
                                .max_decoding_message_size(METRICS_TEXT_BYTES);
                        match tokio::time::timeout(CHECK_TIMEOUT, client.get_metrics_text(request))
                            .await
                        {
                            Ok(Ok(r)) => Ok(r.into_inner().text),
                            Ok(Err(status)) => Err(status.message().to_owned()),
                            Err(_) => Err("timed out".to_owned()),
                        }
                    }
                };
                (self.name, addr, text)
            });
        futures::future::join_all(reads).await
    }

    /// Checks every replica.
    async fn check(&self) -> Vec<pb::ServiceStatus> {
        let endpoints = self.client.endpoints();
        if endpoints.is_empty() {
            return vec![pb::ServiceStatus {
                name: self.name.to_owned(),
                address: self.client.target().to_owned(),
                health: pb::ServiceHealth::Unreachable as i32,
                detail: "its address resolves to no endpoint".into(),
                latency_ms: 0,
            }];
        }
        let checks = endpoints
            .into_iter()
            .map(|(addr, open)| self.check_one(addr, open));
        futures::future::join_all(checks).await
    }

    async fn check_one(&self, addr: String, breaker_open: bool) -> pb::ServiceStatus {
        let started = Instant::now();
        let (health, mut detail) = match self.channel(&addr) {
            None => (pb::ServiceHealth::Unreachable, "invalid address".to_owned()),
            Some(channel) => {
                let mut request = Request::new(HealthCheckRequest {
                    service: String::new(),
                });
                request.set_timeout(CHECK_TIMEOUT);
                let mut client = HealthClient::new(channel);
                match tokio::time::timeout(CHECK_TIMEOUT, client.check(request)).await {
                    Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => {
                        (pb::ServiceHealth::Serving, String::new())
                    }
                    Ok(Ok(_)) => (pb::ServiceHealth::NotServing, "not ready yet".to_owned()),
                    Ok(Err(status)) => {
                        (pb::ServiceHealth::Unreachable, status.message().to_owned())
                    }
                    Err(_) => (
                        pb::ServiceHealth::Unreachable,
                        "health check timed out".to_owned(),
                    ),
                }
            }
        };
        if breaker_open {
            detail = format!("{detail} (circuit breaker open)").trim().to_owned();
        }
        pb::ServiceStatus {
            name: self.name.to_owned(),
            address: addr,
            health: health as i32,
            detail,
            latency_ms: started.elapsed().as_millis() as u32,
        }
    }
}

/// All downstreams.
pub struct Downstreams {
    list: Vec<Arc<Downstream>>,
}

impl Downstreams {
    /// The given downstreams.
    pub fn new(list: Vec<Downstream>) -> Self {
        Self {
            list: list.into_iter().map(Arc::new).collect(),
        }
    }

    /// Reads every replica's metrics concurrently: (service, address, text or why not).
    pub async fn read_metrics(&self) -> Vec<(&'static str, String, Result<String, String>)> {
        futures::future::join_all(self.list.iter().map(|d| d.read_metrics()))
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Checks every replica of every downstream concurrently.
    pub async fn check_all(&self) -> Vec<pb::ServiceStatus> {
        futures::future::join_all(self.list.iter().map(|d| d.check()))
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Keeps the gateway's per-service health equal to its owner's: SERVING while at least one
/// replica of the owner reports SERVING on its `Health/Watch` stream. `every` is how often the
/// set of replicas (DNS) is looked at again.
pub async fn mirror_health(downstreams: Arc<Downstreams>, health: Health, every: Duration) {
    let tasks: Vec<_> = downstreams
        .list
        .iter()
        .filter(|d| !d.serves.is_empty())
        .map(|d| tokio::spawn(follow(d.clone(), health.clone(), every)))
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

/// Follows one downstream: a watcher per replica, and the aggregate on every change.
async fn follow(downstream: Arc<Downstream>, health: Health, every: Duration) {
    let changed = Arc::new(Notify::new());
    let mut watchers: HashMap<String, (Arc<AtomicBool>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let mut reported: Option<bool> = None;
    loop {
        let endpoints: Vec<String> = downstream
            .client
            .endpoints()
            .into_iter()
            .map(|(addr, _)| addr)
            .collect();
        watchers.retain(|addr, (_, task)| {
            let keep = endpoints.contains(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        for addr in endpoints {
            if watchers.contains_key(&addr) {
                continue;
            }
            let Some(channel) = downstream.channel(&addr) else {
                continue;
            };
            let serving = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(watch(channel, serving.clone(), changed.clone()));
            watchers.insert(addr, (serving, task));
        }
        let serving = watchers.values().any(|(s, _)| s.load(Ordering::Acquire));
        if reported != Some(serving) {
            for service in downstream.serves {
                health.set_service(service, serving).await;
            }
            if reported.is_some() {
                tracing::info!(
                    downstream = downstream.name,
                    serving,
                    "downstream health changed"
                );
            }
            reported = Some(serving);
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Watches one replica's overall health, setting `serving` on every update; reconnects when
/// the stream breaks (the replica restarting), reporting NOT_SERVING meanwhile.
async fn watch(channel: Channel, serving: Arc<AtomicBool>, changed: Arc<Notify>) {
    let set = |value: bool| {
        if serving.swap(value, Ordering::AcqRel) != value {
            changed.notify_one();
        }
    };
    loop {
        let stream = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        if let Ok(stream) = stream {
            let mut stream = stream.into_inner();
            while let Some(Ok(update)) = stream.next().await {
                set(update.status == ServingStatus::Serving as i32);
            }
        }
        set(false);
        tokio::time::sleep(REWATCH).await;
    }
}

/// `AdminService`: cluster health, tenants, API keys and the audit log. Thin: the edge does
/// the work.
pub struct Admin {
    downstreams: Arc<Downstreams>,
    metrics: Arc<ClusterMetrics>,
    edge: Arc<Edge>,
}

impl Admin {
    /// Reports on `downstreams` (their health, and their `metrics`) and manages identities
    /// through `edge`.
    pub fn new(
        downstreams: Arc<Downstreams>,
        metrics: Arc<ClusterMetrics>,
        edge: Arc<Edge>,
    ) -> Self {
        Self {
            downstreams,
            metrics,
            edge,
        }
    }

    /// Admits the call to `method` (of AdminService), runs `f`, and records it in the audit
    /// log with `detail`.
    async fn run<T, R, F>(
        &self,
        method: &'static str,
        request: Request<T>,
        detail: impl FnOnce(&T) -> String,
        f: impl FnOnce(T) -> F,
    ) -> Result<Response<R>, Status>
    where
        F: Future<Output = crate::error::Result<R>>,
    {
        let admitted = self.edge.admit(&request, &admin_path(method)).await?;
        let message = request.into_inner();
        let detail = detail(&message);
        let result = f(message).await.map_err(Status::from);
        self.edge.audit_call(&admitted, detail, &result);
        result.map(Response::new)
    }
}

/// Full path of an AdminService method.
fn admin_path(method: &str) -> String {
    format!("/{}/{method}", smartdb_proto::names::ADMIN)
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Reader => pb::Role::Reader,
        Role::Writer => pb::Role::Writer,
        Role::Admin => pb::Role::Admin,
    }
}

fn tenant_to_pb(t: TenantRecord) -> pb::Tenant {
    pb::Tenant {
        name: t.name,
        create_time: Some(timestamp(t.create_time)),
    }
}

fn key_to_pb(k: KeyRecord) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id,
        tenant: k.tenant,
        role: role_to_pb(k.role) as i32,
        label: k.label,
        create_time: Some(timestamp(k.create_time)),
        expire_time: k.expire_time.map(timestamp),
        revoke_time: k.revoke_time.map(timestamp),
    }
}

fn audit_to_pb(e: AuditRecord) -> pb::AuditEvent {
    pb::AuditEvent {
        time: e.time.map(timestamp),
        action: e.action,
        outcome: e.outcome,
        key_id: e.key_id,
        tenant: e.tenant,
        peer: e.peer,
        method: e.method,
        detail: e.detail,
    }
}

fn nonempty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for Admin {
    async fn get_cluster_status(
        &self,
        request: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::GetClusterStatusResponse>, Status> {
        let (downstreams, metrics) = (self.downstreams.clone(), self.metrics.clone());
        self.run(
            "GetClusterStatus",
            request,
            |_| String::new(),
            |_| async move {
                let mut services = vec![pb::ServiceStatus {
                    name: "gateway".to_owned(),
                    address: String::new(),
                    health: pb::ServiceHealth::Serving as i32,
                    detail: String::new(),
                    latency_ms: 0,
                }];
                let (checked, (now, recent)) =
                    futures::future::join(downstreams.check_all(), metrics.window(ALERT_WINDOW))
                        .await;
                services.extend(checked);
                let healthy = services
                    .iter()
                    .all(|s| s.health == pb::ServiceHealth::Serving as i32);
                let hour_before = metrics.past_window(ALERT_WINDOW, Duration::from_secs(3600));
                let alerts = alerts::evaluate(&alerts::Inputs {
                    services: &services,
                    now: &now,
                    recent: &recent,
                    hour_before: hour_before.as_ref(),
                });
                Ok(pb::GetClusterStatusResponse {
                    services,
                    healthy,
                    version: smartdb_kit::VERSION.to_owned(),
                    alerts,
                })
            },
        )
        .await
    }

    async fn get_metrics(
        &self,
        request: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        let metrics = self.metrics.clone();
        self.run(
            "GetMetrics",
            request,
            |_| String::new(),
            |r| async move { Ok(metrics.report(r.window_seconds).await) },
        )
        .await
    }

    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let edge = self.edge.clone();
        self.run(
            "CreateTenant",
            request,
            |r| format!("tenant {}", smartdb_kit::limits::truncate(&r.name, 80)),
            |r| async move {
                let tenant = edge.create_tenant(&r.name).await?;
                Ok(pb::CreateTenantResponse {
                    tenant: Some(tenant_to_pb(tenant)),
                })
            },
        )
        .await
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let edge = self.edge.clone();
        self.run(
            "ListTenants",
            request,
            |_| String::new(),
            |r| async move {
                let page = edge.list_tenants(r.page_size, &r.page_token).await?;
                Ok(pb::ListTenantsResponse {
                    tenants: page.items.into_iter().map(tenant_to_pb).collect(),
                    next_page_token: page.next,
                })
            },
        )
        .await
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let edge = self.edge.clone();
        let detail = |r: &pb::CreateApiKeyRequest| {
            format!(
                "tenant {}, role {}",
                smartdb_kit::limits::truncate(&r.tenant, 80),
                r.role().as_str_name()
            )
        };
        let admitted = self
            .edge
            .admit(&request, &admin_path("CreateApiKey"))
            .await?;
        let message = request.into_inner();
        let mut detail = detail(&message);
        let result = async {
            let role = match message.role() {
                pb::Role::Reader => Role::Reader,
                pb::Role::Writer => Role::Writer,
                pb::Role::Admin => Role::Admin,
                pb::Role::Unspecified => {
                    return Err(Error::invalid("role", "must be READER, WRITER or ADMIN"));
                }
            };
            let ttl = (message.ttl_seconds > 0).then(|| Duration::from_secs(message.ttl_seconds));
            edge.create_key(&message.tenant, role, &message.label, ttl)
                .await
        }
        .await;
        // The new key's id goes to the audit log; the key itself never does.
        if let Ok((_, record)) = &result {
            detail = format!("{detail}, key {}", record.id);
        }
        let result = result.map_err(Status::from);
        self.edge.audit_call(&admitted, detail, &result);
        let (key, record) = result?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            key,
            api_key: Some(key_to_pb(record)),
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let edge = self.edge.clone();
        self.run(
            "ListApiKeys",
            request,
            |_| String::new(),
            |r| async move {
                let page = edge
                    .list_keys(&r.tenant, r.page_size, &r.page_token)
                    .await?;
                Ok(pb::ListApiKeysResponse {
                    api_keys: page.items.into_iter().map(key_to_pb).collect(),
                    next_page_token: page.next,
                })
            },
        )
        .await
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let edge = self.edge.clone();
        self.run(
            "RevokeApiKey",
            request,
            |r| format!("key {}", smartdb_kit::limits::truncate(&r.id, 40)),
            |r| async move {
                let key = edge.revoke_key(&r.id).await?;
                Ok(pb::RevokeApiKeyResponse {
                    api_key: Some(key_to_pb(key)),
                })
            },
        )
        .await
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let edge = self.edge.clone();
        self.run(
            "ListAuditEvents",
            request,
            |_| String::new(),
            |r| async move {
                let filter = AuditFilter {
                    action: nonempty(r.action),
                    tenant: nonempty(r.tenant),
                    key_id: nonempty(r.key_id),
                    since: r
                        .since
                        .map(|t| {
                            SystemTime::try_from(t)
                                .map_err(|_| Error::invalid("since", "not a valid time"))
                        })
                        .transpose()?,
                };
                let page = edge.list_audit(&filter, r.page_size, &r.page_token).await?;
                Ok(pb::ListAuditEventsResponse {
                    events: page.items.into_iter().map(audit_to_pb).collect(),
                    next_page_token: page.next,
                })
            },
        )
        .await
    }
}
