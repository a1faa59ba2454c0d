//! Power-of-two-choices balancing over a downstream's endpoints: pick two endpoints at random
//! among those whose circuit breaker lets calls through, send to the one with fewer calls in
//! flight. An endpoint with an open breaker is out of the set until its breaker lets a trial
//! through; when every breaker is open, calls fail at once with UNAVAILABLE.
//!
//! Written here rather than with `tower::balance::p2c`: that balancer is not `Clone` (it needs a
//! `Buffer` task in front, an extra hop per call), parks callers while no endpoint is ready
//! instead of failing fast, and evicts an endpoint for good after a readiness error, whereas
//! our endpoints come and go with DNS and recover through their breakers.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::breaker::Breaker;
use super::{BoxError, HttpRequest, HttpResponse};

/// How long an endpoint whose last call failed loses every choice against one that did not:
/// a retry then goes to another replica, and a dead one is still tried now and then, so that its
/// breaker opens, or it is seen to be back.
const AVOID_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_secs(2);

/// The per-endpoint stack (breaker → concurrency limit → attempt timeout → connection).
pub type EndpointService = BoxCloneSyncService<HttpRequest, HttpResponse, BoxError>;

/// One replica of a downstream service.
pub struct Endpoint {
    /// Its address, as resolved (`ip:port`).
    pub addr: String,
    service: EndpointService,
    breaker: Breaker,
    in_flight: AtomicUsize,
    /// Calls in flight to it beyond which more are shed at once.
    max_in_flight: usize,
    /// Its attempts counter, looked up once rather than on every call.
    attempts: std::sync::OnceLock<metrics::Counter>,
}

impl Endpoint {
    /// An endpoint at `addr` served by `service`, whose calls pass `breaker`.
    pub fn new(addr: String, service: EndpointService, breaker: Breaker) -> Self {
        Self {
            addr,
            service,
            breaker,
            in_flight: AtomicUsize::new(0),
            max_in_flight: usize::MAX,
            attempts: std::sync::OnceLock::new(),
        }
    }

    /// Sheds calls beyond `max` in flight at once, with RESOURCE_EXHAUSTED and a retry hint.
    /// (Counted here, where the balancer counts calls anyway, rather than with tower's
    /// concurrency limit and load shedding: two more layers and a semaphore on every call.)
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max.max(1);
        self
    }

    /// Its circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Calls in flight to it now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a call in flight for as long as it lives.
struct InFlight(Arc<Endpoint>);

impl InFlight {
    /// Counts a call, unless the endpoint already has its maximum in flight.
    fn try_new(endpoint: Arc<Endpoint>) -> Result<Self, Arc<Endpoint>> {
        let before = endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        if before >= endpoint.max_in_flight {
            endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(endpoint);
        }
        Ok(Self(endpoint))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A `tower::Service` over all replicas of one downstream; cheap to clone (clones share the set).
#[derive(Clone)]
pub struct Balancer {
    downstream: &'static str,
    endpoints: Arc<RwLock<Arc<Vec<Arc<Endpoint>>>>>,
}

impl Balancer {
    /// A balancer for `downstream` with no endpoints yet.
    pub fn new(downstream: &'static str) -> Self {
        Self {
            downstream,
            endpoints: Arc::default(),
        }
    }

    /// Replaces the set of endpoints (after a DNS refresh).
    pub fn set_endpoints(&self, endpoints: Vec<Arc<Endpoint>>) {
        *self.endpoints.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(endpoints);
    }

    /// The endpoints now.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Chooses the endpoint for the next call: two random ones whose breakers let calls
    /// through, the less busy of the two.
    pub fn pick(&self) -> Result<Arc<Endpoint>, tonic::Status> {
        let endpoints = self.endpoints();
        let n = endpoints.len();
        if n == 0 {
            return Err(tonic::Status::unavailable(format!(
                "{}: no endpoints (its address resolves to nothing yet)",
                self.downstream
            )));
        }
        let first = rand::random_range(0..n);
        let second = if n > 1 {
            (first + 1 + rand::random_range(0..n - 1)) % n
        } else {
            first
        };
        // The two random picks first, then everyone else (each once), until two are found
        // whose breakers let calls in.
        let rest = (1..n).map(|i| (second + i) % n).filter(|&i| i != first);
        let order = std::iter::once(first)
            .chain((n > 1).then_some(second))
            .chain(rest);
        let mut chosen: Option<&Arc<Endpoint>> = None;
        let mut candidates = 0;
        for i in order {
            if !endpoints[i].breaker.permits() {
                continue;
            }
            candidates += 1;
            // One that did not just fail, then the less busy one.
            let key = |e: &Endpoint| {
                (
                    e.breaker.recently_failed(AVOID_AFTER_FAILURE),
                    e.in_flight(),
                )
            };
            chosen = match chosen {
                Some(c) if key(c) <= key(&endpoints[i]) => Some(c),
                _ => Some(&endpoints[i]),
            };
            if candidates == 2 {
                break;
            }
        }
        chosen.cloned().ok_or_else(|| {
            metrics::counter!("client_rejected_total", "downstream" => self.downstream, "reason" => "no_endpoint").increment(1);
            // Not worth a retry: none could be picked a few milliseconds later either.
            crate::status::dependency_unavailable(format!(
                "{}: circuit open for all {n} endpoint(s) after repeated failures; failing fast until one recovers",
                self.downstream
            ))
        })
    }
}

impl tower::Service<HttpRequest> for Balancer {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is decided per call, when an endpoint is picked.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        let endpoint = match self.pick() {
            Ok(endpoint) => endpoint,
            Err(status) => return Box::pin(std::future::ready(Err(Box::new(status) as BoxError))),
        };
        let downstream = self.downstream;
        endpoint
            .attempts
            .get_or_init(|| metrics::counter!("client_attempts_total", "downstream" => downstream, "endpoint" => endpoint.addr.clone()))
            .increment(1);
        let service = endpoint.service.clone();
        let guard = match InFlight::try_new(endpoint) {
            Ok(guard) => guard,
            Err(endpoint) => {
                metrics::counter!("client_rejected_total", "downstream" => downstream, "reason" => "in_flight_limit").increment(1);
                let status = crate::status::resource_exhausted(
                    format!(
                        "{downstream} at {}: too many calls in flight from this client",
                        endpoint.addr
                    ),
                    Some(std::time::Duration::from_millis(50)),
                );
                return Box::pin(std::future::ready(Err(Box::new(status) as BoxError)));
            }
        };
        Box::pin(async move {
            let result = service.oneshot(request).await;
            drop(guard);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::breaker::{BreakerNames, BreakerSettings};
    use std::time::Duration;

    fn breaker() -> Breaker {
        Breaker::new(
            &BreakerSettings {
                consecutive_failures: 1,
                open: Duration::from_secs(60),
                max_open: Duration::from_secs(60),
                ..BreakerSettings::default()
            },
            BreakerNames {
                gauge: "test_breaker_open",
                rejected: "test_rejected_total",
                labels: vec![],
            },
        )
    }

    /// An endpoint answering OK after `delay`, counting its calls.
    fn endpoint(addr: &str, delay: Duration, calls: Arc<AtomicUsize>) -> Arc<Endpoint> {
        let service = tower::service_fn(move |_request: HttpRequest| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                Ok::<_, BoxError>(http::Response::new(tonic::body::Body::empty()))
            }
        });
        Arc::new(Endpoint::new(
            addr.into(),
            BoxCloneSyncService::new(service),
            breaker(),
        ))
    }

    fn request() -> HttpRequest {
        http::Request::new(tonic::body::Body::empty())
    }

    #[tokio::test]
    async fn calls_spread_and_avoid_the_busier_endpoint() {
        let (fast, slow) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let balancer = Balancer::new("svc");
        balancer.set_endpoints(vec![
            endpoint("a", Duration::from_millis(1), fast.clone()),
            endpoint("b", Duration::from_millis(200), slow.clone()),
        ]);
        // 40 concurrent calls: with two choices the slow endpoint, once busy, gets few of them.
        let calls: Vec<_> = (0..40)
            .map(|_| {
                let mut b = balancer.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(rand::random_range(0..100))).await;
                    tower::Service::call(&mut b, request()).await.unwrap()
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        let (f, s) = (fast.load(Ordering::Relaxed), slow.load(Ordering::Relaxed));
        assert_eq!(f + s, 40);
        assert!(s >= 1 && f > 3 * s, "fast {f}, slow {s}");
    }

    #[tokio::test]
    async fn open_breakers_take_endpoints_out_and_all_open_fails_fast() {
        let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let a = endpoint("a", Duration::ZERO, a_calls.clone());
        let b = endpoint("b", Duration::ZERO, b_calls.clone());
        let balancer = Balancer::new("svc");
        balancer.set_endpoints(vec![a.clone(), b.clone()]);
        a.breaker().record(false);
        assert!(a.breaker().is_open());
        for _ in 0..20 {
            tower::Service::call(&mut balancer.clone(), request())
                .await
                .unwrap();
        }
        assert_eq!(a_calls.load(Ordering::Relaxed), 0);
        assert_eq!(b_calls.load(Ordering::Relaxed), 20);
        b.breaker().record(false);
        let err = tower::Service::call(&mut balancer.clone(), request())
            .await
            .unwrap_err();
        let status = err.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("svc: circuit open for all 2"),
            "{status:?}"
        );
        // No endpoints at all (a name that does not resolve yet): fail fast too.
        balancer.set_endpoints(vec![]);
        let err = balancer.pick().err().expect("no endpoint to pick");
        assert!(err.message().contains("no endpoints"), "{err:?}");
    }

    #[test]
    fn an_endpoint_that_just_failed_loses_every_choice_for_a_while() {
        let balancer = Balancer::new("svc");
        let ok = endpoint("ok", Duration::ZERO, Arc::default());
        // A breaker that needs many failures to open: only the failure memory is at work.
        let failing = Arc::new(Endpoint::new(
            "failing".into(),
            ok.service.clone(),
            Breaker::new(
                &BreakerSettings::default(),
                BreakerNames {
                    gauge: "test_breaker_open",
                    rejected: "test_rejected_total",
                    labels: vec![],
                },
            ),
        ));
        balancer.set_endpoints(vec![ok.clone(), failing.clone()]);
        failing.breaker().record(false);
        assert!(!failing.breaker().is_open());
        // The retry after a failure goes to the other replica, every time.
        assert!((0..200).all(|_| balancer.pick().unwrap().addr == "ok"));
        // A success clears it: both are chosen again.
        failing.breaker().record(true);
        let picked: std::collections::HashSet<String> = (0..200)
            .map(|_| balancer.pick().unwrap().addr.clone())
            .collect();
        assert_eq!(picked.len(), 2);
    }

    #[tokio::test]
    async fn calls_beyond_the_in_flight_limit_are_shed_with_a_hint() {
        let slow = Arc::new(
            Arc::into_inner(endpoint("slow", Duration::from_millis(200), Arc::default()))
                .unwrap()
                .with_max_in_flight(2),
        );
        let balancer = Balancer::new("svc");
        balancer.set_endpoints(vec![slow]);
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let mut b = balancer.clone();
                tokio::spawn(async move { tower::Service::call(&mut b, request()).await })
            })
            .collect();
        let mut shed = 0;
        for call in calls {
            if let Err(err) = call.await.unwrap() {
                let status = err.downcast::<tonic::Status>().unwrap();
                assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                assert!(
                    status.message().contains("too many calls in flight"),
                    "{status:?}"
                );
                assert!(crate::status::classify(&status) != crate::status::Failure::Rejected);
                shed += 1;
            }
        }
        assert_eq!(shed, 1);
        // Slots are given back: later calls go through.
        tower::Service::call(&mut balancer.clone(), request())
            .await
            .unwrap();
    }

    #[test]
    fn picks_cover_every_endpoint() {
        let balancer = Balancer::new("svc");
        let eps: Vec<_> = (0..5)
            .map(|i| endpoint(&i.to_string(), Duration::ZERO, Arc::default()))
            .collect();
        balancer.set_endpoints(eps);
        let picked: std::collections::HashSet<String> = (0..500)
            .map(|_| balancer.pick().unwrap().addr.clone())
            .collect();
        assert_eq!(picked.len(), 5);
    }
}
