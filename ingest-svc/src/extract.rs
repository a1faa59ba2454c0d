//! Telling what a file really is from its bytes, and getting its text out. Only UTF-8 plain
//! text and Markdown are supported for now: valid UTF-8 without a strong binary signature is
//! text; anything else is refused, by name when its signature is known, so the caller learns
//! what was sent. Text that arrives as text (`IngestText`) is not sniffed at all.

use crate::blobs::Written;
use crate::error::{Error, Result};

/// Media types we can index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// `text/plain`.
    Plain,
    /// `text/markdown`.
    Markdown,
}

impl ContentType {
    /// The media type string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "text/plain",
            Self::Markdown => "text/markdown",
        }
    }

    /// Parses a stored media type.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "text/plain" => Some(Self::Plain),
            "text/markdown" => Some(Self::Markdown),
            _ => None,
        }
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

const SUPPORTED: &str = "supported: text/plain, text/markdown";

/// Decides the type of an uploaded file from what was seen while storing it: its first bytes
/// and whether all of it is UTF-8. `name` (a file name) and `hint` only choose between plain
/// text and Markdown, never override what the bytes say.
pub fn sniff(written: &Written, name: &str, hint: Option<ContentType>) -> Result<ContentType> {
    if written.size == 0 {
        return Err(Error::invalid("data", "the document is empty (0 bytes)"));
    }
    let prefix = &written.prefix;
    if let Some((_, mime)) = STRONG_SIGNATURES
        .iter()
        .find(|(magic, _)| prefix.starts_with(magic))
    {
        return Err(Error::invalid(
            "data",
            format!("unsupported content type {mime}; {SUPPORTED}"),
        ));
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
    if let Some(hint) = hint {
        return Ok(hint);
    }
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".md") || lower.ends_with(".markdown") || lower.ends_with(".mdx") {
        return Ok(ContentType::Markdown);
    }
    if lower.ends_with(".txt") || lower.ends_with(".text") {
        return Ok(ContentType::Plain);
    }
    Ok(if looks_like_markdown(&String::from_utf8_lossy(prefix)) {
        ContentType::Markdown
    } else {
        ContentType::Plain
    })
}

/// Headings, fences or list markers at line starts are a good sign of Markdown.
pub fn looks_like_markdown(text: &str) -> bool {
    text.lines().take(200).any(|line| {
        let l = line.trim_start();
        l.starts_with("# ") || l.starts_with("## ") || l.starts_with("```") || l.starts_with("### ")
    })
}

/// The text of a stored original.
pub fn text(bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::invalid("data", "not UTF-8 text"))
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
        let err = sniff(&written(b"%PDF-1.7\n..."), "a.pdf", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("application/pdf"), "{err}");
        let err = sniff(&written(b"PK\x03\x04\x14\x00"), "a.docx", None)
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
    fn titles_come_from_the_first_line() {
        assert_eq!(
            title_from_text("\n\n## Rust ownership\nbody"),
            "Rust ownership"
        );
    }
}
