"""What the families' parity traces (`vl2 trace`) share: image spans and sampled positions, images opened as the
official scripts open them, and the oracle-trace format both DeepSeek-OCR families write (`ocr-vision-oracle-trace/1`,
`ocr2-vision-oracle-trace/1`: per-stage row statistics, projections and samples, deterministic npz entries, greedy
tokens from the decoder). Each family's own trace is in its package (engine/vl2/trace.py, engine/ocr/trace.py,
engine/ocr2/trace.py).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vl2cli.engine.cache import KVCache
from vl2cli.errors import InputError
from vl2cli.writers import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from vl2cli.engine.loading import LoadedModel


def spans(mask: list[bool]) -> list[list[int]]:
    """[start, end) runs of True."""
    out, start = [], None
    for i, m in enumerate([*list(mask), False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append([start, i])
            start = None
    return out


def sample_positions(n_tokens: int, mask: list[bool], n_image: int = 24, n_text: int = 40) -> list[int]:
    """Evenly spread text and image positions plus the last one (the trace format's sampling rule)."""
    def spread(items: list[int], k: int) -> list[int]:
        return items if len(items) <= k else [items[round(j * (len(items) - 1) / (k - 1))] for j in range(k)]

    text = [i for i in range(n_tokens) if not mask[i]]
    image = [i for i in range(n_tokens) if mask[i]]
    return sorted(set(spread(text, n_text) + spread(image, n_image) + [n_tokens - 1]))


def load_reference_image(path: str | Path) -> Image.Image:
    """Open an image exactly as DeepSeek-VL2's scripts do (PIL convert('RGB'): no EXIF turn, no alpha flattening)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


N_PROJ, N_SAMPLE = 8, 24  # the oracle format's projection width and sampled rows per stage


def projection(cols: int) -> np.ndarray:
    """The format's fixed projection: N(0, 1) / sqrt(cols), seeded by (20251020, cols)."""
    return np.random.Generator(np.random.PCG64([20251020, cols])).standard_normal((cols, N_PROJ)) / np.sqrt(cols)


def sample_rows(rows: int) -> np.ndarray:
    if rows <= N_SAMPLE:
        return np.arange(rows, dtype=np.int64)
    return np.array(sorted({round(i * (rows - 1) / (N_SAMPLE - 1)) for i in range(N_SAMPLE)}), dtype=np.int64)


def stage_stats(name: str, tensor: torch.Tensor, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    x = rows.astype(np.float64)
    idx = sample_rows(x.shape[0])
    arrays.update({f"{name}.row_sum": x.sum(axis=1), f"{name}.row_norm": np.sqrt((x * x).sum(axis=1)),
                   f"{name}.row_absmax": np.abs(x).max(axis=1).astype(np.float32),
                   f"{name}.row_proj": x @ projection(x.shape[1]), f"{name}.sample_idx": idx,
                   f"{name}.sample_rows": x[idx].astype(np.float32)})
    return {"shape": list(tensor.shape), "rows": int(x.shape[0]), "cols": int(x.shape[1]), "sum": float(x.sum()),
            "abs_sum": float(np.abs(x).sum()), "sumsq": float((x * x).sum()), "absmax": float(np.abs(x).max())}


def pixel_stats(name: str, pixels: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    x = pixels.astype(np.float64)
    n, c, h, w = x.shape
    arrays[f"pix_{name}_thumbs"] = x.reshape(n, c, h // 16, 16, w // 16, 16).mean(axis=(3, 5)).astype(np.float32)
    arrays[f"pix_{name}_tile_sums"] = x.sum(axis=(2, 3))
    return {"shape": [n, c, h, w], "sum": float(x.sum()), "abs_sum": float(np.abs(x).sum()),
            "sumsq": float((x * x).sum()), "tile_sums": x.sum(axis=(1, 2, 3)).tolist()}


def token_rows(t: torch.Tensor) -> np.ndarray:
    """A stage's tensor as token rows: [n, C, g, g] -> [n*g*g, C]; [n, L, C] -> [n*L, C]."""
    x = t.detach().float().cpu()
    if x.dim() == 4:
        x = x.flatten(2).transpose(1, 2)
    return x.reshape(-1, x.shape[-1]).numpy()


def load_official_image(path: str | Path) -> Image.Image:
    """As DeepSeek-OCR's official image script opens one: EXIF orientation applied, then RGB."""
    try:
        with Image.open(path) as img:
            return (ImageOps.exif_transpose(img) or img).convert("RGB")
    except OSError as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


def greedy_ids(loaded: LoadedModel, ids: list[int], mask: list[bool], image_embeds: torch.Tensor, steps: int) -> list[int]:
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


def write_oracle_trace(prefix: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """PREFIX.json + PREFIX.npz (deterministic zip entries, as the format's own writer makes them)."""
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
