//! Cost of the edge (authentication, tenant, role, rate limits) per call: cached searches
//! through two gateways over the same search-svc in the same run, one with the edge on (the
//! cluster's own, called with an API key) and one started with `--no-auth`, alternating call
//! by call so both see the same machine state.
//!
//! ```sh
//! cargo build -p smartdb-cli -p smartdb-tests --benches      # or --release for both
//! target/debug/deps/edge-<hash> --bench
//! ```
//!
//! Goal (issue 11): at most 50 µs added at p50, and cached search through the gateway with the
//! edge on still at most 0.5 ms at p50. Env: `SMARTDB_BENCH_CALLS` (per gateway, default
//! 5000), `SMARTDB_BIN`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{alternate_cached_searches, percentile, seeded_cluster, us};
use smartdb_proto::v1 as pb;

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let calls = common::bench::calls(5000);
    println!("edge bench: CPU {}", common::cpu_features());
    let cluster = seeded_cluster(&[]).await;

    // A second gateway over the same services, with the edge off.
    let store = tempfile::tempdir().unwrap();
    let data_dir = store.path().display().to_string();
    let open =
        common::ExtraService::start(&cluster, &["--no-auth", "--data-dir", &data_dir], &[]).await;

    let mut on = cluster.search().await;
    let mut off = pb::search_service_client::SearchServiceClient::new(
        common::gateway_channel(&open.addr, None).await,
    );
    let (with_edge, without) = alternate_cached_searches(&mut on, &mut off, calls).await;
    let (on50, off50) = (percentile(&with_edge, 0.5), percentile(&without, 0.5));
    println!("  {calls} cached searches per gateway, alternating call by call");
    println!(
        "  edge on : p50 {:>7.1} µs  p99 {:>7.1} µs",
        us(on50),
        us(percentile(&with_edge, 0.99))
    );
    println!(
        "  edge off: p50 {:>7.1} µs  p99 {:>7.1} µs",
        us(off50),
        us(percentile(&without, 0.99))
    );
    println!(
        "  added by the edge at p50: {:.1} µs (goal <= 50 µs); edge-on p50 {:.3} ms (goal <= 0.5 ms)",
        us(on50) - us(off50),
        us(on50) / 1e3
    );
    drop(open);
}
