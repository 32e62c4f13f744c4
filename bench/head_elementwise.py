"""The fused LM head on the CPU, torch backend against cpp: the whole op (``vigor_kernels.fused_head``) and its
elementwise work alone (``finish_stats`` + ``to_grad`` on one logits chunk), the part the cpp backend's C++
kernels (csrc/cpu/head.cpp) replace; the GEMMs around it are torch's on both backends.

    OMP_NUM_THREADS=2 python bench/head_elementwise.py   # ~6 min on 2 cores

- ``op``: ``fused_head(h, W, targets, offsets, grad_h=True, weight_norm="ghost")`` on h ``[rows, d]`` fp32
  (``samples`` samples of equal length), W ``[vocab, d]`` fp32, default tiling, the backends alternating
  round by round; peak RSS above the call's start. Both backends' results are compared (max relative
  difference recorded).
- ``elementwise``: one ``[chunk_rows, chunk_cols]`` fp32 chunk, ``finish_stats`` then ``to_grad`` timed
  separately, the chunk refilled (untimed) before each repeat; for the plain transform (Qwen2: no bias,
  scale 1) and for bias + softcap (Gemma2-style).

Medians over ``--repeats`` after ``--warmup`` untimed runs. Writes ``head_elementwise.json``, ``.md`` and
``.png`` into ``--out`` (default bench/results/head-elementwise-cpu).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vigor_kernels as vk
from bench import harness
from vigor_kernels import compiled
from vigor_kernels.torch_backend import head as torch_head

BACKENDS = ("torch", "cpp")
TRANSFORMS = {"plain": (False, 1.0, None), "bias+softcap": (True, 1.0, 30.0)}


def elementwise(backend: str) -> torch_head.Elementwise:
    if backend == "torch":
        return torch_head.Elementwise()
    from vigor_kernels.cpp_head import CppElementwise

    return CppElementwise()


def time_ops(args: argparse.Namespace, inputs: tuple, bar: tqdm) -> tuple[dict, dict]:
    """The whole op on each backend, the backends alternating round by round (the first ``warmup`` rounds
    untimed), so that load drifting on a shared machine hits both alike; peak RSS over a backend's rounds."""
    h, weight, targets, offsets = inputs
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    peaks: dict[str, int] = dict.fromkeys(BACKENDS, 0)
    outputs: dict[str, vk.HeadResult] = {}
    for rnd in range(args.warmup + args.repeats):
        for backend in BACKENDS:
            bar.set_postfix_str(f"op round {rnd + 1} {backend}")

            def run(backend: str = backend) -> None:
                outputs.pop(backend, None)
                outputs[backend] = vk.fused_head(
                    h, weight, targets, offsets, grad_h=True, weight_norm="ghost", backend=backend
                )

            timing = harness.measure(run, torch.device("cpu"), repeats=1, warmup=0)
            if rnd >= args.warmup:
                times[backend] += timing.times_s
                peaks[backend] = max(peaks[backend], timing.peak_extra_bytes)
            bar.update(1)
    stats = {
        b: {"times_s": times[b], "median_s": statistics.median(times[b]), "peak_extra_bytes": peaks[b]}
        for b in BACKENDS
    }
    return stats, outputs


def time_elementwise(args: argparse.Namespace, backend: str, transform: str) -> dict:
    has_bias, scale, softcap = TRANSFORMS[transform]
    gen = torch.Generator().manual_seed(args.seed)
    n, c = args.chunk_rows, args.chunk_cols
    source = torch.randn(n, c, generator=gen) * 4.0
    bias = torch.randn(c, generator=gen) * 0.5 if has_bias else None
    targets = torch.randint(0, 2 * c, (n,), generator=gen)  # about half inside the chunk
    w = torch.full((n,), 1.0 / n)
    ew, z = elementwise(backend), torch.empty_like(source)
    stats_s, grad_s = [], []
    for rep in range(args.warmup + args.repeats):
        z.copy_(source)
        start = time.perf_counter()
        m, total, _, _ = ew.finish_stats(z, bias, scale, softcap, targets, 0, True)
        mid = time.perf_counter()
        lse = (m.double() + total.log()).float()
        start_grad = time.perf_counter()
        ew.to_grad(z, lse, w, targets, 0, scale, softcap)
        end = time.perf_counter()
        if rep >= args.warmup:
            stats_s.append(mid - start)
            grad_s.append(end - start_grad)
    return {
        "finish_stats_times_s": stats_s,
        "to_grad_times_s": grad_s,
        "finish_stats_median_s": statistics.median(stats_s),
        "to_grad_median_s": statistics.median(grad_s),
    }


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def table(result: dict) -> str:
    cfg = result["config"]
    op, ew = result["op"], result["elementwise"]
    lines = [
        f"# Fused LM head on the CPU: torch vs cpp elementwise kernels ({cfg['threads']} threads)",
        "",
        f"Whole op: `fused_head` on h [{cfg['rows']}, {cfg['d']}] fp32, W [{cfg['vocab']}, {cfg['d']}] fp32, "
        f"{cfg['samples']} samples of {cfg['rows'] // cfg['samples']} rows, grad_h=True, weight_norm='ghost'.",
        "",
    ]
    rows = [[b, round(op[b]["median_s"], 3), round(op[b]["peak_extra_bytes"] / 2**20)] for b in BACKENDS]
    lines.append(harness.markdown_table(["backend", "median s", "peak MiB"], rows))
    speed = op["torch"]["median_s"] / op["cpp"]["median_s"]
    lines += ["", f"cpp / torch: {speed:.2f}x faster; results agree to {result['agreement']}.", ""]
    lines += [f"Elementwise alone on one [{cfg['chunk_rows']}, {cfg['chunk_cols']}] fp32 chunk (ms):", ""]
    rows = []
    for transform in TRANSFORMS:
        t, c = ew[transform]["torch"], ew[transform]["cpp"]
        for step in ("finish_stats", "to_grad"):
            key = f"{step}_median_s"
            rows.append([transform, step, round(t[key] * 1e3, 1), round(c[key] * 1e3, 1), round(t[key] / c[key], 1)])
    lines.append(harness.markdown_table(["transform", "step", "torch ms", "cpp ms", "speed-up"], rows))
    lines += [
        "",
        f"Medians of {cfg['repeats']} after {cfg['warmup']} warm-up. Load average (1, 5, 15 min) before "
        f"{_load(result['load_average_before'])}, after {_load(result['load_average_after'])}. {result['notes']}",
        "",
        f"Command: `{result['command']}`; commit {result['environment'].get('commit')}.",
    ]
    return "\n".join(lines) + "\n"


def _load(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    op = result["op"]
    axes[0].bar(BACKENDS, [op[b]["median_s"] for b in BACKENDS], color=["tab:gray", "tab:blue"])
    axes[0].set_ylabel("seconds (median)")
    axes[0].set_title("fused_head, whole op")
    labels, width = [], 0.38
    for i, transform in enumerate(TRANSFORMS):
        for j, step in enumerate(("finish_stats", "to_grad")):
            x = 2 * i + j
            labels.append(f"{transform}\n{step}")
            for k, b in enumerate(BACKENDS):
                value = result["elementwise"][transform][b][f"{step}_median_s"] * 1e3
                axes[1].bar(
                    x + (k - 0.5) * width, value, width, color=["tab:gray", "tab:blue"][k], label=b if x == 0 else None
                )
    axes[1].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[1].set_ylabel("ms (median)")
    axes[1].set_title("elementwise, one chunk")
    axes[1].legend()
    fig.suptitle(f"{result['environment'].get('device')}; OMP threads = {result['config']['threads']}")
    harness.atomic_save_figure(fig, path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--d", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--chunk-rows", type=int, default=512)
    parser.add_argument("--chunk-cols", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="shown under the table (machine load, ...)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/head-elementwise-cpu")
    args = parser.parse_args(argv)
    if args.rows % args.samples or min(args.rows, args.d, args.vocab, args.chunk_rows, args.chunk_cols) < 1:
        parser.error("--rows must be a positive multiple of --samples; every size must be positive")
    if min(args.threads, args.repeats) < 1 or args.warmup < 0:
        parser.error("--threads and --repeats must be >= 1, --warmup >= 0")
    args.out = harness.results_dir(args.out, "head-elementwise-cpu")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ext = compiled.loaded()
    if ext is None:
        sys.exit(f"error: the cpp backend is unavailable: {compiled.import_failure()}")
    torch.set_num_threads(args.threads)
    ext.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    h = torch.randn(args.rows, args.d, generator=gen)
    weight = torch.randn(args.vocab, args.d, generator=gen) * args.d**-0.5
    targets = torch.randint(0, args.vocab, (args.rows,), generator=gen)
    step = args.rows // args.samples
    offsets = list(range(0, args.rows + 1, step))
    result = {
        "benchmark": "head_elementwise",
        "command": shlex.join(["python", "bench/head_elementwise.py", *args.argv]),
        "environment": harness.environment(torch.device("cpu"), torch.float32),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "argv", "note")},
        "notes": args.note,
        "load_average_before": os.getloadavg(),
        "op": {},
        "elementwise": {t: {} for t in TRANSFORMS},
    }
    started = time.perf_counter()
    total = len(BACKENDS) * (args.warmup + args.repeats + len(TRANSFORMS))
    with tqdm(total=total, desc="head elementwise", file=sys.stderr) as bar:
        result["op"], outputs = time_ops(args, (h, weight, targets, offsets), bar)
        for backend in BACKENDS:
            for transform in TRANSFORMS:
                bar.set_postfix_str(f"{backend} {transform}")
                result["elementwise"][transform][backend] = time_elementwise(args, backend, transform)
                bar.update(1)
    got, want = outputs["cpp"], outputs["torch"]
    diffs = {name: max_rel(getattr(got, name), getattr(want, name)) for name in ("nll", "grad_h", "weight_sq")}
    result["agreement"] = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + " (max rel. to the largest)"
    result["max_rel_diff"] = diffs
    result["wall_s"] = time.perf_counter() - started
    result["load_average_after"] = os.getloadavg()
    harness.write_results(args.out, "head_elementwise", result, table(result), lambda p: plot(result, p))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
