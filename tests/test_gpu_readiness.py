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
    gen = Engine(half.model, tok.eos_id, tok.pad_id).generate([prompt], _greedy(4))[0]
    assert len(gen.ids) == 4
    assert torch.isfinite(logits32).all()


def _greedy(n: int):
    from vl2cli.engine.generation import SamplingParams
    return SamplingParams(max_new_tokens=n)
