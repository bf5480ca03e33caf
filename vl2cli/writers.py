"""Atomic file output: a temp file in the same folder, fsync, then rename - never a half-written file.

Temp files are named `.vl2-*.part`, so a later run can tell its own leftovers from a user's files, and
finished files get the permissions the user's umask gives any new file (not the temp file's 0600).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vl2cli.errors import OutputError

TEMP_PREFIX, TEMP_SUFFIX = ".vl2-", ".part"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # read once at import, in the main thread: os.umask is process-wide


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name[:80]}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_own_temp_files(folder: Path) -> int:
    """Remove temp files an earlier vl2 run left (killed mid-write); never anything else. Call under the lock."""
    removed = 0
    for stale in folder.rglob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        if stale.is_file() and not stale.is_symlink():
            stale.unlink(missing_ok=True)
            removed += 1
    return removed
