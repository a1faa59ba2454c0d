//! The embedded edge store: one SQLite file, schema versions applied by `rusqlite_migration`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

use super::{
    AuditFilter, AuditRecord, EdgeStore, KeyRecord, Page, Role, TenantRecord, from_millis,
    to_millis,
};
use crate::error::{Error, Result};

/// Version 1: tenants, API keys, audit log.
const SCHEMA_V1: &str = "
CREATE TABLE tenants (
    name TEXT PRIMARY KEY,
    create_time INTEGER NOT NULL
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    role TEXT NOT NULL,
    label TEXT NOT NULL,
    create_time INTEGER NOT NULL,
    expire_time INTEGER,
    revoke_time INTEGER
);
CREATE INDEX api_keys_newest ON api_keys (create_time DESC, id DESC);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    key_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    peer TEXT NOT NULL,
    method TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_time ON audit (time);
";

/// The schema's versions, oldest first.
pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![M::up(SCHEMA_V1)])
}

/// Tenants, keys and audit log in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating or migrating) the store at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut conn = Connection::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations()
            .to_latest(&mut conn)
            .map_err(|e| anyhow::anyhow!("cannot migrate {}: {e}", path.display()))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection off the async threads.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| Error::Store("lock poisoned".into()))?;
            f(&mut conn)
        })
        .await
        .map_err(|e| Error::Store(e.to_string()))?
    }
}

fn tenant_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TenantRecord> {
    Ok(TenantRecord {
        name: row.get(0)?,
        create_time: from_millis(row.get(1)?),
    })
}

const KEY_COLUMNS: &str = "id, hash, tenant, role, label, create_time, expire_time, revoke_time";

fn key_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let role: String = row.get(3)?;
    Ok(KeyRecord {
        id: row.get(0)?,
        hash: row.get(1)?,
        tenant: row.get(2)?,
        role: Role::parse(&role).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                3,
                rusqlite::types::Type::Text,
                format!("unknown role {role:?}").into(),
            )
        })?,
        label: row.get(4)?,
        create_time: from_millis(row.get(5)?),
        expire_time: row.get::<_, Option<i64>>(6)?.map(from_millis),
        revoke_time: row.get::<_, Option<i64>>(7)?.map(from_millis),
    })
}

fn bad_token() -> Error {
    Error::invalid("page_token", "not a token from a previous page")
}

#[tonic::async_trait]
impl EdgeStore for SqliteStore {
    async fn create_tenant(&self, name: &str, at: SystemTime) -> Result<TenantRecord> {
        let record = TenantRecord {
            name: name.to_owned(),
            create_time: from_millis(to_millis(at)),
        };
        let r = record.clone();
        self.call(move |c| {
            let n = c.execute(
                "INSERT INTO tenants (name, create_time) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![r.name, to_millis(r.create_time)],
            )?;
            if n == 0 {
                return Err(Error::AlreadyExists(format!(
                    "tenant {:?} already exists",
                    r.name
                )));
            }
            Ok(())
        })
        .await?;
        Ok(record)
    }

    async fn get_tenant(&self, name: &str) -> Result<Option<TenantRecord>> {
        let name = name.to_owned();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT name, create_time FROM tenants WHERE name = ?1",
                params![name],
                tenant_row,
            )
            .optional()?)
        })
        .await
    }

    async fn list_tenants(&self, token: &str, limit: usize) -> Result<Page<TenantRecord>> {
        let after = token.to_owned();
        let mut items = self
            .call(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT name, create_time FROM tenants WHERE name > ?1 ORDER BY name LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![after, limit as i64 + 1], tenant_row)?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|t| t.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Page { items, next })
    }

    async fn insert_key(&self, key: &KeyRecord) -> Result<()> {
        let k = key.clone();
        self.call(move |c| {
            let n = c.execute(
                "INSERT INTO api_keys (id, hash, tenant, role, label, create_time, expire_time, revoke_time)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
                params![
                    k.id,
                    k.hash,
                    k.tenant,
                    k.role.as_str(),
                    k.label,
                    to_millis(k.create_time),
                    k.expire_time.map(to_millis),
                    k.revoke_time.map(to_millis)
                ],
            )?;
            if n == 0 {
                return Err(Error::AlreadyExists(format!("API key {} already exists", k.id)));
            }
            Ok(())
        })
        .await
    }

    async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let id = id.to_owned();
        self.call(move |c| {
            Ok(c.query_row(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                params![id],
                key_row,
            )
            .optional()?)
        })
        .await
    }

    async fn list_keys(
        &self,
        tenant: Option<&str>,
        token: &str,
        limit: usize,
    ) -> Result<Page<KeyRecord>> {
        // Token: "<create_time ms>:<id>" of the last key of the previous page.
        let after = if token.is_empty() {
            None
        } else {
            let (ms, id) = token.split_once(':').ok_or_else(bad_token)?;
            Some((ms.parse::<i64>().map_err(|_| bad_token())?, id.to_owned()))
        };
        let tenant = tenant.map(str::to_owned);
        let mut items = self
            .call(move |c| {
                let (ms, id) = after.unwrap_or((i64::MAX, String::new()));
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys
                     WHERE (?1 IS NULL OR tenant = ?1)
                       AND (create_time < ?2 OR (create_time = ?2 AND id < ?3))
                     ORDER BY create_time DESC, id DESC LIMIT ?4"
                ))?;
                // With no token, every key sorts before (i64::MAX, "\u{10ffff}").
                let id = if id.is_empty() {
                    "\u{10ffff}".to_owned()
                } else {
                    id
                };
                let rows = stmt.query_map(params![tenant, ms, id, limit as i64 + 1], key_row)?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items
                .last()
                .map(|k| format!("{}:{}", to_millis(k.create_time), k.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Page { items, next })
    }

    async fn revoke_key(&self, id: &str, at: SystemTime) -> Result<Option<KeyRecord>> {
        let id = id.to_owned();
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE api_keys SET revoke_time = ?2 WHERE id = ?1 AND revoke_time IS NULL",
                params![id, to_millis(at)],
            )?;
            let key = tx
                .query_row(
                    &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                    params![id],
                    key_row,
                )
                .optional()?;
            tx.commit()?;
            Ok(key)
        })
        .await
    }

    async fn append_audit(&self, events: &[AuditRecord]) -> Result<()> {
        let events = events.to_vec();
        self.call(move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO audit (time, action, outcome, key_id, tenant, peer, method, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for e in &events {
                    stmt.execute(params![
                        to_millis(e.time.unwrap_or_else(SystemTime::now)),
                        e.action,
                        e.outcome,
                        e.key_id,
                        e.tenant,
                        e.peer,
                        e.method,
                        e.detail
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        token: &str,
        limit: usize,
    ) -> Result<Page<AuditRecord>> {
        let before: i64 = if token.is_empty() {
            i64::MAX
        } else {
            token.parse().map_err(|_| bad_token())?
        };
        let f = filter.clone();
        let rows = self
            .call(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT seq, time, action, outcome, key_id, tenant, peer, method, detail FROM audit
                     WHERE seq < ?1 AND (?2 IS NULL OR action = ?2) AND (?3 IS NULL OR tenant = ?3)
                       AND (?4 IS NULL OR key_id = ?4) AND (?5 IS NULL OR time >= ?5)
                     ORDER BY seq DESC LIMIT ?6",
                )?;
                let rows = stmt.query_map(
                    params![
                        before,
                        f.action,
                        f.tenant,
                        f.key_id,
                        f.since.map(to_millis),
                        limit as i64 + 1
                    ],
                    |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            AuditRecord {
                                time: Some(from_millis(row.get(1)?)),
                                action: row.get(2)?,
                                outcome: row.get(3)?,
                                key_id: row.get(4)?,
                                tenant: row.get(5)?,
                                peer: row.get(6)?,
                                method: row.get(7)?,
                                detail: row.get(8)?,
                            },
                        ))
                    },
                )?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await?;
        let mut rows = rows;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = match rows.last() {
            Some((seq, _)) if more => seq.to_string(),
            _ => String::new(),
        };
        let items = rows.into_iter().map(|(_, record)| record).collect();
        Ok(Page { items, next })
    }

    async fn trim_audit(&self, before: SystemTime, keep: usize) -> Result<u64> {
        self.call(move |c| {
            let old = c.execute(
                "DELETE FROM audit WHERE time < ?1",
                params![to_millis(before)],
            )?;
            let over = c.execute(
                "DELETE FROM audit WHERE seq <= (SELECT seq FROM audit ORDER BY seq DESC LIMIT 1 OFFSET ?1)",
                params![keep as i64],
            )?;
            Ok((old + over) as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("edge.db")).unwrap();
        (dir, store)
    }

    crate::edge_store_conformance!(store());

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
    }

    #[tokio::test]
    async fn reopening_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store
                .create_tenant("acme", SystemTime::now())
                .await
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.get_tenant("acme").await.unwrap().is_some());
    }
}
