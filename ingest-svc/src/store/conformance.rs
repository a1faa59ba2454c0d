//! One behaviour for every catalog store: each check runs against SQLite and against MongoDB
//! (a real MongoDB-wire server, see `smartdb_kit::testing::MongoServer`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::*;

/// Opens the catalog called `name`: a new one the first time, the same data again after.
pub type Open<'a> = &'a (dyn Fn(String) -> BoxFuture<'static, Arc<dyn CatalogStore>> + Sync);

const MAX: u32 = 3;
const LONG: i64 = 60_000;

/// Runs every check, each on a catalog of its own.
pub async fn run(open: Open<'_>) {
    macro_rules! check {
        ($($name:ident),* $(,)?) => {$(
            eprintln!("catalog conformance: {}", stringify!($name));
            $name(open, stringify!($name)).await;
        )*};
    }
    check!(
        knowledge_base_names_are_reserved_per_tenant_and_unfinished_creates_resume,
        same_bytes_deduplicate_and_failed_ones_requeue,
        identical_bytes_uploaded_during_a_delete_become_a_new_document,
        leases_exclude_other_workers_until_they_expire,
        jobs_are_claimed_oldest_first_past_leased_and_waiting_ones,
        a_job_whose_claims_keep_expiring_is_given_up_with_its_last_step,
        outages_and_shutdowns_give_the_attempt_back,
        failed_documents_can_be_retried_without_a_new_upload,
        delete_during_indexing_waits_for_the_lease_then_runs,
        a_reindex_queues_indexed_and_failed_documents_and_counts_them_down_across_reopens,
        deleting_a_knowledge_base_removes_its_documents,
        a_job_carries_the_trace_context_of_the_call_that_queued_it,
        publishing_a_version_retires_the_older_ones_of_its_source_only,
        documents_round_trip_and_list_in_pages,
        concurrent_claims_never_hand_one_job_out_twice,
        a_source_lock_has_one_holder_across_handles_until_freed_or_expired,
    );
}

fn kb(name: &str) -> KnowledgeBase {
    KnowledgeBase {
        id: uuid::Uuid::new_v4().to_string(),
        tenant: "t".into(),
        name: name.into(),
        description: String::new(),
        embedding_model: "m".into(),
        dimension: 3,
        create_time: now_ms(),
        document_count: 0,
        ready: true,
        reindex: None,
    }
}

/// A ready knowledge base, the way a finished create leaves it.
async fn insert_kb(store: &dyn CatalogStore, kb: &KnowledgeBase) {
    assert!(matches!(
        store.reserve_kb(kb).await.unwrap(),
        Reservation::New
    ));
    assert!(store.activate_kb(&kb.id, &kb.id).await.unwrap());
}

fn doc(kb_id: &str, sha: &str) -> Document {
    Document {
        id: uuid::Uuid::now_v7().to_string(),
        kb_id: kb_id.into(),
        title: "t".into(),
        source_name: String::new(),
        content_type: "text/plain".into(),
        size_bytes: 1,
        sha256: sha.into(),
        status: Status::Queued,
        error: String::new(),
        chunk_count: 0,
        max_chunk_count: 0,
        metadata: BTreeMap::from([("k".into(), "v".into())]),
        attempts: 0,
        create_time: now_ms(),
        update_time: now_ms(),
        source_id: String::new(),
    }
}

async fn insert(store: &dyn CatalogStore, d: &Document) -> Inserted {
    store.insert_doc(d, "").await.unwrap()
}

async fn claim(store: &dyn CatalogStore, lease_ms: i64) -> Option<Job> {
    store.claim_job(lease_ms, MAX, None).await.unwrap()
}

async fn knowledge_base_names_are_reserved_per_tenant_and_unfinished_creates_resume(
    open: Open<'_>,
    name: &str,
) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let a = kb("a");
    insert_kb(store, &a).await;
    assert!(matches!(
        store.reserve_kb(&kb("a")).await.unwrap(),
        Reservation::Taken
    ));
    let mut other = kb("a");
    other.tenant = "u".into();
    insert_kb(store, &other).await;
    assert_eq!(store.list_kbs("t", "", 10).await.unwrap().len(), 1);
    assert!(store.find_kb("u", "a").await.unwrap().is_some());

    // A create that stopped after reserving: invisible, and the next create resumes it.
    let crashed = kb("b");
    assert!(matches!(
        store.reserve_kb(&crashed).await.unwrap(),
        Reservation::New
    ));
    assert!(store.find_kb("t", "b").await.unwrap().is_none());
    assert_eq!(store.list_kbs("t", "", 10).await.unwrap().len(), 1);
    match store.reserve_kb(&kb("b")).await.unwrap() {
        Reservation::Unfinished(found) => assert_eq!(found.id, crashed.id),
        other => panic!("expected the unfinished create, got {other:?}"),
    }
    // The index answered with another (reused) collection id: the row takes it.
    let reused = uuid::Uuid::new_v4().to_string();
    assert!(store.activate_kb(&crashed.id, &reused).await.unwrap());
    let found = store.find_kb("t", "b").await.unwrap().unwrap();
    assert_eq!(found.id, reused);
    assert_eq!(store.kb_by_id(&reused).await.unwrap(), Some(found));
    assert!(!store.activate_kb(&crashed.id, &reused).await.unwrap());
    // Names list in order, after the cursor.
    insert_kb(store, &kb("c")).await;
    let names = |kbs: Vec<KnowledgeBase>| kbs.into_iter().map(|k| k.name).collect::<Vec<_>>();
    assert_eq!(
        names(store.list_kbs("t", "", 10).await.unwrap()),
        ["a", "b", "c"]
    );
    assert_eq!(names(store.list_kbs("t", "a", 1).await.unwrap()), ["b"]);
    // A failed create gives its name back.
    let failed = kb("d");
    store.reserve_kb(&failed).await.unwrap();
    store.drop_reservation(&failed.id).await.unwrap();
    assert!(matches!(
        store.reserve_kb(&kb("d")).await.unwrap(),
        Reservation::New
    ));
}

async fn same_bytes_deduplicate_and_failed_ones_requeue(open: Open<'_>, name: &str) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let first = doc(&k.id, "abc");
    assert!(matches!(insert(store, &first).await, Inserted::New(_)));
    match insert(store, &doc(&k.id, "abc")).await {
        Inserted::Existing(d) => assert_eq!(d.id, first.id),
        other => panic!("expected existing, got {other:?}"),
    }
    // The same bytes in another knowledge base are another document.
    let k2 = kb("b");
    insert_kb(store, &k2).await;
    assert!(matches!(
        insert(store, &doc(&k2.id, "abc")).await,
        Inserted::New(_)
    ));
    let job = store
        .claim_job(LONG, MAX, Some(&first.id))
        .await
        .unwrap()
        .unwrap();
    store
        .set_status(&first.id, Status::Failed, "boom")
        .await
        .unwrap();
    store.complete_job(&job).await.unwrap();
    match insert(store, &doc(&k.id, "abc")).await {
        Inserted::New(d) => assert_eq!((d.id, d.status), (first.id.clone(), Status::Queued)),
        other => panic!("expected requeue, got {other:?}"),
    }
    assert!(
        store
            .claim_job(LONG, MAX, Some(&first.id))
            .await
            .unwrap()
            .is_some()
    );
}

async fn identical_bytes_uploaded_during_a_delete_become_a_new_document(
    open: Open<'_>,
    name: &str,
) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let old = doc(&k.id, "same");
    insert(store, &old).await;
    store.mark_deleting(&old.id).await.unwrap();
    let again = doc(&k.id, "same");
    match insert(store, &again).await {
        Inserted::New(d) => assert_eq!(d.id, again.id),
        other => panic!("a re-upload during a delete must be new, got {other:?}"),
    }
    // Both jobs exist: the delete of the old copy and the index job of the new one.
    let mut kinds = Vec::new();
    while let Some(job) = claim(store, LONG).await {
        kinds.push((job.document_id.clone(), job.kind));
    }
    kinds.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        kinds,
        [
            (old.id.clone(), JobKind::Delete),
            (again.id.clone(), JobKind::Index)
        ]
    );
    // Once the old copy is gone, the new one is the one a third upload finds.
    store.remove_doc(&old.id).await.unwrap();
    assert!(store.doc_by_id(&old.id).await.unwrap().is_none());
    match insert(store, &doc(&k.id, "same")).await {
        Inserted::Existing(d) => assert_eq!(d.id, again.id),
        other => panic!("expected the new copy, got {other:?}"),
    }
}

async fn leases_exclude_other_workers_until_they_expire(open: Open<'_>, name: &str) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    insert(store, &doc(&k.id, "x")).await;
    assert_eq!(store.backlog().await.unwrap().0, 1);
    let job = claim(store, 300).await.unwrap();
    assert_eq!(job.attempts, 1);
    assert_eq!(store.backlog().await.unwrap(), (0, None));
    assert!(
        claim(store, LONG).await.is_none(),
        "leased job must not be claimed twice"
    );
    let wait = store
        .next_job_in()
        .await
        .unwrap()
        .expect("a job is waiting");
    assert!((1..=300).contains(&wait), "{wait} ms");
    // A crashed worker: its lease expires and the job is claimed again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(store.next_job_in().await.unwrap(), Some(0));
    let again = claim(store, LONG).await.unwrap();
    assert_eq!(again.attempts, 2);
    // The stale worker's completion does nothing.
    store.complete_job(&job).await.unwrap();
    assert!(!store.renew_lease(&job, 1000).await.unwrap());
    assert!(store.renew_lease(&again, 1000).await.unwrap());
    store.complete_job(&again).await.unwrap();
    assert_eq!(store.next_job_in().await.unwrap(), None);
}

async fn jobs_are_claimed_oldest_first_past_leased_and_waiting_ones(open: Open<'_>, name: &str) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let mut docs = Vec::new();
    for sha in ["1", "2", "3", "4"] {
        let d = doc(&k.id, sha);
        insert(store, &d).await;
        docs.push(d.id);
        // Distinct creation times, so "oldest" is well defined.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let first = claim(store, LONG).await.unwrap();
    assert_eq!(first.document_id, docs[0]);
    let second = claim(store, LONG).await.unwrap();
    assert_eq!(
        second.document_id, docs[1],
        "the leased head was not skipped"
    );
    store
        .release_job(&second, 60_000, Release::Keep)
        .await
        .unwrap();
    let third = claim(store, LONG).await.unwrap();
    assert_eq!(third.document_id, docs[2], "a job backing off was claimed");
    assert_eq!(claim(store, LONG).await.unwrap().document_id, docs[3]);
    assert!(claim(store, LONG).await.is_none());
    // The first job is given back (its worker shuts down): it is again the oldest runnable one.
    store
        .release_job(&first, 0, Release::GiveBack { outage: false })
        .await
        .unwrap();
    assert_eq!(claim(store, LONG).await.unwrap().document_id, docs[0]);
}

async fn a_job_whose_claims_keep_expiring_is_given_up_with_its_last_step(
    open: Open<'_>,
    name: &str,
) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let poison = doc(&k.id, "poison");
    insert(store, &poison).await;
    for attempt in 1..=MAX {
        let job = claim(store, 1).await.unwrap();
        assert_eq!(job.attempts, attempt);
        store
            .set_status(&poison.id, Status::Parsing, "")
            .await
            .unwrap();
        // The worker dies here: nothing is released, the lease just runs out.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let healthy = doc(&k.id, "healthy");
    insert(store, &healthy).await;
    let next = claim(store, LONG).await.unwrap();
    assert_eq!(
        next.document_id, healthy.id,
        "the poison job is not run again"
    );
    let failed = store.doc_by_id(&poison.id).await.unwrap().unwrap();
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.attempts, MAX);
    assert_eq!(
        failed.error,
        "gave up after 3 attempts; last seen at step PARSING"
    );
    assert!(claim(store, LONG).await.is_none());
}

async fn outages_and_shutdowns_give_the_attempt_back(open: Open<'_>, name: &str) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let d = doc(&k.id, "x");
    insert(store, &d).await;
    // Far more outages than attempts allow: the job is still runnable.
    for outage in 0..(MAX * 3) {
        let job = claim(store, LONG).await.unwrap();
        assert_eq!((job.attempts, job.outages), (1, outage));
        store
            .release_job(&job, 0, Release::GiveBack { outage: true })
            .await
            .unwrap();
    }
    let job = claim(store, LONG).await.unwrap();
    store
        .release_job(&job, 0, Release::GiveBack { outage: false })
        .await
        .unwrap();
    let job = claim(store, LONG).await.unwrap();
    assert_eq!(job.attempts, 1);
    assert_eq!(store.doc_by_id(&d.id).await.unwrap().unwrap().attempts, 1);
    // A failure of the document itself counts.
    store.release_job(&job, 0, Release::Keep).await.unwrap();
    let job = claim(store, LONG).await.unwrap();
    assert_eq!(job.attempts, 2);
    // A backoff delays the next claim.
    store.release_job(&job, 400, Release::Keep).await.unwrap();
    assert!(claim(store, LONG).await.is_none(), "backing off");
    let wait = store.next_job_in().await.unwrap().unwrap();
    assert!((1..=400).contains(&wait), "{wait} ms");
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(claim(store, LONG).await.unwrap().attempts, 3);
}

async fn failed_documents_can_be_retried_without_a_new_upload(open: Open<'_>, name: &str) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let d = doc(&k.id, "x");
    insert(store, &d).await;
    assert!(matches!(
        store.retry_doc(&k.id, &d.id).await.unwrap(),
        Some(Retried::NotFailed(_))
    ));
    let job = claim(store, LONG).await.unwrap();
    store
        .set_status(&d.id, Status::Failed, "embed-svc said no")
        .await
        .unwrap();
    store.complete_job(&job).await.unwrap();
    let failed = store.get_doc(&k.id, &d.id).await.unwrap().unwrap();
    assert_eq!(
        (failed.status, failed.error.as_str()),
        (Status::Failed, "embed-svc said no")
    );
    match store.retry_doc(&k.id, &d.id).await.unwrap() {
        Some(Retried::Queued(doc)) => {
            assert_eq!((doc.status, doc.attempts), (Status::Queued, 0));
            assert!(doc.error.is_empty());
        }
        other => panic!("expected a requeue, got {other:?}"),
    }
    let stored = store.doc_by_id(&d.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.attempts), (Status::Queued, 0));
    assert_eq!(claim(store, LONG).await.unwrap().document_id, d.id);
    assert!(store.retry_doc(&k.id, "nope").await.unwrap().is_none());
    assert!(store.retry_doc("other-kb", &d.id).await.unwrap().is_none());
}

async fn delete_during_indexing_waits_for_the_lease_then_runs(open: Open<'_>, name: &str) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let d = doc(&k.id, "x");
    insert(store, &d).await;
    let index_job = claim(store, LONG).await.unwrap();
    store.mark_deleting(&d.id).await.unwrap();
    assert!(
        !store.set_status(&d.id, Status::Indexed, "").await.unwrap(),
        "deleting documents keep their status"
    );
    assert!(
        !store
            .set_chunk_count(&d.id, 4, Status::Embedding)
            .await
            .unwrap()
    );
    assert!(
        claim(store, LONG).await.is_none(),
        "delete waits for the running index job"
    );
    // The index job's worker notices at its next renewal... and its completion hands over.
    assert!(store.renew_lease(&index_job, LONG).await.unwrap());
    store.complete_job(&index_job).await.unwrap();
    let delete_job = claim(store, LONG).await.unwrap();
    assert_eq!(delete_job.kind, JobKind::Delete);
    store.remove_doc(&d.id).await.unwrap();
    assert!(claim(store, LONG).await.is_none());
    assert!(store.doc_by_id(&d.id).await.unwrap().is_none());
    // A delete also runs when nothing holds the job, and a delete can claim its own job.
    let e = doc(&k.id, "y");
    insert(store, &e).await;
    store.mark_deleting(&e.id).await.unwrap();
    let job = store
        .claim_job(LONG, u32::MAX, Some(&e.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.kind, JobKind::Delete);
    assert_eq!(
        store.doc_by_id(&e.id).await.unwrap().unwrap().status,
        Status::Deleting
    );
}

async fn a_reindex_queues_indexed_and_failed_documents_and_counts_them_down_across_reopens(
    open: Open<'_>,
    name: &str,
) {
    let store = open(name.into()).await;
    let k = kb("a");
    insert_kb(store.as_ref(), &k).await;
    let other = kb("b");
    insert_kb(store.as_ref(), &other).await;
    let mut docs = Vec::new();
    for (kb, sha) in [(&k, "1"), (&k, "2"), (&k, "3"), (&other, "4")] {
        let Inserted::New(d) = insert(store.as_ref(), &doc(&kb.id, sha)).await else {
            panic!("new document")
        };
        docs.push(d);
    }
    let [indexed, failed, queued, elsewhere] = <[Document; 4]>::try_from(docs).unwrap();
    for d in [&indexed, &failed, &elsewhere] {
        let job = store
            .claim_job(LONG, MAX, Some(&d.id))
            .await
            .unwrap()
            .unwrap();
        store.complete_job(&job).await.unwrap();
    }
    store
        .set_status(&indexed.id, Status::Indexed, "")
        .await
        .unwrap();
    store
        .set_status(&failed.id, Status::Failed, "too many chunks")
        .await
        .unwrap();
    store
        .set_status(&elsewhere.id, Status::Indexed, "")
        .await
        .unwrap();
    assert_eq!(counted(store.as_ref(), "a").await.reindex, None);

    let started = store
        .start_reindex(&k.id)
        .await
        .unwrap()
        .unwrap()
        .reindex
        .unwrap();
    // The queued document is being indexed with the current settings already.
    assert_eq!((started.total, started.remaining), (2, 2));
    assert_eq!(
        store.doc_by_id(&indexed.id).await.unwrap().unwrap().status,
        Status::Indexed
    );
    let requeued = store.doc_by_id(&failed.id).await.unwrap().unwrap();
    assert_eq!(
        (requeued.status, requeued.error.as_str()),
        (Status::Queued, "")
    );
    // Asking again while it runs changes nothing.
    assert_eq!(
        store.start_reindex(&k.id).await.unwrap().unwrap().reindex,
        Some(started)
    );

    // Reopening (a restart) keeps the progress and the jobs.
    drop(store);
    let store = open(name.into()).await;
    let store = store.as_ref();
    let mut quiet = Vec::new();
    while let Some(job) = claim(store, LONG).await {
        quiet.push((job.document_id.clone(), job.quiet));
        store.complete_job(&job).await.unwrap();
        let left = counted(store, "a").await.reindex.unwrap();
        assert_eq!(left.total, 2);
    }
    quiet.sort();
    let mut expected = vec![
        (indexed.id.clone(), true),
        (failed.id.clone(), false),
        (queued.id.clone(), false),
    ];
    expected.sort();
    assert_eq!(quiet, expected);
    let done = counted(store, "a").await.reindex.unwrap();
    assert_eq!((done.total, done.remaining), (2, 0));
    assert_eq!(counted(store, "b").await.reindex, None);
    // Once done, a new reindex starts over (only the INDEXED one: the others are QUEUED).
    let again = store
        .start_reindex(&k.id)
        .await
        .unwrap()
        .unwrap()
        .reindex
        .unwrap();
    assert_eq!(again.remaining, 1);
    assert!(store.start_reindex("no-such-kb").await.unwrap().is_none());
}

/// Knowledge base `name` of tenant "t", with its counts.
async fn counted(store: &dyn CatalogStore, name: &str) -> KnowledgeBase {
    let mut kb = store.find_kb("t", name).await.unwrap().unwrap();
    store.count_kb(&mut kb).await.unwrap();
    kb
}

async fn deleting_a_knowledge_base_removes_its_documents(open: Open<'_>, name: &str) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let keep = kb("b");
    insert_kb(store, &keep).await;
    let kept = doc(&keep.id, "1");
    insert(store, &kept).await;
    insert(store, &doc(&k.id, "1")).await;
    insert(store, &doc(&k.id, "2")).await;
    // A lookup does not count (it must stay cheap); count_kb does.
    let mut found = store.find_kb("t", "a").await.unwrap().unwrap();
    assert_eq!(found.document_count, 0);
    store.count_kb(&mut found).await.unwrap();
    assert_eq!(found.document_count, 2);
    assert_eq!(counted(store, "b").await.document_count, 1);
    assert_eq!(store.delete_kb(&k.id).await.unwrap().len(), 2);
    assert!(store.find_kb("t", "a").await.unwrap().is_none());
    assert!(store.kb_by_id(&k.id).await.unwrap().is_none());
    // Deleting again is harmless.
    assert!(store.delete_kb(&k.id).await.unwrap().is_empty());
    // Only the other knowledge base's job is left.
    let job = claim(store, LONG).await.unwrap();
    assert_eq!(job.document_id, kept.id);
    assert!(claim(store, LONG).await.is_none());
}

async fn a_job_carries_the_trace_context_of_the_call_that_queued_it(open: Open<'_>, name: &str) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    store.insert_doc(&doc(&k.id, "1"), parent).await.unwrap();
    let job = claim(store, LONG).await.unwrap();
    assert_eq!(job.trace, parent);
    assert!(!job.quiet);
}

async fn publishing_a_version_retires_the_older_ones_of_its_source_only(
    open: Open<'_>,
    name: &str,
) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let versioned = |sha: &str, source: &str| {
        let mut d = doc(&k.id, sha);
        d.source_id = source.into();
        d
    };
    let (v1, v2, other, plain) = (
        versioned("1", "guide.md"),
        versioned("2", "guide.md"),
        versioned("3", "faq.md"),
        doc(&k.id, "4"),
    );
    for d in [&v1, &v2, &other, &plain] {
        insert(store, d).await;
    }
    assert!(v2.is_newer_than(&v1) && !v1.is_newer_than(&v2));
    let ids = |docs: Vec<Document>| docs.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.other_versions(&v2).await.unwrap()),
        [v1.id.as_str()]
    );
    assert_eq!(
        ids(store.other_versions(&v1).await.unwrap()),
        [v2.id.as_str()]
    );
    assert!(store.other_versions(&other).await.unwrap().is_empty());
    assert!(store.other_versions(&plain).await.unwrap().is_empty());

    assert!(
        store
            .publish_version(&v2.id, std::slice::from_ref(&v1.id))
            .await
            .unwrap()
    );
    assert_eq!(
        store.doc_by_id(&v2.id).await.unwrap().unwrap().status,
        Status::Indexed
    );
    assert_eq!(
        store.doc_by_id(&v1.id).await.unwrap().unwrap().status,
        Status::Deleting
    );
    // v1's index job became a delete job; the others are untouched.
    let mut kinds = Vec::new();
    while let Some(job) = claim(store, LONG).await {
        kinds.push((job.document_id.clone(), job.kind));
        store.complete_job(&job).await.unwrap();
    }
    assert!(
        kinds.contains(&(v1.id.clone(), JobKind::Delete)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(other.id.clone(), JobKind::Index)),
        "{kinds:?}"
    );
    // A version being deleted is not another version any more, and cannot be published.
    assert!(store.other_versions(&v2).await.unwrap().is_empty());
    assert!(!store.publish_version(&v1.id, &[]).await.unwrap());
    // Publishing again is harmless.
    assert!(store.publish_version(&v2.id, &[]).await.unwrap());
}

async fn documents_round_trip_and_list_in_pages(open: Open<'_>, name: &str) {
    let store = open(name.into()).await;
    let store = store.as_ref();
    let k = kb("a");
    insert_kb(store, &k).await;
    let mut written = Vec::new();
    for i in 0..5 {
        let mut d = doc(&k.id, &format!("sha-{i}"));
        d.title = format!("Title {i} — ünïcode");
        d.source_name = format!("file-{i}.md");
        d.source_id = format!("docs/file-{i}.md");
        d.content_type = "text/markdown".into();
        d.size_bytes = 5_000_000_000 + i;
        d.metadata = BTreeMap::from([
            ("lang".into(), "en".into()),
            ("a.b".into(), "dotted keys survive".into()),
            ("$where".into(), "so do dollar signs".into()),
            ("nul\0key".into(), "and NUL bytes".into()),
        ]);
        insert(store, &d).await;
        written.push(d);
    }
    for d in &written {
        assert_eq!(store.get_doc(&k.id, &d.id).await.unwrap().as_ref(), Some(d));
    }
    assert!(
        store
            .get_doc("other", &written[0].id)
            .await
            .unwrap()
            .is_none()
    );
    let first = store.list_docs(&k.id, "", 2).await.unwrap();
    assert_eq!(first, written[..2]);
    let rest = store.list_docs(&k.id, &first[1].id, 10).await.unwrap();
    assert_eq!(rest, written[2..]);
    // Chunk counts: the most ever stays, for deletes.
    let id = &written[0].id;
    assert!(
        store
            .set_chunk_count(id, 7, Status::Embedding)
            .await
            .unwrap()
    );
    assert!(store.set_chunk_count(id, 3, Status::Indexed).await.unwrap());
    let d = store.doc_by_id(id).await.unwrap().unwrap();
    assert_eq!(
        (d.chunk_count, d.max_chunk_count, d.status),
        (3, 7, Status::Indexed)
    );
    // Long errors are cut to the limit.
    let long = "x".repeat(smartdb_kit::limits::ERROR_BYTES * 2);
    assert!(store.set_status(id, Status::Failed, &long).await.unwrap());
    let d = store.doc_by_id(id).await.unwrap().unwrap();
    assert!(d.error.len() <= smartdb_kit::limits::ERROR_BYTES);
    assert!(
        !store
            .set_status("missing", Status::Failed, "")
            .await
            .unwrap()
    );
    // Which originals have documents.
    let asked = vec![written[1].id.clone(), "gone".to_owned()];
    let found = store.existing_docs(&asked).await.unwrap();
    assert_eq!(found, HashSet::from([written[1].id.clone()]));
}

async fn concurrent_claims_never_hand_one_job_out_twice(open: Open<'_>, name: &str) {
    let store = open(name.into()).await;
    let k = kb("a");
    insert_kb(store.as_ref(), &k).await;
    const JOBS: usize = 20;
    for i in 0..JOBS {
        insert(store.as_ref(), &doc(&k.id, &format!("{i}"))).await;
    }
    // Four claimers on two handles (two replicas), racing for every job.
    let other = open(name.into()).await;
    let mut tasks = Vec::new();
    for handle in [store.clone(), other, store.clone(), store.clone()] {
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(job) = handle.claim_job(LONG, MAX, None).await.unwrap() {
                mine.push(job.document_id.clone());
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    let claimed = all.len();
    all.dedup();
    assert_eq!(claimed, JOBS, "every job claimed exactly once");
    assert_eq!(all.len(), JOBS);
}

async fn a_source_lock_has_one_holder_across_handles_until_freed_or_expired(
    open: Open<'_>,
    name: &str,
) {
    let a = open(name.into()).await;
    let b = open(name.into()).await;
    let k = kb("a");
    insert_kb(a.as_ref(), &k).await;
    let token = a.lock_source(&k.id, "guide.md", LONG).await.unwrap();
    let token = token.expect("a free lock is taken");
    assert_eq!(a.lock_source(&k.id, "guide.md", LONG).await.unwrap(), None);
    assert_eq!(
        b.lock_source(&k.id, "guide.md", LONG).await.unwrap(),
        None,
        "held for every replica"
    );
    // Other sources, and the same source in another knowledge base, are other locks.
    assert!(
        b.lock_source(&k.id, "faq.md", LONG)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        b.lock_source("other", "guide.md", LONG)
            .await
            .unwrap()
            .is_some()
    );
    // Only its holder frees it.
    b.unlock_source(&k.id, "guide.md", token ^ 1).await.unwrap();
    assert_eq!(b.lock_source(&k.id, "guide.md", LONG).await.unwrap(), None);
    a.unlock_source(&k.id, "guide.md", token).await.unwrap();
    let again = b.lock_source(&k.id, "guide.md", 1).await.unwrap();
    assert!(again.is_some());
    // A holder that died: its lock runs out.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let taken_over = a.lock_source(&k.id, "guide.md", LONG).await.unwrap();
    assert!(taken_over.is_some() && taken_over != again);
    // The old holder's unlock does not free the new holder's lock.
    b.unlock_source(&k.id, "guide.md", again.unwrap())
        .await
        .unwrap();
    assert_eq!(b.lock_source(&k.id, "guide.md", LONG).await.unwrap(), None);
    // Deleting the knowledge base leaves no lock behind.
    a.delete_kb(&k.id).await.unwrap();
    assert!(
        b.lock_source(&k.id, "guide.md", LONG)
            .await
            .unwrap()
            .is_some()
    );
}
