//! The catalog: knowledge bases, documents and indexing jobs in SQLite (WAL mode, full sync, so
//! an acknowledged write survives a crash). The connection is synchronous; [`Store::call`] runs
//! work on the blocking pool so async callers never stall the runtime.
//!
//! Jobs have one row per document. A worker claims a row by taking a lease (a token and an
//! expiry); a crashed worker's lease runs out and another claims the job again. A delete turns
//! the row into a delete job without touching a running lease, so an index job and a delete job
//! of one document never run at once.
//!
//! Every claim counts as an attempt. An attempt that ends because a dependency was unavailable
//! is given back (waiting out an outage must not fail documents); one that ends because the
//! worker died (its lease ran out) or because of the document itself is kept. An index job that
//! has used up its attempts is not claimed again: its document is FAILED with the step it was
//! last seen at, so a document that crashes its worker cannot crash-loop the service.
//!
//! The schema is versioned (`PRAGMA user_version`) and migrated at open; see [`MIGRATIONS`].

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};

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
    fn from_i32(v: i32) -> Self {
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
    /// Documents in it (filled by reads).
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
    /// Of those, documents whose reindex job has not finished.
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

/// Schema of the first release (0.1.0), which did not record a version. Written with
/// `IF NOT EXISTS` so that applying it to a database of that release changes nothing.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS knowledge_bases (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    embedding_model TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    create_time INTEGER NOT NULL,
    UNIQUE (tenant, name)
);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    kb_id TEXT NOT NULL REFERENCES knowledge_bases(id) ON DELETE CASCADE,
    title TEXT NOT NULL,
    source_name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    status INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    chunk_count INTEGER NOT NULL DEFAULT 0,
    max_chunk_count INTEGER NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 0,
    create_time INTEGER NOT NULL,
    update_time INTEGER NOT NULL,
    UNIQUE (kb_id, sha256)
);
CREATE TABLE IF NOT EXISTS jobs (
    document_id TEXT PRIMARY KEY REFERENCES documents(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    lease_token INTEGER NOT NULL DEFAULT 0,
    lease_until INTEGER NOT NULL DEFAULT 0,
    not_before INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    create_time INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (lease_until, not_before);
";

/// Version 2:
/// - knowledge bases get a `state`: a create first reserves the name (`creating`), then makes
///   the collection, then turns `ready`; a create that crashed in between is resumed.
/// - identical bytes may be stored again while the earlier copy is being deleted: uniqueness of
///   (knowledge base, sha256) now ignores DELETING documents (SQLite cannot drop a table
///   constraint, so the table is rebuilt).
/// - jobs count their consecutive dependency outages apart from attempts (for backoff only).
const SCHEMA_V2: &str = "
ALTER TABLE knowledge_bases ADD COLUMN state TEXT NOT NULL DEFAULT 'ready';
CREATE TABLE documents_v2 (
    id TEXT PRIMARY KEY,
    kb_id TEXT NOT NULL REFERENCES knowledge_bases(id) ON DELETE CASCADE,
    title TEXT NOT NULL,
    source_name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    status INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    chunk_count INTEGER NOT NULL DEFAULT 0,
    max_chunk_count INTEGER NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 0,
    create_time INTEGER NOT NULL,
    update_time INTEGER NOT NULL
);
INSERT INTO documents_v2 SELECT id, kb_id, title, source_name, content_type, size_bytes, sha256,
    status, error, chunk_count, max_chunk_count, metadata, attempts, create_time, update_time
    FROM documents;
DROP TABLE documents;
ALTER TABLE documents_v2 RENAME TO documents;
CREATE UNIQUE INDEX documents_content ON documents (kb_id, sha256) WHERE status != 7;
CREATE INDEX documents_by_kb ON documents (kb_id, id);
ALTER TABLE jobs ADD COLUMN outages INTEGER NOT NULL DEFAULT 0;
";

/// Version 3: documents may name their source (`source_id`); a new version of a source
/// replaces the older ones once it is indexed. Existing documents have none.
const SCHEMA_V3: &str = "
ALTER TABLE documents ADD COLUMN source_id TEXT NOT NULL DEFAULT '';
CREATE INDEX documents_by_source ON documents (kb_id, source_id) WHERE source_id != '';
";

/// Version 4: a job keeps the trace context (`traceparent`) of the call that queued it, so its
/// work shows in the same trace as the upload. Existing jobs have none.
const SCHEMA_V4: &str = "
ALTER TABLE jobs ADD COLUMN traceparent TEXT NOT NULL DEFAULT '';
";

/// Version 5: knowledge bases can be reindexed. A knowledge base records its latest reindex
/// (how many documents it covered, when it started); the jobs it queued are marked (`reindex`:
/// 1 for a document that was INDEXED and stays so while it is redone, 2 for one that was FAILED
/// and is queued again), so progress is the count of marked jobs left, and survives restarts.
const SCHEMA_V5: &str = "
ALTER TABLE knowledge_bases ADD COLUMN reindex_total INTEGER NOT NULL DEFAULT 0;
ALTER TABLE knowledge_bases ADD COLUMN reindex_start INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN reindex INTEGER NOT NULL DEFAULT 0;
";

/// The catalog's migrations, oldest first; the database's `user_version` says how many ran.
/// Append, never edit: a released database has run the ones before.
pub fn migrations() -> rusqlite_migration::Migrations<'static> {
    use rusqlite_migration::M;
    rusqlite_migration::Migrations::new(vec![
        M::up(SCHEMA_V1),
        M::up(SCHEMA_V2).foreign_key_check(),
        M::up(SCHEMA_V3),
        M::up(SCHEMA_V4),
        M::up(SCHEMA_V5),
    ])
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The catalog database.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating if needed) the catalog at `path`, migrating it to the current schema.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk before we acknowledge an upload.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Foreign keys are off while migrating: rebuilding a table must not cascade deletes.
        // (The bundled SQLite turns them on by default.)
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        migrations().to_latest(&mut conn).map_err(|e| {
            Error::Internal(format!(
                "cannot migrate the catalog {} to this release's schema: {e}",
                path.display()
            ))
        })?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| Error::Internal("catalog lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| Error::Internal(format!("catalog task failed: {e}")))?
    }
}

/// The schema version of the database at `path` (0: none yet, or the first release's).
pub fn schema_version(conn: &Connection) -> Result<i64> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

// ---- knowledge bases ----

fn kb_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KnowledgeBase> {
    Ok(KnowledgeBase {
        id: row.get(0)?,
        tenant: row.get(1)?,
        name: row.get(2)?,
        description: row.get(3)?,
        embedding_model: row.get(4)?,
        dimension: row.get(5)?,
        create_time: row.get(6)?,
        document_count: row.get::<_, i64>(7)? as u64,
        ready: row.get::<_, String>(8)? == "ready",
        reindex: match row.get::<_, i64>(10)? {
            0 => None,
            start_time => Some(Reindex {
                total: row.get::<_, i64>(9)? as u64,
                remaining: row.get::<_, i64>(11)? as u64,
                start_time,
            }),
        },
    })
}

const KB_COLUMNS: &str =
    "k.id, k.tenant, k.name, k.description, k.embedding_model, k.dimension, k.create_time,
    (SELECT COUNT(*) FROM documents d WHERE d.kb_id = k.id), k.state, k.reindex_total,
    k.reindex_start, (SELECT COUNT(*) FROM jobs j JOIN documents d ON d.id = j.document_id
        WHERE d.kb_id = k.id AND j.reindex != 0)";

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

/// Reserves `kb.name` for `kb` (state `creating`): the first step of a create.
pub fn reserve_kb(conn: &mut Connection, kb: &KnowledgeBase) -> Result<Reservation> {
    let tx = conn.transaction()?;
    let existing = tx
        .query_row(
            &format!(
                "SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.tenant = ?1 AND k.name = ?2"
            ),
            params![kb.tenant, kb.name],
            kb_from_row,
        )
        .optional()?;
    let outcome = match existing {
        Some(existing) if existing.ready => Reservation::Taken,
        Some(existing) => Reservation::Unfinished(existing),
        None => {
            tx.execute(
                "INSERT INTO knowledge_bases (id, tenant, name, description, embedding_model, dimension, create_time, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'creating')",
                params![kb.id, kb.tenant, kb.name, kb.description, kb.embedding_model, kb.dimension, kb.create_time],
            )?;
            Reservation::New
        }
    };
    tx.commit()?;
    Ok(outcome)
}

/// Finishes a create: the reservation `reserved_id` becomes the ready knowledge base with id
/// `collection_id` (the index may have reused an orphaned collection under another id).
/// False if the reservation is gone.
pub fn activate_kb(conn: &Connection, reserved_id: &str, collection_id: &str) -> Result<bool> {
    let n = conn.execute(
        "UPDATE knowledge_bases SET id = ?2, state = 'ready' WHERE id = ?1 AND state = 'creating'",
        params![reserved_id, collection_id],
    )?;
    Ok(n == 1)
}

/// Drops an unfinished reservation (its create failed for good).
pub fn drop_reservation(conn: &Connection, reserved_id: &str) -> Result<()> {
    conn.execute(
        "DELETE FROM knowledge_bases WHERE id = ?1 AND state = 'creating'",
        params![reserved_id],
    )?;
    Ok(())
}

/// Finds a tenant's ready knowledge base by name.
pub fn find_kb(conn: &Connection, tenant: &str, name: &str) -> Result<Option<KnowledgeBase>> {
    Ok(conn
        .query_row(
            &format!(
                "SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.tenant = ?1 AND k.name = ?2 AND k.state = 'ready'"
            ),
            params![tenant, name],
            kb_from_row,
        )
        .optional()?)
}

/// Finds a knowledge base by id, whatever its state.
pub fn kb_by_id(conn: &Connection, id: &str) -> Result<Option<KnowledgeBase>> {
    Ok(conn
        .query_row(
            &format!("SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.id = ?1"),
            params![id],
            kb_from_row,
        )
        .optional()?)
}

/// Lists a tenant's ready knowledge bases with names after `after`, in name order.
pub fn list_kbs(
    conn: &Connection,
    tenant: &str,
    after: &str,
    limit: usize,
) -> Result<Vec<KnowledgeBase>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.tenant = ?1 AND k.name > ?2 AND k.state = 'ready'
         ORDER BY k.name LIMIT ?3"
    ))?;
    let rows = stmt.query_map(params![tenant, after, limit as i64], kb_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Deletes a knowledge base row with its documents and jobs; returns the document ids removed.
pub fn delete_kb(conn: &mut Connection, id: &str) -> Result<Vec<String>> {
    let tx = conn.transaction()?;
    let ids: Vec<String> = {
        let mut stmt = tx.prepare("SELECT id FROM documents WHERE kb_id = ?1")?;
        stmt.query_map(params![id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    tx.execute(
        "DELETE FROM jobs WHERE document_id IN (SELECT id FROM documents WHERE kb_id = ?1)",
        params![id],
    )?;
    tx.execute("DELETE FROM documents WHERE kb_id = ?1", params![id])?;
    tx.execute("DELETE FROM knowledge_bases WHERE id = ?1", params![id])?;
    tx.commit()?;
    Ok(ids)
}

/// Starts a reindex of a knowledge base: every INDEXED or FAILED document without a pending
/// job gets an index job marked as the reindex's (documents with one are being indexed with the
/// current settings already). INDEXED ones stay INDEXED; FAILED ones are queued again. If a
/// reindex is still running, nothing changes. Returns the knowledge base with its progress, or
/// None if it is gone.
pub fn start_reindex(conn: &mut Connection, kb_id: &str) -> Result<Option<KnowledgeBase>> {
    let tx = conn.transaction()?;
    let Some(kb) = tx
        .query_row(
            &format!("SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.id = ?1"),
            params![kb_id],
            kb_from_row,
        )
        .optional()?
    else {
        return Ok(None);
    };
    if kb.reindex.is_some_and(|r| r.remaining > 0) {
        return Ok(Some(kb));
    }
    let now = now_ms();
    let mut total = 0;
    for (status, mark) in [(Status::Indexed, 1), (Status::Failed, 2)] {
        // `WHERE true` keeps SQLite from reading ON CONFLICT as part of the SELECT.
        total += tx.execute(
            "INSERT INTO jobs (document_id, kind, create_time, reindex)
             SELECT id, 'index', ?3, ?4 FROM documents WHERE kb_id = ?1 AND status = ?2 AND true
             ON CONFLICT (document_id) DO NOTHING",
            params![kb_id, status as i32, now, mark],
        )?;
    }
    tx.execute(
        "UPDATE documents SET status = ?2, error = '', attempts = 0, update_time = ?3
         WHERE status = ?4 AND id IN (SELECT document_id FROM jobs WHERE reindex = 2)
           AND kb_id = ?1",
        params![kb_id, Status::Queued as i32, now, Status::Failed as i32],
    )?;
    tx.execute(
        "UPDATE knowledge_bases SET reindex_total = ?2, reindex_start = ?3 WHERE id = ?1",
        params![kb_id, total as i64, now],
    )?;
    let kb = tx.query_row(
        &format!("SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.id = ?1"),
        params![kb_id],
        kb_from_row,
    )?;
    tx.commit()?;
    Ok(Some(kb))
}

// ---- documents ----

const DOC_COLUMNS: &str =
    "id, kb_id, title, source_name, content_type, size_bytes, sha256, status, error,
    chunk_count, max_chunk_count, metadata, attempts, create_time, update_time, source_id";

fn doc_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Document> {
    let metadata: String = row.get(11)?;
    Ok(Document {
        id: row.get(0)?,
        kb_id: row.get(1)?,
        title: row.get(2)?,
        source_name: row.get(3)?,
        content_type: row.get(4)?,
        size_bytes: row.get::<_, i64>(5)? as u64,
        sha256: row.get(6)?,
        status: Status::from_i32(row.get(7)?),
        error: row.get(8)?,
        chunk_count: row.get(9)?,
        max_chunk_count: row.get(10)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        attempts: row.get(12)?,
        create_time: row.get(13)?,
        update_time: row.get(14)?,
        source_id: row.get(15)?,
    })
}

/// Reads one document of a knowledge base.
pub fn get_doc(conn: &Connection, kb_id: &str, id: &str) -> Result<Option<Document>> {
    Ok(conn
        .query_row(
            &format!("SELECT {DOC_COLUMNS} FROM documents WHERE kb_id = ?1 AND id = ?2"),
            params![kb_id, id],
            doc_from_row,
        )
        .optional()?)
}

/// Reads one document by id alone (workers).
pub fn doc_by_id(conn: &Connection, id: &str) -> Result<Option<Document>> {
    Ok(conn
        .query_row(
            &format!("SELECT {DOC_COLUMNS} FROM documents WHERE id = ?1"),
            params![id],
            doc_from_row,
        )
        .optional()?)
}

/// Lists documents of a knowledge base with ids after `after`, oldest first.
pub fn list_docs(
    conn: &Connection,
    kb_id: &str,
    after: &str,
    limit: usize,
) -> Result<Vec<Document>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {DOC_COLUMNS} FROM documents WHERE kb_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
    ))?;
    let rows = stmt.query_map(params![kb_id, after, limit as i64], doc_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Which of `ids` are documents in the catalog (for garbage-collecting originals).
pub fn existing_docs(conn: &Connection, ids: &[String]) -> Result<HashSet<String>> {
    let mut stmt = conn.prepare("SELECT id FROM documents WHERE id = ?1")?;
    let mut found = HashSet::new();
    for id in ids {
        if stmt.exists(params![id])? {
            found.insert(id.clone());
        }
    }
    Ok(found)
}

/// Stores a new document with its index job in one transaction, unless the same bytes are
/// already in the knowledge base (and not on their way out: a copy being deleted does not
/// count). A FAILED duplicate is queued again (one way users retry).
pub fn insert_doc(conn: &mut Connection, doc: &Document) -> Result<Inserted> {
    insert_doc_traced(conn, doc, "")
}

/// [`insert_doc`], with the trace context (`traceparent`) its job continues.
pub fn insert_doc_traced(conn: &mut Connection, doc: &Document, trace: &str) -> Result<Inserted> {
    let tx = conn.transaction()?;
    let existing = tx
        .query_row(
            &format!(
                "SELECT {DOC_COLUMNS} FROM documents WHERE kb_id = ?1 AND sha256 = ?2 AND status != ?3"
            ),
            params![doc.kb_id, doc.sha256, Status::Deleting as i32],
            doc_from_row,
        )
        .optional()?;
    if let Some(existing) = existing {
        if existing.status == Status::Failed {
            let requeued = requeue(&tx, existing)?;
            tx.commit()?;
            return Ok(Inserted::New(requeued));
        }
        return Ok(Inserted::Existing(existing));
    }
    let metadata =
        serde_json::to_string(&doc.metadata).map_err(|e| Error::Internal(e.to_string()))?;
    tx.execute(
        &format!("INSERT INTO documents ({DOC_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"),
        params![
            doc.id,
            doc.kb_id,
            doc.title,
            doc.source_name,
            doc.content_type,
            doc.size_bytes as i64,
            doc.sha256,
            doc.status as i32,
            doc.error,
            doc.chunk_count,
            doc.max_chunk_count,
            metadata,
            doc.attempts,
            doc.create_time,
            doc.update_time,
            doc.source_id
        ],
    )?;
    tx.execute(
        "INSERT INTO jobs (document_id, kind, create_time, traceparent) VALUES (?1, 'index', ?2, ?3)",
        params![doc.id, doc.create_time, trace],
    )?;
    tx.commit()?;
    Ok(Inserted::New(doc.clone()))
}

/// Queues a FAILED document again from its stored original, with fresh attempts.
fn requeue(tx: &rusqlite::Transaction<'_>, mut doc: Document) -> Result<Document> {
    let now = now_ms();
    tx.execute(
        "UPDATE documents SET status = ?2, error = '', attempts = 0, update_time = ?3 WHERE id = ?1",
        params![doc.id, Status::Queued as i32, now],
    )?;
    tx.execute(
        "INSERT INTO jobs (document_id, kind, create_time) VALUES (?1, 'index', ?2)
         ON CONFLICT (document_id) DO UPDATE SET kind = 'index', attempts = 0, outages = 0, not_before = 0",
        params![doc.id, now],
    )?;
    doc.status = Status::Queued;
    doc.error.clear();
    doc.attempts = 0;
    doc.update_time = now;
    Ok(doc)
}

/// What asking to retry a document found.
#[derive(Debug)]
pub enum Retried {
    /// It was FAILED and is queued again.
    Queued(Document),
    /// It is not FAILED (nothing to retry); here it is as it stands.
    NotFailed(Document),
}

/// Queues a FAILED document again (`RetryDocument`), without a new upload.
pub fn retry_doc(conn: &mut Connection, kb_id: &str, id: &str) -> Result<Option<Retried>> {
    let tx = conn.transaction()?;
    let Some(doc) = tx
        .query_row(
            &format!("SELECT {DOC_COLUMNS} FROM documents WHERE kb_id = ?1 AND id = ?2"),
            params![kb_id, id],
            doc_from_row,
        )
        .optional()?
    else {
        return Ok(None);
    };
    if doc.status != Status::Failed {
        return Ok(Some(Retried::NotFailed(doc)));
    }
    let doc = requeue(&tx, doc)?;
    tx.commit()?;
    Ok(Some(Retried::Queued(doc)))
}

/// Moves a document to `status` unless it is being deleted; false if it is gone or deleting
/// (the worker then stops).
pub fn set_status(conn: &Connection, id: &str, status: Status, error: &str) -> Result<bool> {
    let error = smartdb_kit::limits::truncate(error, smartdb_kit::limits::ERROR_BYTES);
    let n = conn.execute(
        "UPDATE documents SET status = ?2, error = ?3, update_time = ?4 WHERE id = ?1 AND status != ?5",
        params![id, status as i32, error, now_ms(), Status::Deleting as i32],
    )?;
    Ok(n == 1)
}

/// Records the chunk count before chunks are written, so a later delete knows every point id,
/// and moves the document to `status` (EMBEDDING, or INDEXED for a quiet reindex).
pub fn set_chunk_count(conn: &Connection, id: &str, chunks: u32, status: Status) -> Result<bool> {
    let n = conn.execute(
        "UPDATE documents SET chunk_count = ?2, max_chunk_count = MAX(max_chunk_count, ?2), status = ?3, update_time = ?4
         WHERE id = ?1 AND status != ?5",
        params![id, chunks, status as i32, now_ms(), Status::Deleting as i32],
    )?;
    Ok(n == 1)
}

/// Marks a document DELETING and turns its job into a delete job (keeping any running lease).
pub fn mark_deleting(conn: &mut Connection, id: &str) -> Result<()> {
    let tx = conn.transaction()?;
    mark_deleting_in(&tx, id, now_ms())?;
    tx.commit()?;
    Ok(())
}

fn mark_deleting_in(tx: &rusqlite::Transaction<'_>, id: &str, now: i64) -> Result<()> {
    tx.execute(
        "UPDATE documents SET status = ?2, update_time = ?3 WHERE id = ?1",
        params![id, Status::Deleting as i32, now],
    )?;
    tx.execute(
        "INSERT INTO jobs (document_id, kind, create_time) VALUES (?1, 'delete', ?2)
         ON CONFLICT (document_id) DO UPDATE SET kind = 'delete', not_before = 0, attempts = 0, outages = 0",
        params![id, now],
    )?;
    Ok(())
}

/// The other versions of a document's source in its knowledge base (not being deleted).
pub fn other_versions(conn: &Connection, doc: &Document) -> Result<Vec<Document>> {
    if doc.source_id.is_empty() {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT {DOC_COLUMNS} FROM documents
         WHERE kb_id = ?1 AND source_id = ?2 AND id != ?3 AND status != ?4 AND source_id != ''"
    ))?;
    let rows = stmt.query_map(
        params![doc.kb_id, doc.source_id, doc.id, Status::Deleting as i32],
        doc_from_row,
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Records a published version in one transaction: it is INDEXED, and the versions it
/// replaced are DELETING, each with a delete job. False (nothing changed) if the document is
/// gone or being deleted.
pub fn publish_version(conn: &mut Connection, id: &str, replaced: &[String]) -> Result<bool> {
    let tx = conn.transaction()?;
    let now = now_ms();
    let n = tx.execute(
        "UPDATE documents SET status = ?2, error = '', update_time = ?3 WHERE id = ?1 AND status != ?4",
        params![id, Status::Indexed as i32, now, Status::Deleting as i32],
    )?;
    if n == 0 {
        return Ok(false);
    }
    for old in replaced {
        mark_deleting_in(&tx, old, now)?;
    }
    tx.commit()?;
    Ok(true)
}

/// Removes a document row (and its job) for good.
pub fn remove_doc(conn: &Connection, id: &str) -> Result<()> {
    conn.execute("DELETE FROM documents WHERE id = ?1", params![id])?;
    Ok(())
}

// ---- jobs ----

/// Jobs waiting for a worker (not leased now), and the creation time (ms) of the oldest.
pub fn backlog(c: &Connection) -> rusqlite::Result<(u64, Option<i64>)> {
    c.query_row(
        "SELECT COUNT(*), MIN(create_time) FROM jobs WHERE lease_until <= ?1",
        [now_ms()],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
    )
}

/// The life-cycle step a status stands for, as reported when a job gives up.
fn step_name(status: Status) -> &'static str {
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

/// Claims the oldest runnable job: not leased (or lease expired) and not backing off.
///
/// An index job that was already claimed `max_attempts` times without finishing is not run
/// again: its document becomes FAILED ("gave up after N attempts; last seen at step X") and the
/// next job is considered. Delete jobs are never given up.
pub fn claim_job(
    conn: &mut Connection,
    lease_ms: i64,
    max_attempts: u32,
    only_document: Option<&str>,
) -> Result<Option<Job>> {
    let now = now_ms();
    let token: i64 = rand_token();
    let tx = conn.transaction()?;
    loop {
        let candidate: Option<(String, String, u32)> = match only_document {
            Some(id) => tx
                .query_row(
                    "SELECT document_id, kind, attempts FROM jobs WHERE document_id = ?1 AND lease_until <= ?2",
                    params![id, now],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?,
            None => tx
                .query_row(
                    "SELECT document_id, kind, attempts FROM jobs WHERE lease_until <= ?1 AND not_before <= ?1
                     ORDER BY create_time LIMIT 1",
                    params![now],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?,
        };
        let Some((document_id, kind, attempts)) = candidate else {
            tx.commit()?;
            return Ok(None);
        };
        if kind == "index" && attempts >= max_attempts && only_document.is_none() {
            let step: i32 = tx
                .query_row(
                    "SELECT status FROM documents WHERE id = ?1",
                    params![document_id],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(Status::Queued as i32);
            let reason = format!(
                "gave up after {attempts} attempts; last seen at step {}",
                step_name(Status::from_i32(step))
            );
            tracing::error!(document = %document_id, %reason, "indexing job given up");
            tx.execute(
                "UPDATE documents SET status = ?2, error = ?3, update_time = ?4 WHERE id = ?1 AND status != ?5",
                params![document_id, Status::Failed as i32, reason, now, Status::Deleting as i32],
            )?;
            tx.execute(
                "DELETE FROM jobs WHERE document_id = ?1",
                params![document_id],
            )?;
            continue;
        }
        tx.execute(
            "UPDATE jobs SET lease_token = ?2, lease_until = ?3, attempts = attempts + 1 WHERE document_id = ?1",
            params![document_id, token, now + lease_ms],
        )?;
        let (outages, trace, reindex): (u32, String, i64) = tx.query_row(
            "SELECT outages, traceparent, reindex FROM jobs WHERE document_id = ?1",
            params![document_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        if kind == "index" {
            tx.execute(
                "UPDATE documents SET attempts = attempts + 1 WHERE id = ?1",
                params![document_id],
            )?;
        }
        tx.commit()?;
        return Ok(Some(Job {
            document_id,
            kind: if kind == "delete" {
                JobKind::Delete
            } else {
                JobKind::Index
            },
            lease_token: token,
            attempts: attempts + 1,
            outages,
            trace,
            quiet: kind == "index" && reindex == 1,
        }));
    }
}

/// Extends a lease while a long job runs; false if the lease was lost.
pub fn renew_lease(conn: &Connection, job: &Job, lease_ms: i64) -> Result<bool> {
    let n = conn.execute(
        "UPDATE jobs SET lease_until = ?3 WHERE document_id = ?1 AND lease_token = ?2",
        params![job.document_id, job.lease_token, now_ms() + lease_ms],
    )?;
    Ok(n == 1)
}

/// Finishes a job: removes it if it is still the job we claimed, else (it became a delete job
/// meanwhile) releases the lease so the new work starts at once.
pub fn complete_job(conn: &Connection, job: &Job) -> Result<()> {
    let kind = match job.kind {
        JobKind::Index => "index",
        JobKind::Delete => "delete",
    };
    let n = conn.execute(
        "DELETE FROM jobs WHERE document_id = ?1 AND lease_token = ?2 AND kind = ?3",
        params![job.document_id, job.lease_token, kind],
    )?;
    if n == 0 {
        release_job(conn, job, 0, Release::Keep)?;
    }
    Ok(())
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

/// Gives a job back, runnable again after `delay_ms`.
pub fn release_job(conn: &Connection, job: &Job, delay_ms: i64, release: Release) -> Result<()> {
    let (refund, outage) = match release {
        Release::Keep => (0, 0),
        Release::GiveBack { outage } => (1, i64::from(outage)),
    };
    let n = conn.execute(
        "UPDATE jobs SET lease_until = 0, not_before = ?3, attempts = MAX(attempts - ?4, 0),
             outages = CASE WHEN ?5 = 1 THEN outages + 1 ELSE outages END
         WHERE document_id = ?1 AND lease_token = ?2",
        params![
            job.document_id,
            job.lease_token,
            now_ms() + delay_ms,
            refund,
            outage
        ],
    )?;
    if n == 1 && refund == 1 && job.kind == JobKind::Index {
        conn.execute(
            "UPDATE documents SET attempts = MAX(attempts - 1, 0) WHERE id = ?1",
            params![job.document_id],
        )?;
    }
    Ok(())
}

/// Milliseconds until the next job becomes runnable, if any job is waiting.
pub fn next_job_in(conn: &Connection) -> Result<Option<i64>> {
    let next: Option<i64> = conn.query_row(
        "SELECT MIN(MAX(lease_until, not_before)) FROM jobs",
        [],
        |r| r.get(0),
    )?;
    Ok(next.map(|t| (t - now_ms()).max(0)))
}

fn rand_token() -> i64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    i64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 3;

    fn store() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("catalog.db")).unwrap();
        let conn = Arc::try_unwrap(store.conn)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap();
        (dir, conn)
    }

    fn kb(name: &str) -> KnowledgeBase {
        KnowledgeBase {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: "t".into(),
            name: name.into(),
            description: String::new(),
            embedding_model: "m".into(),
            dimension: 3,
            create_time: now_ms(),
            document_count: 0,
            ready: true,
            reindex: None,
        }
    }

    /// A ready knowledge base, the way a finished create leaves it.
    fn insert_kb(conn: &mut Connection, kb: &KnowledgeBase) {
        assert!(matches!(reserve_kb(conn, kb).unwrap(), Reservation::New));
        assert!(activate_kb(conn, &kb.id, &kb.id).unwrap());
    }

    fn doc(kb_id: &str, sha: &str) -> Document {
        Document {
            id: uuid::Uuid::now_v7().to_string(),
            kb_id: kb_id.into(),
            title: "t".into(),
            source_name: String::new(),
            content_type: "text/plain".into(),
            size_bytes: 1,
            sha256: sha.into(),
            status: Status::Queued,
            error: String::new(),
            chunk_count: 0,
            max_chunk_count: 0,
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            attempts: 0,
            create_time: now_ms(),
            update_time: now_ms(),
            source_id: String::new(),
        }
    }

    fn expire_leases(conn: &Connection) {
        conn.execute("UPDATE jobs SET lease_until = 1, not_before = 0", [])
            .unwrap();
    }

    #[test]
    fn knowledge_base_names_are_reserved_per_tenant_and_unfinished_creates_resume() {
        let (_d, mut conn) = store();
        let a = kb("a");
        insert_kb(&mut conn, &a);
        assert!(matches!(
            reserve_kb(&mut conn, &kb("a")).unwrap(),
            Reservation::Taken
        ));
        let mut other = kb("a");
        other.tenant = "u".into();
        insert_kb(&mut conn, &other);
        assert_eq!(list_kbs(&conn, "t", "", 10).unwrap().len(), 1);
        assert!(find_kb(&conn, "u", "a").unwrap().is_some());

        // A create that stopped after reserving: invisible, and the next create resumes it.
        let crashed = kb("b");
        assert!(matches!(
            reserve_kb(&mut conn, &crashed).unwrap(),
            Reservation::New
        ));
        assert!(find_kb(&conn, "t", "b").unwrap().is_none());
        assert_eq!(list_kbs(&conn, "t", "", 10).unwrap().len(), 1);
        match reserve_kb(&mut conn, &kb("b")).unwrap() {
            Reservation::Unfinished(found) => assert_eq!(found.id, crashed.id),
            other => panic!("expected the unfinished create, got {other:?}"),
        }
        // The index answered with another (reused) collection id: the row takes it.
        let reused = uuid::Uuid::new_v4().to_string();
        assert!(activate_kb(&conn, &crashed.id, &reused).unwrap());
        assert_eq!(find_kb(&conn, "t", "b").unwrap().unwrap().id, reused);
        assert!(!activate_kb(&conn, &crashed.id, &reused).unwrap());
    }

    #[test]
    fn same_bytes_deduplicate_and_failed_ones_requeue() {
        let (_d, mut conn) = store();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        let first = doc(&k.id, "abc");
        assert!(matches!(
            insert_doc(&mut conn, &first).unwrap(),
            Inserted::New(_)
        ));
        match insert_doc(&mut conn, &doc(&k.id, "abc")).unwrap() {
            Inserted::Existing(d) => assert_eq!(d.id, first.id),
            other => panic!("expected existing, got {other:?}"),
        }
        let job = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
        set_status(&conn, &first.id, Status::Failed, "boom").unwrap();
        complete_job(&conn, &job).unwrap();
        match insert_doc(&mut conn, &doc(&k.id, "abc")).unwrap() {
            Inserted::New(d) => assert_eq!((d.id, d.status), (first.id.clone(), Status::Queued)),
            other => panic!("expected requeue, got {other:?}"),
        }
        assert!(claim_job(&mut conn, 60_000, MAX, None).unwrap().is_some());
    }

    #[test]
    fn identical_bytes_uploaded_during_a_delete_become_a_new_document() {
        let (_d, mut conn) = store();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        let old = doc(&k.id, "same");
        insert_doc(&mut conn, &old).unwrap();
        mark_deleting(&mut conn, &old.id).unwrap();
        let again = doc(&k.id, "same");
        match insert_doc(&mut conn, &again).unwrap() {
            Inserted::New(d) => assert_eq!(d.id, again.id),
            other => panic!("a re-upload during a delete must be new, got {other:?}"),
        }
        // Both jobs exist: the delete of the old copy and the index job of the new one.
        let kinds: Vec<String> = conn
            .prepare("SELECT kind FROM jobs ORDER BY kind")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(kinds, ["delete", "index"]);
        // Once the old copy is gone, the new one is the one a third upload finds.
        remove_doc(&conn, &old.id).unwrap();
        match insert_doc(&mut conn, &doc(&k.id, "same")).unwrap() {
            Inserted::Existing(d) => assert_eq!(d.id, again.id),
            other => panic!("expected the new copy, got {other:?}"),
        }
    }

    #[test]
    fn leases_exclude_other_workers_until_they_expire() {
        let (_d, mut conn) = store();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        insert_doc(&mut conn, &doc(&k.id, "x")).unwrap();
        let job = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
        assert_eq!(job.attempts, 1);
        assert!(
            claim_job(&mut conn, 60_000, MAX, None).unwrap().is_none(),
            "leased job must not be claimed twice"
        );
        // A crashed worker: its lease expires and the job is claimed again.
        expire_leases(&conn);
        let again = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
        assert_eq!(again.attempts, 2);
        // The stale worker's completion does nothing.
        complete_job(&conn, &job).unwrap();
        assert!(!renew_lease(&conn, &job, 1000).unwrap());
        assert!(renew_lease(&conn, &again, 1000).unwrap());
    }

    #[test]
    fn a_job_whose_claims_keep_expiring_is_given_up_with_its_last_step() {
        let (_d, mut conn) = store();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        let poison = doc(&k.id, "poison");
        insert_doc(&mut conn, &poison).unwrap();
        for attempt in 1..=MAX {
            let job = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
            assert_eq!(job.attempts, attempt);
            set_status(&conn, &poison.id, Status::Parsing, "").unwrap();
            // The worker dies here: nothing is released, the lease just runs out.
            expire_leases(&conn);
        }
        let healthy = doc(&k.id, "healthy");
        insert_doc(&mut conn, &healthy).unwrap();
        let next = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
        assert_eq!(
            next.document_id, healthy.id,
            "the poison job is not run again"
        );
        let failed = doc_by_id(&conn, &poison.id).unwrap().unwrap();
        assert_eq!(failed.status, Status::Failed);
        assert_eq!(
            failed.error,
            "gave up after 3 attempts; last seen at step PARSING"
        );
        assert!(claim_job(&mut conn, 60_000, MAX, None).unwrap().is_none());
    }

    #[test]
    fn outages_and_shutdowns_give_the_attempt_back() {
        let (_d, mut conn) = store();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        let d = doc(&k.id, "x");
        insert_doc(&mut conn, &d).unwrap();
        // Far more outages than attempts allow: the job is still runnable.
        for outage in 0..(MAX * 3) {
            let job = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
            assert_eq!((job.attempts, job.outages), (1, outage));
            release_job(&conn, &job, 0, Release::GiveBack { outage: true }).unwrap();
        }
        let job = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
        release_job(&conn, &job, 0, Release::GiveBack { outage: false }).unwrap();
        let job = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
        assert_eq!(job.attempts, 1);
        assert_eq!(doc_by_id(&conn, &d.id).unwrap().unwrap().attempts, 1);
        // A failure of the document itself counts.
        release_job(&conn, &job, 0, Release::Keep).unwrap();
        assert_eq!(
            claim_job(&mut conn, 60_000, MAX, None)
                .unwrap()
                .unwrap()
                .attempts,
            2
        );
    }

    #[test]
    fn failed_documents_can_be_retried_without_a_new_upload() {
        let (_d, mut conn) = store();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        let d = doc(&k.id, "x");
        insert_doc(&mut conn, &d).unwrap();
        assert!(matches!(
            retry_doc(&mut conn, &k.id, &d.id).unwrap(),
            Some(Retried::NotFailed(_))
        ));
        let job = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
        set_status(&conn, &d.id, Status::Failed, "embed-svc said no").unwrap();
        complete_job(&conn, &job).unwrap();
        match retry_doc(&mut conn, &k.id, &d.id).unwrap() {
            Some(Retried::Queued(doc)) => {
                assert_eq!((doc.status, doc.attempts), (Status::Queued, 0));
                assert!(doc.error.is_empty());
            }
            other => panic!("expected a requeue, got {other:?}"),
        }
        assert_eq!(
            claim_job(&mut conn, 60_000, MAX, None)
                .unwrap()
                .unwrap()
                .document_id,
            d.id
        );
        assert!(retry_doc(&mut conn, &k.id, "nope").unwrap().is_none());
    }

    #[test]
    fn delete_during_indexing_waits_for_the_lease_then_runs() {
        let (_d, mut conn) = store();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        let d = doc(&k.id, "x");
        insert_doc(&mut conn, &d).unwrap();
        let index_job = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
        mark_deleting(&mut conn, &d.id).unwrap();
        assert!(
            !set_status(&conn, &d.id, Status::Indexed, "").unwrap(),
            "deleting documents keep their status"
        );
        assert!(
            claim_job(&mut conn, 60_000, MAX, None).unwrap().is_none(),
            "delete waits for the running index job"
        );
        complete_job(&conn, &index_job).unwrap();
        let delete_job = claim_job(&mut conn, 60_000, MAX, None).unwrap().unwrap();
        assert_eq!(delete_job.kind, JobKind::Delete);
        remove_doc(&conn, &d.id).unwrap();
        assert!(claim_job(&mut conn, 60_000, MAX, None).unwrap().is_none());
        assert!(doc_by_id(&conn, &d.id).unwrap().is_none());
    }

    #[test]
    fn a_reindex_queues_indexed_and_failed_documents_and_counts_them_down_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let open = || {
            let store = Store::open(&path).unwrap();
            Arc::try_unwrap(store.conn)
                .ok()
                .unwrap()
                .into_inner()
                .unwrap()
        };
        let mut conn = open();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        let other = kb("b");
        insert_kb(&mut conn, &other);
        let [indexed, failed, queued, elsewhere] = [(&k, "1"), (&k, "2"), (&k, "3"), (&other, "4")]
            .map(|(kb, sha)| {
                let Inserted::New(d) = insert_doc(&mut conn, &doc(&kb.id, sha)).unwrap() else {
                    panic!("new document")
                };
                d
            });
        for d in [&indexed, &failed, &elsewhere] {
            let job = claim_job(&mut conn, 60_000, MAX, Some(&d.id))
                .unwrap()
                .unwrap();
            complete_job(&conn, &job).unwrap();
        }
        set_status(&conn, &indexed.id, Status::Indexed, "").unwrap();
        set_status(&conn, &failed.id, Status::Failed, "too many chunks").unwrap();
        set_status(&conn, &elsewhere.id, Status::Indexed, "").unwrap();
        assert_eq!(find_kb(&conn, "t", "a").unwrap().unwrap().reindex, None);

        let started = start_reindex(&mut conn, &k.id)
            .unwrap()
            .unwrap()
            .reindex
            .unwrap();
        // The queued document is being indexed with the current settings already.
        assert_eq!((started.total, started.remaining), (2, 2));
        assert_eq!(
            doc_by_id(&conn, &indexed.id).unwrap().unwrap().status,
            Status::Indexed
        );
        let requeued = doc_by_id(&conn, &failed.id).unwrap().unwrap();
        assert_eq!(
            (requeued.status, requeued.error.as_str()),
            (Status::Queued, "")
        );
        // Asking again while it runs changes nothing.
        assert_eq!(
            start_reindex(&mut conn, &k.id).unwrap().unwrap().reindex,
            Some(started)
        );

        // A restart keeps the progress and the jobs.
        drop(conn);
        let mut conn = open();
        let mut quiet = Vec::new();
        while let Some(job) = claim_job(&mut conn, 60_000, MAX, None).unwrap() {
            quiet.push((job.document_id.clone(), job.quiet));
            complete_job(&conn, &job).unwrap();
            let left = find_kb(&conn, "t", "a").unwrap().unwrap().reindex.unwrap();
            assert_eq!(left.total, 2);
        }
        quiet.sort();
        let mut expected = vec![
            (indexed.id.clone(), true),
            (failed.id.clone(), false),
            (queued.id.clone(), false),
        ];
        expected.sort();
        assert_eq!(quiet, expected);
        let done = find_kb(&conn, "t", "a").unwrap().unwrap().reindex.unwrap();
        assert_eq!((done.total, done.remaining), (2, 0));
        assert_eq!(find_kb(&conn, "t", "b").unwrap().unwrap().reindex, None);
        // Once done, a new reindex starts over.
        let again = start_reindex(&mut conn, &k.id)
            .unwrap()
            .unwrap()
            .reindex
            .unwrap();
        assert_eq!(again.remaining, 1);
        assert!(start_reindex(&mut conn, "no-such-kb").unwrap().is_none());
    }

    #[test]
    fn deleting_a_knowledge_base_removes_its_documents() {
        let (_d, mut conn) = store();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        insert_doc(&mut conn, &doc(&k.id, "1")).unwrap();
        insert_doc(&mut conn, &doc(&k.id, "2")).unwrap();
        assert_eq!(find_kb(&conn, "t", "a").unwrap().unwrap().document_count, 2);
        assert_eq!(delete_kb(&mut conn, &k.id).unwrap().len(), 2);
        assert!(find_kb(&conn, "t", "a").unwrap().is_none());
        assert!(claim_job(&mut conn, 1000, MAX, None).unwrap().is_none());
    }

    #[test]
    fn migrations_are_valid_and_a_first_release_catalog_upgrades_in_place() {
        migrations().validate().unwrap();
        // A catalog as release 0.1.0 wrote it: its schema, no version, a document and its job.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(
                "INSERT INTO knowledge_bases VALUES ('k1', 'default', 'notes', '', 'm', 3, 1);
                 INSERT INTO documents (id, kb_id, title, source_name, content_type, size_bytes,
                     sha256, status, metadata, create_time, update_time)
                     VALUES ('d1', 'k1', 'T', 'a.txt', 'text/plain', 5, 'aa', 1, '{\"k\":\"v\"}', 1, 1);
                 INSERT INTO jobs (document_id, kind, create_time) VALUES ('d1', 'index', 1);",
            )
            .unwrap();
            assert_eq!(schema_version(&conn).unwrap(), 0);
        }
        let store = Store::open(&path).unwrap();
        let mut conn = Arc::try_unwrap(store.conn)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap();
        assert_eq!(schema_version(&conn).unwrap(), 5);
        let kb = find_kb(&conn, "default", "notes").unwrap().unwrap();
        assert!(kb.ready);
        assert_eq!(kb.document_count, 1);
        let d = doc_by_id(&conn, "d1").unwrap().unwrap();
        assert_eq!(d.metadata["k"], "v");
        assert_eq!(
            d.source_id, "",
            "documents of older releases name no source"
        );
        assert!(other_versions(&conn, &d).unwrap().is_empty());
        // The job survived the table rebuild (no cascade) and still runs.
        let job = claim_job(&mut conn, 1000, MAX, None).unwrap().unwrap();
        assert_eq!(job.document_id, "d1");
        assert_eq!(
            job.trace, "",
            "jobs of older releases carry no trace context"
        );
        // Reopening an up-to-date catalog changes nothing.
        drop(conn);
        let again = Store::open(&path).unwrap();
        let conn = again.conn.lock().unwrap();
        assert_eq!(schema_version(&conn).unwrap(), 5);
    }

    #[test]
    fn a_job_carries_the_trace_context_of_the_call_that_queued_it() {
        let (_d, mut conn) = store();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        insert_doc_traced(&mut conn, &doc(&k.id, "1"), parent).unwrap();
        let job = claim_job(&mut conn, 1000, MAX, None).unwrap().unwrap();
        assert_eq!(job.trace, parent);
    }

    #[test]
    fn publishing_a_version_retires_the_older_ones_of_its_source_only() {
        let (_d, mut conn) = store();
        let k = kb("a");
        insert_kb(&mut conn, &k);
        let versioned = |sha: &str, source: &str| {
            let mut d = doc(&k.id, sha);
            d.source_id = source.into();
            d
        };
        let (v1, v2, other, plain) = (
            versioned("1", "guide.md"),
            versioned("2", "guide.md"),
            versioned("3", "faq.md"),
            doc(&k.id, "4"),
        );
        for d in [&v1, &v2, &other, &plain] {
            insert_doc(&mut conn, d).unwrap();
        }
        assert!(v2.is_newer_than(&v1) && !v1.is_newer_than(&v2));
        let ids = |docs: Vec<Document>| docs.into_iter().map(|d| d.id).collect::<Vec<_>>();
        assert_eq!(ids(other_versions(&conn, &v2).unwrap()), [v1.id.as_str()]);
        assert_eq!(ids(other_versions(&conn, &v1).unwrap()), [v2.id.as_str()]);
        assert!(other_versions(&conn, &other).unwrap().is_empty());
        assert!(other_versions(&conn, &plain).unwrap().is_empty());

        assert!(publish_version(&mut conn, &v2.id, std::slice::from_ref(&v1.id)).unwrap());
        assert_eq!(
            doc_by_id(&conn, &v2.id).unwrap().unwrap().status,
            Status::Indexed
        );
        assert_eq!(
            doc_by_id(&conn, &v1.id).unwrap().unwrap().status,
            Status::Deleting
        );
        // v1's index job became a delete job; the others are untouched.
        expire_leases(&conn);
        let mut kinds = Vec::new();
        while let Some(job) = claim_job(&mut conn, 1000, MAX, None).unwrap() {
            kinds.push((job.document_id.clone(), job.kind));
            complete_job(&conn, &job).unwrap();
        }
        assert!(
            kinds.contains(&(v1.id.clone(), JobKind::Delete)),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&(other.id.clone(), JobKind::Index)),
            "{kinds:?}"
        );
        // A version being deleted is not another version any more, and cannot be published.
        assert!(other_versions(&conn, &v2).unwrap().is_empty());
        assert!(!publish_version(&mut conn, &v1.id, &[]).unwrap());
        // Publishing again is harmless.
        assert!(publish_version(&mut conn, &v2.id, &[]).unwrap());
    }
}
