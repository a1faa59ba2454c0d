//! `smartdb`: start the whole cluster locally (`up`), run one service (`serve`, as Kubernetes
//! does), and work with knowledge bases from the shell (`kb`, `ingest`, `search`, `status`), and measure search quality (`eval`).

mod commands;
mod eval;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "smartdb",
    version,
    about = "smartdb: knowledge bases you can search by meaning"
)]
struct Cli {
    /// Gateway address for the user commands.
    #[arg(
        long,
        global = true,
        env = "SMARTDB_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// API key for the user commands (sent as `authorization: Bearer <key>`); default: the
    /// local cluster's admin key in `<data-dir>/admin.key`, written by `smartdb up`.
    #[arg(long, global = true, env = "SMARTDB_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the whole cluster on this machine: one process per service, supervised.
    Up(up::UpArgs),
    /// Run one service in the foreground.
    Serve {
        #[command(subcommand)]
        service: Service,
    },
    /// Create, list and delete knowledge bases.
    Kb {
        #[command(subcommand)]
        command: commands::KbCommand,
    },
    /// Add files (or every file in folders) to a knowledge base.
    Ingest(commands::IngestArgs),
    /// Search a knowledge base.
    Search(commands::SearchArgs),
    /// Show the health of every service.
    Status,
    /// Measure retrieval quality on a BEIR dataset (nDCG@10, recall@100, MRR@10 per mode).
    Eval(eval::EvalArgs),
}

#[derive(Subcommand)]
enum Service {
    /// The public edge.
    Gateway(Box<smartdb_gateway::Config>),
    /// The vector index and searches.
    Search(Box<smartdb_search::Config>),
    /// The catalog and indexing workers.
    Ingest(Box<smartdb_ingest::Config>),
    /// Embedding models and cache.
    Embed(Box<smartdb_embed::Config>),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let shutdown = smartdb_kit::shutdown::signal_received;
    if matches!(
        cli.command,
        Command::Kb { .. }
            | Command::Ingest(_)
            | Command::Search(_)
            | Command::Status
            | Command::Eval(_)
    ) {
        commands::use_api_key(commands::api_key(cli.api_key.clone())?);
        // Client commands end quietly when their reader goes away (`smartdb search … | head`),
        // as command-line tools do; Rust ignores SIGPIPE, so printing would panic instead.
        // Services keep ignoring it: a peer closing a socket must not kill them.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Serve { service } => match service {
            Service::Gateway(c) => {
                let _telemetry = smartdb_kit::telemetry::init("gateway", c.server.log_json);
                smartdb_gateway::serve(*c, shutdown()).await
            }
            Service::Search(c) => {
                let _telemetry = smartdb_kit::telemetry::init("search-svc", c.server.log_json);
                smartdb_search::serve(*c, shutdown()).await
            }
            Service::Ingest(c) => {
                let _telemetry = smartdb_kit::telemetry::init("ingest-svc", c.server.log_json);
                smartdb_ingest::serve(*c, shutdown()).await
            }
            Service::Embed(c) => {
                let _telemetry = smartdb_kit::telemetry::init("embed-svc", c.server.log_json);
                smartdb_embed::serve(*c, shutdown()).await
            }
        },
        Command::Kb { command } => commands::kb(&cli.addr, command).await,
        Command::Ingest(args) => commands::ingest(&cli.addr, args).await,
        Command::Search(args) => commands::search(&cli.addr, args).await,
        Command::Status => commands::status(&cli.addr).await,
        Command::Eval(args) => eval::run(&cli.addr, args).await,
    }
}
