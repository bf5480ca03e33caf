"""DeepSeek-OCR 2 behind engine.family's interface. Its model, processor and trace are imported when first asked for:
telling a checkpoint's family (vl2 --help, usage errors) stays free of torch and numpy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vl2cli.engine.names import ocr2_checkpoint_to_model_name
from vl2cli.engine.ocr2.config import OCR2_MODE, OCR2Config, ocr2_config_from_dict, ocr2_mode_refused
from vl2cli.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from vl2cli.engine.config import FamilyConfig
    from vl2cli.engine.family import Family
    from vl2cli.engine.loading import LoadedModel
    from vl2cli.engine.ocr2.model import DeepseekOCR2
    from vl2cli.engine.ocr2.processor import OCR2Processor
    from vl2cli.engine.processor import VL2Tokenizer


def own_config(cfg: FamilyConfig) -> OCR2Config:
    if not isinstance(cfg, OCR2Config):
        raise TypeError(f"DeepSeek-OCR 2 given a {type(cfg).__name__}")
    return cfg


class OCR2Family:
    kind = "ocr2"
    title = "DeepSeek-OCR 2"
    prompts = "ocr"  # DeepSeek-OCR's prompt forms
    ngram_rule = True

    def load_config(self, folder: Path, raw: dict[str, Any]) -> OCR2Config:
        try:
            return ocr2_config_from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{folder / 'config.json'}: {exc}") from None

    def gpu_bytes(self, cfg: FamilyConfig, quant: str) -> None:
        del cfg, quant  # no estimate of DeepEncoder V2's peak yet: the load is not refused up front

    def build(self, cfg: FamilyConfig) -> DeepseekOCR2:
        from vl2cli.engine.ocr2.model import DeepseekOCR2
        return DeepseekOCR2(own_config(cfg))

    checkpoint_name = staticmethod(ocr2_checkpoint_to_model_name)

    def processor(self, tokenizer: VL2Tokenizer, cfg: FamilyConfig) -> OCR2Processor:
        from vl2cli.engine.ocr2.processor import OCR2Processor
        return OCR2Processor(tokenizer, own_config(cfg))

    def check_mode(self, mode: str) -> None:
        """One setting (the official one, DeepSeek-OCR's gundam with 768-pixel tiles): any other mode is refused,
        never quietly read another way."""
        if mode != OCR2_MODE:
            raise UsageError(ocr2_mode_refused(mode))

    def check_trace(self, images: int, mode: str | None) -> None:
        if images != 1:
            raise UsageError("a DeepSeek-OCR 2 trace takes exactly one --image")
        if mode is not None:
            self.check_mode(mode)

    def trace(self, loaded: LoadedModel, images: Sequence[Path], prompt: str, max_new_tokens: int, prefix: str,
              mode: str | None, all_positions: bool) -> dict[str, Any]:
        from vl2cli.engine.ocr2.model import DeepseekOCR2
        from vl2cli.engine.ocr2.processor import OCR2Processor
        from vl2cli.engine.ocr2.trace import run_ocr2_trace
        del all_positions  # the oracle format samples its rows itself
        self.check_trace(len(images), mode)
        model, processor = loaded.model, loaded.processor
        if not isinstance(model, DeepseekOCR2) or not isinstance(processor, OCR2Processor):
            raise TypeError(f"a DeepSeek-OCR 2 trace of a {type(model).__name__}")
        return run_ocr2_trace(loaded, model, processor, own_config(loaded.cfg), str(images[0]), prompt,
                              max_new_tokens, prefix)


FAMILY: Family = OCR2Family()  # typed: mypy checks the class against the protocol
