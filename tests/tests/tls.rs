//! TLS at the gateway (with a certificate reloaded when its files change) and mutual TLS on an
//! internal hop, with certificates made by `openssl` in the test.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Cluster, ExtraService, eventually};
use smartdb_proto::v1 as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA: (certificate, key).
fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    (dir.join(cert), dir.join(key))
}

/// A certificate for 127.0.0.1 and localhost signed by `ca`, for `usage` (serverAuth or
/// clientAuth): (certificate, key).
fn make_cert(dir: &Path, ca: &(PathBuf, PathBuf), name: &str, usage: &str) -> (PathBuf, PathBuf) {
    let (cert, key, csr, ext) = (
        format!("{name}.pem"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca.0.to_str().unwrap(),
            "-CAkey",
            ca.1.to_str().unwrap(),
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
    (dir.join(cert), dir.join(key))
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` if given.
async fn tls_channel(
    addr: &str,
    ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
}

/// Whether a health check over `channel` answers SERVING.
async fn serving(channel: Result<Channel, tonic::transport::Error>) -> bool {
    let Ok(channel) = channel else {
        return false;
    };
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    request.set_timeout(Duration::from_secs(2));
    matches!(
        HealthClient::new(channel).check(request).await,
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
    )
}

/// Replaces a file as a renewal tool would: write aside, then rename over it.
fn replace(from: &Path, to: &Path) {
    let aside = to.with_extension("new");
    std::fs::copy(from, &aside).unwrap();
    std::fs::rename(&aside, to).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_serves_tls_and_reloads_its_certificate() {
    let cluster = Cluster::start().await;
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let ca = make_ca(dir, "ca");
    let other_ca = make_ca(dir, "other-ca");
    let first = make_cert(dir, &ca, "first", "serverAuth");
    let renewed = make_cert(dir, &other_ca, "renewed", "serverAuth");
    let (cert, key) = (dir.join("gateway.pem"), dir.join("gateway.key"));
    std::fs::copy(&first.0, &cert).unwrap();
    std::fs::copy(&first.1, &key).unwrap();

    let store = cluster
        .data_dir
        .path()
        .join("gateway")
        .display()
        .to_string();
    let ingest = cluster.service("ingest-svc").grpc;
    let search = cluster.service("search-svc").grpc;
    let embed = cluster.service("embed-svc").grpc;
    let gateway = ExtraService::spawn(
        &[
            "--ingest-addr",
            &ingest,
            "--search-addr",
            &search,
            "--embed-addr",
            &embed,
            "--data-dir",
            &store,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[("SMARTDB_ADMIN_KEY", &cluster.admin_key)],
    );
    let addr = gateway.addr.clone();
    eventually(Duration::from_secs(60), "the TLS gateway answers", || {
        let (addr, ca) = (addr.clone(), ca.0.clone());
        async move {
            serving(tls_channel(&addr, &ca, None).await)
                .await
                .then_some(())
        }
    })
    .await;

    // A client trusting the CA works end to end (with its API key); others do not connect.
    common::create_kb(&cluster, "notes").await;
    let channel = tls_channel(&addr, &ca.0, None).await.unwrap();
    let listed = pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(
        smartdb_kit::bearer::authed(channel, Some(&cluster.admin_key)).unwrap(),
    )
    .list_knowledge_bases(pb::ListKnowledgeBasesRequest::default())
    .await
    .unwrap()
    .into_inner();
    assert_eq!(listed.knowledge_bases[0].name, "notes");
    assert!(
        !serving(tls_channel(&addr, &other_ca.0, None).await).await,
        "an untrusted certificate was accepted"
    );
    assert!(
        common::health(&addr, "").await.is_none(),
        "plaintext was answered"
    );

    // Renewal: new files in place; new connections get the new certificate, no restart.
    replace(&renewed.1, &key);
    replace(&renewed.0, &cert);
    eventually(
        Duration::from_secs(10),
        "the renewed certificate is served",
        || {
            let (addr, ca) = (addr.clone(), other_ca.0.clone());
            async move {
                serving(tls_channel(&addr, &ca, None).await)
                    .await
                    .then_some(())
            }
        },
    )
    .await;
    assert!(
        !serving(tls_channel(&addr, &ca.0, None).await).await,
        "the old certificate is still served"
    );

    // A broken renewal (a key that does not match) keeps the last good certificate.
    replace(&first.1, &key);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(serving(tls_channel(&addr, &other_ca.0, None).await).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_hops_can_use_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let ca = make_ca(dir, "ca");
    let server = make_cert(dir, &ca, "embed", "serverAuth");
    let client = make_cert(dir, &ca, "gateway", "clientAuth");
    let stranger_ca = make_ca(dir, "stranger-ca");
    let stranger = make_cert(dir, &stranger_ca, "stranger", "clientAuth");
    let path = |p: &PathBuf| p.to_str().unwrap().to_owned();

    // embed-svc serving mutual TLS: it wants a client certificate from the CA.
    let embed = ExtraService::serve(
        "embed",
        &[
            "--tls-cert",
            &path(&server.0),
            "--tls-key",
            &path(&server.1),
            "--tls-client-ca",
            &path(&ca.0),
        ],
        &[],
    );
    let addr = embed.addr.clone();
    eventually(
        Duration::from_secs(120),
        "embed-svc answers over mutual TLS",
        || {
            let (addr, ca, client) = (addr.clone(), ca.0.clone(), client.clone());
            async move {
                serving(tls_channel(&addr, &ca, Some(&client)).await)
                    .await
                    .then_some(())
            }
        },
    )
    .await;
    let embedded = pb::embed_service_client::EmbedServiceClient::new(
        tls_channel(&addr, &ca.0, Some(&client)).await.unwrap(),
    )
    .embed(pb::EmbedRequest {
        texts: vec!["tides follow the moon".into()],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(embedded.embeddings[0].values.len(), 384);
    assert!(
        !serving(tls_channel(&addr, &ca.0, None).await).await,
        "no client certificate, yet answered"
    );
    assert!(
        !serving(tls_channel(&addr, &ca.0, Some(&stranger)).await).await,
        "a certificate from another CA was accepted"
    );

    // The gateway's hop to it, through kit's client stack: with the client certificate the
    // replica is SERVING in the cluster status, without it unreachable.
    let admin_key = "sdb_tls-test-admin-key-0123456789";
    let status = |with_cert: bool| {
        let mut args = vec![
            "--ingest-addr".to_owned(),
            "127.0.0.1:1".into(),
            "--search-addr".into(),
            "127.0.0.1:1".into(),
            "--embed-addr".into(),
            addr.clone(),
            "--tls-ca".into(),
            path(&ca.0),
        ];
        if with_cert {
            args.extend([
                "--tls-client-cert".into(),
                path(&client.0),
                "--tls-client-key".into(),
                path(&client.1),
            ]);
        }
        async move {
            let data = tempfile::tempdir().unwrap();
            args.extend(["--data-dir".into(), data.path().display().to_string()]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let gateway = ExtraService::spawn(&args, &[("SMARTDB_ADMIN_KEY", admin_key)]);
            let gw = gateway.addr.clone();
            eventually(Duration::from_secs(30), "the gateway answers", || {
                let gw = gw.clone();
                async move {
                    (common::health(&gw, "").await == Some(ServingStatus::Serving)).then_some(())
                }
            })
            .await;
            let status = pb::admin_service_client::AdminServiceClient::new(
                common::gateway_channel(&gw, Some(admin_key)).await,
            )
            .get_cluster_status(pb::GetClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
            let embed = status
                .services
                .into_iter()
                .find(|s| s.name == "embed-svc")
                .unwrap();
            (embed.health, embed.detail)
        }
    };
    let (health, detail) = status(true).await;
    assert_eq!(health, pb::ServiceHealth::Serving as i32, "{detail}");
    let (health, detail) = status(false).await;
    assert_eq!(health, pb::ServiceHealth::Unreachable as i32, "{detail}");
}
