//! Telling what a file really is from its bytes, and getting its text out. Only UTF-8 plain
//! text and Markdown are supported for now; anything with a recognisable binary signature is
//! refused by name, so the caller learns what was sent.

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

/// Sniffs the type of `bytes`; `name` (a file name) and `hint` only choose between plain text
/// and Markdown, never override what the bytes say.
pub fn sniff(bytes: &[u8], name: &str, hint: Option<ContentType>) -> Result<ContentType> {
    if bytes.is_empty() {
        return Err(Error::invalid("data", "the document is empty (0 bytes)"));
    }
    if let Some(kind) = infer::get(bytes) {
        return Err(Error::invalid(
            "data",
            format!(
                "unsupported content type {} (.{}); supported: text/plain, text/markdown",
                kind.mime_type(),
                kind.extension()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Error::invalid(
            "data",
            format!(
                "not UTF-8 text (invalid byte at offset {}); supported: text/plain, text/markdown",
                e.valid_up_to()
            ),
        )
    })?;
    if text.contains('\0') {
        return Err(Error::invalid(
            "data",
            "binary content (NUL bytes); supported: text/plain, text/markdown",
        ));
    }
    if text.trim().is_empty() {
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
    Ok(if looks_like_markdown(text) {
        ContentType::Markdown
    } else {
        ContentType::Plain
    })
}

/// Headings, fences or list markers at line starts are a good sign of Markdown.
fn looks_like_markdown(text: &str) -> bool {
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

    #[test]
    fn empty_and_binary_inputs_are_refused_by_name() {
        let err = sniff(b"", "a.txt", None).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let err = sniff(b"%PDF-1.7\n...", "a.pdf", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("application/pdf"), "{err}");
        let err = sniff(&[0xff, 0xfe, 0x00, 0x41], "a.txt", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("UTF-8") || err.contains("binary"), "{err}");
    }

    #[test]
    fn markdown_is_told_from_plain_text() {
        assert_eq!(
            sniff(b"# Title\n\nbody", "", None).unwrap(),
            ContentType::Markdown
        );
        assert_eq!(sniff(b"just words", "", None).unwrap(), ContentType::Plain);
        assert_eq!(
            sniff(b"just words", "notes.md", None).unwrap(),
            ContentType::Markdown
        );
        assert_eq!(
            sniff(b"# x", "", Some(ContentType::Plain)).unwrap(),
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
