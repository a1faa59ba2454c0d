//! The embedding cache: the same (model, input kind, text) is never embedded twice while it
//! stays cached. In memory (`moka`), bounded by bytes.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::provider::InputKind;

/// Cache key: SHA-256 of (model id, input kind, text), so keys are small and fixed-size.
pub type CacheKey = [u8; 32];

/// A cached embedding.
#[derive(Debug, Clone)]
pub struct CachedVector {
    /// The vector.
    pub values: Arc<[f32]>,
    /// Whether the text was truncated when it was embedded.
    pub truncated: bool,
}

/// Computes the cache key of one input.
pub fn key(model: &str, kind: InputKind, text: &str) -> CacheKey {
    let mut hasher = Sha256::new();
    hasher.update(model.as_bytes());
    hasher.update([0, kind as u8, 0]);
    hasher.update(text.as_bytes());
    hasher.finalize().into()
}

/// In-memory embedding cache bounded by the bytes its vectors take.
#[derive(Clone)]
pub struct EmbeddingCache {
    memory: moka::sync::Cache<CacheKey, CachedVector>,
}

impl EmbeddingCache {
    /// A cache holding at most about `capacity_bytes` of vectors.
    pub fn new(capacity_bytes: u64) -> Self {
        let memory = moka::sync::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_key: &CacheKey, value: &CachedVector| {
                u32::try_from(value.values.len() * 4 + 64).unwrap_or(u32::MAX)
            })
            .build();
        Self { memory }
    }

    /// Looks up many keys; `None` where missing.
    pub fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<CachedVector>> {
        let found: Vec<_> = keys.iter().map(|k| self.memory.get(k)).collect();
        let hits = found.iter().filter(|f| f.is_some()).count() as u64;
        metrics::counter!("embed_cache_hits_total", "level" => "memory").increment(hits);
        metrics::counter!("embed_cache_misses_total", "level" => "memory")
            .increment(keys.len() as u64 - hits);
        found
    }

    /// Stores one entry.
    pub fn insert(&self, key: CacheKey, value: CachedVector) {
        self.memory.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_model_kind_and_text() {
        let k = key("m", InputKind::Query, "hello");
        assert_eq!(k, key("m", InputKind::Query, "hello"));
        assert_ne!(k, key("m", InputKind::Document, "hello"));
        assert_ne!(k, key("m2", InputKind::Query, "hello"));
        assert_ne!(k, key("m", InputKind::Query, "hello!"));
    }

    #[test]
    fn cache_round_trips() {
        let cache = EmbeddingCache::new(1 << 20);
        let k = key("m", InputKind::Document, "x");
        assert!(cache.get_many(&[k])[0].is_none());
        cache.insert(
            k,
            CachedVector {
                values: vec![1.0, 2.0].into(),
                truncated: false,
            },
        );
        assert_eq!(
            &*cache.get_many(&[k])[0].as_ref().unwrap().values,
            &[1.0, 2.0]
        );
    }
}
