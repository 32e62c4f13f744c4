"""What one GRPO training step costs with the VIGOR reward vs the random-reward control, side by side.

    python bench/train_step_cost.py --config configs/demo.yaml --out bench/results/train-step
    python bench/train_step_cost.py --config configs/demo.yaml --out results/train-step-gpu compute.device=cuda

Two measurements on the same config (extra KEY=VALUE arguments override it):

1. Training steps: one trainer per reward (same seed, same config but the reward), stepped in turn
   (vigor step 1, random step 1, vigor step 2, ...) so that both see the same machine conditions; each
   step's sampling / reward / update times; medians after ``--warmup`` steps. The policies drift apart
   after the first update, so their completions (and lengths) differ from step to step.
2. Same batch: one group batch sampled from the initial policy, then the VIGOR reward (the engine's one
   batched pass), the random reward, the policy-gradient forward + backward of the same batch (what the
   update costs per iteration, without the optimizer), and the official per-completion autograd loop.
3. Same batch, whole step: the reward and the update (optimizer included) of that one batch, by every
   way the trainer can compute them: the random reward; VIGOR in two passes; VIGOR in one pass reusing
   the scoring graph; VIGOR in one pass with the update's gradient book-kept (docs/one-pass.md). Every
   row does the same work on the same completions; the step time adds the batch's median sampling time.
   A last row adds to the random step the Gram products any step built on ghost norms must form
   (``gram_products``): the floor of a VIGOR step at this batch's shapes.

Writes ``train_step.json`` (environment, config, every step's times, medians) and ``train_step.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from bench import harness
from vigor import oracle_grad_norms
from vigor.rewards import vigor_rewards
from vigor.trainer import Trainer, load_config
from vigor.trainer.grpo import completion_logprobs, grpo_loss
from vigor.trainer.rewards import random_rewards

PHASES = ("time/sample", "time/reward", "time/update", "time/step")


def trainer_for(args: argparse.Namespace, reward: str, run_dir: Path) -> Trainer:
    overrides = [
        *args.overrides,
        f"run.dir={run_dir / reward}",
        f"rewards.weights={{{reward}: 1.0}}",
        "run.progress=false",
        "plots.enabled=false",
        "eval.every=0",
        "verify.every=0",
    ]
    cfg = load_config(args.config, overrides)
    cfg.rewards.weights = {reward: 1.0}  # replace, not merge with the config's weights
    return Trainer(cfg)


def training_steps(args: argparse.Namespace, run_dir: Path) -> dict:
    trainers = {r: trainer_for(args, r, run_dir) for r in args.rewards}
    steps: dict[str, list[dict]] = {r: [] for r in trainers}
    for i in range(args.warmup + args.steps):
        for reward, trainer in trainers.items():
            record = trainer.train_step(i + 1)
            trainer.step += 1
            if i >= args.warmup:
                steps[reward].append({k: record[k] for k in ("step", "completion_length", *PHASES) if k in record})
    medians = {r: {p: statistics.median(s[p] for s in recs) for p in PHASES} for r, recs in steps.items()}
    for r, recs in steps.items():
        medians[r]["completion_length"] = statistics.median(s["completion_length"] for s in recs)
    return {"steps": steps, "medians_s": medians}


def same_batch(args: argparse.Namespace, run_dir: Path) -> dict:
    trainer = trainer_for(args, "vigor", run_dir / "same-batch")
    cfg, model, device = trainer.cfg, trainer.model, trainer.device
    from vigor.trainer.data import step_indices
    from vigor.trainer.sampling import sample_rollouts

    prompts = trainer.train_set.select(
        step_indices(0, cfg.sampling.prompts_per_step, len(trainer.train_set), cfg.run.seed)
    )
    ro = sample_rollouts(model, trainer.tokenizer, prompts.texts, cfg.sampling, device=device)
    G = cfg.sampling.group_size
    adv = torch.randn(ro.size, generator=torch.Generator().manual_seed(0)).to(device)
    batch = (ro.input_ids, ro.attention_mask, ro.loss_mask)

    def policy_gradient() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        stats = completion_logprobs(model, ro.input_ids, ro.attention_mask, ro.prompt_width, cfg.sampling.temperature)
        loss = grpo_loss(stats.logp, stats.logp.detach(), None, adv, ro.completion_mask, cfg.grpo, float(ro.size)).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    fns = {
        "vigor_reward": lambda: vigor_rewards(model, *batch, G).rewards,
        "random_reward": lambda: random_rewards(ro.size),
        "policy_gradient_fwd_bwd": policy_gradient,
        "oracle_per_completion_loop": lambda: oracle_grad_norms(model, *batch),
    }
    timings = {}
    for name, fn in fns.items():
        repeats = max(1, args.repeats // 3) if name.startswith("oracle") else args.repeats
        timings[name] = harness.measure(fn, device, repeats=repeats, warmup=1).as_dict()
    return {
        "device": str(device),
        "batch": {
            "completions": ro.size,
            "group_size": G,
            "width": ro.input_ids.shape[1],
            "loss_tokens": int(ro.loss_mask.sum()),
            "valid_completions": int(ro.loss_mask.any(1).sum()),
        },
        "timings": timings,
    }


STEP_WAYS = {  # row name -> (reward, grpo.one_pass mode)
    "random": ("random", "off"),
    "vigor, two passes": ("vigor", "off"),
    "vigor, one pass (graph)": ("vigor", "graph"),
    "vigor, one pass (bookkept)": ("vigor", "bookkeep"),
}


def gram_products(model: torch.nn.Module, ro, device: torch.device):
    """What no ghost-norm step can avoid: the two ``[B, W, W]`` Gram products (``X X^T``, ``G G^T``) of every
    linear layer at this batch's shapes (W: its scored row window), on random data, each layer on its own
    (the engine forms a Gram shared by q/k/v or gate/up once, so it does a little less)."""
    from vigor.batch import prepare_batch

    lo, hi = prepare_batch(model, ro.input_ids, ro.attention_mask, ro.loss_mask).ranges.window()
    size = ro.size
    widths = [
        tuple(m.weight.shape[::-1]) if isinstance(m, torch.nn.Linear) else tuple(m.weight.shape)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    ]
    dtype = next(model.parameters()).dtype
    operands = [torch.randn(size, hi - lo, d, device=device, dtype=dtype) for pair in widths for d in pair]

    def run() -> torch.Tensor:
        total = torch.zeros(size, device=device)
        for x, g in zip(operands[::2], operands[1::2], strict=True):
            total += (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return total

    return run


def same_batch_steps(args: argparse.Namespace, run_dir: Path) -> dict:
    """Reward + update of one sampled batch by each of ``STEP_WAYS``, interleaved repeat by repeat."""
    from vigor.trainer.data import step_indices
    from vigor.trainer.one_pass import OnePassChoice
    from vigor.trainer.sampling import sample_rollouts

    trainers = {
        way: trainer_for(args, reward, run_dir / f"steps-{i}") for i, (way, (reward, _)) in enumerate(STEP_WAYS.items())
    }
    first = next(iter(trainers.values()))
    cfg, device = first.cfg, first.device
    prompts = first.train_set.select(step_indices(0, cfg.sampling.prompts_per_step, len(first.train_set), cfg.run.seed))

    def sample():
        return sample_rollouts(first.model, first.tokenizer, prompts.texts, cfg.sampling, device=device)

    ro = sample()
    timings = {"sample": harness.measure(sample, device, repeats=args.repeats, warmup=1).as_dict()}
    steps = {}
    for way, trainer in trainers.items():
        trainer.one_pass = OnePassChoice(STEP_WAYS[way][1], "benchmark")
        steps[way] = lambda t=trainer: t.reward_and_update(ro, prompts, 1)[1]
    kept = {way: step().get("one_pass/kept_mib") for way, step in steps.items()}  # also the warm-up
    grams = gram_products(first.model, ro, device)
    timings["ghost Grams alone"] = harness.measure(grams, device, repeats=args.repeats, warmup=1).as_dict()
    runs: dict[str, list[harness.Timing]] = {way: [] for way in steps}
    for _ in range(args.repeats):  # the ways take turns, so that each sees the same machine conditions
        for way, step in steps.items():
            runs[way].append(harness.measure(step, device, repeats=1, warmup=0))
    for way, timed in runs.items():
        times = [t.times_s[0] for t in timed]
        peak = max(t.peak_extra_bytes for t in timed)
        timings[way] = harness.Timing(times, peak, warmup=1).as_dict()
    return {"timings": timings, "bookkept_mib": kept, "completions": ro.size, "width": ro.input_ids.shape[1]}


def table(result: dict) -> str:
    env = result["environment"]
    head = (
        f"Training-step cost, config `{result['config_file']}` {' '.join(result['overrides'])}, on {env['device']}, "
        f"torch {env['torch_version']}, commit {env['commit'][:12]}; "
        f"load average before: {result['loadavg_before']}.\n\n"
        f"1. Training steps, rewards stepped in turn, median of {result['steps']} steps after {result['warmup']} "
        "warm-up steps (seconds):\n\n"
    )
    rows = [
        [r, m["time/sample"], m["time/reward"], m["time/update"], m["time/step"], m["completion_length"]]
        for r, m in result["training"]["medians_s"].items()
    ]
    text = head + harness.markdown_table(["reward", "sample", "reward", "update", "step", "mean length"], rows)
    b = result["same_batch"]["batch"]
    text += (
        f"\n2. One batch ({b['completions']} completions in groups of {b['group_size']}, width {b['width']}, "
        f"{b['loss_tokens']} loss tokens), median ms:\n\n"
    )
    rows = [[name, t["median_s"] * 1e3, len(t["times_s"])] for name, t in result["same_batch"]["timings"].items()]
    text += harness.markdown_table(["computation", "median ms", "repeats"], rows)
    steps = result.get("same_batch_steps")
    if steps:
        t = steps["timings"]
        sample = t["sample"]["median_s"]
        base = t["random"]["median_s"] + sample
        text += (
            f"\n3. One batch, reward + update (optimizer step included), {steps['completions']} completions, "
            f"width {steps['width']}; sampling that batch: {sample * 1e3:.1f} ms (median), added to make the step; "
            "peak memory above the start of each repeat (RSS on the CPU):\n\n"
        )
        rows = [
            [
                way,
                v["median_s"] * 1e3,
                (v["median_s"] + sample) * 1e3,
                (v["median_s"] + sample) / base,
                v["peak_extra_bytes"] / 2**20,
                steps["bookkept_mib"].get(way),
            ]
            for way, v in t.items()
            if way not in ("sample", "ghost Grams alone")
        ]
        grams = t.get("ghost Grams alone")
        if grams is not None:  # the floor of any ghost-norm step: the random step plus the Gram products
            floor = t["random"]["median_s"] + grams["median_s"]
            rows.append(
                [
                    "floor: random + ghost Grams alone",
                    floor * 1e3,
                    (floor + sample) * 1e3,
                    (floor + sample) / base,
                    None,
                    None,
                ]
            )
        headers = ["way", "reward + update ms", "step ms", "step / random step", "peak MiB", "bookkept MiB"]
        text += harness.markdown_table(headers, rows)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rewards", type=lambda s: s.split(","), default=["vigor", "random"])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per reward")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="repeats of each same-batch computation")
    parser.add_argument(
        "--out", type=Path, default=None, help="default $VIGOR_BENCH_RESULTS/train-step, else bench/results/train-step"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    loadavg = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        training = training_steps(args, Path(tmp))
        batch = same_batch(args, Path(tmp))
        steps = same_batch_steps(args, Path(tmp))
    device = torch.device(batch.pop("device"))
    result = {
        "benchmark": "train_step_cost",
        "config_file": args.config,
        "overrides": args.overrides,
        "environment": harness.environment(device),
        "loadavg_before": loadavg,
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "steps": args.steps,
        "warmup": args.warmup,
        "training": training,
        "same_batch": batch,
        "same_batch_steps": steps,
    }
    harness.write_results(harness.results_dir(args.out, "train-step"), "train_step", result, table(result))
    print(table(result))


if __name__ == "__main__":
    main()
