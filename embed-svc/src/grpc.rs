//! `EmbedService` over gRPC: decode, call the [`Embedder`], encode. Nothing else lives here.

use std::sync::Arc;

use smartdb_proto::v1 as pb;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};

use crate::embedder::Embedder;
use crate::error::Error;
use crate::provider::InputKind;

/// The gRPC face of embed-svc. The embedder is set once the model has loaded; until then
/// calls answer UNAVAILABLE.
#[derive(Clone)]
pub struct EmbedGrpc {
    embedder: Arc<OnceCell<Arc<Embedder>>>,
}

impl EmbedGrpc {
    /// A service answering UNAVAILABLE until `embedder` is set.
    pub fn new(embedder: Arc<OnceCell<Arc<Embedder>>>) -> Self {
        Self { embedder }
    }

    fn embedder(&self) -> Result<&Arc<Embedder>, Error> {
        self.embedder
            .get()
            .ok_or_else(|| Error::Unavailable("the embedding model is still loading".into()))
    }
}

fn model_info(d: crate::provider::ModelDescriptor) -> pb::ModelInfo {
    pb::ModelInfo {
        id: d.id,
        dimension: d.dimension as u32,
        max_input_tokens: d.max_input_tokens as u32,
        provider: d.provider.to_owned(),
        query_prefix: d.query_prefix,
        document_prefix: d.document_prefix,
        max_batch_size: crate::embedder::MAX_BATCH as u32,
    }
}

#[tonic::async_trait]
impl pb::embed_service_server::EmbedService for EmbedGrpc {
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let request = request.into_inner();
        let kind = match pb::InputKind::try_from(request.kind) {
            Ok(pb::InputKind::Query) => InputKind::Query,
            Ok(pb::InputKind::Document | pb::InputKind::Unspecified) => InputKind::Document,
            Err(_) => {
                return Err(
                    Error::invalid("kind", format!("unknown input kind {}", request.kind)).into(),
                );
            }
        };
        let out = self
            .embedder()?
            .embed(request.texts, kind, &request.model)
            .await?;
        let truncated_count = out.vectors.iter().filter(|v| v.truncated).count() as u32;
        Ok(Response::new(pb::EmbedResponse {
            embeddings: out
                .vectors
                .into_iter()
                .map(|v| pb::Embedding {
                    values: v.values.to_vec(),
                    truncated: v.truncated,
                })
                .collect(),
            model: out.model,
            dimension: out.dimension as u32,
            truncated_count,
            cache_hits: out.cache_hits as u32,
        }))
    }

    async fn get_model_info(
        &self,
        request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::GetModelInfoResponse>, Status> {
        let descriptor = self.embedder()?.describe(&request.into_inner().model)?;
        Ok(Response::new(pb::GetModelInfoResponse {
            model: Some(model_info(descriptor)),
        }))
    }

    async fn get_tokenizer(
        &self,
        request: Request<pb::GetTokenizerRequest>,
    ) -> Result<Response<pb::GetTokenizerResponse>, Status> {
        let provider = self.embedder()?.provider(&request.into_inner().model)?;
        let descriptor = provider.descriptor();
        // Remote models don't share theirs: empty tells the caller to measure in characters.
        let tokenizer_json = provider.tokenizer_json().unwrap_or_default();
        Ok(Response::new(pb::GetTokenizerResponse {
            tokenizer_json,
            max_input_tokens: descriptor.max_input_tokens as u32,
            model: descriptor.id.clone(),
        }))
    }
}
