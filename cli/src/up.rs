//! `smartdb up`: the whole cluster on this machine, one OS process per service (this same
//! binary, `smartdb serve <service>`), supervised: a child that dies is restarted with backoff,
//! Ctrl-C or SIGTERM stops them all cleanly (gateway first, so no new work enters).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tonic_health::pb::health_check_response::ServingStatus;

/// Flags of `smartdb up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Directory for all data (catalog, originals, index).
    #[arg(long, env = "SMARTDB_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Directory for downloaded models (shared between clusters).
    #[arg(long, env = "SMARTDB_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Address every service listens on.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Gateway gRPC port (0 picks a free one).
    #[arg(long, default_value_t = 50051)]
    gateway_port: u16,
    /// search-svc gRPC port (0 picks a free one).
    #[arg(long, default_value_t = 50052)]
    search_port: u16,
    /// ingest-svc gRPC port (0 picks a free one).
    #[arg(long, default_value_t = 50053)]
    ingest_port: u16,
    /// embed-svc gRPC port (0 picks a free one).
    #[arg(long, default_value_t = 50054)]
    embed_port: u16,
    /// Each service's HTTP endpoint (/metrics) listens on its gRPC port plus this offset
    /// (for automatically picked ports, on another free port).
    #[arg(long, default_value_t = 100)]
    http_port_offset: u16,
}

/// One supervised service.
struct Spec {
    name: &'static str,
    args: Vec<String>,
    grpc: SocketAddr,
    http: SocketAddr,
}

/// What `smartdb up` writes to `<data dir>/cluster.json`: addresses and current child pids.
#[derive(serde::Serialize, Default)]
struct ClusterFile {
    services: BTreeMap<&'static str, ServiceEntry>,
    supervisor_pid: u32,
}

#[derive(serde::Serialize, Default, Clone)]
struct ServiceEntry {
    grpc: String,
    http: String,
    pid: Option<u32>,
    restarts: u32,
}

/// The address for a service: `port`, checked to be free now (so a second `smartdb up` fails
/// at once instead of restarting children that cannot bind), or a free port if `port` is 0.
fn pick(host: std::net::IpAddr, port: u16) -> anyhow::Result<SocketAddr> {
    let port = if port == 0 {
        smartdb_kit::server::free_port()?
    } else {
        port
    };
    let addr = SocketAddr::new(host, port);
    std::net::TcpListener::bind(addr).with_context(|| {
        format!("cannot listen on {addr}: is another smartdb (or another program) using it?")
    })?;
    Ok(addr)
}

fn http_addr(
    host: std::net::IpAddr,
    grpc_port: u16,
    requested: u16,
    offset: u16,
) -> anyhow::Result<SocketAddr> {
    if requested == 0 {
        pick(host, 0)
    } else {
        pick(
            host,
            grpc_port
                .checked_add(offset)
                .context("HTTP port out of range")?,
        )
    }
}

/// Runs the cluster until Ctrl-C or SIGTERM.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    smartdb_kit::telemetry::init(false);
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(smartdb_kit::config::default_data_dir);
    std::fs::create_dir_all(&data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let models_dir = args
        .models_dir
        .clone()
        .unwrap_or_else(smartdb_embed::model::default_models_dir);

    let h = args.host;
    let off = args.http_port_offset;
    let embed = pick(h, args.embed_port)?;
    let search = pick(h, args.search_port)?;
    let ingest = pick(h, args.ingest_port)?;
    let gateway = pick(h, args.gateway_port)?;
    // Obtain the model before anything starts, so the wait is visible and happens once.
    eprintln!(
        "smartdb: checking the embedding model in {} ...",
        models_dir.display()
    );
    {
        let dir = models_dir.clone();
        tokio::task::spawn_blocking(move || {
            smartdb_embed::model::ensure_model(&dir, &smartdb_embed::model::MINILM_L6_V2)
        })
        .await?
        .context("cannot obtain the embedding model")?;
    }

    let data = |sub: &str| data_dir.join(sub).display().to_string();
    let specs = vec![
        Spec {
            name: "embed-svc",
            args: vec![
                "embed".into(),
                "--models-dir".into(),
                models_dir.display().to_string(),
            ],
            grpc: embed,
            http: http_addr(h, embed.port(), args.embed_port, off)?,
        },
        Spec {
            name: "search-svc",
            args: vec![
                "search".into(),
                "--data-dir".into(),
                data("search"),
                "--embed-addr".into(),
                embed.to_string(),
            ],
            grpc: search,
            http: http_addr(h, search.port(), args.search_port, off)?,
        },
        Spec {
            name: "ingest-svc",
            args: vec![
                "ingest".into(),
                "--data-dir".into(),
                data("ingest"),
                "--embed-addr".into(),
                embed.to_string(),
                "--search-addr".into(),
                search.to_string(),
            ],
            grpc: ingest,
            http: http_addr(h, ingest.port(), args.ingest_port, off)?,
        },
        Spec {
            name: "gateway",
            args: vec![
                "gateway".into(),
                "--ingest-addr".into(),
                ingest.to_string(),
                "--search-addr".into(),
                search.to_string(),
                "--embed-addr".into(),
                embed.to_string(),
            ],
            grpc: gateway,
            http: http_addr(h, gateway.port(), args.gateway_port, off)?,
        },
    ];

    let state = Arc::new(Mutex::new(ClusterFile {
        supervisor_pid: std::process::id(),
        ..Default::default()
    }));
    for spec in &specs {
        state.lock().expect("state").services.insert(
            spec.name,
            ServiceEntry {
                grpc: spec.grpc.to_string(),
                http: spec.http.to_string(),
                ..Default::default()
            },
        );
    }
    let cluster_file = data_dir.join("cluster.json");
    let exe = std::env::current_exe().context("locate the smartdb binary")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut supervisors = Vec::new();
    for spec in specs.iter() {
        let spec = Spec {
            name: spec.name,
            args: spec.args.clone(),
            grpc: spec.grpc,
            http: spec.http,
        };
        supervisors.push((
            spec.name,
            tokio::spawn(supervise(
                exe.clone(),
                spec,
                state.clone(),
                cluster_file.clone(),
                stop_rx.clone(),
            )),
        ));
    }

    let ready = wait_ready(&specs);
    tokio::select! {
        result = ready => match result {
            Ok(()) => print_ready(gateway, &data_dir, &specs),
            Err(err) => eprintln!("smartdb: {err:#}"),
        },
        _ = smartdb_kit::shutdown::signal_received() => {
            let _ = stop_tx.send(true);
            return stop_all(supervisors).await;
        }
    }
    smartdb_kit::shutdown::signal_received().await;
    let _ = stop_tx.send(true);
    stop_all(supervisors).await
}

async fn stop_all(
    supervisors: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
) -> anyhow::Result<()> {
    eprintln!("smartdb: stopping the cluster ...");
    // Started embed → search → ingest → gateway; stopped the other way round.
    for (name, handle) in supervisors.into_iter().rev() {
        if let Err(err) = handle.await {
            eprintln!("smartdb: supervisor of {name} failed: {err}");
        }
    }
    eprintln!("smartdb: stopped");
    Ok(())
}

fn write_state(path: &Path, state: &Mutex<ClusterFile>) {
    let text = serde_json::to_string_pretty(&*state.lock().expect("state")).unwrap_or_default();
    let tmp = path.with_extension("json.tmp");
    if std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .is_err()
    {
        eprintln!("smartdb: cannot write {}", path.display());
    }
}

fn spawn_child(exe: &Path, spec: &Spec) -> anyhow::Result<Child> {
    let mut command = Command::new(exe);
    command
        .arg("serve")
        .args(&spec.args)
        .arg("--listen")
        .arg(spec.grpc.to_string())
        .arg("--http-listen")
        .arg(spec.http.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Own process group: Ctrl-C reaches only the supervisor, which stops children in order.
        .process_group(0);
    // If the supervisor dies, its children must not outlive it.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("start {}", spec.name))?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let name = spec.name;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{name:<10} | {line}");
            }
        });
    }
    Ok(child)
}

/// Keeps one service running until told to stop, then stops it gracefully.
async fn supervise(
    exe: PathBuf,
    spec: Spec,
    state: Arc<Mutex<ClusterFile>>,
    file: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut child = match spawn_child(&exe, &spec) {
            Ok(child) => child,
            Err(err) => {
                eprintln!("smartdb: {err:#}");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let started = Instant::now();
        if let Some(entry) = state.lock().expect("state").services.get_mut(spec.name) {
            entry.pid = child.id();
        }
        write_state(&file, &state);
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(status) = exited else {
            terminate(spec.name, &mut child).await;
            return;
        };
        if *stop.borrow() {
            return;
        }
        let status = status
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string());
        // A child that ran a while gets a fresh backoff; one that keeps crashing waits longer.
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        eprintln!(
            "smartdb: {} exited ({status}); restarting in {:.1}s",
            spec.name,
            backoff.as_secs_f32()
        );
        if let Some(entry) = state.lock().expect("state").services.get_mut(spec.name) {
            entry.pid = None;
            entry.restarts += 1;
        }
        write_state(&file, &state);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// SIGTERM, then SIGKILL if the child is still there after the drain time.
async fn terminate(name: &str, child: &mut Child) {
    if let Some(pid) = child.id() {
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(Duration::from_secs(25), child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => eprintln!("smartdb: {name} exited with {status}"),
        _ => {
            eprintln!("smartdb: {name} did not stop in time; killing it");
            let _ = child.kill().await;
        }
    }
}

async fn check(addr: SocketAddr) -> bool {
    let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| e.connect_timeout(Duration::from_secs(1)))
    else {
        return false;
    };
    let Ok(channel) = channel.connect().await else {
        return false;
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    matches!(
        client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await,
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
    )
}

/// Waits until every service reports SERVING.
async fn wait_ready(specs: &[Spec]) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut announced = false;
    loop {
        let mut waiting = Vec::new();
        for spec in specs {
            if !check(spec.grpc).await {
                waiting.push(spec.name);
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if !announced && started.elapsed() > Duration::from_secs(10) {
            eprintln!("smartdb: still starting: {}", waiting.join(", "));
            announced = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_ready(gateway: SocketAddr, data_dir: &Path, specs: &[Spec]) {
    let g = gateway.to_string();
    let mut services = String::new();
    for spec in specs {
        services.push_str(&format!(
            "  {:<10} grpc {}  metrics http://{}/metrics\n",
            spec.name, spec.grpc, spec.http
        ));
    }
    println!(
        "\nsmartdb is ready: gateway on {g} (data in {})\n{services}
Try it:
  grpcurl -plaintext {g} list
  grpcurl -plaintext -d '{{\"name\": \"notes\"}}' {g} smartdb.v1.KnowledgeBaseService/CreateKnowledgeBase
  grpcurl -plaintext -d '{{\"knowledge_base\": \"notes\", \"text\": \"The mitochondria is the powerhouse of the cell.\", \"wait\": true}}' {g} smartdb.v1.DocumentService/IngestText
  grpcurl -plaintext -d '{{\"knowledge_base\": \"notes\", \"query\": \"what produces energy in cells?\"}}' {g} smartdb.v1.SearchService/Search
  smartdb status
Press Ctrl-C to stop.",
        data_dir.display()
    );
}
