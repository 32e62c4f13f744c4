"""Rollouts: each prompt's group of completions from ``generate``, laid out as the batch VIGOR scores.

Layout (group-major, docs/reward.md#batch-layout): rows ``[g * G, (g + 1) * G)`` hold prompt g's completions, packed by
:func:`vigor.packing.pack_completions`. A completion runs up to and including its first EOS; one without
EOS within ``max_new_tokens`` is *truncated*, and with ``mask_truncated_completions`` its loss mask is all
zero (it carries no loss and VIGOR ranks it last).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vigor.packing import pack_completions
from vigor.trainer.config import SamplingSettings


@dataclass
class Rollouts:
    input_ids: torch.Tensor  # [B, P + C]
    attention_mask: torch.Tensor  # [B, P + C] int64
    loss_mask: torch.Tensor  # [B, P + C] bool: the completion tokens that carry loss
    prompt_width: int  # P
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    lengths: torch.Tensor  # [B] completion tokens (EOS included), masked or not
    texts: list[str]  # completions decoded without special tokens
    group_size: int

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_mask(self) -> torch.Tensor:
        """``[B, C]``: the loss mask over the completion columns only."""
        return self.loss_mask[:, self.prompt_width :]


def eos_ids(tokenizer, model: nn.Module) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no EOS token: completions could never end")
    return sorted(ids)


def encode_prompts(tokenizer, texts: Sequence[str], device: torch.device, add_special_tokens: bool = True):
    """Left-padded ``(input_ids, attention_mask)`` of the prompt texts."""
    enc = tokenizer(
        list(texts), padding=True, padding_side="left", return_tensors="pt", add_special_tokens=add_special_tokens
    )
    if enc["input_ids"].shape[1] == 0 or (enc["attention_mask"].sum(1) == 0).any():
        raise ValueError("a prompt tokenizes to no tokens: a completion needs at least one prompt token before it")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def completion_masks(completions: torch.Tensor, eos: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask [B, C] of tokens up to and including the first EOS, truncated [B])``."""
    is_eos = torch.isin(completions, torch.tensor(list(eos), device=completions.device))
    has_eos = is_eos.any(1)
    width = completions.shape[1]
    if width == 0:
        return is_eos, ~has_eos
    first = torch.where(has_eos, is_eos.int().argmax(1), width - 1)
    mask = torch.arange(width, device=completions.device)[None, :] <= first[:, None]
    return mask, ~has_eos


def assemble(
    prompt_ids: torch.Tensor,
    prompt_attention: torch.Tensor,
    completions: torch.Tensor,
    eos: Sequence[int],
    tokenizer,
    group_size: int,
    mask_truncated: bool,
) -> Rollouts:
    """``generate``'s left-padded prompts and padded completions -> :class:`Rollouts`: each completion cut
    after its first EOS, then packed by :func:`vigor.packing.pack_completions`."""
    mask, _ = completion_masks(completions, eos)
    prompts = [row[keep.bool()].tolist() for row, keep in zip(prompt_ids, prompt_attention, strict=True)]
    kept = [row[keep].tolist() for row, keep in zip(completions, mask, strict=True)]
    packed = pack_completions(
        prompts, kept, pad_id=tokenizer.pad_token_id, stop_ids=eos, mask_truncated=mask_truncated,
        device=completions.device,
    )  # fmt: skip
    texts = tokenizer.batch_decode(kept, skip_special_tokens=True)
    return Rollouts(
        packed.input_ids, packed.attention_mask, packed.loss_mask, packed.prompt_width, packed.truncated,
        packed.lengths, texts, group_size,
    )  # fmt: skip


@torch.no_grad()
def sample_rollouts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    cfg: SamplingSettings,
    *,
    device: torch.device,
    add_special_tokens: bool = True,
    greedy: bool = False,
    max_new_tokens: int | None = None,
    autocast: bool = False,
) -> Rollouts:
    """``group_size`` completions per prompt (1 when ``greedy``), sampled with ``generate`` in eval mode.
    Sampling draws from torch's global RNG, which checkpoints save and restore."""
    from transformers import GenerationConfig

    group = 1 if greedy else cfg.group_size
    ids, attn = encode_prompts(tokenizer, prompts, device, add_special_tokens)
    ids, attn = ids.repeat_interleave(group, 0), attn.repeat_interleave(group, 0)
    eos = eos_ids(tokenizer, model)
    gen = GenerationConfig(
        do_sample=not greedy,
        temperature=cfg.temperature if not greedy else None,
        top_p=cfg.top_p if not greedy else None,
        top_k=0 if not greedy else None,  # transformers would default to 50
        max_new_tokens=max_new_tokens or cfg.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)
    finally:
        model.train(was_training)
    return assemble(ids, attn, out[:, ids.shape[1] :], eos, tokenizer, group, cfg.mask_truncated_completions)
