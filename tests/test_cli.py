"""End to end through the CLI with the tiny parity checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import CKPT, PARITY
from vl2cli.cli import app

TINY = str(CKPT / "tiny")
IMG = str(PARITY / "images" / "note_300x200.png")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [*args, "--model", TINY, "--max-new-tokens", "12"])


@pytest.mark.parametrize("fmt", ["markdown", "text", "json", "jsonl"])
def test_ocr_formats(fmt):
    result = run("ocr", IMG, "--format", fmt, "--split", "never")
    assert result.exit_code == 0, result.output
    if fmt in ("json", "jsonl"):
        record = json.loads(result.stdout)
        assert record["page"] == 1 and record["task"] == "ocr" and record["generated_tokens"] == 12


@pytest.mark.parametrize("fmt", ["json", "csv", "markdown", "html"])
def test_table_formats(fmt):
    result = run("table", IMG, "--format", fmt)
    assert result.exit_code == 0, result.output


def test_chart_and_ask_and_caption():
    assert run("chart", IMG, "--json").exit_code == 0
    result = run("ask", IMG, IMG, "What differs?", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["question"] == "What differs?"
    assert run("caption", IMG).exit_code == 0


def test_ground_writes_boxes_json_and_png(tmp_path):
    result = run("ground", IMG, "the total", "--out", str(tmp_path / "g"), "--format", "json")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "g" / "note_300x200.png.p0001.json").read_text())
    assert record["task"] == "ground" and "objects" in record


def test_ground_requires_a_query():
    result = run("ground", IMG)
    assert result.exit_code == 2 and "query" in result.output


def test_split_forced_records_bands(tmp_path):
    result = run("ocr", IMG, "--split", "3", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["split"]["bands"] == 3


def test_budget_hit_triggers_auto_split():
    result = run("ocr", IMG, "--json")  # 12 tokens never reach the end token on random weights
    assert json.loads(result.stdout)[0]["split"] == {"bands": 3, "reason": "budget"}


def test_models_lists_variants():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["tiny", "small", "base"]
    assert rows[2]["vram_nf4_gib"] < 20 < rows[2]["vram_bf16_gib"]


def test_offline_missing_model_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    result = runner.invoke(app, ["ocr", IMG, "--model", "small", "--offline"])
    assert result.exit_code == 1
    assert "--model /path/to/checkpoint" in result.output


def test_batch_resume_and_names_never_collide(tmp_path):
    src = tmp_path / "in"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
        Image.open(IMG).save(src / sub / "x.png")
    out = tmp_path / "out"
    first = runner.invoke(app, ["batch", str(src), "--out", str(out), "--model", TINY, "--max-new-tokens", "4",
                                "--json"])
    assert first.exit_code == 0, first.output
    assert (out / "a" / "x.png.p0001.md").exists() and (out / "b" / "x.png.p0001.md").exists()
    assert "vl2: 2/2 pages" in first.stderr  # plain progress lines when stderr is not a terminal
    again = runner.invoke(app, ["batch", str(src), "--out", str(out), "--model", TINY, "--max-new-tokens", "4",
                                "--json"])
    summary = json.loads(again.stdout)
    assert summary["pages_done"] == 0 and summary["pages_skipped"] == 2
    lines = (out / "index.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_text_layer_only_reads_pdf_text(tmp_path):
    from vl2cli.pdfwrite import text_pdf
    pdf = tmp_path / "t.pdf"
    pdf.write_bytes(text_pdf("Invoice 42 total 17.50"))
    result = run("ocr", str(pdf), "--text-layer", "only", "--json")
    assert result.exit_code == 0, result.output
    assert "Invoice 42" in json.loads(result.stdout)[0]["answer"]


def test_ask_writes_its_answer_and_refuses_prompts_over_the_context(tmp_path):
    result = run("ask", IMG, "What is the total?", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "note_300x200.png.ask.json").read_text())
    assert record["question"] == "What is the total?" and record["pages"] == 1
    copies = []
    for i in range(11):
        copies.append(str(tmp_path / f"c{i}.png"))
        Image.open(IMG).save(copies[-1])
    too_many = run("ask", *copies, "Compare them all.")  # 11 untiled images: 11 * 421 > 4096 tokens
    assert too_many.exit_code == 2 and "4096-token context" in too_many.stderr


def test_batch_ground_with_query_writes_boxes_and_jsonl(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", IMG, "--task", "ground", "--question", "the total", "--out", str(out),
                                 "--format", "jsonl", "--model", TINY, "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["task"] == "ground"


def test_int8_weights_run_on_cpu(loaded_tiny, page_image):
    import torch

    from vl2cli.engine.generation import Engine
    from vl2cli.engine.loading import load_model
    from vl2cli.engine.quant import is_quantized_module
    q8 = load_model(TINY, device="cpu", dtype="float32", quant="int8")
    assert is_quantized_module(q8.model.language.layers[1].mlp.experts[0].up_proj)
    tok = q8.processor.tokenizer
    prompt = q8.processor.prepare_prompt("<image>\nRead it.", [page_image])
    a, _ = Engine(q8.model, tok.eos_id, tok.pad_id).prefill([prompt], 0)
    b, _ = Engine(loaded_tiny.model, tok.eos_id, tok.pad_id).prefill([prompt], 0)
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99


def test_revision_and_offline_reach_the_hub_client(monkeypatch):
    import huggingface_hub

    from vl2cli.engine.loading import resolve_model
    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(repo_id=repo_id, **kwargs)
        return "/nonexistent"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    resolve_model("base", revision="abc123", offline=True)
    assert seen["repo_id"] == "deepseek-ai/deepseek-vl2" and seen["revision"] == "abc123"
    assert seen["local_files_only"] is True
    assert seen["allow_patterns"] == ["*.json", "*.safetensors"]  # no code, no pickles
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_model("tiny")
    assert seen["local_files_only"] is True


def test_prompt_file_overrides_and_bad_prompt_file_fails_before_loading(tmp_path):
    custom = tmp_path / "mine.txt"
    custom.write_text("# my wording\nList every number on the page.\n")
    result = run("ocr", IMG, "--prompt-file", str(custom), "--split", "never", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["prompt_tokens"] > 0
    missing = runner.invoke(app, ["ocr", IMG, "--prompt-file", str(tmp_path / "nope.txt"), "--model", "/nonexistent"])
    assert missing.exit_code == 2 and "nope.txt: cannot read prompt" in missing.stderr


def test_text_layer_only_on_a_scan_falls_back_to_the_model_and_says_so():
    result = run("ocr", IMG, "--text-layer", "only", "--split", "never", "--json")
    record = json.loads(result.stdout)[0]
    assert record["finish_reason"] != "text_layer" and "no_text_layer" in record["flags"]


@pytest.mark.parametrize("command", ["ocr", "ask", "table", "chart", "ground", "caption", "batch", "models", "trace"])

def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example" in result.output or command in ("models", "bench")


def test_ask_streams_the_same_answer_it_returns(loaded_tiny):
    from vl2cli.api import Reader, TokenStream
    from vl2cli.engine.generation import SamplingParams
    reader = Reader(loaded=loaded_tiny)
    pieces = []
    stream = TokenStream(reader, pieces.append)
    answer = reader.ask_images([Image.open(IMG)], "What is written?", SamplingParams(max_new_tokens=12),
                               on_token=stream)
    assert "".join(pieces) + answer[len(stream.shown):] == answer and len(pieces) > 1


def test_grounded_answer_becomes_pixel_boxes_and_an_annotated_png(tmp_path):
    from vl2cli.batch import BatchOptions, write_page
    from vl2cli.pages import Page
    from vl2cli.tasks import get_task
    task = get_task("ground")
    image = Image.open(Path(__file__).parent.parent / "samples" / "objects.png").convert("RGB")
    answer = "<|ref|>the red circle<|/ref|><|det|>[[94, 166, 343, 500]]<|/det|>"
    record = {"source": "objects.png", "page": 1, "task": "ground", "status": "ok", "answer": answer,
              **task.parse(answer, *image.size, "the red circle")}
    assert record["objects"][0]["box"] == [60, 79, 219, 240]  # 640x480 page: x / 999 * 640, y / 999 * 480
    outputs = write_page(task, record, Page("objects.png", 1, image), "objects.png.p0001",
                         BatchOptions(out=tmp_path, fmt="json"))
    assert outputs == ["objects.png.p0001.json", "objects.png.p0001.boxes.png"]
    drawn = Image.open(tmp_path / "objects.png.p0001.boxes.png")
    assert drawn.size == image.size and drawn.getpixel((60, 160)) != image.getpixel((60, 160))


def test_batch_output_inside_the_input_folder_is_not_read_back(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    Image.open(IMG).save(src / "a.png")
    args = ["batch", str(src), "--task", "ground", "--question", "x", "--out", str(src / "results"),
            "--model", TINY, "--max-new-tokens", "2", "--json"]
    (src / "results").mkdir()
    Image.open(IMG).save(src / "results" / "a.png.p0001.boxes.png")  # an earlier run's annotated page
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["pages_done"] == 1
