//! Cluster health as the gateway sees it: `AdminService.GetClusterStatus`, and the mirroring
//! of each owner's health into the gateway's per-service health.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smartdb_kit::server::Health;
use smartdb_proto::v1 as pb;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Time allowed for one health check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One service the gateway depends on.
pub struct Downstream {
    name: &'static str,
    address: String,
    health: HealthClient<Channel>,
    /// Public services (full names) that this downstream owns.
    serves: &'static [&'static str],
}

impl Downstream {
    /// A downstream called `name` at `address`, owning the public services `serves`.
    pub fn new(
        name: &'static str,
        address: &str,
        channel: Channel,
        serves: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            address: address.to_owned(),
            health: HealthClient::new(channel),
            serves,
        }
    }

    async fn check(&self) -> pb::ServiceStatus {
        let started = Instant::now();
        let mut request = Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(CHECK_TIMEOUT);
        let result = tokio::time::timeout(CHECK_TIMEOUT, self.health.clone().check(request)).await;
        let (health, detail) = match result {
            Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => {
                (pb::ServiceHealth::Serving, String::new())
            }
            Ok(Ok(_)) => (pb::ServiceHealth::NotServing, "not ready yet".to_owned()),
            Ok(Err(status)) => (pb::ServiceHealth::Unreachable, status.message().to_owned()),
            Err(_) => (
                pb::ServiceHealth::Unreachable,
                "health check timed out".to_owned(),
            ),
        };
        pb::ServiceStatus {
            name: self.name.to_owned(),
            address: self.address.clone(),
            health: health as i32,
            detail,
            latency_ms: started.elapsed().as_millis() as u32,
        }
    }
}

/// All downstreams.
pub struct Downstreams {
    list: Vec<Downstream>,
}

impl Downstreams {
    /// The given downstreams.
    pub fn new(list: Vec<Downstream>) -> Self {
        Self { list }
    }

    /// Checks every downstream concurrently.
    pub async fn check_all(&self) -> Vec<pb::ServiceStatus> {
        futures::future::join_all(self.list.iter().map(Downstream::check)).await
    }
}

/// Keeps the gateway's per-service health equal to the health of each service's owner.
pub async fn mirror_health(downstreams: Arc<Downstreams>, health: Health, every: Duration) {
    loop {
        let statuses = downstreams.check_all().await;
        for (downstream, status) in downstreams.list.iter().zip(&statuses) {
            let serving = status.health == pb::ServiceHealth::Serving as i32;
            for service in downstream.serves {
                health.set_service(service, serving).await;
            }
        }
        tokio::time::sleep(every).await;
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
