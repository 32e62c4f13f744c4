"""``vigor score``: rewards for prompt/completion pairs read from JSONL, without training.

Rows with the same prompt form one group (in order of first appearance; a group's rows keep their file
order). Groups of equal size are scored together, ``batch_groups`` groups per engine call, and each row
comes back with its reward, its group advantage and the quantities behind them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vigor import rewards as R
from vigor.packing import pack_completions
from vigor.trainer.data import DataError

REWARDS = ("vigor", "self_certainty")


def read_pairs(path: str | Path, prompt_key: str, completion_key: str) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"--input: file {str(path)!r} {what}")
    rows = []
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{i}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: each line must be a JSON object, got {type(row).__name__}")
        for key in (prompt_key, completion_key):
            if not isinstance(row.get(key), str):
                raise DataError(f"{path}:{i}: needs a string field {key!r} (got keys {sorted(row)})")
        rows.append(row)
    if not rows:
        raise DataError(f"--input: {str(path)!r} holds no rows")
    return rows


def group_rows(rows: list[dict[str, Any]], prompt_key: str) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row[prompt_key], []).append(i)
    return list(groups.values())


def score_pairs(
    model: nn.Module,
    tokenizer,
    rows: list[dict[str, Any]],
    *,
    reward: str = "vigor",
    prompt_key: str = "prompt",
    completion_key: str = "completion",
    chat_template: bool = False,
    append_eos: bool = False,
    sqrt_length: bool = True,
    rank: bool = True,
    batch_groups: int = 8,
) -> list[dict[str, Any]]:
    """Each input row extended with ``reward``, ``advantage``, ``tokens``, ``valid`` (and for VIGOR
    ``grad_norm`` and ``vigor_raw``), in input order."""
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
    if batch_groups < 1:
        raise ValueError(f"batch_groups must be >= 1, got {batch_groups}")
    device = model.get_input_embeddings().weight.device

    def prompt_text(text: str) -> str:
        if chat_template:
            messages = [{"role": "user", "content": text}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text

    out: list[dict[str, Any] | None] = [None] * len(rows)
    by_size: dict[int, list[list[int]]] = {}
    for group in group_rows(rows, prompt_key):
        by_size.setdefault(len(group), []).append(group)
    for size, groups in by_size.items():
        for start in range(0, len(groups), batch_groups):
            index = [i for g in groups[start : start + batch_groups] for i in g]
            prompts = [
                tokenizer(prompt_text(rows[i][prompt_key]), add_special_tokens=not chat_template)["input_ids"]
                for i in index
            ]
            empty = [i for i, p in zip(index, prompts, strict=True) if not p]
            if empty:
                raise DataError(
                    f"input row {empty[0] + 1}: the prompt {rows[empty[0]][prompt_key]!r} tokenizes to no tokens "
                    "(a completion needs at least one prompt token before it)"
                )
            completions = [tokenizer(rows[i][completion_key], add_special_tokens=False)["input_ids"] for i in index]
            if append_eos:
                completions = [[*c, tokenizer.eos_token_id] for c in completions]
            packed = pack_completions(prompts, completions, pad_id=tokenizer.pad_token_id, device=device)
            ids, attn, loss = packed.input_ids, packed.attention_mask, packed.loss_mask
            extra: dict[str, torch.Tensor] = {}
            if reward == "vigor":
                s = R.vigor_rewards(model, ids, attn, loss, size, sqrt_length=sqrt_length, rank=rank)
                values, valid = s.rewards, s.valid
                extra = {"grad_norm": s.norms, "vigor_raw": s.raw}
            else:
                values, valid = R.self_certainty_scores(model, ids, attn, loss)
            advantages = R.group_advantages(values, size)
            counts = loss.sum(1)
            for j, i in enumerate(index):
                row = dict(rows[i])
                row.update(
                    reward=float(values[j]), advantage=float(advantages[j]), tokens=int(counts[j]), valid=bool(valid[j])
                )
                row.update({k: float(v[j]) for k, v in extra.items()})
                out[i] = row
    assert all(r is not None for r in out), "a row was left unscored"  # every group is in exactly one batch
    return out  # type: ignore[return-value]
