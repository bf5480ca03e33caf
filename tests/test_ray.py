"""`vl2 batch --ray`: a local Ray instance (this machine's CPUs, no dashboard), two model actors, 24 pages from PDFs
and images plus one hostile file: the same tree as the local batch; an actor killed mid-run and a driver killed
mid-run lose no page and write none twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import PARITY, SAMPLES, TINY

pytestmark = pytest.mark.slow
PAGES = 24  # 7 sample pages, two 6-page PDFs, 5 images; plus a broken PDF that fails as one record


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("corpus")
    for name in ("report.pdf", "letter.pdf", "invoice.png", "objects.png", "scan.png"):
        (src / name).write_bytes((SAMPLES / name).read_bytes())
    page = Image.open(PARITY / "images" / "page_1000x700.png").convert("RGB")
    for n in (1, 2):
        sheets = [page.rotate(15 * k, expand=True, fillcolor="white") for k in range(6)]
        sheets[0].save(src / f"scanned-{n}.pdf", "PDF", save_all=True, append_images=sheets[1:])
    (src / "photos").mkdir()
    for k in range(5):
        page.resize((400 + 40 * k, 300 + 30 * k)).save(src / "photos" / f"p{k}.png")
    (src / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage")
    return src


def _batch(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vl2cli.cli", "batch", str(src), "--out", str(out), "--model", TINY,
            "--max-new-tokens", "12", "--split", "never", "-q", *extra]


def _ray(src: Path, out: Path) -> list[str]:
    return _batch(src, out, "--ray", "local", "--workers", "2", "--batch-size", "2")


def _index(out: Path) -> list[dict]:
    path = out / "index.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _timeless(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


def _tree(out: Path) -> dict[str, object]:
    """Every file's content, with the order of index and results lines and timing fields set aside."""
    tree: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        if path.is_dir() or rel == ".vl2.lock":
            continue
        if path.suffix in (".jsonl", ".json"):
            text = path.read_text()
            rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
                else [json.loads(text)]
            tree[rel] = sorted(json.dumps(_timeless(r) if isinstance(r, dict) else r, sort_keys=True) for r in rows)
        else:
            tree[rel] = path.read_bytes()
    return tree


def _check_complete(out: Path) -> None:
    entries = _index(out)
    keys = [e["key"] for e in entries]
    assert len(keys) == len(set(keys)), "a page was recorded twice"
    assert sum(e["status"] == "ok" for e in entries) == PAGES
    failed = [e for e in entries if e["status"] != "ok"]
    assert len(failed) == 1 and "broken.pdf" in failed[0]["source"]
    assert not list(out.rglob("*.part"))


def _wait_for(out: Path, lines: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while len(_index(out)) < lines:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.2)


def test_ray_writes_the_same_tree_as_the_local_batch(corpus, tmp_path):
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    first = subprocess.run(_batch(corpus, local), capture_output=True, text=True, timeout=900)
    assert first.returncode == 1, first.stderr  # the broken PDF: one failed record, exit code 1
    second = subprocess.run([*_ray(corpus, ray_out), "--json"], capture_output=True, text=True, timeout=900)
    assert second.returncode == 1, second.stderr
    _check_complete(ray_out)
    assert _tree(ray_out) == _tree(local)
    summary = json.loads(second.stdout)
    assert sum(summary["workers"].values()) == PAGES  # per-worker counts (the broken file never reaches one)
    # Ray's own progress blocks, deprecation warnings and log lines stay in its log files unless -v
    ray_lines = [line for line in second.stderr.splitlines() if not line.startswith("vl2: ")]
    assert len(ray_lines) <= 1 and "deprecated" not in second.stderr, second.stderr


def _actor_pids() -> list[int]:
    import psutil
    return [p.pid for p in psutil.process_iter(["cmdline"]) if any("PageReader" in part
                                                                   for part in (p.info["cmdline"] or []))]


@contextlib.contextmanager
def _ray_run(corpus: Path, out: Path, pages_first: int) -> Iterator[subprocess.Popen]:
    """`vl2 batch --ray local` in its own process group, handed over once `pages_first` pages are in the index;
    afterwards the group (the driver and the Ray instance it started) is killed, whatever happened."""
    proc = subprocess.Popen(_ray(corpus, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for(out, pages_first, proc)
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


def test_a_killed_actor_is_replaced_and_its_pages_redone_once(corpus, tmp_path):
    out = tmp_path / "out"
    with _ray_run(corpus, out, 4) as proc:
        pids = _actor_pids()
        assert pids, "no model actor found"
        os.kill(pids[0], signal.SIGKILL)
        assert len(_index(out)) < PAGES, "the run ended before the kill: nothing was tested"
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 1, stderr
    _check_complete(out)


def test_a_killed_driver_resumes_from_the_index(corpus, tmp_path):
    out = tmp_path / "out"
    with _ray_run(corpus, out, 4):
        pass  # leaving the block kills the driver and its Ray instance mid-run
    before = {e["key"] for e in _index(out)}
    assert len(before) < PAGES + 1, "the run ended before the kill: nothing was tested"
    rerun = subprocess.run([*_ray(corpus, out), "--json"], capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr  # the broken file's record was written (at planning) before the kill
    _check_complete(out)
    summary = json.loads(rerun.stdout)
    assert summary["pages_skipped"] >= len(before) - 1  # what was written before the kill is not read again


def test_ctrl_c_stops_cleanly_and_a_rerun_finishes(corpus, tmp_path):
    out = tmp_path / "out"
    with _ray_run(corpus, out, 3) as proc:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
    rerun = subprocess.run(_ray(corpus, out), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    _check_complete(out)
