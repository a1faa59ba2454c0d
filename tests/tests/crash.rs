//! Crash-proof jobs (issue 10, part 5): 520 real abstracts are pushed while ingest-svc is
//! killed with SIGKILL at random moments, several times (during uploads, and while jobs parse,
//! embed, index and publish); `smartdb up` restarts it each time. Every acknowledged document
//! must end INDEXED exactly once, and the index must hold exactly their chunks: none lost (a
//! job cut short resumes after restart) and none doubled (point ids are deterministic, so a
//! retried job overwrites what it wrote before; re-sent uploads are deduplicated).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{Cluster, create_kb, eventually, health, scifact};
use smartdb_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const DOCS: usize = 520;
const KILLS: usize = 4;
const UPLOADERS: usize = 4;

/// A pseudo-random number from the clock, printed with each kill so a failing run can be told
/// apart from a lucky one.
fn random_below(n: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (nanos.wrapping_mul(6364136223846793005) >> 33) % n
}

/// The first words of a text: a query that finds it.
fn opening_words(text: &str) -> String {
    text.split_whitespace()
        .take(12)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn list_all(cluster: &Cluster, kb: &str) -> Vec<pb::Document> {
    common::list_pages(cluster, kb, 200).await.concat()
}

/// SIGKILLs ingest-svc (as `info` describes it) and waits until `smartdb up` has restarted it
/// and it serves again.
async fn kill_ingest(cluster: &Cluster, info: &common::ServiceInfo) {
    kill_service(cluster, "ingest-svc", info).await
}

/// SIGKILLs `name` (as `info` describes it) and waits until `smartdb up` has restarted it and
/// it serves again.
async fn kill_service(cluster: &Cluster, name: &str, info: &common::ServiceInfo) {
    let pid = info.pid.expect("pid");
    common::signal(pid, libc::SIGKILL);
    let new_pid = eventually(
        Duration::from_secs(60),
        &format!("{name} restarted"),
        || {
            let info = cluster.service(name);
            async move { info.pid.filter(|p| *p != pid) }
        },
    )
    .await;
    eventually(
        Duration::from_secs(60),
        &format!("{name} serving again"),
        || {
            let addr = info.grpc.clone();
            async move { (health(&addr, "").await == Some(ServingStatus::Serving)).then_some(()) }
        },
    )
    .await;
    assert!(common::alive(new_pid));
}

#[tokio::test(flavor = "multi_thread")]
async fn documents_survive_ingest_svc_being_killed_at_random_moments() {
    // Short leases: the jobs a killed process held are taken up again within seconds.
    let cluster = Arc::new(Cluster::start_with_env(&[("SMARTDB_INGEST_LEASE", "4s")]).await);
    let kb = create_kb(&cluster, "crash").await;
    let corpus: Vec<(String, String)> = scifact().into_iter().take(DOCS).collect();
    let corpus = Arc::new(corpus);
    let acked: Arc<Mutex<BTreeMap<usize, String>>> = Arc::default();

    // Uploaders: each document is sent until it is acknowledged. A call cut off by a kill may
    // or may not have stored it; sending the same bytes again is a no-op if it did.
    let mut uploaders = Vec::new();
    for lane in 0..UPLOADERS {
        let (cluster, corpus, acked) = (cluster.clone(), corpus.clone(), acked.clone());
        uploaders.push(tokio::spawn(async move {
            let mut retries = 0u32;
            for i in (lane..corpus.len()).step_by(UPLOADERS) {
                let (id, text) = &corpus[i];
                loop {
                    let sent = cluster
                        .docs()
                        .await
                        .ingest_text(pb::IngestTextRequest {
                            knowledge_base: "crash".into(),
                            title: format!("scifact {id}"),
                            text: text.clone(),
                            ..Default::default()
                        })
                        .await;
                    match sent {
                        Ok(r) => {
                            let doc = r.into_inner().document.unwrap();
                            acked.lock().unwrap().insert(i, doc.id);
                            break;
                        }
                        Err(s) if s.code() == Code::InvalidArgument => {
                            panic!("document {id} refused: {s:?}")
                        }
                        Err(_) => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                // Spread the uploads over several seconds, so the first kill lands among them.
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            retries
        }));
    }

    // The killer: SIGKILL at a random moment once the restarted process serves again.
    let mut kills = Vec::new();
    for round in 0..KILLS {
        let info = cluster.service("ingest-svc");
        let pid = info.pid.expect("pid");
        // The first kill within the uploads (they take 4 s or more), the others while the
        // documents are parsed, embedded and indexed.
        let wait = match round {
            0 => Duration::from_millis(500 + random_below(2000)),
            _ => Duration::from_millis(1500 + random_below(3500)),
        };
        tokio::time::sleep(wait).await;
        let done = acked.lock().unwrap().len();
        let indexed = list_all(&cluster, "crash")
            .await
            .iter()
            .filter(|d| d.status == pb::DocumentStatus::Indexed as i32)
            .count();
        eprintln!(
            "kill {round}: SIGKILL ingest-svc (pid {pid}) after {wait:?}: {done} uploads \
             acknowledged, {indexed} documents indexed"
        );
        kills.push((done, indexed));
        kill_ingest(&cluster, &info).await;
    }
    let mut retries = 0;
    for uploader in uploaders {
        retries += uploader.await.unwrap();
    }
    eprintln!("uploads re-sent after a failed call: {retries}");
    assert!(
        kills[0].0 < DOCS,
        "the first kill did not land among the uploads: {kills:?}"
    );
    assert!(
        kills.iter().any(|(_, indexed)| *indexed < DOCS),
        "no kill landed while documents were still being indexed: {kills:?}"
    );

    // Every acknowledged document ends INDEXED, once.
    let acked: BTreeSet<String> = acked.lock().unwrap().values().cloned().collect();
    assert_eq!(acked.len(), DOCS, "each document acknowledged as its own");
    let deadline = Instant::now() + Duration::from_secs(600);
    let docs = loop {
        let docs = list_all(&cluster, "crash").await;
        let waiting = docs
            .iter()
            .filter(|d| d.status != pb::DocumentStatus::Indexed as i32)
            .count();
        if waiting == 0 {
            break docs;
        }
        if let Some(failed) = docs
            .iter()
            .find(|d| d.status == pb::DocumentStatus::Failed as i32)
        {
            panic!("a document failed: {failed:?}");
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} documents still not indexed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let stored: BTreeSet<String> = docs.iter().map(|d| d.id.clone()).collect();
    assert_eq!(docs.len(), DOCS, "no document doubled");
    assert_eq!(stored, acked, "exactly the acknowledged documents");

    // The index holds exactly their chunks.
    let expected: u64 = docs.iter().map(|d| u64::from(d.chunk_count)).sum();
    assert!(expected >= DOCS as u64);
    let stats = common::collection_stats(&cluster, &kb.id).await.unwrap();
    assert_eq!(
        stats.point_count, expected,
        "points in the index against the chunks of the documents"
    );
    assert!(stats.hidden_document_ids.is_empty(), "{stats:?}");

    // And each is found: a few documents by their own opening words.
    let by_title: BTreeMap<&str, &str> = docs
        .iter()
        .map(|d| (d.title.as_str(), d.id.as_str()))
        .collect();
    for i in [0, DOCS / 3, DOCS / 2, DOCS - 1] {
        let (id, text) = &corpus[i];
        let query = opening_words(text);
        let hits = common::search(&cluster, "crash", &query)
            .await
            .unwrap()
            .hits;
        let want = by_title[format!("scifact {id}").as_str()];
        assert!(
            hits.iter().any(|h| h.document_id == want),
            "{query:?} does not find document {id}: {hits:?}"
        );
    }
}

/// Sends `request` until ingest-svc acknowledges it (a call cut off by a kill is sent again).
async fn until_acked<T, F, Fut>(what: &str, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(s) if matches!(s.code(), Code::NotFound | Code::InvalidArgument) => return Err(s),
            Err(s) => {
                assert!(Instant::now() < deadline, "{what}: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Kills ingest-svc `times` times at random moments, each once it serves again.
async fn killer(cluster: Arc<Cluster>, times: usize, max_wait_ms: u64) {
    for round in 0..times {
        let info = cluster.service("ingest-svc");
        let pid = info.pid.expect("pid");
        let wait = Duration::from_millis(300 + random_below(max_wait_ms));
        tokio::time::sleep(wait).await;
        eprintln!("kill {round}: SIGKILL ingest-svc (pid {pid}) after {wait:?}");
        kill_ingest(&cluster, &info).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replaces_and_deletes_finish_after_ingest_svc_is_killed_midway() {
    const SOURCES: usize = 40;
    let cluster = Arc::new(Cluster::start_with_env(&[("SMARTDB_INGEST_LEASE", "4s")]).await);
    let versions = create_kb(&cluster, "versions").await;
    let doomed = create_kb(&cluster, "doomed").await;
    let corpus = scifact();
    let send = {
        let cluster = cluster.clone();
        move |kb: &'static str, i: usize, text: String, source: bool| {
            let cluster = cluster.clone();
            async move {
                until_acked("upload", || {
                    let (cluster, text) = (cluster.clone(), text.clone());
                    async move {
                        cluster
                            .docs()
                            .await
                            .ingest_text(pb::IngestTextRequest {
                                knowledge_base: kb.into(),
                                text,
                                source_id: if source {
                                    format!("src/{i}")
                                } else {
                                    String::new()
                                },
                                ..Default::default()
                            })
                            .await
                            .map(|r| r.into_inner().document.unwrap())
                    }
                })
                .await
                .unwrap()
            }
        }
    };
    let wait_indexed = |kb: &'static str, ids: Vec<String>| {
        let cluster = cluster.clone();
        async move {
            for id in ids {
                common::wait_for_status(
                    &cluster,
                    kb,
                    &id,
                    pb::DocumentStatus::Indexed,
                    Duration::from_secs(300),
                )
                .await;
            }
        }
    };
    let mut first = Vec::new();
    let mut doomed_docs = Vec::new();
    for i in 0..SOURCES {
        first.push(send("versions", i, corpus[i].1.clone(), true).await);
        doomed_docs.push(send("doomed", i, corpus[200 + i].1.clone(), false).await);
    }
    wait_indexed("versions", first.iter().map(|d| d.id.clone()).collect()).await;
    wait_indexed("doomed", doomed_docs.iter().map(|d| d.id.clone()).collect()).await;

    // New versions of every source, deletes of single documents and of a whole knowledge
    // base, while ingest-svc is killed three times.
    let kills = tokio::spawn(killer(cluster.clone(), 3, 2500));
    let replacing = {
        let send = send.clone();
        let texts: Vec<String> = (0..SOURCES).map(|i| corpus[100 + i].1.clone()).collect();
        tokio::spawn(async move {
            let mut second = Vec::new();
            for (i, text) in texts.into_iter().enumerate() {
                second.push(send("versions", i, text, true).await);
            }
            second
        })
    };
    let deleting = {
        let (cluster, docs) = (cluster.clone(), doomed_docs.clone());
        tokio::spawn(async move {
            for doc in &docs[..10] {
                let _ = until_acked("delete document", || {
                    let cluster = cluster.clone();
                    async move {
                        cluster
                            .docs()
                            .await
                            .delete_document(pb::DeleteDocumentRequest {
                                knowledge_base: "doomed".into(),
                                document_id: doc.id.clone(),
                            })
                            .await
                    }
                })
                .await;
            }
            let _ = until_acked("delete knowledge base", || {
                let cluster = cluster.clone();
                async move {
                    cluster
                        .kbs()
                        .await
                        .delete_knowledge_base(pb::DeleteKnowledgeBaseRequest {
                            name: "doomed".into(),
                        })
                        .await
                }
            })
            .await;
        })
    };
    let second = replacing.await.unwrap();
    deleting.await.unwrap();
    kills.await.unwrap();

    // Every new version is served, every old one gone for good.
    wait_indexed("versions", second.iter().map(|d| d.id.clone()).collect()).await;
    for old in &first {
        eventually(Duration::from_secs(120), "old version deleted", || async {
            match common::get_document(&cluster, "versions", &old.id).await {
                Err(s) if s.code() == Code::NotFound => Some(()),
                _ => None,
            }
        })
        .await;
    }
    let docs = list_all(&cluster, "versions").await;
    let want: BTreeSet<String> = second.iter().map(|d| d.id.clone()).collect();
    let have: BTreeSet<String> = docs.iter().map(|d| d.id.clone()).collect();
    assert_eq!(have, want, "exactly the new versions");
    let mut index = pb::index_service_client::IndexServiceClient::new(
        common::connect(&cluster.service("search-svc").grpc).await,
    );
    let expected: u64 = docs.iter().map(|d| u64::from(d.chunk_count)).sum();
    let stats = eventually(Duration::from_secs(60), "old points removed", || {
        let mut index = index.clone();
        let id = versions.id.clone();
        async move {
            let stats = index
                .get_collection_stats(pb::GetCollectionStatsRequest {
                    knowledge_base_id: id,
                })
                .await
                .unwrap()
                .into_inner();
            (stats.point_count == expected && stats.hidden_document_ids.is_empty()).then_some(stats)
        }
    })
    .await;
    assert_eq!(stats.point_count, expected);
    let old_ids: BTreeSet<&str> = first.iter().map(|d| d.id.as_str()).collect();
    for i in [0, SOURCES / 2, SOURCES - 1] {
        let query = opening_words(&corpus[i].1);
        let hits = common::search(&cluster, "versions", &query)
            .await
            .unwrap()
            .hits;
        assert!(
            hits.iter()
                .all(|h| !old_ids.contains(h.document_id.as_str())),
            "an old version is still found: {hits:?}"
        );
    }

    // The deleted knowledge base is gone everywhere: catalog, index and originals.
    let err = cluster
        .kbs()
        .await
        .get_knowledge_base(pb::GetKnowledgeBaseRequest {
            name: "doomed".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = index
        .get_collection_stats(pb::GetCollectionStatsRequest {
            knowledge_base_id: doomed.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // A kill between the catalog commit and the file removals leaves originals no document
    // points at; the next start removes them (and the periodic sweep, after its grace time).
    killer(cluster.clone(), 1, 1).await;
    let originals = cluster.data_dir.path().join("ingest/originals");
    for doc in &doomed_docs {
        assert!(
            !originals.join(&doc.id).exists(),
            "original of deleted document {} left behind",
            doc.id
        );
    }
}

/// search-svc acknowledges an index write once the collection's commit log holds it, and
/// flushes the collection itself only now and then (here: not within the test). A SIGKILL right
/// after documents are indexed must lose none of their chunks: the restart replays the log.
#[tokio::test(flavor = "multi_thread")]
async fn indexed_chunks_survive_search_svc_being_killed_before_a_flush() {
    let cluster =
        Arc::new(Cluster::start_with_env(&[("SMARTDB_SEARCH_CHECKPOINT_INTERVAL", "1h")]).await);
    let kb = create_kb(&cluster, "durable").await;
    let corpus: Vec<(String, String)> = scifact().into_iter().skip(600).take(24).collect();
    let mut indexing = Vec::new();
    for (id, text) in corpus.clone() {
        let cluster = cluster.clone();
        indexing.push(tokio::spawn(async move {
            let response = cluster
                .docs()
                .await
                .ingest_text(pb::IngestTextRequest {
                    knowledge_base: "durable".into(),
                    title: format!("scifact {id}"),
                    text,
                    wait: true,
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("document {id}: {s:?}"))
                .into_inner();
            let doc = response.document.unwrap();
            assert_eq!(doc.status, pb::DocumentStatus::Indexed as i32, "{doc:?}");
            doc
        }));
    }
    let mut expected = 0u64;
    for task in indexing {
        expected += u64::from(task.await.unwrap().chunk_count);
    }
    kill_service(&cluster, "search-svc", &cluster.service("search-svc")).await;

    let stats = common::collection_stats(&cluster, &kb.id).await.unwrap();
    assert_eq!(
        stats.point_count, expected,
        "points after the restart against the chunks of the indexed documents"
    );
    for (id, text) in [&corpus[0], &corpus[corpus.len() - 1]] {
        let query = opening_words(text);
        let hits = common::search(&cluster, "durable", &query)
            .await
            .unwrap()
            .hits;
        assert!(
            hits.iter().any(|h| h.title == format!("scifact {id}")),
            "{query:?} does not find document {id}: {hits:?}"
        );
    }
}
