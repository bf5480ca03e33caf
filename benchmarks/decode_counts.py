"""Count what one decode step does, at a variant's real shapes, on the `meta` device (nothing is allocated):
aten ops, calls of the linears NF4 would quantize (4-bit kernel launches on a GPU), host syncs and
host-to-device copies. A GPU pays for every sync (the host waits for the queue) and every copy.

    python benchmarks/run.py syncs
"""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vl2cli.engine import moe
from vl2cli.engine.cache import KVCache
from vl2cli.engine.generation import Engine, SamplingParams, choose_tokens
from vl2cli.engine.loading import build_model
from vl2cli.engine.quant import is_quantizable
from vl2cli.engine.vl2.config import preset_config


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def decode_step_counts(variant: str, batch: int = 1, context: int = 2048) -> dict:
    cfg = preset_config(variant)
    model, _ = build_model(cfg, torch.bfloat16, "none")  # on meta: real shapes, no memory (dtype: the params')
    meta = torch.device("meta")
    engine = Engine(model, 1, 0)
    cache = KVCache(cfg.language, batch, context + 2, meta, model.dtype)
    cache.lengths = [context] * batch  # every row holds `context` positions (the device copy is meta: no values)
    counts: Counter = Counter()
    top_k = cfg.language.num_experts_per_tok or 1

    def fake_expert_counts(idx: torch.Tensor, n_experts: int) -> list[int]:
        counts["host_syncs"] += 1  # the real one reads the counts back to the host
        tokens = idx.shape[0]
        return [tokens] * top_k + [0] * (n_experts - top_k)  # each token's k experts: k experts busy

    real_to = torch.Tensor.to

    def counting_to(self: torch.Tensor, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu":
            counts["host_to_device_copies"] += 1
        return out

    def counting_tolist(self: torch.Tensor):
        counts["host_syncs"] += 1
        return [0] * self.numel()  # meta tensors hold no data; the step only needs the shape

    hooks = [m.register_forward_pre_hook(lambda *_: counts.update(["linear_calls"]))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and is_quantizable(name)]
    logits = torch.zeros(batch, cfg.language.vocab_size, device=meta)
    model.language.rope_table(meta)  # moved to the device once, before the first step
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(moe, "expert_counts", fake_expert_counts))
        stack.enter_context(mock.patch.object(torch.Tensor, "to", counting_to))
        stack.enter_context(mock.patch.object(torch.Tensor, "tolist", counting_tolist))
        stack.enter_context(torch.inference_mode())
        ops = stack.enter_context(_OpCounter())
        tokens = choose_tokens(logits, SamplingParams(), None)
        tokens.tolist()  # what the generation loop reads back each step
        engine.decode_step(tokens, cache)
    for h in hooks:
        h.remove()
    moe_layers = sum(cfg.language.is_moe_layer(i) for i in range(cfg.language.num_hidden_layers))
    return {"variant": variant, "batch": batch, "ops": ops.ops, "linear_calls_4bit": counts["linear_calls"],
            "host_syncs": counts["host_syncs"], "host_to_device_copies": counts["host_to_device_copies"],
            "moe_layers": moe_layers}
