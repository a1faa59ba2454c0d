//! ingest-svc: owns the catalog (knowledge bases, documents, indexing jobs, original files).
//! Uploads are stored durably and acknowledged; background workers then extract, chunk, embed
//! (through embed-svc) and index (through search-svc) them.

pub mod blobs;
pub mod catalog;
pub mod chunk;
pub mod downstream;
pub mod encryption;
pub mod error;
pub mod extract;
pub mod grpc;
pub mod store;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use smartdb_kit::client::Downstream as Client;
use smartdb_kit::config::{ServerArgs, parse_duration};
use smartdb_kit::server::ServiceServer;
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
    /// Keep the catalog (knowledge bases, documents, jobs) in MongoDB instead of the SQLite file
    /// in `--data-dir`, e.g. `mongodb://db-0,db-1,db-2/smartdb?replicaSet=rs0`: what several
    /// ingest-svc replicas must share (they then share the job queue). Originals then go to
    /// GridFS in the same database (uploads still spool to `--data-dir` while they arrive).
    /// The database is the URI's, else `smartdb`; the collections are `ingest.*`.
    #[arg(long, env = "SMARTDB_INGEST_MONGODB_URI", hide_env_values = true)]
    pub mongodb_uri: Option<String>,
    /// Most connections to MongoDB at once (the driver's pool size).
    #[arg(long, env = "SMARTDB_INGEST_MONGODB_POOL", default_value_t = 16)]
    pub mongodb_pool: u32,
    /// Address of embed-svc: `host:port`, a comma-separated list of replicas, or a DNS name
    /// resolving to all of them (re-resolved every few seconds).
    #[arg(long, env = "SMARTDB_EMBED_ADDR", default_value = "127.0.0.1:50054")]
    pub embed_addr: String,
    /// Address of search-svc (its IndexService), in the same forms.
    #[arg(long, env = "SMARTDB_SEARCH_ADDR", default_value = "127.0.0.1:50052")]
    pub search_addr: String,
    /// Indexing workers running at once. Enough to keep the model busy while others parse,
    /// store and commit; searches do not wait behind them (embed-svc serves queries first).
    #[arg(long, env = "SMARTDB_INGEST_WORKERS", default_value_t = 8)]
    pub workers: usize,
    /// How long a worker's claim on a job lasts without renewal: a job whose worker died is
    /// taken up again after this.
    #[arg(long, env = "SMARTDB_INGEST_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub lease: Duration,
    /// Tries a document gets (a crash of its worker counts, an unavailable dependency does not)
    /// before it is FAILED.
    #[arg(long, env = "SMARTDB_INGEST_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// How often originals and temp files that no document points at are removed.
    #[arg(long, env = "SMARTDB_INGEST_GC_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub gc_interval: Duration,
    /// Encrypts originals at rest with the keys in this file: one base64-encoded 32-byte key
    /// per line (e.g. `openssl rand -base64 32`), the first for new originals, the others to
    /// read older ones (rotation: add the new key on top and restart). Originals stored before
    /// encryption was turned on stay readable. Off when unset.
    #[arg(long, env = "SMARTDB_INGEST_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
    /// Test-only fault injection: a document whose text contains this string crashes the
    /// process while it is parsed.
    #[arg(long, env = "SMARTDB_TEST_CRASH_MARKER", hide = true)]
    pub crash_marker: Option<String>,
}

/// Runs ingest-svc until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let data_dir = smartdb_kit::config::service_data_dir(config.data_dir.as_ref(), "ingest")?;
    let limits = config.server.limits.clone();
    limits.validate()?;
    let keys = match &config.encryption_key_file {
        Some(path) => {
            let keys = encryption::Keyring::load(path)?;
            tracing::info!(key = %keys.current_id(), "originals are encrypted at rest");
            Some(keys)
        }
        None => None,
    };
    let originals_dir = data_dir.join("originals");
    let mongodb_uri = config
        .mongodb_uri
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty());
    let shared = mongodb_uri.is_some();
    let (store, blobs): (Arc<dyn store::CatalogStore>, _) = match mongodb_uri {
        Some(uri) => {
            let mongo = store::MongoStore::open(uri, config.mongodb_pool).await?;
            let originals = Arc::new(blobs::gridfs::GridFsOriginals::new(mongo.database()));
            tracing::info!("catalog and originals in MongoDB");
            let blobs = blobs::BlobStore::with_originals(&originals_dir, originals, keys)?;
            (Arc::new(mongo), blobs)
        }
        None => (
            Arc::new(store::SqliteStore::open(&data_dir.join("catalog.db"))?),
            blobs::BlobStore::open(&originals_dir, keys)?,
        ),
    };
    let clients = config.server.client_settings()?;
    let downstream = Arc::new(downstream::Downstream::new(
        Client::connect("embed-svc", &config.embed_addr, &clients).await?,
        Client::connect("search-svc", &config.search_addr, &clients).await?,
        limits.chunk_bytes,
    ));
    let jobs = worker::JobSettings {
        lease: config.lease,
        max_attempts: config.max_attempts.max(1),
        crash_marker: config.crash_marker.clone().filter(|m| !m.is_empty()),
    };
    let catalog = Arc::new(catalog::Catalog::new(
        store,
        blobs,
        downstream,
        limits.clone(),
        jobs,
    ));
    // Files younger than the longest upload may belong to one in flight.
    let grace = limits.max_deadline.max(Duration::from_secs(3600));
    // Nothing is uploading yet here: whatever a crashed process left behind can go now, unless
    // the originals are shared, where another replica may be between storing an original and
    // committing its row.
    let startup_grace = if shared { grace } else { Duration::ZERO };
    match catalog.collect_garbage(startup_grace).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(files = n, "removed leftovers of earlier crashes"),
        Err(err) => tracing::warn!(error = %err, "cannot collect garbage"),
    }

    let (stop_workers, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for id in 0..config.workers.max(1) {
        workers.push(tokio::spawn(worker::run(
            catalog.clone(),
            id,
            stop_rx.clone(),
        )));
    }
    let gc = {
        let catalog = catalog.clone();
        let every = config.gc_interval.max(Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(err) = catalog.collect_garbage(grace).await {
                    tracing::warn!(error = %err, "cannot collect garbage");
                }
            }
        })
    };

    let api = grpc::CatalogGrpc::new(catalog.clone());
    let mut server = ServiceServer::new("ingest-svc").await;
    let max = limits.message_bytes();
    server.add_service(
        KnowledgeBaseServiceServer::new(api.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    server.add_service(
        DocumentServiceServer::new(api)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    // Ready while the catalog answers and originals can be written: its own stores are its
    // only hard dependencies (embed-svc or search-svc being away only makes jobs wait).
    let readiness = {
        let catalog = catalog.clone();
        server.health().follow(Duration::from_secs(5), move || {
            let catalog = catalog.clone();
            async move { catalog.check_stores().await.map_err(|e| e.to_string()) }
        })
    };
    let result = server.run(&config.server, shutdown).await;
    // Workers stop at once and give their jobs back, so a restart picks them up without
    // waiting out the leases.
    gc.abort();
    readiness.abort();
    let _ = stop_workers.send(true);
    for worker in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
    }
    result
}
