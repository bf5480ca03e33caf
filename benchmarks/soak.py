"""Long runs: a soak of many requests of mixed lengths through the scheduler, and incremental detokenization.

    python benchmarks/run.py soak [--smoke]        # 2,000 requests (200 in smoke form)
    python benchmarks/run.py detokenize [--smoke]

The soak runs the test checkpoint (tiny shapes: 3 layers, hidden 64) on the CPU with end tokens disabled, so every
request runs to its own budget and rows join and leave the batch at every step. It reports the peak RSS after the
first 100 requests and at the end, the median decode-step time over the first and the last 10% of the steps run
with a full batch, and the cache's capacity (positions allocated, all rows) at its smallest and largest. The same
script runs against an older checkout (PYTHONPATH=that checkout) to measure the cache that grew.
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from pathlib import Path

import torch
from testkit import submit

CKPT = Path(__file__).resolve().parent.parent / "tests" / "data" / "parity" / "ckpt" / "tiny"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _capacity(cache) -> int:
    """Positions allocated, all rows (read from the buffers: works for the slot cache and the one before it)."""
    if cache is None:
        return 0
    first = cache.layers[0][0]
    return first.shape[0] * first.shape[cache.time_axis]


def bench_soak(smoke: bool) -> dict:
    from vl2cli.engine.generation import Engine, SamplingParams
    from vl2cli.engine.loading import load_model
    from vl2cli.engine.scheduler import Scheduler
    torch.manual_seed(0)
    loaded = load_model(str(CKPT), device="cpu", dtype="float32", quant="none")
    tok = loaded.processor.tokenizer
    engine = Engine(loaded.model, -1, tok.pad_id)  # no end token: each answer runs to its budget
    rng = random.Random(2000)
    n, batch = (200, 8) if smoke else (2000, 8)
    prompts = [loaded.processor.prepare_prompt("word " * rng.randrange(1, 80) + f"question {i}", [])
               for i in range(50)]
    scheduler = Scheduler(engine, max_batch=batch, max_queue=n)
    for _ in range(n):
        submit(scheduler, prompts[rng.randrange(len(prompts))], SamplingParams(max_new_tokens=rng.randrange(1, 80)))
    full_steps: list[float] = []
    capacities: list[int] = []
    ended = 0
    rss_after_100 = None
    started = time.perf_counter()
    while not scheduler.idle:
        full = len(scheduler.running) == batch and not scheduler.joining
        t = time.perf_counter()
        ended += len(scheduler.step())
        if full:  # a full batch admits nothing: a pure decode step of `batch` rows
            full_steps.append(time.perf_counter() - t)
        capacities.append(_capacity(scheduler.cache))
        if rss_after_100 is None and ended >= 100:
            rss_after_100 = _peak_rss_mib()
    tenth = max(1, len(full_steps) // 10)
    first, last = statistics.median(full_steps[:tenth]), statistics.median(full_steps[-tenth:])
    rss_end = _peak_rss_mib()
    live = [c for c in capacities if c]
    return {"bench": "soak", "requests": n, "batch": batch, "seconds": round(time.perf_counter() - started, 1),
            "full_batch_steps": len(full_steps), "peak_rss_mib_after_100": round(rss_after_100 or 0.0, 1),
            "peak_rss_mib_end": round(rss_end, 1), "rss_end_over_after_100": round(rss_end / (rss_after_100 or 1), 3),
            "step_s_first_10pct": round(first, 5), "step_s_last_10pct": round(last, 5),
            "step_last_over_first": round(last / first, 3), "cache_capacity_min": min(live),
            "cache_capacity_max": max(live), "targets": "rss ratio <= 1.05, step ratio <= 1.10, capacity constant"}


def bench_detokenize(smoke: bool) -> dict:
    """Per-token cost of following an answer's text as it grows: the incremental decoder against re-decoding the
    answer from the start at every token (what streaming and stop strings did), at 100 and 2,000 tokens."""
    from vl2cli.engine.loading import load_model
    from vl2cli.reader import AnswerText, Reader
    reader = Reader(load_model(str(CKPT), device="cpu", dtype="float32", quant="none"))
    tok = reader.loaded.processor.tokenizer
    words = "Revenue rose by 4% to 1,234.50 € in 2024; Ünïcödé 日本語 テキスト, a table | cell | row.\n"
    ids = tok.tok.encode(words * 300, add_special_tokens=False).ids
    out: dict = {"bench": "detokenize"}
    for length in (100, 2000):
        answer = ids[:length]
        text = AnswerText(reader)
        t = time.perf_counter()
        for token in answer:
            text.push(token)
        incremental = (time.perf_counter() - t) / length
        sample = answer if not smoke else answer[:200]
        t = time.perf_counter()
        for k in range(len(answer) - len(sample) + 1, len(answer) + 1):  # the last tokens: the full cost
            reader.decode(answer[:k])
        redecode = (time.perf_counter() - t) / len(sample)
        out[f"tokens_{length}"] = {"incremental_us_per_token": round(incremental * 1e6, 2),
                                   "redecode_us_per_token": round(redecode * 1e6, 2)}
    out["incremental_2000_over_100"] = round(out["tokens_2000"]["incremental_us_per_token"]
                                             / out["tokens_100"]["incremental_us_per_token"], 2)
    return out
