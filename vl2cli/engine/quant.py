"""4-bit (NF4) and 8-bit weights through bitsandbytes, applied while the checkpoint streams in.

Every language-model linear layer is quantized - attention projections, dense MLPs, every
routed and shared expert - except MLA's kv_b_proj: decode folds its matrix into the query
and output (weight absorption), which needs it dense; it is under 2% of the weights.
Vision, projector, embeddings, the gate and lm_head stay 16-bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from vl2cli.errors import UsageError

QUANT_MODES = ("auto", "nf4", "int8", "none")


def resolve_quant(mode: str, device: torch.device) -> str:
    if mode not in QUANT_MODES:
        raise UsageError(f"--quant {mode!r}: expected one of {', '.join(QUANT_MODES)}")
    if mode == "auto":
        return "nf4" if device.type == "cuda" else "none"
    return mode


def _bnb() -> ModuleType:
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UsageError(f"4-/8-bit weights need bitsandbytes (pip install bitsandbytes): {exc}") from None
    return bnb


_LINEAR4: Callable[..., nn.Module] | None = None


def _linear4bit_class() -> Callable[..., nn.Module]:
    """Linear4bit whose CPU forward dequantizes and runs a plain matmul.

    bitsandbytes' CPU single-row (gemv) path mis-shapes small layers; on CUDA its kernels are used as is.
    """
    global _LINEAR4
    if _LINEAR4 is None:
        bnb = _bnb()
        import bitsandbytes.functional as bnbf
        base: Any = bnb.nn.Linear4bit  # bitsandbytes is imported here, only when asked for (not on every machine)

        class Linear4bit(base):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if x.device.type != "cpu":
                    return super().forward(x)
                w = bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state).to(x.dtype)
                return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

        _LINEAR4 = Linear4bit
    return _LINEAR4


def is_quantizable(name: str) -> bool:
    """Module names (model namespace) whose Linear gets quantized."""
    return name.startswith("language.layers.") and not name.endswith("kv_b_proj")


def swap_linear_layers(model: nn.Module, mode: str, compute_dtype: torch.dtype) -> list[str]:
    """Replace quantizable nn.Linear modules (on the meta device) by bitsandbytes layers; returns their names."""
    if mode == "none":
        return []
    bnb = _bnb()
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not is_quantizable(name):
            continue
        bias = module.bias is not None
        if mode == "nf4":
            new = _linear4bit_class()(module.in_features, module.out_features, bias=bias, compute_dtype=compute_dtype,
                                    quant_type="nf4", compress_statistics=True, device="meta")
        else:
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=bias,
                                      has_fp16_weights=False, threshold=6.0, device="meta")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        swapped.append(name)
    return swapped


def quantized_weight(module: nn.Module, weight: torch.Tensor, device: torch.device) -> nn.Parameter:
    """Quantize a 16/32-bit weight for a swapped module; the full-precision tensor is dropped at once."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to(device)
    return bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
