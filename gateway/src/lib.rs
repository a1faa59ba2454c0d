//! gateway: the public edge of smartdb. It serves the public services (`KnowledgeBaseService`,
//! `DocumentService`, `SearchService`, `AdminService`) by calling the services that own the
//! data, and reports their health as its own per-service health.
//!
//! It is the only place where caller identity enters the cluster: internal `x-smartdb-*`
//! metadata is stripped from every incoming call before the caller's context is built.

pub mod admin;
pub mod forward;

use std::sync::Arc;
use std::time::Duration;

use smartdb_kit::client::Downstream as Client;
use smartdb_kit::config::ServerArgs;
use smartdb_kit::server::ServiceServer;
use smartdb_proto::names;
use smartdb_proto::v1 as pb;

/// Configuration of the gateway.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Listen addresses and logging.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Address of ingest-svc: `host:port`, a comma-separated list of replicas, or a DNS name
    /// resolving to all of them (re-resolved every few seconds).
    #[arg(long, env = "SMARTDB_INGEST_ADDR", default_value = "127.0.0.1:50053")]
    pub ingest_addr: String,
    /// Address of search-svc.
    #[arg(long, env = "SMARTDB_SEARCH_ADDR", default_value = "127.0.0.1:50052")]
    pub search_addr: String,
    /// Address of embed-svc (for cluster status).
    #[arg(long, env = "SMARTDB_EMBED_ADDR", default_value = "127.0.0.1:50054")]
    pub embed_addr: String,
    /// How often the set of downstream replicas is looked at again for health watching (their
    /// health itself is followed through `Health/Watch` streams as it changes).
    #[arg(long, env = "SMARTDB_HEALTH_INTERVAL", default_value = "2s", value_parser = smartdb_kit::config::parse_duration)]
    pub health_interval: Duration,
}

/// Runs the gateway until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let clients = config.server.client_settings();
    let ingest = Client::connect("ingest-svc", &config.ingest_addr, &clients).await?;
    let search = Client::connect("search-svc", &config.search_addr, &clients).await?;
    let embed = Client::connect("embed-svc", &config.embed_addr, &clients).await?;

    let downstreams = Arc::new(admin::Downstreams::new(vec![
        admin::Downstream::new("search-svc", search.clone(), &[names::SEARCH]),
        admin::Downstream::new(
            "ingest-svc",
            ingest.clone(),
            &[names::KNOWLEDGE_BASE, names::DOCUMENT],
        ),
        admin::Downstream::new("embed-svc", embed, &[]),
    ]));
    let limits = &config.server.limits;
    let max = limits.message_bytes();
    let forward = forward::Forward::new(ingest, search, limits);

    let mut server = ServiceServer::new("gateway").await;
    server
        .add_service(
            pb::knowledge_base_service_server::KnowledgeBaseServiceServer::new(forward.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            pb::document_service_server::DocumentServiceServer::new(forward.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            pb::search_service_server::SearchServiceServer::new(forward)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            pb::admin_service_server::AdminServiceServer::new(admin::Admin::new(
                downstreams.clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        );
    let health = server.health();
    tokio::spawn(async move {
        health.set_serving().await;
        // Public services are only as healthy as the service that owns them.
        admin::mirror_health(downstreams, health, config.health_interval).await;
    });
    server.run(&config.server, shutdown).await
}
