"""``vigor verify``: the engine against the oracle on one batch, side by side, with timings."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vigor import atomic
from vigor import engine as _engine
from vigor.engine import SelfCheck, per_sample_grad_norms
from vigor.environment import environment
from vigor.oracle import oracle_grad_norms
from vigor.sharding import compute_dtype

# Relative tolerance the engine is held to, by model dtype (float32: the project's exactness bar).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


@dataclass
class Verification:
    engine: torch.Tensor
    oracle: torch.Tensor
    engine_s: list[float]
    oracle_s: list[float]
    tolerance: float
    self_check: SelfCheck | None = None  # the engine's first-call check, when this run did one

    @property
    def rel_err(self) -> torch.Tensor:
        scale = self.oracle.abs().clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(self.oracle == 0, self.engine.abs(), (self.engine - self.oracle).abs() / scale)

    @property
    def max_rel_err(self) -> float:
        return float(self.rel_err.max())

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.tolerance


def _timed(fn, repeats: int) -> tuple[torch.Tensor, list[float]]:
    out, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if out.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, times


def verify(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    backend: str | None = None,
    params=None,
    repeats: int = 3,
) -> Verification:
    """Run engine and oracle ``repeats`` times each on the same batch (after one untimed warm-up)."""
    engine = lambda: per_sample_grad_norms(model, input_ids, attention_mask, loss_mask, backend=backend, params=params)
    oracle = lambda: oracle_grad_norms(model, input_ids, attention_mask, loss_mask, params=params)
    _engine.LAST_SELF_CHECK = None
    engine(), oracle()
    check = _engine.LAST_SELF_CHECK
    e, e_s = _timed(engine, repeats)
    o, o_s = _timed(oracle, repeats)
    dtype = compute_dtype(model, next(model.parameters()))  # an FSDP2 policy may run fp32 parameters in bf16
    return Verification(e.cpu(), o.cpu(), e_s, o_s, TOLERANCE.get(dtype, 1e-4), check)


def report(v: Verification, token_counts: torch.Tensor) -> str:
    lines = [f"{'sample':>6} {'T_b':>5} {'engine':>14} {'oracle':>14} {'rel err':>10}"]
    for b, (e, o, r) in enumerate(zip(v.engine.tolist(), v.oracle.tolist(), v.rel_err.tolist(), strict=True)):
        lines.append(f"{b:>6} {int(token_counts[b]):>5} {e:>14.7g} {o:>14.7g} {r:>10.2e}")
    e_med, o_med = statistics.median(v.engine_s), statistics.median(v.oracle_s)
    lines += [
        f"max relative error: {v.max_rel_err:.3e} (tolerance {v.tolerance:g}) -> {'OK' if v.ok else 'FAIL'}",
        f"engine (one batched pass): median {e_med * 1e3:.1f} ms over {len(v.engine_s)} runs",
        f"oracle (per-completion autograd loop): median {o_med * 1e3:.1f} ms over {len(v.oracle_s)} runs",
        f"speedup: {o_med / e_med:.2f}x",
    ]
    if v.self_check is not None:
        c = v.self_check
        lines.append(
            f"self-check (first call, row {c.row} by plain autograd): max relative error {c.max_rel_err:.2e} "
            f"per parameter (tolerance {c.tolerance:g}), {c.seconds * 1e3:.1f} ms, not included above"
        )
    return "\n".join(lines)


def write_json(path: Path, v: Verification, settings: dict, dtype: torch.dtype | None = None) -> None:
    """The verification's numbers (every timing, not only medians) and environment, written atomically."""
    data = {
        "settings": {k: (str(x) if isinstance(x, Path) else x) for k, x in settings.items() if k != "run"},
        "environment": environment(settings.get("device", "cpu"), dtype),
        "engine_norms": v.engine.tolist(),
        "oracle_norms": v.oracle.tolist(),
        "rel_err": v.rel_err.tolist(),
        "max_rel_err": v.max_rel_err,
        "tolerance": v.tolerance,
        "ok": v.ok,
        "engine_times_s": v.engine_s,
        "oracle_times_s": v.oracle_s,
        "engine_median_s": statistics.median(v.engine_s),
        "oracle_median_s": statistics.median(v.oracle_s),
        "self_check": None if v.self_check is None else dataclasses.asdict(v.self_check),
    }
    atomic.write_json(path, data)
