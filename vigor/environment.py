"""What a recorded measurement ran on: commit, versions, device, dtype, time."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes to tracked files), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        return sha.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment(device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    device = torch.device(device)
    return {
        "commit": git_commit(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "transformers_version": _version("transformers"),
        "cuda_version": torch.version.cuda,
        "python": platform.python_version(),
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
