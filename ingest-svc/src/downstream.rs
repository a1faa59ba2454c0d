//! Calls from ingest-svc to the services it depends on: embed-svc (model info, tokenizer,
//! document embeddings) and search-svc's `IndexService` (every write to the index).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smartdb_kit::client::within;
use smartdb_kit::context::CallContext;
use smartdb_proto::v1 as pb;
use tonic::transport::Channel;

use crate::chunk::Chunker;
use crate::error::{Error, Result};

/// Texts per Embed call: large enough to batch well, small enough to fit any provider limit.
pub const EMBED_BATCH: usize = 32;

/// Clients of embed-svc and search-svc.
pub struct Downstream {
    embed: pb::embed_service_client::EmbedServiceClient<Channel>,
    index: pb::index_service_client::IndexServiceClient<Channel>,
    chunkers: Mutex<HashMap<String, Arc<Chunker>>>,
    chunk_bytes: usize,
    /// Deadline of one downstream call when the caller set none (a worker's calls): the
    /// default deadline of the limits.
    call_timeout: Duration,
}

impl Downstream {
    /// Clients over the given channels, with message limits from `limits`.
    pub fn new(embed: Channel, index: Channel, limits: &smartdb_kit::limits::Limits) -> Self {
        let max = limits.message_bytes();
        Self {
            embed: pb::embed_service_client::EmbedServiceClient::new(embed)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            index: pb::index_service_client::IndexServiceClient::new(index)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            chunkers: Mutex::default(),
            chunk_bytes: limits.chunk_bytes,
            call_timeout: limits.default_deadline,
        }
    }

    /// Describes an embedding model (empty = default); INVALID_ARGUMENT on `embedding_model` if unknown.
    pub async fn model_info(&self, ctx: &CallContext, model: &str) -> Result<pb::ModelInfo> {
        let request = ctx.request(
            pb::GetModelInfoRequest {
                model: model.to_owned(),
            },
            self.call_timeout,
        );
        let response = within(
            self.call_timeout,
            self.embed.clone().get_model_info(request),
        )
        .await
        .map_err(|s| match s.code() {
            tonic::Code::InvalidArgument => {
                Error::invalid("embedding_model", s.message().to_owned())
            }
            _ => Error::from_downstream("embed-svc", s),
        })?;
        response
            .into_inner()
            .model
            .ok_or_else(|| Error::Internal("embed-svc returned no model info".into()))
    }

    /// The chunker for a model, built from the model's tokenizer once and then reused.
    pub async fn chunker(&self, ctx: &CallContext, model: &str) -> Result<Arc<Chunker>> {
        if let Some(chunker) = self.chunkers.lock().expect("chunkers lock").get(model) {
            return Ok(chunker.clone());
        }
        let request = ctx.request(
            pb::GetTokenizerRequest {
                model: model.to_owned(),
            },
            self.call_timeout,
        );
        let response = within(self.call_timeout, self.embed.clone().get_tokenizer(request))
            .await
            .map_err(|s| Error::from_downstream("embed-svc", s))?
            .into_inner();
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
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(EMBED_BATCH) {
            let request = ctx.request(
                pb::EmbedRequest {
                    texts: batch.to_vec(),
                    kind: pb::InputKind::Document as i32,
                    model: model.to_owned(),
                },
                self.call_timeout,
            );
            let response = within(self.call_timeout, self.embed.clone().embed(request))
                .await
                .map_err(|s| Error::from_downstream("embed-svc", s))?;
            let embeddings = response.into_inner().embeddings;
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
        let mut index = self.index.clone();
        let response = within(
            self.call_timeout,
            index.create_collection(ctx.request(request, self.call_timeout)),
        )
        .await
        .map_err(|s| Error::from_downstream("search-svc", s))?
        .into_inner();
        Ok(if response.knowledge_base_id.is_empty() {
            requested
        } else {
            response.knowledge_base_id
        })
    }

    /// Drops a knowledge base's collection.
    pub async fn delete_collection(&self, ctx: &CallContext, kb_id: &str) -> Result<()> {
        let request = pb::DeleteCollectionRequest {
            knowledge_base_id: kb_id.to_owned(),
        };
        let mut index = self.index.clone();
        within(
            self.call_timeout,
            index.delete_collection(ctx.request(request, self.call_timeout)),
        )
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
            let mut index = self.index.clone();
            within(
                self.call_timeout,
                index.upsert_points(ctx.request(request, self.call_timeout)),
            )
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
        for batch in ids.chunks(1024) {
            let request = pb::DeletePointsRequest {
                knowledge_base_id: kb_id.to_owned(),
                point_ids: batch.to_vec(),
            };
            let mut index = self.index.clone();
            within(
                self.call_timeout,
                index.delete_points(ctx.request(request, self.call_timeout)),
            )
            .await
            .map_err(|s| Error::from_downstream("search-svc", s))?;
        }
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
