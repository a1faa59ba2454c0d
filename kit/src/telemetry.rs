//! Logs and traces. Logs: `tracing` to stderr, filtered by `SMARTDB_LOG` (or `RUST_LOG`), default
//! `info`. Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, our spans go to that OTLP/gRPC endpoint, following the standard `OTEL_*` variables
//! (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, default parent-based always-on, `OTEL_BSP_*`),
//! and W3C trace context (`traceparent`) travels in the metadata of every call between services.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SpanProcessor};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::prelude::*;

use crate::spans::{ExportLayer, Sampling};

/// Keeps trace export running; dropping it sends what is still buffered and stops it. Hold it
/// until the service has drained.
#[must_use = "dropping it stops trace export"]
pub struct Telemetry {
    processor: Option<Arc<BatchSpanProcessor>>,
}

/// Set once `init` installed trace export: without it, the per-call helpers below skip the
/// OpenTelemetry lookups (propagator, span context) that could only come back empty.
static EXPORTING: AtomicBool = AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(processor) = self.processor.take()
            && let Err(e) = processor.shutdown()
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
    let processor = if otlp_configured() {
        match span_processor(service) {
            Ok(processor) => Some(Arc::new(processor)),
            Err(e) => {
                eprintln!("traces will not be exported: {e}");
                None
            }
        }
    } else {
        None
    };
    let otel = processor.as_ref().map(|processor| {
        let processor: Arc<dyn SpanProcessor> = processor.clone();
        ExportLayer::new(service, processor, Sampling::from_env())
            // Only our own spans: the transport's would swamp the traces and cost time.
            .with_filter(Targets::new().with_target("smartdb", LevelFilter::INFO))
    });
    let installed = tracing_subscriber::registry()
        .with(logs(json))
        .with(otel)
        .try_init()
        .is_ok();
    if installed && processor.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Telemetry {
        processor: processor.filter(|_| installed),
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

/// The OTLP exporter behind a batch processor (`OTEL_BSP_*`), with the service's resource.
fn span_processor(service: &'static str) -> anyhow::Result<BatchSpanProcessor> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME, read by the builder, wins over our name.
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service);
    }
    let mut processor = BatchSpanProcessor::builder(exporter).build();
    processor.set_resource(&resource.build());
    Ok(processor)
}

/// Makes `span` a child of the trace context in `headers` (a no-op without trace export), and
/// returns the trace id to log: the span's when exporting, else the caller's `traceparent`'s.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) -> Option<String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    continue_from(span, header("traceparent"), header("tracestate"))
}

/// Makes `span` a child of a trace context saved by [`save_trace`] (a no-op without trace
/// export or without a saved context); returns the trace id to log, as [`continue_trace`].
pub fn continue_saved_trace(span: &tracing::Span, saved: &str) -> Option<String> {
    continue_from(span, Some(saved).filter(|s| !s.is_empty()), None)
}

fn continue_from(
    span: &tracing::Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Option<String> {
    let caller = traceparent.and_then(|v| parse_traceparent(v, tracestate));
    if exporting() {
        let context = match &caller {
            Some(caller) => crate::spans::set_remote_parent(span, caller),
            None => crate::spans::context_of(span),
        };
        if let Some(context) = context {
            return Some(context.trace_id().to_string());
        }
    }
    caller.map(|c| c.trace_id().to_string())
}

/// The current span's trace context as a `traceparent` value, to continue the trace in work
/// that runs later (an ingest job); empty without trace export.
pub fn save_trace() -> String {
    current_context()
        .map(|context| traceparent(&context))
        .unwrap_or_default()
}

/// Puts the current span's trace context into outgoing call metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let Some(context) = current_context() else {
        return;
    };
    if let Ok(mut value) = tonic::metadata::MetadataValue::try_from(traceparent(&context)) {
        // New on every call: kept out of HPACK's table, where it would only push out the
        // headers that repeat.
        value.set_sensitive(true);
        metadata.insert("traceparent", value);
    }
    let state = context.trace_state().header();
    if !state.is_empty()
        && let Ok(value) = state.try_into()
    {
        metadata.insert("tracestate", value);
    }
}

/// The current span's context, when traces are exported.
fn current_context() -> Option<SpanContext> {
    if !exporting() {
        return None;
    }
    crate::spans::context_of(&tracing::Span::current()).filter(SpanContext::is_valid)
}

// W3C Trace Context written and read here rather than through the SDK's propagator: it is on
// every call, and the propagator goes through a `Context` and string maps (measured in the
// tracing bench's overhead).

/// The `traceparent` header value of `context` (version 00).
fn traceparent(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

/// A caller's span context from its `traceparent` (and `tracestate`), or None if it is not a
/// valid one: lower-case hex fields of the right lengths, ids not all zero, version not `ff`,
/// and exactly four fields in version 00 (later versions may add fields).
fn parse_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut fields = traceparent.trim().split('-');
    let (version, trace, span, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    if !lower_hex(version, 2)
        || version == "ff"
        || (version == "00" && fields.next().is_some())
        || !lower_hex(trace, 32)
        || !lower_hex(span, 16)
        || !lower_hex(flags, 2)
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?) & TraceFlags::SAMPLED;
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
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

    #[test]
    fn traceparent_is_written_and_read_as_w3c_trace_context_says() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = parse_traceparent(value, Some("vendor=abc")).expect("valid");
        assert_eq!(
            context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            context.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(context.is_sampled() && context.is_remote());
        assert_eq!(context.trace_state().get("vendor"), Some("abc"));
        assert_eq!(traceparent(&context), value);
        // Unknown flags are dropped; a later version may carry more fields.
        let later = parse_traceparent(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-08-more",
            None,
        )
        .expect("a later version");
        assert!(!later.is_sampled());
        assert!(traceparent(&later).ends_with("-00"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(parse_traceparent(bad, None), None, "{bad:?}");
        }
    }
}
