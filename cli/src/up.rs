//! `smartdb up`: the whole cluster on this machine, one OS process per service (this same
//! binary, `smartdb serve <service>`), supervised: a child that dies is restarted with backoff
//! and jitter, and reported as crash-looping when it keeps dying at once; Ctrl-C or SIGTERM
//! stops them one by one, gateway first, so no new work enters while the rest drain.
//!
//! Only the gateway may listen beyond loopback (`--host`); the internal services have no
//! authentication and stay on `--internal-host`.

use std::collections::{BTreeMap, HashMap};
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
    /// Address the gateway (the only public service) listens on, e.g. `0.0.0.0` to accept
    /// clients from other machines.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Address the internal services (search, ingest, embed) listen on. They have no
    /// authentication of their own (embed-svc spends a remote model's API key on every call),
    /// so they stay on loopback unless told.
    #[arg(long, default_value = "127.0.0.1")]
    internal_host: std::net::IpAddr,
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
    /// How long the cluster may take to become ready before `up` gives up (exit code 1).
    #[arg(long, default_value = "10m", value_parser = smartdb_kit::config::parse_duration)]
    ready_timeout: Duration,
    /// Replicas of a stateless service, e.g. `embed=2` (only embed-svc: search-svc and
    /// ingest-svc keep their data on this machine's disk and need shared engines to scale).
    /// The extra replicas listen on free ports; the other services balance over all of them.
    #[arg(long, value_name = "SERVICE=N", value_parser = parse_replicas)]
    replicas: Vec<(String, usize)>,
    /// Restarts within `QUICK_CRASH` of starting, in a row, after which a service is reported
    /// as crash-looping (and, before the cluster was ever ready, `up` gives up with exit code 1).
    #[arg(long, default_value_t = 5)]
    crash_loop_after: u32,
}

fn parse_replicas(text: &str) -> Result<(String, usize), String> {
    let (service, count) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: use SERVICE=N, e.g. embed=2"))?;
    let count: usize = count
        .parse()
        .ok()
        .filter(|n| (1..=16).contains(n))
        .ok_or_else(|| format!("{text:?}: the number of replicas must be 1 to 16"))?;
    match service {
        "embed" | "embed-svc" => Ok(("embed".into(), count)),
        "search" | "search-svc" | "ingest" | "ingest-svc" => Err(format!(
            "{service} keeps its data on this machine's disk: several replicas need a shared \
             Qdrant or MongoDB, which `smartdb up` does not run"
        )),
        other => Err(format!("{other:?}: only embed can have replicas")),
    }
}

/// A child that exits sooner than this after starting crashed "quickly".
const QUICK_CRASH: Duration = Duration::from_secs(30);
/// Longest wait before restarting a child.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// One supervised service.
#[derive(Clone)]
struct Spec {
    name: &'static str,
    args: Vec<String>,
    /// Extra environment (secrets go here, never in `args`, which `ps` shows).
    env: Vec<(&'static str, String)>,
    grpc: SocketAddr,
    http: SocketAddr,
}

/// File in the data directory holding the local cluster's admin API key.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// The admin key of the cluster in `data_dir`: `SMARTDB_ADMIN_KEY` if set (nothing is written),
/// else the one in `<data_dir>/admin.key`, made (random, mode 0600) on the first start.
/// Returns the key and the file it is in, if any.
fn admin_key(data_dir: &Path) -> anyhow::Result<(String, Option<PathBuf>)> {
    if let Some(key) = std::env::var("SMARTDB_ADMIN_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty())
    {
        return Ok((key.trim().to_owned(), None));
    }
    let path = data_dir.join(ADMIN_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(key) if !key.trim().is_empty() => return Ok((key.trim().to_owned(), Some(path))),
        Ok(_) => anyhow::bail!(
            "{} is empty: delete it to make a new admin key",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    let key = smartdb_gateway::edge::keys::generate().key;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    writeln!(file, "{key}")
        .and_then(|_| file.sync_all())
        .with_context(|| format!("write {}", path.display()))?;
    Ok((key, Some(path)))
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
    /// `running`, `restarting`, `crash-looping` or `stopped`.
    state: &'static str,
    /// How the last run ended, if it did.
    last_exit: Option<String>,
}

/// Picks the cluster's addresses by binding them: `port`, so a second `smartdb up` fails at once
/// instead of restarting children that cannot bind, or a free port if `port` is 0. The bound
/// listeners are handed to the services' first processes ([`smartdb_kit::listeners`]): a port
/// released before its service binds it could be taken meanwhile by another program, or by
/// another cluster picking free ports at the same moment.
#[derive(Default)]
struct Ports {
    held: Vec<std::net::TcpListener>,
}

impl Ports {
    fn pick(&mut self, host: std::net::IpAddr, port: u16) -> anyhow::Result<SocketAddr> {
        let listener =
            std::net::TcpListener::bind(SocketAddr::new(host, port)).with_context(|| {
                format!(
                    "cannot listen on {}: is another smartdb (or another program) using it?",
                    SocketAddr::new(host, port)
                )
            })?;
        let addr = listener.local_addr()?;
        self.held.push(listener);
        Ok(addr)
    }

    /// The listener picked for `addr` (each is picked once, so exactly one).
    fn take(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let at = self
            .held
            .iter()
            .position(|l| l.local_addr().ok() == Some(addr))?;
        Some(self.held.swap_remove(at))
    }

    fn http_addr(
        &mut self,
        host: std::net::IpAddr,
        grpc_port: u16,
        requested: u16,
        offset: u16,
    ) -> anyhow::Result<SocketAddr> {
        if requested == 0 {
            self.pick(host, 0)
        } else {
            self.pick(
                host,
                grpc_port
                    .checked_add(offset)
                    .context("HTTP port out of range")?,
            )
        }
    }
}

/// Runs the cluster until Ctrl-C or SIGTERM.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    smartdb_kit::telemetry::init_logs(false);
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(smartdb_kit::config::default_data_dir);
    std::fs::create_dir_all(&data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let models_dir = args
        .models_dir
        .clone()
        .unwrap_or_else(smartdb_embed::model::default_models_dir);

    let (h, internal) = (args.host, args.internal_host);
    let off = args.http_port_offset;
    let mut ports = Ports::default();
    let embed = ports.pick(internal, args.embed_port)?;
    let embed_replicas = args
        .replicas
        .iter()
        .rev()
        .find(|(service, _)| service == "embed")
        .map_or(1, |(_, n)| *n);
    // Extra replicas on free ports (with free HTTP ports): (grpc, http).
    let mut extra_embeds = Vec::new();
    for _ in 1..embed_replicas {
        extra_embeds.push((ports.pick(internal, 0)?, ports.pick(internal, 0)?));
    }
    let embed_addrs = std::iter::once(embed)
        .chain(extra_embeds.iter().map(|(grpc, _)| *grpc))
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let search = ports.pick(internal, args.search_port)?;
    let ingest = ports.pick(internal, args.ingest_port)?;
    let gateway = ports.pick(h, args.gateway_port)?;
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

    let (admin_key, admin_key_file) = admin_key(&data_dir)?;
    let data = |sub: &str| data_dir.join(sub).display().to_string();
    let embed_args = vec![
        "embed".into(),
        "--models-dir".into(),
        models_dir.display().to_string(),
    ];
    let mut specs = vec![Spec {
        name: "embed-svc",
        args: embed_args.clone(),
        env: Vec::new(),
        grpc: embed,
        http: ports.http_addr(internal, embed.port(), args.embed_port, off)?,
    }];
    for (i, (grpc, http)) in extra_embeds.iter().enumerate() {
        specs.push(Spec {
            // A handful of names for the life of the process.
            name: Box::leak(format!("embed-svc-{}", i + 2).into_boxed_str()),
            args: embed_args.clone(),
            env: Vec::new(),
            grpc: *grpc,
            http: *http,
        });
    }
    specs.extend([
        Spec {
            name: "search-svc",
            args: vec![
                "search".into(),
                "--data-dir".into(),
                data("search"),
                "--embed-addr".into(),
                embed_addrs.clone(),
            ],
            env: Vec::new(),
            grpc: search,
            http: ports.http_addr(internal, search.port(), args.search_port, off)?,
        },
        Spec {
            name: "ingest-svc",
            args: vec![
                "ingest".into(),
                "--data-dir".into(),
                data("ingest"),
                "--embed-addr".into(),
                embed_addrs.clone(),
                "--search-addr".into(),
                search.to_string(),
            ],
            env: Vec::new(),
            grpc: ingest,
            http: ports.http_addr(internal, ingest.port(), args.ingest_port, off)?,
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
                embed_addrs.clone(),
                "--data-dir".into(),
                data("gateway"),
            ],
            env: vec![("SMARTDB_ADMIN_KEY", admin_key.clone())],
            grpc: gateway,
            http: ports.http_addr(h, gateway.port(), args.gateway_port, off)?,
        },
    ]);
    // All picked and distinct: each service's first process gets its two.
    let mut listeners = HashMap::new();
    for spec in &specs {
        if let (Some(grpc), Some(http)) = (ports.take(spec.grpc), ports.take(spec.http)) {
            listeners.insert(spec.name, [grpc, http]);
        }
    }
    drop(ports);

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
                state: "starting",
                ..Default::default()
            },
        );
    }
    let cluster_file = data_dir.join("cluster.json");
    let exe = std::env::current_exe().context("locate the smartdb binary")?;
    let (crash_tx, mut crash_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut supervisors = Vec::new();
    for spec in specs.iter() {
        let (stop_tx, stop_rx) = watch::channel(false);
        let supervisor = Supervisor {
            exe: exe.clone(),
            spec: spec.clone(),
            state: state.clone(),
            file: cluster_file.clone(),
            crash_loop_after: args.crash_loop_after.max(1),
            crash_loops: crash_tx.clone(),
            listeners: listeners.remove(spec.name),
        };
        supervisors.push(Running {
            name: spec.name,
            stop: stop_tx,
            task: tokio::spawn(supervisor.run(stop_rx)),
        });
    }

    let ready = tokio::time::timeout(args.ready_timeout, wait_ready(&specs));
    let outcome = tokio::select! {
        result = ready => match result {
            Ok(ready) => ready,
            Err(_) => Err(anyhow::anyhow!(
                "the cluster did not become ready within {:?} (--ready-timeout); see the services' logs above",
                args.ready_timeout
            )),
        },
        Some(message) = crash_rx.recv() => Err(anyhow::anyhow!("{message}; giving up")),
        _ = smartdb_kit::shutdown::signal_received() => return stop_all(supervisors).await,
    };
    if let Err(err) = outcome {
        eprintln!("smartdb: {err:#}");
        stop_all(supervisors).await?;
        return Err(err);
    }
    print_ready(gateway, &data_dir, admin_key_file.as_deref(), &specs);
    // Once ready, a crash-looping service is reported (it keeps being restarted, slowly) and
    // the rest of the cluster keeps serving.
    tokio::spawn(async move { while crash_rx.recv().await.is_some() {} });
    smartdb_kit::shutdown::signal_received().await;
    stop_all(supervisors).await
}

/// One supervised service and how to stop it.
struct Running {
    name: &'static str,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Stops the services one at a time, in the reverse of their start order: the gateway first
/// (no new work enters), then ingest-svc (its workers stop calling the others), then
/// search-svc, then embed-svc; each is waited for before the next is told.
async fn stop_all(supervisors: Vec<Running>) -> anyhow::Result<()> {
    eprintln!("smartdb: stopping the cluster ...");
    for running in supervisors.into_iter().rev() {
        eprintln!("smartdb: stopping {}", running.name);
        let _ = running.stop.send(true);
        match running.task.await {
            Ok(()) => eprintln!("smartdb: {} stopped", running.name),
            Err(err) => eprintln!("smartdb: supervisor of {} failed: {err}", running.name),
        }
    }
    eprintln!("smartdb: stopped");
    Ok(())
}

fn write_state(path: &Path, state: &Mutex<ClusterFile>) {
    // Held until the file is in place: supervisors write at the same moments (all start at
    // once) through one temp file, and an older state renamed over a newer one would stay
    // (a running service shown without its pid).
    let state = state.lock().expect("state");
    let text = serde_json::to_string_pretty(&*state).unwrap_or_default();
    let tmp = path.with_extension("json.tmp");
    if std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .is_err()
    {
        eprintln!("smartdb: cannot write {}", path.display());
    }
}

/// Starts one process of `spec`'s service, handing it `listeners` (gRPC, HTTP) if given.
fn spawn_child(
    exe: &Path,
    spec: &Spec,
    listeners: Option<&[std::net::TcpListener; 2]>,
) -> anyhow::Result<Child> {
    let mut command = Command::new(exe);
    command
        .arg("serve")
        .args(&spec.args)
        .arg("--listen")
        .arg(spec.grpc.to_string())
        .arg("--http-listen")
        .arg(spec.http.to_string())
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
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
    if let Some([grpc, http]) = listeners {
        smartdb_kit::listeners::hand_over(command.as_std_mut(), &[grpc, http]);
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
struct Supervisor {
    exe: PathBuf,
    spec: Spec,
    state: Arc<Mutex<ClusterFile>>,
    file: PathBuf,
    crash_loop_after: u32,
    /// Where a service that crash-loops is reported.
    crash_loops: tokio::sync::mpsc::UnboundedSender<String>,
    /// The sockets `up` bound for the service (gRPC, HTTP), until its first process has them.
    /// Restarts bind the addresses themselves: holding the sockets while a service is down
    /// would queue its callers' connections instead of refusing them, and callers would wait
    /// for their deadlines instead of failing over at once.
    listeners: Option<[std::net::TcpListener; 2]>,
}

impl Supervisor {
    fn record(&self, update: impl FnOnce(&mut ServiceEntry)) {
        if let Some(entry) = self
            .state
            .lock()
            .expect("state")
            .services
            .get_mut(self.spec.name)
        {
            update(entry);
        }
        write_state(&self.file, &self.state);
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let name = self.spec.name;
        let mut quick_crashes = 0u32;
        loop {
            // The first process takes the sockets; `up`'s copies close once it has them.
            let listeners = self.listeners.take();
            let spawned = spawn_child(&self.exe, &self.spec, listeners.as_ref());
            drop(listeners);
            let outcome = match spawned {
                Ok(mut child) => {
                    let started = Instant::now();
                    self.record(|e| {
                        e.pid = child.id();
                        e.state = "running";
                    });
                    let exited = tokio::select! {
                        status = child.wait() => Some(status),
                        _ = stop.wait_for(|s| *s) => None,
                    };
                    let Some(status) = exited else {
                        terminate(name, &mut child).await;
                        self.record(|e| {
                            e.pid = None;
                            e.state = "stopped";
                        });
                        return;
                    };
                    let status = status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string());
                    (
                        started.elapsed() < QUICK_CRASH,
                        format!("exited ({status})"),
                    )
                }
                // Could not even start (e.g. the binary is gone): as quick a crash as any.
                Err(err) => (true, format!("could not start: {err:#}")),
            };
            if *stop.borrow() {
                self.record(|e| e.state = "stopped");
                return;
            }
            let (quick, what) = outcome;
            // A child that ran a while starts over with a short delay.
            quick_crashes = if quick { quick_crashes + 1 } else { 1 };
            let delay = restart_delay(quick_crashes);
            let looping = quick_crashes >= self.crash_loop_after;
            if looping {
                let message = format!(
                    "{name} is crash-looping: {quick_crashes} quick crashes in a row, the last {what}"
                );
                eprintln!(
                    "smartdb: {message}; next try in {:.1}s",
                    delay.as_secs_f32()
                );
                if quick_crashes == self.crash_loop_after {
                    let _ = self.crash_loops.send(message);
                }
            } else {
                eprintln!(
                    "smartdb: {name} {what}; restarting in {:.1}s",
                    delay.as_secs_f32()
                );
            }
            self.record(|e| {
                e.pid = None;
                e.restarts += 1;
                e.state = if looping {
                    "crash-looping"
                } else {
                    "restarting"
                };
                e.last_exit = Some(what.clone());
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => {
                    self.record(|e| e.state = "stopped");
                    return;
                }
            }
        }
    }
}

/// Delay before the `n`th restart in a row (n ≥ 1): doubling from 0.5 s up to 30 s, each with
/// jitter (half fixed, half random) so that services that died together do not restart in step.
fn restart_delay(n: u32) -> Duration {
    let base = Duration::from_millis(500)
        .saturating_mul(1u32 << n.saturating_sub(1).min(10))
        .min(MAX_RESTART_DELAY);
    base / 2 + (base / 2).mul_f64(rand::random::<f64>())
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

fn print_ready(gateway: SocketAddr, data_dir: &Path, key_file: Option<&Path>, specs: &[Spec]) {
    let g = gateway.to_string();
    let mut services = String::new();
    for spec in specs {
        services.push_str(&format!(
            "  {:<10} grpc {}  metrics http://{}/metrics\n",
            spec.name, spec.grpc, spec.http
        ));
    }
    let (key_line, key) = match key_file {
        Some(file) => (
            format!(
                "admin API key in {} (the smartdb commands use it)",
                file.display()
            ),
            format!("$(cat {})", file.display()),
        ),
        None => (
            "admin API key from SMARTDB_ADMIN_KEY".to_owned(),
            "$SMARTDB_ADMIN_KEY".to_owned(),
        ),
    };
    let h = format!("-H \"authorization: Bearer {key}\"");
    println!(
        "\nsmartdb is ready: gateway on {g} (data in {}; {key_line})\n{services}
Try it:
  grpcurl -plaintext {g} list
  grpcurl -plaintext {h} -d '{{\"name\": \"notes\"}}' {g} smartdb.v1.KnowledgeBaseService/CreateKnowledgeBase
  grpcurl -plaintext {h} -d '{{\"knowledge_base\": \"notes\", \"text\": \"The mitochondria is the powerhouse of the cell.\", \"wait\": true}}' {g} smartdb.v1.DocumentService/IngestText
  grpcurl -plaintext {h} -d '{{\"knowledge_base\": \"notes\", \"query\": \"what produces energy in cells?\"}}' {g} smartdb.v1.SearchService/Search
  smartdb status
Press Ctrl-C to stop.",
        data_dir.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_only_for_stateless_services() {
        assert_eq!(parse_replicas("embed=2"), Ok(("embed".into(), 2)));
        assert!(parse_replicas("search=2").unwrap_err().contains("shared"));
        assert!(parse_replicas("embed=0").is_err());
        assert!(parse_replicas("embed").is_err());
    }

    #[test]
    fn restart_delays_grow_to_a_cap_with_jitter() {
        for n in 1..40 {
            let base = Duration::from_millis(500)
                .saturating_mul(1u32 << (n - 1).min(10))
                .min(MAX_RESTART_DELAY);
            for _ in 0..20 {
                let d = restart_delay(n);
                assert!(d >= base / 2 && d <= base, "n={n}: {d:?} outside {base:?}");
            }
        }
        assert!(restart_delay(30) <= MAX_RESTART_DELAY);
        let spread: std::collections::HashSet<_> = (0..20).map(|_| restart_delay(4)).collect();
        assert!(spread.len() > 10, "restarts are not jittered");
    }
}
