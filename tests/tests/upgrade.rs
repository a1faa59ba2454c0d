//! Upgrades (issue 10, part 8): a data directory written by an earlier release (the fixture in
//! `tests/data/upgrade/`, made by its `make.sh` with that release's binary) opens with this one:
//! the catalog and index registry migrate at start, and every knowledge base, document,
//! chunk, metadata value and search mode serves as before, writes (including what the newer
//! schema added, such as replacing by `source_id`) work, a deleted document stays deleted, and
//! a second start on the upgraded directory changes nothing.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::{Cluster, wait_for_status};
use smartdb_proto::v1 as pb;

/// The release the fixture was written by (commit 939429e, 2026-11-30): catalog schema 2,
/// index registry 2, collections in the layout of that time; no source ids, no hidden sets.
const FIXTURE: &str = "939429e.tar.gz";

fn unpack(fixture: &str) -> tempfile::TempDir {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/upgrade")
        .join(fixture);
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&path)
        .arg("-C")
        .arg(dir.path())
        .status()
        .expect("tar");
    assert!(status.success(), "unpack {}", path.display());
    dir
}

async fn search(
    cluster: &Cluster,
    kb: &str,
    query: &str,
    mode: pb::SearchMode,
    filter: &[(&str, &str)],
) -> pb::SearchResponse {
    cluster
        .search()
        .await
        .search(pb::SearchRequest {
            knowledge_base: kb.into(),
            query: query.into(),
            top_k: 10,
            mode: mode as i32,
            filter: filter
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("search {kb} {query:?} ({mode:?}): {s:?}"))
        .into_inner()
}

async fn documents(cluster: &Cluster, kb: &str) -> BTreeMap<String, pb::Document> {
    cluster
        .docs()
        .await
        .list_documents(pb::ListDocumentsRequest {
            knowledge_base: kb.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("list {kb}: {s:?}"))
        .into_inner()
        .documents
        .into_iter()
        .map(|d| (d.title.clone(), d))
        .collect()
}

/// What the fixture holds must all be there and found, in every mode.
async fn check_old_contents(cluster: &Cluster) {
    let kbs = cluster
        .kbs()
        .await
        .list_knowledge_bases(pb::ListKnowledgeBasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .knowledge_bases;
    let names: Vec<&str> = kbs.iter().map(|k| k.name.as_str()).collect();
    assert!(
        names.contains(&"notes") && names.contains(&"archive"),
        "{names:?}"
    );
    let notes = kbs.iter().find(|k| k.name == "notes").unwrap();
    assert_eq!(notes.description, "field notes");

    let docs = documents(cluster, "notes").await;
    let tides = &docs["Tides"];
    let bees = &docs["Beekeeping"];
    for doc in [tides, bees] {
        assert_eq!(doc.status, pb::DocumentStatus::Indexed as i32, "{doc:?}");
        assert!(doc.chunk_count >= 1, "{doc:?}");
        assert_eq!(doc.source_id, "", "the old release had no source ids");
    }
    assert_eq!(tides.metadata.get("topic").map(String::as_str), Some("sea"));
    assert_eq!(bees.metadata.get("year").map(String::as_str), Some("2021"));

    for mode in [
        pb::SearchMode::Hybrid,
        pb::SearchMode::Dense,
        pb::SearchMode::Lexical,
    ] {
        let found = search(
            cluster,
            "notes",
            "when do spring tides happen sun moon",
            mode,
            &[],
        )
        .await;
        let top = found
            .hits
            .first()
            .unwrap_or_else(|| panic!("{mode:?}: no hit"));
        assert_eq!(top.document_id, tides.id, "{mode:?}: {found:?}");
        assert!(top.text.contains("Spring tides"), "{top:?}");
        assert_eq!(top.metadata.get("year").map(String::as_str), Some("2019"));
        // The document deleted before the upgrade stays deleted.
        let gone = search(cluster, "notes", "volcanic glass", mode, &[]).await;
        assert!(
            gone.hits.iter().all(|h| !h.text.contains("volcanic glass")),
            "{mode:?}: a deleted document came back: {gone:?}"
        );
    }
    // Metadata filters over the old payloads.
    let filtered = search(
        cluster,
        "notes",
        "what happens in nature",
        pb::SearchMode::Hybrid,
        &[("topic", "bees")],
    )
    .await;
    assert!(!filtered.hits.is_empty());
    assert!(
        filtered.hits.iter().all(|h| h.document_id == bees.id),
        "{filtered:?}"
    );
    let archive = search(
        cluster,
        "archive",
        "Carrington solar storm telegraph",
        pb::SearchMode::Hybrid,
        &[],
    )
    .await;
    assert!(
        archive
            .hits
            .first()
            .is_some_and(|h| h.text.contains("Carrington")),
        "{archive:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_directory_of_the_previous_release_opens_and_serves() {
    let cluster = Cluster::start_in(unpack(FIXTURE), &[], &[]).await;
    check_old_contents(&cluster).await;

    // Writes into an old knowledge base, including what the new schema added: a source id,
    // and a new version of it replacing the first.
    let ingest = |text: &'static str| pb::IngestTextRequest {
        knowledge_base: "notes".into(),
        text: text.into(),
        source_id: "notes/compass.txt".into(),
        wait: true,
        ..Default::default()
    };
    let first = cluster
        .docs()
        .await
        .ingest_text(ingest(
            "A compass needle points to magnetic north, not true north.",
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(
        first.status,
        pb::DocumentStatus::Indexed as i32,
        "{first:?}"
    );
    let second = cluster
        .docs()
        .await
        .ingest_text(ingest(
            "A compass needle swings toward the magnetic pole; declination corrects it.",
        ))
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(second.status, pb::DocumentStatus::Indexed as i32);
    assert_eq!(second.source_id, "notes/compass.txt");
    let found = search(
        &cluster,
        "notes",
        "compass needle magnetic north",
        pb::SearchMode::Hybrid,
        &[],
    )
    .await;
    let ids: Vec<&str> = found.hits.iter().map(|h| h.document_id.as_str()).collect();
    assert!(ids.contains(&second.id.as_str()), "{found:?}");
    assert!(
        !ids.contains(&first.id.as_str()),
        "the replaced version: {found:?}"
    );

    // An old document can be deleted.
    let docs = documents(&cluster, "notes").await;
    let bees = docs["Beekeeping"].id.clone();
    cluster
        .docs()
        .await
        .delete_document(pb::DeleteDocumentRequest {
            knowledge_base: "notes".into(),
            document_id: bees.clone(),
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let gone = search(
            &cluster,
            "notes",
            "bees fan their wings",
            pb::SearchMode::Hybrid,
            &[],
        )
        .await;
        if gone.hits.iter().all(|h| h.document_id != bees) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{gone:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A second start on the upgraded directory: nothing to migrate, everything still there.
    let data = cluster.stop();
    let cluster = Cluster::start_in(data, &[], &[]).await;
    let docs = documents(&cluster, "notes").await;
    assert!(!docs.contains_key("Beekeeping"), "{docs:?}");
    wait_for_status(
        &cluster,
        "notes",
        &docs["Tides"].id,
        pb::DocumentStatus::Indexed,
        Duration::from_secs(5),
    )
    .await;
    let found = search(
        &cluster,
        "notes",
        "when do spring tides happen",
        pb::SearchMode::Lexical,
        &[],
    )
    .await;
    assert_eq!(
        found.hits.first().map(|h| h.document_id.as_str()),
        Some(docs["Tides"].id.as_str())
    );
}
