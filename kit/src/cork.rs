//! Write coalescing for gRPC connections: the frames of one call leave in one write.
//!
//! hyper hands h2 a call's frames one by one (request headers, then the message; response
//! headers + message, then trailers), and the connection task flushes after each, because
//! the task producing the next frame has not run yet. Every write wakes the peer, and on a VM
//! where a wake-up across CPUs costs ~20 µs that was much of the gateway's hop: a cached search
//! cost the gateway 4 writes and search-svc 4. `Corked` holds written bytes and, on the first
//! flush, yields once so the tasks that are ready can add their frames, then writes everything
//! at once: 2 writes in each. No crate does this for tokio streams (tokio's `BufWriter` writes
//! whenever it is flushed), hence our own.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write goes out without waiting for a flush.
const HOLD_LIMIT: usize = 64 * 1024;

/// Whether connections coalesce writes (`SMARTDB_COALESCE_WRITES=off` turns it off, to compare).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        !matches!(
            std::env::var("SMARTDB_COALESCE_WRITES").as_deref(),
            Ok("off" | "false" | "0")
        )
    })
}

/// A stream whose writes are held until a flush, and whose first flush yields once (or, with
/// coalescing off, the stream itself).
pub struct Corked<T> {
    inner: T,
    /// Coalescing is on.
    hold: bool,
    held: Vec<u8>,
    /// Bytes of `held` already written to `inner`.
    written: usize,
    /// The pending flush already yielded once.
    yielded: bool,
    /// The yield in progress.
    yielding: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Corked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Corked")
            .field("inner", &self.inner)
            .field("hold", &self.hold)
            .field("held", &(self.held.len() - self.written))
            .finish()
    }
}

impl<T> Corked<T> {
    /// Wraps a stream, coalescing unless `SMARTDB_COALESCE_WRITES=off`.
    pub fn new(inner: T) -> Self {
        Self::with(inner, enabled())
    }

    /// Wraps a stream, coalescing if `hold`.
    pub fn with(inner: T, hold: bool) -> Self {
        Self {
            inner,
            hold,
            held: Vec::new(),
            written: 0,
            yielded: false,
            yielding: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> Corked<T> {
    /// Writes out everything held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.held.clear();
        // A burst (a large upload) must not leave its buffer behind on an idle connection.
        self.held.shrink_to(HOLD_LIMIT);
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Corked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.hold {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.hold {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        if this.held.len() >= HOLD_LIMIT {
            ready!(this.poll_drain(cx))?;
        }
        let mut taken = 0;
        for buf in bufs {
            this.held.extend_from_slice(buf);
            taken += buf.len();
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        self.hold || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() && !this.yielded {
            // Let the tasks that are ready add their frames first: tokio's `yield_now` resumes
            // us after the tasks this worker has ready.
            let yielding = this
                .yielding
                .get_or_insert_with(|| Box::pin(tokio::task::yield_now()));
            ready!(yielding.as_mut().poll(cx));
            this.yielding = None;
            this.yielded = true;
        }
        ready!(this.poll_drain(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Corked<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Connects over TCP as tonic's own connector does (no Nagle), with writes coalesced.
#[derive(Clone, Debug)]
pub struct Connector(HttpConnector);

impl Connector {
    /// A connector giving up on a connection attempt after `connect_timeout`.
    pub fn new(connect_timeout: std::time::Duration) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        Self(http)
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<Corked<tokio::net::TcpStream>>;
    type Error = <HttpConnector as tower::Service<http::Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            Ok(TokioIo::new(Corked::new(tcp)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_leave_together_at_the_flush_and_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut corked = Corked::with(a, true);
        corked.write_all(b"headers|").await.unwrap();
        corked.write_all(b"message|").await.unwrap();
        // Nothing has reached the peer before the flush.
        let mut probe = [0u8; 1];
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), b.read(&mut probe))
                .await
                .is_err()
        );
        corked.write_all(b"trailers").await.unwrap();
        corked.flush().await.unwrap();
        let mut got = vec![0u8; 24];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"headers|message|trailers");
    }

    #[tokio::test]
    async fn a_large_write_goes_out_without_a_flush_and_shutdown_drains() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut corked = Corked::with(a, true);
        let big = vec![7u8; HOLD_LIMIT + 10];
        corked.write_all(&big).await.unwrap();
        // The next write finds the hold full and sends it on.
        corked.write_all(b"tail").await.unwrap();
        let mut got = vec![0u8; big.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
        corked.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"tail");
    }
}
