//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, every service exports its spans over OTLP/gRPC
//! to a receiver run here (the official `opentelemetry-proto` service, served by tonic), and one
//! search and one ingested document each arrive as one trace across the services involved, with
//! every parent link pointing at a span of the same trace.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Cluster;
use common::otlp::{Receiver, Span, show};
use smartdb_proto::v1 as pb;

/// The one root of `trace`: the gateway's span of `rpc`.
fn assert_rooted_at_gateway(trace: &[Span], rpc: &str) {
    let roots: Vec<&Span> = trace.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root:\n{}", show(trace));
    assert_eq!(roots[0].service, "gateway", "{}", show(trace));
    assert_eq!(roots[0].name, rpc, "{}", show(trace));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_search_and_an_ingested_document_are_each_one_trace_across_the_services() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let cluster = Cluster::start_with_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        // The shared cache level, whose lookups are network calls with spans of their own.
        ("SMARTDB_REDIS_URL", "redis://127.0.0.1:6379/"),
        // Send spans soon, not every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ])
    .await;
    common::create_kb(&cluster, "notes").await;

    // The document: the upload returns at once; its job runs later in an ingest-svc worker,
    // and still belongs to the upload's trace.
    let queued = common::ingest_text(
        &cluster,
        "notes",
        "The tides follow the moon. Spring tides come at full and new moon.",
        false,
    )
    .await
    .unwrap();
    let id = queued.document.unwrap().id;
    common::wait_for_status(
        &cluster,
        "notes",
        &id,
        pb::DocumentStatus::Indexed,
        Duration::from_secs(60),
    )
    .await;
    let ingest = receiver
        .whole_trace(
            "ingest-svc",
            "Index job",
            &["gateway", "ingest-svc", "embed-svc", "search-svc"],
        )
        .await;
    println!("ingest trace:\n{}", show(&ingest));
    assert_rooted_at_gateway(&ingest, "smartdb.v1.DocumentService/IngestText");
    let names: BTreeSet<&str> = ingest.iter().map(|s| s.name.as_str()).collect();
    for stage in ["parse", "chunk", "embed"] {
        assert!(names.contains(stage), "stage {stage}: {names:?}");
    }
    let job = ingest.iter().find(|s| s.name == "Index job").unwrap();
    let upload = ingest
        .iter()
        .find(|s| s.span_id == job.parent)
        .expect("the job's parent is in the trace");
    assert_eq!(
        (upload.service.as_str(), upload.name.as_str()),
        ("ingest-svc", "smartdb.v1.DocumentService/IngestText"),
        "the job is a child of ingest-svc's span of the call that queued it"
    );

    // A search that misses the cache: the gateway, search-svc (its Redis cache level, the
    // engine), and embed-svc for the query's embedding.
    common::search(&cluster, "notes", "when are spring tides")
        .await
        .unwrap();
    let search = receiver
        .whole_trace(
            "search-svc",
            "engine search",
            &["gateway", "search-svc", "embed-svc"],
        )
        .await;
    println!("search trace:\n{}", show(&search));
    assert_rooted_at_gateway(&search, "smartdb.v1.SearchService/Search");
    let names: BTreeSet<&str> = search.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains("cache lookup"), "{names:?}");

    // Log lines carry the trace id (and the request id) of the work they are about.
    let log = cluster.log();
    assert!(
        log.contains(&format!("trace_id={}", job.trace_id)),
        "the job's log lines name its trace {}: {}",
        job.trace_id,
        log.lines()
            .filter(|l| l.contains("indexed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(log.contains("request_id="), "log lines name the request");
}
