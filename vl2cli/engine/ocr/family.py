"""DeepSeek-OCR behind engine.family's interface. Its model, processor and trace are imported when first asked for:
telling a checkpoint's family (vl2 --help, usage errors) stays free of torch and numpy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vl2cli.engine.names import ocr_checkpoint_to_model_name
from vl2cli.engine.ocr.config import OCR_MODES, OCRConfig, ocr_config_from_dict
from vl2cli.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from vl2cli.engine.config import FamilyConfig
    from vl2cli.engine.family import Family
    from vl2cli.engine.loading import LoadedModel
    from vl2cli.engine.ocr.model import DeepseekOCR
    from vl2cli.engine.ocr.processor import OCRProcessor
    from vl2cli.engine.processor import VL2Tokenizer


def own_config(cfg: FamilyConfig) -> OCRConfig:
    if not isinstance(cfg, OCRConfig):
        raise TypeError(f"DeepSeek-OCR given a {type(cfg).__name__}")
    return cfg


class OCRFamily:
    kind = "ocr"
    title = "DeepSeek-OCR"
    prompts = "ocr"
    ngram_rule = True

    def load_config(self, folder: Path, raw: dict[str, Any]) -> OCRConfig:
        try:
            return ocr_config_from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{folder / 'config.json'}: {exc}") from None

    def gpu_bytes(self, cfg: FamilyConfig, quant: str) -> None:
        del cfg, quant  # no estimate of DeepEncoder's peak yet: the load is not refused up front

    def build(self, cfg: FamilyConfig) -> DeepseekOCR:
        from vl2cli.engine.ocr.model import DeepseekOCR
        return DeepseekOCR(own_config(cfg))

    checkpoint_name = staticmethod(ocr_checkpoint_to_model_name)

    def processor(self, tokenizer: VL2Tokenizer, cfg: FamilyConfig) -> OCRProcessor:
        from vl2cli.engine.ocr.processor import OCRProcessor
        return OCRProcessor(tokenizer, own_config(cfg))

    def check_mode(self, mode: str) -> None:
        if mode not in OCR_MODES:
            raise UsageError(f"--ocr-mode {mode!r}: expected one of {', '.join(OCR_MODES)}")

    def check_trace(self, images: int, mode: str | None) -> None:
        if images != 1:
            raise UsageError("a DeepSeek-OCR trace takes exactly one --image")
        if mode is not None:
            self.check_mode(mode)

    def trace(self, loaded: LoadedModel, images: Sequence[Path], prompt: str, max_new_tokens: int, prefix: str,
              mode: str | None, all_positions: bool) -> dict[str, Any]:
        from vl2cli.engine.ocr.model import DeepseekOCR
        from vl2cli.engine.ocr.trace import run_ocr_trace
        del all_positions  # the oracle format samples its rows itself
        self.check_trace(len(images), mode)
        if not isinstance(loaded.model, DeepseekOCR):
            raise TypeError(f"a DeepSeek-OCR trace of a {type(loaded.model).__name__}")
        return run_ocr_trace(loaded, loaded.model, own_config(loaded.cfg), str(images[0]), prompt, mode or "gundam",
                             max_new_tokens, prefix)


FAMILY: Family = OCRFamily()  # typed: mypy checks the class against the protocol
