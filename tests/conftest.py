"""Fixtures: the parity checkpoints loaded once per session. Shared helpers live in tests/helpers.py."""

from __future__ import annotations

import ctypes
import gc
import sys
import time

import pytest

from tests.helpers import CKPT, PARITY, TINY, running_server

_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """After each test, what it freed goes back to the system: many tests load a model in-process (the CLI through
    CliRunner), and glibc keeps freed heap in its per-thread arenas, so the one pytest process of the whole suite
    grew past 20 GB of resident memory on a 24 GB machine, where Ray's memory monitor then kills test_ray's
    actors as they start."""
    yield
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


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


@pytest.fixture(scope="module")
def module_reader():
    """One reader of the tiny checkpoint per test module, for the servers it starts."""
    from vl2cli.engine.loading import load_model
    from vl2cli.reader import Reader
    return Reader(load_model(TINY, device="cpu", dtype="float32", quant="none"))


@pytest.fixture(scope="module")
def served(module_reader):
    """A server on module_reader (up to 8 rows decoding together): (url, server)."""
    with running_server(module_reader, max_batch=8) as (url, server):
        yield url, server


@pytest.fixture
def slow_decoding(module_reader, monkeypatch):
    """Every decode step takes 20 ms and no answer stops early: requests stay in flight long enough to watch."""
    from vl2cli import reader as reader_module
    engine = module_reader.engine
    real = engine.decode_step

    def slow(tokens, cache):
        time.sleep(0.02)
        return real(tokens, cache)
    monkeypatch.setattr(engine, "decode_step", slow)
    monkeypatch.setattr(reader_module, "find_loop", lambda ids: None)
    monkeypatch.setattr(engine, "eos_id", -1)


def pytest_terminal_summary(terminalreporter):
    from tests import test_reliability
    stats = test_reliability.CORPUS_STATS
    if stats["files tried"]:
        terminalreporter.write_line("hostile-input corpus: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
