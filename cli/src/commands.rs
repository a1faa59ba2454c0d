//! The user commands: thin clients of the gateway's public API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use smartdb_proto::v1 as pb;
use tonic::transport::Channel;

/// Bytes per upload message.
const PIECE: usize = smartdb_kit::limits::UPLOAD_PIECE_BYTES;

/// `smartdb kb …`
#[derive(clap::Subcommand)]
pub enum KbCommand {
    /// Create a knowledge base.
    Create {
        /// Name: lower-case letters, digits, '-' and '_'.
        name: String,
        /// What it holds.
        #[arg(long, default_value = "")]
        description: String,
        /// Embedding model (default: the cluster's default).
        #[arg(long, default_value = "")]
        model: String,
    },
    /// List knowledge bases.
    List,
    /// Delete a knowledge base with all its documents.
    Delete {
        /// Name of the knowledge base.
        name: String,
    },
    /// Rebuild a knowledge base's chunks and vectors from its stored originals (after a change
    /// of chunking settings or model files, or a lost index); searches keep answering meanwhile.
    /// Needs an admin key.
    Reindex {
        /// Name of the knowledge base.
        name: String,
        /// Return once it started, without waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
    },
}

/// `smartdb ingest …`
#[derive(clap::Args)]
pub struct IngestArgs {
    /// Knowledge base to add to.
    #[arg(long)]
    kb: String,
    /// Files or folders (folders are walked; hidden files are skipped).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Return once uploaded, without waiting for indexing.
    #[arg(long)]
    no_wait: bool,
    /// Name each document by its path (its source id), so that ingesting a changed file again
    /// replaces the version indexed before instead of adding another document.
    #[arg(long)]
    replace: bool,
}

/// `smartdb search …`
#[derive(clap::Args)]
pub struct SearchArgs {
    /// Knowledge base to search.
    #[arg(long)]
    kb: String,
    /// What to look for.
    query: String,
    /// Number of hits.
    #[arg(long, short = 'k', default_value_t = 5)]
    top_k: u32,
    /// Print the raw response as JSON-ish debug output.
    #[arg(long)]
    raw: bool,
}

/// The API key the user commands send, set once by `main`.
static API_KEY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Sets the API key for every later [`connect`].
pub(crate) fn use_api_key(key: Option<String>) {
    let _ = API_KEY.set(key);
}

/// The API key to send: `--api-key` / `SMARTDB_API_KEY`, else the local cluster's
/// `<data-dir>/admin.key` written by `smartdb up`.
pub(crate) fn api_key(flag: Option<String>) -> anyhow::Result<Option<String>> {
    if let Some(key) = flag.filter(|k| !k.trim().is_empty()) {
        return Ok(Some(key.trim().to_owned()));
    }
    let file = smartdb_kit::config::default_data_dir().join(crate::up::ADMIN_KEY_FILE);
    match std::fs::read_to_string(&file) {
        Ok(key) => Ok(Some(key.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", file.display())),
    }
}

/// A channel to the gateway that sends the API key.
pub(crate) type Gateway = smartdb_kit::bearer::Authed;

pub(crate) async fn connect(addr: &str) -> anyhow::Result<Gateway> {
    let endpoint =
        Channel::from_shared(addr.to_owned()).with_context(|| format!("invalid address {addr}"))?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the smartdb gateway at {addr} (is `smartdb up` running?)")
        })?;
    smartdb_kit::bearer::authed(channel, API_KEY.get().cloned().flatten().as_deref())
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    if status.code() == tonic::Code::Unauthenticated {
        return anyhow::anyhow!(
            "Unauthenticated: {} (pass --api-key or set SMARTDB_API_KEY; `smartdb up` writes an admin key to <data-dir>/{})",
            status.message(),
            crate::up::ADMIN_KEY_FILE
        );
    }
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// Runs a `kb` subcommand.
pub async fn kb(addr: &str, command: KbCommand) -> anyhow::Result<()> {
    let mut client =
        pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(connect(addr).await?);
    match command {
        KbCommand::Create {
            name,
            description,
            model,
        } => {
            let kb = client
                .create_knowledge_base(pb::CreateKnowledgeBaseRequest {
                    name,
                    description,
                    embedding_model: model,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .knowledge_base
                .unwrap_or_default();
            println!(
                "created knowledge base {} (id {}, model {})",
                kb.name, kb.id, kb.embedding_model
            );
        }
        KbCommand::List => {
            let mut token = String::new();
            println!(
                "{:<32} {:>10}  {:<20} DESCRIPTION",
                "NAME", "DOCUMENTS", "MODEL"
            );
            loop {
                let page = client
                    .list_knowledge_bases(pb::ListKnowledgeBasesRequest {
                        page_size: 200,
                        page_token: token,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                for kb in page.knowledge_bases {
                    println!(
                        "{:<32} {:>10}  {:<20} {}",
                        kb.name, kb.document_count, kb.embedding_model, kb.description
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        KbCommand::Delete { name } => {
            let r = client
                .delete_knowledge_base(pb::DeleteKnowledgeBaseRequest { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "deleted knowledge base {name} and {} documents",
                r.deleted_documents
            );
        }
        KbCommand::Reindex { name, no_wait } => {
            let progress =
                |kb: Option<pb::KnowledgeBase>| kb.and_then(|kb| kb.reindex).unwrap_or_default();
            let started = progress(
                client
                    .reindex_knowledge_base(pb::ReindexKnowledgeBaseRequest { name: name.clone() })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .knowledge_base,
            );
            println!("reindexing {name}: {} documents", started.documents_total);
            if no_wait {
                return Ok(());
            }
            let bar = ProgressBar::new(started.documents_total).with_style(
                ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix("reindexed");
            loop {
                let now = progress(
                    client
                        .get_knowledge_base(pb::GetKnowledgeBaseRequest { name: name.clone() })
                        .await
                        .map_err(status_error)?
                        .into_inner()
                        .knowledge_base,
                );
                bar.set_length(now.documents_total);
                bar.set_position(now.documents_total.saturating_sub(now.documents_remaining));
                if now.documents_remaining == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            bar.finish();
            println!("reindexed {name}");
        }
    }
    Ok(())
}

fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            for entry in walkdir::WalkDir::new(path)
                .sort_by_file_name()
                .into_iter()
                .filter_entry(|e| {
                    e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.')
                })
            {
                let entry = entry?;
                if entry.file_type().is_file() {
                    files.push(entry.into_path());
                }
            }
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            anyhow::bail!("{} is not a file or folder", path.display());
        }
    }
    Ok(files)
}

async fn upload(
    client: &mut pb::document_service_client::DocumentServiceClient<Gateway>,
    kb: &str,
    path: &Path,
    replace: bool,
) -> Result<pb::UploadDocumentResponse, tonic::Status> {
    let bytes = std::fs::read(path)
        .map_err(|e| tonic::Status::invalid_argument(format!("{}: {e}", path.display())))?;
    let header = pb::DocumentHeader {
        knowledge_base: kb.to_owned(),
        source_name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        source_id: match replace {
            true => path.to_string_lossy().into_owned(),
            false => String::new(),
        },
        ..Default::default()
    };
    let mut messages = vec![pb::UploadDocumentRequest {
        payload: Some(pb::upload_document_request::Payload::Header(header)),
    }];
    messages.extend(bytes.chunks(PIECE).map(|piece| pb::UploadDocumentRequest {
        payload: Some(pb::upload_document_request::Payload::Data(piece.to_vec())),
    }));
    Ok(client
        .upload_document(tokio_stream::iter(messages))
        .await?
        .into_inner())
}

/// Uploads files with a progress bar, then waits for them to be indexed.
pub async fn ingest(addr: &str, args: IngestArgs) -> anyhow::Result<()> {
    let files = collect_files(&args.paths)?;
    if files.is_empty() {
        anyhow::bail!("no files found");
    }
    let mut client = pb::document_service_client::DocumentServiceClient::new(connect(addr).await?)
        .max_encoding_message_size(smartdb_kit::limits::Limits::default().message_bytes())
        .max_decoding_message_size(smartdb_kit::limits::Limits::default().message_bytes());
    let style = ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {wide_msg}")
        .expect("valid template")
        .progress_chars("=> ");
    let bar = ProgressBar::new(files.len() as u64)
        .with_style(style.clone())
        .with_prefix("uploading");
    let (mut accepted, mut failed) = (Vec::new(), 0usize);
    for path in &files {
        bar.set_message(path.display().to_string());
        match upload(&mut client, &args.kb, path, args.replace).await {
            Ok(r) => {
                let doc = r.document.unwrap_or_default();
                if r.deduplicated {
                    bar.println(format!(
                        "  = {} (already in {}, document {})",
                        path.display(),
                        args.kb,
                        doc.id
                    ));
                }
                accepted.push((path.clone(), doc));
            }
            Err(status)
                if status.code() == tonic::Code::NotFound
                    || status.code() == tonic::Code::Unavailable =>
            {
                bar.abandon();
                return Err(status_error(status));
            }
            Err(status) => {
                failed += 1;
                bar.println(format!("  ✗ {}: {}", path.display(), status.message()));
            }
        }
        bar.inc(1);
    }
    bar.finish_with_message("done");
    if !args.no_wait && !accepted.is_empty() {
        let bar = ProgressBar::new(accepted.len() as u64)
            .with_style(style)
            .with_prefix("indexing");
        let mut pending = accepted;
        let mut indexed = 0usize;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for (path, doc) in pending {
                let current = client
                    .get_document(pb::GetDocumentRequest {
                        knowledge_base: args.kb.clone(),
                        document_id: doc.id.clone(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .document
                    .unwrap_or_default();
                match pb::DocumentStatus::try_from(current.status) {
                    Ok(pb::DocumentStatus::Indexed) => {
                        indexed += 1;
                        bar.inc(1);
                    }
                    Ok(pb::DocumentStatus::Failed) => {
                        failed += 1;
                        bar.println(format!("  ✗ {}: {}", path.display(), current.error));
                        bar.inc(1);
                    }
                    _ => {
                        bar.set_message(path.display().to_string());
                        still.push((path, current));
                    }
                }
            }
            pending = still;
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        bar.finish_with_message("done");
        println!("{indexed} indexed, {failed} failed");
    } else {
        println!("{} uploaded, {failed} failed", files.len() - failed);
    }
    if failed > 0 {
        anyhow::bail!("{failed} file(s) failed");
    }
    Ok(())
}

/// Searches and prints the hits.
pub async fn search(addr: &str, args: SearchArgs) -> anyhow::Result<()> {
    let mut client = pb::search_service_client::SearchServiceClient::new(connect(addr).await?);
    let response = client
        .search(pb::SearchRequest {
            knowledge_base: args.kb,
            query: args.query,
            top_k: args.top_k,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if args.raw {
        println!("{response:#?}");
        return Ok(());
    }
    if response.degraded {
        println!("(degraded: {})", response.degraded_reason);
    }
    if response.hits.is_empty() {
        println!("no hits");
    }
    for (i, hit) in response.hits.iter().enumerate() {
        let snippet: String = hit
            .text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(240)
            .collect();
        let mut place = hit.heading_path.join(" > ");
        if hit.page_start > 0 {
            let pages = match hit.page_end > hit.page_start {
                true => format!("pp. {}-{}", hit.page_start, hit.page_end),
                false => format!("p. {}", hit.page_start),
            };
            place = match place.is_empty() {
                true => pages,
                false => format!("{place}, {pages}"),
            };
        }
        println!(
            "{:>2}. {:.3}  {}  [{} #{}]",
            i + 1,
            hit.score,
            hit.title,
            hit.document_id,
            hit.chunk_index
        );
        if !place.is_empty() {
            println!("    in: {place}");
        }
        println!("    {snippet}");
    }
    Ok(())
}

/// Prints every service's health; fails if any is not serving.
pub async fn status(addr: &str) -> anyhow::Result<()> {
    let mut client = pb::admin_service_client::AdminServiceClient::new(connect(addr).await?);
    let status = client
        .get_cluster_status(pb::GetClusterStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    println!("smartdb {}", status.version);
    for s in &status.services {
        let health =
            pb::ServiceHealth::try_from(s.health).unwrap_or(pb::ServiceHealth::Unspecified);
        let label = match health {
            pb::ServiceHealth::Serving => "SERVING",
            pb::ServiceHealth::NotServing => "NOT_SERVING",
            pb::ServiceHealth::Unreachable => "UNREACHABLE",
            pb::ServiceHealth::Unspecified => "UNKNOWN",
        };
        println!(
            "  {:<11} {:<12} {:>4} ms  {} {}",
            s.name, label, s.latency_ms, s.address, s.detail
        );
    }
    if status.alerts.is_empty() {
        println!("alerts: none firing");
    } else {
        println!("alerts firing:");
        for a in &status.alerts {
            println!(
                "  {:<8} {:<30} {}",
                a.severity.to_uppercase(),
                a.name,
                a.summary
            );
        }
    }
    // The figures are extra: an older gateway without GetMetrics still shows its health.
    match client.get_metrics(pb::GetMetricsRequest::default()).await {
        Ok(metrics) => print_metrics(&metrics.into_inner()),
        Err(status) => println!("metrics: unavailable ({})", status.message()),
    }
    if !status.healthy {
        anyhow::bail!("the cluster is not healthy");
    }
    Ok(())
}

/// Prints `GetMetrics` as tables.
fn print_metrics(m: &pb::GetMetricsResponse) {
    println!("last {:.0} s:", m.window_seconds);
    if m.rpcs.is_empty() {
        println!("  no calls");
    } else {
        println!(
            "  {:<11} {:<48} {:>8} {:>7} {:>9} {:>9} {:>9}",
            "SERVICE", "RPC", "CALLS", "ERR %", "P50 ms", "P95 ms", "P99 ms"
        );
        for r in &m.rpcs {
            println!(
                "  {:<11} {:<48} {:>8} {:>7.2} {:>9.2} {:>9.2} {:>9.2}",
                r.service,
                r.method.trim_start_matches("smartdb.v1."),
                r.requests,
                r.error_rate * 100.0,
                r.p50_ms,
                r.p95_ms,
                r.p99_ms
            );
        }
    }
    for c in &m.caches {
        println!(
            "  cache  {:<11} {:<15} {:<7} {:>6.1} % hits of {}",
            c.service,
            c.cache,
            c.level,
            c.hit_ratio * 100.0,
            c.lookups
        );
    }
    for q in &m.queues {
        println!(
            "  queue  {:<11} {:<15} {:>6} waiting, oldest {:.0} s",
            q.service, q.queue, q.depth, q.oldest_age_seconds
        );
    }
    for u in &m.unreachable {
        println!("  unreadable: {u}");
    }
}
