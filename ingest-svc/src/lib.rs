//! ingest-svc: owns the catalog (knowledge bases, documents, indexing jobs, original files).
//! Uploads are stored durably and acknowledged; background workers then extract, chunk, embed
//! (through embed-svc) and index (through search-svc) them.

pub mod blobs;
pub mod catalog;
pub mod chunk;
pub mod downstream;
pub mod error;
pub mod extract;
pub mod grpc;
pub mod store;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use smartdb_kit::client::{ChannelOptions, channel};
use smartdb_kit::config::ServerArgs;
use smartdb_kit::server::{MAX_MESSAGE_BYTES, ServiceServer};
use smartdb_proto::v1::document_service_server::DocumentServiceServer;
use smartdb_proto::v1::knowledge_base_service_server::KnowledgeBaseServiceServer;

pub use error::{Error, Result};

/// Configuration of ingest-svc.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Listen addresses and logging.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Directory of the catalog and the originals (default: `<SMARTDB_DATA_DIR>/ingest`).
    #[arg(long, env = "SMARTDB_INGEST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of embed-svc.
    #[arg(long, env = "SMARTDB_EMBED_ADDR", default_value = "127.0.0.1:50054")]
    pub embed_addr: String,
    /// Address of search-svc (its IndexService).
    #[arg(long, env = "SMARTDB_SEARCH_ADDR", default_value = "127.0.0.1:50052")]
    pub search_addr: String,
    /// Indexing workers running at once.
    #[arg(long, env = "SMARTDB_INGEST_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Largest document accepted, in MiB.
    #[arg(long, env = "SMARTDB_MAX_DOCUMENT_MB", default_value_t = 32)]
    pub max_document_mb: usize,
}

/// Runs ingest-svc until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let data_dir = smartdb_kit::config::service_data_dir(config.data_dir.as_ref(), "ingest")?;
    let store = store::Store::open(&data_dir.join("catalog.db"))?;
    let blobs = blobs::BlobStore::open(&data_dir.join("originals"))?;
    let options = ChannelOptions::default();
    let downstream = Arc::new(downstream::Downstream::new(
        channel(&config.embed_addr, &options)?,
        channel(&config.search_addr, &options)?,
    ));
    let limits = catalog::Limits {
        max_document_bytes: config.max_document_mb * 1024 * 1024,
    };
    let catalog = Arc::new(catalog::Catalog::new(store, blobs, downstream, limits));

    let (stop_workers, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for id in 0..config.workers.max(1) {
        workers.push(tokio::spawn(worker::run(
            catalog.clone(),
            id,
            stop_rx.clone(),
        )));
    }

    let api = grpc::CatalogGrpc::new(catalog);
    let mut server = ServiceServer::new("ingest-svc").await;
    server.add_service(KnowledgeBaseServiceServer::new(api.clone()));
    server.add_service(
        DocumentServiceServer::new(api)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let health = server.health();
    tokio::spawn(async move { health.set_serving().await });
    let result = server.run(&config.server, shutdown).await;
    // Workers stop between jobs; an interrupted job is claimed again after its lease.
    let _ = stop_workers.send(true);
    for worker in workers {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), worker).await;
    }
    result
}
