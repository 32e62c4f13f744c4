"""Op-level benchmark: time and peak extra memory of the linear-weight norm ops per backend and method.

    python bench/op_bench.py --preset cpu-small --out bench/results/ops-cpu
    python bench/op_bench.py --preset h100-7b --out results/ops-gpu             # 7B layer shapes, on a CUDA GPU

Each configuration runs on the same random ``x``/``g`` for every backend and method; ``opacus`` is
Opacus' own linear norm sampler (``compute_linear_norm_sample``, B x T x T Gram matrices) on the
same tensors. Writes ``ops.json`` (environment, every repeat's time, medians, peak memory),
``ops.md`` and ``ops.png`` (without matplotlib: skipped, with a note) into ``--out`` (default
``$VIGOR_BENCH_RESULTS/ops``, else ``bench/results/ops``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import vigor_kernels as vk
from bench import harness


@dataclass(frozen=True)
class LayerShape:
    name: str
    d_in: int
    d_out: int


def model_layers(d: int, d_ff: int, d_kv: int | None = None) -> list[LayerShape]:
    layers = [LayerShape("attn_q_o", d, d), LayerShape("mlp_up", d, d_ff), LayerShape("mlp_down", d_ff, d)]
    if d_kv:
        layers.insert(1, LayerShape("attn_kv", d, d_kv))
    return layers


PRESETS = {
    # Qwen2.5-0.5B (d 896, d_ff 4864) and 1.5B (d 1536, d_ff 8960) layer shapes, sized for a 2-core CPU.
    "cpu-small": dict(
        layers=[*model_layers(896, 4864), *model_layers(1536, 8960)],
        lengths=[256, 512, 1024, 2048],
        batch=2,
        dtype="float32",
        device="cpu",
    ),
    # A seconds-long smoke run of the same code path (used by the tests).
    "cpu-tiny": dict(layers=[LayerShape("tiny", 24, 40)], lengths=[8, 16], batch=2, dtype="float32", device="cpu"),
    # Qwen2.5-7B layer shapes (d 3584, d_ff 18944, 4 KV heads of 128), 16 sequences.
    "h100-7b": dict(
        layers=model_layers(3584, 18944, 512),
        lengths=[512, 1024, 2048, 4096],
        batch=16,
        dtype="bfloat16",
        device="cuda",
    ),
}
PEAK_TFLOPS = {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}  # H100 SXM dense, for reference


def opacus_linear_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    from opacus.grad_sample.linear import compute_linear_norm_sample

    layer = torch.nn.Linear(x.shape[-1], g.shape[-1], bias=False, device=x.device, dtype=x.dtype)
    norms = compute_linear_norm_sample(layer, [x], g)[layer.weight]
    return norms.float().square()


def run(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset["device"])
    dtype = getattr(torch, args.dtype or preset["dtype"])
    lengths = args.lengths or preset["lengths"]
    batch = args.batch or preset["batch"]
    methods = args.methods.split(",")
    peers = [b for b in args.backends.split(",") if b]
    status = vk.available_backends()
    records, skipped = [], []
    configs = [(layer, t) for layer in preset["layers"] for t in lengths]
    for layer, length in tqdm(configs, desc="op shapes"):
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, length, layer.d_in, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(batch, length, layer.d_out, generator=gen).to(device=device, dtype=dtype)
        # Effective FLOPs: the full Gram matrices for ghost (vigor_kernels.cost counts the upper triangle, 2
        # flops per multiply-add), G^T X for direct (cost.direct_flops is already 2 T d_in d_out).
        flops = {
            "ghost": 2 * vk.cost.ghost_flops([length] * batch, layer.d_in, layer.d_out),
            "direct": vk.cost.direct_flops([length] * batch, layer.d_in, layer.d_out),
        }
        reference = None
        for peer in peers:
            for method in methods if peer != "opacus" else ["ghost"]:
                key = dict(layer=layer.name, d_in=layer.d_in, d_out=layer.d_out, T=length, batch=batch)
                key.update(backend=peer, method=method)
                if peer != "opacus" and not status[peer].available:
                    skipped.append({**key, "reason": status[peer].reason})
                    continue
                if peer == "opacus":
                    fn = lambda x=x, g=g: opacus_linear_sq_norms(x, g)
                else:
                    fn = lambda x=x, g=g, peer=peer, method=method: vk.linear_weight_sq_norms(
                        x, g, method=method, backend=peer
                    )
                try:
                    value = fn()
                    timing = harness.measure(fn, device, repeats=args.repeats, warmup=args.warmup)
                except (torch.OutOfMemoryError, vk.BackendError, RuntimeError, ImportError) as exc:
                    skipped.append({**key, "reason": f"{type(exc).__name__}: {exc}"[:300]})
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                    continue
                reference = value if reference is None else reference
                chosen = method
                if method == "auto":
                    factor = vk.select_backend(peer, device, dtype).ghost_cost_factor
                    chosen = vk.choose_linear_method([length] * batch, layer.d_in, layer.d_out, factor)
                achieved = flops[chosen] / timing.median_s / 1e12
                rel = ((value.float() - reference.float()).abs() / reference.float().abs().clamp_min(1e-30)).max()
                records.append(
                    {
                        **key,
                        "resolved_method": chosen,
                        "effective_tflops": achieved,  # full Gram / G^T X FLOPs, whatever a kernel skips
                        "fraction_of_peak": achieved / PEAK_TFLOPS[str(dtype).removeprefix("torch.")]
                        if device.type == "cuda"
                        else None,
                        "max_rel_diff_vs_first": float(rel),
                        **timing.as_dict(),
                    }
                )
    return {
        "benchmark": "op_bench",
        "preset": args.preset,
        "environment": harness.environment(device, dtype),
        "peak_tflops_reference": PEAK_TFLOPS,
        "records": records,
        "skipped": skipped,
    }


def table(result: dict) -> str:
    headers = ["layer", "d_in", "d_out", "T", "backend", "method", "median ms", "effective TFLOP/s", "peak extra MiB"]
    rows = [
        [
            r["layer"],
            r["d_in"],
            r["d_out"],
            r["T"],
            r["backend"],
            r["method"] if r["method"] == r["resolved_method"] else f"{r['method']}→{r['resolved_method']}",
            r["median_s"] * 1e3,
            r["effective_tflops"],
            r["peak_extra_bytes"] / 2**20,
        ]
        for r in result["records"]
    ]
    env = result["environment"]
    head = f"Op benchmark `{result['preset']}` on {env['device']}, {env['dtype']}, torch {env['torch_version']}, "
    head += f"commit {env['commit'][:12]}; median of {len(result['records'][0]['times_s']) if rows else 0} repeats.\n\n"
    skipped = "".join(
        f"- skipped {s['backend']}/{s['method']} {s['layer']} T={s['T']}: {s['reason']}\n" for s in result["skipped"]
    )
    return head + harness.markdown_table(headers, rows) + ("\n" + skipped if skipped else "")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({(r["layer"], r["d_in"], r["d_out"]) for r in result["records"]}, key=str)
    if not layers:
        return
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
    for ax, (name, d_in, d_out) in zip(axes[0], layers, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in result["records"]:
            if (r["layer"], r["d_in"], r["d_out"]) == (name, d_in, d_out):
                series.setdefault(f"{r['backend']}/{r['method']}", []).append((r["T"], r["median_s"] * 1e3))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(title=f"{name} {d_in}→{d_out}", xlabel="T", ylabel="median ms", xscale="log", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(f"per-sample linear weight norms, {env['device']}, {env['dtype']}", fontsize=9)
    harness.atomic_save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--backends", default="torch,cpp,triton,cuda,opacus", help="comma list; 'opacus' is the peer")
    parser.add_argument("--methods", default="ghost,direct,auto")
    parser.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=None, help="default $VIGOR_BENCH_RESULTS/ops, else bench/results/ops"
    )
    args = parser.parse_args(argv)
    args.out = harness.results_dir(args.out, "ops")
    result = run(args)
    harness.write_results(args.out, "ops", result, table(result), lambda path: plot(result, path))
    print(table(result))


if __name__ == "__main__":
    main()
