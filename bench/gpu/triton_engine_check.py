"""End to end with the triton backend: per-sample gradient norms of a Qwen2.5-1.5B-shaped random model
against the autograd oracle (one ``autograd.grad`` per completion), and against the torch backend.

    VIGOR_BACKEND=triton python bench/gpu/triton_engine_check.py --out results/triton-engine
    TRITON_INTERPRET=1 python bench/gpu/triton_engine_check.py --model tiny --device cpu --out /tmp/x   # smoke

Random weights from the config (no hub access), one GRPO-shaped group (shared prompt, ragged
completions). Writes ``engine.json`` and ``engine.md``; exits 1 if the triton engine misses the oracle
by more than ``--rtol`` (fp32: 1e-3 over 28 layers; bf16: 2e-2, batched and single-row bf16 GEMMs
round differently).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench import harness

QWEN2_5_1_5B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151_936,
    max_position_embeddings=32_768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def build_model(name: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from vigor.tiny import tiny_config

    config = Qwen2Config(**QWEN2_5_1_5B) if name == "qwen2.5-1.5b" else tiny_config("qwen2")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    """The result of a first (warm-up) run, kernels compiled and tuned there, and one timed run."""
    out = fn()
    return torch.as_tensor(out).double().cpu(), harness.measure(fn, device, repeats=1, warmup=0).median_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["qwen2.5-1.5b", "tiny"], default="qwen2.5-1.5b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="longest prompt")
    parser.add_argument("--completion", type=int, default=512, help="longest completion")
    parser.add_argument("--rtol", type=float, default=None, help="default: 1e-3 for float32, 2e-2 for bfloat16")
    parser.add_argument(
        "--out", type=Path, default=None, help="default $VIGOR_BENCH_RESULTS/triton-engine, else bench/results/"
    )
    args = parser.parse_args(argv)
    import vigor
    from vigor.tiny import group_batch

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("triton_engine_check: needs a CUDA GPU (or --device cpu under TRITON_INTERPRET=1)")
    rtol = args.rtol if args.rtol is not None else (1e-3 if dtype == torch.float32 else 2e-2)
    model = build_model(args.model, dtype, device)
    inputs = group_batch(
        model.config.vocab_size,
        groups=1,
        group_size=args.group_size,
        prompt_lengths=(max(1, args.prompt // 2), args.prompt),
        completion_lengths=(1, args.completion),
        seed=0,
        empty_completion=True,
        device=device,
    )
    runs = {
        "triton": lambda: vigor.per_sample_grad_norms(model, *inputs, backend="triton"),
        "torch": lambda: vigor.per_sample_grad_norms(model, *inputs, backend="torch"),
        "oracle": lambda: vigor.oracle_grad_norms(model, *inputs),
    }
    norms, seconds = {}, {}
    for name, fn in runs.items():
        norms[name], seconds[name] = timed(fn, device)
    valid = inputs[2].sum(1).cpu() > 0
    rel = {
        name: float(((norms[name] - norms["oracle"]).abs() / norms["oracle"].clamp_min(1e-30))[valid].max())
        for name in ("triton", "torch")
    }
    empty_is_zero = bool((norms["triton"][~valid] == 0).all())
    passed = rel["triton"] <= rtol and empty_is_zero
    env = harness.environment(device, dtype)
    result = {
        "benchmark": "triton_engine_check",
        "environment": env,
        "model": args.model,
        "config": model.config.to_dict(),
        "group_size": args.group_size,
        "completion_tokens": inputs[2].sum(1).tolist(),
        "norms": {k: v.tolist() for k, v in norms.items()},
        "seconds": seconds,
        "max_rel_diff_vs_oracle": rel,
        "rtol": rtol,
        "empty_completion_scored_zero": empty_is_zero,
        "passed": passed,
    }
    head = (
        f"Engine end to end, {args.model} random model, {args.dtype}, one group of {args.group_size} "
        f"(completion tokens {result['completion_tokens']}), {env['device']}, commit {env['commit'][:12]}.\n\n"
    )
    rows = [[k, seconds[k], rel.get(k, 0.0)] for k in runs]
    verdict = f"\n{'PASSED' if passed else 'FAILED'}: triton within rtol {rtol} of the oracle"
    verdict += ", the empty completion scored 0.\n" if empty_is_zero else "; the empty completion was NOT scored 0.\n"
    text = head + harness.markdown_table(["path", "seconds", "max rel diff vs oracle"], rows) + verdict
    harness.write_results(harness.results_dir(args.out, "triton-engine"), "engine", result, text)
    print(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
