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
    /// Embeds `texts` (already prefixed), in order.
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedded>>;
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

/// One call waiting for the model.
struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Embedded>>>,
}

/// The in-process model behind a dynamic batcher: concurrent calls are coalesced into batches
/// bounded by texts and tokens, one batch runs at a time (it already uses every core), and the
/// queue in front is bounded, so a flood gets RESOURCE_EXHAUSTED at once instead of growing
/// memory without limit.
pub struct LocalProvider {
    descriptor: ModelDescriptor,
    tokenizer_json: String,
    queue: mpsc::Sender<Job>,
    batches: Arc<AtomicU64>,
}

impl LocalProvider {
    /// Wraps a loaded model, with room for `queue_depth` waiting calls.
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
        let (queue, jobs) = mpsc::channel(queue_depth.max(1));
        let batches = Arc::new(AtomicU64::new(0));
        tokio::spawn(run_batches(Arc::new(model), jobs, limits, batches.clone()));
        Self {
            descriptor,
            tokenizer_json,
            queue,
            batches,
        }
    }

    /// Batches run so far (tests use it to see coalescing).
    pub fn batches_run(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

/// Rough token count for batching decisions (about 4 bytes per token, capped by the model limit).
fn estimate_tokens(texts: &[String], max_tokens: usize) -> usize {
    texts
        .iter()
        .map(|t| (t.len() / 4 + 2).min(max_tokens))
        .sum()
}

/// The batcher: takes the next call, lets others join while they fit, runs them as one batch
/// and hands each caller its slice of the result.
async fn run_batches(
    model: Arc<LocalModel>,
    mut jobs: mpsc::Receiver<Job>,
    limits: BatchLimits,
    batches: Arc<AtomicU64>,
) {
    let per_text = model.max_tokens();
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        // Calls waiting for the model (the "embedding calls" queue of AdminService.GetMetrics).
        metrics::gauge!("embed_queue_calls").set(jobs.len() as f64);
        let mut texts = first.texts.len();
        let mut tokens = estimate_tokens(&first.texts, per_text);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + limits.window;
        while texts < limits.max_texts && tokens < limits.max_tokens {
            // What is already queued joins at once; the window only applies to new arrivals.
            let next = match jobs.try_recv() {
                Ok(job) => Some(job),
                Err(_) if limits.window.is_zero() => None,
                Err(_) => tokio::time::timeout_at(deadline, jobs.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(job) = next else { break };
            metrics::gauge!("embed_queue_calls").set(jobs.len() as f64);
            let job_tokens = estimate_tokens(&job.texts, per_text);
            if texts + job.texts.len() > limits.max_texts || tokens + job_tokens > limits.max_tokens
            {
                carried = Some(job);
                break;
            }
            texts += job.texts.len();
            tokens += job_tokens;
            batch.push(job);
        }
        let sizes: Vec<usize> = batch.iter().map(|j| j.texts.len()).collect();
        let (inputs, replies): (Vec<Vec<String>>, Vec<_>) =
            batch.into_iter().map(|j| (j.texts, j.reply)).unzip();
        let inputs: Vec<String> = inputs.into_iter().flatten().collect();
        let model = model.clone();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            model.embed(&refs)
        })
        .await;
        batches.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("embed_inference_duration_seconds", "provider" => "local")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("embed_batch_texts", "provider" => "local").record(texts as f64);
        metrics::counter!("embed_model_inputs_total", "provider" => "local")
            .increment(texts as u64);
        match result {
            Ok(Ok(vectors)) => {
                let mut vectors = vectors.into_iter();
                for (reply, size) in replies.into_iter().zip(sizes) {
                    let _ = reply.send(Ok(vectors.by_ref().take(size).collect()));
                }
            }
            Ok(Err(err)) => {
                for reply in replies {
                    let _ = reply.send(Err(Error::Internal(format!("inference failed: {err:#}"))));
                }
            }
            Err(err) => {
                for reply in replies {
                    let _ = reply.send(Err(Error::Internal(format!(
                        "inference task failed: {err}"
                    ))));
                }
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

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedded>> {
        let (reply, answer) = oneshot::channel();
        self.queue
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
        metrics::gauge!("embed_queue_calls")
            .set((self.queue.max_capacity() - self.queue.capacity()) as f64);
        answer
            .await
            .map_err(|_| Error::Unavailable("the model is shutting down".to_owned()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MINILM_L6_V2, default_models_dir, ensure_model};

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
                        .embed(vec![format!("sentence number {i} about batching")])
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
                tokio::spawn(async move { provider.embed(vec![text]).await })
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
                tokio::spawn(async move { provider.embed(texts).await })
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
                .embed(vec!["after the flood".into()])
                .await
                .unwrap()
                .len(),
            1
        );
    }
}
