"""End to end with the triton backend: per-sample gradient norms of a Qwen2.5-1.5B-shaped random model
against the autograd oracle (one ``autograd.grad`` per completion).

    python bench/triton_engine_check.py --out bench/results/triton-engine-h100

The slot for the engine check of scripts/gpu/triton_suite.sh. It needs the engine's API
(``vigor.per_sample_grad_norms`` and ``vigor.oracle_grad_norms``); until the engine is merged it says
so and exits 0 without writing anything. Random weights from the config (no hub access).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def batch(group: int, prompt: int, completion: int, vocab: int, device: torch.device):
    """A GRPO-like group: one shared prompt, completions of different lengths, right padding."""
    gen = torch.Generator().manual_seed(0)
    length = prompt + completion
    input_ids = torch.randint(0, vocab, (group, length), generator=gen)
    attention_mask = torch.zeros(group, length, dtype=torch.long)
    loss_mask = torch.zeros(group, length, dtype=torch.long)
    input_ids[:, :prompt] = input_ids[0, :prompt]
    for b in range(group):
        n = completion - (b * completion) // (2 * group)  # ragged completions
        attention_mask[b, : prompt + n] = 1
        loss_mask[b, prompt : prompt + n] = 1
    return input_ids.to(device), attention_mask.to(device), loss_mask.to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--completion", type=int, default=384)
    parser.add_argument("--layers", type=int, default=QWEN2_5_1_5B["num_hidden_layers"])
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/triton-engine"))
    args = parser.parse_args(argv)
    import vigor

    if not (hasattr(vigor, "per_sample_grad_norms") and hasattr(vigor, "oracle_grad_norms")):
        print("triton_engine_check: SKIPPED, the engine (vigor.per_sample_grad_norms) is not merged yet")
        return 0
    if not torch.cuda.is_available():
        sys.exit("triton_engine_check: needs a CUDA GPU")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = Qwen2Config(**{**QWEN2_5_1_5B, "num_hidden_layers": args.layers})
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    inputs = batch(args.group, args.prompt, args.completion, config.vocab_size, device)
    timings = {}
    norms = {}
    for name, fn in (
        ("triton", lambda: vigor.per_sample_grad_norms(model, *inputs, backend="triton")),
        ("torch", lambda: vigor.per_sample_grad_norms(model, *inputs, backend="torch")),
        ("oracle", lambda: vigor.oracle_grad_norms(model, *inputs)),
    ):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        norms[name] = torch.as_tensor(fn()).double().cpu()
        torch.cuda.synchronize()
        timings[name] = time.perf_counter() - start
    rel = {name: float(((norms[name] - norms["oracle"]) / norms["oracle"]).abs().max()) for name in ("triton", "torch")}
    ok = rel["triton"] <= args.rtol
    result = {
        "benchmark": "triton_engine_check",
        "environment": harness.environment(device, dtype),
        "config": {**QWEN2_5_1_5B, "num_hidden_layers": args.layers},
        "group": args.group,
        "prompt": args.prompt,
        "completion": args.completion,
        "norms": {k: v.tolist() for k, v in norms.items()},
        "seconds": timings,
        "max_rel_diff_vs_oracle": rel,
        "rtol": args.rtol,
        "passed": ok,
    }
    harness.atomic_write_json(args.out / "engine.json", result)
    env = result["environment"]
    lines = [
        f"Engine end to end, Qwen2.5-1.5B-shaped random model ({args.layers} layers), {args.dtype}, "
        f"group {args.group}, {env['device']}, commit {env['commit'][:12]}.\n"
    ]
    rows = [[k, timings[k], rel.get(k, 0.0)] for k in ("triton", "torch", "oracle")]
    lines.append(harness.markdown_table(["path", "seconds", "max rel diff vs oracle"], rows))
    lines.append(f"\n{'PASSED' if ok else 'FAILED'}: triton within rtol {args.rtol} of the oracle.\n")
    harness.atomic_write_text(args.out / "engine.md", "\n".join(lines))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
