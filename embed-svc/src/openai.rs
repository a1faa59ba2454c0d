//! A provider for any OpenAI-compatible `/embeddings` endpoint (OpenAI, Azure-style gateways,
//! vLLM, TEI, Ollama, LiteLLM, embed-svc's own HTTP API, ...).
//!
//! Request and response shapes come from `async-openai`'s types, but the HTTP call is made with
//! our own `reqwest` client: `async-openai`'s client retries 429s itself and does not expose
//! response headers, so it could not honour `Retry-After` nor tell 429 from 5xx for our error
//! mapping.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_openai::types::embeddings::{CreateEmbeddingRequest, EmbeddingInput, EncodingFormat};
use smartdb_kit::client::{Breaker, BreakerNames, BreakerSettings};
use tokio::sync::Semaphore;
use tokio_retry::RetryIf;
use tokio_retry::strategy::{ExponentialBackoff, jitter};

use crate::error::{Error, Result};
use crate::model::Embedded;
use crate::provider::{InputKind, ModelDescriptor, Provider};

/// First retry delay before jitter; it doubles per attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest backoff delay before jitter.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A `Retry-After` longer than this is not waited for: the caller gets RESOURCE_EXHAUSTED at once
/// rather than a request hanging for minutes.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Suggested wait reported with RESOURCE_EXHAUSTED when the server named none.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Settings of an [`OpenAiProvider`].
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// API root, e.g. `https://api.openai.com/v1`; `/embeddings` is appended.
    pub base_url: String,
    /// Bearer token, if the endpoint wants one.
    pub api_key: Option<String>,
    /// Model name sent in requests; also the model id clients use.
    pub model: String,
    /// Vector length to request (`dimensions`); `None` = the model's native length.
    pub dimensions: Option<u32>,
    /// The model's input limit in tokens (remote APIs don't report it; OpenAI's is 8192).
    /// Callers that chunk text size their chunks by it.
    pub max_input_tokens: usize,
    /// Most inputs per HTTP request (OpenAI allows 2048).
    pub max_inputs_per_request: usize,
    /// Estimated tokens per HTTP request (OpenAI allows 300 000); see [`estimate_tokens`].
    pub max_tokens_per_request: usize,
    /// HTTP requests in flight at once for this provider.
    pub max_concurrency: usize,
    /// Retries per HTTP request after 429, 5xx or connection errors.
    pub max_retries: u32,
    /// Consecutive failed requests (after their retries) that open the circuit breaker; while
    /// open, calls fail at once with UNAVAILABLE instead of waiting on a dead endpoint.
    pub breaker_failures: u32,
    /// How long the breaker first stays open before letting a trial request through; doubles
    /// while trials keep failing, up to a minute.
    pub breaker_open: Duration,
    /// Prefix put before queries.
    pub query_prefix: String,
    /// Prefix put before documents.
    pub document_prefix: String,
}

impl OpenAiConfig {
    /// Settings for `model` at `base_url`, with OpenAI's limits and no key or prefixes.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            model: model.into(),
            dimensions: None,
            max_input_tokens: 8192,
            max_inputs_per_request: 2048,
            max_tokens_per_request: 300_000,
            max_concurrency: 4,
            max_retries: 5,
            breaker_failures: 3,
            breaker_open: Duration::from_secs(10),
            query_prefix: String::new(),
            document_prefix: String::new(),
        }
    }
}

/// Approximate token count of `text`: bytes / 4, rounded up. Only an estimate, used to keep
/// requests under the server's per-request token budget; the remote tokenizer is unknown.
pub fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(4)
}

/// Embeds through an OpenAI-compatible HTTP endpoint.
pub struct OpenAiProvider {
    config: OpenAiConfig,
    url: String,
    http: reqwest::Client,
    /// Descriptor before the dimension is known (dimension 0 when not configured).
    initial: ModelDescriptor,
    /// Descriptor once the dimension is known from [`OpenAiProvider::probe`] or a response.
    discovered: OnceLock<ModelDescriptor>,
    /// Bounds requests in flight, shared by all calls so a burst cannot flood the endpoint.
    permits: Arc<Semaphore>,
    /// Trips after repeated failures so callers stop waiting on an endpoint that is down.
    breaker: Breaker,
}

impl OpenAiProvider {
    /// Builds the provider; makes no network call (see [`OpenAiProvider::probe`]).
    pub fn new(config: OpenAiConfig) -> Result<Self> {
        if config.model.is_empty() {
            return Err(Error::invalid("model", "must not be empty"));
        }
        let base = config.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::invalid(
                "base_url",
                format!("{base:?} is not an http(s) URL"),
            ));
        }
        let url = format!("{base}/embeddings");
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A large batch on a busy server can take a while; a hung connection must not.
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| Error::Internal(format!("cannot build the HTTP client: {e}")))?;
        let initial = ModelDescriptor {
            id: config.model.clone(),
            dimension: config.dimensions.unwrap_or(0) as usize,
            max_input_tokens: config.max_input_tokens.max(1),
            provider: "openai",
            query_prefix: config.query_prefix.clone(),
            document_prefix: config.document_prefix.clone(),
        };
        let discovered = OnceLock::new();
        if config.dimensions.is_some() {
            let _ = discovered.set(initial.clone());
        }
        // The same breaker as every call between smartdb services (kit::client::breaker).
        let open = config.breaker_open.max(Duration::from_millis(1));
        let breaker = Breaker::new(
            &BreakerSettings {
                consecutive_failures: config.breaker_failures.max(1),
                open,
                max_open: open.max(Duration::from_secs(60)),
                ..BreakerSettings::default()
            },
            BreakerNames {
                gauge: "embed_remote_breaker_open",
                rejected: "embed_remote_rejected_total",
                labels: vec![("model", config.model.clone())],
            },
        );
        Ok(Self {
            permits: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            breaker,
            config,
            url,
            http,
            initial,
            discovered,
        })
    }

    /// Learns the vector length by embedding one short text, unless it is already known.
    /// Returns the dimension.
    pub async fn probe(&self) -> Result<usize> {
        if let Some(known) = self.discovered.get() {
            return Ok(known.dimension);
        }
        self.embed(vec!["dimension probe".to_owned()], InputKind::Query)
            .await?;
        Ok(self.descriptor().dimension)
    }

    /// Records the dimension seen in a response, or checks it against the known one.
    fn check_dimension(&self, got: usize) -> Result<()> {
        let known = self.discovered.get_or_init(|| ModelDescriptor {
            dimension: got,
            ..self.initial.clone()
        });
        if known.dimension != got {
            return Err(Error::Internal(format!(
                "{} returned a {got}-d vector, expected {}",
                self.config.model, known.dimension
            )));
        }
        Ok(())
    }

    /// Sends one request (with retries) for `texts`, returning vectors in their order.
    async fn embed_chunk(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        if !self.breaker.permits() {
            return Err(Error::Unavailable(format!(
                "model {:?}: its endpoint failed repeatedly, so it is not called for a while \
                 (circuit breaker open); other models still answer",
                self.config.model
            )));
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("shutting down".into()))?;
        let count = texts.len();
        let request = CreateEmbeddingRequest {
            model: self.config.model.clone(),
            input: EmbeddingInput::StringArray(texts),
            encoding_format: Some(EncodingFormat::Float),
            user: None,
            dimensions: self.config.dimensions,
        };
        let body = serde_json::to_vec(&request)
            .map_err(|e| Error::Internal(format!("cannot encode the request: {e}")))?;
        // The strategy's delays are fixed in advance, so a server's `Retry-After` is honoured
        // by having the next attempt wait until then: the effective wait is the longer of the two.
        let not_before: Mutex<Option<Instant>> = Mutex::new(None);
        let strategy = ExponentialBackoff::from_millis(2)
            .factor(BACKOFF_BASE.as_millis() as u64 / 2)
            .max_delay(BACKOFF_MAX)
            .map(jitter) // full jitter: uniform in [0, delay)
            .take(self.config.max_retries as usize);
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let attempt = || async {
            if attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0 {
                metrics::counter!("embed_remote_retries_total", "model" => self.config.model.clone())
                    .increment(1);
            }
            let wait_until = not_before.lock().expect("not poisoned").take();
            if let Some(at) = wait_until {
                tokio::time::sleep_until(at.into()).await;
            }
            let result = self.send(body.clone()).await;
            if let Err(Failure {
                retry_after: Some(after),
                ..
            }) = &result
            {
                *not_before.lock().expect("not poisoned") = Some(Instant::now() + *after);
            }
            result
        };
        let started = Instant::now();
        let response = RetryIf::start(strategy, attempt, Failure::retryable).await;
        // Only an endpoint that is down or broken trips the breaker; one that answers (even
        // with 429 or 400) is alive.
        match &response {
            Err(Failure {
                kind: FailureKind::ServerError | FailureKind::Connection,
                ..
            }) => self.breaker.record(false),
            _ => self.breaker.record(true),
        }
        let response = response.map_err(|failure| {
            metrics::counter!(
                "embed_remote_failures_total",
                "model" => self.config.model.clone(),
                "kind" => format!("{:?}", failure.kind),
            )
            .increment(1);
            failure.into_error()
        })?;
        metrics::histogram!("embed_inference_duration_seconds", "provider" => "openai")
            .record(started.elapsed().as_secs_f64());

        if response.data.len() != count {
            return Err(Error::Internal(format!(
                "{} returned {} vectors for {count} inputs",
                self.config.model,
                response.data.len()
            )));
        }
        let mut out: Vec<Option<Vec<f32>>> = vec![None; count];
        for item in response.data {
            let slot = out.get_mut(item.index).ok_or_else(|| {
                Error::Internal(format!("response index {} out of range", item.index))
            })?;
            if slot.replace(item.embedding).is_some() {
                return Err(Error::Internal(format!(
                    "response index {} repeated",
                    item.index
                )));
            }
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every index filled: count matched and none repeated"))
            .collect())
    }

    /// One HTTP attempt, classified for the retry loop.
    async fn send(&self, body: Vec<u8>) -> Result<EmbeddingResponse, Failure> {
        let mut request = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| Failure {
            kind: FailureKind::Connection,
            message: format!("cannot reach {}: {e}", self.url),
            retry_after: None,
        })?;
        let status = response.status();
        if status.is_success() {
            // A body cut short is a transport problem, worth retrying like a dropped connection.
            let bytes = response.bytes().await.map_err(|e| Failure {
                kind: FailureKind::Connection,
                message: format!("reading the response of {}: {e}", self.url),
                retry_after: None,
            })?;
            return serde_json::from_slice(&bytes).map_err(|e| Failure {
                kind: FailureKind::Fatal,
                message: format!("unexpected response from {}: {e}", self.url),
                retry_after: None,
            });
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let text = response.text().await.unwrap_or_default();
        let message = format!(
            "{} answered {status}: {}",
            self.url,
            error_message(&text).unwrap_or(text.chars().take(500).collect())
        );
        let kind = match status.as_u16() {
            429 => FailureKind::RateLimited,
            408 | 500..=599 => FailureKind::ServerError,
            // Our configuration is wrong (key, URL, model name), not the caller's texts.
            401 | 403 | 404 => FailureKind::Fatal,
            _ => FailureKind::Rejected,
        };
        Err(Failure {
            kind,
            message,
            retry_after,
        })
    }
}

#[async_trait::async_trait]
impl Provider for OpenAiProvider {
    fn descriptor(&self) -> &ModelDescriptor {
        self.discovered.get().unwrap_or(&self.initial)
    }

    fn tokenizer_json(&self) -> Option<String> {
        None
    }

    // The remote service schedules its own work: both kinds go out as they come.
    async fn embed(&self, texts: Vec<String>, _kind: InputKind) -> Result<Vec<Embedded>> {
        let count = texts.len();
        let chunks = split(
            texts,
            self.config.max_inputs_per_request.max(1),
            self.config.max_tokens_per_request.max(1),
        );
        // All chunks start at once; the semaphore decides how many are really in flight.
        let results =
            futures::future::try_join_all(chunks.into_iter().map(|chunk| self.embed_chunk(chunk)))
                .await?;
        let mut out = Vec::with_capacity(count);
        for vector in results.into_iter().flatten() {
            self.check_dimension(vector.len())?;
            out.push(Embedded {
                values: vector,
                truncated: false,
                tokens: 0,
            });
        }
        metrics::counter!("embed_model_inputs_total", "provider" => "openai")
            .increment(count as u64);
        Ok(out)
    }
}

/// Splits `texts` into consecutive runs of at most `max_inputs` texts and about `max_tokens`
/// estimated tokens; a text over the budget on its own still gets a request (the server decides).
fn split(texts: Vec<String>, max_inputs: usize, max_tokens: usize) -> Vec<Vec<String>> {
    let mut chunks = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut tokens = 0;
    for text in texts {
        let cost = estimate_tokens(&text);
        if !current.is_empty() && (current.len() >= max_inputs || tokens + cost > max_tokens) {
            chunks.push(std::mem::take(&mut current));
            tokens = 0;
        }
        tokens += cost;
        current.push(text);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// Parses `Retry-After` given in (possibly fractional) seconds; HTTP dates are not supported and
/// fall back to plain backoff.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// The `error.message` of an OpenAI-style error body, if it is one.
fn error_message(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    match &value["error"] {
        serde_json::Value::String(s) => Some(s.clone()),
        error => error["message"].as_str().map(str::to_owned),
    }
}

/// The parts of an embeddings response we use. Own type rather than `async-openai`'s, which
/// requires `usage` and `object` that some compatible servers leave out.
#[derive(serde::Deserialize)]
struct EmbeddingResponse {
    data: Vec<EmbeddingItem>,
}

/// One vector of a response.
#[derive(serde::Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: Vec<f32>,
}

/// How an attempt failed, which decides retrying and the final error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// 429.
    RateLimited,
    /// 408 or 5xx.
    ServerError,
    /// No response at all.
    Connection,
    /// 4xx about the request content.
    Rejected,
    /// Misconfiguration or an unreadable answer.
    Fatal,
}

/// A failed attempt.
#[derive(Debug)]
struct Failure {
    kind: FailureKind,
    message: String,
    retry_after: Option<Duration>,
}

impl Failure {
    /// Worth another attempt? Not when the server asks for a wait longer than we would block.
    fn retryable(&self) -> bool {
        match self.kind {
            FailureKind::RateLimited | FailureKind::ServerError | FailureKind::Connection => {
                self.retry_after.is_none_or(|d| d <= MAX_RETRY_AFTER)
            }
            FailureKind::Rejected | FailureKind::Fatal => false,
        }
    }

    /// The error callers see once retrying is over.
    fn into_error(self) -> Error {
        match self.kind {
            FailureKind::RateLimited => Error::ResourceExhausted {
                message: self.message,
                retry_after: self.retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
            },
            FailureKind::ServerError | FailureKind::Connection => Error::Unavailable(self.message),
            FailureKind::Rejected => Error::invalid("texts", self.message),
            FailureKind::Fatal => Error::Internal(self.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Json;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;

    use super::*;
    use crate::http_api::tests::local_embedder;
    use crate::provider::InputKind;

    /// Serves `router` on a free loopback port; returns its `/v1` base URL.
    async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        format!("http://{addr}/v1")
    }

    /// A server whose answer to request number `n` (from 0) is `answer(n)`; counts requests.
    async fn scripted(
        answer: impl Fn(usize) -> Response + Clone + Send + Sync + 'static,
    ) -> (String, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        let router = axum::Router::new().route(
            "/v1/embeddings",
            post(move |Json(body): Json<serde_json::Value>| {
                let answer = answer.clone();
                let n = seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    let response = answer(n);
                    if response.status().is_success() {
                        let inputs = body["input"].as_array().map_or(1, Vec::len);
                        let data: Vec<_> = (0..inputs)
                            .map(|i| serde_json::json!({"object": "embedding", "index": i, "embedding": [i as f32, 1.0]}))
                            .collect();
                        Json(serde_json::json!({"object": "list", "data": data, "model": "m"}))
                            .into_response()
                    } else {
                        response
                    }
                }
            }),
        );
        (serve(router).await, count)
    }

    /// One document text, "a", through `provider`.
    async fn embed_a(provider: &OpenAiProvider) -> Result<Vec<Embedded>> {
        provider.embed(vec!["a".into()], InputKind::Document).await
    }

    fn config(base_url: String) -> OpenAiConfig {
        OpenAiConfig {
            max_retries: 3,
            ..OpenAiConfig::new(base_url, "m")
        }
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    }

    #[test]
    fn split_respects_count_and_token_budget() {
        let texts: Vec<String> = (0..10).map(|i| format!("text {i}")).collect(); // 2 tokens each
        let chunks = split(texts.clone(), 3, 1000);
        assert_eq!(
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        assert_eq!(chunks.concat(), texts);
        let chunks = split(texts.clone(), 100, 5);
        assert!(chunks.iter().all(|c| c.len() == 2));
        // A text alone over budget is still sent, by itself.
        let chunks = split(vec!["x".repeat(100), "y".into()], 10, 5);
        assert_eq!(chunks.len(), 2);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn matches_the_local_model_through_embed_svcs_own_http_api() {
        let embedder = local_embedder().await;
        let model = embedder.describe("").unwrap().id;
        let cell = Arc::new(tokio::sync::OnceCell::new_with(Some(embedder.clone())));
        let base = serve(crate::http_api::router(cell)).await;
        let provider = OpenAiProvider::new(OpenAiConfig {
            max_inputs_per_request: 3,
            ..OpenAiConfig::new(base, model.clone())
        })
        .unwrap();
        assert_eq!(provider.descriptor().dimension, 0);
        assert_eq!(provider.probe().await.unwrap(), 384);
        assert_eq!(provider.descriptor().provider, "openai");
        assert!(provider.tokenizer_json().is_none());

        let texts: Vec<String> = (0..10)
            .map(|i| format!("sentence number {i} about topic {}", i * 7 % 5))
            .collect();
        let remote = provider
            .embed(texts.clone(), InputKind::Document)
            .await
            .unwrap();
        let local = embedder
            .embed(texts, InputKind::Document, &model)
            .await
            .unwrap();
        assert_eq!(remote.len(), 10);
        for (r, l) in remote.iter().zip(&local.vectors) {
            assert_eq!(r.values.len(), 384);
            assert!(cosine(&r.values, &l.values) > 0.9999);
            assert!(!r.truncated);
        }
    }

    #[tokio::test]
    async fn a_429_with_retry_after_is_waited_out_then_succeeds() {
        let (base, count) = scripted(|n| {
            if n == 0 {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "1")],
                    "slow down",
                )
                    .into_response()
            } else {
                StatusCode::OK.into_response()
            }
        })
        .await;
        let provider = OpenAiProvider::new(config(base)).unwrap();
        let started = Instant::now();
        let out = provider
            .embed(vec!["a".into(), "b".into()], InputKind::Document)
            .await
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert_eq!(out[1].values, [1.0, 1.0]);
    }

    #[tokio::test]
    async fn server_errors_are_retried() {
        let (base, count) = scripted(|n| {
            if n < 2 {
                StatusCode::SERVICE_UNAVAILABLE.into_response()
            } else {
                StatusCode::OK.into_response()
            }
        })
        .await;
        let provider = OpenAiProvider::new(config(base)).unwrap();
        assert_eq!(embed_a(&provider).await.unwrap().len(), 1);
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_400_is_not_retried_and_is_invalid_argument() {
        let (base, count) = scripted(|_| {
            (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": {"message": "input too long"}})),
            )
                .into_response()
        })
        .await;
        let provider = OpenAiProvider::new(config(base)).unwrap();
        match embed_a(&provider).await {
            Err(Error::InvalidArgument { field, message }) => {
                assert_eq!(field, "texts");
                assert!(message.contains("input too long"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn persistent_429_ends_in_resource_exhausted_and_5xx_in_unavailable() {
        let (base, count) = scripted(|_| StatusCode::TOO_MANY_REQUESTS.into_response()).await;
        let provider = OpenAiProvider::new(OpenAiConfig {
            max_retries: 2,
            ..config(base)
        })
        .unwrap();
        assert!(matches!(
            embed_a(&provider).await,
            Err(Error::ResourceExhausted { .. })
        ));
        assert_eq!(count.load(Ordering::SeqCst), 3);

        let (base, _) = scripted(|_| StatusCode::BAD_GATEWAY.into_response()).await;
        let provider = OpenAiProvider::new(OpenAiConfig {
            max_retries: 1,
            ..config(base)
        })
        .unwrap();
        assert!(matches!(
            embed_a(&provider).await,
            Err(Error::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_dead_endpoint_trips_the_breaker_which_closes_once_it_answers() {
        // Requests 0..4 fail with 503; from request 4 on the server is healthy again.
        let (base, count) = scripted(|n| {
            if n < 4 {
                StatusCode::SERVICE_UNAVAILABLE.into_response()
            } else {
                StatusCode::OK.into_response()
            }
        })
        .await;
        let provider = OpenAiProvider::new(OpenAiConfig {
            max_retries: 1,
            breaker_failures: 2,
            breaker_open: Duration::from_millis(300),
            ..config(base)
        })
        .unwrap();
        // Two failed calls (two attempts each) open the breaker.
        for _ in 0..2 {
            assert!(matches!(
                embed_a(&provider).await,
                Err(Error::Unavailable(_))
            ));
        }
        assert_eq!(count.load(Ordering::SeqCst), 4);
        // Open: rejected at once, without a request.
        let started = Instant::now();
        match embed_a(&provider).await {
            Err(Error::Unavailable(message)) => assert!(message.contains("circuit"), "{message}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(count.load(Ordering::SeqCst), 4);
        // After the open period a trial goes through, succeeds, and closes the breaker.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(embed_a(&provider).await.unwrap().len(), 1);
        assert_eq!(
            provider
                .embed(vec!["b".into()], InputKind::Document)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(count.load(Ordering::SeqCst), 6);
    }
}
