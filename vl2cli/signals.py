"""Signals while a command runs: Ctrl-C during start-up (`StartingUp`), the drain of a reading run
(`Interrupts`) and of a Ray run (`RayInterrupts`). Process-wide handlers: the CLI installs them, the library never.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from vl2cli.pipeline import StopFlag
    from vl2cli.reader import Reader

DRAIN_SECONDS = float(os.environ.get("VL2_DRAIN_SECONDS", "60"))  # how long a signal lets pages in flight finish


def err(message: str) -> None:
    typer.echo(message, err=True)


class StartingUp:
    """Ctrl-C while a command starts: imports, resolving and loading the model. Python's own handler raises
    KeyboardInterrupt wherever the main thread is, and in the middle of a library's import or a C++ call that goes
    wrong: numpy's import swallows it (so a server went on serving), pydantic turns it into a SchemaError, torch's
    pybind11 aborts the process. Here the first Ctrl-C is only noted and acted on when the step in progress ends
    (KeyboardInterrupt, exit 130); a second one leaves at once (nothing is written yet)."""

    def __init__(self) -> None:
        self.received = False
        self.previous: Any = None

    def __enter__(self) -> StartingUp:
        if _in_main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, _signum: int, _frame: object) -> None:
        if self.received:
            os.write(2, b"vl2: interrupted\n")  # os.write: safe whatever the main thread was writing
            os._exit(130)
        self.received = True
        os.write(2, b"vl2: interrupted: stopping once the start-up step in progress ends (again to stop now)\n")

    def check(self) -> None:
        """A step boundary: stop here if Ctrl-C came during the step."""
        if self.received:
            raise KeyboardInterrupt

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if exc_type is None:
            self.check()


class Interrupts:
    """SIGINT/SIGTERM: the first lets the pages in flight finish (at most DRAIN_SECONDS), the second stops now."""

    def __init__(self, reader: Reader):
        from vl2cli.pipeline import StopFlag
        self.reader = reader
        self.flag: StopFlag = StopFlag()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self.flag

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.flag.signal:
            self.reader.stop_within(0)
            err("vl2: second signal: stopping now")
            return
        self.flag.signal = signum
        self.reader.stop_within(DRAIN_SECONDS)
        err(f"vl2: {signal.Signals(signum).name} received: finishing the pages in flight (at most "
            f"{DRAIN_SECONDS:.0f} s; again to stop now), then stopping")

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class RayInterrupts(Interrupts):
    """--ray: the first signal stops taking results (pages in flight on the workers are dropped, not recorded: a rerun
    reads them); the second leaves at once."""

    def __init__(self) -> None:
        from vl2cli.pipeline import StopFlag
        self.flag, self.previous = StopFlag(), {}

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.flag.signal:
            raise KeyboardInterrupt
        self.flag.signal = signum
        err(f"vl2: {signal.Signals(signum).name} received: stopping after the page being written (again to stop now)")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
