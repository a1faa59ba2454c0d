//! Originals on disk: each accepted file is written and fsynced before its document row is
//! committed, so an acknowledged upload can always be indexed again.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::Result;

/// A directory of original files, named by document id.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    /// Opens (creating) the store at `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Writes `bytes` durably under `id`: temp file, fsync, rename, fsync the directory.
    pub fn put(&self, id: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.dir.join("tmp").join(id);
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.path(id))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Reads the original of `id`.
    pub fn get(&self, id: &str) -> Result<Vec<u8>> {
        Ok(std::fs::read(self.path(id))?)
    }

    /// Removes the original of `id`; a missing file is fine.
    pub fn remove(&self, id: &str) -> Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_remove() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        blobs.put("a", b"hello").unwrap();
        assert_eq!(blobs.get("a").unwrap(), b"hello");
        blobs.remove("a").unwrap();
        blobs.remove("a").unwrap();
        assert!(blobs.get("a").is_err());
    }
}
