//! `smartdb-embed`: runs embed-svc alone (as Kubernetes does). Same as `smartdb serve embed`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "smartdb-embed",
    version,
    about = "smartdb embed-svc: embedding models and cache"
)]
struct Cli {
    #[command(flatten)]
    config: smartdb_embed::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = smartdb_kit::telemetry::init("embed-svc", cli.config.server.log_json);
    smartdb_embed::serve(cli.config, smartdb_kit::shutdown::signal_received()).await
}
