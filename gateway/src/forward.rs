//! Forwarding public calls to the service that owns the data, with the caller's context
//! (tenant, deadline, request id) and nothing the caller could forge.

use std::time::Duration;

use smartdb_kit::context::{CallContext, strip_internal};
use smartdb_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// Time allowed for a forwarded call when the caller set no deadline.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for uploads when the caller set no deadline (they may wait for indexing).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Builds the context of a call entering the cluster: internal metadata is dropped, so the
/// tenant is the one the gateway decides (the default tenant until authentication exists).
pub fn edge_context<T>(request: &Request<T>) -> CallContext {
    let mut metadata = request.metadata().clone();
    strip_internal(&mut metadata);
    CallContext::from_metadata(&metadata)
}

/// Clients of the owning services.
#[derive(Clone)]
pub struct Forward {
    kbs: pb::knowledge_base_service_client::KnowledgeBaseServiceClient<Channel>,
    docs: pb::document_service_client::DocumentServiceClient<Channel>,
    search: pb::search_service_client::SearchServiceClient<Channel>,
}

impl Forward {
    /// Forwarder over channels to ingest-svc and search-svc.
    pub fn new(ingest: Channel, search: Channel) -> Self {
        let max = smartdb_kit::server::MAX_MESSAGE_BYTES;
        Self {
            kbs: pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(ingest.clone()),
            docs: pb::document_service_client::DocumentServiceClient::new(ingest)
                .max_encoding_message_size(max)
                .max_decoding_message_size(max),
            search: pb::search_service_client::SearchServiceClient::new(search),
        }
    }
}

/// Makes a transport failure say which service could not be reached.
fn downstream_error(service: &str, status: Status) -> Status {
    match status.code() {
        tonic::Code::Unavailable if !status.message().contains(service) => {
            Status::unavailable(format!("{service} is unavailable: {}", status.message()))
        }
        _ => status,
    }
}

macro_rules! unary {
    ($self:ident, $client:ident, $method:ident, $request:ident, $service:literal) => {{
        let ctx = edge_context(&$request);
        let outgoing = ctx.request($request.into_inner(), DEFAULT_TIMEOUT);
        $self
            .$client
            .clone()
            .$method(outgoing)
            .await
            .map_err(|s| downstream_error($service, s))
    }};
}

#[tonic::async_trait]
impl pb::knowledge_base_service_server::KnowledgeBaseService for Forward {
    async fn create_knowledge_base(
        &self,
        request: Request<pb::CreateKnowledgeBaseRequest>,
    ) -> Result<Response<pb::CreateKnowledgeBaseResponse>, Status> {
        unary!(self, kbs, create_knowledge_base, request, "ingest-svc")
    }

    async fn get_knowledge_base(
        &self,
        request: Request<pb::GetKnowledgeBaseRequest>,
    ) -> Result<Response<pb::GetKnowledgeBaseResponse>, Status> {
        unary!(self, kbs, get_knowledge_base, request, "ingest-svc")
    }

    async fn list_knowledge_bases(
        &self,
        request: Request<pb::ListKnowledgeBasesRequest>,
    ) -> Result<Response<pb::ListKnowledgeBasesResponse>, Status> {
        unary!(self, kbs, list_knowledge_bases, request, "ingest-svc")
    }

    async fn delete_knowledge_base(
        &self,
        request: Request<pb::DeleteKnowledgeBaseRequest>,
    ) -> Result<Response<pb::DeleteKnowledgeBaseResponse>, Status> {
        unary!(self, kbs, delete_knowledge_base, request, "ingest-svc")
    }
}

#[tonic::async_trait]
impl pb::document_service_server::DocumentService for Forward {
    async fn upload_document(
        &self,
        request: Request<Streaming<pb::UploadDocumentRequest>>,
    ) -> Result<Response<pb::UploadDocumentResponse>, Status> {
        let ctx = edge_context(&request);
        let mut incoming = request.into_inner();
        // Pieces pass through a small channel, so memory stays bounded and a client that breaks
        // off mid-upload cancels the downstream call instead of completing a truncated file.
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadDocumentRequest>(4);
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<Status>();
        tokio::spawn(async move {
            while let Some(message) = incoming.next().await {
                match message {
                    Ok(m) => {
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        let _ = failed_tx.send(status);
                        return;
                    }
                }
            }
        });
        let outgoing = ctx.request(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            UPLOAD_TIMEOUT,
        );
        let mut docs = self.docs.clone();
        let call = docs.upload_document(outgoing);
        tokio::select! {
            result = call => result.map_err(|s| downstream_error("ingest-svc", s)),
            Ok(status) = failed_rx => Err(Status::cancelled(format!("upload aborted by the client: {}", status.message()))),
        }
    }

    async fn ingest_text(
        &self,
        request: Request<pb::IngestTextRequest>,
    ) -> Result<Response<pb::IngestTextResponse>, Status> {
        let ctx = edge_context(&request);
        let outgoing = ctx.request(request.into_inner(), UPLOAD_TIMEOUT);
        self.docs
            .clone()
            .ingest_text(outgoing)
            .await
            .map_err(|s| downstream_error("ingest-svc", s))
    }

    async fn get_document(
        &self,
        request: Request<pb::GetDocumentRequest>,
    ) -> Result<Response<pb::GetDocumentResponse>, Status> {
        unary!(self, docs, get_document, request, "ingest-svc")
    }

    async fn list_documents(
        &self,
        request: Request<pb::ListDocumentsRequest>,
    ) -> Result<Response<pb::ListDocumentsResponse>, Status> {
        unary!(self, docs, list_documents, request, "ingest-svc")
    }

    async fn delete_document(
        &self,
        request: Request<pb::DeleteDocumentRequest>,
    ) -> Result<Response<pb::DeleteDocumentResponse>, Status> {
        unary!(self, docs, delete_document, request, "ingest-svc")
    }
}

#[tonic::async_trait]
impl pb::search_service_server::SearchService for Forward {
    async fn search(
        &self,
        request: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        unary!(self, search, search, request, "search-svc")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_cannot_choose_their_tenant() {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("x-smartdb-tenant", "someone-else".parse().unwrap());
        assert_eq!(
            edge_context(&request).tenant,
            smartdb_kit::context::DEFAULT_TENANT
        );
    }
}
