"""GPU check: does each variant run on the consumer card it is meant for, and how fast?

    python benchmarks/gpucheck.py --out benchmarks/gpu            # on a CUDA machine, real-size random weights
    python benchmarks/gpucheck.py --dry-run --out /tmp/gpu        # CPU, toy shapes: checks the script itself

Consumer cards are simulated on a big GPU with torch.cuda.set_per_process_memory_fraction: base under a 24 GiB
cap, small under 12 and 16, tiny under 8, each at batch 1 and at the batch vl2 would choose, with the loader's
own dtype choice and NF4 placement (and forced float16, as a T4 gets). Random weights of the real shapes cost
what the real weights cost in time and memory. One JSON line per variant x cap, written as each finishes, so a
later run that runs out of memory never loses the earlier ones. Without CUDA it refuses at once.
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
from testkit import random_model

from vl2cli.engine.generation import Engine, SamplingParams
from vl2cli.engine.processor import Prepared
from vl2cli.engine.scheduler import generate
from vl2cli.engine.vl2.config import preset_config
from vl2cli.engine.vl2.processor import image_token_count, tile_image
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
    generate(engine, prompts, SamplingParams(max_new_tokens=new_tokens), on_token=on_token)
    _sync(device)
    total = time.perf_counter() - t0
    decode = len(prompts) * (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)
    return stamps[0] - t0, decode, total


def toy_or_real(name: str, dry_run: bool):
    cfg = preset_config(name)
    if dry_run:  # toy shapes so the script itself can be exercised on a CPU in seconds
        cfg = preset_config(name, num_hidden_layers=2, vocab_size=512, n_routed_experts=8, hidden_size=256,
                            intermediate_size=512, moe_intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=4, **({"kv_lora_rank": 64, "qk_rope_head_dim": 16,
                                                       "qk_nope_head_dim": 32, "v_head_dim": 32}
                                                      if cfg.language.use_mla else {}))
        from dataclasses import replace

        from vl2cli.engine.vl2.config import ProjectorConfig, VisionConfig
        cfg = replace(cfg, vision=VisionConfig(width=64, layers=2, heads=4),
                      projector=ProjectorConfig(input_dim=64, n_embed=256))
    return cfg


# (variant, card GiB, dtype): the cards each variant is meant for; float16 is what a T4 (no native bf16) gets.
PLAN = [("tiny", 8, "auto"), ("tiny", 8, "float16"), ("small", 12, "auto"), ("small", 16, "auto"),
        ("small", 16, "float16"), ("base", 24, "auto")]


def check(name: str, cap_gib: int, dtype_name: str, device: torch.device, new_tokens: int, dry_run: bool,
          context_bytes: int) -> dict:
    """One variant under one card's memory cap: load (preflight, dtype choice, NF4), batch 1, then vl2's batch."""
    from vl2cli.engine.loading import pick_dtype, preflight
    from vl2cli.engine.memory import batch_for_free
    cfg = toy_or_real(name, dry_run)
    cuda = device.type == "cuda"
    dtype = pick_dtype(dtype_name, device) if cuda else torch.float32
    result: dict = {"variant": name, "card_gib": cap_gib, "quant": "nf4", "dtype": str(dtype).removeprefix("torch.")}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (cap_gib * GIB - context_bytes) / total), device)
        torch.cuda.reset_peak_memory_stats()
        preflight(cfg, "nf4", device, name)  # raises DeviceError when vl2 would refuse this card
    model = random_model(cfg, device=str(device), dtype=dtype, quant="nf4")
    result["weights_gib"] = round(torch.cuda.memory_allocated() / GIB, 2) if cuda else 0
    engine = Engine(model, eos_id=-1, pad_id=0)  # -1: never stops early, every run makes all its tokens
    prompt = page_prompt(cfg)
    generate(engine, [prompt], SamplingParams(max_new_tokens=2))  # warm-up (kernels, allocator)
    free = (cap_gib * GIB - context_bytes - torch.cuda.memory_reserved()) if cuda else 8 * GIB
    chosen = batch_for_free(cfg, free)
    for batch in sorted({1, chosen}):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        prefill_s, decode_tps, page_s = timed_generate(engine, [prompt] * batch, new_tokens, device)
        reserved = torch.cuda.max_memory_reserved() if cuda else 0
        result[f"batch{batch}"] = {"prefill_tokens_per_s": round(batch * len(prompt.input_ids) / prefill_s, 1),
                                   "decode_tokens_per_s": round(decode_tps, 1),
                                   "pages_per_minute": round(60 * batch / page_s, 2),
                                   "peak_reserved_gib": round(reserved / GIB, 2),
                                   "peak_with_context_gib": round((reserved + context_bytes) / GIB, 2)}
    result["vl2_batch"] = chosen
    result["prompt_tokens"] = len(prompt.input_ids)
    del model, engine
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/gpu")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy shapes: exercise the script itself")
    ap.add_argument("--variants", default="tiny,small,base")
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; this check measures a GPU (use --dry-run to exercise the "
                         "script on a CPU)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    context = 0
    if device.type == "cuda":  # what the CUDA context itself holds: free memory before and after creating it
        torch.zeros(1, device=device)
        free, total = torch.cuda.mem_get_info(device)
        context = total - free - torch.cuda.memory_reserved()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = out / "gpu_check.jsonl"
    lines.write_text("")
    results = []
    for name, cap, dtype_name in PLAN:
        if name not in args.variants.split(","):
            continue
        try:
            r = check(name, cap, dtype_name, device, 8 if args.dry_run else args.new_tokens, args.dry_run, context)
        except Exception as exc:  # OOM or a refusal: recorded, and the next run goes on
            r = {"variant": name, "card_gib": cap, "dtype": dtype_name, "error": f"{type(exc).__name__}: {exc}"[:400]}
        results.append(r)
        with open(lines, "a") as f:  # one line per run as it finishes: a later crash keeps the earlier ones
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)
    summary = {"date": date.today().isoformat(), "dry_run": args.dry_run, "cuda_context_gib": round(context / GIB, 2),
               "hardware": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
               "results": results}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    return results


if __name__ == "__main__":
    main()
