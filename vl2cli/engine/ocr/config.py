"""DeepSeek-OCR's configuration: DeepSeek-VL2-tiny's decoder (read and validated as engine/config.py reads it) behind
DeepEncoder, whose sizes the official code fixes, and the five resolution modes.

Follows deepseek-ai/DeepSeek-OCR (commit e4ac34e) `DeepSeek-OCR-master/DeepSeek-OCR-vllm/config.py` and
`deepseek_ocr.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from vl2cli.engine.config import LanguageConfig, linear_projector_language

ARCHITECTURE = "DeepseekOCRForCausalLM"
OCR_MODES: dict[str, tuple[int, int, bool]] = {  # name -> (global view, tile size, cropping): the official modes
    "tiny": (512, 512, False), "small": (640, 640, False), "base": (1024, 1024, False),
    "large": (1280, 1280, False), "gundam": (1024, 640, True),
}


@dataclass(frozen=True)
class OCRConfig:
    """DeepSeek-OCR: DeepSeek-VL2-tiny's decoder behind DeepEncoder (SAM ViT-B -> CLIP-L -> linear projector).

    The encoder's sizes are fixed by the official code (they are not read from config.json, which describes them
    only by name); the decoder is read and validated like DeepSeek-VL2's."""

    kind: ClassVar[str] = "ocr"
    language: LanguageConfig = field(default_factory=LanguageConfig)
    projector_input: int = 2048  # CLIP-L 1024 + SAM 1024 channels, concatenated
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    min_crops: int = 2
    max_crops: int = 6


def ocr_config_from_dict(raw: dict[str, Any]) -> OCRConfig:
    return OCRConfig(language=linear_projector_language(raw, "DeepSeek-OCR", "deepseek_ocr", OCRConfig.projector_input))
