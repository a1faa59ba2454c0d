//! A knowledge base on a remote model, end to end, against a third-party OpenAI-compatible
//! server: llama.cpp's server (PyPI `xllamacpp`) serving the same MiniLM converted to GGUF.
//! embed-svc reaches it through its `openai` provider; ingest chunks for it without a shared
//! tokenizer; search embeds queries with it; when it dies, only that model fails (UNAVAILABLE,
//! after retries) and it is used again once it is back.
//!
//! Needs `SMARTDB_TEST_LLAMA_PYTHON`: a Python with `xllamacpp gguf safetensors numpy`
//! (`./scripts/test` makes one).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, connect, eventually, http_get, search, try_http_get};
use smartdb_proto::v1 as pb;
use tonic::Code;

const REMOTE: &str = "llama-minilm";

fn python() -> PathBuf {
    PathBuf::from(std::env::var_os("SMARTDB_TEST_LLAMA_PYTHON").expect(
        "SMARTDB_TEST_LLAMA_PYTHON must name a Python with `xllamacpp gguf safetensors numpy` \
         (./scripts/test sets one up)",
    ))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("llama")
        .join(name)
}

/// llama.cpp's server on `port`, killed when dropped.
struct LlamaServer {
    child: Child,
}

impl LlamaServer {
    async fn start(gguf: &Path, port: u16, log: &Path) -> Self {
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new(python())
            .arg(script("serve.py"))
            .arg(gguf)
            .arg(port.to_string())
            .arg(REMOTE)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start llama.cpp server");
        let addr = format!("127.0.0.1:{port}");
        eventually(Duration::from_secs(60), "llama.cpp server health", || {
            let addr = addr.clone();
            async move {
                let (status, _) = try_http_get(&addr, "/health").await?;
                status.contains(" 200").then_some(())
            }
        })
        .await;
        Self { child }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

async fn embed(
    client: &mut pb::embed_service_client::EmbedServiceClient<tonic::transport::Channel>,
    model: &str,
    texts: &[&str],
) -> Result<Vec<Vec<f32>>, tonic::Status> {
    let response = client
        .embed(pb::EmbedRequest {
            texts: texts.iter().map(|t| t.to_string()).collect(),
            kind: pb::InputKind::Document as i32,
            model: model.to_owned(),
        })
        .await?
        .into_inner();
    assert_eq!(
        response.model,
        if model.is_empty() {
            &response.model
        } else {
            model
        }
    );
    Ok(response.embeddings.into_iter().map(|e| e.values).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowledge_base_on_a_third_party_openai_compatible_server() {
    let work = tempfile::tempdir().expect("temp dir");
    // The same model files smartdb serves locally, converted for llama.cpp.
    let model_dir = tokio::task::spawn_blocking(|| {
        smartdb_embed::model::ensure_model(
            &smartdb_embed::model::default_models_dir(),
            &smartdb_embed::model::MINILM_L6_V2,
        )
    })
    .await
    .unwrap()
    .expect("model files");
    let gguf = work.path().join("minilm.gguf");
    let converted = Command::new(python())
        .arg(script("to_gguf.py"))
        .arg(&model_dir)
        .arg(&gguf)
        .output()
        .expect("run to_gguf.py");
    assert!(
        converted.status.success(),
        "to_gguf.py: {}",
        String::from_utf8_lossy(&converted.stderr)
    );
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let llama_log = work.path().join("llama.log");
    let llama = LlamaServer::start(&gguf, port, &llama_log).await;

    let base_url = format!("http://127.0.0.1:{port}/v1");
    let cluster = Cluster::start_with_env(&[
        ("SMARTDB_OPENAI_BASE_URL", &base_url),
        ("SMARTDB_OPENAI_MODEL", REMOTE),
        // llama.cpp was started with a 512-token context.
        ("SMARTDB_OPENAI_MAX_INPUT_TOKENS", "512"),
        // One failed request (after its retries) opens the breaker, for 2 s.
        ("SMARTDB_OPENAI_BREAKER_FAILURES", "1"),
        ("SMARTDB_OPENAI_BREAKER_OPEN", "2s"),
    ])
    .await;
    let embed_svc = cluster.service("embed-svc");
    let mut embedder =
        pb::embed_service_client::EmbedServiceClient::new(connect(&embed_svc.grpc).await);

    // The remote model is offered next to the local one, with the dimension it reported.
    let info = embedder
        .get_model_info(pb::GetModelInfoRequest {
            model: REMOTE.into(),
        })
        .await
        .expect("model info")
        .into_inner()
        .model
        .unwrap();
    assert_eq!(info.provider, "openai");
    assert_eq!(info.dimension, 384);
    assert_eq!(info.max_input_tokens, 512);

    // Same model, two engines: the vectors agree.
    let texts = [
        "Mitochondria are the powerhouse of the cell.",
        "The Rust borrow checker enforces ownership at compile time.",
        "Der schnelle braune Fuchs springt über den faulen Hund.",
    ];
    let remote = embed(&mut embedder, REMOTE, &texts)
        .await
        .expect("remote embed");
    let local = embed(&mut embedder, "", &texts).await.expect("local embed");
    for ((text, r), l) in texts.iter().zip(&remote).zip(&local) {
        assert_eq!(r.len(), 384);
        let c = cosine(r, l);
        assert!(
            c > 0.999,
            "{text:?}: cosine {c} between llama.cpp and the local model"
        );
    }

    // A knowledge base that names the remote model: ingest and search go through it.
    let mut kbs = cluster.kbs().await;
    let kb = kbs
        .create_knowledge_base(pb::CreateKnowledgeBaseRequest {
            name: "remote".into(),
            embedding_model: REMOTE.into(),
            ..Default::default()
        })
        .await
        .expect("create kb")
        .into_inner()
        .knowledge_base
        .unwrap();
    assert_eq!(kb.embedding_model, REMOTE);
    let mut docs = cluster.docs().await;
    let long_text =
        "Photosynthesis converts light energy into chemical energy in chloroplasts. ".repeat(30);
    let mut ids = Vec::new();
    for (title, text) in [
        ("biology", long_text.as_str()),
        (
            "volcanoes",
            "Volcanic eruptions eject ash and lava; magma rises through the crust.",
        ),
    ] {
        let doc = docs
            .ingest_text(pb::IngestTextRequest {
                knowledge_base: "remote".into(),
                text: text.into(),
                title: title.into(),
                wait: true,
                ..Default::default()
            })
            .await
            .expect("ingest")
            .into_inner()
            .document
            .unwrap();
        assert_eq!(
            doc.status,
            pb::DocumentStatus::Indexed as i32,
            "{title}: {doc:?}"
        );
        ids.push(doc.id.clone());
        if title == "biology" {
            // ~2,200 characters, chunked by characters for a model without a shared tokenizer.
            assert!(doc.chunk_count >= 4, "{} chunks", doc.chunk_count);
        }
    }
    let found = search(&cluster, "remote", "how do plants turn sunlight into sugar")
        .await
        .expect("search");
    assert_eq!(found.embedding_model, REMOTE);
    assert_eq!(found.hits[0].document_id, ids[0], "{found:?}");

    // The endpoint dies: its model fails with UNAVAILABLE after retries; the local one serves.
    drop(llama);
    let started = Instant::now();
    let err = embed(&mut embedder, REMOTE, &["a text the cache has never seen"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(started.elapsed() > Duration::from_millis(100), "no retries");
    assert!(
        embed(&mut embedder, "", &["still served locally"])
            .await
            .is_ok()
    );
    // That failure opened the breaker: calls now fail at once instead of waiting on retries,
    // and a search of the knowledge base that uses the model degrades to keywords at once.
    let started = Instant::now();
    let err = embed(&mut embedder, REMOTE, &["another new text"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("circuit breaker"), "{err:?}");
    let degraded = search(
        &cluster,
        "remote",
        "what does photosynthesis do in chloroplasts",
    )
    .await
    .expect("a degraded answer, not an error");
    assert!(degraded.degraded, "{degraded:?}");
    assert!(
        degraded.degraded_reason.contains("keywords"),
        "{degraded:?}"
    );
    assert_eq!(degraded.mode, pb::SearchMode::Lexical as i32);
    assert_eq!(degraded.hits[0].document_id, ids[0], "{degraded:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let metrics = http_get(&embed_svc.http, "/metrics").await;
    let counted = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(counted("embed_remote_retries_total") >= 1.0, "{metrics}");
    assert!(counted("embed_remote_failures_total") >= 1.0, "{metrics}");
    assert!(counted("embed_remote_rejected_total") >= 2.0, "{metrics}");
    assert_eq!(counted("embed_remote_breaker_open"), 1.0, "{metrics}");

    // Back on the same port: once the open period is over, a trial call closes the breaker and
    // the model is used again without restarting anything.
    let _llama = LlamaServer::start(&gguf, port, &llama_log).await;
    let again = eventually(Duration::from_secs(30), "the remote model back", || {
        let mut embedder = embedder.clone();
        async move {
            embed(&mut embedder, REMOTE, &["a text the cache has never seen"])
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(again[0].len(), 384);
    let found = search(&cluster, "remote", "light energy stored by chloroplasts")
        .await
        .expect("search with the model back");
    assert_eq!(found.hits[0].document_id, ids[0]);
    assert!(
        !found.degraded,
        "hybrid again with the model back: {found:?}"
    );
    assert_eq!(found.mode, pb::SearchMode::Hybrid as i32);
}
