//! Circuit breakers: one helper on `failsafe`, used for every endpoint of every downstream
//! service (through [`BreakerLayer`]) and by embed-svc for remote model endpoints, so there is
//! one breaker implementation with one set of semantics, metrics and logs.
//!
//! A breaker opens after `consecutive_failures` failures in a row, or when the success rate over
//! `window` drops below `min_success_rate` (once `min_calls` calls were seen). While open, calls
//! fail at once; after the open period (doubling, with jitter, up to `max_open` while trials
//! keep failing) calls are let through again ("half-open") and the first outcome decides.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use failsafe::FailurePolicy;
use failsafe::failure_policy::{ConsecutiveFailures, OrElse, SuccessRateOverTimeWindow};

use super::{BoxError, Failure, HttpRequest, HttpResponse};

/// When a breaker opens and for how long.
#[derive(Debug, Clone)]
pub struct BreakerSettings {
    /// Failures in a row that open it.
    pub consecutive_failures: u32,
    /// Success rate over `window` below which it opens.
    pub min_success_rate: f64,
    /// Calls in `window` needed before the success rate counts.
    pub min_calls: u32,
    /// The window of the success rate (whole seconds).
    pub window: Duration,
    /// First open period.
    pub open: Duration,
    /// Longest open period (reached by doubling while trial calls fail).
    pub max_open: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            min_success_rate: 0.5,
            min_calls: 20,
            window: Duration::from_secs(10),
            open: Duration::from_secs(1),
            // Short enough that a dependency that came back is used again within seconds.
            max_open: Duration::from_secs(5),
        }
    }
}

/// Open periods: `next`, doubling up to `max`, each with equal jitter (half fixed, half random)
/// so that breakers that opened together do not probe together. (failsafe's own backoffs count
/// whole seconds and refuse anything under one.)
#[derive(Debug, Clone)]
pub(crate) struct OpenPeriods {
    next: Duration,
    max: Duration,
}

impl Iterator for OpenPeriods {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(base / 2 + (base / 2).mul_f64(rand::random::<f64>()))
    }
}

type Policy = OrElse<ConsecutiveFailures<OpenPeriods>, SuccessRateOverTimeWindow<OpenPeriods>>;

/// Names a breaker in metrics and logs: a gauge set to 1 while open (0.5 half-open, 0
/// closed), a counter of rejected calls, and labels (from configuration, never from callers).
#[derive(Debug, Clone)]
pub struct BreakerNames {
    /// Gauge of the state, e.g. `client_breaker_open`.
    pub gauge: &'static str,
    /// Counter of calls refused while open, e.g. `client_rejected_total`.
    pub rejected: &'static str,
    /// Labels of both, e.g. `[("downstream", "embed-svc"), ("endpoint", "10.0.0.7:50054")]`.
    pub labels: Vec<(&'static str, String)>,
}

/// Calls with less time than this are not held against an endpoint when they time out.
const JUDGE_FLOOR: Duration = Duration::from_millis(200);

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Reports transitions (one log line each, and the gauge) and rejections.
struct Instrument {
    names: BreakerNames,
    state: Arc<AtomicU8>,
}

impl Instrument {
    fn labels(&self) -> Vec<metrics::Label> {
        self.names
            .labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.clone()))
            .collect()
    }

    fn transition(&self, state: u8, gauge: f64, name: &'static str) {
        let before = self.state.swap(state, Ordering::AcqRel);
        metrics::gauge!(self.names.gauge, self.labels()).set(gauge);
        if before != state {
            let labels: Vec<String> = self
                .names
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if state == OPEN {
                tracing::warn!(breaker = %labels.join(" "), state = name, "circuit breaker opened");
            } else {
                tracing::info!(breaker = %labels.join(" "), state = name, "circuit breaker state");
            }
        }
    }
}

impl failsafe::Instrument for Instrument {
    fn on_call_rejected(&self) {
        let mut labels = self.labels();
        labels.push(metrics::Label::new("reason", "circuit_open"));
        metrics::counter!(self.names.rejected, labels).increment(1);
    }

    fn on_open(&self) {
        self.transition(OPEN, 1.0, "open");
    }

    fn on_half_open(&self) {
        self.transition(HALF_OPEN, 0.5, "half-open");
    }

    fn on_closed(&self) {
        self.transition(CLOSED, 0.0, "closed");
    }
}

/// A circuit breaker; clones share their state.
#[derive(Clone)]
pub struct Breaker {
    machine: failsafe::StateMachine<Policy, Instrument>,
    state: Arc<AtomicU8>,
    /// When the last call failed (ms since [`epoch`], 0 after a success): balancers avoid an
    /// endpoint that just failed, so a retry goes to another replica before the breaker opens.
    last_failure: Arc<AtomicU64>,
}

/// Time origin of [`Breaker::recently_failed`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Breaker {
    /// A closed breaker reporting under `names`.
    pub fn new(settings: &BreakerSettings, names: BreakerNames) -> Self {
        let periods = OpenPeriods {
            next: settings.open.max(Duration::from_millis(1)),
            max: settings.max_open.max(settings.open),
        };
        let policy = failsafe::failure_policy::consecutive_failures(
            settings.consecutive_failures.max(1),
            periods.clone(),
        )
        .or_else(failsafe::failure_policy::success_rate_over_time_window(
            settings.min_success_rate.clamp(0.0, 1.0),
            settings.min_calls.max(1),
            settings.window.max(Duration::from_secs(1)),
            periods,
        ));
        let state = Arc::new(AtomicU8::new(CLOSED));
        let instrument = Instrument {
            names,
            state: state.clone(),
        };
        // Every breaker shows up closed from the start, so dashboards and alerts see 0, not
        // nothing (clients are made before the server, so make sure the recorder is there).
        let _ = crate::metrics::handle();
        metrics::gauge!(instrument.names.gauge, instrument.labels()).set(0.0);
        let machine = failsafe::StateMachine::new(policy, instrument);
        Self {
            machine,
            state,
            last_failure: Arc::new(AtomicU64::new(0)),
        }
    }

    /// True if a call may go through now (closed, or half-open for a trial). An open breaker
    /// whose open period has passed turns half-open here.
    pub fn permits(&self) -> bool {
        self.machine.is_call_permitted()
    }

    /// Records the outcome of a call that went through.
    pub fn record(&self, success: bool) {
        if success {
            self.last_failure.store(0, Ordering::Relaxed);
            self.machine.on_success();
        } else {
            let now = epoch().elapsed().as_millis() as u64;
            self.last_failure.store(now.max(1), Ordering::Relaxed);
            self.machine.on_error();
        }
    }

    /// True if the last call failed less than `within` ago.
    pub fn recently_failed(&self, within: Duration) -> bool {
        match self.last_failure.load(Ordering::Relaxed) {
            0 => false,
            at => epoch().elapsed() < Duration::from_millis(at) + within,
        }
    }

    /// True while open (calls are refused until the open period ends).
    pub fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) == OPEN
    }
}

/// Tower layer putting a [`Breaker`] in front of one endpoint.
#[derive(Clone)]
pub struct BreakerLayer {
    breaker: Breaker,
    /// Says who is refused, e.g. "embed-svc at 10.0.0.7:50054".
    what: Arc<str>,
}

impl BreakerLayer {
    /// A layer with `breaker`, naming the endpoint as `what` in refusals.
    pub fn new(breaker: Breaker, what: impl Into<Arc<str>>) -> Self {
        Self {
            breaker,
            what: what.into(),
        }
    }
}

impl<S> tower::Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
            what: self.what.clone(),
        }
    }
}

/// Service produced by [`BreakerLayer`]: refuses calls at once with UNAVAILABLE while open, and
/// records every outcome. Only signs that the endpoint itself is down count as failures
/// (refused or broken connections, no answer within the attempt's time); an endpoint that
/// answers, even with an error status, is alive. (A live service answers UNAVAILABLE when *its*
/// dependency is down: counting that would take a healthy replica out of the set.)
#[derive(Clone)]
pub struct BreakerService<S> {
    inner: S,
    breaker: Breaker,
    what: Arc<str>,
}

impl<S> BreakerService<S> {
    /// The breaker of this endpoint.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

impl<S> tower::Service<HttpRequest> for BreakerService<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        // A call given very little time says nothing about the endpoint when it runs out:
        // otherwise callers with tiny deadlines could open breakers for everyone.
        let judged = super::request_timeout(&request).is_none_or(|t| t >= JUDGE_FLOOR);
        if !self.breaker.permits() {
            let status = tonic::Status::unavailable(format!(
                "{}: circuit open after repeated failures; failing fast until it recovers",
                self.what
            ));
            return Box::pin(std::future::ready(Err(Box::new(status) as BoxError)));
        }
        let breaker = self.breaker.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await.map_err(Into::into);
            let down = match &result {
                Ok(_) => false,
                Err(error) => matches!(
                    super::error_failure(error),
                    Failure::Unavailable | Failure::DeadlineExceeded
                ),
            };
            match (down, judged) {
                (true, false) => {}
                (down, _) => breaker.record(!down),
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    fn names() -> BreakerNames {
        BreakerNames {
            gauge: "test_breaker_open",
            rejected: "test_rejected_total",
            labels: vec![("endpoint", "test".into())],
        }
    }

    fn settings(open: Duration) -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            open,
            max_open: open * 4,
            ..BreakerSettings::default()
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_a_trial_closes_it() {
        let breaker = Breaker::new(&settings(Duration::from_millis(100)), names());
        for _ in 0..2 {
            assert!(breaker.permits());
            breaker.record(false);
        }
        assert!(!breaker.is_open(), "two failures are not enough");
        breaker.record(true);
        for _ in 0..3 {
            breaker.record(false);
        }
        assert!(breaker.is_open());
        assert!(!breaker.permits(), "open: refused");
        std::thread::sleep(Duration::from_millis(120));
        assert!(breaker.permits(), "after the open period: a trial");
        assert!(!breaker.is_open());
        breaker.record(true);
        assert!(breaker.permits());
        assert!(!breaker.is_open());
    }

    #[test]
    fn failed_trials_double_the_open_period() {
        let breaker = Breaker::new(&settings(Duration::from_millis(100)), names());
        for _ in 0..3 {
            breaker.record(false);
        }
        std::thread::sleep(Duration::from_millis(110));
        assert!(breaker.permits());
        breaker.record(false);
        assert!(breaker.is_open());
        // The second open period is 100..200 ms (doubled, half of it jitter): 60 ms is too soon.
        std::thread::sleep(Duration::from_millis(60));
        assert!(!breaker.permits());
        std::thread::sleep(Duration::from_millis(160));
        assert!(breaker.permits());
    }

    #[test]
    fn a_low_success_rate_opens_it_without_a_run_of_failures() {
        let breaker = Breaker::new(
            &BreakerSettings {
                consecutive_failures: 100,
                min_success_rate: 0.6,
                min_calls: 10,
                window: Duration::from_secs(1),
                ..settings(Duration::from_secs(5))
            },
            names(),
        );
        // Alternating success and failure, evenly spaced (failsafe's rate is a moving average
        // over time, so outcomes in the same millisecond weigh nothing): never 100 in a row, but
        // only 50 % succeed. The rate only counts once the window (1 s) has been observed.
        let started = std::time::Instant::now();
        while !breaker.is_open() && started.elapsed() < Duration::from_secs(3) {
            breaker.record(true);
            std::thread::sleep(Duration::from_millis(5));
            breaker.record(false);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(breaker.is_open());
    }

    #[test]
    fn open_periods_double_up_to_the_cap_with_jitter() {
        let periods: Vec<Duration> = OpenPeriods {
            next: Duration::from_millis(100),
            max: Duration::from_millis(800),
        }
        .take(6)
        .collect();
        for (period, base) in periods.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            let base = Duration::from_millis(base);
            assert!(
                *period >= base / 2 && *period <= base,
                "{period:?} vs {base:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_layer_fails_fast_while_open_and_counts_only_signs_of_a_dead_endpoint() {
        let breaker = Breaker::new(&settings(Duration::from_secs(60)), names());
        let layer = BreakerLayer::new(breaker.clone(), "embed-svc at 10.0.0.7:1");
        let reply = |code: tonic::Code| {
            tower::service_fn(move |_request: HttpRequest| async move {
                Ok::<_, BoxError>(tonic::Status::new(code, "x").into_http())
            })
        };
        // An endpoint that answers is alive, whatever it answers (UNAVAILABLE from a live
        // server means its own dependency is down): no failure counted.
        for code in [tonic::Code::InvalidArgument, tonic::Code::Unavailable] {
            for _ in 0..5 {
                let svc = layer.layer(reply(code));
                svc.oneshot(http::Request::new(tonic::body::Body::empty()))
                    .await
                    .unwrap();
            }
        }
        assert!(!breaker.is_open());
        // Calls given almost no time say nothing when they time out (a caller with tiny
        // deadlines must not open the breaker for everyone).
        let late = || {
            tower::service_fn(|_request: HttpRequest| async {
                Err::<HttpResponse, BoxError>(Box::new(tonic::Status::deadline_exceeded("late")))
            })
        };
        for _ in 0..5 {
            let mut request = http::Request::new(tonic::body::Body::empty());
            request
                .headers_mut()
                .insert("grpc-timeout", "10m".parse().unwrap());
            let _ = layer.layer(late()).oneshot(request).await;
        }
        assert!(!breaker.is_open());
        // Connections that fail, or attempts with no answer, are signs of a dead endpoint.
        let refused = || {
            tower::service_fn(|_request: HttpRequest| async {
                Err::<HttpResponse, BoxError>(Box::new(tonic::Status::unavailable(
                    "connection refused",
                )))
            })
        };
        for _ in 0..3 {
            let svc = layer.layer(refused());
            let _ = svc
                .oneshot(http::Request::new(tonic::body::Body::empty()))
                .await;
        }
        assert!(breaker.is_open());
        let svc = layer.layer(tower::service_fn(|_request: HttpRequest| async {
            panic!("an open breaker must not call the endpoint");
            #[allow(unreachable_code)]
            Ok::<HttpResponse, BoxError>(unreachable!())
        }));
        let err = svc
            .oneshot(http::Request::new(tonic::body::Body::empty()))
            .await
            .unwrap_err();
        let status = err.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status
                .message()
                .contains("embed-svc at 10.0.0.7:1: circuit open"),
            "{status:?}"
        );
    }
}
