"""The reward study: GRPO from one warm-started checkpoint, one run per (arm, seed), every arm on the same seeds.

A study config (``configs/study/addition.yaml``) holds ``base`` (a ``vigor train`` config: the policy, data,
sampling, optimizer and evaluation shared by every arm), ``arms`` (name -> the ``rewards`` section of that
arm) and ``seeds``. An arm's ``rewards`` *replaces* the base's rewards section (no merging: a ``random`` arm
cannot inherit a ``vigor: 1`` weight). Runs are paired: for a given seed every arm starts from the same
checkpoint, draws the same prompts in the same order (``data.step_indices`` depends on the seed only) and
starts sampling from the same RNG state; the held-out sets are the same for every run.

Each run adds to ``vigor train``'s metrics a held-out accuracy at temperature 1 (one sample per prompt,
from an RNG seeded by (seed, step), so the evaluation draws are paired across arms and do not disturb the
training RNG). Results: ``<out_dir>/runs/<arm>-s<seed>.jsonl`` (every metrics record of the run, the raw
per-evaluation numbers) and ``<out_dir>/results.json`` (config, command, environment, every run's records);
``vigor study report`` rebuilds the table and figures from ``results.json`` alone.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from vigor.trainer.config import ConfigError, TrainConfig, config_from_dict
from vigor.trainer.loop import Trainer


@dataclass
class StudyConfig:
    out_dir: str  # results (committed): results.json, runs/*.jsonl, the table and figures
    runs_dir: str  # the runs' working directories (checkpoints, models; not committed)
    seeds: list[int]
    arms: dict[str, dict[str, Any]]  # name -> rewards section (replaces base.rewards)
    base: dict[str, Any]  # a vigor train config shared by every arm
    data_seed: int = 0  # the task split (the SFT stage's seed: its held-out split stays held out)
    source: str = ""  # the config file


def load_study_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    known = {"out_dir", "runs_dir", "seeds", "arms", "base", "data_seed"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown study setting(s) {unknown}; known: {sorted(known)}")
    missing = sorted(k for k in ("out_dir", "runs_dir", "seeds", "arms", "base") if k not in values)
    if missing:
        raise ConfigError(f"{path}: missing study setting(s) {missing}")
    if not values["arms"] or not isinstance(values["arms"], dict):
        raise ConfigError(f"{path}: arms must be a non-empty mapping name -> rewards section")
    if not isinstance(values["base"], dict):
        raise ConfigError(f"{path}: base must be a mapping of vigor train settings")
    seeds = values["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    # settings that moved since the study was written are read once here, with one warning
    base = TrainConfig.migrate(values["base"], f"{path}: base")
    arms = {a: TrainConfig.migrate({"rewards": r}, f"{path}: arms.{a}")["rewards"] for a, r in values["arms"].items()}
    cfg = StudyConfig(
        out_dir=str(values["out_dir"]),
        runs_dir=str(values["runs_dir"]),
        seeds=seeds,
        arms=arms,
        base=base,
        data_seed=int(values.get("data_seed", 0)),
        source=str(path),
    )
    for arm in cfg.arms:  # every run's config is checked before the first one starts
        run_config(cfg, arm, cfg.seeds[0])
    return cfg


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def data_files(study: StudyConfig) -> tuple[Path, Path]:
    return Path(study.runs_dir) / "data" / "train.jsonl", Path(study.runs_dir) / "data" / "test.jsonl"


def run_config(study: StudyConfig, arm: str, seed: int) -> TrainConfig:
    values = copy.deepcopy(study.base)
    train_file, test_file = data_files(study)
    values.setdefault("run", {}).update(seed=seed, dir=str(Path(study.runs_dir) / run_name(arm, seed)))
    values["rewards"] = copy.deepcopy(study.arms[arm])  # replaces, never merges
    values.setdefault("data", {}).update(train_file=str(train_file), test_file=str(test_file))
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{study.source}: arm {arm!r}: {e}") from None


class StudyTrainer(Trainer):
    """``vigor train`` plus a temperature-1 held-out accuracy at every evaluation."""

    def evaluate(self) -> dict[str, Any]:
        from vigor.trainer.evaluation import held_out_accuracy

        out = super().evaluate()
        e = self.cfg.eval
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed * 1_000_003 + self.step + 17)
            sampled = held_out_accuracy(
                self.model, self.tokenizer, self.test_set, self.checker, self.cfg.sampling, device=self.device,
                num_examples=e.num_examples, batch_size=e.batch_size, greedy=False, max_new_tokens=e.max_new_tokens,
                add_special_tokens=self.add_special_tokens, autocast=self.autocast,
            )  # fmt: skip
        out |= {f"eval/{k}_t1": v for k, v in sampled.items()}
        return out


def prepare_data(study: StudyConfig) -> None:
    """The task split every run shares, written once (the same split the SFT stage drew with ``data_seed``)."""
    from vigor.trainer.tasks import write_task

    d = config_from_dict(copy.deepcopy(study.base)).data
    train_file, _ = data_files(study)
    if d.task is None:
        raise ConfigError(f"{study.source}: base.data.task must name the built-in task the study uses")
    write_task(d.task, train_file.parent, study.data_seed, d.num_train, d.num_test, d.max_ops)


def run_study(study: StudyConfig, *, arms: list[str] | None = None, seeds: list[int] | None = None) -> list[Path]:
    """Every (arm, seed) run not yet in ``<out_dir>/runs/`` (a finished run is never redone), sequentially,
    seed-major so that a partial study holds whole seeds. Returns the runs' result files."""
    from tqdm import tqdm

    from vigor.atomic import write_text as atomic_write_text

    arms = arms or list(study.arms)
    seeds = seeds if seeds is not None else study.seeds
    bad = sorted(set(arms) - set(study.arms))
    if bad:
        raise ConfigError(f"unknown arm(s) {bad}; the study has {list(study.arms)}")
    prepare_data(study)
    from vigor.atomic import write_text

    write_text(Path(study.out_dir) / "study.yaml", Path(study.source).read_text())
    out = Path(study.out_dir) / "runs"
    todo = [(a, s) for s in seeds for a in arms if not (out / f"{run_name(a, s)}.jsonl").is_file()]
    written = []
    bar = tqdm(todo, desc="vigor study", unit="run", dynamic_ncols=True)
    for arm, seed in bar:
        bar.set_postfix_str(run_name(arm, seed))
        cfg = run_config(study, arm, seed)
        run_dir = Path(cfg.run.dir)
        if run_dir.exists():  # an interrupted run: start it again from the checkpoint
            import shutil

            shutil.rmtree(run_dir)
        cfg.run.progress = False
        t0 = time.perf_counter()
        records = StudyTrainer(cfg).train()
        seconds = time.perf_counter() - t0
        head = {"arm": arm, "seed": seed, "seconds": seconds, "rewards": study.arms[arm]}
        text = json.dumps({"run": head}) + "\n" + "".join(json.dumps(r) + "\n" for r in records)
        written.append(atomic_write_text(out / f"{run_name(arm, seed)}.jsonl", text))
        tqdm.write(f"{run_name(arm, seed)}: {seconds:.0f} s, " + _final_line(records))
    bar.close()
    return written


def _final_line(records: list[dict[str, Any]]) -> str:
    evals = [r for r in records if "eval/accuracy" in r]
    if not evals:
        return "no evaluation"
    first, last = evals[0], evals[-1]
    return (
        f"held-out greedy accuracy {first['eval/accuracy']:.3f} -> {last['eval/accuracy']:.3f}, "
        f"t=1 {first.get('eval/accuracy_t1', float('nan')):.3f} -> {last.get('eval/accuracy_t1', float('nan')):.3f}"
    )


def read_runs(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished run under ``<out_dir>/runs/``: ``{"arm", "seed", "seconds", "rewards", "records"}``."""
    runs = []
    for path in sorted((Path(out_dir) / "runs").glob("*.jsonl")):
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if not lines or "run" not in lines[0]:
            raise ValueError(f"{path}: not a study run file (its first line must be the run's header)")
        runs.append({**lines[0]["run"], "records": lines[1:]})
    return runs
