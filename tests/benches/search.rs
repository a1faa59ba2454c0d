//! Search at scale: latency, throughput and memory of a real cluster (`smartdb up`, release
//! build), through the gateway and straight to search-svc in the same run.
//!
//! ```sh
//! cargo build --release -p smartdb-cli && cargo bench -p smartdb-tests --bench search
//! ```
//!
//! Data: the SciFact corpus (5,183 real abstracts, ~9,250 chunks) goes in through the public
//! API, so the first scale is real text embedded by the real model. Larger scales add synthetic
//! points straight into search-svc's index (random unit vectors, texts drawn from the corpus
//! vocabulary so the BM25 postings look real); queries are always real sentences of the corpus,
//! embedded by the real model, each text used once so an "uncached" search misses both the
//! result cache and embed-svc's cache.
//!
//! Env: `SMARTDB_BENCH_SCALES` (chunks, default `10000,100000`), `SMARTDB_BENCH_QUERIES`
//! (uncached searches per mode and path, default 200), `SMARTDB_BENCH_CACHED` (cached searches
//! per path, default 2000), `SMARTDB_BENCH_CONCURRENCY` (clients in the throughput runs,
//! default 8), `SMARTDB_BENCH_SECONDS` (length of each throughput run, default 5),
//! `SMARTDB_BENCH_DOCS` (real documents loaded, default all: fewer make a quick run while
//! tuning; the published figures load all).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Cluster;
use smartdb_proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;

type SearchClient = pb::search_service_client::SearchServiceClient<common::Gw>;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Latencies of one variant.
struct Stats {
    p50: Duration,
    p99: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Stats {
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sentences of the corpus to query with, each used once.
struct Queries {
    texts: Vec<String>,
    next: AtomicUsize,
}

impl Queries {
    fn new(corpus: &[(String, String)]) -> Self {
        let mut texts = Vec::new();
        for (_, text) in corpus {
            for sentence in text.split(". ") {
                let words: Vec<&str> = sentence.split_whitespace().take(14).collect();
                if words.len() >= 6 {
                    texts.push(words.join(" "));
                }
            }
        }
        // Spread consecutive queries over the corpus.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for i in (1..texts.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            texts.swap(i, (state % (i as u64 + 1)) as usize);
        }
        Self {
            texts,
            next: AtomicUsize::new(0),
        }
    }

    fn take(&self) -> String {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let text = &self.texts[i % self.texts.len()];
        if i < self.texts.len() {
            text.clone()
        } else {
            format!("{text} {}", i / self.texts.len())
        }
    }
}

fn request(kb: &str, query: String, mode: pb::SearchMode) -> pb::SearchRequest {
    pb::SearchRequest {
        knowledge_base: kb.to_owned(),
        query,
        top_k: 10,
        mode: mode as i32,
        ..Default::default()
    }
}

async fn timed(
    client: &mut SearchClient,
    req: pb::SearchRequest,
) -> (Duration, pb::SearchResponse) {
    let started = Instant::now();
    let response = client
        .search(req)
        .await
        .unwrap_or_else(|s| panic!("search failed: {s:?}"))
        .into_inner();
    (started.elapsed(), response)
}

/// Memory of a process from `/proc`: (VmRSS, RssAnon, RssFile) in bytes.
fn memory(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}

/// The largest file-backed parts of a process's resident memory, from `/proc/PID/smaps`: the
/// path of each mapped file relative to `under` (directories of numbered files folded into one
/// entry), with its resident bytes, largest first.
fn mapped_files(pid: u32, under: &std::path::Path) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by_file: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut current: Option<String> = None;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A mapping's header: address range, perms, offset, device, inode, path.
        if fields.len() >= 5 && fields[0].contains('-') && !fields[0].ends_with(':') {
            current = fields.get(5).filter(|p| p.starts_with('/')).map(|path| {
                let path = std::path::Path::new(path);
                let shown = path.strip_prefix(under).unwrap_or(path).to_string_lossy();
                // segments/<uuid>/... -> segments/*/..., numbered chunks folded together.
                shown
                    .split('/')
                    .map(|part| {
                        if part.len() >= 32
                            || part
                                .chars()
                                .all(|c| c.is_ascii_digit() || c == '.' || c == '-' || c == '_')
                        {
                            "*".to_owned()
                        } else {
                            part.chars().filter(|c| !c.is_ascii_digit()).collect()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("/")
            });
        } else if let (Some(file), Some(&"Rss:")) = (&current, fields.first()) {
            let kb: u64 = fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            *by_file.entry(file.clone()).or_default() += kb * 1024;
        }
    }
    let mut files: Vec<(String, u64)> = by_file.into_iter().filter(|(_, b)| *b > 0).collect();
    files.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    files
}

/// Prints the largest file-backed parts of search-svc's resident memory.
fn print_mapped_files(pid: u32, under: &std::path::Path) {
    for (file, bytes) in mapped_files(pid, under).into_iter().take(8) {
        println!("    mapped {:>7.1} MB  {file}", bytes as f64 / 1e6);
    }
}

/// A memory cgroup beside this process's own with a hard limit, to run a service as a
/// container's memory limit would (cgroup v1 `memory` or v2 `memory.max`).
struct MemoryCgroup {
    dir: std::path::PathBuf,
    /// Where processes go back to on `leave`.
    parent: std::path::PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// Makes the cgroup with `limit` bytes, or says why it cannot (no writable controller).
    fn create(limit: u64) -> Result<Self, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let v1 = own.lines().find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_owned())
        });
        let (parent, v2) = match v1 {
            Some(path) => (format!("/sys/fs/cgroup/memory{path}"), false),
            None => {
                let path = own
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .ok_or("no memory cgroup controller on this machine")?;
                (format!("/sys/fs/cgroup{path}"), true)
            }
        };
        let parent = std::path::PathBuf::from(parent);
        let dir = parent.join(format!("smartdb-bench-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        let cgroup = Self { dir, parent, v2 };
        std::fs::write(cgroup.dir.join(file), limit.to_string())
            .map_err(|e| format!("cannot set {file}: {e}"))?;
        Ok(cgroup)
    }

    fn move_to(dir: &std::path::Path, pid: u32) {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} to {}: {e}", dir.display()));
    }

    /// Moves `pid` (not its children so far) into the cgroup; its new children start in it.
    fn enter(&self, pid: u32) {
        Self::move_to(&self.dir, pid);
    }

    /// Moves `pid` back where this process is.
    fn leave(&self, pid: u32) {
        Self::move_to(&self.parent, pid);
    }

    fn holds(&self, pid: u32) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim() == pid.to_string()))
    }

    fn read(&self, file: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    fn describe(&self) -> &'static str {
        if self.v2 {
            "cgroup v2 memory.max"
        } else {
            "cgroup v1 memory.limit_in_bytes"
        }
    }

    /// Usage, peak, how often the limit was hit and how many OOM kills it caused.
    fn report(&self, dense: u64) -> String {
        let counter = |file: &str, name: &str| -> Option<u64> {
            std::fs::read_to_string(self.dir.join(file))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        };
        let (usage, peak, hits, kills) = if self.v2 {
            (
                self.read("memory.current"),
                self.read("memory.peak"),
                counter("memory.events", "max "),
                counter("memory.events", "oom_kill "),
            )
        } else {
            (
                self.read("memory.usage_in_bytes"),
                self.read("memory.max_usage_in_bytes"),
                self.read("memory.failcnt"),
                counter("memory.oom_control", "oom_kill "),
            )
        };
        let mb = |v: Option<u64>| {
            v.map_or("?".to_owned(), |v| {
                format!(
                    "{:.1} MB ({:.2}x dense)",
                    v as f64 / 1e6,
                    v as f64 / dense as f64
                )
            })
        };
        let count = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
        format!(
            "usage {} (page cache included), peak {}, limit reached {} times (reclaim), OOM kills {}",
            mb(usage),
            mb(peak),
            count(hits),
            count(kills)
        )
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty only once the cluster has stopped; a leftover directory is harmless.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Drops every file under `dir` from the page cache (files nobody maps); returns their bytes.
fn evict_from_page_cache(dir: &std::path::Path) -> u64 {
    use std::os::fd::AsRawFd;
    let mut bytes = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            bytes += evict_from_page_cache(&path);
        } else if let Ok(file) = std::fs::File::open(&path) {
            // SAFETY: advice on an open descriptor; it changes no data.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            bytes += file.metadata().map_or(0, |m| m.len());
        }
    }
    bytes
}

/// Waits until search-svc's background work (segment merging, HNSW builds) is done: its CPU
/// time stops growing for a few seconds.
async fn wait_idle(pid: u32) {
    let started = Instant::now();
    let mut last = common::bench::cpu_ticks(&pid.to_string());
    let mut quiet = 0;
    while quiet < 4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = common::bench::cpu_ticks(&pid.to_string());
        if now - last <= 2 {
            quiet += 1;
        } else {
            quiet = 0;
        }
        last = now;
    }
    println!(
        "  search-svc idle after {:.0} s of background work",
        started.elapsed().as_secs_f64()
    );
}

/// Loads the corpus through the gateway and waits until every document is indexed.
async fn load_corpus(cluster: &Cluster, kb: &str, corpus: &[(String, String)]) -> u64 {
    let started = Instant::now();
    let concurrency = 8;
    let chunks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let corpus = Arc::new(corpus.to_vec());
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (corpus, next, chunks) = (corpus.clone(), next.clone(), chunks.clone());
        let docs = cluster.docs().await;
        let kb = kb.to_owned();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, text)) = corpus.get(i) else {
                    return;
                };
                let response = docs
                    .clone()
                    .ingest_text(pb::IngestTextRequest {
                        knowledge_base: kb.clone(),
                        text: text.clone(),
                        title: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|s| panic!("ingest {id}: {s:?}"))
                    .into_inner();
                chunks
                    .lock()
                    .unwrap()
                    .push(response.document.expect("document").id);
            }
        }));
    }
    for task in tasks {
        task.await.expect("upload task");
    }
    let ids = std::mem::take(&mut *chunks.lock().unwrap());
    let mut total = 0;
    for id in &ids {
        let doc = common::wait_for_status(
            cluster,
            kb,
            id,
            pb::DocumentStatus::Indexed,
            Duration::from_secs(3600),
        )
        .await;
        total += doc.chunk_count as u64;
    }
    println!(
        "  {} documents ({total} chunks) uploaded and indexed through the gateway in {:.0} s",
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    total
}

/// Adds `count` synthetic points to the knowledge base's collection, straight into search-svc.
async fn add_synthetic(
    search: &str,
    kb_id: &str,
    dimension: usize,
    vocabulary: &[String],
    analyzer: &smartdb_search::lexical::Analyzer,
    from: u64,
    count: u64,
) -> u64 {
    let started = Instant::now();
    let mut index =
        pb::index_service_client::IndexServiceClient::new(common::connect(search).await)
            .max_encoding_message_size(64 << 20);
    let mut state = 0x2545_f491_4f6c_dd1d_u64 ^ from;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let batch = 256;
    let mut done = 0;
    let mut nonzeros = 0;
    while done < count {
        let n = batch.min(count - done);
        let points = (0..n)
            .map(|i| {
                let number = from + done + i;
                // Roughly normal components (sum of uniforms) give directions spread over the sphere.
                let mut vector: Vec<f32> = (0..dimension)
                    .map(|_| {
                        (0..4)
                            .map(|_| (rand() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                            .sum()
                    })
                    .collect();
                let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
                vector.iter_mut().for_each(|x| *x /= norm);
                let words = 120 + (rand() % 80) as usize;
                let text = (0..words)
                    .map(|_| vocabulary[(rand() % vocabulary.len() as u64) as usize].as_str())
                    .collect::<Vec<_>>()
                    .join(" ");
                nonzeros += analyzer.document("", &[], &text).indices.len() as u64;
                pb::Point {
                    id: uuid_like(number),
                    vector,
                    document_id: format!("synthetic-{}", number / 2),
                    chunk_index: (number % 2) as u32,
                    text,
                    title: String::new(),
                    metadata: Default::default(),
                    source_name: format!("synthetic-{}.txt", number / 2),
                    ..Default::default()
                }
            })
            .collect();
        index
            .upsert_points(pb::UpsertPointsRequest {
                knowledge_base_id: kb_id.to_owned(),
                points,
            })
            .await
            .unwrap_or_else(|s| panic!("upsert: {s:?}"));
        done += n;
    }
    println!(
        "  {count} synthetic points upserted into search-svc in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    nonzeros
}

fn uuid_like(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

/// Uncached searches of one mode, alternating gateway and direct; returns (gateway, direct).
async fn uncached(
    gateway: &mut SearchClient,
    direct: &mut SearchClient,
    kb: &str,
    mode: pb::SearchMode,
    queries: &Queries,
    n: usize,
) -> (Stats, Stats) {
    let (mut through, mut straight) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (client, samples) = if i % 2 == 0 {
            (&mut *gateway, &mut through)
        } else {
            (&mut *direct, &mut straight)
        };
        let (took, response) = timed(client, request(kb, queries.take(), mode)).await;
        assert!(
            !response.cached,
            "a fresh query was answered from the cache"
        );
        assert!(!response.degraded, "degraded: {}", response.degraded_reason);
        assert_eq!(response.mode, mode as i32);
        samples.push(took);
    }
    (stats(through), stats(straight))
}

/// The same query again and again, alternating gateway and direct.
async fn cached(
    gateway: &mut SearchClient,
    direct: &mut SearchClient,
    kb: &str,
    queries: &Queries,
    n: usize,
) -> (Stats, Stats) {
    let query = queries.take();
    let req = request(kb, query, pb::SearchMode::Hybrid);
    timed(gateway, req.clone()).await;
    let (mut through, mut straight) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (client, samples) = if i % 2 == 0 {
            (&mut *gateway, &mut through)
        } else {
            (&mut *direct, &mut straight)
        };
        let (took, response) = timed(client, req.clone()).await;
        assert!(response.cached, "a repeated query was not cached");
        samples.push(took);
    }
    (stats(through), stats(straight))
}

/// Searches per second with `clients` concurrent callers for `seconds`.
async fn throughput(
    addr: &str,
    key: Option<&str>,
    kb: &str,
    queries: Arc<Queries>,
    fresh: bool,
    clients: usize,
    seconds: u64,
) -> f64 {
    let stop = Instant::now() + Duration::from_secs(seconds);
    let fixed = queries.take();
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = SearchClient::new(common::gateway_channel(addr, key).await);
        let (kb, queries, done, fixed) =
            (kb.to_owned(), queries.clone(), done.clone(), fixed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let query = if fresh { queries.take() } else { fixed.clone() };
                timed(&mut client, request(&kb, query, pb::SearchMode::Hybrid)).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await.expect("client task");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// p50 of embedding one query straight at embed-svc (its share of an uncached search).
async fn embedding_p50(embed: &str, model: &str, queries: &Queries, n: usize) -> Duration {
    let mut client =
        pb::embed_service_client::EmbedServiceClient::new(common::connect(embed).await);
    let mut samples = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        client
            .embed(pb::EmbedRequest {
                model: model.to_owned(),
                texts: vec![queries.take()],
                kind: pb::InputKind::Query as i32,
            })
            .await
            .unwrap_or_else(|s| panic!("embed: {s:?}"));
        samples.push(started.elapsed());
    }
    stats(samples).p50
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let scales: Vec<u64> = std::env::var("SMARTDB_BENCH_SCALES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let n: usize = env_or("SMARTDB_BENCH_QUERIES", 200);
    let n_cached: usize = env_or("SMARTDB_BENCH_CACHED", 2000);
    let clients: usize = env_or("SMARTDB_BENCH_CONCURRENCY", 8);
    let seconds: u64 = env_or("SMARTDB_BENCH_SECONDS", 5);
    println!(
        "search bench: cpu features [{}], {} cores, scales {scales:?}, {n} uncached searches per mode and path, {n_cached} cached, throughput {clients} clients x {seconds} s",
        common::cpu_features(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let mut corpus = common::scifact();
    corpus.truncate(env_or("SMARTDB_BENCH_DOCS", usize::MAX));
    let queries = Arc::new(Queries::new(&corpus));
    let mut vocabulary: Vec<String> = corpus
        .iter()
        .flat_map(|(_, t)| t.split_whitespace())
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| w.len() > 1)
        .collect();
    // Keep word frequencies (duplicates stay) so postings follow a natural distribution.
    vocabulary.truncate(2_000_000);
    let analyzer = smartdb_search::lexical::Analyzer::new(Default::default()).expect("analyzer");

    // Authentication stays on; the admin key's rate limits (1,000 searches/s, 500 ingest
    // calls/s) would cap the cached throughput this measures and the loading, so they are raised.
    // Declared before the cluster so that they are removed after it stops.
    let mut cgroups: Vec<MemoryCgroup> = Vec::new();
    let cluster = Cluster::start_with_env(&[(
        "SMARTDB_GATEWAY_RATES",
        "admin.search=1000000,admin.ingest=1000000,address=1000000",
    )])
    .await;
    let search = cluster.service("search-svc");
    let embed = cluster.service("embed-svc");
    let mut search_pid = search.pid.expect("search-svc pid");
    let kb = common::create_kb(&cluster, "bench").await;
    let dimension =
        pb::embed_service_client::EmbedServiceClient::new(common::connect(&embed.grpc).await)
            .embed(pb::EmbedRequest {
                model: kb.embedding_model.clone(),
                texts: vec!["dimension probe".into()],
                kind: pb::InputKind::Query as i32,
            })
            .await
            .expect("embed")
            .into_inner()
            .embeddings[0]
            .values
            .len();
    let (rss0, _, _) = memory(search_pid);
    println!(
        "search-svc RSS with an empty knowledge base: {:.1} MB; model {} ({dimension} dimensions)",
        rss0 as f64 / 1e6,
        kb.embedding_model
    );

    let mut gateway = cluster.search().await;
    let mut direct = SearchClient::new(common::gateway_channel(&search.grpc, None).await)
        .max_decoding_message_size(common::MAX_MESSAGE);
    let mut points = 0u64;
    let mut sparse_nonzeros = 0u64;
    for &scale in &scales {
        println!("\n== {scale} chunks");
        if points == 0 {
            points = load_corpus(&cluster, &kb.name, &corpus).await;
            // Per document, not per chunk: a slight undercount where chunks share terms.
            sparse_nonzeros += corpus
                .iter()
                .map(|(id, t)| analyzer.document(id, &[], t).indices.len() as u64)
                .sum::<u64>();
        }
        if points < scale {
            let add = scale - points;
            sparse_nonzeros += add_synthetic(
                &search.grpc,
                &kb.id,
                dimension,
                &vocabulary,
                &analyzer,
                points,
                add,
            )
            .await;
            points = scale;
        }
        wait_idle(search_pid).await;
        let count =
            pb::index_service_client::IndexServiceClient::new(common::connect(&search.grpc).await)
                .get_collection_stats(pb::GetCollectionStatsRequest {
                    knowledge_base_id: kb.id.clone(),
                })
                .await
                .expect("stats")
                .into_inner()
                .point_count;
        println!("  {count} points in the collection");
        let (rss, anon, file) = memory(search_pid);
        println!(
            "  search-svc memory right after loading, before any search: RSS {:.1} MB (anonymous {:.1}, file-backed {:.1}) -> {:.2}x dense",
            rss as f64 / 1e6,
            anon as f64 / 1e6,
            file as f64 / 1e6,
            rss as f64 / (count * dimension as u64 * 4) as f64,
        );

        let embed_p50 = embedding_p50(&embed.grpc, &kb.embedding_model, &queries, 100).await;
        println!(
            "  {:<8} {:>22} {:>22} {:>8}",
            "mode", "gateway p50/p99 ms", "direct p50/p99 ms", "gw/dir"
        );
        for mode in [
            pb::SearchMode::Hybrid,
            pb::SearchMode::Dense,
            pb::SearchMode::Lexical,
        ] {
            let (g, d) = uncached(&mut gateway, &mut direct, &kb.name, mode, &queries, 2 * n).await;
            println!(
                "  {:<8} {:>12.2} / {:>7.2} {:>12.2} / {:>7.2} {:>7.2}x",
                format!("{mode:?}").to_lowercase(),
                ms(g.p50),
                ms(g.p99),
                ms(d.p50),
                ms(d.p99),
                g.p50.as_secs_f64() / d.p50.as_secs_f64()
            );
        }
        println!(
            "  query embedding alone (straight to embed-svc): p50 {:.2} ms",
            ms(embed_p50)
        );
        let (g, d) = cached(&mut gateway, &mut direct, &kb.name, &queries, 2 * n_cached).await;
        println!(
            "  {:<8} {:>12.3} / {:>7.3} {:>12.3} / {:>7.3} {:>7.2}x",
            "cached",
            ms(g.p50),
            ms(g.p99),
            ms(d.p50),
            ms(d.p99),
            g.p50.as_secs_f64() / d.p50.as_secs_f64()
        );
        for (what, fresh) in [("uncached hybrid", true), ("cached", false)] {
            let through = throughput(
                &cluster.gateway,
                Some(&cluster.admin_key),
                &kb.name,
                queries.clone(),
                fresh,
                clients,
                seconds,
            )
            .await;
            let straight = throughput(
                &search.grpc,
                None,
                &kb.name,
                queries.clone(),
                fresh,
                clients,
                seconds,
            )
            .await;
            println!("  throughput {what:<16} gateway {through:>8.0}/s   direct {straight:>8.0}/s");
        }
        let (rss, anon, file) = memory(search_pid);
        let dense = count * dimension as u64 * 4;
        let sparse = sparse_nonzeros * 8;
        println!(
            "  search-svc memory: RSS {:.1} MB (anonymous {:.1}, file-backed {:.1}); raw dense vectors {:.1} MB -> RSS {:.2}x dense; raw sparse vectors ~{:.1} MB (index u32 + weight f32 per term)",
            rss as f64 / 1e6,
            anon as f64 / 1e6,
            file as f64 / 1e6,
            dense as f64 / 1e6,
            rss as f64 / dense as f64,
            sparse as f64 / 1e6,
        );
        print_mapped_files(search_pid, cluster.data_dir.path());

        // Steady state under a hard memory limit of 1.5x the dense vectors, as a container's
        // would be: the memory-mapped vector and payload pages that searches read are page
        // cache, which the kernel reclaims to stay inside the limit (and counts in it). The
        // restarted search-svc is born inside the limit (`smartdb up` is moved into it for the
        // restart), and the collection's files leave the page cache before it loads them, so
        // everything it reads is charged to it.
        let limit = dense * 3 / 2;
        let limited = match MemoryCgroup::create(limit) {
            Ok(cgroup) => Some(cgroup),
            Err(why) => {
                println!("  NOT UNDER A MEMORY LIMIT: {why}; restarting search-svc without one");
                None
            }
        };
        if let Some(cgroup) = &limited {
            cgroup.enter(cluster.pid());
        }
        common::signal(search_pid, libc::SIGTERM);
        let old_pid = search_pid;
        search_pid = common::eventually(Duration::from_secs(300), "search-svc restarted", || {
            let pid = cluster.service("search-svc").pid;
            let addr = search.grpc.clone();
            async move {
                let pid = pid.filter(|&p| p != old_pid)?;
                (common::health(&addr, "").await == Some(ServingStatus::Serving)).then_some(pid)
            }
        })
        .await;
        if let Some(cgroup) = &limited {
            cgroup.leave(cluster.pid());
            assert!(
                cgroup.holds(search_pid),
                "search-svc restarted outside the limit"
            );
            let evicted = evict_from_page_cache(&cluster.data_dir.path().join("search"));
            println!(
                "  search-svc restarted under a memory limit of {:.1} MB (1.5x dense, {}); {:.1} MB of its files evicted from the page cache first",
                limit as f64 / 1e6,
                cgroup.describe(),
                evicted as f64 / 1e6
            );
        }
        // Both clients reconnect; the first call on a dropped connection may fail. The first
        // search loads the collection, as a reopen that trims its WAL does.
        for (first, client) in [(true, &mut direct), (false, &mut gateway)] {
            for attempt in 0.. {
                let probe = request(&kb.name, queries.take(), pb::SearchMode::Hybrid);
                let started = Instant::now();
                match client.search(probe).await {
                    Ok(_) => {
                        if first {
                            println!(
                                "  first search after the restart (loads the collection): {:.0} ms",
                                started.elapsed().as_secs_f64() * 1e3
                            );
                        }
                        break;
                    }
                    Err(status) if attempt < 50 => {
                        eprintln!("  waiting for search after restart: {}", status.message());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(status) => panic!("search-svc does not answer after restart: {status}"),
                }
            }
        }
        // As many searches as the measurements above made before their memory reading, so
        // that they read as much of the vectors and payloads.
        let after = env_or("SMARTDB_BENCH_LIMITED_QUERIES", 2000);
        let (g, d) = uncached(
            &mut gateway,
            &mut direct,
            &kb.name,
            pb::SearchMode::Hybrid,
            &queries,
            after,
        )
        .await;
        let (rss, anon, file) = memory(search_pid);
        println!(
            "  after a restart and {after} hybrid searches (gateway p50/p99 {:.2} / {:.2} ms, direct {:.2} / {:.2} ms): RSS {:.1} MB (anonymous {:.1}, file-backed {:.1}) -> {:.2}x dense",
            ms(g.p50),
            ms(g.p99),
            ms(d.p50),
            ms(d.p99),
            rss as f64 / 1e6,
            anon as f64 / 1e6,
            file as f64 / 1e6,
            rss as f64 / dense as f64,
        );
        if let Some(cgroup) = &limited {
            println!("  memory limit: {}", cgroup.report(dense));
        }
        print_mapped_files(search_pid, cluster.data_dir.path());
        cgroups.extend(limited);
    }
}
