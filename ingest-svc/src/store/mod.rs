//! The catalog store: knowledge bases, documents and indexing jobs, behind [`CatalogStore`] so
//! that the domain code (`catalog.rs`, `worker.rs`) never sees a database. SQLite
//! ([`sqlite::SqliteStore`]) is the embedded default; MongoDB ([`mongo::MongoStore`]) is what
//! several ingest-svc replicas share. Both pass one conformance suite (`conformance.rs`).
//!
//! Jobs: one per document. A worker claims a job by taking a lease (a token and an expiry); a
//! crashed worker's lease runs out and another claims the job again; a stale token changes
//! nothing (fencing). A delete turns the job into a delete job without touching a running
//! lease, so an index job and a delete job of one document never run at once.
//!
//! Every claim counts as an attempt. An attempt that ends because a dependency was unavailable
//! is given back (waiting out an outage must not fail documents); one that ends because the
//! worker died (its lease ran out) or because of the document itself is kept. An index job that
//! has used up its attempts is not claimed again: its document is FAILED with the step it was
//! last seen at, so a document that crashes its worker cannot crash-loop the service.

#[cfg(test)]
mod conformance;
pub mod mongo;
pub mod sqlite;

use std::collections::{BTreeMap, HashSet};

use crate::error::Result;

pub use mongo::MongoStore;
pub use sqlite::SqliteStore;

/// Where a document is in its life cycle; values match `smartdb.v1.DocumentStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    /// Stored, waiting for a worker.
    Queued = 1,
    /// Text extraction and chunking.
    Parsing = 2,
    /// Chunks being embedded.
    Embedding = 3,
    /// Chunks being written to the index.
    Storing = 4,
    /// Searchable.
    Indexed = 5,
    /// Failed for good.
    Failed = 6,
    /// Being deleted.
    Deleting = 7,
}

impl Status {
    pub(crate) fn from_i32(v: i32) -> Self {
        match v {
            2 => Self::Parsing,
            3 => Self::Embedding,
            4 => Self::Storing,
            5 => Self::Indexed,
            6 => Self::Failed,
            7 => Self::Deleting,
            _ => Self::Queued,
        }
    }

    /// True once indexing has finished one way or the other.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Indexed | Self::Failed)
    }
}

/// A knowledge base row.
#[derive(Debug, Clone, PartialEq)]
pub struct KnowledgeBase {
    /// UUID.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Unique name within the tenant.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Embedding model id.
    pub embedding_model: String,
    /// Vector dimension of that model.
    pub dimension: u32,
    /// Unix milliseconds.
    pub create_time: i64,
    /// Documents in it: filled by `count_kb`, `list_kbs` and `start_reindex`, 0 from lookups.
    pub document_count: u64,
    /// False while its create is unfinished (the name is reserved, the collection may not exist).
    pub ready: bool,
    /// Its latest reindex, if it was ever reindexed.
    pub reindex: Option<Reindex>,
}

/// Progress of a knowledge base's latest reindex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reindex {
    /// Documents it covers.
    pub total: u64,
    /// Of those, documents whose reindex job has not finished (counted like `document_count`).
    pub remaining: u64,
    /// Unix milliseconds.
    pub start_time: i64,
}

/// A document row.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// UUIDv7 (so id order is creation order).
    pub id: String,
    /// Knowledge base id.
    pub kb_id: String,
    /// Title.
    pub title: String,
    /// Uploaded file name.
    pub source_name: String,
    /// Detected media type.
    pub content_type: String,
    /// Size of the original.
    pub size_bytes: u64,
    /// SHA-256 of the original, hex.
    pub sha256: String,
    /// Life-cycle status.
    pub status: Status,
    /// Failure reason.
    pub error: String,
    /// Chunks of the last chunking.
    pub chunk_count: u32,
    /// Most chunks it ever had: deletes remove point ids up to this, so nothing is left behind.
    pub max_chunk_count: u32,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// Times a worker started on it.
    pub attempts: u32,
    /// Unix milliseconds.
    pub create_time: i64,
    /// Unix milliseconds.
    pub update_time: i64,
    /// Caller's name for the document's source (path, URL); versions of one source replace
    /// each other. Empty if none was given.
    pub source_id: String,
}

impl Document {
    /// True if it was accepted after `other` (ids are UUIDv7s, so they break ties in order).
    pub fn is_newer_than(&self, other: &Document) -> bool {
        (self.create_time, &self.id) > (other.create_time, &other.id)
    }
}

/// What a job asks a worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Extract, chunk, embed, store.
    Index,
    /// Remove from the index, then from the catalog.
    Delete,
}

/// A claimed job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Document it concerns.
    pub document_id: String,
    /// What to do.
    pub kind: JobKind,
    /// Proof of the claim; completing with a stale token does nothing.
    pub lease_token: i64,
    /// Claims so far, this one included (given-back ones excluded).
    pub attempts: u32,
    /// Consecutive attempts that ended in a dependency outage (for backoff).
    pub outages: u32,
    /// Trace context of the call that queued it (`traceparent`); empty if none.
    pub trace: String,
    /// A reindex of a document that is INDEXED: it stays INDEXED (its chunks keep serving)
    /// while it is redone.
    pub quiet: bool,
}

/// Outcome of inserting a document.
#[derive(Debug)]
pub enum Inserted {
    /// A new document and its job were stored.
    New(Document),
    /// The same bytes were already in the knowledge base.
    Existing(Document),
}

/// What reserving a knowledge-base name found.
#[derive(Debug)]
pub enum Reservation {
    /// The name was free and is now reserved for this (not yet ready) knowledge base.
    New,
    /// An earlier create of the same name never finished; continue it with these settings.
    Unfinished(KnowledgeBase),
    /// A ready knowledge base has the name.
    Taken,
}

/// What asking to retry a document found.
#[derive(Debug)]
pub enum Retried {
    /// It was FAILED and is queued again.
    Queued(Document),
    /// It is not FAILED (nothing to retry); here it is as it stands.
    NotFailed(Document),
}

/// Whether releasing a job counts the attempt it was claimed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The attempt counts (the document's own failure).
    Keep,
    /// Not the document's fault: a dependency was unavailable (the outage is counted for
    /// backoff), or the service is shutting down.
    GiveBack {
        /// True if a dependency outage ended the attempt.
        outage: bool,
    },
}

/// The life-cycle step a status stands for, as reported when a job gives up.
pub(crate) fn step_name(status: Status) -> &'static str {
    match status {
        Status::Queued => "QUEUED",
        Status::Parsing => "PARSING",
        Status::Embedding => "EMBEDDING",
        Status::Storing => "STORING",
        Status::Indexed => "INDEXED",
        Status::Failed => "FAILED",
        Status::Deleting => "DELETING",
    }
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where the catalog lives: every read and write the domain code needs, each atomic on its own.
#[tonic::async_trait]
pub trait CatalogStore: Send + Sync {
    /// Reserves `kb.name` for `kb` (not ready yet): the first step of a create.
    async fn reserve_kb(&self, kb: &KnowledgeBase) -> Result<Reservation>;
    /// Finishes a create: the reservation `reserved_id` becomes the ready knowledge base with
    /// id `collection_id` (the index may have reused an orphaned collection under another id).
    /// False if the reservation is gone.
    async fn activate_kb(&self, reserved_id: &str, collection_id: &str) -> Result<bool>;
    /// Drops an unfinished reservation (its create failed for good).
    async fn drop_reservation(&self, reserved_id: &str) -> Result<()>;
    /// Finds a tenant's ready knowledge base by name, without its counts (see [`count_kb`]).
    ///
    /// [`count_kb`]: CatalogStore::count_kb
    async fn find_kb(&self, tenant: &str, name: &str) -> Result<Option<KnowledgeBase>>;
    /// Finds a knowledge base by id, whatever its state, without its counts.
    async fn kb_by_id(&self, id: &str) -> Result<Option<KnowledgeBase>>;
    /// Fills in `kb`'s document count and its reindex's remaining documents. Lookups leave
    /// them 0 because counting reads the whole knowledge base, and every upload, document read
    /// and job looks one up.
    async fn count_kb(&self, kb: &mut KnowledgeBase) -> Result<()>;
    /// Lists a tenant's ready knowledge bases with names after `after`, in name order, counted.
    async fn list_kbs(&self, tenant: &str, after: &str, limit: usize)
    -> Result<Vec<KnowledgeBase>>;
    /// Deletes a knowledge base with its documents and jobs; returns the document ids removed.
    /// Safe to repeat after a crash midway.
    async fn delete_kb(&self, id: &str) -> Result<Vec<String>>;
    /// Starts a reindex: every INDEXED or FAILED document without a pending job gets an index
    /// job marked as the reindex's (INDEXED ones stay INDEXED, FAILED ones are queued again).
    /// If a reindex is still running, nothing changes. None if the knowledge base is gone.
    async fn start_reindex(&self, kb_id: &str) -> Result<Option<KnowledgeBase>>;

    /// Reads one document of a knowledge base.
    async fn get_doc(&self, kb_id: &str, id: &str) -> Result<Option<Document>>;
    /// Reads one document by id alone (workers).
    async fn doc_by_id(&self, id: &str) -> Result<Option<Document>>;
    /// Lists documents of a knowledge base with ids after `after`, oldest first.
    async fn list_docs(&self, kb_id: &str, after: &str, limit: usize) -> Result<Vec<Document>>;
    /// Which of `ids` are documents in the catalog (for garbage-collecting originals).
    async fn existing_docs(&self, ids: &[String]) -> Result<HashSet<String>>;
    /// Stores a new document with its index job (continuing trace context `trace`), unless the
    /// same bytes are already in the knowledge base and not being deleted. A FAILED duplicate
    /// is queued again (one way users retry).
    async fn insert_doc(&self, doc: &Document, trace: &str) -> Result<Inserted>;
    /// Queues a FAILED document again (`RetryDocument`), without a new upload.
    async fn retry_doc(&self, kb_id: &str, id: &str) -> Result<Option<Retried>>;
    /// Moves a document to `status` unless it is being deleted; false if it is gone or
    /// deleting (the worker then stops).
    async fn set_status(&self, id: &str, status: Status, error: &str) -> Result<bool>;
    /// Records the chunk count before chunks are written (so a later delete knows every point
    /// id) and moves the document to `status`; false if it is gone or deleting.
    async fn set_chunk_count(&self, id: &str, chunks: u32, status: Status) -> Result<bool>;
    /// Marks a document DELETING and turns its job into a delete job (keeping a running lease).
    async fn mark_deleting(&self, id: &str) -> Result<()>;
    /// The other versions of a document's source in its knowledge base (not being deleted).
    async fn other_versions(&self, doc: &Document) -> Result<Vec<Document>>;
    /// Records a published version: it is INDEXED, and the versions it replaced are DELETING,
    /// each with a delete job. False (nothing changed) if it is gone or being deleted.
    async fn publish_version(&self, id: &str, replaced: &[String]) -> Result<bool>;
    /// Removes a document (and its job) for good.
    async fn remove_doc(&self, id: &str) -> Result<()>;
    /// Takes the lock that makes publishes of versions of `source_id` in `kb_id` run one at a
    /// time, across every replica, for `ttl_ms` at most (a holder that dies frees it when that
    /// runs out). Returns its token, or None while another holder has it.
    async fn lock_source(&self, kb_id: &str, source_id: &str, ttl_ms: i64) -> Result<Option<i64>>;
    /// Frees a source lock taken with `token` (nothing if it was taken over meanwhile).
    async fn unlock_source(&self, kb_id: &str, source_id: &str, token: i64) -> Result<()>;

    /// Jobs waiting for a worker (not leased now), and the creation time (ms) of the oldest.
    async fn backlog(&self) -> Result<(u64, Option<i64>)>;
    /// Claims the oldest runnable job (not leased or lease expired, not backing off), or the
    /// job of `only_document` if it is not leased. Without `only_document`, an index job
    /// claimed `max_attempts` times already is given up instead: its document is FAILED.
    async fn claim_job(
        &self,
        lease_ms: i64,
        max_attempts: u32,
        only_document: Option<&str>,
    ) -> Result<Option<Job>>;
    /// Extends a lease while a long job runs; false if the lease was lost.
    async fn renew_lease(&self, job: &Job, lease_ms: i64) -> Result<bool>;
    /// Finishes a job: removes it if it is still the job we claimed, else (it became a delete
    /// job meanwhile) releases the lease so the new work starts at once.
    async fn complete_job(&self, job: &Job) -> Result<()>;
    /// Gives a job back, runnable again after `delay_ms`.
    async fn release_job(&self, job: &Job, delay_ms: i64, release: Release) -> Result<()>;
    /// Milliseconds until the next job becomes runnable, if any job is waiting.
    async fn next_job_in(&self) -> Result<Option<i64>>;
}

/// A fresh random lease token.
pub(crate) fn rand_token() -> i64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    i64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// The reason a given-up job's document is FAILED with.
pub(crate) fn gave_up(attempts: u32, step: Status) -> String {
    format!(
        "gave up after {attempts} attempts; last seen at step {}",
        step_name(step)
    )
}

#[cfg(test)]
mod tests {
    use std::hash::{Hash, Hasher};
    use std::sync::Arc;

    use futures::FutureExt;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_passes_the_catalog_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        conformance::run(&move |name: String| {
            let path = root.join(format!("{name}.db"));
            async move { Arc::new(SqliteStore::open(&path).unwrap()) as Arc<dyn CatalogStore> }
                .boxed()
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mongodb_passes_the_catalog_conformance_suite() {
        let server = smartdb_kit::testing::MongoServer::start();
        let uri = server.uri.clone();
        // Database names are short (64 bytes at most): a hash of the check's name, and of
        // this run in case the server is a shared real MongoDB.
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        conformance::run(&move |name: String| {
            let mut hasher = std::hash::DefaultHasher::new();
            name.hash(&mut hasher);
            let database = format!("ingest_{run}_{:x}", hasher.finish());
            let uri = uri.clone();
            async move {
                let store = MongoStore::open_database(&uri, Some(&database), 8)
                    .await
                    .unwrap();
                Arc::new(store) as Arc<dyn CatalogStore>
            }
            .boxed()
        })
        .await;
    }
}
