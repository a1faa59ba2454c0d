//! Forwarding public calls to the service that owns the data, once the edge let them in, with
//! the caller's context (tenant, deadline, request id) and nothing the caller could forge.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use smartdb_kit::client::{Balancer, Downstream, Rpc};
use smartdb_kit::limits::Limits;
use smartdb_proto::v1 as pb;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

use crate::edge::Edge;
use crate::validate::Validate;

/// What the audit log says about a request (never its content or a secret).
trait Described {
    /// Names what the call is about, e.g. the knowledge base and document.
    fn detail(&self) -> String {
        String::new()
    }
}

fn short(text: &str) -> &str {
    smartdb_kit::limits::truncate(text, 80)
}

impl Described for pb::DeleteKnowledgeBaseRequest {
    fn detail(&self) -> String {
        format!("knowledge base {}", short(&self.name))
    }
}

impl Described for pb::ReindexKnowledgeBaseRequest {
    fn detail(&self) -> String {
        format!("knowledge base {}", short(&self.name))
    }
}

impl Described for pb::DeleteDocumentRequest {
    fn detail(&self) -> String {
        format!(
            "knowledge base {}, document {}",
            short(&self.knowledge_base),
            short(&self.document_id)
        )
    }
}

impl Described for pb::CreateKnowledgeBaseRequest {}
impl Described for pb::GetKnowledgeBaseRequest {}
impl Described for pb::ListKnowledgeBasesRequest {}
impl Described for pb::GetDocumentRequest {}
impl Described for pb::ListDocumentsRequest {}
impl Described for pb::RetryDocumentRequest {}
impl Described for pb::SearchRequest {}

/// Clients of the owning services (through the shared client stack).
#[derive(Clone)]
pub struct Forward {
    edge: Arc<Edge>,
    limits: Arc<Limits>,
    ingest: Downstream,
    search: Downstream,
    upload_timeout: Duration,
}

type KbClient = pb::knowledge_base_service_client::KnowledgeBaseServiceClient<Balancer>;
type DocClient = pb::document_service_client::DocumentServiceClient<Balancer>;
type SearchClient = pb::search_service_client::SearchServiceClient<Balancer>;

impl Forward {
    /// Forwarder to ingest-svc and search-svc of calls `edge` admits, with the upload deadline
    /// from `limits`.
    pub fn new(edge: Arc<Edge>, ingest: Downstream, search: Downstream, limits: &Limits) -> Self {
        Self {
            edge,
            limits: Arc::new(limits.clone()),
            ingest,
            search,
            upload_timeout: limits.upload_deadline,
        }
    }
}

fn kb_client(channel: Balancer, max: usize) -> KbClient {
    KbClient::new(channel)
        .max_encoding_message_size(max)
        .max_decoding_message_size(max)
}

fn doc_client(channel: Balancer, max: usize) -> DocClient {
    DocClient::new(channel)
        .max_encoding_message_size(max)
        .max_decoding_message_size(max)
}

fn search_client(channel: Balancer, max: usize) -> SearchClient {
    SearchClient::new(channel)
        .max_encoding_message_size(max)
        .max_decoding_message_size(max)
}

/// An upload's messages on their way downstream. When the client's stream fails, the relay
/// neither ends nor fails the forwarded stream (ending it would let ingest-svc store a
/// truncated file): it stays pending and reports the failure, and the gateway then drops the
/// downstream call, which resets its stream, so nothing is stored.
struct Relay {
    /// The header, read (and checked) before the relay started.
    first: Option<pb::UploadDocumentRequest>,
    incoming: Streaming<pb::UploadDocumentRequest>,
    failed: Option<oneshot::Sender<Status>>,
}

impl tokio_stream::Stream for Relay {
    type Item = pb::UploadDocumentRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed.is_none() {
            return Poll::Pending;
        }
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(first));
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

/// Admits a unary call to `$path` at the edge and checks it, then forwards it to `$downstream`
/// through the client stack (`$rpc` says whether it may be retried) with the caller's context,
/// and audits it if its RPC is audited.
macro_rules! unary {
    ($self:ident, $path:literal, $downstream:ident, $client:ident, $method:ident, $rpc:expr, $request:ident) => {{
        let admitted = $self.edge.admit(&$request, $path).await?;
        let max = $self.$downstream.max_message_bytes();
        let message = $request.into_inner();
        let detail = if admitted.policy.audit.is_some() {
            Described::detail(&message)
        } else {
            String::new()
        };
        // A refused request is audited like a failed one.
        let result = match message.validate(&$self.limits) {
            Err(error) => Err(Status::from(error)),
            Ok(()) => {
                $self
                    .$downstream
                    .call(&admitted.ctx, $rpc, message, move |ch, req| async move {
                        $client(ch, max).$method(req).await
                    })
                    .await
            }
        };
        $self.edge.audit_call(&admitted, detail, &result);
        result.map(Response::new)
    }};
}

#[tonic::async_trait]
impl pb::knowledge_base_service_server::KnowledgeBaseService for Forward {
    async fn create_knowledge_base(
        &self,
        request: Request<pb::CreateKnowledgeBaseRequest>,
    ) -> Result<Response<pb::CreateKnowledgeBaseResponse>, Status> {
        unary!(
            self,
            "/smartdb.v1.KnowledgeBaseService/CreateKnowledgeBase",
            ingest,
            kb_client,
            create_knowledge_base,
            Rpc::once("CreateKnowledgeBase"),
            request
        )
    }

    async fn get_knowledge_base(
        &self,
        request: Request<pb::GetKnowledgeBaseRequest>,
    ) -> Result<Response<pb::GetKnowledgeBaseResponse>, Status> {
        unary!(
            self,
            "/smartdb.v1.KnowledgeBaseService/GetKnowledgeBase",
            ingest,
            kb_client,
            get_knowledge_base,
            Rpc::idempotent("GetKnowledgeBase"),
            request
        )
    }

    async fn list_knowledge_bases(
        &self,
        request: Request<pb::ListKnowledgeBasesRequest>,
    ) -> Result<Response<pb::ListKnowledgeBasesResponse>, Status> {
        unary!(
            self,
            "/smartdb.v1.KnowledgeBaseService/ListKnowledgeBases",
            ingest,
            kb_client,
            list_knowledge_bases,
            Rpc::idempotent("ListKnowledgeBases"),
            request
        )
    }

    async fn delete_knowledge_base(
        &self,
        request: Request<pb::DeleteKnowledgeBaseRequest>,
    ) -> Result<Response<pb::DeleteKnowledgeBaseResponse>, Status> {
        unary!(
            self,
            "/smartdb.v1.KnowledgeBaseService/DeleteKnowledgeBase",
            ingest,
            kb_client,
            delete_knowledge_base,
            Rpc::once("DeleteKnowledgeBase"),
            request
        )
    }

    async fn reindex_knowledge_base(
        &self,
        request: Request<pb::ReindexKnowledgeBaseRequest>,
    ) -> Result<Response<pb::ReindexKnowledgeBaseResponse>, Status> {
        // Idempotent: a repeat while one runs only reports its progress.
        unary!(
            self,
            "/smartdb.v1.KnowledgeBaseService/ReindexKnowledgeBase",
            ingest,
            kb_client,
            reindex_knowledge_base,
            Rpc::idempotent("ReindexKnowledgeBase"),
            request
        )
    }
}

#[tonic::async_trait]
impl pb::document_service_server::DocumentService for Forward {
    async fn upload_document(
        &self,
        request: Request<Streaming<pb::UploadDocumentRequest>>,
    ) -> Result<Response<pb::UploadDocumentResponse>, Status> {
        let ctx = self
            .edge
            .admit(&request, "/smartdb.v1.DocumentService/UploadDocument")
            .await?
            .ctx;
        // Pieces pass straight through (tonic pulls the next one when the last is sent), so
        // memory stays bounded; a client stream that breaks off aborts the downstream call.
        let mut incoming = request.into_inner();
        // The header is checked here; what follows it passes through unread.
        let first = incoming.message().await?;
        if let Some(pb::UploadDocumentRequest {
            payload: Some(pb::upload_document_request::Payload::Header(header)),
        }) = &first
        {
            header.validate(&self.limits).map_err(Status::from)?;
        }
        let (failed_tx, failed_rx) = oneshot::channel::<Status>();
        let relay = Relay {
            first,
            incoming,
            failed: Some(failed_tx),
        };
        let outgoing = ctx.request(relay, self.upload_timeout);
        // A stream cannot be replayed: uploads are balanced and bounded, never retried.
        let mut docs = doc_client(self.ingest.channel(), self.ingest.max_message_bytes());
        let call = docs.upload_document(outgoing);
        tokio::select! {
            biased;
            Ok(status) = failed_rx => Err(Status::cancelled(format!(
                "upload aborted by the client, nothing was stored: {}",
                status.message()
            ))),
            result = call => result,
        }
    }

    async fn ingest_text(
        &self,
        request: Request<pb::IngestTextRequest>,
    ) -> Result<Response<pb::IngestTextResponse>, Status> {
        // Retrying is harmless: the same text in the same knowledge base is deduplicated.
        let mut ctx = self
            .edge
            .admit(&request, "/smartdb.v1.DocumentService/IngestText")
            .await?
            .ctx;
        if ctx.deadline.is_none() {
            ctx.deadline = Some(std::time::Instant::now() + self.upload_timeout);
        }
        let max = self.ingest.max_message_bytes();
        let message = request.into_inner();
        message.validate(&self.limits).map_err(Status::from)?;
        self.ingest
            .call(
                &ctx,
                Rpc::idempotent("IngestText"),
                message,
                move |ch, req| async move { doc_client(ch, max).ingest_text(req).await },
            )
            .await
            .map(Response::new)
    }

    async fn get_document(
        &self,
        request: Request<pb::GetDocumentRequest>,
    ) -> Result<Response<pb::GetDocumentResponse>, Status> {
        unary!(
            self,
            "/smartdb.v1.DocumentService/GetDocument",
            ingest,
            doc_client,
            get_document,
            Rpc::idempotent("GetDocument"),
            request
        )
    }

    async fn list_documents(
        &self,
        request: Request<pb::ListDocumentsRequest>,
    ) -> Result<Response<pb::ListDocumentsResponse>, Status> {
        unary!(
            self,
            "/smartdb.v1.DocumentService/ListDocuments",
            ingest,
            doc_client,
            list_documents,
            Rpc::idempotent("ListDocuments"),
            request
        )
    }

    async fn delete_document(
        &self,
        request: Request<pb::DeleteDocumentRequest>,
    ) -> Result<Response<pb::DeleteDocumentResponse>, Status> {
        unary!(
            self,
            "/smartdb.v1.DocumentService/DeleteDocument",
            ingest,
            doc_client,
            delete_document,
            Rpc::once("DeleteDocument"),
            request
        )
    }

    async fn retry_document(
        &self,
        request: Request<pb::RetryDocumentRequest>,
    ) -> Result<Response<pb::RetryDocumentResponse>, Status> {
        unary!(
            self,
            "/smartdb.v1.DocumentService/RetryDocument",
            ingest,
            doc_client,
            retry_document,
            Rpc::once("RetryDocument"),
            request
        )
    }
}

#[tonic::async_trait]
impl pb::search_service_server::SearchService for Forward {
    async fn search(
        &self,
        request: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        unary!(
            self,
            "/smartdb.v1.SearchService/Search",
            search,
            search_client,
            search,
            Rpc::idempotent("Search"),
            request
        )
    }
}
