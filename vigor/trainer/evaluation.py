"""Held-out evaluation: decode one completion per prompt (greedy, or sampled at the training temperature)
and check it with the task's answer checker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vigor.trainer.config import SamplingSettings
from vigor.trainer.data import PromptSet
from vigor.trainer.sampling import sample_rollouts


def held_out_accuracy(
    model: nn.Module,
    tokenizer: Any,
    prompts: PromptSet,
    checker: Callable[[Sequence[str], Sequence[str]], torch.Tensor],
    sampling: SamplingSettings,
    *,
    device: torch.device,
    num_examples: int,
    batch_size: int,
    greedy: bool = True,
    max_new_tokens: int | None = None,
    add_special_tokens: bool = True,
    autocast: bool = False,
) -> dict[str, float]:
    """``{"completion_length", "accuracy"}`` over the first ``num_examples`` prompts (accuracy only when the
    prompts have answers). Sampled decoding (``greedy=False``) draws one completion per prompt at
    ``sampling.temperature`` from torch's global RNG."""
    n = min(num_examples, len(prompts))
    one = SamplingSettings(**{**vars(sampling), "group_size": 1})
    correct, lengths = [], []
    for start in range(0, n, batch_size):
        part = prompts.select(list(range(start, min(n, start + batch_size))))
        ro = sample_rollouts(
            model, tokenizer, part.texts, one, device=device, greedy=greedy,
            add_special_tokens=add_special_tokens, max_new_tokens=max_new_tokens, autocast=autocast,
        )  # fmt: skip
        lengths.append(ro.lengths.float().cpu())
        if part.answers is not None:
            correct.append(checker(ro.texts, part.answers))
    out = {"completion_length": float(torch.cat(lengths).mean())}
    if correct:
        out["accuracy"] = float(torch.cat(correct).mean())
    return out


def duplicate_fraction(texts: Sequence[str], group_size: int) -> float:
    """Fraction of completions equal to an earlier completion of their group (0: all distinct; a collapsed
    policy that samples one answer G times scores (G - 1) / G)."""
    dups = 0
    for start in range(0, len(texts), group_size):
        group = texts[start : start + group_size]
        dups += len(group) - len(set(group))
    return dups / max(1, len(texts))
