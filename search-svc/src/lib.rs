//! search-svc: owns the vector index (the only writer, through the internal `IndexService`) and
//! answers `SearchService` queries: embed the query through embed-svc, search the knowledge
//! base's collection, return the best chunks.

pub mod cache;
pub mod error;
pub mod grpc;
pub mod index;
pub mod search;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use smartdb_kit::client::Downstream;
use smartdb_kit::config::ServerArgs;
use smartdb_kit::server::ServiceServer;
use smartdb_proto::v1::index_service_server::IndexServiceServer;
use smartdb_proto::v1::search_service_server::SearchServiceServer;

pub use error::{Error, Result};

/// Configuration of search-svc.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Listen addresses and logging.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Directory of the embedded index (default: `<SMARTDB_DATA_DIR>/search`).
    #[arg(long, env = "SMARTDB_SEARCH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of embed-svc: `host:port`, a comma-separated list of replicas, or a DNS name
    /// resolving to all of them (re-resolved every few seconds).
    #[arg(long, env = "SMARTDB_EMBED_ADDR", default_value = "127.0.0.1:50054")]
    pub embed_addr: String,
    /// Memory for the search-result cache, in MiB.
    #[arg(long, env = "SMARTDB_SEARCH_CACHE_MB", default_value_t = 64)]
    pub cache_mb: u64,
    /// How long a cached answer may be served.
    #[arg(long, env = "SMARTDB_SEARCH_CACHE_TTL", default_value = "10m", value_parser = smartdb_kit::config::parse_duration)]
    pub cache_ttl: Duration,
}

/// Runs search-svc until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let data_dir = smartdb_kit::config::service_data_dir(config.data_dir.as_ref(), "search")?;
    let index: Arc<dyn index::VectorIndex> = {
        let dir = data_dir.clone();
        Arc::new(tokio::task::spawn_blocking(move || index::edge::EdgeIndex::open(&dir)).await??)
    };
    let versions = Arc::new(cache::Versions::default());
    let embed = Downstream::connect(
        "embed-svc",
        &config.embed_addr,
        &config.server.client_settings(),
    )
    .await?;
    let limits = config.server.limits.clone();
    let max = limits.message_bytes();
    let searcher = Arc::new(search::Searcher::new(
        index.clone(),
        embed,
        cache::ResultCache::new(config.cache_mb << 20, config.cache_ttl),
        versions.clone(),
        limits,
    ));

    let mut server = ServiceServer::new("search-svc").await;
    server.add_service(
        SearchServiceServer::new(grpc::SearchGrpc::new(searcher))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    server.add_service(
        IndexServiceServer::new(grpc::IndexGrpc::new(index, versions))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    let health = server.health();
    // The index is open: this service can answer (searches degrade on their own if embed-svc is away).
    tokio::spawn(async move { health.set_serving().await });
    server.run(&config.server, shutdown).await
}
