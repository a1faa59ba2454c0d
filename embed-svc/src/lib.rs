//! embed-svc: owns the embedding models and the embedding cache. `serve` starts the gRPC
//! server at once (NOT_SERVING), obtains and loads the model, then reports SERVING.

pub mod cache;
pub mod embedder;
pub mod error;
pub mod grpc;
pub mod http_api;
pub mod model;
pub mod openai;
pub mod provider;

use std::path::PathBuf;
use std::sync::Arc;

use provider::Provider;
use smartdb_kit::config::ServerArgs;
use smartdb_kit::server::ServiceServer;
use smartdb_proto::v1::embed_service_server::EmbedServiceServer;
use tokio::sync::OnceCell;

pub use error::{Error, Result};

/// Configuration of embed-svc.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Listen addresses and logging.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Directory holding downloaded models (default: `$SMARTDB_MODELS_DIR`, else
    /// `~/.cache/smartdb/models`).
    #[arg(long, env = "SMARTDB_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Memory for the embedding cache, in MiB.
    #[arg(long, env = "SMARTDB_EMBED_CACHE_MB", default_value_t = 256)]
    pub cache_mb: u64,
    /// Embed calls of each kind (queries, documents) allowed to wait for the local model before
    /// callers get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SMARTDB_EMBED_QUEUE", default_value_t = 64)]
    pub queue_depth: usize,
    /// Most texts the local model embeds in one coalesced batch.
    #[arg(long, env = "SMARTDB_EMBED_BATCH_TEXTS", default_value_t = 64)]
    pub batch_texts: usize,
    /// How long a small batch waits for concurrent calls to join it. With 0, a lone call runs at
    /// once and calls that arrive while the model is busy form the next batch.
    #[arg(long, env = "SMARTDB_EMBED_BATCH_WINDOW", default_value = "0ms", value_parser = smartdb_kit::config::parse_duration)]
    pub batch_window: std::time::Duration,
    /// Arithmetic of the local model: `auto` uses bf16 products (f32 sums) on CPUs with
    /// AVX-512 BF16, `f32` never rounds.
    #[arg(long, env = "SMARTDB_EMBED_PRECISION", value_enum, default_value_t = model::Precision::Auto)]
    pub precision: model::Precision,
    /// Base URL of an OpenAI-compatible embeddings API (e.g. `https://api.openai.com/v1`, or a
    /// vLLM/TEI/Ollama server); when set, its model is offered next to the local one.
    #[arg(long, env = "SMARTDB_OPENAI_BASE_URL")]
    pub openai_base_url: Option<String>,
    /// Model name at that endpoint; also the model id knowledge bases use to pick it.
    #[arg(
        long,
        env = "SMARTDB_OPENAI_MODEL",
        default_value = "text-embedding-3-small"
    )]
    pub openai_model: String,
    /// API key for that endpoint.
    #[arg(long, env = "SMARTDB_OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// Vector length to request from it (unset: the model's own, found with one probe call).
    #[arg(long, env = "SMARTDB_OPENAI_DIMENSIONS")]
    pub openai_dimensions: Option<u32>,
    /// That model's input limit in tokens (knowledge bases using it chunk text by it).
    #[arg(long, env = "SMARTDB_OPENAI_MAX_INPUT_TOKENS", default_value_t = 8192)]
    pub openai_max_input_tokens: usize,
    /// Consecutive failed requests to that endpoint (each after its retries) that open its
    /// circuit breaker: its model then fails at once with UNAVAILABLE for a while.
    #[arg(long, env = "SMARTDB_OPENAI_BREAKER_FAILURES", default_value_t = 3)]
    pub openai_breaker_failures: u32,
    /// How long that breaker stays open before a trial request (doubling up to 1 minute while
    /// trials fail).
    #[arg(long, env = "SMARTDB_OPENAI_BREAKER_OPEN", default_value = "10s", value_parser = smartdb_kit::config::parse_duration)]
    pub openai_breaker_open: std::time::Duration,
    /// Requests in flight at once to that endpoint.
    #[arg(long, env = "SMARTDB_OPENAI_CONCURRENCY", default_value_t = 4)]
    pub openai_concurrency: usize,
    /// Redis URL of the shared second-level embedding cache (unset: memory only).
    #[arg(long, env = "SMARTDB_REDIS_URL")]
    pub redis_url: Option<String>,
    /// How long embeddings stay in the Redis cache.
    #[arg(long, env = "SMARTDB_EMBED_REDIS_TTL", default_value = "24h", value_parser = smartdb_kit::config::parse_duration)]
    pub redis_ttl: std::time::Duration,
}

impl Config {
    /// The defaults (as with no flags) listening on `listen`: for benches and in-process tests.
    pub fn with_defaults(listen: std::net::SocketAddr) -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: Config,
        }
        <Defaults as clap::Parser>::parse_from(["embed-svc", "--listen", &listen.to_string()])
            .config
    }
}

/// Runs embed-svc until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cell: Arc<OnceCell<Arc<embedder::Embedder>>> = Arc::new(OnceCell::new());
    let mut server = ServiceServer::new("embed-svc").await;
    let max = config.server.limits.message_bytes();
    server.add_service(
        EmbedServiceServer::new(grpc::EmbedGrpc::new(cell.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    // OpenAI-compatible `POST /v1/embeddings` next to /metrics, for tools that speak that API.
    server.http_routes(http_api::router(cell.clone()));
    let health = server.health();

    let models_dir = config
        .models_dir
        .clone()
        .unwrap_or_else(model::default_models_dir);
    let cache_bytes = config.cache_mb * 1024 * 1024;
    // Built before the model loads so a bad URL fails start-up; Redis itself may come up later.
    let embedding_cache = match &config.redis_url {
        Some(url) => {
            let settings = cache::RedisSettings {
                ttl: config.redis_ttl,
                ..cache::RedisSettings::new(url.clone())
            };
            let built = cache::EmbeddingCache::with_redis(cache_bytes, &settings)?;
            tracing::info!(ttl = ?config.redis_ttl, "Redis embedding cache enabled");
            built
        }
        None => cache::EmbeddingCache::new(cache_bytes),
    };
    let openai = match &config.openai_base_url {
        Some(base_url) => {
            let mut settings =
                openai::OpenAiConfig::new(base_url.clone(), config.openai_model.clone());
            settings.api_key = config.openai_api_key.clone();
            settings.dimensions = config.openai_dimensions;
            settings.max_input_tokens = config.openai_max_input_tokens;
            settings.breaker_failures = config.openai_breaker_failures;
            settings.breaker_open = config.openai_breaker_open;
            settings.max_concurrency = config.openai_concurrency.max(1);
            Some(Arc::new(openai::OpenAiProvider::new(settings)?))
        }
        None => None,
    };
    let queue_depth = config.queue_depth;
    let precision = config.precision;
    let limits = provider::BatchLimits {
        max_texts: config.batch_texts.max(1),
        max_tokens: config.batch_texts.max(1) * model::MINILM_L6_V2.max_tokens,
        window: config.batch_window,
    };
    // Load in the background so probes and reflection answer while the model arrives; a
    // failed download is retried, since the network may come back.
    tokio::spawn(async move {
        let mut delay = std::time::Duration::from_secs(2);
        loop {
            let dir = models_dir.clone();
            let loaded =
                tokio::task::spawn_blocking(move || -> anyhow::Result<model::LocalModel> {
                    let spec = &model::MINILM_L6_V2;
                    let dir = model::ensure_model(&dir, spec)?;
                    model::LocalModel::load_with(&dir, spec, precision)
                })
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r);
            match loaded {
                Ok(local) => {
                    tracing::info!(
                        model = local.id(),
                        dimension = local.dimension(),
                        "model loaded"
                    );
                    let provider = Arc::new(provider::LocalProvider::with_limits(
                        local,
                        queue_depth,
                        limits,
                    ));
                    let mut embedder = embedder::Embedder::new(provider, embedding_cache.clone());
                    if let Some(remote) = &openai {
                        // Learn the vector length now, so knowledge bases can be created with it.
                        match remote.probe().await {
                            Ok(dimension) => {
                                tracing::info!(model = %remote.descriptor().id, dimension, "OpenAI-compatible model ready")
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "OpenAI-compatible endpoint did not answer the probe; its dimension is unknown until it does")
                            }
                        }
                        embedder.add(remote.clone());
                    }
                    let _ = cell.set(Arc::new(embedder));
                    health.set_serving().await;
                    return;
                }
                Err(err) => {
                    tracing::error!(error = format!("{err:#}"), retry_in = ?delay, "cannot load the embedding model; NOT_SERVING until it loads");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(60));
                }
            }
        }
    });

    server.run(&config.server, shutdown).await
}
