"""`vl2 trace --ocr-mode MODE` on a DeepSeek-OCR checkpoint: the prompt ids, views, every encoder stage and the
image embeddings in placement order, in the `ocr-vision-oracle-trace/1` format (shared/parity-ocr), which
that folder's compare.py judges against the official code's golden traces."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps

from vl2cli.engine.cache import KVCache
from vl2cli.engine.config import OCR_MODES
from vl2cli.engine.ocr import OCR_TILE, prepare_ocr_prompt
from vl2cli.engine.trace import spans
from vl2cli.errors import InputError
from vl2cli.writers import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from vl2cli.engine.loading import LoadedModel

FORMAT = "ocr-vision-oracle-trace/1"
N_PROJ, N_SAMPLE = 8, 24


def _projection(cols: int) -> np.ndarray:
    """The format's fixed projection: N(0, 1) / sqrt(cols), seeded by (20251020, cols)."""
    return np.random.Generator(np.random.PCG64([20251020, cols])).standard_normal((cols, N_PROJ)) / np.sqrt(cols)


def _sample(rows: int) -> np.ndarray:
    if rows <= N_SAMPLE:
        return np.arange(rows, dtype=np.int64)
    return np.array(sorted({round(i * (rows - 1) / (N_SAMPLE - 1)) for i in range(N_SAMPLE)}), dtype=np.int64)


def _stage(name: str, tensor: torch.Tensor, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    x = rows.astype(np.float64)
    idx = _sample(x.shape[0])
    arrays.update({f"{name}.row_sum": x.sum(axis=1), f"{name}.row_norm": np.sqrt((x * x).sum(axis=1)),
                   f"{name}.row_absmax": np.abs(x).max(axis=1).astype(np.float32),
                   f"{name}.row_proj": x @ _projection(x.shape[1]), f"{name}.sample_idx": idx,
                   f"{name}.sample_rows": x[idx].astype(np.float32)})
    return {"shape": list(tensor.shape), "rows": int(x.shape[0]), "cols": int(x.shape[1]), "sum": float(x.sum()),
            "abs_sum": float(np.abs(x).sum()), "sumsq": float((x * x).sum()), "absmax": float(np.abs(x).max())}


def _pixels(name: str, pixels: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    x = pixels.astype(np.float64)
    n, c, h, w = x.shape
    arrays[f"pix_{name}_thumbs"] = x.reshape(n, c, h // 16, 16, w // 16, 16).mean(axis=(3, 5)).astype(np.float32)
    arrays[f"pix_{name}_tile_sums"] = x.sum(axis=(2, 3))
    return {"shape": [n, c, h, w], "sum": float(x.sum()), "abs_sum": float(np.abs(x).sum()),
            "sumsq": float((x * x).sum()), "tile_sums": x.sum(axis=(1, 2, 3)).tolist()}


def _rows(t: torch.Tensor) -> np.ndarray:
    """A stage's tensor as token rows: [n, C, g, g] -> [n*g*g, C]; [n, L, C] -> [n*L, C]."""
    x = t.detach().float().cpu()
    if x.dim() == 4:
        x = x.flatten(2).transpose(1, 2)
    return x.reshape(-1, x.shape[-1]).numpy()


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


def load_official_image(path: str | Path) -> Image.Image:
    """As the official image script: EXIF orientation applied, then RGB."""
    try:
        with Image.open(path) as img:
            return (ImageOps.exif_transpose(img) or img).convert("RGB")
    except OSError as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


@torch.inference_mode()
def run_ocr_trace(loaded: LoadedModel, image_path: str, prompt: str, mode: str, max_new_tokens: int,
                  prefix: str | Path) -> dict[str, Any]:
    image = load_official_image(image_path)
    tokenizer = loaded.processor.tokenizer
    prepared = prepare_ocr_prompt(tokenizer, loaded.cfg, prompt, image, mode)
    views = prepared.views
    model = loaded.model
    arrays: dict[str, np.ndarray] = {"input_ids": np.array(prepared.input_ids, dtype=np.int64),
                                     "images_seq_mask": np.array(prepared.image_mask, dtype=bool)}
    stages: dict[str, Any] = {}
    local = None
    if views.local_pixels is not None:
        local = model.encode_views(torch.from_numpy(views.local_pixels))
        for name, tensor in (("sam_local", local.sam), ("clip_local", local.clip), ("proj_local", local.projected)):
            stages[name] = _stage(name, tensor, _rows(tensor), arrays)
    glob = model.encode_views(torch.from_numpy(views.global_pixels))
    for name, tensor in (("sam_global", glob.sam), ("clip_global", glob.clip), ("proj_global", glob.projected)):
        stages[name] = _stage(name, tensor, _rows(tensor), arrays)
    embeds = model.image_sequence(glob.projected, None if local is None else local.projected, views.tiles_wide,
                                  views.tiles_high)
    stages["image_embeds"] = _stage("image_embeds", embeds, _rows(embeds), arrays)
    base, tile, cropping = OCR_MODES[mode]
    layout, newlines, separators = _layout(views.tiles_wide, views.tiles_high, local is not None, base // 64)
    mask = prepared.image_mask
    generated = _greedy(loaded, prepared.input_ids, mask, embeds, max_new_tokens)
    meta = {
        "format": FORMAT,
        "inputs": {"image": str(image_path), "image_size": list(image.size), "mode": mode, "base_size": base,
                   "image_size_tile": tile, "crop_mode": cropping, "prompt": prompt},
        "input_ids": prepared.input_ids, "num_tokens": len(prepared.input_ids),
        "bos_token_id": tokenizer.bos_id, "image_token_id": tokenizer.image_id,
        "images_seq_mask_spans": spans(mask), "num_image_positions": int(sum(mask)),
        "images_spatial_crop": [[views.tiles_wide, views.tiles_high]], "num_image_tokens": [int(sum(mask))],
        "num_image_tokens_vllm": int(sum(mask)), "has_local_views": local is not None,
        "pixel": {"global": _pixels("global", views.global_pixels, arrays),
                  "local": None if views.local_pixels is None else _pixels("local", views.local_pixels, arrays)},
        "stages": stages, "image_embeds_layout": layout, "newline_rows": newlines, "separator_rows": separators,
        "generated_ids": generated, "generated_text": tokenizer.decode(generated),
        "env": {"dtype": str(loaded.dtype).removeprefix("torch."), "torch": torch.__version__},
    }
    _write(str(prefix), meta, arrays)
    return meta


def _greedy(loaded: LoadedModel, ids: list[int], mask: list[bool], image_embeds: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens from the decoder (DeepSeek-VL2-tiny's: the engine's language model)."""
    language = loaded.model.language
    tokens = torch.tensor([ids], device=loaded.device)
    embeds = language.embed_tokens(tokens)
    embeds[0, torch.tensor(mask, device=loaded.device)] = image_embeds.to(embeds.dtype)
    cache = KVCache(loaded.cfg.language, 1, len(ids) + steps + 1, loaded.device, embeds.dtype)
    logits = language.logits(language(embeds, cache)[:, -1])
    out: list[int] = []
    for _ in range(steps):
        token = int(logits.argmax(-1))
        out.append(token)
        if token == loaded.processor.tokenizer.eos_id:
            break
        step = language.embed_tokens(torch.tensor([[token]], device=loaded.device))
        logits = language.logits(language(step, cache)[:, -1])
    return out


def _write(prefix: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """PREFIX.json + PREFIX.npz (deterministic zip entries, as the format's own writer makes them)."""
    import io
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[key]), allow_pickle=False)
    atomic_write_bytes(prefix + ".npz", buf.getvalue())
    atomic_write_text(prefix + ".json", json.dumps(meta, indent=1, ensure_ascii=False))
