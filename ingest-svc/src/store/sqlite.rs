//! The catalog in SQLite, the embedded default (WAL mode, full sync, so an acknowledged write
//! survives a crash of the machine; a job's own progress is only synced with the next synced
//! write, see `SqliteStore::call_progress`). The connection is synchronous; [`SqliteStore`]
//! runs each operation on the blocking pool so async callers never stall the runtime, except
//! lookups of one row and a job's unsynced progress writes while the connection is free
//! (`SqliteStore::lookup`, `SqliteStore::call_progress`). One job row per document.
//!
//! The schema is versioned (`PRAGMA user_version`) and migrated at open; see [`migrations`].

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    CatalogStore, Document, Inserted, Job, JobKind, KnowledgeBase, Reindex, Release, Reservation,
    Retried, Status, gave_up, now_ms, rand_token,
};
use crate::error::{Error, Result};

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

/// Version 6: publishing versions of a source is serialised by a lock with an expiry
/// (`source_locks`), the same on every catalog store (MongoDB replicas need it).
const SCHEMA_V6: &str = "
CREATE TABLE source_locks (
    kb_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    token INTEGER NOT NULL,
    until INTEGER NOT NULL,
    PRIMARY KEY (kb_id, source_id)
);
";

/// Version 7: jobs are also indexed by age, so a claim finds the oldest runnable job by walking
/// the queue from its head instead of sorting every runnable job (about 0.2 ms per claim with
/// a thousand queued; a claim is made per document).
const SCHEMA_V7: &str = "
CREATE INDEX jobs_queue ON jobs (create_time);
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
        M::up(SCHEMA_V6),
        M::up(SCHEMA_V7),
    ])
}

/// Statements through the connection's statement cache: the same few statements run for every
/// upload and job step, and parsing them each time was a tenth of the catalog's CPU.
trait Cached {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// Writes between two checkpoints of the write-ahead log. SQLite's own automatic checkpoint is
/// off, since it would run inside whichever commit crosses its threshold, possibly one made on
/// the runtime's thread (see `SqliteStore::call_progress`); this one runs on the blocking pool.
/// A job's step writes a few pages, so the log stays near SQLite's default of 1,000 pages.
const CHECKPOINT_EVERY: u32 = 256;

/// The catalog in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// Whether the connection is at `synchronous = FULL` (else NORMAL).
    synced: Arc<AtomicBool>,
    /// Writes since the last checkpoint.
    writes: Arc<AtomicU32>,
}

impl SqliteStore {
    /// Opens (creating if needed) the catalog at `path`, migrating it to the current schema.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk before we acknowledge an upload.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
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
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            synced: Arc::new(AtomicBool::new(true)),
            writes: Arc::new(AtomicU32::new(0)),
        })
    }

    /// Runs `f` with the connection on the blocking pool; its commits are on disk when it
    /// returns (`synchronous = FULL`).
    pub(crate) async fn call<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.call_synced(Some(true), f).await
    }

    /// Like [`SqliteStore::call`] for a job's own progress (claims, leases, status steps,
    /// completion), which no caller was promised: its commits survive a crash of the process
    /// but may be lost with the machine (`synchronous = NORMAL`, WAL mode), and the job then
    /// runs again from its last synced state, which jobs are made to do. It saves a document
    /// four or five fsyncs on its way to INDEXED. The next synced commit syncs these too.
    ///
    /// Such a commit only appends a few pages to the log in the page cache (no fsync, and no
    /// checkpoint: see [`CHECKPOINT_EVERY`]), so like a lookup it runs on the caller's thread
    /// when the connection is free, sparing a document about six hand-offs to the blocking pool
    /// and back. When the connection is busy, or a checkpoint is due, it goes to the pool.
    /// (Nothing else may write to the catalog file meanwhile: another process holding its write
    /// lock would make this wait on the runtime for up to the busy timeout.)
    async fn call_progress<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        if self.writes.load(Ordering::Relaxed) < CHECKPOINT_EVERY
            && let Ok(mut conn) = self.conn.try_lock()
        {
            set_synced(&conn, &self.synced, false)?;
            self.writes.fetch_add(1, Ordering::Relaxed);
            return f(&mut conn);
        }
        self.call_synced(Some(false), f).await
    }

    /// Runs a lookup of one row by its key (`f` must not write) on this thread when the
    /// connection is free: it takes microseconds from the page cache, less than handing it to
    /// the blocking pool and back (two thread wake-ups; the hand-offs were about a sixth of
    /// ingest-svc's CPU while indexing). When another operation holds the connection, it waits
    /// its turn on the blocking pool instead, so the runtime never waits for a commit.
    async fn lookup<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        if let Ok(mut conn) = self.conn.try_lock() {
            return f(&mut conn);
        }
        self.call_synced(None, f).await
    }

    /// Runs `f` on the blocking pool with the connection at the given sync level (`None`: as it
    /// is, for reads).
    async fn call_synced<R, F>(&self, synced: Option<bool>, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let (conn, state, writes) = (self.conn.clone(), self.synced.clone(), self.writes.clone());
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| Error::Internal("catalog lock poisoned".into()))?;
            let Some(synced) = synced else {
                return f(&mut guard);
            };
            set_synced(&guard, &state, synced)?;
            let result = f(&mut guard);
            if writes.fetch_add(1, Ordering::Relaxed) + 1 >= CHECKPOINT_EVERY {
                // PASSIVE: this is the only connection, so nothing keeps it from finishing. A
                // failed checkpoint loses nothing (the log still holds every commit); the next
                // write tries again.
                match guard.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    Ok(()) => writes.store(0, Ordering::Relaxed),
                    Err(err) => tracing::warn!(error = %err, "cannot checkpoint the catalog's log"),
                }
            }
            result
        })
        .await
        .map_err(|e| Error::Internal(format!("catalog task failed: {e}")))?
    }
}

/// Puts the connection at `synchronous = FULL` (`synced`) or NORMAL, if it is not there yet.
/// Only called under the connection's lock, so `state` tells the connection's setting.
fn set_synced(conn: &Connection, state: &AtomicBool, synced: bool) -> Result<()> {
    if state.load(Ordering::Relaxed) != synced {
        let level = if synced { "FULL" } else { "NORMAL" };
        conn.pragma_update(None, "synchronous", level)?;
        state.store(synced, Ordering::Relaxed);
    }
    Ok(())
}

#[tonic::async_trait]
impl CatalogStore for SqliteStore {
    async fn reserve_kb(&self, kb: &KnowledgeBase) -> Result<Reservation> {
        let kb = kb.clone();
        self.call(move |c| reserve_kb(c, &kb)).await
    }

    async fn activate_kb(&self, reserved_id: &str, collection_id: &str) -> Result<bool> {
        let (reserved, collection) = (reserved_id.to_owned(), collection_id.to_owned());
        self.call(move |c| activate_kb(c, &reserved, &collection))
            .await
    }

    async fn drop_reservation(&self, reserved_id: &str) -> Result<()> {
        let id = reserved_id.to_owned();
        self.call(move |c| drop_reservation(c, &id)).await
    }

    async fn find_kb(&self, tenant: &str, name: &str) -> Result<Option<KnowledgeBase>> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.lookup(move |c| find_kb(c, &tenant, &name)).await
    }

    async fn kb_by_id(&self, id: &str) -> Result<Option<KnowledgeBase>> {
        let id = id.to_owned();
        self.lookup(move |c| kb_by_id(c, &id)).await
    }

    async fn count_kb(&self, kb: &mut KnowledgeBase) -> Result<()> {
        let id = kb.id.clone();
        let (documents, remaining) = self.call(move |c| count_kb(c, &id)).await?;
        kb.document_count = documents;
        if let Some(reindex) = &mut kb.reindex {
            reindex.remaining = remaining;
        }
        Ok(())
    }

    async fn list_kbs(
        &self,
        tenant: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KnowledgeBase>> {
        let (tenant, after) = (tenant.to_owned(), after.to_owned());
        self.call(move |c| list_kbs(c, &tenant, &after, limit))
            .await
    }

    async fn delete_kb(&self, id: &str) -> Result<Vec<String>> {
        let id = id.to_owned();
        self.call(move |c| delete_kb(c, &id)).await
    }

    async fn start_reindex(&self, kb_id: &str) -> Result<Option<KnowledgeBase>> {
        let id = kb_id.to_owned();
        self.call(move |c| start_reindex(c, &id)).await
    }

    async fn get_doc(&self, kb_id: &str, id: &str) -> Result<Option<Document>> {
        let (kb_id, id) = (kb_id.to_owned(), id.to_owned());
        self.lookup(move |c| get_doc(c, &kb_id, &id)).await
    }

    async fn doc_by_id(&self, id: &str) -> Result<Option<Document>> {
        let id = id.to_owned();
        self.lookup(move |c| doc_by_id(c, &id)).await
    }

    async fn list_docs(&self, kb_id: &str, after: &str, limit: usize) -> Result<Vec<Document>> {
        let (kb_id, after) = (kb_id.to_owned(), after.to_owned());
        self.call(move |c| list_docs(c, &kb_id, &after, limit))
            .await
    }

    async fn existing_docs(&self, ids: &[String]) -> Result<HashSet<String>> {
        let ids = ids.to_vec();
        self.call(move |c| existing_docs(c, &ids)).await
    }

    async fn insert_doc(&self, doc: &Document, trace: &str) -> Result<Inserted> {
        let (doc, trace) = (doc.clone(), trace.to_owned());
        self.call(move |c| insert_doc_traced(c, &doc, &trace)).await
    }

    async fn retry_doc(&self, kb_id: &str, id: &str) -> Result<Option<Retried>> {
        let (kb_id, id) = (kb_id.to_owned(), id.to_owned());
        self.call(move |c| retry_doc(c, &kb_id, &id)).await
    }

    async fn set_status(&self, id: &str, status: Status, error: &str) -> Result<bool> {
        let (id, error) = (id.to_owned(), error.to_owned());
        self.call_progress(move |c| set_status(c, &id, status, &error))
            .await
    }

    async fn set_chunk_count(&self, id: &str, chunks: u32, status: Status) -> Result<bool> {
        let id = id.to_owned();
        self.call_progress(move |c| set_chunk_count(c, &id, chunks, status))
            .await
    }

    async fn mark_deleting(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.call(move |c| mark_deleting(c, &id)).await
    }

    async fn other_versions(&self, doc: &Document) -> Result<Vec<Document>> {
        let doc = doc.clone();
        self.call(move |c| other_versions(c, &doc)).await
    }

    async fn publish_version(&self, id: &str, replaced: &[String]) -> Result<bool> {
        let (id, replaced) = (id.to_owned(), replaced.to_vec());
        self.call(move |c| publish_version(c, &id, &replaced)).await
    }

    async fn remove_doc(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.call_progress(move |c| remove_doc(c, &id)).await
    }

    async fn lock_source(&self, kb_id: &str, source_id: &str, ttl_ms: i64) -> Result<Option<i64>> {
        let (kb_id, source_id) = (kb_id.to_owned(), source_id.to_owned());
        self.call_progress(move |c| lock_source(c, &kb_id, &source_id, ttl_ms))
            .await
    }

    async fn unlock_source(&self, kb_id: &str, source_id: &str, token: i64) -> Result<()> {
        let (kb_id, source_id) = (kb_id.to_owned(), source_id.to_owned());
        self.call_progress(move |c| unlock_source(c, &kb_id, &source_id, token))
            .await
    }

    async fn backlog(&self) -> Result<(u64, Option<i64>)> {
        self.call(|c| Ok(backlog(c)?)).await
    }

    async fn claim_job(
        &self,
        lease_ms: i64,
        max_attempts: u32,
        only_document: Option<&str>,
    ) -> Result<Option<Job>> {
        let only = only_document.map(str::to_owned);
        self.call_progress(move |c| claim_job(c, lease_ms, max_attempts, only.as_deref()))
            .await
    }

    async fn renew_lease(&self, job: &Job, lease_ms: i64) -> Result<bool> {
        let job = job.clone();
        self.call_progress(move |c| renew_lease(c, &job, lease_ms))
            .await
    }

    async fn complete_job(&self, job: &Job) -> Result<()> {
        let job = job.clone();
        self.call_progress(move |c| complete_job(c, &job)).await
    }

    async fn release_job(&self, job: &Job, delay_ms: i64, release: Release) -> Result<()> {
        let job = job.clone();
        self.call_progress(move |c| release_job(c, &job, delay_ms, release))
            .await
    }

    async fn next_job_in(&self) -> Result<Option<i64>> {
        self.call(|c| next_job_in(c)).await
    }
}

/// A write transaction that takes the write lock at once: a deferred one that upgrades later
/// fails with "database is locked" when another connection wrote in between, whatever the
/// busy timeout; an immediate one waits its turn.
fn write_tx(conn: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
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

/// A knowledge base's row without its counts (0 in their place): what every upload, document
/// read and job looks up, so it must not grow with the knowledge base.
const KB_COLUMNS: &str = "k.id, k.tenant, k.name, k.description, k.embedding_model, k.dimension,
    k.create_time, 0, k.state, k.reindex_total, k.reindex_start, 0";

/// A knowledge base's row with its counts (documents, reindex jobs left): each is a scan of the
/// knowledge base's documents or of the jobs, so only answers that show them use it.
const KB_COUNTED_COLUMNS: &str = concat!(
    "k.id, k.tenant, k.name, k.description, k.embedding_model, k.dimension, k.create_time, ",
    documents_of_k!(),
    ", k.state, k.reindex_total, k.reindex_start, ",
    reindex_left_of_k!()
);

/// The number of documents of the knowledge base `k` (SQL, for the queries that count).
macro_rules! documents_of_k {
    () => {
        "(SELECT COUNT(*) FROM documents d WHERE d.kb_id = k.id)"
    };
}
use documents_of_k;

/// The number of reindex jobs left of the knowledge base `k` (SQL).
macro_rules! reindex_left_of_k {
    () => {
        "(SELECT COUNT(*) FROM jobs j JOIN documents d ON d.id = j.document_id
            WHERE d.kb_id = k.id AND j.reindex != 0)"
    };
}
use reindex_left_of_k;

/// Reserves `kb.name` for `kb` (state `creating`): the first step of a create.
fn reserve_kb(conn: &mut Connection, kb: &KnowledgeBase) -> Result<Reservation> {
    let tx = write_tx(conn)?;
    let existing = tx
        .row(
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
            tx.exec(
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
fn activate_kb(conn: &Connection, reserved_id: &str, collection_id: &str) -> Result<bool> {
    let n = conn.exec(
        "UPDATE knowledge_bases SET id = ?2, state = 'ready' WHERE id = ?1 AND state = 'creating'",
        params![reserved_id, collection_id],
    )?;
    Ok(n == 1)
}

/// Drops an unfinished reservation (its create failed for good).
fn drop_reservation(conn: &Connection, reserved_id: &str) -> Result<()> {
    conn.exec(
        "DELETE FROM knowledge_bases WHERE id = ?1 AND state = 'creating'",
        params![reserved_id],
    )?;
    Ok(())
}

/// Finds a tenant's ready knowledge base by name.
fn find_kb(conn: &Connection, tenant: &str, name: &str) -> Result<Option<KnowledgeBase>> {
    Ok(conn
        .row(
            &format!(
                "SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.tenant = ?1 AND k.name = ?2 AND k.state = 'ready'"
            ),
            params![tenant, name],
            kb_from_row,
        )
        .optional()?)
}

/// Finds a knowledge base by id, whatever its state.
fn kb_by_id(conn: &Connection, id: &str) -> Result<Option<KnowledgeBase>> {
    Ok(conn
        .row(
            &format!("SELECT {KB_COLUMNS} FROM knowledge_bases k WHERE k.id = ?1"),
            params![id],
            kb_from_row,
        )
        .optional()?)
}

/// A knowledge base's documents, and its documents whose reindex job is pending.
fn count_kb(conn: &Connection, id: &str) -> Result<(u64, u64)> {
    // The same counts as KB_COUNTED_COLUMNS; zeros for an id without a row.
    Ok(conn.row(
        concat!(
            "SELECT ",
            documents_of_k!(),
            ", ",
            reindex_left_of_k!(),
            " FROM (SELECT ?1 AS id) k"
        ),
        params![id],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )?)
}

/// Lists a tenant's ready knowledge bases with names after `after`, in name order.
fn list_kbs(
    conn: &Connection,
    tenant: &str,
    after: &str,
    limit: usize,
) -> Result<Vec<KnowledgeBase>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {KB_COUNTED_COLUMNS} FROM knowledge_bases k WHERE k.tenant = ?1 AND k.name > ?2 AND k.state = 'ready'
         ORDER BY k.name LIMIT ?3"
    ))?;
    let rows = stmt.query_map(params![tenant, after, limit as i64], kb_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Deletes a knowledge base row with its documents and jobs; returns the document ids removed.
fn delete_kb(conn: &mut Connection, id: &str) -> Result<Vec<String>> {
    let tx = write_tx(conn)?;
    let ids: Vec<String> = {
        let mut stmt = tx.prepare_cached("SELECT id FROM documents WHERE kb_id = ?1")?;
        stmt.query_map(params![id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    tx.exec(
        "DELETE FROM jobs WHERE document_id IN (SELECT id FROM documents WHERE kb_id = ?1)",
        params![id],
    )?;
    tx.exec("DELETE FROM documents WHERE kb_id = ?1", params![id])?;
    tx.exec("DELETE FROM knowledge_bases WHERE id = ?1", params![id])?;
    tx.exec("DELETE FROM source_locks WHERE kb_id = ?1", params![id])?;
    tx.commit()?;
    Ok(ids)
}

/// Starts a reindex of a knowledge base: every INDEXED or FAILED document without a pending
/// job gets an index job marked as the reindex's (documents with one are being indexed with the
/// current settings already). INDEXED ones stay INDEXED; FAILED ones are queued again. If a
/// reindex is still running, nothing changes. Returns the knowledge base with its progress, or
/// None if it is gone.
fn start_reindex(conn: &mut Connection, kb_id: &str) -> Result<Option<KnowledgeBase>> {
    let tx = write_tx(conn)?;
    let Some(kb) = tx
        .row(
            &format!("SELECT {KB_COUNTED_COLUMNS} FROM knowledge_bases k WHERE k.id = ?1"),
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
        total += tx.exec(
            "INSERT INTO jobs (document_id, kind, create_time, reindex)
             SELECT id, 'index', ?3, ?4 FROM documents WHERE kb_id = ?1 AND status = ?2 AND true
             ON CONFLICT (document_id) DO NOTHING",
            params![kb_id, status as i32, now, mark],
        )?;
    }
    tx.exec(
        "UPDATE documents SET status = ?2, error = '', attempts = 0, update_time = ?3
         WHERE status = ?4 AND id IN (SELECT document_id FROM jobs WHERE reindex = 2)
           AND kb_id = ?1",
        params![kb_id, Status::Queued as i32, now, Status::Failed as i32],
    )?;
    tx.exec(
        "UPDATE knowledge_bases SET reindex_total = ?2, reindex_start = ?3 WHERE id = ?1",
        params![kb_id, total as i64, now],
    )?;
    let kb = tx.row(
        &format!("SELECT {KB_COUNTED_COLUMNS} FROM knowledge_bases k WHERE k.id = ?1"),
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
fn get_doc(conn: &Connection, kb_id: &str, id: &str) -> Result<Option<Document>> {
    Ok(conn
        .row(
            &format!("SELECT {DOC_COLUMNS} FROM documents WHERE kb_id = ?1 AND id = ?2"),
            params![kb_id, id],
            doc_from_row,
        )
        .optional()?)
}

/// Reads one document by id alone (workers).
fn doc_by_id(conn: &Connection, id: &str) -> Result<Option<Document>> {
    Ok(conn
        .row(
            &format!("SELECT {DOC_COLUMNS} FROM documents WHERE id = ?1"),
            params![id],
            doc_from_row,
        )
        .optional()?)
}

/// Lists documents of a knowledge base with ids after `after`, oldest first.
fn list_docs(conn: &Connection, kb_id: &str, after: &str, limit: usize) -> Result<Vec<Document>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DOC_COLUMNS} FROM documents WHERE kb_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
    ))?;
    let rows = stmt.query_map(params![kb_id, after, limit as i64], doc_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Which of `ids` are documents in the catalog (for garbage-collecting originals).
fn existing_docs(conn: &Connection, ids: &[String]) -> Result<HashSet<String>> {
    let mut stmt = conn.prepare_cached("SELECT id FROM documents WHERE id = ?1")?;
    let mut found = HashSet::new();
    for id in ids {
        if stmt.exists(params![id])? {
            found.insert(id.clone());
        }
    }
    Ok(found)
}

/// Stores a new document with its index job (continuing trace context `trace`) in one
/// transaction, unless the same bytes are already in the knowledge base (and not on their way
/// out: a copy being deleted does not count). A FAILED duplicate is queued again (one way users
/// retry).
fn insert_doc_traced(conn: &mut Connection, doc: &Document, trace: &str) -> Result<Inserted> {
    let tx = write_tx(conn)?;
    let existing = tx
        .row(
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
    tx.exec(
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
    tx.exec(
        "INSERT INTO jobs (document_id, kind, create_time, traceparent) VALUES (?1, 'index', ?2, ?3)",
        params![doc.id, doc.create_time, trace],
    )?;
    tx.commit()?;
    Ok(Inserted::New(doc.clone()))
}

/// Queues a FAILED document again from its stored original, with fresh attempts.
fn requeue(tx: &rusqlite::Transaction<'_>, mut doc: Document) -> Result<Document> {
    let now = now_ms();
    tx.exec(
        "UPDATE documents SET status = ?2, error = '', attempts = 0, update_time = ?3 WHERE id = ?1",
        params![doc.id, Status::Queued as i32, now],
    )?;
    tx.exec(
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

/// Queues a FAILED document again (`RetryDocument`), without a new upload.
fn retry_doc(conn: &mut Connection, kb_id: &str, id: &str) -> Result<Option<Retried>> {
    let tx = write_tx(conn)?;
    let Some(doc) = tx
        .row(
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
fn set_status(conn: &Connection, id: &str, status: Status, error: &str) -> Result<bool> {
    let error = smartdb_kit::limits::truncate(error, smartdb_kit::limits::ERROR_BYTES);
    let n = conn.exec(
        "UPDATE documents SET status = ?2, error = ?3, update_time = ?4 WHERE id = ?1 AND status != ?5",
        params![id, status as i32, error, now_ms(), Status::Deleting as i32],
    )?;
    Ok(n == 1)
}

/// Records the chunk count before chunks are written, so a later delete knows every point id,
/// and moves the document to `status` (EMBEDDING, or INDEXED for a quiet reindex).
fn set_chunk_count(conn: &Connection, id: &str, chunks: u32, status: Status) -> Result<bool> {
    let n = conn.exec(
        "UPDATE documents SET chunk_count = ?2, max_chunk_count = MAX(max_chunk_count, ?2), status = ?3, update_time = ?4
         WHERE id = ?1 AND status != ?5",
        params![id, chunks, status as i32, now_ms(), Status::Deleting as i32],
    )?;
    Ok(n == 1)
}

/// Marks a document DELETING and turns its job into a delete job (keeping any running lease).
fn mark_deleting(conn: &mut Connection, id: &str) -> Result<()> {
    let tx = write_tx(conn)?;
    mark_deleting_in(&tx, id, now_ms())?;
    tx.commit()?;
    Ok(())
}

fn mark_deleting_in(tx: &rusqlite::Transaction<'_>, id: &str, now: i64) -> Result<()> {
    tx.exec(
        "UPDATE documents SET status = ?2, update_time = ?3 WHERE id = ?1",
        params![id, Status::Deleting as i32, now],
    )?;
    tx.exec(
        "INSERT INTO jobs (document_id, kind, create_time) VALUES (?1, 'delete', ?2)
         ON CONFLICT (document_id) DO UPDATE SET kind = 'delete', not_before = 0, attempts = 0, outages = 0",
        params![id, now],
    )?;
    Ok(())
}

/// The other versions of a document's source in its knowledge base (not being deleted).
fn other_versions(conn: &Connection, doc: &Document) -> Result<Vec<Document>> {
    if doc.source_id.is_empty() {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(&format!(
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
fn publish_version(conn: &mut Connection, id: &str, replaced: &[String]) -> Result<bool> {
    let tx = write_tx(conn)?;
    let now = now_ms();
    let n = tx.exec(
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
fn remove_doc(conn: &Connection, id: &str) -> Result<()> {
    conn.exec("DELETE FROM documents WHERE id = ?1", params![id])?;
    Ok(())
}

// ---- jobs ----

/// Jobs waiting for a worker (not leased now), and the creation time (ms) of the oldest.
fn backlog(c: &Connection) -> rusqlite::Result<(u64, Option<i64>)> {
    c.row(
        "SELECT COUNT(*), MIN(create_time) FROM jobs WHERE lease_until <= ?1",
        [now_ms()],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
    )
}

/// Claims the oldest runnable job: not leased (or lease expired) and not backing off.
///
/// An index job that was already claimed `max_attempts` times without finishing is not run
/// again: its document becomes FAILED ("gave up after N attempts; last seen at step X") and the
/// next job is considered. Delete jobs are never given up.
fn claim_job(
    conn: &mut Connection,
    lease_ms: i64,
    max_attempts: u32,
    only_document: Option<&str>,
) -> Result<Option<Job>> {
    let now = now_ms();
    let token: i64 = rand_token();
    let tx = write_tx(conn)?;
    loop {
        let candidate: Option<(String, String, u32)> = match only_document {
            Some(id) => tx
                .row(
                    "SELECT document_id, kind, attempts FROM jobs WHERE document_id = ?1 AND lease_until <= ?2",
                    params![id, now],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?,
            None => tx
                .row(
                    // Without statistics the planner would pick `jobs_ready` and sort.
                    "SELECT document_id, kind, attempts FROM jobs INDEXED BY jobs_queue
                     WHERE lease_until <= ?1 AND not_before <= ?1 ORDER BY create_time LIMIT 1",
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
                .row(
                    "SELECT status FROM documents WHERE id = ?1",
                    params![document_id],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(Status::Queued as i32);
            let reason = gave_up(attempts, Status::from_i32(step));
            tracing::error!(document = %document_id, %reason, "indexing job given up");
            tx.exec(
                "UPDATE documents SET status = ?2, error = ?3, update_time = ?4 WHERE id = ?1 AND status != ?5",
                params![document_id, Status::Failed as i32, reason, now, Status::Deleting as i32],
            )?;
            tx.exec(
                "DELETE FROM jobs WHERE document_id = ?1",
                params![document_id],
            )?;
            continue;
        }
        tx.exec(
            "UPDATE jobs SET lease_token = ?2, lease_until = ?3, attempts = attempts + 1 WHERE document_id = ?1",
            params![document_id, token, now + lease_ms],
        )?;
        let (outages, trace, reindex): (u32, String, i64) = tx.row(
            "SELECT outages, traceparent, reindex FROM jobs WHERE document_id = ?1",
            params![document_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        if kind == "index" {
            tx.exec(
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
fn renew_lease(conn: &Connection, job: &Job, lease_ms: i64) -> Result<bool> {
    let n = conn.exec(
        "UPDATE jobs SET lease_until = ?3 WHERE document_id = ?1 AND lease_token = ?2",
        params![job.document_id, job.lease_token, now_ms() + lease_ms],
    )?;
    Ok(n == 1)
}

/// Finishes a job: removes it if it is still the job we claimed, else (it became a delete job
/// meanwhile) releases the lease so the new work starts at once.
fn complete_job(conn: &Connection, job: &Job) -> Result<()> {
    let kind = match job.kind {
        JobKind::Index => "index",
        JobKind::Delete => "delete",
    };
    let n = conn.exec(
        "DELETE FROM jobs WHERE document_id = ?1 AND lease_token = ?2 AND kind = ?3",
        params![job.document_id, job.lease_token, kind],
    )?;
    if n == 0 {
        release_job(conn, job, 0, Release::Keep)?;
    }
    Ok(())
}

/// Gives a job back, runnable again after `delay_ms`.
fn release_job(conn: &Connection, job: &Job, delay_ms: i64, release: Release) -> Result<()> {
    let (refund, outage) = match release {
        Release::Keep => (0, 0),
        Release::GiveBack { outage } => (1, i64::from(outage)),
    };
    let n = conn.exec(
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
        conn.exec(
            "UPDATE documents SET attempts = MAX(attempts - 1, 0) WHERE id = ?1",
            params![job.document_id],
        )?;
    }
    Ok(())
}

/// Takes the publish lock of a source if it is free or expired; its token if taken.
fn lock_source(
    conn: &Connection,
    kb_id: &str,
    source_id: &str,
    ttl_ms: i64,
) -> Result<Option<i64>> {
    let (token, now) = (rand_token(), now_ms());
    let n = conn.exec(
        "INSERT INTO source_locks (kb_id, source_id, token, until) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (kb_id, source_id) DO UPDATE SET token = excluded.token, until = excluded.until
         WHERE source_locks.until <= ?5",
        params![kb_id, source_id, token, now + ttl_ms, now],
    )?;
    Ok((n == 1).then_some(token))
}

/// Frees the publish lock of a source if `token` still holds it.
fn unlock_source(conn: &Connection, kb_id: &str, source_id: &str, token: i64) -> Result<()> {
    conn.exec(
        "DELETE FROM source_locks WHERE kb_id = ?1 AND source_id = ?2 AND token = ?3",
        params![kb_id, source_id, token],
    )?;
    Ok(())
}

/// Milliseconds until the next job becomes runnable, if any job is waiting.
fn next_job_in(conn: &Connection) -> Result<Option<i64>> {
    let next: Option<i64> = conn.row(
        "SELECT MIN(MAX(lease_until, not_before)) FROM jobs",
        [],
        |r| r.get(0),
    )?;
    Ok(next.map(|t| (t - now_ms()).max(0)))
}

#[cfg(test)]
mod tests {
    //! SQLite only: the file's migrations. Behaviour is checked for every store by the
    //! conformance suite (`store/conformance.rs`).
    use super::*;

    const MAX: u32 = 3;

    /// Holds the store's connection on another thread (once this returns) until the sender is
    /// used; join the handle after.
    fn hold_connection(
        store: &SqliteStore,
    ) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Sender<()>) {
        let (held, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let conn = store.conn.clone();
        let busy = std::thread::spawn(move || {
            let _conn = conn.lock().unwrap();
            held.0.send(()).unwrap();
            release.1.recv().unwrap();
        });
        held.1.recv().unwrap();
        (busy, release.0)
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
        let store = SqliteStore::open(&path).unwrap();
        let mut conn = Arc::try_unwrap(store.conn)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap();
        assert_eq!(schema_version(&conn).unwrap(), 7);
        let kb = find_kb(&conn, "default", "notes").unwrap().unwrap();
        assert!(kb.ready);
        assert_eq!(count_kb(&conn, &kb.id).unwrap(), (1, 0));
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
        let again = SqliteStore::open(&path).unwrap();
        let conn = again.conn.lock().unwrap();
        assert_eq!(schema_version(&conn).unwrap(), 7);
    }

    #[tokio::test]
    async fn only_a_jobs_own_progress_skips_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("catalog.db")).unwrap();
        // PRAGMA synchronous: 2 is FULL, 1 is NORMAL.
        let level = |store: &SqliteStore| {
            store
                .conn
                .lock()
                .unwrap()
                .pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0))
                .unwrap()
        };
        assert_eq!(level(&store), 2);
        store.set_status("d", Status::Parsing, "").await.unwrap();
        assert_eq!(level(&store), 1);
        // What a caller is answered about is synced again.
        assert!(store.retry_doc("k", "d").await.unwrap().is_none());
        assert_eq!(level(&store), 2);
        assert!(store.claim_job(1000, MAX, None).await.unwrap().is_none());
        assert_eq!(level(&store), 1);
        // A lookup of one row neither writes nor changes the level.
        assert!(store.find_kb("t", "k").await.unwrap().is_none());
        assert_eq!(level(&store), 1);
        assert!(store.list_kbs("t", "", 10).await.unwrap().is_empty());
        assert_eq!(level(&store), 2);
    }

    /// A job's progress is written on the caller's thread while the connection is free, and on
    /// the blocking pool when it is busy; either way the log is checkpointed every
    /// [`CHECKPOINT_EVERY`] writes (SQLite's own checkpoint is off), so it does not grow.
    #[tokio::test]
    async fn progress_runs_inline_when_free_and_the_log_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let store = SqliteStore::open(&path).unwrap();
        let here = std::thread::current().id();
        let on = store
            .call_progress(|_| Ok(std::thread::current().id()))
            .await
            .unwrap();
        assert_eq!(
            on, here,
            "a progress write on a free connection left the thread"
        );

        let (busy, release) = hold_connection(&store);
        let write = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .call_progress(|_| Ok(std::thread::current().id()))
                    .await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !write.is_finished(),
            "the write did not wait for the connection"
        );
        release.send(()).unwrap();
        assert_ne!(write.await.unwrap().unwrap(), here);
        busy.join().unwrap();

        // The log's file keeps the largest size it reached between two checkpoints: after the
        // first CHECKPOINT_EVERY writes (the first checkpoint is due) it holds them all, and
        // eight times as many writes must not make it much larger.
        let write = |i: u32| {
            let store = store.clone();
            async move {
                store
                    .call_progress(move |c| {
                        c.exec(
                            "INSERT INTO source_locks (kb_id, source_id, token, until) VALUES (?1, ?2, 0, 0)",
                            params![format!("k{i}"), "x".repeat(4096)],
                        )?;
                        Ok(())
                    })
                    .await
                    .unwrap()
            }
        };
        let log = || {
            std::fs::metadata(dir.path().join("catalog.db-wal"))
                .unwrap()
                .len()
        };
        let period = CHECKPOINT_EVERY - 2;
        for i in 0..period {
            write(i).await;
        }
        let one_period = log();
        let rows = 8 * CHECKPOINT_EVERY;
        for i in period..rows {
            write(i).await;
        }
        let count: u32 = store
            .lookup(|c| Ok(c.query_row("SELECT COUNT(*) FROM source_locks", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(count, rows, "a write was lost");
        assert!(
            log() < one_period * 2,
            "the log grew from {one_period} to {} bytes: it is not checkpointed",
            log()
        );
    }

    /// A lookup runs on the caller's thread only while the connection is free; while another
    /// operation holds it, the lookup waits for it on the blocking pool and still answers.
    #[tokio::test]
    async fn a_lookup_waits_its_turn_when_the_connection_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("catalog.db")).unwrap();
        let kb = KnowledgeBase {
            id: "k1".into(),
            tenant: "t".into(),
            name: "notes".into(),
            description: String::new(),
            embedding_model: "m".into(),
            dimension: 3,
            create_time: 1,
            document_count: 0,
            ready: false,
            reindex: None,
        };
        store.reserve_kb(&kb).await.unwrap();
        assert!(store.activate_kb("k1", "k1").await.unwrap());
        let (busy, release) = hold_connection(&store);
        let lookup = tokio::spawn({
            let store = store.clone();
            async move { store.kb_by_id("k1").await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !lookup.is_finished(),
            "the lookup did not wait for the connection"
        );
        release.send(()).unwrap();
        let found = lookup.await.unwrap().unwrap().expect("knowledge base");
        assert_eq!((found.id.as_str(), found.name.as_str()), ("k1", "notes"));
        busy.join().unwrap();
        // Free again: answered on this thread.
        assert!(store.doc_by_id("nope").await.unwrap().is_none());
    }
}
