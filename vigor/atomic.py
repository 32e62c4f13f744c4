"""Atomic file writes: write a temporary file in the target's directory, then ``os.replace`` it.

A reader (or a run resumed after a crash) sees the old file or the new one, never half of one. A write
killed mid-way (power loss, SIGKILL) can leave its temporary behind; :func:`remove_stale_temporaries`
recognizes those by the name :func:`atomic_path` gives them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# ".<stem>.tmp-<8 random characters from mkstemp><suffix>", and ".<name>.<8 random characters>.tmp", the
# name the trainer's earlier writer gave (run directories made before may still hold such leftovers)
_TEMPORARY = re.compile(r"\..+\.tmp-[A-Za-z0-9_]{8}(\.\w+)?|\..+\.[A-Za-z0-9_]{8}\.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix last: some writers (matplotlib) pick the format from it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


def write_with(path: str | os.PathLike, save: Callable[[Path], Any]) -> Path:
    """``save(tmp_path)`` writes the file (e.g. ``fig.savefig``, ``safetensors.torch.save_file``)."""
    with atomic_path(path) as tmp:
        save(tmp)
    return Path(path)


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed writes left under ``root`` (only names :func:`atomic_path`
    gives); returns the paths removed."""
    candidates = {*Path(root).rglob(".*.tmp-*"), *Path(root).rglob(".*.tmp")}
    removed = [p for p in sorted(candidates) if p.is_file() and _TEMPORARY.fullmatch(p.name)]
    for path in removed:
        path.unlink()
    return removed
