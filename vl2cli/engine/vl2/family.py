"""DeepSeek-VL2 behind engine.family's interface. Its model, processor and trace are imported when first asked for:
telling a checkpoint's family (vl2 --help, usage errors) stays free of torch and numpy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vl2cli.engine.memory import need_bytes, weight_bytes
from vl2cli.engine.names import checkpoint_to_model_name
from vl2cli.engine.vl2.config import VL2Config, load_config

if TYPE_CHECKING:
    from vl2cli.engine.config import FamilyConfig
    from vl2cli.engine.family import Family
    from vl2cli.engine.loading import LoadedModel
    from vl2cli.engine.processor import VL2Tokenizer
    from vl2cli.engine.vl2.model import DeepseekVL2
    from vl2cli.engine.vl2.processor import Processor


def own_config(cfg: FamilyConfig) -> VL2Config:
    if not isinstance(cfg, VL2Config):
        raise TypeError(f"DeepSeek-VL2 given a {type(cfg).__name__}")
    return cfg


class VL2Family:
    kind = "vl2"
    title = "DeepSeek-VL2"
    prompts = "vl2"
    ngram_rule = False

    def load_config(self, folder: Path, raw: dict[str, Any]) -> VL2Config:
        return load_config(folder, raw)

    def gpu_bytes(self, cfg: FamilyConfig, quant: str) -> tuple[float, float]:
        own = own_config(cfg)
        return need_bytes(own, quant, 1), weight_bytes(own, quant)

    def build(self, cfg: FamilyConfig) -> DeepseekVL2:
        from vl2cli.engine.vl2.model import DeepseekVL2
        return DeepseekVL2(own_config(cfg))

    checkpoint_name = staticmethod(checkpoint_to_model_name)

    def processor(self, tokenizer: VL2Tokenizer, cfg: FamilyConfig) -> Processor:
        from vl2cli.engine.vl2.processor import Processor
        return Processor(tokenizer, own_config(cfg))

    def check_mode(self, mode: str) -> None:
        del mode  # one way to read a page: DeepSeek-OCR's resolution modes do not apply

    def check_trace(self, images: int, mode: str | None) -> None:
        del images, mode  # any number of images (text-only included); no modes

    def trace(self, loaded: LoadedModel, images: Sequence[Path], prompt: str, max_new_tokens: int, prefix: str,
              mode: str | None, all_positions: bool) -> dict[str, Any]:
        from vl2cli.engine.trace import load_reference_image
        from vl2cli.engine.vl2.trace import run_trace
        del mode
        prepared = loaded.processor.prepare_prompt(prompt, [load_reference_image(p) for p in images])
        return run_trace(loaded, prepared, max_new_tokens, prefix, all_positions)


FAMILY: Family = VL2Family()  # typed: mypy checks the class against the protocol
