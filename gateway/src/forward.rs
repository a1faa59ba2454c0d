//! Forwarding public calls to the service that owns the data, with the caller's context
//! (tenant, deadline, request id) and nothing the caller could forge.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use smartdb_kit::context::{CallContext, strip_internal};
use smartdb_kit::limits::Limits;
use smartdb_proto::v1 as pb;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

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
    /// Deadline of a forwarded call when none reached us (calls through the server always have
    /// one: the admission layer sets it).
    default_timeout: Duration,
    upload_timeout: Duration,
}

impl Forward {
    /// Forwarder over channels to ingest-svc and search-svc, with message limits (the same as
    /// every server's: the largest valid answer fits) and deadlines from `limits`.
    pub fn new(ingest: Channel, search: Channel, limits: &Limits) -> Self {
        let max = limits.message_bytes();
        Self {
            kbs: pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(ingest.clone())
                .max_encoding_message_size(max)
                .max_decoding_message_size(max),
            docs: pb::document_service_client::DocumentServiceClient::new(ingest)
                .max_encoding_message_size(max)
                .max_decoding_message_size(max),
            search: pb::search_service_client::SearchServiceClient::new(search)
                .max_encoding_message_size(max)
                .max_decoding_message_size(max),
            default_timeout: limits.default_deadline,
            upload_timeout: limits.upload_deadline,
        }
    }
}

/// An upload's messages on their way downstream. When the client's stream fails, the relay
/// neither ends nor fails the forwarded stream (ending it would let ingest-svc store a
/// truncated file): it stays pending and reports the failure, and the gateway then drops the
/// downstream call, which resets its stream, so nothing is stored.
struct Relay {
    incoming: Streaming<pb::UploadDocumentRequest>,
    failed: Option<oneshot::Sender<Status>>,
}

impl tokio_stream::Stream for Relay {
    type Item = pb::UploadDocumentRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed.is_none() {
            return Poll::Pending;
        }
        match Pin::new(&mut self.incoming).poll_next(cx) {
            Poll::Ready(Some(Ok(message))) => Poll::Ready(Some(message)),
            Poll::Ready(Some(Err(status))) => {
                if let Some(failed) = self.failed.take() {
                    let _ = failed.send(status);
                }
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
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
        let outgoing = ctx.request($request.into_inner(), $self.default_timeout);
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
        // Pieces pass straight through (tonic pulls the next one when the last is sent), so
        // memory stays bounded; a client stream that breaks off aborts the downstream call.
        let (failed_tx, failed_rx) = oneshot::channel::<Status>();
        let relay = Relay {
            incoming: request.into_inner(),
            failed: Some(failed_tx),
        };
        let outgoing = ctx.request(relay, self.upload_timeout);
        let mut docs = self.docs.clone();
        let call = docs.upload_document(outgoing);
        tokio::select! {
            biased;
            Ok(status) = failed_rx => Err(Status::cancelled(format!(
                "upload aborted by the client, nothing was stored: {}",
                status.message()
            ))),
            result = call => result.map_err(|s| downstream_error("ingest-svc", s)),
        }
    }

    async fn ingest_text(
        &self,
        request: Request<pb::IngestTextRequest>,
    ) -> Result<Response<pb::IngestTextResponse>, Status> {
        let ctx = edge_context(&request);
        let outgoing = ctx.request(request.into_inner(), self.upload_timeout);
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

    async fn retry_document(
        &self,
        request: Request<pb::RetryDocumentRequest>,
    ) -> Result<Response<pb::RetryDocumentResponse>, Status> {
        unary!(self, docs, retry_document, request, "ingest-svc")
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
