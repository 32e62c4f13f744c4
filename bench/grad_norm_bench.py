"""Per-sample gradient norms of a whole GRPO group: vigor-kernels against what a user would otherwise run.

    python bench/grad_norm_bench.py          # CPU default: 0.5B-shaped, 2 layers, group 8, T_max 128, ~2 min
    bash scripts/gpu/bench_sweep.sh          # the GPU sweep (1.5B-shaped, group 16, T_max 1024, bf16, ...)

Every method runs on the same model and the same batch, in one process:

- ``official``: the official VIGOR loop, one forward + ``autograd.grad`` per completion (HF ``labels``).
- ``ours-<backend>``: ``vigor.per_sample_grad_norms`` on each vigor_kernels backend asked for;
  ``ours-<backend>-materialized``: the same with ``head="materialized"`` (the LM head through the model's
  ``[B, L, V]`` logits instead of the fused head), for comparison.
- ``torch-func``: ``vmap(grad)`` per-sample gradients (chunked or skipped by the memory limit).
- ``opacus`` / ``opacus-untied``: Opacus ghost clipping; a tied model is refused by Opacus (its error is
  recorded) and the untied twin of the preset is timed instead.
- ``backpack``: BackPACK ``BatchL2Grad`` (reports which parameters it covers).
- floors: ``floor-train-step`` (forward + backward with weight gradients) and ``floor-input-grad``
  (forward + input-gradient-only backward).

Every method's norms are checked against the official loop's (max relative error), so a fast but wrong
method shows. By default the timed runs are interleaved (one run of every method per round), so that a
shared machine whose load changes during the run weighs on all methods alike. Writes ``grad_norms.json``
(environment, configuration, every repeat's time, medians, peak memory, errors), ``grad_norms.md`` and
``grad_norms.png`` (without matplotlib: skipped, with a note) into ``--out`` (default
``$VIGOR_BENCH_RESULTS/<device type>``, else ``bench/results/<device type>``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import vigor
import vigor_kernels as vk
from bench import harness
from bench.methods import Prepared, Refused, Workload, backpack_l2, floors, official, opacus_ghost, ours, torch_func
from bench.presets import LENGTH_DISTS, PRESETS, ModelSpec, build_model, grpo_batch

OFFICIAL, FLOOR_A, FLOOR_B = "official", "floor-train-step", "floor-input-grad"
LABELS = {
    OFFICIAL: "official loop (autograd.grad per completion)",
    FLOOR_A: "floor (a): forward + full backward",
    FLOOR_B: "floor (b): forward + input-grad backward",
    "torch-func": "torch.func vmap(grad)",
    "opacus": "Opacus ghost clipping",
    "opacus-untied": "Opacus ghost clipping, untied twin",
    "backpack": "BackPACK BatchL2Grad",
}
METHOD_GROUPS = {"floors": [FLOOR_A, FLOOR_B], "opacus": ["opacus", "opacus-untied"]}
DEFAULT_METHODS = "official,floors,ours,torch-func,opacus,backpack"
# The goal (recorded, never asserted): a group of 16, T = 1024, Qwen2.5-1.5B-shaped, on an H100.
GOAL = {"preset": "qwen2.5-1.5b", "group": 16, "t_max": 1024, "min_speedup": 20.0}


MATERIALIZED = "-materialized"


def ours_variant(name: str) -> tuple[str, str]:
    """``ours-<backend>[-materialized]`` -> ``(backend, head mode)``."""
    backend = name.removeprefix("ours-")
    if backend.endswith(MATERIALIZED):
        return backend.removesuffix(MATERIALIZED), "materialized"
    return backend, "auto"


def label(name: str) -> str:
    if name.startswith("ours-"):
        backend, head = ours_variant(name)
        return f"vigor-kernels ({backend} backend{', materialized head' if head == 'materialized' else ''})"
    return LABELS[name]


def expand_methods(methods: str, backends: list[str]) -> list[str]:
    names: list[str] = []
    for item in (m.strip() for m in methods.split(",") if m.strip()):
        if item == "ours":
            names += [f"ours-{b}" for b in backends]
        elif item in METHOD_GROUPS:
            names += METHOD_GROUPS[item]
        elif item in LABELS or item.startswith("ours-"):
            names.append(item)
        else:
            raise SystemExit(f"unknown method '{item}': choose from ours, floors, {', '.join(LABELS)}")
    if OFFICIAL in names:  # the reference runs first
        names.remove(OFFICIAL)
        names.insert(0, OFFICIAL)
    return list(dict.fromkeys(names))


def preparer(name: str) -> Callable[[Workload], Prepared]:
    if name.startswith("ours-"):
        backend, head = ours_variant(name)
        return partial(ours.prepare, backend=backend, head=head)
    return {
        OFFICIAL: official.prepare,
        FLOOR_A: floors.prepare_train_step,
        FLOOR_B: floors.prepare_input_grad,
        "torch-func": torch_func.prepare,
        "opacus": opacus_ghost.prepare,
        "opacus-untied": opacus_ghost.prepare_untied,
        "backpack": backpack_l2.prepare,
    }[name]


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    valid = want > 0
    err = (got[valid] - want[valid]).abs() / want[valid]
    return float(err.max()) if err.numel() else 0.0


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def outcome(record: dict, device: torch.device):
    """Turn what a method raises into its record's status: a peer that breaks on this model (or runs out
    of memory) is a result, not a crash of the benchmark."""
    try:
        yield
    except Refused as exc:
        record.update(status="refused", reason=str(exc))
    except torch.OutOfMemoryError as exc:
        record.update(status="oom", reason=f"out of memory: {str(exc).splitlines()[0][:300]}")
    except Exception as exc:
        record.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:500]}")
        traceback.print_exc(file=sys.stderr)
    finally:
        free_memory(device)


def check_method(work: Workload, name: str, prepared: Prepared, record: dict) -> None:
    """The first run: norms against the official loop (and the method's own reference), facts."""
    record["notes"] = prepared.notes
    norms = prepared.run()
    if norms is not None:
        if name == OFFICIAL:
            work.official_norms = norms
        if prepared.same_model and work.official_norms is not None:
            record["max_rel_err"] = max_rel_err(norms, work.official_norms)
            record["checked_against"] = "official loop"
        if prepared.reference is not None:
            ref, what = prepared.reference()
            err = max_rel_err(norms, ref)
            if prepared.same_model:
                record["max_rel_err_partial"], record["partial_reference"] = err, what
            else:
                record["max_rel_err"], record["checked_against"] = err, what
        record["norms"] = norms.detach().float().cpu().tolist()
    if prepared.facts is not None:
        record.update(prepared.facts())


def run_methods(work: Workload, names: list[str], args: argparse.Namespace, tag: str) -> list[dict]:
    """Every method: a check run (also the first warm-up), ``warmup - 1`` more warm-ups, ``repeats`` timed
    runs. ``sequential``: each method's runs back to back. ``interleaved``: round r times one run of every
    method in turn (order reversed every other round), each method set up afresh for its run, so that a
    machine whose load drifts during the benchmark (other processes) weighs on every method alike."""
    records = {n: {"method": n, "label": label(n), "status": "ok", "notes": [], "order": args.order} for n in names}
    rounds = args.repeats if args.order == "interleaved" else 0
    bar = tqdm(total=len(names) * (1 + rounds), desc=f"{tag} methods x runs", file=sys.stderr, leave=False)

    def show(name: str) -> None:
        r = records[name]
        shown = f"{r['median_s'] * 1e3:.1f} ms" if r["status"] == "ok" and r.get("times_s") else r["status"]
        bar.write(f"[{tag}] {name}: {shown}", file=sys.stderr)

    for name in names:
        record = records[name]
        with outcome(record, work.device):
            prepared = preparer(name)(work)
            try:
                check_method(work, name, prepared, record)
                if args.order == "sequential":
                    timing = harness.measure(prepared.run, work.device, args.repeats, warmup=args.warmup - 1)
                    record.update(timing.as_dict(), warmup=args.warmup)
                else:
                    for _ in range(args.warmup - 1):
                        prepared.run()
            finally:
                prepared.cleanup()
                del prepared
        bar.update(1)
        if args.order == "sequential":
            show(name)
        else:
            err = record.get("max_rel_err")
            checked = record["status"] if err is None else f"max rel err {err:.1e}"
            bar.write(f"[{tag}] {name}: checked ({checked})", file=sys.stderr)
    if args.order == "interleaved":
        for round_ in range(args.repeats):
            for name in names if round_ % 2 == 0 else names[::-1]:
                record = records[name]
                bar.update(1)
                if record["status"] != "ok":
                    continue
                with outcome(record, work.device):
                    prepared = preparer(name)(work)
                    try:
                        timing = harness.measure(prepared.run, work.device, repeats=1, warmup=0)
                    finally:
                        prepared.cleanup()
                        del prepared
                    record.setdefault("times_s", []).extend(timing.times_s)
                    record["peak_extra_bytes"] = max(record.get("peak_extra_bytes", 0), timing.peak_extra_bytes)
        for name in names:
            r = records[name]
            if r["status"] == "ok":
                r.update(median_s=statistics.median(r["times_s"]), warmup=args.warmup)
            show(name)
    bar.close()
    return [records[n] for n in names]


def add_ratios(records: list[dict]) -> None:
    """Speedup over the official loop, time and peak memory relative to each floor."""
    by_name = {r["method"]: r for r in records if r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            continue
        if OFFICIAL in by_name:
            r["speedup_vs_official"] = by_name[OFFICIAL]["median_s"] / r["median_s"]
        for floor, key in ((FLOOR_A, "train_step"), (FLOOR_B, "input_grad")):
            if floor in by_name:
                r[f"time_vs_floor_{key}"] = r["median_s"] / by_name[floor]["median_s"]
                base = by_name[floor]["peak_extra_bytes"]
                # Below 1 MiB the sampled RSS is noise: no ratio.
                r[f"peak_vs_floor_{key}"] = r["peak_extra_bytes"] / base if base >= 2**20 else None


def goal_check(run: dict, records: list[dict], args: argparse.Namespace) -> dict:
    matches = (
        run["model"]["name"] == GOAL["preset"]
        and not run["model"]["reduced"]
        and args.group_size == GOAL["group"]
        and run["t_max"] == GOAL["t_max"]
        and args.device.startswith("cuda")
    )
    ours_records = [r for r in records if r["method"].startswith("ours-") and r["status"] == "ok"]
    return {
        "goal": f">= {GOAL['min_speedup']:g}x the official loop, time and peak memory <= floor (a), "
        f"on an H100 for {GOAL['preset']}, group {GOAL['group']}, T = {GOAL['t_max']} (recorded, not asserted)",
        "is_goal_configuration": matches,
        "by_backend": {
            r["method"]: {
                "speedup_vs_official": r.get("speedup_vs_official"),
                "speedup_met": (r.get("speedup_vs_official") or 0) >= GOAL["min_speedup"],
                "time_vs_floor_train_step": r.get("time_vs_floor_train_step"),
                "peak_vs_floor_train_step": r.get("peak_vs_floor_train_step"),
                "within_floor_time": (r.get("time_vs_floor_train_step") or float("inf")) <= 1.0,
                "within_floor_memory": (r.get("peak_vs_floor_train_step") or float("inf")) <= 1.0,
            }
            for r in ours_records
        },
    }


def distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_size(text: str) -> int | None:
    return None if text == "full" else int(text)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    status = vk.available_backends()
    # By default every available backend, except triton on the CPU: there it runs in the interpreter
    # (tests only), which says nothing about speed. Name it in --backends to run it anyway.
    backends = args.backends or [
        n for n, s in status.items() if s.available and not (n == "triton" and device.type == "cpu")
    ]
    names = expand_methods(args.methods, backends)
    preset = PRESETS[args.preset]
    vocab = parse_size(args.vocab or ("full" if preset.weights else "4096"))
    spec = ModelSpec.of(
        preset, parse_size(args.layers), None if vocab is None else min(vocab, preset.vocab), args.untie
    )
    started = time.perf_counter()
    load_average = list(os.getloadavg())
    model = build_model(spec, dtype=dtype, device=device, attn=args.attn, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    runs = []
    for t_max in args.lengths:
        raw = grpo_batch(
            spec.vocab,
            groups=args.groups,
            group_size=args.group_size,
            prompt_len=args.prompt_len,
            t_max=t_max,
            dist=args.length_dist,
            seed=args.seed,
            device=device,
        )
        batch = vigor.prepare_batch(model, raw.input_ids, raw.attention_mask, raw.loss_mask)
        work = Workload(model, spec, batch, raw, device, dtype, args.attn, args.seed, int(args.func_max_gib * 2**30))
        work.keep_twin = args.order == "interleaved"
        records = run_methods(work, names, args, f"T_max={t_max}")
        work.release_twin()
        add_ratios(records)
        entry = {"t_max": t_max, "model": spec.describe(), "batch": raw.describe(), "methods": records}
        entry["goal_check"] = goal_check(entry, records, args)
        runs.append(entry)
        free_memory(device)
    env = harness.environment(device, dtype)
    env["backends"] = {n: str(s) for n, s in status.items()}
    env["load_average_at_start"] = load_average  # other processes on the machine make CPU timings noisy
    env["peer_versions"] = {name: distribution_version(name) for name in ("opacus", "backpack-for-pytorch")}
    return {
        "benchmark": "grad_norm_bench",
        "command": "python bench/grad_norm_bench.py " + " ".join(args.argv),
        "environment": env,
        "config": {
            "preset": args.preset,
            "model": spec.describe(),
            "model_label": spec.label(),
            "parameters": n_params,
            "attn_implementation": args.attn,
            "groups": args.groups,
            "group_size": args.group_size,
            "prompt_len": args.prompt_len,
            "lengths": args.lengths,
            "length_distribution": args.length_dist,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "order": args.order,
            "func_max_gib": args.func_max_gib,
            "methods": names,
            "seed": args.seed,
        },
        "runs": runs,
        "wall_s": time.perf_counter() - started,
    }


def _fmt(value: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def table(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    out = [
        f"Per-sample gradient norms of one GRPO batch, `{cfg['model_label']}` "
        f"({cfg['parameters'] / 1e6:.1f} M parameters, {'tied' if cfg['model']['used_tied'] else 'untied'}), "
        f"{cfg['groups']} x {cfg['group_size']} completions ({cfg['length_distribution']} lengths), "
        f"{env['dtype']}, {cfg['attn_implementation']} attention, on {env['device']}; "
        f"torch {env['torch_version']}, commit `{env['commit'][:12]}`. Median of {cfg['repeats']} repeats "
        f"({cfg['order']}) after {cfg['warmup']} warm-up.\n",
        "Speedup is over the official loop; the floors are (a) a batched forward + backward with weight "
        "gradients, (b) the same forward + an input-gradient-only backward. Error: max relative error of the "
        "norms against the official loop.\n",
    ]
    headers = [
        "method",
        "median ms",
        "speedup",
        "× floor (a)",
        "× floor (b)",
        "peak MiB",
        "peak × (a)",
        "max rel err",
    ]
    for run in result["runs"]:
        b = run["batch"]
        lengths = b["completion_lengths"]
        out.append(
            f"\n**T_max = {run['t_max']}**: batch {b['shape'][0]} x {b['shape'][1]}, completion lengths "
            f"{min(lengths)}–{max(lengths)} (mean {sum(lengths) / len(lengths):.0f}), {b['loss_tokens']} loss "
            f"tokens.\n\n"
        )
        rows, remarks = [], []
        for r in run["methods"]:
            if r["status"] != "ok":
                rows.append([r["label"], r["status"], "", "", "", "", "", ""])
                remarks.append(f"- {r['label']}: **{r['status']}**: {r['reason']}")
                continue
            err = _fmt(r.get("max_rel_err"), ".1e")
            if "max_rel_err_partial" in r:
                err += f" ({_fmt(r['max_rel_err_partial'], '.1e')} on covered)"
            rows.append(
                [
                    r["label"],
                    f"{r['median_s'] * 1e3:.1f}",
                    _fmt(r.get("speedup_vs_official"), ".2f", "x"),
                    _fmt(r.get("time_vs_floor_train_step"), ".2f"),
                    _fmt(r.get("time_vs_floor_input_grad"), ".2f"),
                    f"{r['peak_extra_bytes'] / 2**20:.0f}",
                    _fmt(r.get("peak_vs_floor_train_step"), ".2f"),
                    err,
                ]
            )
            if r.get("checked_against") not in (None, "official loop"):
                remarks.append(f"- {r['label']}: checked against the {r['checked_against']}")
            if r.get("shared_params"):
                remarks.append(
                    f"- {r['label']}: the weight shared by the embedding and the LM head "
                    f"({', '.join(r['shared_params'])}) gets the norm of one use only (no cross term)"
                )
            if r.get("missing_params"):
                remarks.append(
                    f"- {r['label']}: covers {r['covered_params']} of {r['theta_params']} parameter tensors; "
                    f"no per-sample norm for {', '.join(r['missing_params'][:4])}"
                    + (" ..." if len(r["missing_params"]) > 4 else "")
                )
            if r["method"] == "torch-func" and r.get("chunk"):
                remarks.append(f"- {r['label']}: {'; '.join(r['notes'][1:]) or 'whole batch at once'}")
        out.append(harness.markdown_table(headers, rows))
        if remarks:
            out.append("\n" + "\n".join(remarks) + "\n")
    return "".join(out)


COLORS = {"official": "#c0392b", "floor": "#7f8c8d", "ours": "#27ae60", "peer": "#2980b9"}


def _color(name: str) -> str:
    if name == OFFICIAL:
        return COLORS["official"]
    if name.startswith("floor"):
        return COLORS["floor"]
    return COLORS["ours"] if name.startswith("ours-") else COLORS["peer"]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = result["runs"]
    height = 0.45 * max(len(r["methods"]) for r in runs) + 1.2
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, height * len(runs)), squeeze=False)
    for (ax_t, ax_m), run in zip(axes, runs, strict=True):
        records = run["methods"]
        ys = list(range(len(records)))[::-1]
        labels = [r["label"] for r in records]
        times = [r["median_s"] * 1e3 if r["status"] == "ok" else 0 for r in records]
        peaks = [r["peak_extra_bytes"] / 2**20 if r["status"] == "ok" else 0 for r in records]
        colors = [_color(r["method"]) for r in records]
        ax_t.barh(ys, times, color=colors)
        ax_t.set_xscale("log")
        ax_m.barh(ys, peaks, color=colors)
        positive = [t for t in times if t > 0] or [1.0]
        for y, r, t in zip(ys, records, times, strict=True):
            if r["status"] != "ok":
                ax_t.text(min(positive), y, f" {r['status']}", va="center", fontsize=8, color="#555")
                continue
            tag = f" {t:.0f} ms" if t >= 10 else f" {t:.1f} ms"
            if r.get("speedup_vs_official") is not None and r["method"] != OFFICIAL:
                tag += f"  ({r['speedup_vs_official']:.1f}x)"
            ax_t.text(t, y, tag, va="center", fontsize=8)
        ax_t.set_xlim(min(positive) / 1.5, max(positive) * 6)
        ax_t.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax_t.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_t.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax_t.set_xlabel("ms (log scale)", fontsize=8)
        ax_m.set_xlabel("MiB", fontsize=8)
        for floor, style in ((FLOOR_A, "--"), (FLOOR_B, ":")):
            rec = next((r for r in records if r["method"] == floor and r["status"] == "ok"), None)
            if rec:
                ax_t.axvline(rec["median_s"] * 1e3, color=COLORS["floor"], ls=style, lw=1)
                ax_m.axvline(rec["peak_extra_bytes"] / 2**20, color=COLORS["floor"], ls=style, lw=1)
        ax_t.set_yticks(ys, labels, fontsize=8)
        ax_m.set_yticks(ys, [""] * len(ys))
        b = run["batch"]
        ax_t.set_title(
            f"T_max = {run['t_max']}, batch {b['shape'][0]} x {b['shape'][1]}: median time (speedup over official)",
            fontsize=9,
        )
        ax_m.set_title("peak extra memory (MiB); lines: floors (a) -- and (b) ··", fontsize=9)
        ax_t.grid(axis="x", alpha=0.3)
        ax_m.grid(axis="x", alpha=0.3)
    env, cfg = result["environment"], result["config"]
    fig.suptitle(
        f"Per-sample gradient norms, {cfg['model_label']}, group {cfg['group_size']}, {env['dtype']}, {env['device']}",
        fontsize=10,
    )
    fig.tight_layout()
    harness.atomic_save_figure(fig, path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",") if v]
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    parser.add_argument("--layers", default="2", help="decoder layers to build, or 'full' (the real depth)")
    parser.add_argument(
        "--vocab",
        default=None,
        help="vocabulary size to build (capped at the preset's), or 'full' (the real one); default 4096, "
        "full for a preset with real weights",
    )
    parser.add_argument("--untie", action="store_true", help="untie the embedding from the LM head")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    parser.add_argument("--groups", type=int, default=1, help="prompts in the batch")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (the first group's)")
    parser.add_argument("--lengths", type=ints, default=[128], help="comma list of maximal completion lengths")
    parser.add_argument("--length-dist", choices=LENGTH_DISTS, default="lognormal")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument(
        "--backends",
        type=lambda s: [b for b in s.split(",") if b],
        default=None,
        help="vigor_kernels backends for 'ours' (default: every available one)",
    )
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma list of ours, floors, {', '.join(LABELS)}, ours-<backend>[-materialized]",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--order",
        choices=["interleaved", "sequential"],
        default="interleaved",
        help="interleaved: one timed run of each method per round (fair on a shared machine); "
        "sequential: each method's runs back to back (fewer set-ups, less memory held)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (>= 1: the check run)")
    parser.add_argument(
        "--func-max-gib",
        type=float,
        default=8.0,
        help="torch.func: most per-sample gradient memory to materialize at once",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="default $VIGOR_BENCH_RESULTS/<cpu|cuda>, else bench/results/<cpu|cuda>"
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1")
    args.out = harness.results_dir(args.out, torch.device(args.device).type)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    written = harness.write_results(args.out, "grad_norms", result, table(result), partial(plot, result))
    print(table(result))
    print(f"wrote {', '.join(str(p) for p in written)} in {result['wall_s']:.0f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
