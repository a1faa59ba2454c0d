//! `KnowledgeBaseService` and `DocumentService` over gRPC: decode, call the [`Catalog`], encode.

use std::sync::Arc;

use smartdb_kit::context::CallContext;
use smartdb_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::{Arrival, Catalog, NewDocument, Upload};
use crate::error::Error;
use crate::extract::ContentType;
use crate::store::{self, Document, KnowledgeBase};

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn kb_to_pb(kb: KnowledgeBase) -> pb::KnowledgeBase {
    pb::KnowledgeBase {
        id: kb.id,
        name: kb.name,
        description: kb.description,
        embedding_model: kb.embedding_model,
        document_count: kb.document_count,
        create_time: Some(timestamp(kb.create_time)),
        reindex: kb.reindex.map(|r| pb::ReindexProgress {
            documents_total: r.total,
            documents_remaining: r.remaining,
            start_time: Some(timestamp(r.start_time)),
        }),
    }
}

fn doc_to_pb(kb_name: &str, doc: Document) -> pb::Document {
    pb::Document {
        id: doc.id,
        knowledge_base: kb_name.to_owned(),
        title: doc.title,
        source_name: doc.source_name,
        content_type: doc.content_type,
        size_bytes: doc.size_bytes,
        sha256: doc.sha256,
        status: doc.status as i32,
        error: doc.error,
        chunk_count: doc.chunk_count,
        metadata: doc.metadata.into_iter().collect(),
        create_time: Some(timestamp(doc.create_time)),
        update_time: Some(timestamp(doc.update_time)),
        attempts: doc.attempts,
        source_id: doc.source_id,
    }
}

/// The gRPC face of the catalog: both public catalog services.
#[derive(Clone)]
pub struct CatalogGrpc {
    catalog: Arc<Catalog>,
}

impl CatalogGrpc {
    /// Serves `catalog`.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self { catalog }
    }

    /// Finishes an upload, optionally waits for indexing, and builds the response parts.
    async fn ingest(
        &self,
        ctx: &CallContext,
        upload: Upload,
        kb_name: &str,
        wait: bool,
    ) -> Result<(pb::Document, bool), Error> {
        let (mut doc, deduplicated) = self.catalog.finish_upload(upload).await?;
        if wait {
            doc = self.catalog.wait_indexed(ctx, doc).await?;
        }
        Ok((doc_to_pb(kb_name, doc), deduplicated))
    }
}

#[tonic::async_trait]
impl pb::knowledge_base_service_server::KnowledgeBaseService for CatalogGrpc {
    async fn create_knowledge_base(
        &self,
        request: Request<pb::CreateKnowledgeBaseRequest>,
    ) -> Result<Response<pb::CreateKnowledgeBaseResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let r = request.into_inner();
        let kb = self
            .catalog
            .create_kb(&ctx, &r.name, &r.description, &r.embedding_model)
            .await?;
        Ok(Response::new(pb::CreateKnowledgeBaseResponse {
            knowledge_base: Some(kb_to_pb(kb)),
        }))
    }

    async fn get_knowledge_base(
        &self,
        request: Request<pb::GetKnowledgeBaseRequest>,
    ) -> Result<Response<pb::GetKnowledgeBaseResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let kb = self
            .catalog
            .describe_kb(&ctx, &request.into_inner().name)
            .await?;
        Ok(Response::new(pb::GetKnowledgeBaseResponse {
            knowledge_base: Some(kb_to_pb(kb)),
        }))
    }

    async fn list_knowledge_bases(
        &self,
        request: Request<pb::ListKnowledgeBasesRequest>,
    ) -> Result<Response<pb::ListKnowledgeBasesResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let r = request.into_inner();
        let (page, next_page_token) = self
            .catalog
            .list_kbs(&ctx, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListKnowledgeBasesResponse {
            knowledge_bases: page.into_iter().map(kb_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn delete_knowledge_base(
        &self,
        request: Request<pb::DeleteKnowledgeBaseRequest>,
    ) -> Result<Response<pb::DeleteKnowledgeBaseResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let deleted_documents = self
            .catalog
            .delete_kb(&ctx, &request.into_inner().name)
            .await?;
        Ok(Response::new(pb::DeleteKnowledgeBaseResponse {
            deleted_documents,
        }))
    }

    async fn reindex_knowledge_base(
        &self,
        request: Request<pb::ReindexKnowledgeBaseRequest>,
    ) -> Result<Response<pb::ReindexKnowledgeBaseResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let kb = self
            .catalog
            .reindex_kb(&ctx, &request.into_inner().name)
            .await?;
        Ok(Response::new(pb::ReindexKnowledgeBaseResponse {
            knowledge_base: Some(kb_to_pb(kb)),
        }))
    }
}

#[tonic::async_trait]
impl pb::document_service_server::DocumentService for CatalogGrpc {
    async fn upload_document(
        &self,
        request: Request<Streaming<pb::UploadDocumentRequest>>,
    ) -> Result<Response<pb::UploadDocumentResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::UploadDocumentRequest {
                payload: Some(pb::upload_document_request::Payload::Header(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(Error::invalid(
                    "header",
                    "the first message of an upload must carry the header",
                )
                .into());
            }
            Some(Err(status)) => return Err(status),
            None => return Err(Error::invalid("header", "the upload stream was empty").into()),
        };
        let kb_name = header.knowledge_base.clone();
        let declared = match header.content_type.trim() {
            "" => None,
            given => Some(ContentType::parse(given).ok_or_else(|| {
                Error::invalid(
                    "header.content_type",
                    format!(
                        "unsupported content type {given:?}; {}",
                        crate::extract::SUPPORTED
                    ),
                )
            })?),
        };
        // Everything about the document is checked before its bytes are taken in.
        let mut upload = self
            .catalog
            .begin_upload(
                &ctx,
                NewDocument {
                    knowledge_base: header.knowledge_base,
                    title: header.title,
                    source_name: header.source_name,
                    source_id: header.source_id,
                    metadata: header.metadata.into_iter().collect(),
                    format: declared,
                    arrival: Arrival::File,
                },
            )
            .await?;
        // Pieces go to disk as they arrive. A stream that breaks off ends here with its error,
        // and dropping the upload removes what was written: nothing is stored.
        while let Some(message) = stream.next().await {
            match message?.payload {
                Some(pb::upload_document_request::Payload::Data(data)) => {
                    upload.write(&data).await?;
                }
                Some(pb::upload_document_request::Payload::Header(_)) => {
                    return Err(Error::invalid(
                        "header",
                        "only the first message may carry a header",
                    )
                    .into());
                }
                None => {}
            }
        }
        let (document, deduplicated) = self.ingest(&ctx, upload, &kb_name, header.wait).await?;
        Ok(Response::new(pb::UploadDocumentResponse {
            document: Some(document),
            deduplicated,
        }))
    }

    async fn ingest_text(
        &self,
        request: Request<pb::IngestTextRequest>,
    ) -> Result<Response<pb::IngestTextResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let r = request.into_inner();
        if r.text.trim().is_empty() {
            return Err(Error::invalid("text", "must not be empty").into());
        }
        if r.text.len() > self.catalog.limits().document_bytes() {
            return Err(Error::ResourceExhausted {
                message: format!(
                    "text is {} bytes, the limit is {} bytes (max-document-mb)",
                    r.text.len(),
                    self.catalog.limits().document_bytes()
                ),
                retry_after: None,
            }
            .into());
        }
        let format = match pb::TextFormat::try_from(r.format) {
            Ok(pb::TextFormat::Plain) => Some(ContentType::Plain),
            Ok(pb::TextFormat::Markdown) => Some(ContentType::Markdown),
            Ok(pb::TextFormat::Html) => Some(ContentType::Html),
            Ok(pb::TextFormat::Unspecified) => None,
            Err(_) => {
                return Err(
                    Error::invalid("format", format!("unknown format {}", r.format)).into(),
                );
            }
        };
        // Text that arrives as text is text: it is stored as given, never sniffed.
        let mut upload = self
            .catalog
            .begin_upload(
                &ctx,
                NewDocument {
                    knowledge_base: r.knowledge_base.clone(),
                    title: r.title,
                    source_name: String::new(),
                    source_id: r.source_id,
                    metadata: r.metadata.into_iter().collect(),
                    format,
                    arrival: Arrival::Text,
                },
            )
            .await?;
        upload.write(r.text.as_bytes()).await?;
        drop(r.text);
        let (document, deduplicated) = self.ingest(&ctx, upload, &r.knowledge_base, r.wait).await?;
        Ok(Response::new(pb::IngestTextResponse {
            document: Some(document),
            deduplicated,
        }))
    }

    async fn get_document(
        &self,
        request: Request<pb::GetDocumentRequest>,
    ) -> Result<Response<pb::GetDocumentResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let r = request.into_inner();
        let (kb, doc) = self
            .catalog
            .get_document(&ctx, &r.knowledge_base, &r.document_id)
            .await?;
        Ok(Response::new(pb::GetDocumentResponse {
            document: Some(doc_to_pb(&kb.name, doc)),
        }))
    }

    async fn list_documents(
        &self,
        request: Request<pb::ListDocumentsRequest>,
    ) -> Result<Response<pb::ListDocumentsResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let r = request.into_inner();
        let (kb, docs, next_page_token) = self
            .catalog
            .list_documents(&ctx, &r.knowledge_base, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListDocumentsResponse {
            documents: docs.into_iter().map(|d| doc_to_pb(&kb.name, d)).collect(),
            next_page_token,
        }))
    }

    async fn delete_document(
        &self,
        request: Request<pb::DeleteDocumentRequest>,
    ) -> Result<Response<pb::DeleteDocumentResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let r = request.into_inner();
        let removed = self
            .catalog
            .delete_document(&ctx, &r.knowledge_base, &r.document_id)
            .await?;
        Ok(Response::new(pb::DeleteDocumentResponse {
            deleted_chunks: removed.unwrap_or(0),
        }))
    }

    async fn retry_document(
        &self,
        request: Request<pb::RetryDocumentRequest>,
    ) -> Result<Response<pb::RetryDocumentResponse>, Status> {
        let ctx = CallContext::from_request(&request);
        let r = request.into_inner();
        let doc = self
            .catalog
            .retry_document(&ctx, &r.knowledge_base, &r.document_id)
            .await?;
        Ok(Response::new(pb::RetryDocumentResponse {
            document: Some(doc_to_pb(&r.knowledge_base, doc)),
        }))
    }
}

// Status values are shared with the proto enum; keep them in step.
const _: () = assert!(store::Status::Deleting as i32 == pb::DocumentStatus::Deleting as i32);
