//! The text of a Word document (DOCX), as Markdown: paragraphs, headings (from heading styles
//! or outline levels) as `#` lines, tables one row per line with cells separated by `|`.
//!
//! Read with `zip` and `quick-xml` rather than a DOCX crate: we need only the text of
//! `word/document.xml` and the heading styles, and must bound every byte we unpack (a DOCX is a
//! zip archive, and a zip bomb unpacks kilobytes into gigabytes); the DOCX crates read whole
//! parts into memory before we could check them.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use quick_xml::events::{BytesStart, Event};

const DOCUMENT: &str = "word/document.xml";
const STYLES: &str = "word/styles.xml";
const CORE: &str = "docProps/core.xml";

/// Bounds on unpacking.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most bytes all parts may unpack to.
    pub unpacked: u64,
    /// Most unpacked bytes per packed byte.
    pub ratio: u64,
    /// Most bytes of extracted text.
    pub text: usize,
}

/// What a DOCX holds, as far as indexing cares.
pub struct Docx {
    /// Its text as Markdown.
    pub text: String,
    /// The title in its properties, else its first heading.
    pub title: Option<String>,
}

/// Opens the archive and checks its directory against the bounds (cheap enough to do at
/// upload); returns the title from the document properties, if any.
pub fn inspect(bytes: &[u8], bounds: Bounds) -> Result<Option<String>, String> {
    let mut archive = open(bytes, bounds)?;
    let core = read_part(&mut archive, CORE, bounds.unpacked).ok();
    Ok(core.as_deref().and_then(core_title))
}

/// Extracts the document's text.
pub fn extract(bytes: &[u8], bounds: Bounds) -> Result<Docx, String> {
    let mut archive = open(bytes, bounds)?;
    let styles = match read_part(&mut archive, STYLES, bounds.unpacked) {
        Ok(xml) => heading_styles(&xml),
        Err(_) => HashMap::new(),
    };
    let document = read_part(&mut archive, DOCUMENT, bounds.unpacked)?;
    let (text, first_heading) = document_text(&document, &styles, bounds.text)?;
    let core = read_part(&mut archive, CORE, bounds.unpacked).ok();
    let title = core.as_deref().and_then(core_title).or(first_heading);
    Ok(Docx { text, title })
}

type Archive<'a> = zip::ZipArchive<Cursor<&'a [u8]>>;

fn open(bytes: &[u8], bounds: Bounds) -> Result<Archive<'_>, String> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        format!("the DOCX is damaged or truncated (not a readable zip archive: {e})")
    })?;
    let mut unpacked: u64 = 0;
    let mut has_document = false;
    for i in 0..archive.len() {
        let entry = archive
            .by_index_raw(i)
            .map_err(|e| format!("the DOCX is damaged: {e}"))?;
        unpacked = unpacked.saturating_add(entry.size());
        has_document |= entry.name() == DOCUMENT;
    }
    if !has_document {
        return Err(format!(
            "not a Word document: the zip archive has no {DOCUMENT}"
        ));
    }
    check_unpacked(unpacked, bytes.len() as u64, bounds)?;
    Ok(archive)
}

/// The archive's directory says how large its parts are; a bomb may lie about that, so reads
/// are bounded again in [`read_part`].
fn check_unpacked(unpacked: u64, packed: u64, bounds: Bounds) -> Result<(), String> {
    if unpacked > bounds.unpacked {
        return Err(format!(
            "the DOCX unpacks to {} MiB, more than the limit of {} MiB (limit-unpacked-mb)",
            unpacked >> 20,
            bounds.unpacked >> 20
        ));
    }
    // Small documents compress well too; the ratio matters only where the bytes do.
    if unpacked > (1 << 20) && unpacked / packed.max(1) > bounds.ratio {
        return Err(format!(
            "the DOCX unpacks to {}x its size, more than the limit of {}x (limit-unpack-ratio): a zip bomb?",
            unpacked / packed.max(1),
            bounds.ratio
        ));
    }
    Ok(())
}

fn read_part(archive: &mut Archive<'_>, name: &str, limit: u64) -> Result<String, String> {
    let entry = archive
        .by_name(name)
        .map_err(|e| format!("the DOCX has no readable {name}: {e}"))?;
    let mut bytes = Vec::new();
    entry
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("the DOCX is damaged ({name}: {e})"))?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "{name} in the DOCX unpacks to more than the limit of {} MiB (limit-unpacked-mb)",
            limit >> 20
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("the DOCX is damaged ({name} is not UTF-8)"))
}

/// Heading level per paragraph style id, from `styles.xml`: styles named "heading N" (any
/// language's Word stores the English name) or with an outline level, and "Title".
fn heading_styles(xml: &str) -> HashMap<String, usize> {
    let mut levels = HashMap::new();
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut current: Option<String> = None;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => match e.local_name().as_ref() {
                "style" => current = attr(&e, "styleId"),
                "name" => {
                    if let (Some(id), Some(name)) = (&current, attr(&e, "val")) {
                        let name = name.to_ascii_lowercase();
                        if let Some(n) = name.strip_prefix("heading ")
                            && let Ok(level) = n.trim().parse::<usize>()
                        {
                            levels.insert(id.clone(), level.clamp(1, 6));
                        } else if name == "title" {
                            levels.insert(id.clone(), 1);
                        }
                    }
                }
                "outlineLvl" => {
                    if let (Some(id), Some(level)) = (&current, attr(&e, "val"))
                        && let Ok(level) = level.parse::<usize>()
                        && level < 9
                    {
                        levels.entry(id.clone()).or_insert((level + 1).min(6));
                    }
                }
                _ => {}
            },
            Ok(Event::End(e)) if e.local_name().as_ref() == "style" => current = None,
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    levels
}

/// The body's text as Markdown, and its first heading.
fn document_text(
    xml: &str,
    styles: &HashMap<String, usize>,
    max_text: usize,
) -> Result<(String, Option<String>), String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut out = String::new();
    let mut first_heading = None;
    // The paragraph being read: its text and heading level.
    let mut paragraph = String::new();
    let mut level: Option<usize> = None;
    let mut in_text = false;
    // Tables (possibly nested): the cells of the current row, and the text of the current cell.
    let mut rows: Vec<(Vec<String>, String)> = Vec::new();
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("the DOCX is damaged ({DOCUMENT}: {e})"))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => match e.local_name().as_ref() {
                "p" => {
                    paragraph.clear();
                    level = None;
                }
                "pStyle" => {
                    if let Some(style) = attr(e, "val") {
                        level = styles.get(&style).copied().or(level);
                    }
                }
                "outlineLvl" => {
                    if let Some(l) = attr(e, "val").and_then(|v| v.parse::<usize>().ok())
                        && l < 9
                    {
                        level = Some((l + 1).min(6));
                    }
                }
                // An empty `<w:t/>` holds no text and has no end tag.
                "t" => in_text = matches!(event, Event::Start(_)),
                "tab" => paragraph.push('\t'),
                "br" | "cr" => paragraph.push('\n'),
                "tr" => rows.push((Vec::new(), String::new())),
                "tc" => {
                    if let Some(row) = rows.last_mut() {
                        row.1.clear();
                    }
                }
                _ => {}
            },
            Event::Text(t) if in_text => {
                paragraph.push_str(&t.xml10_content());
            }
            Event::GeneralRef(r) if in_text => {
                // Character and entity references inside text (&amp;, &#169;).
                if let Ok(Some(c)) = r.resolve_char_ref() {
                    paragraph.push(c);
                } else {
                    match r.as_ref() {
                        "amp" => paragraph.push('&'),
                        "lt" => paragraph.push('<'),
                        "gt" => paragraph.push('>'),
                        "quot" => paragraph.push('"'),
                        "apos" => paragraph.push('\''),
                        _ => {}
                    }
                }
            }
            Event::End(e) => match e.local_name().as_ref() {
                "t" => in_text = false,
                "p" => {
                    let text = paragraph.trim();
                    if let Some((_, cell)) = rows.last_mut() {
                        if !text.is_empty() {
                            if !cell.is_empty() {
                                cell.push(' ');
                            }
                            cell.push_str(&collapse(text));
                        }
                    } else if !text.is_empty() {
                        match level {
                            Some(l) => {
                                let heading = collapse(text);
                                if first_heading.is_none() {
                                    first_heading = Some(heading.clone());
                                }
                                out.push_str(&"#".repeat(l));
                                out.push(' ');
                                out.push_str(&heading);
                            }
                            None => out.push_str(text),
                        }
                        out.push_str("\n\n");
                    }
                    paragraph.clear();
                    level = None;
                }
                "tc" => {
                    if let Some((cells, cell)) = rows.last_mut() {
                        cells.push(std::mem::take(cell));
                    }
                }
                "tr" => {
                    if let Some((cells, _)) = rows.pop() {
                        let line = cells.join(" | ");
                        match rows.last_mut() {
                            // A table inside a cell: its rows join the outer cell's text.
                            Some((_, outer)) => {
                                if !outer.is_empty() {
                                    outer.push(' ');
                                }
                                outer.push_str(&line);
                            }
                            None if !line.trim_matches([' ', '|']).is_empty() => {
                                out.push_str(&line);
                                out.push('\n');
                            }
                            None => {}
                        }
                    }
                }
                "tbl" if rows.is_empty() => out.push('\n'),
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
        if out.len() > max_text {
            return Err(format!(
                "the DOCX's text is larger than the limit of {} MiB (limit-text-mb)",
                max_text >> 20
            ));
        }
    }
    Ok((out.trim().to_owned(), first_heading))
}

/// The value of attribute `name` (any namespace prefix).
fn attr(e: &BytesStart<'_>, name: &str) -> Option<String> {
    e.attributes().flatten().find_map(|a| {
        (a.key.local_name().as_ref() == name)
            .then(|| {
                a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                    .ok()
                    .map(|v| v.into_owned())
            })
            .flatten()
    })
}

/// `dc:title` from `docProps/core.xml`.
fn core_title(xml: &str) -> Option<String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut in_title = false;
    let mut title = String::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) if e.local_name().as_ref() == "title" => in_title = true,
            Ok(Event::End(e)) if e.local_name().as_ref() == "title" => break,
            Ok(Event::Text(t)) if in_title => title.push_str(&t.xml10_content()),
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    let title = collapse(&title);
    (!title.is_empty()).then_some(title)
}

fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const BOUNDS: Bounds = Bounds {
        unpacked: 64 << 20,
        ratio: 100,
        text: 1 << 20,
    };

    fn docx(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in parts {
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    const STYLES_XML: &str = r#"<w:styles xmlns:w="w">
<w:style w:type="paragraph" w:styleId="Berschrift1"><w:name w:val="heading 1"/></w:style>
<w:style w:type="paragraph" w:styleId="H2"><w:name w:val="Custom"/><w:pPr><w:outlineLvl w:val="1"/></w:pPr></w:style>
</w:styles>"#;

    const DOCUMENT_XML: &str = r#"<w:document xmlns:w="w"><w:body>
<w:p><w:pPr><w:pStyle w:val="Berschrift1"/></w:pPr><w:r><w:t>Safety</w:t></w:r><w:r><w:t xml:space="preserve"> rules</w:t></w:r></w:p>
<w:p><w:r><w:t>Wear goggles &amp; gloves.</w:t><w:tab/><w:t>Always.</w:t></w:r></w:p>
<w:p><w:pPr><w:pStyle w:val="H2"/></w:pPr><w:r><w:t>Table</w:t></w:r></w:p>
<w:tbl><w:tr><w:tc><w:p><w:r><w:t>Item</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>Limit</w:t></w:r></w:p></w:tc></w:tr>
<w:tr><w:tc><w:p><w:r><w:t>Acid</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>2 l</w:t></w:r></w:p></w:tc></w:tr></w:tbl>
<w:p><w:r><w:t/></w:r></w:p>
<w:p><w:r><w:t>After the table.</w:t></w:r></w:p>
</w:body></w:document>"#;

    #[test]
    fn paragraphs_headings_and_tables_become_markdown() {
        let bytes = docx(&[
            ("[Content_Types].xml", b"<Types/>"),
            (STYLES, STYLES_XML.as_bytes()),
            (DOCUMENT, DOCUMENT_XML.as_bytes()),
        ]);
        let doc = extract(&bytes, BOUNDS).unwrap();
        assert_eq!(
            doc.text,
            "# Safety rules\n\nWear goggles & gloves.\tAlways.\n\n## Table\n\nItem | Limit\nAcid | 2 l\n\nAfter the table."
        );
        assert_eq!(doc.title.as_deref(), Some("Safety rules"));
        assert_eq!(inspect(&bytes, BOUNDS).unwrap(), None);
    }

    #[test]
    fn the_title_property_wins_over_the_first_heading() {
        let bytes = docx(&[
            (DOCUMENT, DOCUMENT_XML.as_bytes()),
            (
                CORE,
                br#"<cp:coreProperties xmlns:dc="dc" xmlns:cp="cp"><dc:title>Lab  handbook</dc:title></cp:coreProperties>"#,
            ),
        ]);
        assert_eq!(
            extract(&bytes, BOUNDS).unwrap().title.as_deref(),
            Some("Lab handbook")
        );
        assert_eq!(
            inspect(&bytes, BOUNDS).unwrap().as_deref(),
            Some("Lab handbook")
        );
    }

    #[test]
    fn zip_bombs_and_other_zips_are_refused_by_the_limit() {
        // 200 MiB of zeros packs into ~200 KiB.
        let zeros = vec![0u8; 200 << 20];
        let bomb = docx(&[(DOCUMENT, &zeros)]);
        let err = inspect(&bomb, BOUNDS).unwrap_err();
        assert!(err.contains("limit-unpacked-mb"), "{err}");
        let err = inspect(
            &bomb,
            Bounds {
                unpacked: 1 << 30,
                ..BOUNDS
            },
        )
        .unwrap_err();
        assert!(err.contains("limit-unpack-ratio"), "{err}");
        let err = extract(&docx(&[("hello.txt", b"hi")]), BOUNDS)
            .err()
            .unwrap();
        assert!(err.contains("not a Word document"), "{err}");
        let err = extract(&bomb[..bomb.len() / 2], BOUNDS).err().unwrap();
        assert!(err.contains("damaged"), "{err}");
    }
}
