"""The benchmarks run in CI-sized form (smoke): every one returns its JSON figures."""

import json

import pytest
from bench import run


@pytest.mark.slow
def test_benchmarks_smoke():
    results = {r["bench"]: r for r in run("all", smoke=True)}
    assert set(results) == {"moe_dispatch", "kv_cache", "batching", "memory", "pages_in", "loading_peak_ram",
                            "cold_start"}
    assert results["loading_peak_ram"]["within_budget"]
    assert results["kv_cache"]["mla_cache_bytes_per_token_small_bf16"] == (512 + 64) * 27 * 2  # measured cache
    assert results["kv_cache"]["mha_cache_bytes_per_token_tiny_bf16"] == 2 * 10 * 128 * 12 * 2  # K and V
    assert results["memory"]["nf4_over_bf16_linear_bytes"] <= 0.30
    json.dumps(results)


@pytest.mark.slow
def test_gpu_check_dry_runs_on_cpu(tmp_path):
    from gpucheck import main
    results = main(["--dry-run", "--out", str(tmp_path), "--variants", "tiny,base"])
    assert [(r["variant"], r["quant"]) for r in results] == [("tiny", "nf4"), ("base", "nf4"), ("tiny", "none")]
    assert all("error" not in r and r["decode_tokens_per_s_batch1"] > 0 for r in results), results
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"] and summary["tiny_nf4_over_bf16_decode"] > 0
    assert "| base | nf4 |" in (tmp_path / "gpu_check.md").read_text()
