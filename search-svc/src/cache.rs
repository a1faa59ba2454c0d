//! The search-result cache, in two levels: memory (moka, bounded by bytes) and, when Redis is
//! configured, Redis (shared by every search-svc replica, TTL). Every key includes the knowledge
//! base's version, which every write through `IndexService` bumps, so a cached answer is never
//! served after its knowledge base changed: stale entries simply stop being asked for and age
//! out.
//!
//! Versions: a local counter per collection (bumped by the writes this replica serves) and, with
//! Redis, a shared one (`INCR` by whichever replica serves the write), read on every search.
//! The memory level keys on both, so this replica never serves an answer older than a write it
//! saw; the Redis level keys on the shared one only (other replicas cannot know our local one).
//! If an `INCR` fails, the shared version missed a write: the Redis level is bypassed for that
//! collection until a later `INCR` succeeds. Redis unreachable: bypassed and counted, never an
//! error.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use smartdb_kit::redis::{Redis, redis};
use tracing::Instrument;

use crate::search::SearchAnswer;

/// Prefix of the per-collection version counters. It never changes: replicas of two releases
/// (a rolling upgrade) must count writes in the same keys.
const REDIS_PREFIX: &str = "smartdb:search:v1:";
/// Prefix of cached answers; the number changes with the answer's layout (v2: hits carry heading
/// paths, byte offsets and pages), so an answer cached by an older release is never served.
const ANSWER_PREFIX: &str = "smartdb:search:answer:v2:";

/// A collection's version: local writes, and shared writes when Redis answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    /// Writes this replica served.
    pub local: u64,
    /// Writes any replica served (Redis), if known.
    pub shared: Option<u64>,
}

/// Per-collection version counters, and the order of visibility changes against searches.
pub struct Versions {
    local: Mutex<HashMap<String, u64>>,
    redis: Option<Arc<Redis>>,
    /// Collections whose shared version missed a write (an `INCR` failed).
    missed: Mutex<HashSet<String>>,
    /// Held (shared) by a search from reading a collection's hidden documents until its index
    /// queries are done, and (exclusive) by a change of hidden documents: a search then runs
    /// all its legs against one visibility, and a document hidden before its points are
    /// written is never seen half-written. It holds the number of changes so far, so that a
    /// search can tell whether a leg it ran earlier saw the visibility it has now.
    visibility: tokio::sync::RwLock<u64>,
}

fn version_key(collection_id: &str) -> String {
    format!("{REDIS_PREFIX}version:{collection_id}")
}

impl Versions {
    /// Counters in memory, and in Redis if given.
    pub fn new(redis: Option<Arc<Redis>>) -> Self {
        Self {
            local: Mutex::new(HashMap::new()),
            redis,
            missed: Mutex::new(HashSet::new()),
            visibility: tokio::sync::RwLock::new(0),
        }
    }

    /// Shared hold of the visibility (see the field), for a search; derefs to its generation.
    pub async fn visibility(&self) -> tokio::sync::RwLockReadGuard<'_, u64> {
        self.visibility.read().await
    }

    /// Exclusive hold of the visibility, for a change of hidden documents: waits for the
    /// searches running against the current one, and starts the next generation.
    pub async fn change_visibility(&self) -> tokio::sync::RwLockWriteGuard<'_, u64> {
        let mut guard = self.visibility.write().await;
        *guard += 1;
        guard
    }

    fn local(&self, collection_id: &str) -> u64 {
        *self
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(collection_id)
            .unwrap_or(&0)
    }

    /// Current version of a collection.
    pub async fn get(&self, collection_id: &str) -> Version {
        let local = self.local(collection_id);
        let Some(redis) = &self.redis else {
            return Version {
                local,
                shared: None,
            };
        };
        let missed = self
            .missed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(collection_id);
        let shared = if missed {
            // Try to make up for the write the shared version missed.
            self.incr(redis, collection_id).await
        } else {
            let key = version_key(collection_id);
            match redis
                .run::<Option<u64>>(|c| {
                    Box::pin(async move { redis::cmd("GET").arg(key).query_async(c).await })
                })
                .await
            {
                Ok(v) => Some(v.unwrap_or(0)),
                Err(err) => {
                    redis.failed(&err);
                    None
                }
            }
        };
        Version { local, shared }
    }

    async fn incr(&self, redis: &Redis, collection_id: &str) -> Option<u64> {
        let key = version_key(collection_id);
        let result = redis
            .run::<u64>(|c| {
                Box::pin(async move { redis::cmd("INCR").arg(key).query_async(c).await })
            })
            .await;
        let mut missed = self.missed.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(v) => {
                missed.remove(collection_id);
                Some(v)
            }
            Err(err) => {
                redis.failed(&err);
                missed.insert(collection_id.to_owned());
                None
            }
        }
    }

    /// Marks a collection as changed (after the write is durable).
    pub async fn bump(&self, collection_id: &str) {
        *self
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(collection_id.to_owned())
            .or_insert(0) += 1;
        if let Some(redis) = &self.redis {
            self.incr(redis, collection_id).await;
        }
    }
}

/// What identifies one search answer.
pub struct QueryKey<'a> {
    /// Collection searched.
    pub collection_id: &'a str,
    /// Its version at lookup time.
    pub version: Version,
    /// Everything else that shapes the answer (query, mode, filters, paging), canonically.
    pub request: &'a str,
}

impl QueryKey<'_> {
    fn digest(&self, local: bool) -> [u8; 32] {
        let mut h = Sha256::new();
        let local = if local {
            self.version.local.to_string()
        } else {
            String::new()
        };
        let shared = self
            .version
            .shared
            .map(|v| v.to_string())
            .unwrap_or_default();
        for part in [self.collection_id, &local, &shared, self.request] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.finalize().into()
    }

    /// Key of the memory level: both versions.
    fn memory(&self) -> [u8; 32] {
        self.digest(true)
    }

    /// Key of the Redis level: the shared version only; None when it is unknown.
    fn shared(&self) -> Option<String> {
        self.version
            .shared
            .map(|_| format!("{ANSWER_PREFIX}{}", hex::encode(self.digest(false))))
    }
}

/// The two-level cache of search answers. The memory level is bounded by bytes (answers differ
/// a lot: up to the maximum top_k hits, each with up to the maximum chunk text and metadata).
pub struct ResultCache {
    memory: moka::sync::Cache<[u8; 32], SearchAnswer>,
    redis: Option<Arc<Redis>>,
    ttl_secs: u64,
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
                + p.heading_path.iter().map(|h| h.len() + 24).sum::<usize>()
                + metadata
                + 184
        })
        .sum();
    (hits + answer.embedding_model.len() + 128)
        .try_into()
        .unwrap_or(u32::MAX)
}

impl ResultCache {
    /// A cache holding at most `max_bytes` of answers in memory, each kept at most `ttl` (in
    /// Redis too, if given).
    pub fn new(max_bytes: u64, ttl: Duration, redis: Option<Arc<Redis>>) -> Self {
        Self {
            memory: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_key, answer: &SearchAnswer| answer_bytes(answer))
                .time_to_live(ttl)
                .build(),
            redis,
            ttl_secs: ttl.as_secs().max(1),
        }
    }

    /// Bytes the cached answers take in memory now (approximately; for tests and metrics).
    pub fn weighted_size(&self) -> u64 {
        self.memory.run_pending_tasks();
        self.memory.weighted_size()
    }

    /// A cached answer for `key`, if any: memory first, then Redis.
    pub async fn get(&self, key: &QueryKey<'_>) -> Option<SearchAnswer> {
        let level = |hit: bool, level: &'static str| {
            let outcome = if hit { "hit" } else { "miss" };
            metrics::counter!("search_cache_lookups_total", "level" => level, "outcome" => outcome)
                .increment(1);
        };
        if let Some(answer) = self.memory.get(&key.memory()) {
            level(true, "memory");
            metrics::counter!("search_cache_requests_total", "outcome" => "hit").increment(1);
            return Some(answer);
        }
        level(false, "memory");
        let found = match (&self.redis, key.shared()) {
            (Some(redis), Some(shared)) => {
                // A span for the shared level only: it is a network call, while an in-memory
                // hit costs less than a span would.
                let lookup = tracing::info_span!(
                    target: "smartdb::search",
                    "cache",
                    otel.name = "cache lookup",
                    level = "redis",
                );
                let bytes = redis
                    .run::<Option<Vec<u8>>>(|c| {
                        Box::pin(async move { redis::cmd("GET").arg(shared).query_async(c).await })
                    })
                    .instrument(lookup)
                    .await
                    .unwrap_or_else(|err| {
                        redis.failed(&err);
                        None
                    });
                // Undecodable (another release's layout): a miss, overwritten on insert.
                let answer = bytes.and_then(|b| serde_json::from_slice::<SearchAnswer>(&b).ok());
                level(answer.is_some(), "redis");
                if let Some(answer) = &answer {
                    self.memory.insert(key.memory(), answer.clone());
                }
                answer
            }
            _ => None,
        };
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("search_cache_requests_total", "outcome" => outcome).increment(1);
        found
    }

    /// Remembers an answer, in memory and in Redis.
    pub async fn insert(&self, key: &QueryKey<'_>, answer: SearchAnswer) {
        if let (Some(redis), Some(shared)) = (&self.redis, key.shared()) {
            match serde_json::to_vec(&answer) {
                Ok(bytes) => {
                    let ttl = self.ttl_secs;
                    if let Err(err) = redis
                        .run::<()>(|c| {
                            Box::pin(async move {
                                redis::cmd("SET")
                                    .arg(shared)
                                    .arg(bytes)
                                    .arg("EX")
                                    .arg(ttl)
                                    .query_async(c)
                                    .await
                            })
                        })
                        .await
                    {
                        redis.failed(&err);
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot serialize a search answer"),
            }
        }
        self.memory.insert(key.memory(), answer);
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

    #[tokio::test]
    async fn the_cache_is_bounded_by_bytes_not_entries() {
        // Each answer is ~300 KB; a 2 MB cache keeps only a handful, whatever the entry count.
        let cache = ResultCache::new(2 << 20, Duration::from_secs(600), None);
        for i in 0..50 {
            let query = format!("query {i}");
            let key = QueryKey {
                collection_id: "kb",
                version: Version {
                    local: 0,
                    shared: None,
                },
                request: &query,
            };
            cache.insert(&key, big_answer(i)).await;
        }
        let size = cache.weighted_size();
        assert!(size <= 2 << 20, "{size} bytes cached");
        assert!(
            size > 1 << 20,
            "the cache should still hold answers: {size}"
        );
        assert!(answer_bytes(&big_answer(0)) > 300_000);
    }

    #[tokio::test]
    async fn a_visibility_change_waits_for_searches_and_starts_a_new_generation() {
        let versions = Arc::new(Versions::new(None));
        let seen = *versions.visibility().await;
        let search = versions.visibility().await;
        let change = tokio::spawn({
            let versions = versions.clone();
            async move {
                let guard = versions.change_visibility().await;
                *guard
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!change.is_finished(), "a change waits for running searches");
        drop(search);
        let changed = change.await.unwrap();
        assert_eq!(changed, seen + 1);
        // A leg run before the change is told apart from one run after it.
        assert_ne!(*versions.visibility().await, seen);
    }

    #[tokio::test]
    async fn version_bump_changes_the_key() {
        let versions = Versions::new(None);
        let key = |v| {
            QueryKey {
                collection_id: "kb",
                version: v,
                request: "q",
            }
            .memory()
        };
        let before = key(versions.get("kb").await);
        versions.bump("kb").await;
        assert_ne!(before, key(versions.get("kb").await));
        assert_eq!(versions.get("other").await.local, 0);
    }

    /// The machine's Redis (see DEVELOPERS notes: it keeps nothing on disk).
    const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

    fn redis(url: &str) -> Arc<Redis> {
        Arc::new(
            Redis::new(
                url,
                Duration::from_millis(200),
                "test",
                "test_cache_errors_total",
            )
            .unwrap(),
        )
    }

    fn answer(text: &str) -> SearchAnswer {
        let mut a = big_answer(0);
        a.hits.truncate(1);
        a.hits[0].payload.text = text.into();
        a
    }

    /// Two replicas sharing Redis: a write through one invalidates the other's answers (memory
    /// and Redis), and an answer cached by one is a Redis hit for the other.
    #[tokio::test]
    async fn a_write_through_one_replica_invalidates_the_other() {
        let collection = uuid::Uuid::new_v4().to_string();
        let replica = || {
            let r = redis(SHARED_REDIS);
            (
                Versions::new(Some(r.clone())),
                ResultCache::new(1 << 20, Duration::from_secs(60), Some(r)),
            )
        };
        let (a_versions, a_cache) = replica();
        let (b_versions, b_cache) = replica();
        let key = |version| QueryKey {
            collection_id: &collection,
            version,
            request: "owls",
        };
        let v = a_versions.get(&collection).await;
        assert!(
            v.shared.is_some(),
            "the machine's Redis at {SHARED_REDIS} is needed"
        );
        a_cache.insert(&key(v), answer("old")).await;
        // B has never seen it: a Redis hit.
        let seen = b_cache.get(&key(b_versions.get(&collection).await)).await;
        assert_eq!(seen.unwrap().hits[0].payload.text, "old");
        // A write through B: A's next lookup uses the new shared version and misses.
        b_versions.bump(&collection).await;
        assert!(
            a_cache
                .get(&key(a_versions.get(&collection).await))
                .await
                .is_none()
        );
        assert!(
            b_cache
                .get(&key(b_versions.get(&collection).await))
                .await
                .is_none()
        );
    }

    /// Redis unreachable: lookups miss, writes still invalidate locally, nothing fails; and a
    /// write the shared version missed keeps the Redis level bypassed until it is made up.
    #[tokio::test]
    async fn without_redis_the_cache_goes_on_in_memory() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dead = redis(&format!("redis://127.0.0.1:{port}"));
        let versions = Versions::new(Some(dead.clone()));
        let cache = ResultCache::new(1 << 20, Duration::from_secs(60), Some(dead.clone()));
        let v = versions.get("kb").await;
        assert_eq!(v.shared, None);
        let key = |version| QueryKey {
            collection_id: "kb",
            version,
            request: "owls",
        };
        cache.insert(&key(v), answer("old")).await;
        assert!(
            cache.get(&key(versions.get("kb").await)).await.is_some(),
            "memory still works"
        );
        versions.bump("kb").await;
        assert!(
            cache.get(&key(versions.get("kb").await)).await.is_none(),
            "a local write invalidates"
        );
        assert!(dead.errors() >= 3);
        assert!(versions.missed.lock().unwrap().contains("kb"));
    }
}
