//! Answering a search: validate, resolve the knowledge base, consult the cache, embed the query
//! through embed-svc, run the dense and lexical legs in the index, fuse them.
//!
//! Hybrid ranking is reciprocal-rank fusion: each leg's hit at rank r (from 1) adds
//! `weight / (k + r)`. The legs run in the engine with every filter; fusion, a rank computation
//! over at most a few hundred ids, runs here so that it is the same on every backend and can
//! weigh the legs (Qdrant's own RRF has neither weights on all versions nor the embedded engine).
//! When the query cannot be embedded, HYBRID and DENSE answer from the lexical leg, flagged
//! degraded; degraded answers are not cached, so full answers return as soon as embed-svc does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use smartdb_kit::client::{Downstream, Rpc};
use smartdb_kit::context::CallContext;
use smartdb_kit::limits::{self, Limits};
use smartdb_proto::v1 as pb;

use crate::cache::{QueryKey, ResultCache, Versions};
use crate::error::{Error, Result};
use crate::index::{
    LegQuery, MetadataRange, QueryVector, RangeKind, ScoredChunk, ScoredId, SearchFilter,
    VectorIndex, parse_typed,
};
use crate::lexical::Analyzer;

/// Most document ids one search may filter on.
pub const MAX_FILTER_DOCUMENTS: usize = 1024;

/// Deepest hit a search may reach (offset + top_k).
pub const MAX_DEPTH: usize = 1000;
/// Most metadata conditions per search, and most values in one any-of.
pub const MAX_CONDITIONS: usize = 32;
/// Most values in one any-of condition.
pub const MAX_ANY_OF: usize = 100;

/// How hits are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// Dense and lexical rankings fused.
    Hybrid,
    /// Embedding similarity only.
    Dense,
    /// BM25 only.
    Lexical,
}

impl Mode {
    /// The proto value.
    pub fn to_proto(self) -> pb::SearchMode {
        match self {
            Mode::Hybrid => pb::SearchMode::Hybrid,
            Mode::Dense => pb::SearchMode::Dense,
            Mode::Lexical => pb::SearchMode::Lexical,
        }
    }
}

/// How the hybrid mode fuses its legs.
#[derive(Debug, Clone, Copy)]
pub struct Fusion {
    /// RRF's k: larger flattens the difference between ranks.
    pub k: f32,
    /// Weight of the dense leg.
    pub dense_weight: f32,
    /// Weight of the lexical leg.
    pub lexical_weight: f32,
    /// Candidates each leg contributes at least (more when paging deeper).
    pub candidates: usize,
}

impl Default for Fusion {
    /// Tuned on the SciFact train split (`smartdb eval`): a small k lets the top of each ranking
    /// decide, and the keyword ranking, the stronger leg there, weighs a little more.
    fn default() -> Self {
        Self {
            k: 10.0,
            dense_weight: 1.0,
            lexical_weight: 1.2,
            candidates: 50,
        }
    }
}

/// A search as the domain sees it.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    /// Knowledge base name.
    pub knowledge_base: String,
    /// Query text.
    pub query: String,
    /// Hits wanted.
    pub top_k: usize,
    /// Ranking.
    pub mode: Mode,
    /// Restrictions, applied inside the engine.
    pub filter: SearchFilter,
    /// Least score of a hit.
    pub min_score: Option<f32>,
    /// Hits skipped.
    pub offset: usize,
}

fn parse_bound(field: &str, value: &str) -> Result<Option<(RangeKind, f64)>> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    parse_typed(value).map(Some).ok_or_else(|| {
        Error::invalid_field(
            field.to_owned(),
            format!("{value:?} is neither a number nor an RFC 3339 timestamp"),
        )
    })
}

impl SearchQuery {
    /// Validates a request against `limits` and applies defaults.
    pub fn from_request(request: pb::SearchRequest, limits: &Limits) -> Result<Self> {
        let knowledge_base = request.knowledge_base.trim().to_owned();
        if knowledge_base.is_empty() {
            return Err(Error::invalid("knowledge_base", "is required"));
        }
        limits::check_len(&knowledge_base, limits::KB_NAME_BYTES)
            .map_err(|m| Error::invalid("knowledge_base", m))?;
        if request.query.trim().is_empty() {
            return Err(Error::invalid("query", "must not be empty"));
        }
        limits::check_len(&request.query, limits.query_bytes)
            .map_err(|m| Error::invalid("query", m))?;
        let top_k = limits
            .top_k(request.top_k)
            .map_err(|m| Error::invalid("top_k", m))?;
        limits
            .check_metadata(request.filter.iter())
            .map_err(|(field, m)| {
                Error::invalid_field(field.replacen("metadata", "filter", 1), m)
            })?;
        if request.document_ids.len() > MAX_FILTER_DOCUMENTS {
            return Err(Error::invalid(
                "document_ids",
                format!(
                    "{} ids, at most {MAX_FILTER_DOCUMENTS}",
                    request.document_ids.len()
                ),
            ));
        }
        limits::check_ids(&request.document_ids).map_err(|m| Error::invalid("document_ids", m))?;
        let mode = match pb::SearchMode::try_from(request.mode) {
            Ok(pb::SearchMode::Unspecified | pb::SearchMode::Hybrid) => Mode::Hybrid,
            Ok(pb::SearchMode::Dense) => Mode::Dense,
            Ok(pb::SearchMode::Lexical) => Mode::Lexical,
            Err(_) => {
                return Err(Error::invalid(
                    "mode",
                    format!("unknown mode {}", request.mode),
                ));
            }
        };
        if request.conditions.len() > MAX_CONDITIONS {
            return Err(Error::invalid(
                "conditions",
                format!(
                    "{} conditions, at most {MAX_CONDITIONS}",
                    request.conditions.len()
                ),
            ));
        }
        let mut filter = SearchFilter {
            metadata: request.filter.into_iter().collect(),
            document_ids: request.document_ids,
            ..SearchFilter::default()
        };
        for (i, condition) in request.conditions.into_iter().enumerate() {
            let field = |name: &str| format!("conditions[{i}].{name}");
            if condition.key.is_empty() {
                return Err(Error::invalid_field(field("key"), "is required"));
            }
            limits::check_len(&condition.key, limits.metadata_key_bytes)
                .map_err(|m| Error::invalid_field(field("key"), m))?;
            match condition.condition {
                None => {
                    return Err(Error::invalid_field(
                        format!("conditions[{i}]"),
                        "needs any_of or range",
                    ));
                }
                Some(pb::metadata_condition::Condition::AnyOf(any)) => {
                    if any.values.is_empty() || any.values.len() > MAX_ANY_OF {
                        return Err(Error::invalid_field(
                            field("any_of.values"),
                            format!("needs 1 to {MAX_ANY_OF} values"),
                        ));
                    }
                    for value in &any.values {
                        limits::check_len(value, limits.metadata_value_bytes)
                            .map_err(|m| Error::invalid_field(field("any_of.values"), m))?;
                    }
                    filter
                        .any_of
                        .entry(condition.key)
                        .or_default()
                        .extend(any.values);
                }
                Some(pb::metadata_condition::Condition::Range(range)) => {
                    let bounds = [
                        ("range.gte", &range.gte),
                        ("range.gt", &range.gt),
                        ("range.lte", &range.lte),
                        ("range.lt", &range.lt),
                    ]
                    .into_iter()
                    .map(|(name, v)| parse_bound(&field(name), v))
                    .collect::<Result<Vec<_>>>()?;
                    let kinds: Vec<RangeKind> = bounds.iter().flatten().map(|b| b.0).collect();
                    let Some(&kind) = kinds.first() else {
                        return Err(Error::invalid_field(
                            field("range"),
                            "needs at least one bound",
                        ));
                    };
                    if kinds.iter().any(|k| *k != kind) {
                        return Err(Error::invalid_field(
                            field("range"),
                            "mixes numbers and timestamps",
                        ));
                    }
                    let value = |i: usize| bounds[i].map(|b| b.1);
                    filter.ranges.push(MetadataRange {
                        key: condition.key,
                        kind,
                        gte: value(0),
                        gt: value(1),
                        lte: value(2),
                        lt: value(3),
                    });
                }
            }
        }
        let min_score = request.min_score.filter(|s| s.is_finite());
        let mut query = Self {
            knowledge_base,
            query: request.query,
            top_k,
            mode,
            filter,
            min_score,
            offset: request.offset as usize,
        };
        if !request.page_token.is_empty() {
            query.offset = query.parse_page_token(&request.page_token)?;
        }
        if query.offset + query.top_k > MAX_DEPTH {
            return Err(Error::invalid(
                "offset",
                format!(
                    "offset + top_k is {}, at most {MAX_DEPTH}",
                    query.offset + query.top_k
                ),
            ));
        }
        Ok(query)
    }

    /// Everything but the paging, canonically (for page tokens and, with the offset, the cache).
    fn shape(&self) -> String {
        format!(
            "{:?}\u{0}{:?}\u{0}{}\u{0}{:?}\u{0}{:?}",
            self.query, self.mode, self.top_k, self.filter, self.min_score
        )
    }

    fn shape_digest(&self) -> String {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(self.shape().as_bytes())[..8])
    }

    /// The token of the page starting at `offset`.
    fn page_token(&self, offset: usize) -> String {
        format!("{offset}.{}", self.shape_digest())
    }

    fn parse_page_token(&self, token: &str) -> Result<usize> {
        let bad = || {
            Error::invalid(
                "page_token",
                "is not a token of this search (query, mode, filters and top_k must stay the same)",
            )
        };
        let (offset, digest) = token.split_once('.').ok_or_else(bad)?;
        if digest != self.shape_digest() {
            return Err(bad());
        }
        offset.parse().map_err(|_| bad())
    }
}

/// A search answer, cacheable unless degraded.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SearchAnswer {
    /// Hits, best first.
    pub hits: Vec<ScoredChunk>,
    /// Model that embedded the query.
    pub embedding_model: String,
    /// How the hits were ranked.
    pub mode: Mode,
    /// Why the answer is degraded, if it is.
    pub degraded: Option<String>,
    /// Offset of the next page, if there may be more hits.
    pub next_offset: Option<usize>,
}

impl SearchAnswer {
    /// The token of the next page, if any.
    pub fn next_page_token(&self, query: &SearchQuery) -> String {
        self.next_offset
            .map(|offset| query.page_token(offset))
            .unwrap_or_default()
    }
}

/// Reciprocal-rank fusion of ranked lists, each with its weight; best first.
pub fn fuse(legs: Vec<(Vec<ScoredId>, f32)>, k: f32) -> Vec<ScoredId> {
    let mut scores: HashMap<uuid::Uuid, f32> = HashMap::new();
    for (hits, weight) in legs {
        for (rank, hit) in hits.into_iter().enumerate() {
            *scores.entry(hit.id).or_default() += weight / (k + rank as f32 + 1.0);
        }
    }
    let mut fused: Vec<ScoredId> = scores
        .into_iter()
        .map(|(id, score)| ScoredId { id, score })
        .collect();
    // Ties (same fused score) by id, so answers are stable.
    fused.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
    fused
}

/// Executes searches.
pub struct Searcher {
    index: Arc<dyn VectorIndex>,
    embed: Downstream,
    analyzer: Arc<Analyzer>,
    cache: ResultCache,
    versions: Arc<Versions>,
    limits: Limits,
    fusion: Fusion,
}

impl Searcher {
    /// A searcher over `index`, embedding queries through `embed` (embed-svc's client).
    pub fn new(
        index: Arc<dyn VectorIndex>,
        embed: Downstream,
        analyzer: Arc<Analyzer>,
        cache: ResultCache,
        versions: Arc<Versions>,
        limits: Limits,
        fusion: Fusion,
    ) -> Self {
        Self {
            index,
            embed,
            analyzer,
            cache,
            versions,
            limits,
            fusion,
        }
    }

    /// Limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs one search for the caller in `ctx`; the answer says whether it came from the cache.
    pub async fn search(
        &self,
        ctx: &CallContext,
        query: &SearchQuery,
    ) -> Result<(SearchAnswer, bool)> {
        let collection = self
            .index
            .resolve(&ctx.tenant, &query.knowledge_base)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "knowledge base {:?} not found",
                    query.knowledge_base
                ))
            })?;
        let request = format!("{}\u{0}{}", query.shape(), query.offset);
        let key = QueryKey {
            collection_id: &collection.id,
            version: self.versions.get(&collection.id).await,
            request: &request,
        };
        if let Some(answer) = self.cache.get(&key).await {
            return Ok((answer, true));
        }
        // One more than asked, to know whether a next page exists.
        let depth = query.offset + query.top_k + 1;
        let candidates = depth.max(self.fusion.candidates);
        // Versions of documents being replaced or deleted are left out, all at once: the hidden
        // set is read under the visibility (see `Versions`), which holds still until every leg
        // ran.
        let hidden_filter = || async {
            let hidden = match self
                .index
                .resolve(&ctx.tenant, &query.knowledge_base)
                .await?
            {
                Some(now) if now.id == collection.id => now.hidden_documents,
                _ => collection.hidden_documents.clone(),
            };
            let mut filter = query.filter.clone();
            filter.exclude_document_ids = hidden.into_iter().collect();
            Ok::<_, Error>(filter)
        };
        let sparse = || QueryVector::Sparse(self.analyzer.query(&query.query));
        // A leg of a hybrid search: many candidates, ids and scores only (fusion reads the
        // payloads of the few it keeps), no threshold (it applies to the fused score).
        let wide = |vector, filter: &SearchFilter| LegQuery {
            vector,
            limit: candidates,
            filter: filter.clone(),
            min_score: None,
        };
        let lexical_leg = |filter: &SearchFilter| {
            self.index
                .search_ids(&collection.id, wide(sparse(), filter))
                .instrument(tracing::info_span!(
                    target: "smartdb::search",
                    "engine",
                    otel.name = "engine search (lexical leg)"
                ))
        };
        let embed = || self.embed_query(ctx, &query.query, &collection.embedding_model);
        let (embedded, early_lexical) = match query.mode {
            Mode::Lexical => (None, None),
            Mode::Dense => (Some(embed().await), None),
            Mode::Hybrid => {
                // The lexical leg needs no embedding, so it runs while the query is embedded. It
                // lets go of the visibility when done (an embedding can take the whole deadline:
                // changes of hidden documents must not wait for it); its hits are kept only if
                // the visibility is still the one they saw when the dense leg runs.
                let early = async {
                    let guard = self.versions.visibility().await;
                    let filter = hidden_filter().await?;
                    let hits = lexical_leg(&filter).await?;
                    Ok::<_, Error>((*guard, filter, hits))
                };
                let (embedded, early) = tokio::join!(embed(), early);
                (Some(embedded), Some(early?))
            }
        };
        let visible = self.versions.visibility().await;
        let (filter, early_lexical) = match early_lexical {
            // Same generation: the hidden set the lexical leg saw is still the current one.
            Some((generation, filter, hits)) if generation == *visible => (filter, Some(hits)),
            _ => (hidden_filter().await?, None),
        };
        let leg = |vector| LegQuery {
            vector,
            limit: depth,
            filter: filter.clone(),
            min_score: query.min_score,
        };
        // The engine's part, in a span of its own (the query's embedding has its call span).
        let engine =
            tracing::info_span!(target: "smartdb::search", "engine", otel.name = "engine search");
        let (mut hits, mode, degraded) = async {
            Ok::<_, Error>(match embedded {
                None => (
                    self.index.search(&collection.id, leg(sparse())).await?,
                    Mode::Lexical,
                    None,
                ),
                Some(Err(err)) if err.is_degradable() => {
                    metrics::counter!("search_degraded_total", "reason" => err.reason_label())
                        .increment(1);
                    let reason =
                        format!("query embedding failed ({err}); ranked by keywords (BM25) only");
                    let hits = self.index.search(&collection.id, leg(sparse())).await?;
                    tracing::warn!(mode = ?query.mode, error = %err, "search degraded to lexical");
                    (hits, Mode::Lexical, Some(reason))
                }
                Some(Err(err)) => return Err(err),
                Some(Ok(vector)) if query.mode == Mode::Dense => (
                    self.index
                        .search(&collection.id, leg(QueryVector::Dense(vector)))
                        .await?,
                    Mode::Dense,
                    None,
                ),
                Some(Ok(vector)) => {
                    let lexical = match early_lexical {
                        Some(hits) => hits,
                        // The hidden documents changed since: again, against the current ones.
                        None => lexical_leg(&filter).await?,
                    };
                    let dense = self
                        .index
                        .search_ids(&collection.id, wide(QueryVector::Dense(vector), &filter))
                        .await?;
                    let mut fused = fuse(
                        vec![
                            (dense, self.fusion.dense_weight),
                            (lexical, self.fusion.lexical_weight),
                        ],
                        self.fusion.k,
                    );
                    if let Some(min) = query.min_score {
                        fused.retain(|h| h.score >= min);
                    }
                    fused.truncate(depth);
                    (
                        self.with_payloads(&collection.id, fused).await?,
                        Mode::Hybrid,
                        None,
                    )
                }
            })
        }
        .instrument(engine)
        .await?;
        drop(visible);
        let more = hits.len() > query.offset + query.top_k;
        hits = hits
            .into_iter()
            .skip(query.offset)
            .take(query.top_k)
            .collect();
        let answer = SearchAnswer {
            hits,
            embedding_model: collection.embedding_model.clone(),
            mode,
            degraded,
            next_offset: more.then_some(query.offset + query.top_k),
        };
        if answer.degraded.is_none() {
            self.cache.insert(&key, answer.clone()).await;
        }
        Ok((answer, false))
    }

    /// The hits of `ranked` with their payloads, in its order; a point deleted since it was
    /// ranked is left out.
    async fn with_payloads(
        &self,
        collection_id: &str,
        ranked: Vec<ScoredId>,
    ) -> Result<Vec<ScoredChunk>> {
        let mut payloads: HashMap<uuid::Uuid, _> = self
            .index
            .payloads(collection_id, ranked.iter().map(|h| h.id).collect())
            .await?
            .into_iter()
            .collect();
        Ok(ranked
            .into_iter()
            .filter_map(|ScoredId { id, score }| {
                payloads
                    .remove(&id)
                    .map(|payload| ScoredChunk { id, score, payload })
            })
            .collect())
    }

    /// Embeds the query, keeping part of the caller's time for the lexical fallback.
    async fn embed_query(&self, ctx: &CallContext, query: &str, model: &str) -> Result<Vec<f32>> {
        let mut ctx = ctx.clone();
        if let Some(deadline) = ctx.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let keep = (left / 4).min(Duration::from_millis(250));
            ctx.deadline = Some(deadline - keep);
        }
        let max = self.embed.max_message_bytes();
        let response = self
            .embed
            .call(
                &ctx,
                Rpc::idempotent("Embed"),
                pb::EmbedRequest {
                    texts: vec![query.to_owned()],
                    kind: pb::InputKind::Query as i32,
                    model: model.to_owned(),
                },
                move |ch, req| async move {
                    pb::embed_service_client::EmbedServiceClient::new(ch)
                        .max_decoding_message_size(max)
                        .max_encoding_message_size(max)
                        .embed(req)
                        .await
                },
            )
            .await
            .map_err(|status| Error::from_downstream("embed-svc", status, "query"))?;
        response
            .embeddings
            .into_iter()
            .next()
            .map(|e| e.values)
            .ok_or_else(|| Error::Internal("embedding service returned no vector".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(n: u128) -> ScoredId {
        ScoredId {
            id: uuid::Uuid::from_u128(n),
            score: 0.0,
        }
    }

    #[test]
    fn rrf_rewards_agreement_and_weights_legs() {
        // a is 1st and 3rd; b 2nd and 1st; c only 1st... of the second leg at rank 2.
        let dense = vec![hit(1), hit(2), hit(3)];
        let lexical = vec![hit(2), hit(4), hit(1)];
        let fused = fuse(vec![(dense.clone(), 1.0), (lexical.clone(), 1.0)], 60.0);
        let order: Vec<u128> = fused.iter().map(|h| h.id.as_u128()).collect();
        assert_eq!(order, [2, 1, 4, 3]);
        assert!((fused[0].score - (1.0 / 62.0 + 1.0 / 61.0)).abs() < 1e-6);
        // Weighting the lexical leg 3x puts its second hit above the dense leg's third.
        let fused = fuse(vec![(dense, 1.0), (lexical, 3.0)], 60.0);
        let order: Vec<u128> = fused.iter().map(|h| h.id.as_u128()).collect();
        assert_eq!(order, [2, 1, 4, 3]);
        assert!(fused[2].score > fused[3].score * 2.0);
    }

    fn request() -> pb::SearchRequest {
        pb::SearchRequest {
            knowledge_base: "kb".into(),
            query: "owls".into(),
            ..Default::default()
        }
    }

    #[test]
    fn conditions_are_validated_and_name_their_field() {
        let limits = Limits::default();
        let with = |c: pb::MetadataCondition| {
            let mut r = request();
            r.conditions.push(c);
            SearchQuery::from_request(r, &limits)
        };
        let range = |gte: &str, lt: &str| pb::MetadataCondition {
            key: "year".into(),
            condition: Some(pb::metadata_condition::Condition::Range(pb::Range {
                gte: gte.into(),
                lt: lt.into(),
                ..Default::default()
            })),
        };
        let q = with(range("2020", "2024.5")).unwrap();
        assert_eq!(q.filter.ranges[0].kind, RangeKind::Number);
        assert_eq!(q.filter.ranges[0].lt, Some(2024.5));
        let q = with(range("2020-01-01", "2021-01-01T00:00:00Z")).unwrap();
        assert_eq!(q.filter.ranges[0].kind, RangeKind::Time);
        let err = with(range("2020", "2021-01-01")).unwrap_err().to_string();
        assert!(
            err.contains("conditions[0].range") && err.contains("mixes"),
            "{err}"
        );
        let err = with(range("soon", "")).unwrap_err().to_string();
        assert!(err.starts_with("conditions[0].range.gte"), "{err}");
        let err = with(range("", "")).unwrap_err().to_string();
        assert!(err.contains("at least one bound"), "{err}");
        let err = with(pb::MetadataCondition {
            key: "lang".into(),
            condition: Some(pb::metadata_condition::Condition::AnyOf(pb::AnyOf {
                values: vec![],
            })),
        })
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("conditions[0].any_of.values"), "{err}");
        let mut r = request();
        r.mode = 42;
        assert!(
            SearchQuery::from_request(r, &limits)
                .unwrap_err()
                .to_string()
                .starts_with("mode")
        );
    }

    #[test]
    fn page_tokens_belong_to_their_search() {
        let limits = Limits::default();
        let q = SearchQuery::from_request(request(), &limits).unwrap();
        let token = q.page_token(10);
        let mut next = request();
        next.page_token = token.clone();
        assert_eq!(SearchQuery::from_request(next, &limits).unwrap().offset, 10);
        let mut other = request();
        other.query = "bats".into();
        other.page_token = token;
        let err = SearchQuery::from_request(other, &limits)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("page_token"), "{err}");
        let mut deep = request();
        deep.offset = 995;
        deep.top_k = 10;
        assert!(
            SearchQuery::from_request(deep, &limits)
                .unwrap_err()
                .to_string()
                .starts_with("offset")
        );
    }
}
