"""Find a checkpoint (folder, hub id or alias), tell its family (engine.family), then stream its safetensors into
the family's model built on `meta`.

Loading is strict: every model tensor must come from the checkpoint with the shape the config
implies, every checkpoint tensor must be used or knowingly skipped, and shapes are checked
from the file header before any tensor is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from vl2cli.engine.family import get_family, read_family_config
from vl2cli.engine.hub import resolve_model
from vl2cli.engine.memory import GIB, need_bytes, weight_bytes
from vl2cli.engine.names import checkpoint_to_model_name, model_to_checkpoint_name
from vl2cli.engine.processor import VL2Tokenizer
from vl2cli.engine.quant import quantized_weight, resolve_quant, swap_linear_layers
from vl2cli.errors import CheckpointError, DeviceError

if TYPE_CHECKING:
    from vl2cli.engine.config import FamilyConfig
    from vl2cli.engine.family import Family, FamilyProcessor
    from vl2cli.engine.language import WithDecoder
    from vl2cli.engine.vl2.config import VL2Config

log = logging.getLogger("vl2cli")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc})") from None
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{folder}: only pickle weights ({', '.join(pickles[:3])}); vl2 loads safetensors only, "
                              "because unpickling can execute code hidden in the file")
    raise CheckpointError(f"{folder}: no .safetensors weights found")


def place_tensor(model: nn.Module, name: str, tensor: torch.Tensor, quantized_modules: set[str], device: torch.device,
           dtype: torch.dtype) -> None:
    """Put one tensor into the model: quantized for a swapped layer's weight, else cast and moved."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if module_name in quantized_modules and attr == "weight":
        param = quantized_weight(module, tensor.to(dtype), device)
    else:
        param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
    setattr(module, attr, param)


def load_weights(model: nn.Module, folder: Path, device: torch.device, dtype: torch.dtype,
                 quantized_modules: set[str], names: Callable[[str], str | None] = checkpoint_to_model_name) -> int:
    """Stream every shard into the model; returns how many tensors were loaded."""
    expected = {name: p.shape for name, p in model.named_parameters()}
    loaded: set[str] = set()
    for shard in shard_files(folder):
        try:
            handle = safe_open(str(shard), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{shard}: not a readable safetensors file ({exc})") from None
        with handle as f:
            for ck_name in f.keys():
                name = names(ck_name)
                if name is None:
                    continue
                if name not in expected:
                    raise CheckpointError(f"{shard.name}: tensor {ck_name} is not part of this model's config")
                shape = tuple(f.get_slice(ck_name).get_shape())  # header only: nothing allocated yet
                if shape != tuple(expected[name]):
                    raise CheckpointError(f"{shard.name}: tensor {ck_name} has shape {list(shape)}, "
                                          f"config implies {list(expected[name])}")
                if name in loaded:
                    raise CheckpointError(f"{shard.name}: tensor {ck_name} appears twice")
                place_tensor(model, name, f.get_tensor(ck_name), quantized_modules, device, dtype)
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: checkpoint lacks tensor {missing[0]} (our name){more}"
                              if names is not checkpoint_to_model_name else
                              f"{folder}: checkpoint lacks tensor {model_to_checkpoint_name(missing[0])}{more}")
    return len(loaded)


@dataclass
class LoadedModel:
    model: WithDecoder  # the family's model: its embed_prompts, and the decoder the engine runs
    processor: FamilyProcessor  # the family's prompts: tile, prepare_prompt, prepare, tokenizer
    cfg: FamilyConfig  # the family's config (cfg.kind names the family)
    folder: Path
    device: torch.device
    dtype: torch.dtype
    quant: str
    seconds: float  # load time, for -v

    @property
    def family(self) -> Family:
        return get_family(self.cfg.kind)


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CheckpointError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return dev


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        if device.type == "cuda":
            # bf16 only where it is native (Ampere, sm80, and later): is_bf16_supported() also answers True for
            # emulated bf16 (a T4, sm75), which is slow and makes attention fall back to the math kernel.
            major, _ = torch.cuda.get_device_capability(device)
            return torch.bfloat16 if major >= 8 else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise CheckpointError(f"--dtype {dtype!r}: expected one of auto, float32, bfloat16, float16")
    return table[dtype]


def _cpu_dtype_that_fits(model: nn.Module) -> torch.dtype:
    """float32 on CPU (exact) unless the float32 weights would take over 60% of the free RAM; then bfloat16."""
    import psutil
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    if fp32_bytes <= 0.6 * psutil.virtual_memory().available:
        return torch.float32
    log.warning("float32 weights (%.1f GiB) would not fit in free memory; using bfloat16 "
                "(pass --dtype float32 to insist)", fp32_bytes / 1024**3)
    return torch.bfloat16


def preflight(cfg: VL2Config, quant: str, device: torch.device, name: str) -> None:
    """Before reading any weight: does the device hold the weights and one page? Say what fits if not."""
    _check_fits(need_bytes(cfg, quant, 1), weight_bytes(cfg, quant), quant, device, name)


def _check_fits(need: float, weights: float, quant: str, device: torch.device, name: str) -> None:
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if need > free:
        raise DeviceError(f"{name} needs ~{need / GIB:.1f} GiB on the GPU (weights {weights / GIB:.1f} "
                          f"GiB at {quant}, plus one page); {device} has {free / GIB:.1f} GiB free of "
                          f"{total / GIB:.1f}: use a smaller variant (see `vl2 models`), --quant nf4, or --device cpu")


def build_model(cfg: FamilyConfig, dtype: torch.dtype, quant: str) -> tuple[WithDecoder, set[str]]:
    """The model of the config's family on `meta` (nothing allocated) with quantizable linears swapped (the
    decoder's only: vision stays 16-bit); returns it and the swapped names."""
    with torch.device("meta"):
        model = get_family(cfg.kind).build(cfg)
    swapped = set(swap_linear_layers(model, quant, dtype))
    return model.eval().requires_grad_(False), swapped


def load_model(spec: str | Path = "tiny", device: str | None = None, dtype: str | None = None,
               quant: str = "auto", revision: str | None = None, offline: bool | None = None) -> LoadedModel:
    import time
    started = time.perf_counter()
    folder = resolve_model(str(spec), revision=revision, offline=offline)
    family, cfg = read_family_config(folder)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    mode = resolve_quant(quant, dev)
    fits = family.gpu_bytes(cfg, mode)
    if fits is not None:
        _check_fits(*fits, mode, dev, str(spec))
    tokenizer = VL2Tokenizer(folder, cfg)
    if len(tokenizer) > cfg.language.vocab_size:
        raise CheckpointError(f"{folder}: tokenizer has {len(tokenizer)} tokens but vocab_size is {cfg.language.vocab_size}")
    model, swapped = build_model(cfg, torch_dtype, mode)
    if dtype in (None, "auto") and dev.type == "cpu" and torch_dtype == torch.float32:
        torch_dtype = _cpu_dtype_that_fits(model)
    load_weights(model, folder, dev, torch_dtype, swapped, family.checkpoint_name)
    processor = family.processor(tokenizer, cfg)
    return LoadedModel(model, processor, cfg, folder, dev, torch_dtype, mode, time.perf_counter() - started)

