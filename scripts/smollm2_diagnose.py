"""The signal diagnostic on a real model: SmolLM2-135M-Instruct on simple arithmetic questions.

    python scripts/smollm2_diagnose.py --groups 64 --out bench/results/smollm2-diagnose

For each question (``vigor.study.questions``: one- and two-digit additions and subtractions, in digits and in
words, generated offline) G completions are sampled with the model's chat template at temperature 1; an
answer is right when the last integer of the completion equals the answer. Each intrinsic score (VIGOR with
and without sqrt(T), self-certainty, mean token log-probability, random) is then judged by how well it
separates right from wrong completions inside each group: within-group AUROC with a bootstrap interval, over
the groups that hold both (``vigor.study.diagnose``). VIGOR's theta is every parameter of the model.
Writes ``diagnose.json`` (settings, report, every completion and score) and ``diagnose.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SYSTEM_PROMPT = "Reply with only the number."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from vigor.study.cli import add_diagnose_arguments, diagnose_arguments_error

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_diagnose_arguments(p, groups=64, max_new_tokens=40, groups_per_batch=4)
    p.add_argument("--out", type=Path, default=Path("bench/results/smollm2-diagnose"))
    args = p.parse_args(argv)
    if (problem := diagnose_arguments_error(args)) is not None:
        p.error(problem)
    return args


def breakdown(samples, questions) -> list[str]:
    """Accuracy by kind of question (digits x words), to show where the model is right sometimes."""
    lines = ["", "| questions | groups | accuracy | groups with both |", "|---|---|---|---|"]
    for digits in (1, 2):
        for words in (False, True):
            rows = [i for i, q in enumerate(questions) if q.digits == digits and q.words == words]
            if not rows:
                continue
            c = samples.correct[rows]
            mixed = int((c.any(1) & ~c.all(1)).sum())
            kind = f"{digits}-digit, {'words' if words else 'digits'}"
            lines.append(f"| {kind} | {len(rows)} | {c.mean():.3f} | {mixed} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vigor.atomic import write_json, write_text
    from vigor.pretrained import PretrainedError, load_smollm2
    from vigor.study.diagnose import DiagnosticItem, diagnostic_report, format_report, sample_and_score
    from vigor.study.questions import arithmetic_questions, last_integer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_smollm2("float32")
    except PretrainedError as e:
        print(f"smollm2_diagnose: error: {e}", file=sys.stderr)
        return 2
    questions = arithmetic_questions(args.groups, seed=args.seed)
    items = [DiagnosticItem(q.text, lambda text, a=q.answer: last_integer(text) == a) for q in questions]
    started, load = time.perf_counter(), os.getloadavg()
    samples = sample_and_score(
        model, tokenizer, items, args.group_size, args.temperature, max_new_tokens=args.max_new_tokens,
        chat_template=True, system_prompt=SYSTEM_PROMPT, groups_per_batch=args.groups_per_batch, seed=args.seed,
    )  # fmt: skip
    report = diagnostic_report(samples, seed=args.seed)
    wall = time.perf_counter() - started
    command = "python scripts/smollm2_diagnose.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join(
        [
            f"SmolLM2-135M-Instruct (real weights, de-quantized Q4_1, float32), chat template, system prompt "
            f"{SYSTEM_PROMPT!r}; temperature {args.temperature}, at most {args.max_new_tokens} new tokens "
            f"(truncated = invalid, ranked last by every score but random); right = the last integer of the "
            f"completion is the answer; VIGOR's theta = every parameter.",
            "",
            format_report(report),
            *breakdown(samples, questions),
            "",
            f"`{command}`: {wall / 60:.1f} min on {torch.get_num_threads()} CPU threads, load average at start "
            f"{load[0]:.1f} (a shared 2-core machine).",
        ]
    )
    print(text)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(system_prompt=SYSTEM_PROMPT, command=command, wall_s=wall, load_average_at_start=list(load))
    qs = [{"text": q.text, "answer": q.answer, "digits": q.digits, "words": q.words} for q in questions]
    write_json(
        args.out / "diagnose.json",
        {"settings": settings, "report": report, "questions": qs, "samples": samples.to_json()},
    )
    write_text(args.out / "diagnose.md", text + "\n")
    print(f"wrote {args.out}/diagnose.{{json,md}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
