"""Shared benchmark plumbing: timing (medians after warm-up), peak memory, environment, atomic output.

Every benchmark script in bench/ records through this module so that its JSON always carries the raw
repeat times, the medians, the peak memory, the versions, the device and the commit.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vigor import atomic
from vigor.environment import device_name, environment, git_commit  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parent.parent


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that the resident size taken as
    the base of a measurement is the live memory, not what earlier runs freed but the allocator kept
    (without it a repeated computation reuses its warm-up's pages and shows ~0 extra)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the base may include retained memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _RssSampler:
    """Peak resident memory of this process while a block runs (CPU): sampled every millisecond."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> _RssSampler:
        release_free_heap()
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


@dataclass
class Timing:
    times_s: list[float]
    peak_extra_bytes: int
    warmup: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "times_s": self.times_s,
            "median_s": self.median_s,
            "peak_extra_bytes": self.peak_extra_bytes,
            "warmup": self.warmup,
            **self.extra,
        }


def measure(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; peak memory above the
    pre-call level (CUDA allocator on a GPU, sampled RSS on the CPU) over the timed runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with _RssSampler() as rss:
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        peak = rss.peak - rss.base
    return Timing(times, int(peak), warmup)


def kernel_median_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds of one kernel call: Triton's ``do_bench`` on a GPU (L2 flushed between runs),
    :func:`measure` elsewhere. A first call (compilation, autotuning) is never timed."""
    fn()
    if device.type != "cuda":
        return measure(fn, device, repeats=3).median_s * 1e3
    import triton.testing

    torch.cuda.synchronize(device)
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


RESULTS_ENV = "VIGOR_BENCH_RESULTS"  # a folder under which a run without --out writes <name>/


def results_dir(out: Path | None, name: str) -> Path:
    """Where a benchmark writes: ``--out`` when given, else ``$VIGOR_BENCH_RESULTS/<name>``, else
    ``bench/results/<name>``."""
    if out is not None:
        return Path(out)
    base = os.environ.get(RESULTS_ENV)
    return (Path(base) if base else ROOT / "bench" / "results") / name


def write_results(
    out: Path, stem: str, result: dict[str, Any], markdown: str, plot: Callable[[Path], None] | None = None
) -> list[Path]:
    """The one results format: ``<stem>.json`` (everything, raw) beside ``<stem>.md`` (the table), and
    ``<stem>.png`` from ``plot(path)`` when given. Without matplotlib (the ``bench`` extra) the PNG is
    skipped with a one-line note. Each file is written atomically; returns the paths written."""
    written = [atomic.write_json(out / f"{stem}.json", result), atomic.write_text(out / f"{stem}.md", markdown)]
    if plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            print(f"note: {stem}.png skipped: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        else:
            plot(out / f"{stem}.png")
            written.append(out / f"{stem}.png")
    return written


def atomic_save_figure(fig: Any, path: Path) -> None:
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
