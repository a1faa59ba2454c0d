//! `SearchService` and the internal `IndexService` over gRPC: decode, call domain code, encode.

use std::sync::Arc;

use smartdb_kit::context::CallContext;
use smartdb_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::cache::Versions;
use crate::error::{Error, Result};
use crate::index::{ChunkPayload, CollectionInfo, IndexPoint, VectorIndex};
use crate::lexical::Analyzer;
use crate::search::{SearchQuery, Searcher};

/// The public search API.
pub struct SearchGrpc {
    searcher: Arc<Searcher>,
}

impl SearchGrpc {
    /// Serves searches with `searcher`.
    pub fn new(searcher: Arc<Searcher>) -> Self {
        Self { searcher }
    }
}

#[tonic::async_trait]
impl pb::search_service_server::SearchService for SearchGrpc {
    async fn search(
        &self,
        request: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let query = SearchQuery::from_request(request.into_inner(), self.searcher.limits())?;
        let (answer, cached) = self.searcher.search(&ctx, &query).await?;
        let next_page_token = answer.next_page_token(&query);
        Ok(Response::new(pb::SearchResponse {
            next_page_token,
            hits: answer
                .hits
                .into_iter()
                .map(|hit| pb::SearchHit {
                    document_id: hit.payload.document_id,
                    chunk_index: hit.payload.chunk_index,
                    text: hit.payload.text,
                    score: hit.score,
                    title: hit.payload.title,
                    metadata: hit.payload.metadata.into_iter().collect(),
                    source_name: hit.payload.source_name,
                    heading_path: hit.payload.heading_path,
                    start_offset: hit.payload.start_offset,
                    end_offset: hit.payload.end_offset,
                    page_start: hit.payload.page_start,
                    page_end: hit.payload.page_end,
                })
                .collect(),
            mode: answer.mode.to_proto() as i32,
            degraded: answer.degraded.is_some(),
            degraded_reason: answer.degraded.unwrap_or_default(),
            cached,
            embedding_model: answer.embedding_model,
        }))
    }
}

/// The internal write API of the index; every write bumps the collection's cache version.
pub struct IndexGrpc {
    index: Arc<dyn VectorIndex>,
    versions: Arc<Versions>,
    analyzer: Arc<Analyzer>,
}

impl IndexGrpc {
    /// Writes to `index`, bumping `versions` on every change; `analyzer` builds each point's
    /// BM25 vector from its title and text.
    pub fn new(
        index: Arc<dyn VectorIndex>,
        versions: Arc<Versions>,
        analyzer: Arc<Analyzer>,
    ) -> Self {
        Self {
            index,
            versions,
            analyzer,
        }
    }
}

fn parse_uuid(field: &'static str, value: &str) -> Result<uuid::Uuid> {
    uuid::Uuid::parse_str(value)
        .map_err(|_| Error::invalid(field, format!("{value:?} is not a UUID")))
}

#[tonic::async_trait]
impl pb::index_service_server::IndexService for IndexGrpc {
    async fn create_collection(
        &self,
        request: Request<pb::CreateCollectionRequest>,
    ) -> Result<Response<pb::CreateCollectionResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let r = request.into_inner();
        parse_uuid("knowledge_base_id", &r.knowledge_base_id)?;
        if r.knowledge_base.trim().is_empty() {
            return Err(Error::invalid("knowledge_base", "is required").into());
        }
        if r.dimension == 0 || r.dimension as usize > smartdb_kit::limits::MAX_DIMENSION {
            return Err(Error::invalid(
                "dimension",
                format!(
                    "must be between 1 and {}",
                    smartdb_kit::limits::MAX_DIMENSION
                ),
            )
            .into());
        }
        let id = self
            .index
            .create_collection(CollectionInfo {
                id: r.knowledge_base_id.clone(),
                tenant: ctx.tenant,
                name: r.knowledge_base,
                dimension: r.dimension,
                embedding_model: r.embedding_model,
                ..Default::default()
            })
            .await?;
        self.versions.bump(&id).await;
        Ok(Response::new(pb::CreateCollectionResponse {
            knowledge_base_id: id,
        }))
    }

    async fn delete_collection(
        &self,
        request: Request<pb::DeleteCollectionRequest>,
    ) -> Result<Response<pb::DeleteCollectionResponse>, Status> {
        let r = request.into_inner();
        parse_uuid("knowledge_base_id", &r.knowledge_base_id)?;
        self.index.delete_collection(&r.knowledge_base_id).await?;
        self.versions.bump(&r.knowledge_base_id).await;
        Ok(Response::new(pb::DeleteCollectionResponse {}))
    }

    async fn upsert_points(
        &self,
        request: Request<pb::UpsertPointsRequest>,
    ) -> Result<Response<pb::UpsertPointsResponse>, Status> {
        let r = request.into_inner();
        parse_uuid("knowledge_base_id", &r.knowledge_base_id)?;
        let points = r
            .points
            .into_iter()
            .map(|p| {
                Ok(IndexPoint {
                    id: parse_uuid("points.id", &p.id)?,
                    vector: p.vector,
                    sparse: self.analyzer.document(&p.title, &p.heading_path, &p.text),
                    payload: ChunkPayload {
                        document_id: p.document_id,
                        chunk_index: p.chunk_index,
                        text: p.text,
                        title: p.title,
                        source_name: p.source_name,
                        metadata: p.metadata.into_iter().collect(),
                        heading_path: p.heading_path,
                        start_offset: p.start_offset,
                        end_offset: p.end_offset,
                        page_start: p.page_start,
                        page_end: p.page_end,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let upserted = self.index.upsert(&r.knowledge_base_id, points).await?;
        self.versions.bump(&r.knowledge_base_id).await;
        Ok(Response::new(pb::UpsertPointsResponse {
            upserted: upserted as u32,
        }))
    }

    async fn delete_points(
        &self,
        request: Request<pb::DeletePointsRequest>,
    ) -> Result<Response<pb::DeletePointsResponse>, Status> {
        let r = request.into_inner();
        parse_uuid("knowledge_base_id", &r.knowledge_base_id)?;
        let ids = r
            .point_ids
            .iter()
            .map(|id| parse_uuid("point_ids", id))
            .collect::<Result<Vec<_>>>()?;
        self.index.delete_points(&r.knowledge_base_id, ids).await?;
        self.versions.bump(&r.knowledge_base_id).await;
        Ok(Response::new(pb::DeletePointsResponse {}))
    }

    async fn update_hidden_documents(
        &self,
        request: Request<pb::UpdateHiddenDocumentsRequest>,
    ) -> Result<Response<pb::UpdateHiddenDocumentsResponse>, Status> {
        let r = request.into_inner();
        parse_uuid("knowledge_base_id", &r.knowledge_base_id)?;
        for (field, ids) in [
            ("hide_document_ids", &r.hide_document_ids),
            ("show_document_ids", &r.show_document_ids),
        ] {
            if let Some(bad) = ids.iter().find(|id| id.is_empty() || id.len() > 128) {
                return Err(Error::invalid(
                    field,
                    format!("{bad:?} is not a document id (1 to 128 bytes)"),
                )
                .into());
            }
        }
        let hidden = {
            // Waits for searches running against the current visibility.
            let _exclusive = self.versions.change_visibility().await;
            self.index
                .update_hidden(
                    &r.knowledge_base_id,
                    r.hide_document_ids,
                    r.show_document_ids,
                )
                .await?
        };
        self.versions.bump(&r.knowledge_base_id).await;
        Ok(Response::new(pb::UpdateHiddenDocumentsResponse {
            hidden_documents: hidden.len() as u32,
        }))
    }

    async fn get_collection_stats(
        &self,
        request: Request<pb::GetCollectionStatsRequest>,
    ) -> Result<Response<pb::GetCollectionStatsResponse>, Status> {
        let r = request.into_inner();
        parse_uuid("knowledge_base_id", &r.knowledge_base_id)?;
        let point_count = self.index.count(&r.knowledge_base_id).await?;
        // An empty change reads the hidden set.
        let hidden_document_ids = self
            .index
            .update_hidden(&r.knowledge_base_id, Vec::new(), Vec::new())
            .await?
            .into_iter()
            .collect();
        Ok(Response::new(pb::GetCollectionStatsResponse {
            point_count,
            hidden_document_ids,
        }))
    }
}
