//! TLS from PEM files: a server presents a certificate (reloaded when its files change, so a
//! renewed certificate needs no restart) and may require client certificates (mutual TLS);
//! clients of other smartdb services trust a CA and may present a certificate of their own.
//!
//! tonic's own server TLS loads its certificate once; the reload needs our own acceptor (a
//! rustls certificate resolver that looks at the files' modification times), hence this module.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::cork::Corked;

/// How often the certificate files are looked at for changes (on handshakes).
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings of a service, as a server and as a client of the others.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Certificate chain (PEM) this server presents; with `--tls-key` it accepts TLS only.
    /// Reloaded when the files change.
    #[arg(long, env = "SMARTDB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "SMARTDB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) whose client certificates this server requires (mutual TLS).
    #[arg(long, env = "SMARTDB_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// CA certificates (PEM) trusted when calling other smartdb services; setting it makes
    /// those calls use TLS.
    #[arg(long, env = "SMARTDB_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Certificate (PEM) presented to other smartdb services (mutual TLS).
    #[arg(long, env = "SMARTDB_TLS_CLIENT_CERT", requires_all = ["tls_client_key", "tls_ca"])]
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-client-cert`.
    #[arg(long, env = "SMARTDB_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read the {what} {}: {e}", path.display()))
}

fn certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{} ({what}): not PEM certificates: {e}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} ({what}) holds no certificate",
        path.display()
    );
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a certificate chain and its key as rustls serves them.
fn certified_key(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = certificates(cert, "TLS certificate")?;
    let pem = read(key, "TLS key")?;
    let key_der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| anyhow::anyhow!("{} (TLS key): not a PEM private key: {e}", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| anyhow::anyhow!("{} (TLS key): {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| anyhow::anyhow!("{} does not match {}: {e}", key.display(), cert.display()))?;
    Ok(Arc::new(certified))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Serves the certificate in two files and loads them again when either changes; a change
/// that does not load (e.g. the key written after the certificate) keeps the last good one.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Option<SystemTime>, Option<SystemTime>, Arc<CertifiedKey>)>,
    checked: Mutex<Instant>,
}

impl ReloadingCert {
    /// Loads the certificate now (failing if it does not load).
    pub fn new(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let loaded = certified_key(cert, key)?;
        Ok(Self {
            current: RwLock::new((modified(cert), modified(key), loaded)),
            cert: cert.to_owned(),
            key: key.to_owned(),
            checked: Mutex::new(Instant::now()),
        })
    }

    fn reload_if_changed(&self) {
        {
            let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
            if checked.elapsed() < RELOAD_CHECK {
                return;
            }
            *checked = Instant::now();
        }
        let stamps = (modified(&self.cert), modified(&self.key));
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if (current.0, current.1) == stamps {
                return;
            }
        }
        match certified_key(&self.cert, &self.key) {
            Ok(loaded) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                    (stamps.0, stamps.1, loaded);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate changed but does not load; keeping the previous one")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.reload_if_changed();
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .2
                .clone(),
        )
    }
}

impl TlsArgs {
    /// The server side, if this server has a certificate: an acceptor for gRPC (HTTP/2).
    pub fn acceptor(&self) -> anyhow::Result<Option<TlsAcceptor>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.tls_client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certificates(ca, "client CA")? {
                    roots.add(c)?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(ReloadingCert::new(cert, key)?));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(TlsAcceptor::from(Arc::new(config))))
    }

    /// The client side, if calls to other services use TLS.
    pub fn client(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(ca, "TLS CA")?));
        if let (Some(cert), Some(key)) = (&self.tls_client_cert, &self.tls_client_key) {
            // Checked here so a bad pair fails at start, not at the first call.
            certified_key(cert, key)?;
            config = config.identity(tonic::transport::Identity::from_pem(
                read(cert, "TLS client certificate")?,
                read(key, "TLS client key")?,
            ));
        }
        Ok(Some(config))
    }
}

/// Accepted connections of `listener` after their TLS handshakes, which run concurrently so a
/// slow or broken client holds up no one; failed handshakes are dropped (and logged at debug).
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<Corked<TcpStream>>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Without it, Nagle + delayed ACK add ~40 ms to small responses.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(Corked::new(tcp)))
                    .await
                {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
