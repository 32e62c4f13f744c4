"""Whether the trainer's VIGOR reward and its first policy update can share one forward, and how.

``vigor.one_pass`` scores a batch with the model in eval mode and without autocast; the update runs the
model in train mode, under autocast when ``precision: bf16``. Sharing the forward is exact only when both
see the same function (docs/one-pass.md#when): no active dropout (checked on the modules and the config,
then by comparing train- and eval-mode logits on one row once) and no autocast. Book-keeping the update's
gradient additionally needs the first loss to be a per-sample multiple of the scored loss: temperature 1
and no KL term (docs/one-pass.md#book-keeping).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vigor.trainer.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class OnePassChoice:
    mode: str  # "off", "graph" or "bookkeep"
    reason: str  # why not more (empty when nothing stands in the way)


def active_dropout(model: nn.Module) -> list[str]:
    """Where the model drops activations in train mode: dropout modules with p > 0 and ``*dropout*``
    settings of its config (transformers applies attention dropout functionally)."""
    found = [
        f"{name or '<model>'} (p={m.p})"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
    ]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                found.append(f"config.{key}={value}")
    return found


def same_in_train_and_eval(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """One row's logits are bitwise equal in train mode (twice) and in eval mode: nothing random or
    mode-dependent runs that the module and config scan could have missed."""
    modes = [(m, m.training) for m in model.modules()]
    ids, mask = input_ids[:1], attention_mask[:1]
    try:
        outs = []
        with torch.no_grad():
            for train in (True, True, False):
                model.train(train)
                outs.append(model(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    finally:
        for m, flag in modes:
            m.training = flag
    return torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def choose(cfg: TrainConfig, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> OnePassChoice:
    """The one-pass mode of this run; ``grpo.one_pass`` set explicitly but inexact is a ConfigError."""
    asked = cfg.grpo.one_pass
    if asked == "off":
        return OnePassChoice("off", "grpo.one_pass is off")
    if "vigor" not in {n for n, w in cfg.rewards.weights.items() if w != 0}:
        return OnePassChoice("off", "")  # nothing to share, nothing to say
    why_not = ""
    if cfg.compute.precision == "bfloat16":
        why_not = "compute.precision bfloat16 autocasts the update while VIGOR scores in the weights' dtype"
    elif dropout := active_dropout(model):
        why_not = f"dropout is active in train mode ({', '.join(dropout[:3])})"
    elif not same_in_train_and_eval(model, input_ids, attention_mask):
        why_not = "the model's logits differ between train and eval mode"
    if why_not:
        if asked != "auto":
            raise ConfigError(f"grpo.one_pass={asked} would not be exact: {why_not}; use auto or off")
        return OnePassChoice("off", why_not)
    inexact = []
    if cfg.sampling.temperature != 1.0:
        inexact.append(f"sampling.temperature={cfg.sampling.temperature} (the update's log-probs are tempered)")
    if cfg.grpo.kl_coef > 0:
        inexact.append("grpo.kl_coef > 0 (the KL term's gradient is not a multiple of the NLL's)")
    if asked == "graph" or (asked == "auto" and inexact):
        return OnePassChoice("graph", "; ".join(inexact))
    if inexact:
        raise ConfigError(f"grpo.one_pass=bookkeep would not be exact: {'; '.join(inexact)}; use auto or graph")
    return OnePassChoice("bookkeep", "")


def bookkept_coefficients(
    advantages: torch.Tensor, token_counts: torch.Tensor, loss_type: str, denominator: float
) -> torch.Tensor:
    """``c_b`` with ``grad(first GRPO loss) = sum_b c_b grad L_b`` (ratio 1, no KL, temperature 1;
    docs/one-pass.md#book-keeping). Per token the surrogate is ``-A_b * ratio`` and at ratio 1
    ``d ratio = d log p = -d NLL``, so a token contributes ``+A_b d NLL`` times its weight: ``1 / (T_b D)``
    for ``grpo`` (``c_b = A_b / D``), ``1 / D`` for ``token`` (``c_b = A_b T_b / D``)."""
    adv = advantages.float()
    if loss_type == "grpo":
        return adv / denominator
    return adv * token_counts.float() / denominator


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` now: the GPU's free memory, or the host's available memory
    (psutil, else /proc/meminfo); None where neither can be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bookkeep_budget(cfg: TrainConfig, device: torch.device) -> int | None:
    """The most bytes book-keeping may hold for one micro-batch: ``grpo.bookkeep_max_mib``, or a quarter of
    the memory available now (None: no limit, where that cannot be read)."""
    if cfg.grpo.bookkeep_max_mib is not None:
        return int(cfg.grpo.bookkeep_max_mib * 2**20)
    free = available_bytes(device)
    return None if free is None else free // 4
