//! The vector index behind search-svc: engine-neutral types and the [`VectorIndex`] trait.
//!
//! One collection per knowledge base, one point per chunk. [`EdgeIndex`] embeds qdrant-edge;
//! [`QdrantIndex`] talks to a Qdrant server or cluster. Every implementation must pass the shared
//! conformance suite in `conformance.rs`.

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

use crate::Result;

mod commit_log;
#[cfg(test)]
#[macro_use]
pub(crate) mod conformance;
pub mod edge;
pub mod qdrant;

pub use edge::EdgeIndex;
pub use qdrant::QdrantIndex;

/// Payload stored with each chunk and returned with hits.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, Default)]
#[serde(default)]
pub struct ChunkPayload {
    /// Document the chunk belongs to.
    pub document_id: String,
    /// Position of the chunk within its document, from 0.
    pub chunk_index: u32,
    /// The chunk's text.
    pub text: String,
    /// Title of the document.
    pub title: String,
    /// Where the document came from (file name, URL, ...).
    pub source_name: String,
    /// Caller-defined key/value pairs; searches can filter on them.
    pub metadata: BTreeMap<String, String>,
    /// Headings the chunk sits under, outermost first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heading_path: Vec<String>,
    /// Byte range of the chunk in the document's extracted text; (0, 0) for chunks stored
    /// before ranges were recorded (the fields are absent from their payloads).
    pub start_offset: u64,
    /// End of that byte range (exclusive).
    pub end_offset: u64,
    /// First and last page of the chunk (PDF); 0 without pages.
    pub page_start: u32,
    /// Last page of the chunk.
    pub page_end: u32,
}

/// A sparse vector: term ids with their weights (BM25 term-frequency parts; the engine applies
/// the inverse document frequency of its collection).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseVector {
    /// Term ids, unique.
    pub indices: Vec<u32>,
    /// Weight of each term id.
    pub values: Vec<f32>,
}

/// One chunk to write.
#[derive(Clone, Debug)]
pub struct IndexPoint {
    /// Point id; use [`point_id`] so retried writes overwrite rather than duplicate.
    pub id: Uuid,
    /// Dense embedding; its length must equal the collection's dimension.
    pub vector: Vec<f32>,
    /// Lexical (BM25) vector of the chunk's title and text.
    pub sparse: SparseVector,
    /// What is stored with the point.
    pub payload: ChunkPayload,
}

/// A knowledge base's collection as the index knows it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CollectionInfo {
    /// Collection id: the knowledge base's UUID.
    pub id: String,
    /// Tenant owning the knowledge base.
    pub tenant: String,
    /// Knowledge-base name, unique per tenant.
    pub name: String,
    /// Length of every vector in the collection.
    pub dimension: u32,
    /// Embedding model the vectors come from.
    pub embedding_model: String,
    /// Documents whose chunks searches leave out (a new version being written, an old one
    /// being deleted); see [`VectorIndex::update_hidden`]. Absent from entries written before
    /// documents could be hidden.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub hidden_documents: BTreeSet<String>,
}

impl CollectionInfo {
    /// True if `other` describes the same collection (same id, owner, name, dimension and
    /// model), whatever documents either hides.
    pub fn same_settings(&self, other: &CollectionInfo) -> bool {
        self.id == other.id
            && self.tenant == other.tenant
            && self.name == other.name
            && self.dimension == other.dimension
            && self.embedding_model == other.embedding_model
    }

    /// Applies an [`VectorIndex::update_hidden`] change; InvalidArgument if a document is in
    /// both lists. Returns true if the set changed.
    pub fn apply_hidden(&mut self, hide: &[String], show: &[String]) -> Result<bool> {
        if let Some(both) = hide.iter().find(|id| show.contains(id)) {
            return Err(crate::Error::invalid(
                "hide_document_ids",
                format!("document {both:?} is also in show_document_ids"),
            ));
        }
        let mut changed = false;
        for id in show {
            changed |= self.hidden_documents.remove(id);
        }
        for id in hide {
            changed |= self.hidden_documents.insert(id.clone());
        }
        Ok(changed)
    }
}

/// Restrictions applied to a search (all must hold).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SearchFilter {
    /// Each entry must be present with exactly this value in the chunk's metadata.
    pub metadata: BTreeMap<String, String>,
    /// Each key must be present with one of its values.
    pub any_of: BTreeMap<String, Vec<String>>,
    /// Ranges over metadata values that parse as numbers or timestamps.
    pub ranges: Vec<MetadataRange>,
    /// If non-empty, the chunk's document must be one of these.
    pub document_ids: Vec<String>,
    /// The chunk's document must not be one of these (the collection's hidden documents).
    pub exclude_document_ids: Vec<String>,
}

/// What a range compares: metadata values that parse as numbers, or as RFC 3339 timestamps
/// (compared as seconds since the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RangeKind {
    /// Numbers.
    Number,
    /// Timestamps.
    Time,
}

/// A metadata value between bounds (each optional).
#[derive(Clone, Debug, PartialEq)]
pub struct MetadataRange {
    /// Metadata key.
    pub key: String,
    /// Numbers or timestamps.
    pub kind: RangeKind,
    /// Value ≥ this.
    pub gte: Option<f64>,
    /// Value > this.
    pub gt: Option<f64>,
    /// Value ≤ this.
    pub lte: Option<f64>,
    /// Value < this.
    pub lt: Option<f64>,
}

/// The vector a query ranks by.
#[derive(Clone, Debug)]
pub enum QueryVector {
    /// Nearest by cosine similarity to this embedding.
    Dense(Vec<f32>),
    /// Best BM25 score for these query terms (the engine applies IDF).
    Sparse(SparseVector),
}

/// One ranked query (one leg of a hybrid search), run inside the engine.
#[derive(Clone, Debug)]
pub struct LegQuery {
    /// What to rank by.
    pub vector: QueryVector,
    /// Maximum number of hits; 0 yields no hits.
    pub limit: usize,
    /// Restrictions on which chunks may be returned.
    pub filter: SearchFilter,
    /// Only hits scoring at least this.
    pub min_score: Option<f32>,
}

/// Typed metadata stored next to the text values, for range filters.
pub fn typed_metadata(metadata: &BTreeMap<String, String>) -> Vec<(String, RangeKind, f64)> {
    metadata
        .iter()
        .filter_map(|(k, v)| parse_typed(v).map(|(kind, x)| (k.clone(), kind, x)))
        .collect()
}

/// A metadata value (or range bound) as a number or a timestamp, if it is one.
pub fn parse_typed(value: &str) -> Option<(RangeKind, f64)> {
    let value = value.trim();
    if let Ok(x) = value.parse::<f64>() {
        return x.is_finite().then_some((RangeKind::Number, x));
    }
    // Timestamps need a date: "2024-05-01", "2024-05-01T10:00:00Z", ...
    if value.len() >= 10 && value.as_bytes()[4] == b'-' {
        let parsed: std::result::Result<qdrant_edge::DateTimeWrapper, _> = value.parse();
        if let Ok(time) = parsed {
            return Some((RangeKind::Time, time.timestamp() as f64 / 1e6));
        }
        if let Ok(time) = format!("{value}T00:00:00Z").parse::<qdrant_edge::DateTimeWrapper>() {
            return Some((RangeKind::Time, time.timestamp() as f64 / 1e6));
        }
    }
    None
}

/// One hit.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ScoredChunk {
    /// Point id of the chunk.
    pub id: Uuid,
    /// Cosine similarity to the query, in [-1, 1]; higher is better.
    pub score: f32,
    /// The chunk's stored payload.
    pub payload: ChunkPayload,
}

/// One hit without its payload, as fusion needs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoredId {
    /// Point id of the chunk.
    pub id: Uuid,
    /// The leg's score (cosine or BM25), or the fused score.
    pub score: f32,
}

/// The error of a create whose id exists with other settings (the same for every backend).
pub(crate) fn exists_with_other_settings(existing: &CollectionInfo) -> crate::Error {
    crate::Error::invalid(
        "knowledge_base",
        format!(
            "collection {} already exists as {}/{} (dimension {}, model {})",
            existing.id,
            existing.tenant,
            existing.name,
            existing.dimension,
            existing.embedding_model
        ),
    )
}

/// A vector store holding one collection per knowledge base.
#[async_trait::async_trait]
pub trait VectorIndex: Send + Sync + 'static {
    /// Creates a collection and returns the id of the collection that now serves its tenant and
    /// name; Ok (with its id) if this exact collection already exists.
    ///
    /// The tenant may already have a collection of this name under another id: an orphan, since
    /// ingest-svc reserves a name in its catalog before it creates the collection. If that one
    /// is empty and has the same dimension and model, it is reused (its id is returned);
    /// otherwise it is replaced.
    ///
    /// InvalidArgument: `dimension` if 0; `knowledge_base` if the id exists with other settings.
    async fn create_collection(&self, info: CollectionInfo) -> Result<String>;
    /// Drops a collection and all its points, on disk too; Ok if it does not exist.
    async fn delete_collection(&self, id: &str) -> Result<()>;
    /// Looks up a collection by tenant and knowledge-base name.
    async fn resolve(&self, tenant: &str, name: &str) -> Result<Option<CollectionInfo>>;
    /// Inserts or replaces points and returns how many were written, once they are durable.
    ///
    /// NotFound for an unknown collection; InvalidArgument (`points`) if any vector has the wrong
    /// length, in which case nothing is written.
    async fn upsert(&self, collection_id: &str, points: Vec<IndexPoint>) -> Result<usize>;
    /// Deletes points by id, ignoring missing ones; NotFound for an unknown collection.
    async fn delete_points(&self, collection_id: &str, ids: Vec<Uuid>) -> Result<()>;
    /// Returns the best `limit` chunks passing the filter, best first: by cosine similarity for
    /// a dense query, by BM25 (with the collection's IDF) for a sparse one.
    ///
    /// NotFound for an unknown collection; InvalidArgument for a query vector of the wrong length.
    async fn search(&self, collection_id: &str, query: LegQuery) -> Result<Vec<ScoredChunk>>;
    /// As [`search`](Self::search), without reading the hits' payloads: hybrid fusion keeps a
    /// few of many candidates and reads only theirs, with [`payloads`](Self::payloads).
    async fn search_ids(&self, collection_id: &str, query: LegQuery) -> Result<Vec<ScoredId>>;
    /// The stored payloads of `ids`, in that order; points that do not exist are left out.
    /// NotFound for an unknown collection.
    async fn payloads(
        &self,
        collection_id: &str,
        ids: Vec<Uuid>,
    ) -> Result<Vec<(Uuid, ChunkPayload)>>;
    /// Counts the points in a collection; NotFound for an unknown collection.
    async fn count(&self, collection_id: &str) -> Result<u64>;
    /// In one atomic, durable step: the documents in `hide` join the collection's hidden
    /// documents and those in `show` leave them ([`CollectionInfo::hidden_documents`], which
    /// `resolve` returns and searches leave out). Returns the hidden documents after it.
    ///
    /// NotFound for an unknown collection; InvalidArgument if a document is in both lists.
    async fn update_hidden(
        &self,
        collection_id: &str,
        hide: Vec<String>,
        show: Vec<String>,
    ) -> Result<BTreeSet<String>>;
}

/// Namespace of [`point_id`]'s UUIDv5s; never change it, or re-ingested chunks would duplicate.
/// Deterministic point id of a chunk; defined once in kit, shared with ingest-svc.
pub use smartdb_kit::ids::point_id;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_id_is_stable_and_distinct() {
        let id = point_id("doc-1", 0);
        assert_eq!(id, point_id("doc-1", 0));
        assert_eq!(id.get_version_num(), 5);
        // Pinned so an accidental namespace or format change fails loudly.
        assert_eq!(id.to_string(), "ea919f02-b6db-566d-b4e3-82948a0abfb8");
        assert_ne!(id, point_id("doc-1", 1));
        assert_ne!(id, point_id("doc-2", 0));
        // The separator keeps ("doc-1", 10) and ("doc-11", 0) apart.
        assert_ne!(point_id("doc-1", 10), point_id("doc-11", 0));
    }
}
