//! Calls from ingest-svc to the services it depends on: embed-svc (model info, tokenizer,
//! document embeddings) and search-svc's `IndexService` (every write to the index).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use smartdb_kit::client::{Downstream as Client, Rpc};
use smartdb_kit::context::CallContext;
use smartdb_proto::v1 as pb;

use crate::chunk::Chunker;
use crate::error::{Error, Result};

/// Texts per Embed call: large enough to batch well, small enough to fit any provider limit.
pub const EMBED_BATCH: usize = 32;

type EmbedClient = pb::embed_service_client::EmbedServiceClient<smartdb_kit::client::Balancer>;
type IndexClient = pb::index_service_client::IndexServiceClient<smartdb_kit::client::Balancer>;

/// Every call ingest-svc makes is idempotent: embeddings are pure, and index writes use
/// deterministic point ids (a repeated create or delete of a collection is a no-op).
const GET_MODEL_INFO: Rpc = Rpc::idempotent("GetModelInfo");
const GET_TOKENIZER: Rpc = Rpc::idempotent("GetTokenizer");
const EMBED: Rpc = Rpc::idempotent("Embed");
const CREATE_COLLECTION: Rpc = Rpc::idempotent("CreateCollection");
const DELETE_COLLECTION: Rpc = Rpc::idempotent("DeleteCollection");
const UPSERT_POINTS: Rpc = Rpc::idempotent("UpsertPoints");
const DELETE_POINTS: Rpc = Rpc::idempotent("DeletePoints");
const UPDATE_HIDDEN: Rpc = Rpc::idempotent("UpdateHiddenDocuments");

/// Clients of embed-svc and search-svc, through the shared client stack (balancing, breakers,
/// retries, deadlines).
pub struct Downstream {
    embed: Client,
    index: Client,
    chunkers: Mutex<HashMap<String, Arc<Chunker>>>,
    chunk_bytes: usize,
}

impl Downstream {
    /// Clients of embed-svc and search-svc; `chunk_bytes` bounds every chunk.
    pub fn new(embed: Client, index: Client, chunk_bytes: usize) -> Self {
        Self {
            embed,
            index,
            chunkers: Mutex::default(),
            chunk_bytes,
        }
    }

    fn embed_client(channel: smartdb_kit::client::Balancer, max: usize) -> EmbedClient {
        EmbedClient::new(channel)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    fn index_client(channel: smartdb_kit::client::Balancer, max: usize) -> IndexClient {
        IndexClient::new(channel)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    /// Describes an embedding model (empty = default); INVALID_ARGUMENT on `embedding_model` if unknown.
    pub async fn model_info(&self, ctx: &CallContext, model: &str) -> Result<pb::ModelInfo> {
        let max = self.embed.max_message_bytes();
        let response = self
            .embed
            .call(
                ctx,
                GET_MODEL_INFO,
                pb::GetModelInfoRequest {
                    model: model.to_owned(),
                },
                move |ch, req| async move { Self::embed_client(ch, max).get_model_info(req).await },
            )
            .await
            .map_err(|s| match s.code() {
                tonic::Code::InvalidArgument => {
                    Error::invalid("embedding_model", s.message().to_owned())
                }
                _ => Error::from_downstream("embed-svc", s),
            })?;
        response
            .model
            .ok_or_else(|| Error::Internal("embed-svc returned no model info".into()))
    }

    /// The chunker for a model, built from the model's tokenizer once and then reused.
    pub async fn chunker(&self, ctx: &CallContext, model: &str) -> Result<Arc<Chunker>> {
        if let Some(chunker) = self.chunkers.lock().expect("chunkers lock").get(model) {
            return Ok(chunker.clone());
        }
        let max = self.embed.max_message_bytes();
        let response = self
            .embed
            .call(
                ctx,
                GET_TOKENIZER,
                pb::GetTokenizerRequest {
                    model: model.to_owned(),
                },
                move |ch, req| async move { Self::embed_client(ch, max).get_tokenizer(req).await },
            )
            .await
            .map_err(|s| Error::from_downstream("embed-svc", s))?;
        let chunk_bytes = self.chunk_bytes;
        let chunker = tokio::task::spawn_blocking(move || {
            Chunker::from_json(
                &response.tokenizer_json,
                response.max_input_tokens as usize,
                chunk_bytes,
            )
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let chunker = Arc::new(chunker);
        self.chunkers
            .lock()
            .expect("chunkers lock")
            .insert(model.to_owned(), chunker.clone());
        Ok(chunker)
    }

    /// Embeds document texts in batches; one vector per text, in order.
    pub async fn embed_documents(
        &self,
        ctx: &CallContext,
        model: &str,
        texts: &[String],
    ) -> Result<Vec<Vec<f32>>> {
        let max = self.embed.max_message_bytes();
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(EMBED_BATCH) {
            let response = self
                .embed
                .call(
                    ctx,
                    EMBED,
                    pb::EmbedRequest {
                        texts: batch.to_vec(),
                        kind: pb::InputKind::Document as i32,
                        model: model.to_owned(),
                    },
                    move |ch, req| async move { Self::embed_client(ch, max).embed(req).await },
                )
                .await
                .map_err(|s| Error::from_downstream("embed-svc", s))?;
            let embeddings = response.embeddings;
            if embeddings.len() != batch.len() {
                return Err(Error::Internal(format!(
                    "embed-svc returned {} vectors for {} texts",
                    embeddings.len(),
                    batch.len()
                )));
            }
            vectors.extend(embeddings.into_iter().map(|e| e.values));
        }
        Ok(vectors)
    }

    /// Creates a knowledge base's collection in the index; returns the id of the collection
    /// that now serves it (the requested one, or a reused orphan of the same name).
    pub async fn create_collection(
        &self,
        ctx: &CallContext,
        request: pb::CreateCollectionRequest,
    ) -> Result<String> {
        let requested = request.knowledge_base_id.clone();
        let max = self.index.max_message_bytes();
        let response = self
            .index
            .call(ctx, CREATE_COLLECTION, request, move |ch, req| async move {
                Self::index_client(ch, max).create_collection(req).await
            })
            .await
            .map_err(|s| Error::from_downstream("search-svc", s))?;
        Ok(if response.knowledge_base_id.is_empty() {
            requested
        } else {
            response.knowledge_base_id
        })
    }

    /// Drops a knowledge base's collection.
    pub async fn delete_collection(&self, ctx: &CallContext, kb_id: &str) -> Result<()> {
        let max = self.index.max_message_bytes();
        let request = pb::DeleteCollectionRequest {
            knowledge_base_id: kb_id.to_owned(),
        };
        self.index
            .call(ctx, DELETE_COLLECTION, request, move |ch, req| async move {
                Self::index_client(ch, max).delete_collection(req).await
            })
            .await
            .map_err(|s| Error::from_downstream("search-svc", s))?;
        Ok(())
    }

    /// Writes points in batches.
    pub async fn upsert(
        &self,
        ctx: &CallContext,
        kb_id: &str,
        points: Vec<pb::Point>,
    ) -> Result<()> {
        let max = self.index.max_message_bytes();
        let mut points = points.into_iter().peekable();
        while points.peek().is_some() {
            let batch: Vec<_> = points
                .by_ref()
                .take(smartdb_kit::limits::UPSERT_BATCH)
                .collect();
            let request = pb::UpsertPointsRequest {
                knowledge_base_id: kb_id.to_owned(),
                points: batch,
            };
            self.index
                .call(ctx, UPSERT_POINTS, request, move |ch, req| async move {
                    Self::index_client(ch, max).upsert_points(req).await
                })
                .await
                .map_err(|s| Error::from_downstream("search-svc", s))?;
        }
        Ok(())
    }

    /// Deletes points by id.
    pub async fn delete_points(
        &self,
        ctx: &CallContext,
        kb_id: &str,
        ids: Vec<String>,
    ) -> Result<()> {
        let max = self.index.max_message_bytes();
        for batch in ids.chunks(1024) {
            let request = pb::DeletePointsRequest {
                knowledge_base_id: kb_id.to_owned(),
                point_ids: batch.to_vec(),
            };
            self.index
                .call(ctx, DELETE_POINTS, request, move |ch, req| async move {
                    Self::index_client(ch, max).delete_points(req).await
                })
                .await
                .map_err(|s| Error::from_downstream("search-svc", s))?;
        }
        Ok(())
    }

    /// Hides and shows documents in searches, in one atomic step (see `UpdateHiddenDocuments`).
    pub async fn update_hidden(
        &self,
        ctx: &CallContext,
        kb_id: &str,
        hide: Vec<String>,
        show: Vec<String>,
    ) -> Result<()> {
        let max = self.index.max_message_bytes();
        let request = pb::UpdateHiddenDocumentsRequest {
            knowledge_base_id: kb_id.to_owned(),
            hide_document_ids: hide,
            show_document_ids: show,
        };
        self.index
            .call(ctx, UPDATE_HIDDEN, request, move |ch, req| async move {
                Self::index_client(ch, max)
                    .update_hidden_documents(req)
                    .await
            })
            .await
            .map_err(|s| Error::from_downstream("search-svc", s))?;
        Ok(())
    }
}

/// Deterministic id of a document's chunk, as text (the scheme lives in `smartdb_kit::ids`).
pub fn point_id(document_id: &str, chunk_index: u32) -> String {
    smartdb_kit::ids::point_id(document_id, chunk_index).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_ids_are_stable_and_distinct() {
        assert_eq!(point_id("d", 0), point_id("d", 0));
        assert_ne!(point_id("d", 0), point_id("d", 1));
        assert_ne!(point_id("d", 1), point_id("e", 1));
    }
}
