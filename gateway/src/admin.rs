//! Cluster health as the gateway sees it: `AdminService.GetClusterStatus` (every replica of
//! every service), and the gateway's per-service health following each owner's health through
//! `grpc.health.v1.Health/Watch` streams (no polling).
//!
//! A downstream being away never makes the gateway itself unready (its overall status `""`
//! stays SERVING): only the public services that downstream owns report NOT_SERVING.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smartdb_kit::client::{ChannelOptions, Downstream as Client, channel};
use smartdb_kit::server::Health;
use smartdb_proto::v1 as pb;
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Time allowed for one health check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
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
}

impl Downstream {
    /// A downstream called `name`, reached through `client`, owning the public services `serves`.
    pub fn new(name: &'static str, client: Client, serves: &'static [&'static str]) -> Self {
        Self {
            name,
            client,
            serves,
            channels: Mutex::default(),
        }
    }

    fn channel(&self, addr: &str) -> Option<Channel> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(channel) = channels.get(addr) {
            return Some(channel.clone());
        }
        let channel = channel(addr, &ChannelOptions::default()).ok()?;
        channels.insert(addr.to_owned(), channel.clone());
        Some(channel)
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

/// `AdminService`.
pub struct Admin {
    downstreams: Arc<Downstreams>,
}

impl Admin {
    /// Reports on `downstreams`.
    pub fn new(downstreams: Arc<Downstreams>) -> Self {
        Self { downstreams }
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for Admin {
    async fn get_cluster_status(
        &self,
        _request: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::GetClusterStatusResponse>, Status> {
        let mut services = vec![pb::ServiceStatus {
            name: "gateway".to_owned(),
            address: String::new(),
            health: pb::ServiceHealth::Serving as i32,
            detail: String::new(),
            latency_ms: 0,
        }];
        services.extend(self.downstreams.check_all().await);
        let healthy = services
            .iter()
            .all(|s| s.health == pb::ServiceHealth::Serving as i32);
        Ok(Response::new(pb::GetClusterStatusResponse {
            services,
            healthy,
            version: smartdb_kit::VERSION.to_owned(),
        }))
    }
}
