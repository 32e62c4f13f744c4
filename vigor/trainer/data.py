"""Prompts for training and evaluation: local JSONL / parquet files read through ``datasets``, formatted
with a prompt template or the tokenizer's chat template, and drawn in a seeded order that depends only on
the step (so a resumed run draws exactly the prompts the uninterrupted run would have)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from vigor.trainer.config import DataSettings

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data file is missing, unreadable, or lacks a column the config asks for; the message names it."""


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bars from ``datasets`` for these small local files (the trainer has its own)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def read_table(path: str | Path, key: str) -> Any:
    """A ``datasets.Dataset`` from a local file; ``key`` names the config setting in error messages."""
    from datasets import Dataset

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: data file {str(path)!r} does not exist")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{key}: {str(path)!r} is not a .jsonl, .json or .parquet file")
    try:
        reader = Dataset.from_json if kind == "json" else Dataset.from_parquet
        with quiet_datasets():
            table = reader(str(path), keep_in_memory=True)
    except Exception as e:  # datasets raises many types for malformed files
        raise DataError(f"{key}: cannot read {str(path)!r} as {kind}: {type(e).__name__}: {e}") from None
    if len(table) == 0:
        raise DataError(f"{key}: {str(path)!r} holds no rows")
    return table


@dataclass
class PromptSet:
    texts: list[str]  # formatted prompts, as fed to the tokenizer
    answers: list[str] | None  # reference answers (the answer column), if any
    columns: dict[str, list]  # every column of the file, for external reward functions

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: list[int]) -> PromptSet:
        return PromptSet(
            [self.texts[i] for i in indices],
            None if self.answers is None else [self.answers[i] for i in indices],
            {k: [v[i] for i in indices] for k, v in self.columns.items()},
        )


def format_prompt(row: dict[str, Any], cfg: DataSettings, tokenizer: Any) -> str:
    if cfg.chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("data.chat_template is true but the tokenizer has no chat template")
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": str(row[cfg.prompt_column])})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return cfg.prompt_template.format(**row)


def load_prompts(path: str | Path, key: str, cfg: DataSettings, tokenizer: Any) -> PromptSet:
    table = read_table(path, key)
    columns = table.column_names
    if cfg.chat_template and cfg.prompt_column not in columns:
        raise DataError(
            f"{key}: {str(path)!r} has no column {cfg.prompt_column!r} (data.prompt_column); it has {columns}"
        )
    if cfg.answer_column is not None and cfg.answer_column not in columns:
        raise DataError(
            f"{key}: {str(path)!r} has no column {cfg.answer_column!r} (data.answer_column; set it to null "
            f"if the data has no answers); it has {columns}"
        )
    data = table.to_dict()
    rows = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    texts = []
    for i, row in enumerate(rows):
        try:
            texts.append(format_prompt(row, cfg, tokenizer))
        except KeyError as e:
            raise DataError(
                f"data.prompt_template names column {e} that {str(path)!r} lacks (row {i}); it has {columns}"
            ) from None
        except (IndexError, ValueError) as e:
            raise DataError(f"data.prompt_template {cfg.prompt_template!r} cannot be formatted: {e}") from None
    answers = None if cfg.answer_column is None else [str(a) for a in data[cfg.answer_column]]
    return PromptSet(texts, answers, data)


def step_indices(step: int, per_step: int, size: int, seed: int) -> list[int]:
    """The prompts of training step ``step`` (0-based): consecutive slices of one seeded permutation per
    epoch over the training set. A pure function of its arguments, so resuming needs no data state."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(pos, size)
        out.append(_epoch_order(seed, epoch, size)[offset])
    return out


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    return tuple(torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist())
