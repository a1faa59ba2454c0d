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
    tokenizer: Tokenizer,
    max_tokens: usize,
}

impl Chunker {
    /// A chunker from a Hugging Face `tokenizer.json` and the model's input limit.
    pub fn from_json(tokenizer_json: &str, model_max_tokens: usize) -> Result<Self> {
        let mut tokenizer: Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| Error::Internal(format!("cannot load the model's tokenizer: {e}")))?;
        // Measuring must see the full length; a truncating tokenizer would call everything short.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Internal(format!("tokenizer: {e}")))?;
        tokenizer.with_padding(None);
        let max_tokens = model_max_tokens.saturating_sub(RESERVED_TOKENS).max(16);
        Ok(Self {
            tokenizer,
            max_tokens,
        })
    }

    /// Most tokens in one chunk.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Splits `text`, dropping chunks that are only whitespace.
    pub fn split(&self, text: &str, content_type: ContentType) -> Vec<String> {
        let config = ChunkConfig::new(self.max_tokens)
            .with_sizer(&self.tokenizer)
            .with_trim(true);
        let chunks: Vec<&str> = match content_type {
            ContentType::Markdown => MarkdownSplitter::new(config).chunks(text).collect(),
            ContentType::Plain => TextSplitter::new(config).chunks(text).collect(),
        };
        chunks
            .into_iter()
            .filter(|c| !c.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }
}
