"""The rewards a training step mixes, by name and weight, and the GRPO advantages of the mix.

Built-in names: ``vigor`` (docs/reward.md#raw-reward, through the engine in one batched pass; plain logits at
temperature 1, theta = the trainable parameters or the ``rewards.params`` subset), ``self_certainty``
(INTUITOR), ``mean_logprob`` (the mean token log-probability, a confidence baseline), ``random`` (the
control) and ``math`` (ground truth: the task's answer check, math-verify or exact match for the ``addition``
task). Any other name is a ``package.module:function`` reward function, called as
``f(prompts, completions, **columns)``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vigor import rewards as R
from vigor.trainer import rewards as TR
from vigor.trainer.config import ConfigError, RewardSettings
from vigor.trainer.data import PromptSet
from vigor.trainer.sampling import Rollouts


@dataclass
class StepRewards:
    components: dict[str, torch.Tensor]  # name -> [B], the value mixed in (VIGOR: shaped)
    total: torch.Tensor  # [B] sum_k w_k r_k
    advantages: torch.Tensor  # [B] group advantages of the total
    accuracy: torch.Tensor | None  # [B] 1.0 where the final answer is right (when the data has answers)
    vigor: R.VigorScores | None


def import_reward(name: str) -> Callable:
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rewards.weights: cannot import reward function {name!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"rewards.weights: {name!r} is not callable")
    return fn


def theta_names(model: nn.Module, pattern: str | None) -> list[str] | None:
    """Trainable parameter names matching ``pattern`` (None: all of them, the engine's default)."""
    if pattern is None:
        return None
    names = [n for n, p in model.named_parameters() if p.requires_grad and re.search(pattern, n)]
    if not names:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad][:8]
        raise ConfigError(f"rewards.params {pattern!r} matches no trainable parameter (some are: {trainable})")
    return names


class RewardSet:
    def __init__(
        self,
        cfg: RewardSettings,
        group_size: int,
        seed: int,
        has_answers: bool,
        checker: Callable[[list[str], list[str]], torch.Tensor] = TR.math_answer_rewards,
    ) -> None:
        self.cfg = cfg
        self.checker = checker
        self.group_size = group_size
        self.seed = seed
        self.has_answers = has_answers
        self.weights = {n: float(w) for n, w in cfg.weights.items() if w != 0}
        if "math" in self.weights and not has_answers:
            raise ConfigError("rewards.weights.math needs reference answers: set data.answer_column")
        self.functions = {n: import_reward(n) for n in self.weights if ":" in n}

    def __call__(
        self,
        model: nn.Module,
        ro: Rollouts,
        prompts: PromptSet,
        step: int,
        theta: list[str] | None = None,
        vigor_norms: torch.Tensor | None = None,
    ) -> StepRewards:
        """The step's rewards; ``vigor_norms``: the VIGOR norms when already computed (one-pass step)."""
        G = self.group_size
        device = ro.input_ids.device
        accuracy = None
        if self.has_answers:
            accuracy = self.checker(ro.texts, [a for a in prompts.answers for _ in range(G)])
        components: dict[str, torch.Tensor] = {}
        scores = None
        for name in self.weights:
            if name == "vigor" and vigor_norms is not None:
                scores = R.shape_vigor(
                    vigor_norms, ro.loss_mask.bool().sum(1), G, sqrt_length=self.cfg.sqrt_length, rank=self.cfg.rank
                )
                components[name] = scores.rewards
            elif name == "vigor":
                scores = R.vigor_rewards(
                    model, ro.input_ids, ro.attention_mask, ro.loss_mask, G,
                    sqrt_length=self.cfg.sqrt_length, rank=self.cfg.rank, params=theta, backend=self.cfg.backend,
                )  # fmt: skip
                components[name] = scores.rewards
            elif name == "self_certainty":
                components[name] = R.self_certainty_scores(model, ro.input_ids, ro.attention_mask, ro.loss_mask)[0]
            elif name == "mean_logprob":
                components[name] = R.mean_logprob_scores(model, ro.input_ids, ro.attention_mask, ro.loss_mask)[0]
            elif name == "random":
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
                components[name] = TR.random_rewards(ro.size, generator=generator)
            elif name == "math":
                components[name] = accuracy
            else:
                cols = {k: [v for v in vals for _ in range(G)] for k, vals in prompts.columns.items()}
                prompt_texts = [t for t in prompts.texts for _ in range(G)]
                components[name] = TR.external_rewards(self.functions[name], prompt_texts, ro.texts, **cols)
        components = {n: v.to(device).float() for n, v in components.items()}
        total = TR.combine_rewards(components, self.weights)
        advantages = R.group_advantages(total, G)
        return StepRewards(components, total, advantages, accuracy, scores)
