"""Which model a `--model` value names, and loading it: the library's side of model choice (no torch on import).

`ModelChoice` resolves the value to a checkpoint folder (a local folder, an alias, a hub id), tells its family from
the name or the folder's config without building anything, refuses what the family cannot do before any weight
loads, and loads it as a `Reader`. `variants` and `download` are `vl2 models`' table and download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vl2cli.errors import UsageError

if TYPE_CHECKING:
    from vl2cli.reader import Reader

HUB_KINDS = (("ocr", "deepseek-ai/DeepSeek-OCR"), ("ocr2", "deepseek-ai/DeepSeek-OCR-2"))  # alias, hub id


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
        """"ocr" for DeepSeek-OCR, "ocr2" for DeepSeek-OCR 2 (told by alias, hub id or a local folder's config),
        else "vl2"."""
        for kind, hub_id in HUB_KINDS:
            if self.model in (kind, hub_id, "hf:" + hub_id):
                return kind
        folder = Path(self.model).expanduser()
        if (folder / "config.json").is_file():
            from vl2cli.engine.config import OCR2Config, OCRConfig, load_any_config
            cfg = load_any_config(folder)
            return "ocr" if isinstance(cfg, OCRConfig) else "ocr2" if isinstance(cfg, OCR2Config) else "vl2"
        return "vl2"

    def family(self) -> str:
        """The prompt family: "ocr" for DeepSeek-OCR and DeepSeek-OCR 2 (the same prompt forms), else "vl2"."""
        return "vl2" if self.kind() == "vl2" else "ocr"

    def check_mode(self, ocr_mode: str) -> None:
        """Refused before the model loads: DeepSeek-OCR 2 reads in one mode only."""
        if ocr_mode != "gundam" and self.kind() == "ocr2":
            from vl2cli.engine.ocr2 import ocr2_mode_refused
            raise UsageError(ocr2_mode_refused(ocr_mode))

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
