"""Compile every kernel of the triton backend, in every tuning config, for a GPU target without a GPU.

    python bench/gpu/triton_compile_check.py                   # sm_90, prints a table
    python bench/gpu/triton_compile_check.py --out results/triton-compile-sm90
    python bench/gpu/triton_compile_check.py --quick               # first config of each kernel (CI smoke)

Catches what the interpreter cannot: a kernel that does not lower for the GPU, a config that does not
fit in shared memory, registers spilled to local memory, ``tl.dot`` that did not become tensor-core
instructions (wgmma on sm_90), loops the pipeliner left synchronous. Arguments get the specialization
a real launch at Qwen2.5 layer shapes gets (16-byte aligned pointers, strides and widths divisible by
16, unit feature stride). Must run WITHOUT ``TRITON_INTERPRET`` (the script refuses otherwise).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels it compiles)")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vigor_kernels.triton_backend import _reduce, embedding, linear_direct, linear_ghost, reductions

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class Case:
    kernel: str
    fn: object
    types: dict[str, str]  # argument -> triton type ("*bf16", "i32", ...)
    constexprs: dict[str, object]
    divisible: tuple[str, ...]  # arguments a real launch sees as multiples of 16 (or 16-byte aligned)
    num_warps: int
    num_stages: int
    expect_tensor_cores: bool


def _args(fn, pointers: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        else:
            types[name] = pointers.get(name, "i32")
    return types


def cases(dtypes: list[str], quick: bool) -> list[Case]:
    out = []
    ghost = linear_ghost._ghost_pair_kernel
    direct = linear_direct._direct_tile_kernel
    for dtype in dtypes:
        t = TORCH_TO_TRITON[dtype]
        wide = dtype != "float32"
        # ghost: the launcher's BLOCK_T choices for this dtype, crossed with every tuning config
        for (block_t, fp32), configs in linear_ghost.CONFIGS.items():
            if fp32 == wide:
                continue
            for cfg in configs[:1] if quick else configs:
                const = dict(stride_xd=1, stride_gd=1, BLOCK_T=block_t, EVEN_K=True, UPCAST=False, **cfg.kwargs)
                ptrs = {"x_ptr": f"*{t}", "g_ptr": f"*{t}", "bounds_ptr": "*i64", "partial_ptr": "*fp32"}
                div = ("x_ptr", "g_ptr", "bounds_ptr", "partial_ptr", "d_in", "d_out")
                div += ("stride_xb", "stride_xt", "stride_gb", "stride_gt")
                out.append(
                    Case(
                        f"ghost {dtype} T{block_t}",
                        ghost,
                        _args(ghost, ptrs, const),
                        const,
                        div,
                        cfg.num_warps,
                        cfg.num_stages,
                        wide,
                    )
                )
        block_o, block_i = (128, 128) if wide else (64, 64)
        for split in (False, True):
            configs = linear_direct.CONFIGS[not wide]
            for cfg in configs[:1] if quick else configs:
                const = dict(stride_xd=1, stride_gd=1, BLOCK_O=block_o, BLOCK_I=block_i, SPLIT=split, UPCAST=False)
                const.update(cfg.kwargs)
                ptrs = {"x_ptr": f"*{t}", "g_ptr": f"*{t}", "bounds_ptr": "*i64", "out_ptr": "*fp32"}
                div = ("x_ptr", "g_ptr", "bounds_ptr", "out_ptr", "d_in", "d_out")
                div += ("stride_xb", "stride_xt", "stride_gb", "stride_gt")
                out.append(
                    Case(
                        f"direct {dtype} split={split}",
                        direct,
                        _args(direct, ptrs, const),
                        const,
                        div,
                        cfg.num_warps,
                        cfg.num_stages,
                        wide,
                    )
                )
        rows = reductions._row_sum_sq_kernel
        for op, has_xhat in (("bias", False), ("norm_weight", True)):
            const = dict(stride_gd=1, stride_xd=1, HAS_XHAT=has_xhat, BLOCK_T=32, BLOCK_D=128)
            ptrs = {"g_ptr": f"*{t}", "xhat_ptr": f"*{t}", "bounds_ptr": "*i64", "partial_ptr": "*fp32"}
            div = ("g_ptr", "xhat_ptr", "bounds_ptr", "partial_ptr", "width", "stride_gb", "stride_gt")
            out.append(Case(f"{op} {dtype}", rows, _args(rows, ptrs, const), const, div, 4, 3, False))
        seg = embedding._segment_sq_kernel
        const = dict(stride_gd=1, BLOCK_R=8, BLOCK_D=128)
        ptrs = {"g_ptr": f"*{t}", "keys_ptr": "*i64", "order_ptr": "*i64", "seg_end_ptr": "*i64"}
        ptrs.update(partial_ptr="*fp32", dead_key="i64")
        div = ("g_ptr", "keys_ptr", "order_ptr", "seg_end_ptr", "partial_ptr", "width", "stride_gb", "stride_gt")
        out.append(Case(f"embedding {dtype}", seg, _args(seg, ptrs, const), const, div, 4, 3, False))
        tied = embedding._tied_rows_kernel
        const = dict(
            stride_it=1, stride_hd=1, stride_gv=1, stride_od=1, BLOCK_T=64, BLOCK_S=64, BLOCK_D=128 if wide else 64
        )
        const["UPCAST"] = False
        ptrs = {"ids_ptr": "*i64", "h_ptr": f"*{t}", "gh_ptr": f"*{t}", "bounds_ptr": "*i64", "out_ptr": "*fp32"}
        div = ("ids_ptr", "h_ptr", "gh_ptr", "bounds_ptr", "out_ptr", "width", "stride_hb", "stride_ht")
        div += ("stride_ob", "stride_ot")
        out.append(Case(f"tied_head_rows {dtype}", tied, _args(tied, ptrs, const), const, div, 4, 2, wide))
    combine = linear_direct._combine_kernel
    const = dict(BLOCK_O=128, BLOCK_I=128)
    ptrs = {"blocks_ptr": "*fp32", "partial_ptr": "*fp32"}
    out.append(Case("direct combine", combine, _args(combine, ptrs, const), const, tuple(ptrs), 4, 3, False))
    seg_sum = _reduce._segment_sum_kernel
    for op, has_offsets in (("row sums", False), ("segment sums", True)):
        const = dict(HAS_OFFSETS=has_offsets, BLOCK=_reduce._BLOCK)
        ptrs = {"values_ptr": "*fp32", "offsets_ptr": "*i64", "out_ptr": "*fp32"}
        out.append(Case(op, seg_sum, _args(seg_sum, ptrs, const), const, tuple(ptrs), 4, 3, False))
    return out


def _ptxas() -> list[str]:
    """ptxas binaries to try, newest first (the PTX version Triton emits may be newer than CUDA's)."""
    here = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found = [str(p) for p in (here / "ptxas-blackwell", here / "ptxas") if p.exists()]
    return [*found, "/usr/local/cuda/bin/ptxas"]


def resources(ptx: str, arch: str) -> dict[str, int | None]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for ptxas in _ptxas():
            try:
                run = subprocess.run(
                    [ptxas, f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
            except OSError:
                continue
            if run.returncode == 0:
                regs = re.search(r"Used (\d+) registers", run.stderr)
                spill = re.search(r"(\d+) bytes spill stores", run.stderr)
                return {
                    "registers": int(regs.group(1)) if regs else None,
                    "spill_bytes": int(spill.group(1)) if spill else 0,
                }
    return {"registers": None, "spill_bytes": None}


def check(case: Case, capability: int) -> dict:
    attrs = {(case.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in case.divisible}
    src = ASTSource(case.fn, case.types, case.constexprs, attrs)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    row = {
        "kernel": case.kernel,
        "config": {k: v for k, v in case.constexprs.items() if k.startswith("BLOCK")},
        "num_warps": case.num_warps,
        "num_stages": case.num_stages,
        "shared_bytes": compiled.metadata.shared,
        "tensor_cores": ("wgmma" in ptx) if capability >= 90 else ("mma.sync" in ptx),
        "pipelined": "async_copy" in ttgir or "async_tma" in ttgir,
        **resources(ptx, arch),
    }
    problems = []
    if row["shared_bytes"] > SHARED_LIMIT.get(capability, 99 * 1024):
        problems.append("shared memory over the limit")
    if case.expect_tensor_cores and not row["tensor_cores"]:
        problems.append("tl.dot did not use tensor cores")
    if row["spill_bytes"]:
        problems.append(f"{row['spill_bytes']} bytes spilled")
    row["problems"] = problems
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--quick", action="store_true", help="only the first tuning config of each kernel")
    parser.add_argument("--out", type=Path, default=None, help="write compile.json and compile.md here")
    args = parser.parse_args(argv)
    rows = []
    for case in cases(args.dtypes.split(","), args.quick):
        try:
            rows.append(check(case, args.capability))
        except Exception as exc:  # a config that does not compile is a finding, not a crash
            failure = f"{type(exc).__name__}: {exc}"[:400]
            rows.append({"kernel": case.kernel, "config": case.constexprs, "problems": [failure]})
            rows[-1].update(num_warps=case.num_warps, num_stages=case.num_stages)
        r = rows[-1]
        print(
            f"{r['kernel']:28s} {r['config']!s:44s} w{r['num_warps']} s{r['num_stages']} "
            f"smem={r.get('shared_bytes')} regs={r.get('registers')} spill={r.get('spill_bytes')} "
            f"tc={r.get('tensor_cores')} pipelined={r.get('pipelined')} {'; '.join(r['problems'])}",
            flush=True,
        )
    if args.out:
        from bench import harness

        result = {
            "benchmark": "triton_compile_check",
            "capability": args.capability,
            "triton_version": triton.__version__,
            "commit": harness.git_commit(),
            "rows": rows,
        }
        headers = [
            "kernel",
            "blocks",
            "warps",
            "stages",
            "smem KiB",
            "regs",
            "spill B",
            "tensor cores",
            "pipelined",
            "problems",
        ]
        table = [
            [
                r["kernel"],
                r["config"],
                r["num_warps"],
                r["num_stages"],
                (r.get("shared_bytes") or 0) / 1024,
                r.get("registers"),
                r.get("spill_bytes"),
                r.get("tensor_cores"),
                r.get("pipelined"),
                "; ".join(r["problems"]) or "-",
            ]
            for r in rows
        ]
        head = f"Triton {triton.__version__} kernels compiled for sm_{args.capability} without a GPU "
        head += f"(commit {result['commit'][:12]}).\n\n"
        harness.write_results(args.out, "compile", result, head + harness.markdown_table(headers, table))
    failed = [r for r in rows if any("Error" in p or "over the limit" in p for p in r["problems"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
