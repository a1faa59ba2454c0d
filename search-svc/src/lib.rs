//! search-svc: owns the vector index (the only writer, through the internal `IndexService`) and
//! answers `SearchService` queries: embed the query through embed-svc, rank the knowledge base's
//! chunks by meaning (dense) and by keywords (BM25), fuse, return the best.

pub mod cache;
pub mod error;
pub mod grpc;
pub mod index;
pub mod lexical;
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
    /// How often, at most, a collection of the embedded index is flushed; in between, writes
    /// are durable in its commit log, which a restart replays (longer: cheaper writes, longer
    /// replays after a crash).
    #[arg(long, env = "SMARTDB_SEARCH_CHECKPOINT_INTERVAL", default_value = "1s", value_parser = smartdb_kit::config::parse_duration)]
    pub checkpoint_interval: std::time::Duration,
    /// Address of embed-svc: `host:port`, a comma-separated list of replicas, or a DNS name
    /// resolving to all of them (re-resolved every few seconds).
    #[arg(long, env = "SMARTDB_EMBED_ADDR", default_value = "127.0.0.1:50054")]
    pub embed_addr: String,
    /// Memory for the search-result cache, in MiB.
    #[arg(long, env = "SMARTDB_SEARCH_CACHE_MB", default_value_t = 64)]
    pub cache_mb: u64,
    /// How long a cached answer may be served.
    #[arg(long, env = "SMARTDB_SEARCH_CACHE_TTL", default_value = "30m", value_parser = smartdb_kit::config::parse_duration)]
    pub cache_ttl: Duration,
    /// Redis URL of the result cache shared by every search-svc replica, and of the knowledge
    /// bases' versions that keep it right (unset: memory only, fine for one replica).
    #[arg(long, env = "SMARTDB_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Longest a Redis call may take before the cache goes on without it.
    #[arg(long, env = "SMARTDB_SEARCH_REDIS_TIMEOUT", default_value = "100ms", value_parser = smartdb_kit::config::parse_duration)]
    pub redis_timeout: Duration,
    /// Reciprocal-rank fusion's k in hybrid search (larger flattens rank differences).
    #[arg(long, env = "SMARTDB_FUSION_K", default_value_t = search::Fusion::default().k)]
    pub fusion_k: f32,
    /// Weight of the dense (meaning) ranking in hybrid search.
    #[arg(long, env = "SMARTDB_FUSION_DENSE_WEIGHT", default_value_t = search::Fusion::default().dense_weight)]
    pub dense_weight: f32,
    /// Weight of the keyword (BM25) ranking in hybrid search.
    #[arg(long, env = "SMARTDB_FUSION_LEXICAL_WEIGHT", default_value_t = search::Fusion::default().lexical_weight)]
    pub lexical_weight: f32,
    /// Hits each ranking contributes to the fusion, at least.
    #[arg(long, env = "SMARTDB_FUSION_CANDIDATES", default_value_t = search::Fusion::default().candidates)]
    pub fusion_candidates: usize,
    /// BM25 k1 (term-frequency saturation).
    #[arg(long, env = "SMARTDB_BM25_K1", default_value_t = lexical::Bm25Settings::default().k1)]
    pub bm25_k1: f64,
    /// BM25 b (length normalization, 0 to 1).
    #[arg(long, env = "SMARTDB_BM25_B", default_value_t = lexical::Bm25Settings::default().b)]
    pub bm25_b: f64,
    /// BM25 average chunk length in terms.
    #[arg(long, env = "SMARTDB_BM25_AVG_LEN", default_value_t = lexical::Bm25Settings::default().avg_len)]
    pub bm25_avg_len: f64,
    /// A Qdrant server or cluster instead of the embedded engine (`--qdrant-url`, ...).
    #[command(flatten)]
    pub qdrant: index::qdrant::QdrantArgs,
}

/// Runs search-svc until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let data_dir = smartdb_kit::config::service_data_dir(config.data_dir.as_ref(), "search")?;
    let analyzer = Arc::new(lexical::Analyzer::new(lexical::Bm25Settings {
        k1: config.bm25_k1,
        b: config.bm25_b,
        avg_len: config.bm25_avg_len,
    })?);
    let index: Arc<dyn index::VectorIndex> = if config.qdrant.url.is_some() {
        // Sparse vectors come with each point and query; Qdrant applies the IDF.
        Arc::new(index::QdrantIndex::connect(config.qdrant.clone()).await?)
    } else {
        let dir = data_dir.clone();
        let analyzer = analyzer.clone();
        let every = config.checkpoint_interval;
        Arc::new(
            tokio::task::spawn_blocking(move || {
                index::edge::EdgeIndex::open_with_checkpoints(&dir, analyzer, every)
            })
            .await??,
        )
    };
    let redis = match &config.redis_url {
        Some(url) => {
            tracing::info!("search results cached in Redis too, shared by every replica");
            Some(Arc::new(smartdb_kit::redis::Redis::new(
                url,
                config.redis_timeout,
                "search result cache",
                "search_cache_errors_total",
            )?))
        }
        None => None,
    };
    let versions = Arc::new(cache::Versions::new(redis.clone()));
    let embed = Downstream::connect(
        "embed-svc",
        &config.embed_addr,
        &config.server.client_settings()?,
    )
    .await?;
    let limits = config.server.limits.clone();
    let max = limits.message_bytes();
    let searcher = Arc::new(search::Searcher::new(
        index.clone(),
        embed,
        analyzer.clone(),
        cache::ResultCache::new(config.cache_mb << 20, config.cache_ttl, redis),
        versions.clone(),
        limits,
        search::Fusion {
            k: config.fusion_k.max(0.0),
            dense_weight: config.dense_weight.max(0.0),
            lexical_weight: config.lexical_weight.max(0.0),
            candidates: config.fusion_candidates.clamp(1, search::MAX_DEPTH),
        },
    ));

    let mut server = ServiceServer::new("search-svc").await;
    server.add_service(
        SearchServiceServer::new(grpc::SearchGrpc::new(searcher))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    server.add_service(
        IndexServiceServer::new(grpc::IndexGrpc::new(index, versions, analyzer))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    let health = server.health();
    // The index is open: this service can answer (searches degrade on their own if embed-svc is away).
    tokio::spawn(async move { health.set_serving().await });
    server.run(&config.server, shutdown).await
}
