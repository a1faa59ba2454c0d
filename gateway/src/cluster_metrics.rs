//! The cluster's metrics without Prometheus (`AdminService.GetMetrics`, and the alerts of
//! `GetClusterStatus`): the gateway reads every replica's metrics (`TelemetryService`, the same
//! text as `/metrics`) every [`SAMPLE_EVERY`] and keeps an hour of readings. A report over a
//! window compares a fresh reading with the one taken a window ago, as Prometheus's `rate`
//! and `histogram_quantile` would.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smartdb_proto::v1 as pb;

use crate::admin::Downstreams;

/// How often every replica is read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// Longest window a report may cover.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);
/// Window of a report when the caller names none.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);

/// Codes that are the service's fault, as the alert rules count errors.
const SERVER_FAULTS: &[&str] = &[
    "Unknown",
    "Internal",
    "Unavailable",
    "DeadlineExceeded",
    "DataLoss",
    "Unimplemented",
];

/// Counters of one RPC on one replica.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RpcCounts {
    /// Calls finished.
    pub requests: f64,
    /// Of those, failed with a server-side code.
    pub errors: f64,
    /// Of those, refused for the caller's reasons.
    pub rejected: f64,
    /// Latency histogram: (upper bound in seconds, cumulative count), ascending, `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
}

/// What one replica's metrics said at one moment (only what reports and alerts use).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// (gRPC service, method) → counters.
    pub rpcs: BTreeMap<(String, String), RpcCounts>,
    /// (cache, level) → (hits, lookups).
    pub caches: BTreeMap<(String, String), (f64, f64)>,
    /// Queue → (depth, age of the oldest item in seconds).
    pub queues: BTreeMap<String, (f64, f64)>,
    /// Breakers not closed: (what it guards, state: 1 open, 0.5 half-open).
    pub breakers: Vec<(String, f64)>,
    /// Breakers of remote models that are open, by model.
    pub model_breakers: Vec<String>,
    /// Resident memory and the cgroup limit, in bytes, when known.
    pub memory: (Option<f64>, Option<f64>),
}

impl Reading {
    /// Reads the Prometheus text format (as `smartdb_kit::metrics::render` writes it).
    pub fn parse(text: &str) -> Reading {
        use prometheus_parse::Value;
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let Ok(scrape) = prometheus_parse::Scrape::parse(lines) else {
            return Reading::default();
        };
        let mut reading = Reading::default();
        for sample in scrape.samples {
            let label = |name: &str| sample.labels.get(name).unwrap_or_default().to_owned();
            let value = match &sample.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                Value::Histogram(_) | Value::Summary(_) => 0.0,
            };
            match sample.metric.as_str() {
                "grpc_server_requests_total" => {
                    let Some(key) = rpc_key(&label("service"), &label("method")) else {
                        continue;
                    };
                    let counts = reading.rpcs.entry(key).or_default();
                    counts.requests += value;
                    match label("code").as_str() {
                        "Ok" => {}
                        code if SERVER_FAULTS.contains(&code) => counts.errors += value,
                        _ => counts.rejected += value,
                    }
                }
                "grpc_server_request_duration_seconds" => {
                    let (Value::Histogram(buckets), Some(key)) =
                        (&sample.value, rpc_key(&label("service"), &label("method")))
                    else {
                        continue;
                    };
                    let mut buckets: Vec<(f64, f64)> =
                        buckets.iter().map(|b| (b.less_than, b.count)).collect();
                    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                    reading.rpcs.entry(key).or_default().buckets = buckets;
                }
                "search_cache_lookups_total" => {
                    let entry = reading
                        .caches
                        .entry(("search results".to_owned(), label("level")))
                        .or_default();
                    entry.1 += value;
                    if label("outcome") == "hit" {
                        entry.0 += value;
                    }
                }
                // The outcome of the whole lookup (a hit at any level).
                "search_cache_requests_total" => {
                    let entry = reading
                        .caches
                        .entry(("search results".to_owned(), "any".to_owned()))
                        .or_default();
                    entry.1 += value;
                    if label("outcome") == "hit" {
                        entry.0 += value;
                    }
                }
                "embed_cache_hits_total" | "embed_cache_misses_total" => {
                    let entry = reading
                        .caches
                        .entry(("embeddings".to_owned(), label("level")))
                        .or_default();
                    entry.1 += value;
                    if sample.metric == "embed_cache_hits_total" {
                        entry.0 += value;
                    }
                }
                "ingest_jobs_waiting" => {
                    reading
                        .queues
                        .entry("ingest jobs".to_owned())
                        .or_default()
                        .0 = value;
                }
                "ingest_job_backlog_age_seconds" => {
                    reading
                        .queues
                        .entry("ingest jobs".to_owned())
                        .or_default()
                        .1 = value;
                }
                "embed_queue_calls" => {
                    reading
                        .queues
                        .entry("embedding calls".to_owned())
                        .or_default()
                        .0 = value;
                }
                "client_breaker_open" if value >= 0.5 => reading.breakers.push((
                    format!("{} at {}", label("downstream"), label("endpoint")),
                    value,
                )),
                "embed_remote_breaker_open" if value >= 1.0 => {
                    reading.model_breakers.push(label("model"));
                }
                "process_resident_memory_bytes" => reading.memory.0 = Some(value),
                "process_memory_limit_bytes" => reading.memory.1 = Some(value),
                _ => {}
            }
        }
        reading
    }
}

/// The key of one of our RPCs; None for health checks, reflection and telemetry reads, which
/// would only dilute the figures (the alert rules leave them out too).
fn rpc_key(service: &str, method: &str) -> Option<(String, String)> {
    (service.starts_with("smartdb.v1.") && service != smartdb_proto::names::TELEMETRY)
        .then(|| (service.to_owned(), method.to_owned()))
}

/// `now - before` for a counter; a counter that went down was reset (the replica restarted),
/// so everything it counted since is new.
fn increase(now: f64, before: f64) -> f64 {
    if now >= before { now - before } else { now }
}

impl RpcCounts {
    fn since(&self, before: Option<&RpcCounts>) -> RpcCounts {
        let Some(before) = before else {
            return self.clone();
        };
        // A restart resets every counter of the replica at once; the request count tells.
        if self.requests < before.requests {
            return self.clone();
        }
        let old: HashMap<u64, f64> = before
            .buckets
            .iter()
            .map(|(le, n)| (le.to_bits(), *n))
            .collect();
        RpcCounts {
            requests: self.requests - before.requests,
            errors: increase(self.errors, before.errors),
            rejected: increase(self.rejected, before.rejected),
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| {
                    (
                        *le,
                        increase(*n, old.get(&le.to_bits()).copied().unwrap_or(0.0)),
                    )
                })
                .collect(),
        }
    }

    fn add(&mut self, other: &RpcCounts) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.rejected += other.rejected;
        if self.buckets.is_empty() {
            self.buckets = other.buckets.clone();
            return;
        }
        for (le, n) in &other.buckets {
            match self.buckets.iter_mut().find(|(l, _)| l == le) {
                Some((_, m)) => *m += n,
                None => self.buckets.push((*le, *n)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// The `q` quantile in seconds, as Prometheus's `histogram_quantile` estimates it: linear
    /// within the bucket the rank falls in; the highest finite bound if it falls in `+Inf`.
    pub fn quantile(&self, q: f64) -> f64 {
        let Some(&(_, total)) = self.buckets.last() else {
            return 0.0;
        };
        if total <= 0.0 {
            return 0.0;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, count) in &self.buckets {
            if count >= rank {
                if le.is_infinite() {
                    return lower;
                }
                if count == below {
                    return le;
                }
                return lower + (le - lower) * (rank - below) / (count - below);
            }
            (lower, below) = (le, count);
        }
        lower
    }
}

/// Every replica's reading at one moment: (service, address) → reading.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Replicas read.
    pub replicas: HashMap<(String, String), Reading>,
    /// Replicas that could not be read: "service address: reason".
    pub unreachable: Vec<String>,
}

/// What changed between two snapshots, per service (replicas added up).
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Seconds covered.
    pub seconds: f64,
    /// (service, gRPC service, method) → counters over the window.
    pub rpcs: BTreeMap<(String, String, String), RpcCounts>,
    /// (service, cache, level) → (hits, lookups) over the window.
    pub caches: BTreeMap<(String, String, String), (f64, f64)>,
}

impl Window {
    /// The change from `before` (None: from nothing, i.e. since each replica started) to `now`.
    pub fn between(before: Option<&Snapshot>, now: &Snapshot, seconds: f64) -> Window {
        let mut window = Window {
            seconds,
            ..Window::default()
        };
        for ((service, addr), reading) in &now.replicas {
            let old = before.and_then(|b| b.replicas.get(&(service.clone(), addr.clone())));
            for ((grpc, method), counts) in &reading.rpcs {
                let delta =
                    counts.since(old.and_then(|o| o.rpcs.get(&(grpc.clone(), method.clone()))));
                window
                    .rpcs
                    .entry((service.clone(), grpc.clone(), method.clone()))
                    .or_default()
                    .add(&delta);
            }
            for ((cache, level), (hits, lookups)) in &reading.caches {
                let (old_hits, old_lookups) = old
                    .and_then(|o| o.caches.get(&(cache.clone(), level.clone())))
                    .copied()
                    .unwrap_or_default();
                let entry = window
                    .caches
                    .entry((service.clone(), cache.clone(), level.clone()))
                    .or_default();
                if *lookups < old_lookups {
                    entry.0 += hits;
                    entry.1 += lookups;
                } else {
                    entry.0 += increase(*hits, old_hits);
                    entry.1 += lookups - old_lookups;
                }
            }
        }
        window
    }

    /// Calls per second of one service's own RPCs.
    pub fn request_rate(&self, service: &str) -> f64 {
        self.rpcs
            .iter()
            .filter(|((s, _, _), _)| s == service)
            .map(|(_, c)| c.requests)
            .sum::<f64>()
            / self.seconds.max(1.0)
    }
}

/// Readings of the whole cluster, kept for an hour.
pub struct ClusterMetrics {
    downstreams: Arc<Downstreams>,
    history: Mutex<VecDeque<(Instant, Arc<Snapshot>)>>,
    started: Instant,
}

impl ClusterMetrics {
    /// Reads the gateway itself and `downstreams`.
    pub fn new(downstreams: Arc<Downstreams>) -> Self {
        Self {
            downstreams,
            history: Mutex::default(),
            started: Instant::now(),
        }
    }

    /// Reads every replica now.
    pub async fn read(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.replicas.insert(
            ("gateway".to_owned(), "self".to_owned()),
            Reading::parse(&smartdb_kit::metrics::render()),
        );
        for (service, addr, text) in self.downstreams.read_metrics().await {
            match text {
                Ok(text) => {
                    snapshot
                        .replicas
                        .insert((service.to_owned(), addr), Reading::parse(&text));
                }
                Err(reason) => snapshot
                    .unreachable
                    .push(format!("{service} {addr}: {reason}")),
            }
        }
        snapshot
    }

    /// Takes a reading every [`SAMPLE_EVERY`], forever.
    pub async fn sample(self: Arc<Self>) {
        loop {
            let snapshot = Arc::new(self.read().await);
            {
                let mut history = self.history.lock().expect("history lock");
                let now = Instant::now();
                history.push_back((now, snapshot));
                // Keep one reading older than the longest window, so that window is whole.
                while history.len() > 2
                    && history
                        .get(1)
                        .is_some_and(|(at, _)| now.duration_since(*at) >= MAX_WINDOW)
                {
                    history.pop_front();
                }
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    /// The reading to compare with for a window of `length` ending at `now`: the newest one at
    /// least that old, else the oldest there is (None: nothing yet, count from the start).
    fn baseline(&self, now: Instant, length: Duration) -> (Option<Arc<Snapshot>>, f64) {
        let history = self.history.lock().expect("history lock");
        let chosen = history
            .iter()
            .rev()
            .find(|(at, _)| now.duration_since(*at) >= length)
            .or_else(|| history.front());
        match chosen {
            Some((at, snapshot)) => (
                Some(snapshot.clone()),
                now.duration_since(*at).as_secs_f64(),
            ),
            None => (None, now.duration_since(self.started).as_secs_f64()),
        }
    }

    /// A fresh reading and the window of `length` ending now.
    pub async fn window(&self, length: Duration) -> (Snapshot, Window) {
        let now_reading = self.read().await;
        let now = Instant::now();
        let (before, seconds) = self.baseline(now, length);
        let window = Window::between(before.as_deref(), &now_reading, seconds);
        (now_reading, window)
    }

    /// The window of `length` that ended `ago` (from stored readings only), or as much of it
    /// as the readings cover (as Prometheus's `rate` over a range does); None without two
    /// readings in it.
    pub fn past_window(&self, ago: Duration, length: Duration) -> Option<Window> {
        let now = Instant::now();
        let history = self.history.lock().expect("history lock");
        let end = history
            .iter()
            .rev()
            .find(|(at, _)| now.duration_since(*at) >= ago)?;
        let start = history
            .iter()
            .rev()
            .find(|(at, _)| end.0.duration_since(*at) >= length)
            .or_else(|| history.front().filter(|(at, _)| *at < end.0))?;
        Some(Window::between(
            Some(&start.1),
            &end.1,
            end.0.duration_since(start.0).as_secs_f64(),
        ))
    }

    /// `AdminService.GetMetrics`.
    pub async fn report(&self, window_seconds: u32) -> pb::GetMetricsResponse {
        let length = match window_seconds {
            0 => DEFAULT_WINDOW,
            s => Duration::from_secs(u64::from(s)).min(MAX_WINDOW),
        };
        let (now, window) = self.window(length).await;
        let rpcs = window
            .rpcs
            .iter()
            .filter(|(_, c)| c.requests > 0.0)
            .map(|((service, grpc, method), c)| pb::RpcMetrics {
                service: service.clone(),
                method: format!("{grpc}/{method}"),
                requests: c.requests.round() as u64,
                errors: c.errors.round() as u64,
                error_rate: c.errors / c.requests,
                rejected: c.rejected.round() as u64,
                p50_ms: c.quantile(0.50) * 1000.0,
                p95_ms: c.quantile(0.95) * 1000.0,
                p99_ms: c.quantile(0.99) * 1000.0,
            })
            .collect();
        let caches = window
            .caches
            .iter()
            .filter(|(_, (_, lookups))| *lookups > 0.0)
            .map(
                |((service, cache, level), (hits, lookups))| pb::CacheMetrics {
                    service: service.clone(),
                    cache: cache.clone(),
                    level: level.clone(),
                    lookups: lookups.round() as u64,
                    hits: hits.round() as u64,
                    hit_ratio: hits / lookups,
                },
            )
            .collect();
        let mut queues: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
        for ((service, _), reading) in &now.replicas {
            for (queue, (depth, age)) in &reading.queues {
                let entry = queues.entry((service.clone(), queue.clone())).or_default();
                entry.0 += depth;
                entry.1 = entry.1.max(*age);
            }
        }
        pb::GetMetricsResponse {
            window_seconds: window.seconds,
            rpcs,
            caches,
            queues: queues
                .into_iter()
                .map(|((service, queue), (depth, age))| pb::QueueMetrics {
                    service,
                    queue,
                    depth,
                    oldest_age_seconds: age,
                })
                .collect(),
            unreachable: now.unreachable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE grpc_server_requests_total counter
grpc_server_requests_total{service="smartdb.v1.SearchService",method="Search",code="Ok"} 90
grpc_server_requests_total{service="smartdb.v1.SearchService",method="Search",code="Unavailable"} 6
grpc_server_requests_total{service="smartdb.v1.SearchService",method="Search",code="NotFound"} 4
grpc_server_requests_total{service="grpc.health.v1.Health",method="Check",code="Ok"} 1000
# TYPE grpc_server_request_duration_seconds histogram
grpc_server_request_duration_seconds_bucket{service="smartdb.v1.SearchService",method="Search",le="0.001"} 10
grpc_server_request_duration_seconds_bucket{service="smartdb.v1.SearchService",method="Search",le="0.0025"} 60
grpc_server_request_duration_seconds_bucket{service="smartdb.v1.SearchService",method="Search",le="0.005"} 98
grpc_server_request_duration_seconds_bucket{service="smartdb.v1.SearchService",method="Search",le="+Inf"} 100
grpc_server_request_duration_seconds_sum{service="smartdb.v1.SearchService",method="Search"} 0.3
grpc_server_request_duration_seconds_count{service="smartdb.v1.SearchService",method="Search"} 100
# TYPE search_cache_lookups_total counter
search_cache_lookups_total{level="memory",outcome="hit"} 30
search_cache_lookups_total{level="memory",outcome="miss"} 10
# TYPE embed_cache_hits_total counter
embed_cache_hits_total{level="memory"} 5
# TYPE embed_cache_misses_total counter
embed_cache_misses_total{level="memory"} 15
# TYPE ingest_jobs_waiting gauge
ingest_jobs_waiting 7
# TYPE ingest_job_backlog_age_seconds gauge
ingest_job_backlog_age_seconds 12.5
# TYPE client_breaker_open gauge
client_breaker_open{downstream="embed-svc",endpoint="127.0.0.1:1"} 1
client_breaker_open{downstream="embed-svc",endpoint="127.0.0.1:2"} 0
"#;

    fn search(reading: &Reading) -> &RpcCounts {
        &reading.rpcs[&("smartdb.v1.SearchService".to_owned(), "Search".to_owned())]
    }

    #[test]
    fn a_reading_keeps_our_rpcs_caches_queues_and_open_breakers() {
        let reading = Reading::parse(TEXT);
        assert_eq!(reading.rpcs.len(), 1, "health checks are left out");
        let counts = search(&reading);
        assert_eq!(
            (counts.requests, counts.errors, counts.rejected),
            (100.0, 6.0, 4.0)
        );
        assert_eq!(counts.buckets.last(), Some(&(f64::INFINITY, 100.0)));
        assert_eq!(
            reading.caches[&("search results".to_owned(), "memory".to_owned())],
            (30.0, 40.0)
        );
        assert_eq!(
            reading.caches[&("embeddings".to_owned(), "memory".to_owned())],
            (5.0, 20.0)
        );
        assert_eq!(reading.queues["ingest jobs"], (7.0, 12.5));
        assert_eq!(
            reading.breakers,
            vec![("embed-svc at 127.0.0.1:1".to_owned(), 1.0)]
        );
    }

    #[test]
    fn quantiles_interpolate_within_buckets_like_prometheus() {
        let counts = search(&Reading::parse(TEXT)).clone();
        // Rank 50 of 100 falls in (1 ms, 2.5 ms] holding ranks 11..60: 40/50 of the way.
        assert!((counts.quantile(0.5) - 0.0022).abs() < 1e-9);
        // Rank 95 in (2.5 ms, 5 ms] holding 61..98.
        assert!((counts.quantile(0.95) - (0.0025 + 0.0025 * 35.0 / 38.0)).abs() < 1e-9);
        // Rank 99 falls in +Inf: the highest finite bound.
        assert_eq!(counts.quantile(0.99), 0.005);
        assert_eq!(RpcCounts::default().quantile(0.5), 0.0);
    }

    #[test]
    fn a_window_takes_the_increase_and_starts_over_after_a_restart() {
        let key = ("search-svc".to_owned(), "a".to_owned());
        let before = Snapshot {
            replicas: HashMap::from([(key.clone(), Reading::parse(TEXT))]),
            ..Snapshot::default()
        };
        let later = TEXT
            .replace("code=\"Ok\"} 90", "code=\"Ok\"} 180")
            .replace("le=\"0.001\"} 10", "le=\"0.001\"} 100")
            .replace("le=\"0.0025\"} 60", "le=\"0.0025\"} 150")
            .replace("le=\"0.005\"} 98", "le=\"0.005\"} 188")
            .replace("le=\"+Inf\"} 100", "le=\"+Inf\"} 190")
            .replace("outcome=\"hit\"} 30", "outcome=\"hit\"} 70");
        let now = Snapshot {
            replicas: HashMap::from([(key.clone(), Reading::parse(&later))]),
            ..Snapshot::default()
        };
        let window = Window::between(Some(&before), &now, 60.0);
        let counts = &window.rpcs[&(
            "search-svc".to_owned(),
            "smartdb.v1.SearchService".to_owned(),
            "Search".to_owned(),
        )];
        assert_eq!((counts.requests, counts.errors), (90.0, 0.0));
        // All 90 new calls took at most 1 ms.
        assert!(counts.quantile(0.99) <= 0.001);
        assert_eq!(window.request_rate("search-svc"), 1.5);
        assert_eq!(
            window.caches[&(
                "search-svc".to_owned(),
                "search results".to_owned(),
                "memory".to_owned()
            )],
            (40.0, 40.0)
        );
        // The replica restarted: its counters start from zero again, all of it is new.
        let restarted = Window::between(Some(&now), &before, 60.0);
        let counts = restarted.rpcs.values().next().unwrap();
        assert_eq!(counts.requests, 100.0);
        // Nothing before: everything since the start.
        assert_eq!(
            Window::between(None, &before, 1.0)
                .rpcs
                .values()
                .next()
                .unwrap()
                .requests,
            100.0
        );
    }
}
