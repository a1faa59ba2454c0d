//! What the benches share: a seeded cluster and cached searches alternating between two
//! clients call by call, so that both see the same machine state.

use std::time::{Duration, Instant};

use smartdb_proto::v1 as pb;

use super::{Cluster, Gw, create_kb, ingest_text};

type Search = pb::search_service_client::SearchServiceClient<Gw>;

/// A cluster started with `env`, with knowledge base `notes` holding three short texts.
///
/// The admin key's search rate is raised: two clusters alternating cached calls on a fast
/// machine pass its default 1,000 searches/s, and a refusal would end the bench. The limit is
/// still checked on every call.
pub async fn seeded_cluster(env: &[(&str, &str)]) -> Cluster {
    let rates = [(
        "SMARTDB_GATEWAY_RATES",
        "admin.search=1000000,address=1000000",
    )];
    let env: Vec<(&str, &str)> = rates.iter().chain(env).copied().collect();
    let cluster = Cluster::start_with_env(&env).await;
    create_kb(&cluster, "notes").await;
    for text in [
        "Tides follow the moon's pull on the oceans.",
        "Bees dance to tell the hive where flowers are.",
        "Volcanic glass forms when lava cools too fast to crystallize.",
    ] {
        ingest_text(&cluster, "notes", text, true)
            .await
            .expect("ingest");
    }
    cluster
}

/// The `p` quantile (0..=1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `calls` searches of one query in `notes` through each of `a` and `b`, alternating call by
/// call after warming both (and their result caches); every measured answer must come from the
/// cache. Returns each side's latencies, sorted.
pub async fn alternate_cached_searches(
    a: &mut Search,
    b: &mut Search,
    calls: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let request = pb::SearchRequest {
        knowledge_base: "notes".into(),
        query: "what pulls the oceans?".into(),
        ..Default::default()
    };
    for _ in 0..200 {
        a.search(request.clone()).await.unwrap();
        b.search(request.clone()).await.unwrap();
    }
    let (mut on_a, mut on_b) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    for i in 0..2 * calls {
        let client = if i % 2 == 0 { &mut *a } else { &mut *b };
        let started = Instant::now();
        let response = client
            .search(request.clone())
            .await
            .expect("search")
            .into_inner();
        let took = started.elapsed();
        assert!(response.cached, "a repeated query was not cached");
        if i % 2 == 0 {
            on_a.push(took);
        } else {
            on_b.push(took);
        }
    }
    on_a.sort();
    on_b.sort();
    (on_a, on_b)
}

/// `SMARTDB_BENCH_CALLS`, or `default`.
pub fn calls(default: usize) -> usize {
    std::env::var("SMARTDB_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) a process has used, in clock ticks; `pid` may be `self`.
pub fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
    get(11) + get(12)
}
