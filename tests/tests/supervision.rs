//! `smartdb up` as a supervisor: a child killed with SIGKILL comes back, data survives the
//! restart, and SIGTERM stops everything cleanly.

mod common;

use std::time::Duration;

use common::{Cluster, eventually, health};
use smartdb_proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;

fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_child_comes_back_and_sigterm_stops_all() {
    let mut cluster = Cluster::start().await;
    let mut kbs = cluster.kbs().await;
    kbs.create_knowledge_base(pb::CreateKnowledgeBaseRequest {
        name: "survivor".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let doc = cluster
        .docs()
        .await
        .ingest_text(pb::IngestTextRequest {
            knowledge_base: "survivor".into(),
            text: "Honey bees communicate the location of flowers with a waggle dance.".into(),
            wait: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(doc.status, pb::DocumentStatus::Indexed as i32);

    for victim in ["search-svc", "ingest-svc"] {
        let before = cluster.service(victim);
        let pid = before.pid.expect("pid");
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        let new_pid = eventually(Duration::from_secs(60), "a restarted child", || {
            let info = cluster.service(victim);
            async move { info.pid.filter(|p| *p != pid) }
        })
        .await;
        assert!(alive(new_pid));
        eventually(Duration::from_secs(60), "the restarted child to serve", || {
            let addr = before.grpc.clone();
            async move { (health(&addr, "").await == Some(ServingStatus::Serving)).then_some(()) }
        })
        .await;
    }

    // What was indexed before the crashes is still found.
    let hits = eventually(Duration::from_secs(30), "search after restart", || async {
        let mut client = cluster.search().await;
        client
            .search(pb::SearchRequest {
                knowledge_base: "survivor".into(),
                query: "how do bees tell where flowers are".into(),
                ..Default::default()
            })
            .await
            .ok()
            .map(|r| r.into_inner().hits)
    })
    .await;
    assert_eq!(hits[0].document_id, doc.id);

    let children: Vec<u32> = ["gateway", "search-svc", "ingest-svc", "embed-svc"]
        .iter()
        .filter_map(|n| cluster.service(n).pid)
        .collect();
    assert_eq!(children.len(), 4);
    let status = cluster.terminate();
    assert!(status.success(), "smartdb up exit status {status}");
    for pid in children {
        assert!(!alive(pid), "child {pid} still running after shutdown");
    }
}
