//! Logs and traces. Logs: `tracing` to stderr, filtered by `SMARTDB_LOG` (or `RUST_LOG`), default
//! `info`. Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, our spans go to that OTLP/gRPC endpoint, following the standard `OTEL_*` variables
//! (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, default parent-based always-on, `OTEL_BSP_*`),
//! and W3C trace context (`traceparent`) travels in the metadata of every call between services.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::prelude::*;

/// Keeps trace export running; dropping it sends what is still buffered and stops it. Hold it
/// until the service has drained.
#[must_use = "dropping it stops trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Set once `init` installed trace export: without it, the per-call helpers below skip the
/// OpenTelemetry lookups (propagator, span context) that could only come back empty.
static EXPORTING: AtomicBool = AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace export did not shut down cleanly: {e}");
        }
    }
}

/// True if the environment names an OTLP endpoint for traces.
fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.trim().is_empty()))
        && !std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Installs the global `tracing` subscriber for `service` (e.g. `search-svc`); `json` switches
/// logs to one JSON object per line. Exports traces when an OTLP endpoint is configured (call
/// it inside the Tokio runtime: the exporter's channel lives there). Safe to call twice (the
/// second call installs nothing), which in-process tests rely on.
pub fn init(service: &'static str, json: bool) -> Telemetry {
    let provider = if otlp_configured() {
        match tracer_provider(service) {
            Ok(provider) => Some(provider),
            Err(e) => {
                eprintln!("traces will not be exported: {e}");
                None
            }
        }
    } else {
        None
    };
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            // What each span would pay for on every poll of its future (busy/idle times, an
            // OpenTelemetry context made current) or on creation (code location, thread, target)
            // and nobody here reads: names and ids make the traces; the bench measured the rest.
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            // Only our own spans: the transport's would swamp the traces and cost time.
            .with_filter(Targets::new().with_target("smartdb", LevelFilter::INFO))
    });
    let installed = tracing_subscriber::registry()
        .with(logs(json))
        .with(otel)
        .try_init()
        .is_ok();
    if installed && let Some(provider) = &provider {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Telemetry {
        provider: provider.filter(|_| installed),
    }
}

/// Logs only (for processes that serve nothing themselves, like `smartdb up`).
pub fn init_logs(json: bool) {
    let _ = tracing_subscriber::registry().with(logs(json)).try_init();
}

fn logs<S>(json: bool) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter = std::env::var("SMARTDB_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only for people: `smartdb up` relays children's logs through pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_target(false).with_filter(filter).boxed()
    }
}

fn tracer_provider(service: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME, read by the builder, wins over our name.
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Makes `span` a child of the trace context in `headers` (a no-op without trace export), and
/// returns the trace id to log: the span's when exporting, else the caller's `traceparent`'s.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) -> Option<String> {
    if exporting()
        && span
            .set_parent(opentelemetry::global::get_text_map_propagator(|p| {
                p.extract(&Headers(headers))
            }))
            .is_ok()
    {
        let context = span.context();
        let id = context.span().span_context().trace_id();
        return (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string());
    }
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|id| id.len() == 32)
        .map(str::to_owned)
}

/// Makes `span` a child of a trace context saved by [`save_trace`] (a no-op without trace
/// export or without a saved context); returns the trace id to log, as [`continue_trace`].
pub fn continue_saved_trace(span: &tracing::Span, saved: &str) -> Option<String> {
    let mut headers = http::HeaderMap::new();
    if !saved.is_empty() {
        headers.insert("traceparent", saved.parse().ok()?);
    }
    continue_trace(span, &headers)
}

/// The current span's trace context as a `traceparent` value, to continue the trace in work
/// that runs later (an ingest job); empty without trace export.
pub fn save_trace() -> String {
    if !exporting() {
        return String::new();
    }
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&tracing::Span::current().context(), &mut carrier)
    });
    carrier.remove("traceparent").unwrap_or_default()
}

/// Puts the current span's trace context into outgoing call metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if !exporting() {
        return;
    }
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return;
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut Metadata(metadata))
    });
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_export_the_callers_trace_id_is_logged() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let span = tracing::info_span!("test");
        assert_eq!(
            continue_trace(&span, &headers).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(continue_trace(&span, &http::HeaderMap::new()), None);
        // Nothing to save or send without export.
        assert_eq!(save_trace(), "");
    }
}
