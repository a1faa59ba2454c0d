//! Retries of typed requests (prost messages clone; HTTP bodies do not), as a
//! `tower::retry::Policy`: only idempotent calls, only failures that may pass (UNAVAILABLE;
//! RESOURCE_EXHAUSTED when the server gave a retry hint), exponential backoff with full jitter
//! (`tokio-retry`'s strategy, capped), a retry budget shared by all calls to the downstream so
//! retries can never multiply load, and never past the caller's deadline: each retry gets the
//! time that is left, and none starts without enough of it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_retry::strategy::{ExponentialBackoff, jitter};
use tower::retry::budget::{Budget, TpsBudget};

use crate::status::{Failure, classify};

/// How a downstream's calls are retried.
#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// Retries after the first attempt, at most.
    pub max_retries: u32,
    /// Backoff before the first retry (before jitter); doubles for each further retry.
    pub base: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Share of recent calls that may be retries (the budget), e.g. 0.2.
    pub budget_percent: f32,
    /// Retries allowed per second whatever the share (so a quiet service can still retry).
    pub budget_min_per_sec: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_retries: 2,
            base: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            budget_percent: 0.2,
            budget_min_per_sec: 10,
        }
    }
}

/// Least time worth starting an attempt with.
const MIN_ATTEMPT: Duration = Duration::from_millis(5);

/// The retry budget of one downstream, shared by all its calls.
pub fn budget(settings: &RetrySettings) -> Arc<TpsBudget> {
    Arc::new(TpsBudget::new(
        Duration::from_secs(10),
        settings.budget_min_per_sec,
        settings.budget_percent.clamp(0.0, 1000.0),
    ))
}

/// The backoffs before each retry: `base`, doubling, capped, each with full jitter.
/// (`from_millis(2)` raises 2 ms to the power of the attempt; `factor` scales that to the base.)
fn backoffs(settings: &RetrySettings) -> impl Iterator<Item = Duration> + Clone {
    let factor = (settings.base.as_millis() as u64 / 2).max(1);
    ExponentialBackoff::from_millis(2)
        .factor(factor)
        .max_delay(settings.max_backoff)
        .map(jitter)
}

/// The policy of one call.
#[derive(Clone)]
pub struct RetryPolicy<B> {
    downstream: &'static str,
    method: &'static str,
    idempotent: bool,
    deadline: Instant,
    retries: u32,
    max_retries: u32,
    backoffs: B,
    budget: Arc<TpsBudget>,
}

/// A policy for one call of `method` to `downstream`, which must be done by `deadline`.
pub fn policy(
    downstream: &'static str,
    method: &'static str,
    idempotent: bool,
    deadline: Instant,
    settings: &RetrySettings,
    budget: Arc<TpsBudget>,
) -> RetryPolicy<impl Iterator<Item = Duration> + Clone> {
    RetryPolicy {
        downstream,
        method,
        idempotent,
        deadline,
        retries: 0,
        max_retries: settings.max_retries,
        backoffs: backoffs(settings),
        budget,
    }
}

impl<B> RetryPolicy<B>
where
    B: Iterator<Item = Duration>,
{
    /// How long to wait before retrying after `status`, or None if the call must not be retried.
    fn decide(&mut self, status: &tonic::Status) -> Option<Duration> {
        if !self.idempotent {
            return None;
        }
        let hint = match classify(status) {
            Failure::Unavailable => Duration::ZERO,
            Failure::Overloaded { retry_after } => retry_after,
            _ => return None,
        };
        // The server knows better: it already retried its own dependency, or said when to come back.
        let hint = match crate::status::retry_pushback(status) {
            Some(None) => return None,
            Some(Some(pushback)) => hint.max(pushback),
            None => hint,
        };
        if self.retries >= self.max_retries {
            return None;
        }
        let wait = self.backoffs.next().unwrap_or_default().max(hint);
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left < wait + MIN_ATTEMPT {
            return None;
        }
        if !self.budget.withdraw() {
            metrics::counter!("client_retry_budget_exhausted_total", "downstream" => self.downstream)
                .increment(1);
            return None;
        }
        self.retries += 1;
        metrics::counter!("client_retries_total", "downstream" => self.downstream, "method" => self.method)
            .increment(1);
        Some(wait)
    }
}

/// A copy of a typed request: its message and its metadata (tenant, request id, deadline).
fn copy<M: Clone>(request: &tonic::Request<M>) -> tonic::Request<M> {
    let mut copy = tonic::Request::new(request.get_ref().clone());
    *copy.metadata_mut() = request.metadata().clone();
    copy
}

/// Sends `request` with `send`, retrying as `policy` says: the loop of `tower::retry::Retry`,
/// without its service wrapper and boxed attempts, and without copying the request of a call
/// that is never retried (copies of large embedding batches are not free).
pub async fn run<M, R, B, F, Fut>(
    mut policy: RetryPolicy<B>,
    mut request: tonic::Request<M>,
    mut send: F,
) -> Result<tonic::Response<R>, tonic::Status>
where
    M: Clone,
    B: Iterator<Item = Duration> + Clone,
    F: FnMut(tonic::Request<M>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    use tower::retry::Policy;
    loop {
        let next = policy.idempotent.then(|| copy(&request));
        let mut result = send(request).await;
        let Some(mut next) = next else {
            return result;
        };
        match policy.retry(&mut next, &mut result) {
            None => return result,
            Some(wait) => {
                wait.await;
                request = next;
            }
        }
    }
}

impl<M, R, B> tower::retry::Policy<tonic::Request<M>, tonic::Response<R>, tonic::Status>
    for RetryPolicy<B>
where
    M: Clone,
    B: Iterator<Item = Duration> + Clone,
{
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn retry(
        &mut self,
        request: &mut tonic::Request<M>,
        result: &mut Result<tonic::Response<R>, tonic::Status>,
    ) -> Option<Self::Future> {
        let status = result.as_ref().err()?;
        let wait = self.decide(status)?;
        // The retry gets what is left of the caller's time once the backoff is over.
        let left = self.deadline.saturating_duration_since(Instant::now());
        request.set_timeout(left.saturating_sub(wait).max(MIN_ATTEMPT));
        Some(Box::pin(tokio::time::sleep(wait)))
    }

    fn clone_request(&mut self, request: &tonic::Request<M>) -> Option<tonic::Request<M>> {
        Some(copy(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower::ServiceExt;

    type Answer = Pin<Box<dyn Future<Output = Result<tonic::Response<u32>, tonic::Status>> + Send>>;

    /// A service that fails with `code` the first `failures` times, then answers the attempt count.
    fn flaky(
        failures: u32,
        status: tonic::Status,
        calls: Arc<AtomicU32>,
    ) -> impl tower::Service<
        tonic::Request<String>,
        Response = tonic::Response<u32>,
        Error = tonic::Status,
        Future = Answer,
    > + Clone {
        tower::service_fn(move |request: tonic::Request<String>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let status = status.clone();
            assert_eq!(request.get_ref(), "payload", "the typed message is resent");
            Box::pin(async move {
                if n <= failures {
                    Err(status)
                } else {
                    Ok(tonic::Response::new(n))
                }
            }) as Pin<Box<dyn Future<Output = _> + Send>>
        })
    }

    fn settings() -> RetrySettings {
        RetrySettings {
            max_retries: 3,
            base: Duration::from_millis(4),
            max_backoff: Duration::from_millis(20),
            budget_percent: 0.2,
            budget_min_per_sec: 100,
        }
    }

    async fn call(
        idempotent: bool,
        failures: u32,
        status: tonic::Status,
        deadline: Duration,
        settings: &RetrySettings,
        budget: Arc<TpsBudget>,
    ) -> (Result<u32, tonic::Status>, u32) {
        let calls = Arc::new(AtomicU32::new(0));
        let policy = policy(
            "svc",
            "Method",
            idempotent,
            Instant::now() + deadline,
            settings,
            budget,
        );
        // Through the loop the client stack runs.
        let service = flaky(failures, status, calls.clone());
        let result = run(
            policy,
            tonic::Request::new("payload".to_owned()),
            |request| service.clone().oneshot(request),
        )
        .await
        .map(|r| r.into_inner());
        (result, calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn retryable_codes_of_idempotent_calls_are_retried() {
        let b = budget(&settings());
        let unavailable = tonic::Status::unavailable("down");
        let (result, calls) = call(
            true,
            2,
            unavailable.clone(),
            Duration::from_secs(5),
            &settings(),
            b.clone(),
        )
        .await;
        assert_eq!((result.unwrap(), calls), (3, 3));
        // Not idempotent: one attempt only.
        let (result, calls) = call(
            false,
            2,
            unavailable.clone(),
            Duration::from_secs(5),
            &settings(),
            b.clone(),
        )
        .await;
        assert_eq!(
            (result.unwrap_err().code(), calls),
            (tonic::Code::Unavailable, 1)
        );
        // At most max_retries retries.
        let (result, calls) = call(
            true,
            10,
            unavailable,
            Duration::from_secs(5),
            &settings(),
            b.clone(),
        )
        .await;
        assert_eq!((result.is_err(), calls), (true, 4));
    }

    #[tokio::test]
    async fn only_failures_that_may_pass_are_retried() {
        let b = budget(&settings());
        for status in [
            tonic::Status::invalid_argument("bad"),
            tonic::Status::not_found("gone"),
            tonic::Status::deadline_exceeded("late"),
            tonic::Status::internal("bug"),
            // Without a retry hint, RESOURCE_EXHAUSTED is a size or quota limit.
            tonic::Status::resource_exhausted("too big"),
        ] {
            let code = status.code();
            let (result, calls) = call(
                true,
                1,
                status,
                Duration::from_secs(5),
                &settings(),
                b.clone(),
            )
            .await;
            assert_eq!((result.unwrap_err().code(), calls), (code, 1), "{code:?}");
        }
        // With a retry hint it is retried, after waiting at least the hint.
        let hinted =
            crate::status::resource_exhausted("queue full", Some(Duration::from_millis(80)));
        let started = Instant::now();
        let (result, calls) = call(true, 1, hinted, Duration::from_secs(5), &settings(), b).await;
        assert_eq!((result.unwrap(), calls), (2, 2));
        assert!(started.elapsed() >= Duration::from_millis(80));
    }

    #[tokio::test]
    async fn a_server_that_already_retried_its_dependency_is_not_retried() {
        let b = budget(&settings());
        let (result, calls) = call(
            true,
            1,
            crate::status::dependency_unavailable("embed-svc: circuit open"),
            Duration::from_secs(5),
            &settings(),
            b.clone(),
        )
        .await;
        assert_eq!(
            (result.unwrap_err().code(), calls),
            (tonic::Code::Unavailable, 1)
        );
        // A positive pushback is a delay to respect.
        let mut status = tonic::Status::unavailable("restarting");
        status
            .metadata_mut()
            .insert(crate::status::RETRY_PUSHBACK, "60".parse().unwrap());
        let started = Instant::now();
        let (result, calls) = call(true, 1, status, Duration::from_secs(5), &settings(), b).await;
        assert_eq!((result.unwrap(), calls), (2, 2));
        assert!(started.elapsed() >= Duration::from_millis(60));
    }

    #[tokio::test]
    async fn retries_never_run_past_the_deadline() {
        let slow = RetrySettings {
            base: Duration::from_millis(400),
            max_backoff: Duration::from_secs(1),
            ..settings()
        };
        for _ in 0..10 {
            let started = Instant::now();
            let (result, calls) = call(
                true,
                10,
                tonic::Status::unavailable("down"),
                Duration::from_millis(300),
                &slow,
                budget(&slow),
            )
            .await;
            assert!(result.is_err());
            assert!(
                started.elapsed() < Duration::from_millis(300),
                "{:?}",
                started.elapsed()
            );
            assert!((1..=4).contains(&calls), "{calls} attempts");
        }
    }

    #[tokio::test]
    async fn the_budget_bounds_retries_across_calls() {
        let tight = RetrySettings {
            budget_percent: 0.1,
            budget_min_per_sec: 1,
            ..settings()
        };
        let b = budget(&tight);
        let mut attempts = 0;
        for _ in 0..50 {
            b.deposit();
            let (_, calls) = call(
                true,
                100,
                tonic::Status::unavailable("down"),
                Duration::from_secs(5),
                &tight,
                b.clone(),
            )
            .await;
            attempts += calls;
        }
        // 50 calls, 10 % of them may be retries (plus the per-second floor): far below 4 × 50.
        assert!(attempts <= 50 + 5 + 10 + 3, "{attempts} attempts");
    }

    #[test]
    fn backoffs_start_at_the_base_double_and_are_capped_with_jitter() {
        let s = RetrySettings {
            base: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            ..RetrySettings::default()
        };
        let mut maxima = [Duration::ZERO; 6];
        for _ in 0..300 {
            for (i, d) in backoffs(&s).take(6).enumerate() {
                maxima[i] = maxima[i].max(d);
                assert!(d <= [10u64, 20, 40, 80, 100, 100].map(Duration::from_millis)[i]);
            }
        }
        // Full jitter spreads up to (nearly) the cap of each step.
        assert!(maxima[0] > Duration::from_millis(7), "{maxima:?}");
        assert!(maxima[3] > Duration::from_millis(60), "{maxima:?}");
    }
}
