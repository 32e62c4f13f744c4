"""Rewards (docs/reward.md): VIGOR (gradient-norm) rewards, their shaping, group advantages, self-certainty.

The trainer's own rewards (ground truth, the random control, external functions, the weighted mix) are in
:mod:`vigor.trainer.rewards`.

Batches are laid out group-major: rows ``[g * G, (g + 1) * G)`` are the ``G`` completions of prompt g.
A completion is *invalid* when it has no loss token (empty, or truncated and masked); invalid
completions rank below every valid one of their group, and an all-invalid group gets equal rewards
(advantage 0). Nothing here returns NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vigor.batch import completion_nll, model_logits, prepare_batch, scored_logits
from vigor.engine import per_sample_grad_norms
from vigor.fused_head import FusedHead
from vigor.model_state import preserved

ADVANTAGE_EPS = 1e-4


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or values.shape[0] % group_size:
        raise ValueError(f"batch of {values.shape[0]} is not a whole number of groups of {group_size}")
    return values.reshape(-1, group_size)


def vigor_raw_rewards(norms: torch.Tensor, token_counts: torch.Tensor, *, sqrt_length: bool = True) -> torch.Tensor:
    """``r_b = -sqrt(T_b) * ||grad L_b||`` (or ``-||grad L_b||`` without the length correction)."""
    scale = token_counts.to(norms.dtype).sqrt() if sqrt_length else torch.ones_like(norms)
    return -(scale * norms)


def rank_shape(rewards: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rank inside each group (ascending, stable: ties keep their order; invalid and non-finite rewards
    below every valid one), then map rank k to ``2k / (G - 1) - 1``. ``G = 1`` and all-invalid groups
    give 0."""
    r = _groups(rewards.float(), group_size)
    v = _groups(valid.bool(), group_size) & torch.isfinite(r)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    # Lexicographic (valid, reward) order from two stable sorts: by reward (invalid ones share one key,
    # so they keep their original order), then by the valid flag.
    by_reward = torch.sort(torch.where(v, r, 0.0), dim=1, stable=True).indices
    by_valid = torch.sort(torch.gather(v, 1, by_reward).to(torch.int8), dim=1, stable=True).indices
    order = torch.gather(by_reward, 1, by_valid)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(group_size, device=order.device).expand_as(order).contiguous())
    shaped = 2.0 * ranks.float() / (group_size - 1) - 1.0
    return torch.where(v.any(1, keepdim=True), shaped, 0.0).reshape(-1)


def zscore_shape(rewards: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Without rank shaping: z-score the raw rewards over the valid completions of each group;
    invalid ones (and non-finite rewards, as in :func:`rank_shape`) get one unit below the group's lowest
    valid score; all-invalid groups get 0."""
    r = _groups(rewards.double(), group_size)
    v = _groups(valid.bool(), group_size) & torch.isfinite(r)
    count = v.sum(1, keepdim=True)
    mean = torch.where(v, r, 0.0).sum(1, keepdim=True) / count.clamp_min(1)
    var = torch.where(v, (r - mean) ** 2, 0.0).sum(1, keepdim=True) / (count - 1).clamp_min(1)
    z = torch.where(count > 1, (r - mean) / (var.sqrt() + ADVANTAGE_EPS), 0.0)
    lowest = torch.where(v, z, math.inf).amin(1, keepdim=True)
    z = torch.where(v, z, lowest - 1.0)
    return torch.where(count > 0, z, 0.0).reshape(-1).float()


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO advantage ``(s_b - mean_group) / (std_group + 1e-4)``, unbiased std; 0 when ``G = 1``."""
    r = _groups(rewards.double(), group_size)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + ADVANTAGE_EPS)
    return adv.reshape(-1).float()


@dataclass(frozen=True)
class VigorScores:
    rewards: torch.Tensor  # shaped reward per completion (rank in [-1, 1] or z-score)
    raw: torch.Tensor  # -sqrt(T_b) * ||grad L_b|| (0 for invalid completions)
    norms: torch.Tensor  # ||grad L_b||
    token_counts: torch.Tensor  # T_b
    valid: torch.Tensor  # T_b > 0


def shape_vigor(
    norms: torch.Tensor, token_counts: torch.Tensor, group_size: int, *, sqrt_length: bool = True, rank: bool = True
) -> VigorScores:
    """Per-sample gradient norms -> VIGOR rewards: raw ``-sqrt(T_b) ||grad L_b||``, then rank (or
    z-score) shaping inside each group, invalid completions (``T_b = 0``) last."""
    valid = token_counts > 0
    raw = torch.where(valid, vigor_raw_rewards(norms, token_counts, sqrt_length=sqrt_length), 0.0)
    shaped = rank_shape(raw, valid, group_size) if rank else zscore_shape(raw, valid, group_size)
    return VigorScores(shaped, raw, norms, token_counts, valid)


def vigor_rewards(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    loss_mask: torch.Tensor,
    group_size: int,
    *,
    sqrt_length: bool = True,
    rank: bool = True,
    params: Iterable[nn.Parameter] | Iterable[str] | None = None,
    backend: str | None = None,
) -> VigorScores:
    """VIGOR rewards of a group-major batch: one batched pass of the engine (which skips invalid
    completions and trailing padding), then :func:`shape_vigor`."""
    norms = per_sample_grad_norms(model, input_ids, attention_mask, loss_mask, params=params, backend=backend)
    return shape_vigor(norms, loss_mask.bool().sum(1), group_size, sqrt_length=sqrt_length, rank=rank)


def self_certainty(logits_rows: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(U || p) = -log V - (1/V) sum_v log p(v)`` of ``[N, V]`` logits, float32."""
    logp = torch.log_softmax(logits_rows.float(), dim=-1)
    vocab = logits_rows.shape[-1]
    return -math.log(vocab) - logp.mean(-1)


def self_certainty_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """INTUITOR's self-certainty ``SC_b = (1/T_b) sum_t KL(U || p_t)`` over completion positions,
    and the valid mask, in eval mode like the VIGOR reward. Invalid completions score 0 (flagged invalid).
    Models whose head :class:`vigor.fused_head.FusedHead` fuses are scored from their hidden states in
    vocabulary chunks (no ``[B, L, V]`` logits); others through their logits."""
    batch = prepare_batch(model, input_ids, attention_mask, loss_mask)
    valid = batch.token_counts > 0
    head = FusedHead.detect(model)
    with preserved(model), torch.no_grad():
        if head is not None:  # from the hidden states, never the [B, L, V] logits
            return head.self_certainty(batch), valid
        b_idx, rows, _ = scored_logits(model_logits(model, batch), batch)
        per_token = self_certainty(rows)
    sums = torch.zeros(batch.size, dtype=torch.float32, device=per_token.device).index_add(0, b_idx, per_token)
    return sums / batch.token_counts.clamp_min(1), valid


def mean_logprob_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean token log-probability ``-L_b`` of each completion (plain logits, eval mode, like the VIGOR
    reward: ``L_b`` is the loss VIGOR differentiates) and the valid mask; invalid completions score 0."""
    batch = prepare_batch(model, input_ids, attention_mask, loss_mask)
    with preserved(model), torch.no_grad():
        logprob = -completion_nll(model_logits(model, batch), batch)
    return logprob, batch.token_counts > 0
