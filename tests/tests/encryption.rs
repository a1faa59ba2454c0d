//! Encryption at rest of originals (issue 10, part 7), through the real cluster: with a key file
//! configured, originals are stored encrypted (no plaintext on disk) and still indexed and
//! found; after a key rotation new originals use the new key while old ones stay readable; an
//! original whose key is no longer configured fails with a message naming the key, never with
//! garbage; a bad key file stops the service at start with a message naming the file and line.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use common::{Cluster, create_kb, ingest_text, wait_for_status};
use smartdb_proto::v1 as pb;

const SENTENCE: &str = "The lighthouse keeper logs the fog horn hours in a green ledger";

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/formats")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Uploads fixture `name` into "vault" (64 KiB per message) and waits for its indexing.
async fn upload_file(cluster: &Cluster, name: &str) -> pb::Document {
    let header = pb::DocumentHeader {
        knowledge_base: "vault".into(),
        source_name: name.into(),
        wait: true,
        ..Default::default()
    };
    common::upload(cluster, header, &fixture(name), 1 << 16)
        .await
        .unwrap_or_else(|s| panic!("{name}: {s:?}"))
        .document
        .unwrap()
}

fn write_keys(path: &Path, keys: &[[u8; 32]]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let text: Vec<String> = keys.iter().map(|k| b64.encode(k)).collect();
    std::fs::write(path, text.join("\n") + "\n").unwrap();
    path.to_str().unwrap().to_owned()
}

/// The key id (bytes 9..17 of the header) an encrypted original was written with.
fn key_id_of(file: &Path) -> Vec<u8> {
    let bytes = std::fs::read(file).unwrap();
    assert_eq!(
        &bytes[..8],
        b"SMARTDBE",
        "{} is not encrypted",
        file.display()
    );
    bytes[9..17].to_vec()
}

async fn retry(cluster: &Cluster, id: &str) -> pb::Document {
    cluster
        .docs()
        .await
        .retry_document(pb::RetryDocumentRequest {
            knowledge_base: "vault".into(),
            document_id: id.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("retry {id}: {s:?}"))
        .into_inner()
        .document
        .unwrap();
    wait_for_status(
        cluster,
        "vault",
        id,
        pb::DocumentStatus::Failed,
        Duration::from_secs(60),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn originals_are_encrypted_at_rest_and_keys_rotate() {
    let keys_dir = tempfile::tempdir().unwrap();
    let key_file = keys_dir.path().join("keys");
    let (old_key, new_key) = ([11u8; 32], [22u8; 32]);
    let env = |file: &str| vec![("SMARTDB_INGEST_ENCRYPTION_KEY_FILE", file.to_owned())];
    let start = |data: tempfile::TempDir, file: String| async move {
        let env = env(&file);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Cluster::start_in(data, &[], &env).await
    };

    let cluster = start(
        tempfile::tempdir().unwrap(),
        write_keys(&key_file, &[old_key]),
    )
    .await;
    create_kb(&cluster, "vault").await;
    let text = ingest_text(&cluster, "vault", &format!("{SENTENCE}."), true)
        .await
        .unwrap()
        .document
        .unwrap();
    assert_eq!(text.status, pb::DocumentStatus::Indexed as i32, "{text:?}");
    // A PDF is checked before it is stored (pages, title): that reads the encrypted upload.
    let pdf = upload_file(&cluster, "good.pdf").await;
    assert_eq!(pdf.status, pb::DocumentStatus::Indexed as i32, "{pdf:?}");
    assert_eq!(
        pdf.title, "Glacier field notes",
        "the title read from the PDF"
    );
    // A scan: FAILED (no text layer), kept to be retried under other keys below.
    let scan = upload_file(&cluster, "image-only.pdf").await;
    assert_eq!(scan.status, pb::DocumentStatus::Failed as i32, "{scan:?}");
    assert!(scan.error.contains("no text layer"), "{scan:?}");

    // On disk: only encrypted originals, none holding the plaintext.
    let originals = cluster.data_dir.path().join("ingest/originals");
    for doc in [&text, &pdf, &scan] {
        assert!(
            !originals.join(&doc.id).exists(),
            "{}: a plain original",
            doc.id
        );
        let sealed = originals.join(format!("{}.enc", doc.id));
        let bytes = std::fs::read(&sealed).unwrap();
        assert!(
            !bytes
                .windows(SENTENCE.len())
                .any(|w| w == SENTENCE.as_bytes()),
            "plaintext in {}",
            sealed.display()
        );
    }
    let pdf_bytes = fixture("good.pdf");
    let pdf_sealed = std::fs::read(originals.join(format!("{}.enc", pdf.id))).unwrap();
    assert!(!pdf_sealed.windows(64).any(|w| w == &pdf_bytes[..64]));
    // Indexed from the encrypted originals, so found.
    let hits = common::search(&cluster, "vault", "fog horn hours ledger")
        .await
        .unwrap()
        .hits;
    assert_eq!(
        hits.first().map(|h| h.document_id.as_str()),
        Some(text.id.as_str())
    );
    let hits = common::search(&cluster, "vault", "Okjokull glacier lost its status")
        .await
        .unwrap()
        .hits;
    assert_eq!(
        hits.first().map(|h| h.document_id.as_str()),
        Some(pdf.id.as_str())
    );
    let old_id = key_id_of(&originals.join(format!("{}.enc", text.id)));

    // Rotation: the new key first, the old one kept. New originals use the new key...
    let data = cluster.stop();
    let cluster = start(data, write_keys(&key_file, &[new_key, old_key])).await;
    let later = ingest_text(
        &cluster,
        "vault",
        "Barnacles glue themselves head first.",
        true,
    )
    .await
    .unwrap()
    .document
    .unwrap();
    assert_eq!(
        later.status,
        pb::DocumentStatus::Indexed as i32,
        "{later:?}"
    );
    let new_id = key_id_of(&originals_of(&cluster).join(format!("{}.enc", later.id)));
    assert_ne!(new_id, old_id, "new originals use the new key");
    // ...and an old one is read again with the old key: the scan fails for its own reason.
    let again = retry(&cluster, &scan.id).await;
    assert!(again.error.contains("no text layer"), "{again:?}");

    // Without the old key, reading it is a clear error naming the key, not garbage.
    let data = cluster.stop();
    let cluster = start(data, write_keys(&key_file, &[new_key])).await;
    let refused = retry(&cluster, &scan.id).await;
    assert!(
        refused.error.contains("encrypted with key")
            && refused.error.contains(&hex(&old_id))
            && refused.error.contains("not in the configured key file"),
        "{refused:?}"
    );
    // Everything indexed stays served.
    let hits = common::search(&cluster, "vault", "fog horn hours ledger")
        .await
        .unwrap()
        .hits;
    assert_eq!(
        hits.first().map(|h| h.document_id.as_str()),
        Some(text.id.as_str())
    );
    drop(cluster);

    // A bad key file stops ingest-svc at start, naming the file and line (never the key).
    std::fs::write(&key_file, "bm90IGEga2V5\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::smartdb_bin())
        .args(["serve", "ingest", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data.path())
        .arg("--encryption-key-file")
        .arg(&key_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with a bad key file: {stderr}"
    );
    assert!(
        stderr.contains(key_file.to_str().unwrap()) && stderr.contains("line 1"),
        "{stderr}"
    );
    assert!(stderr.contains("9 bytes, not 32"), "{stderr}");
}

fn originals_of(cluster: &Cluster) -> PathBuf {
    cluster.data_dir.path().join("ingest/originals")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
