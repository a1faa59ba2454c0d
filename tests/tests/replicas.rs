//! Two search-svc replicas sharing one index (a Qdrant server) and one Redis: a write through
//! one replica is seen by a search through the other, every time (the result cache's version is
//! shared through Redis). Runs when `SMARTDB_TEST_QDRANT_URL` names a Qdrant server (gRPC port);
//! shown as ignored otherwise.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, health, smartdb_bin};
use smartdb_proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;

/// A `smartdb serve …` process, killed when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn serve(args: &[&str], env: &[(&str, &str)]) -> Served {
    Served(
        Command::new(smartdb_bin())
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start smartdb serve"),
    )
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(qdrant_server),
    ignore = "needs SMARTDB_TEST_QDRANT_URL (a Qdrant 1.19+ server)"
)]
async fn a_write_through_one_replica_is_seen_through_the_other() {
    let qdrant = std::env::var("SMARTDB_TEST_QDRANT_URL").expect("SMARTDB_TEST_QDRANT_URL");
    let api_key = std::env::var("SMARTDB_TEST_QDRANT_API_KEY").unwrap_or_default();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let embed = free_addr();
    let _embed = serve(
        &["embed", "--listen", &embed],
        &[("SMARTDB_DATA_DIR", data)],
    );
    let mut env = vec![
        ("SMARTDB_DATA_DIR", data),
        ("SMARTDB_QDRANT_URL", qdrant.as_str()),
        ("SMARTDB_REDIS_URL", "redis://127.0.0.1:6379"),
        ("SMARTDB_EMBED_ADDR", embed.as_str()),
    ];
    if !api_key.is_empty() {
        env.push(("SMARTDB_QDRANT_API_KEY", api_key.as_str()));
    }
    let (a, b) = (free_addr(), free_addr());
    let _a = serve(&["search", "--listen", &a], &env);
    let _b = serve(&["search", "--listen", &b], &env);
    for addr in [&embed, &a, &b] {
        eventually(Duration::from_secs(300), "services to serve", || async {
            (health(addr, "").await == Some(ServingStatus::Serving)).then_some(())
        })
        .await;
    }
    let mut embedder =
        pb::embed_service_client::EmbedServiceClient::new(common::connect(&embed).await);
    let mut index_a = pb::index_service_client::IndexServiceClient::new(common::connect(&a).await);
    let mut search_b =
        pb::search_service_client::SearchServiceClient::new(common::connect(&b).await);
    let kb_id = uuid_v4();
    let name = format!("replicas-{kb_id}");
    index_a
        .create_collection(pb::CreateCollectionRequest {
            knowledge_base_id: kb_id.clone(),
            knowledge_base: name.clone(),
            dimension: 384,
            embedding_model: "all-MiniLM-L6-v2".into(),
        })
        .await
        .unwrap();
    for i in 0..8u32 {
        let marker = format!("zebra{i}");
        let query = pb::SearchRequest {
            knowledge_base: name.clone(),
            query: format!("{marker} crossing"),
            mode: pb::SearchMode::Lexical as i32,
            top_k: 5,
            ..Default::default()
        };
        // Asked (and cached) through B before the write.
        let before = search_b.search(query.clone()).await.unwrap().into_inner();
        assert!(before.hits.iter().all(|h| !h.text.contains(&marker)));
        let text = format!("The {marker} is crossing the road.");
        let vector = embedder
            .embed(pb::EmbedRequest {
                texts: vec![text.clone()],
                kind: pb::InputKind::Document as i32,
                model: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .embeddings
            .remove(0)
            .values;
        index_a
            .upsert_points(pb::UpsertPointsRequest {
                knowledge_base_id: kb_id.clone(),
                points: vec![pb::Point {
                    id: point_uuid(i),
                    vector,
                    document_id: format!("doc-{i}"),
                    chunk_index: 0,
                    text,
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
        let after = search_b.search(query).await.unwrap().into_inner();
        assert!(
            after.hits.iter().any(|h| h.text.contains(&marker)),
            "write {i} through A not seen through B (cached: {}): {:?}",
            after.cached,
            after.hits
        );
    }
    index_a
        .delete_collection(pb::DeleteCollectionRequest {
            knowledge_base_id: kb_id,
        })
        .await
        .unwrap();
}

/// A random UUID (v4 layout) without a uuid dependency in the tests.
fn uuid_v4() -> String {
    let n: u128 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        ^ u128::from(std::process::id()) << 64;
    let b = (n & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{b:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn point_uuid(i: u32) -> String {
    format!("00000000-0000-4000-8000-{:012x}", i + 1)
}
