//! Real document formats through the public API (issue 10): PDF, DOCX and HTML files written
//! by real tools (`tests/data/formats/make.py`) are indexed and found by a sentence they hold;
//! broken and hostile files get INVALID_ARGUMENT (or FAILED, for a PDF without a text layer)
//! with a message that names the problem, while the service stays up and nothing else stored
//! is touched.

mod common;

use std::io::Read;
use std::path::PathBuf;

use common::{Cluster, create_kb, get_document};
use smartdb_proto::v1 as pb;
use tonic::Code;

const DOCX: &str = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/formats")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if name.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .expect("gunzip");
        out
    } else {
        bytes
    }
}

async fn upload(
    cluster: &Cluster,
    name: &str,
    content_type: &str,
    bytes: &[u8],
) -> Result<pb::Document, tonic::Status> {
    let header = pb::DocumentHeader {
        knowledge_base: "formats".into(),
        source_name: name.into(),
        content_type: content_type.into(),
        wait: true,
        ..Default::default()
    };
    common::upload(cluster, header, bytes, 1 << 20)
        .await
        .map(|r| r.document.expect("document"))
}

async fn top_hit(cluster: &Cluster, query: &str) -> pb::SearchHit {
    let response = cluster
        .search()
        .await
        .search(pb::SearchRequest {
            knowledge_base: "formats".into(),
            query: query.into(),
            top_k: 3,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("search {query:?}: {s:?}"))
        .into_inner();
    response.hits.into_iter().next().expect("a hit")
}

#[tokio::test(flavor = "multi_thread")]
async fn real_documents_are_found_and_broken_ones_refused_by_name() {
    let cluster = Cluster::start().await;
    create_kb(&cluster, "formats").await;

    // Good files: (name, declared type, detected type, title, sentences it holds with the
    // heading path and the page each is on).
    type Sentence = (&'static str, &'static [&'static str], u32);
    let good: [(&str, &str, &str, &str, &[Sentence]); 3] = [
        (
            "good.pdf",
            "",
            "application/pdf",
            "Glacier field notes",
            &[
                ("The Okjokull glacier lost its status in 2014", &[], 1),
                (
                    "Meltwater from the Vatnajokull ice cap feeds braided rivers",
                    &[],
                    2,
                ),
            ],
        ),
        (
            "good.docx",
            DOCX,
            DOCX,
            "Beekeeping handbook",
            &[
                (
                    "A colony needs about twenty kilograms of capped honey",
                    // The whole short document is one chunk, under the first heading.
                    &["Hive inspection"],
                    0,
                ),
                // A table cell.
                (
                    "Varroa treatment oxalic acid trickle in December",
                    &["Hive inspection"],
                    0,
                ),
            ],
        ),
        (
            "good.html",
            "",
            "text/html",
            "Sourdough starter care",
            &[(
                "A starter kept in the refrigerator needs feeding only once a week",
                &["Sourdough starter care"],
                0,
            )],
        ),
    ];
    let mut stored = Vec::new();
    for (name, declared, detected, title, _) in &good {
        let doc = upload(&cluster, name, declared, &fixture(name))
            .await
            .unwrap_or_else(|s| panic!("{name} refused: {s:?}"));
        assert_eq!(
            doc.status,
            pb::DocumentStatus::Indexed as i32,
            "{name}: {doc:?}"
        );
        assert_eq!(doc.content_type, *detected, "{name}");
        assert_eq!(doc.title, *title, "{name}: the title the document carries");
        assert!(doc.chunk_count >= 1, "{name}: {doc:?}");
        stored.push(doc);
    }
    for ((name, _, _, _, sentences), doc) in good.iter().zip(&stored) {
        for (sentence, headings, page) in *sentences {
            let hit = top_hit(&cluster, sentence).await;
            assert_eq!(hit.document_id, doc.id, "{name}: {sentence:?} -> {hit:?}");
            let first_word = sentence.split_whitespace().nth(1).unwrap();
            assert!(hit.text.contains(first_word), "{name}: {hit:?}");
            // Where the hit came from: the headings it sits under, its page, its byte range.
            let path: Vec<&str> = hit.heading_path.iter().map(String::as_str).collect();
            assert_eq!(path, *headings, "{name}: {hit:?}");
            match page {
                0 => assert_eq!((hit.page_start, hit.page_end), (0, 0), "{name}: {hit:?}"),
                p => assert!(
                    hit.page_start <= *p && *p <= hit.page_end,
                    "{name}: {sentence:?} is on page {p}: {hit:?}"
                ),
            }
            assert_eq!(
                hit.end_offset - hit.start_offset,
                hit.text.len() as u64,
                "{name}: {hit:?}"
            );
        }
    }

    // Plain text and Markdown: the extracted text is the upload itself, so the byte range
    // points into it exactly (here past multi-byte characters), and a chunk deep in a longer
    // Markdown document sits under its section's headings.
    let markdown = format!(
        "# Café guide\n\n{}\n\n## Grinding\n\nA burr grinder gives an even grind for espresso.\n",
        "Intro about café culture, coffee beans and where they grow. ".repeat(60)
    );
    let doc = upload(&cluster, "cafe.md", "text/markdown", markdown.as_bytes())
        .await
        .expect("markdown upload");
    let hit = top_hit(&cluster, "burr grinder even grind espresso").await;
    assert_eq!(hit.document_id, doc.id, "{hit:?}");
    let range = hit.start_offset as usize..hit.end_offset as usize;
    assert_eq!(&markdown[range], hit.text, "{hit:?}");
    assert!(hit.start_offset > 0, "{hit:?}");
    assert_eq!(hit.heading_path, ["Café guide", "Grinding"], "{hit:?}");
    // The HTML page's scripts, styles and navigation were not indexed.
    let hit = top_hit(&cluster, "analytics tracking snippet Home Recipes").await;
    for gone in ["tracking", "Recipes", "display: flex"] {
        assert!(!hit.text.contains(gone), "{gone} was indexed: {hit:?}");
    }

    // Broken and hostile files: (name, declared type, bytes, words the refusal must contain).
    let mut not_docx = b"PK\x03\x04\x14\x00\x00\x00\x00\x00".to_vec();
    not_docx.extend_from_slice(&[0; 20]);
    not_docx.extend_from_slice(b"hello.txt");
    let png = [
        0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R',
    ];
    let refused: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "truncated.pdf",
            "",
            fixture("truncated.pdf"),
            "damaged or truncated",
        ),
        (
            "many-pages.pdf",
            "",
            fixture("many-pages.pdf.gz"),
            "3000 pages, more than the limit of 2000 (limit-pdf-pages)",
        ),
        (
            "zip-bomb.docx",
            "",
            fixture("zip-bomb.docx"),
            "limit-unpacked-mb",
        ),
        (
            "archive.zip",
            "",
            not_docx,
            "unsupported content type application/zip",
        ),
        ("picture.txt", "text/plain", png.to_vec(), "image/png"),
        (
            "notes.txt",
            "application/pdf",
            b"plain words".to_vec(),
            "declared application/pdf but the data is text",
        ),
        (
            "notes.txt",
            "application/x-foo",
            b"plain words".to_vec(),
            "unsupported content type \"application/x-foo\"",
        ),
        (
            "latin1.txt",
            "",
            b"caf\xe9 au lait".to_vec(),
            "not UTF-8 text (invalid byte at offset 3)",
        ),
        ("empty.txt", "", Vec::new(), "empty"),
    ];
    for (name, declared, bytes, words) in &refused {
        let status = upload(&cluster, name, declared, bytes)
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().contains(words),
            "{name}: {:?} does not say {words:?}",
            status.message()
        );
    }

    // A PDF without a text layer is accepted, then FAILED with the reason.
    let scan = upload(&cluster, "image-only.pdf", "", &fixture("image-only.pdf"))
        .await
        .expect("a scan is a valid PDF");
    assert_eq!(scan.status, pb::DocumentStatus::Failed as i32, "{scan:?}");
    assert!(scan.error.contains("no text layer"), "{scan:?}");
    assert_eq!(scan.chunk_count, 0);

    // Nothing else was stored, and what was is untouched and still found.
    let listed = cluster
        .docs()
        .await
        .list_documents(pb::ListDocumentsRequest {
            knowledge_base: "formats".into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner()
        .documents;
    // The three good files, the Markdown one and the image-only PDF (FAILED).
    assert_eq!(listed.len(), 5, "{listed:?}");
    for doc in &stored {
        let now = get_document(&cluster, "formats", &doc.id).await.unwrap();
        assert_eq!(now.status, pb::DocumentStatus::Indexed as i32);
        assert_eq!(now.sha256, doc.sha256);
    }
    let hit = top_hit(&cluster, good[0].4[0].0).await;
    assert_eq!(hit.document_id, stored[0].id);
}

/// ingest-svc sizes a text's candidate chunks from one tokenization of the whole text instead of
/// tokenizing every candidate, and tokenizes ASCII words itself (`smartdb_ingest::chunk`): with
/// the model's real tokenizer, SciFact abstracts, split as text and as Markdown, at the model's
/// budget and a small one, get exactly the chunks that measuring every candidate gives.
#[test]
fn chunks_from_one_tokenization_are_the_chunks_measured_piece_by_piece() {
    use smartdb_embed::model::{MINILM_L6_V2, default_models_dir, ensure_model};
    use smartdb_ingest::chunk::Chunker;
    use smartdb_ingest::extract::ContentType;

    let dir = ensure_model(&default_models_dir(), &MINILM_L6_V2).expect("model files");
    let json = std::fs::read_to_string(dir.join("tokenizer.json")).expect("tokenizer.json");
    let bytes = smartdb_kit::limits::Limits::default().chunk_bytes;
    let fast = Chunker::from_json(&json, MINILM_L6_V2.max_tokens, bytes).unwrap();
    let exact = Chunker::from_json(&json, MINILM_L6_V2.max_tokens, bytes)
        .unwrap()
        .measuring_each_piece();
    let corpus = common::scifact();
    let mut chunks = 0;
    for (id, text) in corpus.iter().take(300) {
        let split = fast.split(text, ContentType::Plain, &[]);
        assert_eq!(split, exact.split(text, ContentType::Plain, &[]), "{id}");
        chunks += split.len();
    }
    assert!(chunks > 400, "{chunks} chunks: most abstracts need two");
    // A small budget makes many more cuts, each a count to get right (words of ASCII letters
    // are counted without the tokenizer's pipeline, the rest with it).
    let small = Chunker::from_json(&json, 40, bytes).unwrap();
    let small_exact = Chunker::from_json(&json, 40, bytes)
        .unwrap()
        .measuring_each_piece();
    for (id, text) in corpus.iter().skip(1000).take(200) {
        let split = small.split(text, ContentType::Plain, &[]);
        assert_eq!(
            split,
            small_exact.split(text, ContentType::Plain, &[]),
            "{id}"
        );
    }
    let long: String = corpus[300..340]
        .iter()
        .map(|(id, text)| format!("## Abstract {id}\n\n{text}\n\n"))
        .collect();
    let split = fast.split(&long, ContentType::Markdown, &[]);
    assert!(split.len() > 40);
    assert_eq!(split, exact.split(&long, ContentType::Markdown, &[]));
}
