"""Atomic file writes: write a temporary file in the target's directory, then ``os.replace`` it, so a
reader (or a resumed run after a crash) sees either the old file or the new one, never half of one."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """``write(tmp_path)`` fills a temporary file next to ``path``, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


# the names mkstemp gives atomic_write's temporaries: ".<name>.<8 random characters>.tmp"
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed mid-way (power loss, SIGKILL) left under ``root``:
    only names atomic_write gives. Returns the paths removed."""
    removed = [p for p in sorted(Path(root).rglob("*.tmp")) if p.is_file() and _TEMPORARY.fullmatch(p.name)]
    for path in removed:
        path.unlink()
    return removed
