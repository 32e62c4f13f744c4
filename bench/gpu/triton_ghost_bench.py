"""The triton ghost kernel against its peers at Qwen2.5-7B layer shapes: time, Gram-product TFLOP/s, memory.

    python bench/gpu/triton_ghost_bench.py --out results/triton-ghost

For 16 sequences of T in {512, 1024, 2048, 4096} tokens (bf16) and each 7B linear layer, times (do_bench
medians, L2 flushed between runs) the ghost norm of the ``triton`` backend, of the ``torch`` backend,
and Opacus' linear norm sampler (``compute_linear_norm_sample``, when opacus is importable), and the
peak memory each allocates beyond its inputs. The triton kernel's rate counts the multiply-adds its
tile pairs execute (``2 * pairs * BLOCK_T^2 * (d_in + d_out)``), against the bf16 dense tensor-core
peak of the data sheet and against a large cuBLAS bf16 matrix product measured on the same GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import vigor_kernels as vk
from bench import harness

# Dense bf16 tensor-core peaks from the data sheets, TFLOP/s (no sparsity).
DATASHEET_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5, "H200": 989.4}
LAYER_SETS = {
    "qwen2.5-7b": {"q_o": (3584, 3584), "k_v": (3584, 512), "up": (3584, 18944), "down": (18944, 3584)},
    "tiny": {"tiny": (8, 24)},  # a seconds-long run on the CPU under TRITON_INTERPRET=1 (tests)
}


def datasheet_peak(name: str) -> float | None:
    for key, peak in DATASHEET_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def cublas_tflops(dtype: torch.dtype, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    return 2 * 8192**3 / harness.kernel_median_ms(lambda: a @ b, device) / 1e9


def extra_bytes(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def opacus_fn():
    try:
        import opacus  # noqa: F401

        from bench.op_bench import opacus_linear_sq_norms
    except ImportError:
        return None
    return opacus_linear_sq_norms


def run(args: argparse.Namespace) -> dict:
    from vigor_kernels.triton_backend import linear_ghost

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = harness.device_name(device)
    ceiling = cublas_tflops(dtype, device)
    opacus = opacus_fn()
    records = []
    for layer, (d_in, d_out) in LAYER_SETS[args.layers].items():
        for length in args.lengths:
            gen = torch.Generator(device=device).manual_seed(length)
            x = torch.randn(args.batch, length, d_in, device=device, generator=gen).to(dtype)
            g = torch.randn(args.batch, length, d_out, device=device, generator=gen).to(dtype)
            lengths = [length] * args.batch
            peers = {
                "triton": lambda x=x, g=g: vk.linear_weight_sq_norms(x, g, method="ghost", backend="triton"),
                "torch": lambda x=x, g=g: vk.linear_weight_sq_norms(x, g, method="ghost", backend="torch"),
            }
            if opacus is not None:
                peers["opacus"] = lambda x=x, g=g: opacus(x, g)
            rec = dict(layer=layer, d_in=d_in, d_out=d_out, T=length, batch=args.batch)
            reference = None
            for peer, fn in peers.items():
                try:
                    value = fn()  # compiles and autotunes the triton kernel
                    rec[f"{peer}_ms"] = harness.kernel_median_ms(fn, device)
                    rec[f"{peer}_extra_bytes"] = extra_bytes(fn, device)
                except torch.OutOfMemoryError as exc:
                    rec[f"{peer}_ms"] = None
                    rec[f"{peer}_error"] = str(exc)[:200]
                    torch.cuda.empty_cache()
                    continue
                reference = value.double() if reference is None else reference
                rec[f"{peer}_max_rel_diff_vs_triton"] = float(((value.double() - reference) / reference).abs().max())
            block_t = linear_ghost.choose_block_t(lengths, dtype, device)
            executed = 2.0 * linear_ghost.pair_count(lengths, block_t) * block_t**2 * (d_in + d_out)
            rec.update(block_t=block_t, executed_gram_flops=executed)
            rec["triton_tflops"] = executed / rec["triton_ms"] / 1e9
            for peer in ("torch", "opacus"):
                if rec.get(f"{peer}_ms"):
                    rec[f"speedup_vs_{peer}"] = rec[f"{peer}_ms"] / rec["triton_ms"]
            records.append(rec)
            print({k: v for k, v in rec.items() if not k.endswith("_bytes")}, flush=True)
            del x, g
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {
        "benchmark": "triton_ghost_bench",
        "environment": harness.environment(device, dtype),
        "datasheet_bf16_tflops": datasheet_peak(name),
        "cublas_bf16_tflops_8192": ceiling,
        "opacus": opacus is not None,
        "records": records,
    }


def mib(n: int | None) -> float | str:
    return "-" if n is None else n / 2**20


def table(result: dict) -> str:
    env = result["environment"]
    peak, ceiling = result["datasheet_bf16_tflops"], result["cublas_bf16_tflops_8192"]
    head = (
        f"Ghost norm at Qwen2.5-7B layer shapes on {env['device']}, {env['dtype']}, torch {env['torch_version']}, "
        f"triton {env['triton_version']}, commit {env['commit'][:12]}; do_bench medians, L2 flushed.\n"
        f"bf16 dense peak (data sheet): {peak} TFLOP/s; cuBLAS 8192^3 bf16 measured here: {ceiling} TFLOP/s.\n"
        + ("" if result["opacus"] else "Opacus was not importable: its columns are empty.\n")
        + "\n"
    )
    headers = [
        "layer",
        "T",
        "triton ms",
        "torch ms",
        "opacus ms",
        "x torch",
        "x opacus",
        "Gram TFLOP/s",
        "% data-sheet peak",
        "% cuBLAS",
        "triton extra MiB",
        "torch extra MiB",
        "opacus extra MiB",
    ]
    rows = []
    for r in result["records"]:
        rate = r["triton_tflops"]
        rows.append(
            [
                r["layer"],
                r["T"],
                r["triton_ms"],
                r.get("torch_ms") or "-",
                r.get("opacus_ms") or "-",
                r.get("speedup_vs_torch", "-"),
                r.get("speedup_vs_opacus", "-"),
                rate,
                100 * rate / peak if peak else "-",
                100 * rate / ceiling if ceiling else "-",
                mib(r.get("triton_extra_bytes")),
                mib(r.get("torch_extra_bytes")),
                mib(r.get("opacus_extra_bytes")),
            ]
        )
    return head + harness.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument(
        "--out", type=Path, default=None, help="default $VIGOR_BENCH_RESULTS/triton-ghost, else bench/results/"
    )
    parser.add_argument("--layers", choices=sorted(LAYER_SETS), default="qwen2.5-7b")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("triton_ghost_bench: needs a CUDA GPU")
    result = run(args)
    harness.write_results(harness.results_dir(args.out, "triton-ghost"), "ghost", result, table(result))
    print(table(result))


if __name__ == "__main__":
    main()
