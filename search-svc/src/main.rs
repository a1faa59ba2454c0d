//! `smartdb-search`: runs search-svc alone (as Kubernetes does). Same as `smartdb serve search`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "smartdb-search",
    version,
    about = "smartdb search-svc: the vector index and searches"
)]
struct Cli {
    #[command(flatten)]
    config: smartdb_search::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = smartdb_kit::telemetry::init("search-svc", cli.config.server.log_json);
    smartdb_search::serve(cli.config, smartdb_kit::shutdown::signal_received()).await
}
