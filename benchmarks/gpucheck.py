"""GPU check: peak VRAM, prefill and decode speed, pages per minute for one letter-size page.

    python benchmarks/gpucheck.py --out benchmarks/gpu            # on a CUDA machine, real-size random weights
    python benchmarks/gpucheck.py --dry-run --out /tmp/gpu        # CPU, toy shapes: checks the script itself

Random weights of the real shapes cost exactly what the real weights cost in time and memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vl2cli.engine.config import preset_config
from vl2cli.engine.generation import Engine, SamplingParams
from vl2cli.engine.loading import random_model
from vl2cli.engine.processor import Prepared, image_token_count, tile_image
from vl2cli.options import DEFAULT_DPI

GIB = 1024**3


def letter_page() -> Image.Image:
    """A US-letter page at the default DPI (8.5 x 11 in)."""
    w, h = int(8.5 * DEFAULT_DPI), int(11 * DEFAULT_DPI)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    for y in range(100, h - 100, 28):
        draw.line([(90, y), (w - 90, y)], fill=(40, 40, 40), width=3)
    return img


def page_prompt(cfg, prompt_text_tokens: int = 16) -> Prepared:
    tiling = tile_image(letter_page(), cfg)
    n_image = image_token_count(cfg, tiling.tiles_wide, tiling.tiles_high)
    ids = [0] + [1] * n_image + list(range(2, 2 + prompt_text_tokens))
    mask = [False] + [True] * n_image + [False] * prompt_text_tokens
    return Prepared("", ids, mask, tiling.pixels, [[tiling.tiles_wide, tiling.tiles_high]])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(engine: Engine, prompts: list[Prepared], new_tokens: int, device: torch.device):
    """(seconds to the first token, aggregate decode tokens/s after it, total seconds)."""
    stamps: list[float] = []

    def on_token(row: int, _token: int) -> None:
        if row == 0:
            _sync(device)
            stamps.append(time.perf_counter())

    _sync(device)
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens), on_token=on_token)
    _sync(device)
    total = time.perf_counter() - t0
    decode = len(prompts) * (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)
    return stamps[0] - t0, decode, total


def check(name: str, quant: str, device: torch.device, dtype: torch.dtype, new_tokens: int, batch: int,
          dry_run: bool) -> dict:
    cfg = preset_config(name)
    if dry_run:  # toy shapes so the script itself can be exercised on a CPU in seconds
        cfg = preset_config(name, num_hidden_layers=2, vocab_size=512, n_routed_experts=8, hidden_size=256,
                            intermediate_size=512, moe_intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=4, **({"kv_lora_rank": 64, "qk_rope_head_dim": 16,
                                                       "qk_nope_head_dim": 32, "v_head_dim": 32}
                                                      if cfg.language.use_mla else {}))
        from dataclasses import replace

        from vl2cli.engine.config import ProjectorConfig, VisionConfig
        cfg = replace(cfg, vision=VisionConfig(width=64, layers=2, heads=4),
                      projector=ProjectorConfig(input_dim=64, n_embed=256))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = random_model(cfg, device=str(device), dtype=dtype, quant=quant)
    weights = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    engine = Engine(model, eos_id=-1, pad_id=0)  # -1: never stops early, every run makes all its tokens
    prompt = page_prompt(cfg)
    engine.generate([prompt], SamplingParams(max_new_tokens=2))  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill_s, decode_tps_1, page_s = timed_generate(engine, [prompt], new_tokens, device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    _, decode_tps_b, _ = timed_generate(engine, [prompt] * batch, max(4, new_tokens // 4), device)
    result = {"variant": name, "quant": quant, "dtype": str(dtype).replace("torch.", ""),
              "prompt_tokens": len(prompt.input_ids), "new_tokens": new_tokens,
              "weights_gib": round(weights / GIB, 2), "peak_vram_gib": round(peak / GIB, 2),
              "prefill_tokens_per_s": round(len(prompt.input_ids) / prefill_s, 1),
              "decode_tokens_per_s_batch1": round(decode_tps_1, 1),
              f"decode_tokens_per_s_batch{batch}": round(decode_tps_b, 1),
              "ocr_pages_per_minute_batch1": round(60 / page_s, 2)}
    del model, engine
    gc.collect()
    return result


TARGET_VRAM_GIB = {"tiny": 4, "small": 11, "base": 20}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/gpu")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--variants", default="tiny,small,base")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    new_tokens = 8 if args.dry_run else args.new_tokens
    runs = [(v, "nf4") for v in args.variants.split(",")]
    if "tiny" in args.variants:
        runs.append(("tiny", "none"))
    results = []
    for name, quant in runs:
        dtype = torch.bfloat16 if cuda else torch.float32
        try:
            r = check(name, quant, device, dtype, new_tokens, args.batch, args.dry_run)
        except Exception as exc:  # report and go on: one variant's failure must not hide the others
            r = {"variant": name, "quant": quant, "error": f"{type(exc).__name__}: {exc}"}
        if quant == "nf4" and "peak_vram_gib" in r and cuda:
            r["vram_target_gib"] = TARGET_VRAM_GIB.get(name)
        results.append(r)
        print(json.dumps(r), flush=True)
    bf16 = next((r for r in results if r["variant"] == "tiny" and r["quant"] == "none" and "error" not in r), None)
    nf4 = next((r for r in results if r["variant"] == "tiny" and r["quant"] == "nf4" and "error" not in r), None)
    summary = {"date": date.today().isoformat(),
               "hardware": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
               "dry_run": args.dry_run, "results": results,
               "tiny_nf4_over_bf16_decode": (round(nf4["decode_tokens_per_s_batch1"] /
                                                   bf16["decode_tokens_per_s_batch1"], 3) if nf4 and bf16 else None)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    keys = [k for k in results[0] if k not in ("variant", "quant")] if results else []
    lines = ["| variant | quant | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in results:
        lines.append(f"| {r['variant']} | {r['quant']} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    (out / "gpu_check.md").write_text(f"GPU check {summary['date']} on {summary['hardware']}\n\n" + "\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
