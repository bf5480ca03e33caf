"""`vl2 trace` on a DeepSeek-OCR 2 checkpoint: the prompt ids, views and their geometry, every encoder stage and the
image embeddings in placement order, in the `ocr2-vision-oracle-trace/1` format (shared/parity-ocr2), which that
folder's compare.py judges against the official code's golden traces. The writing is DeepSeek-OCR's trace's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vl2cli.engine.ocr2.processor import Ocr2Views
from vl2cli.engine.processor import tile_boxes
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
    from vl2cli.engine.ocr2.config import OCR2Config
    from vl2cli.engine.ocr2.model import DeepseekOCR2
    from vl2cli.engine.ocr2.processor import OCR2Processor

FORMAT = "ocr2-vision-oracle-trace/1"


def _geometry(views: Ocr2Views, tile: int, side: int, fill: list[int]) -> dict[str, Any]:
    tiled = views.local_pixels is not None
    wide, high = views.tiles_wide, views.tiles_high
    return {"tiles_wh": [wide, high], "tile_resize": [tile * wide, tile * high] if tiled else None,
            "tile_boxes": [list(b) for b in tile_boxes(tile, wide, high)] if tiled else [],
            "pad_to": [side, side], "pad_color": fill, "global_resize": list(views.global_resize),
            "global_paste": None if views.global_paste is None else list(views.global_paste)}


@torch.inference_mode()
def run_ocr2_trace(loaded: LoadedModel, model: DeepseekOCR2, processor: OCR2Processor, cfg: OCR2Config,
                   image_path: str, prompt: str, max_new_tokens: int, prefix: str | Path) -> dict[str, Any]:
    """`loaded` holding `model`, `processor` and `cfg` (its own DeepSeek-OCR 2 classes: engine.ocr2.family passes
    them)."""
    image = load_official_image(image_path)
    tokenizer = processor.tokenizer
    ids, mask, views = processor.prompt_ids(prompt, image)
    if not isinstance(views, Ocr2Views):
        raise TypeError("DeepSeek-OCR 2's views carry their geometry")
    arrays: dict[str, np.ndarray] = {"input_ids": np.array(ids, dtype=np.int64),
                                     "images_seq_mask": np.array(mask, dtype=bool)}
    stages: dict[str, Any] = {}
    local = None
    if views.local_pixels is not None:
        local = model.encode_views(torch.from_numpy(views.local_pixels))
    glob = model.encode_views(torch.from_numpy(views.global_pixels))
    for view, feats in (("local", local), ("global", glob)):
        if feats is None:
            continue
        for stage, tensor in (("sam", feats.sam), ("enc_l0", feats.first_layer), ("enc", feats.encoded),
                              ("proj", feats.projected)):
            name = f"{stage}_{view}"
            stages[name] = stage_stats(name, tensor, token_rows(tensor), arrays)
    embeds = model.image_sequence(glob.projected, None if local is None else local.projected)
    stages["image_embeds"] = stage_stats("image_embeds", embeds, token_rows(embeds), arrays)
    n_local = 0 if local is None else local.projected.shape[0] * local.projected.shape[1]
    layout = ([["local", n_local]] if n_local else []) + [["global", glob.projected.shape[1]], ["separator", 1]]
    fill = [int(m * 255) for m in cfg.image_mean]
    generated = greedy_ids(loaded, ids, mask, embeds, max_new_tokens)
    n_image = int(sum(mask))
    meta = {
        "format": FORMAT,
        "inputs": {"image": str(image_path), "image_size": list(image.size), "base_size": cfg.global_size,
                   "image_size_tile": cfg.tile_size, "crop_mode": True, "prompt": prompt},
        "input_ids": ids, "num_tokens": len(ids), "bos_token_id": tokenizer.bos_id,
        "image_token_id": tokenizer.image_id, "images_seq_mask_spans": spans(mask), "num_image_positions": n_image,
        "images_spatial_crop": [[views.tiles_wide, views.tiles_high]], "num_image_tokens": [n_image],
        "num_image_tokens_vllm": n_image, "has_local_views": local is not None,
        "geometry": _geometry(views, cfg.tile_size, cfg.global_size, fill),
        "pixel": {"global": pixel_stats("global", views.global_pixels, arrays),
                  "local": None if views.local_pixels is None else pixel_stats("local", views.local_pixels, arrays)},
        "stages": stages, "image_embeds_layout": layout, "separator_rows": [int(embeds.shape[0]) - 1],
        "generated_ids": generated, "generated_text": tokenizer.decode(generated),
        "env": {"dtype": str(loaded.dtype).removeprefix("torch."), "torch": torch.__version__},
    }
    write_oracle_trace(str(prefix), meta, arrays)
    return meta
