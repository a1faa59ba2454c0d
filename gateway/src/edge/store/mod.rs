//! The gateway's own data: tenants, API keys (hashes only) and the audit log, behind a small
//! trait. SQLite is the embedded implementation, MongoDB the one gateway replicas share; both
//! pass the suite in `conformance`.

#[cfg(test)]
pub(crate) mod conformance;
pub mod mongo;
pub mod sqlite;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::Result;

/// What an API key may do, weakest first (a stronger role may do all a weaker one may).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Search, get and list.
    Reader,
    /// Also create and delete knowledge bases and documents.
    Writer,
    /// Everything, in every tenant.
    Admin,
}

impl Role {
    /// Name as stored and shown, e.g. `writer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "reader" => Some(Role::Reader),
            "writer" => Some(Role::Writer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    /// Unique name.
    pub name: String,
    /// When it was created.
    pub create_time: SystemTime,
}

/// An API key as stored: the hash of its secret, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public id.
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: Vec<u8>,
    /// Tenant it acts for.
    pub tenant: String,
    /// What it may do.
    pub role: Role,
    /// What it is for.
    pub label: String,
    /// When it was created.
    pub create_time: SystemTime,
    /// When it stops working.
    pub expire_time: Option<SystemTime>,
    /// When it was revoked.
    pub revoke_time: Option<SystemTime>,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditRecord {
    /// When it happened.
    pub time: Option<SystemTime>,
    /// What happened, e.g. `auth.failed`.
    pub action: String,
    /// `ok` or a gRPC code name.
    pub outcome: String,
    /// Key that made the call, if any.
    pub key_id: String,
    /// Tenant acted for, if known.
    pub tenant: String,
    /// Client address.
    pub peer: String,
    /// Full gRPC method.
    pub method: String,
    /// What it was about (never a secret).
    pub detail: String,
}

/// Which audit entries to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this action.
    pub action: Option<String>,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this key.
    pub key_id: Option<String>,
    /// Only at or after this time.
    pub since: Option<SystemTime>,
}

/// One page of a listing; `next` is the opaque token of the next page, empty on the last.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Token for the next page.
    pub next: String,
}

/// Where the gateway keeps tenants, keys and the audit log.
#[tonic::async_trait]
pub trait EdgeStore: Send + Sync {
    /// Creates a tenant; `AlreadyExists` if the name is taken.
    async fn create_tenant(&self, name: &str, at: SystemTime) -> Result<TenantRecord>;
    /// Finds a tenant.
    async fn get_tenant(&self, name: &str) -> Result<Option<TenantRecord>>;
    /// Tenants in name order, `limit` at a time.
    async fn list_tenants(&self, token: &str, limit: usize) -> Result<Page<TenantRecord>>;
    /// Stores a new key; `AlreadyExists` if the id is taken.
    async fn insert_key(&self, key: &KeyRecord) -> Result<()>;
    /// Finds a key by id.
    async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>>;
    /// Keys, newest first (of one tenant, or all), `limit` at a time.
    async fn list_keys(
        &self,
        tenant: Option<&str>,
        token: &str,
        limit: usize,
    ) -> Result<Page<KeyRecord>>;
    /// Marks a key revoked at `at` (keeping an earlier revocation time); the key as it is now,
    /// `None` if there is no such key.
    async fn revoke_key(&self, id: &str, at: SystemTime) -> Result<Option<KeyRecord>>;
    /// Appends audit entries.
    async fn append_audit(&self, events: &[AuditRecord]) -> Result<()>;
    /// Audit entries matching `filter`, newest first, `limit` at a time.
    async fn list_audit(
        &self,
        filter: &AuditFilter,
        token: &str,
        limit: usize,
    ) -> Result<Page<AuditRecord>>;
    /// Deletes audit entries older than `before`, and the oldest beyond the newest `keep`;
    /// returns how many went.
    async fn trim_audit(&self, before: SystemTime, keep: usize) -> Result<u64>;
}

/// Milliseconds since the Unix epoch, as stored.
pub fn to_millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}
