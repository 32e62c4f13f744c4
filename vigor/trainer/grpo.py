"""The GRPO objective: per-token log-probabilities, the clipped surrogate, the KL term to the reference.

For completion token t of row b, with ratio ``rho = exp(logp - logp_old)`` and group advantage ``A_b``::

    loss_bt = -min(rho * A_b, clip(rho, 1 - eps, 1 + eps_high) * A_b) + beta * KL_bt
    KL_bt   = exp(logp_ref - logp) - (logp_ref - logp) - 1        (k3 estimator, >= 0)

``loss_type="grpo"`` averages over each completion's tokens, then over the completions of the batch;
``"token"`` averages over every loss token of the batch. Both are written as sums over rows divided by
a batch-wide count, so gradient accumulation over micro-batches gives exactly the full-batch gradient.
The policy's log-probs here use logits divided by the sampling temperature (the distribution that was
sampled); the VIGOR reward, by contrast, uses plain logits (docs/reward.md#per-completion-loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vigor.trainer.config import GRPOSettings


@dataclass
class TokenStats:
    logp: torch.Tensor  # [b, C] log p of each completion token (differentiable when computed with grad)
    entropy: torch.Tensor  # [b, C] entropy of the next-token distribution, detached


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float,
    *,
    autocast: bool = False,
) -> TokenStats:
    """Log-probs of the completion columns ``input_ids[:, P:]``; logits at position t predict token t + 1."""
    device = input_ids.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return token_stats(out.logits, input_ids, prompt_width, temperature)


def token_stats(logits: torch.Tensor, input_ids: torch.Tensor, prompt_width: int, temperature: float) -> TokenStats:
    """:class:`TokenStats` of the completion columns from the model's ``[b, P + C, V]`` logits."""
    logits = logits[:, prompt_width - 1 : -1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, prompt_width:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return TokenStats(logp, entropy)


@dataclass
class LossParts:
    loss: torch.Tensor  # this micro-batch's share of the batch loss (differentiable)
    clipped_tokens: float  # loss tokens where the clip was active
    kl_sum: float  # sum of KL_bt over loss tokens


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOSettings,
    denominator: float,
) -> LossParts:
    """``denominator``: completions in the whole batch (grpo) or loss tokens in the whole batch (token)."""
    mask = mask.to(logp.dtype)
    adv = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl_sum = 0.0
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("grpo.kl_coef > 0 needs the reference model's log-probs")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + cfg.kl_coef * kl
        kl_sum = float((kl.detach() * mask).sum())
    if cfg.loss_type == "grpo":
        per_row = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)
        loss = per_row.sum() / denominator
    else:
        loss = (per_token * mask).sum() / denominator
    with torch.no_grad():
        active = ((ratio < 1 - cfg.epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
        clipped_tokens = float((active.to(mask.dtype) * mask).sum())
    return LossParts(loss, clipped_tokens, kl_sum)
