"""Which model a `--model` value names, and loading it: the library's side of model choice (no torch on import).

`ModelChoice` resolves the value to a checkpoint folder (a local folder, an alias, a hub id), tells its family from
the name or the folder's config without building anything, refuses what the family cannot do before any weight
loads, and loads it as a `Reader`. `variants` and `download` are `vl2 models`' table and download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vl2cli.reader import Reader

@dataclass(frozen=True)
class ModelChoice:
    """The option table's model words (vl2cli/options.py), by the same names."""

    model: str = "tiny"
    quant: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    offline: bool = False

    @classmethod
    def from_words(cls, words: dict[str, Any]) -> ModelChoice:
        return cls(**{name: words[name] for name in cls.__dataclass_fields__ if name in words})

    def resolve(self) -> Path:
        """The checkpoint folder (downloaded into the hub's cache if it must be, unless offline)."""
        from vl2cli.engine.hub import resolve_model
        return resolve_model(self.model, revision=self.revision, offline=self.offline or None)

    def kind(self) -> str:
        """"vl2", "ocr" (DeepSeek-OCR) or "ocr2" (DeepSeek-OCR 2), told by alias, hub id or a local folder's config
        (engine.hub.model_kind: no weights, no torch)."""
        from vl2cli.engine.hub import model_kind
        return model_kind(self.model)

    def family(self) -> str:
        """The prompt family: "ocr" for DeepSeek-OCR and DeepSeek-OCR 2 (the same prompt forms), else "vl2"."""
        from vl2cli.engine.family import get_family
        return get_family(self.kind()).prompts

    def check_mode(self, ocr_mode: str) -> None:
        """Refused before the model loads: what the family cannot read in (DeepSeek-OCR 2 reads in one mode only)."""
        from vl2cli.engine.family import get_family
        get_family(self.kind()).check_mode(ocr_mode)

    def load(self, folder: Path | None = None) -> Reader:
        """The model, loaded once (from `folder` when it is already resolved)."""
        from vl2cli.engine.loading import load_model
        from vl2cli.reader import Reader
        if folder is not None:
            return Reader(load_model(folder, device=self.device, dtype=self.dtype, quant=self.quant))
        return Reader(load_model(self.model, device=self.device, dtype=self.dtype, quant=self.quant,
                                 revision=self.revision, offline=self.offline or None))


def variants() -> list[dict]:
    """`vl2 models`: each variant's sizes, memory and card fits, and its local snapshot if downloaded (None)."""
    from vl2cli.engine.hub import cached_model_path
    from vl2cli.engine.memory import variant_table
    rows = variant_table()
    for row in rows:
        path = cached_model_path(row["name"])
        row["cached"] = str(path) if path else None
    return rows


def download(name: str, revision: str | None = None) -> Path:
    """A variant or hub id into the Hugging Face cache (safetensors and configs only); its folder."""
    from vl2cli.engine.hub import resolve_model
    return resolve_model(name, revision=revision, offline=False, explicit=True)
