//! A sentence-transformers model on the CPU: tokenization, batching, pooling (see `bert` for the
//! forward pass).

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use candle_transformers::models::bert::Config;
use tokenizers::{
    PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use super::bert::{Bert, Precision};
use super::fetch::ModelSpec;

/// Tokens per forward pass: bounds activation memory (~15 KB per token) for huge calls.
const TOKENS_PER_FORWARD: usize = 32 * 256;

/// One text's embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// L2-normalized embedding.
    pub values: Vec<f32>,
    /// Whether the text was cut to the model's token limit.
    pub truncated: bool,
    /// Tokens the model saw, including `[CLS]`/`[SEP]`.
    pub tokens: usize,
}

/// A sentence-transformers BERT model (mean pooling, normalized) loaded into memory.
pub struct LocalModel {
    id: String,
    model: Bert,
    /// Public tokenizer: truncation at `max_tokens`, padding to the batch's longest.
    tokenizer: Tokenizer,
    /// Same truncation, no padding: the forward pass packs sequences without padding.
    unpadded: Tokenizer,
    /// No truncation or padding: counts the tokens a text really has.
    counter: Tokenizer,
    tokenizer_json: String,
    dimension: usize,
    max_tokens: usize,
}

impl LocalModel {
    /// Loads the model files in `dir` (as returned by `ensure_model`) for `spec`.
    pub fn load(dir: &Path, spec: &ModelSpec) -> anyhow::Result<Self> {
        Self::load_with(dir, spec, Precision::Auto)
    }

    /// Like [`LocalModel::load`], with the arithmetic of the linear layers chosen.
    pub fn load_with(dir: &Path, spec: &ModelSpec, precision: Precision) -> anyhow::Result<Self> {
        let config_path = dir.join("config.json");
        let config: Config = serde_json::from_slice(
            &std::fs::read(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?,
        )
        .with_context(|| format!("parsing {}", config_path.display()))?;
        if config.hidden_size != spec.dimension {
            bail!(
                "{} has hidden size {}, spec says {}",
                spec.id,
                config.hidden_size,
                spec.dimension
            );
        }
        // Position embeddings cap the usable length whatever the spec says.
        let max_tokens = spec.max_tokens.min(config.max_position_embeddings);

        let model = Bert::load(&dir.join("model.safetensors"), &config, precision)
            .context("loading BERT weights")?;

        let tokenizer_path = dir.join("tokenizer.json");
        let mut counter = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("loading {}: {e}", tokenizer_path.display()))?;
        counter.with_truncation(None).map_err(|e| anyhow!(e))?;
        counter.with_padding(None);

        let mut unpadded = counter.clone();
        // The shipped tokenizer.json truncates at 128; sentence-transformers uses max_seq_length.
        unpadded
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| anyhow!(e))?;

        let mut tokenizer = unpadded.clone();
        let file_padding = Tokenizer::from_file(&tokenizer_path)
            .ok()
            .and_then(|t| t.get_padding().cloned())
            .unwrap_or_default();
        // Keep the file's pad token/id, but pad to the batch's longest instead of a fixed 128.
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_to_multiple_of: None,
            ..file_padding
        }));
        let tokenizer_json = tokenizer.to_string(false).map_err(|e| anyhow!(e))?;

        tracing::info!(
            model = spec.id,
            dir = %dir.display(),
            max_tokens,
            linear_layers = if model.uses_bf16() { "bf16" } else { "f32" },
            "embedding model loaded"
        );
        Ok(Self {
            id: spec.id.to_string(),
            model,
            tokenizer,
            unpadded,
            counter,
            tokenizer_json,
            dimension: spec.dimension,
            max_tokens,
        })
    }

    /// Whether the linear layers multiply in bf16 (see [`Precision`]).
    pub fn uses_bf16(&self) -> bool {
        self.model.uses_bf16()
    }

    /// Embeds `texts` (any lengths, any count), returning results in input order.
    pub fn embed(&self, texts: &[&str]) -> anyhow::Result<Vec<Embedded>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .unpadded
            .encode_batch_fast(texts.to_vec(), true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut results = Vec::with_capacity(texts.len());
        let mut start = 0;
        while start < encodings.len() {
            // Greedy token budget; a single text always fits since it is at most max_tokens.
            let mut end = start + 1;
            let mut tokens = encodings[start].len();
            while end < encodings.len() && tokens + encodings[end].len() <= TOKENS_PER_FORWARD {
                tokens += encodings[end].len();
                end += 1;
            }
            let batch = &encodings[start..end];
            let ids: Vec<&[u32]> = batch.iter().map(|e| e.get_ids()).collect();
            for (encoding, values) in batch.iter().zip(self.model.embed(&ids)?) {
                results.push(Embedded {
                    values,
                    truncated: !encoding.get_overflowing().is_empty(),
                    tokens: encoding.len(),
                });
            }
            start = end;
        }
        Ok(results)
    }

    /// The tokenizer as the model uses it (truncation at `max_tokens`, batch-longest padding).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// `tokenizer()` serialized as tokenizer.json, with our truncation, for callers that chunk text.
    pub fn tokenizer_json(&self) -> String {
        self.tokenizer_json.clone()
    }

    /// Embedding dimension.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Token limit per text, including special tokens; longer texts are truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Model id, as in its `ModelSpec`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Tokens `text` has without truncation, including special tokens (fits iff ≤ `max_tokens()`).
    pub fn count_tokens(&self, text: &str) -> usize {
        // Encoding only fails on pathological tokenizer configs; 0 would hide that, so count chars.
        self.counter
            .encode_fast(text, true)
            .map(|e| e.len())
            .unwrap_or_else(|_| text.chars().count() + 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MINILM_L6_V2, default_models_dir, ensure_model};
    use serde::Deserialize;
    use std::sync::OnceLock;

    #[derive(Deserialize)]
    struct Reference {
        items: Vec<Item>,
    }

    #[derive(Deserialize)]
    struct Item {
        id: usize,
        text: String,
        num_tokens: usize,
        input_ids: Vec<u32>,
        embedding: Vec<f32>,
    }

    fn reference() -> &'static Reference {
        static REF: OnceLock<Reference> = OnceLock::new();
        REF.get_or_init(|| {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/reference.json");
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
        })
    }

    /// One model for all tests: loading is ~0.5 s and the first run downloads it.
    fn model() -> &'static LocalModel {
        static MODEL: OnceLock<LocalModel> = OnceLock::new();
        MODEL.get_or_init(|| {
            let dir = ensure_model(&default_models_dir(), &MINILM_L6_V2).unwrap();
            LocalModel::load(&dir, &MINILM_L6_V2).unwrap()
        })
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    }

    fn assert_matches_reference(got: &[Embedded], how: &str) {
        let mut worst = f32::MAX;
        for (item, e) in reference().items.iter().zip(got) {
            assert_eq!(e.values.len(), 384);
            let norm: f32 = e.values.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(
                (norm - 1.0).abs() < 1e-4,
                "item {} not normalized: {norm}",
                item.id
            );
            let cos = cosine(&e.values, &item.embedding);
            assert!(cos >= 0.999, "{how}: item {} cosine {cos}", item.id);
            assert_eq!(e.tokens, item.num_tokens, "{how}: item {} tokens", item.id);
            worst = worst.min(cos);
        }
        eprintln!("{how}: lowest cosine to the reference {worst:.7}");
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<LocalModel>();
    }

    #[test]
    fn token_ids_match_reference() {
        let m = model();
        for item in &reference().items {
            let enc = m.tokenizer().encode(item.text.as_str(), true).unwrap();
            assert_eq!(enc.get_ids(), item.input_ids.as_slice(), "item {}", item.id);
        }
        // The public tokenizer pads to the longest of the batch, not to a fixed 128.
        let batch = m
            .tokenizer()
            .encode_batch(vec!["hello", "a man is playing a guitar"], true)
            .unwrap();
        assert_eq!(batch[0].len(), batch[1].len());
        assert!(batch[0].len() < 128);
    }

    #[test]
    fn tokenizer_json_carries_our_truncation() {
        let json: serde_json::Value = serde_json::from_str(&model().tokenizer_json()).unwrap();
        assert_eq!(json["truncation"]["max_length"], 256);
        assert_eq!(json["padding"]["strategy"], "BatchLongest");
        let reloaded: Tokenizer = model().tokenizer_json().parse().unwrap();
        let long = &reference().items[18];
        assert_eq!(
            reloaded.encode(long.text.as_str(), true).unwrap().get_ids(),
            long.input_ids.as_slice()
        );
    }

    #[test]
    fn one_batch_matches_reference() {
        let texts: Vec<&str> = reference().items.iter().map(|i| i.text.as_str()).collect();
        let got = model().embed(&texts).unwrap();
        assert_eq!(got.len(), texts.len());
        assert_matches_reference(&got, "batch");
    }

    #[test]
    fn one_at_a_time_matches_reference_and_batch() {
        let texts: Vec<&str> = reference().items.iter().map(|i| i.text.as_str()).collect();
        let single: Vec<Embedded> = texts
            .iter()
            .map(|t| model().embed(&[*t]).unwrap().remove(0))
            .collect();
        assert_matches_reference(&single, "single");
        // Padding must not change results: batch and single agree far beyond the 0.999 bar.
        let batch = model().embed(&texts).unwrap();
        for (i, (s, b)) in single.iter().zip(&batch).enumerate() {
            let cos = cosine(&s.values, &b.values);
            assert!(cos > 0.99999, "item {i}: single vs batch cosine {cos}");
        }
    }

    #[test]
    fn truncated_exactly_when_longer_than_limit() {
        let m = model();
        let texts: Vec<&str> = reference().items.iter().map(|i| i.text.as_str()).collect();
        let got = m.embed(&texts).unwrap();
        for (item, e) in reference().items.iter().zip(&got) {
            let full = m.count_tokens(&item.text);
            assert_eq!(
                e.truncated,
                full > 256,
                "item {} has {full} tokens",
                item.id
            );
            assert_eq!(e.tokens, full.min(256));
        }
        assert!(got[18].truncated && got[19].truncated);
        assert_eq!(got.iter().filter(|e| e.truncated).count(), 2);
        // A text of exactly 256 tokens (254 words + [CLS]/[SEP]) is not truncated.
        let exact = vec!["hello"; 254].join(" ");
        assert_eq!(m.count_tokens(&exact), 256);
        let e = m.embed(&[&exact]).unwrap().remove(0);
        assert!(!e.truncated);
        assert_eq!(e.tokens, 256);
    }

    #[test]
    fn calls_larger_than_one_forward_pass_keep_order() {
        let items = &reference().items;
        // 33 texts of 256 tokens exceed one pass's token budget, so the call is split.
        let mut texts: Vec<&str> = vec![items[19].text.as_str(); 33];
        texts.insert(0, &items[0].text);
        texts.push(&items[3].text);
        let got = model().embed(&texts).unwrap();
        assert_eq!(got.len(), texts.len());
        for (e, want) in [
            (&got[0], &items[0]),
            (&got[20], &items[19]),
            (&got[34], &items[3]),
        ] {
            assert!(
                cosine(&e.values, &want.embedding) >= 0.999,
                "item {}",
                want.id
            );
        }
    }

    #[test]
    fn accessors_and_edge_cases() {
        let m = model();
        assert_eq!(m.dimension(), 384);
        assert_eq!(m.max_tokens(), 256);
        assert_eq!(m.id(), "all-MiniLM-L6-v2");
        assert_eq!(m.count_tokens("hello"), 3);
        assert!(m.embed(&[]).unwrap().is_empty());
        let e = m.embed(&["", "   "]).unwrap();
        assert_eq!(e[0].tokens, 2);
        assert!(e.iter().all(|e| e.values.iter().all(|v| v.is_finite())));
    }
}
