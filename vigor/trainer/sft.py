"""Supervised warm-up (``vigor sft``): teacher-forced training on a task's solutions, so that GRPO starts from a
policy that solves the task some of the time.

One step: ``sft.batch_size`` training rows in the seeded order of ``data.step_indices``; the loss is the mean
cross-entropy over every target token (``sft.target_column`` + EOS) of the batch, the prompt carries none;
AdamW with a linear warm-up and a constant, linear or cosine schedule. Every ``eval.every`` steps: greedy
accuracy on the held-out split (the task's answer check). ``sft.stop_at_accuracy`` is the stopping rule fixed
in advance: training ends at the first evaluation at or above it (or at ``run.steps``), and the model of that
step is exported as a Hugging Face directory with its tokenizer (``sft.export_dir``), ready for
``model.name`` of a GRPO run. Checkpoints, ``metrics.jsonl`` and plots as in ``vigor train``; resuming a
checkpoint reproduces the uninterrupted run.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vigor.trainer.config import ConfigError, SamplingSettings, SFTConfig
from vigor.trainer.loop import resume_path, schedule_factor


def load_sft_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SFTConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides, check everything; errors name the file and key."""
    return SFTConfig.load(path, overrides)


def teacher_forced_loss(model: torch.nn.Module, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Mean next-token cross-entropy over the loss tokens of the batch. Positions count attended tokens
    only, as ``generate`` counts them, so a left-padded prompt is seen as it is at sampling time."""
    positions = (attention_mask.cumsum(1) - 1).clamp_min(0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).logits
    targets = torch.where(loss_mask[:, 1:], input_ids[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


class SFTTrainer:
    def __init__(self, cfg: SFTConfig) -> None:
        from vigor.atomic import write_text as atomic_write_text
        from vigor.trainer.checkpoint import load_checkpoint
        from vigor.trainer.config import RunSettings, TrainConfig
        from vigor.trainer.data import load_prompts
        from vigor.trainer.metrics import MetricsLog
        from vigor.trainer.model import build_model, build_tokenizer, resolve_device
        from vigor.trainer.tasks import answer_checker, write_task

        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.device = resolve_device(cfg.compute.device)
        if cfg.compute.threads is not None:
            torch.set_num_threads(cfg.compute.threads)
        resume = resume_path(self.run_dir, cfg.run.resume)
        # the model and tokenizer builders read a TrainConfig: hand them one with this run's model and seed
        shim = TrainConfig(run=RunSettings(seed=cfg.run.seed), model=cfg.model, data=cfg.data)
        torch.manual_seed(cfg.run.seed)
        self.tokenizer = build_tokenizer(shim)
        d = cfg.data
        train_file, test_file = d.train_file, d.test_file
        if train_file is None:
            train_file, generated = write_task(
                d.task, self.run_dir / "data", cfg.run.seed, d.num_train, d.num_test, d.max_ops
            )
            test_file = test_file or generated
        self.add_special_tokens = not d.chat_template
        self.train_set = load_prompts(train_file, "data.train_file", d, self.tokenizer)
        if cfg.sft.target_column not in self.train_set.columns:
            raise ConfigError(
                f"sft.target_column {cfg.sft.target_column!r} is not a column of {str(train_file)!r} "
                f"(it has {sorted(self.train_set.columns)})"
            )
        self.test_set = load_prompts(test_file, "data.test_file", d, self.tokenizer) if test_file else None
        if cfg.eval.every and (self.test_set is None or self.test_set.answers is None):
            raise ConfigError("eval.every is set but there is no held-out split with answers: set data.test_file")
        self.checker = answer_checker(d.task)
        self.model = build_model(shim, self.tokenizer, self.device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        )
        factor = lambda s: schedule_factor(s, o.warmup_steps, cfg.run.steps, o.schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.step = 0
        if resume is not None:
            self.step = load_checkpoint(resume, self.model, self.optimizer, self.scheduler)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", cfg.dump())
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_until=self.step if resume else None)
        self.targets = [str(t) for t in self.train_set.columns[cfg.sft.target_column]]
        self.sampling = SamplingSettings(group_size=1, max_new_tokens=cfg.eval.max_new_tokens)

    def batch(self, step: int):
        """Step ``step``'s (1-based) rows as ``(input_ids, attention_mask, loss_mask)``: prompt, target, EOS."""
        from vigor.packing import pack_completions
        from vigor.trainer.data import step_indices

        rows = step_indices(step - 1, self.cfg.sft.batch_size, len(self.train_set), self.cfg.run.seed)
        tok = self.tokenizer
        enc = lambda text, special: tok(text, add_special_tokens=special)["input_ids"]
        prompts = [enc(self.train_set.texts[i], self.add_special_tokens) for i in rows]
        targets = [[*enc(self.targets[i], False), tok.eos_token_id] for i in rows]
        packed = pack_completions(prompts, targets, pad_id=tok.pad_token_id, device=self.device)
        return packed.input_ids, packed.attention_mask, packed.loss_mask

    def train_step(self, step: int) -> dict[str, Any]:
        lr = self.scheduler.get_last_lr()[0]
        ids, attn, loss_mask = self.batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = teacher_forced_loss(self.model, ids, attn, loss_mask)
        loss.backward()
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        epoch = step * self.cfg.sft.batch_size / len(self.train_set)
        return {"step": step, "epoch": epoch, "lr": lr, "loss": float(loss.detach()), "grad_norm": grad_norm}

    def evaluate(self) -> dict[str, float]:
        from vigor.trainer.evaluation import held_out_accuracy

        out = held_out_accuracy(
            self.model, self.tokenizer, self.test_set, self.checker, self.sampling, device=self.device,
            num_examples=self.cfg.eval.num_examples, batch_size=self.cfg.eval.batch_size, greedy=True,
            add_special_tokens=self.add_special_tokens,
        )  # fmt: skip
        self.model.train()
        return {f"eval/{k}": v for k, v in out.items()}

    def save(self) -> Path:
        from vigor.trainer.checkpoint import save_checkpoint

        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.cfg)

    def export(self) -> Path:
        """The model as a Hugging Face directory with its tokenizer and the SFT config and metrics beside it."""
        from vigor.atomic import write_text as atomic_write_text

        final = Path(self.cfg.sft.export_dir) if self.cfg.sft.export_dir else self.run_dir / "final_model"
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "sft_config.yaml", self.cfg.dump())
        shutil.copyfile(self.run_dir / "metrics.jsonl", tmp / "sft_metrics.jsonl")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def train(self) -> list[dict[str, Any]]:
        from tqdm import tqdm

        from vigor.trainer.metrics import write_plots

        cfg = self.cfg
        if cfg.eval.every and self.step == 0:
            self.metrics.log({"step": 0, **self.evaluate()})
        bar = tqdm(
            total=cfg.run.steps, initial=self.step, desc="vigor sft", disable=not cfg.run.progress, dynamic_ncols=True
        )
        while self.step < cfg.run.steps:
            record = self.train_step(self.step + 1)
            self.step += 1
            stop = self.step == cfg.run.steps
            if cfg.eval.every and (self.step % cfg.eval.every == 0 or stop):
                record |= self.evaluate()
                reached = cfg.sft.stop_at_accuracy is not None and record["eval/accuracy"] >= cfg.sft.stop_at_accuracy
                record["stopped"] = reached
                stop = stop or reached
            self.metrics.log(record)
            bar.update(1)
            shown = {"loss": "loss", "eval/accuracy": "eval_acc"}
            bar.set_postfix({name: f"{record[k]:.3g}" for k, name in shown.items() if k in record})
            if stop or (cfg.run.save_every and self.step % cfg.run.save_every == 0):
                self.save()
            if stop:
                break
        bar.close()
        if cfg.plots.enabled:
            write_plots(self.metrics.records, self.run_dir / "plots", panels=False)
        self.export()
        return self.metrics.records


def sft(cfg: SFTConfig) -> list[dict[str, Any]]:
    """Run ``cfg`` until its stopping rule; returns every metrics record (also in ``<run_dir>/metrics.jsonl``)."""
    return SFTTrainer(cfg).train()
