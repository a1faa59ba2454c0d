//! Originals in MongoDB GridFS (bucket `ingest`: collections `ingest.files` and
//! `ingest.chunks`), next to the MongoDB catalog, so every ingest-svc replica reads what any of
//! them accepted. A file's `_id` is its name (`<id>` or `<id>.enc`).

use std::path::Path;
use std::time::{Duration, SystemTime};

use futures::{AsyncReadExt, AsyncWriteExt, TryStreamExt};
use mongodb::Database;
use mongodb::bson::{Bson, DateTime, doc};
use mongodb::error::{ErrorKind, GridFsErrorKind};
use mongodb::gridfs::GridFsBucket;
use mongodb::options::GridFsBucketOptions;
use tokio::io::AsyncReadExt as _;

use super::OriginalStore;
use crate::error::Result;

/// The bucket's name: its collections are `<name>.files` and `<name>.chunks`.
pub const BUCKET: &str = "ingest";

/// Originals in one GridFS bucket.
#[derive(Clone)]
pub struct GridFsOriginals {
    bucket: GridFsBucket,
}

impl GridFsOriginals {
    /// Originals in bucket [`BUCKET`] of `db`.
    pub fn new(db: &Database) -> Self {
        let options = GridFsBucketOptions::builder()
            .bucket_name(BUCKET.to_owned())
            .build();
        Self {
            bucket: db.gridfs_bucket(options),
        }
    }
}

fn not_found(e: &mongodb::error::Error) -> bool {
    matches!(
        e.kind.as_ref(),
        ErrorKind::GridFs(GridFsErrorKind::FileNotFound { .. })
    )
}

#[tonic::async_trait]
impl OriginalStore for GridFsOriginals {
    async fn put(&self, name: &str, file: &Path) -> Result<()> {
        // A retry after a crash may find an earlier copy: replace it.
        self.remove(name).await?;
        let mut source = tokio::fs::File::open(file).await?;
        let mut upload = self
            .bucket
            .open_upload_stream(name)
            .id(Bson::String(name.to_owned()))
            .await?;
        let mut buffer = vec![0u8; 255 * 1024];
        loop {
            let n = source.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            upload.write_all(&buffer[..n]).await?;
        }
        // The files document is written last, on close: until then readers see no original.
        upload.close().await?;
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let mut download = match self
            .bucket
            .open_download_stream(Bson::String(name.to_owned()))
            .await
        {
            Ok(stream) => stream,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut bytes = Vec::new();
        download.read_to_end(&mut bytes).await?;
        Ok(Some(bytes))
    }

    async fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.bucket.find_one(doc! { "_id": name }).await?.is_some())
    }

    async fn remove(&self, name: &str) -> Result<()> {
        match self.bucket.delete(Bson::String(name.to_owned())).await {
            Err(e) if !not_found(&e) => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn older_than(&self, grace: Duration) -> Result<Vec<String>> {
        let before = DateTime::from_system_time(
            SystemTime::now()
                .checked_sub(grace)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let files: Vec<_> = self
            .bucket
            .find(doc! { "uploadDate": { "$lte": before } })
            .await?
            .try_collect()
            .await?;
        Ok(files
            .into_iter()
            .filter_map(|f| match f.id {
                Bson::String(name) => Some(name),
                _ => None,
            })
            .collect())
    }
}
