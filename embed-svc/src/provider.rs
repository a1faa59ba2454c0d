//! Embedding providers: where vectors are computed. `local` runs the model in-process; later
//! providers (OpenAI-compatible endpoints) implement the same trait.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

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

/// The in-process model. Inference runs on the blocking pool; a bounded queue in front of it
/// answers RESOURCE_EXHAUSTED instead of growing without limit.
pub struct LocalProvider {
    model: Arc<LocalModel>,
    descriptor: ModelDescriptor,
    /// One inference at a time: the model already uses every core for one batch.
    running: Arc<Semaphore>,
    /// Calls allowed to wait for the model; beyond that, callers are told to back off.
    queue: Arc<Semaphore>,
}

impl LocalProvider {
    /// Wraps a loaded model, with room for `queue_depth` waiting calls.
    pub fn new(model: LocalModel, queue_depth: usize) -> Self {
        let descriptor = ModelDescriptor {
            id: model.id().to_owned(),
            dimension: model.dimension(),
            max_input_tokens: model.max_tokens(),
            provider: "local",
            query_prefix: String::new(),
            document_prefix: String::new(),
        };
        Self {
            model: Arc::new(model),
            descriptor,
            running: Arc::new(Semaphore::new(1)),
            queue: Arc::new(Semaphore::new(queue_depth.max(1))),
        }
    }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn descriptor(&self) -> &ModelDescriptor {
        &self.descriptor
    }

    fn tokenizer_json(&self) -> Option<String> {
        Some(self.model.tokenizer_json())
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedded>> {
        let _queued =
            self.queue
                .clone()
                .try_acquire_owned()
                .map_err(|_| Error::ResourceExhausted {
                    message: "embedding queue is full; retry shortly".to_owned(),
                    retry_after: Duration::from_millis(200),
                })?;
        let _running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Unavailable("shutting down".into()))?;
        let model = self.model.clone();
        let started = std::time::Instant::now();
        let count = texts.len();
        let out = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            model.embed(&refs)
        })
        .await
        .map_err(|e| Error::Internal(format!("inference task failed: {e}")))?
        .map_err(|e| Error::Internal(format!("inference failed: {e:#}")))?;
        metrics::histogram!("embed_inference_duration_seconds", "provider" => "local")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("embed_model_inputs_total", "provider" => "local")
            .increment(count as u64);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MINILM_L6_V2, default_models_dir, ensure_model};

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
        // At most `queue_depth` calls wait; the rest are told to back off at once.
        assert!(ok >= 1 && ok <= 3, "{ok} calls ran");
        assert!(refused >= 9, "{refused} calls refused");
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
