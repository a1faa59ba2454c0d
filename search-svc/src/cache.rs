//! The search-result cache. Every key includes the knowledge base's version, which every write
//! through `IndexService` bumps, so a cached answer is never served after its knowledge base
//! changed: stale entries simply stop being asked for and age out.

use std::collections::{BTreeMap, HashMap};
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
    /// The query text.
    pub query: &'a str,
    /// Hits asked for.
    pub top_k: usize,
    /// Metadata filter.
    pub filter: &'a BTreeMap<String, String>,
    /// Document filter.
    pub document_ids: &'a [String],
}

impl QueryKey<'_> {
    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [
            self.collection_id,
            &self.version.to_string(),
            self.query,
            &self.top_k.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for (k, v) in self.filter {
            h.update(k.as_bytes());
            h.update([1]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        for id in self.document_ids {
            h.update(id.as_bytes());
            h.update([2]);
        }
        h.finalize().into()
    }
}

/// In-memory cache of search answers.
pub struct ResultCache {
    memory: moka::sync::Cache<[u8; 32], SearchAnswer>,
}

impl ResultCache {
    /// A cache of at most `entries` answers, each kept at most `ttl`.
    pub fn new(entries: u64, ttl: Duration) -> Self {
        Self {
            memory: moka::sync::Cache::builder()
                .max_capacity(entries)
                .time_to_live(ttl)
                .build(),
        }
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

    #[test]
    fn version_bump_changes_the_key() {
        let versions = Versions::default();
        let filter = BTreeMap::new();
        let key = |v| {
            QueryKey {
                collection_id: "kb",
                version: v,
                query: "q",
                top_k: 10,
                filter: &filter,
                document_ids: &[],
            }
            .digest()
        };
        let before = key(versions.get("kb"));
        versions.bump("kb");
        assert_ne!(before, key(versions.get("kb")));
        assert_eq!(versions.get("other"), 0);
    }
}
