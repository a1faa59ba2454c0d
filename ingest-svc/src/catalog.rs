//! The catalog's operations as users see them: knowledge bases and documents, validated, with
//! the index kept in step through search-svc.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use smartdb_kit::context::CallContext;
use smartdb_kit::limits::{self, Limits};
use smartdb_proto::v1 as pb;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::blobs::{BlobStore, BlobWriter};
use crate::downstream::Downstream;
use crate::error::{Error, Result};
use crate::extract::{self, ContentType};
use crate::store::{
    self, CatalogStore, Document, Inserted, KnowledgeBase, Reservation, Retried, Status,
};
use crate::worker::{self, JobSettings};

/// How a document arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// As text (`IngestText`): it is text by definition; only its format is chosen.
    Text,
    /// As a file (`UploadDocument`): its type is sniffed from the bytes.
    File,
}

impl Arrival {
    /// Prefix of the request fields that describe the document (`header.` for uploads).
    fn field(self, name: &str) -> String {
        match self {
            Arrival::Text => name.to_owned(),
            Arrival::File => format!("header.{name}"),
        }
    }
}

/// What a caller says about a new document, before its bytes.
#[derive(Debug, Clone)]
pub struct NewDocument {
    /// Knowledge base name.
    pub knowledge_base: String,
    /// Title, may be empty.
    pub title: String,
    /// File name, may be empty.
    pub source_name: String,
    /// Source whose older versions this one replaces, may be empty.
    pub source_id: String,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// The caller's word on plain text vs Markdown.
    pub format: Option<ContentType>,
    /// How it arrives.
    pub arrival: Arrival,
}

/// An upload in progress: checked, holding one of the bounded upload slots, its bytes streaming
/// to a temp file. Dropped before [`Catalog::finish_upload`], nothing is stored.
pub struct Upload {
    kb: KnowledgeBase,
    new: NewDocument,
    writer: BlobWriter,
    max_bytes: usize,
    _slot: OwnedSemaphorePermit,
}

impl Upload {
    /// Appends the next piece of the document's bytes.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let total = self.writer.size() as usize + bytes.len();
        if total > self.max_bytes {
            return Err(Error::ResourceExhausted {
                message: format!(
                    "document is larger than the limit of {} bytes (max-document-mb)",
                    self.max_bytes
                ),
                retry_after: None,
            });
        }
        self.writer.write(bytes).await
    }
}

/// The catalog: every operation on knowledge bases and documents.
pub struct Catalog {
    pub(crate) store: Arc<dyn CatalogStore>,
    pub(crate) blobs: BlobStore,
    pub(crate) downstream: Arc<Downstream>,
    /// Wakes the workers when a job is added.
    pub(crate) jobs_added: Arc<Notify>,
    pub(crate) jobs: JobSettings,
    limits: Arc<Limits>,
    uploads: Arc<Semaphore>,
}

impl Catalog {
    /// A catalog over its store, originals and downstream services.
    pub fn new(
        store: Arc<dyn CatalogStore>,
        blobs: BlobStore,
        downstream: Arc<Downstream>,
        limits: Limits,
        jobs: JobSettings,
    ) -> Self {
        Self {
            store,
            blobs,
            downstream,
            jobs_added: Arc::new(Notify::new()),
            jobs,
            uploads: Arc::new(Semaphore::new(limits.concurrent_uploads.max(1))),
            limits: Arc::new(limits),
        }
    }

    /// Limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks that the catalog answers and originals can be written (readiness).
    /// (Also reports the job backlog: `ingest_jobs_waiting` and `ingest_job_backlog_age_seconds`,
    /// the age of the oldest job no worker holds, 0 when none waits.)
    pub async fn check_stores(&self) -> Result<()> {
        let (waiting, oldest) = self.store.backlog().await?;
        let age = oldest.map_or(0.0, |t| (store::now_ms() - t).max(0) as f64 / 1000.0);
        metrics::gauge!("ingest_jobs_waiting").set(waiting as f64);
        metrics::gauge!("ingest_job_backlog_age_seconds").set(age);
        let mut probe = self.blobs.writer().await?;
        probe.write(b"readiness probe").await?;
        Ok(())
    }

    // ---- knowledge bases ----

    /// Creates a knowledge base and its collection in the index.
    ///
    /// The name is reserved in the catalog first, then the collection is made, then the
    /// knowledge base turns ready. A create interrupted in between (crash, timeout) is finished
    /// by the next create of the same name, and an orphaned collection left by one is reused, so
    /// no name is ever blocked; a create whose knowledge base is ready answers ALREADY_EXISTS.
    pub async fn create_kb(
        &self,
        ctx: &CallContext,
        name: &str,
        description: &str,
        model: &str,
    ) -> Result<KnowledgeBase> {
        validate_kb_name("name", name)?;
        limits::check_len(description, self.limits.description_bytes)
            .map_err(|m| Error::invalid("description", m))?;
        limits::check_len(model, limits::ID_BYTES)
            .map_err(|m| Error::invalid("embedding_model", m))?;
        let info = self.downstream.model_info(ctx, model).await?;
        let fresh = KnowledgeBase {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: ctx.tenant.clone(),
            name: name.to_owned(),
            description: description.to_owned(),
            embedding_model: info.id.clone(),
            dimension: info.dimension,
            create_time: store::now_ms(),
            document_count: 0,
            ready: false,
            reindex: None,
        };
        let mut kb = match self.store.reserve_kb(&fresh).await? {
            Reservation::New => fresh,
            Reservation::Unfinished(earlier) => {
                tracing::info!(kb = %name, id = %earlier.id, "finishing an interrupted create");
                earlier
            }
            Reservation::Taken => {
                return Err(Error::AlreadyExists(format!(
                    "knowledge base {name:?} already exists"
                )));
            }
        };
        let created = self
            .downstream
            .create_collection(
                ctx,
                pb::CreateCollectionRequest {
                    knowledge_base_id: kb.id.clone(),
                    knowledge_base: kb.name.clone(),
                    dimension: kb.dimension,
                    embedding_model: kb.embedding_model.clone(),
                },
            )
            .await;
        let collection_id = match created {
            Ok(id) => id,
            Err(err) => {
                if !err.is_transient() {
                    // Will never work as asked: free the name again.
                    let _ = self.store.drop_reservation(&kb.id).await;
                }
                return Err(err);
            }
        };
        if !self.store.activate_kb(&kb.id, &collection_id).await? {
            // A concurrent create of the same name finished it first.
            return Err(Error::AlreadyExists(format!(
                "knowledge base {name:?} already exists"
            )));
        }
        kb.id = collection_id;
        kb.ready = true;
        tracing::info!(kb = %kb.name, id = %kb.id, tenant = %kb.tenant, "knowledge base created");
        Ok(kb)
    }

    /// Finds a knowledge base of the caller's tenant by name.
    pub async fn get_kb(
        &self,
        ctx: &CallContext,
        field: &str,
        name: &str,
    ) -> Result<KnowledgeBase> {
        if name.trim().is_empty() {
            return Err(Error::invalid(field, "is required"));
        }
        if name.len() > limits::KB_NAME_BYTES {
            return Err(Error::invalid(
                field,
                format!("{} bytes, at most {}", name.len(), limits::KB_NAME_BYTES),
            ));
        }
        self.store
            .find_kb(&ctx.tenant, name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("knowledge base {name:?} not found")))
    }

    /// Like [`Catalog::get_kb`], with the knowledge base's counts (documents, reindex progress).
    pub async fn describe_kb(&self, ctx: &CallContext, name: &str) -> Result<KnowledgeBase> {
        let mut kb = self.get_kb(ctx, "name", name).await?;
        self.store.count_kb(&mut kb).await?;
        Ok(kb)
    }

    /// One page of the tenant's knowledge bases; the token is the last name of the page.
    pub async fn list_kbs(
        &self,
        ctx: &CallContext,
        page_size: u32,
        token: &str,
    ) -> Result<(Vec<KnowledgeBase>, String)> {
        let limit = self.page_limit(page_size, token)?;
        let mut page = self.store.list_kbs(&ctx.tenant, token, limit + 1).await?;
        let next = next_token(
            &mut page,
            limit,
            self.limits.list_page_bytes(),
            kb_size,
            |kb| kb.name.clone(),
        );
        Ok((page, next))
    }

    /// Deletes a knowledge base, its collection, its documents and their originals.
    pub async fn delete_kb(&self, ctx: &CallContext, name: &str) -> Result<u64> {
        let kb = self.get_kb(ctx, "name", name).await?;
        // Index first: if it fails, nothing changed and the caller can retry.
        self.downstream.delete_collection(ctx, &kb.id).await?;
        let removed = self.store.delete_kb(&kb.id).await?;
        for doc in &removed {
            // A file left behind here is collected by the sweep.
            if let Err(err) = self.blobs.remove(doc).await {
                tracing::warn!(document = %doc, error = %err, "could not remove original");
            }
        }
        tracing::info!(kb = %kb.name, documents = removed.len(), "knowledge base deleted");
        Ok(removed.len() as u64)
    }

    /// Starts rebuilding a knowledge base's chunks and vectors from its originals (see
    /// [`store::start_reindex`]), after making sure its collection exists (an index that was
    /// lost is created again, empty, and refilled by the reindex).
    pub async fn reindex_kb(&self, ctx: &CallContext, name: &str) -> Result<KnowledgeBase> {
        let kb = self.get_kb(ctx, "name", name).await?;
        let info = self.downstream.model_info(ctx, &kb.embedding_model).await?;
        if info.dimension != kb.dimension {
            return Err(Error::FailedPrecondition(format!(
                "model {:?} now makes vectors of {} dimensions, but knowledge base {name:?} holds {}: \
                 a change of dimension needs a new knowledge base",
                kb.embedding_model, info.dimension, kb.dimension
            )));
        }
        let collection = self
            .downstream
            .create_collection(
                ctx,
                pb::CreateCollectionRequest {
                    knowledge_base_id: kb.id.clone(),
                    knowledge_base: kb.name.clone(),
                    dimension: kb.dimension,
                    embedding_model: kb.embedding_model.clone(),
                },
            )
            .await?;
        if collection != kb.id {
            return Err(Error::Internal(format!(
                "the index serves knowledge base {name:?} from collection {collection}, not {}",
                kb.id
            )));
        }
        let kb = self
            .store
            .start_reindex(&kb.id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("knowledge base {name:?} not found")))?;
        if let Some(progress) = kb.reindex {
            tracing::info!(kb = %kb.name, documents = progress.total, remaining = progress.remaining, "reindex running");
        }
        self.jobs_added.notify_waiters();
        Ok(kb)
    }

    // ---- documents ----

    /// Checks a new document's description and takes one of the bounded upload slots; its bytes
    /// then stream through the returned [`Upload`].
    pub async fn begin_upload(&self, ctx: &CallContext, new: NewDocument) -> Result<Upload> {
        let kb = self
            .get_kb(
                ctx,
                &new.arrival.field("knowledge_base"),
                &new.knowledge_base,
            )
            .await?;
        let field = |name| new.arrival.field(name);
        limits::check_len(&new.title, self.limits.title_bytes)
            .map_err(|m| Error::invalid(field("title"), m))?;
        limits::check_len(&new.source_name, self.limits.source_name_bytes)
            .map_err(|m| Error::invalid(field("source_name"), m))?;
        // A source id names a source; one that is only spaces would name nothing visibly.
        if !new.source_id.is_empty() && new.source_id.trim().is_empty() {
            return Err(Error::invalid(
                field("source_id"),
                "must not be only whitespace (leave it empty for none)",
            ));
        }
        limits::check_len(&new.source_id, self.limits.source_name_bytes)
            .map_err(|m| Error::invalid(field("source_id"), m))?;
        self.limits
            .check_metadata(new.metadata.iter())
            .map_err(|(f, m)| Error::invalid(new.arrival.field(&f), m))?;
        let slot = self.uploads.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted {
                message: format!(
                    "too many uploads in progress (limit-concurrent-uploads = {}); retry shortly",
                    self.limits.concurrent_uploads
                ),
                retry_after: Some(Duration::from_secs(1)),
            }
        })?;
        let writer = self.blobs.writer().await?;
        Ok(Upload {
            kb,
            new,
            writer,
            max_bytes: self.limits.document_bytes(),
            _slot: slot,
        })
    }

    /// Stores an upload durably and queues it for indexing; returns the document and whether
    /// the same bytes were already there.
    pub async fn finish_upload(&self, upload: Upload) -> Result<(Document, bool)> {
        let Upload {
            kb,
            new,
            mut writer,
            ..
        } = upload;
        let written = writer.finish().await?;
        let content_type = match new.arrival {
            Arrival::File => extract::sniff(&written, &new.source_name, new.format)?,
            Arrival::Text => new.format.unwrap_or_else(|| {
                let prefix = String::from_utf8_lossy(&written.prefix);
                if extract::looks_like_html(&prefix) {
                    ContentType::Html
                } else if extract::looks_like_markdown(&prefix) {
                    ContentType::Markdown
                } else {
                    ContentType::Plain
                }
            }),
        };
        // A damaged or oversized PDF or DOCX is refused now, not failed later; and the title
        // the document carries is read.
        let (carried_title, writer) = {
            let (prefix, limits) = (written.prefix.clone(), self.limits.clone());
            tokio::task::spawn_blocking(move || {
                let title = extract::inspect(content_type, || writer.read_back(), &prefix, &limits);
                (title, writer)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
        };
        let carried_title = carried_title?;
        let title = if !new.title.trim().is_empty() {
            new.title.trim().to_owned()
        } else if let Some(title) = carried_title {
            cut(&title, self.limits.title_bytes)
        } else if !new.source_name.is_empty() {
            new.source_name.clone()
        } else if content_type.is_text() {
            extract::title_from_text(&String::from_utf8_lossy(&written.prefix))
        } else {
            String::new()
        };
        let now = store::now_ms();
        let doc = Document {
            id: uuid::Uuid::now_v7().to_string(),
            kb_id: kb.id.clone(),
            title,
            source_name: new.source_name,
            content_type: content_type.as_str().to_owned(),
            size_bytes: written.size,
            sha256: written.sha256,
            status: Status::Queued,
            error: String::new(),
            chunk_count: 0,
            max_chunk_count: 0,
            metadata: new.metadata,
            attempts: 0,
            create_time: now,
            update_time: now,
            source_id: new.source_id,
        };
        // The original is in place before the row that points at it is committed.
        writer.commit(&doc.id).await?;
        // The job continues this call's trace when it runs.
        let trace = smartdb_kit::telemetry::save_trace();
        let inserted = self.store.insert_doc(&doc, &trace).await;
        match inserted {
            Ok(Inserted::New(stored)) => {
                if stored.id != doc.id {
                    // A failed duplicate was queued again; it keeps its own original.
                    let _ = self.blobs.remove(&doc.id).await;
                }
                self.jobs_added.notify_waiters();
                tracing::info!(document = %stored.id, kb = %kb.name, bytes = stored.size_bytes, "document accepted");
                Ok((stored, false))
            }
            Ok(Inserted::Existing(existing)) => {
                let _ = self.blobs.remove(&doc.id).await;
                Ok((existing, true))
            }
            Err(err) => {
                let _ = self.blobs.remove(&doc.id).await;
                Err(err)
            }
        }
    }

    /// Waits until a document's indexing finishes or the caller's deadline is near, and returns
    /// it as it then is.
    pub async fn wait_indexed(&self, ctx: &CallContext, document: Document) -> Result<Document> {
        let mut doc = document;
        let budget = ctx
            .remaining(self.limits.upload_deadline)
            .saturating_sub(Duration::from_millis(250));
        let until = tokio::time::Instant::now() + budget;
        while !doc.status.is_terminal() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            match self.store.doc_by_id(&doc.id).await? {
                Some(d) => doc = d,
                None => return Err(Error::NotFound(format!("document {} was deleted", doc.id))),
            }
        }
        Ok(doc)
    }

    /// One document of a knowledge base.
    pub async fn get_document(
        &self,
        ctx: &CallContext,
        kb_name: &str,
        id: &str,
    ) -> Result<(KnowledgeBase, Document)> {
        let kb = self.get_kb(ctx, "knowledge_base", kb_name).await?;
        if id.trim().is_empty() {
            return Err(Error::invalid("document_id", "is required"));
        }
        limits::check_len(id, limits::ID_BYTES).map_err(|m| Error::invalid("document_id", m))?;
        let doc = self.store.get_doc(&kb.id, id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "document {id:?} not found in knowledge base {kb_name:?}"
            ))
        })?;
        Ok((kb, doc))
    }

    /// One page of a knowledge base's documents, oldest first.
    pub async fn list_documents(
        &self,
        ctx: &CallContext,
        kb_name: &str,
        page_size: u32,
        token: &str,
    ) -> Result<(KnowledgeBase, Vec<Document>, String)> {
        let kb = self.get_kb(ctx, "knowledge_base", kb_name).await?;
        let limit = self.page_limit(page_size, token)?;
        let mut page = self.store.list_docs(&kb.id, token, limit + 1).await?;
        let next = next_token(
            &mut page,
            limit,
            self.limits.list_page_bytes(),
            doc_size,
            |d| d.id.clone(),
        );
        Ok((kb, page, next))
    }

    /// Queues a FAILED document again from its stored original (no new upload needed).
    pub async fn retry_document(
        &self,
        ctx: &CallContext,
        kb_name: &str,
        id: &str,
    ) -> Result<Document> {
        let (kb, doc) = self.get_document(ctx, kb_name, id).await?;
        match self.store.retry_doc(&kb.id, &doc.id).await? {
            Some(Retried::Queued(doc)) => {
                self.jobs_added.notify_waiters();
                tracing::info!(document = %doc.id, "failed document queued again");
                Ok(doc)
            }
            Some(Retried::NotFailed(doc)) => Err(Error::FailedPrecondition(format!(
                "document {} is {}; only FAILED documents can be retried",
                doc.id,
                pb::DocumentStatus::try_from(doc.status as i32)
                    .map(|s| s.as_str_name())
                    .unwrap_or("in progress")
            ))),
            None => Err(Error::NotFound(format!(
                "document {id:?} not found in knowledge base {kb_name:?}"
            ))),
        }
    }

    /// Deletes a document and every one of its chunks. Done at once unless a worker is indexing
    /// it right now; then the delete runs as soon as that worker lets go, and the document is
    /// returned as DELETING.
    pub async fn delete_document(
        &self,
        ctx: &CallContext,
        kb_name: &str,
        id: &str,
    ) -> Result<Option<u32>> {
        let (_kb, doc) = self.get_document(ctx, kb_name, id).await?;
        let lease = self.jobs.lease_ms();
        self.store.mark_deleting(&doc.id).await?;
        let job = self.store.claim_job(lease, u32::MAX, Some(&doc.id)).await?;
        match job {
            Some(job) => match worker::run_delete(self, ctx, &job).await {
                Ok(removed) => Ok(Some(removed)),
                Err(err) if err.is_transient() => {
                    // The delete is recorded; a worker finishes it when the index is back.
                    tracing::warn!(document = %job.document_id, error = %err, "delete deferred");
                    self.store
                        .release_job(&job, 1000, store::Release::GiveBack { outage: true })
                        .await?;
                    self.jobs_added.notify_waiters();
                    Ok(None)
                }
                Err(err) => Err(err),
            },
            None => {
                self.jobs_added.notify_waiters();
                Ok(None)
            }
        }
    }

    /// Removes originals and temp files that no document points at and that are older than
    /// `grace`; returns how many were removed.
    pub async fn collect_garbage(&self, grace: Duration) -> Result<usize> {
        let (removed, candidates) = self.blobs.sweep_start(grace).await?;
        let referenced = self.store.existing_docs(&candidates).await?;
        let orphans: Vec<String> = candidates
            .into_iter()
            .filter(|id| !referenced.contains(id))
            .collect();
        let count = orphans.len();
        for id in orphans {
            tracing::info!(original = %id, "removing an original no document points at");
            self.blobs.remove(&id).await?;
        }
        Ok(removed + count)
    }

    fn page_limit(&self, page_size: u32, token: &str) -> Result<usize> {
        limits::check_len(token, limits::ID_BYTES.max(limits::KB_NAME_BYTES))
            .map_err(|m| Error::invalid("page_token", m))?;
        self.limits
            .page_size(page_size)
            .map_err(|m| Error::invalid("page_size", m))
    }
}

/// Knowledge base names: the rule is shared with the gateway (`limits::check_kb_name`).
fn validate_kb_name(field: &str, name: &str) -> Result<()> {
    limits::check_kb_name(name).map_err(|m| Error::invalid(field, m))
}

/// Upper bound of a document's encoded size in a response.
fn doc_size(doc: &Document) -> usize {
    let metadata: usize = doc
        .metadata
        .iter()
        .map(|(k, v)| k.len() + v.len() + 8)
        .sum();
    doc.title.len()
        + doc.source_name.len()
        + doc.source_id.len()
        + doc.error.len()
        + doc.content_type.len()
        + metadata
        + 4 * limits::ID_BYTES
}

/// Upper bound of a knowledge base's encoded size in a response.
fn kb_size(kb: &KnowledgeBase) -> usize {
    kb.name.len() + kb.description.len() + kb.embedding_model.len() + 3 * limits::ID_BYTES
}

/// Trims a page fetched with one extra row to at most `limit` items and `max_bytes` (but at
/// least one item), and returns the token of the next page (empty on the last page).
fn next_token<T>(
    page: &mut Vec<T>,
    limit: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
    key: impl Fn(&T) -> String,
) -> String {
    let mut bytes = 0;
    let mut keep = 0;
    for item in page.iter().take(limit) {
        bytes += size(item);
        if keep > 0 && bytes > max_bytes {
            break;
        }
        keep += 1;
    }
    if page.len() > keep {
        page.truncate(keep);
        page.last().map(key).unwrap_or_default()
    } else {
        String::new()
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_with_the_field_named() {
        assert!(validate_kb_name("name", "docs-2024_a").is_ok());
        for bad in ["", "Docs", "-x", "a b", &"a".repeat(64)] {
            let err = validate_kb_name("name", bad).unwrap_err().to_string();
            assert!(err.starts_with("name:"), "{err}");
        }
    }

    #[test]
    fn pages_end_at_the_item_limit_or_the_byte_budget() {
        let mut page = vec![1, 2, 3];
        assert_eq!(next_token(&mut page, 2, 100, |_| 1, |n| n.to_string()), "2");
        assert_eq!(page, vec![1, 2]);
        let mut page = vec![1];
        assert_eq!(next_token(&mut page, 2, 100, |_| 1, |n| n.to_string()), "");
        // Items of 40 bytes in a 100-byte budget: two per page, whatever the page size.
        let mut page = vec![1, 2, 3, 4, 5];
        assert_eq!(
            next_token(&mut page, 4, 100, |_| 40, |n| n.to_string()),
            "2"
        );
        assert_eq!(page, vec![1, 2]);
        // One item larger than the budget still makes progress.
        let mut page = vec![1, 2];
        assert_eq!(next_token(&mut page, 4, 10, |_| 40, |n| n.to_string()), "1");
        assert_eq!(page, vec![1]);
    }

    #[test]
    fn a_page_of_the_largest_documents_fits_in_a_message() {
        let limits = Limits::default();
        let metadata: BTreeMap<String, String> = (0..limits.metadata_entries)
            .map(|i| {
                (
                    format!("{i:0>width$}", width = limits.metadata_key_bytes),
                    "v".repeat(limits.metadata_value_bytes),
                )
            })
            .collect();
        let doc = Document {
            id: uuid::Uuid::now_v7().to_string(),
            kb_id: uuid::Uuid::new_v4().to_string(),
            title: "t".repeat(limits.title_bytes),
            source_name: "s".repeat(limits.source_name_bytes),
            content_type: "text/plain".into(),
            size_bytes: 1,
            sha256: "0".repeat(64),
            status: Status::Failed,
            error: "e".repeat(limits::ERROR_BYTES),
            chunk_count: 0,
            max_chunk_count: 0,
            metadata,
            attempts: 0,
            create_time: 0,
            update_time: 0,
            source_id: "i".repeat(limits.source_name_bytes),
        };
        assert!(doc_size(&doc) <= limits.document_record_bytes());
        let mut page = vec![doc; limits.max_page_size + 1];
        let next = next_token(
            &mut page,
            limits.max_page_size,
            limits.list_page_bytes(),
            doc_size,
            |d| d.id.clone(),
        );
        assert!(!next.is_empty());
        let bytes: usize = page.iter().map(doc_size).sum();
        assert!(bytes <= limits.list_page_bytes() && bytes < limits.message_bytes());
        assert!(page.len() < limits.max_page_size, "{} items", page.len());
    }
}
