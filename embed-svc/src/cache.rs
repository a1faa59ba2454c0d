//! The embedding cache: the same (model, input kind, text) is never embedded twice while it
//! stays cached. Two levels: in memory (`moka`, bounded by bytes) and, optionally, Redis, which
//! outlives restarts and is shared by every replica. Redis is best effort: when it is down or
//! slow the cache quietly falls back to memory only, since a cache must never fail an embed.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use smartdb_kit::redis::redis;

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

/// Default time an embedding stays in Redis.
pub const DEFAULT_REDIS_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default bound on one Redis call (pool checkout included), so a hung Redis cannot stall
/// embedding: a miss costs at most this much on top of computing the vector.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);

/// Versioned so a change of the value layout can never be misread by older replicas.
const REDIS_KEY_PREFIX: &str = "smartdb:emb:v1:";
/// Bit 0 of the value's first byte: the text was truncated.
const FLAG_TRUNCATED: u8 = 1;

/// Settings of the Redis (second-level) cache.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Redis URL (`redis://host:port/db`).
    pub url: String,
    /// How long an embedding stays in Redis.
    pub ttl: Duration,
    /// Bound on each Redis call.
    pub timeout: Duration,
}

impl RedisSettings {
    /// Settings for `url` with the default TTL and timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ttl: DEFAULT_REDIS_TTL,
            timeout: DEFAULT_REDIS_TIMEOUT,
        }
    }
}

/// Embedding cache: memory first, then (if configured) Redis.
#[derive(Clone)]
pub struct EmbeddingCache {
    memory: moka::sync::Cache<CacheKey, CachedVector>,
    redis: Option<Arc<RedisLevel>>,
}

impl EmbeddingCache {
    /// A memory-only cache holding at most about `capacity_bytes` of vectors.
    pub fn new(capacity_bytes: u64) -> Self {
        let memory = moka::sync::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_key: &CacheKey, value: &CachedVector| {
                u32::try_from(value.values.len() * 4 + 64).unwrap_or(u32::MAX)
            })
            .build();
        Self {
            memory,
            redis: None,
        }
    }

    /// A memory cache of `capacity_bytes` backed by Redis. Does not connect (Redis may come up
    /// later); fails only on an invalid URL.
    pub fn with_redis(capacity_bytes: u64, settings: &RedisSettings) -> anyhow::Result<Self> {
        let mut cache = Self::new(capacity_bytes);
        cache.redis = Some(Arc::new(RedisLevel::new(settings)?));
        Ok(cache)
    }

    /// Looks up many keys; `None` where missing. Memory misses are asked of Redis in one
    /// round trip, and Redis hits are kept in memory.
    pub async fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<CachedVector>> {
        let mut found: Vec<_> = keys.iter().map(|k| self.memory.get(k)).collect();
        let hits = found.iter().filter(|f| f.is_some()).count() as u64;
        metrics::counter!("embed_cache_hits_total", "level" => "memory").increment(hits);
        metrics::counter!("embed_cache_misses_total", "level" => "memory")
            .increment(keys.len() as u64 - hits);

        let Some(redis) = &self.redis else {
            return found;
        };
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        if missing.is_empty() {
            return found;
        }
        let missing_keys: Vec<CacheKey> = missing.iter().map(|&i| keys[i]).collect();
        let from_redis = redis.get_many(&missing_keys).await;
        let mut redis_hits = 0u64;
        for (&i, value) in missing.iter().zip(from_redis) {
            if let Some(value) = value {
                self.memory.insert(keys[i], value.clone());
                found[i] = Some(value);
                redis_hits += 1;
            }
        }
        metrics::counter!("embed_cache_hits_total", "level" => "redis").increment(redis_hits);
        metrics::counter!("embed_cache_misses_total", "level" => "redis")
            .increment(missing.len() as u64 - redis_hits);
        found
    }

    /// Stores entries in memory and (in one round trip) in Redis.
    pub async fn insert_many(&self, entries: Vec<(CacheKey, CachedVector)>) {
        if entries.is_empty() {
            return;
        }
        for (key, value) in &entries {
            self.memory.insert(*key, value.clone());
        }
        if let Some(redis) = &self.redis {
            redis.set_many(&entries).await;
        }
    }

    /// Redis calls that failed (or timed out) since this cache was made; 0 without Redis.
    pub fn redis_errors(&self) -> u64 {
        self.redis.as_ref().map_or(0, |r| r.client.errors())
    }
}

/// The Redis level (kit's bounded, failure-quiet client) with this cache's TTL.
struct RedisLevel {
    client: smartdb_kit::redis::Redis,
    ttl_secs: u64,
}

impl RedisLevel {
    fn new(settings: &RedisSettings) -> anyhow::Result<Self> {
        Ok(Self {
            client: smartdb_kit::redis::Redis::new(
                &settings.url,
                settings.timeout,
                "embedding cache",
                "embed_cache_errors_total",
            )?,
            // `SET EX 0` is an error; a sub-second TTL means "as short as possible".
            ttl_secs: settings.ttl.as_secs().max(1),
        })
    }

    /// MGET of `keys`; all `None` when Redis fails.
    async fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<CachedVector>> {
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(redis_key(key));
        }
        match self
            .client
            .run::<Vec<Option<Vec<u8>>>>(|conn| {
                Box::pin(async move { cmd.query_async(conn).await })
            })
            .await
        {
            Ok(values) if values.len() == keys.len() => values
                .into_iter()
                .map(|v| {
                    v.and_then(|bytes| {
                        let decoded = decode(&bytes);
                        if decoded.is_none() {
                            // Treated as a miss; the next insert overwrites it.
                            tracing::debug!("undecodable embedding in Redis");
                        }
                        decoded
                    })
                })
                .collect(),
            Ok(values) => {
                self.client.failed(&format!(
                    "MGET returned {} values for {} keys",
                    values.len(),
                    keys.len()
                ));
                vec![None; keys.len()]
            }
            Err(err) => {
                self.client.failed(&err);
                vec![None; keys.len()]
            }
        }
    }

    /// SET EX of every entry in one pipeline; skipped when Redis fails.
    async fn set_many(&self, entries: &[(CacheKey, CachedVector)]) {
        let mut pipe = redis::pipe();
        for (key, value) in entries {
            pipe.cmd("SET")
                .arg(redis_key(key))
                .arg(encode(value))
                .arg("EX")
                .arg(self.ttl_secs)
                .ignore();
        }
        if let Err(err) = self
            .client
            .run::<()>(|conn| Box::pin(async move { pipe.query_async(conn).await }))
            .await
        {
            self.client.failed(&err);
        }
    }
}

fn redis_key(key: &CacheKey) -> String {
    format!("{REDIS_KEY_PREFIX}{}", hex::encode(key))
}

/// Value layout: one flags byte, then the vector as little-endian f32s.
fn encode(value: &CachedVector) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + value.values.len() * 4);
    out.push(if value.truncated { FLAG_TRUNCATED } else { 0 });
    for x in value.values.iter() {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn decode(bytes: &[u8]) -> Option<CachedVector> {
    let (&flags, rest) = bytes.split_first()?;
    if flags & !FLAG_TRUNCATED != 0 || rest.len() % 4 != 0 {
        return None;
    }
    let values: Arc<[f32]> = rest
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some(CachedVector {
        values,
        truncated: flags & FLAG_TRUNCATED != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn key_depends_on_model_kind_and_text() {
        let k = key("m", InputKind::Query, "hello");
        assert_eq!(k, key("m", InputKind::Query, "hello"));
        assert_ne!(k, key("m", InputKind::Document, "hello"));
        assert_ne!(k, key("m2", InputKind::Query, "hello"));
        assert_ne!(k, key("m", InputKind::Query, "hello!"));
    }

    fn vector(values: &[f32], truncated: bool) -> CachedVector {
        CachedVector {
            values: values.into(),
            truncated,
        }
    }

    #[tokio::test]
    async fn cache_round_trips() {
        let cache = EmbeddingCache::new(1 << 20);
        let k = key("m", InputKind::Document, "x");
        assert!(cache.get_many(&[k]).await[0].is_none());
        cache
            .insert_many(vec![(k, vector(&[1.0, 2.0], false))])
            .await;
        assert_eq!(
            &*cache.get_many(&[k]).await[0].as_ref().unwrap().values,
            &[1.0, 2.0]
        );
    }

    #[test]
    fn value_encoding_round_trips() {
        let v = vector(&[1.5, -0.25, f32::MIN_POSITIVE], true);
        let bytes = encode(&v);
        assert_eq!(bytes.len(), 1 + 3 * 4);
        let back = decode(&bytes).unwrap();
        assert_eq!(&*back.values, &*v.values);
        assert!(back.truncated);
        assert!(!decode(&encode(&vector(&[], false))).unwrap().truncated);
        assert!(decode(&[]).is_none());
        assert!(decode(&[0, 1, 2]).is_none());
        assert!(decode(&[2, 0, 0, 0, 0]).is_none());
    }

    const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

    /// A model id no other test run uses, so keys in the shared Redis never collide.
    fn unique_model() -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!(
            "test-model-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Short TTL so keys left in the shared Redis expire soon.
    fn settings(url: &str) -> RedisSettings {
        RedisSettings {
            url: url.to_string(),
            ttl: Duration::from_secs(120),
            timeout: Duration::from_millis(100),
        }
    }

    #[tokio::test]
    async fn fresh_memory_is_filled_from_redis() {
        let model = unique_model();
        let a = EmbeddingCache::with_redis(1 << 20, &settings(SHARED_REDIS)).unwrap();
        let b = EmbeddingCache::with_redis(1 << 20, &settings(SHARED_REDIS)).unwrap();
        let k1 = key(&model, InputKind::Document, "one");
        let k2 = key(&model, InputKind::Query, "two");
        let absent = key(&model, InputKind::Query, "absent");
        a.insert_many(vec![
            (k1, vector(&[1.0, 2.0, 3.0], false)),
            (k2, vector(&[4.0], true)),
        ])
        .await;

        let got = b.get_many(&[k1, absent, k2, k1]).await;
        assert_eq!(&*got[0].as_ref().unwrap().values, &[1.0, 2.0, 3.0]);
        assert!(!got[0].as_ref().unwrap().truncated);
        assert!(got[1].is_none());
        assert_eq!(&*got[2].as_ref().unwrap().values, &[4.0]);
        assert!(got[2].as_ref().unwrap().truncated);
        assert!(got[3].is_some());
        // Promoted: found in memory without asking Redis.
        assert!(b.memory.get(&k1).is_some());
        assert!(b.memory.get(&absent).is_none());
        assert_eq!(a.redis_errors() + b.redis_errors(), 0);
    }

    #[tokio::test]
    async fn redis_entries_get_the_ttl() {
        let model = unique_model();
        let cache = EmbeddingCache::with_redis(1 << 20, &settings(SHARED_REDIS)).unwrap();
        let k = key(&model, InputKind::Document, "ttl");
        cache.insert_many(vec![(k, vector(&[0.5], false))]).await;

        let client = redis::Client::open(SHARED_REDIS).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let ttl: i64 = redis::cmd("TTL")
            .arg(redis_key(&k))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!((1..=120).contains(&ttl), "ttl {ttl}");
        let raw: Vec<u8> = redis::cmd("GET")
            .arg(redis_key(&k))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(raw, encode(&vector(&[0.5], false)));
    }

    /// A `redis-server` of our own, killed when dropped.
    struct RedisProcess {
        child: std::process::Child,
        port: u16,
    }

    impl RedisProcess {
        fn start(port: u16) -> Self {
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let process = Self { child, port };
            let until = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < until, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            process
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        fn stop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for RedisProcess {
        fn drop(&mut self) {
            self.stop();
        }
    }

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn survives_redis_going_away_and_uses_it_again() {
        let model = unique_model();
        let port = free_port();
        let mut server = RedisProcess::start(port);
        let url = server.url();
        let cache = EmbeddingCache::with_redis(1 << 20, &settings(&url)).unwrap();
        let before = key(&model, InputKind::Document, "before");
        cache
            .insert_many(vec![(before, vector(&[1.0], false))])
            .await;
        let fresh = EmbeddingCache::with_redis(1 << 20, &settings(&url)).unwrap();
        assert!(fresh.get_many(&[before]).await[0].is_some());
        assert_eq!(cache.redis_errors(), 0);

        server.stop();
        // Memory still answers; Redis misses and failed writes are not errors to the caller.
        let during = key(&model, InputKind::Document, "during");
        let started = Instant::now();
        let got = cache.get_many(&[before, during]).await;
        assert!(got[0].is_some());
        assert!(got[1].is_none());
        cache
            .insert_many(vec![(during, vector(&[2.0], false))])
            .await;
        assert!(cache.get_many(&[during]).await[0].is_some());
        assert!(started.elapsed() < Duration::from_secs(2));
        let errors = cache.redis_errors();
        assert!(errors >= 2, "errors {errors}");

        let _server = RedisProcess::start(port);
        let after = key(&model, InputKind::Document, "after");
        cache.insert_many(vec![(after, vector(&[3.0], true))]).await;
        let fresh = EmbeddingCache::with_redis(1 << 20, &settings(&url)).unwrap();
        let got = fresh.get_many(&[after]).await;
        let got = got[0].as_ref().expect("found in the restarted Redis");
        assert_eq!(&*got.values, &[3.0]);
        assert!(got.truncated);
        assert_eq!(
            cache.redis_errors(),
            errors,
            "no failure once Redis is back"
        );
    }
}
