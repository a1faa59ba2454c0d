//! Conformance suite: the behaviour every [`VectorIndex`] implementation must show.
//!
//! Each case is an async fn taking `&dyn VectorIndex`; `vector_index_conformance!` turns them all
//! into `#[tokio::test]`s for one implementation. Cases use fresh random collection ids and tenants
//! and delete what they create, so they can share one index (e.g. a real Qdrant server) and run
//! in parallel. In an implementation's test module:
//!
//! ```ignore
//! async fn fresh_index() -> (MyIndex, Guard) { /* a new index, plus whatever must outlive it */ }
//! mod conformance {
//!     vector_index_conformance!(super::fresh_index);
//! }
//! ```
//!
//! Besides the trait docs, the cases pin down: error field names (`dimension`, `knowledge_base`,
//! `points`), scores as cosine similarity, metadata keys of any characters, and `top_k == 0` or an
//! empty batch being a no-op.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::{
    ChunkPayload, CollectionInfo, IndexPoint, LegQuery, MetadataRange, QueryVector, RangeKind,
    ScoredChunk, ScoredId, SearchFilter, VectorIndex, parse_typed, point_id,
};
use crate::lexical::{Analyzer, Bm25Settings};
use crate::{Error, Result};

/// Instantiates every conformance case as a `#[tokio::test]`.
///
/// `$factory` is an async fn returning `(index, guard)`; the guard (e.g. a temp dir) is kept alive
/// for the duration of the test. Attributes after it are put on every case, e.g.
/// `#[cfg_attr(not(some_cfg), ignore = "why")]` for a backend that needs a server. A new case
/// must be added to the list below to run.
macro_rules! vector_index_conformance {
    ($factory:path $(, #[$attr:meta])* $(,)?) => {
        vector_index_conformance!(@cases $factory; [$(#[$attr])*];
            create_is_idempotent,
            orphans_are_reused_or_replaced,
            create_rejects_zero_dimension,
            resolve_by_tenant_and_name,
            search_returns_nearest_first,
            ids_then_payloads_equal_search,
            upsert_same_id_replaces,
            wrong_dimension_is_rejected,
            delete_points_removes_exactly_those,
            metadata_filter,
            document_ids_filter,
            hidden_documents_are_left_out_and_swapped_at_once,
            unknown_collection_is_not_found,
            delete_collection_removes_everything,
            tenants_are_isolated,
            empty_inputs,
            lexical_ranks_by_bm25_with_collection_idf,
            lexical_follows_deletes,
            any_of_and_range_filters,
            min_score_threshold,
        );
    };
    // One case at a time: the attributes repeat at another depth than the case names.
    (@cases $factory:path; [$($attr:tt)*]; $case:ident, $($rest:ident,)*) => {
        #[tokio::test]
        $($attr)*
        async fn $case() {
            let (index, _guard) = $factory().await;
            $crate::index::conformance::$case(&index).await;
        }
        vector_index_conformance!(@cases $factory; [$($attr)*]; $($rest,)*);
    };
    (@cases $factory:path; [$($attr:tt)*];) => {};
}

const DIM: u32 = 4;

/// The analyzer search-svc uses (the suite checks the engine's side of BM25: IDF, filters).
fn analyzer() -> &'static Analyzer {
    static ANALYZER: std::sync::OnceLock<Analyzer> = std::sync::OnceLock::new();
    ANALYZER.get_or_init(|| Analyzer::new(Bm25Settings::default()).expect("analyzer"))
}

/// A chunk with real text (for the lexical leg) and an arbitrary vector.
fn text_chunk(document_id: &str, text: &str, metadata: &[(&str, &str)]) -> IndexPoint {
    let mut point = chunk(document_id, 0, [0.5, 0.5, 0.5, 0.5], metadata);
    point.payload.text = text.into();
    point.payload.title = String::new();
    point.sparse = analyzer().document("", &[], text);
    point
}

async fn lexical(
    index: &dyn VectorIndex,
    collection_id: &str,
    query: &str,
    filter: SearchFilter,
    min_score: Option<f32>,
) -> Vec<ScoredChunk> {
    index
        .search(
            collection_id,
            LegQuery {
                vector: QueryVector::Sparse(analyzer().query(query)),
                limit: 10,
                filter,
                min_score,
            },
        )
        .await
        .expect("lexical search")
}

fn docs_of(hits: &[ScoredChunk]) -> Vec<&str> {
    hits.iter()
        .map(|h| h.payload.document_id.as_str())
        .collect()
}

/// A collection description with a fresh id and a fresh tenant.
fn fresh_info() -> CollectionInfo {
    CollectionInfo {
        id: Uuid::new_v4().to_string(),
        tenant: format!("tenant-{}", Uuid::new_v4()),
        name: "handbook".into(),
        dimension: DIM,
        embedding_model: "test-model".into(),
        ..Default::default()
    }
}

/// Creates a fresh collection and returns its description.
async fn create(index: &dyn VectorIndex) -> CollectionInfo {
    let info = fresh_info();
    index
        .create_collection(info.clone())
        .await
        .expect("create collection");
    info
}

fn text_len(document_id: &str, chunk_index: u32) -> u64 {
    format!("text of {document_id}/{chunk_index}").len() as u64
}

/// A chunk of `document_id` with the given vector and metadata.
fn chunk(
    document_id: &str,
    chunk_index: u32,
    vector: [f32; 4],
    metadata: &[(&str, &str)],
) -> IndexPoint {
    let text = format!("text of {document_id}/{chunk_index}");
    let title = format!("title of {document_id}");
    // Only some chunks sit under a heading: both kinds of payload must round-trip.
    let heading_path = match chunk_index {
        0 => Vec::new(),
        _ => vec!["Part".to_owned(), format!("Section {chunk_index}")],
    };
    let start_offset = u64::from(chunk_index) * 100;
    IndexPoint {
        id: point_id(document_id, chunk_index),
        vector: vector.to_vec(),
        sparse: analyzer().document(&title, &heading_path, &text),
        payload: ChunkPayload {
            document_id: document_id.into(),
            chunk_index,
            text,
            title,
            source_name: format!("{document_id}.md"),
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            heading_path,
            start_offset,
            end_offset: start_offset + text_len(document_id, chunk_index),
            page_start: chunk_index + 1,
            page_end: chunk_index + 2,
        },
    }
}

/// Four chunks around the first two axes; for the query `[1, 0.2, 0, 0]` the nearest-first
/// order is a/0, c/0, a/1, b/0.
fn sample_points() -> Vec<IndexPoint> {
    vec![
        chunk(
            "doc-a",
            0,
            [1.0, 0.0, 0.0, 0.0],
            &[("lang", "en"), ("team", "core")],
        ),
        chunk(
            "doc-a",
            1,
            [0.0, 1.0, 0.0, 0.0],
            &[("lang", "en"), ("team", "ops")],
        ),
        chunk(
            "doc-b",
            0,
            [0.0, 0.0, 1.0, 0.0],
            &[("lang", "de"), ("team", "core")],
        ),
        chunk("doc-c", 0, [0.7, 0.7, 0.0, 0.0], &[("lang", "de")]),
    ]
}

const SAMPLE_QUERY: [f32; 4] = [1.0, 0.2, 0.0, 0.0];

async fn search(
    index: &dyn VectorIndex,
    collection_id: &str,
    vector: [f32; 4],
    top_k: usize,
    filter: SearchFilter,
) -> Vec<ScoredChunk> {
    index
        .search(
            collection_id,
            LegQuery {
                vector: QueryVector::Dense(vector.to_vec()),
                limit: top_k,
                filter,
                min_score: None,
            },
        )
        .await
        .expect("search")
}

fn ids(hits: &[ScoredChunk]) -> Vec<Uuid> {
    hits.iter().map(|h| h.id).collect()
}

fn metadata_filter_of(pairs: &[(&str, &str)]) -> SearchFilter {
    SearchFilter {
        metadata: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..SearchFilter::default()
    }
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T>, expected_field: &str) {
    match result {
        Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, expected_field),
        other => panic!("expected InvalidArgument({expected_field}), got {other:?}"),
    }
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(result: Result<T>) {
    assert!(
        matches!(result, Err(Error::NotFound(_))),
        "expected NotFound, got {result:?}"
    );
}

/// Creating the same collection twice is fine; reusing its id with other settings is not.
pub(crate) async fn create_is_idempotent(index: &dyn VectorIndex) {
    let info = create(index).await;
    index
        .create_collection(info.clone())
        .await
        .expect("second create");
    assert_eq!(
        index.resolve(&info.tenant, &info.name).await.unwrap(),
        Some(info.clone())
    );
    assert_eq!(index.count(&info.id).await.unwrap(), 0);

    let other_dimension = CollectionInfo {
        dimension: DIM + 1,
        ..info.clone()
    };
    assert_invalid(
        index.create_collection(other_dimension).await,
        "knowledge_base",
    );
    let other_name = CollectionInfo {
        name: "other".into(),
        ..info.clone()
    };
    assert_invalid(index.create_collection(other_name).await, "knowledge_base");
    assert_eq!(
        index.resolve(&info.tenant, &info.name).await.unwrap(),
        Some(info.clone())
    );

    index.delete_collection(&info.id).await.unwrap();
}

/// A (tenant, name) pair maps to one collection. A create of the same name under another id
/// finds an orphan (left by an interrupted create): reused when it is empty with the same
/// settings, replaced otherwise.
pub(crate) async fn orphans_are_reused_or_replaced(index: &dyn VectorIndex) {
    let first = create(index).await;
    let second = CollectionInfo {
        id: Uuid::new_v4().to_string(),
        ..first.clone()
    };
    assert_eq!(
        index.create_collection(second.clone()).await.unwrap(),
        first.id,
        "an empty orphan with the same settings is reused"
    );
    assert_eq!(
        index.resolve(&first.tenant, &first.name).await.unwrap(),
        Some(first.clone())
    );
    assert_not_found(index.count(&second.id).await);

    // An orphan holding points is not handed to a new knowledge base: it is replaced.
    index
        .upsert(
            &first.id,
            vec![chunk("stale", 0, [1.0, 0.0, 0.0, 0.0], &[])],
        )
        .await
        .unwrap();
    assert_eq!(
        index.create_collection(second.clone()).await.unwrap(),
        second.id
    );
    assert_eq!(
        index.resolve(&second.tenant, &second.name).await.unwrap(),
        Some(second.clone())
    );
    assert_not_found(index.count(&first.id).await);
    assert_eq!(index.count(&second.id).await.unwrap(), 0);

    // So is one with other settings.
    let third = CollectionInfo {
        id: Uuid::new_v4().to_string(),
        dimension: DIM + 1,
        ..second.clone()
    };
    assert_eq!(
        index.create_collection(third.clone()).await.unwrap(),
        third.id
    );
    assert_not_found(index.count(&second.id).await);

    index.delete_collection(&third.id).await.unwrap();
    assert_eq!(
        index.resolve(&third.tenant, &third.name).await.unwrap(),
        None
    );
}

/// A collection without dimensions is refused and leaves nothing behind.
pub(crate) async fn create_rejects_zero_dimension(index: &dyn VectorIndex) {
    let info = CollectionInfo {
        dimension: 0,
        ..fresh_info()
    };
    assert_invalid(index.create_collection(info.clone()).await, "dimension");
    assert_eq!(index.resolve(&info.tenant, &info.name).await.unwrap(), None);
}

/// Resolution needs the exact tenant and name.
pub(crate) async fn resolve_by_tenant_and_name(index: &dyn VectorIndex) {
    let info = create(index).await;
    assert_eq!(
        index.resolve(&info.tenant, &info.name).await.unwrap(),
        Some(info.clone())
    );
    assert_eq!(
        index
            .resolve("some-other-tenant", &info.name)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        index
            .resolve(&info.tenant, "some-other-name")
            .await
            .unwrap(),
        None
    );
    index.delete_collection(&info.id).await.unwrap();
}

/// Hits come nearest first, scored by cosine similarity, with their payload.
pub(crate) async fn search_returns_nearest_first(index: &dyn VectorIndex) {
    let info = create(index).await;
    let points = sample_points();
    let expected: BTreeMap<Uuid, ChunkPayload> =
        points.iter().map(|p| (p.id, p.payload.clone())).collect();
    assert_eq!(index.upsert(&info.id, points).await.unwrap(), 4);
    assert_eq!(index.count(&info.id).await.unwrap(), 4);

    let hits = search(index, &info.id, SAMPLE_QUERY, 10, SearchFilter::default()).await;
    let order = [
        point_id("doc-a", 0),
        point_id("doc-c", 0),
        point_id("doc-a", 1),
        point_id("doc-b", 0),
    ];
    assert_eq!(ids(&hits), order);
    for hit in &hits {
        assert_eq!(hit.payload, expected[&hit.id]);
    }
    // Cosine similarity: 1/|q|, (0.7 + 0.14)/(|q| * 0.98995), 0.2/|q|, 0.
    let q_norm = (1.0f32 + 0.04).sqrt();
    let want = [1.0 / q_norm, 0.84 / (q_norm * 0.98995), 0.2 / q_norm, 0.0];
    for (hit, want) in hits.iter().zip(want) {
        assert!(
            (hit.score - want).abs() < 1e-3,
            "score {} != {want}",
            hit.score
        );
    }

    // Scaling the query changes nothing, an exact match scores 1 and its opposite -1.
    let scaled = search(
        index,
        &info.id,
        SAMPLE_QUERY.map(|x| x * 7.5),
        10,
        SearchFilter::default(),
    )
    .await;
    assert_eq!(ids(&scaled), order);
    let exact = search(
        index,
        &info.id,
        [0.0, 0.0, 2.0, 0.0],
        1,
        SearchFilter::default(),
    )
    .await;
    assert_eq!(ids(&exact), [point_id("doc-b", 0)]);
    assert!((exact[0].score - 1.0).abs() < 1e-4);
    let opposite = search(
        index,
        &info.id,
        [-1.0, 0.0, 0.0, 0.0],
        10,
        SearchFilter::default(),
    )
    .await;
    assert_eq!(opposite.last().unwrap().id, point_id("doc-a", 0));
    assert!((opposite.last().unwrap().score + 1.0).abs() < 1e-4);

    let top2 = search(index, &info.id, SAMPLE_QUERY, 2, SearchFilter::default()).await;
    assert_eq!(ids(&top2), order[..2]);

    index.delete_collection(&info.id).await.unwrap();
}

/// `search_ids` ranks and scores exactly as `search`, dense and lexical, with filters and
/// thresholds; `payloads` then returns each asked point's payload in the order asked, leaving
/// out points that do not exist (deleted since they were ranked).
pub(crate) async fn ids_then_payloads_equal_search(index: &dyn VectorIndex) {
    let info = create(index).await;
    let mut points = sample_points();
    points.push(text_chunk("doc-t", "owls hunt at night", &[]));
    points.push(text_chunk("doc-u", "night owls and morning larks", &[]));
    let expected: BTreeMap<Uuid, ChunkPayload> =
        points.iter().map(|p| (p.id, p.payload.clone())).collect();
    index.upsert(&info.id, points).await.unwrap();

    let queries = [
        (
            QueryVector::Dense(SAMPLE_QUERY.to_vec()),
            None,
            SearchFilter::default(),
        ),
        (
            QueryVector::Dense(SAMPLE_QUERY.to_vec()),
            Some(0.1),
            SearchFilter::default(),
        ),
        (
            QueryVector::Dense(SAMPLE_QUERY.to_vec()),
            None,
            metadata_filter_of(&[("lang", "de")]),
        ),
        (
            QueryVector::Sparse(analyzer().query("night owls")),
            None,
            SearchFilter::default(),
        ),
    ];
    for (vector, min_score, filter) in queries {
        let query = LegQuery {
            vector,
            limit: 10,
            filter,
            min_score,
        };
        let full = index.search(&info.id, query.clone()).await.unwrap();
        let bare = index.search_ids(&info.id, query).await.unwrap();
        assert!(!full.is_empty());
        assert_eq!(
            bare,
            full.iter()
                .map(|h| ScoredId {
                    id: h.id,
                    score: h.score
                })
                .collect::<Vec<_>>()
        );
    }

    let gone = point_id("doc-gone", 0);
    let asked = vec![
        point_id("doc-t", 0),
        point_id("doc-a", 1),
        gone,
        point_id("doc-a", 0),
    ];
    let payloads = index.payloads(&info.id, asked).await.unwrap();
    let order: Vec<Uuid> = payloads.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        order,
        [
            point_id("doc-t", 0),
            point_id("doc-a", 1),
            point_id("doc-a", 0)
        ]
    );
    for (id, payload) in &payloads {
        assert_eq!(payload, &expected[id]);
    }
    assert!(index.payloads(&info.id, vec![]).await.unwrap().is_empty());
    index.delete_collection(&info.id).await.unwrap();
}

/// Writing an existing id replaces the point instead of adding one.
pub(crate) async fn upsert_same_id_replaces(index: &dyn VectorIndex) {
    let info = create(index).await;
    index
        .upsert(&info.id, vec![chunk("doc-a", 0, [1.0, 0.0, 0.0, 0.0], &[])])
        .await
        .unwrap();
    let mut replacement = chunk("doc-a", 0, [0.0, 1.0, 0.0, 0.0], &[("rev", "2")]);
    replacement.payload.text = "rewritten".into();
    index
        .upsert(&info.id, vec![replacement.clone()])
        .await
        .unwrap();
    assert_eq!(index.count(&info.id).await.unwrap(), 1);

    let hits = search(
        index,
        &info.id,
        [0.0, 1.0, 0.0, 0.0],
        10,
        SearchFilter::default(),
    )
    .await;
    assert_eq!(ids(&hits), [replacement.id]);
    assert_eq!(hits[0].payload, replacement.payload);
    assert!(
        (hits[0].score - 1.0).abs() < 1e-4,
        "the new vector is the one searched"
    );

    index.delete_collection(&info.id).await.unwrap();
}

/// Vectors of the wrong length are refused, and nothing of the batch is written.
pub(crate) async fn wrong_dimension_is_rejected(index: &dyn VectorIndex) {
    let info = create(index).await;
    let mut points = sample_points();
    points[2].vector.pop();
    assert_invalid(index.upsert(&info.id, points).await, "points");
    let mut too_long = chunk("doc-z", 0, [1.0, 0.0, 0.0, 0.0], &[]);
    too_long.vector.push(1.0);
    assert_invalid(index.upsert(&info.id, vec![too_long]).await, "points");
    assert_eq!(index.count(&info.id).await.unwrap(), 0);

    let query = LegQuery {
        vector: QueryVector::Dense(vec![1.0, 0.0]),
        limit: 3,
        filter: SearchFilter::default(),
        min_score: None,
    };
    assert!(
        matches!(
            index.search(&info.id, query).await,
            Err(Error::InvalidArgument { .. })
        ),
        "a query of the wrong length is invalid",
    );

    index.delete_collection(&info.id).await.unwrap();
}

/// Deleting points removes exactly those; unknown ids are ignored.
pub(crate) async fn delete_points_removes_exactly_those(index: &dyn VectorIndex) {
    let info = create(index).await;
    index.upsert(&info.id, sample_points()).await.unwrap();
    let gone = [point_id("doc-a", 0), point_id("doc-b", 0)];
    let mut to_delete = gone.to_vec();
    to_delete.push(point_id("doc-never-written", 0));
    index.delete_points(&info.id, to_delete).await.unwrap();
    assert_eq!(index.count(&info.id).await.unwrap(), 2);

    let hits = search(index, &info.id, SAMPLE_QUERY, 10, SearchFilter::default()).await;
    assert_eq!(ids(&hits), [point_id("doc-c", 0), point_id("doc-a", 1)]);

    // Deleting again is harmless.
    index.delete_points(&info.id, gone.to_vec()).await.unwrap();
    assert_eq!(index.count(&info.id).await.unwrap(), 2);

    index.delete_collection(&info.id).await.unwrap();
}

/// Every metadata entry of the filter must match exactly.
pub(crate) async fn metadata_filter(index: &dyn VectorIndex) {
    let info = create(index).await;
    index.upsert(&info.id, sample_points()).await.unwrap();

    let de = search(
        index,
        &info.id,
        SAMPLE_QUERY,
        10,
        metadata_filter_of(&[("lang", "de")]),
    )
    .await;
    assert_eq!(ids(&de), [point_id("doc-c", 0), point_id("doc-b", 0)]);
    for hit in &de {
        assert_eq!(hit.payload.metadata["lang"], "de");
    }

    let both = metadata_filter_of(&[("lang", "en"), ("team", "ops")]);
    assert_eq!(
        ids(&search(index, &info.id, SAMPLE_QUERY, 10, both).await),
        [point_id("doc-a", 1)]
    );

    // top_k applies after filtering.
    let core = search(
        index,
        &info.id,
        SAMPLE_QUERY,
        1,
        metadata_filter_of(&[("team", "core")]),
    )
    .await;
    assert_eq!(ids(&core), [point_id("doc-a", 0)]);

    for no_match in [
        &[("lang", "fr")][..],
        &[("missing-key", "en")],
        &[("lang", "EN")],
    ] {
        let hits = search(
            index,
            &info.id,
            SAMPLE_QUERY,
            10,
            metadata_filter_of(no_match),
        )
        .await;
        assert!(hits.is_empty(), "{no_match:?} matched {hits:?}");
    }

    // Any key works, even one that is no valid path in a JSON query language.
    let odd_key = r#"x.y [z] "q" \ ="#;
    index
        .upsert(
            &info.id,
            vec![chunk("doc-d", 0, [0.0, 0.0, 0.0, 1.0], &[(odd_key, "v")])],
        )
        .await
        .unwrap();
    let hits = search(
        index,
        &info.id,
        SAMPLE_QUERY,
        10,
        metadata_filter_of(&[(odd_key, "v")]),
    )
    .await;
    assert_eq!(ids(&hits), [point_id("doc-d", 0)]);

    index.delete_collection(&info.id).await.unwrap();
}

/// A non-empty document list restricts hits to those documents, and combines with metadata.
pub(crate) async fn document_ids_filter(index: &dyn VectorIndex) {
    let info = create(index).await;
    index.upsert(&info.id, sample_points()).await.unwrap();

    let docs = |ids: &[&str]| SearchFilter {
        document_ids: ids.iter().map(|s| s.to_string()).collect(),
        ..SearchFilter::default()
    };
    let hits = search(index, &info.id, SAMPLE_QUERY, 10, docs(&["doc-a", "doc-b"])).await;
    assert_eq!(
        ids(&hits),
        [
            point_id("doc-a", 0),
            point_id("doc-a", 1),
            point_id("doc-b", 0)
        ]
    );
    let hits = search(index, &info.id, SAMPLE_QUERY, 10, docs(&["doc-c"])).await;
    assert_eq!(ids(&hits), [point_id("doc-c", 0)]);
    assert!(
        search(index, &info.id, SAMPLE_QUERY, 10, docs(&["doc-x"]))
            .await
            .is_empty()
    );

    let mut combined = docs(&["doc-a", "doc-b"]);
    combined.metadata.insert("team".into(), "core".into());
    let hits = search(index, &info.id, SAMPLE_QUERY, 10, combined).await;
    assert_eq!(ids(&hits), [point_id("doc-a", 0), point_id("doc-b", 0)]);

    index.delete_collection(&info.id).await.unwrap();
}

/// Hidden documents: kept with the collection (resolve returns them, in one set), changed in
/// one step, left out by the exclusion filter in both legs, and combined with other filters.
pub(crate) async fn hidden_documents_are_left_out_and_swapped_at_once(index: &dyn VectorIndex) {
    let info = create(index).await;
    let mut points = sample_points();
    points.push(text_chunk("doc-text", "quarterly revenue report", &[]));
    index.upsert(&info.id, points).await.unwrap();
    let strings = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let hidden_now = || async {
        index
            .resolve(&info.tenant, &info.name)
            .await
            .unwrap()
            .expect("resolves")
            .hidden_documents
            .into_iter()
            .collect::<Vec<_>>()
    };
    assert!(hidden_now().await.is_empty(), "none hidden at first");

    // Stage "doc-b" (a new version being written) next to what is served.
    let hidden = index
        .update_hidden(&info.id, strings(&["doc-b"]), vec![])
        .await
        .unwrap();
    assert_eq!(hidden.into_iter().collect::<Vec<_>>(), ["doc-b"]);
    let excluding = |hidden: Vec<String>| SearchFilter {
        exclude_document_ids: hidden,
        ..SearchFilter::default()
    };
    let hits = search(
        index,
        &info.id,
        SAMPLE_QUERY,
        10,
        excluding(hidden_now().await),
    )
    .await;
    assert_eq!(
        ids(&hits),
        [
            point_id("doc-a", 0),
            point_id("doc-c", 0),
            point_id("doc-text", 0),
            point_id("doc-a", 1)
        ]
    );

    // Swap: show "doc-b", hide "doc-a" and "doc-c" in one call.
    index
        .update_hidden(&info.id, strings(&["doc-a", "doc-c"]), strings(&["doc-b"]))
        .await
        .unwrap();
    assert_eq!(hidden_now().await, ["doc-a", "doc-c"]);
    let hits = search(
        index,
        &info.id,
        SAMPLE_QUERY,
        10,
        excluding(hidden_now().await),
    )
    .await;
    assert_eq!(docs_of(&hits), ["doc-text", "doc-b"]);
    // With another filter too, and in the lexical leg.
    let mut both = excluding(hidden_now().await);
    both.metadata.insert("team".into(), "core".into());
    let hits = search(index, &info.id, SAMPLE_QUERY, 10, both).await;
    assert_eq!(docs_of(&hits), ["doc-b"]);
    let hits = lexical(
        index,
        &info.id,
        "revenue",
        excluding(hidden_now().await),
        None,
    )
    .await;
    assert_eq!(docs_of(&hits), ["doc-text"]);
    index
        .update_hidden(&info.id, strings(&["doc-text"]), vec![])
        .await
        .unwrap();
    let hits = lexical(
        index,
        &info.id,
        "revenue",
        excluding(hidden_now().await),
        None,
    )
    .await;
    assert!(hits.is_empty(), "{hits:?}");

    // Showing what is not hidden and hiding twice change nothing; a document in both lists is
    // refused, with nothing changed.
    let hidden = index
        .update_hidden(&info.id, strings(&["doc-a"]), strings(&["doc-x"]))
        .await
        .unwrap();
    assert_eq!(hidden.len(), 3);
    assert_invalid(
        index
            .update_hidden(&info.id, strings(&["doc-b"]), strings(&["doc-b"]))
            .await,
        "hide_document_ids",
    );
    assert_eq!(hidden_now().await, ["doc-a", "doc-c", "doc-text"]);
    // The collection is still the same one for a create with its settings.
    assert_eq!(
        index.create_collection(info.clone()).await.unwrap(),
        info.id
    );
    assert_not_found(
        index
            .update_hidden(&Uuid::new_v4().to_string(), vec![], vec![])
            .await,
    );

    index.delete_collection(&info.id).await.unwrap();
}

/// Point operations on a collection that does not exist fail with NotFound.
pub(crate) async fn unknown_collection_is_not_found(index: &dyn VectorIndex) {
    let unknown = Uuid::new_v4().to_string();
    assert_not_found(index.upsert(&unknown, sample_points()).await);
    assert_not_found(index.upsert(&unknown, vec![]).await);
    let query = LegQuery {
        vector: QueryVector::Dense(SAMPLE_QUERY.to_vec()),
        limit: 3,
        filter: SearchFilter::default(),
        min_score: None,
    };
    assert_not_found(index.search(&unknown, query.clone()).await);
    assert_not_found(index.search_ids(&unknown, query).await);
    assert_not_found(index.payloads(&unknown, vec![point_id("doc-a", 0)]).await);
    assert_not_found(index.payloads(&unknown, vec![]).await);
    assert_not_found(
        index
            .delete_points(&unknown, vec![point_id("doc-a", 0)])
            .await,
    );
    assert_not_found(index.count(&unknown).await);
    index
        .delete_collection(&unknown)
        .await
        .expect("deleting an unknown collection is Ok");
}

/// Deleting a collection removes its points and its name; a re-created one starts empty.
pub(crate) async fn delete_collection_removes_everything(index: &dyn VectorIndex) {
    let info = create(index).await;
    index.upsert(&info.id, sample_points()).await.unwrap();
    index.delete_collection(&info.id).await.unwrap();

    assert_eq!(index.resolve(&info.tenant, &info.name).await.unwrap(), None);
    assert_not_found(index.count(&info.id).await);
    let query = LegQuery {
        vector: QueryVector::Dense(SAMPLE_QUERY.to_vec()),
        limit: 3,
        filter: SearchFilter::default(),
        min_score: None,
    };
    assert_not_found(index.search(&info.id, query).await);
    assert_not_found(index.upsert(&info.id, sample_points()).await);
    index
        .delete_collection(&info.id)
        .await
        .expect("second delete is Ok");

    index.create_collection(info.clone()).await.unwrap();
    assert_eq!(index.count(&info.id).await.unwrap(), 0);
    assert!(
        search(index, &info.id, SAMPLE_QUERY, 10, SearchFilter::default())
            .await
            .is_empty()
    );
    index.delete_collection(&info.id).await.unwrap();
}

/// Two tenants may use the same name; each sees only its own collection and points.
pub(crate) async fn tenants_are_isolated(index: &dyn VectorIndex) {
    let mine = create(index).await;
    let theirs = CollectionInfo {
        id: Uuid::new_v4().to_string(),
        tenant: format!("tenant-{}", Uuid::new_v4()),
        ..mine.clone()
    };
    index
        .create_collection(theirs.clone())
        .await
        .expect("same name, other tenant");

    assert_eq!(
        index.resolve(&mine.tenant, &mine.name).await.unwrap(),
        Some(mine.clone())
    );
    assert_eq!(
        index.resolve(&theirs.tenant, &theirs.name).await.unwrap(),
        Some(theirs.clone())
    );

    index.upsert(&mine.id, sample_points()).await.unwrap();
    assert_eq!(index.count(&theirs.id).await.unwrap(), 0);
    assert!(
        search(index, &theirs.id, SAMPLE_QUERY, 10, SearchFilter::default())
            .await
            .is_empty()
    );

    index.delete_collection(&mine.id).await.unwrap();
    assert_eq!(
        index.resolve(&theirs.tenant, &theirs.name).await.unwrap(),
        Some(theirs.clone())
    );
    index.delete_collection(&theirs.id).await.unwrap();
}

/// Empty writes and `top_k == 0` are no-ops rather than errors.
pub(crate) async fn empty_inputs(index: &dyn VectorIndex) {
    let info = create(index).await;
    assert!(
        search(index, &info.id, SAMPLE_QUERY, 10, SearchFilter::default())
            .await
            .is_empty()
    );
    assert_eq!(index.upsert(&info.id, vec![]).await.unwrap(), 0);
    index.delete_points(&info.id, vec![]).await.unwrap();
    index.upsert(&info.id, sample_points()).await.unwrap();
    assert!(
        search(index, &info.id, SAMPLE_QUERY, 0, SearchFilter::default())
            .await
            .is_empty()
    );
    assert_eq!(index.count(&info.id).await.unwrap(), 4);
    index.delete_collection(&info.id).await.unwrap();
}

/// BM25 in the engine: only chunks with a query term match; a rare term outweighs a common one
/// (IDF over the collection); more occurrences rank higher.
pub async fn lexical_ranks_by_bm25_with_collection_idf(index: &dyn VectorIndex) {
    let info = create(index).await;
    index
        .upsert(
            &info.id,
            vec![
                text_chunk("owl-1", "The owl hunts at night in the forest.", &[]),
                text_chunk(
                    "owl-2",
                    "Owls and more owls: an owl colony hunts at night.",
                    &[],
                ),
                text_chunk("bat", "The bat hunts insects at night.", &[]),
                text_chunk("cow", "The cow grazes in the meadow at night.", &[]),
                text_chunk("fish", "Fish swim in the river.", &[]),
            ],
        )
        .await
        .unwrap();
    let hits = lexical(index, &info.id, "owls", SearchFilter::default(), None).await;
    assert_eq!(docs_of(&hits), ["owl-2", "owl-1"], "{hits:?}");
    // "night" is in four chunks, "bat" in one: the rare term decides.
    let hits = lexical(
        index,
        &info.id,
        "bat at night",
        SearchFilter::default(),
        None,
    )
    .await;
    assert_eq!(hits[0].payload.document_id, "bat", "{hits:?}");
    assert_eq!(
        hits.len(),
        4,
        "chunks with only the common term still match: {hits:?}"
    );
    assert!(hits[0].score > 2.0 * hits[1].score, "{hits:?}");
    // Stop words only: nothing to match.
    assert!(
        lexical(index, &info.id, "the and of", SearchFilter::default(), None)
            .await
            .is_empty()
    );
    index.delete_collection(&info.id).await.unwrap();
}

/// Deleted chunks leave the lexical leg too.
pub async fn lexical_follows_deletes(index: &dyn VectorIndex) {
    let info = create(index).await;
    let points = vec![
        text_chunk("owl-1", "The owl hunts at night.", &[]),
        text_chunk("owl-2", "An owl sleeps by day.", &[]),
    ];
    let gone = points[0].id;
    index.upsert(&info.id, points).await.unwrap();
    index.delete_points(&info.id, vec![gone]).await.unwrap();
    let hits = lexical(index, &info.id, "owl", SearchFilter::default(), None).await;
    assert_eq!(docs_of(&hits), ["owl-2"]);
    index.delete_collection(&info.id).await.unwrap();
}

/// Any-of on metadata values, and ranges over values that parse as numbers or timestamps,
/// inside the engine (on both legs).
pub async fn any_of_and_range_filters(index: &dyn VectorIndex) {
    let info = create(index).await;
    index
        .upsert(
            &info.id,
            vec![
                text_chunk(
                    "a",
                    "owl report",
                    &[
                        ("lang", "en"),
                        ("year", "2019"),
                        ("published", "2019-03-01T00:00:00Z"),
                    ],
                ),
                text_chunk(
                    "b",
                    "owl report",
                    &[
                        ("lang", "fr"),
                        ("year", "2021"),
                        ("published", "2021-06-15T12:00:00Z"),
                    ],
                ),
                text_chunk(
                    "c",
                    "owl report",
                    &[
                        ("lang", "de"),
                        ("year", "2023"),
                        ("published", "2023-12-31T23:00:00+01:00"),
                    ],
                ),
                text_chunk("d", "owl report", &[("lang", "en"), ("year", "unknown")]),
            ],
        )
        .await
        .unwrap();
    let sorted = |mut v: Vec<&str>| {
        v.sort();
        v.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let any_of = SearchFilter {
        any_of: [("lang".to_owned(), vec!["en".to_owned(), "fr".to_owned()])].into(),
        ..SearchFilter::default()
    };
    let hits = lexical(index, &info.id, "owl", any_of.clone(), None).await;
    assert_eq!(sorted(docs_of(&hits)), ["a", "b", "d"]);
    let range = |key: &str, kind, gte: Option<f64>, lt: Option<f64>| MetadataRange {
        key: key.into(),
        kind,
        gte,
        gt: None,
        lte: None,
        lt,
    };
    let years = SearchFilter {
        ranges: vec![range("year", RangeKind::Number, Some(2020.0), None)],
        ..SearchFilter::default()
    };
    let hits = lexical(index, &info.id, "owl", years.clone(), None).await;
    assert_eq!(
        sorted(docs_of(&hits)),
        ["b", "c"],
        "'unknown' is not a number"
    );
    let dense = search(index, &info.id, [0.5, 0.5, 0.5, 0.5], 10, years).await;
    assert_eq!(
        sorted(docs_of(&dense)),
        ["b", "c"],
        "the dense leg filters the same"
    );
    let t = |s: &str| parse_typed(s).unwrap().1;
    let times = SearchFilter {
        ranges: vec![range(
            "published",
            RangeKind::Time,
            Some(t("2021-01-01")),
            Some(t("2023-12-31T22:30:00Z")),
        )],
        ..any_of
    };
    let hits = lexical(index, &info.id, "owl", times, None).await;
    assert_eq!(
        sorted(docs_of(&hits)),
        ["b"],
        "c is 22:00Z, inside; but lang de is not any-of"
    );
    let times = SearchFilter {
        ranges: vec![range(
            "published",
            RangeKind::Time,
            Some(t("2021-01-01")),
            Some(t("2023-12-31T22:30:00Z")),
        )],
        ..SearchFilter::default()
    };
    let hits = lexical(index, &info.id, "owl", times, None).await;
    assert_eq!(sorted(docs_of(&hits)), ["b", "c"]);
    index.delete_collection(&info.id).await.unwrap();
}

/// A score threshold drops hits below it, in the engine.
pub async fn min_score_threshold(index: &dyn VectorIndex) {
    let info = create(index).await;
    index.upsert(&info.id, sample_points()).await.unwrap();
    let all = search(index, &info.id, SAMPLE_QUERY, 10, SearchFilter::default()).await;
    let cut = (all[1].score + all[2].score) / 2.0;
    let hits = index
        .search(
            &info.id,
            LegQuery {
                vector: QueryVector::Dense(SAMPLE_QUERY.to_vec()),
                limit: 10,
                filter: SearchFilter::default(),
                min_score: Some(cut),
            },
        )
        .await
        .unwrap();
    assert_eq!(ids(&hits), ids(&all[..2]));
    index.delete_collection(&info.id).await.unwrap();
}
