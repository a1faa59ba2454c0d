//! `smartdb-gateway`: runs the gateway alone (as Kubernetes does). Same as `smartdb serve gateway`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "smartdb-gateway",
    version,
    about = "smartdb gateway: the public edge"
)]
struct Cli {
    #[command(flatten)]
    config: smartdb_gateway::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = smartdb_kit::telemetry::init("gateway", cli.config.server.log_json);
    smartdb_gateway::serve(cli.config, smartdb_kit::shutdown::signal_received()).await
}
