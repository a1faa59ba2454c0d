//! Telling what a file really is from its bytes, and getting its text out. Supported: plain
//! text, Markdown, HTML, PDF (its text layer) and Word documents (DOCX). Strong signatures
//! decide first (`%PDF-`, a zip archive holding `word/document.xml`); valid UTF-8 without one
//! is text, and then the declared type, the file name and the text's look choose between plain
//! text, Markdown and HTML. A declared type must agree with what the bytes are. Anything else
//! is refused, by name when its signature is known, so the caller learns what was sent. Text
//! that arrives as text (`IngestText`) is not sniffed at all.
//!
//! HTML and DOCX come out as Markdown, so their headings shape the chunks as Markdown's do.

pub mod docx;
pub mod html;
pub mod pdf;

use smartdb_kit::limits::Limits;

use crate::blobs::Written;
use crate::error::{Error, Result};

/// Media types we can index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// `text/plain`.
    Plain,
    /// `text/markdown`.
    Markdown,
    /// `text/html`.
    Html,
    /// `application/pdf`.
    Pdf,
    /// A Word document (Office Open XML).
    Docx,
}

/// The DOCX media type.
const DOCX_MIME: &str = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";

impl ContentType {
    /// The media type string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "text/plain",
            Self::Markdown => "text/markdown",
            Self::Html => "text/html",
            Self::Pdf => "application/pdf",
            Self::Docx => DOCX_MIME,
        }
    }

    /// Parses a stored or declared media type (parameters such as `; charset=utf-8` ignored).
    pub fn parse(s: &str) -> Option<Self> {
        let essence = s
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "text/plain" => Some(Self::Plain),
            "text/markdown" | "text/x-markdown" => Some(Self::Markdown),
            "text/html" | "application/xhtml+xml" => Some(Self::Html),
            "application/pdf" => Some(Self::Pdf),
            DOCX_MIME => Some(Self::Docx),
            _ => None,
        }
    }

    /// True for the formats that are UTF-8 text as stored.
    pub fn is_text(self) -> bool {
        matches!(self, Self::Plain | Self::Markdown | Self::Html)
    }
}

/// Signatures that only binary formats start with. Magic-byte sniffing decides between binary
/// formats; on text it misfires, since weak signatures ("BM", "BC", "ID3", "MZ") are ordinary
/// words. So valid UTF-8 counts as text unless it starts with one of these, which no prose does.
const STRONG_SIGNATURES: &[(&[u8], &str)] = &[
    (b"%PDF-", "application/pdf"),
    (b"PK\x03\x04", "application/zip"),
    (b"PK\x05\x06", "application/zip"),
    (b"PK\x07\x08", "application/zip"),
    (b"\x7fELF", "application/x-executable"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"{\\rtf1", "application/rtf"),
    (b"%!PS-Adobe-", "application/postscript"),
];

/// What the refusals list as supported.
pub const SUPPORTED: &str = "supported: text/plain, text/markdown, text/html, application/pdf, \
     application/vnd.openxmlformats-officedocument.wordprocessingml.document (DOCX)";

/// Decides the type of an uploaded file from what was seen while storing it: its first bytes
/// and whether all of it is UTF-8. `declared` (the caller's `content_type`) must agree with the
/// bytes; for text it chooses between plain text, Markdown and HTML, as `name` (a file name)
/// does when nothing is declared.
pub fn sniff(written: &Written, name: &str, declared: Option<ContentType>) -> Result<ContentType> {
    if written.size == 0 {
        return Err(Error::invalid("data", "the document is empty (0 bytes)"));
    }
    let prefix = &written.prefix;
    let detected = match STRONG_SIGNATURES
        .iter()
        .find(|(magic, _)| prefix.starts_with(magic))
    {
        Some((_, "application/pdf")) => Some(ContentType::Pdf),
        // A DOCX is a zip archive; which parts it holds is checked when it is inspected.
        Some((_, "application/zip"))
            if infer::doc::is_docx(prefix)
                || declared == Some(ContentType::Docx)
                || name.to_ascii_lowercase().ends_with(".docx") =>
        {
            Some(ContentType::Docx)
        }
        Some((_, mime)) => {
            let mime = match infer::get(prefix) {
                Some(kind) if *mime == "application/zip" => kind.mime_type(),
                _ => mime,
            };
            return Err(Error::invalid(
                "data",
                format!("unsupported content type {mime}; {SUPPORTED}"),
            ));
        }
        None => None,
    };
    if let Some(detected) = detected {
        return match declared {
            Some(declared) if declared != detected => Err(disagree(declared, detected.as_str())),
            _ => Ok(detected),
        };
    }
    if let Err(offset) = written.utf8 {
        // Not text: name the format if its signature is known, so the caller learns what was sent.
        return Err(Error::invalid(
            "data",
            match infer::get(prefix) {
                Some(kind) => format!(
                    "unsupported content type {} (.{}); {SUPPORTED}",
                    kind.mime_type(),
                    kind.extension()
                ),
                None => format!("not UTF-8 text (invalid byte at offset {offset}); {SUPPORTED}"),
            },
        ));
    }
    if written.has_nul {
        return Err(Error::invalid(
            "data",
            format!("binary content (NUL bytes); {SUPPORTED}"),
        ));
    }
    if !written.has_content {
        return Err(Error::invalid(
            "data",
            "the document contains only whitespace",
        ));
    }
    match declared {
        Some(declared) if declared.is_text() => return Ok(declared),
        Some(declared) => return Err(disagree(declared, "text")),
        None => {}
    }
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".md") || lower.ends_with(".markdown") || lower.ends_with(".mdx") {
        return Ok(ContentType::Markdown);
    }
    if lower.ends_with(".html") || lower.ends_with(".htm") || lower.ends_with(".xhtml") {
        return Ok(ContentType::Html);
    }
    if lower.ends_with(".txt") || lower.ends_with(".text") {
        return Ok(ContentType::Plain);
    }
    let text = String::from_utf8_lossy(prefix);
    Ok(if looks_like_html(&text) {
        ContentType::Html
    } else if looks_like_markdown(&text) {
        ContentType::Markdown
    } else {
        ContentType::Plain
    })
}

fn disagree(declared: ContentType, detected: &str) -> Error {
    Error::invalid(
        "content_type",
        format!("declared {} but the data is {detected}", declared.as_str()),
    )
}

/// A document that starts like an HTML page (after a BOM, blanks and comments).
pub fn looks_like_html(text: &str) -> bool {
    let start = text.trim_start_matches('\u{feff}').trim_start();
    let head: String = start
        .chars()
        .take(64)
        .collect::<String>()
        .to_ascii_lowercase();
    head.starts_with("<!doctype html") || head.starts_with("<html") || head.starts_with("<head")
}

/// Headings, fences or list markers at line starts are a good sign of Markdown.
pub fn looks_like_markdown(text: &str) -> bool {
    text.lines().take(200).any(|line| {
        let l = line.trim_start();
        l.starts_with("# ") || l.starts_with("## ") || l.starts_with("```") || l.starts_with("### ")
    })
}

/// Checks a stored upload of a binary format (its structure and the limits that can be known
/// before extraction: pages, unpacked size) and returns the title it carries, if any. Text
/// formats need nothing more than [`sniff`]; HTML's title comes from its first bytes.
pub fn inspect(
    content_type: ContentType,
    read: impl FnOnce() -> Result<Vec<u8>>,
    prefix: &[u8],
    limits: &Limits,
) -> Result<Option<String>> {
    let invalid = |m: String| Error::invalid("data", m);
    match content_type {
        ContentType::Plain | ContentType::Markdown => Ok(None),
        ContentType::Html => Ok(html::title(&String::from_utf8_lossy(prefix))),
        ContentType::Pdf => {
            let bytes = read()?;
            pdf::inspect(&bytes, limits.pdf_pages)
                .map(|(_, title)| title)
                .map_err(invalid)
        }
        ContentType::Docx => {
            let bytes = read()?;
            docx::inspect(&bytes, docx_bounds(limits)).map_err(invalid)
        }
    }
}

fn docx_bounds(limits: &Limits) -> docx::Bounds {
    docx::Bounds {
        unpacked: limits.unpacked_bytes(),
        ratio: limits.unpack_ratio as u64,
        text: limits.text_bytes(),
    }
}

/// A document's text, ready to chunk.
#[derive(Debug)]
pub struct Extracted {
    /// The text (Markdown for HTML and DOCX).
    pub text: String,
    /// How to split it: [`ContentType::Plain`] or [`ContentType::Markdown`].
    pub split_as: ContentType,
    /// Byte offset in `text` where each page begins (PDF); empty for formats without pages.
    pub page_starts: Vec<usize>,
}

/// Extracts the text of a stored original of type `content_type`.
pub fn extract(content_type: ContentType, bytes: &[u8], limits: &Limits) -> Result<Extracted> {
    let invalid = |m: String| Error::invalid("data", m);
    let max_text = limits.text_bytes();
    let mut page_starts = Vec::new();
    let (text, split_as) = match content_type {
        ContentType::Plain | ContentType::Markdown => (text(bytes)?, content_type),
        ContentType::Html => (html::to_markdown(&text(bytes)?), ContentType::Markdown),
        ContentType::Pdf => {
            let pdf = pdf::extract(bytes, limits.pdf_pages, max_text).map_err(invalid)?;
            const PAGE_BREAK: &str = "\n\n";
            let mut at = 0;
            for page in &pdf.pages {
                page_starts.push(at);
                at += page.len() + PAGE_BREAK.len();
            }
            (pdf.pages.join(PAGE_BREAK), ContentType::Plain)
        }
        ContentType::Docx => (
            docx::extract(bytes, docx_bounds(limits))
                .map_err(invalid)?
                .text,
            ContentType::Markdown,
        ),
    };
    if text.len() > max_text {
        return Err(invalid(format!(
            "the document's text is larger than the limit of {} MiB (limit-text-mb)",
            limits.text_mb
        )));
    }
    if text.trim().is_empty() {
        return Err(invalid("the document has no text to index".into()));
    }
    Ok(Extracted {
        text,
        split_as,
        page_starts,
    })
}

/// The text of a stored original that is UTF-8 text.
pub fn text(bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|e| {
        Error::invalid(
            "data",
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// A title from the text: its first non-empty line without Markdown heading marks, cut to 120 chars.
pub fn title_from_text(text: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    let line = line.trim_start_matches('#').trim();
    line.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobs::Utf8Stream;

    /// What storing `bytes` would have learned about them.
    fn written(bytes: &[u8]) -> Written {
        let mut text = Utf8Stream::default();
        text.feed(bytes);
        let result = text.result();
        Written {
            size: bytes.len() as u64,
            sha256: String::new(),
            prefix: bytes[..bytes.len().min(crate::blobs::PREFIX_BYTES)].to_vec(),
            utf8: result,
            has_nul: bytes.contains(&0),
            has_content: bytes.iter().any(|b| !b.is_ascii_whitespace()),
        }
    }

    #[test]
    fn empty_and_binary_inputs_are_refused_by_name() {
        let err = sniff(&written(b""), "a.txt", None).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let err = sniff(&written(b"PK\x03\x04\x14\x00"), "a.zip", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("application/zip"), "{err}");
        let err = sniff(
            &written(&[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0]),
            "",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("image/png"), "{err}");
        let err = sniff(&written(&[0xff, 0xfe, 0x00, 0x41]), "a.txt", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("UTF-8") || err.contains("binary"), "{err}");
        let err = sniff(&written(b"text\0more"), "", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NUL"), "{err}");
        let err = sniff(&written(b" \n "), "", None).unwrap_err().to_string();
        assert!(err.contains("whitespace"), "{err}");
    }

    #[test]
    fn words_that_look_like_weak_signatures_are_text() {
        // The trap: magic-byte sniffing calls ordinary words binary formats.
        assert_eq!(
            infer::get(b"BMI-1 is").map(|k| k.mime_type()),
            Some("image/bmp")
        );
        // Real SciFact abstracts start like these; `infer` calls them BMP, LLVM bitcode, MP3, EXE.
        for text in [
            "BMI-1 is overexpressed in a variety of human cancers.",
            "BC200 RNA is a small non-messenger RNA.",
            "ID3 is a transcriptional regulator.",
            "MZ twins were compared with DZ twins.",
            "OggS is not a word, but still text.",
        ] {
            assert_eq!(
                sniff(&written(text.as_bytes()), "", None).unwrap(),
                ContentType::Plain,
                "{text}"
            );
        }
    }

    #[test]
    fn markdown_is_told_from_plain_text() {
        assert_eq!(
            sniff(&written(b"# Title\n\nbody"), "", None).unwrap(),
            ContentType::Markdown
        );
        assert_eq!(
            sniff(&written(b"just words"), "", None).unwrap(),
            ContentType::Plain
        );
        assert_eq!(
            sniff(&written(b"just words"), "notes.md", None).unwrap(),
            ContentType::Markdown
        );
        assert_eq!(
            sniff(&written(b"# x"), "", Some(ContentType::Plain)).unwrap(),
            ContentType::Plain
        );
    }

    #[test]
    fn signatures_decide_and_declared_types_must_agree() {
        assert_eq!(
            sniff(&written(b"%PDF-1.7\n..."), "a.txt", None).unwrap(),
            ContentType::Pdf
        );
        assert_eq!(
            sniff(
                &written(b"PK\x03\x04\x14\x00"),
                "a.docx",
                Some(ContentType::Docx)
            )
            .unwrap(),
            ContentType::Docx
        );
        let err = sniff(&written(b"%PDF-1.7\n..."), "", Some(ContentType::Plain))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("declared text/plain but the data is application/pdf"),
            "{err}"
        );
        let err = sniff(&written(b"plain words"), "", Some(ContentType::Pdf))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("declared application/pdf but the data is text"),
            "{err}"
        );
        assert_eq!(
            sniff(&written(b"<p>hi</p>"), "", Some(ContentType::Html)).unwrap(),
            ContentType::Html
        );
        assert_eq!(
            sniff(&written(b"\n <!DOCTYPE html><p>hi</p>"), "", None).unwrap(),
            ContentType::Html
        );
        assert_eq!(
            sniff(&written(b"<p>hi</p>"), "page.htm", None).unwrap(),
            ContentType::Html
        );
        assert_eq!(
            ContentType::parse("text/html; charset=utf-8"),
            Some(ContentType::Html)
        );
        assert_eq!(ContentType::parse("image/png"), None);
    }

    #[test]
    fn invalid_utf8_in_a_text_format_is_an_error_naming_the_offset() {
        let err = extract(ContentType::Plain, b"ok \xff no", &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("offset 3"), "{err}");
    }

    #[test]
    fn html_is_extracted_as_markdown() {
        let got = extract(
            ContentType::Html,
            b"<html><script>x()</script><h2>Hi</h2><p>there</p></html>",
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(got.text, "## Hi\n\nthere");
        assert_eq!(got.split_as, ContentType::Markdown);
        let err = extract(
            ContentType::Html,
            b"<script>only()</script>",
            &Limits::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no text"), "{err}");
    }

    #[test]
    fn pdf_pages_are_located_in_the_extracted_text() {
        // A real two-page PDF written by fpdf2 (tests/data/formats/make.py).
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/formats/good.pdf"
        );
        let got = extract(
            ContentType::Pdf,
            &std::fs::read(path).unwrap(),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(got.page_starts.len(), 2, "{got:?}");
        assert_eq!(got.page_starts[0], 0);
        assert!(got.text.starts_with("Glacier field notes"), "{got:?}");
        assert!(
            got.text[got.page_starts[1]..].starts_with("Meltwater"),
            "{got:?}"
        );
        let plain = extract(ContentType::Plain, b"no pages", &Limits::default()).unwrap();
        assert!(plain.page_starts.is_empty());
    }

    #[test]
    fn titles_come_from_the_first_line() {
        assert_eq!(
            title_from_text("\n\n## Rust ownership\nbody"),
            "Rust ownership"
        );
    }
}
