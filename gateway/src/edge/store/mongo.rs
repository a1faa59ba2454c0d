//! The edge store on MongoDB: what several gateway replicas share when the deployment outgrows
//! one machine. Collections `gateway.tenants`, `gateway.api_keys`, `gateway.audit`, and
//! `gateway.meta` (the schema version, raised step by step by [`migrate`] like the SQLite file's
//! `user_version`); the prefix lets the gateway share a database with other services.

use std::time::SystemTime;

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc, oid::ObjectId, spec::BinarySubtype};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{FindOptions, ReturnDocument};
use mongodb::{Collection, Database, IndexModel};
use smartdb_kit::mongo;

use super::{
    AuditFilter, AuditRecord, EdgeStore, KeyRecord, Page, Role, TenantRecord, from_millis,
    to_millis,
};
use crate::error::{Error, Result};

/// The newest schema version this release writes.
pub const SCHEMA_VERSION: i64 = 1;

const TENANTS: &str = "gateway.tenants";
const KEYS: &str = "gateway.api_keys";
const AUDIT: &str = "gateway.audit";
const META: &str = "gateway.meta";

/// Tenants, keys and audit log in one MongoDB database.
#[derive(Clone)]
pub struct MongoStore {
    tenants: Collection<Document>,
    keys: Collection<Document>,
    audit: Collection<Document>,
}

impl MongoStore {
    /// Connects to `uri` (its database, or `smartdb`) and migrates the schema.
    pub async fn open(uri: &str) -> anyhow::Result<Self> {
        Self::open_database(uri, None).await
    }

    /// As [`MongoStore::open`], in database `name` whatever the URI says.
    pub async fn open_database(uri: &str, name: Option<&str>) -> anyhow::Result<Self> {
        let db = mongo::connect(uri, name, "smartdb-gateway", None).await?;
        let name = db.name().to_owned();
        migrate(&db)
            .await
            .map_err(|e| anyhow::anyhow!("MongoDB database {name}: {e}"))?;
        Ok(Self {
            tenants: db.collection(TENANTS),
            keys: db.collection(KEYS),
            audit: db.collection(AUDIT),
        })
    }
}

/// Brings `db` to [`SCHEMA_VERSION`], one version at a time (see [`mongo::migrate`]).
pub async fn migrate(db: &Database) -> anyhow::Result<()> {
    mongo::migrate(&db.collection(META), SCHEMA_VERSION, |version| async move {
        match version {
            1 => {
                let index = |keys: Document| IndexModel::builder().keys(keys).build();
                db.collection::<Document>(KEYS)
                    .create_indexes([
                        index(doc! { "create_time": -1, "_id": -1 }),
                        index(doc! { "tenant": 1, "create_time": -1, "_id": -1 }),
                    ])
                    .await?;
                db.collection::<Document>(AUDIT)
                    .create_index(index(doc! { "time": -1, "_id": -1 }))
                    .await?;
            }
            _ => unreachable!("no step for schema version {version}"),
        }
        Ok(())
    })
    .await
}

/// The schema version stored in `db`; 0 for a new database.
pub async fn schema_version(db: &Database) -> anyhow::Result<i64> {
    mongo::schema_version(&db.collection(META)).await
}

impl From<mongodb::error::Error> for Error {
    fn from(e: mongodb::error::Error) -> Self {
        Error::Store(e.to_string())
    }
}

/// Inserts `doc`; `AlreadyExists` with `taken()` if its `_id` is in use.
async fn insert_new(
    coll: &Collection<Document>,
    doc: Document,
    taken: impl FnOnce() -> String,
) -> Result<()> {
    match coll.insert_one(doc).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.kind.as_ref(), ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000) => {
            Err(Error::AlreadyExists(taken()))
        }
        Err(e) => Err(e.into()),
    }
}

fn corrupt(what: &str, d: &Document) -> Error {
    Error::Store(format!(
        "malformed {what} document {:?}",
        d.get("_id").cloned().unwrap_or(Bson::Null)
    ))
}

fn str_field(d: &Document, name: &str, what: &str) -> Result<String> {
    d.get_str(name)
        .map(str::to_owned)
        .map_err(|_| corrupt(what, d))
}

fn time_field(d: &Document, name: &str, what: &str) -> Result<SystemTime> {
    d.get(name)
        .and_then(mongo::as_i64)
        .map(from_millis)
        .ok_or_else(|| corrupt(what, d))
}

fn optional_time(d: &Document, name: &str) -> Option<SystemTime> {
    d.get(name).and_then(mongo::as_i64).map(from_millis)
}

fn optional_millis(time: Option<SystemTime>) -> Bson {
    time.map_or(Bson::Null, |t| Bson::Int64(to_millis(t)))
}

fn tenant_from(d: &Document) -> Result<TenantRecord> {
    Ok(TenantRecord {
        name: str_field(d, "_id", "tenant")?,
        create_time: time_field(d, "create_time", "tenant")?,
    })
}

fn key_to(k: &KeyRecord) -> Document {
    doc! {
        "_id": &k.id,
        "hash": Bson::Binary(mongodb::bson::Binary {
            subtype: BinarySubtype::Generic,
            bytes: k.hash.clone(),
        }),
        "tenant": &k.tenant,
        "role": k.role.as_str(),
        "label": &k.label,
        "create_time": to_millis(k.create_time),
        "expire_time": optional_millis(k.expire_time),
        "revoke_time": optional_millis(k.revoke_time),
    }
}

fn key_from(d: &Document) -> Result<KeyRecord> {
    Ok(KeyRecord {
        id: str_field(d, "_id", "API key")?,
        hash: d
            .get_binary_generic("hash")
            .map_err(|_| corrupt("API key", d))?
            .clone(),
        tenant: str_field(d, "tenant", "API key")?,
        role: Role::parse(&str_field(d, "role", "API key")?)
            .ok_or_else(|| corrupt("API key", d))?,
        label: str_field(d, "label", "API key")?,
        create_time: time_field(d, "create_time", "API key")?,
        expire_time: optional_time(d, "expire_time"),
        revoke_time: optional_time(d, "revoke_time"),
    })
}

fn audit_from(d: &Document) -> Result<AuditRecord> {
    let field = |name| str_field(d, name, "audit");
    Ok(AuditRecord {
        time: Some(time_field(d, "time", "audit")?),
        action: field("action")?,
        outcome: field("outcome")?,
        key_id: field("key_id")?,
        tenant: field("tenant")?,
        peer: field("peer")?,
        method: field("method")?,
        detail: field("detail")?,
    })
}

fn bad_token() -> Error {
    Error::invalid("page_token", "not a token from a previous page")
}

/// Reads a `"<ms>:<rest>"` page token.
fn split_token(token: &str) -> Result<(i64, &str)> {
    let (ms, rest) = token.split_once(':').ok_or_else(bad_token)?;
    Ok((ms.parse().map_err(|_| bad_token())?, rest))
}

/// Everything that sorts after (`field`, `_id`) = (`ms`, `id`) in descending order.
fn older_than(field: &str, ms: i64, id: Bson) -> Document {
    doc! { "$or": [
        { field: { "$lt": ms } },
        { field: ms, "_id": { "$lt": id } },
    ] }
}

/// Runs `find` with `sort` and one more than `limit`, so the caller knows if a page follows.
async fn find_page(
    coll: &Collection<Document>,
    filter: Document,
    sort: Document,
    limit: usize,
) -> Result<(Vec<Document>, bool)> {
    let options = FindOptions::builder()
        .sort(sort)
        .limit(limit as i64 + 1)
        .build();
    let mut docs: Vec<Document> = coll
        .find(filter)
        .with_options(options)
        .await?
        .try_collect()
        .await?;
    let more = docs.len() > limit;
    docs.truncate(limit);
    Ok((docs, more))
}

#[tonic::async_trait]
impl EdgeStore for MongoStore {
    async fn create_tenant(&self, name: &str, at: SystemTime) -> Result<TenantRecord> {
        let record = TenantRecord {
            name: name.to_owned(),
            create_time: from_millis(to_millis(at)),
        };
        insert_new(
            &self.tenants,
            doc! { "_id": name, "create_time": to_millis(at) },
            || format!("tenant {name:?} already exists"),
        )
        .await?;
        Ok(record)
    }

    async fn get_tenant(&self, name: &str) -> Result<Option<TenantRecord>> {
        self.tenants
            .find_one(doc! { "_id": name })
            .await?
            .as_ref()
            .map(tenant_from)
            .transpose()
    }

    async fn list_tenants(&self, token: &str, limit: usize) -> Result<Page<TenantRecord>> {
        let (docs, more) = find_page(
            &self.tenants,
            doc! { "_id": { "$gt": token } },
            doc! { "_id": 1 },
            limit,
        )
        .await?;
        let items = docs.iter().map(tenant_from).collect::<Result<Vec<_>>>()?;
        let next = match items.last() {
            Some(t) if more => t.name.clone(),
            _ => String::new(),
        };
        Ok(Page { items, next })
    }

    async fn insert_key(&self, key: &KeyRecord) -> Result<()> {
        insert_new(&self.keys, key_to(key), || {
            format!("API key {} already exists", key.id)
        })
        .await
    }

    async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        self.keys
            .find_one(doc! { "_id": id })
            .await?
            .as_ref()
            .map(key_from)
            .transpose()
    }

    async fn list_keys(
        &self,
        tenant: Option<&str>,
        token: &str,
        limit: usize,
    ) -> Result<Page<KeyRecord>> {
        // Token: "<create_time ms>:<id>" of the last key of the previous page, as in SQLite.
        let mut filter = if token.is_empty() {
            Document::new()
        } else {
            let (ms, id) = split_token(token)?;
            older_than("create_time", ms, Bson::String(id.to_owned()))
        };
        if let Some(tenant) = tenant {
            filter.insert("tenant", tenant);
        }
        let (docs, more) = find_page(
            &self.keys,
            filter,
            doc! { "create_time": -1, "_id": -1 },
            limit,
        )
        .await?;
        let items = docs.iter().map(key_from).collect::<Result<Vec<_>>>()?;
        let next = match items.last() {
            Some(k) if more => format!("{}:{}", to_millis(k.create_time), k.id),
            _ => String::new(),
        };
        Ok(Page { items, next })
    }

    async fn revoke_key(&self, id: &str, at: SystemTime) -> Result<Option<KeyRecord>> {
        // Only a key not revoked yet is updated, so the first revocation counts.
        let revoked = self
            .keys
            .find_one_and_update(
                doc! { "_id": id, "revoke_time": Bson::Null },
                doc! { "$set": { "revoke_time": to_millis(at) } },
            )
            .return_document(ReturnDocument::After)
            .await?;
        match revoked {
            Some(d) => key_from(&d).map(Some),
            None => self.get_key(id).await,
        }
    }

    async fn append_audit(&self, events: &[AuditRecord]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let docs = events.iter().map(|e| {
            doc! {
                // Made here, in order, so that events of one millisecond keep their order.
                "_id": ObjectId::new(),
                "time": to_millis(e.time.unwrap_or_else(SystemTime::now)),
                "action": &e.action,
                "outcome": &e.outcome,
                "key_id": &e.key_id,
                "tenant": &e.tenant,
                "peer": &e.peer,
                "method": &e.method,
                "detail": &e.detail,
            }
        });
        self.audit.insert_many(docs).ordered(true).await?;
        Ok(())
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        token: &str,
        limit: usize,
    ) -> Result<Page<AuditRecord>> {
        // Token: "<time ms>:<object id>" of the last event of the previous page.
        let mut query = if token.is_empty() {
            Document::new()
        } else {
            let (ms, id) = split_token(token)?;
            let id = ObjectId::parse_str(id).map_err(|_| bad_token())?;
            older_than("time", ms, Bson::ObjectId(id))
        };
        for (name, value) in [
            ("action", &filter.action),
            ("tenant", &filter.tenant),
            ("key_id", &filter.key_id),
        ] {
            if let Some(value) = value {
                query.insert(name, value);
            }
        }
        if let Some(since) = filter.since {
            // Beside the token's `$or`, so both hold.
            query.insert("time", doc! { "$gte": to_millis(since) });
        }
        let (docs, more) =
            find_page(&self.audit, query, doc! { "time": -1, "_id": -1 }, limit).await?;
        let items = docs.iter().map(audit_from).collect::<Result<Vec<_>>>()?;
        let next = match (docs.last(), more) {
            (Some(d), true) => format!(
                "{}:{}",
                to_millis(time_field(d, "time", "audit")?),
                d.get_object_id("_id").map_err(|_| corrupt("audit", d))?
            ),
            _ => String::new(),
        };
        Ok(Page { items, next })
    }

    async fn trim_audit(&self, before: SystemTime, keep: usize) -> Result<u64> {
        let old = self
            .audit
            .delete_many(doc! { "time": { "$lt": to_millis(before) } })
            .await?
            .deleted_count;
        // The newest event beyond `keep`: it and everything older go.
        let options = FindOptions::builder()
            .sort(doc! { "time": -1, "_id": -1 })
            .skip(keep as u64)
            .limit(1)
            .build();
        let edge: Option<Document> = self
            .audit
            .find(Document::new())
            .with_options(options)
            .await?
            .try_next()
            .await?;
        let over = match edge {
            Some(d) => {
                let ms = to_millis(time_field(&d, "time", "audit")?);
                let id = d.get_object_id("_id").map_err(|_| corrupt("audit", &d))?;
                self.audit
                    .delete_many(doc! { "$or": [
                        { "time": { "$lt": ms } },
                        { "time": ms, "_id": { "$lte": id } },
                    ] })
                    .await?
                    .deleted_count
            }
            None => 0,
        };
        Ok(old + over)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mongodb::Client;
    use smartdb_kit::testing::MongoServer;

    use super::*;

    fn unique_database() -> String {
        format!("t_{}", uuid::Uuid::new_v4().simple())
    }

    /// A server and a store in a database of its own.
    async fn server_and_store() -> (MongoServer, MongoStore) {
        let server = MongoServer::start();
        let store = MongoStore::open_database(&server.uri, Some(&unique_database()))
            .await
            .unwrap();
        (server, store)
    }

    crate::edge_store_conformance!(server_and_store().await);

    #[tokio::test]
    async fn a_new_database_is_migrated_and_reopening_keeps_the_data() {
        let server = MongoServer::start();
        let name = unique_database();
        let db = Client::with_uri_str(&server.uri)
            .await
            .unwrap()
            .database(&name);
        assert_eq!(schema_version(&db).await.unwrap(), 0);
        {
            let store = MongoStore::open_database(&server.uri, Some(&name))
                .await
                .unwrap();
            store
                .create_tenant("acme", SystemTime::now())
                .await
                .unwrap();
        }
        assert_eq!(schema_version(&db).await.unwrap(), SCHEMA_VERSION);
        let indexes = db
            .collection::<Document>(AUDIT)
            .list_index_names()
            .await
            .unwrap();
        assert!(indexes.len() >= 2, "the audit index exists: {indexes:?}");
        let store = MongoStore::open_database(&server.uri, Some(&name))
            .await
            .unwrap();
        assert!(store.get_tenant("acme").await.unwrap().is_some());
        assert_eq!(schema_version(&db).await.unwrap(), SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn a_database_from_a_newer_release_is_refused() {
        let server = MongoServer::start();
        let name = unique_database();
        let db = Client::with_uri_str(&server.uri)
            .await
            .unwrap()
            .database(&name);
        db.collection::<Document>(META)
            .insert_one(doc! { "_id": "schema", "version": SCHEMA_VERSION + 1 })
            .await
            .unwrap();
        let error = MongoStore::open_database(&server.uri, Some(&name))
            .await
            .err()
            .expect("a newer schema is refused");
        assert!(
            error.to_string().contains("newer release"),
            "names the reason: {error}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_fast_with_a_store_error() {
        // A port nothing listens on: the call fails within the selection timeout, as a store
        // error (UNAVAILABLE at the edge), instead of hanging.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let uri = format!(
            "mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=300"
        );
        let started = std::time::Instant::now();
        let error = MongoStore::open(&uri).await.err().expect("no server");
        assert!(started.elapsed() < Duration::from_secs(5), "{error}");
    }
}
