"""A built-in synthetic task: multi-step arithmetic word problems with numeric answers.

Generated offline from a seed, deduplicated, split into train and test without overlap, and written
with ``datasets`` as JSONL. Each row has ``question``, ``answer`` (the final number, as text),
``solution`` (the worked steps, for supervised warm-up) and ``ops`` (the number of steps).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Lea", "Max", "Nia")
ITEMS = ("apples", "marbles", "stamps", "coins", "books", "shells", "cards", "pens")
GAIN = ("gets {n} more", "buys {n} more", "finds {n} more", "is given {n} more")
LOSS = ("gives away {n}", "loses {n}", "sells {n}", "trades away {n}")
TIMES = {2: "doubles", 3: "triples"}


def arithmetic_problem(rng: random.Random, max_ops: int) -> dict[str, object]:
    """One problem of 1..max_ops steps; every intermediate count stays a non-negative integer below 1000."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(rng.randint(1, max_ops)):
        kind = rng.choice(("add", "sub", "mul") if value < 100 else ("add", "sub"))
        if kind == "sub" and value < 2:
            kind = "add"
        if kind == "add":
            n = rng.randint(1, 20)
            sentences.append(f"Then {name} {rng.choice(GAIN).format(n=n)}.")
            steps.append(f"{value} + {n} = {value + n}")
            value += n
        elif kind == "sub":
            n = rng.randint(1, value - 1)
            sentences.append(f"Then {name} {rng.choice(LOSS).format(n=n)}.")
            steps.append(f"{value} - {n} = {value - n}")
            value -= n
        else:
            k = rng.choice(tuple(TIMES))
            sentences.append(f"Then the number of {item} {TIMES[k]}.")
            steps.append(f"{value} * {k} = {value * k}")
            value *= k
    sentences.append(f"How many {item} does {name} have now?")
    return {
        "question": " ".join(sentences),
        "answer": str(value),
        "solution": ". ".join(steps) + f". The answer is {value}.",
        "ops": len(steps),
    }


def arithmetic_splits(seed: int, num_train: int, num_test: int, max_ops: int = 3) -> tuple[list[dict], list[dict]]:
    """Distinct problems from ``seed``: the first ``num_test`` go to test, the next ``num_train`` to train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    tries = 0
    while len(rows) < num_train + num_test:
        tries += 1
        if tries > 50 * (num_train + num_test) + 1000:
            raise ValueError(f"could not draw {num_train + num_test} distinct problems with max_ops={max_ops}")
        row = arithmetic_problem(rng, max_ops)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows[num_test:], rows[:num_test]


def _write_jsonl(rows: list[dict], path: Path) -> None:
    from datasets import Dataset

    from vigor.trainer.data import quiet_datasets

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with quiet_datasets():
        Dataset.from_list(rows).to_json(str(tmp), lines=True)
    os.replace(tmp, path)


def write_arithmetic_task(
    out_dir: str | Path, seed: int, num_train: int, num_test: int, max_ops: int = 3
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``out_dir`` (each atomically); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = arithmetic_splits(seed, num_train, num_test, max_ops)
    paths = out / "train.jsonl", out / "test.jsonl"
    _write_jsonl(train, paths[0])
    _write_jsonl(test, paths[1])
    return paths
