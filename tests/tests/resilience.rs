//! Resilience between services: real processes, real kills (SIGKILL, SIGSTOP), real Redis. Each
//! test prints the figures it measured (`--nocapture` shows them).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, MAX_MESSAGE, create_kb, eventually, health, ingest_text, scifact, signal};
use smartdb_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// One call of a load run.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    took: Duration,
    code: Code,
    /// The query was new (needs embed-svc) rather than a repeat (served from the result cache).
    fresh: bool,
    /// Answered, but ranked by keywords only (the query could not be embedded).
    degraded: bool,
    message: String,
}

impl Sample {
    /// A full answer: no error, not degraded.
    fn full(&self) -> bool {
        self.code == Code::Ok && !self.degraded
    }
}

/// Searches `kb` through the gateway one call after another until `stop` is set. With
/// `cached`, every other query repeats one earlier query (the result cache answers it); the
/// others are new, so each needs embed-svc.
async fn search_load(
    channel: common::Gw,
    kb: &'static str,
    cached: bool,
    deadline: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut client = pb::search_service_client::SearchServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE);
    let mut samples = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let fresh = !cached || i % 2 == 1;
        // Every query shares keywords with the seeded texts, so a keyword-only answer has hits.
        let query = if fresh {
            format!("which animals hunt at night, question {i}")
        } else {
            "which animals hunt at night".to_owned()
        };
        let mut request = tonic::Request::new(pb::SearchRequest {
            knowledge_base: kb.into(),
            query,
            top_k: 3,
            ..Default::default()
        });
        request.set_timeout(deadline);
        let at = Instant::now();
        let result = client.search(request).await;
        let took = at.elapsed();
        let (code, degraded, message) = match &result {
            Ok(r) => {
                let r = r.get_ref();
                assert!(!r.hits.is_empty(), "an answer without hits: {r:?}");
                (Code::Ok, r.degraded, r.degraded_reason.clone())
            }
            Err(s) => (s.code(), false, s.message().to_owned()),
        };
        samples.push(Sample {
            at,
            took,
            code,
            fresh,
            degraded,
            message,
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    samples
}

/// A search load running in the background.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Load {
    /// Starts [`search_load`] on knowledge base "kb" (5 s deadlines) and lets it run `warm_up`.
    async fn start(cluster: &Cluster, cached: bool, warm_up: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(search_load(
            cluster.channel().await,
            "kb",
            cached,
            Duration::from_secs(5),
            stop.clone(),
        ));
        tokio::time::sleep(warm_up).await;
        Load { stop, task }
    }

    /// Stops the load and returns what it measured.
    async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

fn percentile(mut values: Vec<Duration>, p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    let rank = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[rank]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until the service listening at `grpc` is SERVING again.
async fn serving(grpc: &str, timeout: Duration) {
    eventually(timeout, &format!("{grpc} to serve again"), || async {
        (health(grpc, "").await == Some(ServingStatus::Serving)).then_some(())
    })
    .await
}

/// Value of the first sample of `name` in `/metrics` text whose labels contain all `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn seed(cluster: &Cluster, kb: &str) {
    create_kb(cluster, kb).await;
    for text in [
        "Owls hunt at night: their eyes and silent feathers make them nocturnal predators.",
        "Bats navigate in the dark by echolocation and catch insects at night.",
        "Cows graze in meadows during the day and sleep at night.",
    ] {
        ingest_text(cluster, kb, text, true).await.unwrap();
    }
}

/// kill -9 embed-svc under a steady search load: every search is still answered, repeated
/// queries from the result cache and new ones from the keyword ranking (flagged degraded), each
/// at once (never a multi-second wait); once embed-svc is back (restarted by `smartdb up`) full
/// hybrid answers return within 10 s.
#[tokio::test(flavor = "multi_thread")]
async fn killed_embed_svc_degrades_fast_and_recovers() {
    let cluster = Cluster::start().await;
    seed(&cluster, "kb").await;
    let embed = cluster.service("embed-svc");
    let load = Load::start(&cluster, true, Duration::from_secs(2)).await;

    let killed = Instant::now();
    signal(embed.pid.unwrap(), libc::SIGKILL);
    serving(&embed.grpc, Duration::from_secs(120)).await;
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let samples = load.stop().await;

    let down: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= killed && s.at < back)
        .collect();
    for s in &down {
        assert_eq!(s.code, Code::Ok, "every search is answered: {s:?}");
        assert!(
            !s.degraded || s.fresh,
            "a cached answer stays a full answer: {s:?}"
        );
        // Never a multi-second wait (the bound allows for this 2-core machine being busy
        // restarting embed-svc; the percentile below is the figure).
        assert!(s.took < Duration::from_millis(500), "{s:?}");
    }
    let degraded: Vec<&&Sample> = down.iter().filter(|s| s.degraded).collect();
    assert!(
        !degraded.is_empty(),
        "nothing degraded while embed-svc was down?"
    );
    assert!(
        degraded.iter().all(|s| s.message.contains("keywords")),
        "{degraded:?}"
    );
    let took: Vec<Duration> = degraded.iter().map(|s| s.took).collect();
    let p50 = percentile(took.clone(), 0.5);
    let p95 = percentile(took.clone(), 0.95);
    assert!(
        p95 < Duration::from_millis(50),
        "degraded answers took p95 {p95:?}"
    );
    println!(
        "embed-svc down {:.1} s: {} searches, all answered: {} full (cached), {} degraded to keywords in p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        (back - killed).as_secs_f64(),
        down.len(),
        down.len() - degraded.len(),
        degraded.len(),
        ms(p50),
        ms(p95),
        ms(took.iter().copied().max().unwrap_or_default()),
    );

    // Back: from some point within 10 s, every search is a full (hybrid) answer.
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= back).collect();
    let last_partial = after.iter().rev().find(|s| !s.full()).map(|s| s.at);
    let recovered = last_partial.map_or(Duration::ZERO, |at| at - back);
    println!(
        "full answers again {:.1} s after embed-svc was back ({} searches after)",
        recovered.as_secs_f64(),
        after.len()
    );
    assert!(recovered < Duration::from_secs(10), "{recovered:?}");
    assert!(
        after
            .iter()
            .filter(|s| s.at > back + Duration::from_secs(10))
            .all(|s| s.full())
    );
}

/// kill -9 search-svc while 500 documents are being ingested: every accepted document ends
/// INDEXED, and the index holds exactly their chunks (none lost, none doubled).
#[tokio::test(flavor = "multi_thread")]
async fn killed_search_svc_loses_no_chunk_of_500_documents() {
    let cluster = Cluster::start().await;
    let kb = create_kb(&cluster, "scifact").await;
    // Real abstracts, cut to keep the test quick on 2 cores (most give one or two chunks).
    let texts: Vec<String> = scifact()
        .into_iter()
        .take(500)
        .map(|(_, text)| {
            let mut end = text.len().min(1200);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text[..end].to_owned()
        })
        .collect();
    let search = cluster.service("search-svc");
    let started = Instant::now();
    let mut ids = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        if i == 150 {
            signal(search.pid.unwrap(), libc::SIGKILL);
        }
        let response = ingest_text(&cluster, "scifact", text, false)
            .await
            .unwrap_or_else(|s| panic!("document {i} refused: {s:?}"));
        ids.push(response.document.unwrap().id);
    }
    let accepted = started.elapsed();
    // The backlog shows in ingest-svc's metrics (refreshed every few seconds).
    let ingest = cluster.service("ingest-svc");
    let backlog = eventually(
        Duration::from_secs(15),
        "a backlog in the metrics",
        || async {
            let text = common::http_get(&ingest.http, "/metrics").await;
            let waiting = metric(&text, "ingest_jobs_waiting", &[])?;
            let age = metric(&text, "ingest_job_backlog_age_seconds", &[])?;
            (waiting > 0.0 && age > 0.0).then_some((waiting, age))
        },
    )
    .await;

    // Wait until every document is INDEXED (none may fail).
    let mut docs = cluster.docs().await;
    let listed = eventually(
        Duration::from_secs(600),
        "all 500 documents INDEXED",
        || {
            let mut docs = docs.clone();
            async move {
                let mut all = Vec::new();
                let mut token = String::new();
                loop {
                    let page = docs
                        .list_documents(pb::ListDocumentsRequest {
                            knowledge_base: "scifact".into(),
                            page_size: 200,
                            page_token: token,
                        })
                        .await
                        .ok()?
                        .into_inner();
                    all.extend(page.documents);
                    token = page.next_page_token;
                    if token.is_empty() {
                        break;
                    }
                }
                let failed: Vec<_> = all
                    .iter()
                    .filter(|d| d.status == pb::DocumentStatus::Failed as i32)
                    .collect();
                assert!(failed.is_empty(), "documents failed: {failed:?}");
                all.iter()
                    .all(|d| d.status == pb::DocumentStatus::Indexed as i32)
                    .then_some(all)
            }
        },
    )
    .await;
    assert_eq!(listed.len(), 500);
    let expected: u64 = listed.iter().map(|d| d.chunk_count as u64).sum();
    assert!(expected >= 500);

    let search = cluster.service("search-svc");
    let mut index =
        pb::index_service_client::IndexServiceClient::new(common::connect(&search.grpc).await);
    let stats = index
        .get_collection_stats(pb::GetCollectionStatsRequest {
            knowledge_base_id: kb.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    println!(
        "500 documents accepted in {:.1} s with search-svc killed after 150; all INDEXED after {:.1} s; {} chunks expected, {} points in the index",
        accepted.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        expected,
        stats.point_count
    );
    assert_eq!(stats.point_count, expected, "chunks lost or doubled");
    println!(
        "backlog seen: {} jobs waiting, the oldest for {:.1} s",
        backlog.0, backlog.1
    );
    eventually(
        Duration::from_secs(15),
        "an empty backlog in the metrics",
        || async {
            let text = common::http_get(&ingest.http, "/metrics").await;
            (metric(&text, "ingest_jobs_waiting", &[]) == Some(0.0)
                && metric(&text, "ingest_job_backlog_age_seconds", &[]) == Some(0.0))
            .then_some(())
        },
    )
    .await;

    // And the documents are searchable through the restarted search-svc.
    let hits = common::search(&cluster, "scifact", "bone mineral density")
        .await
        .unwrap()
        .hits;
    assert!(!hits.is_empty());
    let _ = &mut docs;
}

/// Frozen downstreams (SIGSTOP). embed-svc frozen: searches still answer within their deadline,
/// degraded to keywords, then at once once the breaker is open; SIGCONT brings hybrid answers
/// back. search-svc frozen: callers get DEADLINE_EXCEEDED within their deadline, the gateway's
/// breaker opens (calls then fail at once, naming the open circuit), SIGCONT brings it back.
#[tokio::test(flavor = "multi_thread")]
async fn frozen_downstreams_answer_within_deadlines_and_open_breakers() {
    let cluster = Cluster::start().await;
    seed(&cluster, "kb").await;
    let embed = cluster.service("embed-svc");
    let search = cluster.service("search-svc");
    let gateway = cluster.service("gateway");
    let client = cluster.search().await;
    let deadline = Duration::from_secs(1);
    let ask = |i: usize| {
        let mut request = tonic::Request::new(pb::SearchRequest {
            knowledge_base: "kb".into(),
            query: format!("owls hunting at night {i}"),
            ..Default::default()
        });
        request.set_timeout(deadline);
        let mut client = client.clone();
        async move {
            let started = Instant::now();
            let result = client.search(request).await.map(|r| r.into_inner());
            (result, started.elapsed())
        }
    };

    signal(embed.pid.unwrap(), libc::SIGSTOP);
    let mut answers = Vec::new();
    for i in 0..10 {
        let (result, took) = ask(i).await;
        let answer = result.unwrap_or_else(|s| panic!("search {i} failed: {s:?}"));
        // No call hangs past its deadline (plus scheduling slack).
        assert!(took < deadline + Duration::from_millis(300), "{took:?}");
        assert!(answer.degraded, "{answer:?}");
        assert!(!answer.hits.is_empty());
        answers.push((took, answer.degraded_reason));
    }
    let fast: Vec<_> = answers
        .iter()
        .filter(|(took, reason)| {
            *took < Duration::from_millis(100) && reason.contains("circuit open")
        })
        .collect();
    println!(
        "frozen embed-svc: {:?}",
        answers
            .iter()
            .map(|(t, r)| format!("{:.0} ms: {r}", ms(*t)))
            .collect::<Vec<_>>()
    );
    assert!(
        answers[0].1.contains("deadline"),
        "the first waits for the embedding until its share of the deadline: {answers:?}"
    );
    assert!(!fast.is_empty(), "the breaker never opened: {answers:?}");
    let metrics = common::http_get(&search.http, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "client_breaker_open",
            &["downstream=\"embed-svc\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    signal(embed.pid.unwrap(), libc::SIGCONT);
    let thawed = Instant::now();
    eventually(
        Duration::from_secs(10),
        "hybrid answers after SIGCONT",
        || async {
            common::search(&cluster, "kb", &format!("owls {:?}", Instant::now()))
                .await
                .ok()
                .filter(|r| !r.degraded && r.mode == pb::SearchMode::Hybrid as i32)
        },
    )
    .await;
    println!(
        "hybrid answers again {:.1} s after SIGCONT of embed-svc",
        thawed.elapsed().as_secs_f64()
    );

    signal(search.pid.unwrap(), libc::SIGSTOP);
    let mut outcomes = Vec::new();
    for i in 100..110 {
        let (result, took) = ask(i).await;
        let err = result.expect_err("search-svc is frozen");
        assert!(
            took < deadline + Duration::from_millis(300),
            "{took:?} {err:?}"
        );
        outcomes.push((err.code(), took, err.message().to_owned()));
    }
    let timed_out = outcomes
        .iter()
        .filter(|(c, _, _)| *c == Code::DeadlineExceeded)
        .count();
    let open: Vec<_> = outcomes
        .iter()
        .filter(|(c, _, m)| *c == Code::Unavailable && m.contains("circuit open"))
        .collect();
    println!(
        "frozen search-svc: {timed_out} DEADLINE_EXCEEDED, then {} failed fast with an open circuit: {outcomes:?}",
        open.len()
    );
    assert_eq!(outcomes[0].0, Code::DeadlineExceeded, "{outcomes:?}");
    assert_eq!(timed_out + open.len(), outcomes.len(), "{outcomes:?}");
    assert!(!open.is_empty(), "the breaker never opened: {outcomes:?}");
    assert!(
        open.iter()
            .all(|(_, took, _)| *took < Duration::from_millis(100))
    );
    assert!(open[0].2.contains("search-svc"), "{:?}", open[0]);
    let metrics = common::http_get(&gateway.http, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "client_breaker_open",
            &["downstream=\"search-svc\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    signal(search.pid.unwrap(), libc::SIGCONT);
    let thawed = Instant::now();
    eventually(
        Duration::from_secs(10),
        "searches after SIGCONT of search-svc",
        || async { common::search(&cluster, "kb", "owls").await.ok() },
    )
    .await;
    println!(
        "answers again {:.1} s after SIGCONT of search-svc",
        thawed.elapsed().as_secs_f64()
    );
}

/// Two replicas of embed-svc behind search-svc and ingest-svc, one killed during load: few
/// failures (the retry lands on the other replica), then none; documents keep being indexed;
/// the killed replica rejoins after its restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_embed_replica_leaves_the_set_and_rejoins() {
    let cluster = Cluster::start_with(&["--replicas", "embed=2"], &[]).await;
    let second = cluster.service("embed-svc-2");
    serving(&second.grpc, Duration::from_secs(120)).await;
    seed(&cluster, "kb").await;
    let search = cluster.service("search-svc");
    let load = Load::start(&cluster, false, Duration::from_secs(2)).await;

    let killed = Instant::now();
    signal(second.pid.unwrap(), libc::SIGKILL);
    // Documents ingested meanwhile are indexed through the surviving replica.
    let mut ids = Vec::new();
    for i in 0..10 {
        let text = format!("Document {i} about owls, bats and other animals that hunt at night.");
        ids.push(
            ingest_text(&cluster, "kb", &text, false)
                .await
                .unwrap()
                .document
                .unwrap()
                .id,
        );
    }
    serving(&second.grpc, Duration::from_secs(120)).await;
    let back = Instant::now();
    for id in &ids {
        common::wait_for_status(
            &cluster,
            "kb",
            id,
            pb::DocumentStatus::Indexed,
            Duration::from_secs(60),
        )
        .await;
    }
    let attempts = |text: &str| {
        metric(
            text,
            "client_attempts_total",
            &[
                "downstream=\"embed-svc\"",
                &format!("endpoint=\"{}\"", second.grpc),
            ],
        )
        .unwrap_or(0.0)
    };
    let before = attempts(&common::http_get(&search.http, "/metrics").await);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let samples = load.stop().await;
    let after = attempts(&common::http_get(&search.http, "/metrics").await);

    let down: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= killed && s.at < back)
        .collect();
    let failed: Vec<&&Sample> = down.iter().filter(|s| !s.full()).collect();
    println!(
        "embed-svc-2 down {:.1} s: {} searches, {} failed ({:.1} %): {:?}; attempts on the restarted replica {} → {}",
        (back - killed).as_secs_f64(),
        down.len(),
        failed.len(),
        100.0 * failed.len() as f64 / down.len().max(1) as f64,
        failed.iter().map(|s| &s.message).collect::<Vec<_>>(),
        before,
        after
    );
    // Retries go to the surviving replica; the budget allows a few failures at the very start.
    assert!(
        failed.len() * 20 <= down.len().max(20),
        "{} of {} failed",
        failed.len(),
        down.len()
    );
    let settled = killed + Duration::from_secs(2);
    assert!(
        down.iter()
            .filter(|s| s.at > settled)
            .all(|s| s.code == Code::Ok),
        "failures after the breaker took the dead replica out"
    );
    assert!(
        samples
            .iter()
            .filter(|s| s.at >= back)
            .all(|s| s.code == Code::Ok),
        "failures after the replica came back"
    );
    assert!(
        after > before,
        "the restarted replica got no calls ({before} → {after})"
    );
}

/// A redis-server of the test's own, killed during load: the embedding cache falls back to
/// memory, so every call still succeeds (only slower), and documents are still indexed.
#[tokio::test(flavor = "multi_thread")]
async fn redis_dying_during_load_costs_no_request() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut redis = match std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => {
            panic!("redis-server is needed for this test (Debian package redis-server): {err}")
        }
    };
    let url = format!("redis://127.0.0.1:{port}");
    eventually(
        Duration::from_secs(10),
        "redis-server to listen",
        || async { std::net::TcpStream::connect(("127.0.0.1", port)).ok() },
    )
    .await;
    let cluster = Cluster::start_with_env(&[("SMARTDB_REDIS_URL", &url)]).await;
    seed(&cluster, "kb").await;
    let embed = cluster.service("embed-svc");
    let load = Load::start(&cluster, false, Duration::from_secs(3)).await;
    // Redis is in use: new queries miss it (and are then written to it).
    let redis_misses = metric(
        &common::http_get(&embed.http, "/metrics").await,
        "embed_cache_misses_total",
        &["level=\"redis\""],
    )
    .unwrap_or(0.0);
    assert!(redis_misses > 0.0, "Redis was never asked");
    let killed = Instant::now();
    redis.kill().unwrap();
    redis.wait().unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let text = format!("Note {i}: foxes hunt at dusk and at night.");
        ids.push(
            ingest_text(&cluster, "kb", &text, false)
                .await
                .unwrap()
                .document
                .unwrap()
                .id,
        );
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let samples = load.stop().await;
    for id in &ids {
        common::wait_for_status(
            &cluster,
            "kb",
            id,
            pb::DocumentStatus::Indexed,
            Duration::from_secs(60),
        )
        .await;
    }
    let redis_errors = metric(
        &common::http_get(&embed.http, "/metrics").await,
        "embed_cache_errors_total",
        &["level=\"redis\""],
    )
    .unwrap_or(0.0);
    let errors: Vec<&Sample> = samples.iter().filter(|s| !s.full()).collect();
    let took = |up: bool| {
        percentile(
            samples
                .iter()
                .filter(|s| (s.at < killed) == up)
                .map(|s| s.took)
                .collect(),
            0.5,
        )
    };
    println!(
        "Redis killed under load: {} searches, {} errors; p50 {:.1} ms with Redis, {:.1} ms without; {redis_errors} Redis errors absorbed",
        samples.len(),
        errors.len(),
        ms(took(true)),
        ms(took(false)),
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert!(redis_errors > 0.0, "Redis was not asked after it died");
    assert!(samples.iter().filter(|s| s.at > killed).count() > 10);
}
