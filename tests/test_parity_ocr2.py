"""DeepSeek-OCR 2 against the official code: every case in shared/parity-ocr2 through `vl2 trace` and that folder's
compare.py, in float32 on CPU; unseen shapes against the rules its README writes out; the checkpoint layout, the
parameter arithmetic and the reading commands on the random checkpoint.

The 948 MB checkpoint is built once by the folder's own generator (which checks its sha256) into a cache folder named
by that sha256 ($VL2_TEST_CACHE, else ~/.cache/vl2-tests), and reused by later sessions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "parity-ocr2"  # CI lays shared/ beside the clone
CASES = json.loads((SHARED / "cases" / "cases.json").read_text()) if (SHARED / "cases").exists() else []
ABSENT = "shared/parity-ocr2 is not beside the repository (the oracle and its checkpoint builder live there)"


def _cache() -> Path:
    return Path(os.environ.get("VL2_TEST_CACHE") or Path.home() / ".cache" / "vl2-tests")


@pytest.fixture(scope="session")
def ocr2_ckpt() -> Path:
    if not (SHARED / "make_checkpoint_standalone.py").exists():
        pytest.skip(ABSENT)
    sha = json.loads((SHARED / "ckpt_files" / "oracle_meta.json").read_text())["model_safetensors_sha256"]
    folder = _cache() / f"deepseek-ocr2-{sha[:16]}"
    if not (folder / "model.safetensors").exists():
        building = _cache() / f".building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        subprocess.run([sys.executable, str(SHARED / "make_checkpoint_standalone.py"), "--out", str(building)],
                       check=True, capture_output=True)
        try:
            building.rename(folder)  # whole or not at all: a half-built folder never carries the name
        except OSError:  # another session finished first
            shutil.rmtree(building, ignore_errors=True)
    return folder


@pytest.fixture(scope="module")
def loaded_ocr2(ocr2_ckpt):
    from vl2cli.engine.loading import load_model
    return load_model(str(ocr2_ckpt), device="cpu", dtype="float32", quant="none")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ocr2_trace_matches_golden(case, ocr2_ckpt, tmp_path):
    from tests.helpers import vl2
    image = str(SHARED / "cases" / case["image"])
    result = vl2("trace", "--image", image, "--prompt", case["prompt"], "--out", str(tmp_path / "t"),
                 model=str(ocr2_ckpt), tokens=2)
    assert result.exit_code == 0, result.output
    compared = subprocess.run([sys.executable, str(SHARED / "compare.py"),
                               str(SHARED / "cases" / "golden" / case["name"]), str(tmp_path / "t")],
                              capture_output=True, text=True, cwd=SHARED)
    assert compared.returncode == 0, compared.stdout[-3000:]


@pytest.mark.parametrize("size,tiles,tokens", [
    ((640, 480), [1, 1], 257), ((768, 768), [1, 1], 257), ((769, 300), [3, 1], 257 + 3 * 144),
    ((600, 3600), [1, 6], 257 + 6 * 144),  # one side under 768 is not enough to stay untiled
    ((2000, 500), [4, 1], 257 + 4 * 144), ((1536, 768), [2, 1], 257 + 2 * 144),
    ((700, 1200), [2, 3], 257 + 6 * 144),  # |7/12 - 2/3| and |7/12 - 1/2| differ in the last bit: [2, 3] wins
    ((1250, 1000), [2, 2], 257 + 4 * 144),  # exact tie of [2, 2] and [3, 2]: 1.25 Mpx <= half of 6 tiles' pixels
    ((2500, 2000), [3, 2], 257 + 6 * 144),  # the same tie above half of 6 tiles' pixels: the new candidate wins
])
def test_tiles_and_token_counts(size, tiles, tokens):
    """Unseen shapes follow the official rules: 768 tiles, 2..6 of them nearest the page's aspect (the tie rule on
    the new candidate's area), 256 global queries + 1 separator + 144 per tile."""
    from PIL import Image

    from vl2cli.engine.ocr2.config import OCR2Config
    from vl2cli.engine.ocr2.processor import ocr2_token_count, ocr2_views
    views = ocr2_views(Image.new("RGB", size, "white"), OCR2Config())
    assert [views.tiles_wide, views.tiles_high] == tiles
    n_tiles = 0 if views.local_pixels is None else len(views.local_pixels)
    assert ocr2_token_count(OCR2Config(), n_tiles) == tokens
    assert views.global_pixels.shape == (1, 3, 1024, 1024)
    if n_tiles:
        assert views.local_pixels.shape == (tiles[0] * tiles[1], 3, 768, 768)  # type: ignore[union-attr]


@pytest.mark.parametrize("size", [(640, 480), (600, 3600), (1024, 1024), (300, 300), (2000, 501), (1023, 1024)])
def test_global_view_is_pillows_pad_on_grey_127(size):
    import numpy as np
    from PIL import Image, ImageOps

    from vl2cli.engine.ocr2.processor import padded_view
    rng = np.random.default_rng(size[0] * size[1])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    view, resize, paste = padded_view(image, 1024, (127, 127, 127))
    assert np.array_equal(np.asarray(view), np.asarray(ImageOps.pad(image, (1024, 1024), color=(127, 127, 127))))
    assert max(resize) == 1024 and (paste is None) == (resize == (1024, 1024))
    if size == (600, 3600):
        assert resize == (171, 1024) and paste == (426, 0)  # round(426.5) = 426: Python's half-to-even


def test_the_encoder_mask_is_causal_flow():
    """Image tokens see each other and no query; query i sees every image token and queries 0..i."""
    from vl2cli.engine.ocr2.qwen2_encoder import flow_mask
    m = flow_mask(3).int().tolist()
    assert m == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]


def test_the_queries_attend_to_the_image_and_not_the_other_way():
    """With the official sizes on meta-free small weights: changing a later query changes no image token's output
    and no earlier query's; changing an image token changes every query's."""
    import torch

    from vl2cli.engine.ocr2.qwen2_encoder import ENCODER_WIDTH, QueryEncoder
    torch.manual_seed(0)
    encoder = QueryEncoder()
    del encoder.layers[2:]  # two layers show the mask's effect as well as 24
    for p in encoder.parameters():
        torch.nn.init.normal_(p, std=0.05)
    tokens = torch.randn(1, 144, ENCODER_WIDTH)
    with torch.no_grad():
        out, first = encoder(tokens)
        encoder.query_768.weight[100] += 1.0
        out2, first2 = encoder(tokens)
        tokens[0, 5] += 1.0
        out3, _ = encoder(tokens)
    assert torch.equal(first[:, :144], first2[:, :144]) and torch.equal(out[:, :100], out2[:, :100])
    assert not torch.equal(out[:, 100], out2[:, 100])
    assert (out3 - out2).abs().amax(-1).min() > 0


def test_param_arithmetic_equals_the_built_model():
    import torch

    from vl2cli.engine.memory import ocr2_vision_params
    from vl2cli.engine.ocr2.config import OCR2Config
    from vl2cli.engine.ocr2.model import DeepseekOCR2
    from vl2cli.engine.vl2.config import preset_config
    cfg = OCR2Config(language=preset_config("tiny").language)
    with torch.device("meta"):
        model = DeepseekOCR2(cfg)
    vision = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("language."))
    assert vision == ocr2_vision_params(cfg.language.hidden_size)


def test_the_official_layout_loads_strictly_name_for_name():
    """Every vision tensor of the official layout (shared/parity-ocr2/vision_shapes.json) maps to a parameter of the
    same shape, and every vision parameter is one of them."""
    import torch

    from vl2cli.engine.names import ocr2_checkpoint_to_model_name
    from vl2cli.engine.ocr2.config import OCR2Config
    from vl2cli.engine.ocr2.model import DeepseekOCR2
    from vl2cli.engine.vl2.config import preset_config
    if not (SHARED / "vision_shapes.json").exists():
        pytest.skip(ABSENT)
    shapes = json.loads((SHARED / "vision_shapes.json").read_text())
    with torch.device("meta"):
        model = DeepseekOCR2(OCR2Config(language=preset_config("tiny").language))  # hidden 1280, as the real one
    params = {n: list(p.shape) for n, p in model.named_parameters() if not n.startswith("language.")}
    mapped = {ocr2_checkpoint_to_model_name(k): v for k, v in shapes.items()}
    assert mapped == params


def test_a_checkpoint_is_told_apart_by_its_architecture(tmp_path):
    from vl2cli.engine.family import read_config
    from vl2cli.engine.ocr2.config import OCR2Config
    from vl2cli.errors import ConfigError
    raw = json.loads((Path(__file__).parent / "data" / "parity" / "ckpt" / "tiny" / "config.json").read_text())
    raw["architectures"] = ["DeepseekOCR2ForCausalLM"]
    raw["projector_config"] = {"projector_type": "linear", "input_dim": 896, "n_embed": raw["language_config"]["hidden_size"]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert isinstance(read_config(tmp_path), OCR2Config)
    raw["projector_config"]["input_dim"] = 2048
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="DeepSeek-OCR 2 projects 896 channels"):
        read_config(tmp_path)


def test_prompts_are_the_raw_official_forms(loaded_ocr2):
    from PIL import Image
    tok = loaded_ocr2.processor.tokenizer
    prepared = loaded_ocr2.processor.prepare_prompt("<image>\n<|grounding|>OCR this image.",
                                                    [Image.new("RGB", (500, 400), "white")])
    n = 257
    assert prepared.input_ids == [tok.bos_id, *[tok.image_id] * n, *tok.encode("\n<|grounding|>OCR this image.")]
    assert prepared.image_mask == [False] + [True] * n + [False] * (len(prepared.input_ids) - n - 1)
    from vl2cli.errors import UsageError
    with pytest.raises(UsageError, match="one image per prompt"):
        loaded_ocr2.processor.prepare_prompt("<image>\n<image>\nFree OCR.", [Image.new("RGB", (9, 9))] * 2)


def test_the_ngram_rule_is_on_and_other_modes_are_refused(loaded_ocr2):
    from vl2cli.errors import UsageError
    from vl2cli.options import ReadOptions
    from vl2cli.reader import Reader
    reader = Reader(loaded_ocr2)
    assert reader.family == "ocr"
    rule = reader._sampling(ReadOptions()).no_repeat
    assert rule is not None and (rule.size, rule.window) == (30, 90)
    reader.check_mode("gundam")
    with pytest.raises(UsageError, match="DeepSeek-OCR 2 reads in one setting only"):
        reader.check_mode("base")


@pytest.mark.slow
def test_nf4_quantizes_the_decoder_and_keeps_the_encoder_16_bit(ocr2_ckpt):
    pytest.importorskip("bitsandbytes")
    from testkit import is_quantized_module

    from vl2cli.engine.loading import load_model
    model = load_model(str(ocr2_ckpt), device="cpu", dtype="float32", quant="nf4").model
    assert is_quantized_module(model.language.layers[1].mlp.experts[0].up_proj)
    assert is_quantized_module(model.language.layers[0].self_attn.q_proj)
    assert not is_quantized_module(model.sam_model.blocks[0].attn.qkv)
    assert not is_quantized_module(model.qwen2_model.layers[0].self_attn.q_proj)
    assert not is_quantized_module(model.qwen2_model.layers[0].mlp.up_proj)
    assert not is_quantized_module(model.projector.layers)


@pytest.mark.slow
def test_every_reading_path_runs_on_deepseek_ocr2(ocr2_ckpt, tmp_path):
    """The flow on random weights: vl2 ocr on the sample PDF, a tiled page, vl2 batch and its resume; DeepSeek-OCR's
    prompt forms; other modes and unknown prompt forms refused before the model loads."""
    from PIL import Image

    from tests.helpers import SAMPLES, assert_valid_record, vl2
    model = str(ocr2_ckpt)
    pdf = str(SAMPLES / "report.pdf")
    result = vl2("ocr", pdf, "-f", "json", "--dpi", "60", "--split", "never", model=model, tokens=4)
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["page"] for r in records] == [1, 2, 3]
    for record in records:
        assert_valid_record(record)
        assert record["status"] == "ok" and record["generated_tokens"] == 4
    tail = len(ocr2_tokenizer(ocr2_ckpt).encode("\n<|grounding|>Convert the document to markdown."))
    assert records[0]["prompt_tokens"] == 1 + 257 + tail  # one 1024 view: a 510 x 660 page fits in a 768 tile
    wide = tmp_path / "wide.png"
    Image.new("RGB", (1600, 700), "white").save(wide)
    tiled = json.loads(vl2("ocr", str(wide), "-f", "json", "--split", "never", model=model, tokens=2).stdout)[0]
    assert tiled["prompt_tokens"] == 1 + 257 + 2 * 144 + tail  # 1600 x 700: 2 x 1 tiles of 768
    out = tmp_path / "out"
    first = vl2("batch", pdf, "--pages", "1", "--dpi", "60", "--out", str(out), "--json", model=model, tokens=2)
    again = vl2("batch", pdf, "--pages", "1", "--dpi", "60", "--out", str(out), "--json", model=model, tokens=2)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["pages_done"] == 1 and json.loads(again.stdout)["pages_skipped"] == 1
    other_mode = vl2("ocr", pdf, "--ocr-mode", "base", model=model, tokens=2)
    assert other_mode.exit_code == 2 and "DeepSeek-OCR 2 reads in one setting only" in other_mode.stderr
    refused = vl2("table", pdf, model=model, tokens=2)
    assert refused.exit_code == 2 and "no known prompt for table" in refused.stderr


def ocr2_tokenizer(folder: Path):
    from vl2cli.engine.family import read_config
    from vl2cli.engine.processor import VL2Tokenizer
    return VL2Tokenizer(folder, read_config(folder))


@pytest.mark.slow
def test_the_servers_document_endpoint_reads_with_deepseek_ocr2(loaded_ocr2):
    import httpx

    from tests.helpers import IMG, assert_valid_record, running_server
    from vl2cli.reader import Reader
    with running_server(Reader(loaded_ocr2), max_batch=2) as (url, _server):
        with open(IMG, "rb") as f:
            response = httpx.post(url + "/v1/documents/ocr", files={"file": ("note.png", f, "image/png")},
                                  data={"max_tokens": "3", "split": "never"}, timeout=300)
        assert response.status_code == 200, response.text
        [record] = response.json()
        assert_valid_record(record)
        assert record["source"] == "note.png" and record["generated_tokens"] == 3
        with open(IMG, "rb") as f:
            refused = httpx.post(url + "/v1/documents/ocr", files={"file": ("note.png", f, "image/png")},
                                 data={"ocr_mode": "tiny"}, timeout=60)
        assert refused.status_code == 400 and "one setting only" in refused.json()["error"]["message"]
