//! The embedding front end: validates a request, answers what it can from the cache, sends the
//! rest to the model's provider, and fills the cache.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cache::{self, CachedVector, EmbeddingCache};
use crate::error::{Error, Result};
use crate::provider::{InputKind, ModelDescriptor, Provider};

/// Most texts accepted in one call.
pub const MAX_BATCH: usize = 256;
/// Longest text accepted, in bytes (it is truncated to the model's token limit anyway; this
/// only bounds memory).
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Result of embedding a batch.
#[derive(Debug, Clone)]
pub struct EmbedOutput {
    /// One vector per input, in order.
    pub vectors: Vec<CachedVector>,
    /// Model that produced them.
    pub model: String,
    /// Vector length.
    pub dimension: usize,
    /// Inputs answered from the cache.
    pub cache_hits: usize,
}

/// Routes requests to providers by model id, through the cache.
pub struct Embedder {
    providers: HashMap<String, Arc<dyn Provider>>,
    default_model: String,
    cache: EmbeddingCache,
}

impl Embedder {
    /// An embedder with one provider, which is also the default model.
    pub fn new(provider: Arc<dyn Provider>, cache: EmbeddingCache) -> Self {
        let default_model = provider.descriptor().id.clone();
        let mut providers = HashMap::new();
        providers.insert(default_model.clone(), provider);
        Self {
            providers,
            default_model,
            cache,
        }
    }

    /// Registers another model (not the default), e.g. an OpenAI-compatible endpoint.
    /// A model id already taken keeps its provider: a remote model must not shadow the local one.
    pub fn add(&mut self, provider: Arc<dyn Provider>) {
        let id = provider.descriptor().id.clone();
        if self.providers.contains_key(&id) {
            tracing::warn!(model = %id, "a model with this id is already served; not adding another");
            return;
        }
        self.providers.insert(id, provider);
    }

    /// Finds the provider of `model` (empty = default).
    pub fn provider(&self, model: &str) -> Result<&Arc<dyn Provider>> {
        let id = if model.is_empty() {
            self.default_model.as_str()
        } else {
            model
        };
        self.providers.get(id).ok_or_else(|| {
            let mut known: Vec<_> = self.providers.keys().cloned().collect();
            known.sort();
            Error::invalid(
                "model",
                format!("unknown model {id:?}; available: {}", known.join(", ")),
            )
        })
    }

    /// Describes a model (empty = default).
    pub fn describe(&self, model: &str) -> Result<ModelDescriptor> {
        Ok(self.provider(model)?.descriptor().clone())
    }

    /// Embeds `texts` as `kind` with `model` (empty = default).
    pub async fn embed(
        &self,
        texts: Vec<String>,
        kind: InputKind,
        model: &str,
    ) -> Result<EmbedOutput> {
        let provider = self.provider(model)?.clone();
        validate(&texts)?;
        let descriptor = provider.descriptor();
        let prefix = match kind {
            InputKind::Query => &descriptor.query_prefix,
            InputKind::Document => &descriptor.document_prefix,
        };
        let keys: Vec<_> = texts
            .iter()
            .map(|t| cache::key(&descriptor.id, kind, t))
            .collect();
        let mut found = self.cache.get_many(&keys).await;
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| found[i].is_none()).collect();
        let cache_hits = texts.len() - missing.len();
        if !missing.is_empty() {
            // Duplicates within one request are embedded once.
            let mut unique: Vec<usize> = Vec::new();
            let mut slot_of: HashMap<&cache::CacheKey, usize> = HashMap::new();
            let mut slots = Vec::with_capacity(missing.len());
            for &i in &missing {
                let slot = *slot_of.entry(&keys[i]).or_insert_with(|| {
                    unique.push(i);
                    unique.len() - 1
                });
                slots.push(slot);
            }
            let inputs = unique
                .iter()
                .map(|&i| format!("{prefix}{}", texts[i]))
                .collect();
            let computed = provider.embed(inputs, kind).await?;
            if computed.len() != unique.len() {
                return Err(Error::Internal(format!(
                    "provider returned {} vectors for {} texts",
                    computed.len(),
                    unique.len()
                )));
            }
            let computed: Vec<CachedVector> = computed
                .into_iter()
                .map(|e| CachedVector {
                    values: e.values.into(),
                    truncated: e.truncated,
                })
                .collect();
            self.cache
                .insert_many(
                    unique
                        .iter()
                        .zip(&computed)
                        .map(|(&i, vector)| (keys[i], vector.clone()))
                        .collect(),
                )
                .await;
            for (&i, &slot) in missing.iter().zip(&slots) {
                found[i] = Some(computed[slot].clone());
            }
        }
        let vectors: Vec<CachedVector> = found
            .into_iter()
            .map(|v| v.expect("every slot filled"))
            .collect();
        Ok(EmbedOutput {
            vectors,
            model: descriptor.id.clone(),
            dimension: descriptor.dimension,
            cache_hits,
        })
    }
}

fn validate(texts: &[String]) -> Result<()> {
    if texts.is_empty() {
        return Err(Error::invalid("texts", "at least one text is required"));
    }
    if texts.len() > MAX_BATCH {
        return Err(Error::invalid(
            "texts",
            format!("{} texts given, at most {MAX_BATCH} per call", texts.len()),
        ));
    }
    for (i, text) in texts.iter().enumerate() {
        if text.trim().is_empty() {
            return Err(Error::invalid(format!("texts[{i}]"), "must not be empty"));
        }
        if text.len() > MAX_TEXT_BYTES {
            return Err(Error::invalid(
                format!("texts[{i}]"),
                format!("{} bytes, at most {MAX_TEXT_BYTES}", text.len()),
            ));
        }
    }
    Ok(())
}
