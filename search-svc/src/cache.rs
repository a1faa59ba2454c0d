//! The search-result cache. Every key includes the knowledge base's version, which every write
//! through `IndexService` bumps, so a cached answer is never served after its knowledge base
//! changed: stale entries simply stop being asked for and age out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::search::SearchAnswer;

/// Per-collection version counters (in memory: the cache is too, so both start fresh together).
#[derive(Default)]
pub struct Versions {
    inner: Mutex<HashMap<String, u64>>,
}

impl Versions {
    /// Current version of a collection.
    pub fn get(&self, collection_id: &str) -> u64 {
        *self
            .inner
            .lock()
            .expect("versions lock")
            .get(collection_id)
            .unwrap_or(&0)
    }

    /// Marks a collection as changed.
    pub fn bump(&self, collection_id: &str) {
        *self
            .inner
            .lock()
            .expect("versions lock")
            .entry(collection_id.to_owned())
            .or_insert(0) += 1;
    }
}

/// What identifies one search answer.
pub struct QueryKey<'a> {
    /// Collection searched.
    pub collection_id: &'a str,
    /// Its version at lookup time.
    pub version: u64,
    /// Everything else that shapes the answer (query, mode, filters, paging), canonically.
    pub request: &'a str,
}

impl QueryKey<'_> {
    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [self.collection_id, &self.version.to_string(), self.request] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.finalize().into()
    }
}

/// In-memory cache of search answers, bounded by their size in bytes (answers differ a lot:
/// up to the maximum top_k hits, each with up to the maximum chunk text and metadata).
pub struct ResultCache {
    memory: moka::sync::Cache<[u8; 32], SearchAnswer>,
}

/// Approximate memory of one cached answer, in bytes.
fn answer_bytes(answer: &SearchAnswer) -> u32 {
    let hits: usize = answer
        .hits
        .iter()
        .map(|hit| {
            let p = &hit.payload;
            let metadata: usize = p.metadata.iter().map(|(k, v)| k.len() + v.len() + 48).sum();
            p.document_id.len()
                + p.text.len()
                + p.title.len()
                + p.source_name.len()
                + metadata
                + 160
        })
        .sum();
    (hits + answer.embedding_model.len() + 128)
        .try_into()
        .unwrap_or(u32::MAX)
}

impl ResultCache {
    /// A cache holding at most `max_bytes` of answers, each kept at most `ttl`.
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        Self {
            memory: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_key, answer: &SearchAnswer| answer_bytes(answer))
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Bytes the cached answers take now (approximately; for tests and metrics).
    pub fn weighted_size(&self) -> u64 {
        self.memory.run_pending_tasks();
        self.memory.weighted_size()
    }

    /// A cached answer for `key`, if any.
    pub fn get(&self, key: &QueryKey<'_>) -> Option<SearchAnswer> {
        let hit = self.memory.get(&key.digest());
        let outcome = if hit.is_some() { "hit" } else { "miss" };
        metrics::counter!("search_cache_requests_total", "outcome" => outcome).increment(1);
        hit
    }

    /// Remembers an answer.
    pub fn insert(&self, key: &QueryKey<'_>, answer: SearchAnswer) {
        self.memory.insert(key.digest(), answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{ChunkPayload, ScoredChunk};

    fn big_answer(i: usize) -> SearchAnswer {
        SearchAnswer {
            hits: (0..100)
                .map(|n| ScoredChunk {
                    id: uuid::Uuid::new_v4(),
                    score: 0.5,
                    payload: ChunkPayload {
                        document_id: format!("doc-{i}"),
                        chunk_index: n,
                        text: "x".repeat(2000),
                        metadata: [("k".to_owned(), "v".repeat(1000))].into(),
                        ..ChunkPayload::default()
                    },
                })
                .collect(),
            embedding_model: "m".into(),
            mode: crate::search::Mode::Hybrid,
            degraded: None,
            next_offset: None,
        }
    }

    #[test]
    fn the_cache_is_bounded_by_bytes_not_entries() {
        // Each answer is ~300 KB; a 2 MB cache keeps only a handful, whatever the entry count.
        let cache = ResultCache::new(2 << 20, Duration::from_secs(600));
        for i in 0..50 {
            let query = format!("query {i}");
            let key = QueryKey {
                collection_id: "kb",
                version: 0,
                request: &query,
            };
            cache.insert(&key, big_answer(i));
        }
        let size = cache.weighted_size();
        assert!(size <= 2 << 20, "{size} bytes cached");
        assert!(
            size > 1 << 20,
            "the cache should still hold answers: {size}"
        );
        assert!(answer_bytes(&big_answer(0)) > 300_000);
    }

    #[test]
    fn version_bump_changes_the_key() {
        let versions = Versions::default();
        let key = |v| {
            QueryKey {
                collection_id: "kb",
                version: v,
                request: "q",
            }
            .digest()
        };
        let before = key(versions.get("kb"));
        versions.bump("kb");
        assert_ne!(before, key(versions.get("kb")));
        assert_eq!(versions.get("other"), 0);
    }
}
