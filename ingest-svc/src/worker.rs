//! Indexing workers: claim a job with a lease, do it, and record the outcome.
//!
//! - A dependency that is unavailable (embed-svc or search-svc down, overloaded, timing out)
//!   does not count against the document: the job waits with exponential backoff and full
//!   jitter, for as long as the outage lasts.
//! - A failure of the document itself that can never succeed (no text, too many chunks) fails it
//!   at once with the reason; other errors are retried until the attempts run out.
//! - A worker that dies keeps its attempt: after enough of them the job is given up (see
//!   [`store::claim_job`]), so a document that crashes its worker cannot crash-loop the service.
//! - A worker that loses its lease stops; on shutdown, workers give their jobs back at once.

use std::sync::Arc;
use std::time::Duration;

use smartdb_kit::context::CallContext;
use smartdb_kit::limits::UPSERT_BATCH;
use smartdb_proto::v1 as pb;
use tokio::sync::watch;
use tracing::Instrument;

use crate::catalog::Catalog;
use crate::chunk::Chunk;
use crate::downstream::point_id;
use crate::error::{Error, Result};
use crate::extract::{self, ContentType};
use crate::store::{Document, Job, JobKind, Release, Status};

/// How jobs are run.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// How long a claim lasts without renewal; a crashed worker's job is retried after this.
    pub lease: Duration,
    /// Claims an index job may use before its document is FAILED.
    pub max_attempts: u32,
    /// Test-only fault injection: a document whose text contains this crashes its worker
    /// (the whole process) while PARSING.
    pub crash_marker: Option<String>,
}

impl JobSettings {
    /// The lease in milliseconds.
    pub fn lease_ms(&self) -> i64 {
        self.lease.as_millis().max(1) as i64
    }

    fn renew_every(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(50))
    }
}

/// Longest wait between tries while a dependency is unavailable.
const MAX_OUTAGE_BACKOFF: Duration = Duration::from_secs(30);
/// Wait before retrying a job that failed for another reason.
const RETRY_BACKOFF: Duration = Duration::from_secs(5);

/// Plain text and Markdown originals up to this size are extracted and chunked on the runtime's
/// own thread (about 0.1 ms of work for the largest; see `run_index`).
const INLINE_PARSE_BYTES: u64 = 4096;

/// Runs one worker until `stop` turns true.
pub async fn run(catalog: Arc<Catalog>, id: usize, mut stop: watch::Receiver<bool>) {
    tracing::debug!(worker = id, "indexing worker started");
    let (lease, max_attempts) = (catalog.jobs.lease_ms(), catalog.jobs.max_attempts);
    loop {
        if *stop.borrow() {
            return;
        }
        // Register interest before looking, so a job added meanwhile still wakes us.
        let added = catalog.jobs_added.clone();
        let notified = added.notified();
        match catalog.store.claim_job(lease, max_attempts, None).await {
            Ok(Some(job)) => {
                process(&catalog, job, stop.clone()).await;
                continue;
            }
            Ok(None) => {}
            Err(err) => tracing::error!(worker = id, error = %err, "cannot claim jobs"),
        }
        let wait = match catalog.store.next_job_in().await {
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

/// How a claimed job ended.
enum Ended {
    Done(Result<()>),
    LeaseLost,
    Stopped,
}

async fn process(catalog: &Catalog, job: Job, mut stop: watch::Receiver<bool>) {
    // Renews the lease while the job runs; resolves if the lease was lost (another worker took
    // the job over after a stall): this worker must then stop touching it.
    let keeper = {
        let (store, job, lease, every) = (
            catalog.store.clone(),
            job.clone(),
            catalog.jobs.lease_ms(),
            catalog.jobs.renew_every(),
        );
        async move {
            loop {
                tokio::time::sleep(every).await;
                match store.renew_lease(&job, lease).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    // The catalog hiccuped: keep trying until the lease is really gone.
                    Err(err) => tracing::warn!(error = %err, "cannot renew a job lease"),
                }
            }
        }
    };
    let work = async {
        match job.kind {
            JobKind::Index => run_index(catalog, &job).await,
            JobKind::Delete => {
                let ctx = background(smartdb_kit::context::DEFAULT_TENANT);
                run_delete(catalog, &ctx, &job).await.map(|_| ())
            }
        }
    };
    let span = tracing::info_span!(
        target: "smartdb::ingest",
        "job",
        otel.name = %format_args!("{:?} job", job.kind),
        document = %job.document_id,
        attempt = job.attempts,
        trace_id = tracing::field::Empty,
    );
    if let Some(trace_id) = smartdb_kit::telemetry::continue_saved_trace(&span, &job.trace) {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    let ended = tokio::select! {
        result = work.instrument(span) => Ended::Done(result),
        () = keeper => Ended::LeaseLost,
        _ = stop.wait_for(|s| *s) => Ended::Stopped,
    };
    match ended {
        Ended::Done(Ok(())) => {}
        Ended::Done(Err(err)) => fail_or_retry(catalog, &job, err).await,
        Ended::LeaseLost => {
            tracing::warn!(document = %job.document_id, "lost the job's lease; stopped working on it");
        }
        Ended::Stopped => {
            // Shutting down: give the job back at once, so a restart does not wait out the lease.
            let released = catalog
                .store
                .release_job(&job, 0, Release::GiveBack { outage: false })
                .await;
            match released {
                Ok(()) => tracing::info!(document = %job.document_id, "job released for shutdown"),
                Err(err) => tracing::warn!(error = %err, "cannot release a job at shutdown"),
            }
        }
    }
}

/// The span of one stage of a job (a child of the job's span).
fn stage(name: &'static str) -> tracing::Span {
    tracing::info_span!(target: "smartdb::ingest", "stage", otel.name = name)
}

/// A context for a job's downstream calls: no overall deadline (a large document may take
/// long), so each call gets the default per-call deadline.
fn background(tenant: &str) -> CallContext {
    let mut ctx = CallContext::background(tenant, Duration::ZERO);
    ctx.deadline = None;
    ctx
}

/// What a failed job's error says about retrying it.
fn classify(err: &Error) -> Retry {
    match err {
        _ if err.is_transient() => Retry::Outage,
        Error::InvalidArgument { .. } | Error::FailedPrecondition(_) | Error::NotFound(_) => {
            Retry::Never
        }
        _ => Retry::Counted,
    }
}

enum Retry {
    /// A dependency is unavailable: wait, without using up an attempt.
    Outage,
    /// The document can never succeed as it is.
    Never,
    /// Try again while attempts last.
    Counted,
}

/// Full jitter over an exponentially growing window (starting at 500 ms), capped.
fn backoff(exponent: u32, cap: Duration) -> Duration {
    let window = Duration::from_millis(500)
        .saturating_mul(1u32 << exponent.min(16))
        .min(cap);
    window.mul_f64(rand::random::<f64>()) + Duration::from_millis(100)
}

async fn fail_or_retry(catalog: &Catalog, job: &Job, err: Error) {
    let job = job.clone();
    let message = err.to_string();
    let max_attempts = catalog.jobs.max_attempts;
    let (release, delay, status) = match classify(&err) {
        Retry::Outage => {
            let delay = backoff(job.outages, MAX_OUTAGE_BACKOFF);
            tracing::warn!(document = %job.document_id, outages = job.outages + 1, delay_ms = delay.as_millis() as u64, error = %message, "dependency unavailable, job waits");
            (
                Release::GiveBack { outage: true },
                delay,
                Some((
                    Status::Queued,
                    format!("waiting for a dependency: {message}"),
                )),
            )
        }
        Retry::Counted if job.attempts < max_attempts || job.kind == JobKind::Delete => {
            let delay = backoff(job.attempts, RETRY_BACKOFF * 8);
            tracing::warn!(document = %job.document_id, attempt = job.attempts, delay_ms = delay.as_millis() as u64, error = %message, "job failed, will retry");
            (
                Release::Keep,
                delay,
                Some((Status::Queued, format!("retrying: {message}"))),
            )
        }
        Retry::Counted => {
            let reason = format!(
                "gave up after {} attempts; last error: {message}",
                job.attempts
            );
            return fail(catalog, job, reason).await;
        }
        Retry::Never if job.kind == JobKind::Index => return fail(catalog, job, message).await,
        Retry::Never => {
            // A delete must finish eventually: keep retrying it, slowly.
            tracing::error!(document = %job.document_id, error = %message, "delete failed, will retry");
            (Release::Keep, Duration::from_secs(60), None)
        }
    };
    let delay_ms = delay.as_millis() as i64;
    let result = async {
        // A quiet reindex leaves its INDEXED document as it is while it waits.
        if let (JobKind::Index, false, Some((status, reason))) = (job.kind, job.quiet, &status) {
            catalog
                .store
                .set_status(&job.document_id, *status, reason)
                .await?;
        }
        catalog.store.release_job(&job, delay_ms, release).await
    }
    .await;
    if let Err(err) = result {
        tracing::error!(error = %err, "cannot record job outcome");
    }
}

async fn fail(catalog: &Catalog, job: Job, reason: String) {
    tracing::error!(document = %job.document_id, error = %reason, "indexing failed for good");
    let result = async {
        catalog
            .store
            .set_status(&job.document_id, Status::Failed, &reason)
            .await?;
        catalog.store.complete_job(&job).await
    }
    .await;
    if let Err(err) = result {
        tracing::error!(error = %err, "cannot record job outcome");
    }
}

/// Extract → chunk → embed → store → INDEXED. Stops quietly if the document is being deleted.
async fn run_index(catalog: &Catalog, job: &Job) -> Result<()> {
    let found = match catalog.store.doc_by_id(&job.document_id).await? {
        Some(doc) => catalog
            .store
            .kb_by_id(&doc.kb_id)
            .await?
            .map(|kb| (doc, kb)),
        None => None,
    };
    let Some((doc, kb)) = found else {
        return finish(catalog, job).await;
    };
    let ctx = background(&kb.tenant);
    // A quiet reindex keeps the document INDEXED: its current chunks serve until replaced.
    let quiet = job.quiet;
    let step = move |status| if quiet { Status::Indexed } else { status };
    if !set_status(catalog, &doc.id, step(Status::Parsing)).await? {
        return finish(catalog, job).await;
    }
    let bytes = catalog.blobs.get(&doc.id).await?;
    let content_type = ContentType::parse(&doc.content_type).unwrap_or(ContentType::Plain);
    let chunker = catalog
        .downstream
        .chunker(&ctx, &kb.embedding_model)
        .await?;
    let (limits, crash_marker) = (catalog.limits().clone(), catalog.jobs.crash_marker.clone());
    let fault_injection = crash_marker.is_some();
    let (job_span, doc_id) = (tracing::Span::current(), doc.id.clone());
    let parse_and_chunk = move || -> Result<Vec<Chunk>> {
        let _job = job_span.enter();
        let extracted =
            stage("parse").in_scope(|| extract::extract(content_type, &bytes, &limits))?;
        if let Some(marker) = &crash_marker
            && extracted.text.contains(marker.as_str())
        {
            tracing::error!(document = %doc_id, "fault injection: this document crashes its worker");
            // The call that queued this document (an upload, a RetryDocument) answers within
            // microseconds; without the pause the abort can race it and the caller gets
            // UNAVAILABLE for a call that succeeded. This runs on the blocking pool (below), so
            // the pause holds no async worker.
            std::thread::sleep(std::time::Duration::from_millis(300));
            std::process::abort();
        }
        Ok(stage("chunk").in_scope(|| {
            chunker.split(&extracted.text, extracted.split_as, &extracted.page_starts)
        }))
    };
    // A small text document takes well under a millisecond to extract and chunk: less than
    // handing it to the blocking pool and back (two thread wake-ups, which were a large part of
    // ingest-svc's CPU per document). Anything larger, and every PDF or DOCX, goes to the pool.
    let inline = doc.size_bytes <= INLINE_PARSE_BYTES
        && matches!(content_type, ContentType::Plain | ContentType::Markdown)
        && !fault_injection;
    let chunks = if inline {
        // A panic must fail this job, as it would on the pool, not take the worker with it.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse_and_chunk))
            .map_err(|_| Error::Internal("parsing the document panicked".into()))??
    } else {
        tokio::task::spawn_blocking(parse_and_chunk)
            .await
            .map_err(|e| Error::Internal(e.to_string()))??
    };
    if chunks.is_empty() {
        return Err(Error::invalid("data", "the document has no text to index"));
    }
    let max_chunks = catalog.limits().chunks_per_document;
    if chunks.len() > max_chunks {
        return Err(Error::invalid(
            "data",
            format!(
                "the document splits into {} chunks, more than the limit of {max_chunks} (limit-chunks-per-document)",
                chunks.len()
            ),
        ));
    }
    let count = chunks.len() as u32;
    let (doc_id, embedding) = (doc.id.clone(), step(Status::Embedding));
    if !catalog
        .store
        .set_chunk_count(&doc_id, count, embedding)
        .await?
    {
        return finish(catalog, job).await;
    }
    // Each chunk is embedded with its document's title and its heading path in front: a chunk
    // rarely repeats them, and they often say best what the chunk is about. (embed-svc truncates
    // the rare input that they push past the model's limit; search-svc adds both to the BM25
    // text.)
    let embedded: Vec<String> = chunks
        .iter()
        .map(|chunk| embedded_text(&doc.title, chunk))
        .collect();
    let vectors = catalog
        .downstream
        .embed_documents(&ctx, &kb.embedding_model, &embedded)
        .instrument(stage("embed"))
        .await?;
    drop(embedded);
    if !set_status(catalog, &doc.id, step(Status::Storing)).await? {
        return finish(catalog, job).await;
    }
    // A version of a source is written hidden, so that searches keep seeing the version they
    // see now until this one is complete (then `publish` swaps them in one step). A quiet
    // reindex rewrites the published version in place instead.
    if !doc.source_id.is_empty() && !job.quiet {
        catalog
            .downstream
            .update_hidden(&ctx, &kb.id, vec![doc.id.clone()], Vec::new())
            .await?;
    }
    // Points (each with a copy of the title, source name and metadata) are built one batch at a
    // time, so a job's memory is bounded by the batch, not by chunks × payload.
    let metadata: std::collections::HashMap<_, _> = doc.metadata.clone().into_iter().collect();
    for (batch, (texts, vectors)) in chunks
        .chunks(UPSERT_BATCH)
        .zip(vectors.chunks(UPSERT_BATCH))
        .enumerate()
    {
        let first = (batch * UPSERT_BATCH) as u32;
        let points = texts
            .iter()
            .zip(vectors)
            .enumerate()
            .map(|(i, (chunk, vector))| pb::Point {
                id: point_id(&doc.id, first + i as u32),
                vector: vector.clone(),
                document_id: doc.id.clone(),
                chunk_index: first + i as u32,
                text: chunk.text.clone(),
                title: doc.title.clone(),
                metadata: metadata.clone(),
                source_name: doc.source_name.clone(),
                heading_path: chunk.headings.clone(),
                start_offset: chunk.start as u64,
                end_offset: chunk.end as u64,
                page_start: chunk.pages.0,
                page_end: chunk.pages.1,
            })
            .collect();
        catalog.downstream.upsert(&ctx, &kb.id, points).await?;
    }
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
    if !doc.source_id.is_empty() && !job.quiet {
        publish(catalog, &ctx, &doc).await?;
    } else if set_status(catalog, &doc.id, Status::Indexed).await? {
        tracing::info!(document = %doc.id, chunks = count, "document indexed");
    }
    finish(catalog, job).await
}

/// Makes a version of a source the one searches see, in one step, and retires the older
/// versions (they are deleted next, by their delete jobs). If a newer version was indexed
/// first, this one is outdated: it is deleted instead, and never shown.
///
/// Publishes of one source run one at a time, across replicas (the catalog's source lock), so
/// two versions finishing together cannot both replace the other. A crash after the swap and
/// before the catalog records it re-runs the job, which hides this version again until it
/// publishes it again: searches then briefly see neither version, never both.
async fn publish(catalog: &Catalog, ctx: &CallContext, doc: &Document) -> Result<()> {
    // Held at most a lease: a replica that dies holding it frees it when that runs out.
    let ttl = catalog.jobs.lease_ms();
    let token = loop {
        if let Some(token) = catalog
            .store
            .lock_source(&doc.kb_id, &doc.source_id, ttl)
            .await?
        {
            break token;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let result = publish_locked(catalog, ctx, doc).await;
    if let Err(err) = catalog
        .store
        .unlock_source(&doc.kb_id, &doc.source_id, token)
        .await
    {
        tracing::warn!(document = %doc.id, error = %err, "cannot free the source lock; it expires");
    }
    result
}

async fn publish_locked(catalog: &Catalog, ctx: &CallContext, doc: &Document) -> Result<()> {
    let others = catalog.store.other_versions(doc).await?;
    if let Some(newer) = others
        .iter()
        .find(|o| o.status == Status::Indexed && o.is_newer_than(doc))
    {
        tracing::info!(document = %doc.id, newer = %newer.id, source = %doc.source_id, "outdated version of a source, deleting it");
        return catalog.store.mark_deleting(&doc.id).await;
    }
    let older: Vec<String> = others
        .iter()
        .filter(|o| !o.is_newer_than(doc))
        .map(|o| o.id.clone())
        .collect();
    catalog
        .downstream
        .update_hidden(ctx, &doc.kb_id, older.clone(), vec![doc.id.clone()])
        .await?;
    let published = catalog.store.publish_version(&doc.id, &older).await?;
    if !published {
        // Deleted meanwhile: put the swap back; its delete job removes its points.
        tracing::info!(document = %doc.id, "version deleted while being published; swap undone");
        return catalog
            .downstream
            .update_hidden(ctx, &doc.kb_id, vec![doc.id.clone()], older)
            .await;
    }
    tracing::info!(document = %doc.id, source = %doc.source_id, replaced = ?older, "version indexed and published");
    if !older.is_empty() {
        catalog.jobs_added.notify_waiters();
    }
    Ok(())
}

/// The text embedded for `chunk`: the document's title and the chunk's heading path, each on a
/// line of its own, then the chunk, leaving out what the chunk already starts with (a title
/// taken from the text's first line, a section's own heading).
pub fn embedded_text(title: &str, chunk: &Chunk) -> String {
    let first_line = chunk.text.lines().next().unwrap_or("");
    let mut headings = chunk.headings.as_slice();
    if let Some((last, outer)) = headings.split_last()
        && first_line.trim_start_matches('#').trim() == last
    {
        headings = outer;
    }
    let title = match title.trim().is_empty() || chunk.text.starts_with(title) {
        true => "",
        false => title,
    };
    let mut out = String::with_capacity(chunk.text.len() + title.len() + 64);
    if !title.is_empty() {
        out.push_str(title);
        out.push('\n');
    }
    if !headings.is_empty() {
        out.push_str(&headings.join(" > "));
        out.push('\n');
    }
    out.push_str(&chunk.text);
    out
}

/// Removes a document's chunks from the index, its original, and its row. Returns the number
/// of point ids removed.
pub(crate) async fn run_delete(catalog: &Catalog, ctx: &CallContext, job: &Job) -> Result<u32> {
    let Some(doc) = catalog.store.doc_by_id(&job.document_id).await? else {
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
    // A version may be hidden (replaced, or never published): with its points gone, the index
    // can forget it.
    if !doc.source_id.is_empty() {
        let forget = vec![doc.id.clone()];
        match catalog
            .downstream
            .update_hidden(ctx, &doc.kb_id, Vec::new(), forget)
            .await
        {
            Ok(()) | Err(Error::NotFound(_)) => {}
            Err(err) => return Err(err),
        }
    }
    catalog.blobs.remove(&doc.id).await?;
    catalog.store.remove_doc(&doc.id).await?;
    tracing::info!(document = %doc.id, chunks = doc.max_chunk_count, "document deleted");
    Ok(doc.max_chunk_count)
}

async fn set_status(catalog: &Catalog, id: &str, status: Status) -> Result<bool> {
    catalog.store.set_status(id, status, "").await
}

async fn finish(catalog: &Catalog, job: &Job) -> Result<()> {
    catalog.store.complete_job(job).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_text_carries_title_and_heading_path_once() {
        let chunk = |text: &str, headings: &[&str]| Chunk {
            text: text.into(),
            start: 0,
            end: text.len(),
            headings: headings.iter().map(|h| h.to_string()).collect(),
            pages: (0, 0),
        };
        assert_eq!(
            embedded_text("Guide", &chunk("Run it.", &["Install", "Linux"])),
            "Guide\nInstall > Linux\nRun it."
        );
        // The section's own heading is already the chunk's first line.
        assert_eq!(
            embedded_text("Guide", &chunk("## Linux\nRun it.", &["Install", "Linux"])),
            "Guide\nInstall\n## Linux\nRun it."
        );
        // A title taken from the first line is not repeated; no title, no headings: the chunk.
        assert_eq!(
            embedded_text("Run it.", &chunk("Run it. Then wait.", &[])),
            "Run it. Then wait."
        );
        assert_eq!(embedded_text(" ", &chunk("Run it.", &[])), "Run it.");
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        for exponent in [0, 3, 10, 40] {
            for _ in 0..200 {
                let d = backoff(exponent, MAX_OUTAGE_BACKOFF);
                assert!(d >= Duration::from_millis(100));
                assert!(
                    d <= MAX_OUTAGE_BACKOFF + Duration::from_millis(100),
                    "{d:?}"
                );
            }
        }
        let spread: std::collections::HashSet<_> =
            (0..50).map(|_| backoff(6, MAX_OUTAGE_BACKOFF)).collect();
        assert!(spread.len() > 40, "not jittered");
    }

    #[test]
    fn outages_never_fail_documents_but_bad_documents_do() {
        assert!(matches!(
            classify(&Error::Unavailable("embed-svc: connection refused".into())),
            Retry::Outage
        ));
        assert!(matches!(
            classify(&Error::ResourceExhausted {
                message: "queue full".into(),
                retry_after: Some(Duration::from_secs(1)),
            }),
            Retry::Outage
        ));
        assert!(matches!(
            classify(&Error::invalid("data", "no text")),
            Retry::Never
        ));
        assert!(matches!(
            classify(&Error::Internal("disk full".into())),
            Retry::Counted
        ));
    }
}

/// The worker against a real catalog, with downstream services that accept connections and
/// never answer (a stalled dependency), so a job stays in flight as long as the test wants.
#[cfg(test)]
mod in_flight {
    use super::*;
    use crate::blobs::BlobStore;
    use crate::catalog::{Arrival, NewDocument};
    use crate::downstream::Downstream;
    use crate::store;
    use smartdb_kit::limits::Limits;

    struct Fixture {
        catalog: Arc<Catalog>,
        /// The catalog's store, for SQL the trait does not offer (lease rows).
        sqlite: store::SqliteStore,
        _dir: tempfile::TempDir,
        _stalled: tokio::net::TcpListener,
    }

    async fn fixture(lease: Duration) -> Fixture {
        fixture_with(lease, Limits::default()).await
    }

    async fn fixture_with(lease: Duration, limits: Limits) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        // Accepts (the kernel does) but never speaks HTTP/2: every call hangs.
        let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = stalled.local_addr().unwrap().to_string();
        let settings = smartdb_kit::client::ClientSettings {
            attempt_timeout: Duration::from_secs(60),
            default_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let client = |name| smartdb_kit::client::Downstream::connect(name, &addr, &settings);
        let downstream = Arc::new(Downstream::new(
            client("embed-svc").await.unwrap(),
            client("search-svc").await.unwrap(),
            limits.chunk_bytes,
        ));
        let sqlite = store::SqliteStore::open(&dir.path().join("catalog.db")).unwrap();
        let catalog = Arc::new(Catalog::new(
            Arc::new(sqlite.clone()),
            BlobStore::open(&dir.path().join("originals"), None).unwrap(),
            downstream,
            limits,
            JobSettings {
                lease,
                max_attempts: 3,
                crash_marker: None,
            },
        ));
        Fixture {
            catalog,
            sqlite,
            _dir: dir,
            _stalled: stalled,
        }
    }

    fn new_text() -> NewDocument {
        NewDocument {
            knowledge_base: "kb".into(),
            title: String::new(),
            source_name: String::new(),
            source_id: String::new(),
            metadata: Default::default(),
            format: None,
            arrival: Arrival::Text,
        }
    }

    fn ctx() -> CallContext {
        CallContext::background(smartdb_kit::context::DEFAULT_TENANT, Duration::from_secs(5))
    }

    /// A ready knowledge base with one queued document; returns the document's id.
    async fn queued_document(catalog: &Catalog) -> String {
        let kb = store::KnowledgeBase {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: smartdb_kit::context::DEFAULT_TENANT.into(),
            name: "kb".into(),
            description: String::new(),
            embedding_model: "m".into(),
            dimension: 3,
            create_time: 0,
            document_count: 0,
            ready: false,
            reindex: None,
        };
        catalog.store.reserve_kb(&kb).await.unwrap();
        assert!(catalog.store.activate_kb(&kb.id, &kb.id).await.unwrap());
        let ctx =
            CallContext::background(smartdb_kit::context::DEFAULT_TENANT, Duration::from_secs(5));
        let mut upload = catalog
            .begin_upload(
                &ctx,
                NewDocument {
                    knowledge_base: "kb".into(),
                    title: String::new(),
                    source_name: String::new(),
                    source_id: String::new(),
                    metadata: Default::default(),
                    format: None,
                    arrival: Arrival::Text,
                },
            )
            .await
            .unwrap();
        upload.write(b"Some text to index.").await.unwrap();
        catalog.finish_upload(upload).await.unwrap().0.id
    }

    async fn claim(catalog: &Catalog) -> Job {
        let lease = catalog.jobs.lease_ms();
        catalog
            .store
            .claim_job(lease, 3, None)
            .await
            .unwrap()
            .expect("a job")
    }

    async fn job_row(sqlite: &store::SqliteStore, id: &str) -> (i64, i64, u32) {
        let id = id.to_owned();
        sqlite
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT lease_token, lease_until, attempts FROM jobs WHERE document_id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_worker_that_loses_its_lease_stops() {
        let f = fixture(Duration::from_millis(300)).await;
        let id = queued_document(&f.catalog).await;
        let job = claim(&f.catalog).await;
        let (_stop_tx, stop) = watch::channel(false);
        let catalog = f.catalog.clone();
        let worker = tokio::spawn(async move { process(&catalog, job, stop).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            !worker.is_finished(),
            "the job should be stuck on the stalled dependency"
        );
        // Another worker takes the job over (as after a stall longer than the lease).
        let thief = 42;
        let stolen = id.clone();
        f.sqlite
            .call(move |c| {
                Ok(c.execute(
                    "UPDATE jobs SET lease_token = ?2 WHERE document_id = ?1",
                    rusqlite::params![stolen, thief],
                )?)
            })
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), worker)
            .await
            .expect("the worker keeps going without its lease")
            .unwrap();
        // It left the job to its new owner.
        assert_eq!(job_row(&f.sqlite, &id).await.0, thief);
    }

    #[tokio::test]
    async fn shutdown_gives_the_job_back_at_once() {
        let f = fixture(Duration::from_secs(60)).await;
        let id = queued_document(&f.catalog).await;
        let job = claim(&f.catalog).await;
        assert_eq!(job_row(&f.sqlite, &id).await.2, 1);
        let (stop_tx, stop) = watch::channel(false);
        let catalog = f.catalog.clone();
        let worker = tokio::spawn(async move { process(&catalog, job, stop).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), worker)
            .await
            .expect("the worker ignores shutdown")
            .unwrap();
        let (_, lease_until, attempts) = job_row(&f.sqlite, &id).await;
        assert_eq!(lease_until, 0, "a restart would wait out the lease");
        assert_eq!(attempts, 0, "a shutdown is not the document's fault");
        // The job can be claimed again right away.
        claim(&f.catalog).await;
    }

    #[tokio::test]
    async fn uploads_beyond_the_bound_are_refused_with_a_retry_hint() {
        let f = fixture_with(
            Duration::from_secs(60),
            Limits {
                concurrent_uploads: 2,
                ..Limits::default()
            },
        )
        .await;
        queued_document(&f.catalog).await;
        let first = f.catalog.begin_upload(&ctx(), new_text()).await.unwrap();
        let _second = f.catalog.begin_upload(&ctx(), new_text()).await.unwrap();
        match f.catalog.begin_upload(&ctx(), new_text()).await {
            Err(Error::ResourceExhausted {
                message,
                retry_after: Some(_),
            }) => assert!(message.contains("too many uploads"), "{message}"),
            Err(other) => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
            Ok(_) => panic!("a third upload was let in"),
        }
        // A finished (or abandoned) upload frees its slot.
        drop(first);
        f.catalog.begin_upload(&ctx(), new_text()).await.unwrap();
    }

    #[tokio::test]
    async fn garbage_collection_keeps_what_documents_point_at() {
        let f = fixture(Duration::from_secs(60)).await;
        let id = queued_document(&f.catalog).await;
        let originals = f._dir.path().join("originals");
        std::fs::write(originals.join("orphan-from-a-failed-delete"), b"x").unwrap();
        std::fs::write(originals.join("tmp/crashed-upload"), b"x").unwrap();
        let removed = f.catalog.collect_garbage(Duration::ZERO).await.unwrap();
        assert_eq!(removed, 2);
        assert!(originals.join(&id).exists());
        assert!(!originals.join("orphan-from-a-failed-delete").exists());
        assert!(!originals.join("tmp/crashed-upload").exists());
        // Younger than the grace period: kept (it may belong to an upload in flight).
        std::fs::write(originals.join("fresh"), b"x").unwrap();
        assert_eq!(
            f.catalog
                .collect_garbage(Duration::from_secs(600))
                .await
                .unwrap(),
            0
        );
        assert!(originals.join("fresh").exists());
    }
}
