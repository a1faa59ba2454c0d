//! Two ingest-svc replicas sharing one catalog and one set of originals in MongoDB (issue 10,
//! part 6), against a real MongoDB-wire server (SecantusDB on WiredTiger, or
//! `SMARTDB_TEST_MONGODB_URI`). With the first replica paused (SIGSTOP), documents are uploaded
//! through a gateway in front of the second, which starts indexing them and is killed with
//! SIGKILL halfway. The first, resumed, finishes every job: it takes over the dead replica's
//! jobs once their leases run out and reads the originals the dead one stored, from GridFS.
//! Every document ends INDEXED once, and the index holds exactly their chunks.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Cluster, ExtraService, create_kb, eventually, health, scifact};
use smartdb_proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;

/// Small enough for SecantusDB, which is much slower than mongod.
const DOCS: usize = 60;

/// A paused process, resumed when dropped (also when the test fails while it is paused).
struct Paused(u32);

impl Drop for Paused {
    fn drop(&mut self) {
        common::signal(self.0, libc::SIGCONT);
    }
}

async fn serving(addr: &str, what: &str) {
    eventually(Duration::from_secs(120), what, || async {
        (health(addr, "").await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_ingest_replicas_share_the_queue_and_one_can_die() {
    let mongo = smartdb_kit::testing::MongoServer::start();
    let uri = mongo.uri_for(&format!("ingest_{}", std::process::id()));
    // Short leases: the dead replica's jobs are taken over within seconds.
    let env = [
        ("SMARTDB_INGEST_MONGODB_URI", uri.as_str()),
        ("SMARTDB_INGEST_LEASE", "3s"),
    ];
    let cluster = Cluster::start_with_env(&env).await;
    let search = cluster.service("search-svc").grpc;
    let embed = cluster.service("embed-svc").grpc;
    let dir = tempfile::tempdir().unwrap();
    let (b_data, gw_data) = (dir.path().join("b"), dir.path().join("gw"));
    let (b_data, gw_data) = (b_data.to_str().unwrap(), gw_data.to_str().unwrap());
    let replica = ExtraService::serve(
        "ingest",
        &[
            "--data-dir",
            b_data,
            "--embed-addr",
            &embed,
            "--search-addr",
            &search,
        ],
        &env,
    );
    serving(&replica.addr, "the second ingest-svc replica").await;
    let gateway_b = ExtraService::spawn(
        &[
            "--ingest-addr",
            &replica.addr,
            "--search-addr",
            &search,
            "--embed-addr",
            &embed,
            "--data-dir",
            gw_data,
        ],
        &[("SMARTDB_ADMIN_KEY", cluster.admin_key.as_str())],
    );
    serving(&gateway_b.addr, "the gateway of the second replica").await;
    let channel_b = common::gateway_channel(&gateway_b.addr, Some(&cluster.admin_key)).await;
    let mut docs_b = pb::document_service_client::DocumentServiceClient::new(channel_b.clone());
    let kbs_b = pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(channel_b);

    // A knowledge base made through the first replica is there through the second.
    let kb = create_kb(&cluster, "shared").await;
    let seen = kbs_b
        .clone()
        .get_knowledge_base(pb::GetKnowledgeBaseRequest {
            name: "shared".into(),
        })
        .await
        .expect("the second replica reads the shared catalog")
        .into_inner();
    assert_eq!(seen.knowledge_base.unwrap().id, kb.id);

    // Only the second replica works for now: every job it takes is one the first must finish.
    let first = cluster.service("ingest-svc").pid.expect("pid");
    common::signal(first, libc::SIGSTOP);
    let paused = Paused(first);
    let corpus: Vec<(String, String)> = scifact().into_iter().take(DOCS).collect();
    let mut ids = Vec::new();
    for (_, text) in &corpus {
        let doc = docs_b
            .ingest_text(pb::IngestTextRequest {
                knowledge_base: "shared".into(),
                text: text.clone(),
                ..Default::default()
            })
            .await
            .expect("upload through the second replica")
            .into_inner()
            .document
            .unwrap();
        ids.push(doc.id);
    }
    let acked: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(acked.len(), DOCS);

    // Kill the second replica halfway through.
    let started = Instant::now();
    let done = eventually(Duration::from_secs(120), "indexing under way", || async {
        let docs = common::list_pages_on(docs_b.clone(), "shared", 200)
            .await
            .concat();
        let done = docs
            .iter()
            .filter(|d| d.status == pb::DocumentStatus::Indexed as i32)
            .count();
        (done >= 1).then_some(done)
    })
    .await;
    drop(replica);
    drop(gateway_b);
    drop(paused);
    eprintln!(
        "killed the second replica {:.1} s into indexing, {done} of {DOCS} documents indexed",
        started.elapsed().as_secs_f64()
    );
    assert!(
        done < DOCS,
        "the second replica finished before it could be killed"
    );

    // The same bytes through the first replica are the same document (one shared catalog).
    // (Retried while the gateway notices the first replica is back.)
    let again = eventually(
        Duration::from_secs(60),
        "the first replica answers",
        || async {
            common::ingest_text(&cluster, "shared", &corpus[0].1, false)
                .await
                .ok()
        },
    )
    .await;
    assert!(again.deduplicated);
    assert_eq!(again.document.unwrap().id, ids[0]);

    // The first replica finishes everything, the dead one's jobs and originals included.
    let docs = eventually(
        Duration::from_secs(300),
        "every document indexed",
        || async {
            let docs = common::list_pages(&cluster, "shared", 200).await.concat();
            if let Some(failed) = docs
                .iter()
                .find(|d| d.status == pb::DocumentStatus::Failed as i32)
            {
                panic!("a document failed: {failed:?}");
            }
            docs.iter()
                .all(|d| d.status == pb::DocumentStatus::Indexed as i32)
                .then_some(docs)
        },
    )
    .await;
    let stored: BTreeSet<String> = docs.iter().map(|d| d.id.clone()).collect();
    assert_eq!(
        stored, acked,
        "exactly the acknowledged documents, once each"
    );

    let expected: u64 = docs.iter().map(|d| u64::from(d.chunk_count)).sum();
    let mut index =
        pb::index_service_client::IndexServiceClient::new(common::connect(&search).await);
    let stats = index
        .get_collection_stats(pb::GetCollectionStatsRequest {
            knowledge_base_id: kb.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.point_count, expected,
        "points in the index against the chunks of the documents"
    );
    // And a document is found by its own words.
    let words: String = corpus[DOCS - 1]
        .1
        .split_whitespace()
        .take(25)
        .collect::<Vec<_>>()
        .join(" ");
    let hits = common::search(&cluster, "shared", &words).await.unwrap();
    assert_eq!(hits.hits[0].document_id, ids[DOCS - 1], "{hits:?}");
}
