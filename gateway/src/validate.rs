//! Checks every public request at the edge before it travels on, with the limits every
//! service shares (`kit::limits`): a bad request costs no downstream call and gets
//! INVALID_ARGUMENT with a `BadRequest` naming the field and the rule. The owning services
//! check again (they are reachable without the gateway inside the cluster), with more context
//! (e.g. the filters search-svc knows).

use smartdb_kit::limits::{self, Limits};
use smartdb_proto::v1 as pb;

use crate::error::{Error, Result};

/// A request the gateway can check.
pub trait Validate {
    /// Ok, or the first field that breaks a rule.
    fn validate(&self, limits: &Limits) -> Result<()>;
}

fn kb(field: &str, name: &str) -> Result<()> {
    limits::check_kb_name(name).map_err(|m| Error::invalid(field, m))
}

fn len(field: &str, value: &str, max: usize) -> Result<()> {
    limits::check_len(value, max).map_err(|m| Error::invalid(field, m))
}

fn document_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid("document_id", "is required"));
    }
    len("document_id", id, limits::ID_BYTES)
}

fn page(limits: &Limits, page_size: u32, token: &str) -> Result<()> {
    limits
        .page_size(page_size)
        .map_err(|m| Error::invalid("page_size", m))?;
    len(
        "page_token",
        token,
        limits::ID_BYTES.max(limits::KB_NAME_BYTES),
    )
}

fn metadata<'a>(
    limits: &Limits,
    field: &str,
    entries: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<()> {
    limits
        .check_metadata(entries)
        .map_err(|(f, m)| Error::invalid(f.replacen("metadata", field, 1), m))
}

impl Validate for pb::CreateKnowledgeBaseRequest {
    fn validate(&self, limits: &Limits) -> Result<()> {
        kb("name", &self.name)?;
        len("description", &self.description, limits.description_bytes)?;
        len("embedding_model", &self.embedding_model, limits::ID_BYTES)
    }
}

impl Validate for pb::GetKnowledgeBaseRequest {
    fn validate(&self, _: &Limits) -> Result<()> {
        kb("name", &self.name)
    }
}

impl Validate for pb::DeleteKnowledgeBaseRequest {
    fn validate(&self, _: &Limits) -> Result<()> {
        kb("name", &self.name)
    }
}

impl Validate for pb::ReindexKnowledgeBaseRequest {
    fn validate(&self, _: &Limits) -> Result<()> {
        kb("name", &self.name)
    }
}

impl Validate for pb::ListKnowledgeBasesRequest {
    fn validate(&self, limits: &Limits) -> Result<()> {
        page(limits, self.page_size, &self.page_token)
    }
}

impl Validate for pb::IngestTextRequest {
    fn validate(&self, limits: &Limits) -> Result<()> {
        kb("knowledge_base", &self.knowledge_base)?;
        if self.text.trim().is_empty() {
            return Err(Error::invalid("text", "must not be empty"));
        }
        len("text", &self.text, limits.text_bytes())?;
        len("title", &self.title, limits.title_bytes)?;
        len("source_id", &self.source_id, limits.source_name_bytes)?;
        if pb::TextFormat::try_from(self.format).is_err() {
            return Err(Error::invalid(
                "format",
                format!("unknown format {}", self.format),
            ));
        }
        metadata(limits, "metadata", self.metadata.iter())
    }
}

impl Validate for pb::GetDocumentRequest {
    fn validate(&self, _: &Limits) -> Result<()> {
        kb("knowledge_base", &self.knowledge_base)?;
        document_id(&self.document_id)
    }
}

impl Validate for pb::DeleteDocumentRequest {
    fn validate(&self, _: &Limits) -> Result<()> {
        kb("knowledge_base", &self.knowledge_base)?;
        document_id(&self.document_id)
    }
}

impl Validate for pb::RetryDocumentRequest {
    fn validate(&self, _: &Limits) -> Result<()> {
        kb("knowledge_base", &self.knowledge_base)?;
        document_id(&self.document_id)
    }
}

impl Validate for pb::ListDocumentsRequest {
    fn validate(&self, limits: &Limits) -> Result<()> {
        kb("knowledge_base", &self.knowledge_base)?;
        page(limits, self.page_size, &self.page_token)
    }
}

impl Validate for pb::SearchRequest {
    fn validate(&self, limits: &Limits) -> Result<()> {
        kb("knowledge_base", self.knowledge_base.trim())?;
        if self.query.trim().is_empty() {
            return Err(Error::invalid("query", "must not be empty"));
        }
        len("query", &self.query, limits.query_bytes)?;
        limits
            .top_k(self.top_k)
            .map_err(|m| Error::invalid("top_k", m))?;
        if pb::SearchMode::try_from(self.mode).is_err() {
            return Err(Error::invalid(
                "mode",
                format!("unknown mode {}", self.mode),
            ));
        }
        metadata(limits, "filter", self.filter.iter())?;
        limits::check_ids(&self.document_ids).map_err(|m| Error::invalid("document_ids", m))?;
        len("page_token", &self.page_token, limits::ERROR_BYTES)
    }
}

/// The first message of an upload: the header.
impl Validate for pb::DocumentHeader {
    fn validate(&self, limits: &Limits) -> Result<()> {
        let field = |name: &str| format!("header.{name}");
        limits::check_kb_name(&self.knowledge_base)
            .map_err(|m| Error::invalid(field("knowledge_base"), m))?;
        limits::check_len(&self.title, limits.title_bytes)
            .map_err(|m| Error::invalid(field("title"), m))?;
        limits::check_len(&self.source_name, limits.source_name_bytes)
            .map_err(|m| Error::invalid(field("source_name"), m))?;
        limits::check_len(&self.source_id, limits.source_name_bytes)
            .map_err(|m| Error::invalid(field("source_id"), m))?;
        metadata(limits, "header.metadata", self.metadata.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    fn field_of(error: Error) -> String {
        match error {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("not INVALID_ARGUMENT: {other:?}"),
        }
    }

    #[test]
    fn each_rule_names_its_field() {
        let limits = Limits::default();
        let search = |f: &dyn Fn(&mut pb::SearchRequest)| {
            let mut r = pb::SearchRequest {
                knowledge_base: "notes".into(),
                query: "tides".into(),
                ..Default::default()
            };
            f(&mut r);
            r.validate(&limits)
        };
        search(&|_| {}).unwrap();
        assert_eq!(
            field_of(search(&|r| r.knowledge_base = "No Such".into()).unwrap_err()),
            "knowledge_base"
        );
        assert_eq!(
            field_of(search(&|r| r.query = " ".into()).unwrap_err()),
            "query"
        );
        assert_eq!(
            field_of(search(&|r| r.query = "x".repeat(limits.query_bytes + 1)).unwrap_err()),
            "query"
        );
        assert_eq!(
            field_of(search(&|r| r.top_k = 100_000).unwrap_err()),
            "top_k"
        );
        assert_eq!(field_of(search(&|r| r.mode = 99).unwrap_err()), "mode");
        assert_eq!(
            field_of(
                search(&|r| {
                    r.filter
                        .insert("k".into(), "v".repeat(limits.metadata_value_bytes + 1));
                })
                .unwrap_err()
            ),
            "filter[k]"
        );
        let get = pb::GetDocumentRequest {
            knowledge_base: "notes".into(),
            document_id: String::new(),
        };
        assert_eq!(field_of(get.validate(&limits).unwrap_err()), "document_id");
        let list = pb::ListDocumentsRequest {
            knowledge_base: "notes".into(),
            page_size: 1_000_000,
            ..Default::default()
        };
        assert_eq!(field_of(list.validate(&limits).unwrap_err()), "page_size");
        let text = pb::IngestTextRequest {
            knowledge_base: "notes".into(),
            text: "\n".into(),
            ..Default::default()
        };
        assert_eq!(field_of(text.validate(&limits).unwrap_err()), "text");
        let header = pb::DocumentHeader {
            knowledge_base: "-bad".into(),
            ..Default::default()
        };
        assert_eq!(
            field_of(header.validate(&limits).unwrap_err()),
            "header.knowledge_base"
        );
    }

    /// Decodes `bytes` as `T` the way the server does and validates it: whatever the bytes,
    /// the outcome is a decode error or a clean validation result, never a panic.
    fn decode_and_check<T: Message + Default + Validate>(bytes: &[u8], limits: &Limits) {
        if let Ok(request) = T::decode(bytes)
            && let Err(error) = request.validate(limits)
        {
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(!status.message().is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Random bytes as every public request type.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let limits = Limits::default();
            decode_and_check::<pb::CreateKnowledgeBaseRequest>(&bytes, &limits);
            decode_and_check::<pb::GetKnowledgeBaseRequest>(&bytes, &limits);
            decode_and_check::<pb::DeleteKnowledgeBaseRequest>(&bytes, &limits);
            decode_and_check::<pb::ReindexKnowledgeBaseRequest>(&bytes, &limits);
            decode_and_check::<pb::ListKnowledgeBasesRequest>(&bytes, &limits);
            decode_and_check::<pb::IngestTextRequest>(&bytes, &limits);
            decode_and_check::<pb::GetDocumentRequest>(&bytes, &limits);
            decode_and_check::<pb::DeleteDocumentRequest>(&bytes, &limits);
            decode_and_check::<pb::RetryDocumentRequest>(&bytes, &limits);
            decode_and_check::<pb::ListDocumentsRequest>(&bytes, &limits);
            decode_and_check::<pb::SearchRequest>(&bytes, &limits);
            decode_and_check::<pb::DocumentHeader>(&bytes, &limits);
        }

        /// Structured requests with arbitrary text in every field, including multi-byte and
        /// control characters and lengths around the limits.
        #[test]
        fn arbitrary_fields_give_clean_answers(
            kb in ".{0,80}",
            text in "(?s).{0,300}",
            top_k in any::<u32>(),
            mode in any::<i32>(),
            page_size in any::<u32>(),
            meta in proptest::collection::btree_map(".{0,300}", ".{0,300}", 0..70),
        ) {
            let limits = Limits::default();
            let search = pb::SearchRequest {
                knowledge_base: kb.clone(),
                query: text.clone(),
                top_k,
                mode,
                filter: meta.clone().into_iter().collect(),
                ..Default::default()
            };
            if search.validate(&limits).is_ok() {
                prop_assert!(limits::check_kb_name(kb.trim()).is_ok());
                prop_assert!(!text.trim().is_empty());
            }
            let ingest = pb::IngestTextRequest {
                knowledge_base: kb.clone(),
                text: text.clone(),
                metadata: meta.into_iter().collect(),
                ..Default::default()
            };
            let _ = ingest.validate(&limits);
            let list = pb::ListDocumentsRequest { knowledge_base: kb, page_size, page_token: text };
            let _ = list.validate(&limits);
        }

        /// Whatever arrives as an `authorization` value parses cleanly or not at all.
        #[test]
        fn arbitrary_credentials_parse_cleanly(value in "(?s).{0,200}") {
            if let Some(token) = crate::edge::keys::bearer(&value) {
                let _ = crate::edge::keys::parse(token);
            }
            let _ = crate::edge::keys::parse(&value);
        }
    }
}
