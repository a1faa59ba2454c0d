//! embed-svc throughput and latency bench (`cargo bench -p smartdb-embed --bench throughput`).
//!
//! Prints, for the same texts and thread count: passages/s of smartdb's local provider and of
//! the references a user would pick instead (sentence-transformers on torch, ONNX Runtime on an
//! fp32 export; run only when `SMARTDB_BENCH_PYTHON` names a Python with
//! `sentence-transformers onnxruntime onnx`), single-query latency through the gRPC API, and the
//! model calls made by a second pass over the same texts (the cache should make it zero).
//!
//! Env: `SMARTDB_BENCH_CORPUS` (BEIR corpus.jsonl; default `../shared/eval/scifact/corpus.jsonl`
//! next to the workspace), `SMARTDB_BENCH_N` (passages, default 512), `RAYON_NUM_THREADS`
//! (default: all cores; the references get the same number).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use smartdb_embed::model::{LocalModel, MINILM_L6_V2, Precision, default_models_dir, ensure_model};
use smartdb_proto::v1 as pb;

fn corpus_texts(n: usize) -> Vec<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = std::env::var_os("SMARTDB_BENCH_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("shared/eval/scifact/corpus.jsonl"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .take(n)
        .map(|line| {
            let doc: serde_json::Value = serde_json::from_str(line).expect("corpus line");
            format!(
                "{} {}",
                doc["title"].as_str().unwrap_or_default(),
                doc["text"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn model_inputs_total() -> f64 {
    let rendered = smartdb_kit::metrics::handle().render();
    rendered
        .lines()
        .filter(|l| l.starts_with("embed_model_inputs_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

type Client = pb::embed_service_client::EmbedServiceClient<tonic::transport::Channel>;

/// Starts embed-svc in-process with `config`; returns a connected client and a stop handle.
async fn start_embed(
    config: smartdb_embed::Config,
) -> anyhow::Result<(
    Client,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let listen = config.server.listen;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(smartdb_embed::serve(config, async move {
        let _ = stopped.await;
    }));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))?;
    let client = loop {
        if let Ok(channel) = endpoint.connect().await {
            break Client::new(channel);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok((client, stop, server))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("SMARTDB_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    let texts = corpus_texts(n);
    let models = default_models_dir();
    let dir = ensure_model(&models, &MINILM_L6_V2)?;
    let model = LocalModel::load(&dir, &MINILM_L6_V2)?;

    // Batch throughput, length-sorted batches of 32 (what sentence-transformers does too).
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
    let refs: Vec<&str> = order.iter().map(|&i| texts[i].as_str()).collect();
    model.embed(&refs[..32.min(refs.len())])?;
    let started = Instant::now();
    for batch in refs.chunks(32) {
        model.embed(batch)?;
    }
    let ours = texts.len() as f64 / started.elapsed().as_secs_f64();
    // The same with f32 products everywhere, to show what the bf16 kernel contributes.
    let ours_f32 = {
        let exact = LocalModel::load_with(&dir, &MINILM_L6_V2, Precision::F32)?;
        exact.embed(&refs[..32.min(refs.len())])?;
        let started = Instant::now();
        for batch in refs.chunks(32) {
            exact.embed(batch)?;
        }
        texts.len() as f64 / started.elapsed().as_secs_f64()
    };

    // Single-query latency in process (what the references measure too).
    let query = "How do I configure the build to use link time optimization?";
    let mut in_process = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        model.embed(&[query])?;
        in_process.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    in_process.sort_by(f64::total_cmp);

    // Single-query latency through gRPC, cache off so every call runs the model.
    let port = smartdb_kit::server::free_port()?;
    let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let config = smartdb_embed::Config {
        models_dir: Some(models.clone()),
        cache_mb: 0,
        ..smartdb_embed::Config::with_defaults(listen)
    };
    let (mut client, stop, server) = start_embed(config).await?;
    let request = || pb::EmbedRequest {
        texts: vec![query.into()],
        kind: pb::InputKind::Query as i32,
        model: String::new(),
    };
    while client.embed(request()).await.is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        client.embed(request()).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let _ = stop.send(());
    let _ = server.await;

    // A second pass over the same texts through the cache: zero model calls expected.
    let port = smartdb_kit::server::free_port()?;
    let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let config = smartdb_embed::Config {
        models_dir: Some(models.clone()),
        ..smartdb_embed::Config::with_defaults(listen)
    };
    let (mut client, stop, server) = start_embed(config).await?;
    let pass = |client: &mut Client| {
        let mut client = client.clone();
        let texts = texts.clone();
        async move {
            for batch in texts.chunks(32) {
                let req = pb::EmbedRequest {
                    texts: batch.to_vec(),
                    kind: pb::InputKind::Document as i32,
                    model: String::new(),
                };
                loop {
                    match client.embed(req.clone()).await {
                        Ok(_) => break,
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        Err(s) => return Err(anyhow::anyhow!("embed: {s}")),
                    }
                }
            }
            Ok(())
        }
    };
    pass(&mut client).await?;
    let before = model_inputs_total();
    pass(&mut client).await?;
    let second_pass_model_inputs = model_inputs_total() - before;
    let _ = stop.send(());
    let _ = server.await;

    println!(
        "embed-svc bench: {} passages (SciFact title + abstract, ≤256 tokens), {threads} threads",
        texts.len()
    );
    println!(
        "  smartdb local provider     {ours:8.1} passages/s   (precision auto, which kept {} on this CPU)",
        if model.uses_bf16() { "bf16" } else { "f32" }
    );
    println!("  smartdb, f32 everywhere    {ours_f32:8.1} passages/s");
    println!(
        "  one 17-token query in process: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&in_process, 0.5),
        percentile(&in_process, 0.99)
    );
    println!(
        "  gRPC Embed, one 17-token query: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!("  second pass over the same texts: {second_pass_model_inputs} model inputs (cache)");

    if let Some(python) = std::env::var_os("SMARTDB_BENCH_PYTHON") {
        let texts_path =
            std::env::temp_dir().join(format!("smartdb-bench-{}.json", std::process::id()));
        std::fs::write(&texts_path, serde_json::to_string(&texts)?)?;
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/reference.py");
        let output = std::process::Command::new(python)
            .arg(script)
            .arg(&dir)
            .arg(&texts_path)
            .arg(threads.to_string())
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "reference.py: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let line = String::from_utf8(output.stdout)?;
        let r: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or_default())?;
        let st = r["st_passages_per_s"].as_f64().unwrap_or(f64::NAN);
        let ort = r["ort_passages_per_s"].as_f64().unwrap_or(f64::NAN);
        let ort_ms = r["ort_query_ms_p50"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  sentence-transformers      {st:8.1} passages/s   (query p50 {:.2} ms, in-process)",
            r["st_query_ms_p50"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "  ONNX Runtime (fp32)        {ort:8.1} passages/s   (query p50 {ort_ms:.2} ms, in-process)"
        );
        println!(
            "  ratio vs faster reference  {:.2}x (goal ≥ 1.2x); f32 everywhere: {:.2}x",
            ours / st.max(ort),
            ours_f32 / st.max(ort)
        );
        println!(
            "  gRPC query p50 / ONNX Runtime in-process p50: {:.2} (goal ≤ 1.0)",
            percentile(&latencies, 0.5) / ort_ms
        );
    } else {
        println!(
            "  (set SMARTDB_BENCH_PYTHON to a Python with sentence-transformers, onnxruntime, onnx for the references)"
        );
    }
    Ok(())
}
