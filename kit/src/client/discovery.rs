//! Where a downstream's replicas are: a list of `host:port` (comma-separated), where each host
//! is an IP address or a DNS name; names are resolved again every few seconds, so replicas
//! behind a Kubernetes headless Service come and go without a restart. Endpoints that stay keep
//! their connection and their breaker.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::balance::{Balancer, Endpoint};

/// A configured downstream address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    entries: Vec<(String, u16)>,
}

/// One resolved replica address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resolved {
    /// IP and port to connect to.
    pub addr: SocketAddr,
    /// The DNS name it came from, if it was not an IP address.
    pub host: Option<String>,
}

impl Target {
    /// Parses `host:port[,host:port…]` (an `http://` prefix is accepted and ignored).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut entries = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bare = part
                .strip_prefix("http://")
                .unwrap_or(part)
                .trim_end_matches('/');
            let (host, port) = bare
                .rsplit_once(':')
                .ok_or_else(|| anyhow::anyhow!("address {part:?} has no port (host:port)"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port: u16 = port
                .parse()
                .map_err(|_| anyhow::anyhow!("address {part:?} has an invalid port"))?;
            anyhow::ensure!(!host.is_empty(), "address {part:?} has no host");
            entries.push((host.to_owned(), port));
        }
        anyhow::ensure!(!entries.is_empty(), "empty address {text:?}");
        Ok(Self { entries })
    }

    /// True if every host is an IP address (nothing to re-resolve).
    pub fn is_static(&self) -> bool {
        self.entries
            .iter()
            .all(|(host, _)| host.parse::<IpAddr>().is_ok())
    }

    /// Resolves every entry now; names that do not resolve are left out (and logged).
    pub async fn resolve(&self) -> Vec<Resolved> {
        let mut out = Vec::new();
        for (host, port) in &self.entries {
            if let Ok(ip) = host.parse::<IpAddr>() {
                out.push(Resolved {
                    addr: SocketAddr::new(ip, *port),
                    host: None,
                });
                continue;
            }
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(addrs) => out.extend(addrs.map(|addr| Resolved {
                    addr,
                    host: Some(host.clone()),
                })),
                Err(err) => {
                    tracing::warn!(%host, error = %err, "cannot resolve a downstream address")
                }
            }
        }
        out.sort_by_key(|r| r.addr);
        out.dedup_by_key(|r| r.addr);
        out
    }
}

/// Keeps a balancer's endpoints in step with DNS; stops when dropped.
pub struct Refresh {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Refresh {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

type Factory = dyn Fn(&Resolved) -> anyhow::Result<Arc<Endpoint>> + Send + Sync;

impl Refresh {
    /// Resolves `target` once now, fills `balancer`, and (for DNS names) resolves again every
    /// `every`, building endpoints for new addresses with `factory`.
    pub async fn start(
        target: Target,
        balancer: Balancer,
        every: Duration,
        factory: impl Fn(&Resolved) -> anyhow::Result<Arc<Endpoint>> + Send + Sync + 'static,
    ) -> Self {
        let factory: Arc<Factory> = Arc::new(factory);
        let mut current: HashMap<Resolved, Arc<Endpoint>> = HashMap::new();
        update(&target, &balancer, &factory, &mut current).await;
        if target.is_static() {
            return Self { task: None };
        }
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every.max(Duration::from_millis(100))).await;
                update(&target, &balancer, &factory, &mut current).await;
            }
        });
        Self { task: Some(task) }
    }
}

async fn update(
    target: &Target,
    balancer: &Balancer,
    factory: &Arc<Factory>,
    current: &mut HashMap<Resolved, Arc<Endpoint>>,
) {
    let resolved = target.resolve().await;
    if resolved.is_empty() && !current.is_empty() {
        // A failed lookup is not proof that every replica is gone: keep what we have.
        return;
    }
    let mut next = HashMap::new();
    for addr in resolved {
        let endpoint = match current.remove(&addr) {
            Some(existing) => existing,
            None => match factory(&addr) {
                Ok(endpoint) => {
                    tracing::info!(endpoint = %addr.addr, "downstream endpoint added");
                    endpoint
                }
                Err(err) => {
                    tracing::warn!(endpoint = %addr.addr, error = %err, "cannot add a downstream endpoint");
                    continue;
                }
            },
        };
        next.insert(addr, endpoint);
    }
    for gone in current.keys() {
        tracing::info!(endpoint = %gone.addr, "downstream endpoint removed");
    }
    let mut endpoints: Vec<_> = next.values().cloned().collect();
    endpoints.sort_by(|a, b| a.addr.cmp(&b.addr));
    balancer.set_endpoints(endpoints);
    *current = next;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_lists_of_host_and_port() {
        let t = Target::parse("10.0.0.1:50054, http://10.0.0.2:50054/").unwrap();
        assert!(t.is_static());
        assert_eq!(t.entries.len(), 2);
        let t = Target::parse("embed-svc.smartdb.svc.cluster.local:50054").unwrap();
        assert!(!t.is_static());
        assert!(Target::parse("[::1]:80").unwrap().is_static());
        for bad in ["", "no-port", "host:port", ":80", ","] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn names_resolve_to_every_address_and_lists_are_deduplicated() {
        let resolved = Target::parse("localhost:7,127.0.0.1:7,127.0.0.1:8")
            .unwrap()
            .resolve()
            .await;
        let addrs: Vec<String> = resolved.iter().map(|r| r.addr.to_string()).collect();
        assert!(addrs.contains(&"127.0.0.1:7".to_owned()), "{addrs:?}");
        assert!(addrs.contains(&"127.0.0.1:8".to_owned()), "{addrs:?}");
        assert_eq!(
            addrs.iter().filter(|a| *a == "127.0.0.1:7").count(),
            1,
            "{addrs:?}"
        );
        assert!(
            Target::parse("does-not-exist.invalid:1")
                .unwrap()
                .resolve()
                .await
                .is_empty()
        );
    }
}
