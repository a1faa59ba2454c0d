//! Originals: each accepted file is streamed to a local temp file as it arrives (hashed and
//! checked on the way, never held whole in memory), made durable, and handed to the
//! [`OriginalStore`] before its document row is committed, so an acknowledged upload can always
//! be indexed again. The embedded default keeps originals as files next to the temp files
//! ([`FileOriginals`]); with MongoDB they go to GridFS ([`gridfs::GridFsOriginals`]), where
//! every ingest-svc replica finds them.
//!
//! Originals no document points at (an upload that crashed midway, a delete whose removal
//! failed) are garbage-collected, starting with [`BlobStore::sweep_start`].
//!
//! Naming (the name says the format, so nothing in the catalog changes): `<id>` is a plain
//! original, `<id>.enc` an encrypted one ([`crate::encryption`]), written when a key is
//! configured. Both stay readable whatever the configuration, so encryption can be turned on
//! for a store that already holds plain originals.

#[cfg(test)]
mod conformance;
pub mod gridfs;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::encryption::{self, Keyring, Sealer};
use crate::error::{Error, Result};

/// Bytes of the start of an upload kept in memory to tell its type and find its title.
pub const PREFIX_BYTES: usize = 64 * 1024;
const TMP_DIR: &str = "tmp";
/// Suffix of encrypted originals.
const SEALED: &str = ".enc";

/// Where finished originals are kept, by name (`<id>` or `<id>.enc`).
#[tonic::async_trait]
pub trait OriginalStore: Send + Sync {
    /// Stores the finished, fsynced file at `file` as `name`, durably, replacing any `name`.
    /// The file may be moved away.
    async fn put(&self, name: &str, file: &Path) -> Result<()>;
    /// The bytes stored as `name`; None if there is none.
    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Whether `name` is stored.
    async fn exists(&self, name: &str) -> Result<bool>;
    /// Removes `name`; a missing one is fine.
    async fn remove(&self, name: &str) -> Result<()>;
    /// Names stored at least `grace` ago.
    async fn older_than(&self, grace: Duration) -> Result<Vec<String>>;
}

/// Originals as files in one directory (the embedded default).
#[derive(Debug, Clone)]
pub struct FileOriginals {
    dir: PathBuf,
}

impl FileOriginals {
    /// Originals in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }
}

#[tonic::async_trait]
impl OriginalStore for FileOriginals {
    async fn put(&self, name: &str, file: &Path) -> Result<()> {
        let (file, dir, target) = (file.to_owned(), self.dir.clone(), self.dir.join(name));
        // Rename, then fsync the directory: the new name is durable before the row commits.
        tokio::task::spawn_blocking(move || -> Result<()> {
            std::fs::rename(&file, target)?;
            std::fs::File::open(&dir)?.sync_all()?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }

    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match tokio::fs::read(self.dir.join(name)).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn exists(&self, name: &str) -> Result<bool> {
        Ok(tokio::fs::try_exists(self.dir.join(name)).await?)
    }

    async fn remove(&self, name: &str) -> Result<()> {
        match tokio::fs::remove_file(self.dir.join(name)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn older_than(&self, grace: Duration) -> Result<Vec<String>> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                if !entry.file_type()?.is_file() {
                    continue;
                }
                if let Some(name) = entry.file_name().to_str()
                    && is_old(&entry.path(), grace)
                {
                    names.push(name.to_owned());
                }
            }
            Ok(names)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }
}

fn is_old(path: &Path, grace: Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age >= grace)
}

/// Originals: a local spool for uploads in flight, and an [`OriginalStore`] for finished ones.
#[derive(Clone)]
pub struct BlobStore {
    /// Temp files of uploads in flight.
    spool: PathBuf,
    originals: Arc<dyn OriginalStore>,
    /// Keys when encryption at rest is on: new originals are encrypted with the first.
    keys: Option<Arc<Keyring>>,
}

impl BlobStore {
    /// Originals as files in `dir` (uploads spool to `dir/tmp`); with `keys`, new originals are
    /// encrypted.
    pub fn open(dir: &Path, keys: Option<Keyring>) -> Result<Self> {
        let originals = Arc::new(FileOriginals::open(dir)?);
        Self::with_originals(dir, originals, keys)
    }

    /// Originals in `originals`; uploads spool to `dir/tmp`.
    pub fn with_originals(
        dir: &Path,
        originals: Arc<dyn OriginalStore>,
        keys: Option<Keyring>,
    ) -> Result<Self> {
        let spool = dir.join(TMP_DIR);
        std::fs::create_dir_all(&spool)?;
        Ok(Self {
            spool,
            originals,
            keys: keys.map(Arc::new),
        })
    }

    /// Starts streaming a new original to a temp file.
    pub async fn writer(&self) -> Result<BlobWriter> {
        let tmp = self.spool.join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::File::create(&tmp).await?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            originals: self.originals.clone(),
            keys: self.keys.clone(),
            sealer: self.keys.as_ref().map(|k| k.sealer()),
            hasher: Sha256::new(),
            size: 0,
            prefix: Vec::new(),
            text: Utf8Stream::default(),
        })
    }

    /// Reads the original of `id` (decrypted if it was stored encrypted).
    pub async fn get(&self, id: &str) -> Result<Vec<u8>> {
        // Each read is a trip to the blocking pool (or the database): look first where this
        // service's own writes go, so the common case takes one.
        if self.keys.is_none()
            && let Some(plain) = self.originals.get(id).await?
        {
            return Ok(plain);
        }
        if let Some(sealed) = self.originals.get(&format!("{id}{SEALED}")).await? {
            return encryption::open(
                self.keys.as_deref(),
                &sealed,
                &format!("the original of document {id}"),
            );
        }
        if self.keys.is_some()
            && let Some(plain) = self.originals.get(id).await?
        {
            return Ok(plain);
        }
        Err(Error::Internal(format!(
            "the original of document {id} is missing"
        )))
    }

    /// Whether the original of `id` is stored encrypted (false also when there is none).
    pub async fn is_encrypted(&self, id: &str) -> Result<bool> {
        self.originals.exists(&format!("{id}{SEALED}")).await
    }

    /// Removes the original of `id`, whichever form it has; a missing one is fine.
    pub async fn remove(&self, id: &str) -> Result<()> {
        self.originals.remove(id).await?;
        self.originals.remove(&format!("{id}{SEALED}")).await
    }

    /// First half of a sweep: removes temp files older than `grace` (uploads that never
    /// finished) and returns how many, with the ids of originals older than `grace`, which the
    /// caller checks against the catalog before removing the unreferenced ones. `grace` must
    /// exceed the longest upload, since an upload stores its original before its row.
    pub async fn sweep_start(&self, grace: Duration) -> Result<(usize, Vec<String>)> {
        let spool = self.spool.clone();
        let removed = tokio::task::spawn_blocking(move || -> Result<usize> {
            let mut removed = 0;
            for entry in std::fs::read_dir(spool)? {
                let path = entry?.path();
                if is_old(&path, grace) && std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let mut candidates: Vec<String> = self
            .originals
            .older_than(grace)
            .await?
            .into_iter()
            .map(|name| name.strip_suffix(SEALED).map(str::to_owned).unwrap_or(name))
            .collect();
        candidates.sort();
        candidates.dedup();
        Ok((removed, candidates))
    }
}

/// An original being written: bytes go to a temp file as they arrive (encrypted on the way
/// when a key is configured), while their hash, size, first bytes and UTF-8 validity are
/// tracked. Dropped without [`BlobWriter::commit`], the temp file is removed.
pub struct BlobWriter {
    file: Option<tokio::fs::File>,
    tmp: PathBuf,
    originals: Arc<dyn OriginalStore>,
    keys: Option<Arc<Keyring>>,
    sealer: Option<Sealer>,
    hasher: Sha256,
    size: u64,
    prefix: Vec<u8>,
    text: Utf8Stream,
}

/// What was learned about an original while it was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// Its first [`PREFIX_BYTES`] bytes.
    pub prefix: Vec<u8>,
    /// Whether it is UTF-8 text; on failure the offset of the first invalid byte.
    pub utf8: std::result::Result<(), u64>,
    /// True if it contains a NUL byte (binary content).
    pub has_nul: bool,
    /// True if it contains anything but ASCII whitespace.
    pub has_content: bool,
}

impl BlobWriter {
    /// Appends `bytes`.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let file = self.file.as_mut().ok_or_else(|| {
            Error::Internal("write to an original that was already finished".into())
        })?;
        match &mut self.sealer {
            Some(sealer) => file.write_all(&sealer.push(bytes)?).await?,
            None => file.write_all(bytes).await?,
        }
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        if self.prefix.len() < PREFIX_BYTES {
            let take = (PREFIX_BYTES - self.prefix.len()).min(bytes.len());
            self.prefix.extend_from_slice(&bytes[..take]);
        }
        self.text.feed(bytes);
        Ok(())
    }

    /// Reads back the finished bytes (decrypted), e.g. to check a format before committing.
    pub fn read_back(&self) -> Result<Vec<u8>> {
        if self.file.is_some() {
            return Err(Error::Internal(
                "an original was read before it was finished".into(),
            ));
        }
        let bytes = std::fs::read(&self.tmp)?;
        match &self.keys {
            Some(keys) => keys.open(&bytes, "an upload being stored"),
            None => Ok(bytes),
        }
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes the bytes durable (still under the temp name) and reports what they are.
    pub async fn finish(&mut self) -> Result<Written> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| Error::Internal("an original was finished twice".into()))?;
        if let Some(sealer) = self.sealer.take() {
            file.write_all(&sealer.finish()?).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        Ok(Written {
            size: self.size,
            sha256: hex::encode(self.hasher.clone().finalize()),
            prefix: self.prefix.clone(),
            utf8: self.text.result(),
            has_nul: self.text.nul,
            has_content: self.text.content,
        })
    }

    /// Stores the finished file as the original of `id`, durably.
    pub async fn commit(self, id: &str) -> Result<()> {
        if self.file.is_some() {
            return Err(Error::Internal(
                "an original was committed before it was finished".into(),
            ));
        }
        let name = match self.keys {
            Some(_) => format!("{id}{SEALED}"),
            None => id.to_owned(),
        };
        // Whatever is left of the temp file afterwards, Drop removes.
        self.originals.put(&name, &self.tmp).await
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Abandoned (failed, refused or deduplicated upload): nothing may stay behind.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// UTF-8 validation of a byte stream that arrives in pieces split anywhere, even inside a
/// character (std validates whole slices only).
#[derive(Debug, Default)]
pub struct Utf8Stream {
    /// Start of a character cut off at the end of the last piece (at most 3 bytes).
    carry: Vec<u8>,
    /// Bytes fed so far.
    offset: u64,
    /// Offset of the first invalid byte, once found.
    error: Option<u64>,
    nul: bool,
    content: bool,
}

impl Utf8Stream {
    /// Takes the next piece.
    pub fn feed(&mut self, piece: &[u8]) {
        if self.error.is_some() {
            self.offset += piece.len() as u64;
            return;
        }
        let mut data = piece;
        if !self.carry.is_empty() {
            let carried = self.carry.len();
            let mut joined = std::mem::take(&mut self.carry);
            let take = (4 - carried).min(data.len());
            joined.extend_from_slice(&data[..take]);
            let consumed = match std::str::from_utf8(&joined) {
                Ok(_) => take,
                Err(e) if e.valid_up_to() >= carried => e.valid_up_to() - carried,
                Err(e) if e.error_len().is_none() => {
                    // Still cut short: the piece was smaller than the rest of the character.
                    self.carry = joined;
                    self.offset += data.len() as u64;
                    return;
                }
                Err(e) => {
                    self.error = Some(self.offset - carried as u64 + e.valid_up_to() as u64);
                    self.offset += data.len() as u64;
                    return;
                }
            };
            self.scan(&data[..consumed]);
            self.offset += consumed as u64;
            data = &data[consumed..];
        }
        match std::str::from_utf8(data) {
            Ok(_) => self.scan(data),
            Err(e) => {
                let valid = e.valid_up_to();
                self.scan(&data[..valid]);
                match e.error_len() {
                    None => self.carry = data[valid..].to_vec(),
                    Some(_) => self.error = Some(self.offset + valid as u64),
                }
            }
        }
        self.offset += data.len() as u64;
    }

    fn scan(&mut self, valid: &[u8]) {
        self.nul |= valid.contains(&0);
        self.content |= valid.iter().any(|b| !b.is_ascii_whitespace());
    }

    /// Ok if everything fed is UTF-8, else the offset of the first invalid byte (a character
    /// cut off at the end counts as invalid).
    pub fn result(&self) -> std::result::Result<(), u64> {
        match self.error {
            Some(offset) => Err(offset),
            None if !self.carry.is_empty() => Err(self.offset - self.carry.len() as u64),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streamed_originals_are_hashed_committed_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), None).unwrap();
        let mut writer = blobs.writer().await.unwrap();
        writer.write(b"hello ").await.unwrap();
        writer.write(b"world").await.unwrap();
        let written = writer.finish().await.unwrap();
        assert_eq!(written.size, 11);
        assert_eq!(written.sha256, hex::encode(Sha256::digest(b"hello world")));
        assert_eq!(written.prefix, b"hello world");
        assert!(written.utf8.is_ok() && written.has_content && !written.has_nul);
        writer.commit("a").await.unwrap();
        assert_eq!(blobs.get("a").await.unwrap(), b"hello world");
        assert_eq!(
            std::fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(),
            0
        );
        blobs.remove("a").await.unwrap();
        blobs.remove("a").await.unwrap();
        assert!(blobs.get("a").await.is_err());
    }

    #[tokio::test]
    async fn with_a_key_originals_are_stored_encrypted_and_plain_ones_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        // A plain original from before encryption was turned on.
        let plain = BlobStore::open(dir.path(), None).unwrap();
        let mut writer = plain.writer().await.unwrap();
        writer.write(b"stored before encryption").await.unwrap();
        writer.finish().await.unwrap();
        writer.commit("old").await.unwrap();

        let keys = Keyring::new(&[[5u8; 32]]).unwrap();
        let blobs = BlobStore::open(dir.path(), Some(keys)).unwrap();
        let text = "a secret sentence, streamed in pieces ".repeat(5000);
        let mut writer = blobs.writer().await.unwrap();
        for piece in text.as_bytes().chunks(7777) {
            writer.write(piece).await.unwrap();
        }
        let written = writer.finish().await.unwrap();
        // Hash, size and prefix describe the plaintext; read_back decrypts.
        assert_eq!(written.size, text.len() as u64);
        assert_eq!(written.sha256, hex::encode(Sha256::digest(text.as_bytes())));
        assert_eq!(&written.prefix[..], &text.as_bytes()[..PREFIX_BYTES]);
        assert_eq!(writer.read_back().unwrap(), text.as_bytes());
        writer.commit("new").await.unwrap();

        assert!(blobs.is_encrypted("new").await.unwrap());
        assert!(!blobs.is_encrypted("old").await.unwrap());
        let on_disk = std::fs::read(dir.path().join("new.enc")).unwrap();
        assert!(!on_disk.windows(16).any(|w| w == b"a secret sentenc"));
        assert_eq!(blobs.get("new").await.unwrap(), text.as_bytes());
        assert_eq!(blobs.get("old").await.unwrap(), b"stored before encryption");
        // Without the key: a clear error, never the ciphertext.
        let err = plain.get("new").await.unwrap_err();
        assert!(
            err.to_string().contains("no encryption key is configured"),
            "{err}"
        );
        // The sweep names documents, whatever the form of their original.
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for name in ["new.enc", "old"] {
            std::fs::File::options()
                .write(true)
                .open(dir.path().join(name))
                .unwrap()
                .set_modified(an_hour_ago)
                .unwrap();
        }
        let (_, mut candidates) = blobs.sweep_start(Duration::from_secs(60)).await.unwrap();
        candidates.sort();
        assert_eq!(candidates, ["new", "old"]);
        blobs.remove("new").await.unwrap();
        blobs.remove("old").await.unwrap();
        assert!(blobs.get("new").await.is_err() && blobs.get("old").await.is_err());
    }

    #[tokio::test]
    async fn an_abandoned_upload_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), None).unwrap();
        let mut writer = blobs.writer().await.unwrap();
        writer.write(b"partial").await.unwrap();
        drop(writer);
        assert_eq!(
            std::fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn sweep_finds_old_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path(), None).unwrap();
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for name in ["kept", "orphan", "tmp/crashed-upload", "fresh-orphan"] {
            let path = dir.path().join(name);
            std::fs::write(&path, b"x").unwrap();
            if name != "fresh-orphan" {
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(an_hour_ago)
                    .unwrap();
            }
        }
        let (removed, mut candidates) = blobs.sweep_start(Duration::from_secs(600)).await.unwrap();
        assert_eq!(removed, 1, "the crashed upload's temp file");
        candidates.sort();
        assert_eq!(candidates, ["kept", "orphan"]);
        blobs.remove("orphan").await.unwrap();
        assert!(dir.path().join("kept").exists());
        assert!(
            dir.path().join("fresh-orphan").exists(),
            "may be an upload in flight"
        );
        assert!(!dir.path().join("orphan").exists());
        assert!(!dir.path().join("tmp/crashed-upload").exists());
    }

    #[test]
    fn utf8_is_checked_across_any_split() {
        let text = "aé€😀 end".as_bytes();
        for cut in 0..=text.len() {
            for second in cut..=text.len() {
                let mut stream = Utf8Stream::default();
                stream.feed(&text[..cut]);
                stream.feed(&text[cut..second]);
                stream.feed(&text[second..]);
                assert_eq!(stream.result(), Ok(()), "split at {cut}/{second}");
            }
        }
        // An invalid byte is found wherever the pieces are cut, at its true offset.
        let mut bad = "aé€".as_bytes().to_vec();
        bad.push(0xff);
        bad.extend_from_slice(b"tail");
        for cut in 0..=bad.len() {
            let mut stream = Utf8Stream::default();
            stream.feed(&bad[..cut]);
            stream.feed(&bad[cut..]);
            assert_eq!(stream.result(), Err(6), "split at {cut}");
        }
        // A character cut off at the very end is not text.
        let mut stream = Utf8Stream::default();
        stream.feed(&"€".as_bytes()[..2]);
        assert_eq!(stream.result(), Err(0));
        let mut stream = Utf8Stream::default();
        stream.feed(b" \n\t");
        assert!(!stream.content);
        stream.feed(b"\0");
        assert!(stream.nul && stream.content);
    }
}
