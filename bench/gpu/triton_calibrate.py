"""Calibrate the triton backend's ghost-vs-direct choice on this GPU (``method="auto"``).

    python bench/gpu/triton_calibrate.py --out results/triton-calibration --install

Times the triton ghost and direct kernels (bf16, ``triton.testing.do_bench`` medians, L2 flushed
between runs) at Qwen2.5-1.5B and 7B layer shapes over a range of sequence lengths, then picks the
``ghost_cost_factor`` f of :mod:`vigor_kernels.cost` (ghost when ``f * ghost_flops <= direct_flops``)
that loses the least time over all measured points against always picking the faster kernel.
Reports, per layer shape, the measured crossover length (where the two timings cross, log-log
interpolated) beside the model's. ``--install`` records f for this GPU model in
vigor_kernels/triton_backend/calibration.json, which the backend reads at import.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

import vigor_kernels as vk
from bench import harness
from vigor import atomic
from vigor_kernels import cost

LAYER_SETS = {
    # name: (d_in, d_out)
    "qwen": {
        "1.5b q/o": (1536, 1536),
        "1.5b k/v": (1536, 256),
        "1.5b up": (1536, 8960),
        "1.5b down": (8960, 1536),
        "7b q/o": (3584, 3584),
        "7b k/v": (3584, 512),
        "7b up": (3584, 18944),
        "7b down": (18944, 3584),
    },
    # a seconds-long run of the same code on the CPU under TRITON_INTERPRET=1 (tests)
    "tiny": {"tiny a": (8, 24), "tiny b": (40, 3)},
}
CALIBRATION_FILE = harness.ROOT / "vigor_kernels" / "triton_backend" / "calibration.json"


def measure(layers: dict, batch: int, lengths: list[int], dtype: torch.dtype, device: torch.device) -> list[dict]:
    records = []
    for name, (d_in, d_out) in layers.items():
        for length in lengths:
            x = torch.randn(batch, length, d_in, device=device, dtype=dtype)
            g = torch.randn(batch, length, d_out, device=device, dtype=dtype)
            times = {}
            for method in ("ghost", "direct"):
                times[method] = harness.kernel_median_ms(
                    lambda x=x, g=g, m=method: vk.linear_weight_sq_norms(x, g, method=m, backend="triton"), device
                )
            rows = [length] * batch
            records.append(
                dict(
                    layer=name,
                    d_in=d_in,
                    d_out=d_out,
                    T=length,
                    batch=batch,
                    ghost_ms=times["ghost"],
                    direct_ms=times["direct"],
                    ghost_flops=cost.ghost_flops(rows, d_in, d_out),
                    direct_flops=cost.direct_flops(rows, d_in, d_out),
                )
            )
            print(
                f"{name:10s} T={length:5d} ghost {times['ghost']:8.3f} ms  direct {times['direct']:8.3f} ms", flush=True
            )
            del x, g
    return records


def regret_ms(records: list[dict], factor: float) -> float:
    """Time lost over all records by the cost model with ``factor`` against always picking the faster kernel."""
    lost = 0.0
    for r in records:
        chose_ghost = r["ghost_flops"] * factor <= r["direct_flops"]
        lost += (r["ghost_ms"] if chose_ghost else r["direct_ms"]) - min(r["ghost_ms"], r["direct_ms"])
    return lost


def fit_factor(records: list[dict]) -> float:
    """The factor with the least regret; candidates are the break-even factor of every record (at which the
    model flips for it) and 1.0; ties go to the candidate nearest 1."""
    candidates = {1.0}
    for r in records:
        breakeven = r["direct_flops"] / r["ghost_flops"]
        candidates.update({breakeven * 0.999, breakeven * 1.001})
    return min(sorted(candidates), key=lambda f: (round(regret_ms(records, f), 6), abs(math.log(f))))


def measured_crossover(records: list[dict], layer: str) -> float | None:
    """Length where ghost and direct take the same time (log-log interpolation), None if they never cross."""
    pts = sorted((r["T"], r["ghost_ms"] / r["direct_ms"]) for r in records if r["layer"] == layer)
    for (t0, q0), (t1, q1) in itertools.pairwise(pts):
        if (q0 - 1) * (q1 - 1) <= 0 and q0 != q1:
            w = math.log(q0) / (math.log(q0) - math.log(q1))
            return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))
    return None


def install(device: str, factor: float, source: str, path: Path = CALIBRATION_FILE) -> None:
    """Record ``factor`` for ``device`` in the data file at ``path``, keeping other devices' entries."""
    table: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    table[device] = {"ghost_cost_factor": round(factor, 4), "source": source}
    atomic.write_json(path, dict(sorted(table.items())))


def report(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"Triton ghost vs direct on {env['device']}, {env['dtype']}, batch {result['batch']}, "
        f"commit {env['commit'][:12]} (do_bench medians, L2 flushed).\n",
        f"Fitted ghost_cost_factor: **{result['factor']:.4g}** (time lost against the faster kernel over all points: "
        f"{result['regret_ms']['fitted']:.3f} ms fitted, {result['regret_ms']['uncalibrated']:.3f} ms with 1.0).\n",
    ]
    headers = ["layer", "d_in", "d_out", "measured crossover T", "model T (f=1)", "model T (fitted)"]
    rows = [
        [
            c["layer"],
            c["d_in"],
            c["d_out"],
            c["measured"] if c["measured"] else "none in range",
            c["model_f1"],
            c["model_fitted"],
        ]
        for c in result["crossovers"]
    ]
    lines.append(harness.markdown_table(headers, rows))
    headers = ["layer", "T", "ghost ms", "direct ms", "faster", "auto picks (fitted)"]
    rows = []
    for r in result["records"]:
        pick = "ghost" if r["ghost_flops"] * result["factor"] <= r["direct_flops"] else "direct"
        faster = "ghost" if r["ghost_ms"] <= r["direct_ms"] else "direct"
        rows.append([r["layer"], r["T"], r["ghost_ms"], r["direct_ms"], faster, pick])
    lines.append("\n" + harness.markdown_table(headers, rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--lengths", type=lambda s: [int(v) for v in s.split(",")], default=[256, 512, 1024, 2048, 4096, 8192]
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--out", type=Path, default=None, help="default $VIGOR_BENCH_RESULTS/triton-calibration")
    parser.add_argument("--install", action="store_true", help="record the factor in triton_backend/calibration.json")
    parser.add_argument("--layers", choices=sorted(LAYER_SETS), default="qwen")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("triton_calibrate: needs a CUDA GPU")
    if args.install and device.type != "cuda":
        sys.exit("triton_calibrate: --install records a GPU's factor; run it on that GPU")
    dtype = getattr(torch, args.dtype)
    layers = LAYER_SETS[args.layers]
    records = measure(layers, args.batch, args.lengths, dtype, device)
    factor = fit_factor(records)
    crossovers = [
        dict(
            layer=name,
            d_in=d_in,
            d_out=d_out,
            measured=measured_crossover(records, name),
            model_f1=cost.crossover_length(d_in, d_out),
            model_fitted=cost.crossover_length(d_in, d_out, factor),
        )
        for name, (d_in, d_out) in layers.items()
    ]
    result = {
        "benchmark": "triton_calibrate",
        "environment": harness.environment(device, dtype),
        "batch": args.batch,
        "factor": factor,
        "regret_ms": {"fitted": regret_ms(records, factor), "uncalibrated": regret_ms(records, 1.0)},
        "crossovers": crossovers,
        "records": records,
    }
    args.out = harness.results_dir(args.out, "triton-calibration")
    harness.write_results(args.out, "calibration", result, report(result))
    print(report(result))
    if args.install:
        install(torch.cuda.get_device_name(device), factor, f"{args.out}/calibration.json")
        print(f"installed ghost_cost_factor {factor:.4g} for {torch.cuda.get_device_name(device)}")


if __name__ == "__main__":
    main()
