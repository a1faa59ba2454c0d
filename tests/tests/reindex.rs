//! `ReindexKnowledgeBase` on a real cluster: after a change of chunking settings it rebuilds a
//! knowledge base from its stored originals while searches keep answering (never an empty
//! answer, documents stay INDEXED), and ends equal to a fresh ingest of the same originals under
//! the new settings; after the index was lost, it brings it back.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Cluster, create_kb, eventually, scifact};
use smartdb_proto::v1 as pb;
use tonic::Code;

const DOCUMENTS: usize = 16;

/// Stores the corpus in `kb` and waits until every document is indexed.
async fn ingest_all(cluster: &Cluster, kb: &str, corpus: &[(String, String)]) {
    let mut docs = cluster.docs().await;
    for (title, text) in corpus {
        let r = docs
            .ingest_text(pb::IngestTextRequest {
                knowledge_base: kb.to_owned(),
                title: title.clone(),
                text: text.clone(),
                wait: true,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("ingest {title}: {s:?}"))
            .into_inner();
        let doc = r.document.expect("document");
        assert_eq!(doc.status, pb::DocumentStatus::Indexed as i32, "{doc:?}");
    }
}

/// Every document of `kb`: title → (status, chunk count).
async fn documents(cluster: &Cluster, kb: &str) -> BTreeMap<String, (i32, u32)> {
    common::list_pages(cluster, kb, 1000)
        .await
        .into_iter()
        .flatten()
        .map(|d| (d.title, (d.status, d.chunk_count)))
        .collect()
}

async fn point_count(cluster: &Cluster, kb_id: &str) -> Result<u64, tonic::Status> {
    let mut index = pb::index_service_client::IndexServiceClient::new(
        common::connect(&cluster.service("search-svc").grpc).await,
    );
    index
        .get_collection_stats(pb::GetCollectionStatsRequest {
            knowledge_base_id: kb_id.to_owned(),
        })
        .await
        .map(|r| r.into_inner().point_count)
}

/// The dense ranking of `query` in `kb`, as (title, chunk index, text).
async fn dense(cluster: &Cluster, kb: &str, query: &str) -> Vec<(String, u32, String)> {
    cluster
        .search()
        .await
        .search(pb::SearchRequest {
            knowledge_base: kb.to_owned(),
            query: query.to_owned(),
            top_k: 10,
            mode: pb::SearchMode::Dense as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("search {kb}: {s:?}"))
        .into_inner()
        .hits
        .into_iter()
        .map(|h| (h.title, h.chunk_index, h.text))
        .collect()
}

/// Reindexes `kb` and waits until it is done; returns how many documents it covered.
async fn reindex(cluster: &Cluster, kb: &str) -> u64 {
    let started = cluster
        .kbs()
        .await
        .reindex_knowledge_base(pb::ReindexKnowledgeBaseRequest {
            name: kb.to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("reindex {kb}: {s:?}"))
        .into_inner()
        .knowledge_base
        .and_then(|kb| kb.reindex)
        .expect("reindex progress");
    eventually(
        Duration::from_secs(300),
        "the reindex to finish",
        || async {
            let kb = cluster
                .kbs()
                .await
                .get_knowledge_base(pb::GetKnowledgeBaseRequest {
                    name: kb.to_owned(),
                })
                .await
                .ok()?
                .into_inner()
                .knowledge_base?;
            (kb.reindex?.documents_remaining == 0).then_some(())
        },
    )
    .await;
    started.documents_total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reindex_rebuilds_from_originals_while_searches_keep_answering() {
    let corpus: Vec<(String, String)> = scifact()
        .into_iter()
        .filter(|(_, text)| text.len() > 1200)
        .take(DOCUMENTS)
        .collect();
    let cluster = Cluster::start().await;
    let kb = create_kb(&cluster, "library").await;
    ingest_all(&cluster, "library", &corpus).await;
    let before = point_count(&cluster, &kb.id).await.unwrap();
    let unknown = cluster
        .kbs()
        .await
        .reindex_knowledge_base(pb::ReindexKnowledgeBaseRequest {
            name: "no-such-kb".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // A new release of the settings: chunks of at most 300 bytes.
    let dir = cluster.stop();
    let cluster = Cluster::start_in(dir, &[], &[("SMARTDB_LIMIT_CHUNK_BYTES", "300")]).await;

    // Searches run all through the reindex; none may come back empty.
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, empty) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let searcher = {
        let (mut client, stop) = (cluster.search().await, stop.clone());
        let (answered, empty) = (answered.clone(), empty.clone());
        let queries: Vec<String> = corpus
            .iter()
            .map(|(_, text)| {
                text.split_whitespace()
                    .take(8)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .search(pb::SearchRequest {
                        knowledge_base: "library".into(),
                        query: queries[i % queries.len()].clone(),
                        top_k: 5,
                        ..Default::default()
                    })
                    .await
                    .expect("search during the reindex")
                    .into_inner();
                answered.fetch_add(1, Ordering::Relaxed);
                if r.hits.is_empty() {
                    empty.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = cluster
        .kbs()
        .await
        .reindex_knowledge_base(pb::ReindexKnowledgeBaseRequest {
            name: "library".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .knowledge_base
        .and_then(|kb| kb.reindex)
        .expect("progress");
    assert_eq!(started.documents_total, DOCUMENTS as u64);
    // Documents stay INDEXED while they are redone.
    for (title, (status, _)) in documents(&cluster, "library").await {
        assert_eq!(status, pb::DocumentStatus::Indexed as i32, "{title}");
    }
    assert_eq!(reindex(&cluster, "library").await, DOCUMENTS as u64);
    stop.store(true, Ordering::Relaxed);
    searcher.await.expect("searcher");
    let (answered, empty) = (
        answered.load(Ordering::Relaxed),
        empty.load(Ordering::Relaxed),
    );
    println!("searches during the reindex: {answered}, empty: {empty}");
    assert!(
        answered >= 5,
        "only {answered} searches ran during the reindex"
    );
    assert_eq!(empty, 0, "searches came back empty during the reindex");

    // Equal to a fresh ingest of the same originals under the new settings.
    let fresh = create_kb(&cluster, "fresh").await;
    ingest_all(&cluster, "fresh", &corpus).await;
    let rebuilt = documents(&cluster, "library").await;
    assert_eq!(rebuilt, documents(&cluster, "fresh").await);
    let after = point_count(&cluster, &kb.id).await.unwrap();
    assert_eq!(after, point_count(&cluster, &fresh.id).await.unwrap());
    assert!(
        after > before,
        "smaller chunks make more of them: {before} before, {after} after"
    );
    let queries = [
        &corpus[0].1,
        &corpus[DOCUMENTS / 2].1,
        &corpus[DOCUMENTS - 1].1,
    ];
    for query in queries {
        let query: String = query
            .split_whitespace()
            .take(12)
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            dense(&cluster, "library", &query).await,
            dense(&cluster, "fresh", &query).await,
            "{query}"
        );
    }

    // A lost index: the collection is gone; a reindex brings it back whole.
    let mut index = pb::index_service_client::IndexServiceClient::new(
        common::connect(&cluster.service("search-svc").grpc).await,
    );
    index
        .delete_collection(pb::DeleteCollectionRequest {
            knowledge_base_id: kb.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        point_count(&cluster, &kb.id).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(reindex(&cluster, "library").await, DOCUMENTS as u64);
    assert_eq!(point_count(&cluster, &kb.id).await.unwrap(), after);
    let query: String = corpus[1]
        .1
        .split_whitespace()
        .take(12)
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(
        dense(&cluster, "library", &query).await,
        dense(&cluster, "fresh", &query).await
    );
    assert_eq!(documents(&cluster, "library").await, rebuilt);
}
