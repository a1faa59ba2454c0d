//! Splitting text into chunks that fit the embedding model, measured with the model's own
//! tokenizer (`text-splitter` does the splitting on semantic boundaries: Markdown structure,
//! paragraphs, sentences).

use text_splitter::{ChunkConfig, MarkdownSplitter, TextSplitter};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::extract::ContentType;

/// Tokens kept free for the special tokens the model adds ([CLS], [SEP]) and a model prefix.
const RESERVED_TOKENS: usize = 8;

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

    /// Splits `text`, dropping chunks that are only whitespace.
    pub fn split(&self, text: &str, content_type: ContentType) -> Vec<String> {
        let chunks: Vec<&str> = match &self.tokenizer {
            Some(tokenizer) => {
                let config = ChunkConfig::new(self.max_tokens)
                    .with_sizer(tokenizer)
                    .with_trim(true);
                match content_type {
                    ContentType::Markdown | ContentType::Html | ContentType::Docx => {
                        MarkdownSplitter::new(config).chunks(text).collect()
                    }
                    ContentType::Plain | ContentType::Pdf => {
                        TextSplitter::new(config).chunks(text).collect()
                    }
                }
            }
            None => {
                let config =
                    ChunkConfig::new(self.max_tokens.min(self.max_chars())).with_trim(true);
                match content_type {
                    ContentType::Markdown | ContentType::Html | ContentType::Docx => {
                        MarkdownSplitter::new(config).chunks(text).collect()
                    }
                    ContentType::Plain | ContentType::Pdf => {
                        TextSplitter::new(config).chunks(text).collect()
                    }
                }
            }
        };
        let mut out = Vec::with_capacity(chunks.len());
        for chunk in chunks.into_iter().filter(|c| !c.trim().is_empty()) {
            if chunk.len() <= self.max_bytes {
                out.push(chunk.to_owned());
            } else {
                // Few tokens, many bytes: cut by characters (4 bytes each at most in UTF-8).
                let config = ChunkConfig::new(self.max_chars()).with_trim(true);
                out.extend(
                    TextSplitter::new(config)
                        .chunks(chunk)
                        .filter(|c| !c.trim().is_empty())
                        .map(str::to_owned),
                );
            }
        }
        out
    }

    fn max_chars(&self) -> usize {
        (self.max_bytes / 4).max(16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_tokenizer_chunks_are_bounded_in_characters() {
        // 108 tokens minus the 8 reserved: chunks of at most 100 characters.
        let chunker = Chunker::from_json("", 108, 32 * 1024).unwrap();
        let text = "A sentence about retrieval. ".repeat(40);
        let chunks = chunker.split(&text, ContentType::Plain);
        assert!(chunks.len() >= 10, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.chars().count() <= 100));
        // Nothing is lost between chunks.
        assert_eq!(chunks.join(" ").matches("retrieval").count(), 40);
    }

    #[test]
    fn chunks_are_bounded_in_bytes_too() {
        // A character-measured model with a huge input limit still gets chunks that fit a hit.
        let chunker = Chunker::from_json("", 100_000, 1024).unwrap();
        let text = "é".repeat(5000);
        let chunks = chunker.split(&text, ContentType::Plain);
        assert!(
            chunks.iter().all(|c| c.len() <= 1024),
            "{:?}",
            chunks.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(chunks.concat(), text);
    }
}
