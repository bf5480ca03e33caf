"""DeepSeek-OCR 2's configuration: DeepSeek-VL2-tiny's decoder (read and validated as engine/config.py reads it)
behind DeepEncoder V2, whose sizes the official code fixes, and its one resolution setting.

Follows deepseek-ai/DeepSeek-OCR-2 (commit 2f3699e) `DeepSeek-OCR2-master/DeepSeek-OCR2-vllm/config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from vl2cli.engine.config import LanguageConfig, linear_projector_language

ARCHITECTURE = "DeepseekOCR2ForCausalLM"
OCR2_MODE = "gundam"  # its one setting is DeepSeek-OCR's gundam mode with 768-pixel tiles; no other mode exists


def ocr2_mode_refused(mode: str) -> str:
    return (f"--ocr-mode {mode}: DeepSeek-OCR 2 reads in one setting only, gundam (2-6 tiles of 768 px and a 1024 "
            "view); the other modes are DeepSeek-OCR's (--model ocr)")


@dataclass(frozen=True)
class OCR2Config:
    """DeepSeek-OCR 2: DeepSeek-VL2-tiny's decoder behind DeepEncoder V2 (SAM ViT-B -> a Qwen2-0.5B-shaped encoder
    with learnable queries -> linear projector), one resolution setting: 2-6 tiles of 768 px and a 1024 global view.

    As for DeepSeek-OCR, the encoder's sizes are the official code's (config.json names them only); the decoder is
    read and validated like DeepSeek-VL2's."""

    kind: ClassVar[str] = "ocr2"
    language: LanguageConfig = field(default_factory=LanguageConfig)
    projector_input: int = 896  # the Qwen2 encoder's width
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    global_size: int = 1024  # BASE_SIZE
    tile_size: int = 768  # IMAGE_SIZE
    min_crops: int = 2
    max_crops: int = 6


def ocr2_config_from_dict(raw: dict[str, Any]) -> OCR2Config:
    return OCR2Config(language=linear_projector_language(raw, "DeepSeek-OCR 2", "deepseek_ocr2", OCR2Config.projector_input))
