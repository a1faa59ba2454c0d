//! [`VectorIndex`] on a Qdrant server or cluster, through the official `qdrant-client` (gRPC).
//!
//! Mapping:
//! - one Qdrant collection per knowledge base, `smartdb_kb_<id>`: IDF statistics are kept per
//!   knowledge base (the `bm25` sparse vector has the IDF modifier, which Qdrant computes over
//!   the collection), and each knowledge base has its own dense dimension and model;
//! - the registry collection `smartdb_registry`: one point per knowledge base (point id = the
//!   knowledge base's UUID, or a UUIDv5 of another id) whose payload is its [`CollectionInfo`];
//!   `resolve` is a filtered scroll on its keyword-indexed `tenant` and `name`. Qdrant points need
//!   a vector, so each carries a constant 1-dimensional one.
//!
//! Points carry the same payload as in [`super::EdgeIndex`] (built by the same function): the
//! [`super::ChunkPayload`] plus `metadata_pairs` (keyword-indexed, like `document_id`) and the
//! typed `metadata_numbers` / `metadata_times` for nested range filters. The dense vector `dense`
//! is compared by cosine, which Qdrant reports as the score.
//!
//! Crash safety without transactions: a create makes the collection and its payload indexes
//! before it writes the registry point, and a delete removes the registry point before the
//! collection. A collection without a registry point is thus a leftover: the registry is what
//! exists, and a later create or delete of that id removes the leftover first.
//!
//! Writes wait until applied (`wait = true`) with the configured write ordering; shard number,
//! replication factor and write consistency factor are passed through when a collection is
//! created (unset: the server's defaults).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    DeleteCollectionBuilder, DeletePointsBuilder, Distance, FieldType, Filter, GetPointsBuilder,
    Modifier, NamedVectors, PayloadExcludeSelector, PointId, PointStruct, PointsIdsList, Query,
    QueryPointsBuilder, Range, RetrievedPoint, ScoredPoint, ScrollPointsBuilder,
    SparseVectorParamsBuilder, SparseVectorsConfigBuilder, UpsertPointsBuilder, Vector,
    VectorInput, VectorParamsBuilder, VectorsConfigBuilder, WriteOrdering, WriteOrderingType,
    r#match::MatchValue, point_id::PointIdOptions, with_payload_selector::SelectorOptions,
};
use qdrant_client::{Payload, Qdrant, QdrantError};
use uuid::Uuid;

use super::edge::{
    DENSE, DOCUMENT_ID_FIELD, METADATA_NUMBERS_FIELD, METADATA_PAIRS_FIELD, METADATA_TIMES_FIELD,
    SPARSE, check_points, metadata_pair, stored_payload, validate_id,
};
use super::{
    ChunkPayload, CollectionInfo, IndexPoint, LegQuery, QueryVector, RangeKind, ScoredChunk,
    ScoredId, SearchFilter, SparseVector, VectorIndex,
};
use crate::{Error, Result};

/// Collection holding one [`CollectionInfo`] point per knowledge base.
const REGISTRY_COLLECTION: &str = "smartdb_registry";
/// Prefix of the collection of a knowledge base; its id follows.
const COLLECTION_PREFIX: &str = "smartdb_kb_";
/// Payload field of registry points giving their layout, for future migrations.
const LAYOUT_FIELD: &str = "layout";
const LAYOUT: i64 = 1;
/// Namespace of the registry point ids of collection ids that are not UUIDs.
const REGISTRY_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5e1d_8c5a_0f4e_4b8e_9a43_1c2b_7d6e_0a91);
/// Most registry entries a tenant and name can have (more only after racing creates).
const RESOLVE_SCAN: u32 = 16;

/// How Qdrant orders writes to the replicas of a shard (clusters only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteOrderingArg {
    /// Writes may be reordered across replicas (Qdrant's default; fastest).
    Weak,
    /// Writes go through a dynamically elected leader.
    Medium,
    /// Writes go through the permanent leader: consistent, unavailable while it is down.
    Strong,
}

impl WriteOrderingArg {
    fn to_qdrant(self) -> WriteOrdering {
        let r#type = match self {
            Self::Weak => WriteOrderingType::Weak,
            Self::Medium => WriteOrderingType::Medium,
            Self::Strong => WriteOrderingType::Strong,
        };
        WriteOrdering {
            r#type: r#type.into(),
        }
    }
}

/// search-svc's settings for a Qdrant server backend.
#[derive(Clone, clap::Args)]
pub struct QdrantArgs {
    /// gRPC URL of a Qdrant server or cluster (e.g. `http://qdrant:6334`; `https://` for TLS),
    /// used instead of the embedded engine. Unset: the embedded engine.
    #[arg(long = "qdrant-url", env = "SMARTDB_QDRANT_URL", value_parser = parse_url)]
    pub url: Option<String>,
    /// API key (or JWT) of the Qdrant server.
    #[arg(
        long = "qdrant-api-key",
        env = "SMARTDB_QDRANT_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Shards of each new knowledge base's collection (unset: the server's default).
    #[arg(long = "qdrant-shards", env = "SMARTDB_QDRANT_SHARDS", value_parser = clap::value_parser!(u32).range(1..))]
    pub shards: Option<u32>,
    /// Replicas of each shard of a new collection (unset: the server's default).
    #[arg(long = "qdrant-replication-factor", env = "SMARTDB_QDRANT_REPLICATION_FACTOR", value_parser = clap::value_parser!(u32).range(1..))]
    pub replication_factor: Option<u32>,
    /// Replicas that must acknowledge a write to a new collection (unset: the server's default).
    #[arg(long = "qdrant-write-consistency", env = "SMARTDB_QDRANT_WRITE_CONSISTENCY", value_parser = clap::value_parser!(u32).range(1..))]
    pub write_consistency: Option<u32>,
    /// Ordering of writes across the replicas of a shard.
    #[arg(
        long = "qdrant-write-ordering",
        env = "SMARTDB_QDRANT_WRITE_ORDERING",
        value_enum,
        default_value_t = WriteOrderingArg::Medium
    )]
    pub write_ordering: WriteOrderingArg,
    /// Deadline of each request to Qdrant.
    #[arg(long = "qdrant-timeout", env = "SMARTDB_QDRANT_TIMEOUT", default_value = "30s", value_parser = smartdb_kit::config::parse_duration)]
    pub timeout: Duration,
    /// Deadline of connecting to Qdrant.
    #[arg(long = "qdrant-connect-timeout", env = "SMARTDB_QDRANT_CONNECT_TIMEOUT", default_value = "5s", value_parser = smartdb_kit::config::parse_duration)]
    pub connect_timeout: Duration,
}

impl fmt::Debug for QdrantArgs {
    /// Never prints the API key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QdrantArgs")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("shards", &self.shards)
            .field("replication_factor", &self.replication_factor)
            .field("write_consistency", &self.write_consistency)
            .field("write_ordering", &self.write_ordering)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// A Qdrant URL: http (plain) or https (TLS, checked against the system's roots), with a host.
fn parse_url(url: &str) -> std::result::Result<String, String> {
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|err| format!("invalid URL {url:?}: {err}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(url.to_owned())
}

/// [`VectorIndex`] on a Qdrant server or cluster.
pub struct QdrantIndex {
    client: Qdrant,
    args: QdrantArgs,
    /// Serializes this process's creates and deletes (replicas sharing a server do not).
    admin: tokio::sync::Mutex<()>,
    /// Set once the registry collection is known to exist.
    registry_ready: tokio::sync::OnceCell<()>,
    /// Dimensions of the collections seen, to refuse wrong vectors before anything is sent;
    /// re-read from the registry before a refusal, as another replica may have re-created one.
    dimensions: Mutex<HashMap<String, usize>>,
}

impl fmt::Debug for QdrantIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QdrantIndex")
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

impl QdrantIndex {
    /// A client of the server at `args.url`. Connects lazily: an unreachable server is logged
    /// here and reported as Unavailable by each call until it answers.
    pub async fn connect(args: QdrantArgs) -> Result<Self> {
        let url = args
            .url
            .clone()
            .ok_or_else(|| Error::Internal("no Qdrant URL configured".into()))?;
        parse_url(&url).map_err(Error::Internal)?;
        if args.api_key.is_some() && url.starts_with("http://") {
            tracing::warn!(url = %url, "the Qdrant API key is sent without TLS; use an https URL");
        }
        let mut config = Qdrant::from_url(&url)
            .api_key(args.api_key.clone())
            .timeout(args.timeout)
            .connect_timeout(args.connect_timeout)
            // Done below without blocking the runtime (the client's own check blocks a thread
            // and prints to stdout).
            .skip_compatibility_check();
        config.set_keep_alive_while_idle(true);
        let client = config
            .build()
            .map_err(|err| Error::Internal(format!("Qdrant client for {url}: {err}")))?;
        match client.health_check().await {
            Ok(reply) => {
                if compatible(&reply.version) {
                    tracing::info!(url = %url, server = %reply.version, "connected to Qdrant");
                } else {
                    tracing::warn!(
                        url = %url, server = %reply.version,
                        "Qdrant server version is not within one minor version of the client's \
                         (qdrant-client {}), requests may fail", QDRANT_CLIENT_VERSION
                    );
                }
            }
            Err(err) => {
                tracing::warn!(url = %url, error = %err, "Qdrant is not reachable yet");
            }
        }
        Ok(Self {
            client,
            args,
            admin: tokio::sync::Mutex::new(()),
            registry_ready: tokio::sync::OnceCell::new(),
            dimensions: Mutex::new(HashMap::new()),
        })
    }

    fn write_ordering(&self) -> WriteOrdering {
        self.args.write_ordering.to_qdrant()
    }

    /// Creates the registry collection unless it exists (once per process).
    async fn registry(&self) -> Result<()> {
        self.registry_ready
            .get_or_try_init(|| async {
                let exists = self
                    .client
                    .collection_exists(REGISTRY_COLLECTION)
                    .await
                    .map_err(|err| qdrant_error("check", REGISTRY_COLLECTION, err))?;
                if !exists {
                    let mut vectors = VectorsConfigBuilder::default();
                    vectors.add_vector_params(VectorParamsBuilder::new(1, Distance::Dot));
                    let created = self
                        .client
                        .create_collection(with_cluster_settings(
                            &self.args,
                            CreateCollectionBuilder::new(REGISTRY_COLLECTION)
                                .vectors_config(vectors),
                        ))
                        .await;
                    if let Err(err) = created {
                        // Another replica may have created it meanwhile.
                        let exists = self
                            .client
                            .collection_exists(REGISTRY_COLLECTION)
                            .await
                            .unwrap_or(false);
                        if !exists {
                            return Err(qdrant_error("create", REGISTRY_COLLECTION, err));
                        }
                    } else {
                        tracing::info!(
                            collection = REGISTRY_COLLECTION,
                            "created the Qdrant registry collection"
                        );
                    }
                }
                // Idempotent; also repairs a registry whose creator stopped before this.
                for field in ["tenant", "name"] {
                    self.create_keyword_index(REGISTRY_COLLECTION, field)
                        .await?;
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    async fn create_keyword_index(&self, collection: &str, field: &str) -> Result<()> {
        self.client
            .create_field_index(
                CreateFieldIndexCollectionBuilder::new(collection, field, FieldType::Keyword)
                    .wait(true)
                    .ordering(self.write_ordering()),
            )
            .await
            .map_err(|err| qdrant_error("index", collection, err))?;
        Ok(())
    }

    /// One leg on the server, with or without the hits' payloads.
    async fn query(
        &self,
        collection_id: &str,
        query: LegQuery,
        with_payload: bool,
    ) -> Result<Vec<ScoredPoint>> {
        let dimension = self.dimension(collection_id, false).await?;
        let (input, using) = match query.vector {
            QueryVector::Dense(vector) => {
                if vector.len() != dimension {
                    let fresh = self.dimension(collection_id, true).await?;
                    if vector.len() != fresh {
                        return Err(Error::invalid(
                            "vector",
                            format!(
                                "query has {} dimensions, collection {collection_id} expects {fresh}",
                                vector.len(),
                            ),
                        ));
                    }
                }
                if !vector.iter().all(|x| x.is_finite()) {
                    return Err(Error::invalid("vector", "query has a non-finite component"));
                }
                (VectorInput::new_dense(vector), DENSE)
            }
            QueryVector::Sparse(SparseVector { indices, values }) => {
                if indices.is_empty() {
                    // Only stop words, or nothing a term could be made of.
                    return Ok(Vec::new());
                }
                if indices.len() != values.len() || !values.iter().all(|x| x.is_finite()) {
                    return Err(Error::invalid("vector", "malformed sparse query vector"));
                }
                (VectorInput::new_sparse(indices, values), SPARSE)
            }
        };
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let name = collection_name(collection_id);
        let mut request = QueryPointsBuilder::new(&name)
            .query(Query::new_nearest(input))
            .using(using)
            .limit(query.limit as u64)
            .with_payload(if with_payload {
                stored_fields_only()
            } else {
                SelectorOptions::Enable(false)
            })
            .with_vectors(false);
        if let Some(filter) = to_qdrant_filter(&query.filter) {
            request = request.filter(filter);
        }
        if let Some(min_score) = query.min_score {
            request = request.score_threshold(min_score);
        }
        let response = self.client.query(request).await.map_err(|err| {
            match qdrant_error("search", &name, err) {
                Error::NotFound(_) => not_found(collection_id),
                Error::InvalidArgument { message, .. } => Error::invalid("vector", message),
                err => err,
            }
        })?;
        Ok(response.result)
    }

    /// The registry entry of a collection id.
    async fn registry_get(&self, id: &str) -> Result<Option<CollectionInfo>> {
        self.registry().await?;
        let response = self
            .client
            .get_points(
                GetPointsBuilder::new(REGISTRY_COLLECTION, vec![registry_point_id(id)])
                    .with_payload(true)
                    .with_vectors(false),
            )
            .await
            .map_err(|err| registry_error("read", err))?;
        let entry = response
            .result
            .into_iter()
            .next()
            .map(registry_entry)
            .transpose()?;
        // A point id could in theory be shared by two ids (UUIDv5 of a non-UUID id).
        Ok(entry.filter(|info| info.id == id))
    }

    /// Registry entries of a tenant and name, in point-id order.
    async fn registry_find(&self, tenant: &str, name: &str) -> Result<Vec<CollectionInfo>> {
        self.registry().await?;
        let filter = Filter::must([
            keyword_condition("tenant", tenant),
            keyword_condition("name", name),
        ]);
        let response = self
            .client
            .scroll(
                ScrollPointsBuilder::new(REGISTRY_COLLECTION)
                    .filter(filter)
                    .limit(RESOLVE_SCAN)
                    .with_payload(true)
                    .with_vectors(false),
            )
            .await
            .map_err(|err| registry_error("read", err))?;
        response.result.into_iter().map(registry_entry).collect()
    }

    async fn registry_put(&self, info: &CollectionInfo) -> Result<()> {
        let mut payload = serde_json::to_value(info)
            .map_err(|err| Error::Internal(format!("serializing collection {}: {err}", info.id)))?;
        if let serde_json::Value::Object(map) = &mut payload {
            map.insert(LAYOUT_FIELD.into(), LAYOUT.into());
        }
        let payload = Payload::try_from(payload)
            .map_err(|err| Error::Internal(format!("registry payload: {err}")))?;
        let point = PointStruct::new(registry_point_id(&info.id), vec![1.0f32], payload);
        self.client
            .upsert_points(
                UpsertPointsBuilder::new(REGISTRY_COLLECTION, vec![point])
                    .wait(true)
                    .ordering(self.write_ordering()),
            )
            .await
            .map_err(|err| registry_error("write", err))?;
        Ok(())
    }

    async fn registry_remove(&self, id: &str) -> Result<()> {
        self.registry().await?;
        self.client
            .delete_points(
                DeletePointsBuilder::new(REGISTRY_COLLECTION)
                    .points(PointsIdsList {
                        ids: vec![registry_point_id(id)],
                    })
                    .wait(true)
                    .ordering(self.write_ordering()),
            )
            .await
            .map_err(|err| registry_error("write", err))?;
        Ok(())
    }

    /// Dimension of a collection: remembered, or from the registry when `fresh` or unknown.
    /// NotFound if the registry does not know it.
    async fn dimension(&self, id: &str, fresh: bool) -> Result<usize> {
        if !fresh && let Some(dimension) = self.cached_dimension(id) {
            return Ok(dimension);
        }
        match self.registry_get(id).await? {
            Some(info) => {
                let dimension = info.dimension as usize;
                self.remember(id, Some(dimension));
                Ok(dimension)
            }
            None => {
                self.remember(id, None);
                Err(not_found(id))
            }
        }
    }

    fn cached_dimension(&self, id: &str) -> Option<usize> {
        self.dimensions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .copied()
    }

    fn remember(&self, id: &str, dimension: Option<usize>) {
        let mut dimensions = self
            .dimensions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match dimension {
            Some(dimension) => dimensions.insert(id.to_owned(), dimension),
            None => dimensions.remove(id),
        };
    }

    /// Deletes the Qdrant collection of `id`; Ok if it does not exist.
    async fn drop_collection(&self, id: &str) -> Result<()> {
        let name = collection_name(id);
        match self
            .client
            .delete_collection(DeleteCollectionBuilder::new(&name))
            .await
        {
            Ok(_) => Ok(()),
            Err(err) => match qdrant_error("delete", &name, err) {
                Error::NotFound(_) => Ok(()),
                err => Err(err),
            },
        }
    }

    /// [`VectorIndex::delete_collection`] with the admin lock held: registry point first, so
    /// that a failure halfway leaves an unregistered leftover, removed by the next attempt.
    async fn delete_locked(&self, id: &str) -> Result<()> {
        if validate_id(id).is_err() {
            // Never created: such ids are refused by create_collection.
            return Ok(());
        }
        let registered = self.registry_get(id).await?.is_some();
        if registered {
            self.registry_remove(id).await?;
        }
        self.remember(id, None);
        self.drop_collection(id).await?;
        if registered {
            tracing::info!(collection = %id, "deleted collection");
        }
        Ok(())
    }

    /// Creates the collection of `info` with its payload indexes (no registry entry yet).
    async fn create_engine_collection(&self, info: &CollectionInfo) -> Result<()> {
        let name = collection_name(&info.id);
        let create = kb_collection_request(&self.args, info);
        self.client.create_collection(create).await.map_err(|err| {
            match qdrant_error("create", &name, err) {
                // The settings are search-svc's (e.g. more replicas than the cluster has nodes).
                Error::InvalidArgument { message, .. } => Error::Internal(message),
                err => err,
            }
        })?;
        for field in [DOCUMENT_ID_FIELD, METADATA_PAIRS_FIELD] {
            self.create_keyword_index(&name, field).await?;
        }
        Ok(())
    }
}

/// Version of qdrant-client this is built with (see the workspace manifest for the choice).
const QDRANT_CLIENT_VERSION: &str = "1.19";

/// Whether a server version is within one minor version of the client's, as Qdrant supports.
fn compatible(server_version: &str) -> bool {
    let minor = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.trim_start_matches('v').split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    };
    match (minor(QDRANT_CLIENT_VERSION), minor(server_version)) {
        (Some((cm, cn)), Some((sm, sn))) => cm == sm && cn.abs_diff(sn) <= 1,
        _ => false,
    }
}

#[async_trait::async_trait]
impl VectorIndex for QdrantIndex {
    async fn create_collection(&self, info: CollectionInfo) -> Result<String> {
        if info.dimension == 0 {
            return Err(Error::invalid("dimension", "must be at least 1"));
        }
        validate_id(&info.id)?;
        let _admin = self.admin.lock().await;

        if let Some(existing) = self.registry_get(&info.id).await? {
            if existing.same_settings(&info) {
                self.remember(&info.id, Some(info.dimension as usize));
                return Ok(info.id);
            }
            return Err(super::exists_with_other_settings(&existing));
        }
        for orphan in self.registry_find(&info.tenant, &info.name).await? {
            // The catalog reserves a name before it creates its collection, so one already
            // here under another id was left by a create that never finished.
            let same_settings = orphan.dimension == info.dimension
                && orphan.embedding_model == info.embedding_model;
            if same_settings {
                let empty = match self.count(&orphan.id).await {
                    Ok(n) => n == 0,
                    Err(Error::NotFound(_)) => false,
                    Err(err) => return Err(err),
                };
                if empty {
                    tracing::info!(
                        collection = %orphan.id, tenant = %info.tenant, name = %info.name,
                        "reusing an orphaned collection"
                    );
                    self.remember(&orphan.id, Some(orphan.dimension as usize));
                    return Ok(orphan.id);
                }
            }
            tracing::warn!(
                collection = %orphan.id, tenant = %info.tenant, name = %info.name,
                "replacing an orphaned collection"
            );
            self.delete_locked(&orphan.id).await?;
        }

        // A leftover of a create or delete that stopped halfway; the registry does not know it.
        self.drop_collection(&info.id).await?;
        if let Err(err) = self.create_engine_collection(&info).await {
            let _ = self.drop_collection(&info.id).await;
            return Err(err);
        }
        if let Err(err) = self.registry_put(&info).await {
            let _ = self.drop_collection(&info.id).await;
            return Err(err);
        }
        self.remember(&info.id, Some(info.dimension as usize));
        tracing::info!(
            collection = %info.id, tenant = %info.tenant, name = %info.name, "created collection"
        );
        Ok(info.id)
    }

    async fn delete_collection(&self, id: &str) -> Result<()> {
        let _admin = self.admin.lock().await;
        self.delete_locked(id).await
    }

    async fn resolve(&self, tenant: &str, name: &str) -> Result<Option<CollectionInfo>> {
        Ok(self.registry_find(tenant, name).await?.into_iter().next())
    }

    async fn update_hidden(
        &self,
        collection_id: &str,
        hide: Vec<String>,
        show: Vec<String>,
    ) -> Result<BTreeSet<String>> {
        // The whole entry is one registry point, so readers see the old set or the new one.
        // The admin lock orders this process's changes; replicas sharing one Qdrant could
        // still interleave (read, change, write), which ingest-svc avoids by publishing the
        // versions of one source one at a time.
        let _admin = self.admin.lock().await;
        let mut entry = self
            .registry_get(collection_id)
            .await?
            .ok_or_else(|| not_found(collection_id))?;
        if entry.apply_hidden(&hide, &show)? {
            self.registry_put(&entry).await?;
        }
        Ok(entry.hidden_documents)
    }

    async fn upsert(&self, collection_id: &str, points: Vec<IndexPoint>) -> Result<usize> {
        let dimension = self.dimension(collection_id, points.is_empty()).await?;
        if let Err(err) = check_points(collection_id, &points, dimension) {
            let fresh = self.dimension(collection_id, true).await?;
            if fresh == dimension {
                return Err(err);
            }
            check_points(collection_id, &points, fresh)?;
        }
        let written = points.len();
        if written == 0 {
            return Ok(0);
        }
        let points = points
            .into_iter()
            .map(to_qdrant_point)
            .collect::<Result<Vec<_>>>()?;
        let name = collection_name(collection_id);
        self.client
            .upsert_points(
                UpsertPointsBuilder::new(&name, points)
                    .wait(true)
                    .ordering(self.write_ordering()),
            )
            .await
            .map_err(|err| match qdrant_error("write to", &name, err) {
                Error::NotFound(_) => not_found(collection_id),
                Error::InvalidArgument { message, .. } => Error::invalid("points", message),
                err => err,
            })?;
        Ok(written)
    }

    async fn delete_points(&self, collection_id: &str, ids: Vec<Uuid>) -> Result<()> {
        if ids.is_empty() {
            // Nothing to send, but an unknown collection is still NotFound.
            self.dimension(collection_id, true).await?;
            return Ok(());
        }
        let name = collection_name(collection_id);
        self.client
            .delete_points(
                DeletePointsBuilder::new(&name)
                    .points(PointsIdsList {
                        ids: ids
                            .into_iter()
                            .map(|id| PointId::from(id.to_string()))
                            .collect(),
                    })
                    .wait(true)
                    .ordering(self.write_ordering()),
            )
            .await
            .map_err(|err| match qdrant_error("delete from", &name, err) {
                Error::NotFound(_) => not_found(collection_id),
                err => err,
            })?;
        Ok(())
    }

    async fn search(&self, collection_id: &str, query: LegQuery) -> Result<Vec<ScoredChunk>> {
        self.query(collection_id, query, true)
            .await?
            .into_iter()
            .map(to_scored_chunk)
            .collect()
    }

    async fn search_ids(&self, collection_id: &str, query: LegQuery) -> Result<Vec<ScoredId>> {
        self.query(collection_id, query, false)
            .await?
            .into_iter()
            .map(|point| {
                Ok(ScoredId {
                    id: uuid_of(point.id)?,
                    score: point.score,
                })
            })
            .collect()
    }

    async fn payloads(
        &self,
        collection_id: &str,
        ids: Vec<Uuid>,
    ) -> Result<Vec<(Uuid, ChunkPayload)>> {
        if ids.is_empty() {
            // Nothing to read, but an unknown collection is still NotFound.
            self.dimension(collection_id, true).await?;
            return Ok(Vec::new());
        }
        let name = collection_name(collection_id);
        let response = self
            .client
            .get_points(
                GetPointsBuilder::new(
                    &name,
                    ids.iter()
                        .map(|id| PointId::from(id.to_string()))
                        .collect::<Vec<_>>(),
                )
                .with_payload(stored_fields_only())
                .with_vectors(false),
            )
            .await
            .map_err(|err| match qdrant_error("read payloads of", &name, err) {
                Error::NotFound(_) => not_found(collection_id),
                err => err,
            })?;
        let mut found = HashMap::with_capacity(response.result.len());
        for point in response.result {
            let id = uuid_of(point.id)?;
            found.insert(id, chunk_payload(id, point.payload)?);
        }
        // The server answers in its own order.
        Ok(ids
            .into_iter()
            .filter_map(|id| found.remove(&id).map(|payload| (id, payload)))
            .collect())
    }

    async fn count(&self, collection_id: &str) -> Result<u64> {
        let name = collection_name(collection_id);
        let response = self
            .client
            .count(CountPointsBuilder::new(&name).exact(true))
            .await
            .map_err(|err| match qdrant_error("count", &name, err) {
                Error::NotFound(_) => not_found(collection_id),
                err => err,
            })?;
        Ok(response.result.map_or(0, |r| r.count))
    }
}

/// The collection of a knowledge base: a dense vector compared by cosine, a BM25 sparse vector
/// to which Qdrant applies the collection's IDF, and the cluster settings.
fn kb_collection_request(args: &QdrantArgs, info: &CollectionInfo) -> CreateCollectionBuilder {
    let mut vectors = VectorsConfigBuilder::default();
    vectors.add_named_vector_params(
        DENSE,
        VectorParamsBuilder::new(u64::from(info.dimension), Distance::Cosine),
    );
    let mut sparse = SparseVectorsConfigBuilder::default();
    sparse.add_named_vector_params(
        SPARSE,
        SparseVectorParamsBuilder::default().modifier(Modifier::Idf),
    );
    with_cluster_settings(
        args,
        CreateCollectionBuilder::new(collection_name(&info.id))
            .vectors_config(vectors)
            .sparse_vectors_config(sparse),
    )
}

/// Shard number, replication and write consistency, as configured (unset: the server's).
fn with_cluster_settings(
    args: &QdrantArgs,
    mut create: CreateCollectionBuilder,
) -> CreateCollectionBuilder {
    if let Some(shards) = args.shards {
        create = create.shard_number(shards);
    }
    if let Some(replicas) = args.replication_factor {
        create = create.replication_factor(replicas);
    }
    if let Some(acks) = args.write_consistency {
        create = create.write_consistency_factor(acks);
    }
    create
}

/// Qdrant collection of a knowledge base.
fn collection_name(id: &str) -> String {
    format!("{COLLECTION_PREFIX}{id}")
}

/// Registry point id of a collection id: the id itself if it is a UUID.
fn registry_point_id(id: &str) -> PointId {
    let uuid =
        Uuid::parse_str(id).unwrap_or_else(|_| Uuid::new_v5(&REGISTRY_ID_NAMESPACE, id.as_bytes()));
    PointId::from(uuid.to_string())
}

fn registry_entry(point: RetrievedPoint) -> Result<CollectionInfo> {
    Payload::from(point.payload)
        .deserialize()
        .map_err(|err| Error::Internal(format!("malformed Qdrant registry entry: {err}")))
}

/// An exact keyword match. (`Condition::matches` with a `String` turns a value containing
/// whitespace into a full-text match, which is not what equality means.)
fn keyword_condition(field: &str, value: &str) -> Condition {
    Condition::matches(field, MatchValue::Keyword(value.to_owned()))
}

/// A match of any of the keywords.
fn any_keyword_condition(field: &str, values: Vec<String>) -> Condition {
    Condition::matches(
        field,
        MatchValue::Keywords(qdrant_client::qdrant::RepeatedStrings { strings: values }),
    )
}

/// Translates a [`SearchFilter`] into a Qdrant filter over the stored payload (the same layout
/// as the embedded engine's), `None` if empty.
fn to_qdrant_filter(filter: &SearchFilter) -> Option<Filter> {
    let mut must = Vec::new();
    for (key, value) in &filter.metadata {
        must.push(keyword_condition(
            METADATA_PAIRS_FIELD,
            &metadata_pair(key, value),
        ));
    }
    for (key, values) in &filter.any_of {
        let pairs = values.iter().map(|v| metadata_pair(key, v)).collect();
        must.push(any_keyword_condition(METADATA_PAIRS_FIELD, pairs));
    }
    for range in &filter.ranges {
        let field = match range.kind {
            RangeKind::Number => METADATA_NUMBERS_FIELD,
            RangeKind::Time => METADATA_TIMES_FIELD,
        };
        // One entry of the array must match both the key and the range.
        let inner = Filter::must([
            keyword_condition("key", &range.key),
            Condition::range(
                "value",
                Range {
                    lt: range.lt,
                    gt: range.gt,
                    gte: range.gte,
                    lte: range.lte,
                },
            ),
        ]);
        must.push(Condition::nested(field, inner));
    }
    if !filter.document_ids.is_empty() {
        must.push(any_keyword_condition(
            DOCUMENT_ID_FIELD,
            filter.document_ids.clone(),
        ));
    }
    let mut out = (!must.is_empty()).then(|| Filter::must(must));
    if !filter.exclude_document_ids.is_empty() {
        let filter_ = out.get_or_insert_with(Filter::default);
        filter_.must_not.push(any_keyword_condition(
            DOCUMENT_ID_FIELD,
            filter.exclude_document_ids.clone(),
        ));
    }
    out
}

/// Hits carry the [`ChunkPayload`] fields, not the derived filter fields.
fn stored_fields_only() -> SelectorOptions {
    SelectorOptions::Exclude(PayloadExcludeSelector {
        fields: [
            METADATA_PAIRS_FIELD,
            METADATA_NUMBERS_FIELD,
            METADATA_TIMES_FIELD,
        ]
        .map(str::to_owned)
        .to_vec(),
    })
}

/// A chunk as a Qdrant point: the stored payload, the dense vector and, if it has terms, the
/// BM25 vector (a point may lack a named vector; an empty sparse vector adds nothing).
fn to_qdrant_point(point: IndexPoint) -> Result<PointStruct> {
    let payload = Payload::try_from(stored_payload(point.id, &point.payload)?)
        .map_err(|err| Error::Internal(format!("payload of point {}: {err}", point.id)))?;
    let mut vectors = NamedVectors::default().add_vector(DENSE, Vector::new_dense(point.vector));
    if !point.sparse.indices.is_empty() {
        vectors = vectors.add_vector(
            SPARSE,
            Vector::new_sparse(point.sparse.indices, point.sparse.values),
        );
    }
    Ok(PointStruct::new(point.id.to_string(), vectors, payload))
}

fn to_scored_chunk(point: ScoredPoint) -> Result<ScoredChunk> {
    let id = uuid_of(point.id)?;
    Ok(ScoredChunk {
        id,
        score: point.score,
        payload: chunk_payload(id, point.payload)?,
    })
}

fn uuid_of(id: Option<PointId>) -> Result<Uuid> {
    match id.and_then(|id| id.point_id_options) {
        Some(PointIdOptions::Uuid(id)) => Uuid::parse_str(&id)
            .map_err(|err| Error::Internal(format!("malformed point id {id}: {err}"))),
        other => Err(Error::Internal(format!("unexpected point id {other:?}"))),
    }
}

fn chunk_payload(
    id: Uuid,
    payload: HashMap<String, qdrant_client::qdrant::Value>,
) -> Result<ChunkPayload> {
    Payload::from(payload)
        .deserialize()
        .map_err(|err| Error::Internal(format!("point {id} has a malformed payload: {err}")))
}

/// A failure of the registry collection: never the caller's fault (it is created on first use,
/// so NotFound means it was removed behind our back).
fn registry_error(action: &str, err: QdrantError) -> Error {
    match qdrant_error(action, REGISTRY_COLLECTION, err) {
        Error::NotFound(message) | Error::InvalidArgument { message, .. } => {
            Error::Internal(message)
        }
        err => err,
    }
}

/// Maps a client error to search-svc's: NotFound, InvalidArgument (field `request`; callers
/// rename it), Unavailable when the server cannot be reached or is overloaded, DeadlineExceeded
/// on a timeout, Internal otherwise.
fn qdrant_error(action: &str, collection: &str, err: QdrantError) -> Error {
    use tonic::Code;
    let status = match err {
        QdrantError::ResponseError { status } => status,
        QdrantError::ResourceExhaustedError {
            status,
            retry_after_seconds,
        } => {
            return Error::Unavailable(format!(
                "Qdrant is overloaded ({action} {collection}), retry after \
                 {retry_after_seconds} s: {}",
                status.message()
            ));
        }
        other => {
            return Error::Internal(format!("Qdrant: cannot {action} {collection}: {other}"));
        }
    };
    let message = format!("Qdrant: cannot {action} {collection}: {}", status.message());
    match status.code() {
        Code::NotFound => Error::NotFound(message),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            Error::invalid("request", message)
        }
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted => Error::Unavailable(message),
        Code::DeadlineExceeded => Error::DeadlineExceeded(message),
        // tonic reports its own request timeout as Cancelled.
        Code::Cancelled if status.message().contains("Timeout") => Error::DeadlineExceeded(message),
        // The client reports a failed connection as Internal "Failed to connect to ...".
        Code::Internal if status.message().starts_with("Failed to connect") => {
            Error::Unavailable(message)
        }
        Code::Unauthenticated | Code::PermissionDenied => Error::Internal(format!(
            "{message} (check --qdrant-api-key / SMARTDB_QDRANT_API_KEY)"
        )),
        _ => Error::Internal(message),
    }
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("collection {id} not found"))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};
    use qdrant_client::qdrant::condition::ConditionOneOf;
    use qdrant_client::qdrant::value::Kind;
    use qdrant_client::qdrant::vectors::VectorsOptions;
    use qdrant_client::qdrant::vectors_config::Config as VectorsConfigKind;
    use qdrant_client::qdrant::{FieldCondition, Match, NestedCondition, RepeatedStrings};

    use super::*;
    use crate::index::{MetadataRange, point_id};

    /// A client of the server named by `SMARTDB_TEST_QDRANT_URL` (and
    /// `SMARTDB_TEST_QDRANT_API_KEY`, if set). The cases clean up after themselves.
    async fn server_index() -> (QdrantIndex, ()) {
        let url = std::env::var("SMARTDB_TEST_QDRANT_URL")
            .expect("SMARTDB_TEST_QDRANT_URL names the Qdrant server (gRPC port) to test against");
        let mut args = parse(&["--qdrant-url", &url]).expect("SMARTDB_TEST_QDRANT_URL");
        args.api_key = std::env::var("SMARTDB_TEST_QDRANT_API_KEY")
            .ok()
            .filter(|key| !key.is_empty());
        (QdrantIndex::connect(args).await.expect("connect"), ())
    }

    mod conformance {
        vector_index_conformance!(
            super::server_index,
            #[cfg_attr(
                not(qdrant_server),
                ignore = "needs SMARTDB_TEST_QDRANT_URL (a Qdrant 1.19+ server)"
            )]
        );
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        qdrant: QdrantArgs,
    }

    fn parse(args: &[&str]) -> std::result::Result<QdrantArgs, clap::Error> {
        let argv = std::iter::once("search-svc").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|cli| cli.qdrant)
    }

    #[test]
    fn settings_default_to_the_embedded_engine_and_server_defaults() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.url, None);
        assert_eq!(args.api_key, None);
        assert_eq!(
            (args.shards, args.replication_factor, args.write_consistency),
            (None, None, None)
        );
        assert_eq!(args.write_ordering, WriteOrderingArg::Medium);
        assert_eq!(args.timeout, Duration::from_secs(30));
        assert_eq!(args.connect_timeout, Duration::from_secs(5));
        // Nothing set: the request carries no cluster settings, so the server's apply.
        let request = kb_collection_request(&args, &info("kb", 8)).build();
        assert_eq!(
            (
                request.shard_number,
                request.replication_factor,
                request.write_consistency_factor
            ),
            (None, None, None)
        );
    }

    #[test]
    fn settings_are_parsed_and_passed_to_new_collections() {
        let args = parse(&[
            "--qdrant-url",
            "https://qdrant.example.com:6334",
            "--qdrant-api-key",
            "secret-key",
            "--qdrant-shards",
            "4",
            "--qdrant-replication-factor",
            "3",
            "--qdrant-write-consistency",
            "2",
            "--qdrant-write-ordering",
            "strong",
            "--qdrant-timeout",
            "10s",
            "--qdrant-connect-timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(args.url.as_deref(), Some("https://qdrant.example.com:6334"));
        assert_eq!(args.api_key.as_deref(), Some("secret-key"));
        assert_eq!(args.write_ordering, WriteOrderingArg::Strong);
        assert_eq!(
            args.write_ordering.to_qdrant().r#type,
            WriteOrderingType::Strong as i32
        );
        assert_eq!(args.timeout, Duration::from_secs(10));
        assert_eq!(args.connect_timeout, Duration::from_secs(2));
        assert!(
            !format!("{args:?}").contains("secret-key"),
            "Debug must not print the API key"
        );

        let request = kb_collection_request(&args, &info("kb-1", 384)).build();
        assert_eq!(request.collection_name, "smartdb_kb_kb-1");
        assert_eq!(request.shard_number, Some(4));
        assert_eq!(request.replication_factor, Some(3));
        assert_eq!(request.write_consistency_factor, Some(2));
        let Some(VectorsConfigKind::ParamsMap(dense)) =
            request.vectors_config.and_then(|c| c.config)
        else {
            panic!("named dense vector expected");
        };
        let params = &dense.map[DENSE];
        assert_eq!(params.size, 384);
        assert_eq!(params.distance, Distance::Cosine as i32);
        assert_eq!(dense.map.len(), 1);
        let sparse = request.sparse_vectors_config.unwrap().map;
        assert_eq!(sparse.len(), 1);
        assert_eq!(sparse[SPARSE].modifier, Some(Modifier::Idf as i32));
    }

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            &["--qdrant-url", "qdrant:6334"][..],
            &["--qdrant-url", "ftp://qdrant:6334"],
            &["--qdrant-url", "http://"],
            &["--qdrant-url", "not a url"],
            &["--qdrant-shards", "0"],
            &["--qdrant-replication-factor", "0"],
            &["--qdrant-write-consistency", "-1"],
            &["--qdrant-write-ordering", "eventual"],
            &["--qdrant-timeout", "soon"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(&["--qdrant-url", "http://localhost:6334"]).is_ok());
    }

    /// The flags sit in search-svc's configuration without clashing with the others.
    #[test]
    fn settings_fit_in_the_search_svc_config() {
        #[derive(clap::Parser)]
        struct Full {
            #[command(flatten)]
            config: crate::Config,
        }
        Full::command().debug_assert();
        let full = Full::try_parse_from([
            "search-svc",
            "--listen",
            "127.0.0.1:0",
            "--qdrant-url",
            "http://127.0.0.1:6334",
            "--qdrant-shards",
            "2",
        ])
        .unwrap();
        assert_eq!(
            full.config.qdrant.url.as_deref(),
            Some("http://127.0.0.1:6334")
        );
        assert_eq!(full.config.qdrant.shards, Some(2));
    }

    #[test]
    fn server_versions_within_one_minor_are_compatible() {
        for ok in [
            "1.19.0",
            "1.19.4",
            "1.20.1",
            "1.18.0",
            "v1.20.0",
            "1.19.0-dev",
        ] {
            assert!(compatible(ok), "{ok}");
        }
        for bad in ["1.21.0", "1.17.9", "2.19.0", "", "dev"] {
            assert!(!compatible(bad), "{bad}");
        }
    }

    fn info(id: &str, dimension: u32) -> CollectionInfo {
        CollectionInfo {
            id: id.into(),
            tenant: "acme".into(),
            name: "handbook".into(),
            dimension,
            embedding_model: "test-model".into(),
            ..Default::default()
        }
    }

    /// A field condition built by hand, independently of the code under test.
    fn field(key: &str, value: MatchValue) -> Condition {
        Condition {
            condition_one_of: Some(ConditionOneOf::Field(FieldCondition {
                key: key.into(),
                r#match: Some(Match {
                    match_value: Some(value),
                }),
                ..FieldCondition::default()
            })),
        }
    }

    fn must(conditions: Vec<Condition>) -> Filter {
        Filter {
            must: conditions,
            ..Filter::default()
        }
    }

    #[test]
    fn an_empty_filter_is_no_filter() {
        assert_eq!(to_qdrant_filter(&SearchFilter::default()), None);
    }

    #[test]
    fn metadata_equality_is_an_exact_keyword_match_on_pairs() {
        let filter = SearchFilter {
            metadata: [
                ("lang".to_owned(), "en".to_owned()),
                // Whitespace must not turn it into a full-text match.
                (r#"x.y [z] "q""#.to_owned(), "two words".to_owned()),
            ]
            .into(),
            ..SearchFilter::default()
        };
        assert_eq!(
            to_qdrant_filter(&filter),
            Some(must(vec![
                field(
                    "metadata_pairs",
                    MatchValue::Keyword(r#"["lang","en"]"#.into())
                ),
                field(
                    "metadata_pairs",
                    MatchValue::Keyword(r#"["x.y [z] \"q\"","two words"]"#.into())
                ),
            ]))
        );
    }

    #[test]
    fn any_of_is_a_keywords_match_on_pairs() {
        let filter = SearchFilter {
            any_of: [("lang".to_owned(), vec!["en".to_owned(), "fr fr".to_owned()])].into(),
            ..SearchFilter::default()
        };
        assert_eq!(
            to_qdrant_filter(&filter),
            Some(must(vec![field(
                "metadata_pairs",
                MatchValue::Keywords(RepeatedStrings {
                    strings: vec![r#"["lang","en"]"#.into(), r#"["lang","fr fr"]"#.into()],
                })
            )]))
        );
    }

    #[test]
    fn document_ids_are_a_keywords_match() {
        let filter = SearchFilter {
            document_ids: vec!["doc a".into(), "doc-b".into()],
            ..SearchFilter::default()
        };
        assert_eq!(
            to_qdrant_filter(&filter),
            Some(must(vec![field(
                "document_id",
                MatchValue::Keywords(RepeatedStrings {
                    strings: vec!["doc a".into(), "doc-b".into()],
                })
            )]))
        );
    }

    #[test]
    fn ranges_are_nested_conditions_on_typed_metadata() {
        let filter = SearchFilter {
            ranges: vec![
                MetadataRange {
                    key: "year".into(),
                    kind: RangeKind::Number,
                    gte: Some(2020.0),
                    gt: None,
                    lte: None,
                    lt: Some(2024.5),
                },
                MetadataRange {
                    key: "published at".into(),
                    kind: RangeKind::Time,
                    gte: None,
                    gt: Some(1.7e9),
                    lte: Some(1.8e9),
                    lt: None,
                },
            ],
            ..SearchFilter::default()
        };
        let nested = |array: &str, key: &str, range: Range| Condition {
            condition_one_of: Some(ConditionOneOf::Nested(NestedCondition {
                key: array.into(),
                filter: Some(must(vec![
                    field("key", MatchValue::Keyword(key.into())),
                    Condition {
                        condition_one_of: Some(ConditionOneOf::Field(FieldCondition {
                            key: "value".into(),
                            range: Some(range),
                            ..FieldCondition::default()
                        })),
                    },
                ])),
            })),
        };
        assert_eq!(
            to_qdrant_filter(&filter),
            Some(must(vec![
                nested(
                    "metadata_numbers",
                    "year",
                    Range {
                        gte: Some(2020.0),
                        lt: Some(2024.5),
                        ..Range::default()
                    }
                ),
                nested(
                    "metadata_times",
                    "published at",
                    Range {
                        gt: Some(1.7e9),
                        lte: Some(1.8e9),
                        ..Range::default()
                    }
                ),
            ]))
        );
    }

    #[test]
    fn hidden_documents_are_a_must_not_keywords_match() {
        let filter = to_qdrant_filter(&SearchFilter {
            exclude_document_ids: vec!["old".into()],
            ..SearchFilter::default()
        })
        .unwrap();
        assert!(filter.must.is_empty());
        assert_eq!(
            filter.must_not,
            [any_keyword_condition(DOCUMENT_ID_FIELD, vec!["old".into()])]
        );
    }

    #[test]
    fn all_filter_kinds_combine_in_must() {
        let filter = SearchFilter {
            metadata: [("team".to_owned(), "core".to_owned())].into(),
            any_of: [("lang".to_owned(), vec!["en".to_owned()])].into(),
            ranges: vec![MetadataRange {
                key: "year".into(),
                kind: RangeKind::Number,
                gte: Some(1.0),
                gt: None,
                lte: None,
                lt: None,
            }],
            document_ids: vec!["doc".into()],
            exclude_document_ids: Vec::new(),
        };
        let filter = to_qdrant_filter(&filter).unwrap();
        assert!(filter.should.is_empty() && filter.must_not.is_empty());
        assert_eq!(filter.min_should, None);
        let kinds: Vec<&str> = filter
            .must
            .iter()
            .map(|c| match c.condition_one_of.as_ref().unwrap() {
                ConditionOneOf::Field(f) => f.key.as_str(),
                ConditionOneOf::Nested(n) => n.key.as_str(),
                other => panic!("unexpected condition {other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "metadata_pairs",
                "metadata_pairs",
                "metadata_numbers",
                "document_id"
            ]
        );
    }

    fn sample_point(sparse: SparseVector) -> IndexPoint {
        IndexPoint {
            id: point_id("doc-1", 3),
            vector: vec![0.25, -0.5, 1.0],
            sparse,
            payload: ChunkPayload {
                document_id: "doc-1".into(),
                chunk_index: 3,
                text: "Owls hunt at night.".into(),
                title: "Owls".into(),
                source_name: "owls.md".into(),
                metadata: [
                    ("lang".to_owned(), "en".to_owned()),
                    ("year".to_owned(), "2021".to_owned()),
                    ("published".to_owned(), "2021-06-15T12:00:00Z".to_owned()),
                ]
                .into(),
                ..ChunkPayload::default()
            },
        }
    }

    fn json(value: &qdrant_client::qdrant::Value) -> serde_json::Value {
        serde_json::to_value(value).unwrap()
    }

    #[test]
    fn a_point_carries_the_stored_payload_and_both_vectors() {
        let point = sample_point(SparseVector {
            indices: vec![7, 42],
            values: vec![1.5, 0.5],
        });
        let original = point.payload.clone();
        let converted = to_qdrant_point(point).unwrap();
        assert_eq!(
            converted.id.clone().unwrap().point_id_options,
            Some(PointIdOptions::Uuid(point_id("doc-1", 3).to_string()))
        );

        let payload = &converted.payload;
        assert_eq!(json(&payload["document_id"]), "doc-1");
        assert!(matches!(
            payload["chunk_index"].kind,
            Some(Kind::IntegerValue(3))
        ));
        assert_eq!(json(&payload["text"]), "Owls hunt at night.");
        assert_eq!(json(&payload["title"]), "Owls");
        assert_eq!(json(&payload["source_name"]), "owls.md");
        assert_eq!(
            json(&payload["metadata"]),
            serde_json::json!({"lang": "en", "year": "2021", "published": "2021-06-15T12:00:00Z"})
        );
        let mut pairs: Vec<String> =
            serde_json::from_value(json(&payload["metadata_pairs"])).unwrap();
        pairs.sort();
        assert_eq!(
            pairs,
            [
                r#"["lang","en"]"#,
                r#"["published","2021-06-15T12:00:00Z"]"#,
                r#"["year","2021"]"#
            ]
        );
        assert_eq!(
            json(&payload["metadata_numbers"]),
            serde_json::json!([{"key": "year", "value": 2021.0}])
        );
        assert_eq!(
            json(&payload["metadata_times"]),
            serde_json::json!([{"key": "published", "value": 1_623_758_400.0}])
        );

        let Some(VectorsOptions::Vectors(named)) = converted.vectors.unwrap().vectors_options
        else {
            panic!("named vectors expected");
        };
        assert_eq!(named.vectors.len(), 2);
        assert_eq!(
            named.vectors[DENSE],
            Vector::new_dense(vec![0.25, -0.5, 1.0])
        );
        assert_eq!(
            named.vectors[SPARSE],
            Vector::new_sparse(vec![7, 42], vec![1.5, 0.5])
        );

        // A hit with that payload reads back as the chunk.
        let hit = ScoredPoint {
            id: converted.id,
            payload: converted.payload,
            score: 0.75,
            ..ScoredPoint::default()
        };
        let chunk = to_scored_chunk(hit).unwrap();
        assert_eq!(chunk.id, point_id("doc-1", 3));
        assert_eq!(chunk.score, 0.75);
        assert_eq!(chunk.payload, original);
    }

    #[test]
    fn a_point_without_terms_has_no_sparse_vector() {
        let converted = to_qdrant_point(sample_point(SparseVector::default())).unwrap();
        let Some(VectorsOptions::Vectors(named)) = converted.vectors.unwrap().vectors_options
        else {
            panic!("named vectors expected");
        };
        assert_eq!(named.vectors.keys().collect::<Vec<_>>(), [DENSE]);
    }

    #[test]
    fn hits_do_not_fetch_the_derived_filter_fields() {
        let SelectorOptions::Exclude(excluded) = stored_fields_only() else {
            panic!("an exclusion expected");
        };
        assert_eq!(
            excluded.fields,
            ["metadata_pairs", "metadata_numbers", "metadata_times"]
        );
    }

    #[test]
    fn registry_ids_and_entries() {
        let uuid = Uuid::new_v4();
        assert_eq!(
            registry_point_id(&uuid.to_string()).point_id_options,
            Some(PointIdOptions::Uuid(uuid.to_string()))
        );
        let other = registry_point_id("kb_1");
        assert_eq!(other, registry_point_id("kb_1"));
        assert_ne!(other, registry_point_id("kb_2"));

        let entry = info(&uuid.to_string(), 384);
        let mut payload = serde_json::to_value(&entry).unwrap();
        payload["layout"] = 1.into();
        let point = RetrievedPoint {
            id: Some(registry_point_id(&entry.id)),
            payload: Payload::try_from(payload).unwrap().into(),
            ..RetrievedPoint::default()
        };
        assert_eq!(registry_entry(point).unwrap(), entry);
    }

    #[test]
    fn client_errors_map_to_search_errors() {
        let map = |status: tonic::Status| qdrant_error("count", "c", QdrantError::from(status));
        assert!(matches!(
            map(tonic::Status::not_found("Collection `c` doesn't exist!")),
            Error::NotFound(_)
        ));
        assert!(matches!(
            map(tonic::Status::invalid_argument(
                "Wrong input: Vector dimension error"
            )),
            Error::InvalidArgument { .. }
        ));
        assert!(matches!(
            map(tonic::Status::unavailable("connection refused")),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            map(tonic::Status::internal(
                "Failed to connect to http://qdrant:6334/: ..."
            )),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            map(tonic::Status::cancelled("Timeout expired")),
            Error::DeadlineExceeded(_)
        ));
        assert!(matches!(
            map(tonic::Status::deadline_exceeded("slow")),
            Error::DeadlineExceeded(_)
        ));
        assert!(matches!(
            map(tonic::Status::resource_exhausted("rate limited")),
            Error::Unavailable(_)
        ));
        let err = map(tonic::Status::unauthenticated("Invalid api-key"));
        assert!(
            matches!(&err, Error::Internal(m) if m.contains("qdrant-api-key")),
            "{err:?}"
        );
        assert!(matches!(
            map(tonic::Status::internal("Service internal error")),
            Error::Internal(_)
        ));
        // The registry is created on first use: its absence is no caller's NotFound.
        assert!(matches!(
            registry_error("read", QdrantError::from(tonic::Status::not_found("gone"))),
            Error::Internal(_)
        ));
    }

    /// Runs here: a server that cannot be reached makes every call Unavailable (quickly), and
    /// argument checks that need no server still answer.
    #[tokio::test]
    async fn an_unreachable_server_is_unavailable() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}");
        let args = parse(&["--qdrant-url", &url, "--qdrant-connect-timeout", "1s"]).unwrap();
        let index = QdrantIndex::connect(args).await.unwrap();
        let id = Uuid::new_v4().to_string();
        let unavailable = |result: Result<()>| {
            assert!(
                matches!(result, Err(Error::Unavailable(_))),
                "expected Unavailable, got {result:?}"
            );
        };
        unavailable(index.resolve("acme", "handbook").await.map(drop));
        unavailable(index.count(&id).await.map(drop));
        unavailable(index.create_collection(info(&id, 4)).await.map(drop));
        unavailable(index.upsert(&id, vec![]).await.map(drop));
        unavailable(index.delete_points(&id, vec![Uuid::new_v4()]).await);
        unavailable(index.delete_collection(&id).await);
        let query = LegQuery {
            vector: QueryVector::Dense(vec![1.0; 4]),
            limit: 3,
            filter: SearchFilter::default(),
            min_score: None,
        };
        unavailable(index.search(&id, query).await.map(drop));

        match index.create_collection(info(&id, 0)).await {
            Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "dimension"),
            other => panic!("{other:?}"),
        }
        match index.create_collection(info("../x", 4)).await {
            Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "id"),
            other => panic!("{other:?}"),
        }
    }
}
