//! [`VectorIndex`] on qdrant-edge: one embedded shard per collection, inside this process.
//!
//! Layout of the index directory:
//! - `collections.json`: the registry of [`CollectionInfo`], replaced atomically on every change;
//! - `collections/<id>/`: the collection's qdrant-edge shard;
//! - `.lock`: locked while open, so two processes never share the directory.
//!
//! qdrant-edge is synchronous and does blocking file I/O, so every engine call runs on tokio's
//! blocking pool.
//!
//! Durability: qdrant-edge 0.7.1 appends each update to its WAL but never replays the WAL when a
//! shard is loaded, so an update survives a crash only once its segments are flushed, which
//! costs far more than the update. So every write is first appended to the collection's own
//! [`CommitLog`] and synced there before it is acknowledged (writes that arrive together share
//! one sync: group commit, see `Shard::write`); the shard is flushed (`EdgeShard::flush`, which
//! fsyncs) at most once a second, after which the log starts over, and a collection's log is
//! replayed when it is opened. The engine never truncates its WAL either, so [`trim_wal`] does,
//! whenever a shard is opened, and a collection whose WAL outgrew `Tuning::wal_reopen_bytes` is
//! reopened after its next optimization run:
//! without that the WAL kept every write ever made, on disk and in memory (455 MB of search-svc's
//! 661 MB at 100k chunks).
//!
//! Payload: [`super::ChunkPayload`] as JSON plus `metadata_pairs`; `document_id` and
//! `metadata_pairs` are keyword-indexed: filtered searches then skip reading payloads from disk
//! (at 20,000 chunks a metadata filter took 4 ms instead of 90 ms).
//!
//! Optimization: qdrant-edge only merges segments and builds HNSW graphs when asked. After every
//! 1000 written points a background task runs its optimizers; they do nothing until a segment
//! holds more than 10 MB of vectors (~6,500 at 384 dimensions), below which search is brute force.
//! Writes to a collection wait while it is optimized (20,000 x 384 took 20-55 s on 2 busy cores);
//! searches go on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, TryLockError};
use std::io::{self, Write as _};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use qdrant_edge::external::ordered_float;
use qdrant_edge::{
    Condition, CountRequest, CreateIndex, Distance, EdgeConfig, EdgeConfigBuilder,
    EdgeOptimizersConfig, EdgeShard, EdgeSparseVectorParamsBuilder, EdgeVectorParamsBuilder,
    FieldCondition, FieldIndexOperations, Filter, JsonPath, Match, Modifier, NamedQuery, Nested,
    NestedCondition, OperationError, PayloadFieldSchema, PayloadSchemaType, PointId,
    PointInsertOperations, PointOperations, PointStruct, QuantizationSearchParams, QueryEnum,
    QueryRequest, Range, ScalarQuantizationConfig, ScalarType, ScoredPoint, ScoringQuery,
    ScrollRequest, SearchParams, UpdateOperation, Vector, VectorInternal, VectorStructInternal,
    Vectors, WalOptions, WithPayloadInterface, WithVector,
};
use uuid::Uuid;

use super::commit_log::{CommitLog, Record};
use super::{
    ChunkPayload, CollectionInfo, IndexPoint, LegQuery, QueryVector, RangeKind, ScoredChunk,
    ScoredId, SearchFilter, SparseVector, VectorIndex, typed_metadata,
};
use crate::lexical::Analyzer;
use crate::{Error, Result};

/// Name of the dense vector in every shard.
pub(super) const DENSE: &str = "dense";
/// Name of the BM25 sparse vector (registry version 2 on); the engine applies IDF to it.
pub(super) const SPARSE: &str = "bm25";
/// Payload field listing metadata values that parse as numbers: `[{"key": k, "value": x}]`.
pub(super) const METADATA_NUMBERS_FIELD: &str = "metadata_numbers";
/// Payload field listing metadata values that parse as timestamps, as seconds since the epoch.
pub(super) const METADATA_TIMES_FIELD: &str = "metadata_times";
/// Payload field of [`super::ChunkPayload::document_id`], keyword-indexed.
pub(super) const DOCUMENT_ID_FIELD: &str = "document_id";
/// Extra payload field listing the metadata entries as `["key","value"]` strings, keyword-indexed.
///
/// Filtering on it instead of on `metadata.<key>` needs a single index whatever the keys are,
/// and accepts any key (qdrant paths cannot address keys containing `"` or `\`).
pub(super) const METADATA_PAIRS_FIELD: &str = "metadata_pairs";
const REGISTRY_FILE: &str = "collections.json";
const REGISTRY_TMP_FILE: &str = "collections.json.tmp";
/// Version 1: dense vectors only. Version 2: a BM25 sparse vector per point and typed metadata
/// fields; version-1 collections are migrated when the index is opened. Version 3: entries may
/// list hidden documents (absent means none, so version-2 entries read as they are).
const REGISTRY_VERSION: u32 = 3;
const COLLECTIONS_DIR: &str = "collections";
const LOCK_FILE: &str = ".lock";
pub(super) const MAX_ID_LEN: usize = 128;

/// Search parameters of every query. In compact collections the graph is walked on int8
/// vectors; twice the candidates are then rescored with the full vectors, so the order and the
/// scores (which `min_score` compares) are exact cosines, as in-RAM collections give them.
/// Collections without quantization ignore this.
const SEARCH_PARAMS: SearchParams = SearchParams {
    hnsw_ef: None,
    exact: false,
    quantization: Some(QuantizationSearchParams {
        ignore: false,
        rescore: Some(true),
        oversampling: Some(2.0),
    }),
    indexed_only: false,
    acorn: None,
};

/// Knobs for new collections; tests shrink them to exercise optimization on little data.
#[derive(Clone, Debug)]
struct Tuning {
    /// WAL segment size. Each shard keeps two (sparse) segment files, and there can be many
    /// collections.
    wal_segment_bytes: usize,
    /// Segment size above which the optimizer builds an HNSW graph; `None` keeps qdrant's 10 MB.
    indexing_threshold_kb: Option<usize>,
    /// Points written (upserted or deleted) to a collection before optimization is considered.
    optimize_every_points: usize,
    /// Storage layout of new collections.
    layout: Layout,
    /// Closed WAL bytes above which a collection is reopened to drop them (its searches wait
    /// for the reopen: 0.4-0.5 s at 100k chunks, loading the shard after a restart took that).
    wal_reopen_bytes: u64,
    /// A collection's shard is flushed (and its commit log emptied) this long after the last
    /// flush, at its next write.
    checkpoint_after: Duration,
}

/// Where a new collection keeps its data. A shard keeps the layout it was created with (qdrant-edge
/// persists its config), so changing this never touches existing collections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Full-precision dense vectors in RAM: every collection created before `Compact` existed.
    /// About 2.8x the raw dense bytes at 100k chunks. Only tests create it now, to prove such
    /// collections keep working.
    #[cfg_attr(not(test), allow(dead_code))]
    InRam,
    /// Full-precision dense vectors memory-mapped from disk; their int8 copies, the HNSW graph
    /// and the sparse index stay in RAM (payloads are on disk in both layouts). Search walks the
    /// graph on the int8 copies and rescores the best candidates with the full vectors, so only
    /// those few pages are read from disk.
    Compact,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            wal_segment_bytes: 2 << 20,
            indexing_threshold_kb: None,
            optimize_every_points: 1_000,
            layout: Layout::Compact,
            wal_reopen_bytes: 64 << 20,
            checkpoint_after: Duration::from_secs(1),
        }
    }
}

/// [`VectorIndex`] stored in a local directory through the embedded qdrant-edge engine.
#[derive(Clone)]
pub struct EdgeIndex {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    tuning: Tuning,
    /// Serializes creates and deletes: registry file and collection directories.
    admin: Mutex<()>,
    /// Published registry; never held across I/O, so `resolve` can read it without blocking.
    registry: RwLock<BTreeMap<String, CollectionInfo>>,
    /// Shards opened so far. Taken before `registry` when both are needed.
    shards: Mutex<HashMap<String, Arc<Shard>>>,
    /// Held for the lifetime of the index.
    _lock: File,
}

/// An open collection.
struct Shard {
    dimension: usize,
    /// `None` once the collection is deleted; deletion takes the write lock, so it waits for
    /// in-flight operations.
    engine: RwLock<Option<EdgeShard>>,
    /// Serializes update+commit and optimization (`EdgeShard::flush` panics instead of waiting
    /// when another thread holds the shard's WAL or segment lock), and holds the commit log.
    writer: Mutex<CommitLog>,
    /// Updates waiting for the writer lock; its next holder applies them all and commits once.
    queued: Mutex<Vec<Queued>>,
    /// Commits (syncs of the commit log, or flushes of the shard) of updates so far (tests
    /// read it to see writes grouped).
    commits: AtomicUsize,
    /// Flushes of the shard after which the commit log started over (checkpoints).
    checkpoints: AtomicUsize,
    /// Writes in progress.
    writing: AtomicUsize,
    /// When a write last started while another was in progress, in µs after `opened` (0:
    /// never): writers are concurrent, and a commit waits a little for more of them.
    overlapped_at: AtomicU64,
    opened: Instant,
    writes_since_optimize: AtomicUsize,
    optimizing: AtomicBool,
}

/// An update waiting for [`Shard::write`]'s group commit, and where its outcome goes.
type Queued = (UpdateOperation, mpsc::SyncSender<Result<()>>);

#[derive(serde::Serialize, serde::Deserialize)]
struct RegistryFile {
    version: u32,
    collections: Vec<CollectionInfo>,
}

impl EdgeIndex {
    /// Opens (creating if needed) the index stored in `dir`; shards are loaded on first use.
    /// An index of an earlier version is migrated first (`analyzer` builds what it lacks).
    pub fn open(dir: &Path, analyzer: Arc<Analyzer>) -> Result<Self> {
        Self::open_tuned(dir, Tuning::default(), analyzer)
    }

    /// [`EdgeIndex::open`], flushing each collection at most every `checkpoint_after` (its
    /// commit log keeps writes durable in between).
    pub fn open_with_checkpoints(
        dir: &Path,
        analyzer: Arc<Analyzer>,
        checkpoint_after: Duration,
    ) -> Result<Self> {
        let tuning = Tuning {
            checkpoint_after,
            ..Tuning::default()
        };
        Self::open_tuned(dir, tuning, analyzer)
    }

    fn open_tuned(dir: &Path, tuning: Tuning, analyzer: Arc<Analyzer>) -> Result<Self> {
        let collections = dir.join(COLLECTIONS_DIR);
        fs::create_dir_all(&collections).map_err(io_error("create", &collections))?;

        let lock_path = dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        lock.try_lock().map_err(|err| match err {
            TryLockError::WouldBlock => Error::Unavailable(format!(
                "index directory {} is in use by another process",
                dir.display()
            )),
            TryLockError::Error(err) => io_error("lock", &lock_path)(err),
        })?;

        let (registry, version) = read_registry(dir)?;
        remove_orphans(&collections, &registry)?;
        if version < REGISTRY_VERSION {
            if version < 2 {
                migrate_v1(dir, &registry, &tuning, &analyzer)?;
            }
            write_registry(dir, &registry)?;
            tracing::info!(
                dir = %dir.display(), from = version, to = REGISTRY_VERSION, "migrated vector index"
            );
        }
        tracing::info!(dir = %dir.display(), collections = registry.len(), "opened vector index");

        Ok(Self {
            inner: Arc::new(Inner {
                root: dir.to_path_buf(),
                tuning,
                admin: Mutex::new(()),
                registry: RwLock::new(registry),
                shards: Mutex::new(HashMap::new()),
                _lock: lock,
            }),
        })
    }

    /// Runs `f` on the blocking pool; it keeps running to completion if the caller goes away.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|err| Error::Internal(format!("vector index task failed: {err}")))?
    }

    /// Starts a background optimization of the collection if enough was written since the last.
    fn maybe_optimize(&self, collection_id: String, shard: Arc<Shard>, written: usize) {
        let total = shard
            .writes_since_optimize
            .fetch_add(written, Ordering::Relaxed)
            + written;
        if total < self.inner.tuning.optimize_every_points
            || shard.optimizing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            // Reset even if qdrant-edge panics, or the collection would never be optimized again.
            struct Done<'a>(&'a AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _done = Done(&shard.optimizing);
            match shard.optimize(&collection_id) {
                Ok(true) => inner.release_file_pages(&collection_id, &shard),
                Ok(false) => {}
                Err(err) => tracing::warn!(
                    collection = %collection_id, error = %err, "optimizing collection failed"
                ),
            }
            if let Err(err) = inner.trim_wal_if_large(&collection_id, &shard) {
                tracing::warn!(
                    collection = %collection_id, error = %err, "reopening collection to trim its WAL failed"
                );
            }
        });
    }
}

#[async_trait::async_trait]
impl VectorIndex for EdgeIndex {
    async fn create_collection(&self, info: CollectionInfo) -> Result<String> {
        self.blocking(move |inner| inner.create_collection(info))
            .await
    }

    async fn delete_collection(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.blocking(move |inner| inner.delete_collection(&id))
            .await
    }

    async fn resolve(&self, tenant: &str, name: &str) -> Result<Option<CollectionInfo>> {
        let registry = read(&self.inner.registry);
        Ok(registry
            .values()
            .find(|c| c.tenant == tenant && c.name == name)
            .cloned())
    }

    async fn upsert(&self, collection_id: &str, points: Vec<IndexPoint>) -> Result<usize> {
        let id = collection_id.to_owned();
        let (written, shard) = self
            .blocking(move |inner| inner.upsert(&id, points))
            .await?;
        self.maybe_optimize(collection_id.to_owned(), shard, written);
        Ok(written)
    }

    async fn delete_points(&self, collection_id: &str, ids: Vec<Uuid>) -> Result<()> {
        let id = collection_id.to_owned();
        let (deleted, shard) = self
            .blocking(move |inner| inner.delete_points(&id, ids))
            .await?;
        // Deletions leave tombstones that the vacuum optimizer reclaims.
        self.maybe_optimize(collection_id.to_owned(), shard, deleted);
        Ok(())
    }

    async fn search(&self, collection_id: &str, query: LegQuery) -> Result<Vec<ScoredChunk>> {
        let id = collection_id.to_owned();
        self.blocking(move |inner| inner.search(&id, query)).await
    }

    async fn search_ids(&self, collection_id: &str, query: LegQuery) -> Result<Vec<ScoredId>> {
        let id = collection_id.to_owned();
        self.blocking(move |inner| inner.search_ids(&id, query))
            .await
    }

    async fn payloads(
        &self,
        collection_id: &str,
        ids: Vec<Uuid>,
    ) -> Result<Vec<(Uuid, ChunkPayload)>> {
        let id = collection_id.to_owned();
        self.blocking(move |inner| inner.payloads(&id, ids)).await
    }

    async fn count(&self, collection_id: &str) -> Result<u64> {
        let id = collection_id.to_owned();
        self.blocking(move |inner| inner.count(&id)).await
    }

    async fn update_hidden(
        &self,
        collection_id: &str,
        hide: Vec<String>,
        show: Vec<String>,
    ) -> Result<BTreeSet<String>> {
        let id = collection_id.to_owned();
        self.blocking(move |inner| inner.update_hidden(&id, &hide, &show))
            .await
    }
}

impl Inner {
    fn collection_dir(&self, id: &str) -> PathBuf {
        self.root.join(COLLECTIONS_DIR).join(id)
    }

    fn edge_config(&self, dimension: usize) -> EdgeConfig {
        edge_config(&self.tuning, dimension)
    }

    fn create_collection(&self, info: CollectionInfo) -> Result<String> {
        if info.dimension == 0 {
            return Err(Error::invalid("dimension", "must be at least 1"));
        }
        validate_id(&info.id)?;

        let _admin = lock(&self.admin);
        let mut registry = read(&self.registry).clone();
        if let Some(existing) = registry.get(&info.id) {
            if existing.same_settings(&info) {
                return Ok(info.id);
            }
            return Err(super::exists_with_other_settings(existing));
        }
        if let Some(orphan) = registry
            .values()
            .find(|c| c.tenant == info.tenant && c.name == info.name)
            .cloned()
        {
            // The catalog reserves a name before it creates its collection, so one already
            // here under another id was left by a create that never finished.
            let same_settings = orphan.dimension == info.dimension
                && orphan.embedding_model == info.embedding_model;
            if same_settings && self.count(&orphan.id)? == 0 {
                tracing::info!(
                    collection = %orphan.id, tenant = %info.tenant, name = %info.name,
                    "reusing an orphaned collection"
                );
                return Ok(orphan.id);
            }
            tracing::warn!(
                collection = %orphan.id, tenant = %info.tenant, name = %info.name,
                "replacing an orphaned collection"
            );
            self.delete_collection_locked(&orphan.id)?;
            registry = read(&self.registry).clone();
        }

        let path = self.collection_dir(&info.id);
        // Leftover of a create or delete that crashed halfway; the registry does not know it.
        remove_dir_if_exists(&path)?;
        fs::create_dir_all(&path).map_err(io_error("create", &path))?;
        let created = EdgeShard::new(&path, self.edge_config(info.dimension as usize))
            .map_err(|err| engine_error("create", &info.id, err))
            .and_then(|engine| create_payload_indexes(&engine, &info.id).map(|()| engine));
        let engine = match created {
            Ok(engine) => engine,
            Err(err) => {
                let _ = fs::remove_dir_all(&path);
                return Err(err);
            }
        };
        // A log left by a create that crashed went with the directory.
        let log = match CommitLog::open(&path, self.tuning.checkpoint_after) {
            Ok((log, _)) => log,
            Err(err) => {
                drop(engine);
                let _ = fs::remove_dir_all(&path);
                return Err(err);
            }
        };
        // The shard (with its log) must be complete on disk before the registry points at it.
        engine.flush();
        let collections = self.root.join(COLLECTIONS_DIR);
        sync_dir(&collections)?;

        registry.insert(info.id.clone(), info.clone());
        if let Err(err) = write_registry(&self.root, &registry) {
            drop(engine);
            let _ = fs::remove_dir_all(&path);
            return Err(err);
        }
        let mut shards = lock(&self.shards);
        shards.insert(
            info.id.clone(),
            Arc::new(Shard::new(info.dimension as usize, engine, log)),
        );
        *write(&self.registry) = registry;
        tracing::info!(
            collection = %info.id, tenant = %info.tenant, name = %info.name, "created collection"
        );
        Ok(info.id)
    }

    fn delete_collection(&self, id: &str) -> Result<()> {
        let _admin = lock(&self.admin);
        self.delete_collection_locked(id)
    }

    /// [`Inner::delete_collection`] with the admin lock held.
    fn delete_collection_locked(&self, id: &str) -> Result<()> {
        let mut registry = read(&self.registry).clone();
        if registry.remove(id).is_some() {
            write_registry(&self.root, &registry)?;
            // Unpublish under the shards lock so that nobody loads the shard again meanwhile.
            let shard = {
                let mut shards = lock(&self.shards);
                *write(&self.registry) = registry;
                shards.remove(id)
            };
            if let Some(shard) = shard {
                // Waits for in-flight operations; later ones see `None` and report NotFound.
                let engine = write(&shard.engine).take();
                // Dropping flushes, so it must happen while the directory still exists.
                drop(engine);
            }
            tracing::info!(collection = %id, "deleted collection");
        }
        // Also reached when a previous delete failed after updating the registry.
        if validate_id(id).is_ok() {
            remove_dir_if_exists(&self.collection_dir(id))?;
        }
        Ok(())
    }

    /// The open shard of a collection, loading it on first use.
    fn shard(&self, id: &str) -> Result<Arc<Shard>> {
        let mut shards = lock(&self.shards);
        if let Some(shard) = shards.get(id) {
            return Ok(Arc::clone(shard));
        }
        let info = read(&self.registry)
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(id))?;
        let dimension = info.dimension as usize;
        let (engine, log) = self.load_shard(id, dimension)?;
        let shard = Arc::new(Shard::new(dimension, engine, log));
        shards.insert(id.to_owned(), Arc::clone(&shard));
        Ok(shard)
    }

    /// Opens a collection's shard from disk, after trimming its WAL, and brings it up to date
    /// with its commit log.
    fn load_shard(&self, id: &str, dimension: usize) -> Result<(EdgeShard, CommitLog)> {
        let path = self.collection_dir(id);
        let trimmed = trim_wal(&path)?;
        if trimmed > 0 {
            tracing::info!(collection = %id, bytes = trimmed, "trimmed the collection's WAL");
        }
        let engine = EdgeShard::load(&path, None).map_err(|err| engine_error("load", id, err))?;
        let stored = engine.config().vectors.get(DENSE).map(|v| v.size);
        if stored != Some(dimension) {
            return Err(Error::Internal(format!(
                "collection {id}: shard has dense vector size {stored:?}, registry says {dimension}"
            )));
        }
        // A segment created on load (e.g. after optimization) starts without payload indexes.
        create_payload_indexes(&engine, id)?;
        // A collection written by an earlier release has no log yet: it starts empty.
        let (mut log, committed) = CommitLog::open(&path, self.tuning.checkpoint_after)?;
        let replayed = committed.len();
        for op in committed {
            engine
                .update(op)
                .map_err(|err| engine_error("replay the commit log of", id, err))?;
        }
        engine.flush();
        log.reset()
            .map_err(|err| Error::Internal(format!("collection {id}: commit log: {err}")))?;
        if replayed > 0 {
            tracing::info!(collection = %id, updates = replayed, "replayed the commit log");
        }
        Ok((engine, log))
    }

    /// Takes the pages of the collection's memory-mapped files out of search-svc's resident
    /// memory after an optimization wrote them (see
    /// [`smartdb_kit::memory::release_file_pages`]); searches map back what they read. Searches
    /// and writes of the collection wait meanwhile, a few milliseconds.
    fn release_file_pages(&self, id: &str, shard: &Shard) {
        // The exclusive lock keeps the engine from mapping or unmapping its segments' files
        // meanwhile: only code holding the engine lock does (qdrant-edge flushes segments on
        // the calling thread), and its optimizers have finished. The WAL is left out: its
        // flushes run on threads of their own, which may hold a mapping.
        let engine = write(&shard.engine);
        if engine.is_none() {
            return; // deleted meanwhile
        }
        let segments = self.collection_dir(id).join("segments");
        // SAFETY: see above; the segments' files are mapped only by this engine.
        match unsafe { smartdb_kit::memory::release_file_pages(&segments) } {
            Ok(bytes) => tracing::debug!(collection = %id, bytes, "released mapped file pages"),
            Err(err) => tracing::warn!(
                collection = %id, error = %err, "cannot release the collection's mapped file pages"
            ),
        }
    }

    /// Reopens an open collection whose closed WAL segments outgrew `tuning.wal_reopen_bytes`,
    /// which drops them ([`trim_wal`]). Its searches and writes wait meanwhile.
    fn trim_wal_if_large(&self, id: &str, shard: &Arc<Shard>) -> Result<()> {
        let dir = self.collection_dir(id);
        let closed: u64 = closed_wal_segments(&dir)?.iter().map(|s| s.bytes).sum();
        if closed < self.tuning.wal_reopen_bytes {
            return Ok(());
        }
        let started = Instant::now();
        let mut engine = write(&shard.engine);
        let Some(old) = engine.take() else {
            return Ok(()); // deleted meanwhile
        };
        // Dropping flushes and releases the WAL's directory lock, which the reload takes.
        drop(old);
        match self.load_shard(id, shard.dimension) {
            Ok((reopened, log)) => {
                *engine = Some(reopened);
                // No writer holds it: writers hold the engine's read lock first.
                *lock(&shard.writer) = log;
                smartdb_kit::memory::release_freed();
                tracing::info!(
                    collection = %id,
                    ms = started.elapsed().as_millis() as u64,
                    "reopened collection to trim its WAL"
                );
                Ok(())
            }
            Err(err) => {
                drop(engine);
                // Forgotten, the shard is loaded again on next use, which reports what fails.
                let mut shards = lock(&self.shards);
                if shards.get(id).is_some_and(|s| Arc::ptr_eq(s, shard)) {
                    shards.remove(id);
                }
                Err(err)
            }
        }
    }

    fn upsert(&self, id: &str, points: Vec<IndexPoint>) -> Result<(usize, Arc<Shard>)> {
        let shard = self.shard(id)?;
        check_points(id, &points, shard.dimension)?;
        let written = points.len();
        if written > 0 {
            let points = points
                .into_iter()
                .map(to_edge_point)
                .collect::<Result<Vec<_>>>()?;
            let op = PointOperations::UpsertPoints(PointInsertOperations::PointsList(points));
            shard.write(id, UpdateOperation::PointOperation(op))?;
        }
        Ok((written, shard))
    }

    /// Rewrites the registry with the collection's new hidden set, then publishes it: searches
    /// resolve either the old entry or the new one.
    fn update_hidden(
        &self,
        id: &str,
        hide: &[String],
        show: &[String],
    ) -> Result<BTreeSet<String>> {
        let _admin = lock(&self.admin);
        let mut registry = read(&self.registry).clone();
        let entry = registry.get_mut(id).ok_or_else(|| not_found(id))?;
        if entry.apply_hidden(hide, show)? {
            let hidden = entry.hidden_documents.clone();
            write_registry(&self.root, &registry)?;
            *write(&self.registry) = registry;
            return Ok(hidden);
        }
        Ok(entry.hidden_documents.clone())
    }

    fn delete_points(&self, id: &str, ids: Vec<Uuid>) -> Result<(usize, Arc<Shard>)> {
        let shard = self.shard(id)?;
        let deleted = ids.len();
        if deleted > 0 {
            let ids = ids.into_iter().map(PointId::Uuid).collect();
            shard.write(
                id,
                UpdateOperation::PointOperation(PointOperations::DeletePoints { ids }),
            )?;
        }
        Ok((deleted, shard))
    }

    fn search(&self, id: &str, query: LegQuery) -> Result<Vec<ScoredChunk>> {
        self.query(id, query, true)?
            .into_iter()
            .map(to_scored_chunk)
            .collect()
    }

    fn search_ids(&self, id: &str, query: LegQuery) -> Result<Vec<ScoredId>> {
        self.query(id, query, false)?
            .into_iter()
            .map(|point| {
                Ok(ScoredId {
                    id: uuid_of(point.id)?,
                    score: point.score,
                })
            })
            .collect()
    }

    fn payloads(&self, id: &str, ids: Vec<Uuid>) -> Result<Vec<(Uuid, ChunkPayload)>> {
        let shard = self.shard(id)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<PointId> = ids.into_iter().map(PointId::Uuid).collect();
        let records = shard.read(id, |engine| {
            engine
                .retrieve(
                    &ids,
                    Some(WithPayloadInterface::Bool(true)),
                    Some(WithVector::Bool(false)),
                )
                .map_err(|err| engine_error("read payloads of", id, err))
        })?;
        records
            .into_iter()
            .map(|record| {
                let id = uuid_of(record.id)?;
                Ok((id, chunk_payload(id, record.payload)?))
            })
            .collect()
    }

    /// One leg in the engine, with or without the hits' payloads.
    fn query(&self, id: &str, query: LegQuery, with_payload: bool) -> Result<Vec<ScoredPoint>> {
        let shard = self.shard(id)?;
        let named = match query.vector {
            QueryVector::Dense(vector) => {
                if vector.len() != shard.dimension {
                    return Err(Error::invalid(
                        "vector",
                        format!(
                            "query has {} dimensions, collection {id} expects {}",
                            vector.len(),
                            shard.dimension
                        ),
                    ));
                }
                if !vector.iter().all(|x| x.is_finite()) {
                    return Err(Error::invalid("vector", "query has a non-finite component"));
                }
                NamedQuery::new(vector.into(), DENSE)
            }
            QueryVector::Sparse(SparseVector { indices, values }) => {
                if indices.is_empty() {
                    // Only stop words, or nothing a term could be made of.
                    return Ok(Vec::new());
                }
                let sparse = qdrant_edge::SparseVector { indices, values };
                NamedQuery::new(VectorInternal::Sparse(sparse), SPARSE)
            }
        };
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let request = QueryRequest {
            prefetches: Vec::new(),
            query: Some(ScoringQuery::Vector(QueryEnum::Nearest(named))),
            filter: to_edge_filter(&query.filter)?,
            score_threshold: query.min_score.map(ordered_float::OrderedFloat),
            limit: query.limit,
            offset: 0,
            params: Some(SEARCH_PARAMS),
            with_vector: WithVector::Bool(false),
            with_payload: WithPayloadInterface::Bool(with_payload),
        };
        shard.read(id, |engine| {
            engine
                .query(request)
                .map_err(|err| engine_error("search", id, err))
        })
    }

    fn count(&self, id: &str) -> Result<u64> {
        let shard = self.shard(id)?;
        let request = CountRequest {
            filter: None,
            exact: true,
        };
        let count = shard.read(id, |engine| {
            engine
                .count(request)
                .map_err(|err| engine_error("count", id, err))
        })?;
        Ok(count as u64)
    }
}

impl Shard {
    fn new(dimension: usize, engine: EdgeShard, log: CommitLog) -> Self {
        Self {
            dimension,
            engine: RwLock::new(Some(engine)),
            writer: Mutex::new(log),
            queued: Mutex::new(Vec::new()),
            commits: AtomicUsize::new(0),
            checkpoints: AtomicUsize::new(0),
            writing: AtomicUsize::new(0),
            overlapped_at: AtomicU64::new(0),
            opened: Instant::now(),
            writes_since_optimize: AtomicUsize::new(0),
            optimizing: AtomicBool::new(false),
        }
    }

    /// Runs `f` on the engine, or NotFound if the collection was deleted meanwhile.
    fn read<T>(&self, id: &str, f: impl FnOnce(&EdgeShard) -> Result<T>) -> Result<T> {
        let engine = read(&self.engine);
        f(engine.as_ref().ok_or_else(|| not_found(id))?)
    }

    /// Applies an update and makes it durable.
    ///
    /// Group commit: even a sync of the commit log costs more than an update, and writes that
    /// arrive while one runs would each wait for it and then sync again. Instead every write
    /// queues its update and takes the writer lock; the holder applies everything queued so far,
    /// appends it to the log and syncs once for all of them, and flushes the shard if a
    /// checkpoint is due. A write whose update an earlier holder committed finds its result
    /// waiting when it gets the lock.
    ///
    /// While writers are concurrent (a write started during another within the last second,
    /// e.g. ingest-svc's workers), the holder first waits [`COMMIT_LINGER`] for more writes to
    /// join, as PostgreSQL's `commit_delay` does: a lone writer, or one client writing batch
    /// after batch, never waits.
    fn write(&self, id: &str, op: UpdateOperation) -> Result<()> {
        let now = self.micros();
        if self.writing.fetch_add(1, Ordering::AcqRel) > 0 {
            self.overlapped_at.store(now, Ordering::Relaxed);
        }
        let _writing = Writing(&self.writing);
        let linger = lingers(now, self.overlapped_at.load(Ordering::Relaxed));
        let (done, result) = mpsc::sync_channel(1);
        self.read(id, |engine| {
            lock(&self.queued).push((op, done));
            let mut log = lock(&self.writer);
            if lock(&self.queued).is_empty() {
                return Ok(()); // an earlier holder committed this write
            }
            if linger {
                std::thread::sleep(COMMIT_LINGER);
            }
            let batch = std::mem::take(&mut *lock(&self.queued));
            let mut records = Vec::with_capacity(batch.len());
            let applied: Vec<_> = batch
                .into_iter()
                .map(|(op, done)| {
                    // Encoded first: applying consumes the update. Only applied ones are logged.
                    let outcome = Record::encode(&op).and_then(|record| {
                        engine
                            .update(op)
                            .map_err(|err| engine_error("update", id, err))?;
                        records.push(record);
                        Ok(())
                    });
                    (outcome, done)
                })
                .collect();
            let logged = log.append(&records);
            if let Err(err) = &logged {
                tracing::warn!(collection = %id, error = %err, "commit log failed; flushing the collection instead");
            }
            if logged.is_err() || log.checkpoint_due() {
                self.checkpoint(id, engine, &mut log);
            }
            self.commits.fetch_add(1, Ordering::Relaxed);
            for (outcome, done) in applied {
                // Capacity 1 and one send per channel: never blocks. The writer may be gone
                // only if its thread panicked.
                let _ = done.send(outcome);
            }
            Ok(())
        })?;
        // Dropped unsent only if the committing thread panicked (in the engine) first.
        result.recv().unwrap_or_else(|_| {
            Err(Error::Internal(format!(
                "collection {id}: the index engine failed while committing an update"
            )))
        })
    }

    /// Flushes the shard, then empties its commit log. Called with the writer lock held.
    fn checkpoint(&self, id: &str, engine: &EdgeShard, log: &mut CommitLog) {
        // Panics if the disk fails, as every flush of the engine does.
        engine.flush();
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        if let Err(err) = log.reset() {
            // Nothing is appended to it until a reset succeeds: writes flush the shard instead.
            tracing::warn!(collection = %id, error = %err, "cannot empty the commit log");
        }
    }

    /// Microseconds since the shard was opened, at least 1.
    fn micros(&self) -> u64 {
        (self.opened.elapsed().as_micros() as u64).max(1)
    }

    /// Runs qdrant-edge's optimizers (segment merging, HNSW indexing, vacuum) until idle.
    ///
    /// Blocks writers to this collection meanwhile (searches go on) and delays its deletion.
    fn optimize(&self, id: &str) -> Result<bool> {
        self.read(id, |engine| {
            let mut log = lock(&self.writer);
            self.writes_since_optimize.store(0, Ordering::Relaxed);
            let optimized = engine
                .optimize()
                .map_err(|err| engine_error("optimize", id, err))?;
            if optimized {
                // The optimizer's fresh appendable segment has no payload indexes.
                create_payload_indexes(engine, id)?;
                self.checkpoint(id, engine, &mut log);
                // The optimizers' temporary buffers are freed by now, but glibc keeps them.
                smartdb_kit::memory::release_freed();
                let segments = engine.info().segments_count;
                tracing::info!(collection = %id, segments, "optimized collection");
            }
            Ok(optimized)
        })
    }
}

/// How long a commit waits for more writes to join it while writers are concurrent, so that
/// more of them share one commit. ingest-svc's workers write about 30 times a second, and few of
/// those writes arrived while a commit ran; with the wait, search-svc's CPU per indexed chunk
/// fell by a third (ingest bench, when every commit still flushed the shard).
const COMMIT_LINGER: Duration = Duration::from_millis(10);

impl Drop for Shard {
    /// Closing cleanly flushes the shard (as dropping the engine does), after which its commit
    /// log is not needed: the next open has nothing to replay.
    fn drop(&mut self) {
        let engine = self
            .engine
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(engine) = engine {
            drop(engine);
            let log = self
                .writer
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner);
            if let Err(err) = log.reset() {
                tracing::warn!(error = %err, "cannot empty a closed collection's commit log; it is replayed on open");
            }
        }
    }
}

/// Whether a write starting at `now` lingers before committing, given when a write last started
/// during another (µs on the shard's clock, 0: never).
fn lingers(now: u64, overlapped_at: u64) -> bool {
    overlapped_at != 0 && now.saturating_sub(overlapped_at) < 1_000_000
}

/// Counts a write as in progress until dropped (also when the engine panics).
struct Writing<'a>(&'a AtomicUsize);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Refuses a batch (InvalidArgument `points`) holding a vector of the wrong length, a non-finite
/// component or a sparse vector with unpaired entries.
pub(super) fn check_points(id: &str, points: &[IndexPoint], dimension: usize) -> Result<()> {
    for point in points {
        if point.vector.len() != dimension {
            return Err(Error::invalid(
                "points",
                format!(
                    "point {} has {} dimensions, collection {id} expects {}",
                    point.id,
                    point.vector.len(),
                    dimension
                ),
            ));
        }
        if !point.vector.iter().all(|x| x.is_finite())
            || !point.sparse.values.iter().all(|x| x.is_finite())
        {
            return Err(Error::invalid(
                "points",
                format!("point {} has a non-finite vector component", point.id),
            ));
        }
        if point.sparse.indices.len() != point.sparse.values.len() {
            return Err(Error::invalid(
                "points",
                format!(
                    "point {} has a sparse vector with unpaired entries",
                    point.id
                ),
            ));
        }
    }
    Ok(())
}

fn to_edge_point(point: IndexPoint) -> Result<qdrant_edge::PointStructPersisted> {
    let payload = stored_payload(point.id, &point.payload)?;
    // `PointStruct::new` panics on a non-object payload; a struct always serializes to one.
    let sparse = qdrant_edge::SparseVector {
        indices: point.sparse.indices,
        values: point.sparse.values,
    };
    let vectors = Vectors::new_named([
        (DENSE, Vector::from(point.vector)),
        (SPARSE, Vector::from(sparse)),
    ]);
    Ok(PointStruct::new(PointId::Uuid(point.id), vectors, payload).into())
}

/// The payload stored with a chunk (in every backend): [`ChunkPayload`] as JSON plus the
/// filterable fields derived from its metadata (`metadata_pairs`, `metadata_numbers`,
/// `metadata_times`). Always a JSON object.
pub(super) fn stored_payload(id: Uuid, chunk: &ChunkPayload) -> Result<serde_json::Value> {
    let mut payload = serde_json::to_value(chunk)
        .map_err(|err| Error::Internal(format!("serializing payload of point {id}: {err}")))?;
    let pairs = chunk
        .metadata
        .iter()
        .map(|(k, v)| metadata_pair(k, v).into())
        .collect();
    let (mut numbers, mut times) = (Vec::new(), Vec::new());
    for (key, kind, value) in typed_metadata(&chunk.metadata) {
        let entry = serde_json::json!({"key": key, "value": value});
        match kind {
            RangeKind::Number => numbers.push(entry),
            RangeKind::Time => times.push(entry),
        }
    }
    if let serde_json::Value::Object(map) = &mut payload {
        map.insert(METADATA_PAIRS_FIELD.into(), serde_json::Value::Array(pairs));
        map.insert(METADATA_NUMBERS_FIELD.into(), numbers.into());
        map.insert(METADATA_TIMES_FIELD.into(), times.into());
    }
    Ok(payload)
}

/// One metadata entry as a single keyword, unambiguous whatever the key and value contain.
pub(super) fn metadata_pair(key: &str, value: &str) -> String {
    serde_json::json!([key, value]).to_string()
}

/// Indexes the filterable fields, so selective filters do not scan every payload on disk.
///
/// Idempotent: segments that already have an index skip it.
fn create_payload_indexes(engine: &EdgeShard, id: &str) -> Result<()> {
    for field in [DOCUMENT_ID_FIELD, METADATA_PAIRS_FIELD] {
        let op = FieldIndexOperations::CreateIndex(CreateIndex {
            field_name: json_path(field)?,
            field_schema: Some(PayloadFieldSchema::FieldType(PayloadSchemaType::Keyword)),
        });
        engine
            .update(UpdateOperation::FieldIndexOperation(op))
            .map_err(|err| engine_error("index", id, err))?;
    }
    Ok(())
}

fn to_scored_chunk(point: ScoredPoint) -> Result<ScoredChunk> {
    let id = uuid_of(point.id)?;
    Ok(ScoredChunk {
        id,
        score: point.score,
        payload: chunk_payload(id, point.payload)?,
    })
}

fn uuid_of(id: PointId) -> Result<Uuid> {
    match id {
        PointId::Uuid(id) => Ok(id),
        other => Err(Error::Internal(format!(
            "unexpected numeric point id {other}"
        ))),
    }
}

fn chunk_payload(id: Uuid, payload: Option<qdrant_edge::Payload>) -> Result<ChunkPayload> {
    let payload = payload.ok_or_else(|| Error::Internal(format!("point {id} has no payload")))?;
    serde_json::from_value(serde_json::Value::Object(payload.0))
        .map_err(|err| Error::Internal(format!("point {id} has a malformed payload: {err}")))
}

/// The shard configuration of a collection (version 2): a dense vector compared by cosine, and
/// a BM25 sparse vector to which the engine applies the collection's IDF.
fn edge_config(tuning: &Tuning, dimension: usize) -> EdgeConfig {
    let mut dense = EdgeVectorParamsBuilder::new(dimension, Distance::Cosine);
    let compact = tuning.layout == Layout::Compact;
    if compact {
        dense = dense.on_disk(true).quantization_config(
            ScalarQuantizationConfig {
                r#type: ScalarType::Int8,
                // Clipping the outer 1% keeps int8's resolution for the bulk of the values.
                quantile: Some(0.99),
                always_ram: Some(true),
            }
            .into(),
        );
    }
    EdgeConfigBuilder::new()
        .vector(DENSE, dense.build())
        .sparse_vector(
            SPARSE,
            EdgeSparseVectorParamsBuilder::new()
                .modifier(Modifier::Idf)
                .build(),
        )
        .wal_options(WalOptions {
            segment_capacity: tuning.wal_segment_bytes,
            segment_queue_len: 0,
            retain_closed: NonZeroUsize::MIN,
        })
        .optimizers(EdgeOptimizersConfig {
            indexing_threshold: tuning.indexing_threshold_kb,
            ..EdgeOptimizersConfig::default()
        })
        .build()
}

/// Migrates version-1 collections (dense only) to version 2: each is copied into a new shard
/// with BM25 vectors built from the stored title and text and typed metadata, which then
/// replaces it. Crash-safe: the registry still says version 1 until every collection is done,
/// a half-built copy is discarded on the next try, and a collection already swapped is
/// recognised by its sparse vector and skipped.
fn migrate_v1(
    root: &Path,
    registry: &BTreeMap<String, CollectionInfo>,
    tuning: &Tuning,
    analyzer: &Analyzer,
) -> Result<()> {
    let collections = root.join(COLLECTIONS_DIR);
    for info in registry.values() {
        let path = collections.join(&info.id);
        let retired = root.join(format!("retired-{}", info.id));
        if !path.exists() && retired.exists() {
            // A crash between the two renames below: the old shard is still complete.
            fs::rename(&retired, &path).map_err(io_error("restore", &retired))?;
        }
        let old =
            EdgeShard::load(&path, None).map_err(|err| engine_error("load", &info.id, err))?;
        if old.config().sparse_vectors.contains_key(SPARSE) {
            remove_dir_if_exists(&retired)?;
            continue;
        }
        let staging = root.join(format!("migrating-{}", info.id));
        remove_dir_if_exists(&staging)?;
        fs::create_dir_all(&staging).map_err(io_error("create", &staging))?;
        let new = EdgeShard::new(&staging, edge_config(tuning, info.dimension as usize))
            .map_err(|err| engine_error("create", &info.id, err))?;
        create_payload_indexes(&new, &info.id)?;
        let mut offset = None;
        let mut copied = 0usize;
        loop {
            let (records, next) = old
                .scroll(ScrollRequest {
                    offset,
                    limit: Some(256),
                    filter: None,
                    with_payload: Some(WithPayloadInterface::Bool(true)),
                    with_vector: WithVector::Bool(true),
                    order_by: None,
                })
                .map_err(|err| engine_error("read", &info.id, err))?;
            let mut points = Vec::with_capacity(records.len());
            for record in records {
                let PointId::Uuid(id) = record.id else {
                    return Err(Error::Internal(format!(
                        "collection {}: unexpected numeric point id {}",
                        info.id, record.id
                    )));
                };
                let vector = match record.vector {
                    Some(VectorStructInternal::Named(mut named)) => match named.remove(DENSE) {
                        Some(VectorInternal::Dense(v)) => v,
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                };
                if vector.len() != info.dimension as usize {
                    return Err(Error::Internal(format!(
                        "collection {}: point {id} has no dense vector of dimension {}",
                        info.id, info.dimension
                    )));
                }
                let payload: ChunkPayload = match record.payload {
                    Some(p) => {
                        serde_json::from_value(serde_json::Value::Object(p.0)).map_err(|err| {
                            Error::Internal(format!("point {id} has a malformed payload: {err}"))
                        })?
                    }
                    None => ChunkPayload::default(),
                };
                let sparse =
                    analyzer.document(&payload.title, &payload.heading_path, &payload.text);
                points.push(to_edge_point(IndexPoint {
                    id,
                    vector,
                    sparse,
                    payload,
                })?);
            }
            copied += points.len();
            if !points.is_empty() {
                let op = PointOperations::UpsertPoints(PointInsertOperations::PointsList(points));
                new.update(UpdateOperation::PointOperation(op))
                    .map_err(|err| engine_error("update", &info.id, err))?;
            }
            match next {
                Some(next) => offset = Some(next),
                None => break,
            }
        }
        new.flush();
        drop(new);
        drop(old);
        // Swap: old aside, new in place, old gone. A crash between the renames leaves the old
        // shard at `retired` and nothing at `path`; the next open restores it and starts over.
        remove_dir_if_exists(&retired)?;
        fs::rename(&path, &retired).map_err(io_error("move", &path))?;
        fs::rename(&staging, &path).map_err(io_error("move", &staging))?;
        sync_dir(&collections)?;
        sync_dir(root)?;
        remove_dir_if_exists(&retired)?;
        tracing::info!(collection = %info.id, points = copied, "migrated collection to version 2");
    }
    Ok(())
}

/// Translates a [`SearchFilter`] into a qdrant filter over the stored payload, `None` if empty.
fn to_edge_filter(filter: &SearchFilter) -> Result<Option<Filter>> {
    let mut must = Vec::new();
    for (key, value) in &filter.metadata {
        let pair = Match::from(metadata_pair(key, value));
        must.push(Condition::Field(FieldCondition::new_match(
            json_path(METADATA_PAIRS_FIELD)?,
            pair,
        )));
    }
    for (key, values) in &filter.any_of {
        let pairs: Vec<String> = values.iter().map(|v| metadata_pair(key, v)).collect();
        must.push(Condition::Field(FieldCondition::new_match(
            json_path(METADATA_PAIRS_FIELD)?,
            Match::from(pairs),
        )));
    }
    for range in &filter.ranges {
        let field = match range.kind {
            RangeKind::Number => METADATA_NUMBERS_FIELD,
            RangeKind::Time => METADATA_TIMES_FIELD,
        };
        let bound = |x: Option<f64>| x.map(ordered_float::OrderedFloat);
        // One entry of the array must match both the key and the range.
        let inner = Filter {
            should: None,
            min_should: None,
            must: Some(vec![
                Condition::Field(FieldCondition::new_match(
                    json_path("key")?,
                    Match::from(range.key.clone()),
                )),
                Condition::Field(FieldCondition::new_range(
                    json_path("value")?,
                    Range {
                        lt: bound(range.lt),
                        gt: bound(range.gt),
                        gte: bound(range.gte),
                        lte: bound(range.lte),
                    },
                )),
            ]),
            must_not: None,
        };
        must.push(Condition::Nested(NestedCondition::new(Nested {
            key: json_path(field)?,
            filter: inner,
        })));
    }
    if !filter.document_ids.is_empty() {
        let any = Match::from(filter.document_ids.clone());
        must.push(Condition::Field(FieldCondition::new_match(
            json_path(DOCUMENT_ID_FIELD)?,
            any,
        )));
    }
    let must_not = if filter.exclude_document_ids.is_empty() {
        None
    } else {
        Some(vec![Condition::Field(FieldCondition::new_match(
            json_path(DOCUMENT_ID_FIELD)?,
            Match::from(filter.exclude_document_ids.clone()),
        ))])
    };
    Ok((!must.is_empty() || must_not.is_some()).then(|| Filter {
        should: None,
        min_should: None,
        must: (!must.is_empty()).then_some(must),
        must_not,
    }))
}

fn json_path(path: &str) -> Result<JsonPath> {
    path.parse()
        .map_err(|()| Error::Internal(format!("invalid payload path {path}")))
}

/// Collection ids become directory names, so only plain ASCII names are accepted.
pub(super) fn validate_id(id: &str) -> Result<()> {
    let plain = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if id.is_empty() || id.len() > MAX_ID_LEN || !plain {
        return Err(Error::invalid(
            "id",
            format!(
                "collection id {id:?} must be 1-{MAX_ID_LEN} ASCII letters, digits, '-' or '_'"
            ),
        ));
    }
    Ok(())
}

/// The registry and the version it was written in (older ones are migrated by the caller).
fn read_registry(root: &Path) -> Result<(BTreeMap<String, CollectionInfo>, u32)> {
    let path = root.join(REGISTRY_FILE);
    let _ = fs::remove_file(root.join(REGISTRY_TMP_FILE));
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            // Without a registry, collection directories would look orphaned and be removed.
            let collections = root.join(COLLECTIONS_DIR);
            let mut entries = fs::read_dir(&collections).map_err(io_error("read", &collections))?;
            if entries.next().is_some() {
                return Err(Error::Internal(format!(
                    "{} is missing but {} is not empty; refusing to open",
                    path.display(),
                    collections.display()
                )));
            }
            // Written before any collection exists, so a missing file always means damage.
            let empty = BTreeMap::new();
            write_registry(root, &empty)?;
            return Ok((empty, REGISTRY_VERSION));
        }
        Err(err) => return Err(io_error("read", &path)(err)),
    };
    let file: RegistryFile = serde_json::from_slice(&bytes)
        .map_err(|err| Error::Internal(format!("{} is malformed: {err}", path.display())))?;
    if file.version == 0 || file.version > REGISTRY_VERSION {
        return Err(Error::Internal(format!(
            "{} has version {}, this release reads 1 to {REGISTRY_VERSION}",
            path.display(),
            file.version
        )));
    }
    let registry = file
        .collections
        .into_iter()
        .map(|c| (c.id.clone(), c))
        .collect();
    Ok((registry, file.version))
}

/// Replaces the registry file atomically: temp file, fsync, rename, fsync of the directory.
fn write_registry(root: &Path, registry: &BTreeMap<String, CollectionInfo>) -> Result<()> {
    let file = RegistryFile {
        version: REGISTRY_VERSION,
        collections: registry.values().cloned().collect(),
    };
    let bytes = serde_json::to_vec_pretty(&file)
        .map_err(|err| Error::Internal(format!("serializing collection registry: {err}")))?;
    let tmp = root.join(REGISTRY_TMP_FILE);
    let mut out = File::create(&tmp).map_err(io_error("create", &tmp))?;
    out.write_all(&bytes)
        .and_then(|()| out.sync_all())
        .map_err(io_error("write", &tmp))?;
    drop(out);
    let path = root.join(REGISTRY_FILE);
    fs::rename(&tmp, &path).map_err(io_error("replace", &path))?;
    sync_dir(root)
}

/// Removes collection directories the registry does not know: crashed creates or deletes.
fn remove_orphans(collections: &Path, registry: &BTreeMap<String, CollectionInfo>) -> Result<()> {
    for entry in fs::read_dir(collections).map_err(io_error("read", collections))? {
        let entry = entry.map_err(io_error("read", collections))?;
        let known = entry
            .file_name()
            .to_str()
            .is_some_and(|name| registry.contains_key(name));
        if !known {
            let path = entry.path();
            tracing::warn!(
                path = %path.display(), "removing collection directory missing from the registry"
            );
            if path.is_dir() {
                fs::remove_dir_all(&path).map_err(io_error("remove", &path))?;
            } else {
                fs::remove_file(&path).map_err(io_error("remove", &path))?;
            }
        }
    }
    Ok(())
}

fn remove_dir_if_exists(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(io_error("remove", path)(err)),
        _ => Ok(()),
    }
}

/// A closed segment of a shard's WAL (`wal/closed-<first operation>`).
struct ClosedWalSegment {
    first_operation: u64,
    path: PathBuf,
    bytes: u64,
}

/// The closed segments of the WAL of the shard in `shard_dir`, oldest first.
fn closed_wal_segments(shard_dir: &Path) -> Result<Vec<ClosedWalSegment>> {
    let wal = shard_dir.join("wal");
    let entries = match fs::read_dir(&wal) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        entries => entries.map_err(io_error("list", &wal))?,
    };
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("list", &wal))?;
        let name = entry.file_name();
        let Some(first_operation) = name
            .to_str()
            .and_then(|n| n.strip_prefix("closed-"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        let bytes = entry
            .metadata()
            .map_err(io_error("stat", &entry.path()))?
            .len();
        segments.push(ClosedWalSegment {
            first_operation,
            path: entry.path(),
            bytes,
        });
    }
    segments.sort_by_key(|s| s.first_operation);
    Ok(segments)
}

/// Deletes the closed segments of a shard's WAL but the newest, while the shard is closed, and
/// returns the bytes freed.
///
/// qdrant-edge 0.7.1 never replays its WAL (every write here is flushed into segments before
/// it is acknowledged) and never truncates it; the call that would (`prefix_truncate`) is not
/// public. This does what it does with `retain_closed` = 1. The newest closed segment must
/// stay: the WAL numbers new operations on from it, and the engine ignores an operation
/// numbered below the version of the point it changes. Oldest first, so an interrupted run
/// leaves the contiguous log the engine requires.
fn trim_wal(shard_dir: &Path) -> Result<u64> {
    let mut segments = closed_wal_segments(shard_dir)?;
    segments.pop();
    let mut freed = 0;
    for segment in segments {
        fs::remove_file(&segment.path).map_err(io_error("remove", &segment.path))?;
        freed += segment.bytes;
    }
    Ok(freed)
}

/// Makes renames and new entries in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync", dir))
}

/// Maps an I/O error on `path` to an error that names both.
pub(super) fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.display().to_string();
    move |err| Error::Internal(format!("cannot {action} {path}: {err}"))
}

fn engine_error(action: &str, id: &str, err: OperationError) -> Error {
    Error::Internal(format!(
        "vector engine failed to {action} collection {id}: {err}"
    ))
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("collection {id} not found"))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere (e.g. in qdrant-edge's flush) must not wedge the whole index.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{ChunkPayload, point_id};

    fn analyzer() -> Arc<Analyzer> {
        Arc::new(Analyzer::new(crate::lexical::Bm25Settings::default()).unwrap())
    }

    async fn fresh_index() -> (EdgeIndex, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (EdgeIndex::open(dir.path(), analyzer()).unwrap(), dir)
    }

    mod conformance {
        vector_index_conformance!(super::fresh_index);
    }

    fn sample_info(dimension: u32) -> CollectionInfo {
        CollectionInfo {
            id: Uuid::new_v4().to_string(),
            tenant: "acme".into(),
            name: "handbook".into(),
            dimension,
            embedding_model: "test-model".into(),
            ..Default::default()
        }
    }

    /// Deterministic pseudo-random unit-ish vectors, so tests need no RNG dependency.
    fn vector(seed: u64, dimension: usize) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..dimension)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    fn points(
        document_id: &str,
        chunks: std::ops::Range<u32>,
        dimension: usize,
    ) -> Vec<IndexPoint> {
        chunks
            .map(|i| IndexPoint {
                id: point_id(document_id, i),
                vector: vector(u64::from(i), dimension),
                sparse: SparseVector::default(),
                payload: ChunkPayload {
                    document_id: document_id.into(),
                    chunk_index: i,
                    text: format!("chunk {i}"),
                    metadata: [(
                        "parity".to_owned(),
                        ["even", "odd"][i as usize % 2].to_owned(),
                    )]
                    .into(),
                    ..ChunkPayload::default()
                },
            })
            .collect()
    }

    async fn wait_for_optimization(shard: &Shard) {
        while shard.optimizing.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An index in `dir` with the collection `info`, holding `total` points of document "doc"
    /// upserted `batch` at a time.
    async fn filled_index(
        dir: &Path,
        tuning: &Tuning,
        info: &CollectionInfo,
        total: u32,
        batch: u32,
    ) -> EdgeIndex {
        let dimension = info.dimension as usize;
        let index = EdgeIndex::open_tuned(dir, tuning.clone(), analyzer()).unwrap();
        index.create_collection(info.clone()).await.unwrap();
        for start in (0..total).step_by(batch as usize) {
            index
                .upsert(&info.id, points("doc", start..start + batch, dimension))
                .await
                .unwrap();
        }
        index
    }

    /// Resident bytes of this process's mappings of files under `dir` (`/proc/self/smaps`).
    fn resident_under(dir: &Path) -> u64 {
        let dir = dir.canonicalize().unwrap();
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut bytes = 0;
        for line in smaps.lines() {
            if let Some(kb) = line.strip_prefix("Rss:") {
                if inside {
                    let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                    bytes += kb * 1024;
                }
            } else if line.split_ascii_whitespace().next().is_some_and(|range| {
                range.contains('-') && range.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
            }) {
                inside = line
                    .find('/')
                    .is_some_and(|at| Path::new(&line[at..]).starts_with(&dir));
            }
        }
        bytes
    }

    fn nearest(index_vector: &[f32]) -> LegQuery {
        LegQuery {
            vector: QueryVector::Dense(index_vector.to_vec()),
            limit: 3,
            filter: SearchFilter::default(),
            min_score: None,
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn points_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let info = sample_info(8);
        {
            let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
            index.create_collection(info.clone()).await.unwrap();
            index
                .upsert(&info.id, points("doc", 0..20, 8))
                .await
                .unwrap();
            index
                .delete_points(&info.id, vec![point_id("doc", 0)])
                .await
                .unwrap();
        }
        let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
        assert_eq!(
            index.resolve("acme", "handbook").await.unwrap(),
            Some(info.clone())
        );
        assert_eq!(index.count(&info.id).await.unwrap(), 19);
        let hits = index
            .search(&info.id, nearest(&vector(7, 8)))
            .await
            .unwrap();
        assert_eq!(hits[0].id, point_id("doc", 7));
        assert_eq!(hits[0].payload.text, "chunk 7");
    }

    /// A copy of the directory taken right after the writes return is what a restart finds after
    /// kill -9: the page cache survives the process, memory does not. No checkpoint ran, so the
    /// writes are only in the commit log, and its replay brings them back.
    #[tokio::test]
    async fn acknowledged_writes_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning {
            checkpoint_after: Duration::from_secs(3600),
            ..Tuning::default()
        };
        let index = EdgeIndex::open_tuned(dir.path(), tuning, analyzer()).unwrap();
        let info = sample_info(8);
        index.create_collection(info.clone()).await.unwrap();
        index
            .upsert(&info.id, points("doc", 0..20, 8))
            .await
            .unwrap();
        index
            .delete_points(&info.id, vec![point_id("doc", 3)])
            .await
            .unwrap();
        index
            .upsert(&info.id, points("other", 0..5, 8))
            .await
            .unwrap();

        let shard = index.inner.shard(&info.id).unwrap();
        assert_eq!(shard.commits.load(Ordering::Relaxed), 3);
        assert_eq!(shard.checkpoints.load(Ordering::Relaxed), 0);
        assert!(lock(&shard.writer).pending_bytes() > 0);

        let crashed = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), crashed.path());
        let restarted = EdgeIndex::open(crashed.path(), analyzer()).unwrap();
        assert_eq!(restarted.count(&info.id).await.unwrap(), 24);
        // Replayed, flushed, and the log emptied.
        let reopened = restarted.inner.shard(&info.id).unwrap();
        assert_eq!(lock(&reopened.writer).pending_bytes(), 0);
        drop(reopened);
        let hits = restarted
            .search(&info.id, nearest(&vector(3, 8)))
            .await
            .unwrap();
        // doc/3 was deleted; other/3 has the same vector.
        assert_eq!(hits[0].id, point_id("other", 3));
        assert!(hits.iter().all(|h| h.id != point_id("doc", 3)));
        drop(index);
    }

    /// Concurrent writes are committed in groups (fewer flushes than writes), and every one
    /// acknowledged is durable, each with its own outcome.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_share_flushes_and_all_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
        let info = sample_info(8);
        index.create_collection(info.clone()).await.unwrap();
        let writers: Vec<_> = (0..32)
            .map(|w| {
                let (index, id) = (index.clone(), info.id.clone());
                tokio::spawn(async move {
                    let doc = format!("doc-{w}");
                    index.upsert(&id, points(&doc, 0..3, 8)).await.unwrap();
                    // Each writer's second write removes its first chunk again.
                    index
                        .delete_points(&id, vec![point_id(&doc, 0)])
                        .await
                        .unwrap();
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        // A wrong dimension is refused before queueing; the others' writes are unaffected.
        assert!(
            index
                .upsert(&info.id, points("bad", 0..1, 4))
                .await
                .is_err()
        );
        let shard = index.inner.shard(&info.id).unwrap();
        let commits = shard.commits.load(Ordering::Relaxed);
        assert!(commits < 64, "64 concurrent writes took {commits} commits");
        assert_ne!(shard.overlapped_at.load(Ordering::Relaxed), 0);
        assert_eq!(shard.writing.load(Ordering::Relaxed), 0);

        let crashed = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), crashed.path());
        drop(index);
        let restarted = EdgeIndex::open(crashed.path(), analyzer()).unwrap();
        assert_eq!(restarted.count(&info.id).await.unwrap(), 64);
        for w in 0..32 {
            let doc = format!("doc-{w}");
            let ids = vec![point_id(&doc, 0), point_id(&doc, 1), point_id(&doc, 2)];
            let found: Vec<Uuid> = restarted
                .payloads(&info.id, ids)
                .await
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            assert_eq!(found.len(), 2, "{doc}: {found:?}");
            assert!(!found.contains(&point_id(&doc, 0)), "{doc}");
        }
    }

    #[tokio::test]
    async fn one_writer_at_a_time_never_lingers() {
        let (index, dir) = fresh_index().await;
        let info = sample_info(4);
        index.create_collection(info.clone()).await.unwrap();
        for i in 0..5 {
            index
                .upsert(&info.id, points("doc", i..i + 1, 4))
                .await
                .unwrap();
        }
        let shard = index.inner.shard(&info.id).unwrap();
        assert_eq!(shard.overlapped_at.load(Ordering::Relaxed), 0);
        assert_eq!(shard.commits.load(Ordering::Relaxed), 5);
        // Concurrent writes in the last second make a commit linger; older ones do not.
        assert!(!lingers(5_000_000, 0));
        assert!(lingers(5_000_000, 4_200_000));
        assert!(!lingers(5_000_000, 3_900_000));
        // The index flushes as it closes: before its directory goes.
        drop((shard, index));
        drop(dir);
    }

    /// Once a checkpoint is due, a write flushes the shard and empties the log; a collection
    /// whose log is gone (as an earlier release left it) opens as it is.
    #[tokio::test]
    async fn a_due_checkpoint_flushes_the_shard_and_empties_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning {
            checkpoint_after: Duration::ZERO,
            ..Tuning::default()
        };
        let index = EdgeIndex::open_tuned(dir.path(), tuning, analyzer()).unwrap();
        let info = sample_info(4);
        index.create_collection(info.clone()).await.unwrap();
        for i in 0..3 {
            index
                .upsert(&info.id, points("doc", i..i + 1, 4))
                .await
                .unwrap();
        }
        let shard = index.inner.shard(&info.id).unwrap();
        assert_eq!(shard.commits.load(Ordering::Relaxed), 3);
        assert_eq!(shard.checkpoints.load(Ordering::Relaxed), 3);
        assert_eq!(lock(&shard.writer).pending_bytes(), 0);
        // The flushed shard alone holds every write.
        let crashed = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), crashed.path());
        let shard_dir = crashed
            .path()
            .join(COLLECTIONS_DIR)
            .join(&info.id)
            .join(super::super::commit_log::FILE);
        fs::remove_file(shard_dir).unwrap();
        let restarted = EdgeIndex::open(crashed.path(), analyzer()).unwrap();
        assert_eq!(restarted.count(&info.id).await.unwrap(), 3);
        drop((shard, index));
    }

    #[tokio::test]
    async fn a_directory_is_opened_once() {
        let dir = tempfile::tempdir().unwrap();
        let _index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
        assert!(matches!(
            EdgeIndex::open(dir.path(), analyzer()),
            Err(Error::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn delete_collection_removes_its_directory_and_registry_entry() {
        let (index, dir) = fresh_index().await;
        let info = sample_info(4);
        index.create_collection(info.clone()).await.unwrap();
        index
            .upsert(&info.id, points("doc", 0..3, 4))
            .await
            .unwrap();
        let path = dir.path().join(COLLECTIONS_DIR).join(&info.id);
        assert!(path.is_dir());
        assert!(
            fs::read_to_string(dir.path().join(REGISTRY_FILE))
                .unwrap()
                .contains(&info.id)
        );

        index.delete_collection(&info.id).await.unwrap();
        assert!(!path.exists());
        assert!(
            !fs::read_to_string(dir.path().join(REGISTRY_FILE))
                .unwrap()
                .contains(&info.id)
        );
        drop(index);
        let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
        assert_eq!(index.resolve(&info.tenant, &info.name).await.unwrap(), None);
    }

    #[tokio::test]
    async fn orphaned_directories_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let kept = sample_info(4);
        {
            let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
            index.create_collection(kept.clone()).await.unwrap();
        }
        let orphan = dir
            .path()
            .join(COLLECTIONS_DIR)
            .join(Uuid::new_v4().to_string());
        fs::create_dir_all(orphan.join("segments")).unwrap();
        let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
        assert!(!orphan.exists());
        assert_eq!(index.count(&kept.id).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn missing_registry_with_collections_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
            index.create_collection(sample_info(4)).await.unwrap();
        }
        fs::remove_file(dir.path().join(REGISTRY_FILE)).unwrap();
        assert!(matches!(
            EdgeIndex::open(dir.path(), analyzer()),
            Err(Error::Internal(_))
        ));
    }

    #[tokio::test]
    async fn ids_that_are_not_plain_names_are_rejected() {
        let (index, dir) = fresh_index().await;
        for id in ["", "../escape", "a/b", "."] {
            let info = CollectionInfo {
                id: id.into(),
                ..sample_info(4)
            };
            match index.create_collection(info).await {
                Err(Error::InvalidArgument { field, .. }) if field == "id" => {}
                other => panic!("{id:?}: {other:?}"),
            }
            index.delete_collection(id).await.unwrap();
        }
        assert!(dir.path().join(COLLECTIONS_DIR).is_dir());
    }

    #[tokio::test]
    async fn mapped_pages_leave_the_rss_after_optimizing_and_every_point_stays() {
        const DIM: usize = 64;
        let dir = tempfile::tempdir().unwrap();
        // No background optimization: this test runs the one it measures.
        let tuning = Tuning {
            indexing_threshold_kb: Some(8),
            optimize_every_points: usize::MAX,
            ..Tuning::default()
        };
        let info = sample_info(DIM as u32);
        {
            let index = filled_index(dir.path(), &tuning, &info, 2000, 500).await;
            let shard = index.inner.shard(&info.id).unwrap();
            assert!(shard.optimize(&info.id).unwrap(), "nothing was optimized");
            let segments = index.inner.collection_dir(&info.id).join("segments");
            let written = resident_under(&segments);
            assert!(
                written > 0,
                "the optimization left no mapped pages resident"
            );
            index.inner.release_file_pages(&info.id, &shard);
            let left = resident_under(&segments);
            assert!(
                left < written / 4,
                "{left} of {written} bytes still resident"
            );
            // Nothing was lost: every point is found with its payload, before and after a
            // reopen from disk.
            assert_eq!(index.count(&info.id).await.unwrap(), 2000);
            for n in [0u32, 499, 1234, 1999] {
                let hits = index
                    .search(&info.id, nearest(&vector(u64::from(n), DIM)))
                    .await
                    .unwrap();
                assert_eq!(hits[0].id, point_id("doc", n));
                assert_eq!(hits[0].payload.chunk_index, n);
            }
        }
        let index = EdgeIndex::open_tuned(dir.path(), tuning, analyzer()).unwrap();
        assert_eq!(index.count(&info.id).await.unwrap(), 2000);
        for n in [1u32, 777, 1500] {
            let hits = index
                .search(&info.id, nearest(&vector(u64::from(n), DIM)))
                .await
                .unwrap();
            assert_eq!(hits[0].id, point_id("doc", n));
            assert!((hits[0].score - 1.0).abs() < 1e-4);
        }
    }

    #[tokio::test]
    async fn optimization_builds_an_index_and_keeps_results() {
        const DIM: usize = 16;
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning {
            indexing_threshold_kb: Some(8),
            optimize_every_points: 200,
            ..Tuning::default()
        };
        let info = sample_info(DIM as u32);
        {
            let index = filled_index(dir.path(), &tuning, &info, 1000, 250).await;
            let shard = index.inner.shard(&info.id).unwrap();
            wait_for_optimization(&shard).await;
            // Finish whatever the background run left over, deterministically.
            shard.optimize(&info.id).unwrap();
            let engine_info = shard.read(&info.id, |e| Ok(e.info())).unwrap();
            assert!(engine_info.indexed_vectors_count > 0, "{engine_info:?}");
            let indexed: Vec<String> = engine_info
                .payload_schema
                .keys()
                .map(|k| k.to_string())
                .collect();
            assert!(
                indexed.contains(&DOCUMENT_ID_FIELD.to_owned()),
                "{indexed:?}"
            );
            assert!(
                indexed.contains(&METADATA_PAIRS_FIELD.to_owned()),
                "{indexed:?}"
            );

            index
                .delete_points(&info.id, vec![point_id("doc", 500)])
                .await
                .unwrap();
            assert_eq!(index.count(&info.id).await.unwrap(), 999);
            // A running optimization keeps the shard open, which would make the reopen fail.
            wait_for_optimization(&shard).await;
        }
        let index = EdgeIndex::open_tuned(dir.path(), tuning, analyzer()).unwrap();
        assert_eq!(index.count(&info.id).await.unwrap(), 999);
        for n in [0u32, 123, 777, 999] {
            let hits = index
                .search(&info.id, nearest(&vector(u64::from(n), DIM)))
                .await
                .unwrap();
            assert_eq!(hits[0].id, point_id("doc", n));
            assert_eq!(hits[0].payload.chunk_index, n);
            assert!((hits[0].score - 1.0).abs() < 1e-4);
        }
        let hits = index
            .search(&info.id, nearest(&vector(500, DIM)))
            .await
            .unwrap();
        assert!(hits.iter().all(|h| h.id != point_id("doc", 500)));

        // Filters still hold across the indexed and the appendable segment.
        index
            .upsert(&info.id, points("late", 0..10, DIM))
            .await
            .unwrap();
        let mut odd = nearest(&vector(777, DIM));
        odd.filter.metadata.insert("parity".into(), "odd".into());
        let hits = index.search(&info.id, odd.clone()).await.unwrap();
        assert_eq!(hits[0].id, point_id("doc", 777));
        assert!(hits.iter().all(|h| h.payload.metadata["parity"] == "odd"));
        odd.filter.document_ids = vec!["late".into()];
        let hits = index.search(&info.id, odd).await.unwrap();
        assert_eq!(hits.len(), 3);
        assert!(
            hits.iter()
                .all(|h| h.payload.document_id == "late" && h.payload.chunk_index % 2 == 1)
        );
    }

    /// qdrant-edge never truncates its WAL: opening a collection drops its closed segments but
    /// the newest, and an open collection whose closed segments outgrow the bound reopens itself.
    /// Points, deletes and later updates of old points survive (the engine ignores an update
    /// numbered below the point's version, so the WAL must go on numbering where it was).
    #[tokio::test]
    async fn the_wal_is_trimmed_on_open_and_when_it_grows() {
        const DIM: usize = 16;
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning {
            wal_segment_bytes: 64 << 10,
            optimize_every_points: 100,
            wal_reopen_bytes: u64::MAX,
            ..Tuning::default()
        };
        let info = sample_info(DIM as u32);
        let shard_dir = dir.path().join(COLLECTIONS_DIR).join(&info.id);
        let closed = || closed_wal_segments(&shard_dir).unwrap();
        let closed_bytes = || closed().iter().map(|s| s.bytes).sum::<u64>();
        async fn write(index: &EdgeIndex, id: &str, document: &str) {
            for start in (0..2000).step_by(50) {
                index
                    .upsert(id, points(document, start..start + 50, DIM))
                    .await
                    .unwrap();
            }
            wait_for_optimization(&index.inner.shard(id).unwrap()).await;
        }

        // Without trimming, the WAL keeps every write.
        let grown = {
            let index = EdgeIndex::open_tuned(dir.path(), tuning.clone(), analyzer()).unwrap();
            index.create_collection(info.clone()).await.unwrap();
            write(&index, &info.id, "first").await;
            let grown = closed_bytes();
            assert!(closed().len() >= 4, "{} closed segments", closed().len());
            grown
        };

        // Opening trims; an old point is then updated and another deleted, durably.
        {
            let index = EdgeIndex::open_tuned(dir.path(), tuning.clone(), analyzer()).unwrap();
            assert_eq!(index.count(&info.id).await.unwrap(), 2000);
            assert_eq!(closed().len(), 1);
            // Points of the last batches: the highest versions.
            let mut update = points("first", 1990..1991, DIM);
            update[0].vector = vector(99_999, DIM);
            update[0].payload.text = "updated".into();
            index.upsert(&info.id, update).await.unwrap();
            index
                .delete_points(&info.id, vec![point_id("first", 1991)])
                .await
                .unwrap();
        }
        let tuning = Tuning {
            wal_reopen_bytes: grown / 8,
            ..tuning
        };
        let index = EdgeIndex::open_tuned(dir.path(), tuning, analyzer()).unwrap();
        let hits = index
            .search(&info.id, nearest(&vector(99_999, DIM)))
            .await
            .unwrap();
        assert_eq!(hits[0].id, point_id("first", 1990));
        assert_eq!(hits[0].payload.text, "updated");
        assert_eq!(index.count(&info.id).await.unwrap(), 1999);

        // Writing as much again, the open collection reopens itself whenever the bound is passed.
        write(&index, &info.id, "second").await;
        let after = closed_bytes();
        assert!(
            after < grown / 2,
            "closed WAL {after} bytes, {grown} untrimmed"
        );
        assert_eq!(index.count(&info.id).await.unwrap(), 3999);
        for (document, n) in [("first", 0), ("first", 1999), ("second", 1234)] {
            let hits = index
                .search(&info.id, nearest(&vector(u64::from(n), DIM)))
                .await
                .unwrap();
            assert!(
                hits.iter().any(|h| h.id == point_id(document, n)),
                "{document} {n}"
            );
        }
    }

    /// Collections created before the compact layout keep theirs (qdrant-edge persists each
    /// shard's config) and keep working next to new, compact ones.
    #[tokio::test]
    async fn in_ram_collections_keep_their_layout_next_to_compact_ones() {
        const DIM: usize = 8;
        let dir = tempfile::tempdir().unwrap();
        let old = sample_info(DIM as u32);
        {
            let tuning = Tuning {
                layout: Layout::InRam,
                ..Tuning::default()
            };
            let index = EdgeIndex::open_tuned(dir.path(), tuning, analyzer()).unwrap();
            index.create_collection(old.clone()).await.unwrap();
            index
                .upsert(&old.id, points("doc", 0..50, DIM))
                .await
                .unwrap();
        }
        let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
        let new = CollectionInfo {
            id: "compact".into(),
            name: "compact".into(),
            ..sample_info(DIM as u32)
        };
        index.create_collection(new.clone()).await.unwrap();
        index
            .upsert(&new.id, points("doc", 0..50, DIM))
            .await
            .unwrap();
        for (info, on_disk) in [(&old, false), (&new, true)] {
            let shard = index.inner.shard(&info.id).unwrap();
            let config = shard.read(&info.id, |e| Ok(e.config().clone())).unwrap();
            let dense = &config.vectors[DENSE];
            assert_eq!(dense.on_disk.unwrap_or(false), on_disk, "{config:?}");
            assert_eq!(dense.quantization_config.is_some(), on_disk, "{config:?}");
            assert_eq!(index.count(&info.id).await.unwrap(), 50);
            let hits = index
                .search(&info.id, nearest(&vector(17, DIM)))
                .await
                .unwrap();
            assert_eq!(hits[0].id, point_id("doc", 17));
            assert_eq!(hits[0].payload.chunk_index, 17);
        }
    }

    /// An index written by the first release (registry version 1, dense vectors only; made by
    /// `smartdb serve search` of that release through IndexService) opens: its collection is
    /// migrated, keeps every point and payload, and gains the lexical leg.
    #[tokio::test]
    async fn a_version_1_index_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/index-v1.tar.gz");
        let status = std::process::Command::new("tar")
            .arg("xzf")
            .arg(&fixture)
            .arg("-C")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let id = "6f1c1b3e-5d2a-4c47-9a51-0c2f4b7e8a10";
        let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
        let registry: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(REGISTRY_FILE)).unwrap()).unwrap();
        assert_eq!(registry["version"], REGISTRY_VERSION);
        let info = index.resolve("default", "animals").await.unwrap().unwrap();
        assert_eq!((info.id.as_str(), info.dimension), (id, 4));
        assert_eq!(index.count(id).await.unwrap(), 3);
        // Dense as before.
        let hits = index
            .search(id, nearest(&[0.0, 1.0, 0.0, 0.0]))
            .await
            .unwrap();
        assert_eq!(hits[0].payload.text, "Bats navigate by echolocation.");
        assert_eq!(hits[0].payload.metadata["kind"], "mammal");
        // Payloads of that release have no heading path, byte range or pages: they read as unknown.
        let p = &hits[0].payload;
        assert!(p.heading_path.is_empty());
        assert_eq!(
            (p.start_offset, p.end_offset, p.page_start, p.page_end),
            (0, 0, 0, 0)
        );
        // Lexical, from the stored title and text (the title "Owls" counts too).
        let lexical = |q: &str, filter: SearchFilter| LegQuery {
            vector: QueryVector::Sparse(analyzer().query(q)),
            limit: 10,
            filter,
            min_score: None,
        };
        let hits = index
            .search(id, lexical("owls silent", SearchFilter::default()))
            .await
            .unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].payload.document_id, "doc-owls");
        // Typed metadata for ranges, built from the stored strings.
        let recent = SearchFilter {
            ranges: vec![super::super::MetadataRange {
                key: "year".into(),
                kind: RangeKind::Number,
                gte: Some(2020.0),
                gt: None,
                lte: None,
                lt: None,
            }],
            ..SearchFilter::default()
        };
        let hits = index
            .search(
                id,
                LegQuery {
                    vector: QueryVector::Dense(vec![0.5; 4]),
                    ..lexical("x", recent)
                },
            )
            .await
            .unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].payload.document_id, "doc-owls");
        // Reopening does not migrate again.
        drop(index);
        let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
        assert_eq!(index.count(id).await.unwrap(), 3);
        assert!(!dir.path().join(format!("retired-{id}")).exists());
        assert!(!dir.path().join(format!("migrating-{id}")).exists());
    }

    /// Hidden documents survive a restart; a version-2 registry (entries without hidden
    /// documents) opens as version 3 with none hidden and its points untouched.
    #[tokio::test]
    async fn hidden_documents_persist_and_a_version_2_registry_opens() {
        let dir = tempfile::tempdir().unwrap();
        let info = sample_info(4);
        {
            let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
            index.create_collection(info.clone()).await.unwrap();
            index
                .upsert(&info.id, points("doc-new", 0..3, 4))
                .await
                .unwrap();
            index
                .update_hidden(&info.id, vec!["doc-old".into()], vec![])
                .await
                .unwrap();
        }
        let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
        let resolved = index
            .resolve(&info.tenant, &info.name)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            resolved.hidden_documents.into_iter().collect::<Vec<_>>(),
            ["doc-old"]
        );
        drop(index);

        // The same registry as the previous release wrote it.
        let path = dir.path().join(REGISTRY_FILE);
        let mut registry: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        registry["version"] = 2.into();
        registry["collections"][0]
            .as_object_mut()
            .unwrap()
            .remove("hidden_documents");
        fs::write(&path, serde_json::to_vec(&registry).unwrap()).unwrap();

        let index = EdgeIndex::open(dir.path(), analyzer()).unwrap();
        let resolved = index
            .resolve(&info.tenant, &info.name)
            .await
            .unwrap()
            .unwrap();
        assert!(resolved.hidden_documents.is_empty());
        assert!(resolved.same_settings(&info));
        assert_eq!(index.count(&info.id).await.unwrap(), 3);
        let written: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(written["version"], REGISTRY_VERSION);
    }
}
