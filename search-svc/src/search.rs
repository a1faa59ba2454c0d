//! Answering a search: validate, resolve the knowledge base, consult the cache, embed the query
//! through embed-svc, search the index.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use smartdb_kit::context::CallContext;
use smartdb_proto::v1 as pb;
use tonic::transport::Channel;

use crate::cache::{QueryKey, ResultCache, Versions};
use crate::error::{Error, Result};
use crate::index::{DenseQuery, ScoredChunk, SearchFilter, VectorIndex};

/// Longest query accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Hits returned when the caller does not say.
pub const DEFAULT_TOP_K: usize = 10;
/// Most hits one search may ask for.
pub const MAX_TOP_K: usize = 100;
/// Time allowed for embedding the query when the caller set no deadline.
const EMBED_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Validates a request and applies defaults.
    pub fn from_request(request: pb::SearchRequest) -> Result<Self> {
        let knowledge_base = request.knowledge_base.trim().to_owned();
        if knowledge_base.is_empty() {
            return Err(Error::invalid("knowledge_base", "is required"));
        }
        if request.query.trim().is_empty() {
            return Err(Error::invalid("query", "must not be empty"));
        }
        if request.query.len() > MAX_QUERY_BYTES {
            return Err(Error::invalid(
                "query",
                format!("{} bytes, at most {MAX_QUERY_BYTES}", request.query.len()),
            ));
        }
        let top_k = match request.top_k as usize {
            0 => DEFAULT_TOP_K,
            k if k > MAX_TOP_K => {
                return Err(Error::invalid(
                    "top_k",
                    format!("{k} is more than the maximum {MAX_TOP_K}"),
                ));
            }
            k => k,
        };
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
    embed: pb::embed_service_client::EmbedServiceClient<Channel>,
    cache: ResultCache,
    versions: Arc<Versions>,
}

impl Searcher {
    /// A searcher over `index`, embedding queries through `embed`.
    pub fn new(
        index: Arc<dyn VectorIndex>,
        embed: Channel,
        cache: ResultCache,
        versions: Arc<Versions>,
    ) -> Self {
        let embed = pb::embed_service_client::EmbedServiceClient::new(embed)
            .max_decoding_message_size(smartdb_kit::server::MAX_MESSAGE_BYTES);
        Self {
            index,
            embed,
            cache,
            versions,
        }
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
        let request = ctx.request(
            pb::EmbedRequest {
                texts: vec![query.to_owned()],
                kind: pb::InputKind::Query as i32,
                model: model.to_owned(),
            },
            EMBED_TIMEOUT,
        );
        let response =
            self.embed
                .clone()
                .embed(request)
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::InvalidArgument => {
                        Error::invalid("query", status.message().to_owned())
                    }
                    _ => Error::Unavailable(format!(
                        "embedding service unavailable: {}",
                        status.message()
                    )),
                })?;
        response
            .into_inner()
            .embeddings
            .into_iter()
            .next()
            .map(|e| e.values)
            .ok_or_else(|| Error::Internal("embedding service returned no vector".into()))
    }
}
