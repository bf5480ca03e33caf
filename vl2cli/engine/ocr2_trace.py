"""`vl2 trace` on a DeepSeek-OCR 2 checkpoint: the prompt ids, views and their geometry, every encoder stage and the
image embeddings in placement order, in the `ocr2-vision-oracle-trace/1` format (shared/parity-ocr2), which that
folder's compare.py judges against the official code's golden traces. The writing is DeepSeek-OCR's trace's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vl2cli.engine.ocr2 import Ocr2Views
from vl2cli.engine.ocr_trace import _greedy, _pixels, _rows, _stage, _write, load_official_image
from vl2cli.engine.processor import tile_boxes
from vl2cli.engine.trace import spans

if TYPE_CHECKING:
    from vl2cli.engine.loading import LoadedModel

FORMAT = "ocr2-vision-oracle-trace/1"


def _geometry(views: Ocr2Views, tile: int, side: int, fill: list[int]) -> dict[str, Any]:
    tiled = views.local_pixels is not None
    wide, high = views.tiles_wide, views.tiles_high
    return {"tiles_wh": [wide, high], "tile_resize": [tile * wide, tile * high] if tiled else None,
            "tile_boxes": [list(b) for b in tile_boxes(tile, wide, high)] if tiled else [],
            "pad_to": [side, side], "pad_color": fill, "global_resize": list(views.global_resize),
            "global_paste": None if views.global_paste is None else list(views.global_paste)}


@torch.inference_mode()
def run_ocr2_trace(loaded: LoadedModel, image_path: str, prompt: str, max_new_tokens: int,
                   prefix: str | Path) -> dict[str, Any]:
    image = load_official_image(image_path)
    processor, cfg, model = loaded.processor, loaded.cfg, loaded.model
    tokenizer = processor.tokenizer
    ids, mask, views = processor.prompt_ids(prompt, image)
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
            stages[name] = _stage(name, tensor, _rows(tensor), arrays)
    embeds = model.image_sequence(glob.projected, None if local is None else local.projected)
    stages["image_embeds"] = _stage("image_embeds", embeds, _rows(embeds), arrays)
    n_local = 0 if local is None else local.projected.shape[0] * local.projected.shape[1]
    layout = ([["local", n_local]] if n_local else []) + [["global", glob.projected.shape[1]], ["separator", 1]]
    fill = [int(m * 255) for m in cfg.image_mean]
    generated = _greedy(loaded, ids, mask, embeds, max_new_tokens)
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
        "pixel": {"global": _pixels("global", views.global_pixels, arrays),
                  "local": None if views.local_pixels is None else _pixels("local", views.local_pixels, arrays)},
        "stages": stages, "image_embeds_layout": layout, "separator_rows": [int(embeds.shape[0]) - 1],
        "generated_ids": generated, "generated_text": tokenizer.decode(generated),
        "env": {"dtype": str(loaded.dtype).removeprefix("torch."), "torch": torch.__version__},
    }
    _write(str(prefix), meta, arrays)
    return meta
