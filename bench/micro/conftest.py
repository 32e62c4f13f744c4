"""Microbenchmarks of the vigor_kernels ops and the engine (pytest-benchmark).

    pytest bench/micro --benchmark-only                      # every available backend
    pytest bench/micro --benchmark-only --benchmark-json=out.json

Not collected by the default test run (pyproject's testpaths is tests/).
"""

from __future__ import annotations

import pytest
import torch

import vigor_kernels as vk


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # The project's default options carry --benchmark-disable (so tests/ never times anything);
    # asking for --benchmark-only here means asking for the timings.
    if config.getoption("benchmark_only", False):
        config.option.benchmark_disable = False


def _backend_params() -> list:
    """Each available backend on the device it serves; triton only on a GPU (interpreter timings mean nothing)."""
    cuda = torch.cuda.is_available()
    params = []
    for name, status in vk.available_backends().items():
        device = "cuda" if name == "cuda" or (name == "triton" and cuda) else "cpu"
        skip = None
        if not status.available:
            skip = status.reason
        elif name == "triton" and not cuda:
            skip = "triton on the CPU runs only in the interpreter: no meaningful timing"
        elif name == "cuda" and not cuda:
            skip = "no CUDA device"
        marks = [pytest.mark.skip(reason=skip)] if skip else []
        params.append(pytest.param((name, torch.device(device)), id=name, marks=marks))
    return params


@pytest.fixture(params=_backend_params())
def backend(request) -> tuple[str, torch.device]:
    return request.param


def ragged_ranges(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Valid rows of a ragged group: sample b keeps the first ``length * (b + 1) / batch`` rows."""
    ends = [max(1, length * (b + 1) // batch) for b in range(batch)]
    return torch.tensor([[0, e] for e in ends], dtype=torch.int64, device=device)


def synchronized(fn, device: torch.device):
    """``fn`` followed by a device synchronization, so a GPU timing covers the work."""

    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run
