//! Redis as an optional helper (shared caches, shared counters): every call bounded by a short
//! timeout, failures counted and logged at most every 30 s, never turned into errors for
//! callers. Used by embed-svc's embedding cache and search-svc's result cache.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use deadpool_redis::redis;

/// Failures are logged at most this often (each counted in metrics).
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Why a Redis call was skipped.
#[derive(Debug, thiserror::Error)]
pub enum RedisFailure {
    /// No connection could be had in time.
    #[error("no connection: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    /// The command failed.
    #[error("{0}")]
    Command(#[from] redis::RedisError),
    /// No answer within the timeout.
    #[error("timed out")]
    Timeout,
}

/// A pooled Redis client whose calls never take longer than `timeout`.
pub struct Redis {
    pool: deadpool_redis::Pool,
    timeout: Duration,
    /// What uses it, for logs (e.g. "search result cache").
    what: &'static str,
    /// Counter of failures, e.g. `search_cache_errors_total` (label `level="redis"`).
    errors_metric: &'static str,
    errors: AtomicU64,
    /// Failures not yet reported in a log line.
    unlogged_errors: AtomicU64,
    last_error_log: Mutex<Option<Instant>>,
    /// Set after a failure so the recovery is logged once.
    degraded: AtomicBool,
}

/// A boxed Redis call on one connection.
pub type Call<'c, T> = Pin<Box<dyn Future<Output = redis::RedisResult<T>> + Send + 'c>>;

impl Redis {
    /// A client of `url` (connections are made on first use, so Redis may come up later).
    pub fn new(
        url: &str,
        timeout: Duration,
        what: &'static str,
        errors_metric: &'static str,
    ) -> anyhow::Result<Self> {
        let mut config = deadpool_redis::Config::from_url(url.to_owned());
        let mut pool = deadpool_redis::PoolConfig::new(16);
        // Checkout, connect and the health check (PING) of a reused connection are all bounded,
        // on top of the overall deadline per call.
        pool.timeouts = deadpool_redis::Timeouts {
            wait: Some(timeout),
            create: Some(timeout),
            recycle: Some(timeout),
        };
        config.pool = Some(pool);
        let pool = config
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| anyhow::anyhow!("invalid Redis URL for the {what}: {e}"))?;
        Ok(Self {
            pool,
            timeout,
            what,
            errors_metric,
            errors: AtomicU64::new(0),
            unlogged_errors: AtomicU64::new(0),
            last_error_log: Mutex::new(None),
            degraded: AtomicBool::new(false),
        })
    }

    /// Runs one call on a pooled connection within the timeout. A connection whose call failed
    /// or timed out is dropped rather than returned, so a broken one cannot stick in the pool
    /// (its state after a cancelled call is unknown anyway).
    pub async fn run<T>(
        &self,
        call: impl for<'c> FnOnce(&'c mut deadpool_redis::Connection) -> Call<'c, T>,
    ) -> Result<T, RedisFailure> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut conn = tokio::time::timeout_at(deadline, self.pool.get())
            .await
            .map_err(|_| RedisFailure::Timeout)??;
        let result = match tokio::time::timeout_at(deadline, call(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(RedisFailure::Command(err)),
            Err(_) => Err(RedisFailure::Timeout),
        };
        if result.is_err() {
            drop(deadpool_redis::Connection::take(conn));
        } else if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!(what = self.what, "Redis reachable again");
        }
        result
    }

    /// Counts a failure; logs it unless one was logged in the last 30 s.
    pub fn failed(&self, err: &dyn std::fmt::Display) {
        metrics::counter!(self.errors_metric, "level" => "redis").increment(1);
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.unlogged_errors.fetch_add(1, Ordering::Relaxed);
        self.degraded.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = self
            .last_error_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| now.duration_since(at) >= ERROR_LOG_INTERVAL) {
            *last = Some(now);
            let errors = self.unlogged_errors.swap(0, Ordering::Relaxed);
            tracing::warn!(
                error = %err,
                errors_since_last_report = errors,
                what = self.what,
                "Redis unavailable; going on without it"
            );
        }
    }

    /// Calls that failed (or timed out) so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}
