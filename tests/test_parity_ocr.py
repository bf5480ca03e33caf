"""DeepSeek-OCR's vision side against the official code: every case in shared/parity-ocr through `vl2 trace` and
that folder's compare.py, in float32 on CPU. The 842 MB checkpoint is rebuilt once per test session by the
folder's own generator (which checks its sha256)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "parity-ocr"  # CI lays shared/ beside the clone
CASES = json.loads((SHARED / "cases" / "cases.json").read_text()) if (SHARED / "cases").exists() else []


@pytest.fixture(scope="session")
def ocr_ckpt(tmp_path_factory) -> Path:
    if not (SHARED / "make_checkpoint_standalone.py").exists():
        pytest.skip("shared/parity-ocr is not beside the repository")
    folder = tmp_path_factory.mktemp("deepseek-ocr")
    subprocess.run([sys.executable, str(SHARED / "make_checkpoint_standalone.py"), "--out", str(folder)], check=True,
                   capture_output=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ocr_trace_matches_golden(case, ocr_ckpt, tmp_path):
    from tests.helpers import vl2
    image = str(SHARED / "cases" / case["image"])
    result = vl2("trace", "--image", image, "--prompt", case["prompt"], "--ocr-mode", case["mode"],
                 "--out", str(tmp_path / "t"), model=str(ocr_ckpt), tokens=2)
    assert result.exit_code == 0, result.output
    compared = subprocess.run([sys.executable, str(SHARED / "compare.py"), str(SHARED / "cases" / "golden" /
                                                                              case["name"]), str(tmp_path / "t")],
                              capture_output=True, text=True, cwd=SHARED)
    assert compared.returncode == 0, compared.stdout[-3000:]


@pytest.mark.parametrize("mode,size,tiles,tokens", [
    ("tiny", (300, 200), [1, 1], 73), ("small", (300, 200), [1, 1], 111), ("base", (800, 1200), [1, 1], 273),
    ("large", (800, 1200), [1, 1], 421), ("gundam", (640, 640), [1, 1], 273), ("gundam", (641, 300), [2, 1], 273 + 10 * 21),
    ("gundam", (1000, 3000), [1, 3], 273 + 30 * 11), ("gundam", (1700, 1100), [3, 2], 273 + 20 * 31),
])
def test_modes_tiles_and_token_counts(mode, size, tiles, tokens):
    """Unseen shapes follow the official rules: 16*17+1 for base, (10h)*(10w+1) more per tiled page, ratios
    from 2 to 6 tiles nearest the page's aspect."""
    from PIL import Image

    from vl2cli.engine.ocr.config import OCRConfig
    from vl2cli.engine.ocr.processor import ocr_token_count, ocr_views
    views = ocr_views(Image.new("RGB", size, "white"), mode, OCRConfig())
    assert [views.tiles_wide, views.tiles_high] == tiles
    tiled = views.local_pixels is not None
    assert ocr_token_count(mode, views.tiles_wide, views.tiles_high, tiled) == tokens
    if tiled:
        assert views.local_pixels.shape == (tiles[0] * tiles[1], 3, 640, 640)  # type: ignore[union-attr]


def test_closest_ratio_tie_rule():
    """DeepSeek-OCR's tile grid (columns, rows) for 640-pixel tiles: the shared tile_grid rule."""
    from functools import partial

    from vl2cli.engine.ocr.processor import OCR_TILE
    from vl2cli.engine.processor import tile_grid
    closest_ratio = partial(tile_grid, tile=OCR_TILE)
    # 2:1 images: (2, 1) and (4, 2) tie on aspect; the larger grid wins only above half its pixel area
    assert closest_ratio(1280, 640, 2, 6) == (2, 1)
    assert closest_ratio(2000, 1000, 2, 6) == (2, 1)  # 2.0 Mpx > 0.5 * 640 * 640 * 2 but (4, 2) has 8 tiles > 6
    assert closest_ratio(1300, 1300, 2, 6) == (2, 2)


@pytest.mark.slow
def test_every_command_runs_on_deepseek_ocr(ocr_ckpt, tmp_path):
    """The flow on random weights: records validate, DeepSeek-OCR's own prompt forms are used, forms it does not
    know are refused before loading, modes and resume work."""
    from tests.helpers import IMG, assert_valid_record, index_entries, vl2
    model = str(ocr_ckpt)
    for args in (["ocr", IMG, "-f", "json", "--ocr-mode", "base"], ["ocr", IMG, "-f", "json", "--ocr-mode", "tiny"],
                 ["ground", IMG, "the total", "--json", "--ocr-mode", "small"],
                 ["caption", IMG, "--json", "--ocr-mode", "tiny"], ["chart", IMG, "--json", "--ocr-mode", "tiny"],
                 ["extract", IMG, "--fields", "title", "-f", "json", "--ocr-mode", "tiny"]):
        tokens = 60 if args[0] in ("ground", "extract") else 4
        result = vl2(*args, "--split", "never", model=model, tokens=tokens)
        assert result.exit_code == 0, (args, result.output)
        for record in json.loads(result.stdout):
            assert_valid_record(record)
    ground = json.loads(vl2("ground", IMG, "the total", "--json", "--ocr-mode", "tiny", "--split", "never",
                            model=model, tokens=60).stdout)[0]
    assert ground["objects"] and ground["grammar"]["kind"] == "lark"
    assert vl2("ocr", IMG, "-f", "text", "--ocr-mode", "tiny", "--out", str(tmp_path / "p"), model=model,
               tokens=2).exit_code == 0
    plain = json.loads(next((tmp_path / "p").glob("*.p0001.ocr.json")).read_text())
    rich = json.loads(vl2("ocr", IMG, "-f", "json", "--ocr-mode", "tiny", model=model, tokens=2).stdout)[0]
    assert plain["prompt_tokens"] < rich["prompt_tokens"]  # "Free OCR." for text, the grounding prompt otherwise
    asked = vl2("ask", IMG, "What is the total?", "--json", "--ocr-mode", "tiny", model=model, tokens=3)
    assert asked.exit_code == 0 and "not to answer free questions" in asked.stderr, asked.output
    assert_valid_record(json.loads(asked.stdout), "ask")
    chat = vl2("ask", IMG, "What is the total?", "--chat", "--ocr-mode", "tiny", model=model, tokens=3, stdin="more?\n")
    assert chat.exit_code == 2 and "no conversation" in chat.stderr
    refused = vl2("table", IMG, model=model, tokens=2)
    assert refused.exit_code == 2 and "DeepSeek-OCR has no known prompt for table" in refused.stderr
    out = tmp_path / "out"
    first = vl2("batch", IMG, "--out", str(out), "--ocr-mode", "tiny", "--json", model=model, tokens=2)
    again = vl2("batch", IMG, "--out", str(out), "--ocr-mode", "tiny", "--json", model=model, tokens=2)
    assert json.loads(first.stdout)["pages_done"] == 1 and json.loads(again.stdout)["pages_skipped"] == 1
    other_mode = vl2("batch", IMG, "--out", str(out), "--ocr-mode", "base", "--json", model=model, tokens=2)
    assert json.loads(other_mode.stdout)["pages_done"] == 1  # the mode is part of the page key
    assert len(index_entries(out)) == 2


def test_layout_tags_become_blocks_clean_markdown_and_figure_files(tmp_path):
    from PIL import Image

    from tests.helpers import assert_valid_record
    from tests.test_pipeline import folder_sink
    from vl2cli.pages import Page, Source
    from vl2cli.pipeline import PageItem
    from vl2cli.results import PageResult
    from vl2cli.tasks import get_task
    answer = ("<|ref|>title<|/ref|><|det|>[[10, 20, 500, 60]]<|/det|>\n# Annual report\n\n"
              "<|ref|>text<|/ref|><|det|>[[10, 80, 990, 300]]<|/det|>\nRevenue rose by **4%**.\n"
              "<|ref|>image<|/ref|><|det|>[[100, 400, 900, 800]]<|/det|>\n")
    task = get_task("ocr")
    fields, _ = task.parse(answer, (1000, 2000), None)
    assert [b["label"] for b in fields["blocks"]] == ["title", "text", "figure"]  # the layout vocabulary
    assert fields["blocks"][1] == {"label": "text", "text": "Revenue rose by **4%**.", "box_norm": [10.0, 80.0, 990.0, 300.0],
                                   "box": [10, 160, 990, 600], "order": 1, "tag": "text"}
    result = PageResult("r.png", 1, "ocr", "ok", answer=answer, width=1000, height=2000, fields=fields)
    assert task.render(result, "markdown") == "# Annual report\n\nRevenue rose by **4%**."
    assert task.render(result, "text") == "Annual report\n\nRevenue rose by 4%."
    sink, _ = folder_sink(tmp_path)
    page = Page("r.png", 1, Image.new("RGB", (1000, 2000), "white"))
    kept = sink.emit(PageItem(Source("r.png", "r.png", name="r.png", digest="d", numbers=[1]), 1, "k" * 32), result, page)
    figure = tmp_path / "r.png.p0001.ocr.fig1.png"
    assert figure.exists() and Image.open(figure).size == (800, 801)
    record = json.loads((tmp_path / "r.png.p0001.ocr.json").read_text())
    assert record["blocks"][2]["figure"] == "r.png.p0001.ocr.fig1.png" and kept.ok
    assert_valid_record(record)
    assert "![image](r.png.p0001.ocr.fig1.png)" in (tmp_path / "r.png.p0001.ocr.md").read_text()


def test_no_repeat_ngram_rule():
    from vl2cli.engine.generation import NoRepeatNgram
    rule = NoRepeatNgram(3, 10, frozenset({7}))
    assert rule.banned([1, 2, 5, 1, 2]) == {5}  # "1 2 5" was generated: 5 may not follow "1 2" again
    assert rule.banned([1, 2, 7, 1, 2]) == set()  # whitelisted (<td>, </td>) tokens may repeat
    assert rule.banned([1, 2, 5] + [9] * 10 + [1, 2]) == set()  # outside the window


@pytest.mark.slow
def test_nf4_quantizes_the_decoder_and_keeps_the_encoder_16_bit(ocr_ckpt):
    pytest.importorskip("bitsandbytes")
    from testkit import is_quantized_module

    from vl2cli.engine.loading import load_model
    loaded = load_model(str(ocr_ckpt), device="cpu", dtype="float32", quant="nf4")
    model = loaded.model
    assert is_quantized_module(model.language.layers[1].mlp.experts[0].up_proj)
    assert is_quantized_module(model.language.layers[0].self_attn.q_proj)
    assert not is_quantized_module(model.sam_model.blocks[0].attn.qkv)
    assert not is_quantized_module(model.vision_model.transformer.layers[0].mlp.fc1)
    assert not is_quantized_module(model.projector.layers)


def test_the_ngram_rule_is_on_for_deepseek_ocr_and_can_be_turned_off(ocr_ckpt):
    from vl2cli.engine.loading import load_model
    from vl2cli.options import ReadOptions
    from vl2cli.reader import Reader
    reader = Reader(load_model(str(ocr_ckpt), device="cpu", dtype="float32", quant="none"))
    rule = reader._sampling(ReadOptions()).no_repeat
    assert rule is not None and (rule.size, rule.window) == (30, 90)
    tok = reader.loaded.processor.tokenizer
    assert rule.whitelist == {tok.tok.token_to_id("<td>"), tok.tok.token_to_id("</td>")}
    assert reader._sampling(ReadOptions(no_repeat=False)).no_repeat is None


def test_two_concurrent_requests_in_different_modes_each_read_as_alone(ocr_ckpt, page_image):
    """The mode travels with each request (and with views cut ahead): a gundam page read beside a tiny one gets
    the prompt, tokens and answer it gets alone, in the library and through the server."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from testkit import read_pages

    from tests.helpers import running_server
    from vl2cli.engine.loading import load_model
    from vl2cli.options import ReadOptions
    from vl2cli.pages import Page
    from vl2cli.reader import Reader
    from vl2cli.tasks import get_task
    reader = Reader(load_model(str(ocr_ckpt), device="cpu", dtype="float32", quant="none"))
    task, page = get_task("ocr"), Page("p.png", 1, page_image)

    def read(mode: str) -> tuple[int, str]:
        result = read_pages(reader, task, [page], ReadOptions(max_new_tokens=3, split="never", ocr_mode=mode))[0]
        return result.prompt_tokens, result.answer or ""
    alone = {mode: read(mode) for mode in ("gundam", "tiny")}
    assert alone["gundam"][0] > 800 > 100 > alone["tiny"][0]  # 903 and 83 tokens: the modes really differ
    with ThreadPoolExecutor(2) as pool:
        together = dict(zip(("gundam", "tiny"), pool.map(read, ("gundam", "tiny"))))
    assert together == alone
    buf = io.BytesIO()
    page_image.save(buf, "PNG")
    with running_server(reader, max_batch=2) as (url, _):
        def post(mode: str) -> tuple[int, str]:
            response = httpx.post(url + "/v1/documents/ocr", files={"file": ("p.png", buf.getvalue(), "image/png")},
                                  data={"max_tokens": "3", "split": "never", "ocr_mode": mode}, timeout=600)
            assert response.status_code == 200, response.text
            record = response.json()[0]
            return record["prompt_tokens"], record.get("answer") or ""
        with ThreadPoolExecutor(2) as pool:
            served = dict(zip(("gundam", "tiny"), pool.map(post, ("gundam", "tiny"))))
    assert served == alone
