"""Peak memory of scoring one GRPO group against completion length and vocabulary size, with and without
the fused LM head (vigor.fused_head): no ``[B, L, V]`` logits, their fp32 copy or their gradient.

    python bench/head_memory.py   # CPU: 0.5B shapes, 2 layers, group of 8; ~15 min on 2 cores

Methods, on the same model and batch (one run each: the peak memory is the point, times are indicative):

- ``ours``: the engine, ``vigor.per_sample_grad_norms`` (self-check off) with the fused head (``head="auto"``),
  all parameters' norms; ``ours-materialized``: the same through the model's logits (``head="materialized"``).
- ``fused``: backbone forward, fused head (NLL, dL/dh, the head's per-sample weight norms and tied-embedding
  rows), input-gradient backward to the embedding output: floor (b) with the fused head. The engine adds
  the other layers' norms to this, which take memory of the size of their activations, not of V.
- ``official``: the official loop, one forward + ``autograd.grad`` per completion.
- ``floor-a``: a training step (forward + backward with weight gradients) on the materialized logits.
- ``floor-b``: forward + input-gradient backward on the materialized logits.

Two sweeps: completion length ``T_max`` at the full vocabulary, and the vocabulary at one ``T_max``. A
materializing method whose logits would exceed ``--max-logits-gib`` is skipped (recorded as such).
Writes ``head_memory.json``, ``head_memory.md`` and ``head_memory.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vigor
from bench import harness
from bench.methods import Prepared, Workload, floors, official
from bench.presets import PRESETS, ModelSpec, build_model, grpo_batch
from vigor.fused_head import FusedHead, why_not_fused
from vigor.model_state import preserved

METHODS = {
    "ours": "vigor-kernels engine, fused head",
    "ours-materialized": "vigor-kernels engine, materialized logits",
    "fused": "fused head: forward + input-grad backward, head norms + tied rows",
    "official": "official loop (autograd.grad per completion)",
    "floor-a": "floor (a): forward + full backward",
    "floor-b": "floor (b): forward + input-grad backward",
}


def prepare_fused(work: Workload) -> Prepared:
    model, batch = work.model, work.batch
    head = FusedHead.detect(model)
    if head is None:
        raise RuntimeError(f"the fused head does not apply: {why_not_fused(model)}")
    leaf: list[torch.Tensor] = []

    def detach_embeddings(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        out = output.detach().requires_grad_(True)
        leaf.append(out)
        return out

    tied = model.get_input_embeddings().weight is head.weight
    tied_ids = head.embedding_ids(batch) if tied else None

    def run() -> torch.Tensor:
        leaf.clear()
        with preserved(model) as state, torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(False)
            state.handles.append(model.get_input_embeddings().register_forward_hook(detach_embeddings))
            losses, result = head.completion_nll(model, batch, want_weight=True, tied_ids=tied_ids)
            torch.autograd.grad(losses.sum(), leaf)
        leaf.clear()
        return result.sq_norms["weight"]

    return Prepared(run, notes=["parameters frozen; fused head with its per-sample norms"])


def prepare_ours(work: Workload, head: str = "auto") -> Prepared:
    model, raw = work.model, work.raw
    batch = (raw.input_ids, raw.attention_mask, raw.loss_mask)

    def run() -> torch.Tensor:
        return vigor.per_sample_grad_norms(model, *batch, self_check="off", head=head)

    return Prepared(run, notes=[f"per_sample_grad_norms(head={head!r}), default backend"])


PREPARE = {
    "ours": prepare_ours,
    "ours-materialized": partial(prepare_ours, head="materialized"),
    "fused": prepare_fused,
    "official": official.prepare,
    "floor-a": floors.prepare_train_step,
    "floor-b": floors.prepare_input_grad,
}


def logits_gib(name: str, batch: int, length: int, vocab: int) -> float:
    """fp32 logits, their copy and their gradient that a materializing method holds at once (estimate)."""
    rows = {"official": length, "floor-a": batch * length, "floor-b": batch * length}
    rows = rows.get(name, batch * length if name == "ours-materialized" else 0)
    return 3 * 4 * rows * vocab / 2**30


def measure_point(args: argparse.Namespace, vocab: int, t_max: int, bar: tqdm) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    spec = ModelSpec.of(preset, args.layers, min(vocab, preset.vocab))
    model = build_model(spec, dtype=dtype, device=device, seed=args.seed)
    raw = grpo_batch(
        spec.vocab, groups=1, group_size=args.group_size, prompt_len=args.prompt_len, t_max=t_max,
        seed=args.seed, device=device,
    )  # fmt: skip
    batch = vigor.prepare_batch(model, raw.input_ids, raw.attention_mask, raw.loss_mask)
    work = Workload(model, spec, batch, raw, device, dtype, "sdpa", args.seed, 0)
    out = {"vocab": spec.vocab, "t_max": t_max, "scored_tokens": int(batch.token_counts.sum()), "methods": {}}
    for name in args.methods:
        bar.set_postfix_str(f"V={spec.vocab} T_max={t_max} {name}")
        need = logits_gib(name, batch.size, batch.length, spec.vocab)
        if need > args.max_logits_gib:
            out["methods"][name] = {"skipped": f"its logits would take ~{need:.1f} GiB (> --max-logits-gib)"}
            bar.update(1)
            continue
        prepared = PREPARE[name](work)
        try:
            timing = harness.measure(prepared.run, device, repeats=1, warmup=0)
        finally:
            if prepared.cleanup is not None:
                prepared.cleanup()
        out["methods"][name] = {"peak_mib": timing.peak_extra_bytes / 2**20, "time_s": timing.median_s}
        bar.update(1)
    del model, work, batch
    harness.release_free_heap()
    return out


def table(result: dict) -> str:
    names = result["config"]["methods"]
    lines = [f"# Peak memory of one group of {result['config']['group_size']} ({result['config']['model']})", ""]
    headers = ["sweep", "V", "T_max", "N scored"] + [f"{n} MiB" for n in names] + [f"{n} s" for n in names]
    rows = []
    for sweep in ("length", "vocab"):
        for p in result["sweeps"][sweep]:
            m = p["methods"]
            rows.append(
                [sweep, p["vocab"], p["t_max"], p["scored_tokens"]]
                + [round(m[n]["peak_mib"]) if "peak_mib" in m[n] else "skipped" for n in names]
                + [round(m[n]["time_s"], 2) if "time_s" in m[n] else "" for n in names]
            )
    lines.append(harness.markdown_table(headers, rows))
    lines += ["", "Methods: " + "; ".join(f"`{n}` = {METHODS[n]}" for n in names), ""]
    lines.append(f"Command: `{result['command']}`; commit {result['environment'].get('commit')}.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, sweep, key, xlabel in (
        (axes[0], "length", "t_max", "maximal completion length T_max"),
        (axes[1], "vocab", "vocab", "vocabulary size V"),
    ):
        points = result["sweeps"][sweep]
        if not points:
            ax.set_axis_off()
            continue
        for name in result["config"]["methods"]:
            xs = [p[key] for p in points]
            ys = [p["methods"][name].get("peak_mib", float("nan")) for p in points]
            ax.plot(xs, ys, marker="o", label=METHODS[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak memory above the model (MiB)")
        ax.grid(alpha=0.3)
    fixed = result["config"]
    axes[0].set_title(f"V = {fixed['length_sweep_vocab']}")
    axes[1].set_title(f"T_max = {fixed['vocab_sweep_t_max']}")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{fixed['model']}, group of {fixed['group_size']}, {result['environment'].get('device')}")
    harness.atomic_save_figure(fig, path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",") if v]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--lengths", type=ints, default=[128, 256, 512, 1024, 2048], help="T_max sweep")
    parser.add_argument("--vocabs", type=ints, default=[4096, 16384, 65536, 151936], help="vocabulary sweep")
    parser.add_argument("--length-vocab", type=int, default=151936, help="vocabulary of the length sweep")
    parser.add_argument("--vocab-t-max", type=int, default=512, help="T_max of the vocabulary sweep")
    parser.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=list(METHODS))
    parser.add_argument(
        "--max-logits-gib", type=float, default=4.0, help="skip a materializing method whose logits need more"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/head-memory-<device>")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}: choose from {list(METHODS)}")
    if args.out is None:
        args.out = harness.ROOT / "bench" / "results" / f"head-memory-{torch.device(args.device).type}"
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    # the shared point first, then the vocabulary sweep, then the longer lengths: results are written after
    # every point, so an interrupted run still leaves the points it measured
    points = [("vocab", v, args.vocab_t_max) for v in args.vocabs]
    points += [("length", args.length_vocab, t) for t in args.lengths]
    points.sort(key=lambda p: (p[1] * p[2], p[0]))
    spec = ModelSpec.of(PRESETS[args.preset], args.layers, args.length_vocab)
    result = {
        "benchmark": "head_memory",
        "command": "python bench/head_memory.py " + " ".join(args.argv),
        "environment": harness.environment(torch.device(args.device), getattr(torch, args.dtype)),
        "config": {
            "model": spec.label(),
            "layers": args.layers,
            "group_size": args.group_size,
            "prompt_len": args.prompt_len,
            "length_sweep_vocab": args.length_vocab,
            "vocab_sweep_t_max": args.vocab_t_max,
            "methods": args.methods,
            "seed": args.seed,
            "repeats": 1,
        },
        "sweeps": {"length": [], "vocab": []},
    }
    done: dict[tuple[int, int], dict] = {}
    with tqdm(total=len(points) * len(args.methods), desc="head memory", file=sys.stderr) as bar:
        for sweep, vocab, t_max in points:
            if (vocab, t_max) not in done:
                done[vocab, t_max] = measure_point(args, vocab, t_max, bar)
            else:
                bar.update(len(args.methods))
            result["sweeps"][sweep].append(done[vocab, t_max])
            result["sweeps"][sweep].sort(key=lambda p: (p["vocab"], p["t_max"]))
            result["wall_s"] = time.perf_counter() - started
            write(result, args.out)
    print(table(result))
    return result


def write(result: dict, out: Path) -> None:
    harness.write_results(out, "head_memory", result, table(result), partial(plot, result))


if __name__ == "__main__":
    main()
