//! An OpenAI-compatible `POST /v1/embeddings` endpoint, so existing OpenAI clients and tools can
//! use embed-svc's models (and its cache) without gRPC.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::embedder::{Embedder, MAX_BATCH, MAX_TEXT_BYTES};
use crate::error::Error;
use crate::openai::estimate_tokens;
use crate::provider::InputKind;

/// The embedder, set once the model has loaded; until then requests get 503.
type Shared = Arc<OnceCell<Arc<Embedder>>>;

/// Routes serving `POST /v1/embeddings` from `embedder`.
pub fn router(embedder: Shared) -> Router {
    // The largest valid request (MAX_BATCH texts of MAX_TEXT_BYTES, JSON-escaped) must fit;
    // axum's 2 MiB default would refuse valid batches.
    let limit = MAX_BATCH * MAX_TEXT_BYTES * 2 + 64 * 1024;
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(embedder)
}

/// Body of an embeddings request; unknown fields (e.g. `user`) are ignored like OpenAI does.
#[derive(Deserialize)]
struct EmbeddingsRequest {
    input: Value,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u64>,
}

async fn embeddings(State(cell): State<Shared>, body: Bytes) -> Response {
    match handle(cell, &body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn handle(cell: Shared, body: &[u8]) -> Result<Response, ApiError> {
    // Parsed by hand rather than with `Json<_>` so malformed bodies get OpenAI-style errors.
    let request: EmbeddingsRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("invalid JSON body: {e}")))?;
    let texts = match request.input {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s),
                // Token arrays need the model's tokenizer ids; not supported.
                _ => Err(ApiError::invalid(
                    Some(format!("input[{i}]")),
                    "each input must be a string (token arrays are not supported)".into(),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::invalid(
                Some("input".into()),
                "input must be a string or an array of strings".into(),
            ));
        }
    };
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format".into()),
                format!("unsupported encoding_format {other:?}; use \"float\" or \"base64\""),
            ));
        }
    };
    if request.model.as_deref() == Some("") {
        return Err(ApiError::invalid(
            Some("model".into()),
            "model must not be empty".into(),
        ));
    }
    let model = request.model.unwrap_or_default();
    let embedder = cell
        .get()
        .ok_or_else(|| Error::Unavailable("the embedding model is still loading".into()))?;
    let descriptor = embedder.describe(&model)?;
    // Our models have one fixed length; asking for another cannot be honoured.
    if let Some(d) = request.dimensions
        && d != descriptor.dimension as u64
    {
        return Err(ApiError::invalid(
            Some("dimensions".into()),
            format!(
                "model {} produces {}-d vectors; {d} is not supported",
                descriptor.id, descriptor.dimension
            ),
        ));
    }
    // Token counts are estimates (bytes / 4): cached vectors carry no token count.
    let tokens: usize = texts.iter().map(|t| estimate_tokens(t)).sum();
    let out = embedder.embed(texts, InputKind::Document, &model).await?;
    let data: Vec<Value> = out
        .vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.values.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(&v.values[..])
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": out.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    fn invalid(param: Option<String>, message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message,
            param,
            retry_after_secs: None,
        }
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument { field, message } => {
                // Our field names are gRPC's (`texts[3]`); clients know OpenAI's (`input[3]`).
                let param = match field.strip_prefix("texts") {
                    Some(rest) => format!("input{rest}"),
                    None => field,
                };
                Self::invalid(Some(param), message)
            }
            Error::ResourceExhausted {
                message,
                retry_after,
            } => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "rate_limit_error",
                message,
                param: None,
                // Whole seconds, at least 1: the header has no fractions.
                retry_after_secs: Some(retry_after.as_secs_f64().ceil().max(1.0) as u64),
            },
            Error::Unavailable(message) => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "service_unavailable",
                message,
                param: None,
                retry_after_secs: Some(1),
            },
            Error::Internal(message) => {
                tracing::error!(error = %message, "internal error");
                Self {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    kind: "server_error",
                    message,
                    param: None,
                    retry_after_secs: None,
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": null,
        }});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::cache::EmbeddingCache;
    use crate::model::{LocalModel, MINILM_L6_V2, default_models_dir, ensure_model};
    use crate::provider::LocalProvider;

    /// An embedder around the real local model. Built per test: the local provider runs its
    /// batching task on the runtime that creates it, and each test has its own runtime.
    pub(crate) async fn local_embedder() -> Arc<Embedder> {
        let model = tokio::task::spawn_blocking(|| {
            let dir = ensure_model(&default_models_dir(), &MINILM_L6_V2).unwrap();
            LocalModel::load(&dir, &MINILM_L6_V2).unwrap()
        })
        .await
        .unwrap();
        let provider = Arc::new(LocalProvider::new(model, 64));
        Arc::new(Embedder::new(provider, EmbeddingCache::new(16 << 20)))
    }

    async fn post(router: Router, body: &str) -> (StatusCode, Option<String>, Value) {
        let response = router
            .oneshot(
                Request::post("/v1/embeddings")
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_owned()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, retry_after, serde_json::from_slice(&bytes).unwrap())
    }

    async fn loaded_router() -> (Router, String) {
        let embedder = local_embedder().await;
        let model = embedder.describe("").unwrap().id;
        (router(Arc::new(OnceCell::new_with(Some(embedder)))), model)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embeds_a_string_and_an_array_in_order() {
        let (router, model) = loaded_router().await;
        let (status, _, single) =
            post(router.clone(), r#"{"input": "hello world", "model": ""}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "empty model is refused");
        assert_eq!(single["error"]["param"], "model");

        let (status, _, single) = post(router.clone(), r#"{"input": "hello world"}"#).await;
        assert_eq!(status, StatusCode::OK, "{single}");
        assert_eq!(single["object"], "list");
        assert_eq!(single["model"], model.as_str());
        assert_eq!(single["data"].as_array().unwrap().len(), 1);
        assert_eq!(
            single["data"][0]["embedding"].as_array().unwrap().len(),
            384
        );
        assert!(single["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

        let body = json!({"input": ["a cat", "hello world", "a dog"], "model": model,
            "encoding_format": "float", "dimensions": 384});
        let (status, _, many) = post(router.clone(), &body.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{many}");
        let data = many["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        for (i, item) in data.iter().enumerate() {
            assert_eq!(item["index"], i);
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["embedding"].as_array().unwrap().len(), 384);
        }
        // Same text, same vector, wherever it sits in the batch.
        assert_eq!(data[1]["embedding"], single["data"][0]["embedding"]);

        let body = json!({"input": ["hello world"], "encoding_format": "base64"});
        let (status, _, encoded) = post(router, &body.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{encoded}");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // JSON carries the f32s' shortest decimal form; read back as f32 it is exact.
        let expected: Vec<f32> = single["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(floats, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_requests_get_openai_style_400s() {
        let (router, _) = loaded_router().await;
        let (status, _, body) = post(router.clone(), "{not json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["type"], "invalid_request_error");

        let (status, _, body) = post(
            router.clone(),
            r#"{"input": "x", "model": "no-such-model"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no-such-model")
        );

        let (status, _, body) = post(router.clone(), r#"{"input": ["ok", "  "]}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "input[1]");

        let (status, _, body) = post(router.clone(), r#"{"input": [[1, 2, 3]]}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "input[0]");

        let (status, _, body) = post(router, r#"{"input": "x", "dimensions": 12}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "dimensions");
    }

    #[tokio::test]
    async fn not_loaded_yet_is_503_with_retry_after() {
        let (status, retry_after, body) =
            post(router(Arc::new(OnceCell::new())), r#"{"input": "x"}"#).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert!(body["error"]["message"].is_string());
    }

    #[test]
    fn resource_exhausted_maps_to_429_with_whole_seconds() {
        let response = ApiError::from(Error::ResourceExhausted {
            message: "busy".into(),
            retry_after: std::time::Duration::from_millis(200),
        })
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
