//! The visible text of an HTML page, as Markdown: headings become `#` lines (so chunks follow
//! the page's sections), paragraphs, list items and table rows their own lines; scripts,
//! styles, navigation and hidden elements are dropped. Parsed by html5ever (through `scraper`),
//! the parser browsers' rules are written for, so broken markup reads as a browser shows it.

use scraper::{Html, Node, Selector};

/// Elements whose content is never visible text, or is navigation rather than content.
const SKIPPED: &[&str] = &[
    "script", "style", "noscript", "template", "nav", "svg", "math", "iframe", "object", "embed",
    "canvas", "head", "select", "button",
];

/// Elements that end a line of text.
const BLOCKS: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "main",
    "header",
    "footer",
    "aside",
    "blockquote",
    "pre",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "table",
    "thead",
    "tbody",
    "tfoot",
    "figure",
    "figcaption",
    "address",
    "details",
    "summary",
    "form",
    "fieldset",
    "hr",
    "caption",
];

/// The page's title: `<title>`, else its first `<h1>`; `None` if it has neither.
pub fn title(html: &str) -> Option<String> {
    let doc = Html::parse_document(html);
    ["title", "h1"].into_iter().find_map(|tag| {
        let selector = Selector::parse(tag).expect("a valid selector");
        doc.select(&selector)
            .map(|e| collapse(&e.text().collect::<String>()))
            .find(|t| !t.is_empty())
    })
}

/// The visible text of `html` as Markdown.
pub fn to_markdown(html: &str) -> String {
    let doc = Html::parse_document(html);
    let mut out = Writer::default();
    walk(doc.tree.root(), &mut out, false);
    out.finish()
}

#[derive(Default)]
struct Writer {
    text: String,
    /// Text of the line being built (collapsed whitespace), not yet in `text`.
    line: String,
}

impl Writer {
    fn push_text(&mut self, t: &str, preformatted: bool) {
        if preformatted {
            for (i, part) in t.split('\n').enumerate() {
                if i > 0 {
                    self.end_line();
                }
                self.line.push_str(part);
            }
            return;
        }
        // Whitespace separates words across elements only where the page has it
        // ("<b>owner</b>." stays "owner.").
        if t.starts_with(char::is_whitespace) && !self.line.is_empty() && !self.line.ends_with(' ')
        {
            self.line.push(' ');
        }
        for (i, word) in t.split_whitespace().enumerate() {
            if i > 0 {
                self.line.push(' ');
            }
            self.line.push_str(word);
        }
        // Keep a space between this text and the next inline element's.
        if t.ends_with(char::is_whitespace) && !self.line.is_empty() && !self.line.ends_with(' ') {
            self.line.push(' ');
        }
    }

    fn end_line(&mut self) {
        let line = self.line.trim_end();
        if !line.is_empty() {
            self.text.push_str(line);
            self.text.push('\n');
        }
        self.line.clear();
    }

    /// Ends the line and leaves a blank line (a paragraph break).
    fn end_block(&mut self) {
        self.end_line();
        if !self.text.is_empty() && !self.text.ends_with("\n\n") {
            self.text.push('\n');
        }
    }

    fn finish(mut self) -> String {
        self.end_block();
        self.text.trim().to_owned()
    }
}

fn walk(node: ego_tree::NodeRef<'_, Node>, out: &mut Writer, preformatted: bool) {
    match node.value() {
        Node::Text(text) => out.push_text(text, preformatted),
        Node::Element(element) => {
            let name = element.name();
            let hidden = element.attr("hidden").is_some()
                || element.attr("aria-hidden") == Some("true")
                || element.attr("role") == Some("navigation");
            if SKIPPED.contains(&name) || hidden {
                return;
            }
            if let Some(level) = heading_level(name) {
                out.end_block();
                let mut inner = Writer::default();
                for child in node.children() {
                    walk(child, &mut inner, false);
                }
                let text = collapse(&inner.finish());
                if !text.is_empty() {
                    out.line = format!("{} {text}", "#".repeat(level));
                    out.end_block();
                }
                return;
            }
            let block = BLOCKS.contains(&name);
            match name {
                "br" => out.end_line(),
                "li" => {
                    out.end_line();
                    out.line.push_str("- ");
                }
                "tr" => out.end_line(),
                "td" | "th" if !out.line.is_empty() && !out.line.ends_with("| ") => {
                    out.line.push_str(" | ");
                }
                _ if block => out.end_block(),
                _ => {}
            }
            let pre = preformatted || name == "pre";
            for child in node.children() {
                walk(child, out, pre);
            }
            match name {
                "li" | "tr" => out.end_line(),
                "table" => out.end_block(),
                _ if block => out.end_block(),
                _ => {}
            }
        }
        Node::Document | Node::Fragment => {
            for child in node.children() {
                walk(child, out, preformatted);
            }
        }
        _ => {}
    }
}

fn heading_level(name: &str) -> Option<usize> {
    match name {
        "h1" => Some(1),
        "h2" => Some(2),
        "h3" => Some(3),
        "h4" => Some(4),
        "h5" => Some(5),
        "h6" => Some(6),
        _ => None,
    }
}

fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"<!DOCTYPE html>
<html><head><title> Ownership  in Rust </title>
<style>body { color: red }</style><script>var secret = "tracking";</script></head>
<body>
<nav><a href="/">Home</a> <a href="/docs">Docs</a></nav>
<div role="navigation">Breadcrumbs</div>
<h1>Ownership</h1>
<p>Each value has an <b>owner</b>.
   When the owner goes out of scope, the value is dropped.</p>
<h2>Borrowing</h2>
<ul><li>Shared references</li><li>Mutable references</li></ul>
<table><tr><th>Kind</th><th>Count</th></tr><tr><td>shared</td><td>many</td></tr></table>
<p hidden>Invisible</p>
<pre>fn main() {
    let s = String::new();
}</pre>
<noscript>Enable JavaScript</noscript>
</body></html>"#;

    #[test]
    fn visible_text_keeps_headings_and_drops_scripts_styles_and_navigation() {
        let text = to_markdown(PAGE);
        assert!(text.starts_with("# Ownership\n"), "{text}");
        assert!(
            text.contains(
                "Each value has an owner. When the owner goes out of scope, the value is dropped."
            ),
            "{text}"
        );
        assert!(text.contains("## Borrowing"), "{text}");
        assert!(
            text.contains("- Shared references\n- Mutable references"),
            "{text}"
        );
        assert!(text.contains("Kind | Count\nshared | many"), "{text}");
        assert!(text.contains("    let s = String::new();"), "{text}");
        for gone in [
            "secret",
            "color",
            "Home",
            "Docs",
            "Breadcrumbs",
            "Invisible",
            "JavaScript",
        ] {
            assert!(!text.contains(gone), "{gone} leaked into: {text}");
        }
    }

    #[test]
    fn the_title_comes_from_the_title_element_or_the_first_heading() {
        assert_eq!(title(PAGE).as_deref(), Some("Ownership in Rust"));
        assert_eq!(
            title("<body><h1>Only <i>a</i> heading</h1></body>").as_deref(),
            Some("Only a heading")
        );
        assert_eq!(title("<p>nothing</p>"), None);
    }

    #[test]
    fn broken_markup_reads_as_a_browser_shows_it() {
        let text = to_markdown("<p>one<p>two <b>bold <i>both</b> after");
        assert_eq!(text, "one\n\ntwo bold both after");
    }
}
