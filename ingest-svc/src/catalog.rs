//! The catalog's operations as users see them: knowledge bases and documents, validated, with
//! the index kept in step through search-svc.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use smartdb_kit::context::CallContext;
use smartdb_proto::v1 as pb;
use tokio::sync::Notify;

use crate::blobs::BlobStore;
use crate::downstream::Downstream;
use crate::error::{Error, Result};
use crate::extract::{self, ContentType};
use crate::store::{self, Document, Inserted, KnowledgeBase, Status, Store};
use crate::worker;

/// Limits on what callers may send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest document accepted, in bytes.
    pub max_document_bytes: usize,
}

/// A document as submitted.
#[derive(Debug, Clone, Default)]
pub struct NewDocument {
    /// Knowledge base name.
    pub knowledge_base: String,
    /// Title, may be empty.
    pub title: String,
    /// File name, may be empty.
    pub source_name: String,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// The caller's word on plain text vs Markdown.
    pub format: Option<ContentType>,
    /// The original bytes.
    pub bytes: Vec<u8>,
}

/// The catalog: every operation on knowledge bases and documents.
pub struct Catalog {
    pub(crate) store: Store,
    pub(crate) blobs: BlobStore,
    pub(crate) downstream: Arc<Downstream>,
    /// Wakes the workers when a job is added.
    pub(crate) jobs_added: Arc<Notify>,
    limits: Limits,
}

const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 50;
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_KEY: usize = 128;
const MAX_METADATA_VALUE: usize = 1024;

impl Catalog {
    /// A catalog over its store, originals and downstream services.
    pub fn new(
        store: Store,
        blobs: BlobStore,
        downstream: Arc<Downstream>,
        limits: Limits,
    ) -> Self {
        Self {
            store,
            blobs,
            downstream,
            jobs_added: Arc::new(Notify::new()),
            limits,
        }
    }

    /// Limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    // ---- knowledge bases ----

    /// Creates a knowledge base and its collection in the index.
    pub async fn create_kb(
        &self,
        ctx: &CallContext,
        name: &str,
        description: &str,
        model: &str,
    ) -> Result<KnowledgeBase> {
        validate_kb_name("name", name)?;
        if description.len() > 4096 {
            return Err(Error::invalid("description", "at most 4096 bytes"));
        }
        let (tenant, lookup) = (ctx.tenant.clone(), name.to_owned());
        if self
            .store
            .call(move |c| store::find_kb(c, &tenant, &lookup))
            .await?
            .is_some()
        {
            return Err(Error::AlreadyExists(format!(
                "knowledge base {name:?} already exists"
            )));
        }
        let info = self.downstream.model_info(ctx, model).await?;
        let kb = KnowledgeBase {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: ctx.tenant.clone(),
            name: name.to_owned(),
            description: description.to_owned(),
            embedding_model: info.id.clone(),
            dimension: info.dimension,
            create_time: store::now_ms(),
            document_count: 0,
        };
        // The collection first: a catalog row must never point at a collection that is missing.
        self.downstream
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
        let row = kb.clone();
        if let Err(err) = self.store.call(move |c| store::insert_kb(c, &row)).await {
            // Lost a race for the name: drop the collection we made.
            let _ = self.downstream.delete_collection(ctx, &kb.id).await;
            return Err(err);
        }
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
        let (tenant, lookup) = (ctx.tenant.clone(), name.to_owned());
        self.store
            .call(move |c| store::find_kb(c, &tenant, &lookup))
            .await?
            .ok_or_else(|| Error::NotFound(format!("knowledge base {name:?} not found")))
    }

    /// One page of the tenant's knowledge bases; the token is the last name of the page.
    pub async fn list_kbs(
        &self,
        ctx: &CallContext,
        page_size: u32,
        token: &str,
    ) -> Result<(Vec<KnowledgeBase>, String)> {
        let limit = page_limit(page_size)?;
        let (tenant, after) = (ctx.tenant.clone(), token.to_owned());
        let mut page = self
            .store
            .call(move |c| store::list_kbs(c, &tenant, &after, limit + 1))
            .await?;
        let next = next_token(&mut page, limit, |kb| kb.name.clone());
        Ok((page, next))
    }

    /// Deletes a knowledge base, its collection, its documents and their originals.
    pub async fn delete_kb(&self, ctx: &CallContext, name: &str) -> Result<u64> {
        let kb = self.get_kb(ctx, "name", name).await?;
        // Index first: if it fails, nothing changed and the caller can retry.
        self.downstream.delete_collection(ctx, &kb.id).await?;
        let id = kb.id.clone();
        let removed = self.store.call(move |c| store::delete_kb(c, &id)).await?;
        for doc in &removed {
            if let Err(err) = self.blobs.remove(doc) {
                tracing::warn!(document = %doc, error = %err, "could not remove original");
            }
        }
        tracing::info!(kb = %kb.name, documents = removed.len(), "knowledge base deleted");
        Ok(removed.len() as u64)
    }

    // ---- documents ----

    /// Stores a document durably and queues it for indexing; returns it and whether the same
    /// bytes were already there.
    pub async fn add_document(
        &self,
        ctx: &CallContext,
        new: NewDocument,
    ) -> Result<(Document, bool)> {
        let kb = self
            .get_kb(ctx, "knowledge_base", &new.knowledge_base)
            .await?;
        validate_metadata(&new.metadata)?;
        if new.title.len() > 1024 {
            return Err(Error::invalid("title", "at most 1024 bytes"));
        }
        if new.bytes.len() > self.limits.max_document_bytes {
            return Err(Error::ResourceExhausted {
                message: format!(
                    "document is {} bytes, the limit is {} bytes",
                    new.bytes.len(),
                    self.limits.max_document_bytes
                ),
                retry_after: None,
            });
        }
        let content_type = extract::sniff(&new.bytes, &new.source_name, new.format)?;
        let sha256 = hex::encode(Sha256::digest(&new.bytes));
        let title = if !new.title.trim().is_empty() {
            new.title.trim().to_owned()
        } else if !new.source_name.is_empty() {
            new.source_name.clone()
        } else {
            extract::title_from_text(std::str::from_utf8(&new.bytes).unwrap_or_default())
        };
        let now = store::now_ms();
        let doc = Document {
            id: uuid::Uuid::now_v7().to_string(),
            kb_id: kb.id.clone(),
            title,
            source_name: new.source_name,
            content_type: content_type.as_str().to_owned(),
            size_bytes: new.bytes.len() as u64,
            sha256,
            status: Status::Queued,
            error: String::new(),
            chunk_count: 0,
            max_chunk_count: 0,
            metadata: new.metadata,
            attempts: 0,
            create_time: now,
            update_time: now,
        };
        // Original on disk before the row that points at it is committed.
        let (blobs, id, bytes) = (self.blobs.clone(), doc.id.clone(), new.bytes);
        tokio::task::spawn_blocking(move || blobs.put(&id, &bytes))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let row = doc.clone();
        let inserted = self.store.call(move |c| store::insert_doc(c, &row)).await;
        match inserted {
            Ok(Inserted::New(stored)) => {
                if stored.id != doc.id {
                    // A failed duplicate was queued again; it keeps its own original.
                    let _ = self.blobs.remove(&doc.id);
                }
                self.jobs_added.notify_waiters();
                tracing::info!(document = %stored.id, kb = %kb.name, bytes = stored.size_bytes, "document accepted");
                Ok((stored, false))
            }
            Ok(Inserted::Existing(existing)) => {
                let _ = self.blobs.remove(&doc.id);
                Ok((existing, true))
            }
            Err(err) => {
                let _ = self.blobs.remove(&doc.id);
                Err(err)
            }
        }
    }

    /// Waits until a document's indexing finishes or the caller's deadline is near, and returns
    /// it as it then is.
    pub async fn wait_indexed(&self, ctx: &CallContext, document: Document) -> Result<Document> {
        let mut doc = document;
        // Without a deadline, wait at most this long.
        let budget = ctx
            .remaining(Duration::from_secs(300))
            .saturating_sub(Duration::from_millis(250));
        let until = tokio::time::Instant::now() + budget;
        while !doc.status.is_terminal() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let id = doc.id.clone();
            match self.store.call(move |c| store::doc_by_id(c, &id)).await? {
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
        let (kb_id, doc_id) = (kb.id.clone(), id.to_owned());
        let doc = self
            .store
            .call(move |c| store::get_doc(c, &kb_id, &doc_id))
            .await?
            .ok_or_else(|| {
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
        let limit = page_limit(page_size)?;
        let (kb_id, after) = (kb.id.clone(), token.to_owned());
        let mut page = self
            .store
            .call(move |c| store::list_docs(c, &kb_id, &after, limit + 1))
            .await?;
        let next = next_token(&mut page, limit, |d| d.id.clone());
        Ok((kb, page, next))
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
        let doc_id = doc.id.clone();
        let job = self
            .store
            .call(move |c| {
                store::mark_deleting(c, &doc_id)?;
                store::claim_job(c, worker::LEASE_MS, Some(&doc_id))
            })
            .await?;
        match job {
            Some(job) => match worker::run_delete(self, ctx, &job).await {
                Ok(removed) => Ok(Some(removed)),
                Err(err) if err.is_transient() => {
                    // The delete is recorded; a worker finishes it when the index is back.
                    tracing::warn!(document = %job.document_id, error = %err, "delete deferred");
                    self.store
                        .call(move |c| store::release_job(c, &job, 1000))
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
}

/// Knowledge base names: 1–63 of `a-z 0-9 - _`, starting with a letter or digit.
fn validate_kb_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_rest = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if name.len() > 63 || !ok_first || !ok_rest {
        return Err(Error::invalid(
            field,
            format!(
                "{name:?} is not a valid name: use 1 to 63 lower-case letters, digits, '-' or '_', starting with a letter or digit"
            ),
        ));
    }
    Ok(())
}

fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<()> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(Error::invalid(
            "metadata",
            format!("{} entries, at most {MAX_METADATA_ENTRIES}", metadata.len()),
        ));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY {
            return Err(Error::invalid(
                "metadata",
                format!("key {key:?} must be 1 to {MAX_METADATA_KEY} bytes"),
            ));
        }
        if value.len() > MAX_METADATA_VALUE {
            return Err(Error::invalid(
                format!("metadata[{key}]"),
                format!("value is longer than {MAX_METADATA_VALUE} bytes"),
            ));
        }
    }
    Ok(())
}

fn page_limit(page_size: u32) -> Result<usize> {
    match page_size as usize {
        0 => Ok(DEFAULT_PAGE),
        n if n > MAX_PAGE => Err(Error::invalid(
            "page_size",
            format!("{n} is more than the maximum {MAX_PAGE}"),
        )),
        n => Ok(n),
    }
}

/// Trims a page fetched with one extra row and returns the token of the next page.
fn next_token<T>(page: &mut Vec<T>, limit: usize, key: impl Fn(&T) -> String) -> String {
    if page.len() > limit {
        page.truncate(limit);
        page.last().map(key).unwrap_or_default()
    } else {
        String::new()
    }
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
    fn metadata_limits() {
        let mut m = BTreeMap::new();
        m.insert("team".to_owned(), "search".to_owned());
        assert!(validate_metadata(&m).is_ok());
        m.insert(String::new(), "x".to_owned());
        assert!(validate_metadata(&m).is_err());
    }

    #[test]
    fn pages_and_tokens() {
        assert_eq!(page_limit(0).unwrap(), DEFAULT_PAGE);
        assert!(page_limit(5000).is_err());
        let mut page = vec![1, 2, 3];
        assert_eq!(next_token(&mut page, 2, |n| n.to_string()), "2");
        assert_eq!(page, vec![1, 2]);
        let mut page = vec![1];
        assert_eq!(next_token(&mut page, 2, |n| n.to_string()), "");
    }
}
