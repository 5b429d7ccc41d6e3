"""Atomic file writes: a temporary file in the target's folder, then a rename over the target.

A crash or a full disk never leaves half a file, and a concurrent reader sees the old file or the new
one, never a mix. The only file-writing helper of the core; torch-free, so the reports use it too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, mode: int | None = None) -> None:
    """``write(f)`` into a temporary file next to ``path``, flushed to disk, then renamed to ``path``.

    The folder is created if needed. ``mode``: the file's permissions (``mkstemp`` creates 0600).
    On any failure the temporary file is removed and the old ``path``, if any, is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    atomic_write(path, lambda f: f.write(data), mode=mode)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
