//! The context a call carries across services: who is calling (tenant), how long it may take
//! (deadline, from `grpc-timeout`), and a request id for tracing.
//!
//! The gateway is the only place that sets the tenant from credentials; it strips every
//! `x-smartdb-*` header from incoming requests first, so a client cannot forge one. Internal
//! services read the context from the request and pass it on with [`CallContext::request`].

use std::time::{Duration, Instant};

use tonic::metadata::{MetadataMap, MetadataValue};

/// Metadata key carrying the authenticated tenant between services.
pub const TENANT_HEADER: &str = "x-smartdb-tenant";
/// Metadata key carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Prefix of every internal metadata key; the gateway strips these from incoming calls.
pub const INTERNAL_PREFIX: &str = "x-smartdb-";
/// Tenant used when no authentication is configured.
pub const DEFAULT_TENANT: &str = "default";

/// Margin kept back when passing a deadline on, so the callee gives up before we do.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// Per-call context extracted from incoming metadata.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// Tenant the call acts for.
    pub tenant: String,
    /// When the caller stops waiting, if it said.
    pub deadline: Option<Instant>,
    /// Id correlating logs across services.
    pub request_id: String,
}

impl CallContext {
    /// Context for work not triggered by a call (background workers), with a deadline `budget`
    /// from now.
    pub fn background(tenant: impl Into<String>, budget: Duration) -> Self {
        Self {
            tenant: tenant.into(),
            deadline: Some(Instant::now() + budget),
            request_id: new_request_id(),
        }
    }

    /// Reads the context of an incoming call.
    pub fn from_metadata(metadata: &MetadataMap) -> Self {
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            tenant: text(TENANT_HEADER)
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| DEFAULT_TENANT.to_owned()),
            deadline: text("grpc-timeout")
                .and_then(|t| parse_grpc_timeout(&t))
                .map(|d| Instant::now() + d),
            request_id: text(REQUEST_ID_HEADER).unwrap_or_else(new_request_id),
        }
    }

    /// Reads the context of an incoming tonic request.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Self {
        Self::from_metadata(request.metadata())
    }

    /// Time left before the deadline, or `default` if the caller set none; never more than
    /// `default` is not enforced, since a caller may legitimately allow longer.
    pub fn remaining(&self, default: Duration) -> Duration {
        match self.deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => default,
        }
    }

    /// True once the deadline has passed.
    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Builds an outgoing request carrying this context: tenant, request id, and the remaining
    /// deadline (or `default_timeout`) as `grpc-timeout`.
    pub fn request<T>(&self, message: T, default_timeout: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let timeout = self
            .remaining(default_timeout)
            .saturating_sub(DEADLINE_MARGIN)
            .max(Duration::from_millis(1));
        request.set_timeout(timeout);
        let metadata = request.metadata_mut();
        if let Ok(value) = MetadataValue::try_from(self.tenant.as_str()) {
            metadata.insert(TENANT_HEADER, value);
        }
        if let Ok(value) = MetadataValue::try_from(self.request_id.as_str()) {
            metadata.insert(REQUEST_ID_HEADER, value);
        }
        crate::telemetry::inject(metadata);
        request
    }
}

/// Removes every internal (`x-smartdb-*`) key, so that a client cannot pose as a tenant.
pub fn strip_internal(metadata: &mut MetadataMap) {
    let keys: Vec<String> = metadata
        .keys()
        .map(|k| match k {
            tonic::metadata::KeyRef::Ascii(k) => k.as_str().to_owned(),
            tonic::metadata::KeyRef::Binary(k) => k.as_str().to_owned(),
        })
        .filter(|k| k.starts_with(INTERNAL_PREFIX))
        .collect();
    for key in keys {
        metadata.remove(key.as_str());
        metadata.remove_bin(key.as_str());
    }
}

/// A fresh request id.
pub(crate) fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}-{:x}-{n:x}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    )
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_parses() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
    }

    #[test]
    fn deadline_propagates_with_margin() {
        let mut incoming = MetadataMap::new();
        incoming.insert("grpc-timeout", "2S".parse().unwrap());
        incoming.insert(TENANT_HEADER, "acme".parse().unwrap());
        let ctx = CallContext::from_metadata(&incoming);
        assert_eq!(ctx.tenant, "acme");
        let out = ctx.request((), Duration::from_secs(60));
        let timeout = parse_grpc_timeout(
            out.metadata()
                .get("grpc-timeout")
                .unwrap()
                .to_str()
                .unwrap(),
        )
        .unwrap();
        assert!(
            timeout < Duration::from_secs(2) && timeout > Duration::from_millis(1900),
            "{timeout:?}"
        );
        assert_eq!(out.metadata().get(TENANT_HEADER).unwrap(), "acme");
    }

    #[test]
    fn missing_tenant_defaults_and_internal_headers_strip() {
        let mut md = MetadataMap::new();
        md.insert("x-smartdb-tenant", "evil".parse().unwrap());
        md.insert("authorization", "Bearer x".parse().unwrap());
        strip_internal(&mut md);
        assert!(md.get("x-smartdb-tenant").is_none());
        assert!(md.get("authorization").is_some());
        assert_eq!(CallContext::from_metadata(&md).tenant, DEFAULT_TENANT);
    }
}
