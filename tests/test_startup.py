"""Start-up: what `vl2` does before a command's work. `--help`, usage errors and `vl2 models` import neither torch
nor the engine (their speed is a benchmark: `python benchmarks/run.py cli`); Ctrl-C at any point of `vl2 serve`'s
start-up ends the process cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.helpers import TINY

HEAVY = ("torch", "numpy", "vl2cli.engine.loading", "vl2cli.reader", "fastapi")


def _modules_after(*args: str) -> set[str]:
    """The modules `vl2 ARGS` imported by the time it exited (a fresh interpreter)."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print(' '.join(sorted(sys.modules)), file=sys.__stdout__))\n"
            "from vl2cli.cli import main\n"
            f"sys.argv = ['vl2', *{list(args)!r}]\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return set(proc.stdout.split()[-2000:])


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["ocr", "--help"], ["ocr"], ["ocr", "missing.png"],
                                  ["table", TINY, "--format", "nope"], ["models"], ["models", "--json"],
                                  ["serve", "--port", "99999"]])
def test_help_usage_errors_and_models_never_import_the_engine(args):
    loaded = _modules_after(*args)
    assert "typer" in loaded  # the CLI ran
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def _start_server(drain: float, *extra: str) -> tuple[subprocess.Popen, list[tuple[float, str]], float]:
    proc = subprocess.Popen([sys.executable, "-m", "vl2cli.cli", "serve", "--model", TINY, "--port", "0",
                             "--drain-seconds", str(drain), *extra], stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.monotonic() - started, line.rstrip("\n")))
    threading.Thread(target=read, daemon=True).start()
    return proc, lines, started


def _serving_url(lines: list[tuple[float, str]]) -> str | None:
    ready = [text for _, text in lines if "serving" in text]
    return ready[0].split(" at ")[1].split("/ ")[0] if ready else None


def _stopped_cleanly(proc: subprocess.Popen, lines: list[tuple[float, str]], bound: float) -> None:
    try:
        code = proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {bound:.0f} s after Ctrl-C: {lines}")
    time.sleep(0.2)  # the reader thread takes the last lines
    text = "\n".join(t for _, t in lines)
    assert code == 130, text
    assert "Traceback" not in text and "Error" not in text, text


@pytest.mark.slow
def test_ctrl_c_at_any_point_of_serve_start_up_stops_it_cleanly():
    """A Ctrl-C during the imports, the model's load or uvicorn's start-up once went missing (a library swallowed
    the KeyboardInterrupt while importing) and the server kept serving. Here: one start measured to "serving", then
    Ctrl-C at fractions of that time and the moment /health first answers; each run ends with 130, without a
    traceback, within the rest of the start-up plus the drain time."""
    drain = 3.0
    proc, lines, started = _start_server(drain)
    while _serving_url(lines) is None and proc.poll() is None and time.monotonic() - started < 120:
        time.sleep(0.02)
    ready_after = time.monotonic() - started
    url = _serving_url(lines)
    assert url, lines
    assert httpx.get(url + "/health?token=secret").status_code == 200
    chat = httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text
    proc.send_signal(signal.SIGINT)
    _stopped_cleanly(proc, lines, drain + 30)
    said = [text for _, text in lines]
    assert any(t.startswith("vl2: GET /health 200 ") and t.endswith(" s") for t in said), said  # the access log
    assert "secret" not in "\n".join(said)  # never a query string (nor a body, nor a header)
    assert any(t.startswith("vl2: POST /v1/chat/completions 200 3 tokens ") for t in said), said
    assert any("vl2 serve: draining: 0 running and 0 queued" in t for t in said), said
    assert "vl2: vl2 serve: stopped" in said, said
    bound = ready_after + drain + 30  # a loaded machine: the start-up step in progress finishes first
    for fraction in (0.2, 0.4, 0.6, 0.8, None):
        proc, lines, started = _start_server(drain)
        if fraction is None:  # the moment the server first answers
            while proc.poll() is None and time.monotonic() - started < 120:
                url = _serving_url(lines)
                try:
                    if url and httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.005)
        else:
            time.sleep(fraction * ready_after)
        proc.send_signal(signal.SIGINT)
        _stopped_cleanly(proc, lines, bound)


def test_serve_log_level_is_checked_before_the_model_loads():
    from tests.helpers import vl2
    result = vl2("serve", "--log-level", "loud", model="/nonexistent", tokens=None)
    assert result.exit_code == 2 and "--log-level 'loud': expected debug, info, warning, error" in result.stderr
