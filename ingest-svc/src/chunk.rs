//! Splitting text into chunks that fit the embedding model, measured with the model's own
//! tokenizer (`text-splitter` does the splitting on semantic boundaries: Markdown structure,
//! paragraphs, sentences). Each chunk keeps where it came from: its byte range in the extracted
//! text, the headings it sits under, and its pages.

use pulldown_cmark::{Event, Parser, Tag, TagEnd};
use text_splitter::{ChunkConfig, MarkdownSplitter, TextSplitter};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::extract::ContentType;

/// Tokens kept free for the special tokens the model adds ([CLS], [SEP]) and a model prefix.
const RESERVED_TOKENS: usize = 8;
/// Longest heading kept in a heading path, in bytes: every chunk under it carries a copy.
const MAX_HEADING_BYTES: usize = 200;

/// One chunk of a document and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The chunk's text: exactly `extracted[start..end]`.
    pub text: String,
    /// UTF-8 byte offset of the chunk's first byte in the extracted text.
    pub start: usize,
    /// Byte offset just past the chunk's last byte.
    pub end: usize,
    /// Headings the chunk sits under, outermost first (Markdown, HTML and DOCX documents).
    pub headings: Vec<String>,
    /// Pages (from 1) the chunk starts and ends on; 0 for formats without pages.
    pub pages: (u32, u32),
}

/// Splits documents for one model.
pub struct Chunker {
    /// The model's tokenizer; `None` for models that don't share theirs (remote APIs), which are
    /// measured in characters instead.
    tokenizer: Option<Tokenizer>,
    max_tokens: usize,
    /// Most bytes of one chunk: a few tokens can stand for a lot of text (a word the tokenizer
    /// does not know is one token however long), and every chunk must fit a search hit.
    max_bytes: usize,
}

impl Chunker {
    /// A chunker from a Hugging Face `tokenizer.json` and the model's input limit.
    /// An empty `tokenizer_json` means the model has none to share: chunks are then limited to
    /// that many characters, which no tokenizer turns into more tokens (one per character at
    /// worst, short of byte-level fallbacks for rare scripts).
    /// `max_bytes` bounds every chunk in bytes too.
    pub fn from_json(
        tokenizer_json: &str,
        model_max_tokens: usize,
        max_bytes: usize,
    ) -> Result<Self> {
        let max_tokens = model_max_tokens.saturating_sub(RESERVED_TOKENS).max(16);
        let max_bytes = max_bytes.max(64);
        if tokenizer_json.is_empty() {
            return Ok(Self {
                tokenizer: None,
                max_tokens,
                max_bytes,
            });
        }
        let mut tokenizer: Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| Error::Internal(format!("cannot load the model's tokenizer: {e}")))?;
        // Measuring must see the full length; a truncating tokenizer would call everything short.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Internal(format!("tokenizer: {e}")))?;
        tokenizer.with_padding(None);
        Ok(Self {
            tokenizer: Some(tokenizer),
            max_tokens,
            max_bytes,
        })
    }

    /// Most tokens in one chunk.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Splits `text` (split as Markdown or as plain text, by `split_as`), dropping chunks that
    /// are only whitespace. `page_starts` holds the byte offset where each page begins, for
    /// formats with pages (else empty).
    pub fn split(&self, text: &str, split_as: ContentType, page_starts: &[usize]) -> Vec<Chunk> {
        let markdown = matches!(
            split_as,
            ContentType::Markdown | ContentType::Html | ContentType::Docx
        );
        let pieces: Vec<(usize, &str)> = match &self.tokenizer {
            Some(tokenizer) => {
                let config = ChunkConfig::new(self.max_tokens)
                    .with_sizer(tokenizer)
                    .with_trim(true);
                match markdown {
                    true => MarkdownSplitter::new(config).chunk_indices(text).collect(),
                    false => TextSplitter::new(config).chunk_indices(text).collect(),
                }
            }
            None => {
                let config =
                    ChunkConfig::new(self.max_tokens.min(self.max_chars())).with_trim(true);
                match markdown {
                    true => MarkdownSplitter::new(config).chunk_indices(text).collect(),
                    false => TextSplitter::new(config).chunk_indices(text).collect(),
                }
            }
        };
        let headings = if markdown { headings(text) } else { Vec::new() };
        let mut paths = Paths::new(&headings);
        let mut chunk = |start: usize, piece: &str| Chunk {
            text: piece.to_owned(),
            start,
            end: start + piece.len(),
            headings: paths.at(start),
            pages: pages_of(page_starts, start, start + piece.len()),
        };
        let mut out = Vec::with_capacity(pieces.len());
        for (start, piece) in pieces.into_iter().filter(|(_, c)| !c.trim().is_empty()) {
            if piece.len() <= self.max_bytes {
                out.push(chunk(start, piece));
            } else {
                // Few tokens, many bytes: cut by characters (4 bytes each at most in UTF-8).
                let config = ChunkConfig::new(self.max_chars()).with_trim(true);
                out.extend(
                    TextSplitter::new(config)
                        .chunk_indices(piece)
                        .filter(|(_, c)| !c.trim().is_empty())
                        .map(|(offset, c)| chunk(start + offset, c)),
                );
            }
        }
        out
    }

    fn max_chars(&self) -> usize {
        (self.max_bytes / 4).max(16)
    }
}

/// The Markdown headings of `text`: (byte offset, level, title), in order.
fn headings(text: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize, String)> = None;
    for (event, range) in Parser::new(text).into_offset_iter() {
        match (event, current.as_mut()) {
            (Event::Start(Tag::Heading { level, .. }), _) => {
                current = Some((range.start, level as usize, String::new()));
            }
            (Event::Text(t) | Event::Code(t), Some((_, _, title))) => title.push_str(&t),
            (Event::SoftBreak | Event::HardBreak, Some((_, _, title))) => title.push(' '),
            (Event::End(TagEnd::Heading(_)), _) => {
                if let Some((offset, level, title)) = current.take() {
                    let title = title.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !title.is_empty() {
                        out.push((offset, level, truncate(title, MAX_HEADING_BYTES)));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Heading paths of increasing offsets, walking the headings once: chunks come in order, and a
/// document may have hundreds of thousands of headings (hostile input included).
struct Paths<'a> {
    headings: &'a [(usize, usize, String)],
    next: usize,
    path: Vec<(usize, &'a str)>,
}

impl<'a> Paths<'a> {
    fn new(headings: &'a [(usize, usize, String)]) -> Self {
        Self {
            headings,
            next: 0,
            path: Vec::new(),
        }
    }

    /// The heading path in effect at byte `offset` (not below an earlier call's): the last
    /// heading of each level before it, cut back whenever a higher-level heading starts a new
    /// section.
    fn at(&mut self, offset: usize) -> Vec<String> {
        while let Some((at, level, title)) = self.headings.get(self.next)
            && *at <= offset
        {
            while self.path.last().is_some_and(|(l, _)| l >= level) {
                self.path.pop();
            }
            self.path.push((*level, title));
            self.next += 1;
        }
        self.path.iter().map(|(_, t)| (*t).to_owned()).collect()
    }
}

/// First and last page (from 1) of the bytes `start..end`; (0, 0) without pages.
fn pages_of(page_starts: &[usize], start: usize, end: usize) -> (u32, u32) {
    if page_starts.is_empty() {
        return (0, 0);
    }
    let page = |at: usize| page_starts.partition_point(|&p| p <= at).max(1) as u32;
    (page(start), page(end.saturating_sub(1).max(start)))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_tokenizer_chunks_are_bounded_in_characters() {
        // 108 tokens minus the 8 reserved: chunks of at most 100 characters.
        let chunker = Chunker::from_json("", 108, 32 * 1024).unwrap();
        let text = "A sentence about retrieval. ".repeat(40);
        let chunks = chunker.split(&text, ContentType::Plain, &[]);
        assert!(chunks.len() >= 10, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.text.chars().count() <= 100));
        // Nothing is lost between chunks, and each knows where it came from.
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts.join(" ").matches("retrieval").count(), 40);
        for c in &chunks {
            assert_eq!(&text[c.start..c.end], c.text);
            assert_eq!((c.headings.len(), c.pages), (0, (0, 0)));
        }
    }

    #[test]
    fn chunks_are_bounded_in_bytes_too() {
        // A character-measured model with a huge input limit still gets chunks that fit a hit.
        let chunker = Chunker::from_json("", 100_000, 1024).unwrap();
        let text = "é".repeat(5000);
        let chunks = chunker.split(&text, ContentType::Plain, &[]);
        assert!(
            chunks.iter().all(|c| c.text.len() <= 1024),
            "{:?}",
            chunks.iter().map(|c| c.text.len()).collect::<Vec<_>>()
        );
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts.concat(), text);
        // Offsets of the pieces cut by characters are offsets in the whole text.
        for c in &chunks {
            assert_eq!(&text[c.start..c.end], c.text);
        }
    }

    #[test]
    fn markdown_chunks_carry_their_heading_path_and_offsets() {
        let chunker = Chunker::from_json("", 48, 32 * 1024).unwrap();
        let text = "\
Preface words come first.

# Guide

Intro to the guide.

## Install `smartdb`

Run the installer and wait for it.

### On Linux
Use the package.

## Use

Search by meaning.

```
# not a heading, just code
```

Setext heading
==============

Last words.
";
        let chunks = chunker.split(text, ContentType::Markdown, &[]);
        let under = |needle: &str| {
            let c = chunks
                .iter()
                .find(|c| c.text.contains(needle))
                .unwrap_or_else(|| panic!("no chunk has {needle:?}: {chunks:#?}"));
            assert_eq!(&text[c.start..c.end], c.text);
            c.headings.clone()
        };
        assert!(chunks.len() >= 5, "{chunks:#?}");
        assert_eq!(under("Preface"), Vec::<String>::new());
        assert_eq!(under("Intro"), ["Guide"]);
        assert_eq!(under("installer"), ["Guide", "Install smartdb"]);
        assert_eq!(under("package"), ["Guide", "Install smartdb", "On Linux"]);
        assert_eq!(under("meaning"), ["Guide", "Use"]);
        assert_eq!(under("not a heading"), ["Guide", "Use"]);
        assert_eq!(under("Last words"), ["Setext heading"]);
    }

    #[test]
    fn plain_text_has_no_headings_and_chunks_know_their_pages() {
        let chunker = Chunker::from_json("", 24, 32 * 1024).unwrap();
        let pages = [
            "# First page, not Markdown. ".repeat(3),
            "Second page text. ".repeat(3),
            "Third page text. ".repeat(3),
        ];
        let text = pages.join("\n\n");
        let starts = [0, pages[0].len() + 2, pages[0].len() + pages[1].len() + 4];
        let chunks = chunker.split(&text, ContentType::Plain, &starts);
        for c in &chunks {
            assert!(c.headings.is_empty(), "{c:?}");
            assert_eq!(&text[c.start..c.end], c.text);
            let first = starts.iter().rposition(|&s| s <= c.start).unwrap() as u32 + 1;
            let last = starts.iter().rposition(|&s| s < c.end).unwrap() as u32 + 1;
            assert_eq!(c.pages, (first, last), "{c:?}");
        }
        assert!(chunks.iter().any(|c| c.pages.0 == 3), "{chunks:#?}");
        assert_eq!(pages_of(&starts, 0, 5), (1, 1));
        assert_eq!(pages_of(&starts, starts[1] - 5, starts[1] + 5), (1, 2));
    }

    #[test]
    fn long_headings_are_cut_at_a_character_boundary() {
        let text = format!("# {}\n\nBody.", "é".repeat(300));
        let found = headings(&text);
        assert_eq!(found.len(), 1);
        assert!(found[0].2.len() <= MAX_HEADING_BYTES && found[0].2.starts_with('é'));
    }
}
