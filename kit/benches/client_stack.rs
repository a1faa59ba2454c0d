//! Cost of the client stack per call (`cargo bench -p smartdb-kit --bench client_stack`; `-p`
//! builds only kit in release, not the whole workspace).
//!
//! One real gRPC server on loopback TCP (`grpc.health.v1`, the cheapest answer there is, so the
//! difference is all client side), called in the same run through a bare tonic channel and
//! through [`Downstream::call`] (metrics, retry policy and budget, p2c balancer, breaker, load
//! shedding, concurrency limit, attempt timeout, context propagation). Calls alternate one by
//! one so all variants see the same machine state. Goal: ≤ 20 µs added at p50.
//!
//! Env: `SMARTDB_BENCH_CALLS` (calls per variant, default 20000).

use std::time::{Duration, Instant};

use smartdb_kit::client::{ClientSettings, Downstream, Rpc};
use smartdb_kit::context::CallContext;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut found = Vec::new();
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    found.push($f);
                }
            )*};
        }
        probe!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "avx512f",
            "avx512bw",
            "avx512bf16"
        );
        found.join(" ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_owned()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    println!(
        "{name:<28} p50 {:>7.1} µs  p90 {:>7.1} µs  p99 {:>7.1} µs  ({} calls)",
        p50.as_secs_f64() * 1e6,
        percentile(&samples, 0.9).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples.len()
    );
    p50
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::var("SMARTDB_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    println!(
        "client stack bench: cpu features [{}], {} cores, {calls} calls per variant",
        cpu_features(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let bare = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let stack = Downstream::connect("bench", &addr.to_string(), &ClientSettings::default()).await?;

    let bare_call = || {
        let mut client = HealthClient::new(bare.clone());
        async move {
            let mut request = tonic::Request::new(HealthCheckRequest::default());
            request.set_timeout(Duration::from_secs(5));
            client.check(request).await.map(|_| ())
        }
    };
    let stack_call = || {
        let stack = stack.clone();
        async move {
            let ctx = CallContext::background("bench", Duration::from_secs(5));
            stack
                .call(
                    &ctx,
                    Rpc::idempotent("Check"),
                    HealthCheckRequest::default(),
                    |channel, request| async move { HealthClient::new(channel).check(request).await },
                )
                .await
                .map(|_| ())
        }
    };

    // The balanced per-endpoint layers alone (p2c, breaker, shedding, limit, attempt timeout),
    // without the outer metrics, retry policy and context: splits the cost in two.
    let layers_call = || {
        let mut client = HealthClient::new(stack.channel());
        async move {
            let mut request = tonic::Request::new(HealthCheckRequest::default());
            request.set_timeout(Duration::from_secs(5));
            client.check(request).await.map(|_| ())
        }
    };

    // Warm up all (connections, allocator, caches).
    for _ in 0..2000 {
        bare_call().await?;
        stack_call().await?;
        layers_call().await?;
    }
    // Calls alternate one by one (in a rotating order), so that the variants see the same
    // machine state: on a small machine the wake-up latency of idle cores drifts by more than
    // the difference being measured, and rounds of many calls each would measure that drift.
    let (mut bare_samples, mut stack_samples, mut layers_samples) = (
        Vec::with_capacity(calls),
        Vec::with_capacity(calls),
        Vec::with_capacity(calls),
    );
    let mut paired = Vec::with_capacity(calls);
    for i in 0..calls {
        let (mut bare_took, mut stack_took) = (Duration::ZERO, Duration::ZERO);
        for variant in 0..3 {
            let started = Instant::now();
            match (variant + i) % 3 {
                0 => {
                    bare_call().await?;
                    bare_took = started.elapsed();
                    bare_samples.push(bare_took);
                }
                1 => {
                    stack_call().await?;
                    stack_took = started.elapsed();
                    stack_samples.push(stack_took);
                }
                _ => {
                    layers_call().await?;
                    layers_samples.push(started.elapsed());
                }
            }
        }
        paired.push(stack_took.as_secs_f64() - bare_took.as_secs_f64());
    }
    let bare_p50 = report("bare channel", bare_samples);
    let layers_p50 = report("endpoint layers only", layers_samples);
    let stack_p50 = report("Downstream::call (stack)", stack_samples);
    println!(
        "of which balancing and the per-endpoint layers: {:.1} µs",
        (layers_p50.as_secs_f64() - bare_p50.as_secs_f64()) * 1e6
    );
    let added = stack_p50.as_secs_f64() - bare_p50.as_secs_f64();
    println!(
        "added by the stack at p50: {:.1} µs ({:.2}× the bare call; goal ≤ 20 µs)",
        added * 1e6,
        stack_p50.as_secs_f64() / bare_p50.as_secs_f64()
    );
    paired.sort_by(f64::total_cmp);
    println!(
        "median of the paired differences (stack call − the bare call next to it): {:.1} µs",
        paired[paired.len() / 2] * 1e6
    );
    Ok(())
}
