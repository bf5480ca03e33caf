"""The benchmarks run in CI-sized form (smoke): every one returns its JSON figures."""

import json

import pytest
from bench import run


@pytest.mark.slow
def test_benchmarks_smoke():
    results = {r["bench"]: r for r in run("all", smoke=True)}
    assert set(results) == {"moe_dispatch", "kv_cache", "batching", "memory", "pages_in", "loading_peak_ram",
                            "cold_start", "decode_step_counts", "constrained_decoding",
                            "ocr_vs_vl2", "continuous_batching", "server_overhead",
                            "ray_batch", "rotation", "soak", "detokenize", "cli_start"}
    assert not any(c["imports_torch"] for c in results["cli_start"]["commands"].values())
    assert results["soak"]["cache_capacity_min"] == results["soak"]["cache_capacity_max"]
    assert results["continuous_batching"]["tokens_per_step_ratio_vs_padded"] > 1.0
    assert results["server_overhead"]["server_seconds_per_request"] > 0
    assert results["ray_batch"]["pages_in_index"] == results["ray_batch"]["pages"]
    assert results["rotation"]["pages"] == 4 and results["rotation"]["text_layer"]["answers"] == [90]
    assert results["ray_batch"]["page_tiles_bytes"] > results["ray_batch"]["page_png_bytes"]
    assert results["loading_peak_ram"]["within_budget"]
    assert results["kv_cache"]["mla_cache_bytes_per_token_small_bf16"] == (512 + 64) * 27 * 2  # measured cache
    assert results["kv_cache"]["mha_cache_bytes_per_token_tiny_bf16"] == 2 * 10 * 128 * 12 * 2  # K and V
    assert results["memory"]["nf4_over_bf16_linear_bytes"] <= 0.30
    assert results["constrained_decoding"]["masked_over_free_step"] <= 1.5  # 1.03 measured on 2 layers
    assert results["ocr_vs_vl2"]["ocr_base"]["image_tokens"] == 273 < results["ocr_vs_vl2"]["vl2_tiny"]["image_tokens"]
    assert results["ocr_vs_vl2"]["ocr2"]["image_tokens"] == 257 + 6 * 144  # a letter page: 2 x 3 tiles of 768
    json.dumps(results)


@pytest.mark.slow
def test_gpu_check_dry_runs_on_cpu(tmp_path):
    from gpucheck import PLAN, main
    results = main(["--dry-run", "--out", str(tmp_path), "--variants", "tiny,base"])
    assert [(r["variant"], r["card_gib"]) for r in results] == [(v, c) for v, c, _ in PLAN if v in ("tiny", "base")]
    for r in results:
        assert "error" not in r, r
        assert r["batch1"]["decode_tokens_per_s"] > 0 and f"batch{r['vl2_batch']}" in r
    lines = (tmp_path / "gpu_check.jsonl").read_text().splitlines()
    assert [json.loads(line)["variant"] for line in lines] == [r["variant"] for r in results]  # one line per run


def test_gpu_check_refuses_at_once_without_cuda(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={"OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert done.returncode != 0 and "no CUDA device here" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()
