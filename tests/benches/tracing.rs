//! Cost of tracing at the default sampling (parent-based, always on): cached searches through
//! two clusters in the same run, one exporting its spans over OTLP to a receiver in this
//! process and one without an endpoint, alternating call by call so both see the same machine
//! state.
//!
//! ```sh
//! cargo build -p smartdb-cli -p smartdb-tests --benches      # or --release for both
//! target/debug/deps/tracing-<hash> --bench
//! ```
//!
//! Goal (issue 12): cached search p50 with the exporter on at most 5 % over the one without.
//! Env: `SMARTDB_BENCH_CALLS` (per cluster, default 5000), `SMARTDB_BIN`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::bench::{alternate_cached_searches, percentile, seeded_cluster, us};

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let calls = common::bench::calls(5000);
    println!("tracing bench: CPU {}", common::cpu_features());
    let receiver = common::otlp::Receiver::default();
    let endpoint = receiver.start().await;
    let traced = seeded_cluster(&[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())]).await;
    let plain = seeded_cluster(&[]).await;

    let (mut on, mut off) = (traced.search().await, plain.search().await);
    let spans_before = receiver.spans.lock().unwrap().len();
    let (with, without) = alternate_cached_searches(&mut on, &mut off, calls).await;
    // The batch exporter sends every 5 s: wait for the measured calls' spans to arrive (none
    // will when OTEL_TRACES_SAMPLER turns sampling off).
    let expected = spans_before + calls;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut arrived = spans_before;
    while arrived < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        arrived = receiver.spans.lock().unwrap().len();
    }
    let (on50, off50) = (percentile(&with, 0.5), percentile(&without, 0.5));
    println!("  {calls} cached searches per cluster, alternating call by call");
    println!(
        "  traces exported: p50 {:>7.1} µs  p99 {:>7.1} µs  ({} spans received)",
        us(on50),
        us(percentile(&with, 0.99)),
        arrived - spans_before
    );
    println!(
        "  no exporter    : p50 {:>7.1} µs  p99 {:>7.1} µs",
        us(off50),
        us(percentile(&without, 0.99))
    );
    println!(
        "  tracing overhead at p50: {:+.1} µs = {:+.1} % (goal <= 5 %)",
        us(on50) - us(off50),
        (us(on50) / us(off50) - 1.0) * 100.0
    );
}
