"""The trainer's own rewards and their mix: the ground-truth check (``math``), the random control,
external reward functions, and the weighted sum. The reward math the project is about (VIGOR, shaping,
advantages, self-certainty) is in :mod:`vigor.rewards`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch


def combine_rewards(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_k w_k r_k`` over the named rewards (every weight needs a reward of that name)."""
    missing = set(weights) - set(rewards)
    if missing:
        raise KeyError(f"weights name rewards that were not computed: {sorted(missing)}")
    total = None
    for name, w in weights.items():
        term = float(w) * rewards[name].float()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("combine_rewards needs at least one weighted reward")
    return total


def random_rewards(size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """The random-reward control: i.i.d. uniform in [-1, 1]."""
    return torch.rand(size, generator=generator) * 2 - 1


def math_answer_rewards(completions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """The ground-truth reward: 1.0 where math-verify finds the completion's final answer equal to the
    reference answer, else 0.0 (also when nothing parses). math-verify takes the last number or
    expression of the text, so "... 7 * 2 = 14" and "The answer is 14." both answer 14."""
    from math_verify import parse, verify

    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    gold_cache: dict[str, list] = {}
    out = torch.zeros(len(completions), dtype=torch.float32)
    for i, (text, answer) in enumerate(zip(completions, answers, strict=True)):
        gold = gold_cache.setdefault(str(answer), parse(str(answer)))
        if not gold:
            raise ValueError(f"reference answer {answer!r} does not parse as a number or expression")
        pred = parse(text)
        out[i] = float(bool(pred) and verify(gold, pred))
    return out


def external_rewards(
    fn: Callable[..., Sequence[float]], prompts: Sequence[str], completions: Sequence[str], **columns: Sequence
) -> torch.Tensor:
    """Call a plain reward function ``fn(prompts, completions, **columns) -> one float per completion``
    (the TRL convention) and check what it returns."""
    name = getattr(fn, "__qualname__", repr(fn))
    values = fn(list(prompts), list(completions), **columns)
    try:
        out = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward function {name} must return one float per completion: {e}") from None
    if out.shape[0] != len(completions):
        raise ValueError(f"reward function {name} returned {out.shape[0]} values for {len(completions)} completions")
    if not torch.isfinite(out).all():
        raise ValueError(f"reward function {name} returned non-finite values: {out[~torch.isfinite(out)][:5].tolist()}")
    return out
