//! Search through the gateway: modes, filters and paging over the API, knowledge-base
//! isolation, and the result cache never serving an answer older than a write.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Cluster, create_kb, ingest_text};
use smartdb_proto::v1 as pb;
use tonic::Code;

async fn ingest_with(
    cluster: &Cluster,
    kb: &str,
    title: &str,
    text: &str,
    metadata: &[(&str, &str)],
) -> String {
    cluster
        .docs()
        .await
        .ingest_text(pb::IngestTextRequest {
            knowledge_base: kb.into(),
            title: title.into(),
            text: text.into(),
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wait: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap()
        .id
}

async fn run(
    cluster: &Cluster,
    request: pb::SearchRequest,
) -> Result<pb::SearchResponse, tonic::Status> {
    cluster
        .search()
        .await
        .search(request)
        .await
        .map(|r| r.into_inner())
}

fn request(kb: &str, query: &str) -> pb::SearchRequest {
    pb::SearchRequest {
        knowledge_base: kb.into(),
        query: query.into(),
        top_k: 10,
        ..Default::default()
    }
}

fn titles(response: &pb::SearchResponse) -> Vec<&str> {
    response.hits.iter().map(|h| h.title.as_str()).collect()
}

fn range(key: &str, gte: &str, lt: &str) -> pb::MetadataCondition {
    pb::MetadataCondition {
        key: key.into(),
        condition: Some(pb::metadata_condition::Condition::Range(pb::Range {
            gte: gte.into(),
            lt: lt.into(),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn modes_filters_and_pages() {
    let cluster = Cluster::start().await;
    create_kb(&cluster, "zoo").await;
    let docs = [
        (
            "Owls",
            "Owls hunt small rodents at night; their silent feathers let them strike unheard.",
            [
                ("class", "bird"),
                ("year", "2019"),
                ("seen", "2019-05-01T10:00:00Z"),
            ],
        ),
        (
            "Bats",
            "Bats find insects in the dark by echolocation, calling and listening for echoes.",
            [
                ("class", "mammal"),
                ("year", "2021"),
                ("seen", "2021-07-09"),
            ],
        ),
        (
            "Foxes",
            "Red foxes hunt at dusk and at night, pouncing on voles under the snow.",
            [
                ("class", "mammal"),
                ("year", "2023"),
                ("seen", "2023-01-15T08:30:00+01:00"),
            ],
        ),
        (
            "Eagles",
            "Eagles hunt by day, spotting prey from great heights with sharp eyes.",
            [("class", "bird"), ("year", "2022"), ("seen", "2022-03-03")],
        ),
    ];
    for (title, text, metadata) in docs {
        ingest_with(&cluster, "zoo", title, text, &metadata).await;
    }

    // Hybrid by default; the response says so.
    let hybrid = run(&cluster, request("zoo", "animals that hunt at night"))
        .await
        .unwrap();
    assert_eq!(hybrid.mode, pb::SearchMode::Hybrid as i32);
    assert!(!hybrid.degraded);
    assert_eq!(hybrid.hits.len(), 4);
    // Lexical: only chunks sharing a keyword after stemming ("echoes" finds "echoes"; "in",
    // "the" are stop words; "dark" is only in the bats' text).
    let lexical = run(
        &cluster,
        pb::SearchRequest {
            mode: pb::SearchMode::Lexical as i32,
            ..request("zoo", "echoes in the dark")
        },
    )
    .await
    .unwrap();
    assert_eq!(lexical.mode, pb::SearchMode::Lexical as i32);
    assert_eq!(titles(&lexical), ["Bats"]);
    // Dense: meaning without shared words.
    let dense = run(
        &cluster,
        pb::SearchRequest {
            mode: pb::SearchMode::Dense as i32,
            ..request("zoo", "nocturnal birds of prey")
        },
    )
    .await
    .unwrap();
    assert_eq!(dense.mode, pb::SearchMode::Dense as i32);
    assert_eq!(dense.hits[0].title, "Owls", "{:?}", titles(&dense));

    // Any-of, numeric and time ranges, inside every mode.
    for mode in [
        pb::SearchMode::Hybrid,
        pb::SearchMode::Dense,
        pb::SearchMode::Lexical,
    ] {
        let filtered = run(
            &cluster,
            pb::SearchRequest {
                mode: mode as i32,
                conditions: vec![
                    pb::MetadataCondition {
                        key: "class".into(),
                        condition: Some(pb::metadata_condition::Condition::AnyOf(pb::AnyOf {
                            values: vec!["mammal".into(), "reptile".into()],
                        })),
                    },
                    range("year", "2020", "2023"),
                ],
                ..request("zoo", "hunt insects at night")
            },
        )
        .await
        .unwrap();
        assert_eq!(titles(&filtered), ["Bats"], "{mode:?}");
        let since = run(
            &cluster,
            pb::SearchRequest {
                mode: mode as i32,
                conditions: vec![range("seen", "2022-01-01", "2023-01-15T07:31:00Z")],
                ..request("zoo", "hunt")
            },
        )
        .await
        .unwrap();
        let mut got = titles(&since);
        got.sort();
        assert_eq!(got, ["Eagles", "Foxes"], "{mode:?}: foxes were seen 07:30Z");
    }
    // A bad condition names its field.
    let err = run(
        &cluster,
        pb::SearchRequest {
            conditions: vec![range("year", "twenty", "")],
            ..request("zoo", "owls")
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("conditions[0].range.gte"),
        "{err:?}"
    );

    // A score threshold (hybrid: on the fused score).
    let all = run(&cluster, request("zoo", "owls hunting at night"))
        .await
        .unwrap();
    let cut = (all.hits[0].score + all.hits[1].score) / 2.0;
    let top = run(
        &cluster,
        pb::SearchRequest {
            min_score: Some(cut),
            ..request("zoo", "owls hunting at night")
        },
    )
    .await
    .unwrap();
    assert_eq!(top.hits.len(), 1);

    // Pages of 2 cover the 4 documents once each, in the order of one full page.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = run(
            &cluster,
            pb::SearchRequest {
                top_k: 2,
                page_token: token.clone(),
                ..request("zoo", "hunting animals")
            },
        )
        .await
        .unwrap();
        seen.extend(page.hits.iter().map(|h| h.title.clone()));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let full = run(
        &cluster,
        pb::SearchRequest {
            top_k: 4,
            ..request("zoo", "hunting animals")
        },
    )
    .await
    .unwrap();
    assert_eq!(seen, titles(&full));
    let err = run(
        &cluster,
        pb::SearchRequest {
            page_token: "2.0000000000000000".into(),
            ..request("zoo", "hunting animals")
        },
    )
    .await
    .unwrap_err();
    assert!(err.message().starts_with("page_token"), "{err:?}");
}

/// A query never returns a chunk of another knowledge base, even with identical text.
#[tokio::test(flavor = "multi_thread")]
async fn knowledge_bases_are_isolated() {
    let cluster = Cluster::start().await;
    create_kb(&cluster, "left").await;
    create_kb(&cluster, "right").await;
    let text = "The quarterly budget review is on Thursday in room 4.";
    let left = ingest_with(&cluster, "left", "memo", text, &[]).await;
    let right = ingest_with(&cluster, "right", "memo", text, &[]).await;
    assert_ne!(left, right);
    for mode in [
        pb::SearchMode::Hybrid,
        pb::SearchMode::Dense,
        pb::SearchMode::Lexical,
    ] {
        for (kb, own) in [("left", &left), ("right", &right)] {
            let found = run(
                &cluster,
                pb::SearchRequest {
                    mode: mode as i32,
                    ..request(kb, "budget review Thursday")
                },
            )
            .await
            .unwrap();
            assert_eq!(found.hits.len(), 1, "{kb} {mode:?}: {found:?}");
            assert_eq!(&found.hits[0].document_id, own, "{kb} {mode:?}");
        }
    }
}

/// Search, write, search: the second search sees the write, every time, with writers and
/// readers running concurrently (the cache key carries the knowledge base's version).
#[tokio::test(flavor = "multi_thread")]
async fn the_cache_never_hides_a_write() {
    cache_never_hides_a_write(&[]).await;
}

/// The same with the Redis level on (the machine's Redis; keys are per knowledge-base id).
#[tokio::test(flavor = "multi_thread")]
async fn the_redis_cache_never_hides_a_write() {
    cache_never_hides_a_write(&[("SMARTDB_REDIS_URL", "redis://127.0.0.1:6379")]).await;
}

async fn cache_never_hides_a_write(env: &[(&str, &str)]) {
    let cluster = Cluster::start_with_env(env).await;
    create_kb(&cluster, "notes").await;
    ingest_text(
        &cluster,
        "notes",
        "Seed note about gardening and tomatoes.",
        true,
    )
    .await
    .unwrap();
    let writers = (0..2)
        .map(|w| {
            let (gateway, key) = (cluster.gateway.clone(), cluster.admin_key.clone());
            tokio::spawn(async move {
                let channel = common::gateway_channel(&gateway, Some(&key)).await;
                let mut docs =
                    pb::document_service_client::DocumentServiceClient::new(channel.clone());
                let mut search = pb::search_service_client::SearchServiceClient::new(channel);
                for i in 0..6 {
                    let marker = format!("zebra{w}x{i}");
                    // Cached before the write (same query), then written, then searched again.
                    let query = pb::SearchRequest {
                        mode: pb::SearchMode::Lexical as i32,
                        ..request("notes", &marker)
                    };
                    let before = search.search(query.clone()).await.unwrap().into_inner();
                    assert!(before.hits.iter().all(|h| !h.text.contains(&marker)));
                    docs.ingest_text(pb::IngestTextRequest {
                        knowledge_base: "notes".into(),
                        text: format!("Note {marker}: the {marker} crossed the road."),
                        wait: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                    let after = search.search(query).await.unwrap().into_inner();
                    assert!(
                        after.hits.iter().any(|h| h.text.contains(&marker)),
                        "{marker} written but not found: cached={} {:?}",
                        after.cached,
                        after.hits
                    );
                }
            })
        })
        .collect::<Vec<_>>();
    let readers = (0..2)
        .map(|_| {
            let (gateway, key) = (cluster.gateway.clone(), cluster.admin_key.clone());
            tokio::spawn(async move {
                let channel = common::gateway_channel(&gateway, Some(&key)).await;
                let mut search = pb::search_service_client::SearchServiceClient::new(channel);
                let mut cached = 0;
                let mut counts = HashSet::new();
                for _ in 0..60 {
                    let r = search
                        .search(request("notes", "notes about animals crossing"))
                        .await
                        .unwrap()
                        .into_inner();
                    cached += usize::from(r.cached);
                    let ids: Vec<String> = r.hits.iter().map(|h| h.document_id.clone()).collect();
                    counts.insert(ids);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (cached, counts)
            })
        })
        .collect::<Vec<_>>();
    for writer in writers {
        writer.await.unwrap();
    }
    for reader in readers {
        let (cached, counts) = reader.await.unwrap();
        assert!(
            cached > 0,
            "repeated queries between writes come from the cache"
        );
        assert!(
            counts.len() > 1,
            "readers saw the knowledge base grow: {counts:?}"
        );
    }
    if !env.is_empty() {
        // The Redis level was really asked (every memory miss goes there).
        let metrics = common::http_get(&cluster.service("search-svc").http, "/metrics").await;
        let redis_lookups: f64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("search_cache_lookups_total") && l.contains("level=\"redis\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(redis_lookups > 0.0, "{metrics}");
        assert!(
            !metrics.contains("search_cache_errors_total"),
            "Redis failed: {metrics}"
        );
    }
}
