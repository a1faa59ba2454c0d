//! embed-svc: owns the embedding models and the embedding cache. `serve` starts the gRPC
//! server at once (NOT_SERVING), obtains and loads the model, then reports SERVING.

pub mod cache;
pub mod embedder;
pub mod error;
pub mod grpc;
pub mod model;
pub mod provider;

use std::path::PathBuf;
use std::sync::Arc;

use smartdb_kit::config::ServerArgs;
use smartdb_kit::server::{MAX_MESSAGE_BYTES, ServiceServer};
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
    /// Embed calls allowed to wait for the local model before callers get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SMARTDB_EMBED_QUEUE", default_value_t = 64)]
    pub queue_depth: usize,
}

/// Runs embed-svc until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cell: Arc<OnceCell<Arc<embedder::Embedder>>> = Arc::new(OnceCell::new());
    let mut server = ServiceServer::new("embed-svc").await;
    server.add_service(
        EmbedServiceServer::new(grpc::EmbedGrpc::new(cell.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let health = server.health();

    let models_dir = config
        .models_dir
        .clone()
        .unwrap_or_else(model::default_models_dir);
    let cache_bytes = config.cache_mb * 1024 * 1024;
    let queue_depth = config.queue_depth;
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
                    model::LocalModel::load(&dir, spec)
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
                    let provider = Arc::new(provider::LocalProvider::new(local, queue_depth));
                    let embedder =
                        embedder::Embedder::new(provider, cache::EmbeddingCache::new(cache_bytes));
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
