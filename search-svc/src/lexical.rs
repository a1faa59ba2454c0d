//! The lexical side of hybrid search: BM25 sparse vectors of chunks and queries.
//!
//! The analyzer is qdrant-edge's BM25 (the code Qdrant's server runs for its own `qdrant/bm25`
//! inference): Unicode word boundaries, lower-casing, English stop words and Snowball stemming
//! (`rust-stemmers`), terms hashed to ids with murmur3. The vectors carry BM25's term-frequency
//! part only; the engine multiplies in the inverse document frequency over the knowledge base's
//! collection (Qdrant's `idf` modifier), which stays right as documents come and go. Using the
//! same analyzer for both backends keeps a knowledge base's ranking the same on either.

use qdrant_edge::bm25_embed::{EdgeBm25, EdgeBm25Config};

use crate::index::SparseVector;

/// BM25 parameters (tuned on the SciFact train split, see the README).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bm25Settings {
    /// Term-frequency saturation.
    pub k1: f64,
    /// Length normalization (0 none, 1 full).
    pub b: f64,
    /// Expected chunk length in terms.
    pub avg_len: f64,
}

impl Default for Bm25Settings {
    fn default() -> Self {
        Self {
            k1: 1.2,
            b: 0.75,
            avg_len: 120.0,
        }
    }
}

/// Turns texts into BM25 sparse vectors.
#[derive(Debug)]
pub struct Analyzer {
    bm25: EdgeBm25,
}

impl Analyzer {
    /// An English analyzer with `settings`.
    pub fn new(settings: Bm25Settings) -> anyhow::Result<Self> {
        let not_nan = |x: f64, what: &str| {
            qdrant_edge::external::ordered_float::NotNan::new(x)
                .map_err(|_| anyhow::anyhow!("BM25 {what} must be a number"))
        };
        let config = EdgeBm25Config {
            k: not_nan(settings.k1, "k1")?,
            b: not_nan(settings.b, "b")?,
            avg_len: not_nan(settings.avg_len, "average length")?,
            language: Some("english".into()),
            ..EdgeBm25Config::default()
        };
        Ok(Self {
            bm25: EdgeBm25::new(config).map_err(|e| anyhow::anyhow!("BM25 analyzer: {e}"))?,
        })
    }

    /// The vector of a chunk: its document's title and its text (a chunk rarely repeats the
    /// title, which is often the best keyword match).
    pub fn document(&self, title: &str, headings: &[String], text: &str) -> SparseVector {
        // A title taken from the text's own first line is already there.
        let title = match title.is_empty() || text.starts_with(title) {
            true => "",
            false => title,
        };
        if title.is_empty() && headings.is_empty() {
            return convert(self.bm25.embed_document(text));
        }
        let mut joined = String::with_capacity(title.len() + text.len() + 64);
        for line in std::iter::once(title).chain(headings.iter().map(String::as_str)) {
            if !line.is_empty() {
                joined.push_str(line);
                joined.push('\n');
            }
        }
        joined.push_str(text);
        convert(self.bm25.embed_document(&joined))
    }

    /// The vector of a query (each distinct term once; weights come from IDF).
    pub fn query(&self, text: &str) -> SparseVector {
        convert(self.bm25.embed_query(text))
    }
}

fn convert(v: qdrant_edge::SparseVector) -> SparseVector {
    SparseVector {
        indices: v.indices,
        values: v.values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_drops_stop_words_and_ignores_case() {
        let analyzer = Analyzer::new(Bm25Settings::default()).unwrap();
        let a = analyzer.query("The Running dogs");
        let b = analyzer.query("run dog");
        let mut ai = a.indices.clone();
        let mut bi = b.indices.clone();
        ai.sort();
        bi.sort();
        assert_eq!(ai, bi, "'the' is a stop word, running→run, dogs→dog");
        assert!(analyzer.query("the of and").indices.is_empty());
    }

    #[test]
    fn repeated_terms_weigh_more_but_saturate() {
        let analyzer = Analyzer::new(Bm25Settings::default()).unwrap();
        let weight = |text: &str| {
            let v = analyzer.document("", &[], text);
            let id = analyzer.query("owl").indices[0];
            v.indices
                .iter()
                .position(|&i| i == id)
                .map(|p| v.values[p])
                .unwrap()
        };
        let once = weight("owl hunting night forest");
        let twice = weight("owl owl hunting night");
        let many = weight("owl owl owl owl owl owl owl owl");
        assert!(twice > once);
        assert!(many < 2.0 * twice, "BM25 saturates: {once} {twice} {many}");
    }

    #[test]
    fn the_title_counts_as_text_of_every_chunk() {
        let analyzer = Analyzer::new(Bm25Settings::default()).unwrap();
        let owl = analyzer.query("owls").indices[0];
        assert!(
            analyzer
                .document("Owls", &[], "They hunt at night.")
                .indices
                .contains(&owl)
        );
        assert!(
            !analyzer
                .document("", &[], "They hunt at night.")
                .indices
                .contains(&owl)
        );
    }

    #[test]
    fn heading_paths_count_as_text_too() {
        let analyzer = Analyzer::new(Bm25Settings::default()).unwrap();
        let owl = analyzer.query("owls").indices[0];
        let night = analyzer.query("night").indices[0];
        let v = analyzer.document("Birds", &["Owls".into()], "They hunt at night.");
        assert!(v.indices.contains(&owl) && v.indices.contains(&night));
        assert!(v.indices.contains(&analyzer.query("birds").indices[0]));
    }
}
