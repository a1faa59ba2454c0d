//! Indexing workers: claim a job with a lease, do it, and record the outcome. A job that fails
//! for a passing reason (a service down) is retried with exponential backoff and full jitter;
//! one that can never succeed (no text) fails the document with the reason.

use std::sync::Arc;
use std::time::Duration;

use smartdb_kit::context::CallContext;
use smartdb_proto::v1 as pb;

use crate::catalog::Catalog;
use crate::downstream::point_id;
use crate::error::{Error, Result};
use crate::extract::{self, ContentType};
use crate::store::{self, Job, JobKind, Status};

/// How long a claim lasts without renewal; a crashed worker's job is retried after this.
pub const LEASE_MS: i64 = 60_000;
/// How often a running job renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(15);
/// Attempts before a document that keeps hitting passing failures is marked FAILED.
const MAX_ATTEMPTS: u32 = 10;
/// Deadline for all the downstream calls of one job.
const JOB_BUDGET: Duration = Duration::from_secs(600);

/// Runs one worker until `stop` is notified.
pub async fn run(catalog: Arc<Catalog>, id: usize, mut stop: tokio::sync::watch::Receiver<bool>) {
    tracing::debug!(worker = id, "indexing worker started");
    loop {
        if *stop.borrow() {
            return;
        }
        // Register interest before looking, so a job added meanwhile still wakes us.
        let added = catalog.jobs_added.clone();
        let notified = added.notified();
        match catalog
            .store
            .call(|c| store::claim_job(c, LEASE_MS, None))
            .await
        {
            Ok(Some(job)) => {
                process(&catalog, job).await;
                continue;
            }
            Ok(None) => {}
            Err(err) => tracing::error!(worker = id, error = %err, "cannot claim jobs"),
        }
        let wait = match catalog.store.call(|c| store::next_job_in(c)).await {
            Ok(Some(ms)) => Duration::from_millis(ms.clamp(10, 1000) as u64),
            _ => Duration::from_secs(1),
        };
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn process(catalog: &Catalog, job: Job) {
    // The claim context: tenant is the knowledge base's, filled in once we know it.
    let renew = {
        let store = catalog.store.clone();
        let job = job.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let job = job.clone();
                if !matches!(
                    store
                        .call(move |c| store::renew_lease(c, &job, LEASE_MS))
                        .await,
                    Ok(true)
                ) {
                    return;
                }
            }
        })
    };
    let ctx = CallContext::background(smartdb_kit::context::DEFAULT_TENANT, JOB_BUDGET);
    let outcome = match job.kind {
        JobKind::Index => run_index(catalog, &job).await,
        JobKind::Delete => run_delete(catalog, &ctx, &job).await.map(|_| ()),
    };
    renew.abort();
    if let Err(err) = outcome {
        fail_or_retry(catalog, &job, err).await;
    }
}

async fn fail_or_retry(catalog: &Catalog, job: &Job, err: Error) {
    let job = job.clone();
    let retry = err.is_transient() && job.attempts < MAX_ATTEMPTS;
    let message = err.to_string();
    let result = if retry {
        // Full jitter over an exponentially growing window, capped at a minute.
        let window = 500u64.saturating_mul(1 << job.attempts.min(7)).min(60_000);
        let delay = (rand_fraction() * window as f64) as i64 + 100;
        tracing::warn!(document = %job.document_id, attempt = job.attempts, delay_ms = delay, error = %message, "job failed, will retry");
        catalog
            .store
            .call(move |c| {
                if job.kind == JobKind::Index {
                    store::set_status(
                        c,
                        &job.document_id,
                        Status::Queued,
                        &format!("retrying: {message}"),
                    )?;
                }
                store::release_job(c, &job, delay)
            })
            .await
    } else {
        tracing::error!(document = %job.document_id, error = %message, "job failed for good");
        catalog
            .store
            .call(move |c| {
                if job.kind == JobKind::Index {
                    store::set_status(c, &job.document_id, Status::Failed, &message)?;
                    store::complete_job(c, &job)
                } else {
                    // A delete must finish eventually: keep retrying it, slowly.
                    store::release_job(c, &job, 60_000)
                }
            })
            .await
    };
    if let Err(err) = result {
        tracing::error!(error = %err, "cannot record job outcome");
    }
}

/// Extract → chunk → embed → store → INDEXED. Stops quietly if the document is being deleted.
async fn run_index(catalog: &Catalog, job: &Job) -> Result<()> {
    let id = job.document_id.clone();
    let found = catalog
        .store
        .call(move |c| {
            let Some(doc) = store::doc_by_id(c, &id)? else {
                return Ok(None);
            };
            let kb = store::kb_by_id(c, &doc.kb_id)?;
            Ok(kb.map(|kb| (doc, kb)))
        })
        .await?;
    let Some((doc, kb)) = found else {
        return finish(catalog, job).await;
    };
    let ctx = CallContext::background(kb.tenant.clone(), JOB_BUDGET);
    if !set_status(catalog, &doc.id, Status::Parsing).await? {
        return finish(catalog, job).await;
    }
    let (blobs, doc_id) = (catalog.blobs.clone(), doc.id.clone());
    let bytes = tokio::task::spawn_blocking(move || blobs.get(&doc_id))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let text = extract::text(&bytes)?;
    let content_type = ContentType::parse(&doc.content_type).unwrap_or(ContentType::Plain);
    let chunker = catalog
        .downstream
        .chunker(&ctx, &kb.embedding_model)
        .await?;
    let chunks = tokio::task::spawn_blocking(move || chunker.split(&text, content_type))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    if chunks.is_empty() {
        return Err(Error::invalid("data", "the document has no text to index"));
    }
    let count = chunks.len() as u32;
    let doc_id = doc.id.clone();
    if !catalog
        .store
        .call(move |c| store::set_chunk_count(c, &doc_id, count))
        .await?
    {
        return finish(catalog, job).await;
    }
    let vectors = catalog
        .downstream
        .embed_documents(&ctx, &kb.embedding_model, &chunks)
        .await?;
    if !set_status(catalog, &doc.id, Status::Storing).await? {
        return finish(catalog, job).await;
    }
    let metadata: std::collections::HashMap<_, _> = doc.metadata.clone().into_iter().collect();
    let points = chunks
        .into_iter()
        .zip(vectors)
        .enumerate()
        .map(|(i, (text, vector))| pb::Point {
            id: point_id(&doc.id, i as u32),
            vector,
            document_id: doc.id.clone(),
            chunk_index: i as u32,
            text,
            title: doc.title.clone(),
            metadata: metadata.clone(),
            source_name: doc.source_name.clone(),
        })
        .collect();
    catalog.downstream.upsert(&ctx, &kb.id, points).await?;
    // Chunks beyond the new count are left over from an earlier, longer chunking.
    if doc.max_chunk_count > count {
        let stale = (count..doc.max_chunk_count)
            .map(|i| point_id(&doc.id, i))
            .collect();
        catalog
            .downstream
            .delete_points(&ctx, &kb.id, stale)
            .await?;
    }
    if set_status(catalog, &doc.id, Status::Indexed).await? {
        tracing::info!(document = %doc.id, chunks = count, "document indexed");
    }
    finish(catalog, job).await
}

/// Removes a document's chunks from the index, its original, and its row. Returns the number
/// of point ids removed.
pub(crate) async fn run_delete(catalog: &Catalog, ctx: &CallContext, job: &Job) -> Result<u32> {
    let id = job.document_id.clone();
    let Some(doc) = catalog
        .store
        .call(move |c| store::doc_by_id(c, &id))
        .await?
    else {
        finish(catalog, job).await?;
        return Ok(0);
    };
    let ids: Vec<String> = (0..doc.max_chunk_count)
        .map(|i| point_id(&doc.id, i))
        .collect();
    match catalog.downstream.delete_points(ctx, &doc.kb_id, ids).await {
        // The whole collection is gone (knowledge base deleted): nothing left to remove.
        Ok(()) | Err(Error::NotFound(_)) => {}
        Err(err) => return Err(err),
    }
    let (blobs, doc_id) = (catalog.blobs.clone(), doc.id.clone());
    tokio::task::spawn_blocking(move || blobs.remove(&doc_id))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let doc_id = doc.id.clone();
    catalog
        .store
        .call(move |c| store::remove_doc(c, &doc_id))
        .await?;
    tracing::info!(document = %doc.id, chunks = doc.max_chunk_count, "document deleted");
    Ok(doc.max_chunk_count)
}

async fn set_status(catalog: &Catalog, id: &str, status: Status) -> Result<bool> {
    let id = id.to_owned();
    catalog
        .store
        .call(move |c| store::set_status(c, &id, status, ""))
        .await
}

async fn finish(catalog: &Catalog, job: &Job) -> Result<()> {
    let job = job.clone();
    catalog
        .store
        .call(move |c| store::complete_job(c, &job))
        .await
}

fn rand_fraction() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}
