#!/usr/bin/env python3
"""Writes the document-format fixtures of tests/tests/formats.rs with real tools.

    python3 -m pip install python-docx==1.2.0 fpdf2==2.8.9
    python3 tests/data/formats/make.py

(gzip stamps the time into many-pages.pdf.gz, so that one file differs on every run.)

Each good file holds sentences that the test then searches for.
"""
import gzip
import io
import os
import zipfile

import docx
from fpdf import FPDF

HERE = os.path.dirname(os.path.abspath(__file__))


def path(name):
    return os.path.join(HERE, name)


def good_pdf():
    pdf = FPDF()
    pdf.set_title("Glacier field notes")
    pdf.set_font("helvetica", size=12)
    pdf.add_page()
    pdf.multi_cell(0, 8, "Glacier field notes.\n\nThe Okjokull glacier lost its status in 2014 "
                   "because the ice no longer moved under its own weight.")
    pdf.add_page()
    pdf.multi_cell(0, 8, "Meltwater from the Vatnajokull ice cap feeds braided rivers that "
                   "shift their channels every summer.")
    pdf.output(path("good.pdf"))


def image_only_pdf():
    # A scan: pages with pictures and no text layer.
    pdf = FPDF()
    for _ in range(2):
        pdf.add_page()
        pdf.set_fill_color(40, 40, 40)
        pdf.rect(20, 20, 120, 60, style="F")
        pdf.ellipse(60, 100, 80, 40, style="F")
    pdf.output(path("image-only.pdf"))


def many_pages_pdf():
    pdf = FPDF()
    pdf.set_font("helvetica", size=10)
    for i in range(3000):
        pdf.add_page()
        pdf.cell(0, 10, f"page {i + 1}")
    # Gzipped in the repository (108 KiB instead of 1.2 MB); the test unpacks it.
    with gzip.open(path("many-pages.pdf.gz"), "wb", compresslevel=9) as f:
        f.write(bytes(pdf.output()))


def truncated_pdf():
    with open(path("good.pdf"), "rb") as f:
        data = f.read()
    with open(path("truncated.pdf"), "wb") as f:
        f.write(data[: len(data) // 2])


def good_docx():
    d = docx.Document()
    d.core_properties.title = "Beekeeping handbook"
    d.add_heading("Hive inspection", level=1)
    d.add_paragraph("Inspect the brood frames every nine days during the swarming season "
                    "to find queen cells early.")
    d.add_heading("Winter stores", level=2)
    d.add_paragraph("A colony needs about twenty kilograms of capped honey to survive a "
                    "northern winter.")
    table = d.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "Varroa treatment"
    table.cell(0, 1).text = "oxalic acid trickle in December"
    table.cell(1, 0).text = "Entrance reducer"
    table.cell(1, 1).text = "fitted before the first frost"
    d.save(path("good.docx"))


def zip_bomb_docx():
    # A valid-looking DOCX whose document part unpacks to 300 MiB of zeros (~300 KiB packed).
    with open(path("good.docx"), "rb") as f:
        good = zipfile.ZipFile(io.BytesIO(f.read()))
    with zipfile.ZipFile(path("zip-bomb.docx"), "w", zipfile.ZIP_DEFLATED) as out:
        for item in good.infolist():
            if item.filename == "word/document.xml":
                with out.open("word/document.xml", "w", force_zip64=True) as part:
                    chunk = b"\0" * (1 << 20)
                    for _ in range(300):
                        part.write(chunk)
            else:
                out.writestr(item, good.read(item.filename))


def good_html():
    with open(path("good.html"), "w", encoding="utf-8") as f:
        f.write("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Sourdough starter care</title>
<style>.nav { display: flex }</style>
<script>window.analytics = "do not index this tracking snippet";</script></head>
<body><nav class="nav"><a href="/">Home</a> <a href="/recipes">Recipes</a></nav>
<main><h1>Sourdough starter care</h1>
<p>Feed the starter equal weights of rye flour and water twice a day at room temperature.</p>
<h2>Storage</h2>
<p>A starter kept in the refrigerator needs feeding only once a week.</p></main>
<footer>Copyright 2026</footer></body></html>
""")


if __name__ == "__main__":
    good_pdf()
    image_only_pdf()
    many_pages_pdf()
    truncated_pdf()
    good_docx()
    zip_bomb_docx()
    good_html()
