"""Shared fixtures: the parity checkpoints copied from shared/parity, and tiny checkpoints built on the fly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vl2cli.engine.config import load_config
from vl2cli.engine.loading import model_to_checkpoint_name, random_model

DATA = Path(__file__).parent / "data"
PARITY = DATA / "parity"
CKPT = PARITY / "ckpt"


def make_checkpoint(folder: Path, base: str = "tiny", seed: int = 0, language: dict | None = None,
                    extra_tensors: dict | None = None, drop: tuple[str, ...] = (), std: float = 0.02) -> Path:
    """A random-weight checkpoint in the official layout, from a parity checkpoint's config plus overrides."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in (CKPT / base).iterdir():
        if f.suffix == ".json":
            shutil.copy(f, folder / f.name)
    raw = json.loads((folder / "config.json").read_text())
    raw["language_config"].update(language or {})
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
    cfg = load_config(folder)
    model = random_model(cfg, seed=seed, std=std)
    tensors = {model_to_checkpoint_name(k): v.contiguous() for k, v in model.state_dict().items()}
    tensors["vision.attn_pool.latent"] = torch.zeros(1, 1, cfg.vision.width)
    tensors.update(extra_tensors or {})
    for name in drop:
        tensors.pop(name)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    return CKPT / "tiny"


@pytest.fixture(scope="session")
def loaded_tiny(tiny_ckpt):
    from vl2cli.engine.loading import load_model
    return load_model(str(tiny_ckpt), device="cpu", dtype="float32", quant="none")


@pytest.fixture(scope="session")
def page_image():
    from PIL import Image
    return Image.open(PARITY / "images" / "page_1000x700.png").convert("RGB")


def pytest_terminal_summary(terminalreporter):
    from tests import test_reliability
    stats = test_reliability.CORPUS_STATS
    if stats["files tried"]:
        terminalreporter.write_line("hostile-input corpus: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
