"""The ``vigor`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_model(args: argparse.Namespace) -> torch.nn.Module:
    from vigor.testing import preset_config, random_model, tiny_config

    dtype = DTYPES[args.dtype]
    if args.model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    if args.preset:
        config = preset_config(args.preset, layers=args.layers, vocab=args.vocab)
    else:
        config = tiny_config(
            args.family, vocab=args.vocab or 1024, hidden=args.hidden, layers=args.layers or 4, heads=args.heads
        )
    return random_model(config, seed=args.seed, dtype=dtype, device=args.device, attn=args.attn)


def cmd_verify(args: argparse.Namespace) -> int:
    from vigor.batch import prepare_batch
    from vigor.testing import group_batch
    from vigor.verify import report, verify, write_json

    model = _load_model(args)
    vocab = model.get_input_embeddings().weight.shape[0]
    input_ids, attention, loss = group_batch(
        vocab,
        args.groups,
        args.group_size,
        prompt_lengths=(args.prompt_len // 2, args.prompt_len),
        completion_lengths=(1, args.completion_len),
        seed=args.seed,
        device=args.device,
    )
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"model: {args.model or args.family} ({n_params / 1e6:.2f}M trainable, {args.dtype}, {args.device}); "
        f"batch: {args.groups} groups x {args.group_size} completions, width {input_ids.shape[1]}"
    )
    result = verify(model, input_ids, attention, loss, backend=args.backend, repeats=args.repeats)
    print(report(result, prepare_batch(model, input_ids, attention, loss).token_counts.cpu()))
    if args.json:
        write_json(args.json, result, vars(args))
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from vigor.testing import FAMILIES, PRESETS

    parser = argparse.ArgumentParser(prog="vigor", description="VIGOR rewards from exact per-sample gradient norms")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="engine vs the per-completion autograd oracle on one batch, with timings")
    v.add_argument("--model", help="a local Hugging Face causal LM directory (default: a random tiny model)")
    v.add_argument("--family", choices=FAMILIES, default="qwen2", help="tiny model family when no --model")
    v.add_argument("--preset", choices=sorted(PRESETS), help="random model with a real checkpoint's layer shapes")
    v.add_argument("--vocab", type=int, default=None, help="vocabulary size (tiny default 1024; preset: its own)")
    v.add_argument("--hidden", type=int, default=128, help="tiny models only")
    v.add_argument("--layers", type=int, default=None, help="number of layers (tiny default 4; preset: its own)")
    v.add_argument("--heads", type=int, default=4, help="tiny models only")
    v.add_argument("--attn", default="eager", help="attention implementation (eager, sdpa)")
    v.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    v.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    v.add_argument("--backend", default=None, help="vigor_kernels backend (default: $VIGOR_BACKEND or auto)")
    v.add_argument("--groups", type=int, default=2)
    v.add_argument("--group-size", type=int, default=8)
    v.add_argument("--prompt-len", type=int, default=16)
    v.add_argument("--completion-len", type=int, default=64)
    v.add_argument("--repeats", type=int, default=3)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", type=Path, help="also write the result (norms, errors, every timing, environment) here")
    v.set_defaults(run=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
