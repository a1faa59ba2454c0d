//! `smartdb-ingest`: runs ingest-svc alone (as Kubernetes does). Same as `smartdb serve ingest`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "smartdb-ingest",
    version,
    about = "smartdb ingest-svc: catalog and indexing workers"
)]
struct Cli {
    #[command(flatten)]
    config: smartdb_ingest::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = smartdb_kit::telemetry::init("ingest-svc", cli.config.server.log_json);
    smartdb_ingest::serve(cli.config, smartdb_kit::shutdown::signal_received()).await
}
