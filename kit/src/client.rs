//! Channels to other smartdb services, built in one place so that every client gets the same
//! connection behaviour (lazy connect, keep-alive, connect timeout). Later layers (retry,
//! circuit breaker, load balancing) are added here, not at call sites.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Options for a channel to one downstream service.
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// A lazily connecting channel to `addr` (`host:port` or a full `http://` URI). It connects on
/// first use and reconnects by itself, so a service can start before its dependencies.
pub fn channel(addr: &str, options: &ChannelOptions) -> anyhow::Result<Channel> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| anyhow::anyhow!("invalid service address {addr:?}: {e}"))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// Awaits a call to another service, giving up with DEADLINE_EXCEEDED once `timeout` passes.
/// tonic sends the deadline to the server (`grpc-timeout`) but does not enforce it itself, so
/// without this a caller with no deadline of its own (a background worker) would wait forever
/// on a server that stopped answering.
pub async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bare_host_port_and_uri_are_accepted() {
        assert!(channel("127.0.0.1:1", &ChannelOptions::default()).is_ok());
        assert!(channel("http://127.0.0.1:1", &ChannelOptions::default()).is_ok());
        assert!(channel("not a uri", &ChannelOptions::default()).is_err());
    }

    #[tokio::test]
    async fn calls_give_up_at_their_deadline() {
        let never = std::future::pending::<Result<(), tonic::Status>>();
        let started = std::time::Instant::now();
        let err = within(Duration::from_millis(50), never).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            within(Duration::from_secs(1), async { Ok(7) })
                .await
                .unwrap(),
            7
        );
    }
}
