//! The text layer of a PDF, page by page (`pdf-extract` on `lopdf`). A PDF whose pages carry no
//! text (scans, images) is an error that says so, rather than a document with nothing to find.

use std::panic::AssertUnwindSafe;

use pdf_extract::{Document, PlainTextOutput};

/// What a PDF holds, as far as indexing cares.
pub struct Pdf {
    /// Text of each page, first page first.
    pub pages: Vec<String>,
    /// The title in the document's information dictionary, if any.
    pub title: Option<String>,
}

/// Opens a PDF and checks it against the page limit, without extracting text (cheap enough to
/// do at upload, so a damaged or oversized file is refused at once). Returns the page count and
/// title.
pub fn inspect(bytes: &[u8], max_pages: usize) -> Result<(usize, Option<String>), String> {
    let doc = open(bytes)?;
    let pages = doc.get_pages().len();
    if pages == 0 {
        return Err("the PDF has no pages".into());
    }
    if pages > max_pages {
        return Err(format!(
            "the PDF has {pages} pages, more than the limit of {max_pages} (limit-pdf-pages)"
        ));
    }
    Ok((pages, info_title(&doc)))
}

/// Extracts the text of every page.
pub fn extract(bytes: &[u8], max_pages: usize, max_text: usize) -> Result<Pdf, String> {
    let doc = open(bytes)?;
    let numbers: Vec<u32> = doc.get_pages().keys().copied().collect();
    if numbers.len() > max_pages {
        return Err(format!(
            "the PDF has {} pages, more than the limit of {max_pages} (limit-pdf-pages)",
            numbers.len()
        ));
    }
    let mut pages = Vec::with_capacity(numbers.len());
    let mut total = 0;
    for number in numbers {
        let mut text = String::new();
        // pdf-extract panics on some malformed content streams instead of returning an error.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut output = PlainTextOutput::new(&mut text);
            pdf_extract::output_doc_page(&doc, &mut output, number)
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("cannot read page {number} of the PDF: {e}")),
            Err(_) => {
                return Err(format!(
                    "cannot read page {number} of the PDF: its content is malformed"
                ));
            }
        }
        let text = tidy(&text);
        total += text.len();
        if total > max_text {
            return Err(format!(
                "the PDF's text is larger than the limit of {} MiB (limit-text-mb)",
                max_text >> 20
            ));
        }
        pages.push(text);
    }
    if pages.iter().all(|p| p.trim().is_empty()) {
        return Err(
            "the PDF has no text layer (its pages are images, e.g. a scan): run OCR on it first"
                .into(),
        );
    }
    Ok(Pdf {
        pages,
        title: info_title(&doc),
    })
}

fn open(bytes: &[u8]) -> Result<Document, String> {
    let loaded = std::panic::catch_unwind(|| Document::load_mem(bytes));
    let mut doc = match loaded {
        Ok(Ok(doc)) => doc,
        Ok(Err(e)) => return Err(format!("the PDF is damaged or truncated: {e}")),
        Err(_) => return Err("the PDF is damaged: it cannot be parsed".into()),
    };
    if doc.is_encrypted() && doc.decrypt("").is_err() {
        return Err("the PDF is encrypted with a password".into());
    }
    Ok(doc)
}

fn info_title(doc: &Document) -> Option<String> {
    let info = doc.trailer.get(b"Info").ok()?;
    let info = match info {
        pdf_extract::Object::Reference(id) => doc.get_dictionary(*id).ok()?,
        pdf_extract::Object::Dictionary(d) => d,
        _ => return None,
    };
    let title = info.get(b"Title").ok()?;
    let text = pdf_extract::decode_text_string(title).ok()?;
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    (!text.is_empty()).then_some(text)
}

/// Lines trimmed, runs of blank lines cut to one.
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_input_is_an_error_not_a_panic() {
        for bytes in [
            &b"%PDF-1.7\n"[..],
            b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF",
            b"%PDF-",
        ] {
            let err = extract(bytes, 10, 1 << 20).err().expect("an error");
            assert!(err.contains("PDF"), "{err}");
            assert!(inspect(bytes, 10).is_err());
        }
    }

    #[test]
    fn tidy_keeps_paragraphs() {
        assert_eq!(tidy("  a \n b\n\n\n\n c  \n"), "a\nb\n\nc");
    }
}
