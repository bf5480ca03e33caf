"""The benchmarks run in CI-sized form (smoke): every one returns its JSON figures."""

import json

from vl2cli.bench import run


def test_benchmarks_smoke():
    results = {r["bench"]: r for r in run("all", smoke=True)}
    assert set(results) == {"moe_dispatch", "kv_cache", "batching", "memory", "pages_in", "cold_start"}
    assert results["kv_cache"]["mla_cache_bytes_per_token_small_bf16"] == (512 + 64) * 27 * 2
    assert results["memory"]["nf4_over_bf16_linear_bytes"] <= 0.30
    assert results["moe_dispatch"]["ratio_64_vs_8"] > 0
    json.dumps(results)
