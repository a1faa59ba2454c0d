//! Ingest throughput: end-to-end ingest of a real corpus through the public API (documents/s,
//! chunks/s) against the raw throughput of embed-svc on exactly the same chunk texts, in the
//! same run on the same cluster; then a re-ingest of the same corpus into a new knowledge base,
//! counting the model's inputs (the embedding cache should leave none); then an ingest of other
//! abstracts with a search every 500 ms, for what users searching meanwhile see, against as
//! many searches on the idle cluster afterwards.
//!
//! ```sh
//! cargo build -p smartdb-cli -p smartdb-tests --benches      # or --release for both
//! SMARTDB_BENCH_DOCS=2000 target/debug/deps/ingest-<hash> --bench
//! ```
//!
//! Pipeline efficiency = ingest chunks/s ÷ raw embed-svc chunks/s (goal ≥ 0.9): the model is
//! the bottleneck, so everything ingest-svc adds (upload, parse, chunk, batching, index writes,
//! bookkeeping) shows as the gap. The raw run feeds embed-svc batches of 32 texts from two
//! concurrent callers (enough to keep the model busy: one batch runs while the next waits);
//! embed-svc is restarted between the runs so neither is served by the other's cache.
//!
//! Env: `SMARTDB_BENCH_DOCS` (SciFact abstracts, default 2000), `SMARTDB_BIN` (the `smartdb`
//! binary, default the one built next to this bench).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Cluster, create_kb, eventually, health};
use smartdb_ingest::chunk::Chunker;
use smartdb_ingest::extract::ContentType;
use smartdb_proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;

/// Callers of the raw run (ingest-svc runs its default 8 workers unless
/// `SMARTDB_INGEST_WORKERS` says otherwise).
const WORKERS: usize = 2;
const BATCH: usize = smartdb_ingest::downstream::EMBED_BATCH;

/// A counter of embed-svc's Prometheus output, summed over its labels.
async fn embed_counter(cluster: &Cluster, name: &str) -> f64 {
    let body = common::http_get(&cluster.service("embed-svc").http, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// CPU seconds (user + system) a process has used; `pid` may be `self`.
fn process_cpu(pid: &str, ticks: f64) -> f64 {
    common::bench::cpu_ticks(pid) as f64 / ticks
}

/// CPU seconds the whole machine has been busy (user, nice, system, irq, softirq), from
/// `/proc/stat`: what the model competes with includes kernel threads (disk syncs) that no
/// service's own figure shows.
fn machine_busy(ticks: f64) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq
    [0, 1, 2, 5, 6]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum::<f64>()
        / ticks
}

/// CPU seconds used so far by each service process, `smartdb up`, this bench, and the whole
/// machine.
fn cpu_seconds(cluster: &Cluster) -> Vec<(&'static str, f64)> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut used: Vec<(&'static str, f64)> = ["gateway", "ingest-svc", "search-svc", "embed-svc"]
        .into_iter()
        .map(|name| {
            let pid = cluster.service(name).pid.expect("pid");
            (name, process_cpu(&pid.to_string(), ticks))
        })
        .collect();
    // `smartdb up` relays every service's log lines.
    used.push(("smartdb up", process_cpu(&cluster.pid().to_string(), ticks)));
    used.push(("bench client", process_cpu("self", ticks)));
    used.push(("machine", machine_busy(ticks)));
    used
}

/// Prints where the CPU went between two [`cpu_seconds`] readings: each service, `smartdb up`,
/// the bench's own client, and the rest of the machine (kernel threads, interrupts, other
/// processes).
fn print_cpu(before: &[(&str, f64)], after: &[(&str, f64)], chunks: u64) {
    let mut used: Vec<(&str, f64)> = before
        .iter()
        .zip(after)
        .map(|((name, b), (_, a))| (*name, a - b))
        .collect();
    let machine = used.pop().map_or(0.0, |(_, s)| s);
    let accounted: f64 = used.iter().map(|(_, s)| s).sum();
    used.push(("rest of the machine", (machine - accounted).max(0.0)));
    let parts: Vec<String> = used
        .iter()
        .map(|(name, s)| {
            format!(
                "{name} {s:.1} s ({:.0} %, {:.2} ms/chunk)",
                s / machine.max(1e-9) * 100.0,
                s * 1000.0 / chunks.max(1) as f64
            )
        })
        .collect();
    println!("  CPU (machine busy {machine:.1} s): {}", parts.join(", "));
}

/// Uploads every document (4 callers, `wait` off) and waits until all are INDEXED; returns the
/// time from the first upload to the last document indexed, and the chunks written.
///
/// Completion is followed with `GetDocument` on the oldest documents not seen INDEXED yet (jobs
/// run oldest first, so that is usually one or two calls per poll): listing every document ten
/// times a second loaded the gateway and ingest-svc with work the raw run does not have.
async fn ingest_all(cluster: &Cluster, kb: &str, corpus: &[(String, String)]) -> (Duration, u64) {
    let started = Instant::now();
    let lanes = 4;
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let docs: Vec<(String, String)> =
            corpus.iter().skip(lane).step_by(lanes).cloned().collect();
        let mut client = cluster.docs().await;
        let kb = kb.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for (id, text) in docs {
                let stored = client
                    .ingest_text(pb::IngestTextRequest {
                        knowledge_base: kb.clone(),
                        title: format!("SciFact {id}"),
                        text,
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|s| panic!("upload {id}: {s:?}"))
                    .into_inner();
                let created = stored
                    .document
                    .as_ref()
                    .and_then(|d| d.create_time)
                    .map(|t| (t.seconds, t.nanos));
                ids.push((created, stored_id(&stored)));
            }
            ids
        }));
    }
    let mut pending = Vec::new();
    for task in tasks {
        pending.extend(task.await.unwrap());
    }
    let uploaded = started.elapsed();
    pending.sort();
    let mut pending: std::collections::VecDeque<String> =
        pending.into_iter().map(|(_, id)| id).collect();
    let mut docs = cluster.docs().await;
    while let Some(id) = pending.front() {
        let doc = docs
            .get_document(pb::GetDocumentRequest {
                knowledge_base: kb.to_owned(),
                document_id: id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("get {id}: {s:?}"))
            .into_inner()
            .document
            .expect("document");
        assert_ne!(doc.status, pb::DocumentStatus::Failed as i32, "{doc:?}");
        if doc.status == pb::DocumentStatus::Indexed as i32 {
            pending.pop_front();
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let took = started.elapsed();
    eprintln!("  uploads acknowledged after {uploaded:.1?}");
    let listed = common::list_pages(cluster, kb, 1000).await.concat();
    assert_eq!(listed.len(), corpus.len());
    let mut chunks = 0u64;
    for doc in &listed {
        assert_eq!(doc.status, pb::DocumentStatus::Indexed as i32, "{doc:?}");
        chunks += u64::from(doc.chunk_count);
    }
    (took, chunks)
}

/// Searches `kb` once every 500 ms (each query a different text, so neither the result cache nor
/// the embedding cache answers) until `stop` is set; returns each search's latency in ms.
async fn search_while(
    cluster: &Cluster,
    kb: &str,
    queries: Vec<String>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<f64> {
    let mut search = cluster.search().await;
    let mut took = Vec::new();
    // A user's pace, not a load test.
    let mut every = tokio::time::interval(Duration::from_millis(500));
    for query in queries {
        every.tick().await;
        if *stop.borrow() {
            break;
        }
        let started = Instant::now();
        let response = search
            .search(pb::SearchRequest {
                knowledge_base: kb.to_owned(),
                query,
                top_k: 10,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("search: {s:?}"))
            .into_inner();
        took.push(started.elapsed().as_secs_f64() * 1000.0);
        assert!(!response.degraded, "{response:?}");
    }
    took
}

/// "p50 X ms, p99 Y ms, max Z ms (N searches)".
fn latency_summary(mut took: Vec<f64>) -> String {
    if took.is_empty() {
        return "no searches".to_owned();
    }
    took.sort_by(f64::total_cmp);
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} searches)",
        at(0.5),
        at(0.99),
        took[took.len() - 1],
        took.len()
    )
}

/// Distinct query texts: the first words of the corpus's documents, numbered from `from`.
fn queries(corpus: &[(String, String)], from: usize, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let (_, text) = &corpus[(from + i) % corpus.len()];
            let words: Vec<&str> = text.split_whitespace().take(12).collect();
            format!("{} {}", from + i, words.join(" "))
        })
        .collect()
}

fn stored_id(response: &pb::IngestTextResponse) -> String {
    response.document.as_ref().expect("document").id.clone()
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches` builds and runs benches without --bench: nothing to do
    }
    let docs: usize = std::env::var("SMARTDB_BENCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let corpus: Vec<(String, String)> = common::scifact().into_iter().take(docs).collect();
    println!(
        "ingest bench: {} SciFact abstracts, smartdb {}, CPU features: {}, {} cores",
        corpus.len(),
        common::smartdb_bin().display(),
        common::cpu_features(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // Authentication stays on; the admin key's rate limit (500 ingest calls/s) would cap the
    // uploads on a fast machine, so it is raised.
    let cluster =
        Cluster::start_with_env(&[("SMARTDB_GATEWAY_RATES", "admin.ingest=1000000")]).await;
    let embed_addr = cluster.service("embed-svc").grpc;
    let mut embed =
        pb::embed_service_client::EmbedServiceClient::new(common::connect(&embed_addr).await)
            .max_decoding_message_size(64 << 20);

    // The chunk texts ingest-svc will embed: its own chunker on the model's tokenizer.
    let tokenizer = embed
        .get_tokenizer(pb::GetTokenizerRequest::default())
        .await
        .unwrap()
        .into_inner();
    let chunker = Chunker::from_json(
        &tokenizer.tokenizer_json,
        tokenizer.max_input_tokens as usize,
        smartdb_kit::limits::Limits::default().chunk_bytes,
    )
    .unwrap();
    let mut texts = Vec::new();
    let chunking = Instant::now();
    for (id, text) in &corpus {
        for chunk in chunker.split(text, ContentType::Plain, &[]) {
            texts.push(smartdb_ingest::worker::embedded_text(
                &format!("SciFact {id}"),
                &chunk,
            ));
        }
    }

    println!(
        "chunking (ingest-svc's chunker, one thread): {:.2} ms per document",
        chunking.elapsed().as_secs_f64() * 1000.0 / corpus.len().max(1) as f64
    );

    // 1. Raw embed-svc: batches of 32, WORKERS callers.
    let raw_cpu_before = cpu_seconds(&cluster);
    let started = Instant::now();
    let mut callers = Vec::new();
    let batches: Vec<Vec<String>> = texts.chunks(BATCH).map(|b| b.to_vec()).collect();
    for lane in 0..WORKERS {
        let mine: Vec<Vec<String>> = batches
            .iter()
            .skip(lane)
            .step_by(WORKERS)
            .cloned()
            .collect();
        let mut embed = embed.clone();
        callers.push(tokio::spawn(async move {
            for batch in mine {
                let n = batch.len();
                let response = embed
                    .embed(pb::EmbedRequest {
                        texts: batch,
                        kind: pb::InputKind::Document as i32,
                        model: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(response.embeddings.len(), n);
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    let raw = started.elapsed();
    let raw_rate = texts.len() as f64 / raw.as_secs_f64();
    println!(
        "raw embed-svc:    {} chunks in {:.1} s = {:.1} chunks/s",
        texts.len(),
        raw.as_secs_f64(),
        raw_rate
    );
    print_cpu(&raw_cpu_before, &cpu_seconds(&cluster), texts.len() as u64);

    // A fresh embed-svc (empty cache) for the ingest run.
    let pid = cluster.service("embed-svc").pid.expect("pid");
    common::signal(pid, libc::SIGKILL);
    eventually(Duration::from_secs(120), "embed-svc back", || {
        let (cluster, addr) = (&cluster, embed_addr.clone());
        async move {
            let info = cluster.service("embed-svc");
            (info.pid.is_some_and(|p| p != pid)
                && health(&addr, "").await == Some(ServingStatus::Serving))
            .then_some(())
        }
    })
    .await;

    // 2. End-to-end ingest.
    create_kb(&cluster, "bench").await;
    let inputs_before = embed_counter(&cluster, "embed_model_inputs_total").await;
    let cpu_before = cpu_seconds(&cluster);
    let (took, chunks) = ingest_all(&cluster, "bench", &corpus).await;
    let cpu_after = cpu_seconds(&cluster);
    let inputs = embed_counter(&cluster, "embed_model_inputs_total").await - inputs_before;
    let rate = chunks as f64 / took.as_secs_f64();
    println!(
        "ingest:           {} documents, {chunks} chunks in {:.1} s = {:.1} documents/s, {:.1} chunks/s ({inputs} model inputs)",
        corpus.len(),
        took.as_secs_f64(),
        corpus.len() as f64 / took.as_secs_f64(),
        rate
    );
    assert_eq!(
        chunks,
        texts.len() as u64,
        "ingest made other chunks than the raw run"
    );
    print_cpu(&cpu_before, &cpu_after, chunks);
    println!(
        "pipeline efficiency: {:.2} (ingest chunks/s ÷ raw embed-svc chunks/s; goal ≥ 0.9)",
        rate / raw_rate
    );
    // 3. The same corpus into a new knowledge base: the embedding cache answers.
    create_kb(&cluster, "again").await;
    let inputs_before = embed_counter(&cluster, "embed_model_inputs_total").await;
    let hits_before = embed_counter(&cluster, "embed_cache_hits_total").await;
    let (took, chunks) = ingest_all(&cluster, "again", &corpus).await;
    let inputs = embed_counter(&cluster, "embed_model_inputs_total").await - inputs_before;
    let hits = embed_counter(&cluster, "embed_cache_hits_total").await - hits_before;
    println!(
        "re-ingest:        {chunks} chunks in {:.1} s = {:.1} chunks/s; model inputs {inputs} (goal 0), cache hits {hits}",
        took.as_secs_f64(),
        chunks as f64 / took.as_secs_f64()
    );

    // 4. Searching during an ingest: more abstracts (not in the embedding cache) into a new
    // knowledge base, and a search every 500 ms into another one that is not being written
    // (its answers are not invalidated by the ingest); then as many searches on the idle cluster.
    let more: Vec<(String, String)> = common::scifact()
        .into_iter()
        .skip(docs)
        .take((docs / 3).max(100))
        .collect();
    create_kb(&cluster, "searched").await;
    let (_, seed) = ingest_all(&cluster, "searched", &more[..50]).await;
    assert!(seed > 0);
    create_kb(&cluster, "during").await;
    let (stop_searching, stop) = tokio::sync::watch::channel(false);
    let ((took, chunks), during) = tokio::join!(
        async {
            let done = ingest_all(&cluster, "during", &more[50..]).await;
            let _ = stop_searching.send(true);
            done
        },
        search_while(&cluster, "searched", queries(&corpus, 0, 100_000), stop)
    );
    let idle = {
        let (_, stop) = tokio::sync::watch::channel(false);
        search_while(
            &cluster,
            "searched",
            queries(&corpus, 100_000, during.len()),
            stop,
        )
        .await
    };
    println!(
        "searching while {chunks} chunks are ingested ({:.1} chunks/s): {}; idle: {}",
        chunks as f64 / took.as_secs_f64(),
        latency_summary(during),
        latency_summary(idle)
    );
}
