"""Metrics: one JSON object per step appended to ``metrics.jsonl``, and PNG plots over steps."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from vigor import atomic
from vigor.trainer.data import DataError

# panel name -> (title, metric keys drawn in it). The rank-shaped VIGOR reward (and hence a mix of VIGOR
# alone) averages to zero in every group by construction, so the panel shows VIGOR's raw reward instead.
PANELS = {
    "reward": ("rewards (mean over completions)", ["reward/*", "vigor/raw"]),
    "accuracy": ("accuracy", ["accuracy", "eval/accuracy"]),
    "grad_norm": ("gradient norms", ["grad_norm", "vigor/grad_norm"]),
    "completion_length": ("completion length (tokens)", ["completion_length", "eval/completion_length"]),
    "entropy": ("entropy of the policy (nats per token)", ["entropy"]),
}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``path``. A torn last line (a write cut short by a crash or a full disk) is skipped
    with a warning on stderr; a bad line before it is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            records.append(record)
        except ValueError as e:  # JSONDecodeError included
            if k < len(lines) - 1:
                raise DataError(f"{path}:{i}: not a metrics record ({e}); only a torn last line is skipped") from None
            print(f"warning: {path}:{i}: skipped a torn last line (interrupted write): {line[:40]!r}", file=sys.stderr)
    return records


class MetricsLog:
    """Append-only JSONL; reopening for a resumed run first drops the records after ``keep_until``."""

    def __init__(self, path: str | Path, keep_until: int | None = None) -> None:
        self.path = Path(path)
        records = read_metrics(self.path) if keep_until is not None else []
        self.records = [r for r in records if r.get("step", 0) <= (keep_until or 0)]
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


HIDDEN = {"reward/vigor"}
LABELS = {
    "grad_norm": "update (before clipping)",
    "vigor/grad_norm": "per-completion ||grad L_b|| (VIGOR)",
    "vigor/raw": "vigor raw: -sqrt(T) ||grad L_b||",
}


def _series(records: list[dict[str, Any]], pattern: str) -> dict[str, tuple[list[int], list[float]]]:
    keys = sorted(
        {k for r in records for k in r if k == pattern or (pattern.endswith("*") and k.startswith(pattern[:-1]))}
        - HIDDEN
    )
    out = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if pts:
            out[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def _draw(ax: Any, records: list[dict[str, Any]], title: str, patterns: list[str]) -> None:
    for pattern in patterns:
        for key, (steps, values) in _series(records, pattern).items():
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=LABELS.get(key, key))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def write_plots(records: list[dict[str, Any]], out_dir: str | Path, panels: bool = True) -> list[Path]:
    """``overview.png`` with every panel and (``panels``) one PNG per panel, each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written = []

    def save(fig: Any, name: str) -> None:
        written.append(
            atomic.write_with(out / name, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        )
        plt.close(fig)

    for name, (title, patterns) in PANELS.items() if panels else ():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        _draw(ax, records, title, patterns)
        save(fig, f"{name}.png")
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (title, patterns) in zip(axes.flat, PANELS.values(), strict=False):
        _draw(ax, records, title, patterns)
    _draw(axes.flat[-1], records, "VIGOR engine vs oracle (max relative error)", ["verify/max_rel_err"])
    fig.tight_layout()
    save(fig, "overview.png")
    return written
