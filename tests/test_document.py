"""Document output: one block layout for every model, page furniture (found or labelled) left out of the text and
kept in the record, math delimiters, merged table cells, and page breaks joined in the whole-document file."""

from __future__ import annotations

import json
from pathlib import Path

from testkit import text_pdf

from tests.helpers import assert_valid_record, vl2
from vl2cli.document import document_text, join_page_breaks, settle_furniture
from vl2cli.layout import find_furniture, markdown_blocks, normalize_math
from vl2cli.parsers import parse_tables, table_to_csv, table_to_html
from vl2cli.results import PageResult
from vl2cli.tasks import get_task

HEADER = "ACME Quarterly Report 2024"
BODIES = ["Revenue grew as planned.", "Costs fell in every region.", "The outlook is unchanged."]


def _report_pdf(path: Path, pages: int = 3) -> Path:
    path.write_bytes(text_pdf("", size=12, page_lines=[[HEADER, BODIES[i - 1], f"Page {i} of {pages}"]
                                                       for i in range(1, pages + 1)]))
    return path


def _ocr_result(answer: str, page: int = 1, source: str = "d.pdf") -> PageResult:
    fields, _ = get_task("ocr").parse(answer, (1000, 1400), None)
    return PageResult(source, page, "ocr", "ok", answer=answer, width=1000, height=1400, fields=fields)


def test_text_layer_furniture_is_left_out_of_every_text_output_and_kept_in_the_records(tmp_path):
    pdf = _report_pdf(tmp_path / "report.pdf")
    out = tmp_path / "out"
    assert vl2("ocr", str(pdf), "--text-layer", "only", "--out", str(out)).exit_code == 0
    whole = (out / "report.pdf.ocr.md").read_text()
    assert all(body in whole for body in BODIES)
    assert HEADER not in whole and "Page 2 of 3" not in whole
    page_md = (out / "report.pdf.p0002.ocr.md").read_text()
    assert BODIES[1] in page_md and HEADER not in page_md and "of 3" not in page_md
    record = json.loads((out / "report.pdf.p0002.ocr.json").read_text())
    assert_valid_record(record)
    assert record["answer"].startswith(HEADER)  # the record keeps what was read
    assert [(f["label"], f["text"]) for f in record["furniture"]] == [("page_header", HEADER),
                                                                      ("page_number", "Page 2 of 3")]
    assert [b["label"] for b in record["blocks"]] == ["page_header", "text", "page_number"]
    assert [b["order"] for b in record["blocks"]] == [0, 1, 2] and record["blocks"][1]["box"] is None

    kept = vl2("ocr", str(pdf), "--text-layer", "only", "--out", str(out), "--keep-furniture")  # resumed: nothing read
    assert kept.exit_code == 0
    assert HEADER in (out / "report.pdf.ocr.md").read_text() and "Page 2 of 3" in (out / "report.pdf.p0002.ocr.md").read_text()

    printed = vl2("ocr", str(pdf), "--text-layer", "only")
    assert printed.exit_code == 0 and BODIES[2] in printed.stdout and HEADER not in printed.stdout
    printed_kept = vl2("ocr", str(pdf), "--text-layer", "only", "--keep-furniture", "-f", "text")
    assert printed_kept.stdout.count(HEADER) == 3
    records = json.loads(vl2("ocr", str(pdf), "--text-layer", "only", "--json").stdout)
    assert [len(r["furniture"]) for r in records] == [2, 2, 2]


def test_a_one_page_document_keeps_everything(tmp_path):
    pdf = _report_pdf(tmp_path / "one.pdf", pages=1)
    printed = vl2("ocr", str(pdf), "--text-layer", "only", "--json")
    record = json.loads(printed.stdout)[0]
    assert record["furniture"] == [] and {b["label"] for b in record["blocks"]} == {"text"}
    assert HEADER in vl2("ocr", str(pdf), "--text-layer", "only").stdout


def test_furniture_is_found_up_to_varying_digits_at_the_top_and_bottom_only():
    bodies = ["Alpha text.", "Beta words here.", "Gamma rays.", "Delta of a river."]
    pages = [markdown_blocks(f"Annual Report {2020 + i} - Chapter {i}\n\n{body}\n\nAnnual Report 2020\n\n{i}")
             for i, body in enumerate(bodies, start=1)]
    found = find_furniture(pages)
    assert [b["label"] for b in found[0]] == ["page_header", "text", "page_footer", "page_number"]
    # a line repeated in the middle of pages is content, however often it recurs
    middle = [markdown_blocks(f"{first}\n\nSee the table below.\n\n{last}") for first, last in
              [("One.", "Red."), ("Two things.", "Green leaves."), ("Three ways.", "Blue sky."), ("Four.", "Black.")]]
    assert all(b["label"] == "text" for page in find_furniture(middle) for b in page)
    # two lines on a page that merely look alike across only one page are not furniture
    assert all(b["label"] == "text" for page in find_furniture([markdown_blocks("Alpha"), markdown_blocks("Beta")])
               for b in page)


def test_deepseek_ocr_labels_its_furniture_and_the_markdown_leaves_it_out():
    answer = ("<|ref|>header<|/ref|><|det|>[[50, 10, 950, 40]]<|/det|>\nACME Corp - Annual Report\n"
              "<|ref|>title<|/ref|><|det|>[[50, 60, 950, 100]]<|/det|>\n# Results\n"
              "<|ref|>text<|/ref|><|det|>[[50, 120, 950, 300]]<|/det|>\nSales rose by $5\\%$ to $x_1$.\n"
              "<|ref|>image<|/ref|><|det|>[[100, 320, 900, 600]]<|/det|>\n"
              "<|ref|>footer<|/ref|><|det|>[[50, 960, 950, 990]]<|/det|>\nConfidential\n"
              "<|ref|>page_number<|/ref|><|det|>[[480, 992, 520, 999]]<|/det|>\n7\n")
    result = _ocr_result(answer)
    blocks = result.fields["blocks"]
    assert [b["label"] for b in blocks] == ["page_header", "title", "text", "figure", "page_footer", "page_number"]
    assert [b["tag"] for b in blocks][:4] == ["header", "title", "text", "image"]
    assert blocks[0]["box"] == [50, 14, 950, 56] and blocks[0]["box_norm"] == [50.0, 10.0, 950.0, 40.0]
    assert [f["text"] for f in result.fields["furniture"]] == ["ACME Corp - Annual Report", "Confidential", "7"]
    task = get_task("ocr")
    assert task.render(result, "markdown") == "# Results\n\nSales rose by \\(5\\%\\) to \\(x_1\\)."
    kept = task.render(result, "markdown", keep_furniture=True)
    assert kept.startswith("ACME Corp - Annual Report\n\n# Results") and kept.endswith("Confidential\n\n7")
    record = result.to_json()
    assert record["answer"] == answer  # the raw answer, tags and dollar signs as written
    assert_valid_record(record)
    # the model's labels are final: a document of such pages is not second-guessed across pages
    again = settle_furniture([result, _ocr_result(answer, page=2)])
    assert again[0] is result


def test_math_delimiters_become_mathjax_ones():
    assert normalize_math("inline $a^2+b^2$ and display $$\\int_0^1 f$$") == \
        "inline \\(a^2+b^2\\) and display \\[\\int_0^1 f\\]"
    assert normalize_math("$$\nx = 1\n$$") == "\\[x = 1\\]"
    assert normalize_math("\\begin{equation}E=mc^2\\end{equation}") == "\\[E=mc^2\\]"
    assert normalize_math("\\begin{align*}a&=b\\\\c&=d\\end{align*}") == \
        "\\[\\begin{aligned}a&=b\\\\c&=d\\end{aligned}\\]"
    assert normalize_math("\\[\\begin{aligned}a\\end{aligned}\\]") == "\\[\\begin{aligned}a\\end{aligned}\\]"
    assert normalize_math("already \\(x\\) and \\[y\\]") == "already \\(x\\) and \\[y\\]"
    assert normalize_math("It costs $5 and $10, or $ 3.") == "It costs $5 and $10, or $ 3."  # prices stay prices
    assert normalize_math("code `$x$` and ```\n$$y$$\n``` stay") == "code `$x$` and ```\n$$y$$\n``` stay"
    assert normalize_math("escaped \\$5 and $z$") == "escaped \\$5 and \\(z\\)"


def test_a_vl2_answer_gets_blocks_from_its_markdown():
    answer = ("# Title\n\nIntro paragraph\nwrapped.\n\n## Methods\n\n- one\n- two\n  continued\n1. first\n\n"
              "| a | b |\n|---|---|\n| 1 | 2 |\n\n$$\nE = mc^2\n$$\n\n![chart](x.png)\n\n<table><tr><td>x</td></tr>\n</table>")
    blocks = markdown_blocks(answer)
    assert [b["label"] for b in blocks] == ["title", "text", "section_header", "list_item", "list_item", "list_item",
                                            "table", "formula", "figure", "table"]
    assert blocks[4]["text"] == "- two\n  continued" and blocks[1]["text"] == "Intro paragraph\nwrapped."
    assert all(b["box"] is None and b["tag"] is None for b in blocks)
    rendered = get_task("ocr").render(_ocr_result(answer), "markdown")
    assert "- one\n- two\n  continued\n1. first" in rendered and "\\[E = mc^2\\]" in rendered


def test_html_tables_with_merged_cells_round_trip_through_the_record():
    html = ("<table><tr><th rowspan='2'>Region</th><th colspan='2'>Sales</th></tr><tr><th>2023</th><th>2024</th></tr>"
            "<tr><td>EU</td><td>1</td><td>2</td></tr><tr><td colspan=\"3\">Total 3</td></tr></table>")
    task = get_task("table")
    fields, flags = task.parse(html, (100, 100), None)
    table = fields["tables"][0]
    assert table["columns"] == ["Region", "Sales", ""] and table["rows"][0] == ["", "2023", "2024"]
    assert table["spans"] == [{"row": 0, "col": 0, "rowspan": 2, "colspan": 1},
                              {"row": 0, "col": 1, "rowspan": 1, "colspan": 2},
                              {"row": 3, "col": 0, "rowspan": 1, "colspan": 3}]
    assert flags == ("merged_cells",)
    result = PageResult("t.png", 1, "table", "ok", answer=html, width=100, height=100, flags=flags, fields=fields)
    record = json.loads(task.render(result, "json"))
    assert_valid_record(record)
    assert parse_tables(table_to_html(record["tables"][0])) == [table]  # spans survive record -> HTML -> record
    markdown = task.render(result, "markdown")
    assert markdown.startswith("<table>") and 'rowspan="2"' in markdown  # a markdown table cannot hold it
    assert table_to_csv(table).splitlines()[0] == "Region,Sales,"  # the grid, flattened as the docstring says
    plain = task.parse("| a | b |\n|---|---|\n| 1 | 2 |", (1, 1), None)
    assert plain[1] == () and "spans" not in plain[0]["tables"][0]
    assert task.render(PageResult("t", 1, "table", "ok", answer="", fields=plain[0]), "markdown").startswith("| a |")


def test_the_whole_document_file_joins_a_split_table_and_a_split_paragraph(tmp_path):
    from tests.test_pipeline import folder_sink
    from vl2cli.pages import Source
    from vl2cli.pipeline import PageItem
    answers = ["# Report\n\nThe committee met on Monday and agreed that the budget for the next year should be "
               "increased by a third, subject to the approval of the\n\n| Item | Cost |\n|---|---|\n| Pens | 3 |",
               "| Item | Cost |\n|---|---|\n| Ink | 4 |\n\nboard, which meets in May. The minutes follow.\n\n"
               "A word cut at the foot of the page is hyphen-",
               "ated on the next page.\n\nNew paragraph."]
    # page 1 ends with a table, page 2 opens with its continuation; page 2 ends mid-word, page 3 continues it
    sink, job = folder_sink(tmp_path)
    source = Source("r.pdf", "r.pdf", name="r.pdf", digest="d", numbers=[1, 2, 3])
    for number, answer in enumerate(answers, start=1):
        sink.emit(PageItem(source, number, job.page_key(source, number)), _ocr_result(answer, number, "r.pdf"), None)
    assert sink.close([source]) == ["r.pdf.ocr.md"]
    whole = (tmp_path / "r.pdf.ocr.md").read_text()
    assert "| Pens | 3 |\n| Ink | 4 |" in whole and whole.count("| Item | Cost |") == 1
    assert "hyphenated on the next page." in whole
    assert whole.index("<!-- page 2 -->") < whole.index("hyphenated")
    pages = (tmp_path / "r.pdf.p0002.ocr.md").read_text()
    assert pages.startswith("| Item | Cost |")  # a page's own file stays that page


def test_a_paragraph_cut_mid_sentence_joins_the_next_page_and_a_finished_one_does_not():
    first = _ocr_result("Intro.\n\nThe results, which we report here for the", 1)
    second = _ocr_result("first time, are final.\n\nNext.", 2)
    third = _ocr_result("A sentence that ends.", 3)
    fourth = _ocr_result("Another page.", 4)
    text = document_text([first, second, third, fourth], "markdown")
    assert "for the first time, are final." in text and "ends.\n\n<!-- page 4 -->\nAnother page." in text
    failed = PageResult("d.pdf", 2, "ocr", "failed", error="out of memory")
    assert join_page_breaks([first.fields["blocks"], None, third.fields["blocks"]])[0][-1]["text"].endswith("for the")
    assert "<!-- page 2: out of memory -->" in document_text([first, failed, third], "markdown")


def test_the_library_read_gives_each_document_its_furniture(tmp_path):
    import vl2cli
    from tests.helpers import TINY
    reader = vl2cli.load(TINY, device="cpu", dtype="float32", quant="none")
    first, second = _report_pdf(tmp_path / "a.pdf"), _report_pdf(tmp_path / "b.pdf", pages=2)
    results = vl2cli.read(reader, [str(first), str(second)], options=vl2cli.ReadOptions(text_layer="only"))
    assert [(Path(r.source).name, r.page) for r in results] == [("a.pdf", 1), ("a.pdf", 2), ("a.pdf", 3),
                                                                 ("b.pdf", 1), ("b.pdf", 2)]
    assert all([f["label"] for f in r.fields["furniture"]] == ["page_header", "page_number"] for r in results)
    assert get_task("ocr").render(results[3], "markdown") == BODIES[0]
