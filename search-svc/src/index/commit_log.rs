//! A collection's commit log: what makes an acknowledged write durable between two flushes of
//! its qdrant-edge shard.
//!
//! qdrant-edge 0.7.1 never replays its own WAL, so before this log every write flushed the
//! whole shard before it was acknowledged: about 30 msyncs and 5 fsyncs, over half of
//! search-svc's CPU while ingesting. Now a write group appends its updates here and syncs this
//! one file; the shard is flushed (a checkpoint) once a second at most, or when the log grows
//! large, and the log then starts over. Opening a collection replays what the log holds onto
//! the shard as loaded, then checkpoints. Replaying is safe however much of it the shard
//! already holds: every update sets a point (or removes it) whole, and they are replayed in
//! the order they were acknowledged.
//!
//! Format (`smartdb-commits` in the collection's directory): the 16 bytes of [`MAGIC`], a
//! little-endian u32 format version ([`VERSION`]), then records of a little-endian u32 length,
//! the CRC-32 of the body, and the body: the update in CBOR, the encoding qdrant-edge gives its
//! own WAL records. A record cut short by a crash ends the log; its write was never
//! acknowledged (the log is synced before any write of its group is).

use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use qdrant_edge::UpdateOperation;

use super::edge::{io_error, sync_dir};
use crate::{Error, Result};

/// File name inside the collection's directory.
pub(super) const FILE: &str = "smartdb-commits";
/// First bytes of the file.
const MAGIC: &[u8; 16] = b"smartdb commits\n";
/// Format version this release writes and reads.
const VERSION: u32 = 1;
const HEADER: u64 = MAGIC.len() as u64 + 4;
/// A checkpoint is due once the log holds this much (it is replayed when the collection opens).
const CHECKPOINT_BYTES: u64 = 32 << 20;
/// A record longer than this is not one this release wrote (a batch of 64 points of 4096
/// dimensions with their payloads is a few MB).
const MAX_RECORD: u32 = 1 << 30;

/// An open commit log.
pub(super) struct CommitLog {
    file: File,
    /// Length of the valid log (header and whole records).
    len: u64,
    /// When the shard was last flushed and the log emptied.
    checkpointed: Instant,
    /// A checkpoint is due this long after the last one, if anything was logged since.
    checkpoint_after: Duration,
    /// An append failed midway: the file may end in a torn record, so it is emptied (after a
    /// checkpoint) before anything is appended again.
    dirty: bool,
}

/// An update encoded for the log.
pub(super) struct Record(Vec<u8>);

impl Record {
    /// Encodes `op`.
    pub(super) fn encode(op: &UpdateOperation) -> Result<Self> {
        serde_cbor::to_vec(op)
            .map(Record)
            .map_err(|err| Error::Internal(format!("cannot encode an index update: {err}")))
    }
}

impl CommitLog {
    /// Opens the log in `dir` (creating an empty one if there is none) and returns the updates
    /// it holds, in order. A checkpoint is due `checkpoint_after` after the last.
    pub(super) fn open(
        dir: &Path,
        checkpoint_after: Duration,
    ) -> Result<(Self, Vec<UpdateOperation>)> {
        let path = dir.join(FILE);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error("open", &path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_error("read", &path))?;
        let (ops, len) = if bytes.is_empty() {
            (Vec::new(), 0)
        } else {
            parse(&bytes, &path)?
        };
        let mut log = Self {
            file,
            len,
            checkpointed: Instant::now(),
            checkpoint_after,
            dirty: len < bytes.len() as u64,
        };
        if len == 0 {
            // New (or cut short before its header was whole): write the header, and make the
            // file's name durable too.
            log.reset().map_err(io_error("write", &path))?;
            sync_dir(dir)?;
        } else {
            log.file
                .seek(SeekFrom::Start(len))
                .map_err(io_error("seek", &path))?;
        }
        Ok((log, ops))
    }

    /// Appends `records` and syncs them to disk. After an error the log is no longer appended
    /// to until [`CommitLog::reset`] succeeds: the caller then flushes the shard instead.
    pub(super) fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if self.dirty {
            return Err(io::Error::other(
                "the commit log failed earlier and waits for a checkpoint",
            ));
        }
        if records.is_empty() {
            return Ok(());
        }
        let size: usize = records.iter().map(|r| r.0.len() + 8).sum();
        let mut buf = Vec::with_capacity(size);
        for Record(body) in records {
            let len = u32::try_from(body.len())
                .ok()
                .filter(|&len| len <= MAX_RECORD)
                .ok_or_else(|| io::Error::other("index update too large for the commit log"))?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
            buf.extend_from_slice(body);
        }
        self.dirty = true;
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.dirty = false;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Whether the shard should be flushed (and the log emptied) now.
    pub(super) fn checkpoint_due(&self) -> bool {
        self.dirty
            || self.len >= CHECKPOINT_BYTES
            || (self.len > HEADER && self.checkpointed.elapsed() >= self.checkpoint_after)
    }

    /// Empties the log; only once the shard holding its updates is flushed. An empty log is
    /// left as it is (no write, no sync).
    pub(super) fn reset(&mut self) -> io::Result<()> {
        self.checkpointed = Instant::now();
        if !self.dirty && self.len == HEADER {
            return Ok(());
        }
        self.dirty = true;
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(MAGIC)?;
        self.file.write_all(&VERSION.to_le_bytes())?;
        self.file.sync_data()?;
        self.len = HEADER;
        self.dirty = false;
        Ok(())
    }

    /// Bytes of updates waiting for a checkpoint.
    #[cfg(test)]
    pub(super) fn pending_bytes(&self) -> u64 {
        self.len.saturating_sub(HEADER)
    }
}

/// The updates in a log's `bytes` and the length of its valid part (0 if even the header is
/// incomplete).
fn parse(bytes: &[u8], path: &Path) -> Result<(Vec<UpdateOperation>, u64)> {
    if bytes.len() < HEADER as usize {
        if MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
            return Ok((Vec::new(), 0)); // the header's own write was cut short
        }
        return Err(not_a_log(path));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(not_a_log(path));
    }
    let version = u32::from_le_bytes(bytes[MAGIC.len()..HEADER as usize].try_into().unwrap());
    if version != VERSION {
        return Err(Error::Internal(format!(
            "{}: commit log format {version}, this release reads format {VERSION} (a newer \
             release wrote it: run that one)",
            path.display()
        )));
    }
    let mut ops = Vec::new();
    let mut at = HEADER as usize;
    while let Some(head) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes(head[..4].try_into().unwrap());
        let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
        let Some(body) = bytes.get(at + 8..at + 8 + len as usize) else {
            break; // cut short
        };
        if len > MAX_RECORD || crc32fast::hash(body) != crc {
            break; // torn
        }
        let op = serde_cbor::from_slice(body).map_err(|err| {
            Error::Internal(format!(
                "{}: an index update at byte {at} cannot be read: {err}",
                path.display()
            ))
        })?;
        ops.push(op);
        at += 8 + len as usize;
    }
    if at < bytes.len() {
        tracing::warn!(
            log = %path.display(), bytes = bytes.len() - at,
            "the commit log ends in an incomplete record (a write cut short, never acknowledged); ignoring it"
        );
    }
    Ok((ops, at as u64))
}

fn not_a_log(path: &Path) -> Error {
    Error::Internal(format!("{} is not a smartdb commit log", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qdrant_edge::{PointId, PointOperations};
    use std::fs;

    const HOUR: Duration = Duration::from_secs(3600);

    fn delete(id: u64) -> UpdateOperation {
        UpdateOperation::PointOperation(PointOperations::DeletePoints {
            ids: vec![PointId::NumId(id)],
        })
    }

    fn ids(ops: &[UpdateOperation]) -> Vec<u64> {
        ops.iter()
            .map(|op| match op {
                UpdateOperation::PointOperation(PointOperations::DeletePoints { ids }) => {
                    match ids[0] {
                        PointId::NumId(n) => n,
                        _ => unreachable!(),
                    }
                }
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn updates_come_back_in_order_and_a_reset_empties_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, ops) = CommitLog::open(dir.path(), HOUR).unwrap();
        assert!(ops.is_empty());
        assert!(!log.checkpoint_due(), "an empty log needs no checkpoint");
        let other = tempfile::tempdir().unwrap();
        let (mut soon, _) = CommitLog::open(other.path(), Duration::ZERO).unwrap();
        assert!(!soon.checkpoint_due());
        soon.append(&[Record::encode(&delete(9)).unwrap()]).unwrap();
        assert!(
            soon.checkpoint_due(),
            "anything logged is due once the time is up"
        );
        let records: Vec<Record> = (1..=3)
            .map(|i| Record::encode(&delete(i)).unwrap())
            .collect();
        log.append(&records).unwrap();
        log.append(&[Record::encode(&delete(4)).unwrap()]).unwrap();
        drop(log);
        let (mut log, ops) = CommitLog::open(dir.path(), HOUR).unwrap();
        assert_eq!(ids(&ops), [1, 2, 3, 4]);
        // Appends go after what was there.
        log.append(&[Record::encode(&delete(5)).unwrap()]).unwrap();
        drop(log);
        let (mut log, ops) = CommitLog::open(dir.path(), HOUR).unwrap();
        assert_eq!(ids(&ops), [1, 2, 3, 4, 5]);
        log.reset().unwrap();
        assert_eq!(log.pending_bytes(), 0);
        drop(log);
        assert!(CommitLog::open(dir.path(), HOUR).unwrap().1.is_empty());
    }

    #[test]
    fn a_torn_tail_is_ignored_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = CommitLog::open(dir.path(), HOUR).unwrap();
        log.append(&[Record::encode(&delete(1)).unwrap()]).unwrap();
        log.append(&[Record::encode(&delete(2)).unwrap()]).unwrap();
        drop(log);
        let path = dir.path().join(FILE);
        let full = fs::read(&path).unwrap();
        // Cut within the last record, and separately flip a byte of its body.
        for torn in [full[..full.len() - 3].to_vec(), {
            let mut b = full.clone();
            let last = b.len() - 1;
            b[last] ^= 0xff;
            b
        }] {
            fs::write(&path, &torn).unwrap();
            let (mut log, ops) = CommitLog::open(dir.path(), HOUR).unwrap();
            assert_eq!(ids(&ops), [1]);
            assert!(
                log.checkpoint_due(),
                "a torn log is emptied at the next checkpoint"
            );
            assert!(log.append(&[Record::encode(&delete(3)).unwrap()]).is_err());
            log.reset().unwrap();
            log.append(&[Record::encode(&delete(3)).unwrap()]).unwrap();
            drop(log);
            assert_eq!(ids(&CommitLog::open(dir.path(), HOUR).unwrap().1), [3]);
            fs::write(&path, &full).unwrap();
        }
    }

    #[test]
    fn a_log_of_another_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&2u32.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let err = CommitLog::open(dir.path(), HOUR).err().unwrap().to_string();
        assert!(err.contains("commit log format 2"), "{err}");
        fs::write(&path, b"something else entirely").unwrap();
        let err = CommitLog::open(dir.path(), HOUR).err().unwrap().to_string();
        assert!(err.contains("is not a smartdb commit log"), "{err}");
        // A header cut short is a new log.
        fs::write(&path, &MAGIC[..5]).unwrap();
        let (_, ops) = CommitLog::open(dir.path(), HOUR).unwrap();
        assert!(ops.is_empty());
        assert_eq!(fs::read(&path).unwrap().len() as u64, HEADER);
    }
}
