"""`-f docling`: vl2's pages as a docling-core DoclingDocument that docling-core validates and HybridChunker chunks.

docling-core is the optional extra `vl2cli[docling]`; .ci/run installs it and sets VL2_REQUIRE_DOCLING, so CI fails
instead of skipping when it is missing."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.helpers import vl2
from tests.test_document import BODIES, HEADER, _ocr_result, _report_pdf

try:
    import docling_core  # noqa: F401
    HAVE_DOCLING = True
except ImportError:
    HAVE_DOCLING = False
    if os.environ.get("VL2_REQUIRE_DOCLING"):
        raise

needs_docling = pytest.mark.skipif(not HAVE_DOCLING, reason="docling-core is not installed (pip install 'vl2cli[docling]')")


def _word_chunker(max_tokens: int = 64) -> Any:
    """HybridChunker with a whitespace tokenizer: no tokenizer download (tests never touch a hub)."""
    from docling_core.transforms.chunker.hybrid_chunker import HybridChunker
    from docling_core.transforms.chunker.tokenizer.base import BaseTokenizer

    class Words(BaseTokenizer):
        def count_tokens(self, text: str) -> int:
            return len(text.split())

        def get_max_tokens(self) -> int:
            return max_tokens

        def get_tokenizer(self) -> Any:
            return self.count_tokens

    return HybridChunker(tokenizer=Words())


@needs_docling
def test_docling_document_validates_and_chunks_with_spans_furniture_and_boxes():
    from docling_core.types.doc import ContentLayer, DoclingDocument

    from vl2cli.docling import docling_json
    from vl2cli.document import settle_furniture
    first = ("<|ref|>header<|/ref|><|det|>[[50, 10, 950, 40]]<|/det|>\nACME Corp\n"
             "<|ref|>title<|/ref|><|det|>[[50, 60, 950, 100]]<|/det|>\n# Results\n"
             "<|ref|>sub_title<|/ref|><|det|>[[50, 110, 950, 130]]<|/det|>\n## Sales\n"
             "<|ref|>text<|/ref|><|det|>[[50, 140, 950, 300]]<|/det|>\nSales rose by $5\\%$ in the year.\n"
             "<|ref|>table<|/ref|><|det|>[[50, 320, 950, 600]]<|/det|>\n<table><tr><th rowspan=\"2\">Region</th>"
             "<th colspan=\"2\">Sales</th></tr><tr><th>2023</th><th>2024</th></tr><tr><td>EU</td><td>1</td><td>2</td>"
             "</tr></table>\n"
             "<|ref|>image<|/ref|><|det|>[[100, 620, 900, 900]]<|/det|>\n"
             "<|ref|>equation<|/ref|><|det|>[[100, 910, 900, 950]]<|/det|>\n$$E = mc^2$$\n"
             "<|ref|>page_number<|/ref|><|det|>[[480, 980, 520, 999]]<|/det|>\n1\n")
    second = "- point one\n- point two\n\nClosing words of the report."
    results = settle_furniture([_ocr_result(first, 1), _ocr_result(second, 2)])
    raw = json.loads(docling_json(results))
    doc = DoclingDocument.model_validate(raw)  # docling-core's own validation
    assert doc.name == "d.pdf" and sorted(doc.pages) == [1, 2]
    labels = [item.label.value for item, _ in doc.iterate_items()]
    assert labels[:6] == ["title", "section_header", "text", "table", "picture", "formula"]
    assert "list_item" in labels
    furniture = [item.text for item, _ in doc.iterate_items(included_content_layers={ContentLayer.FURNITURE})
                 if item.content_layer == ContentLayer.FURNITURE]
    assert furniture == ["ACME Corp", "1"]
    table = doc.tables[0]
    spans = {(c.start_row_offset_idx, c.start_col_offset_idx): (c.row_span, c.col_span) for c in table.data.table_cells}
    assert spans[(0, 0)] == (2, 1) and spans[(0, 1)] == (1, 2) and table.data.num_rows == 3
    assert doc.texts[1].prov[0].bbox.t == 84 and doc.texts[1].prov[0].page_no == 1  # page pixels, top-left origin
    assert doc.texts[3].text == "Sales rose by \\(5\\%\\) in the year." and doc.texts[3].orig.startswith("Sales rose by $")
    chunks = list(_word_chunker().chunk(dl_doc=doc))
    text = "\n".join(chunk.text for chunk in chunks)
    assert "Sales rose by" in text and "Closing words of the report." in text and "Region" in text
    assert "ACME Corp" not in text  # the furniture layer is not body text
    assert any("Results" in (chunk.meta.headings or []) for chunk in chunks)
    assert "Closing words" in doc.export_to_markdown()


@needs_docling
def test_docling_format_writes_one_document_beside_the_pages(tmp_path):
    from docling_core.types.doc import DoclingDocument
    pdf = _report_pdf(tmp_path / "report.pdf")
    out = tmp_path / "out"
    result = vl2("ocr", str(pdf), "--text-layer", "only", "-f", "docling", "--out", str(out))
    assert result.exit_code == 0, result.output
    doc = DoclingDocument.model_validate_json((out / "report.pdf.ocr.docling.json").read_text())
    body = [t.text for t in doc.texts if t.content_layer.value == "body"]
    assert body == BODIES and sum(t.text == HEADER for t in doc.texts) == 3
    assert (out / "report.pdf.p0001.ocr.json").exists()  # each page's record beside it
    printed = vl2("ocr", str(pdf), "--text-layer", "only", "-f", "docling")
    assert DoclingDocument.model_validate_json(printed.stdout.strip()).pages.keys() == {1, 2, 3}
    chunks = list(_word_chunker().chunk(dl_doc=doc))
    assert chunks and all(HEADER not in c.text for c in chunks) and BODIES[2] in chunks[-1].text


def test_docling_format_without_docling_core_is_a_usage_error(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_docling(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("docling_core"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_docling)
    result = vl2("ocr", str(_report_pdf(tmp_path / "r.pdf")), "-f", "docling")
    assert result.exit_code == 2 and "pip install 'vl2cli[docling]'" in result.output


@needs_docling
def test_the_documents_endpoint_answers_format_docling_with_the_clis_document(tmp_path):
    import httpx
    from docling_core.types.doc import DoclingDocument

    from tests.helpers import TINY, running_server
    from vl2cli.engine.loading import load_model
    from vl2cli.reader import Reader
    pdf = _report_pdf(tmp_path / "report.pdf")
    with running_server(Reader(load_model(TINY, device="cpu", dtype="float32", quant="none"))) as (url, _):
        response = httpx.post(url + "/v1/documents/ocr", files={"file": ("report.pdf", pdf.read_bytes())},
                              data={"text_layer": "only", "format": "docling"}, timeout=120)
        records = httpx.post(url + "/v1/documents/ocr", files={"file": ("report.pdf", pdf.read_bytes())},
                             data={"text_layer": "only"}, timeout=120).json()
    assert response.status_code == 200, response.text
    doc = DoclingDocument.model_validate_json(response.text)
    assert [t.text for t in doc.texts if t.content_layer.value == "body"] == BODIES
    assert [len(r["furniture"]) for r in records] == [2, 2, 2]  # the records carry the document's furniture too
