//! API keys: `sdb_<id>_<secret>`. The id (64 random bits, hex) is public and finds the stored
//! record; the secret (256 random bits, base64url) is checked against its SHA-256 hash.
//!
//! A plain, unsalted SHA-256 is the right hash here: it protects 256-bit random secrets, which
//! no dictionary covers, so a slow password hash would only slow every call down.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of every key smartdb issues, so that leaked keys are easy to find in code and logs.
pub const PREFIX: &str = "sdb_";
/// Random bytes in a key id.
const ID_BYTES: usize = 8;
/// Random bytes in a key secret.
const SECRET_BYTES: usize = 32;

/// A new key: the text handed to the user once, and what is stored about it.
pub struct NewKey {
    /// The whole key, `sdb_<id>_<secret>`.
    pub key: String,
    /// Its public id.
    pub id: String,
    /// SHA-256 of the secret part.
    pub hash: [u8; 32],
}

/// Makes a key from the operating system's random source.
pub fn generate() -> NewKey {
    let mut rng = rand::rng();
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let id = hex::encode(id);
    let secret = URL_SAFE_NO_PAD.encode(secret);
    NewKey {
        key: format!("{PREFIX}{id}_{secret}"),
        hash: hash(&secret),
        id,
    }
}

/// SHA-256 of a secret (or of a whole key given through configuration).
pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compares two hashes in constant time.
pub fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Splits a presented key into id and secret; `None` if it is not shaped like our keys.
pub fn parse(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == ID_BYTES * 2 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let secret_ok = !secret.is_empty()
        && secret.len() <= 128
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some((id, secret))
}

/// True if `id` looks like a key id (for request validation).
pub fn valid_id(id: &str) -> bool {
    id.len() == ID_BYTES * 2 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The bearer token of an `authorization` header value, if it is one.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_match_their_hash() {
        let key = generate();
        let (id, secret) = parse(&key.key).expect("parses");
        assert_eq!(id, key.id);
        assert!(same_hash(&hash(secret), &key.hash));
        assert!(!same_hash(&hash("other"), &key.hash));
        // 256 bits of secret, 64 of id.
        assert_eq!(secret.len(), 43);
        assert!(valid_id(id));
    }

    #[test]
    fn keys_differ() {
        let a = generate();
        let b = generate();
        assert_ne!(a.key, b.key);
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn malformed_keys_are_rejected() {
        for bad in [
            "",
            "sdb_",
            "sdb__x",
            "sdb_0123456789abcdef_",
            "sdb_0123456789abcde_x",
            "sdb_0123456789abcdeg_x",
            "key_0123456789abcdef_x",
            "sdb_0123456789abcdef_x y",
            "sdb_0123456789abcdef_x\u{e9}",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
        assert_eq!(
            parse("sdb_0123456789abcdef_a-b_c"),
            Some(("0123456789abcdef", "a-b_c"))
        );
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }
}
