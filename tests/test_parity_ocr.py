"""DeepSeek-OCR's vision side against the official code: every case in shared/parity-ocr through `vl2 trace` and
that folder's compare.py, in float32 on CPU. The 842 MB checkpoint is rebuilt once per test session by the
folder's own generator (which checks its sha256)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "parity-ocr"
pytestmark = pytest.mark.skipif(not (SHARED / "compare.py").exists(), reason="shared/parity-ocr is not beside the repo")
CASES = json.loads((SHARED / "cases" / "cases.json").read_text()) if (SHARED / "cases").exists() else []


@pytest.fixture(scope="session")
def ocr_ckpt(tmp_path_factory) -> Path:
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

    from vl2cli.engine.config import OCRConfig
    from vl2cli.engine.ocr import ocr_token_count, ocr_views
    views = ocr_views(Image.new("RGB", size, "white"), mode, OCRConfig())
    assert [views.tiles_wide, views.tiles_high] == tiles
    tiled = views.local_pixels is not None
    assert ocr_token_count(mode, views.tiles_wide, views.tiles_high, tiled) == tokens
    if tiled:
        assert views.local_pixels.shape == (tiles[0] * tiles[1], 3, 640, 640)  # type: ignore[union-attr]


def test_closest_ratio_tie_rule():
    from vl2cli.engine.ocr import closest_ratio
    # 2:1 images: (2, 1) and (4, 2) tie on aspect; the larger grid wins only above half its pixel area
    assert closest_ratio(1280, 640, 2, 6) == (2, 1)
    assert closest_ratio(2000, 1000, 2, 6) == (2, 1)  # 2.0 Mpx > 0.5 * 640 * 640 * 2 but (4, 2) has 8 tiles > 6
    assert closest_ratio(1300, 1300, 2, 6) == (2, 2)


def test_a_vl2_reading_command_says_what_an_ocr_checkpoint_supports_so_far(ocr_ckpt):
    from tests.helpers import IMG, vl2
    result = vl2("ocr", IMG, model=str(ocr_ckpt), tokens=2)
    assert result.exit_code == 1 and "DeepSeek-OCR checkpoint" in result.stderr
