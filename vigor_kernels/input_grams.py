"""Reuse of an input's Gram ``X X^T`` between linear layers that read the same input in one pass.

Within one transformer block q/k/v read the same normed hidden states, and gate/up read the same ones: the
ghost norm's ``X X^T`` is the same for all of them, so inside :func:`shared_input_grams` (the engine's
backward) a backend may form it once. An entry is reused only for the very same rows of the very same
memory, unmodified: its key is the storage's address, offset, shape, strides, dtype, version counter and
row window, and the entry holds the input itself, so the memory cannot be freed and handed to another
tensor while the entry lives. Outside the context nothing is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_state = threading.local()  # .entry: None (sharing, nothing kept yet), a kept entry, or absent (not sharing)
_OFF = object()  # what a thread without an entry reads: not sharing


@contextmanager
def shared_input_grams() -> Iterator[None]:
    """Within this context (on this thread), consecutive ghost norms of one input share its Gram."""
    outer = getattr(_state, "entry", _OFF)
    _state.entry = None
    try:
        yield
    finally:
        _state.entry = outer


def memory_key(t: torch.Tensor) -> tuple:
    """Names the data ``t`` views: its storage's address, offset, shape, strides, dtype, device and version
    counter. Two tensors with one key hold the same values, as long as the first is alive (so its memory
    cannot have gone to other data)."""
    return (
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
        t.device,
        t._version,
    )


def input_gram(x: torch.Tensor, lo: int, hi: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` (the Gram of rows ``[lo, hi)`` of ``x``), or the one formed for the previous call if that
    call had the same input and window."""
    entry = getattr(_state, "entry", _OFF)
    if entry is _OFF:
        return compute()
    key = (*memory_key(x), lo, hi)
    if entry is not None and entry[1] == key:
        return entry[2]
    gram = compute()
    _state.entry = (x, key, gram)
    return gram
