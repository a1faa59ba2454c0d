//! gateway: the public edge of smartdb. It serves the public services (`KnowledgeBaseService`,
//! `DocumentService`, `SearchService`, `AdminService`) by calling the services that own the
//! data, and reports their health as its own per-service health.
//!
//! It is the only place where caller identity enters the cluster: every public call is
//! admitted by the edge (API key, tenant, role, rate limits; see [`edge`]), and internal
//! `x-smartdb-*` metadata is stripped from it before the caller's context is built.

pub mod admin;
pub mod alerts;
pub mod cluster_metrics;
pub mod edge;
pub mod error;
pub mod forward;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

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
    /// Authentication, limits and audit.
    #[command(flatten)]
    pub edge: EdgeArgs,
}

/// Settings of the edge: who may call, how often, and what is recorded.
#[derive(Debug, Clone, clap::Args)]
pub struct EdgeArgs {
    /// Folder for the gateway's own data (tenants, API-key hashes, audit log); default
    /// `<SMARTDB_DATA_DIR>/gateway`.
    #[arg(long = "data-dir", env = "SMARTDB_GATEWAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep tenants, keys and the audit log in MongoDB instead of the SQLite file in
    /// `--data-dir`, e.g. `mongodb://db-0,db-1,db-2/smartdb?replicaSet=rs0`: what every gateway
    /// replica must share. The database is the URI's, else `smartdb`; the collections are
    /// `gateway.*`.
    #[arg(long, env = "SMARTDB_GATEWAY_MONGODB_URI", hide_env_values = true)]
    pub mongodb_uri: Option<String>,
    /// An admin API key accepted in addition to stored keys (acting for tenant `default`),
    /// to bootstrap the first tenants and keys. `smartdb up` sets it from
    /// `<data-dir>/admin.key`.
    #[arg(long, env = "SMARTDB_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Turn authentication, authorization and rate limits off: every caller is an admin of
    /// tenant `default`. Only for benchmarks and trusted single-user setups.
    #[arg(long, env = "SMARTDB_GATEWAY_NO_AUTH")]
    pub no_auth: bool,
    /// Rate overrides in calls per second, comma-separated: `role.class=N` (roles reader,
    /// writer, admin; classes search, ingest, admin) and `address=N` (per client address).
    #[arg(long, env = "SMARTDB_GATEWAY_RATES", default_value = "")]
    pub rates: String,
    /// Redis shared by every gateway replica for rate limits and blocks, e.g.
    /// `redis://127.0.0.1:6379/`; without it each replica limits on its own. If Redis cannot
    /// be reached, each replica falls back to its own limits until it can.
    #[arg(long, env = "SMARTDB_GATEWAY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Rate-limit violations within `--strike-window` that block a key or address.
    #[arg(
        long,
        env = "SMARTDB_GATEWAY_BLOCK_AFTER_VIOLATIONS",
        default_value_t = 50
    )]
    pub block_after_violations: u32,
    /// Failed authentications within `--strike-window` that block a client address.
    #[arg(
        long,
        env = "SMARTDB_GATEWAY_BLOCK_AFTER_AUTH_FAILURES",
        default_value_t = 20
    )]
    pub block_after_auth_failures: u32,
    /// Window in which violations and failures are counted.
    #[arg(long, env = "SMARTDB_GATEWAY_STRIKE_WINDOW", default_value = "60s", value_parser = smartdb_kit::config::parse_duration)]
    pub strike_window: Duration,
    /// How long a block lasts.
    #[arg(long, env = "SMARTDB_GATEWAY_BLOCK_FOR", default_value = "5m", value_parser = smartdb_kit::config::parse_duration)]
    pub block_for: Duration,
    /// How long a looked-up API key is trusted; a revoked key works at most this long at a
    /// gateway that used it just before.
    #[arg(long, env = "SMARTDB_GATEWAY_KEY_CACHE_TTL", default_value = "2s", value_parser = smartdb_kit::config::parse_duration)]
    pub key_cache_ttl: Duration,
    /// How long audit events are kept.
    #[arg(long, env = "SMARTDB_AUDIT_RETENTION", default_value = "2160h", value_parser = smartdb_kit::config::parse_duration)]
    pub audit_retention: Duration,
    /// Most audit events kept (the oldest go first).
    #[arg(long, env = "SMARTDB_AUDIT_MAX_EVENTS", default_value_t = 1_000_000)]
    pub audit_max_events: usize,
}

impl EdgeArgs {
    /// Opens the store and builds the edge.
    async fn build(&self) -> anyhow::Result<Arc<edge::Edge>> {
        let (store, place): (Arc<dyn edge::store::EdgeStore>, String) =
            match self.mongodb_uri.as_deref().filter(|u| !u.trim().is_empty()) {
                Some(uri) => (
                    Arc::new(edge::store::mongo::MongoStore::open(uri).await?),
                    // The URI may hold a password: name only what kind of store it is.
                    "MongoDB".to_owned(),
                ),
                None => {
                    let dir =
                        smartdb_kit::config::service_data_dir(self.data_dir.as_ref(), "gateway")?;
                    let path = dir.join("edge.db");
                    let store = edge::store::sqlite::SqliteStore::open(&path)?;
                    (Arc::new(store), path.display().to_string())
                }
            };
        let rates = edge::throttle::Rates::parse(&self.rates)
            .map_err(|e| anyhow::anyhow!("--rates / SMARTDB_GATEWAY_RATES: {e}"))?;
        let bootstrap = match self.admin_key.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(key) if key.len() < 20 => {
                anyhow::bail!(
                    "SMARTDB_ADMIN_KEY is too short to be safe: use at least 20 random characters"
                )
            }
            Some(key) => Some(edge::keys::hash(key)),
        };
        if self.no_auth {
            tracing::warn!(
                "authentication and rate limits are OFF (--no-auth): every caller is an admin"
            );
        } else if bootstrap.is_none() {
            tracing::info!("no SMARTDB_ADMIN_KEY: only API keys stored in {place} are accepted");
        }
        edge::Edge::new(
            store,
            edge::EdgeSettings {
                enabled: !self.no_auth,
                bootstrap,
                redis_url: self.redis_url.clone().filter(|u| !u.is_empty()),
                throttle: edge::throttle::ThrottleConfig {
                    rates,
                    violations: self.block_after_violations,
                    auth_failures: self.block_after_auth_failures,
                    window: self.strike_window,
                    block_for: self.block_for,
                },
                key_cache_ttl: self.key_cache_ttl,
                audit_retention: self.audit_retention,
                audit_max_events: self.audit_max_events,
            },
        )
        .await
        .with_context(|| format!("gateway store {place}"))
    }
}

/// Runs the gateway until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let edge = config.edge.build().await?;
    let clients = config.server.client_settings()?;
    let options = smartdb_kit::client::ChannelOptions {
        tls: clients.tls.clone(),
        ..Default::default()
    };
    let ingest = Client::connect("ingest-svc", &config.ingest_addr, &clients).await?;
    let search = Client::connect("search-svc", &config.search_addr, &clients).await?;
    let embed = Client::connect("embed-svc", &config.embed_addr, &clients).await?;

    let downstreams = Arc::new(admin::Downstreams::new(vec![
        admin::Downstream::new(
            "search-svc",
            search.clone(),
            &[names::SEARCH],
            options.clone(),
        ),
        admin::Downstream::new(
            "ingest-svc",
            ingest.clone(),
            &[names::KNOWLEDGE_BASE, names::DOCUMENT],
            options.clone(),
        ),
        admin::Downstream::new("embed-svc", embed, &[], options),
    ]));
    let limits = &config.server.limits;
    let max = limits.message_bytes();
    let forward = forward::Forward::new(edge.clone(), ingest, search, limits);

    let metrics = Arc::new(cluster_metrics::ClusterMetrics::new(downstreams.clone()));
    tokio::spawn(metrics.clone().sample());
    let mut server = ServiceServer::new("gateway").await;
    // The public port: the gateway's own metrics stay on its HTTP /metrics and in GetMetrics.
    server.without_telemetry();
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
                metrics,
                edge,
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
