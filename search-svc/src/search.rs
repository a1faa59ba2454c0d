//! Answering a search: validate, resolve the knowledge base, consult the cache, embed the query
//! through embed-svc, search the index.

use std::collections::BTreeMap;
use std::sync::Arc;

use smartdb_kit::client::{Downstream, Rpc};
use smartdb_kit::context::CallContext;
use smartdb_kit::limits::{self, Limits};
use smartdb_proto::v1 as pb;

use crate::cache::{QueryKey, ResultCache, Versions};
use crate::error::{Error, Result};
use crate::index::{DenseQuery, ScoredChunk, SearchFilter, VectorIndex};

/// Most document ids one search may filter on.
pub const MAX_FILTER_DOCUMENTS: usize = 1024;

/// A search as the domain sees it.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    /// Knowledge base name.
    pub knowledge_base: String,
    /// Query text.
    pub query: String,
    /// Hits wanted.
    pub top_k: usize,
    /// Metadata that hits must carry.
    pub filter: BTreeMap<String, String>,
    /// Documents hits must come from (empty: any).
    pub document_ids: Vec<String>,
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
        if let Some(id) = request
            .document_ids
            .iter()
            .find(|id| id.len() > limits::ID_BYTES)
        {
            return Err(Error::invalid(
                "document_ids",
                format!("an id is {} bytes, at most {}", id.len(), limits::ID_BYTES),
            ));
        }
        Ok(Self {
            knowledge_base,
            query: request.query,
            top_k,
            filter: request.filter.into_iter().collect(),
            document_ids: request.document_ids,
        })
    }
}

/// A search answer, cacheable.
#[derive(Debug, Clone)]
pub struct SearchAnswer {
    /// Hits, best first.
    pub hits: Vec<ScoredChunk>,
    /// Model that embedded the query.
    pub embedding_model: String,
}

/// Executes searches.
pub struct Searcher {
    index: Arc<dyn VectorIndex>,
    embed: Downstream,
    cache: ResultCache,
    versions: Arc<Versions>,
    limits: Limits,
}

impl Searcher {
    /// A searcher over `index`, embedding queries through `embed` (embed-svc's client).
    pub fn new(
        index: Arc<dyn VectorIndex>,
        embed: Downstream,
        cache: ResultCache,
        versions: Arc<Versions>,
        limits: Limits,
    ) -> Self {
        Self {
            index,
            embed,
            cache,
            versions,
            limits,
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
        query: SearchQuery,
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
        let key = QueryKey {
            collection_id: &collection.id,
            version: self.versions.get(&collection.id),
            query: &query.query,
            top_k: query.top_k,
            filter: &query.filter,
            document_ids: &query.document_ids,
        };
        if let Some(answer) = self.cache.get(&key) {
            return Ok((answer, true));
        }
        let vector = self
            .embed_query(ctx, &query.query, &collection.embedding_model)
            .await?;
        let hits = self
            .index
            .search(
                &collection.id,
                DenseQuery {
                    vector,
                    top_k: query.top_k,
                    filter: SearchFilter {
                        metadata: query.filter.clone(),
                        document_ids: query.document_ids.clone(),
                    },
                },
            )
            .await?;
        let answer = SearchAnswer {
            hits,
            embedding_model: collection.embedding_model.clone(),
        };
        self.cache.insert(&key, answer.clone());
        Ok((answer, false))
    }

    async fn embed_query(&self, ctx: &CallContext, query: &str, model: &str) -> Result<Vec<f32>> {
        let max = self.embed.max_message_bytes();
        let response = self
            .embed
            .call(
                ctx,
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
