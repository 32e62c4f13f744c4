"""Prompt + completion token lists -> the batch the engine, the rewards and GRPO read.

Row ``b`` is prompt ``b`` left-padded to the longest prompt, then completion ``b`` right-padded to the
longest completion; ``pad_to_multiple_of`` rounds both widths up (TRL's layout). The attention mask
covers the real tokens, the loss mask the completion tokens (token ``t`` is predicted at position
``t - 1``, so every prompt needs at least one token).

A completion is *finished* when its last token is one of ``stop_ids``, *truncated* otherwise (the
generator ran out of tokens). With ``mask_truncated`` a truncated completion carries no loss, so the
VIGOR reward ranks it last and GRPO does not train on it; ``hide_truncated`` also drops it from the
attention mask, as TRL's policy forward does. The three callers: the trainer's sampler (completions cut
at their first EOS, ``stop_ids`` = the EOS ids), ``vigor score`` (no ``stop_ids``: every completion is
taken as written) and the TRL bridge (``stop_ids`` = EOS ids and the pad id, ``hide_truncated``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # [B, P + C] int64
    attention_mask: torch.Tensor  # [B, P + C] int64
    loss_mask: torch.Tensor  # [B, P + C] bool: the completion tokens that carry loss
    prompt_width: int  # P
    truncated: torch.Tensor  # [B] bool: the last token is no stop id (never, without stop_ids)
    lengths: torch.Tensor  # [B] int64: completion tokens, masked or not


def _round_up(width: int, multiple: int | None) -> int:
    return width + (-width) % multiple if multiple else width


def pack_completions(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Iterable[int] | None = None,
    mask_truncated: bool = False,
    hide_truncated: bool = False,
    pad_to_multiple_of: int | None = None,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Pack token lists into a :class:`PackedBatch` (see the module docstring for the layout)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("the batch is empty")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt tokenizes to no tokens: a completion needs at least one prompt token before it")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    size = len(prompts)
    width_p = _round_up(max(len(p) for p in prompts), pad_to_multiple_of)
    width_c = _round_up(max(len(c) for c in completions), pad_to_multiple_of)
    input_ids = torch.full((size, width_p + width_c), pad_id, dtype=torch.int64)
    attention = torch.zeros_like(input_ids)
    loss = torch.zeros_like(input_ids, dtype=torch.bool)
    stops = None if stop_ids is None else {int(s) for s in stop_ids}
    truncated = torch.tensor([stops is not None and not (len(c) and int(c[-1]) in stops) for c in completions])
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        end = width_p + len(c)
        input_ids[i, width_p - len(p) : width_p] = torch.as_tensor(list(p), dtype=torch.int64)
        input_ids[i, width_p:end] = torch.as_tensor(list(c), dtype=torch.int64)
        attention[i, width_p - len(p) : width_p] = 1
        masked = bool(truncated[i]) and mask_truncated
        attention[i, width_p:end] = 0 if masked and hide_truncated else 1
        loss[i, width_p:end] = not masked
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.int64)
    return PackedBatch(
        input_ids.to(device), attention.to(device), loss.to(device), width_p, truncated.to(device), lengths.to(device)
    )
