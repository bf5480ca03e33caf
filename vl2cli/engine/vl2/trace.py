"""`vl2 trace` on a DeepSeek-VL2 checkpoint: the prompt, token layout, tiles, logits and greedy tokens of one run, in
the parity trace format.

Beside the format's prompt `logits` and `last_logits`, PREFIX.npz holds `step_logits` [generated, vocab] float32:
the logits each generated token was chosen from, as the scheduler's slot cache produced them.

A text-only prompt records what the reference processor stands in for "no image": `images_spatial_crop`
`[[0, 0]]` and one zero tile (`pixel_shape` `[1, 3, S, S]`, pixel sums 0), with no image spans. The model itself
sees no tile at all.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vl2cli.engine.generation import Engine, SamplingParams
from vl2cli.engine.scheduler import generate
from vl2cli.engine.trace import sample_positions, spans
from vl2cli.engine.vl2.config import VL2Config
from vl2cli.writers import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from vl2cli.engine.loading import LoadedModel
    from vl2cli.engine.processor import Prepared


def run_trace(loaded: LoadedModel, prepared: Prepared, max_new_tokens: int, prefix: str | Path,
              all_positions: bool = False) -> dict[str, Any]:
    cfg = loaded.cfg
    if not isinstance(cfg, VL2Config):
        raise TypeError(f"a DeepSeek-VL2 trace of a {type(cfg).__name__} model")
    engine = Engine(loaded.model, loaded.processor.tokenizer.eos_id, loaded.processor.tokenizer.pad_id)
    prefilled, _ = engine.prefill([prepared], 0, all_logits=True)
    logits = prefilled[0].float().cpu().numpy()  # [T, V]
    steps: list[np.ndarray] = []  # the logits each generated token was chosen from, through the scheduler's cache
    gen = generate(engine, [prepared], SamplingParams(max_new_tokens=max_new_tokens),
                   on_logits=lambda _row, step: steps.append(step.float().cpu().numpy()))[0]
    step_logits = np.stack(steps) if steps else np.zeros((0, logits.shape[-1]), np.float32)
    n = len(prepared.input_ids)
    positions = list(range(n)) if all_positions else sample_positions(n, prepared.image_mask)
    last = logits[-1]
    top = np.argsort(-last, kind="stable")[:10]
    pixels = prepared.pixels.astype(np.float64)
    crops = prepared.spatial_crop
    if not crops:  # the reference processor stands in one zero tile and a [0, 0] crop for "no image"
        size = cfg.vision.image_size
        pixels, crops = np.zeros((1, 3, size, size)), [[0, 0]]
    meta = {
        "prompt": prepared.prompt,
        "input_ids": [int(i) for i in prepared.input_ids],
        "image_spans": spans(prepared.image_mask),
        "images_spatial_crop": crops,
        "pixel_shape": list(pixels.shape),
        "pixel_sum": float(pixels.sum()),
        "pixel_abs_sum": float(np.abs(pixels).sum()),
        "logit_positions": positions,
        "last_top10": [[int(i), float(last[i])] for i in top],
        "generated_ids": gen.ids,
        "generated_text": loaded.processor.tokenizer.decode(gen.ids),
    }
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, logits=logits[positions].astype(np.float32), last_logits=last.astype(np.float32),
                        step_logits=step_logits.astype(np.float32))
    atomic_write_bytes(prefix + ".npz", buf.getvalue())
    atomic_write_text(prefix + ".json", json.dumps(meta, indent=1, ensure_ascii=False))
    return meta

