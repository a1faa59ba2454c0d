//! The whole cluster, end to end, through the gateway: health, reflection, the
//! create → ingest → search → delete path, errors for bad input, and metrics.

mod common;

use std::time::Duration;

use common::{Cluster, eventually, grpcurl, health, http_get, search};
use smartdb_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const DOCS: [(&str, &str); 3] = [
    (
        "sourdough.md",
        "# Baking sourdough bread\n\nFeed the starter with flour and water the night before. Mix the dough, \
         let it rise slowly, shape the loaf and bake it in a very hot Dutch oven until the crust is dark and crisp.",
    ),
    (
        "orbits.txt",
        "Planets move around the Sun on elliptical orbits. Kepler's laws describe how a planet sweeps equal \
         areas in equal times, and gravity from the Sun keeps the planets and comets in their paths.",
    ),
    (
        "tcp.txt",
        "TCP provides reliable, ordered delivery of bytes between hosts. The three-way handshake opens a \
         connection, sequence numbers and acknowledgements detect lost packets, and congestion control \
         slows the sender when the network is congested.",
    ),
];

const QUERIES: [(&str, &str); 3] = [
    ("how do I make bread with a starter?", "sourdough.md"),
    ("what keeps planets moving around the sun", "orbits.txt"),
    (
        "how does a network protocol retransmit lost packets",
        "tcp.txt",
    ),
];

async fn upload(
    cluster: &Cluster,
    kb: &str,
    name: &str,
    bytes: &[u8],
) -> Result<pb::UploadDocumentResponse, tonic::Status> {
    let header = pb::DocumentHeader {
        knowledge_base: kb.to_owned(),
        source_name: name.to_owned(),
        wait: true,
        ..Default::default()
    };
    // Split into several messages to exercise the stream.
    common::upload(cluster, header, bytes, 64).await
}

/// Generates Python stubs from `proto/` with grpcio-tools and runs `tests/python/client.py`.
fn python_client(cluster: &Cluster, kb: &str, query: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stubs = cluster.data_dir.path().join("py-stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let protos: Vec<String> = std::fs::read_dir(root.join("proto/smartdb/v1"))
        .unwrap()
        .map(|e| format!("smartdb/v1/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    let generated = std::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I", "."])
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .args(&protos)
        .current_dir(root.join("proto"))
        .output()
        .expect("run grpc_tools.protoc (pip install grpcio-tools)");
    assert!(
        generated.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let output = std::process::Command::new("python3")
        .arg(root.join("tests/python/client.py"))
        .args([cluster.gateway.as_str(), stubs.to_str().unwrap(), kb, query])
        .env("SMARTDB_API_KEY", &cluster.admin_key)
        .output()
        .expect("run python client");
    assert!(
        output.status.success(),
        "python client: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_end_to_end() {
    let cluster = Cluster::start().await;

    // Every service reports SERVING, overall and per service.
    let expectations = [
        (
            "gateway",
            vec![
                "smartdb.v1.KnowledgeBaseService",
                "smartdb.v1.DocumentService",
                "smartdb.v1.SearchService",
                "smartdb.v1.AdminService",
            ],
        ),
        (
            "search-svc",
            vec!["smartdb.v1.SearchService", "smartdb.v1.IndexService"],
        ),
        (
            "ingest-svc",
            vec![
                "smartdb.v1.KnowledgeBaseService",
                "smartdb.v1.DocumentService",
            ],
        ),
        ("embed-svc", vec!["smartdb.v1.EmbedService"]),
    ];
    for (name, services) in &expectations {
        let addr = cluster.service(name).grpc;
        assert_eq!(
            health(&addr, "").await,
            Some(ServingStatus::Serving),
            "{name} overall"
        );
        for service in services {
            let status = eventually(Duration::from_secs(10), "per-service health", || async {
                (health(&addr, service).await == Some(ServingStatus::Serving)).then_some(())
            })
            .await;
            let () = status;
        }
        // Reflection lists exactly what the server serves, plus health and reflection.
        let listed = grpcurl(&["-plaintext", &addr, "list"]);
        for service in services {
            assert!(
                listed.lines().any(|l| l == *service),
                "{name} lists {service}: {listed}"
            );
        }
        assert!(listed.contains("grpc.health.v1.Health"), "{listed}");
        // Internal metrics for the gateway's GetMetrics; never on the public port.
        assert_eq!(
            listed.lines().any(|l| l == "smartdb.v1.TelemetryService"),
            *name != "gateway",
            "{name}: {listed}"
        );
    }
    let described = grpcurl(&[
        "-plaintext",
        &cluster.gateway,
        "describe",
        "smartdb.v1.SearchService.Search",
    ]);
    assert!(
        described.contains("best-matching chunks"),
        "proto comments reach grpcurl describe: {described}"
    );

    // Create a knowledge base and ingest three documents on different topics.
    let mut kbs = cluster.kbs().await;
    let kb = kbs
        .create_knowledge_base(pb::CreateKnowledgeBaseRequest {
            name: "e2e".into(),
            ..Default::default()
        })
        .await
        .expect("create kb")
        .into_inner()
        .knowledge_base
        .unwrap();
    assert_eq!(kb.embedding_model, "all-MiniLM-L6-v2");
    let err = kbs
        .create_knowledge_base(pb::CreateKnowledgeBaseRequest {
            name: "e2e".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let mut ids = std::collections::HashMap::new();
    for (name, text) in DOCS {
        let response = upload(&cluster, "e2e", name, text.as_bytes())
            .await
            .expect("upload");
        let doc = response.document.unwrap();
        assert_eq!(
            doc.status,
            pb::DocumentStatus::Indexed as i32,
            "{name}: {doc:?}"
        );
        assert!(doc.chunk_count >= 1);
        ids.insert(name, doc.id);
    }
    // The same bytes again: no new document.
    let again = upload(&cluster, "e2e", "copy.txt", DOCS[1].1.as_bytes())
        .await
        .unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.document.unwrap().id, ids["orbits.txt"]);
    let listed = cluster
        .docs()
        .await
        .list_documents(pb::ListDocumentsRequest {
            knowledge_base: "e2e".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.documents.len(), 2);
    assert!(!listed.next_page_token.is_empty());

    // Each query finds its document first.
    for (query, expected) in QUERIES {
        let response = search(&cluster, "e2e", query).await.expect("search");
        let first = response
            .hits
            .first()
            .unwrap_or_else(|| panic!("no hits for {query:?}"));
        assert_eq!(
            first.document_id, ids[expected],
            "{query:?} → {:?}",
            response.hits
        );
        assert_eq!(first.source_name, expected);
        assert!(!first.text.is_empty());
    }
    // Same search again comes from the cache.
    assert!(search(&cluster, "e2e", QUERIES[0].0).await.unwrap().cached);

    // Delete a document: it no longer appears.
    let deleted = cluster
        .docs()
        .await
        .delete_document(pb::DeleteDocumentRequest {
            knowledge_base: "e2e".into(),
            document_id: ids["tcp.txt"].clone(),
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(deleted.deleted_chunks >= 1);
    let response = search(&cluster, "e2e", QUERIES[2].0).await.unwrap();
    assert!(
        response
            .hits
            .iter()
            .all(|h| h.document_id != ids["tcp.txt"]),
        "{:?}",
        response.hits
    );
    let err = cluster
        .docs()
        .await
        .get_document(pb::GetDocumentRequest {
            knowledge_base: "e2e".into(),
            document_id: ids["tcp.txt"].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Bad input gets a clear error naming the problem.
    let err = kbs
        .create_knowledge_base(pb::CreateKnowledgeBaseRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("name"), "{}", err.message());

    let err = search(&cluster, "no-such-kb", "anything")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("no-such-kb"), "{}", err.message());

    let err = search(&cluster, "e2e", "   ").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("query"), "{}", err.message());

    // grpcurl users see the offending field in the decoded google.rpc.BadRequest details.
    let out = std::process::Command::new("grpcurl")
        .args(common::bearer_header(&cluster.admin_key))
        .args([
            "-plaintext",
            "-d",
            r#"{"knowledge_base": "e2e", "query": ""}"#,
            &cluster.gateway,
            "smartdb.v1.SearchService/Search",
        ])
        .output()
        .expect("run grpcurl");
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(
        shown.contains("InvalidArgument")
            && shown.contains("fieldViolations")
            && shown.contains(r#""field":"query""#),
        "{shown}"
    );

    let err = upload(&cluster, "e2e", "empty.txt", b"").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("empty"), "{}", err.message());

    let err = upload(&cluster, "no-such-kb", "a.txt", b"hello")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let err = upload(&cluster, "e2e", "a.pdf", b"%PDF-1.7 binary")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("PDF is damaged or truncated"),
        "{}",
        err.message()
    );

    // …and the cluster still answers.
    let response = search(&cluster, "e2e", QUERIES[1].0)
        .await
        .expect("search after errors");
    assert_eq!(response.hits[0].document_id, ids["orbits.txt"]);

    // A client generated in another language from proto/ works against the gateway.
    let python_hit = python_client(&cluster, "e2e", QUERIES[1].0);
    assert_eq!(python_hit.trim(), "orbits.txt");

    // Cluster status through the gateway.
    let status = pb::admin_service_client::AdminServiceClient::new(cluster.channel().await)
        .get_cluster_status(pb::GetClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.healthy, "{status:?}");
    assert_eq!(status.services.len(), 4);

    // Metrics: one layer counts calls and errors by code.
    let metrics = http_get(&cluster.service("gateway").http, "/metrics").await;
    assert!(metrics.contains("grpc_server_requests_total{service=\"smartdb.v1.SearchService\",method=\"Search\",code=\"Ok\"}"), "{metrics}");
    assert!(metrics.contains("code=\"NotFound\""), "{metrics}");
    assert!(
        metrics.contains("grpc_server_request_duration_seconds_bucket"),
        "{metrics}"
    );

    // The CLI for people: kb create/list, ingest of a folder, search, status.
    let folder = cluster.data_dir.path().join("cli-docs");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    std::fs::write(
        folder.join("volcano.md"),
        "# Volcanoes\n\nMagma rises through the crust and erupts as lava and ash.",
    )
    .unwrap();
    std::fs::write(
        folder.join("sub/chess.txt"),
        "In chess, castling moves the king two squares towards a rook.",
    )
    .unwrap();
    std::fs::write(folder.join(".hidden.txt"), "not ingested").unwrap();
    let addr = format!("http://{}", cluster.gateway);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::smartdb_bin())
            .arg("--addr")
            .arg(&addr)
            .env("SMARTDB_API_KEY", &cluster.admin_key)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "smartdb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(cli(&["kb", "create", "cli-kb", "--description", "from the CLI"]).contains("cli-kb"));
    let ingested = cli(&["ingest", "--kb", "cli-kb", folder.to_str().unwrap()]);
    assert!(ingested.contains("2 indexed, 0 failed"), "{ingested}");
    let found = cli(&[
        "search",
        "--kb",
        "cli-kb",
        "which piece moves during castling?",
    ]);
    assert!(
        found
            .lines()
            .next()
            .unwrap_or_default()
            .contains("chess.txt"),
        "{found}"
    );
    assert!(cli(&["kb", "list"]).contains("cli-kb"));
    assert!(cli(&["status"]).contains("SERVING"));
    cli(&["kb", "delete", "cli-kb"]);

    // embed-svc's OpenAI-compatible endpoint answers tools that speak that API.
    let embed_http = cluster.service("embed-svc").http;
    let (status, body) = common::http_post_json(
        &embed_http,
        "/v1/embeddings",
        r#"{"input": ["hello", "world"], "model": "all-MiniLM-L6-v2"}"#,
    )
    .await;
    assert!(status.contains("200"), "{status} {body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["data"].as_array().unwrap().len(), 2);
    assert_eq!(json["data"][1]["index"], 1);
    assert_eq!(json["data"][0]["embedding"].as_array().unwrap().len(), 384);
    let (status, body) = common::http_post_json(
        &embed_http,
        "/v1/embeddings",
        r#"{"input": "x", "model": "nope"}"#,
    )
    .await;
    assert!(
        status.contains("400") && body.contains("\"param\":\"model\""),
        "{status} {body}"
    );

    // Deleting the knowledge base removes everything.
    let removed = kbs
        .delete_knowledge_base(pb::DeleteKnowledgeBaseRequest { name: "e2e".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.deleted_documents, 2);
    assert_eq!(
        search(&cluster, "e2e", "bread").await.unwrap_err().code(),
        Code::NotFound
    );
}

/// The same handbook in two versions: every paragraph is in both, so a search that could see
/// both would mix their chunks; a marker word tells them apart.
fn handbook(version: &str) -> String {
    (0..40)
        .map(|i| {
            format!(
                "## Section {i}\n\nRelease {version} of the handbook. Paragraph {i} explains how the \
                 deployment pipeline promotes builds from staging to production, how rollbacks are \
                 triggered, and who approves a release window.\n"
            )
        })
        .collect()
}

/// Replace by source under concurrent searches: until the new version is indexed every
/// answer comes from the old one, after it only from the new one, and no answer ever mixes
/// them or has neither; the old version is then deleted and the index forgets it. The same
/// bytes again are a no-op; a version that fails leaves the served one in place.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_version_of_a_source_replaces_the_old_one_atomically() {
    let cluster = Cluster::start().await;
    let kb = common::create_kb(&cluster, "versions").await;
    let text = |version: &str, wait: bool| pb::IngestTextRequest {
        knowledge_base: "versions".into(),
        text: handbook(version),
        title: "Handbook".into(),
        source_id: "docs/handbook.md".into(),
        wait,
        ..Default::default()
    };
    let mut docs = cluster.docs().await;
    let v1 = docs
        .ingest_text(text("one", true))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(v1.status, pb::DocumentStatus::Indexed as i32, "{v1:?}");
    assert_eq!(v1.source_id, "docs/handbook.md");
    assert!(v1.chunk_count >= 2, "{} chunks", v1.chunk_count);
    let other = common::ingest_text(&cluster, "versions", DOCS[1].1, true)
        .await
        .unwrap()
        .document
        .unwrap();

    // Searches run all along; each records which versions it saw and when it started.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let searcher = {
        let (mut client, stop) = (cluster.search().await, stop.clone());
        let (v1_id, other_id) = (v1.id.clone(), other.id.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A new query each time, so that the cache answers none of them.
                let started = std::time::Instant::now();
                let response = client
                    .search(pb::SearchRequest {
                        knowledge_base: "versions".into(),
                        query: format!("how are releases promoted to production {n}"),
                        top_k: 10,
                        ..Default::default()
                    })
                    .await
                    .expect("search")
                    .into_inner();
                n += 1;
                let ids: std::collections::BTreeSet<String> = response
                    .hits
                    .iter()
                    .map(|h| h.document_id.clone())
                    .filter(|id| *id != other_id)
                    .collect();
                let old = ids.contains(&v1_id);
                seen.push((started, old, ids));
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v2 = docs
        .ingest_text(text("two", true))
        .await
        .unwrap()
        .into_inner();
    let acknowledged = std::time::Instant::now();
    assert!(!v2.deduplicated);
    let v2 = v2.document.unwrap();
    assert_eq!(v2.status, pb::DocumentStatus::Indexed as i32, "{v2:?}");
    assert_ne!(v2.id, v1.id);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = searcher.await.unwrap();

    let (mut before, mut after) = (0, 0);
    for (started, old, ids) in &seen {
        assert_eq!(
            ids.len(),
            1,
            "one version per answer, never both or neither: {ids:?}"
        );
        if *started > acknowledged {
            assert!(
                !old,
                "the old version was served after the new one was acknowledged"
            );
            after += 1;
        } else if *old {
            before += 1;
        }
        assert!(ids.contains(&v1.id) || ids.contains(&v2.id), "{ids:?}");
    }
    println!(
        "replace under searches: {} searches, {before} answered by the old version, {after} after the swap by the new one",
        seen.len()
    );
    assert!(
        before > 0 && after > 0,
        "searches ran on both sides of the swap"
    );

    // The old version is deleted, and the index forgets it once its points are gone.
    eventually(Duration::from_secs(30), "old version deleted", || async {
        match common::get_document(&cluster, "versions", &v1.id).await {
            Err(s) if s.code() == Code::NotFound => Some(()),
            _ => None,
        }
    })
    .await;
    let mut index = pb::index_service_client::IndexServiceClient::new(
        common::connect(&cluster.service("search-svc").grpc).await,
    );
    let stats = eventually(
        Duration::from_secs(30),
        "index forgets the old version",
        || {
            let mut index = index.clone();
            let kb_id = kb.id.clone();
            async move {
                let stats = index
                    .get_collection_stats(pb::GetCollectionStatsRequest {
                        knowledge_base_id: kb_id,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                stats.hidden_document_ids.is_empty().then_some(stats)
            }
        },
    )
    .await;
    assert_eq!(
        stats.point_count,
        u64::from(v2.chunk_count + other.chunk_count),
        "exactly the new version's chunks and the other document's"
    );

    // The same bytes again: nothing new.
    let again = docs
        .ingest_text(text("two", false))
        .await
        .unwrap()
        .into_inner();
    assert!(again.deduplicated);
    assert_eq!(again.document.unwrap().id, v2.id);

    // A version that fails (a PDF without text) leaves the served version in place.
    let pdf = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/formats/image-only.pdf"),
    )
    .unwrap();
    let failed = common::upload(
        &cluster,
        pb::DocumentHeader {
            knowledge_base: "versions".into(),
            source_id: "docs/handbook.md".into(),
            wait: true,
            ..Default::default()
        },
        &pdf,
        1 << 20,
    )
    .await
    .unwrap()
    .document
    .unwrap();
    assert_eq!(
        failed.status,
        pb::DocumentStatus::Failed as i32,
        "{failed:?}"
    );
    let hits = search(
        &cluster,
        "versions",
        "how are releases promoted to production",
    )
    .await
    .unwrap()
    .hits;
    assert!(hits.iter().any(|h| h.document_id == v2.id), "{hits:?}");
    assert_eq!(
        common::get_document(&cluster, "versions", &v2.id)
            .await
            .unwrap()
            .status,
        pb::DocumentStatus::Indexed as i32
    );
    // Index.UpdateHiddenDocuments refuses a document in both lists.
    let err = index
        .update_hidden_documents(pb::UpdateHiddenDocumentsRequest {
            knowledge_base_id: kb.id.clone(),
            hide_document_ids: vec!["x".into()],
            show_document_ids: vec!["x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("hide_document_ids"), "{err:?}");
}
