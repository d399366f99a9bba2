"""Atomic file writes: every file the runtime writes (adapter files, bundle files, manifests) goes through here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write_to: Callable[[Path], object]) -> Path:
    """``write_to(tmp)`` then rename over ``path``: readers see the old file or the new one, never half of one,
    and a failed write leaves the old file in place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_to(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
