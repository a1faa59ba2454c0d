//! The edge: every public call is admitted here before it travels on. Admission checks, in
//! order: the client address's block and rate, the API key (`authorization: Bearer <key>`),
//! the tenant it acts for, the role the RPC needs, and the key's rate for the RPC's class.
//! Refusals and sensitive calls go to the audit log.
//!
//! Keys are looked up through a short-lived cache, so a revoked key stops working at every
//! gateway within `key_cache_ttl`.

pub mod audit;
pub mod keys;
pub mod policy;
pub mod store;
pub mod throttle;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use smartdb_kit::context::{CallContext, DEFAULT_TENANT, strip_internal};
use tonic::{Request, Status};

use self::audit::Auditor;
use self::policy::Policy;
use self::store::{AuditFilter, AuditRecord, EdgeStore, KeyRecord, Page, Role, TenantRecord};
use self::throttle::{Refusal, Subject, Throttle, ThrottleConfig};
use crate::error::{Error, Result};

/// Metadata by which an admin key acts for another tenant.
pub const TENANT_METADATA: &str = "smartdb-tenant";
/// Key id shown for the configured bootstrap admin key (`SMARTDB_ADMIN_KEY`).
pub const BOOTSTRAP_KEY_ID: &str = "bootstrap";
/// Longest wait for Redis on a limit decision before this replica decides alone.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// Longest key label.
const LABEL_BYTES: usize = 200;
/// Longest key lifetime a caller may ask for.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Id of the key.
    pub key_id: String,
    /// Tenant of the key.
    pub tenant: String,
    /// Its role.
    pub role: Role,
}

/// A call let in: the context to pass on, and who made it.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// Context for downstream calls, with the tenant the call acts for.
    pub ctx: CallContext,
    /// The caller.
    pub principal: Principal,
    /// The RPC's policy.
    pub policy: &'static Policy,
    /// Client address.
    pub peer: String,
}

/// Settings of the edge.
#[derive(Clone)]
pub struct EdgeSettings {
    /// False only for benchmarks and trusted local setups: no authentication, no limits.
    pub enabled: bool,
    /// Hash of the bootstrap admin key, if one is configured.
    pub bootstrap: Option<[u8; 32]>,
    /// Limits and blocks.
    pub throttle: ThrottleConfig,
    /// Redis shared by every gateway replica for limits and blocks, if any.
    pub redis_url: Option<String>,
    /// How long a looked-up key is trusted before it is read again.
    pub key_cache_ttl: Duration,
    /// How long audit events are kept.
    pub audit_retention: Duration,
    /// Most audit events kept.
    pub audit_max_events: usize,
}

/// The edge of one gateway process.
pub struct Edge {
    store: Arc<dyn EdgeStore>,
    settings: EdgeSettings,
    keys: moka::future::Cache<String, Option<Arc<KeyRecord>>>,
    tenants: moka::future::Cache<String, bool>,
    throttle: Throttle,
    auditor: Auditor,
}

impl Edge {
    /// An edge over `store`; makes sure the default tenant exists, and starts the audit writer.
    pub async fn new(
        store: Arc<dyn EdgeStore>,
        settings: EdgeSettings,
    ) -> anyhow::Result<Arc<Self>> {
        match store.create_tenant(DEFAULT_TENANT, SystemTime::now()).await {
            Ok(_) | Err(Error::AlreadyExists(_)) => {}
            Err(e) => anyhow::bail!("cannot prepare the gateway store: {e}"),
        }
        let edge = Arc::new(Self {
            keys: short_cache(settings.key_cache_ttl),
            tenants: short_cache(settings.key_cache_ttl),
            throttle: Throttle::new(
                settings.throttle.clone(),
                settings
                    .redis_url
                    .as_deref()
                    .map(|url| {
                        smartdb_kit::redis::Redis::new(
                            url,
                            REDIS_TIMEOUT,
                            "gateway rate limits",
                            "smartdb_edge_redis_errors_total",
                        )
                    })
                    .transpose()?,
            ),
            auditor: Auditor::start(
                store.clone(),
                settings.audit_retention,
                settings.audit_max_events,
            ),
            store,
            settings,
        });
        let weak = Arc::downgrade(&edge);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                match weak.upgrade() {
                    Some(edge) => edge.throttle.tidy(),
                    None => return,
                }
            }
        });
        Ok(edge)
    }

    /// Admits a call to the RPC at `path` (e.g. `/smartdb.v1.SearchService/Search`) or says
    /// why not (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED). What it needs is
    /// taken from `request` at once, so the future does not hold the request (a streaming
    /// request is not `Sync`).
    pub fn admit<T>(
        &self,
        request: &Request<T>,
        path: &str,
    ) -> impl Future<Output = Result<Admitted, Status>> + Send + '_ {
        let path = path.to_owned();
        let addr = request.remote_addr();
        let mut metadata = request.metadata().clone();
        strip_internal(&mut metadata);
        self.admit_call(path, addr, metadata)
    }

    async fn admit_call(
        &self,
        path: String,
        addr: Option<std::net::SocketAddr>,
        metadata: tonic::metadata::MetadataMap,
    ) -> Result<Admitted, Status> {
        let ip = addr.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let peer = addr.map(|a| a.to_string()).unwrap_or_default();
        let mut ctx = CallContext::from_metadata(&metadata);
        let Some(policy) = policy::of(&path) else {
            // Only public RPCs have handlers here; anything else is a bug, refused closed.
            return Err(Status::permission_denied(format!(
                "{path} is not a public RPC"
            )));
        };
        if !self.settings.enabled {
            ctx.tenant = DEFAULT_TENANT.to_owned();
            return Ok(Admitted {
                ctx,
                principal: Principal {
                    key_id: String::new(),
                    tenant: DEFAULT_TENANT.to_owned(),
                    role: Role::Admin,
                },
                policy,
                peer,
            });
        }
        let event =
            |action: &str, outcome: &str, key_id: &str, tenant: &str, detail: String| AuditRecord {
                time: Some(SystemTime::now()),
                action: action.to_owned(),
                outcome: outcome.to_owned(),
                key_id: key_id.to_owned(),
                tenant: tenant.to_owned(),
                peer: peer.clone(),
                method: path.clone(),
                detail,
            };

        if let Err((error, refusal)) = self.throttle.check_address(ip).await {
            self.refused(&refusal, || {
                event(
                    "blocked",
                    "RESOURCE_EXHAUSTED",
                    "",
                    "",
                    format!("address {ip}"),
                )
            });
            return Err(error.into());
        }

        let principal = match self.authenticate(&metadata).await {
            Ok(principal) => principal,
            Err(AuthError::Store(e)) => return Err(e.into()),
            Err(AuthError::Refused {
                message,
                detail,
                key_id,
            }) => {
                metrics::counter!("smartdb_edge_refusals_total", "reason" => "unauthenticated")
                    .increment(1);
                self.auditor
                    .record(event("auth.failed", "UNAUTHENTICATED", &key_id, "", detail));
                if self.throttle.auth_failed(ip).await {
                    self.auditor.record(event(
                        "blocked",
                        "RESOURCE_EXHAUSTED",
                        "",
                        "",
                        format!("address {ip} after repeated authentication failures"),
                    ));
                }
                return Err(Status::unauthenticated(message));
            }
        };

        let tenant = match self.tenant_for(&principal, &metadata).await {
            Ok(tenant) => tenant,
            Err(error) => {
                if matches!(error, Error::PermissionDenied(_)) {
                    metrics::counter!("smartdb_edge_refusals_total", "reason" => "denied")
                        .increment(1);
                    self.auditor.record(event(
                        "denied",
                        "PERMISSION_DENIED",
                        &principal.key_id,
                        &principal.tenant,
                        "acting for another tenant".into(),
                    ));
                }
                return Err(error.into());
            }
        };
        if principal.role < policy.role {
            metrics::counter!("smartdb_edge_refusals_total", "reason" => "denied").increment(1);
            self.auditor.record(event(
                "denied",
                "PERMISSION_DENIED",
                &principal.key_id,
                &tenant,
                format!(
                    "role {} needs {}",
                    principal.role.as_str(),
                    policy.role.as_str()
                ),
            ));
            return Err(Error::PermissionDenied(format!(
                "a {} key may not call {path}: it needs the {} role",
                principal.role.as_str(),
                policy.role.as_str()
            ))
            .into());
        }
        if let Err((error, refusal)) = self
            .throttle
            .check_key(&principal.key_id, principal.role, policy.class)
            .await
        {
            self.refused(&refusal, || {
                event(
                    "blocked",
                    "RESOURCE_EXHAUSTED",
                    &principal.key_id,
                    &tenant,
                    format!("API key {}", principal.key_id),
                )
            });
            return Err(error.into());
        }
        ctx.tenant = tenant;
        Ok(Admitted {
            ctx,
            principal,
            policy,
            peer,
        })
    }

    fn refused(&self, refusal: &Refusal, event: impl FnOnce() -> AuditRecord) {
        let reason = match refusal {
            Refusal::Limited => "limited",
            Refusal::NewlyBlocked | Refusal::Blocked => "blocked",
        };
        metrics::counter!("smartdb_edge_refusals_total", "reason" => reason).increment(1);
        if *refusal == Refusal::NewlyBlocked {
            self.auditor.record(event());
        }
    }

    /// Records an admitted call in the audit log if its RPC is audited, with its outcome.
    pub fn audit_call<R>(&self, admitted: &Admitted, detail: String, result: &Result<R, Status>) {
        let Some(action) = admitted.policy.audit else {
            return;
        };
        let outcome = match result {
            Ok(_) => "ok".to_owned(),
            Err(status) => code_name(status.code()).to_owned(),
        };
        self.auditor.record(AuditRecord {
            time: Some(SystemTime::now()),
            action: action.to_owned(),
            outcome,
            key_id: admitted.principal.key_id.clone(),
            tenant: admitted.ctx.tenant.clone(),
            peer: admitted.peer.clone(),
            method: admitted.policy.path.to_owned(),
            detail,
        });
    }

    async fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Principal, AuthError> {
        let refused = |message: &str, detail: &str, key_id: &str| AuthError::Refused {
            message: message.to_owned(),
            detail: detail.to_owned(),
            key_id: key_id.to_owned(),
        };
        let Some(value) = metadata.get("authorization") else {
            return Err(refused(
                "no API key: send it as `authorization: Bearer <key>`",
                "no key",
                "",
            ));
        };
        let Some(token) = value.to_str().ok().and_then(keys::bearer) else {
            return Err(refused(
                "the authorization metadata must be `Bearer <key>`",
                "not a bearer token",
                "",
            ));
        };
        if let Some(bootstrap) = &self.settings.bootstrap
            && keys::same_hash(&keys::hash(token), bootstrap)
        {
            return Ok(Principal {
                key_id: BOOTSTRAP_KEY_ID.to_owned(),
                tenant: DEFAULT_TENANT.to_owned(),
                role: Role::Admin,
            });
        }
        let Some((id, secret)) = keys::parse(token) else {
            return Err(refused("invalid API key", "malformed key", ""));
        };
        let store = self.store.clone();
        let lookup = id.to_owned();
        let record = self
            .keys
            .try_get_with(id.to_owned(), async move {
                store.get_key(&lookup).await.map(|k| k.map(Arc::new))
            })
            .await
            .map_err(|e| AuthError::Store(Error::Store(e.to_string())))?;
        let Some(record) = record else {
            return Err(refused("invalid API key", "unknown key id", id));
        };
        if !keys::same_hash(&keys::hash(secret), &record.hash) {
            return Err(refused("invalid API key", "wrong secret", id));
        }
        // Only the key's holder learns why it stopped working.
        if record.revoke_time.is_some() {
            return Err(refused(&format!("API key {id} was revoked"), "revoked", id));
        }
        if record.expire_time.is_some_and(|t| t <= SystemTime::now()) {
            return Err(refused(&format!("API key {id} has expired"), "expired", id));
        }
        Ok(Principal {
            key_id: record.id.clone(),
            tenant: record.tenant.clone(),
            role: record.role,
        })
    }

    /// The tenant a call acts for: the key's, or for an admin key the one it names.
    async fn tenant_for(
        &self,
        principal: &Principal,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<String> {
        let Some(asked) = metadata.get(TENANT_METADATA) else {
            return Ok(principal.tenant.clone());
        };
        let asked = asked.to_str().unwrap_or_default();
        if asked == principal.tenant {
            return Ok(asked.to_owned());
        }
        if principal.role != Role::Admin {
            return Err(Error::PermissionDenied(format!(
                "only admin keys may act for another tenant ({TENANT_METADATA})"
            )));
        }
        check_tenant_name(TENANT_METADATA, asked)?;
        let store = self.store.clone();
        let name = asked.to_owned();
        let exists = self
            .tenants
            .try_get_with(asked.to_owned(), async move {
                store.get_tenant(&name).await.map(|t| t.is_some())
            })
            .await
            .map_err(|e| Error::Store(e.to_string()))?;
        if !exists {
            return Err(Error::invalid(
                TENANT_METADATA,
                format!("no tenant named {asked:?}"),
            ));
        }
        Ok(asked.to_owned())
    }

    /// Creates a tenant.
    pub async fn create_tenant(&self, name: &str) -> Result<TenantRecord> {
        check_tenant_name("name", name)?;
        let tenant = self.store.create_tenant(name, SystemTime::now()).await?;
        self.tenants.invalidate(name).await;
        Ok(tenant)
    }

    /// One page of tenants.
    pub async fn list_tenants(&self, page_size: u32, token: &str) -> Result<Page<TenantRecord>> {
        self.store.list_tenants(token, page(page_size, 50)?).await
    }

    /// Creates a key; returns the key (shown once) and its record.
    pub async fn create_key(
        &self,
        tenant: &str,
        role: Role,
        label: &str,
        ttl: Option<Duration>,
    ) -> Result<(String, KeyRecord)> {
        check_tenant_name("tenant", tenant)?;
        if label.len() > LABEL_BYTES || label.chars().any(char::is_control) {
            return Err(Error::invalid(
                "label",
                format!("at most {LABEL_BYTES} bytes, without control characters"),
            ));
        }
        if ttl.is_some_and(|t| t > MAX_TTL) {
            return Err(Error::invalid("ttl_seconds", "at most ten years"));
        }
        if self.store.get_tenant(tenant).await?.is_none() {
            return Err(Error::NotFound(format!("no tenant named {tenant:?}")));
        }
        let new = keys::generate();
        let now = SystemTime::now();
        let record = KeyRecord {
            id: new.id,
            hash: new.hash.to_vec(),
            tenant: tenant.to_owned(),
            role,
            label: label.to_owned(),
            create_time: store::from_millis(store::to_millis(now)),
            expire_time: ttl.map(|t| store::from_millis(store::to_millis(now + t))),
            revoke_time: None,
        };
        self.store.insert_key(&record).await?;
        self.keys.invalidate(&record.id).await;
        Ok((new.key, record))
    }

    /// One page of keys.
    pub async fn list_keys(
        &self,
        tenant: &str,
        page_size: u32,
        token: &str,
    ) -> Result<Page<KeyRecord>> {
        let tenant = (!tenant.is_empty()).then_some(tenant);
        if let Some(t) = tenant {
            check_tenant_name("tenant", t)?;
        }
        self.store
            .list_keys(tenant, token, page(page_size, 50)?)
            .await
    }

    /// Revokes a key (here at once; at other gateways when their cache entry expires).
    pub async fn revoke_key(&self, id: &str) -> Result<KeyRecord> {
        if !keys::valid_id(id) {
            return Err(Error::invalid("id", "not an API key id (16 hex digits)"));
        }
        let key = self
            .store
            .revoke_key(id, SystemTime::now())
            .await?
            .ok_or_else(|| Error::NotFound(format!("no API key {id}")))?;
        self.keys.invalidate(id).await;
        Ok(key)
    }

    /// One page of audit events.
    pub async fn list_audit(
        &self,
        filter: &AuditFilter,
        page_size: u32,
        token: &str,
    ) -> Result<Page<AuditRecord>> {
        self.auditor.flush().await;
        self.store
            .list_audit(filter, token, page(page_size, 100)?)
            .await
    }

    /// Records an event in the audit log.
    pub fn record(&self, event: AuditRecord) {
        self.auditor.record(event);
    }

    /// Time left on a subject's block (for tests and status).
    pub fn blocked(&self, subject: &Subject) -> Option<Duration> {
        self.throttle.blocked(subject)
    }
}

/// A bounded cache whose entries live `ttl`.
fn short_cache<V: Clone + Send + Sync + 'static>(ttl: Duration) -> moka::future::Cache<String, V> {
    moka::future::Cache::builder()
        .max_capacity(10_000)
        .time_to_live(ttl)
        .build()
}

/// Why authentication failed.
enum AuthError {
    /// No valid key: `message` for the caller, `detail` for the audit log.
    Refused {
        message: String,
        detail: String,
        key_id: String,
    },
    /// The store could not be read.
    Store(Error),
}

/// The canonical name of a gRPC status code, as the audit log records outcomes.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Page size: 0 means `default`, at most 1000.
fn page(requested: u32, default: usize) -> Result<usize> {
    match requested {
        0 => Ok(default),
        n if n > 1000 => Err(Error::invalid(
            "page_size",
            format!("{n} is more than the maximum 1000"),
        )),
        n => Ok(n as usize),
    }
}

/// Tenant names: 1-64 lower-case ASCII letters, digits, '-' and '_', starting with a letter
/// or digit.
pub fn check_tenant_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "{:?} is not a tenant name: 1-64 lower-case letters, digits, '-' and '_', starting with a letter or digit",
                smartdb_kit::limits::truncate(name, 80)
            ),
        ))
    }
}
