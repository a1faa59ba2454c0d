//! Every limit smartdb enforces, in one place with its setting: sizes of what callers send,
//! page and hit counts, upload size, deadlines and server concurrency. Services (and the
//! gateway's validation) read them from here, and the gRPC message-size limits are derived from
//! them, so that every valid request gets a response that fits in a message.
//!
//! Each limit is a flag of every service with a `SMARTDB_*` environment variable; `smartdb up`
//! passes its environment to the services, so one setting reaches the whole cluster.

use std::time::Duration;

use crate::config::parse_duration;

/// Longest knowledge-base name, in bytes (part of the name format, not a setting).
pub const KB_NAME_BYTES: usize = 63;
/// Longest id a caller may send (document ids are UUIDs; this leaves room for other schemes).
pub const ID_BYTES: usize = 128;
/// Longest failure reason stored with a document; longer ones are cut.
pub const ERROR_BYTES: usize = 2048;
/// Points per `UpsertPoints` call.
pub const UPSERT_BATCH: usize = 64;
/// Largest vector dimension a collection may have.
pub const MAX_DIMENSION: usize = 8192;
/// Bytes of one upload message's data, well below the message limit (what clients should send).
pub const UPLOAD_PIECE_BYTES: usize = 1 << 20;
/// Smallest message limit, whatever the other limits: room for uploads and embedding batches.
const MIN_MESSAGE_BYTES: usize = 16 << 20;
/// Encoding overhead allowed per record and per map entry when sizes are bounded from fields.
const RECORD_OVERHEAD: usize = 512;
const ENTRY_OVERHEAD: usize = 8;

/// The limits in force; every field has a flag and an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Longest knowledge-base description, in bytes.
    #[arg(
        long = "limit-description-bytes",
        env = "SMARTDB_LIMIT_DESCRIPTION_BYTES",
        default_value_t = 4096
    )]
    pub description_bytes: usize,
    /// Longest document title, in bytes.
    #[arg(
        long = "limit-title-bytes",
        env = "SMARTDB_LIMIT_TITLE_BYTES",
        default_value_t = 1024
    )]
    pub title_bytes: usize,
    /// Longest document source name (file name, path or URL), in bytes.
    #[arg(
        long = "limit-source-name-bytes",
        env = "SMARTDB_LIMIT_SOURCE_NAME_BYTES",
        default_value_t = 1024
    )]
    pub source_name_bytes: usize,
    /// Most metadata entries on one document.
    #[arg(
        long = "limit-metadata-entries",
        env = "SMARTDB_LIMIT_METADATA_ENTRIES",
        default_value_t = 64
    )]
    pub metadata_entries: usize,
    /// Longest metadata key, in bytes.
    #[arg(
        long = "limit-metadata-key-bytes",
        env = "SMARTDB_LIMIT_METADATA_KEY_BYTES",
        default_value_t = 128
    )]
    pub metadata_key_bytes: usize,
    /// Longest metadata value, in bytes.
    #[arg(
        long = "limit-metadata-value-bytes",
        env = "SMARTDB_LIMIT_METADATA_VALUE_BYTES",
        default_value_t = 1024
    )]
    pub metadata_value_bytes: usize,
    /// Longest search query, in bytes.
    #[arg(
        long = "limit-query-bytes",
        env = "SMARTDB_LIMIT_QUERY_BYTES",
        default_value_t = 4096
    )]
    pub query_bytes: usize,
    /// Hits returned when a search does not say.
    #[arg(
        long = "limit-default-top-k",
        env = "SMARTDB_LIMIT_DEFAULT_TOP_K",
        default_value_t = 10
    )]
    pub default_top_k: usize,
    /// Most hits one search may ask for.
    #[arg(
        long = "limit-max-top-k",
        env = "SMARTDB_LIMIT_MAX_TOP_K",
        default_value_t = 100
    )]
    pub max_top_k: usize,
    /// Items per list page when the caller does not say.
    #[arg(
        long = "limit-default-page-size",
        env = "SMARTDB_LIMIT_DEFAULT_PAGE_SIZE",
        default_value_t = 50
    )]
    pub default_page_size: usize,
    /// Most items per list page (a page also ends early once it holds `list_page_bytes()`).
    #[arg(
        long = "limit-max-page-size",
        env = "SMARTDB_LIMIT_MAX_PAGE_SIZE",
        default_value_t = 1000
    )]
    pub max_page_size: usize,
    /// Largest document accepted, in MiB.
    #[arg(
        long = "max-document-mb",
        env = "SMARTDB_MAX_DOCUMENT_MB",
        default_value_t = 32
    )]
    pub document_mb: usize,
    /// Most chunks one document may be split into; larger documents fail with the reason.
    #[arg(
        long = "limit-chunks-per-document",
        env = "SMARTDB_LIMIT_CHUNKS_PER_DOCUMENT",
        default_value_t = 20_000
    )]
    pub chunks_per_document: usize,
    /// Most pages of a PDF; longer ones are refused at upload.
    #[arg(
        long = "limit-pdf-pages",
        env = "SMARTDB_LIMIT_PDF_PAGES",
        default_value_t = 2000
    )]
    pub pdf_pages: usize,
    /// Most bytes the parts of a DOCX (a zip archive) may unpack to, in MiB (zip bombs).
    #[arg(
        long = "limit-unpacked-mb",
        env = "SMARTDB_LIMIT_UNPACKED_MB",
        default_value_t = 256
    )]
    pub unpacked_mb: usize,
    /// Most a DOCX may grow when unpacked, as a ratio of unpacked to packed bytes (zip bombs).
    #[arg(
        long = "limit-unpack-ratio",
        env = "SMARTDB_LIMIT_UNPACK_RATIO",
        default_value_t = 100
    )]
    pub unpack_ratio: usize,
    /// Most text extracted from one document, in MiB; larger documents fail with the reason.
    #[arg(
        long = "limit-text-mb",
        env = "SMARTDB_LIMIT_TEXT_MB",
        default_value_t = 32
    )]
    pub text_mb: usize,
    /// Largest chunk text, in bytes (chunks are token-bounded; this bounds character-measured ones).
    #[arg(
        long = "limit-chunk-bytes",
        env = "SMARTDB_LIMIT_CHUNK_BYTES",
        default_value_t = 32 * 1024
    )]
    pub chunk_bytes: usize,
    /// Uploads one ingest-svc takes in at once; more get RESOURCE_EXHAUSTED with a retry hint.
    #[arg(
        long = "limit-concurrent-uploads",
        env = "SMARTDB_LIMIT_CONCURRENT_UPLOADS",
        default_value_t = 16
    )]
    pub concurrent_uploads: usize,
    /// Deadline of a call whose caller set none.
    #[arg(long = "default-deadline", env = "SMARTDB_DEFAULT_DEADLINE", default_value = "30s", value_parser = parse_duration)]
    pub default_deadline: Duration,
    /// Deadline of an upload (which may wait for indexing) whose caller set none.
    #[arg(long = "upload-deadline", env = "SMARTDB_UPLOAD_DEADLINE", default_value = "10m", value_parser = parse_duration)]
    pub upload_deadline: Duration,
    /// Longest deadline a call may have; longer ones are cut to it.
    #[arg(long = "max-deadline", env = "SMARTDB_MAX_DEADLINE", default_value = "15m", value_parser = parse_duration)]
    pub max_deadline: Duration,
    /// Concurrent HTTP/2 streams (calls) on one connection.
    #[arg(
        long = "max-concurrent-streams",
        env = "SMARTDB_MAX_CONCURRENT_STREAMS",
        default_value_t = 256
    )]
    pub max_concurrent_streams: u32,
    /// Calls one server runs at once; beyond that, calls are shed at once with
    /// RESOURCE_EXHAUSTED and a retry hint instead of queueing.
    #[arg(
        long = "max-in-flight",
        env = "SMARTDB_MAX_IN_FLIGHT",
        default_value_t = 1024
    )]
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            limits: Limits,
        }
        <Defaults as clap::Parser>::parse_from(["limits"]).limits
    }
}

/// gRPC methods that may legitimately run long (they may wait for indexing), by full path.
const UPLOAD_METHODS: &[&str] = &[
    "/smartdb.v1.DocumentService/UploadDocument",
    "/smartdb.v1.DocumentService/IngestText",
];

impl Limits {
    /// Largest document, in bytes.
    pub fn document_bytes(&self) -> usize {
        self.document_mb.saturating_mul(1 << 20)
    }

    /// Most bytes an archive's parts may unpack to.
    pub fn unpacked_bytes(&self) -> u64 {
        (self.unpacked_mb as u64).saturating_mul(1 << 20)
    }

    /// Most bytes of text extracted from one document.
    pub fn text_bytes(&self) -> usize {
        self.text_mb.saturating_mul(1 << 20)
    }

    /// Most bytes a document's metadata can take (keys and values).
    pub fn metadata_bytes(&self) -> usize {
        self.metadata_entries
            .saturating_mul(self.metadata_key_bytes + self.metadata_value_bytes + ENTRY_OVERHEAD)
    }

    /// Upper bound of one encoded document record (as `GetDocument` returns it).
    pub fn document_record_bytes(&self) -> usize {
        // The source name and the source id share one limit.
        self.title_bytes
            + 2 * self.source_name_bytes
            + self.metadata_bytes()
            + ERROR_BYTES
            + 4 * ID_BYTES
            + RECORD_OVERHEAD
    }

    /// Upper bound of one encoded knowledge-base record.
    pub fn knowledge_base_record_bytes(&self) -> usize {
        KB_NAME_BYTES + self.description_bytes + 3 * ID_BYTES + RECORD_OVERHEAD
    }

    /// Upper bound of one encoded search hit.
    pub fn hit_bytes(&self) -> usize {
        self.chunk_bytes
            + self.title_bytes
            + self.source_name_bytes
            + self.metadata_bytes()
            + 2 * ID_BYTES
            + RECORD_OVERHEAD
    }

    /// Upper bound of one encoded index point (a hit plus its vector).
    pub fn point_bytes(&self) -> usize {
        self.hit_bytes() + MAX_DIMENSION * 5
    }

    /// Bytes a list page may hold: it ends early (with a next-page token) when the next item
    /// would pass this, so pages of large items still fit in a message.
    pub fn list_page_bytes(&self) -> usize {
        4 << 20
    }

    /// Largest gRPC message any server or client of smartdb sends or accepts: big enough for
    /// the largest valid response (a full search, a list page, an upsert batch, an upload
    /// piece), derived from the limits above.
    pub fn message_bytes(&self) -> usize {
        let largest = [
            self.max_top_k.saturating_mul(self.hit_bytes()),
            self.list_page_bytes()
                + self.document_record_bytes()
                + self.knowledge_base_record_bytes(),
            UPSERT_BATCH.saturating_mul(self.point_bytes()),
            UPLOAD_PIECE_BYTES,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        (largest + (64 << 10)).max(MIN_MESSAGE_BYTES)
    }

    /// The deadline of a call to `path` (`/package.Service/Method`) that asked for `requested`
    /// (none: the default for that method), never more than the maximum.
    pub fn deadline(&self, path: &str, requested: Option<Duration>) -> Duration {
        let default = if UPLOAD_METHODS.contains(&path) {
            self.upload_deadline
        } else {
            self.default_deadline
        };
        requested.unwrap_or(default).min(self.max_deadline)
    }

    /// Checks that the settings make sense together (e.g. a default above a maximum).
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.default_top_k >= 1 && self.default_top_k <= self.max_top_k,
            "the default top_k ({}) must be between 1 and the maximum ({})",
            self.default_top_k,
            self.max_top_k
        );
        anyhow::ensure!(
            self.default_page_size >= 1 && self.default_page_size <= self.max_page_size,
            "the default page size ({}) must be between 1 and the maximum ({})",
            self.default_page_size,
            self.max_page_size
        );
        anyhow::ensure!(
            self.default_deadline <= self.max_deadline && self.upload_deadline <= self.max_deadline,
            "default deadlines ({:?}, uploads {:?}) must not exceed the maximum ({:?})",
            self.default_deadline,
            self.upload_deadline,
            self.max_deadline
        );
        anyhow::ensure!(
            self.document_record_bytes() < self.list_page_bytes()
                && self.knowledge_base_record_bytes() < self.list_page_bytes(),
            "one document record ({} bytes) must fit in a list page ({} bytes): lower the title, source name or metadata limits",
            self.document_record_bytes(),
            self.list_page_bytes()
        );
        anyhow::ensure!(
            self.chunk_bytes >= 256,
            "chunks must be allowed at least 256 bytes"
        );
        anyhow::ensure!(
            self.max_in_flight >= 1 && self.concurrent_uploads >= 1,
            "concurrency limits must be at least 1"
        );
        Ok(())
    }

    /// Checks the page size a caller asked for (0: the default) and returns the one to use.
    pub fn page_size(&self, requested: u32) -> Result<usize, String> {
        match requested as usize {
            0 => Ok(self.default_page_size),
            n if n > self.max_page_size => Err(format!(
                "{n} is more than the maximum {}",
                self.max_page_size
            )),
            n => Ok(n),
        }
    }

    /// Checks the number of hits a caller asked for (0: the default) and returns the one to use.
    pub fn top_k(&self, requested: u32) -> Result<usize, String> {
        match requested as usize {
            0 => Ok(self.default_top_k),
            k if k > self.max_top_k => {
                Err(format!("{k} is more than the maximum {}", self.max_top_k))
            }
            k => Ok(k),
        }
    }

    /// Checks document metadata against the entry count and key/value sizes; on failure returns
    /// the offending field (`metadata` or `metadata[key]`) and what is wrong.
    pub fn check_metadata<'a>(
        &self,
        entries: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
    ) -> Result<(), (String, String)> {
        let count = entries.len();
        if count > self.metadata_entries {
            return Err((
                "metadata".into(),
                format!("{count} entries, at most {}", self.metadata_entries),
            ));
        }
        for (key, value) in entries {
            if key.is_empty() || key.len() > self.metadata_key_bytes {
                return Err((
                    "metadata".into(),
                    format!(
                        "key {:?} must be 1 to {} bytes",
                        truncate(key, 64),
                        self.metadata_key_bytes
                    ),
                ));
            }
            if value.len() > self.metadata_value_bytes {
                return Err((
                    format!("metadata[{}]", truncate(key, 64)),
                    format!(
                        "value is {} bytes, at most {}",
                        value.len(),
                        self.metadata_value_bytes
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a knowledge base name: 1 to 63 of `a-z 0-9 - _`, starting with a letter or digit.
/// The message says what is wrong (the caller names the field).
pub fn check_kb_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".into());
    }
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_rest = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if name.len() > KB_NAME_BYTES || !ok_first || !ok_rest {
        return Err(format!(
            "{:?} is not a valid name: use 1 to 63 lower-case letters, digits, '-' or '_', starting with a letter or digit",
            truncate(name, 80)
        ));
    }
    Ok(())
}

/// Checks that every id in a list (e.g. a search's `document_ids`) fits [`ID_BYTES`].
pub fn check_ids(ids: &[String]) -> Result<(), String> {
    match ids.iter().find(|id| id.len() > ID_BYTES) {
        Some(id) => Err(format!("an id is {} bytes, at most {ID_BYTES}", id.len())),
        None => Ok(()),
    }
}

/// Checks a text field's size; the message names the limit.
pub fn check_len(value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        Err(format!("{} bytes, at most {max}", value.len()))
    } else {
        Ok(())
    }
}

/// `text` cut to at most `max` bytes on a character boundary (for messages and stored reasons).
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_consistent_and_keep_todays_values() {
        let limits = Limits::default();
        limits.validate().unwrap();
        assert_eq!(limits.title_bytes, 1024);
        assert_eq!(limits.max_top_k, 100);
        assert_eq!(limits.max_page_size, 1000);
        assert_eq!(limits.document_bytes(), 32 << 20);
        assert_eq!(limits.message_bytes(), 16 << 20);
    }

    #[test]
    fn the_largest_valid_responses_fit_in_a_message() {
        for limits in [
            Limits::default(),
            Limits {
                max_top_k: 1000,
                metadata_value_bytes: 4096,
                ..Limits::default()
            },
        ] {
            let message = limits.message_bytes();
            assert!(limits.max_top_k * limits.hit_bytes() < message);
            assert!(UPSERT_BATCH * limits.point_bytes() < message);
            assert!(limits.list_page_bytes() + limits.document_record_bytes() < message);
        }
    }

    #[test]
    fn deadlines_default_per_method_and_are_capped() {
        let limits = Limits::default();
        let search = "/smartdb.v1.SearchService/Search";
        let upload = "/smartdb.v1.DocumentService/UploadDocument";
        assert_eq!(limits.deadline(search, None), Duration::from_secs(30));
        assert_eq!(limits.deadline(upload, None), Duration::from_secs(600));
        assert_eq!(
            limits.deadline(search, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            limits.deadline(search, Some(Duration::from_secs(86_400))),
            Duration::from_secs(900)
        );
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let bad = Limits {
            default_top_k: 200,
            ..Limits::default()
        };
        assert!(bad.validate().is_err());
        let bad = Limits {
            metadata_value_bytes: 1 << 20,
            ..Limits::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("list page")
        );
    }

    #[test]
    fn metadata_checks_name_the_field() {
        let limits = Limits::default();
        let ok = std::collections::BTreeMap::from([("team".to_owned(), "search".to_owned())]);
        assert!(limits.check_metadata(ok.iter()).is_ok());
        let long = std::collections::BTreeMap::from([("k".to_owned(), "v".repeat(2000))]);
        let (field, message) = limits.check_metadata(long.iter()).unwrap_err();
        assert_eq!(field, "metadata[k]");
        assert!(message.contains("at most 1024"), "{message}");
        let empty_key = std::collections::BTreeMap::from([(String::new(), "v".to_owned())]);
        assert_eq!(
            limits.check_metadata(empty_key.iter()).unwrap_err().0,
            "metadata"
        );
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
