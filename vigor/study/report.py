"""The study's table and figure, rebuilt from the raw run files alone (``vigor study report --out DIR``).

Per arm, over seeds (mean, and the standard deviation over seeds in parentheses): held-out greedy accuracy
at the start (the checkpoint), at the end and at its best evaluation, the gain end - start, the same
paired against the random arm (arm - random, seed by seed), the temperature-1 held-out accuracy at the end,
and at the last training step the sampled completions' length, the policy's entropy and the fraction of
duplicates inside groups. "Best" is the maximum over evaluations, which favors noisy arms: read it with
the final accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from vigor.study.run import read_runs

EVAL_KEYS = {"greedy": "eval/accuracy", "t1": "eval/accuracy_t1"}
TRAIN_PANELS = {
    "accuracy": "training groups: accuracy (temperature 1)",
    "completion_length": "training groups: completion length (tokens)",
    "entropy": "policy entropy (nats per token)",
    "duplicates": "duplicates inside groups (fraction)",
}


def _evals(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _last(records: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in records if isinstance(r.get(key), int | float) and r.get("step", 0) > 0]
    return float(values[-1]) if values else math.nan


def _stat(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(np.mean(a)), "std": float(np.std(a, ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def summarize(runs: list[dict[str, Any]], control: str = "random") -> dict[str, Any]:
    """Per arm: every statistic of the table, with the per-seed values it came from."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run
    per_run: dict[str, dict[int, dict[str, float]]] = {}
    for arm, seeds in by_arm.items():
        per_run[arm] = {}
        for seed, run in seeds.items():
            rec = run["records"]
            _, greedy = _evals(rec, EVAL_KEYS["greedy"])
            _, sampled = _evals(rec, EVAL_KEYS["t1"])
            per_run[arm][seed] = {
                "start": greedy[0],
                "final": greedy[-1],
                "best": max(greedy),
                "gain": greedy[-1] - greedy[0],
                "start_t1": sampled[0] if sampled else math.nan,
                "final_t1": sampled[-1] if sampled else math.nan,
                "gain_t1": sampled[-1] - sampled[0] if sampled else math.nan,
                "length": _last(rec, "completion_length"),
                "entropy": _last(rec, "entropy"),
                "duplicates": _last(rec, "duplicates"),
                "seconds": float(run.get("seconds", math.nan)),
            }
    out: dict[str, Any] = {"control": control, "arms": {}}
    for arm, seeds in per_run.items():
        keys = next(iter(seeds.values())).keys()
        row = {k: _stat([s[k] for s in seeds.values()]) for k in keys}
        if control in per_run and arm != control:
            paired = sorted(set(seeds) & set(per_run[control]))
            for k in ("final", "final_t1"):
                diffs = [seeds[s][k] - per_run[control][s][k] for s in paired]
                row[f"{k}_vs_{control}"] = _stat(diffs) if diffs else None
        row["seeds"] = sorted(seeds)
        row["per_seed"] = {str(s): v for s, v in sorted(seeds.items())}
        out["arms"][arm] = row
    return out


def _fmt(stat: dict[str, float] | None, pct: bool = True, signed: bool = False) -> str:
    if stat is None or math.isnan(stat["mean"]):
        return "–"
    scale = 100.0 if pct else 1.0
    sign = "+" if signed else ""
    return f"{stat['mean'] * scale:{sign}.1f} ({stat['std'] * scale:.1f})"


def markdown_table(summary: dict[str, Any]) -> str:
    control = summary["control"]
    head = (
        "| arm | seeds | start | final | best | gain | final − "
        f"{control} (paired) | final t=1 | gain t=1 | length | entropy | duplicates |"
    )
    lines = [head, "|" + "---|" * 12]
    for arm, row in summary["arms"].items():
        lines.append(
            f"| {arm} | {len(row['seeds'])} | {_fmt(row['start'])} | {_fmt(row['final'])} | {_fmt(row['best'])} | "
            f"{_fmt(row['gain'], signed=True)} | {_fmt(row.get(f'final_vs_{control}'), signed=True)} | "
            f"{_fmt(row['final_t1'])} | {_fmt(row['gain_t1'], signed=True)} | {_fmt(row['length'], pct=False)} | "
            f"{_fmt(row['entropy'], pct=False)} | {_fmt(row['duplicates'])} |"
        )
    return "\n".join(lines)


def plot_study(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Mean over seeds per arm (lines) with the min-max band over seeds; held-out accuracies at the top,
    training-time statistics below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vigor.atomic import write_with

    arms = list(dict.fromkeys(r["arm"] for r in runs))
    colors = {arm: plt.cm.tab10(i % 10) for i, arm in enumerate(arms)}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = [
        ("eval/accuracy", "held-out accuracy, greedy"),
        ("eval/accuracy_t1", "held-out accuracy, temperature 1"),
        *TRAIN_PANELS.items(),
    ]
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for arm in arms:
            curves = [_evals(r["records"], key) for r in runs if r["arm"] == arm]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            n = min(len(c[0]) for c in curves)
            steps = np.asarray(curves[0][0][:n])
            values = np.asarray([c[1][:n] for c in curves], dtype=float)
            if key not in EVAL_KEYS.values() and n > 20:  # per-step training noise: a 5-step running mean
                kernel = np.ones(5) / 5
                values = np.asarray([np.convolve(v, kernel, mode="valid") for v in values])
                steps = steps[2 : 2 + values.shape[1]]
            ax.plot(steps, values.mean(0), color=colors[arm], label=f"{arm} ({len(curves)})")
            ax.fill_between(steps, values.min(0), values.max(0), color=colors[arm], alpha=0.12, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, title="arm (seeds)", title_fontsize=8)
    fig.suptitle("GRPO from the warm-started checkpoint: mean over seeds, band = min-max over seeds", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def write_report(out_dir: str | Path) -> dict[str, Any]:
    """``summary.json``, ``summary.md`` and ``study.png`` in ``out_dir`` from its ``runs/*.jsonl``."""
    from vigor.atomic import write_json, write_text

    out = Path(out_dir)
    runs = read_runs(out)
    if not runs:
        raise ValueError(f"no finished runs under {out / 'runs'}")
    summary = summarize(runs)
    write_json(out / "summary.json", summary)
    header = (
        f"Runs: `vigor study run --config {out / 'study.yaml'}` (a copy of the study config); this table and "
        f"study.png: `vigor study report --out {out}`. Held-out accuracy in %, mean over seeds (std over seeds)."
    )
    write_text(out / "summary.md", header + "\n\n" + markdown_table(summary) + "\n")
    plot_study(runs, out / "study.png")
    return summary
