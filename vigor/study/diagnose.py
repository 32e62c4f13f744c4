"""Does an intrinsic score separate right from wrong answers inside a GRPO group? (before any RL)

GRPO only sees a reward through its ranking *inside* each group, so the question that matters is
within-group: for a prompt, among its ``G`` sampled completions, do the correct ones score higher? For each
group that holds both correct and incorrect completions the AUROC is ``P(score(correct) > score(wrong))``
(ties count one half); the summary is the mean over such groups with a bootstrap interval (groups resampled).
0.5 is a coin flip, 1 a perfect reward.

Scores of one completion ``b`` (all "higher is better", all from the model as it is, in eval mode, plain
logits at temperature 1 whatever the sampling temperature, as the rewards are computed in training):

- ``vigor``: ``-sqrt(T_b) * ||grad_theta L_b||`` (docs/reward.md#raw-reward),
  ``vigor_no_sqrt``: ``-||grad_theta L_b||``;
- ``self_certainty``: INTUITOR's mean ``KL(U || p_t)``;
- ``mean_logprob``: ``-L_b``, the mean token log-probability;
- ``random``: uniform in ``[-1, 1]``, the control.

A completion without loss tokens (truncated at ``max_new_tokens``, or empty) is *invalid*: every score
but ``random`` is ``-inf`` for it, i.e. ranked below every valid completion, as the training rewards rank it.

Model-agnostic: any causal LM and tokenizer, plain prompts or the tokenizer's chat template, any answer
checker. A typical use on a pretrained model::

    items = [DiagnosticItem(question, lambda text, gold=gold: extract(text) == gold) for ...]
    samples = sample_and_score(model, tokenizer, items, group_size=8, temperature=1.0, max_new_tokens=256,
                               chat_template=True, params=last_block_names)
    print(format_report(diagnostic_report(samples)))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

SCORES = ("vigor", "vigor_no_sqrt", "self_certainty", "mean_logprob", "random")


@dataclass(frozen=True)
class DiagnosticItem:
    prompt: str  # the user's text (wrapped in the chat template with ``chat_template=True``) or the raw prompt
    is_correct: Callable[[str], bool]  # the decoded completion (special tokens removed) -> right or not


@dataclass
class GroupSamples:
    """``N`` groups of ``G`` completions: every array is ``[N, G]``."""

    prompts: list[str]  # as fed to the tokenizer
    completions: list[list[str]]
    correct: np.ndarray  # bool
    valid: np.ndarray  # bool: has loss tokens
    lengths: np.ndarray  # int: completion tokens (EOS included)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float64, -inf where invalid

    def to_json(self) -> dict[str, Any]:
        finite = lambda a: [[None if not np.isfinite(v) else float(v) for v in row] for row in a]
        return {
            "prompts": self.prompts,
            "completions": self.completions,
            "correct": self.correct.tolist(),
            "valid": self.valid.tolist(),
            "lengths": self.lengths.tolist(),
            "scores": {k: finite(v) for k, v in self.scores.items()},
        }


# -- AUROC inside groups ------------------------------------------------------------------------------------


def group_aurocs(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Per-group AUROC of ``scores`` ``[N, G]`` for ``correct`` ``[N, G]``, over the groups that hold both a
    correct and an incorrect completion (the others carry no ranking signal and are left out), in order."""
    scores, correct = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)
    if scores.shape != correct.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and correct {correct.shape} must both be [groups, group_size]")
    if np.isnan(scores).any():
        raise ValueError("scores hold NaN: a score must rank every completion (use -inf for 'last')")
    out = []
    for s, c in zip(scores, correct, strict=True):
        if c.all() or not c.any():
            continue
        pos, neg = s[c][:, None], s[~c][None, :]
        out.append(float((pos > neg).mean() + 0.5 * (pos == neg).mean()))
    return np.asarray(out)


@dataclass(frozen=True)
class AurocSummary:
    mean: float  # mean per-group AUROC (NaN when no group is mixed)
    low: float  # bootstrap percentile interval of the mean, groups resampled
    high: float
    groups: int  # groups with both correct and incorrect completions

    def to_json(self) -> dict[str, Any]:
        nan = lambda v: None if np.isnan(v) else v
        return {"mean": nan(self.mean), "low": nan(self.low), "high": nan(self.high), "groups": self.groups}


def auroc_within_groups(
    scores: np.ndarray, correct: np.ndarray, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> AurocSummary:
    """Mean within-group AUROC and its bootstrap interval (percentile method over resampled groups)."""
    values = group_aurocs(scores, correct)
    if values.size == 0:
        return AurocSummary(float("nan"), float("nan"), float("nan"), 0)
    mean = float(values.mean())
    if values.size == 1 or np.all(values == values[0]):
        return AurocSummary(mean, mean, mean, int(values.size))  # a degenerate sample: no spread to resample
    from scipy.stats import bootstrap

    ci = bootstrap(
        (values,), np.mean, n_resamples=resamples, confidence_level=confidence, method="percentile", rng=seed
    ).confidence_interval
    return AurocSummary(mean, float(ci.low), float(ci.high), int(values.size))


# -- sampling groups and scoring them ---------------------------------------------------------------------


def _format_prompts(tokenizer: Any, items: Sequence[DiagnosticItem], chat_template: bool, system: str | None):
    if not chat_template:
        return [it.prompt for it in items]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    out = []
    for it in items:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": it.prompt})
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out


def score_rollouts(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    params: Iterable[nn.Parameter] | Iterable[str] | None = None,
    generator: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Every score of :data:`SCORES` for a batch of completions ``[B]`` (``-inf`` where invalid)."""
    from vigor.engine import per_sample_grad_norms
    from vigor.rewards import mean_logprob_scores, self_certainty_scores, vigor_raw_rewards

    norms = per_sample_grad_norms(model, input_ids, attention_mask, loss_mask, params=params).double().cpu()
    counts = loss_mask.bool().sum(1).cpu()
    certainty, _ = self_certainty_scores(model, input_ids, attention_mask, loss_mask)
    logprob, _ = mean_logprob_scores(model, input_ids, attention_mask, loss_mask)
    valid = (counts > 0).numpy()
    rng = generator if generator is not None else np.random.default_rng()
    raw = {
        "vigor": vigor_raw_rewards(norms, counts, sqrt_length=True).numpy(),
        "vigor_no_sqrt": vigor_raw_rewards(norms, counts, sqrt_length=False).numpy(),
        "self_certainty": certainty.double().cpu().numpy(),
        "mean_logprob": logprob.double().cpu().numpy(),
    }
    out = {k: np.where(valid, v, -np.inf) for k, v in raw.items()}
    out["random"] = rng.uniform(-1.0, 1.0, size=valid.shape[0])
    return out


def sample_and_score(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[DiagnosticItem],
    group_size: int,
    temperature: float = 1.0,
    *,
    max_new_tokens: int = 64,
    top_p: float = 1.0,
    chat_template: bool = False,
    system_prompt: str | None = None,
    params: Iterable[nn.Parameter] | Iterable[str] | None = None,
    groups_per_batch: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> GroupSamples:
    """Sample ``group_size`` completions per item (``generate``, ``temperature``/``top_p``, stopping at
    EOS; no EOS within ``max_new_tokens`` = truncated = invalid), check each with the item's checker and
    score it with every score of :data:`SCORES`. ``params`` restricts VIGOR's theta (names or parameters;
    default: every trainable parameter); ``groups_per_batch`` groups share one sampling and scoring pass
    (lower it for big models). Torch's RNG is seeded from ``seed``, so a run is reproducible."""
    from tqdm import tqdm

    from vigor.trainer.config import SamplingSettings
    from vigor.trainer.sampling import sample_rollouts

    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to rank completions inside a group, got {group_size}")
    if not items:
        raise ValueError("no items to sample")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling), got {temperature}")
    device = next(model.parameters()).device
    prompts = _format_prompts(tokenizer, items, chat_template, system_prompt)
    cfg = SamplingSettings(
        group_size=group_size, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        mask_truncated_completions=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    completions: list[list[str]] = []
    correct, valid, lengths = [], [], []
    scores: dict[str, list[np.ndarray]] = {k: [] for k in SCORES}
    bar = tqdm(total=len(items), desc="diagnose", unit="group", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(items), groups_per_batch):
        part = range(start, min(len(items), start + groups_per_batch))
        ro = sample_rollouts(
            model, tokenizer, [prompts[i] for i in part], cfg, device=device, add_special_tokens=not chat_template
        )
        for k, v in score_rollouts(
            model, ro.input_ids, ro.attention_mask, ro.loss_mask, params=params, generator=rng
        ).items():
            scores[k].append(v.reshape(-1, group_size))
        texts = [ro.texts[j : j + group_size] for j in range(0, ro.size, group_size)]
        completions += texts
        correct.append(np.array([[bool(items[i].is_correct(t)) for t in g] for i, g in zip(part, texts, strict=True)]))
        valid.append(ro.loss_mask.any(1).cpu().numpy().reshape(-1, group_size))
        lengths.append(ro.lengths.cpu().numpy().reshape(-1, group_size))
        bar.update(len(part))
    bar.close()
    return GroupSamples(
        prompts=prompts,
        completions=completions,
        correct=np.concatenate(correct),
        valid=np.concatenate(valid),
        lengths=np.concatenate(lengths),
        scores={k: np.concatenate(v) for k, v in scores.items()},
    )


# -- the report ---------------------------------------------------------------------------------------------


def diagnostic_report(samples: GroupSamples, *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Accuracy, how many groups carry a signal, and each score's within-group AUROC with its interval."""
    c, v, n = samples.correct, samples.valid, samples.lengths
    mixed = (c.any(1) & ~c.all(1)).sum()
    mean_len = lambda m: round(float(n[m].mean()), 2) if m.any() else None
    return {
        "groups": int(c.shape[0]),
        "group_size": int(c.shape[1]),
        "accuracy": float(c.mean()),
        "valid_fraction": float(v.mean()),
        "mixed_groups": int(mixed),
        "mean_length_correct": mean_len(c),
        "mean_length_incorrect": mean_len(~c),
        "auroc": {
            k: auroc_within_groups(s, c, resamples=resamples, seed=seed).to_json() for k, s in samples.scores.items()
        },
    }


def format_report(report: dict[str, Any]) -> str:
    """A Markdown summary of :func:`diagnostic_report`."""
    lines = [
        f"{report['groups']} groups x {report['group_size']} completions: accuracy {report['accuracy']:.3f}, "
        f"valid {report['valid_fraction']:.3f}, {report['mixed_groups']} groups with both right and wrong answers; "
        f"mean length correct {report['mean_length_correct']}, incorrect {report['mean_length_incorrect']}",
        "",
        "| score | within-group AUROC | 95% bootstrap interval | groups |",
        "|---|---|---|---|",
    ]
    for name, a in report["auroc"].items():
        if a["mean"] is None:
            lines.append(f"| {name} | – | – | 0 |")
        else:
            lines.append(f"| {name} | {a['mean']:.3f} | [{a['low']:.3f}, {a['high']:.3f}] | {a['groups']} |")
    return "\n".join(lines)
