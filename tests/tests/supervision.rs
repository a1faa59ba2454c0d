//! `smartdb up` as a supervisor: a child killed with SIGKILL comes back, data survives the
//! restart, SIGTERM stops everything cleanly and in order (gateway first), a child that cannot
//! be restarted does not stop Ctrl-C from working, a service that keeps crashing is reported
//! and makes `up` give up, only the gateway listens beyond loopback, and services listen on the
//! sockets `up` bound for them (no other program can take a port in between).

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

/// Inode of the IPv4 socket listening on `port`, from the kernel's socket table.
fn listening_inode(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
        // State 0A is LISTEN.
        if local != port || fields.get(3) != Some(&"0A") {
            return None;
        }
        fields.get(9).map(|inode| inode.to_string())
    })
}

/// The socket inodes process `pid` holds, by descriptor.
fn socket_fds(pid: u32) -> Vec<(i32, String)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?;
            Some((entry.file_name().to_str()?.parse().ok()?, inode.to_owned()))
        })
        .collect()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// `smartdb up` binds every port when it picks it and hands the sockets to the services (fds 3
/// and 4, `LISTEN_FDS`), then closes its own copies, so a service that dies refuses connections.
#[tokio::test(flavor = "multi_thread")]
async fn services_listen_on_the_sockets_up_bound_for_them() {
    let cluster = Cluster::start().await;
    let up_sockets: Vec<String> = socket_fds(cluster.pid())
        .into_iter()
        .map(|(_, i)| i)
        .collect();
    for name in ["gateway", "search-svc", "ingest-svc", "embed-svc"] {
        let info = cluster.service(name);
        let held = socket_fds(info.pid.expect("pid"));
        for (fd, addr) in [(3, &info.grpc), (4, &info.http)] {
            let inode = listening_inode(port_of(addr))
                .unwrap_or_else(|| panic!("nothing listens on {name}'s {addr}"));
            assert!(
                held.contains(&(fd, inode.clone())),
                "{name} does not listen on the socket handed to it as fd {fd} ({addr}): {held:?}"
            );
            assert!(
                !up_sockets.contains(&inode),
                "smartdb up still holds {name}'s socket {addr}"
            );
        }
    }
}

/// A service started with a listening socket handed over (systemd's `LISTEN_FDS`) serves on it,
/// even though the port is taken: the test keeps its own copies open, so binding it would fail.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_serves_on_the_sockets_handed_to_it() {
    let data = tempfile::tempdir().unwrap();
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (grpc_addr, http_addr) = (
        grpc.local_addr().unwrap().to_string(),
        http.local_addr().unwrap().to_string(),
    );
    let search_svc = || {
        let mut command = Command::new(smartdb_bin());
        command
            .args(["serve", "search", "--listen", grpc_addr.as_str()])
            .args(["--http-listen", http_addr.as_str()])
            .arg("--data-dir")
            .arg(data.path())
            .args(["--embed-addr", "127.0.0.1:9"])
            .env("SMARTDB_LOG", "warn")
            .stdin(Stdio::null());
        command
    };
    let mut command = search_svc();
    smartdb_kit::listeners::hand_over(&mut command, &[&grpc, &http]);
    let mut child = command.spawn().unwrap();
    let answered = eventually(Duration::from_secs(60), "search-svc to answer", || {
        let addr = grpc_addr.clone();
        async move { health(&addr, "").await }
    })
    .await;
    let metrics = common::http_get(&http_addr, "/metrics").await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        matches!(answered, ServingStatus::Serving | ServingStatus::NotServing),
        "{answered:?}"
    );
    assert!(metrics.contains("grpc_server"), "{metrics}");
    // Without the handover the same start fails: the port is taken.
    let status = search_svc().stderr(Stdio::piped()).output().unwrap();
    assert!(!status.status.success());
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {grpc_addr}")),
        "{stderr}"
    );
}
