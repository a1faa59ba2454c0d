//! An OTLP trace receiver for tests and benches: the official `opentelemetry-proto` trace
//! service, served by tonic on a free loopback port, keeping every span it is sent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// One received span.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent: String,
}

/// An OTLP trace receiver keeping every span it is sent.
#[derive(Clone, Default)]
pub struct Receiver {
    pub spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Receiver {
    /// Serves on a free loopback port; returns the endpoint URL.
    pub async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    /// The spans of the first trace holding a span named `name` from `service`, once that trace
    /// is whole: spans from each of `services`, and every parent link inside the trace.
    pub async fn whole_trace(&self, service: &str, name: &str, services: &[&str]) -> Vec<Span> {
        super::eventually(
            Duration::from_secs(30),
            &format!("a whole trace with {service} {name:?} across {services:?}"),
            || async {
                let spans = self.spans.lock().unwrap().clone();
                let trace_id = spans
                    .iter()
                    .find(|s| s.service == service && s.name == name)?
                    .trace_id
                    .clone();
                let trace: Vec<Span> = spans
                    .into_iter()
                    .filter(|s| s.trace_id == trace_id)
                    .collect();
                let seen: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
                let ids: HashSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
                let linked = trace
                    .iter()
                    .all(|s| s.parent.is_empty() || ids.contains(s.parent.as_str()));
                (services.iter().all(|s| seen.contains(s)) && linked).then_some(trace)
            },
        )
        .await
    }
}

/// Prints a trace as a tree, for the test log.
pub fn show(trace: &[Span]) -> String {
    let mut children: HashMap<&str, Vec<&Span>> = HashMap::new();
    for span in trace {
        children.entry(span.parent.as_str()).or_default().push(span);
    }
    fn walk(out: &mut String, children: &HashMap<&str, Vec<&Span>>, parent: &str, depth: usize) {
        for span in children.get(parent).into_iter().flatten() {
            out.push_str(&format!(
                "{}{} [{}]\n",
                "  ".repeat(depth),
                span.name,
                span.service
            ));
            walk(out, children, &span.span_id, depth + 1);
        }
    }
    let mut out = String::new();
    walk(&mut out, &children, "", 0);
    out
}
