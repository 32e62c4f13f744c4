"""The token batch VIGOR scores: validation, per-sample row ranges, and the per-sample completion NLL.

``input_ids`` ``[B, L]`` hold prompt + completion (prompts may be left-padded, completions
right-padded); ``loss_mask`` ``[B, L]`` marks completion tokens. Token ``t`` with ``loss_mask[t] = 1``
is predicted by the logits at position ``t - 1`` (docs/reward.md#batch-layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vigor.errors import BatchError, NotACausalLMError
from vigor_kernels import RowRanges


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64, 0/1
    loss_mask: torch.Tensor  # [B, L] bool
    token_counts: torch.Tensor  # [B] int64: T_b, the number of loss tokens
    ranges: RowRanges  # rows that can carry gradient: [first attended, last loss token)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def select(self, rows: list[int], width: int | None = None) -> TokenBatch:
        """Samples ``rows`` exactly as they sit in the batch (same padding, same positions), keeping
        the first ``width`` columns. Cutting columns after a sample's last loss token changes nothing
        it computes: in a causal LM earlier positions never see later ones."""
        width = self.length if width is None else width
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        return TokenBatch(
            self.input_ids[index, :width],
            self.attention_mask[index, :width],
            self.loss_mask[index, :width],
            self.token_counts[index],
            RowRanges(self.ranges.bounds[index], tuple(self.ranges.host[b] for b in rows)),
        )

    def row(self, b: int) -> TokenBatch:
        """Sample b alone, exactly as it sits in the batch."""
        return self.select([b])

    def scored_widths(self, rows: list[int]) -> list[int]:
        """The columns each of ``rows`` needs: up to and including its last loss token."""
        return [self.ranges.host[b][1] + 1 for b in rows]

    def scored_part(self, rows: list[int]) -> TokenBatch:
        """Samples ``rows`` cut after the last column any of them scores."""
        return self.select(rows, max(self.scored_widths(rows), default=0))

    def scored_rows(self) -> tuple[list[int], TokenBatch]:
        """The samples that have loss tokens, cut after the last column any of them scores: invalid
        completions and trailing padding cost nothing (early in GRPO most completions can be truncated)."""
        rows = [b for b, (s, e) in enumerate(self.ranges.host) if e > s]
        return rows, self.scored_part(rows)


def _binary_mask(name: str, mask: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise BatchError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise BatchError(f"{name} has shape {list(mask.shape)} but input_ids has shape {list(shape)}")
    if mask.device != device:
        raise BatchError(f"{name} is on {mask.device} but input_ids is on {device}")
    if mask.is_floating_point() or mask.is_complex():
        raise BatchError(f"{name} must be a bool or integer 0/1 tensor, got {mask.dtype}")
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        bad = sorted({int(v) for v in mask[(mask != 0) & (mask != 1)].unique()[:5].tolist()})
        raise BatchError(f"{name} must hold only 0 and 1, found {bad}")
    return mask.bool()


def check_causal_lm(model: nn.Module) -> None:
    """Reject models that cannot score a completion token by token (encoder-decoders, masked LMs...)."""
    if not isinstance(model, nn.Module):
        raise NotACausalLMError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    config = getattr(base, "config", None)
    name = type(base).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise NotACausalLMError(f"{name} is an encoder-decoder model; VIGOR scores decoder-only causal LMs")
    if hasattr(base, "can_generate") and not base.can_generate():
        raise NotACausalLMError(f"{name} is not a causal LM (it cannot generate): load it with AutoModelForCausalLM")
    if not hasattr(base, "get_input_embeddings"):
        raise NotACausalLMError(f"{name} has no get_input_embeddings(): not a transformers-style causal LM")


def prepare_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    loss_mask: torch.Tensor,
) -> TokenBatch:
    """Validate a batch against ``model`` and derive each sample's token count and row range."""
    check_causal_lm(model)
    if not isinstance(input_ids, torch.Tensor):
        raise BatchError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise BatchError(f"input_ids must be 2-D [B, L], got shape {list(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise BatchError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise BatchError("input_ids is empty: the batch needs at least one sequence")
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    if input_ids.device != device:
        raise BatchError(f"input_ids is on {input_ids.device} but the model's embeddings are on {device}")
    vocab = embeddings.weight.shape[0]
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise BatchError(
            f"input_ids must be token ids in [0, {vocab}) (the model's vocabulary), "
            f"found values in [{int(input_ids.min())}, {int(input_ids.max())}]"
        )
    shape = input_ids.shape
    attn = torch.ones(shape, dtype=torch.bool, device=device)
    if attention_mask is not None:
        attn = _binary_mask("attention_mask", attention_mask, shape, device)
    loss = _binary_mask("loss_mask", loss_mask, shape, device)
    if loss[:, 0].any():
        rows = loss[:, 0].nonzero().flatten().tolist()[:5]
        raise BatchError(
            f"loss_mask[:, 0] must be 0 (rows {rows}): the first token has no earlier position to predict it; "
            "a completion needs at least one prompt token before it"
        )
    if (loss & ~attn).any():
        rows = (loss & ~attn).any(1).nonzero().flatten().tolist()[:5]
        raise BatchError(f"loss_mask marks tokens that attention_mask masks out (rows {rows})")
    positions = torch.arange(shape[1], device=device)
    counts = loss.sum(1)
    has_loss = counts > 0
    first_attended = torch.where(attn, positions, shape[1]).amin(1)
    last_loss = torch.where(loss, positions, -1).amax(1)
    # Rows [first attended, last loss token) can carry gradient; the last loss token's own position
    # predicts nothing that is scored. A sample with no loss token owns no row at all.
    starts = torch.where(has_loss, first_attended, 0)
    ends = torch.where(has_loss, last_loss, 0)
    bounds = torch.stack([starts, ends], 1).to(torch.int64)
    host = tuple((int(s), int(e)) for s, e in bounds.cpu().tolist())
    return TokenBatch(input_ids.to(torch.int64), attn.to(torch.int64), loss, counts, RowRanges(bounds, host))


def scored_logits(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits rows that predict completion tokens: ``(sample index [N], logits [N, V], targets [N])``.

    Position t predicts token t + 1. Only these rows are gathered, never a copy of all ``[B, L, V]``.
    """
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (batch.size, batch.length):
        raise NotACausalLMError(
            f"the model returned logits of shape {list(logits.shape)}; a causal LM returns "
            f"[B, L, V] = [{batch.size}, {batch.length}, V] next-token logits"
        )
    b_idx, t_idx = batch.loss_mask[:, 1:].nonzero(as_tuple=True)
    return b_idx, logits[b_idx, t_idx], batch.input_ids[b_idx, t_idx + 1]


def completion_nll(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """``L_b = (1/T_b) sum_t -log p(y_t | y_<t)`` over loss tokens, float32 ``[B]``; ``L_b = 0`` when
    ``T_b = 0`` (no token, no loss, zero gradient: the reward layer ranks such samples as invalid)."""
    b_idx, rows, targets = scored_logits(logits, batch)
    nll = F.cross_entropy(rows.float(), targets, reduction="none")
    sums = torch.zeros(batch.size, dtype=torch.float32, device=logits.device).index_add(0, b_idx, nll)
    return sums / batch.token_counts.clamp_min(1).to(sums.dtype)


def model_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, torch.Tensor):
        logits = out
    if logits is None:
        raise NotACausalLMError(
            f"{type(model).__name__} returned {type(out).__name__} without `logits`: use a causal LM "
            "(AutoModelForCausalLM), not a bare backbone"
        )
    return logits
