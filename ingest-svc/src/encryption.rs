//! Encryption at rest of originals (optional): a streaming authenticated format, so that an
//! upload is encrypted as it arrives and never held whole in memory.
//!
//! Format, version 1 (a file named `<document id>.enc` in the originals directory):
//!
//! ```text
//! "SMARTDBE" | version (1 byte) | key id (8 bytes) | nonce prefix (19 bytes)
//! segment 0 | segment 1 | ... | last segment
//! ```
//!
//! Segments are the STREAM construction (`aead-stream`, big-endian 32-bit counter with a
//! last-segment flag) over XChaCha20-Poly1305: every segment but the last holds exactly
//! [`SEGMENT`] bytes of plaintext, the last one 0 to [`SEGMENT`] bytes, each followed by its
//! 16-byte tag, and each authenticates the header as associated data. So a flipped byte, a
//! swapped or dropped segment, a truncation at any point and an edited header are all detected.
//! The random 192-bit nonce (prefix + counter) makes one key safe for any number of files.
//!
//! Keys live in a key file, one base64-encoded 32-byte key per line: the first encrypts new
//! originals, the others only decrypt (rotation: put a new key first, keep the old ones until
//! nothing uses them). A key is known by its id, a hash that reveals nothing about it.

use std::collections::HashMap;
use std::path::Path;

use aead_stream::{DecryptorBE32, EncryptorBE32, aead::Payload};
use base64::Engine;
use chacha20poly1305::XChaCha20Poly1305;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SMARTDBE";
const VERSION: u8 = 1;
const NONCE_PREFIX: usize = 19;
const HEADER: usize = MAGIC.len() + 1 + 8 + NONCE_PREFIX;
const TAG: usize = 16;
/// Plaintext bytes per segment.
pub const SEGMENT: usize = 64 * 1024;

/// A key's public name: the first 8 bytes of a domain-separated SHA-256 of it.
type KeyId = [u8; 8];

/// The configured keys: the first encrypts, all decrypt.
#[derive(Clone)]
pub struct Keyring {
    current: KeyId,
    keys: HashMap<KeyId, [u8; 32]>,
}

impl Drop for Keyring {
    // Key material does not outlive its keyring in freed memory.
    fn drop(&mut self) {
        for key in self.keys.values_mut() {
            zeroize::Zeroize::zeroize(key);
        }
    }
}

impl std::fmt::Debug for Keyring {
    // Keys never reach a log line: only their ids.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &hex::encode(self.current))
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn key_id(key: &[u8; 32]) -> KeyId {
    let digest = Sha256::new()
        .chain_update(b"smartdb original encryption key id\0")
        .chain_update(key)
        .finalize();
    digest[..8].try_into().expect("8 of 32 bytes")
}

impl Keyring {
    /// A keyring of `keys`, the first being the one new originals are encrypted with.
    pub fn new(keys: &[[u8; 32]]) -> Result<Self> {
        let first = keys.first().ok_or_else(|| {
            Error::FailedPrecondition("an encryption keyring needs at least one key".into())
        })?;
        Ok(Self {
            current: key_id(first),
            keys: keys.iter().map(|k| (key_id(k), *k)).collect(),
        })
    }

    /// Reads a key file: one base64 key of 32 bytes per line (blank lines and `#` comments
    /// ignored), the first encrypting new originals. Errors name the file and line, never a key.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the encryption key file {}: {e}",
                path.display()
            )
        })?);
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| {
                anyhow::anyhow!(
                    "encryption key file {}, line {}: {why} (each key is 32 random bytes in \
                     base64, e.g. from `openssl rand -base64 32`)",
                    path.display(),
                    n + 1
                )
            };
            let bytes = zeroize::Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(line)
                    .map_err(|_| bad("not base64"))?,
            );
            let key: [u8; 32] = bytes[..]
                .try_into()
                .map_err(|_| bad(&format!("a key of {} bytes, not 32", bytes.len())))?;
            keys.push(key);
        }
        if keys.is_empty() {
            anyhow::bail!("encryption key file {} holds no key", path.display());
        }
        let keyring = Self::new(&keys);
        keys.iter_mut().for_each(zeroize::Zeroize::zeroize);
        Ok(keyring?)
    }

    /// Id (hex) of the key new originals are encrypted with.
    pub fn current_id(&self) -> String {
        hex::encode(self.current)
    }

    /// Starts encrypting one original with the current key.
    pub fn sealer(&self) -> Sealer {
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.push(VERSION);
        header.extend_from_slice(&self.current);
        let mut prefix = [0u8; NONCE_PREFIX];
        rand::rng().fill_bytes(&mut prefix);
        header.extend_from_slice(&prefix);
        let stream = EncryptorBE32::<XChaCha20Poly1305>::new(
            &self.keys[&self.current].into(),
            &prefix.into(),
        );
        Sealer {
            stream,
            header,
            pending: Vec::new(),
            header_written: false,
        }
    }

    /// Decrypts a whole encrypted original; `what` names it in errors.
    pub fn open(&self, sealed: &[u8], what: &str) -> Result<Vec<u8>> {
        open(Some(self), sealed, what)
    }
}

/// Decrypts `sealed` with `keys`; without keys (encryption not configured) or without the key
/// it was written with, the error says so instead of returning anything.
pub fn open(keys: Option<&Keyring>, sealed: &[u8], what: &str) -> Result<Vec<u8>> {
    if sealed.len() < HEADER || &sealed[..MAGIC.len()] != MAGIC {
        return Err(Error::Internal(format!(
            "{what} is damaged: not an encrypted original (its header is missing)"
        )));
    }
    let header = &sealed[..HEADER];
    if header[MAGIC.len()] != VERSION {
        return Err(Error::Internal(format!(
            "{what} is encrypted in format version {}, which this release cannot read",
            header[MAGIC.len()]
        )));
    }
    let id: KeyId = header[MAGIC.len() + 1..MAGIC.len() + 9]
        .try_into()
        .expect("8 bytes");
    let Some(keys) = keys else {
        return Err(Error::FailedPrecondition(format!(
            "{what} is encrypted (key {}) and no encryption key is configured \
             (--encryption-key-file)",
            hex::encode(id)
        )));
    };
    let Some(key) = keys.keys.get(&id) else {
        return Err(Error::FailedPrecondition(format!(
            "{what} is encrypted with key {}, which is not in the configured key file (keys \
             there: current {}, {} in all); add the key it was written with",
            hex::encode(id),
            keys.current_id(),
            keys.keys.len()
        )));
    };
    let prefix: [u8; NONCE_PREFIX] = header[MAGIC.len() + 9..].try_into().expect("19 bytes");
    let mut stream = DecryptorBE32::<XChaCha20Poly1305>::new(&(*key).into(), &prefix.into());
    let damaged = || {
        Error::Internal(format!(
            "{what} is damaged: its encrypted data does not authenticate (altered or truncated)"
        ))
    };
    let mut body = &sealed[HEADER..];
    let mut plain = Vec::with_capacity(body.len());
    while body.len() > SEGMENT + TAG {
        let (segment, rest) = body.split_at(SEGMENT + TAG);
        let part = stream
            .decrypt_next(Payload {
                msg: segment,
                aad: header,
            })
            .map_err(|_| damaged())?;
        plain.extend_from_slice(&part);
        body = rest;
    }
    let last = stream
        .decrypt_last(Payload {
            msg: body,
            aad: header,
        })
        .map_err(|_| damaged())?;
    plain.extend_from_slice(&last);
    Ok(plain)
}

/// Encrypts one original as its bytes arrive: [`Sealer::push`] returns what to append to the
/// file, [`Sealer::finish`] the final bytes.
pub struct Sealer {
    stream: EncryptorBE32<XChaCha20Poly1305>,
    header: Vec<u8>,
    /// Plaintext not yet encrypted: a segment is sealed only once more bytes follow it, since
    /// the last one is sealed differently.
    pending: Vec<u8>,
    header_written: bool,
}

impl Sealer {
    /// Takes the next plaintext bytes; returns the ciphertext ready to be written.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        if !self.header_written {
            out.extend_from_slice(&self.header);
            self.header_written = true;
        }
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while self.pending.len() - start > SEGMENT {
            let sealed = self
                .stream
                .encrypt_next(Payload {
                    msg: &self.pending[start..start + SEGMENT],
                    aad: &self.header,
                })
                .map_err(|_| Error::Internal("an original is too large to encrypt".into()))?;
            out.extend_from_slice(&sealed);
            start += SEGMENT;
        }
        self.pending.drain(..start);
        Ok(out)
    }

    /// Seals what is left; returns the last bytes of the file.
    pub fn finish(self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        if !self.header_written {
            out.extend_from_slice(&self.header);
        }
        let last = self
            .stream
            .encrypt_last(Payload {
                msg: &self.pending,
                aad: &self.header,
            })
            .map_err(|_| Error::Internal("an original is too large to encrypt".into()))?;
        out.extend_from_slice(&last);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> [u8; 32] {
        [byte; 32]
    }

    fn seal(keys: &Keyring, data: &[u8], piece: usize) -> Vec<u8> {
        let mut sealer = keys.sealer();
        let mut out = Vec::new();
        for part in data.chunks(piece.max(1)) {
            out.extend(sealer.push(part).unwrap());
        }
        out.extend(sealer.finish().unwrap());
        out
    }

    #[test]
    fn round_trips_at_every_size_around_segment_boundaries() {
        let keys = Keyring::new(&[key(1)]).unwrap();
        for len in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            2 * SEGMENT,
            3 * SEGMENT + 7,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for piece in [1000, SEGMENT, 3 * SEGMENT + 11] {
                let sealed = seal(&keys, &data, piece);
                assert_eq!(
                    sealed.len(),
                    HEADER + len + TAG * (len.div_ceil(SEGMENT).max(1)),
                    "len {len}"
                );
                assert_eq!(
                    keys.open(&sealed, "x").unwrap(),
                    data,
                    "len {len} / {piece}"
                );
                if len > 64 {
                    assert!(
                        !sealed.windows(64).any(|w| w == &data[..64]),
                        "plaintext visible"
                    );
                }
            }
        }
    }

    #[test]
    fn damage_anywhere_is_detected_never_returned() {
        let keys = Keyring::new(&[key(1)]).unwrap();
        let data = vec![7u8; 2 * SEGMENT + 100];
        let sealed = seal(&keys, &data, 5000);
        // A flipped byte in the header, in a middle segment, in the last tag.
        for at in [
            MAGIC.len() + 10,
            HEADER + 5,
            HEADER + SEGMENT + 20,
            sealed.len() - 1,
        ] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            let err = keys.open(&bad, "the original of d").unwrap_err();
            assert!(
                err.to_string().contains("damaged") || err.to_string().contains("key"),
                "{at}: {err}"
            );
        }
        // Truncated at a segment boundary (the shorter file would otherwise look whole), and
        // in the middle of one.
        for len in [
            HEADER + SEGMENT + TAG,
            HEADER + 2 * (SEGMENT + TAG),
            HEADER + 10,
            3,
        ] {
            let err = keys.open(&sealed[..len], "the original of d").unwrap_err();
            assert!(err.to_string().contains("damaged"), "{len}: {err}");
        }
        // An extra segment appended.
        let mut longer = sealed.clone();
        longer.extend_from_slice(&sealed[HEADER..HEADER + SEGMENT + TAG]);
        assert!(keys.open(&longer, "x").is_err());
    }

    #[test]
    fn rotation_keeps_old_originals_readable_and_wrong_or_missing_keys_are_named() {
        let old = Keyring::new(&[key(1)]).unwrap();
        let sealed_old = seal(&old, b"written under the old key", 4);
        let rotated = Keyring::new(&[key(2), key(1)]).unwrap();
        assert_ne!(rotated.current_id(), old.current_id());
        let sealed_new = seal(&rotated, b"written under the new key", 4);
        assert_eq!(
            rotated.open(&sealed_old, "x").unwrap(),
            b"written under the old key"
        );
        assert_eq!(
            rotated.open(&sealed_new, "x").unwrap(),
            b"written under the new key"
        );
        assert_eq!(
            &sealed_new[MAGIC.len() + 1..MAGIC.len() + 9],
            &key_id(&key(2))
        );
        // The old key alone cannot read the new original, and says which key is missing.
        let err = old.open(&sealed_new, "the original of d").unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert!(
            err.to_string().contains(&rotated.current_id()),
            "names the key: {err}"
        );
        // A wrong key of the same id cannot exist; a wrong keyring is refused by id.
        let wrong = Keyring::new(&[key(9)]).unwrap();
        assert!(matches!(
            wrong.open(&sealed_old, "x"),
            Err(Error::FailedPrecondition(_))
        ));
        // No keys at all.
        let err = open(None, &sealed_old, "the original of d").unwrap_err();
        assert!(
            err.to_string().contains("no encryption key is configured"),
            "{err}"
        );
        // The debug form shows ids, never keys.
        let shown = format!("{rotated:?}");
        assert!(shown.contains(&rotated.current_id()) && !shown.contains("2, 2, 2"));
    }

    #[test]
    fn key_files_are_read_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let b64 = |k: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
        std::fs::write(
            &path,
            format!("# current first\n{}\n\n{}\n", b64(key(2)), b64(key(1))),
        )
        .unwrap();
        let keys = Keyring::load(&path).unwrap();
        assert_eq!(keys.current_id(), hex::encode(key_id(&key(2))));
        assert_eq!(keys.keys.len(), 2);
        std::fs::write(&path, format!("{}\nnot-a-key!\n", b64(key(2)))).unwrap();
        let err = Keyring::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("not base64"),
            "{err}"
        );
        std::fs::write(
            &path,
            base64::engine::general_purpose::STANDARD.encode([1u8; 16]),
        )
        .unwrap();
        let err = Keyring::load(&path).unwrap_err().to_string();
        assert!(err.contains("16 bytes, not 32"), "{err}");
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(
            Keyring::load(&path)
                .unwrap_err()
                .to_string()
                .contains("holds no key")
        );
        assert!(Keyring::load(&dir.path().join("missing")).is_err());
    }
}
