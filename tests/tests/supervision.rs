//! `smartdb up` as a supervisor: a child killed with SIGKILL comes back, data survives the
//! restart, SIGTERM stops everything cleanly and in order (gateway first), a child that cannot
//! be restarted does not stop Ctrl-C from working, a service that keeps crashing is reported
//! and makes `up` give up, and only the gateway listens beyond loopback.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, alive, eventually, health, smartdb_bin};
use smartdb_proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;

/// Position of the first log line of `up.log` that `matches`.
fn line_of(log: &str, what: &str, matches: impl Fn(&str) -> bool) -> usize {
    log.lines()
        .position(matches)
        .unwrap_or_else(|| panic!("no line for {what} in:\n{log}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_child_comes_back_and_sigterm_stops_all() {
    let mut cluster = Cluster::start().await;
    let mut kbs = cluster.kbs().await;
    kbs.create_knowledge_base(pb::CreateKnowledgeBaseRequest {
        name: "survivor".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let doc = cluster
        .docs()
        .await
        .ingest_text(pb::IngestTextRequest {
            knowledge_base: "survivor".into(),
            text: "Honey bees communicate the location of flowers with a waggle dance.".into(),
            wait: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(doc.status, pb::DocumentStatus::Indexed as i32);

    for victim in ["search-svc", "ingest-svc"] {
        let before = cluster.service(victim);
        let pid = before.pid.expect("pid");
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        let new_pid = eventually(Duration::from_secs(60), "a restarted child", || {
            let info = cluster.service(victim);
            async move { info.pid.filter(|p| *p != pid) }
        })
        .await;
        assert!(alive(new_pid));
        eventually(Duration::from_secs(60), "the restarted child to serve", || {
            let addr = before.grpc.clone();
            async move { (health(&addr, "").await == Some(ServingStatus::Serving)).then_some(()) }
        })
        .await;
    }

    // What was indexed before the crashes is still found.
    let hits = eventually(Duration::from_secs(30), "search after restart", || async {
        let mut client = cluster.search().await;
        client
            .search(pb::SearchRequest {
                knowledge_base: "survivor".into(),
                query: "how do bees tell where flowers are".into(),
                ..Default::default()
            })
            .await
            .ok()
            .map(|r| r.into_inner().hits)
    })
    .await;
    assert_eq!(hits[0].document_id, doc.id);

    let children: Vec<u32> = ["gateway", "search-svc", "ingest-svc", "embed-svc"]
        .iter()
        .filter_map(|n| cluster.service(n).pid)
        .collect();
    assert_eq!(children.len(), 4);
    let status = cluster.terminate();
    assert!(status.success(), "smartdb up exit status {status}");
    for pid in children {
        assert!(!alive(pid), "child {pid} still running after shutdown");
    }
    // Gateway first: it has stopped before any other service is even told to stop, and the
    // others go one at a time (ingest-svc, whose workers call the rest, before search-svc).
    let log = cluster.log();
    let gateway_done = line_of(&log, "the gateway's last line", |l| {
        l.starts_with("gateway") && l.contains("stopped")
    });
    for other in ["ingest-svc", "search-svc", "embed-svc"] {
        let told = line_of(&log, other, |l| {
            l.starts_with(other) && l.contains("SIGTERM received")
        });
        assert!(
            gateway_done < told,
            "{other} was stopped before the gateway was done:\n{log}"
        );
    }
    let ingest_done = line_of(&log, "ingest-svc stopped", |l| {
        l == "smartdb: ingest-svc stopped"
    });
    let search_told = line_of(&log, "search-svc told", |l| {
        l.starts_with("search-svc") && l.contains("SIGTERM received")
    });
    assert!(ingest_done < search_told, "{log}");
}

/// A child that cannot be restarted (here: its binary is gone) must not keep `up` from
/// stopping on SIGTERM (it used to retry the spawn forever without looking at the signal).
#[tokio::test(flavor = "multi_thread")]
async fn up_stops_while_a_child_cannot_be_restarted() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("smartdb");
    std::fs::copy(smartdb_bin(), &bin).unwrap();
    let mut cluster = Cluster::launch(&bin, tempfile::tempdir().unwrap(), &[], &[]).await;
    std::fs::remove_file(&bin).unwrap();
    let search = cluster.service("search-svc").pid.unwrap();
    unsafe {
        libc::kill(search as i32, libc::SIGKILL);
    }
    eventually(Duration::from_secs(30), "a failed restart", || {
        let log = cluster.log();
        async move { log.contains("search-svc could not start").then_some(()) }
    })
    .await;
    let started = Instant::now();
    let status = cluster.terminate();
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "stopping took {:?}",
        started.elapsed()
    );
    assert!(status.success(), "{status}");
}

/// A service that dies right after every start is reported as crash-looping, and since the
/// cluster never became ready, `up` gives up with a non-zero exit code instead of waiting
/// forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_looping_service_makes_up_give_up() {
    let data_dir = tempfile::tempdir().unwrap();
    // search-svc cannot create its data directory where a file is in the way.
    std::fs::write(data_dir.path().join("search"), b"not a directory").unwrap();
    let log_path = data_dir.path().join("up.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut up = Command::new(smartdb_bin())
        .args(["up", "--gateway-port", "0", "--search-port", "0"])
        .args([
            "--ingest-port",
            "0",
            "--embed-port",
            "0",
            "--crash-loop-after",
            "3",
        ])
        .arg("--data-dir")
        .arg(data_dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = up.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = up.kill();
            panic!(
                "smartdb up kept waiting:\n{}",
                std::fs::read_to_string(&log_path).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("search-svc is crash-looping: 3 quick crashes in a row"),
        "{log}"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir.path().join("cluster.json")).unwrap(),
    )
    .unwrap();
    for (name, service) in state["services"].as_object().unwrap() {
        assert!(service["pid"].is_null(), "{name} left running: {service}");
    }
}

/// `--host` exposes the gateway only; the internal services (no authentication, and embed-svc
/// spends a remote model's API key) stay on loopback.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_gateway_listens_beyond_loopback() {
    let cluster = Cluster::start_with(&["--host", "0.0.0.0"], &[]).await;
    let gateway = cluster.service("gateway");
    assert!(gateway.grpc.starts_with("0.0.0.0:"), "{gateway:?}");
    assert!(gateway.http.starts_with("0.0.0.0:"), "{gateway:?}");
    for internal in ["search-svc", "ingest-svc", "embed-svc"] {
        let info = cluster.service(internal);
        assert!(info.grpc.starts_with("127.0.0.1:"), "{internal}: {info:?}");
        assert!(info.http.starts_with("127.0.0.1:"), "{internal}: {info:?}");
    }
}
