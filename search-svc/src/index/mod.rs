//! The vector index behind search-svc: engine-neutral types and the [`VectorIndex`] trait.
//!
//! One collection per knowledge base, one point per chunk. [`EdgeIndex`] embeds qdrant-edge; a
//! Qdrant-server implementation can follow. Every implementation must pass the shared conformance
//! suite in `conformance.rs`.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::Result;

#[cfg(test)]
#[macro_use]
pub(crate) mod conformance;
pub mod edge;

pub use edge::EdgeIndex;

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
}

/// One chunk to write.
#[derive(Clone, Debug)]
pub struct IndexPoint {
    /// Point id; use [`point_id`] so retried writes overwrite rather than duplicate.
    pub id: Uuid,
    /// Dense embedding; its length must equal the collection's dimension.
    pub vector: Vec<f32>,
    /// What is stored with the point.
    pub payload: ChunkPayload,
}

/// A knowledge base's collection as the index knows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
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
}

/// Restrictions applied to a search (all must hold).
#[derive(Clone, Debug, Default)]
pub struct SearchFilter {
    /// Each entry must be present with exactly this value in the chunk's metadata.
    pub metadata: BTreeMap<String, String>,
    /// If non-empty, the chunk's document must be one of these.
    pub document_ids: Vec<String>,
}

/// A dense nearest-neighbour query.
#[derive(Clone, Debug)]
pub struct DenseQuery {
    /// Query embedding; its length must equal the collection's dimension.
    pub vector: Vec<f32>,
    /// Maximum number of hits; 0 yields no hits.
    pub top_k: usize,
    /// Restrictions on which chunks may be returned.
    pub filter: SearchFilter,
}

/// One hit.
#[derive(Clone, Debug)]
pub struct ScoredChunk {
    /// Point id of the chunk.
    pub id: Uuid,
    /// Cosine similarity to the query, in [-1, 1]; higher is better.
    pub score: f32,
    /// The chunk's stored payload.
    pub payload: ChunkPayload,
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
    /// Returns the top-k chunks passing the filter, by cosine similarity, best first.
    ///
    /// NotFound for an unknown collection; InvalidArgument for a query vector of the wrong length.
    async fn search(&self, collection_id: &str, query: DenseQuery) -> Result<Vec<ScoredChunk>>;
    /// Counts the points in a collection; NotFound for an unknown collection.
    async fn count(&self, collection_id: &str) -> Result<u64>;
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
