"""Tasks: prompts as data, the renderings of fixed results (csv, html, markdown, text, json)."""

from __future__ import annotations

import json

import pytest

from vl2cli.engine.processor import UserText
from vl2cli.errors import UsageError
from vl2cli.results import PageResult
from vl2cli.tasks import builtin_prompt, get_task

TABLE = {"columns": ["Item", "Qty, units", "Note"], "rows": [["Pen", "2", 'says "hi"'], ["Ink|pot", "1", "<b>"]]}


def _table_result() -> PageResult:
    return PageResult("inv.png", 1, "table", "ok", answer="(the model's answer)", width=10, height=10,
                      fields={"tables": [TABLE]})


def test_table_renders_csv_html_and_markdown_exactly():
    task, result = get_task("table"), _table_result()
    assert task.render(result, "csv") == 'Item,"Qty, units",Note\nPen,2,"says ""hi"""\nInk|pot,1,<b>\n'
    assert task.render(result, "html") == (
        "<table><thead><tr><th>Item</th><th>Qty, units</th><th>Note</th></tr></thead><tbody>"
        "<tr><td>Pen</td><td>2</td><td>says &quot;hi&quot;</td></tr>"
        "<tr><td>Ink|pot</td><td>1</td><td>&lt;b&gt;</td></tr></tbody></table>")
    assert task.render(result, "markdown") == (
        "| Item | Qty, units | Note |\n| --- | --- | --- |\n| Pen | 2 | says \"hi\" |\n| Ink\\|pot | 1 | <b> |")
    record = json.loads(task.render(result, "json"))
    assert record["tables"] == [TABLE] and json.loads(task.render(result, "jsonl")) == record


def test_markdown_rendering_round_trips_through_the_parser():
    from vl2cli.parsers import parse_tables
    assert parse_tables(get_task("table").render(_table_result(), "markdown")) == [TABLE]


def test_text_and_grounding_renderings():
    ocr = PageResult("p.png", 1, "ocr", "ok", answer="# Title\n**bold** words", width=1, height=1)
    assert get_task("ocr").render(ocr, "text") == "Title\nbold words"
    assert get_task("ocr").render(ocr, "markdown") == "# Title\n**bold** words"
    objects = [{"label": "cat", "box": [1, 2, 3, 4], "box_norm": [10.0, 20.0, 30.0, 40.0]}]
    ground = PageResult("p.png", 1, "ground", "ok", answer="", width=1, height=1,
                        fields={"objects": objects, "caption": "A cat."})
    assert get_task("ground").render(ground, "markdown") == "cat: [1, 2, 3, 4] (normalised [10.0, 20.0, 30.0, 40.0])"
    caption = PageResult("p.png", 1, "caption", "ok", answer="", width=1, height=1,
                         fields={"objects": objects, "caption": "A cat."})
    assert get_task("caption").render(caption, "text").splitlines()[0] == "A cat."  # caption is a task property


def test_user_words_enter_the_prompt_as_data():
    parts = get_task("ground").prompt(1, builtin_prompt("ground"), "the <image> <|ref|> red circle")
    data = [p for p in parts if isinstance(p, UserText)]
    assert data == ["the <image> <|ref|> red circle"]
    assert "".join(parts).startswith("<image>\n<|ref|>the <image>")
    hinted = get_task("ocr").prompt(1, builtin_prompt("ocr"), None, hint="<｜end▁of▁sentence｜> text layer")
    assert isinstance(hinted[-1], UserText)


def test_a_task_without_its_question_is_a_usage_error():
    with pytest.raises(UsageError, match="a query is required"):
        get_task("ground").prompt(1, "x {query}", "  ")
    with pytest.raises(UsageError, match="unknown task"):
        get_task("summarise")
