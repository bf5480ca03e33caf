"""Fixtures: the parity checkpoints loaded once per session. Shared helpers live in tests/helpers.py."""

from __future__ import annotations

import pytest

from tests.helpers import CKPT, PARITY


@pytest.fixture(scope="session")
def tiny_ckpt():
    return CKPT / "tiny"


@pytest.fixture(scope="session")
def loaded_tiny(tiny_ckpt):
    from vl2cli.engine.loading import load_model
    return load_model(str(tiny_ckpt), device="cpu", dtype="float32", quant="none")


@pytest.fixture(scope="session")
def page_image():
    from PIL import Image
    return Image.open(PARITY / "images" / "page_1000x700.png").convert("RGB")


@pytest.fixture
def reader(loaded_tiny):
    from vl2cli.reader import Reader
    return Reader(loaded_tiny)


def pytest_terminal_summary(terminalreporter):
    from tests import test_reliability
    stats = test_reliability.CORPUS_STATS
    if stats["files tried"]:
        terminalreporter.write_line("hostile-input corpus: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
