"""``vigor study``: the signal diagnostic, the reward study's runs and its report (arguments and dispatch)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_diagnose_arguments(
    parser: argparse.ArgumentParser, *, groups: int, max_new_tokens: int, groups_per_batch: int
) -> None:
    """The sampling options of a signal diagnostic (``vigor study diagnose`` and scripts/smollm2_diagnose.py)."""
    parser.add_argument("--groups", type=int, default=groups, help="prompts, one group of completions each")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--groups-per-batch", type=int, default=groups_per_batch)
    parser.add_argument("--seed", type=int, default=0, help="prompt and sampling seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def diagnose_arguments_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the diagnostic's sampling options, or None."""
    if args.groups < 1 or args.group_size < 2 or args.temperature <= 0 or args.max_new_tokens < 1:
        return "need --groups >= 1, --group-size >= 2, --temperature > 0, --max-new-tokens >= 1"
    if args.groups_per_batch < 1:
        return "need --groups-per-batch >= 1"
    return None


def add_study_parser(sub: Any, run: Callable[[argparse.Namespace], int]) -> None:
    p = sub.add_parser(
        "study",
        help="the small reward study: signal diagnostic, GRPO arms from a warm start, report",
        description="Does VIGOR train a policy? See the README's 'Does it work?' and configs/study/.",
    )
    ss = p.add_subparsers(dest="study_command", required=True)
    d = ss.add_parser("diagnose", help="within-group AUROC of each intrinsic score for right vs wrong completions")
    d.add_argument("--model", required=True, help="a local model directory made by `vigor sft` (task read from it)")
    add_diagnose_arguments(d, groups=128, max_new_tokens=16, groups_per_batch=16)
    d.add_argument("--out", type=Path, help="write diagnose.json (report + every completion) and diagnose.md here")
    r = ss.add_parser("run", help="every (arm, seed) GRPO run of a study config not yet done, then the report")
    r.add_argument("--config", required=True, help="a study config (configs/study/addition.yaml)")
    r.add_argument("--arms", help="comma-separated subset of the arms (default: all)")
    r.add_argument("--seeds", help="comma-separated subset of the seeds (default: all)")
    t = ss.add_parser("report", help="rebuild summary.{json,md} and study.png from a study's runs/*.jsonl")
    t.add_argument("--out", required=True, type=Path, help="the study's results directory")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"vigor: error: {message}", file=sys.stderr)
    return 2


def _diagnose(args: argparse.Namespace) -> int:
    from vigor.study.diagnose import DiagnosticItem, diagnostic_report, format_report, sample_and_score
    from vigor.trainer.config import ConfigError
    from vigor.trainer.sft import load_sft_config
    from vigor.trainer.tasks import final_answer, task_splits

    model_dir = Path(args.model)
    spec = model_dir / "sft_config.yaml"
    if not spec.is_file():
        return _fail(f"--model {args.model!r} has no sft_config.yaml: give a directory written by `vigor sft`")
    if (problem := diagnose_arguments_error(args)) is not None:
        return _fail(problem)
    try:
        sft_cfg = load_sft_config(spec)
    except ConfigError as e:
        return _fail(str(e))
    data, sft_seed = sft_cfg.data, sft_cfg.run.seed
    if data.task != "addition":
        return _fail(f"the diagnostic's CLI knows the addition task only; {spec} has task {data.task!r}")
    import torch
    from transformers import AutoModelForCausalLM

    from vigor.trainer.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    _, test = task_splits("addition", sft_seed, 0, data.num_test)
    rows = test[: args.groups]
    if len(rows) < args.groups:
        return _fail(f"--groups {args.groups}: the held-out split has only {len(test)} problems")
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    template = data.prompt_template
    items = [
        DiagnosticItem(template.format(**row), lambda text, a=row["answer"]: final_answer(text) == a) for row in rows
    ]
    samples = sample_and_score(
        model, tokenizer, items, args.group_size, args.temperature, max_new_tokens=args.max_new_tokens,
        groups_per_batch=args.groups_per_batch, seed=args.seed,
    )  # fmt: skip
    report = diagnostic_report(samples, seed=args.seed)
    text = format_report(report)
    print(text)
    if args.out:
        from vigor.atomic import write_json, write_text

        command = "vigor study diagnose " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "vigor study diagnose"
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"}
        write_json(args.out / "diagnose.json", {"settings": settings, "report": report, "samples": samples.to_json()})
        write_text(args.out / "diagnose.md", f"`{command}`\n\n{text}\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    from vigor.study.report import write_report
    from vigor.study.run import load_study_config, run_study
    from vigor.trainer import CheckpointError, ConfigError, DataError

    try:
        study = load_study_config(args.config)
        arms = args.arms.split(",") if args.arms else None
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        run_study(study, arms=arms, seeds=seeds)
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        return _fail(str(e))
    summary = write_report(study.out_dir)
    print(
        f"done: {study.out_dir}/summary.md, study.png ({sum(len(a['seeds']) for a in summary['arms'].values())} runs)"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from vigor.study.report import markdown_table, write_report

    try:
        summary = write_report(args.out)
    except (ValueError, OSError) as e:
        return _fail(str(e))
    print(markdown_table(summary))
    return 0


def run_study_command(args: argparse.Namespace) -> int:
    return {"diagnose": _diagnose, "run": _run, "report": _report}[args.study_command](args)
