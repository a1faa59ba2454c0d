//! The catalog on MongoDB: what several ingest-svc replicas share. Collections
//! `ingest.knowledge_bases`, `ingest.documents` and `ingest.meta` (the schema version, raised
//! step by step by [`migrate`] like the SQLite file's `user_version`).
//!
//! A document's job lives inside the document (`job`), so every job operation touches one
//! MongoDB document and is atomic without transactions: a claim is a `findOneAndUpdate` fenced
//! by the lease token it read, so two replicas never hold one job. Only the standard driver API
//! is used (no transactions), so a standalone server, a replica set and the SecantusDB the tests
//! run all work. Operations that touch several documents (deleting a knowledge base, publishing
//! a version, starting a reindex) are ordered so that a crash midway leaves a state the next try
//! completes.

use std::collections::{BTreeMap, HashSet};

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document as BsonDoc, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, Database, IndexModel};
use smartdb_kit::mongo::{self, as_i64 as int};

use super::{
    CatalogStore, Document, Inserted, Job, JobKind, KnowledgeBase, Reindex, Release, Reservation,
    Retried, Status, gave_up, now_ms, rand_token,
};
use crate::error::{Error, Result};

/// The newest schema version this release writes.
pub const SCHEMA_VERSION: i64 = 1;

const KBS: &str = "ingest.knowledge_bases";
const DOCS: &str = "ingest.documents";
const META: &str = "ingest.meta";
const LOCKS: &str = "ingest.source_locks";

/// The catalog in one MongoDB database.
#[derive(Clone)]
pub struct MongoStore {
    db: Database,
    kbs: Collection<BsonDoc>,
    docs: Collection<BsonDoc>,
    locks: Collection<BsonDoc>,
}

impl MongoStore {
    /// Connects to `uri` (its database, or `smartdb`) with at most `pool` connections, and
    /// migrates the schema.
    pub async fn open(uri: &str, pool: u32) -> anyhow::Result<Self> {
        Self::open_database(uri, None, pool).await
    }

    /// As [`MongoStore::open`], in database `name` whatever the URI says.
    pub async fn open_database(uri: &str, name: Option<&str>, pool: u32) -> anyhow::Result<Self> {
        let db = mongo::connect(uri, name, "smartdb-ingest", Some(pool)).await?;
        let name = db.name().to_owned();
        migrate(&db)
            .await
            .map_err(|e| anyhow::anyhow!("MongoDB database {name}: {e}"))?;
        Ok(Self {
            kbs: db.collection(KBS),
            docs: db.collection(DOCS),
            locks: db.collection(LOCKS),
            db,
        })
    }

    /// The database it keeps the catalog in (originals go to GridFS there too).
    pub fn database(&self) -> &Database {
        &self.db
    }
}

/// Brings `db` to [`SCHEMA_VERSION`], one version at a time (see [`mongo::migrate`]).
pub async fn migrate(db: &Database) -> anyhow::Result<()> {
    mongo::migrate(&db.collection(META), SCHEMA_VERSION, |version| async move {
        match version {
            1 => {
                let index = |keys: BsonDoc| IndexModel::builder().keys(keys).build();
                let unique = |keys: BsonDoc, partial: Option<BsonDoc>| {
                    IndexModel::builder()
                        .keys(keys)
                        .options(
                            IndexOptions::builder()
                                .unique(true)
                                .partial_filter_expression(partial)
                                .build(),
                        )
                        .build()
                };
                db.collection::<BsonDoc>(KBS)
                    .create_indexes([
                        unique(doc! { "tenant": 1, "name": 1 }, None),
                        unique(doc! { "id": 1 }, None),
                    ])
                    .await?;
                db.collection::<BsonDoc>(DOCS)
                    .create_indexes([
                        index(doc! { "kb_id": 1, "_id": 1 }),
                        // Same bytes twice in a knowledge base: refused by the index, so two
                        // replicas racing on one upload store it once. `live_sha` is the
                        // sha256 while the document is not being deleted.
                        unique(
                            doc! { "kb_id": 1, "live_sha": 1 },
                            Some(doc! { "live_sha": { "$exists": true } }),
                        ),
                        index(doc! { "kb_id": 1, "source_id": 1 }),
                        index(doc! { "job.create_time": 1 }),
                    ])
                    .await?;
            }
            _ => unreachable!("no step for schema version {version}"),
        }
        Ok(())
    })
    .await
}

/// The schema version stored in `db`; 0 for a new database.
pub async fn schema_version(db: &Database) -> anyhow::Result<i64> {
    mongo::schema_version(&db.collection(META)).await
}

impl From<mongodb::error::Error> for Error {
    fn from(e: mongodb::error::Error) -> Self {
        // A catalog that cannot be reached is an outage (jobs wait, uploads are retryable);
        // anything else is ours.
        match e.kind.as_ref() {
            ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::DnsResolve { .. } => {
                Error::Unavailable(format!("the catalog (MongoDB) is unavailable: {e}"))
            }
            _ => Error::Internal(format!("catalog (MongoDB): {e}")),
        }
    }
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000)
}

fn corrupt(what: &str, d: &BsonDoc) -> Error {
    Error::Internal(format!(
        "malformed {what} in the catalog: {:?}",
        d.get("_id").cloned().unwrap_or(Bson::Null)
    ))
}

fn text(d: &BsonDoc, name: &str, what: &str) -> Result<String> {
    d.get_str(name)
        .map(str::to_owned)
        .map_err(|_| corrupt(what, d))
}

fn number(d: &BsonDoc, name: &str, what: &str) -> Result<i64> {
    d.get(name).and_then(int).ok_or_else(|| corrupt(what, d))
}

/// A field that older writers may not have set.
fn number_or_zero(d: &BsonDoc, name: &str) -> i64 {
    d.get(name).and_then(int).unwrap_or(0)
}

fn kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Index => "index",
        JobKind::Delete => "delete",
    }
}

/// A new job, as stored inside its document. `reindex`: 0, or 1/2 as in the SQLite schema.
fn new_job(kind: JobKind, now: i64, trace: &str, reindex: i32) -> BsonDoc {
    doc! {
        "kind": kind_name(kind),
        "lease_token": 0_i64,
        "lease_until": 0_i64,
        "not_before": 0_i64,
        "attempts": 0_i32,
        "outages": 0_i32,
        "create_time": now,
        "trace": trace,
        "reindex": reindex,
    }
}

/// Filter: the document has a job that no live lease holds, at `now`.
fn unleased(now: i64) -> BsonDoc {
    doc! { "job": { "$exists": true }, "job.lease_until": { "$lte": now } }
}

impl MongoStore {
    /// A knowledge base from its row, counted (see [`CatalogStore::count_kb`]) if `counted`.
    async fn kb_from(&self, d: &BsonDoc, counted: bool) -> Result<KnowledgeBase> {
        const WHAT: &str = "knowledge base";
        let start_time = number_or_zero(d, "reindex_start");
        let mut kb = KnowledgeBase {
            tenant: text(d, "tenant", WHAT)?,
            name: text(d, "name", WHAT)?,
            description: text(d, "description", WHAT)?,
            embedding_model: text(d, "embedding_model", WHAT)?,
            dimension: number(d, "dimension", WHAT)? as u32,
            create_time: number(d, "create_time", WHAT)?,
            document_count: 0,
            ready: d.get_str("state").is_ok_and(|s| s == "ready"),
            reindex: (start_time != 0).then(|| Reindex {
                total: number_or_zero(d, "reindex_total") as u64,
                remaining: 0,
                start_time,
            }),
            id: text(d, "id", WHAT)?,
        };
        if counted {
            self.count_kb(&mut kb).await?;
        }
        Ok(kb)
    }

    async fn find_kb_where(&self, filter: BsonDoc, counted: bool) -> Result<Option<KnowledgeBase>> {
        match self.kbs.find_one(filter).await? {
            Some(d) => Ok(Some(self.kb_from(&d, counted).await?)),
            None => Ok(None),
        }
    }

    async fn find_docs(&self, filter: BsonDoc) -> Result<Vec<Document>> {
        let found: Vec<BsonDoc> = self.docs.find(filter).await?.try_collect().await?;
        found.iter().map(doc_from).collect()
    }

    /// Queues a FAILED document again with fresh attempts (keeping a running lease).
    async fn requeue(&self, mut doc: Document) -> Result<Document> {
        let now = now_ms();
        let fields = doc! {
            "status": Status::Queued as i32,
            "error": "",
            "attempts": 0_i32,
            "update_time": now,
        };
        self.upsert_job(&doc.id, JobKind::Index, fields, None)
            .await?;
        doc.status = Status::Queued;
        doc.error.clear();
        doc.attempts = 0;
        doc.update_time = now;
        Ok(doc)
    }

    /// Sets `fields` on a document and gives it a `kind` job: its job (keeping the lease) is
    /// turned into one with fresh attempts, or a new job is added. `unset` is removed too.
    async fn upsert_job(
        &self,
        id: &str,
        kind: JobKind,
        fields: BsonDoc,
        unset: Option<&str>,
    ) -> Result<()> {
        let unset = match unset {
            Some(name) => doc! { name: "" },
            None => doc! {},
        };
        // Two single-document updates, not one: whichever matches does the work, and a job
        // appearing between them (another replica) is caught by the loop.
        for _ in 0..3 {
            let mut existing = fields.clone();
            existing.insert("job.kind", kind_name(kind));
            existing.insert("job.not_before", 0_i64);
            existing.insert("job.attempts", 0_i32);
            existing.insert("job.outages", 0_i32);
            let mut update = doc! { "$set": existing };
            if !unset.is_empty() {
                update.insert("$unset", unset.clone());
            }
            let r = self
                .docs
                .update_one(doc! { "_id": id, "job": { "$exists": true } }, update)
                .await?;
            if r.matched_count == 1 {
                return Ok(());
            }
            let mut fresh = fields.clone();
            fresh.insert("job", new_job(kind, now_ms(), "", 0));
            let mut update = doc! { "$set": fresh };
            if !unset.is_empty() {
                update.insert("$unset", unset.clone());
            }
            let r = self
                .docs
                .update_one(doc! { "_id": id, "job": { "$exists": false } }, update)
                .await?;
            if r.matched_count == 1 {
                return Ok(());
            }
            if self.docs.find_one(doc! { "_id": id }).await?.is_none() {
                return Ok(());
            }
        }
        Err(Error::Internal(format!(
            "document {id}: its job kept changing while it was updated"
        )))
    }
}

fn doc_from(d: &BsonDoc) -> Result<Document> {
    const WHAT: &str = "document";
    let metadata = match d.get_array("metadata") {
        Ok(pairs) => pairs
            .iter()
            .filter_map(|pair| {
                let pair = pair.as_document()?;
                Some((
                    pair.get_str("k").ok()?.to_owned(),
                    pair.get_str("v").ok()?.to_owned(),
                ))
            })
            .collect(),
        Err(_) => BTreeMap::new(),
    };
    Ok(Document {
        id: text(d, "_id", WHAT)?,
        kb_id: text(d, "kb_id", WHAT)?,
        title: text(d, "title", WHAT)?,
        source_name: text(d, "source_name", WHAT)?,
        content_type: text(d, "content_type", WHAT)?,
        size_bytes: number(d, "size_bytes", WHAT)? as u64,
        sha256: text(d, "sha256", WHAT)?,
        status: Status::from_i32(number(d, "status", WHAT)? as i32),
        error: d.get_str("error").unwrap_or_default().to_owned(),
        chunk_count: number_or_zero(d, "chunk_count") as u32,
        max_chunk_count: number_or_zero(d, "max_chunk_count") as u32,
        metadata,
        attempts: number_or_zero(d, "attempts") as u32,
        create_time: number(d, "create_time", WHAT)?,
        update_time: number(d, "update_time", WHAT)?,
        source_id: d.get_str("source_id").unwrap_or_default().to_owned(),
    })
}

fn doc_to(doc: &Document, trace: &str) -> BsonDoc {
    // Pairs, not a sub-document: user keys may hold what MongoDB field names cannot (`$`
    // prefixes, NUL, dots some tools mishandle).
    let metadata: Vec<Bson> = doc
        .metadata
        .iter()
        .map(|(k, v)| Bson::Document(doc! { "k": k, "v": v }))
        .collect();
    let mut d = doc! {
        "_id": &doc.id,
        "kb_id": &doc.kb_id,
        "title": &doc.title,
        "source_name": &doc.source_name,
        "content_type": &doc.content_type,
        "size_bytes": doc.size_bytes as i64,
        "sha256": &doc.sha256,
        "status": doc.status as i32,
        "error": &doc.error,
        "chunk_count": i64::from(doc.chunk_count),
        "max_chunk_count": i64::from(doc.max_chunk_count),
        "metadata": metadata,
        "attempts": i64::from(doc.attempts),
        "create_time": doc.create_time,
        "update_time": doc.update_time,
        "source_id": &doc.source_id,
        "job": new_job(JobKind::Index, doc.create_time, trace, 0),
    };
    if doc.status != Status::Deleting {
        d.insert("live_sha", &doc.sha256);
    }
    d
}

#[tonic::async_trait]
impl CatalogStore for MongoStore {
    async fn reserve_kb(&self, kb: &KnowledgeBase) -> Result<Reservation> {
        let filter = doc! { "tenant": &kb.tenant, "name": &kb.name };
        // Twice: a reservation racing ours wins the unique index, then we see it.
        for _ in 0..2 {
            if let Some(existing) = self.find_kb_where(filter.clone(), false).await? {
                return Ok(if existing.ready {
                    Reservation::Taken
                } else {
                    Reservation::Unfinished(existing)
                });
            }
            let row = doc! {
                "id": &kb.id,
                "tenant": &kb.tenant,
                "name": &kb.name,
                "description": &kb.description,
                "embedding_model": &kb.embedding_model,
                "dimension": i64::from(kb.dimension),
                "create_time": kb.create_time,
                "state": "creating",
                "reindex_total": 0_i64,
                "reindex_start": 0_i64,
            };
            match self.kbs.insert_one(row).await {
                Ok(_) => return Ok(Reservation::New),
                Err(e) if is_duplicate(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Reservation::Taken)
    }

    async fn activate_kb(&self, reserved_id: &str, collection_id: &str) -> Result<bool> {
        let r = self
            .kbs
            .update_one(
                doc! { "id": reserved_id, "state": "creating" },
                doc! { "$set": { "id": collection_id, "state": "ready" } },
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    async fn drop_reservation(&self, reserved_id: &str) -> Result<()> {
        self.kbs
            .delete_one(doc! { "id": reserved_id, "state": "creating" })
            .await?;
        Ok(())
    }

    async fn find_kb(&self, tenant: &str, name: &str) -> Result<Option<KnowledgeBase>> {
        self.find_kb_where(
            doc! { "tenant": tenant, "name": name, "state": "ready" },
            false,
        )
        .await
    }

    async fn kb_by_id(&self, id: &str) -> Result<Option<KnowledgeBase>> {
        self.find_kb_where(doc! { "id": id }, false).await
    }

    async fn count_kb(&self, kb: &mut KnowledgeBase) -> Result<()> {
        kb.document_count = self.docs.count_documents(doc! { "kb_id": &kb.id }).await?;
        if let Some(reindex) = &mut kb.reindex {
            reindex.remaining = self
                .docs
                .count_documents(doc! { "kb_id": &kb.id, "job.reindex": { "$gt": 0 } })
                .await?;
        }
        Ok(())
    }

    async fn list_kbs(
        &self,
        tenant: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KnowledgeBase>> {
        let rows: Vec<BsonDoc> = self
            .kbs
            .find(doc! { "tenant": tenant, "name": { "$gt": after }, "state": "ready" })
            .sort(doc! { "name": 1 })
            .limit(limit as i64)
            .await?
            .try_collect()
            .await?;
        let mut kbs = Vec::with_capacity(rows.len());
        for row in &rows {
            kbs.push(self.kb_from(row, true).await?);
        }
        Ok(kbs)
    }

    async fn delete_kb(&self, id: &str) -> Result<Vec<String>> {
        // Documents first, then the knowledge base: a crash in between leaves the knowledge
        // base (so the delete can be asked again) with fewer documents.
        let ids: Vec<String> = self
            .docs
            .find(doc! { "kb_id": id })
            .projection(doc! { "_id": 1 })
            .await?
            .try_collect::<Vec<BsonDoc>>()
            .await?
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect();
        self.docs.delete_many(doc! { "kb_id": id }).await?;
        self.locks.delete_many(doc! { "kb_id": id }).await?;
        self.kbs.delete_one(doc! { "id": id }).await?;
        Ok(ids)
    }

    async fn start_reindex(&self, kb_id: &str) -> Result<Option<KnowledgeBase>> {
        let Some(kb) = self.find_kb_where(doc! { "id": kb_id }, true).await? else {
            return Ok(None);
        };
        if kb.reindex.is_some_and(|r| r.remaining > 0) {
            return Ok(Some(kb));
        }
        let now = now_ms();
        // Marked jobs first, then the total: a crash in between leaves marked jobs that run
        // anyway; the next start sees them running and keeps the old total.
        let mut total = 0;
        for (status, mark) in [(Status::Indexed, 1), (Status::Failed, 2)] {
            let mut set = doc! { "job": new_job(JobKind::Index, now, "", mark) };
            if status == Status::Failed {
                set.insert("status", Status::Queued as i32);
                set.insert("error", "");
                set.insert("attempts", 0_i32);
                set.insert("update_time", now);
            }
            total += self
                .docs
                .update_many(
                    doc! { "kb_id": kb_id, "status": status as i32, "job": { "$exists": false } },
                    doc! { "$set": set },
                )
                .await?
                .modified_count;
        }
        self.kbs
            .update_one(
                doc! { "id": kb_id },
                doc! { "$set": { "reindex_total": total as i64, "reindex_start": now } },
            )
            .await?;
        self.find_kb_where(doc! { "id": kb_id }, true).await
    }

    async fn get_doc(&self, kb_id: &str, id: &str) -> Result<Option<Document>> {
        match self
            .docs
            .find_one(doc! { "_id": id, "kb_id": kb_id })
            .await?
        {
            Some(d) => doc_from(&d).map(Some),
            None => Ok(None),
        }
    }

    async fn doc_by_id(&self, id: &str) -> Result<Option<Document>> {
        match self.docs.find_one(doc! { "_id": id }).await? {
            Some(d) => doc_from(&d).map(Some),
            None => Ok(None),
        }
    }

    async fn list_docs(&self, kb_id: &str, after: &str, limit: usize) -> Result<Vec<Document>> {
        let rows: Vec<BsonDoc> = self
            .docs
            .find(doc! { "kb_id": kb_id, "_id": { "$gt": after } })
            .sort(doc! { "_id": 1 })
            .limit(limit as i64)
            .await?
            .try_collect()
            .await?;
        rows.iter().map(doc_from).collect()
    }

    async fn existing_docs(&self, ids: &[String]) -> Result<HashSet<String>> {
        let mut found = HashSet::new();
        // Bounded batches keep each query well under the 16 MiB command limit.
        for batch in ids.chunks(1000) {
            let rows: Vec<BsonDoc> = self
                .docs
                .find(doc! { "_id": { "$in": batch } })
                .projection(doc! { "_id": 1 })
                .await?
                .try_collect()
                .await?;
            found.extend(
                rows.iter()
                    .filter_map(|d| d.get_str("_id").ok().map(str::to_owned)),
            );
        }
        Ok(found)
    }

    async fn insert_doc(&self, doc: &Document, trace: &str) -> Result<Inserted> {
        let same = doc! { "kb_id": &doc.kb_id, "live_sha": &doc.sha256 };
        // Twice: an upload of the same bytes racing ours wins the unique index, then we see it.
        for _ in 0..2 {
            if let Some(existing) = self.docs.find_one(same.clone()).await? {
                let existing = doc_from(&existing)?;
                if existing.status == Status::Failed {
                    return Ok(Inserted::New(self.requeue(existing).await?));
                }
                return Ok(Inserted::Existing(existing));
            }
            match self.docs.insert_one(doc_to(doc, trace)).await {
                Ok(_) => return Ok(Inserted::New(doc.clone())),
                Err(e) if is_duplicate(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Unavailable(format!(
            "document {}: the same bytes are being stored by another request; try again",
            doc.id
        )))
    }

    async fn retry_doc(&self, kb_id: &str, id: &str) -> Result<Option<Retried>> {
        let Some(doc) = self.get_doc(kb_id, id).await? else {
            return Ok(None);
        };
        if doc.status != Status::Failed {
            return Ok(Some(Retried::NotFailed(doc)));
        }
        Ok(Some(Retried::Queued(self.requeue(doc).await?)))
    }

    async fn set_status(&self, id: &str, status: Status, error: &str) -> Result<bool> {
        let error = smartdb_kit::limits::truncate(error, smartdb_kit::limits::ERROR_BYTES);
        let r = self
            .docs
            .update_one(
                doc! { "_id": id, "status": { "$ne": Status::Deleting as i32 } },
                doc! { "$set": {
                    "status": status as i32, "error": error, "update_time": now_ms(),
                } },
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    async fn set_chunk_count(&self, id: &str, chunks: u32, status: Status) -> Result<bool> {
        let r = self
            .docs
            .update_one(
                doc! { "_id": id, "status": { "$ne": Status::Deleting as i32 } },
                doc! {
                    "$set": {
                        "chunk_count": i64::from(chunks),
                        "status": status as i32,
                        "update_time": now_ms(),
                    },
                    "$max": { "max_chunk_count": i64::from(chunks) },
                },
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    async fn mark_deleting(&self, id: &str) -> Result<()> {
        let fields = doc! { "status": Status::Deleting as i32, "update_time": now_ms() };
        self.upsert_job(id, JobKind::Delete, fields, Some("live_sha"))
            .await
    }

    async fn other_versions(&self, doc: &Document) -> Result<Vec<Document>> {
        if doc.source_id.is_empty() {
            return Ok(Vec::new());
        }
        self.find_docs(doc! {
            "kb_id": &doc.kb_id,
            "source_id": &doc.source_id,
            "_id": { "$ne": &doc.id },
            "status": { "$ne": Status::Deleting as i32 },
        })
        .await
    }

    async fn publish_version(&self, id: &str, replaced: &[String]) -> Result<bool> {
        // The new version first: a crash before the old ones are marked leaves its job
        // unfinished, and the rerun marks them (publishing again is harmless).
        let r = self
            .docs
            .update_one(
                doc! { "_id": id, "status": { "$ne": Status::Deleting as i32 } },
                doc! { "$set": {
                    "status": Status::Indexed as i32, "error": "", "update_time": now_ms(),
                } },
            )
            .await?;
        if r.matched_count == 0 {
            return Ok(false);
        }
        for old in replaced {
            self.mark_deleting(old).await?;
        }
        Ok(true)
    }

    async fn remove_doc(&self, id: &str) -> Result<()> {
        self.docs.delete_one(doc! { "_id": id }).await?;
        Ok(())
    }

    async fn lock_source(&self, kb_id: &str, source_id: &str, ttl_ms: i64) -> Result<Option<i64>> {
        let (token, now) = (rand_token(), now_ms());
        // Matches a free (expired) lock, or inserts one if there is none; a held lock does not
        // match, so the upsert's insert collides with it on `_id`: someone else has it.
        let taken = self
            .locks
            .update_one(
                doc! {
                    "_id": { "kb_id": kb_id, "source_id": source_id },
                    "until": { "$lte": now },
                },
                doc! { "$set": { "token": token, "until": now + ttl_ms, "kb_id": kb_id } },
            )
            .upsert(true)
            .await;
        match taken {
            Ok(_) => Ok(Some(token)),
            Err(e) if is_duplicate(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn unlock_source(&self, kb_id: &str, source_id: &str, token: i64) -> Result<()> {
        self.locks
            .delete_one(doc! {
                "_id": { "kb_id": kb_id, "source_id": source_id },
                "token": token,
            })
            .await?;
        Ok(())
    }

    async fn backlog(&self) -> Result<(u64, Option<i64>)> {
        let waiting = unleased(now_ms());
        let count = self.docs.count_documents(waiting.clone()).await?;
        let oldest = self
            .docs
            .find_one(waiting)
            .sort(doc! { "job.create_time": 1 })
            .projection(doc! { "job.create_time": 1 })
            .await?
            .and_then(|d| {
                d.get_document("job")
                    .ok()
                    .and_then(|j| j.get("create_time").and_then(int))
            });
        Ok((count, oldest))
    }

    async fn claim_job(
        &self,
        lease_ms: i64,
        max_attempts: u32,
        only_document: Option<&str>,
    ) -> Result<Option<Job>> {
        loop {
            let now = now_ms();
            let mut filter = unleased(now);
            match only_document {
                Some(id) => {
                    filter.insert("_id", id);
                }
                None => {
                    filter.insert("job.not_before", doc! { "$lte": now });
                }
            }
            let Some(candidate) = self
                .docs
                .find_one(filter)
                .sort(doc! { "job.create_time": 1 })
                .await?
            else {
                return Ok(None);
            };
            let id = text(&candidate, "_id", "document")?;
            let job = candidate
                .get_document("job")
                .map_err(|_| corrupt("job", &candidate))?;
            let kind = job.get_str("kind").unwrap_or("index");
            let token = number_or_zero(job, "lease_token");
            let attempts = number_or_zero(job, "attempts") as u32;
            // Fenced: the update applies only if nobody claimed (or changed) the job since we
            // read it; otherwise look again.
            let fence = doc! {
                "_id": &id,
                "job.lease_token": token,
                "job.attempts": i64::from(attempts),
                "job.kind": kind,
                "job.lease_until": { "$lte": now },
            };
            if kind == "index" && attempts >= max_attempts && only_document.is_none() {
                let step = Status::from_i32(number_or_zero(&candidate, "status") as i32);
                let reason = gave_up(attempts, step);
                let mut give_up = fence.clone();
                give_up.insert("status", doc! { "$ne": Status::Deleting as i32 });
                let r = self
                    .docs
                    .update_one(
                        give_up,
                        doc! {
                            "$set": {
                                "status": Status::Failed as i32,
                                "error": &reason,
                                "update_time": now,
                            },
                            "$unset": { "job": "" },
                        },
                    )
                    .await?;
                if r.matched_count == 1 {
                    tracing::error!(document = %id, %reason, "indexing job given up");
                }
                continue;
            }
            let new_token = rand_token();
            let mut inc = doc! { "job.attempts": 1 };
            if kind == "index" {
                inc.insert("attempts", 1);
            }
            let claimed = self
                .docs
                .find_one_and_update(
                    fence,
                    doc! {
                        "$set": { "job.lease_token": new_token, "job.lease_until": now + lease_ms },
                        "$inc": inc,
                    },
                )
                .return_document(ReturnDocument::After)
                .await?;
            let Some(claimed) = claimed else {
                continue;
            };
            let job = claimed
                .get_document("job")
                .map_err(|_| corrupt("job", &claimed))?;
            return Ok(Some(Job {
                document_id: id,
                kind: if kind == "delete" {
                    JobKind::Delete
                } else {
                    JobKind::Index
                },
                lease_token: new_token,
                attempts: number_or_zero(job, "attempts") as u32,
                outages: number_or_zero(job, "outages") as u32,
                trace: job.get_str("trace").unwrap_or_default().to_owned(),
                quiet: kind == "index" && number_or_zero(job, "reindex") == 1,
            }));
        }
    }

    async fn renew_lease(&self, job: &Job, lease_ms: i64) -> Result<bool> {
        let r = self
            .docs
            .update_one(
                doc! { "_id": &job.document_id, "job.lease_token": job.lease_token },
                doc! { "$set": { "job.lease_until": now_ms() + lease_ms } },
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    async fn complete_job(&self, job: &Job) -> Result<()> {
        let r = self
            .docs
            .update_one(
                doc! {
                    "_id": &job.document_id,
                    "job.lease_token": job.lease_token,
                    "job.kind": kind_name(job.kind),
                },
                doc! { "$unset": { "job": "" } },
            )
            .await?;
        if r.matched_count == 0 {
            self.release_job(job, 0, Release::Keep).await?;
        }
        Ok(())
    }

    async fn release_job(&self, job: &Job, delay_ms: i64, release: Release) -> Result<()> {
        let held = doc! { "_id": &job.document_id, "job.lease_token": job.lease_token };
        let set = doc! { "job.lease_until": 0_i64, "job.not_before": now_ms() + delay_ms };
        if let Release::GiveBack { outage } = release {
            // The attempt is refunded unless none is left to refund (a delete that replaced
            // the job meanwhile starts from zero), as `MAX(attempts - 1, 0)` does in SQLite.
            let mut inc = doc! { "job.attempts": -1, "job.outages": i32::from(outage) };
            if job.kind == JobKind::Index {
                inc.insert("attempts", -1);
            }
            let mut refundable = held.clone();
            refundable.insert("job.attempts", doc! { "$gte": 1 });
            let r = self
                .docs
                .update_one(refundable, doc! { "$set": set.clone(), "$inc": inc })
                .await?;
            if r.matched_count == 1 {
                return Ok(());
            }
        }
        self.docs.update_one(held, doc! { "$set": set }).await?;
        Ok(())
    }

    async fn next_job_in(&self) -> Result<Option<i64>> {
        // Per job, runnable at the later of "lease runs out" and "backoff ends". Two indexed
        // lookups find the soonest among jobs past one of the two; a job ahead on both can be
        // missed while others exist, which only makes the wait longer than needed, and workers
        // look again within a second whatever this says.
        let now = now_ms();
        let mut soonest: Option<i64> = None;
        for field in ["job.lease_until", "job.not_before"] {
            let other = if field == "job.lease_until" {
                "job.not_before"
            } else {
                "job.lease_until"
            };
            let found = self
                .docs
                .find_one(doc! { "job": { "$exists": true }, other: { "$lte": now } })
                .sort(doc! { field: 1 })
                .projection(doc! { "job": 1 })
                .await?;
            if let Some(d) = found {
                let job = d.get_document("job").map_err(|_| corrupt("job", &d))?;
                let at = number_or_zero(job, "lease_until").max(number_or_zero(job, "not_before"));
                soonest = Some(soonest.map_or(at, |s| s.min(at)));
            }
        }
        if soonest.is_none() {
            // Every job is both leased and backing off into the future: rare; scan them.
            let rows: Vec<BsonDoc> = self
                .docs
                .find(doc! { "job": { "$exists": true } })
                .projection(doc! { "job": 1 })
                .limit(1000)
                .await?
                .try_collect()
                .await?;
            soonest = rows
                .iter()
                .filter_map(|d| d.get_document("job").ok())
                .map(|j| number_or_zero(j, "lease_until").max(number_or_zero(j, "not_before")))
                .min();
        }
        Ok(soonest.map(|t| (t - now).max(0)))
    }
}
