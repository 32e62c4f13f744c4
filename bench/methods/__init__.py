"""The methods the grad-norm benchmark runs on one batch, one small module each.

Every method is a ``prepare(work) -> Prepared`` function: it sets up whatever it needs (a copy of the
model, hooks, a wrapper), returns a callable that performs one full computation, and a cleanup. A method
that cannot run on the workload raises :class:`Refused` with the reason (the peer's own error text
where it gives one), which the benchmark records instead of a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.presets import GrpoBatch, ModelSpec
from vigor.batch import TokenBatch


def row_sq_norms(t: torch.Tensor, block: int = 1 << 22) -> torch.Tensor:
    """Squared L2 norm of each row of ``t`` (dim 0), accumulated in float64, ``block`` columns at a time.

    A float32 ``vector_norm`` over millions of entries loses precision on the CPU (measured: -2.4e-4
    relative on the 0.5B-shaped preset's embedding gradient), which is as large as the errors the
    benchmark must expose; the blocks bound the float64 copy.
    """
    flat = t.reshape(t.shape[0], -1)
    out = torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)
    for part in flat.split(max(1, block // max(1, t.shape[0])), dim=1):
        out += part.double().square().sum(1)
    return out


class Refused(Exception):
    """This method cannot run on this workload; the message says why."""


def require(module: str, install: str) -> object:
    """Import an optional peer, or refuse the method saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Refused(f"{module} is not installed ({exc}); install it with: {install}") from exc


@dataclass
class Workload:
    """One model and one batch, shared by every method of a run."""

    model: nn.Module
    spec: ModelSpec
    batch: TokenBatch  # validated (vigor.prepare_batch)
    raw: GrpoBatch
    device: torch.device
    dtype: torch.dtype
    attn: str
    seed: int
    func_max_bytes: int  # torch.func: the most per-sample gradient memory it may materialize at once
    # Filled by the benchmark once the official loop has run: the reference every method is checked against.
    official_norms: torch.Tensor | None = None
    official_sq: dict[str, torch.Tensor] | None = None
    # Methods are set up again for every timed round when the benchmark interleaves them: what is costly
    # to make (the untied twin, its official norms) is kept here until the workload is done.
    keep_twin: bool = False
    cache: dict[str, object] = field(default_factory=dict)
    _twin: nn.Module | None = None

    def untied_twin(self) -> nn.Module:
        """The same preset with its LM head untied from the embedding (built once, on demand)."""
        from bench.presets import build_model

        if self._twin is None:
            self._twin = build_model(
                self.spec.untied(), dtype=self.dtype, device=self.device, attn=self.attn, seed=self.seed
            )
        return self._twin

    def release_twin(self) -> None:
        self._twin = None
        self.cache.pop("twin_official_norms", None)


@dataclass
class Prepared:
    run: Callable[[], torch.Tensor | None]  # one full computation: per-sample norms [B], or None (floors)
    cleanup: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)
    # False when the method scores another model (the untied twin): its norms are then checked against
    # ``reference`` only, not against the official loop on the workload's model.
    same_model: bool = True
    # A further check, called after the first run: (reference norms [B], what they are), e.g. the official
    # loop on the twin, or restricted to the parameters the method covers.
    reference: Callable[[], tuple[torch.Tensor, str]] | None = None
    # Called after the first run: extra facts for the JSON (coverage, chunk size...).
    facts: Callable[[], dict] | None = None
