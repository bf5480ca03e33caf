"""Checkpoint tensor names -> ours, one function per checkpoint layout: the one place the official names meet the
model's (the loader streams each tensor to the name its family's function gives). No torch here.
"""

from __future__ import annotations

SKIPPED_PREFIXES = ("vision.attn_pool.",)  # SigLIP's pooling head: DeepSeek-VL2 uses patch features only


def checkpoint_to_model_name(name: str) -> str | None:
    """DeepSeek-VL2's layout: the decoder under `language.model.`. None: a tensor the model knowingly does not use."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    if name.startswith("language.model."):
        return "language." + name[len("language.model."):]
    return name


def model_to_checkpoint_name(name: str) -> str:
    """Inverse of checkpoint_to_model_name, for writing checkpoints in the official layout."""
    if name.startswith("language.") and not name.startswith("language.lm_head."):
        return "language.model." + name[len("language."):]
    return name


def ocr_checkpoint_to_model_name(name: str) -> str | None:
    """DeepSeek-OCR's layout: the encoder and projector under `model.`, the decoder's layers flat under `model.`."""
    if name == "lm_head.weight":
        return "language.lm_head.weight"
    if name.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "language." + name[len("model."):]
    if name.startswith("model."):
        return name[len("model."):]
    return name


def ocr2_checkpoint_to_model_name(name: str) -> str | None:
    """DeepSeek-OCR 2's layout: DeepSeek-OCR's, with the Qwen2 encoder's layers and norm under
    `model.qwen2_model.model.model.` (the reference wraps a Qwen2Model twice) and its queries under
    `model.qwen2_model.`; here both hang off `qwen2_model.`."""
    if name.startswith("model.qwen2_model.model.model."):
        return "qwen2_model." + name[len("model.qwen2_model.model.model."):]
    return ocr_checkpoint_to_model_name(name)
