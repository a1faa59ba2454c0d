//! What the services that keep state in MongoDB share (feature `mongodb`): connecting with
//! bounded timeouts, and schema versions raised step by step like SQLite's `user_version`.

use std::future::Future;
use std::time::Duration;

use mongodb::bson::{Bson, Document, doc};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection, Database};

/// Database used when the URI names none.
pub const DEFAULT_DATABASE: &str = "smartdb";

/// How long to look for a usable server before a call fails, unless the URI says otherwise
/// (the driver's 30 s default would hold every caller that long when MongoDB is down).
pub const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `uri` as `app`, with at most `pool` connections if given (else the URI's or the
/// driver's), and returns database `name`, else the URI's, else [`DEFAULT_DATABASE`].
pub async fn connect(
    uri: &str,
    name: Option<&str>,
    app: &str,
    pool: Option<u32>,
) -> anyhow::Result<Database> {
    let mut options = ClientOptions::parse(uri)
        .await
        .map_err(|e| anyhow::anyhow!("MongoDB URI: {e}"))?;
    options
        .server_selection_timeout
        .get_or_insert(SERVER_SELECTION_TIMEOUT);
    options
        .connect_timeout
        .get_or_insert(SERVER_SELECTION_TIMEOUT);
    if let Some(pool) = pool {
        options.max_pool_size.get_or_insert(pool.max(1));
    }
    options.app_name.get_or_insert_with(|| app.to_owned());
    let name = name
        .map(str::to_owned)
        .or_else(|| options.default_database.clone())
        .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
    Ok(Client::with_options(options)?.database(&name))
}

/// An integer field, whether it was written as 32 or 64 bits (or as a double by a shell).
pub fn as_i64(value: &Bson) -> Option<i64> {
    match value {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Double(v) if v.fract() == 0.0 => Some(*v as i64),
        _ => None,
    }
}

/// The schema version recorded in `meta` (document `schema`); 0 for a new database.
pub async fn schema_version(meta: &Collection<Document>) -> anyhow::Result<i64> {
    Ok(match meta.find_one(doc! { "_id": "schema" }).await? {
        Some(d) => d
            .get("version")
            .and_then(as_i64)
            .ok_or_else(|| anyhow::anyhow!("{}.schema has no version", meta.name()))?,
        None => 0,
    })
}

/// Brings the schema recorded in `meta` to `newest`, running `step(version)` for each version
/// after the recorded one and recording it; refuses a database written by a newer release.
/// Safe when several replicas start at once if every step is idempotent: the recorded version
/// only goes up.
pub async fn migrate<F, Fut>(
    meta: &Collection<Document>,
    newest: i64,
    step: F,
) -> anyhow::Result<()>
where
    F: Fn(i64) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let current = schema_version(meta).await?;
    if current > newest {
        anyhow::bail!(
            "schema version {current} was written by a newer release; this one knows up to \
             {newest}"
        );
    }
    for version in current + 1..=newest {
        step(version).await?;
        meta.update_one(
            doc! { "_id": "schema" },
            doc! { "$max": { "version": version } },
        )
        .upsert(true)
        .await?;
    }
    Ok(())
}
