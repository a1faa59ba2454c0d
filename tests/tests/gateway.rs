//! The gateway as the only door: API keys, tenants and roles, isolation between tenants, rate
//! limits with temporary blocks, and the audit log, against a real cluster.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{Cluster, Gw, bearer_header, grpcurl};
use smartdb_proto::v1 as pb;
use tonic::Code;
use tonic::metadata::MetadataValue;

/// Where the secret starts in a key `sdb_<16 hex digits>_<secret>` (the secret itself may
/// hold `_`).
const SECRET_AT: usize = 4 + 16 + 1;

/// Public services whose every RPC the matrices cover.
const PUBLIC: [&str; 4] = [
    "smartdb.v1.KnowledgeBaseService",
    "smartdb.v1.DocumentService",
    "smartdb.v1.SearchService",
    "smartdb.v1.AdminService",
];

/// Every public RPC as the gateway lists it through reflection (without a key), e.g.
/// `DocumentService/GetDocument`.
fn public_rpcs(gateway: &str) -> Vec<String> {
    let mut rpcs = Vec::new();
    for service in PUBLIC {
        let listed = grpcurl(&["-plaintext", gateway, "list", service]);
        for line in listed.lines().filter(|l| !l.trim().is_empty()) {
            let method = line.trim().rsplit('.').next().unwrap();
            let short = service.rsplit('.').next().unwrap();
            rpcs.push(format!("{short}/{method}"));
        }
    }
    assert!(rpcs.len() >= 18, "reflection listed {rpcs:?}");
    rpcs
}

/// A channel to the gateway from the local address `from` (another loopback address is
/// another client address to the gateway).
async fn channel_from(cluster: &Cluster, from: &str, key: Option<&str>) -> Gw {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.gateway))
        .unwrap()
        .local_address(Some(from.parse::<IpAddr>().unwrap()))
        .connect()
        .await
        .unwrap();
    smartdb_kit::bearer::authed(channel, key).unwrap()
}

/// What one call aims at.
#[derive(Clone, Default)]
struct Target {
    /// Knowledge base named in the request.
    kb: String,
    /// Document id named in the request.
    doc: String,
    /// Name for things the call creates.
    fresh: String,
    /// Key id for RevokeApiKey.
    key_id: String,
    /// Extra metadata sent with the call.
    metadata: Vec<(&'static str, String)>,
}

fn with_metadata<T>(message: T, target: &Target) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for (key, value) in &target.metadata {
        request
            .metadata_mut()
            .insert(*key, MetadataValue::try_from(value.as_str()).unwrap());
    }
    request
}

/// Calls `rpc` (e.g. `DocumentService/GetDocument`) over `channel` with a request aimed at
/// `target`; on success returns a text of what came back (ids and names), for leak checks.
async fn call(channel: Gw, rpc: &str, t: &Target) -> Result<String, tonic::Status> {
    let mut kbs =
        pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(channel.clone());
    let mut docs = pb::document_service_client::DocumentServiceClient::new(channel.clone());
    let mut search = pb::search_service_client::SearchServiceClient::new(channel.clone());
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
    macro_rules! r {
        ($m:expr) => {
            with_metadata($m, t)
        };
    }
    let text = |v: &dyn std::fmt::Debug| format!("{v:?}");
    Ok(match rpc {
        "KnowledgeBaseService/CreateKnowledgeBase" => text(
            &kbs.create_knowledge_base(r!(pb::CreateKnowledgeBaseRequest {
                name: t.fresh.clone(),
                ..Default::default()
            }))
            .await?
            .into_inner(),
        ),
        "KnowledgeBaseService/GetKnowledgeBase" => text(
            &kbs.get_knowledge_base(r!(pb::GetKnowledgeBaseRequest { name: t.kb.clone() }))
                .await?
                .into_inner(),
        ),
        "KnowledgeBaseService/ListKnowledgeBases" => text(
            &kbs.list_knowledge_bases(r!(pb::ListKnowledgeBasesRequest::default()))
                .await?
                .into_inner(),
        ),
        "KnowledgeBaseService/DeleteKnowledgeBase" => text(
            &kbs.delete_knowledge_base(r!(pb::DeleteKnowledgeBaseRequest { name: t.kb.clone() }))
                .await?
                .into_inner(),
        ),
        "KnowledgeBaseService/ReindexKnowledgeBase" => text(
            &kbs.reindex_knowledge_base(r!(pb::ReindexKnowledgeBaseRequest { name: t.kb.clone() }))
                .await?
                .into_inner(),
        ),
        "DocumentService/UploadDocument" => {
            let messages = vec![
                pb::UploadDocumentRequest {
                    payload: Some(pb::upload_document_request::Payload::Header(
                        pb::DocumentHeader {
                            knowledge_base: t.kb.clone(),
                            source_name: format!("{}.txt", t.fresh),
                            ..Default::default()
                        },
                    )),
                },
                pb::UploadDocumentRequest {
                    payload: Some(pb::upload_document_request::Payload::Data(
                        format!("An uploaded note called {}.", t.fresh).into_bytes(),
                    )),
                },
            ];
            text(
                &docs
                    .upload_document(r!(tokio_stream::iter(messages)))
                    .await?
                    .into_inner(),
            )
        }
        "DocumentService/IngestText" => text(
            &docs
                .ingest_text(r!(pb::IngestTextRequest {
                    knowledge_base: t.kb.clone(),
                    text: format!("A note called {}.", t.fresh),
                    ..Default::default()
                }))
                .await?
                .into_inner(),
        ),
        "DocumentService/GetDocument" => text(
            &docs
                .get_document(r!(pb::GetDocumentRequest {
                    knowledge_base: t.kb.clone(),
                    document_id: t.doc.clone(),
                }))
                .await?
                .into_inner(),
        ),
        "DocumentService/ListDocuments" => text(
            &docs
                .list_documents(r!(pb::ListDocumentsRequest {
                    knowledge_base: t.kb.clone(),
                    ..Default::default()
                }))
                .await?
                .into_inner(),
        ),
        "DocumentService/DeleteDocument" => text(
            &docs
                .delete_document(r!(pb::DeleteDocumentRequest {
                    knowledge_base: t.kb.clone(),
                    document_id: t.doc.clone(),
                }))
                .await?
                .into_inner(),
        ),
        "DocumentService/RetryDocument" => text(
            &docs
                .retry_document(r!(pb::RetryDocumentRequest {
                    knowledge_base: t.kb.clone(),
                    document_id: t.doc.clone(),
                }))
                .await?
                .into_inner(),
        ),
        "SearchService/Search" => text(
            &search
                .search(r!(pb::SearchRequest {
                    knowledge_base: t.kb.clone(),
                    query: "lighthouse keeper secret".into(),
                    ..Default::default()
                }))
                .await?
                .into_inner(),
        ),
        "AdminService/GetClusterStatus" => text(
            &admin
                .get_cluster_status(r!(pb::GetClusterStatusRequest {}))
                .await?
                .into_inner(),
        ),
        "AdminService/GetMetrics" => text(
            &admin
                .get_metrics(r!(pb::GetMetricsRequest::default()))
                .await?
                .into_inner(),
        ),
        "AdminService/CreateTenant" => text(
            &admin
                .create_tenant(r!(pb::CreateTenantRequest {
                    name: t.fresh.clone(),
                }))
                .await?
                .into_inner(),
        ),
        "AdminService/ListTenants" => text(
            &admin
                .list_tenants(r!(pb::ListTenantsRequest::default()))
                .await?
                .into_inner(),
        ),
        "AdminService/CreateApiKey" => {
            let created = admin
                .create_api_key(r!(pb::CreateApiKeyRequest {
                    tenant: "globex".into(),
                    role: pb::Role::Reader as i32,
                    label: "from the matrix".into(),
                    ttl_seconds: 0,
                }))
                .await?
                .into_inner();
            // The key itself is the caller's business; what was stored is the evidence.
            text(&created.api_key)
        }
        "AdminService/ListApiKeys" => text(
            &admin
                .list_api_keys(r!(pb::ListApiKeysRequest::default()))
                .await?
                .into_inner(),
        ),
        "AdminService/RevokeApiKey" => text(
            &admin
                .revoke_api_key(r!(pb::RevokeApiKeyRequest {
                    id: t.key_id.clone(),
                }))
                .await?
                .into_inner(),
        ),
        "AdminService/ListAuditEvents" => text(
            &admin
                .list_audit_events(r!(pb::ListAuditEventsRequest::default()))
                .await?
                .into_inner(),
        ),
        other => panic!("the matrix has no call for {other}: add one"),
    })
}

/// Creates a tenant (if new) and a key for it; returns (key, key id).
async fn make_key(cluster: &Cluster, tenant: &str, role: pb::Role, ttl: u64) -> (String, String) {
    let mut admin = cluster.admin().await;
    match admin
        .create_tenant(pb::CreateTenantRequest {
            name: tenant.into(),
        })
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {}
        Err(s) => panic!("create tenant {tenant}: {s:?}"),
    }
    let created = admin
        .create_api_key(pb::CreateApiKeyRequest {
            tenant: tenant.into(),
            role: role as i32,
            label: format!("{tenant} {}", role.as_str_name()),
            ttl_seconds: ttl,
        })
        .await
        .unwrap()
        .into_inner();
    let id = created.api_key.unwrap().id;
    assert!(
        created.key.starts_with(&format!("sdb_{id}_")),
        "{}",
        created.key
    );
    (created.key, id)
}

async fn as_key(cluster: &Cluster, key: &str) -> Gw {
    common::gateway_channel(&cluster.gateway, Some(key)).await
}

/// Ingests `text` into `kb` (created if missing) as the holder of `key`; returns the document id.
async fn seed(cluster: &Cluster, key: &str, kb: &str, text: &str) -> (String, String) {
    let channel = as_key(cluster, key).await;
    let mut kbs =
        pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(channel.clone());
    let kb_id = match kbs
        .create_knowledge_base(pb::CreateKnowledgeBaseRequest {
            name: kb.into(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner().knowledge_base.unwrap().id,
        Err(s) if s.code() == Code::AlreadyExists => {
            kbs.get_knowledge_base(pb::GetKnowledgeBaseRequest { name: kb.into() })
                .await
                .unwrap()
                .into_inner()
                .knowledge_base
                .unwrap()
                .id
        }
        Err(s) => panic!("create {kb}: {s:?}"),
    };
    let doc = pb::document_service_client::DocumentServiceClient::new(channel)
        .ingest_text(pb::IngestTextRequest {
            knowledge_base: kb.into(),
            text: text.into(),
            wait: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(doc.status, pb::DocumentStatus::Indexed as i32, "{doc:?}");
    (kb_id, doc.id)
}

/// The weakest role each RPC needs, as the issue defines the roles.
fn needs(rpc: &str) -> pb::Role {
    let method = rpc.rsplit('/').next().unwrap();
    if rpc.starts_with("AdminService/") || method == "ReindexKnowledgeBase" {
        pb::Role::Admin
    } else if method.starts_with("Get") || method.starts_with("List") || method == "Search" {
        pb::Role::Reader
    } else {
        pb::Role::Writer
    }
}

/// Tenant A's keys of each role against tenant B's knowledge bases and documents, over every
/// public RPC: nothing of B's is read, changed or even confirmed to exist, and every refusal
/// has the expected code.
#[tokio::test(flavor = "multi_thread")]
async fn tenants_are_isolated_over_every_rpc_and_role() {
    let cluster = Cluster::start().await;
    let mut rpcs = public_rpcs(&cluster.gateway);
    // Deleting knowledge bases last, so that A's own "shared" is there for every other RPC.
    rpcs.sort_by_key(|rpc| rpc.ends_with("/DeleteKnowledgeBase"));

    // Tenant B ("globex"): a knowledge base only it has, and one whose name A uses too.
    let (writer_b, _) = make_key(&cluster, "globex", pb::Role::Writer, 0).await;
    let (b_only_id, b_only_doc) = seed(
        &cluster,
        &writer_b,
        "b-only",
        "The lighthouse keeper's secret is kept by globex.",
    )
    .await;
    let (b_shared_id, b_shared_doc) = seed(
        &cluster,
        &writer_b,
        "shared",
        "The lighthouse keeper's secret recipe is globex's.",
    )
    .await;
    // Tenant A ("acme").
    let (reader_a, _) = make_key(&cluster, "acme", pb::Role::Reader, 0).await;
    let (writer_a, _) = make_key(&cluster, "acme", pb::Role::Writer, 0).await;
    let (admin_a, _) = make_key(&cluster, "acme", pb::Role::Admin, 0).await;
    let (a_shared_id, _) = seed(
        &cluster,
        &writer_a,
        "shared",
        "The lighthouse keeper of acme keeps no secret.",
    )
    .await;
    assert_ne!(
        a_shared_id, b_shared_id,
        "same name, separate knowledge bases"
    );
    let b_secrets = [&b_only_id, &b_only_doc, &b_shared_id, &b_shared_doc];

    let roles = [
        (pb::Role::Reader, &reader_a),
        (pb::Role::Writer, &writer_a),
        (pb::Role::Admin, &admin_a),
    ];
    let mut matrix: BTreeMap<(String, &str, &str), Code> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let mut n = 0;
    for rpc in &rpcs {
        for (target_name, kb, doc) in [
            ("B's own name", "b-only", &b_only_doc),
            ("a shared name", "shared", &b_shared_doc),
        ] {
            for (role, key) in &roles {
                n += 1;
                // A throwaway globex key per RevokeApiKey call, so that admins revoking works.
                let key_id = if rpc == "AdminService/RevokeApiKey" {
                    make_key(&cluster, "globex", pb::Role::Reader, 0).await.1
                } else {
                    String::new()
                };
                let target = Target {
                    kb: kb.into(),
                    doc: doc.to_string(),
                    fresh: format!("made-by-a-{n}"),
                    key_id,
                    // Forged internal metadata is stripped by the gateway.
                    metadata: vec![("x-smartdb-tenant", "globex".into())],
                };
                let result = call(as_key(&cluster, key).await, rpc, &target).await;
                let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
                let method = rpc.rsplit('/').next().unwrap();
                let expected: &[Code] = if *role < needs(rpc) {
                    &[Code::PermissionDenied]
                } else if rpc.starts_with("AdminService/")
                    || method == "CreateKnowledgeBase"
                    || method == "ListKnowledgeBases"
                {
                    &[Code::Ok]
                } else if kb == "b-only" {
                    &[Code::NotFound]
                } else {
                    match method {
                        // A's own "shared": readable and writable by A, B's is untouched.
                        "GetKnowledgeBase"
                        | "ListDocuments"
                        | "Search"
                        | "IngestText"
                        | "UploadDocument"
                        | "ReindexKnowledgeBase" => &[Code::Ok],
                        // A's own "shared": the writer deletes it, so the admin finds it gone.
                        "DeleteKnowledgeBase" if *role == pb::Role::Writer => &[Code::Ok],
                        "DeleteKnowledgeBase" => &[Code::NotFound],
                        // B's document under A's knowledge base of the same name.
                        _ => &[Code::NotFound],
                    }
                };
                if !expected.contains(&code) {
                    unexpected.push(format!(
                        "{rpc} on {target_name} as {}: {result:?}, expected {expected:?}",
                        role.as_str_name()
                    ));
                }
                if let Err(status) = &result {
                    // Nothing of B's that the caller did not send itself.
                    for secret in [&b_only_id, &b_shared_id] {
                        assert!(!status.message().contains(secret.as_str()), "{status:?}");
                    }
                    if code == Code::NotFound {
                        // The same answer as for things that exist nowhere.
                        let control = Target {
                            kb: if kb == "b-only" {
                                "never-made".into()
                            } else {
                                kb.into()
                            },
                            doc: "0198f000-0000-7000-8000-000000000000".into(),
                            ..target.clone()
                        };
                        let other = call(as_key(&cluster, key).await, rpc, &control)
                            .await
                            .unwrap_err();
                        let plain = |m: &str| {
                            m.replace(doc.as_str(), "<doc>")
                                .replace(control.doc.as_str(), "<doc>")
                                .replace("\"b-only\"", "<kb>")
                                .replace("\"never-made\"", "<kb>")
                        };
                        assert_eq!(
                            (other.code(), plain(other.message())),
                            (code, plain(status.message())),
                            "{rpc}: B's things are told apart from missing ones"
                        );
                    }
                    if code == Code::PermissionDenied {
                        assert!(
                            !status.message().contains(kb),
                            "a refusal names no knowledge base: {status:?}"
                        );
                    }
                }
                if let (Ok(text), false) = (&result, rpc.starts_with("AdminService/")) {
                    for secret in b_secrets {
                        assert!(
                            !text.contains(secret.as_str()),
                            "{rpc} as {role:?} leaked {secret}: {text}"
                        );
                    }
                    assert!(!text.contains("globex"), "{rpc} leaked B's text: {text}");
                }
                matrix.insert((rpc.clone(), target_name, role.as_str_name()), code);
            }
        }
    }
    let successes = matrix.values().filter(|c| **c == Code::Ok).count();
    println!(
        "isolation matrix: {} calls ({} RPCs x 2 targets x 3 roles), {successes} allowed, {} refused, {} unexpected",
        matrix.len(),
        rpcs.len(),
        matrix.len() - successes,
        unexpected.len()
    );
    assert!(
        unexpected.is_empty(),
        "unexpected outcomes:\n{}",
        unexpected.join("\n")
    );

    // An admin key may act for tenant B on purpose; other roles may not.
    let act_as_b = Target {
        kb: "b-only".into(),
        doc: b_only_doc.clone(),
        metadata: vec![("smartdb-tenant", "globex".into())],
        ..Default::default()
    };
    let got = call(
        as_key(&cluster, &admin_a).await,
        "DocumentService/GetDocument",
        &act_as_b,
    )
    .await
    .expect("admin acting for globex");
    assert!(got.contains(&b_only_doc));
    for key in [&reader_a, &writer_a] {
        let refused = call(
            as_key(&cluster, key).await,
            "DocumentService/GetDocument",
            &act_as_b,
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }
    let no_such = Target {
        metadata: vec![("smartdb-tenant", "initech".into())],
        ..act_as_b.clone()
    };
    let refused = call(
        as_key(&cluster, &admin_a).await,
        "DocumentService/GetDocument",
        &no_such,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // B's data is exactly as it was: both knowledge bases, one document each, still found.
    let b = as_key(&cluster, &writer_b).await;
    for (kb, kb_id, doc) in [
        ("b-only", &b_only_id, &b_only_doc),
        ("shared", &b_shared_id, &b_shared_doc),
    ] {
        let got = pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(b.clone())
            .get_knowledge_base(pb::GetKnowledgeBaseRequest { name: kb.into() })
            .await
            .unwrap()
            .into_inner()
            .knowledge_base
            .unwrap();
        assert_eq!(&got.id, kb_id);
        let listed = pb::document_service_client::DocumentServiceClient::new(b.clone())
            .list_documents(pb::ListDocumentsRequest {
                knowledge_base: kb.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .documents;
        let ids: Vec<_> = listed.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, [doc.as_str()], "{kb}");
        let hits = call(
            b.clone(),
            "SearchService/Search",
            &Target {
                kb: kb.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(hits.contains(doc.as_str()), "{kb}: {hits}");
    }
}

/// No key, a malformed key, a wrong secret, a revoked key and an expired key are all
/// UNAUTHENTICATED on every public RPC; health and reflection answer without a key.
#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_needs_a_valid_key_and_probes_need_none() {
    let cluster =
        Cluster::start_with_env(&[("SMARTDB_GATEWAY_BLOCK_AFTER_AUTH_FAILURES", "100000")]).await;
    let rpcs = public_rpcs(&cluster.gateway);
    // Probes and reflection, as a kubelet and a newcomer would call them: no key.
    assert_eq!(
        common::health(&cluster.gateway, "").await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );
    let health = grpcurl(&[
        "-plaintext",
        &cluster.gateway,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(health.contains("SERVING"), "{health}");
    let described = grpcurl(&[
        "-plaintext",
        &cluster.gateway,
        "describe",
        "smartdb.v1.AdminService",
    ]);
    assert!(described.contains("CreateApiKey"), "{described}");

    let (reader, _) = make_key(&cluster, "acme", pb::Role::Reader, 0).await;
    let (revoked, revoked_id) = make_key(&cluster, "acme", pb::Role::Writer, 0).await;
    let (expiring, _) = make_key(&cluster, "acme", pb::Role::Writer, 1).await;
    let target = Target {
        kb: "notes".into(),
        doc: "0".repeat(32),
        fresh: "x".into(),
        key_id: "0123456789abcdef".into(),
        ..Default::default()
    };
    // The revoked key works until it is revoked, then stops within the cache's lifetime.
    let listed = call(
        as_key(&cluster, &revoked).await,
        "KnowledgeBaseService/ListKnowledgeBases",
        &target,
    )
    .await;
    assert!(listed.is_ok(), "{listed:?}");
    cluster
        .admin()
        .await
        .revoke_api_key(pb::RevokeApiKeyRequest {
            id: revoked_id.clone(),
        })
        .await
        .unwrap();
    let started = Instant::now();
    let took = common::eventually(Duration::from_secs(10), "revocation takes effect", || {
        let channel = as_key(&cluster, &revoked);
        async move {
            let r = call(
                channel.await,
                "KnowledgeBaseService/ListKnowledgeBases",
                &Target::default(),
            )
            .await;
            matches!(r, Err(s) if s.code() == Code::Unauthenticated).then(|| started.elapsed())
        }
    })
    .await;
    println!("a revoked key stopped working after {took:?}");
    // The expiring key lives one second.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let last = if reader.ends_with('x') { 'y' } else { 'x' };
    let wrong_secret = format!("{}{last}", &reader[..reader.len() - 1]);
    let garbage = "not-a-key".to_owned();
    let credentials: [(&str, Option<&str>); 5] = [
        ("no key", None),
        ("a malformed key", Some(&garbage)),
        ("a wrong secret", Some(&wrong_secret)),
        ("a revoked key", Some(&revoked)),
        ("an expired key", Some(&expiring)),
    ];
    let mut refused = 0;
    for rpc in &rpcs {
        for (what, key) in &credentials {
            let channel = common::gateway_channel(&cluster.gateway, *key).await;
            let status = call(channel, rpc, &target).await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{rpc} with {what}: {status:?}"
            );
            for secret in [&reader, &revoked, &expiring] {
                assert!(
                    !status.message().contains(&secret[SECRET_AT..]),
                    "the key is echoed: {status:?}"
                );
            }
            refused += 1;
        }
    }
    println!("{refused} calls without a valid key, all UNAUTHENTICATED");
    // Revoked and expired keys are told why; guesses are not.
    let why = |key: &str| {
        let key = key.to_owned();
        let gateway = cluster.gateway.clone();
        async move {
            call(
                common::gateway_channel(&gateway, Some(&key)).await,
                "SearchService/Search",
                &Target::default(),
            )
            .await
            .unwrap_err()
            .message()
            .to_owned()
        }
    };
    assert!(why(&revoked).await.contains("revoked"));
    assert!(why(&expiring).await.contains("expired"));
    assert_eq!(why(&wrong_secret).await, "invalid API key");

    // grpcurl with the header works; without it, it is refused.
    let kb = common::create_kb(&cluster, "notes").await;
    let header = bearer_header(&cluster.admin_key);
    let got = grpcurl(&[
        "-plaintext",
        &header[0],
        &header[1],
        "-d",
        r#"{"name": "notes"}"#,
        &cluster.gateway,
        "smartdb.v1.KnowledgeBaseService/GetKnowledgeBase",
    ]);
    assert!(got.contains(&kb.id), "{got}");

    // No secret reaches the logs.
    let log = cluster.log();
    for secret in [&cluster.admin_key, &reader, &revoked, &expiring] {
        assert!(
            !log.contains(&secret[SECRET_AT..]),
            "a key's secret is in the log"
        );
    }
    assert!(
        log.contains("audit") && log.contains("action=auth.failed"),
        "audit events are logged"
    );
}

/// An abusive client at 10x its rate is throttled with a retry hint, then blocked, while a
/// polite client on another key goes on; guessing keys from one address blocks that address
/// until the block ends; the audit log has it all.
#[tokio::test(flavor = "multi_thread")]
async fn abusers_are_throttled_then_blocked_while_polite_clients_go_on() {
    let cluster = Cluster::start_with_env(&[
        ("SMARTDB_GATEWAY_RATES", "reader.search=20"),
        ("SMARTDB_GATEWAY_BLOCK_AFTER_VIOLATIONS", "40"),
        ("SMARTDB_GATEWAY_BLOCK_AFTER_AUTH_FAILURES", "10"),
        ("SMARTDB_GATEWAY_BLOCK_FOR", "4s"),
    ])
    .await;
    let (abuser, abuser_id) = make_key(&cluster, "acme", pb::Role::Reader, 0).await;
    let (polite, _) = make_key(&cluster, "acme", pb::Role::Reader, 0).await;
    let (writer, _) = make_key(&cluster, "acme", pb::Role::Writer, 0).await;
    seed(&cluster, &writer, "notes", "Tides follow the moon.").await;
    let search = |channel: Gw| async move {
        pb::search_service_client::SearchServiceClient::new(channel)
            .search(pb::SearchRequest {
                knowledge_base: "notes".into(),
                query: "tides".into(),
                ..Default::default()
            })
            .await
    };

    // The polite client: 10 calls per second (half its rate) for 6 seconds.
    let polite_channel = channel_from(&cluster, "127.0.0.2", Some(&polite)).await;
    let polite_task = tokio::spawn(async move {
        let (mut ok, mut total) = (0, 0);
        let mut every = tokio::time::interval(Duration::from_millis(100));
        for _ in 0..60 {
            every.tick().await;
            total += 1;
            ok += search(polite_channel.clone()).await.is_ok() as u32;
        }
        (ok, total)
    });
    // The abuser: 200 calls per second (10x) on the same address.
    let abuser_channel = channel_from(&cluster, "127.0.0.2", Some(&abuser)).await;
    let (mut ok, mut limited, mut blocked) = (0, 0, 0);
    let mut blocked_at = None;
    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_millis(5));
    while started.elapsed() < Duration::from_secs(3) {
        every.tick().await;
        match search(abuser_channel.clone()).await {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                let hint = tonic_types::StatusExt::get_error_details(&s)
                    .retry_info()
                    .and_then(|r| r.retry_delay)
                    .expect("a retry hint");
                assert!(
                    s.metadata().get("grpc-retry-pushback-ms").is_some(),
                    "{s:?}"
                );
                if s.message().contains("blocked") {
                    blocked += 1;
                    blocked_at.get_or_insert(started.elapsed());
                    assert!(
                        hint > Duration::from_secs(1) && hint <= Duration::from_secs(4),
                        "{hint:?}"
                    );
                } else {
                    assert!(blocked_at.is_none(), "limited after the block began: {s:?}");
                    limited += 1;
                    assert!(hint <= Duration::from_millis(100), "{hint:?}");
                }
            }
        }
    }
    let (polite_ok, polite_total) = polite_task.await.unwrap();
    println!(
        "abuser: {ok} admitted, {limited} limited, {blocked} refused while blocked (blocked after {blocked_at:?}); polite: {polite_ok}/{polite_total}"
    );
    assert!(ok <= 20 + 3 * 20 + 5, "the abuser got through {ok} times");
    assert_eq!(limited, 39, "blocked at the 40th violation");
    assert!(blocked > 100, "{blocked}");
    assert!(
        polite_ok * 100 >= polite_total * 99,
        "polite: {polite_ok}/{polite_total}"
    );

    // The block ends after its time.
    tokio::time::sleep(Duration::from_secs(4)).await;
    search(abuser_channel.clone())
        .await
        .expect("the block ended");

    // Guessing keys from 127.0.0.3 blocks that address, with a valid key too; others go on.
    for i in 0..10 {
        let guess = format!("sdb_{:016x}_{}", i, "A".repeat(43));
        let s = search(channel_from(&cluster, "127.0.0.3", Some(&guess)).await)
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "guess {i}: {s:?}");
    }
    let s = search(channel_from(&cluster, "127.0.0.3", Some(&polite)).await)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains("127.0.0.3") && s.message().contains("blocked"),
        "{s:?}"
    );
    search(channel_from(&cluster, "127.0.0.2", Some(&polite)).await)
        .await
        .expect("another address is not blocked");
    tokio::time::sleep(Duration::from_secs(4)).await;
    search(channel_from(&cluster, "127.0.0.3", Some(&polite)).await)
        .await
        .expect("the address block ended");

    // The audit log tells the story, newest first, filtered by action.
    let events = cluster
        .admin()
        .await
        .list_audit_events(pb::ListAuditEventsRequest {
            action: "blocked".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events[0].detail.contains("127.0.0.3"), "{events:?}");
    assert_eq!(events[1].key_id, abuser_id, "{events:?}");
    let failures = cluster
        .admin()
        .await
        .list_audit_events(pb::ListAuditEventsRequest {
            action: "auth.failed".into(),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failures.events.len(), 5);
    assert!(!failures.next_page_token.is_empty());
    assert!(
        failures
            .events
            .iter()
            .all(|e| e.peer.starts_with("127.0.0.3:")),
        "{failures:?}"
    );
}

/// Two gateway processes over the same services and the same Redis share one budget per key:
/// an abuser alternating between them gets no more than from one, and is blocked at both.
#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_share_limits_through_redis() {
    let env = [
        ("SMARTDB_GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/"),
        ("SMARTDB_GATEWAY_RATES", "reader.search=20"),
        ("SMARTDB_GATEWAY_BLOCK_AFTER_VIOLATIONS", "40"),
        ("SMARTDB_GATEWAY_BLOCK_FOR", "4s"),
    ];
    let cluster = Cluster::start_with_env(&env).await;
    // The second replica shares the edge store too (SQLite, on this machine) and the admin key.
    let store = cluster
        .data_dir
        .path()
        .join("gateway")
        .display()
        .to_string();
    let mut env2 = env.to_vec();
    env2.push(("SMARTDB_ADMIN_KEY", &cluster.admin_key));
    let second = common::ExtraService::start(&cluster, &["--data-dir", &store], &env2).await;
    let (abuser, _) = make_key(&cluster, "acme", pb::Role::Reader, 0).await;
    let (polite, _) = make_key(&cluster, "acme", pb::Role::Reader, 0).await;
    let (writer, _) = make_key(&cluster, "acme", pb::Role::Writer, 0).await;
    seed(&cluster, &writer, "notes", "Tides follow the moon.").await;
    let search = |channel: Gw| async move {
        pb::search_service_client::SearchServiceClient::new(channel)
            .search(pb::SearchRequest {
                knowledge_base: "notes".into(),
                query: "tides".into(),
                ..Default::default()
            })
            .await
    };
    let both = |key: &str| {
        let key = key.to_owned();
        let (one, two) = (cluster.gateway.clone(), second.addr.clone());
        async move {
            [
                common::gateway_channel(&one, Some(&key)).await,
                common::gateway_channel(&two, Some(&key)).await,
            ]
        }
    };
    let polite_channels = both(&polite).await;
    let polite_task = tokio::spawn(async move {
        let (mut ok, mut total) = (0, 0);
        let mut every = tokio::time::interval(Duration::from_millis(100));
        for i in 0..40 {
            every.tick().await;
            total += 1;
            ok += search(polite_channels[i % 2].clone()).await.is_ok() as u32;
        }
        (ok, total)
    });
    let abuser_channels = both(&abuser).await;
    let (mut admitted, mut limited, mut blocked) = ([0; 2], 0, [0; 2]);
    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_millis(5));
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(3) {
        every.tick().await;
        let at = i % 2;
        i += 1;
        match search(abuser_channels[at].clone()).await {
            Ok(_) => admitted[at] += 1,
            Err(s) if s.message().contains("blocked") => blocked[at] += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                limited += 1;
            }
        }
    }
    let (polite_ok, polite_total) = polite_task.await.unwrap();
    println!(
        "two gateways, one budget: abuser admitted {admitted:?}, {limited} limited, blocked {blocked:?}; polite {polite_ok}/{polite_total}"
    );
    let total = admitted[0] + admitted[1];
    // One burst of 20 and 20/s until the block, shared: about 25, where two separate
    // budgets would have let about 50 through.
    assert!(total <= 32, "{total} admitted");
    assert!(admitted[0] > 0 && admitted[1] > 0, "{admitted:?}");
    assert_eq!(limited, 39);
    assert!(
        blocked[0] > 50 && blocked[1] > 50,
        "blocked at both: {blocked:?}"
    );
    assert!(
        polite_ok * 100 >= polite_total * 99,
        "polite: {polite_ok}/{polite_total}"
    );
    let errors = common::http_get(&cluster.service("gateway").http, "/metrics").await;
    assert!(
        !errors.contains("smartdb_edge_redis_errors_total{"),
        "Redis failed: {errors}"
    );

    // A key revoked through one gateway stops working at the other within its key cache's
    // lifetime (2 s), though that one had it cached.
    let (reader, reader_id) = make_key(&cluster, "acme", pb::Role::Reader, 0).await;
    let at_second = common::gateway_channel(&second.addr, Some(&reader)).await;
    search(at_second.clone())
        .await
        .expect("the new key works at the second gateway");
    cluster
        .admin()
        .await
        .revoke_api_key(pb::RevokeApiKeyRequest { id: reader_id })
        .await
        .unwrap();
    let started = Instant::now();
    let took = common::eventually(
        Duration::from_secs(10),
        "revocation reaches the other gateway",
        || {
            let channel = at_second.clone();
            async move {
                matches!(search(channel).await, Err(s) if s.code() == Code::Unauthenticated)
                    .then(|| started.elapsed())
            }
        },
    )
    .await;
    println!("a key revoked at one gateway stopped working at the other after {took:?}");
    assert!(took <= Duration::from_secs(4), "{took:?}");
}

/// Key management through AdminService, and the audit trail of who did what.
#[tokio::test(flavor = "multi_thread")]
async fn keys_are_managed_and_audited() {
    let cluster = Cluster::start().await;
    let mut admin = cluster.admin().await;
    let (writer, writer_id) = make_key(&cluster, "acme", pb::Role::Writer, 0).await;
    seed(
        &cluster,
        &writer,
        "notes",
        "Bees dance to say where flowers are.",
    )
    .await;
    let mut kbs = pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(
        as_key(&cluster, &writer).await,
    );
    kbs.delete_knowledge_base(pb::DeleteKnowledgeBaseRequest {
        name: "notes".into(),
    })
    .await
    .unwrap();
    // Refused at the edge (an invalid name), and audited all the same.
    let refused = kbs
        .delete_knowledge_base(pb::DeleteKnowledgeBaseRequest {
            name: "Not A Name".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // Bad requests name the field.
    for (request, field) in [
        (
            pb::CreateApiKeyRequest {
                tenant: "acme".into(),
                role: 0,
                ..Default::default()
            },
            "role",
        ),
        (
            pb::CreateApiKeyRequest {
                tenant: "Not A Tenant".into(),
                role: 1,
                ..Default::default()
            },
            "tenant",
        ),
        (
            pb::CreateApiKeyRequest {
                tenant: "acme".into(),
                role: 1,
                label: "x".repeat(201),
                ..Default::default()
            },
            "label",
        ),
    ] {
        let s = admin.create_api_key(request).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().starts_with(field), "{s:?}");
    }
    let s = admin
        .create_api_key(pb::CreateApiKeyRequest {
            tenant: "nobody".into(),
            role: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = admin
        .create_tenant(pb::CreateTenantRequest {
            name: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
    let s = admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            id: "ffffffffffffffff".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");

    // Listing shows what is stored, never a key or its hash.
    let keys = admin
        .list_api_keys(pb::ListApiKeysRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].id, writer_id);
    assert_eq!(keys[0].role, pb::Role::Writer as i32);
    assert!(!format!("{keys:?}").contains(&writer[SECRET_AT..]));
    let tenants = admin
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants;
    let names: Vec<_> = tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["acme", "default"]);

    admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            id: writer_id.clone(),
        })
        .await
        .unwrap();
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    let summary: Vec<String> = events
        .iter()
        .map(|e| format!("{} {} {} {}", e.action, e.outcome, e.key_id, e.tenant))
        .collect();
    let find = |action: &str| {
        events
            .iter()
            .find(|e| e.action == action && e.outcome == "ok")
            .unwrap_or_else(|| panic!("no {action} in {summary:#?}"))
    };
    let created = find("key.created");
    assert_eq!(created.key_id, "bootstrap");
    assert!(created.detail.contains(&writer_id), "{created:?}");
    assert!(created.peer.starts_with("127.0.0.1:"), "{created:?}");
    let deleted = find("knowledge_base.deleted");
    assert_eq!(
        (
            deleted.key_id.as_str(),
            deleted.tenant.as_str(),
            deleted.outcome.as_str()
        ),
        (writer_id.as_str(), "acme", "ok")
    );
    assert!(deleted.detail.contains("notes"), "{deleted:?}");
    assert_eq!(find("key.revoked").detail, format!("key {writer_id}"));
    assert_eq!(find("tenant.created").detail, "tenant acme");
    let refused = events.iter().filter(|e| e.outcome != "ok").count();
    assert!(
        refused >= 4,
        "refused admin calls are audited too: {summary:#?}"
    );
    // Filters: by key and by time.
    let by_writer = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            key_id: writer_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let outcomes: Vec<_> = by_writer
        .iter()
        .map(|e| (e.action.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("knowledge_base.deleted", "INVALID_ARGUMENT"),
            ("knowledge_base.deleted", "ok")
        ],
        "{by_writer:?}"
    );
    let later = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            since: Some(prost_types::Timestamp::from(
                std::time::SystemTime::now() + Duration::from_secs(60),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(later.is_empty(), "{later:?}");
    // Nothing stored holds a secret.
    assert!(!format!("{events:?}").contains(&writer[SECRET_AT..]));
}

/// `smartdb up` makes an admin key once (mode 0600) and names its file; the CLI uses it, and
/// a wrong key is refused with a hint.
#[tokio::test(flavor = "multi_thread")]
async fn up_bootstraps_an_admin_key_the_cli_uses() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = Cluster::start().await;
    let file = cluster.data_dir.path().join("admin.key");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let ready_line = format!("admin API key in {}", file.display());
    common::eventually(
        Duration::from_secs(30),
        "the ready line names the key file",
        || {
            let found = cluster.log().contains(&ready_line);
            async move { found.then_some(()) }
        },
    )
    .await;
    let key = cluster.admin_key.clone();
    let data_dir = cluster.data_dir.path().to_owned();
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        std::process::Command::new(common::smartdb_bin())
            .arg("--addr")
            .arg(format!("http://{}", cluster.gateway))
            .args(args)
            .env_remove("SMARTDB_API_KEY")
            .env("SMARTDB_DATA_DIR", &data_dir)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = cli(&["kb", "create", "from-cli"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(
        &["kb", "list"],
        &[("SMARTDB_API_KEY", "sdb_0123456789abcdef_wrong")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Unauthenticated") && err.contains("--api-key"),
        "{err}"
    );

    // A restart keeps the same key.
    let dir = cluster.stop();
    let cluster = Cluster::start_in(dir, &[], &[]).await;
    assert_eq!(cluster.admin_key, key);
    let listed = cluster
        .kbs()
        .await
        .list_knowledge_bases(pb::ListKnowledgeBasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.knowledge_bases.len(), 1);
}

/// With a MongoDB URI, every gateway replica keeps tenants, keys and the audit log in one
/// database: a key made at one works at the other, revoked at the other it stops working at
/// the first, and both write to one audit log. Nothing goes to the SQLite file then.
#[tokio::test(flavor = "multi_thread")]
async fn gateway_replicas_share_keys_and_audit_through_mongodb() {
    let mongo = smartdb_kit::testing::MongoServer::start();
    let uri = mongo.uri_for(&format!("gw_{}", std::process::id()));
    let env = [("SMARTDB_GATEWAY_MONGODB_URI", uri.as_str())];
    let cluster = Cluster::start_with_env(&env).await;
    let other_dir = tempfile::tempdir().unwrap();
    let other_dir = other_dir.path().display().to_string();
    let second = common::ExtraService::start(
        &cluster,
        &["--data-dir", &other_dir],
        &[
            ("SMARTDB_GATEWAY_MONGODB_URI", uri.as_str()),
            ("SMARTDB_ADMIN_KEY", &cluster.admin_key),
        ],
    )
    .await;
    let (writer, writer_id) = make_key(&cluster, "acme", pb::Role::Writer, 0).await;
    let list = |addr: String, key: String| async move {
        pb::knowledge_base_service_client::KnowledgeBaseServiceClient::new(
            common::gateway_channel(&addr, Some(&key)).await,
        )
        .list_knowledge_bases(pb::ListKnowledgeBasesRequest::default())
        .await
    };
    list(second.addr.clone(), writer.clone())
        .await
        .expect("a key made at the first gateway works at the second");
    list(cluster.gateway.clone(), writer.clone())
        .await
        .expect("and at the first");

    let mut second_admin = pb::admin_service_client::AdminServiceClient::new(
        common::gateway_channel(&second.addr, Some(&cluster.admin_key)).await,
    );
    let tenants = second_admin
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        tenants.tenants.iter().any(|t| t.name == "acme"),
        "{tenants:?}"
    );
    second_admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            id: writer_id.clone(),
        })
        .await
        .unwrap();
    let started = Instant::now();
    let took = common::eventually(
        Duration::from_secs(10),
        "revocation at the second gateway reaches the first",
        || {
            let (addr, key) = (cluster.gateway.clone(), writer.clone());
            async move {
                matches!(list(addr, key).await, Err(s) if s.code() == Code::Unauthenticated)
                    .then(|| started.elapsed())
            }
        },
    )
    .await;
    assert!(took <= Duration::from_secs(4), "{took:?}");

    // The first gateway's audit log holds what the second did.
    let mut first_admin = cluster.admin().await;
    common::eventually(
        Duration::from_secs(10),
        "the revocation is in the shared audit log",
        || {
            let mut admin = first_admin.clone();
            let id = writer_id.clone();
            async move {
                let events = admin
                    .list_audit_events(pb::ListAuditEventsRequest {
                        action: "key.revoked".into(),
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .events;
                events.iter().any(|e| e.detail.contains(&id)).then_some(())
            }
        },
    )
    .await;
    let created = first_admin
        .list_audit_events(pb::ListAuditEventsRequest {
            action: "key.created".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!created.events.is_empty(), "{created:?}");
    for dir in [
        cluster.data_dir.path().join("gateway"),
        other_dir.clone().into(),
    ] {
        assert!(
            !dir.join("edge.db").exists(),
            "no SQLite store beside MongoDB in {}",
            dir.display()
        );
    }
}
