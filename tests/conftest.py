from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vigor_kernels as vk


def backends_under_test() -> list[str]:
    """Backends the op suite runs on: $VIGOR_TEST_BACKENDS, else every backend this install has."""
    wanted = os.environ.get("VIGOR_TEST_BACKENDS")
    if wanted:
        return [b.strip() for b in wanted.split(",") if b.strip()]
    return [name for name, status in vk.available_backends().items() if status.available]


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (real weights) as a Hugging Face directory, converted once per cache. Without
    the 'real' extra the tests using it skip, except in CI (CI=true) or with VIGOR_REQUIRE_REAL=1: fail."""
    from vigor.pretrained import PretrainedError, smollm2_dir

    try:
        return smollm2_dir("float32")
    except PretrainedError as e:
        if os.environ.get("CI") == "true" or os.environ.get("VIGOR_REQUIRE_REAL") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
