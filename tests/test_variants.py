"""Language-model variants the shared parity cases do not cover, against numbers from the official code.

tests/data/variants/*.npz hold logits computed by the official DeepSeek-VL2 `modeling_deepseek.py`
(transformers 4.38.2, float32, eager attention) on the random checkpoints that `make_checkpoint` builds
from variants.json (seed 5; weights N(0, 0.25) so that attention is far from uniform) and on random
input embeddings (seed 1): full-sequence logits at sampled positions, and the last four positions
computed incrementally with the official KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import DATA, make_checkpoint
from vl2cli.engine.cache import KVCache
from vl2cli.engine.loading import load_model

SPEC = json.loads((DATA / "variants" / "variants.json").read_text())


@pytest.mark.parametrize("name", list(SPEC))
def test_variant_matches_official_logits(name, tmp_path: Path):
    ref = np.load(DATA / "variants" / f"{name}.npz")
    bias = SPEC[name].get("correction_bias")  # negative biases make the 0.0-masked experts win places
    extra = {f"language.model.layers.{i}.mlp.gate.e_score_correction_bias": torch.tensor(bias)
             for i in (1, 2)} if bias else None
    folder = make_checkpoint(tmp_path / name, SPEC[name]["base"], seed=5, language=SPEC[name]["language"],
                             extra_tensors=extra, std=0.25)
    loaded = load_model(str(folder), device="cpu", dtype="float32", quant="none")
    lm = loaded.model.language
    t = 40
    embeds = torch.randn(1, t, loaded.cfg.language.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = KVCache(loaded.cfg.language, 1, t, "cpu", torch.float32)
        full = lm.logits(lm(embeds, cache))[0].numpy()
        cache = KVCache(loaded.cfg.language, 1, t, "cpu", torch.float32)
        steps = [lm.logits(lm(embeds[:, :-3], cache))[0, -1]]
        for pos in range(t - 3, t):
            steps.append(lm.logits(lm(embeds[:, pos:pos + 1], cache))[0, -1])
    scale = max(1.0, float(np.abs(ref["full"]).max()))
    assert np.abs(full[ref["rows"]] - ref["full"]).max() / scale <= 2e-4
    assert np.abs(torch.stack(steps).numpy() - ref["steps"]).max() / scale <= 2e-4
