//! Splitting text into chunks that fit the embedding model, measured with the model's own
//! tokenizer (`text-splitter` does the splitting on semantic boundaries: Markdown structure,
//! paragraphs, sentences). Each chunk keeps where it came from: its byte range in the extracted
//! text, the headings it sits under, and its pages.

use pulldown_cmark::{Event, Parser, Tag, TagEnd};
use text_splitter::{ChunkConfig, ChunkSizer, MarkdownSplitter, TextSplitter};
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
    /// Measure every piece on its own (see [`Chunker::measuring_each_piece`]).
    exact: bool,
    /// Tokenizes ASCII words without the tokenizer's pipeline, for BERT-style tokenizers.
    ascii: Option<AsciiWords>,
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
                exact: false,
                ascii: None,
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
            ascii: AsciiWords::new(&tokenizer),
            tokenizer: Some(tokenizer),
            max_tokens,
            max_bytes,
            exact: false,
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
        let config = ChunkConfig::new(self.max_tokens).with_trim(true);
        let pieces: Vec<(usize, &str)> = match &self.tokenizer {
            Some(tokenizer) => {
                match (!self.exact).then(|| WordTokens::new(tokenizer, self.ascii.as_ref(), text)) {
                    Some(Some(sizer)) => pieces(config.with_sizer(sizer), markdown, text),
                    _ => pieces(config.with_sizer(tokenizer), markdown, text),
                }
            }
            None => {
                let config =
                    ChunkConfig::new(self.max_tokens.min(self.max_chars())).with_trim(true);
                pieces(config, markdown, text)
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

    /// Measures every piece with its own tokenization, as `text-splitter` does by itself,
    /// instead of with [`WordTokens`]. The chunks are the same; tests compare the two.
    #[doc(hidden)]
    pub fn measuring_each_piece(mut self) -> Self {
        self.exact = true;
        self
    }
}

/// `text`'s pieces under `config`, split as Markdown or as plain text.
fn pieces<S: ChunkSizer>(config: ChunkConfig<S>, markdown: bool, text: &str) -> Vec<(usize, &str)> {
    match markdown {
        true => MarkdownSplitter::new(config).chunk_indices(text).collect(),
        false => TextSplitter::new(config).chunk_indices(text).collect(),
    }
}

/// Longest part of a text tokenized at once by [`WordTokens`]: bounds the tokenizer's
/// per-token bookkeeping (about 100 bytes a token) for large documents.
const TOKENIZE_BYTES: usize = 64 * 1024;

/// Sizes the pieces of one text from a single tokenization of it.
///
/// `text-splitter` tokenizes every candidate piece it measures, many per chunk, and that was
/// the largest part of ingest-svc's CPU. With a BERT-style tokenizer the tokens of a piece that
/// does not cut through a word are exactly the whole text's tokens inside it: normalization
/// works per character and the pre-tokenizer splits at whitespace and punctuation, so each word
/// is tokenized on its own. A piece that cuts through a word is tokenized by itself.
struct WordTokens<'a> {
    tokenizer: &'a Tokenizer,
    text: &'a str,
    /// Byte offset in `text` where each token starts, in order.
    token_starts: Vec<u32>,
    /// Byte span in `text` of each word (pre-tokenizer split), in order.
    words: Vec<(u32, u32)>,
}

impl<'a> WordTokens<'a> {
    /// None where the shortcut would not be exact: another kind of tokenizer, or a text holding
    /// one of its added tokens (`[SEP]`...), which split the text before words do (added tokens
    /// matched after normalization could hide in any text: their tokenizers are not served).
    ///
    /// With `ascii` (built for this tokenizer), words of printable ASCII are tokenized by it
    /// and the tokenizer's whole pipeline runs only on what is left.
    fn new(tokenizer: &'a Tokenizer, ascii: Option<&AsciiWords>, text: &'a str) -> Option<Self> {
        if !bert_style(tokenizer) || u32::try_from(text.len()).is_err() {
            return None;
        }
        if tokenizer
            .get_added_tokens_decoder()
            .values()
            .any(|t| t.normalized || text.contains(t.content.as_str()))
        {
            return None;
        }
        let mut found = Found {
            token_starts: Vec::with_capacity(text.len() / 4),
            words: Vec::with_capacity(text.len() / 6),
        };
        let mut start = 0;
        while start < text.len() {
            let end = part_end(text, start);
            match ascii {
                Some(ascii) => ascii.tokenize(tokenizer, text, start..end, &mut found)?,
                None => found.encode(tokenizer, text, start..end)?,
            }
            start = end;
        }
        let Found {
            token_starts,
            words,
        } = found;
        Some(Self {
            tokenizer,
            text,
            token_starts,
            words,
        })
    }

    /// True if byte `at` lies strictly inside a word.
    fn inside_word(&self, at: u32) -> bool {
        let i = self.words.partition_point(|&(from, _)| from < at);
        i > 0 && self.words[i - 1].1 > at
    }
}

/// Whether `tokenizer` is BERT-style (BERT normalizer or none, BERT pre-tokenizer, WordPiece):
/// the kind whose words are tokenized each on its own.
fn bert_style(tokenizer: &Tokenizer) -> bool {
    use tokenizers::{ModelWrapper, NormalizerWrapper, PreTokenizerWrapper};
    matches!(
        tokenizer.get_normalizer(),
        None | Some(NormalizerWrapper::BertNormalizer(_))
    ) && matches!(
        tokenizer.get_pre_tokenizer(),
        Some(PreTokenizerWrapper::BertPreTokenizer(_))
    ) && matches!(tokenizer.get_model(), ModelWrapper::WordPiece(_))
}

/// Tokens and words of a text, found part by part.
struct Found {
    /// Byte offset in the text where each token starts, in order.
    token_starts: Vec<u32>,
    /// Byte span in the text of each word, in order.
    words: Vec<(u32, u32)>,
}

impl Found {
    /// Adds the tokens and words of `text[range]` as the tokenizer's whole pipeline finds them.
    /// `range` must start and end at whitespace (or the text's ends).
    fn encode(
        &mut self,
        tokenizer: &Tokenizer,
        text: &str,
        range: std::ops::Range<usize>,
    ) -> Option<()> {
        let start = range.start;
        let encoding = tokenizer.encode(&text[range], false).ok()?;
        let mut last_word = None;
        for (word, &(from, to)) in encoding.get_word_ids().iter().zip(encoding.get_offsets()) {
            let word = (*word)?;
            let (from, to) = ((start + from) as u32, (start + to) as u32);
            self.token_starts.push(from);
            match self.words.last_mut() {
                Some(span) if last_word == Some(word) => span.1 = span.1.max(to),
                _ => self.words.push((from, to)),
            }
            last_word = Some(word);
        }
        Some(())
    }
}

/// Most words [`AsciiWords`] remembers; past it, it starts over.
const ASCII_WORDS_CACHED: usize = 50_000;
/// Longest word [`AsciiWords`] remembers, in bytes.
const ASCII_WORD_CACHED_BYTES: usize = 32;

/// Tokenizes words of printable ASCII for a BERT-style tokenizer without running its pipeline.
///
/// Our own because the `tokenizers` pipeline was most of the chunker's cost (about 1.5 µs a
/// token, a quarter of ingest-svc's CPU): it tracks every character's alignment through
/// normalization. On printable ASCII, BERT's pipeline comes down to this: the normalizer only
/// lower-cases (if set to), the pre-tokenizer splits at whitespace and makes each ASCII
/// punctuation character a word of its own, and the WordPiece model (the tokenizer's own, run
/// here) tokenizes each word. A word's tokens depend on the word alone, so they are remembered.
/// Anything else (a run of text holding non-ASCII or control characters) goes through the
/// whole pipeline; tests check both agree.
struct AsciiWords {
    lowercase: bool,
    /// Token starts within each word seen, by word (lower-cased if the normalizer does).
    cache: std::sync::Mutex<std::collections::HashMap<Box<str>, Box<[u32]>>>,
}

impl AsciiWords {
    /// For BERT-style tokenizers only.
    fn new(tokenizer: &Tokenizer) -> Option<Self> {
        use tokenizers::NormalizerWrapper;
        if !bert_style(tokenizer) {
            return None;
        }
        let lowercase = match tokenizer.get_normalizer() {
            Some(NormalizerWrapper::BertNormalizer(bert)) => bert.lowercase,
            _ => false,
        };
        Some(Self {
            lowercase,
            cache: Default::default(),
        })
    }

    /// Adds the tokens and words of `text[range]` to `found`; `range` must start and end at
    /// whitespace (or the text's ends). None if the tokenizer fails.
    fn tokenize(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        range: std::ops::Range<usize>,
        found: &mut Found,
    ) -> Option<()> {
        let tokenizers::ModelWrapper::WordPiece(wordpiece) = tokenizer.get_model() else {
            return None;
        };
        let bytes = text.as_bytes();
        // ASCII whitespace bytes never occur inside a multi-byte character, so every segment
        // between them starts and ends at a character boundary.
        let space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        let mut word = String::new();
        // Where a run of segments left to the whole pipeline starts.
        let mut other_from = None;
        let mut i = range.start;
        while i < range.end {
            if space(bytes[i]) {
                i += 1;
                continue;
            }
            let from = i;
            while i < range.end && !space(bytes[i]) {
                i += 1;
            }
            if !bytes[from..i].iter().all(|&b| (0x20..0x7f).contains(&b)) {
                other_from.get_or_insert(from);
                continue;
            }
            if let Some(other) = other_from.take() {
                found.encode(tokenizer, text, other..from)?;
            }
            // Words: runs of letters and digits, and each punctuation character alone.
            let mut at = from;
            while at < i {
                let end = match bytes[at].is_ascii_punctuation() {
                    true => at + 1,
                    false => {
                        let run = bytes[at..i].iter().position(u8::is_ascii_punctuation);
                        run.map_or(i, |n| at + n)
                    }
                };
                word.clear();
                word.push_str(&text[at..end]);
                if self.lowercase {
                    word.make_ascii_lowercase();
                }
                self.word_tokens(wordpiece, &word, |start| {
                    found.token_starts.push((at + start as usize) as u32)
                })?;
                found.words.push((at as u32, end as u32));
                at = end;
            }
        }
        if let Some(other) = other_from {
            found.encode(tokenizer, text, other..range.end)?;
        }
        Some(())
    }

    /// Calls `each` with the start (within `word`) of each of `word`'s tokens.
    fn word_tokens(
        &self,
        wordpiece: &tokenizers::models::wordpiece::WordPiece,
        word: &str,
        mut each: impl FnMut(u32),
    ) -> Option<()> {
        use tokenizers::Model;
        if let Some(starts) = self.cache.lock().ok()?.get(word) {
            starts.iter().copied().for_each(each);
            return Some(());
        }
        let tokens = wordpiece.tokenize(word).ok()?;
        let starts: Box<[u32]> = tokens.iter().map(|t| t.offsets.0 as u32).collect();
        starts.iter().copied().for_each(&mut each);
        if word.len() <= ASCII_WORD_CACHED_BYTES {
            let mut cache = self.cache.lock().ok()?;
            if cache.len() >= ASCII_WORDS_CACHED {
                cache.clear();
            }
            cache.insert(word.into(), starts);
        }
        Some(())
    }
}

impl ChunkSizer for WordTokens<'_> {
    fn size(&self, chunk: &str) -> usize {
        // `text-splitter` measures slices of the text it splits; anything else is measured
        // on its own.
        let base = self.text.as_ptr() as usize;
        let from = (chunk.as_ptr() as usize).wrapping_sub(base);
        if from > self.text.len() || chunk.len() > self.text.len() - from {
            return self.tokenizer.size(chunk);
        }
        let (from, to) = (from as u32, (from + chunk.len()) as u32);
        if self.inside_word(from) || self.inside_word(to) {
            return self.tokenizer.size(chunk);
        }
        self.token_starts.partition_point(|&s| s < to)
            - self.token_starts.partition_point(|&s| s < from)
    }
}

/// Where the part of `text` tokenized at once from `start` ends: after an ASCII whitespace
/// byte (never inside a word) near [`TOKENIZE_BYTES`] on, or at the end.
fn part_end(text: &str, start: usize) -> usize {
    if text.len() - start <= TOKENIZE_BYTES {
        return text.len();
    }
    let bytes = text.as_bytes();
    let space = |b: &u8| matches!(b, b' ' | b'\n' | b'\t' | b'\r');
    let window = &bytes[start + TOKENIZE_BYTES / 2..start + TOKENIZE_BYTES];
    if let Some(i) = window.iter().rposition(space) {
        return start + TOKENIZE_BYTES / 2 + i + 1;
    }
    match bytes[start + TOKENIZE_BYTES..].iter().position(space) {
        Some(i) => start + TOKENIZE_BYTES + i + 1,
        None => text.len(),
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

    /// A small BERT-style tokenizer (the MiniLM pipeline: BERT normalizer and pre-tokenizer,
    /// WordPiece) whose vocabulary spells most words letter by letter, so pieces split inside
    /// words too.
    fn wordpiece_json() -> String {
        let mut vocab = serde_json::Map::new();
        let mut add = |token: String| {
            let id = vocab.len();
            vocab.entry(token).or_insert(id.into());
        };
        for special in ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"] {
            add(special.into());
        }
        for word in [
            "the",
            "search",
            "retrieval",
            "chunk",
            "token",
            "café",
            "##s",
            "##ing",
        ] {
            add(word.into());
        }
        for c in ('a'..='z').chain('0'..='9') {
            add(c.to_string());
            add(format!("##{c}"));
        }
        for c in ".,;:!?()[]#-'\"/".chars().chain(['検', '索']) {
            add(c.to_string());
        }
        let special = |id: usize, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "[UNK]"), special(1, "[CLS]"), special(2, "[SEP]"),
                special(3, "[PAD]"), special(4, "[MASK]")],
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100, "vocab": vocab},
        })
        .to_string()
    }

    /// Text mixing what tokenizers treat specially: punctuation, accents (stripped), CJK (a
    /// word per character), control characters (dropped), numbers, words longer than a chunk,
    /// a word too long for WordPiece (one unknown token), paragraphs and Markdown headings.
    fn varied_text(seed: u64, words: usize) -> String {
        let mut state = seed;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let vocabulary = [
            "the",
            "searching",
            "retrieval",
            "chunks",
            "Tokens",
            "café",
            "Crème",
            "brûlée",
            "検索",
            "e.g.",
            "(see",
            "below),",
            "\"quoted\"",
            "don't",
            "3.14",
            "x\u{0}y",
            "naïve",
            "a-b",
            "wordpiece",
            "¿qué?",
            "—",
            "Ωmega",
            "tab\there",
            "vertical\u{b}tab",
            "del\u{7f}ete",
            "x\u{1}Y",
            "MiXeD-Case_words",
            "$5+3=8;",
            "a~b|c^d`e",
        ];
        let mut out = String::new();
        for i in 0..words {
            match next(40) {
                0 => out.push_str("\n\n"),
                1 => out.push_str("\n# A heading\n"),
                2 => out.push_str(&"abcdefghij".repeat(1 + next(8) as usize)),
                3 => out.push_str(&"z".repeat(120)),
                _ => out.push_str(vocabulary[next(vocabulary.len() as u64) as usize]),
            }
            out.push(if i % 13 == 12 { '.' } else { ' ' });
        }
        out
    }

    #[test]
    fn one_tokenization_per_text_gives_the_chunks_measuring_each_piece_gives() {
        let json = wordpiece_json();
        for max_tokens in [24, 40, 136] {
            let fast = Chunker::from_json(&json, max_tokens, 32 * 1024).unwrap();
            let exact = Chunker::from_json(&json, max_tokens, 32 * 1024)
                .unwrap()
                .measuring_each_piece();
            for seed in 0..6 {
                let text = varied_text(seed, 400);
                let tokenizer = fast.tokenizer.as_ref().unwrap();
                assert!(
                    WordTokens::new(tokenizer, fast.ascii.as_ref(), &text).is_some(),
                    "shortcut not taken"
                );
                for kind in [ContentType::Plain, ContentType::Markdown] {
                    let chunks = fast.split(&text, kind, &[]);
                    assert!(chunks.len() > 3, "{} chunks", chunks.len());
                    assert_eq!(
                        chunks,
                        exact.split(&text, kind, &[]),
                        "seed {seed}, {max_tokens} tokens, {kind:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_shortcut_is_exact_across_its_tokenizing_parts_and_steps_aside_for_added_tokens() {
        let json = wordpiece_json();
        let fast = Chunker::from_json(&json, 136, 32 * 1024).unwrap();
        let exact = Chunker::from_json(&json, 136, 32 * 1024)
            .unwrap()
            .measuring_each_piece();
        // Longer than one tokenizing part, with a long run without spaces across a part's end.
        let mut text = varied_text(7, 14_000);
        text.insert_str(TOKENIZE_BYTES - 500, &"q".repeat(40_000));
        assert!(text.len() > 2 * TOKENIZE_BYTES);
        let tokenizer = fast.tokenizer.as_ref().unwrap();
        let sizer = WordTokens::new(tokenizer, fast.ascii.as_ref(), &text).unwrap();
        // Sizes of arbitrary slices, words cut or not, match a tokenization of the slice.
        let bounds: Vec<usize> = (0..text.len())
            .step_by(997)
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for pair in bounds.windows(3) {
            let piece = &text[pair[0]..pair[2]];
            assert_eq!(sizer.size(piece), tokenizer.size(piece), "{piece:?}");
        }
        assert_eq!(
            fast.split(&text, ContentType::Plain, &[]),
            exact.split(&text, ContentType::Plain, &[])
        );
        // An added token in the text splits it before words do: the text is measured piece
        // by piece.
        let marked = format!("{} [SEP] {}", varied_text(1, 50), varied_text(2, 50));
        assert!(WordTokens::new(tokenizer, fast.ascii.as_ref(), &marked).is_none());
        assert_eq!(
            fast.split(&marked, ContentType::Plain, &[]),
            exact.split(&marked, ContentType::Plain, &[])
        );
    }

    /// The ASCII shortcut finds exactly the tokens and words of the whole pipeline, on text
    /// that switches between ASCII and other characters within words, between words and across
    /// tokenizing parts, for tokenizers that lower-case and for ones that do not.
    #[test]
    fn ascii_words_match_the_whole_pipeline() {
        for lowercase in [true, false] {
            let json = wordpiece_json()
                .replace("\"lowercase\":true", &format!("\"lowercase\":{lowercase}"));
            let chunker = Chunker::from_json(&json, 136, 32 * 1024).unwrap();
            let (tokenizer, ascii) = (chunker.tokenizer.as_ref().unwrap(), chunker.ascii.as_ref());
            assert_eq!(ascii.unwrap().lowercase, lowercase);
            let mut texts: Vec<String> = (0..8).map(|seed| varied_text(seed, 600)).collect();
            texts.push(varied_text(99, 30_000)); // several tokenizing parts
            texts.push("plain ascii only, (with) punctuation: \"and\" CAPS.".into());
            texts.push("ünïcödé only ワード 検索".into());
            texts.push(String::new());
            for text in &texts {
                let fast = WordTokens::new(tokenizer, ascii, text).unwrap();
                let whole = WordTokens::new(tokenizer, None, text).unwrap();
                assert_eq!(
                    fast.token_starts, whole.token_starts,
                    "lowercase {lowercase}"
                );
                assert_eq!(fast.words, whole.words, "lowercase {lowercase}");
            }
            // Twice: the second time from what it remembers.
            let again = WordTokens::new(tokenizer, ascii, &texts[0]).unwrap();
            let whole = WordTokens::new(tokenizer, None, &texts[0]).unwrap();
            assert_eq!(again.token_starts, whole.token_starts);
            assert!(!ascii.unwrap().cache.lock().unwrap().is_empty());
        }
    }

    #[test]
    fn long_headings_are_cut_at_a_character_boundary() {
        let text = format!("# {}\n\nBody.", "é".repeat(300));
        let found = headings(&text);
        assert_eq!(found.len(), 1);
        assert!(found[0].2.len() <= MAX_HEADING_BYTES && found[0].2.starts_with('é'));
    }
}
