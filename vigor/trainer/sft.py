"""Supervised warm-up (``vigor sft``): teacher-forced training on a task's solutions, so that GRPO starts from a
policy that solves the task some of the time.

One step: ``batch_size`` training rows in the seeded order of ``data.step_indices``; the loss is the mean
cross-entropy over every target token (``target_column`` + EOS) of the batch, the prompt carries none;
AdamW with a linear warm-up and a constant, linear or cosine schedule. Every ``eval_every`` steps: greedy
accuracy on the held-out split (the task's answer check). ``stop_at_accuracy`` is the stopping rule fixed
in advance: training ends at the first evaluation at or above it (or at ``steps``), and the model of that
step is exported as a Hugging Face directory with its tokenizer (``export_dir``), ready for
``model.name`` of a GRPO run. Checkpoints, ``metrics.jsonl`` and plots as in ``vigor train``; resuming a
checkpoint reproduces the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from vigor.trainer.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    SamplingConfig,
    _build,
    _check,
    _merge,
    parse_overrides,
)


@dataclass
class SFTConfig:
    run_dir: str = "runs/sft"
    seed: int = 0  # model init, synthetic task, data order
    steps: int = 1000  # at most
    device: str = "auto"
    threads: int | None = None
    batch_size: int = 128  # training rows per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "linear"  # constant, linear or cosine (to 0 at `steps`), after warmup_steps
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    target_column: str = "solution"  # the completion to imitate (the answer column for data without solutions)
    eval_every: int = 10  # steps between greedy held-out evaluations
    eval_examples: int = 200
    eval_batch_size: int = 200
    max_new_tokens: int = 32  # of the evaluation's completions
    stop_at_accuracy: float | None = None  # stop at the first evaluation with greedy accuracy >= this
    save_every: int = 0  # steps between checkpoints; 0: only the last step
    export_dir: str | None = None  # the final model (HF directory + tokenizer); default: <run_dir>/final_model
    plots: bool = True
    progress: bool = True
    resume: str | None = None  # a checkpoint directory, or "auto": the latest in run_dir if there is one
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_sft(cfg: SFTConfig) -> SFTConfig:
    for key in ("steps", "batch_size", "eval_examples", "eval_batch_size", "max_new_tokens"):
        _check(getattr(cfg, key) >= 1, key, "must be >= 1", getattr(cfg, key))
    for key in ("eval_every", "save_every", "warmup_steps"):
        _check(getattr(cfg, key) >= 0, key, "must be >= 0", getattr(cfg, key))
    _check(cfg.lr > 0, "lr", "must be > 0", cfg.lr)
    _check(cfg.weight_decay >= 0, "weight_decay", "must be >= 0", cfg.weight_decay)
    _check(
        cfg.schedule in ("constant", "linear", "cosine"), "schedule", "must be constant, linear or cosine", cfg.schedule
    )
    _check(
        cfg.max_grad_norm is None or cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0 or null", cfg.max_grad_norm
    )
    _check(cfg.threads is None or cfg.threads >= 1, "threads", "must be >= 1 or null", cfg.threads)
    acc = cfg.stop_at_accuracy
    _check(acc is None or 0 < acc <= 1, "stop_at_accuracy", "must be in (0, 1] or null", acc)
    if acc is not None:
        _check(cfg.eval_every >= 1, "eval_every", "must be >= 1 when stop_at_accuracy is set", cfg.eval_every)
    d = cfg.data
    _check(d.task in (None, "arithmetic", "addition"), "data.task", "must be 'arithmetic', 'addition' or null", d.task)
    _check(d.num_train >= 1 and d.num_test >= 1, "data.num_train/num_test", "must be >= 1", (d.num_train, d.num_test))
    if d.train_file is None:
        _check(d.task is not None, "data.train_file", "is required when data.task is null", d.train_file)
    m = cfg.model
    for key in ("hidden", "layers", "heads"):
        _check(getattr(m, key) >= 1, f"model.{key}", "must be >= 1", getattr(m, key))
    _check(m.hidden % m.heads == 0, "model.hidden", f"must be a multiple of model.heads ({m.heads})", m.hidden)
    return cfg


def load_sft_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SFTConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides, check everything; errors name the file and key."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config must be a mapping of settings, got {type(values).__name__}")
    values = _merge(values, parse_overrides(overrides or []))
    try:
        return validate_sft(_build(SFTConfig, values))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def _lr_factor(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_forced_loss(model: torch.nn.Module, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Mean next-token cross-entropy over the loss tokens of the batch. Positions count attended tokens
    only, as ``generate`` counts them, so a left-padded prompt is seen as it is at sampling time."""
    positions = (attention_mask.cumsum(1) - 1).clamp_min(0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).logits
    targets = torch.where(loss_mask[:, 1:], input_ids[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


class SFTTrainer:
    def __init__(self, cfg: SFTConfig) -> None:
        from vigor.trainer.checkpoint import latest_checkpoint, load_checkpoint
        from vigor.trainer.config import TrainConfig
        from vigor.trainer.data import load_prompts
        from vigor.trainer.files import atomic_write_text
        from vigor.trainer.metrics import MetricsLog
        from vigor.trainer.model import build_model, build_tokenizer, resolve_device
        from vigor.trainer.tasks import answer_checker, write_task

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.device = resolve_device(cfg.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        latest = latest_checkpoint(self.run_dir)
        if cfg.resume is None and latest is not None:
            raise ConfigError(
                f"run_dir {str(self.run_dir)!r} already holds a run (checkpoint {latest.name}): set resume=auto "
                "to continue it, or choose another run_dir"
            )
        resume = latest if cfg.resume == "auto" else (Path(cfg.resume) if cfg.resume else None)
        if resume is not None and not resume.is_dir():
            raise ConfigError(f"resume: checkpoint directory {str(resume)!r} does not exist")
        # the model and tokenizer builders read a TrainConfig: hand them one with this run's model and seed
        shim = TrainConfig(seed=cfg.seed, model=cfg.model, data=cfg.data)
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer(shim)
        d = cfg.data
        train_file, test_file = d.train_file, d.test_file
        if train_file is None:
            train_file, generated = write_task(
                d.task, self.run_dir / "data", cfg.seed, d.num_train, d.num_test, d.max_ops
            )
            test_file = test_file or generated
        self.add_special_tokens = not d.chat_template
        self.train_set = load_prompts(train_file, "data.train_file", d, self.tokenizer)
        if cfg.target_column not in self.train_set.columns:
            raise ConfigError(
                f"target_column {cfg.target_column!r} is not a column of {str(train_file)!r} "
                f"(it has {sorted(self.train_set.columns)})"
            )
        self.test_set = load_prompts(test_file, "data.test_file", d, self.tokenizer) if test_file else None
        if cfg.eval_every and (self.test_set is None or self.test_set.answers is None):
            raise ConfigError("eval_every is set but there is no held-out split with answers: set data.test_file")
        self.checker = answer_checker(d.task)
        self.model = build_model(shim, self.tokenizer, self.device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, cfg))
        self.step = 0
        if resume is not None:
            self.step = load_checkpoint(resume, self.model, self.optimizer, self.scheduler)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_until=self.step if resume else None)
        self.targets = [str(t) for t in self.train_set.columns[cfg.target_column]]
        self.sampling = SamplingConfig(group_size=1, max_new_tokens=cfg.max_new_tokens)

    def batch(self, step: int):
        """Step ``step``'s (1-based) rows as ``(input_ids, attention_mask, loss_mask)``: prompt, target, EOS."""
        from vigor.trainer.data import step_indices
        from vigor.trainer.sampling import pack_pairs

        rows = step_indices(step - 1, self.cfg.batch_size, len(self.train_set), self.cfg.seed)
        tok = self.tokenizer
        enc = lambda text, special: tok(text, add_special_tokens=special)["input_ids"]
        prompts = [enc(self.train_set.texts[i], self.add_special_tokens) for i in rows]
        targets = [[*enc(self.targets[i], False), tok.eos_token_id] for i in rows]
        return pack_pairs(prompts, targets, tok.pad_token_id, self.device)

    def train_step(self, step: int) -> dict[str, Any]:
        lr = self.scheduler.get_last_lr()[0]
        ids, attn, loss_mask = self.batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = teacher_forced_loss(self.model, ids, attn, loss_mask)
        loss.backward()
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        epoch = step * self.cfg.batch_size / len(self.train_set)
        return {"step": step, "epoch": epoch, "lr": lr, "loss": float(loss.detach()), "grad_norm": grad_norm}

    def evaluate(self) -> dict[str, float]:
        from vigor.trainer.evaluation import held_out_accuracy

        out = held_out_accuracy(
            self.model, self.tokenizer, self.test_set, self.checker, self.sampling, device=self.device,
            num_examples=self.cfg.eval_examples, batch_size=self.cfg.eval_batch_size, greedy=True,
            add_special_tokens=self.add_special_tokens,
        )  # fmt: skip
        self.model.train()
        return {f"eval/{k}": v for k, v in out.items()}

    def save(self) -> Path:
        from vigor.trainer.checkpoint import save_checkpoint

        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.cfg)

    def export(self) -> Path:
        """The model as a Hugging Face directory with its tokenizer and the SFT config and metrics beside it."""
        from vigor.trainer.files import atomic_write_text

        final = Path(self.cfg.export_dir) if self.cfg.export_dir else self.run_dir / "final_model"
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "sft_config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        shutil.copyfile(self.run_dir / "metrics.jsonl", tmp / "sft_metrics.jsonl")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def train(self) -> list[dict[str, Any]]:
        from tqdm import tqdm

        from vigor.trainer.metrics import write_plots

        cfg = self.cfg
        if cfg.eval_every and self.step == 0:
            self.metrics.log({"step": 0, **self.evaluate()})
        bar = tqdm(total=cfg.steps, initial=self.step, desc="vigor sft", disable=not cfg.progress, dynamic_ncols=True)
        while self.step < cfg.steps:
            record = self.train_step(self.step + 1)
            self.step += 1
            stop = self.step == cfg.steps
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or stop):
                record |= self.evaluate()
                reached = cfg.stop_at_accuracy is not None and record["eval/accuracy"] >= cfg.stop_at_accuracy
                record["stopped"] = reached
                stop = stop or reached
            self.metrics.log(record)
            bar.update(1)
            shown = {"loss": "loss", "eval/accuracy": "eval_acc"}
            bar.set_postfix({name: f"{record[k]:.3g}" for k, name in shown.items() if k in record})
            if stop or (cfg.save_every and self.step % cfg.save_every == 0):
                self.save()
            if stop:
                break
        bar.close()
        if cfg.plots:
            write_plots(self.metrics.records, self.run_dir / "plots", panels=False)
        self.export()
        return self.metrics.records


def sft(cfg: SFTConfig) -> list[dict[str, Any]]:
    """Run ``cfg`` until its stopping rule; returns every metrics record (also in ``<run_dir>/metrics.jsonl``)."""
    return SFTTrainer(cfg).train()
