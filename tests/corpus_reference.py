"""A reference for per-sample gradient norms that shares no code with the engine nor with
``vigor.oracle_grad_norms``, and the verdict of the engine against it.

Reference (docs/reward.md#per-completion-loss, written out again from scratch): each sample runs ALONE
through the model,
exactly as it sits in the batch (same padding, same positions, same attention mask), in eval mode and
in the model's own dtype; its loss is the mean next-token NLL over its completion tokens (token ``t``
with ``loss_mask[t] = 1`` is predicted by the logits at position ``t - 1``, temperature 1, float32
cross-entropy); ``torch.autograd.grad`` gives the gradient of every trainable parameter, whose squared
norms are summed in float64. A sample without a loss token has loss 0, hence norm 0.

The verdict (:func:`judge`) sorts what the engine did into ``exact`` / ``refused`` / ``wrong`` /
``crash``: ``wrong`` is a number returned that disagrees with the reference, which is the one outcome the
project forbids.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import vigor

FP32_RTOL = 1e-4


def _logits(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=attn, use_cache=False)
    return out if isinstance(out, torch.Tensor) else out.logits


def reference_sq_norms(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    params: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``{parameter name: per-sample squared gradient norm [B] float64}`` over the trainable parameters
    (or the parameters named in ``params``), one sample at a time."""
    named = dict(model.named_parameters())
    theta = {n: p for n, p in named.items() if (p.requires_grad if params is None else n in params)}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    sq = {n: torch.zeros(input_ids.shape[0], dtype=torch.float64) for n in theta}
    try:
        model.eval()
        for p in theta.values():
            p.requires_grad_(True)
        # a compiled model (or compiled layers) runs its plain eager code: the reference owes nothing to Dynamo
        with torch.compiler.set_stance("force_eager"):
            _accumulate(model, theta, input_ids, attention_mask, loss_mask, sq)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
    return sq


def _accumulate(
    model: nn.Module,
    theta: dict[str, nn.Parameter],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    sq: dict[str, torch.Tensor],
) -> None:
    """Fill ``sq[name][b]`` sample by sample."""
    for b in range(input_ids.shape[0]):
        scored = loss_mask[b, 1:].bool()
        if not scored.any():
            continue
        with torch.enable_grad():
            logits = _logits(model, input_ids[b : b + 1], attention_mask[b : b + 1])[0, :-1]
            loss = F.cross_entropy(logits[scored].float(), input_ids[b, 1:][scored], reduction="mean")
            grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        for n, g in zip(theta, grads, strict=True):
            if g is not None:
                sq[n][b] = g.double().square().sum().cpu()


def reference_norms(model, input_ids, attention_mask, loss_mask, params=None) -> torch.Tensor:
    """Per-sample gradient norms ``[B]`` float64 (see :func:`reference_sq_norms`)."""
    sq = reference_sq_norms(model, input_ids, attention_mask, loss_mask, params)
    total = torch.zeros(input_ids.shape[0], dtype=torch.float64)
    for v in sq.values():
        total += v
    return total.sqrt()


@dataclass
class Outcome:
    """What the engine did on one model and batch."""

    status: str  # exact | refused | wrong | crash
    norm_err: float = math.nan  # largest relative error of the norms over samples with loss tokens
    param_err: float = math.nan  # largest per-parameter error, relative to that parameter's largest value
    worst_param: str = ""
    message: str = ""  # the refusal or crash, one line
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_err(self) -> float:
        return max(self.norm_err, self.param_err)

    def describe(self) -> str:
        if self.status in ("exact", "wrong"):
            return (
                f"{self.status}: norms rel err {self.norm_err:.2e}, worst parameter {self.worst_param} "
                f"rel err {self.param_err:.2e}"
            )
        return f"{self.status}: {self.message}"


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return re.sub(r"\s+", " ", text)[:400]


def judge(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    reference_model: nn.Module | None = None,
    params: list[str] | None = None,
    rtol: float = FP32_RTOL,
    **engine_kw,
) -> Outcome:
    """Run ``vigor.per_sample_grad_norms(model, ..., per_param=True)`` and compare it with the reference.

    ``reference_model`` (default ``model``) is what the reference runs, e.g. the uncompiled module of a
    compiled one; parameters are matched by identity, so the two may name them differently.
    """
    ref_model = model if reference_model is None else reference_model
    try:
        norms, per_param = vigor.per_sample_grad_norms(
            model, input_ids, attention_mask, loss_mask, params=params, per_param=True, **engine_kw
        )
    except vigor.UnsupportedModuleError as err:
        return Outcome("refused", message=_one_line(err))
    except Exception as err:  # any other failure is a crash: reported, never hidden
        return Outcome("crash", message=_one_line(err))
    ids_of = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}
    ref_names = {id(p): n for n, p in ref_model.named_parameters()}
    ref_params = None if params is None else [ref_names[ids_of[n]] for n in params]
    want_sq = reference_sq_norms(ref_model, input_ids, attention_mask, loss_mask, ref_params)
    want = torch.zeros(input_ids.shape[0], dtype=torch.float64)
    for v in want_sq.values():
        want += v
    want = want.sqrt()
    got = norms.double().cpu()
    valid = loss_mask[:, 1:].bool().any(1).cpu()
    errors: dict[str, float] = {}
    if not torch.isfinite(got).all() or (got[~valid] != 0).any():
        errors["<norms>"] = math.inf  # NaN, or a norm for a sample that has no loss
    else:
        errors["<norms>"] = float(((got - want).abs() / want.clamp_min(1e-30))[valid].max()) if valid.any() else 0.0
    got_by_id = {ids_of[n]: v.double().cpu() for n, v in per_param.items()}
    ref_by_name = dict(ref_model.named_parameters())
    # A parameter whose true gradient is zero up to rounding (a key bias under softmax's shift
    # invariance) is compared against a floor far below any real contribution: 1e-10 of the total.
    floor = 1e-10 * float(want.square().max()) if want.numel() else 0.0
    for rid_name, w in want_sq.items():
        g = got_by_id.pop(id(ref_by_name[rid_name]), None)
        scale = max(float(w.abs().max()), floor)
        if g is None:
            errors[rid_name] = math.inf if scale > 0 else 0.0  # a parameter of theta the engine left out
            continue
        diff = float((g - w).abs().max())
        errors[rid_name] = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    if got_by_id:  # the engine scored parameters outside theta
        errors["<extra parameters>"] = math.inf
    worst = max((n for n in errors if n != "<norms>"), key=lambda n: errors[n], default="")
    outcome = Outcome("exact", errors["<norms>"], errors.get(worst, 0.0), worst, errors=errors)
    if not max(outcome.norm_err, outcome.param_err) <= rtol:
        outcome.status = "wrong"
    return outcome
