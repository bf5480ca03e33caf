"""The first GPU run must just work: what can be proven without a GPU is proven here, on CPU with faked devices."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.helpers import IMG, TINY


@pytest.mark.parametrize("capability,expected", [((7, 5), torch.float16), ((8, 6), torch.bfloat16),
                                                  ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_native_bf16_or_float16(monkeypatch, capability, expected):
    """A T4 (sm75) answers is_bf16_supported() == True through emulation; it must get float16."""
    from vl2cli.engine.loading import pick_dtype
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert pick_dtype("auto", torch.device("cuda")) == expected
    assert pick_dtype("float32", torch.device("cuda")) == torch.float32  # an explicit choice stands


def _scaled(model: torch.nn.Module) -> None:
    """Activations at the magnitudes where DeepSeek-V2 leaves float16's range (large embeddings and outputs)."""
    with torch.no_grad():
        model.language.embed_tokens.weight.mul_(1000)  # weights stay inside float16; the sums do not
        for name, p in model.language.named_parameters():
            if name.endswith(("down_proj.weight", "o_proj.weight")):
                p.mul_(20_000)


def test_float16_never_overflows_to_inf_or_nan():
    from vl2cli.engine.generation import Engine
    from vl2cli.engine.loading import load_model
    from vl2cli.engine.scheduler import generate
    wide = load_model(TINY, device="cpu", dtype="float32", quant="none")
    half = load_model(TINY, device="cpu", dtype="float16", quant="none")
    _scaled(wide.model)
    _scaled(half.model)
    prompt = wide.processor.prepare_prompt("<image>\nRead it.", [Image.open(IMG)])
    peak = []
    hook = wide.model.language.layers[-1].register_forward_hook(lambda m, a, out: peak.append(out.abs().max()))
    tok = wide.processor.tokenizer
    logits32, _ = Engine(wide.model, tok.eos_id, tok.pad_id).prefill([prompt], 0)
    hook.remove()
    assert peak[0] > 65504  # the residual stream really leaves float16's range here
    logits16, _ = Engine(half.model, tok.eos_id, tok.pad_id).prefill([prompt], 0)
    assert torch.isfinite(logits16).all()
    gen = generate(Engine(half.model, tok.eos_id, tok.pad_id), [prompt], _greedy(4))[0]
    assert len(gen.ids) == 4
    assert torch.isfinite(logits32).all()


def _greedy(n: int):
    from vl2cli.engine.generation import SamplingParams
    return SamplingParams(max_new_tokens=n)


def _fake_card(monkeypatch, free_gib: float, total_gib: float | None = None) -> None:
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (int(free_gib * gib), int((total_gib or free_gib) * gib)))


def test_preflight_says_what_fits_before_reading_any_weight(monkeypatch):
    from vl2cli.engine.loading import preflight
    from vl2cli.engine.vl2.config import preset_config
    from vl2cli.errors import DeviceError
    cuda = torch.device("cuda")
    _fake_card(monkeypatch, 11.5, 12)  # a 12 GB card with the desktop on it
    with pytest.raises(DeviceError, match=r"base needs ~1\d\.\d GiB .* has 11\.5 GiB free of 12\.0: use a smaller"):
        preflight(preset_config("base"), "nf4", cuda, "base")
    preflight(preset_config("small"), "nf4", cuda, "small")
    with pytest.raises(DeviceError, match="--quant nf4"):
        preflight(preset_config("small"), "none", cuda, "small")  # 16-bit small is 30 GiB of weights
    _fake_card(monkeypatch, 23.5, 24)
    preflight(preset_config("base"), "nf4", cuda, "base")


def test_load_model_runs_the_preflight_before_reading_weights(monkeypatch):
    from vl2cli.engine import loading
    from vl2cli.errors import DeviceError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(loading, "load_weights", lambda *a, **k: pytest.fail("weights read before the preflight"))
    _fake_card(monkeypatch, 0.1)
    with pytest.raises(DeviceError, match=r"needs ~0\.5 GiB on the GPU"):
        loading.load_model(TINY, device="cuda", quant="none")


@pytest.mark.parametrize("card,variant,batch", [(12, "small", (1, 2, 3)), (16, "small", (4, 8)),
                                                (24, "base", (4, 8)), (12, "tiny", (8,))])
def test_batch_size_follows_free_memory(card, variant, batch):
    from vl2cli.engine.memory import GIB, largest_batch
    from vl2cli.engine.vl2.config import preset_config
    assert largest_batch(preset_config(variant), "nf4", card * GIB) in batch


def test_auto_batch_size_reads_the_device(monkeypatch, reader):
    from vl2cli.engine.memory import batch_for_free
    assert reader.auto_batch_size() == 4  # CPU: the default
    monkeypatch.setattr(reader.loaded, "device", torch.device("cuda"))
    _fake_card(monkeypatch, 0.001)
    assert reader.auto_batch_size() == 1  # never 0: one page is always tried (and the OOM ladder has it)
    _fake_card(monkeypatch, 64)
    assert reader.auto_batch_size() == batch_for_free(reader.loaded.cfg, 64 * 1024**3) == 8


def test_nf4_bits_per_weight_match_real_bitsandbytes_tensors():
    pytest.importorskip("bitsandbytes")
    from testkit import linear_bytes
    from torch import nn

    from vl2cli.engine.memory import NF4_BITS
    from vl2cli.engine.quant import quantized_weight, swap_linear_layers

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            with torch.device("meta"):
                self.language = nn.Module()
                self.language.layers = nn.ModuleList([nn.Linear(2048, 1408, bias=False)])
    holder = Holder()
    swap_linear_layers(holder, "nf4", torch.bfloat16)
    layer = holder.language.layers[0]
    layer.weight = quantized_weight(layer, torch.randn(1408, 2048, dtype=torch.bfloat16), torch.device("cpu"))
    measured = linear_bytes(holder)["quantizable_linear_bytes"] * 8 / (1408 * 2048)
    assert abs(measured - NF4_BITS) < 0.01, measured  # 4 bits + 8-bit absmax per 64 + float32 per 256 absmax


def test_models_table_and_the_readme_agree():
    import re
    from pathlib import Path

    from vl2cli.engine.memory import variant_table
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for row in variant_table():
        cards = " | ".join(f"batch {b}" if b else "-" for b in row["nf4_batch_on"].values())
        line = f"| {row['name']} | {row['vram_nf4_gib']:.1f} GiB | {row['vram_bf16_gib']:.1f} GiB | {cards} |"
        assert line in readme, line
    assert re.search(r"\| variant \| NF4, one page \| bf16, one page \| 12 GB \| 16 GB \| 24 GB \|", readme)


@pytest.mark.parametrize("variant,moe_layers,linear_calls", [("tiny", 11, 282), ("small", 26, 630), ("base", 29, 702)])
def test_host_syncs_per_decode_step_do_not_grow(variant, moe_layers, linear_calls):
    """One sync per MoE layer (the expert group sizes) and one for the sampled tokens; nothing copied from the
    host (the RoPE table lives on the device). Before: tiny 24 syncs, base 60 (RoPE copied every step)."""
    from decode_counts import decode_step_counts
    counts = decode_step_counts(variant)
    assert counts["moe_layers"] == moe_layers and counts["linear_calls_4bit"] == linear_calls
    assert counts["host_syncs"] == moe_layers + 1
    assert counts["host_to_device_copies"] == 0
    assert counts["ops"] <= {"tiny": 1400, "small": 3850, "base": 4800}[variant]  # measured 1373 / 3800 / 4774
