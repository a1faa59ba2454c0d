//! Embedding providers: where vectors are computed. `local` runs the model in-process; later
//! providers (OpenAI-compatible endpoints) implement the same trait.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::model::{Embedded, LocalModel};

/// What a text is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum InputKind {
    /// A search query.
    Query = 1,
    /// A passage to be indexed.
    Document = 2,
}

/// Description of a model, as `GetModelInfo` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDescriptor {
    /// Model id used in requests.
    pub id: String,
    /// Vector length.
    pub dimension: usize,
    /// Longest input in tokens.
    pub max_input_tokens: usize,
    /// `local` or `openai`.
    pub provider: &'static str,
    /// Prefix put before queries.
    pub query_prefix: String,
    /// Prefix put before documents.
    pub document_prefix: String,
}

/// Something that turns texts into vectors.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// What the model is.
    fn descriptor(&self) -> &ModelDescriptor;
    /// The model's tokenizer as Hugging Face JSON, where the model has one we can share.
    fn tokenizer_json(&self) -> Option<String>;
    /// Embeds `texts` (already prefixed), in order; `kind` lets a provider serve queries first.
    async fn embed(&self, texts: Vec<String>, kind: InputKind) -> Result<Vec<Embedded>>;
}

/// Limits of one coalesced batch for the local model.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most texts in one batch (a single larger call still runs, alone).
    pub max_texts: usize,
    /// Most (estimated) tokens in one batch.
    pub max_tokens: usize,
    /// How long a small batch waits for more calls to join it. Zero (the default) runs at once:
    /// calls that arrive while a batch runs still join the next one, so batches form under load
    /// without adding latency to a lone query.
    pub window: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_texts: 64,
            max_tokens: 64 * 256,
            window: Duration::ZERO,
        }
    }
}

/// Where a call's vectors go.
type Reply = oneshot::Sender<Result<Vec<Embedded>>>;

/// One call waiting for the model.
struct Job {
    texts: Vec<String>,
    reply: Reply,
}

/// The in-process model behind a dynamic batcher: concurrent calls are coalesced into batches
/// bounded by texts and tokens, one batch runs at a time (it already uses every core), and the
/// queues in front are bounded, so a flood gets RESOURCE_EXHAUSTED at once instead of growing
/// memory without limit.
///
/// Queries have their own queue, served first: a search waits for the batch that is running,
/// never behind a backlog of documents being indexed, and a flood of documents cannot fill the
/// queries' queue.
pub struct LocalProvider {
    descriptor: ModelDescriptor,
    tokenizer_json: String,
    queries: mpsc::Sender<Job>,
    documents: mpsc::Sender<Job>,
    counts: Arc<Counts>,
}

/// What the batcher did, for tests.
#[derive(Default)]
struct Counts {
    /// Batches run.
    batches: AtomicU64,
    /// Model runs: a batch, or a piece of one.
    runs: AtomicU64,
}

impl LocalProvider {
    /// Wraps a loaded model, with room for `queue_depth` waiting calls of each kind.
    pub fn new(model: LocalModel, queue_depth: usize) -> Self {
        Self::with_limits(model, queue_depth, BatchLimits::default())
    }

    /// Like [`LocalProvider::new`] with explicit batch limits.
    pub fn with_limits(model: LocalModel, queue_depth: usize, limits: BatchLimits) -> Self {
        let descriptor = ModelDescriptor {
            id: model.id().to_owned(),
            dimension: model.dimension(),
            max_input_tokens: model.max_tokens(),
            provider: "local",
            query_prefix: String::new(),
            document_prefix: String::new(),
        };
        let tokenizer_json = model.tokenizer_json();
        let (queries, query_jobs) = mpsc::channel(queue_depth.max(1));
        let (documents, document_jobs) = mpsc::channel(queue_depth.max(1));
        let counts = Arc::new(Counts::default());
        let lanes = Lanes::new(query_jobs, document_jobs);
        tokio::spawn(run_batches(Arc::new(model), lanes, limits, counts.clone()));
        Self {
            descriptor,
            tokenizer_json,
            queries,
            documents,
            counts,
        }
    }

    /// Calls waiting in both queues.
    fn waiting(&self) -> usize {
        [&self.queries, &self.documents]
            .iter()
            .map(|q| q.max_capacity() - q.capacity())
            .sum()
    }

    /// Batches run so far (tests use it to see coalescing).
    pub fn batches_run(&self) -> u64 {
        self.counts.batches.load(Ordering::Relaxed)
    }

    /// Model runs so far: a batch, or a piece of one (tests use it to see pieces).
    pub fn model_runs(&self) -> u64 {
        self.counts.runs.load(Ordering::Relaxed)
    }
}

/// Rough token count for batching decisions (about 4 bytes per token, capped by the model limit).
fn estimate_tokens(texts: &[String], max_tokens: usize) -> usize {
    texts
        .iter()
        .map(|t| (t.len() / 4 + 2).min(max_tokens))
        .sum()
}

/// The batcher's two queues, and for each a call taken from it that did not fit the batch it
/// was taken for (it opens the next batch of its kind).
struct Lanes {
    queries: mpsc::Receiver<Job>,
    documents: mpsc::Receiver<Job>,
    carried_query: Option<Job>,
    carried_document: Option<Job>,
    /// Query batches run in a row while documents waited.
    streak: u32,
    /// When the last query batch started.
    last_query: Option<tokio::time::Instant>,
}

/// Query batches that may run in a row while documents wait: queries come first, but a steady
/// stream of them must not stop indexing altogether.
const MAX_QUERY_STREAK: u32 = 8;

/// Estimated tokens the model runs at a time for a batch of documents while searches are
/// coming in; a waiting query runs between two such pieces, so it waits for one piece, not for
/// a whole batch of documents (64 passages: seconds on a slow CPU). Pieces cost throughput
/// (measured: up to a tenth of the pipeline's speed, the other services' threads preempting the
/// model's more often), so a batch runs whole when no query came for [`QUIET_AFTER`].
const DOCUMENT_PIECE_TOKENS: usize = 1024;

/// How long after the last query document batches still run in pieces.
const QUIET_AFTER: Duration = Duration::from_secs(10);

impl Lanes {
    fn new(queries: mpsc::Receiver<Job>, documents: mpsc::Receiver<Job>) -> Self {
        Self {
            queries,
            documents,
            carried_query: None,
            carried_document: None,
            streak: 0,
            last_query: None,
        }
    }

    fn waits(&self, kind: InputKind) -> bool {
        match kind {
            InputKind::Query => self.carried_query.is_some() || !self.queries.is_empty(),
            InputKind::Document => self.carried_document.is_some() || !self.documents.is_empty(),
        }
    }

    /// The queue of `kind` and its carried call.
    fn lane(&mut self, kind: InputKind) -> (&mut Option<Job>, &mut mpsc::Receiver<Job>) {
        match kind {
            InputKind::Query => (&mut self.carried_query, &mut self.queries),
            InputKind::Document => (&mut self.carried_document, &mut self.documents),
        }
    }

    /// A waiting call of `kind`, without waiting.
    fn try_take(&mut self, kind: InputKind) -> Option<Job> {
        let (carried, queue) = self.lane(kind);
        carried.take().or_else(|| queue.try_recv().ok())
    }

    /// The next call to open a batch: a query whenever one waits (up to [`MAX_QUERY_STREAK`]
    /// batches in a row while documents wait), else a document.
    async fn next(&mut self) -> Option<(InputKind, Job)> {
        let documents_wait = self.waits(InputKind::Document);
        let order = if documents_wait && self.streak >= MAX_QUERY_STREAK {
            [InputKind::Document, InputKind::Query]
        } else {
            [InputKind::Query, InputKind::Document]
        };
        let waiting = order
            .into_iter()
            .find_map(|kind| self.try_take(kind).map(|job| (kind, job)));
        let next = match waiting {
            Some(next) => Some(next),
            None => tokio::select! {
                biased;
                Some(job) = self.queries.recv() => Some((InputKind::Query, job)),
                Some(job) = self.documents.recv() => Some((InputKind::Document, job)),
                else => None,
            },
        };
        self.streak = match &next {
            Some((InputKind::Query, _)) if documents_wait => self.streak + 1,
            _ => 0,
        };
        if let Some((InputKind::Query, _)) = &next {
            self.last_query = Some(tokio::time::Instant::now());
        }
        next
    }

    /// Whether searches are coming in, so that documents should make way for them.
    fn searched_lately(&self) -> bool {
        self.last_query.is_some_and(|at| at.elapsed() < QUIET_AFTER)
    }

    /// The batch `first` opens: calls of its kind already queued join while they fit, and the
    /// window waits for more. Documents stop gathering when a query arrives.
    async fn gather(
        &mut self,
        kind: InputKind,
        first: Job,
        limits: &BatchLimits,
        per_text: usize,
    ) -> Vec<Job> {
        let mut texts = first.texts.len();
        let mut tokens = estimate_tokens(&first.texts, per_text);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + limits.window;
        while texts < limits.max_texts && tokens < limits.max_tokens {
            if kind == InputKind::Document && self.waits(InputKind::Query) {
                break;
            }
            // What is already queued joins at once; the window only applies to new arrivals.
            let next = match self.try_take(kind) {
                Some(job) => Some(job),
                None if limits.window.is_zero() => None,
                None => tokio::time::timeout_at(deadline, self.lane(kind).1.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(job) = next else { break };
            metrics::gauge!("embed_queue_calls").set(self.waiting() as f64);
            let job_tokens = estimate_tokens(&job.texts, per_text);
            if texts + job.texts.len() > limits.max_texts || tokens + job_tokens > limits.max_tokens
            {
                *self.lane(kind).0 = Some(job);
                break;
            }
            texts += job.texts.len();
            tokens += job_tokens;
            batch.push(job);
        }
        batch
    }

    /// Calls waiting in both queues.
    fn waiting(&self) -> usize {
        self.queries.len() + self.documents.len()
    }
}

/// The batcher: takes the next call (queries first), lets others of its kind join while they
/// fit, runs them as one batch and hands each caller its slice of the result. A batch of
/// documents runs in pieces, with any waiting queries run between two pieces.
async fn run_batches(
    model: Arc<LocalModel>,
    mut lanes: Lanes,
    limits: BatchLimits,
    counts: Arc<Counts>,
) {
    let per_text = model.max_tokens();
    loop {
        let Some((kind, first)) = lanes.next().await else {
            return;
        };
        // Calls waiting for the model (the "embedding calls" queue of AdminService.GetMetrics).
        metrics::gauge!("embed_queue_calls").set(lanes.waiting() as f64);
        let batch = lanes.gather(kind, first, &limits, per_text).await;
        let (sizes, inputs, replies) = unpack(batch);
        counts.batches.fetch_add(1, Ordering::Relaxed);
        let result = match kind {
            InputKind::Query => infer(&model, &counts, inputs).await,
            InputKind::Document => {
                let mut vectors = Vec::with_capacity(inputs.len());
                let mut result = Ok(());
                let pieces = if lanes.searched_lately() {
                    pieces(inputs, per_text)
                } else {
                    vec![inputs]
                };
                for piece in pieces {
                    // Queries that came meanwhile go first, as one batch.
                    if let Some(query) = lanes.try_take(InputKind::Query) {
                        lanes.last_query = Some(tokio::time::Instant::now());
                        let batch = lanes
                            .gather(InputKind::Query, query, &limits, per_text)
                            .await;
                        let (sizes, inputs, replies) = unpack(batch);
                        counts.batches.fetch_add(1, Ordering::Relaxed);
                        answer(replies, sizes, infer(&model, &counts, inputs).await);
                    }
                    match infer(&model, &counts, piece).await {
                        Ok(done) => vectors.extend(done),
                        Err(err) => {
                            result = Err(err);
                            break;
                        }
                    }
                }
                result.map(|()| vectors)
            }
        };
        answer(replies, sizes, result);
    }
}

/// A batch's calls as their sizes, all their texts in order, and their reply channels.
fn unpack(batch: Vec<Job>) -> (Vec<usize>, Vec<String>, Vec<Reply>) {
    let sizes: Vec<usize> = batch.iter().map(|j| j.texts.len()).collect();
    metrics::histogram!("embed_batch_texts", "provider" => "local")
        .record(sizes.iter().sum::<usize>() as f64);
    let (inputs, replies): (Vec<Vec<String>>, Vec<_>) =
        batch.into_iter().map(|j| (j.texts, j.reply)).unzip();
    (sizes, inputs.into_iter().flatten().collect(), replies)
}

/// `inputs` cut into runs of about [`DOCUMENT_PIECE_TOKENS`] (at least one text each).
fn pieces(inputs: Vec<String>, per_text: usize) -> Vec<Vec<String>> {
    let mut pieces: Vec<Vec<String>> = Vec::new();
    let mut tokens = 0;
    for text in inputs {
        let cost = estimate_tokens(std::slice::from_ref(&text), per_text);
        match pieces.last_mut() {
            Some(piece) if tokens + cost <= DOCUMENT_PIECE_TOKENS => piece.push(text),
            _ => {
                tokens = 0;
                pieces.push(vec![text]);
            }
        }
        tokens += cost;
    }
    pieces
}

/// Runs the model on `inputs` (a batch, or a piece of one) on the blocking pool; an error is
/// the message every caller in the batch gets.
async fn infer(
    model: &Arc<LocalModel>,
    counts: &Counts,
    inputs: Vec<String>,
) -> std::result::Result<Vec<Embedded>, String> {
    let texts = inputs.len();
    counts.runs.fetch_add(1, Ordering::Relaxed);
    let model = model.clone();
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        model.embed(&refs)
    })
    .await;
    metrics::histogram!("embed_inference_duration_seconds", "provider" => "local")
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("embed_model_inputs_total", "provider" => "local").increment(texts as u64);
    match result {
        Ok(Ok(vectors)) => Ok(vectors),
        Ok(Err(err)) => Err(format!("inference failed: {err:#}")),
        Err(err) => Err(format!("inference task failed: {err}")),
    }
}

/// Hands each caller its slice of `result` (or the error).
fn answer(
    replies: Vec<Reply>,
    sizes: Vec<usize>,
    result: std::result::Result<Vec<Embedded>, String>,
) {
    match result {
        Ok(vectors) => {
            let mut vectors = vectors.into_iter();
            for (reply, size) in replies.into_iter().zip(sizes) {
                let _ = reply.send(Ok(vectors.by_ref().take(size).collect()));
            }
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(Error::Internal(err.clone())));
            }
        }
    }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn descriptor(&self) -> &ModelDescriptor {
        &self.descriptor
    }

    fn tokenizer_json(&self) -> Option<String> {
        Some(self.tokenizer_json.clone())
    }

    async fn embed(&self, texts: Vec<String>, kind: InputKind) -> Result<Vec<Embedded>> {
        let (reply, answer) = oneshot::channel();
        let queue = match kind {
            InputKind::Query => &self.queries,
            InputKind::Document => &self.documents,
        };
        queue
            .try_send(Job { texts, reply })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => Error::ResourceExhausted {
                    message: "the embedding queue is full; retry shortly".to_owned(),
                    retry_after: Duration::from_millis(200),
                },
                mpsc::error::TrySendError::Closed(_) => {
                    Error::Unavailable("the model is shutting down".to_owned())
                }
            })?;
        metrics::gauge!("embed_queue_calls").set(self.waiting() as f64);
        answer
            .await
            .map_err(|_| Error::Unavailable("the model is shutting down".to_owned()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MINILM_L6_V2, default_models_dir, ensure_model};
    use std::time::Instant;

    async fn load() -> LocalModel {
        let dir =
            tokio::task::spawn_blocking(|| ensure_model(&default_models_dir(), &MINILM_L6_V2))
                .await
                .unwrap()
                .unwrap();
        tokio::task::spawn_blocking(move || LocalModel::load(&dir, &MINILM_L6_V2))
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_are_coalesced_and_answered_in_order() {
        let model = load().await;
        let expected: Vec<Vec<f32>> = {
            let texts: Vec<String> = (0..8)
                .map(|i| format!("sentence number {i} about batching"))
                .collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            model
                .embed(&refs)
                .unwrap()
                .into_iter()
                .map(|e| e.values)
                .collect()
        };
        let limits = BatchLimits {
            window: Duration::from_millis(50),
            ..BatchLimits::default()
        };
        let provider = Arc::new(LocalProvider::with_limits(model, 16, limits));
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let provider = provider.clone();
                tokio::spawn(async move {
                    provider
                        .embed(
                            vec![format!("sentence number {i} about batching")],
                            InputKind::Document,
                        )
                        .await
                })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            let got = call.await.unwrap().unwrap();
            let cosine: f32 = got[0]
                .values
                .iter()
                .zip(&expected[i])
                .map(|(a, b)| a * b)
                .sum();
            assert!(
                cosine > 0.9999,
                "call {i} got another call's vector (cosine {cosine})"
            );
        }
        assert!(
            provider.batches_run() < 8,
            "{} batches for 8 concurrent calls",
            provider.batches_run()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_window_calls_arriving_during_a_batch_join_the_next() {
        let provider = Arc::new(LocalProvider::new(load().await, 16));
        let text = "A passage long enough to keep the model busy for a moment. ".repeat(20);
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let provider = provider.clone();
                let text = text.clone();
                tokio::spawn(async move { provider.embed(vec![text], InputKind::Document).await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().len(), 1);
        }
        // The first call runs alone at once; the others queue behind it and run together.
        assert!(
            provider.batches_run() <= 4,
            "{} batches for 8 concurrent calls",
            provider.batches_run()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_runs_before_the_documents_waiting_ahead_of_it() {
        // One call per batch, each of 8 long passages: documents queue up behind the first.
        let limits = BatchLimits {
            max_texts: 8,
            ..BatchLimits::default()
        };
        let provider = Arc::new(LocalProvider::with_limits(load().await, 16, limits));
        let text = "A passage long enough to keep the model busy for a moment. ".repeat(20);
        let (done, mut finished) = mpsc::unbounded_channel();
        let mut calls = Vec::new();
        for i in 0..8 {
            let (provider, texts, done) = (provider.clone(), vec![text.clone(); 8], done.clone());
            calls.push(tokio::spawn(async move {
                provider.embed(texts, InputKind::Document).await.unwrap();
                done.send(format!("document {i}")).unwrap();
            }));
            // In order, so "ahead of the query" is what the queue holds.
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let query = {
            let (provider, done) = (provider.clone(), done.clone());
            tokio::spawn(async move {
                provider
                    .embed(vec!["which passage?".into()], InputKind::Query)
                    .await
                    .unwrap();
                done.send("query".to_owned()).unwrap();
            })
        };
        query.await.unwrap();
        for call in calls {
            call.await.unwrap();
        }
        drop(done);
        let mut order = Vec::new();
        while let Some(name) = finished.recv().await {
            order.push(name);
        }
        let at = order.iter().position(|n| n == "query").unwrap();
        // Only the batch running when it came (and at most one that started before the query
        // was queued) may finish first; first come, first served would put it last.
        assert!(
            at <= 2,
            "the query waited for documents queued after: {order:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_runs_between_the_pieces_of_a_document_batch() {
        let provider = Arc::new(LocalProvider::new(load().await, 16));
        let text = "A passage long enough to keep the model busy for a moment. ".repeat(20);
        let texts = vec![text; 64];
        assert!(pieces(texts.clone(), 256).len() >= 8);
        // No search yet: a batch of documents runs whole, in one model run.
        provider
            .embed(texts[..8].to_vec(), InputKind::Document)
            .await
            .unwrap();
        assert_eq!(provider.model_runs(), 1);
        // A search makes documents run in pieces for a while.
        provider
            .embed(vec!["first search".into()], InputKind::Query)
            .await
            .unwrap();
        let document = {
            let provider = provider.clone();
            tokio::spawn(async move {
                provider.embed(texts, InputKind::Document).await.unwrap();
                Instant::now()
            })
        };
        // Well into the first piece (of at least 8) of the one batch.
        tokio::time::sleep(Duration::from_millis(20)).await;
        provider
            .embed(vec!["which passage?".into()], InputKind::Query)
            .await
            .unwrap();
        let query_done = Instant::now();
        let document_done = document.await.unwrap();
        assert!(
            query_done < document_done,
            "the query waited for the whole batch of 64 passages"
        );
        assert_eq!(provider.batches_run(), 4);
        assert!(
            provider.model_runs() >= 2 + 8,
            "{} model runs",
            provider.model_runs()
        );
    }

    #[test]
    fn pieces_keep_every_text_in_order_and_bound_the_tokens() {
        let texts: Vec<String> = (0..50).map(|i| "word ".repeat(i * 7)).collect();
        let cut = pieces(texts.clone(), 256);
        assert_eq!(cut.concat(), texts);
        for piece in &cut {
            let tokens = estimate_tokens(piece, 256);
            assert!(
                piece.len() == 1 || tokens <= DOCUMENT_PIECE_TOKENS,
                "{tokens}"
            );
        }
        assert!(cut.len() > 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_of_queries_does_not_stop_documents() {
        // Batches of at most 4 calls and 40 callers: the query queue is never empty.
        let limits = BatchLimits {
            max_texts: 4,
            ..BatchLimits::default()
        };
        let provider = Arc::new(LocalProvider::with_limits(load().await, 64, limits));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let loops: Vec<_> = (0..40)
            .map(|i| {
                let (provider, stop) = (provider.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let text = format!("query {i} number {n} about bees and flowers");
                        provider.embed(vec![text], InputKind::Query).await.unwrap();
                        n += 1;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = provider.batches_run();
        let document = provider.embed(
            vec!["A document waiting behind a stream of queries.".into()],
            InputKind::Document,
        );
        let embedded = tokio::time::timeout(Duration::from_secs(60), document).await;
        let between = provider.batches_run() - before;
        stop.store(true, Ordering::Relaxed);
        for l in loops {
            l.await.unwrap();
        }
        assert_eq!(embedded.expect("the document starved").unwrap().len(), 1);
        // The batch running when it came, the streak, its own, and the next one or two that
        // start before this reads the counter; first come, first served would starve it.
        assert!(
            between <= u64::from(MAX_QUERY_STREAK) + 4,
            "{between} batches ran before the document"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_is_refused_with_resource_exhausted_not_queued() {
        let dir =
            tokio::task::spawn_blocking(|| ensure_model(&default_models_dir(), &MINILM_L6_V2))
                .await
                .unwrap()
                .unwrap();
        let model = tokio::task::spawn_blocking(move || LocalModel::load(&dir, &MINILM_L6_V2))
            .await
            .unwrap()
            .unwrap();
        let provider = Arc::new(LocalProvider::new(model, 2));
        let text =
            "Backpressure keeps memory bounded when callers send more than the model can take. "
                .repeat(8);
        let calls: Vec<_> = (0..12)
            .map(|_| {
                let provider = provider.clone();
                let texts = vec![text.clone(); 16];
                tokio::spawn(async move { provider.embed(texts, InputKind::Document).await })
            })
            .collect();
        let (mut ok, mut refused) = (0, 0);
        for call in calls {
            match call.await.unwrap() {
                Ok(vectors) => {
                    assert_eq!(vectors.len(), 16);
                    ok += 1;
                }
                Err(Error::ResourceExhausted { retry_after, .. }) => {
                    assert!(retry_after > Duration::ZERO);
                    refused += 1;
                }
                Err(other) => panic!("unexpected error {other}"),
            }
        }
        // Only the running batch (at most 64 texts: 4 calls) and `queue_depth` waiting calls are
        // accepted; the rest are told to back off at once.
        assert!((1..=6).contains(&ok), "{ok} calls ran");
        assert_eq!(ok + refused, 12);
        assert!(refused >= 6, "{refused} calls refused");
        // Once the flood is over, the provider serves again.
        assert_eq!(
            provider
                .embed(vec!["after the flood".into()], InputKind::Document)
                .await
                .unwrap()
                .len(),
            1
        );
    }
}
