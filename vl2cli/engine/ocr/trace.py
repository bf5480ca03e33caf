"""`vl2 trace --ocr-mode MODE` on a DeepSeek-OCR checkpoint: the prompt ids, views, every encoder stage and the
image embeddings in placement order, in the `ocr-vision-oracle-trace/1` format (shared/parity-ocr), which
that folder's compare.py judges against the official code's golden traces."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vl2cli.engine.ocr.config import OCR_MODES
from vl2cli.engine.ocr.processor import OCR_TILE, prepare_ocr_prompt
from vl2cli.engine.trace import (
    greedy_ids,
    load_official_image,
    pixel_stats,
    spans,
    stage_stats,
    token_rows,
    write_oracle_trace,
)

if TYPE_CHECKING:
    from vl2cli.engine.loading import LoadedModel
    from vl2cli.engine.ocr.config import OCRConfig
    from vl2cli.engine.ocr.model import DeepseekOCR

FORMAT = "ocr-vision-oracle-trace/1"


def _layout(tiles_wide: int, tiles_high: int, tiled: bool, global_grid: int) -> tuple[list, list[int], list[int]]:
    layout: list = []
    newlines: list[int] = []
    row = 0
    blocks = []
    if tiled:
        t = OCR_TILE // 64
        blocks.append(("local_row", t * tiles_wide, t * tiles_high))
    blocks.append(("global_row", global_grid, global_grid))
    for kind, width, height in blocks:
        layout += [[kind, width], ["newline", 1], ["...", f"x{height} rows"]]
        for _ in range(height):
            row += width
            newlines.append(row)
            row += 1
    layout.append(["separator", 1])
    return layout, newlines, [row]


@torch.inference_mode()
def run_ocr_trace(loaded: LoadedModel, model: DeepseekOCR, cfg: OCRConfig, image_path: str, prompt: str, mode: str,
                  max_new_tokens: int, prefix: str | Path) -> dict[str, Any]:
    """`loaded` holding `model` and `cfg` (its own DeepSeek-OCR classes: engine.ocr.family passes them)."""
    image = load_official_image(image_path)
    tokenizer = loaded.processor.tokenizer
    prepared = prepare_ocr_prompt(tokenizer, cfg, prompt, image, mode)
    views = prepared.views
    arrays: dict[str, np.ndarray] = {"input_ids": np.array(prepared.input_ids, dtype=np.int64),
                                     "images_seq_mask": np.array(prepared.image_mask, dtype=bool)}
    stages: dict[str, Any] = {}
    local = None
    if views.local_pixels is not None:
        local = model.encode_views(torch.from_numpy(views.local_pixels))
        for name, tensor in (("sam_local", local.sam), ("clip_local", local.clip), ("proj_local", local.projected)):
            stages[name] = stage_stats(name, tensor, token_rows(tensor), arrays)
    glob = model.encode_views(torch.from_numpy(views.global_pixels))
    for name, tensor in (("sam_global", glob.sam), ("clip_global", glob.clip), ("proj_global", glob.projected)):
        stages[name] = stage_stats(name, tensor, token_rows(tensor), arrays)
    embeds = model.image_sequence(glob.projected, None if local is None else local.projected, views.tiles_wide,
                                  views.tiles_high)
    stages["image_embeds"] = stage_stats("image_embeds", embeds, token_rows(embeds), arrays)
    base, tile, cropping = OCR_MODES[mode]
    layout, newlines, separators = _layout(views.tiles_wide, views.tiles_high, local is not None, base // 64)
    mask = prepared.image_mask
    generated = greedy_ids(loaded, prepared.input_ids, mask, embeds, max_new_tokens)
    meta = {
        "format": FORMAT,
        "inputs": {"image": str(image_path), "image_size": list(image.size), "mode": mode, "base_size": base,
                   "image_size_tile": tile, "crop_mode": cropping, "prompt": prompt},
        "input_ids": prepared.input_ids, "num_tokens": len(prepared.input_ids),
        "bos_token_id": tokenizer.bos_id, "image_token_id": tokenizer.image_id,
        "images_seq_mask_spans": spans(mask), "num_image_positions": int(sum(mask)),
        "images_spatial_crop": [[views.tiles_wide, views.tiles_high]], "num_image_tokens": [int(sum(mask))],
        "num_image_tokens_vllm": int(sum(mask)), "has_local_views": local is not None,
        "pixel": {"global": pixel_stats("global", views.global_pixels, arrays),
                  "local": None if views.local_pixels is None else pixel_stats("local", views.local_pixels, arrays)},
        "stages": stages, "image_embeds_layout": layout, "newline_rows": newlines, "separator_rows": separators,
        "generated_ids": generated, "generated_text": tokenizer.decode(generated),
        "env": {"dtype": str(loaded.dtype).removeprefix("torch."), "torch": torch.__version__},
    }
    write_oracle_trace(str(prefix), meta, arrays)
    return meta
