//! One behaviour for every original store: each check runs against files and against GridFS
//! (a real MongoDB-wire server, see `smartdb_kit::testing::MongoServer`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Runs every check against `originals`, spooling uploads under `spool` (a scratch directory).
pub async fn run(originals: Arc<dyn OriginalStore>, spool: &Path) {
    let file = |name: &str, bytes: &[u8]| {
        let path = spool.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    // Put, read back, replace, remove.
    assert_eq!(originals.get("a").await.unwrap(), None);
    assert!(!originals.exists("a").await.unwrap());
    // Several GridFS chunks (255 KiB each) and a partial one.
    let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    originals.put("a", &file("in-a", &big)).await.unwrap();
    assert_eq!(originals.get("a").await.unwrap().as_deref(), Some(&big[..]));
    assert!(originals.exists("a").await.unwrap());
    originals.put("a", &file("in-a2", b"second")).await.unwrap();
    assert_eq!(
        originals.get("a").await.unwrap().as_deref(),
        Some(&b"second"[..])
    );
    originals.put("b.enc", &file("in-b", b"")).await.unwrap();
    assert_eq!(originals.get("b.enc").await.unwrap(), Some(Vec::new()));
    // Age: everything is at least zero seconds old, nothing an hour.
    let mut all = originals.older_than(Duration::ZERO).await.unwrap();
    all.sort();
    assert_eq!(all, ["a", "b.enc"]);
    assert!(
        originals
            .older_than(Duration::from_secs(3600))
            .await
            .unwrap()
            .is_empty()
    );
    originals.remove("a").await.unwrap();
    originals.remove("a").await.unwrap();
    assert_eq!(originals.get("a").await.unwrap(), None);
    originals.remove("b.enc").await.unwrap();
    assert!(
        originals
            .older_than(Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );

    // Streamed, encrypted uploads on top of it; plain ones stay readable.
    let plain = BlobStore::with_originals(spool, originals.clone(), None).unwrap();
    let mut writer = plain.writer().await.unwrap();
    writer.write(b"stored before encryption").await.unwrap();
    writer.finish().await.unwrap();
    writer.commit("old").await.unwrap();
    let keys = Keyring::new(&[[7u8; 32]]).unwrap();
    let sealed = BlobStore::with_originals(spool, originals.clone(), Some(keys)).unwrap();
    let text = "a secret sentence, streamed in pieces ".repeat(20_000);
    let mut writer = sealed.writer().await.unwrap();
    for piece in text.as_bytes().chunks(65_536) {
        writer.write(piece).await.unwrap();
    }
    writer.finish().await.unwrap();
    writer.commit("new").await.unwrap();
    assert!(sealed.is_encrypted("new").await.unwrap());
    assert!(!sealed.is_encrypted("old").await.unwrap());
    let stored = originals.get("new.enc").await.unwrap().unwrap();
    assert!(!stored.windows(16).any(|w| w == b"a secret sentenc"));
    assert_eq!(sealed.get("new").await.unwrap(), text.as_bytes());
    assert_eq!(
        sealed.get("old").await.unwrap(),
        b"stored before encryption"
    );
    let err = plain.get("new").await.unwrap_err();
    assert!(
        err.to_string().contains("no encryption key is configured"),
        "{err}"
    );
    // The sweep names documents, whatever the form of their original.
    let (_, candidates) = sealed.sweep_start(Duration::ZERO).await.unwrap();
    assert_eq!(candidates, ["new", "old"]);
    sealed.remove("new").await.unwrap();
    sealed.remove("old").await.unwrap();
    assert!(sealed.get("new").await.is_err() && sealed.get("old").await.is_err());
    // No temp file is left behind by committed uploads.
    let spooled = std::fs::read_dir(spool.join(TMP_DIR)).unwrap().count();
    assert_eq!(spooled, 0);
}

#[tokio::test]
async fn files_pass_the_originals_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let originals = Arc::new(FileOriginals::open(&dir.path().join("originals")).unwrap());
    run(originals, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gridfs_passes_the_originals_conformance_suite() {
    let server = smartdb_kit::testing::MongoServer::start();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let client = mongodb::Client::with_uri_str(&server.uri).await.unwrap();
    let db = client.database(&format!("originals_{}", &run_id[..12]));
    let dir = tempfile::tempdir().unwrap();
    run(Arc::new(gridfs::GridFsOriginals::new(&db)), dir.path()).await;
}
