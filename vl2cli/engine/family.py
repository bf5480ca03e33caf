"""Model families behind one interface: what the loader, the reader and `vl2 trace` ask of DeepSeek-VL2, DeepSeek-OCR
and DeepSeek-OCR 2 (`Family`), and which family a checkpoint is.

Each family is a package under engine/ (vl2/, ocr/, ocr2/) holding its config, processor, model and parity trace;
its `family.py` holds FAMILY, the object that implements `Family`. Families are registered by model_type, the way
mlx-vlm finds a model's code (mlx_vlm/utils.py `get_model_and_args`: config.json's model_type, remapped where
needed, names the package to import): the official DeepSeek-OCR and DeepSeek-OCR 2 checkpoints keep DeepSeek-VL2's
model_type `deepseek_vl_v2`, so their `architectures` entry remaps it first. Telling a checkpoint's family reads only
its config.json (no torch, no weights): a family's `family.py` imports its model only when asked to build one;
engine.hub.model_kind tells the family a --model value names.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from vl2cli.engine.config import read_json_object
from vl2cli.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from vl2cli.engine.config import FamilyConfig
    from vl2cli.engine.language import WithDecoder
    from vl2cli.engine.loading import LoadedModel
    from vl2cli.engine.processor import Content, Message, PageViews, Prepared, VL2Tokenizer

# config.json's model_type -> the family's package under engine/
MODEL_TYPES = {"deepseek_vl_v2": "vl2", "deepseek_ocr": "ocr", "deepseek_ocr2": "ocr2"}
# architectures entries that remap model_type `deepseek_vl_v2` (DeepSeek-OCR's checkpoints keep DeepSeek-VL2's)
ARCHITECTURE_REMAPPING = {"DeepseekOCRForCausalLM": "deepseek_ocr", "DeepseekOCR2ForCausalLM": "deepseek_ocr2"}
DEFAULT_MODEL_TYPE = "deepseek_vl_v2"  # a config.json without model_type (DeepSeek-VL2's own code never reads it)


class FamilyProcessor(Protocol):
    """A family's prompts: its template (or raw prompt), its way of cutting a page into views, its image tokens."""

    tokenizer: VL2Tokenizer

    def tile(self, image: Image.Image, mode: str | None = None) -> PageViews:
        """A page cut ahead of the model (the rendering thread does it), in `mode` where the family has modes."""
        ...

    def prepare_prompt(self, prompt: Content, images: Sequence[Image.Image | PageViews], system_prompt: str = "",
                       mode: str | None = None) -> Prepared:
        """One user turn with its images (pages as given or cut ahead)."""
        ...

    def prepare(self, messages: list[Message], system_prompt: str = "", mode: str | None = None) -> Prepared:
        """A conversation (DeepSeek-OCR's families take one user turn only)."""
        ...


class Family(Protocol):
    """What the loader, the reader and the trace command ask of a model family; nothing outside a family's package
    tells the families apart any other way."""

    kind: str  # "vl2", "ocr", "ocr2": its package under engine/, and what `model_kind` answers
    title: str  # "DeepSeek-VL2": for messages
    prompts: str  # the prompt family the tasks' templates are written for: "vl2", or "ocr" (both OCR models)
    ngram_rule: bool  # DeepSeek-OCR's no-repeat n-gram rule applies (--no-repeat-ngrams)

    def load_config(self, folder: Path, raw: dict[str, Any]) -> FamilyConfig:
        """The checkpoint's config, validated (`raw`: its config.json); ConfigError names the field."""
        ...

    def gpu_bytes(self, cfg: FamilyConfig, quant: str) -> tuple[float, float] | None:
        """(weights plus one page, weights alone) on a GPU at `quant`, estimated before loading; None where the
        family has no estimate (the load is then not refused up front)."""
        ...

    def build(self, cfg: FamilyConfig) -> WithDecoder:
        """The model, on the current default device (the loader builds it on `meta`)."""
        ...

    def checkpoint_name(self, name: str) -> str | None:
        """A checkpoint tensor's name in our model; None: a tensor the model knowingly does not use."""
        ...

    def processor(self, tokenizer: VL2Tokenizer, cfg: FamilyConfig) -> FamilyProcessor:
        ...

    def check_mode(self, mode: str) -> None:
        """UsageError where the family cannot read in this --ocr-mode (said before any page is read)."""
        ...

    def check_trace(self, images: int, mode: str | None) -> None:
        """UsageError where a trace of this many images in this mode cannot be written (said before loading)."""
        ...

    def trace(self, loaded: LoadedModel, images: Sequence[Path], prompt: str, max_new_tokens: int, prefix: str,
              mode: str | None, all_positions: bool) -> dict[str, Any]:
        """Write the family's parity trace (PREFIX.json, PREFIX.npz, in its format); returns its metadata."""
        ...


def get_family(kind: str) -> Family:
    """The family whose package is engine/<kind>/ (imported on first use, as mlx-vlm imports a model's module)."""
    if kind not in MODEL_TYPES.values():
        raise ConfigError(f"no model family {kind!r}: expected one of {', '.join(MODEL_TYPES.values())}")
    return cast("Family", importlib.import_module(f"vl2cli.engine.{kind}.family").FAMILY)


def family_kind(raw: dict[str, Any]) -> str:
    """Which family a config.json describes: its model_type, remapped by its architectures."""
    model_type = raw.get("model_type") or DEFAULT_MODEL_TYPE
    if model_type == DEFAULT_MODEL_TYPE:
        architectures = raw.get("architectures") or []
        remapped = [ARCHITECTURE_REMAPPING[a] for a in architectures
                    if isinstance(a, str) and a in ARCHITECTURE_REMAPPING]
        model_type = remapped[0] if remapped else model_type
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type = {model_type!r}: not a DeepSeek-VL2, DeepSeek-OCR or DeepSeek-OCR 2 "
                          "checkpoint")
    return MODEL_TYPES[model_type]


def read_family_config(folder: str | Path) -> tuple[Family, FamilyConfig]:
    """A checkpoint folder's family and its config (config.json, validated by the family; no weights read)."""
    folder = Path(folder)
    path = folder / "config.json"
    raw = read_json_object(path)
    try:
        family = get_family(family_kind(raw))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return family, family.load_config(folder, raw)


def read_config(folder: str | Path) -> FamilyConfig:
    """A checkpoint folder's config, whichever family it is."""
    return read_family_config(folder)[1]
