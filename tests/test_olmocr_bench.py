"""The quality harness (benchmarks/olmocr_bench.py) on olmOCR-bench's public sample: vl2's `--text-layer only`
output in olmOCR-bench's candidate layout, scored by the olmocr package's own scorer, per category.

.ci/run installs the scorer (olmocr --no-deps and the `bench` extra) and sets VL2_REQUIRE_OLMOCR_BENCH, so CI fails
instead of skipping when it is missing. The figures themselves live in benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import TINY

SAMPLE = Path(__file__).parent.parent / "benchmarks" / "olmocr_bench_sample"

try:
    import olmocr.bench.benchmark  # noqa: F401
    HAVE_SCORER = True
except ImportError:
    HAVE_SCORER = False
    if os.environ.get("VL2_REQUIRE_OLMOCR_BENCH"):
        raise


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SCORER, reason="olmOCR-bench's scorer is not installed "
                                            "(pip install --no-deps olmocr; pip install 'vl2cli[bench]')")
def test_the_olmocr_bench_sample_is_converted_and_scored_per_category(tmp_path, capsys):
    import json

    from olmocr_bench import candidate_path, main
    bench = tmp_path / "bench"
    shutil.copytree(SAMPLE, bench)
    assert main([str(bench), "--candidate", "vl2_text", "--text-layer-only-strict", "--", "--text-layer", "only",
                 "--model", TINY, "--max-new-tokens", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == [] and report["tests"] == 120
    assert set(report["categories"]) == {"baseline", "blanks", "dataset"}
    assert set(report["test_types"]) == {"absent", "baseline", "math", "order", "present", "table"}
    assert report["conversion"]["pages"] == 23 and report["conversion"]["pages_without_text_layer"] == 3
    # born-digital pages read off their text layer pass most baseline and reading-order tests
    assert report["test_types"]["baseline"]["score"] >= 80 and report["test_types"]["order"]["score"] >= 70
    page = candidate_path(bench / "vl2_text", "multi_column_miss.pdf", 1).read_text()
    assert "Corporate social responsibility" in page
    if shutil.which("pdftotext"):  # the baseline RESULTS.md sets beside vl2's figures
        assert main([str(bench), "--candidate", "pdftotext", "--pdftotext"]) == 0
        baseline = json.loads(capsys.readouterr().out)
        assert baseline["errors"] == [] and baseline["conversion"]["pages"] == 23
