"""Parameter and memory arithmetic for the published variants (no weights needed)."""

from __future__ import annotations

import torch

from vl2cli.engine.config import VL2Config, preset_config
from vl2cli.engine.quant import is_quantizable

NF4_BITS = 4 + 32 / 64 / 256 * 8 + 32 / 256 / 8  # 4-bit codes + double-quantized absmax (~4.127 bits)
GIB = 1024**3


def count_params(cfg: VL2Config) -> dict[str, int]:
    """Parameters of every part, and those that NF4 quantizes (built on `meta`: nothing allocated)."""
    from vl2cli.engine.model import DeepseekVL2
    with torch.device("meta"):
        model = DeepseekVL2(cfg)
    counts = {"total": 0, "quantizable": 0, "experts": 0}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            counts["total"] += p.numel()
            if isinstance(module, torch.nn.Linear) and is_quantizable(name):
                counts["quantizable"] += p.numel()
            if ".experts." in name:
                counts["experts"] += p.numel()
    return counts


def kv_bytes_per_token(cfg: VL2Config, dtype_bytes: int = 2) -> int:
    lc = cfg.language
    per_layer = (lc.kv_lora_rank + lc.qk_rope_head_dim) if lc.use_mla else 2 * lc.num_key_value_heads * lc.head_dim
    return per_layer * lc.num_hidden_layers * dtype_bytes


def estimate_vram(name: str, context: int = 4096) -> dict[str, float]:
    """GiB of the weights alone, and of weights + KV cache at `context` + ~1 GiB workspace, at nf4 and bf16."""
    cfg = preset_config(name)
    c = count_params(cfg)
    other = c["total"] - c["quantizable"]
    kv = kv_bytes_per_token(cfg) * context
    weights_nf4 = c["quantizable"] * NF4_BITS / 8 + other * 2
    weights_bf16 = c["total"] * 2
    return {"nf4": round((weights_nf4 + kv + GIB) / GIB, 2), "bf16": round((weights_bf16 + kv + GIB) / GIB, 2),
            "weights_nf4": round(weights_nf4 / GIB, 2), "weights_bf16": round(weights_bf16 / GIB, 2),
            "params": c["total"]}
