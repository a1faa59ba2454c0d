//! `smartdb eval`: retrieval quality on a BEIR dataset, through the public API.
//!
//! Loads `corpus.jsonl` into a fresh knowledge base (title, text, the corpus id as metadata),
//! waits until it is indexed, runs every query of the split with qrels in each mode, and prints
//! nDCG@10, recall@100 and MRR@10 per mode. Hits are chunks; a document ranks where its best
//! chunk does.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use smartdb_proto::v1 as pb;

/// Arguments of `smartdb eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Dataset directory in the BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.
    #[arg(long)]
    dataset: PathBuf,
    /// Split whose qrels to use (falls back to what exists: test, dev, train).
    #[arg(long, default_value = "test")]
    split: String,
    /// Knowledge base to load into (default: a new one named after the dataset). An existing
    /// one with documents is searched as it is, without loading.
    #[arg(long)]
    kb: Option<String>,
    /// Modes to evaluate.
    #[arg(long, value_delimiter = ',', default_value = "hybrid,dense,lexical")]
    modes: Vec<String>,
    /// Only the first N corpus documents (quick runs; figures are then not comparable).
    #[arg(long)]
    limit_docs: Option<usize>,
    /// Delete the knowledge base afterwards.
    #[arg(long)]
    delete: bool,
    /// Also write every ranking (mode, query id, ranked corpus ids with scores) to this JSONL
    /// file, e.g. to study fusion settings offline.
    #[arg(long)]
    dump: Option<PathBuf>,
}

/// One query's relevance judgements: corpus id → grade.
type Qrels = HashMap<String, HashMap<String, u32>>;

fn read_jsonl(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

fn read_qrels(dataset: &Path, split: &str) -> anyhow::Result<(String, Qrels)> {
    let mut tried = Vec::new();
    for split in std::iter::once(split).chain(["test", "dev", "train"]) {
        let path = dataset.join("qrels").join(format!("{split}.tsv"));
        tried.push(path.display().to_string());
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut qrels = Qrels::new();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split('\t').collect();
            if let [query, doc, grade] = fields[..] {
                let grade: u32 = grade.trim().parse().unwrap_or(0);
                if grade > 0 {
                    qrels
                        .entry(query.to_owned())
                        .or_default()
                        .insert(doc.to_owned(), grade);
                }
            }
        }
        return Ok((split.to_owned(), qrels));
    }
    anyhow::bail!("no qrels found; tried {}", tried.join(", "))
}

/// nDCG@k with linear gains (as BEIR's pytrec_eval), for one ranked list of corpus ids.
fn ndcg(ranked: &[String], judged: &HashMap<String, u32>, k: usize) -> f64 {
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, id)| f64::from(*judged.get(id).unwrap_or(&0)) / (i as f64 + 2.0).log2())
        .sum();
    let mut ideal: Vec<u32> = judged.values().copied().collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, g)| f64::from(*g) / (i as f64 + 2.0).log2())
        .sum();
    if idcg > 0.0 { dcg / idcg } else { 0.0 }
}

fn recall(ranked: &[String], judged: &HashMap<String, u32>, k: usize) -> f64 {
    let found = ranked
        .iter()
        .take(k)
        .filter(|id| judged.contains_key(*id))
        .count();
    found as f64 / judged.len().max(1) as f64
}

fn mrr(ranked: &[String], judged: &HashMap<String, u32>, k: usize) -> f64 {
    ranked
        .iter()
        .take(k)
        .position(|id| judged.contains_key(id))
        .map_or(0.0, |i| 1.0 / (i as f64 + 1.0))
}

fn parse_mode(name: &str) -> anyhow::Result<pb::SearchMode> {
    Ok(match name.trim() {
        "hybrid" => pb::SearchMode::Hybrid,
        "dense" => pb::SearchMode::Dense,
        "lexical" => pb::SearchMode::Lexical,
        other => anyhow::bail!("unknown mode {other:?} (hybrid, dense, lexical)"),
    })
}

const ID_KEY: &str = "beir_id";

/// Runs the evaluation against the gateway at `addr`.
pub async fn run(addr: &str, args: EvalArgs) -> anyhow::Result<()> {
    let modes = args
        .modes
        .iter()
        .map(|m| parse_mode(m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let channel = crate::commands::connect(addr).await?;
    let max = 16 << 20;
    let mut kbs =
        pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(channel.clone());
    let docs = pb::document_service_client::DocumentServiceClient::new(channel.clone())
        .max_decoding_message_size(max);
    let mut search = pb::search_service_client::SearchServiceClient::new(channel.clone())
        .max_decoding_message_size(max);

    let name = args.kb.clone().unwrap_or_else(|| {
        let base = args
            .dataset
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("dataset");
        format!("eval-{base}")
    });
    let (split, qrels) = read_qrels(&args.dataset, &args.split)?;
    if split != args.split {
        println!("split {:?} has no qrels; using {split:?}", args.split);
    }
    let existing = kbs
        .get_knowledge_base(pb::GetKnowledgeBaseRequest { name: name.clone() })
        .await
        .ok()
        .and_then(|r| r.into_inner().knowledge_base);
    let loaded = match existing {
        Some(kb) if kb.document_count > 0 => {
            println!(
                "searching existing knowledge base {name:?} ({} documents)",
                kb.document_count
            );
            false
        }
        Some(_) => true,
        None => {
            kbs.create_knowledge_base(pb::CreateKnowledgeBaseRequest {
                name: name.clone(),
                description: format!("BEIR evaluation of {}", args.dataset.display()),
                ..Default::default()
            })
            .await
            .context("create knowledge base")?;
            true
        }
    };
    if loaded {
        load(&docs, &name, &args).await?;
    }

    let queries = read_jsonl(&args.dataset.join("queries.jsonl"))?;
    let queries: Vec<(String, String)> = queries
        .iter()
        .filter_map(|q| {
            Some((
                q["_id"].as_str()?.to_owned(),
                q["text"].as_str()?.to_owned(),
            ))
        })
        .filter(|(id, _)| qrels.contains_key(id))
        .collect();
    println!(
        "{} queries with judgements in split {split:?}",
        queries.len()
    );
    let mut dump = match &args.dump {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
        )),
        None => None,
    };
    println!(
        "{:<8} {:>8} {:>10} {:>8} {:>10} {:>9}",
        "mode", "nDCG@10", "recall@100", "MRR@10", "p50 ms", "degraded"
    );
    for mode in modes {
        let (mut n, mut r, mut m) = (0.0, 0.0, 0.0);
        let mut took = Vec::new();
        let mut degraded = 0;
        for (id, text) in &queries {
            let started = Instant::now();
            let response = search
                .search(pb::SearchRequest {
                    knowledge_base: name.clone(),
                    query: text.clone(),
                    top_k: 100,
                    mode: mode as i32,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("query {id}"))?
                .into_inner();
            took.push(started.elapsed());
            degraded += usize::from(response.degraded);
            let mut seen = HashSet::new();
            let ranked: Vec<String> = response
                .hits
                .iter()
                .filter_map(|h| h.metadata.get(ID_KEY).cloned())
                .filter(|id| seen.insert(id.clone()))
                .collect();
            if let Some(out) = dump.as_mut() {
                use std::io::Write as _;
                let mut seen = HashSet::new();
                let scored: Vec<(String, f32)> = response
                    .hits
                    .iter()
                    .filter_map(|h| Some((h.metadata.get(ID_KEY)?.clone(), h.score)))
                    .filter(|(id, _)| seen.insert(id.clone()))
                    .collect();
                let line = serde_json::json!({"mode": format!("{mode:?}").to_lowercase(), "query": id, "ranked": scored});
                writeln!(out, "{line}")?;
            }
            let judged = &qrels[id];
            n += ndcg(&ranked, judged, 10);
            r += recall(&ranked, judged, 100);
            m += mrr(&ranked, judged, 10);
        }
        took.sort();
        let count = queries.len().max(1) as f64;
        println!(
            "{:<8} {:>8.4} {:>10.4} {:>8.4} {:>10.1} {:>9}",
            format!("{mode:?}").to_lowercase(),
            n / count,
            r / count,
            m / count,
            took.get(took.len() / 2)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            degraded
        );
    }
    if args.delete {
        kbs.delete_knowledge_base(pb::DeleteKnowledgeBaseRequest { name })
            .await
            .context("delete knowledge base")?;
    }
    Ok(())
}

/// Loads the corpus and waits until every document is indexed.
async fn load(
    docs: &pb::document_service_client::DocumentServiceClient<crate::commands::Gateway>,
    kb: &str,
    args: &EvalArgs,
) -> anyhow::Result<()> {
    let mut corpus = read_jsonl(&args.dataset.join("corpus.jsonl"))?;
    if let Some(n) = args.limit_docs {
        corpus.truncate(n);
    }
    let total = corpus.len();
    let started = Instant::now();
    futures::stream::iter(corpus.into_iter().map(|doc| {
        let mut docs = docs.clone();
        let kb = kb.to_owned();
        async move {
            let id = doc["_id"]
                .as_str()
                .context("corpus line without _id")?
                .to_owned();
            let text = doc["text"].as_str().unwrap_or_default().to_owned();
            if text.trim().is_empty() {
                return Ok::<_, anyhow::Error>(());
            }
            docs.ingest_text(pb::IngestTextRequest {
                knowledge_base: kb,
                title: doc["title"].as_str().unwrap_or_default().to_owned(),
                text,
                metadata: [(ID_KEY.to_owned(), id.clone())].into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("ingest {id}"))?;
            Ok(())
        }
    }))
    .buffer_unordered(8)
    .try_collect::<Vec<()>>()
    .await?;
    println!(
        "{total} documents accepted in {:.1} s; indexing…",
        started.elapsed().as_secs_f64()
    );
    loop {
        let (mut indexed, mut failed, mut all) = (0, 0, 0);
        let mut token = String::new();
        loop {
            let page = docs
                .clone()
                .list_documents(pb::ListDocumentsRequest {
                    knowledge_base: kb.to_owned(),
                    page_size: 1000,
                    page_token: token,
                })
                .await?
                .into_inner();
            for d in &page.documents {
                all += 1;
                if d.status == pb::DocumentStatus::Indexed as i32 {
                    indexed += 1;
                } else if d.status == pb::DocumentStatus::Failed as i32 {
                    failed += 1;
                }
            }
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        if indexed + failed == all {
            println!(
                "{indexed} documents indexed ({failed} failed) after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_match_hand_computed_values() {
        let judged: HashMap<String, u32> = [("a".to_owned(), 1), ("b".to_owned(), 1)].into();
        let ranked: Vec<String> = ["x", "a", "y", "b"].iter().map(|s| s.to_string()).collect();
        let dcg = 1.0 / 3f64.log2() + 1.0 / 5f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2();
        assert!((ndcg(&ranked, &judged, 10) - dcg / idcg).abs() < 1e-9);
        assert_eq!(recall(&ranked, &judged, 100), 1.0);
        assert_eq!(recall(&ranked, &judged, 2), 0.5);
        assert_eq!(mrr(&ranked, &judged, 10), 0.5);
        assert_eq!(mrr(&ranked[..1], &judged, 10), 0.0);
    }
}
