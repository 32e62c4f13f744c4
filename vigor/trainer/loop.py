"""The GRPO training loop: sample groups, score them, update the policy; evaluate, verify, log, save.

One step: draw ``prompts_per_step`` prompts; sample ``group_size`` completions each (``generate``);
compute the weighted rewards and their group advantages; compute old log-probs (when
``num_iterations > 1``) and reference log-probs (when ``kl_coef > 0``); then ``num_iterations`` times:
accumulate the clipped-surrogate gradient over micro-batches, clip, take an AdamW step. The LR
schedule advances once per step.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from vigor import atomic, engine
from vigor.one_pass import OVER_BUDGET, SharedScore, score_for_update
from vigor.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vigor.trainer.config import ConfigError, TrainConfig, dump_config
from vigor.trainer.data import PromptSet, load_prompts, step_indices
from vigor.trainer.evaluation import duplicate_fraction, held_out_accuracy
from vigor.trainer.grpo import completion_logprobs, grpo_loss, token_stats
from vigor.trainer.metrics import MetricsLog, write_plots
from vigor.trainer.model import build_policy, build_tokenizer, resolve_device
from vigor.trainer.one_pass import OnePassChoice, bookkeep_budget, bookkept_coefficients, choose
from vigor.trainer.sampling import Rollouts, sample_rollouts
from vigor.trainer.scoring import RewardSet, StepRewards, theta_names
from vigor.trainer.tasks import answer_checker, write_task


def schedule_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base LR at (0-based) scheduler step ``step``: linear warm-up, then constant, linear
    or cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


ONE_PASS_CODES = {"off": 0, "graph": 1, "bookkeep": 2}  # the metrics' "one_pass": how the step shared its forward
FINAL_MODEL_TMP = ".final_model.tmp"  # export() writes here, then renames it to final_model


class TrainingDiverged(RuntimeError):
    """The loss, the gradient or the weights became non-finite; nothing of that step was saved."""


def _require_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"the {what} is {value}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """:func:`schedule_factor` of a training config."""
    return schedule_factor(step, cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.schedule)


def resume_path(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None for a fresh run (refused when ``run_dir`` already holds one),
    ``"auto"``: the latest in ``run_dir`` if any, else the named directory (which must exist)."""
    latest = latest_checkpoint(run_dir)
    if resume is None:
        if latest is not None:
            raise ConfigError(
                f"run.dir {str(run_dir)!r} already holds a run (checkpoint {latest.name}): set run.resume=auto "
                "to continue it, or choose another run.dir"
            )
        return None
    if resume == "auto":
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"run.resume: checkpoint directory {resume!r} does not exist")
    return path


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.device = resolve_device(cfg.compute.device)
        if cfg.compute.threads is not None:
            torch.set_num_threads(cfg.compute.threads)
        self.autocast = cfg.compute.precision == "bfloat16"
        self._remove_stale_temporaries()
        resume = self._resume_path()
        torch.manual_seed(cfg.run.seed)
        self.tokenizer = build_tokenizer(cfg)
        self.train_set, self.test_set = self._load_data()
        self.model, self.reference = build_policy(cfg, self.tokenizer, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.theta = theta_names(self.model, cfg.rewards.params)
        self.checker = answer_checker(cfg.data.task)
        self.rewards = RewardSet(
            cfg.rewards, cfg.sampling.group_size, cfg.run.seed, self.train_set.answers is not None, self.checker
        )
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0
        if resume is not None:
            self.step = load_checkpoint(resume, self.model, self.optimizer, self.scheduler)
        else:
            torch.manual_seed(cfg.run.seed)  # sampling starts from the same RNG state whatever was built above
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.run_dir / "config.yaml", dump_config(cfg))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_until=self.step if resume else None)
        self.one_pass: OnePassChoice | None = None  # chosen on the first batch (it looks at the model once)
        self._said_graph_instead = False  # a step over the book-keeping memory budget was reported

    # -- setup -------------------------------------------------------------------------------------------

    def _remove_stale_temporaries(self) -> None:
        """A write killed mid-way (power loss, SIGKILL) leaves its temporary behind: remove them on start."""
        if not self.run_dir.is_dir():
            return
        removed = atomic.remove_stale_temporaries(self.run_dir)
        final_tmp = self.run_dir / FINAL_MODEL_TMP
        if final_tmp.is_dir():
            shutil.rmtree(final_tmp)
            removed.append(final_tmp)
        if removed:
            print(f"{self.run_dir}: removed {len(removed)} temporary file(s) of interrupted writes", file=sys.stderr)

    def _resume_path(self) -> Path | None:
        return resume_path(self.run_dir, self.cfg.run.resume)

    def _load_data(self) -> tuple[PromptSet, PromptSet | None]:
        d = self.cfg.data
        train_file, test_file = d.train_file, d.test_file
        if train_file is None:
            train_file, generated_test = write_task(
                d.task, self.run_dir / "data", self.cfg.run.seed, d.num_train, d.num_test, d.max_ops
            )
            test_file = test_file or generated_test
        special = not d.chat_template  # a chat template already spells out its special tokens
        self.add_special_tokens = special
        train = load_prompts(train_file, "data.train_file", d, self.tokenizer)
        test = load_prompts(test_file, "data.test_file", d, self.tokenizer) if test_file else None
        if self.cfg.eval.every and test is None:
            raise ConfigError("eval.every is set but there is no held-out split: set data.test_file")
        return train, test

    # -- one step ------------------------------------------------------------------------------------------

    def _logprobs(self, model, ro: Rollouts, rows: slice, grad: bool):
        ctx = nullcontext() if grad else torch.no_grad()
        with ctx:
            return completion_logprobs(
                model, ro.input_ids[rows], ro.attention_mask[rows], ro.prompt_width,
                self.cfg.sampling.temperature, autocast=self.autocast,
            )  # fmt: skip

    def _reference_logprobs(self, ro: Rollouts, rows: slice) -> torch.Tensor:
        if self.reference is not None:
            return self._logprobs(self.reference, ro, rows, grad=False).logp
        with self.model.disable_adapter():  # LoRA: the base model is the reference
            return self._logprobs(self.model, ro, rows, grad=False).logp

    def _chunks(self, size: int) -> list[slice]:
        micro = self.cfg.optim.micro_batch_size or size
        return [slice(i, min(size, i + micro)) for i in range(0, size, micro)]

    def _choose_one_pass(self, ro: Rollouts) -> OnePassChoice:
        if self.one_pass is None:
            self.one_pass = choose(self.cfg, self.model, ro.input_ids, ro.attention_mask)
            if self.cfg.grpo.one_pass == "auto" and self.one_pass.reason:
                from tqdm import tqdm

                what = "one pass, reusing the scoring graph" if self.one_pass.mode == "graph" else "two passes"
                tqdm.write(f"vigor train: {what} for the VIGOR reward and the update ({self.one_pass.reason})")
        return self.one_pass

    def _shared_scoring(self, ro: Rollouts) -> list[SharedScore] | None:
        """The one-pass scoring of this batch, micro-batch by micro-batch, or None for two passes."""
        choice = self._choose_one_pass(ro)
        if choice.mode == "off":
            return None
        out = []
        keep = choice.mode == "bookkeep"
        budget = bookkeep_budget(self.cfg, self.device) if keep else None
        for rows in self._chunks(ro.size):
            batch = (ro.input_ids[rows], ro.attention_mask[rows], ro.loss_mask[rows])
            out.append(
                score_for_update(
                    self.model,
                    *batch,
                    params=self.theta,
                    update_params=self.params,
                    bookkeep=keep,
                    max_kept_bytes=budget,
                )
            )
        why = next((s.why_graph for s in out if s.why_graph), "")
        if why and not self._said_graph_instead:
            from tqdm import tqdm

            self._said_graph_instead = True
            limit = "; the limit is grpo.bookkeep_max_mib" if why.startswith(OVER_BUDGET) else ""
            tqdm.write(f"vigor train: a step reuses the scoring graph instead of book-keeping ({why}{limit})")
        return out

    def _update(self, ro: Rollouts, adv: torch.Tensor, shared: list[SharedScore] | None = None) -> dict[str, Any]:
        """``num_iterations`` optimizer steps on the batch; with ``shared`` (the one-pass scoring of the same
        micro-batches), the first one reuses its forward: bookkept gradients, or a backward on its graph."""
        cfg = self.cfg
        size = ro.size
        chunks = self._chunks(size)
        mask = ro.completion_mask
        n_tokens = int(mask.sum())
        denominator = float(size if cfg.grpo.loss_type == "grpo" else max(1, n_tokens))
        coef = bookkept_coefficients(adv, mask.sum(1), cfg.grpo.loss_type, denominator)
        old = ref = None
        if cfg.grpo.num_iterations > 1 and shared is not None:
            old = [None] * len(chunks)  # taken from the shared forward in the first iteration
        elif cfg.grpo.num_iterations > 1:
            old = [self._logprobs(self.model, ro, c, grad=False).logp for c in chunks]
        if cfg.grpo.kl_coef > 0:
            ref = [self._reference_logprobs(ro, c) for c in chunks]
        self.model.train()
        totals = dict(loss=0.0, clipped=0.0, kl=0.0, entropy=0.0, grad_norm=0.0)
        for it in range(cfg.grpo.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for k, rows in enumerate(chunks):
                reuse = shared[k] if it == 0 and shared is not None else None
                if reuse is not None:
                    stats = token_stats(reuse.logits, ro.input_ids[rows], ro.prompt_width, cfg.sampling.temperature)
                    if old is not None:
                        old[k] = stats.logp.detach()
                else:
                    stats = self._logprobs(self.model, ro, rows, grad=True)
                old_logp = old[k] if old is not None else stats.logp.detach()
                parts = grpo_loss(
                    stats.logp, old_logp, None if ref is None else ref[k], adv[rows], mask[rows], cfg.grpo, denominator
                )
                if reuse is not None and reuse.mode == "bookkept":
                    reuse.write_grads(coef[rows])  # the gradient of parts.loss, from the norm pass's captures
                else:
                    parts.loss.backward()
                    if reuse is not None:
                        reuse.release()  # the graph is spent: let it go before the next micro-batch
                totals["loss"] += float(parts.loss.detach())
                totals["clipped"] += parts.clipped_tokens
                totals["kl"] += parts.kl_sum
                if it == 0:
                    totals["entropy"] += float((stats.entropy * mask[rows]).sum())
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            # stop before an optimizer step can carry a NaN into the weights (and from there into checkpoints)
            _require_finite(totals["loss"], "loss")
            _require_finite(grad_norm, "gradient norm")
            totals["grad_norm"] += grad_norm
            self.optimizer.step()
            if not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):  # one device sync
                raise TrainingDiverged("an optimizer step made some weights non-finite")
        self.optimizer.zero_grad(set_to_none=True)
        iters = cfg.grpo.num_iterations
        per_token = lambda v: v / n_tokens if n_tokens else None
        out = {
            "loss": totals["loss"] / iters,
            "grad_norm": totals["grad_norm"] / iters,
            "entropy": per_token(totals["entropy"]),
            "clip_fraction": per_token(totals["clipped"] / iters),
        }
        if cfg.grpo.kl_coef > 0:
            out["kl"] = per_token(totals["kl"] / iters)
        return out

    def _verify(self, ro: Rollouts) -> dict[str, Any]:
        """Engine vs oracle on the first few valid completions of this step's batch."""
        from vigor.engine import per_sample_grad_norms
        from vigor.oracle import oracle_grad_norms
        from vigor.verify import TOLERANCE, Verification

        rows = ro.loss_mask.any(1).nonzero().flatten()[: self.cfg.verify.completions]
        if rows.numel() == 0:
            return {}
        batch = (ro.input_ids[rows], ro.attention_mask[rows], ro.loss_mask[rows])
        engine = per_sample_grad_norms(self.model, *batch, params=self.theta, backend=self.cfg.rewards.backend)
        oracle = oracle_grad_norms(self.model, *batch, params=self.theta)
        tolerance = TOLERANCE.get(next(self.model.parameters()).dtype, 1e-4)
        check = Verification(engine.cpu(), oracle.cpu(), [], [], tolerance)
        if not check.ok:
            from tqdm import tqdm

            tqdm.write(f"warning: VIGOR engine vs oracle: max relative error {check.max_rel_err:.3e} > {tolerance:g}")
        return {"verify/max_rel_err": check.max_rel_err}

    def reward_and_update(self, ro: Rollouts, prompts: PromptSet, step: int) -> tuple[StepRewards, dict, float]:
        """The rewards of a sampled batch and the policy update on it: ``(rewards, update metrics, the
        perf_counter time the rewards were ready)``. One pass or two (``grpo.one_pass``)."""
        shared = self._shared_scoring(ro)
        norms = None if shared is None else torch.cat([s.norms for s in shared])
        kept_mib = None  # the memory book-keeping holds until the advantages are known
        if shared is not None and any(s.mode == "bookkept" for s in shared):
            kept_mib = sum(s.kept_bytes() for s in shared if s.mode == "bookkept") / 2**20
        rewards: StepRewards = self.rewards(self.model, ro, prompts, step, self.theta, vigor_norms=norms)
        ready = time.perf_counter()
        update = self._update(ro, rewards.advantages, shared)
        how = "off" if shared is None else "bookkeep" if all(s.mode == "bookkept" for s in shared) else "graph"
        update["one_pass"] = ONE_PASS_CODES[how]
        if kept_mib is not None:
            update["one_pass/kept_mib"] = kept_mib
        return rewards, update, ready

    def train_step(self, step: int) -> dict[str, Any]:
        """Step ``step`` (1-based): sample, reward, update. Returns its metrics."""
        cfg, G = self.cfg, self.cfg.sampling.group_size
        lr = self.scheduler.get_last_lr()[0]
        t0 = time.perf_counter()
        prompts = self.train_set.select(
            step_indices(step - 1, cfg.sampling.prompts_per_step, len(self.train_set), cfg.run.seed)
        )
        ro = sample_rollouts(
            self.model, self.tokenizer, prompts.texts, cfg.sampling, device=self.device,
            add_special_tokens=self.add_special_tokens, autocast=self.autocast,
        )  # fmt: skip
        t1 = time.perf_counter()
        rewards, update, t2 = self.reward_and_update(ro, prompts, step)
        t3 = time.perf_counter()
        self.scheduler.step()
        valid = ro.loss_mask.any(1)
        record: dict[str, Any] = {
            "step": step,
            "epoch": step * cfg.sampling.prompts_per_step / len(self.train_set),
            "lr": lr,
            "reward": float(rewards.total.mean()),
            "reward_std": float(rewards.total.reshape(-1, G).std(1).mean()) if G > 1 else 0.0,
            **{f"reward/{n}": float(v.mean()) for n, v in rewards.components.items()},
        }
        if rewards.accuracy is not None:
            record["accuracy"] = float(rewards.accuracy.mean())
        if rewards.vigor is not None and rewards.vigor.valid.any():
            record["vigor/raw"] = float(rewards.vigor.raw[rewards.vigor.valid].mean())
            record["vigor/grad_norm"] = float(rewards.vigor.norms[rewards.vigor.valid].mean())
        record |= {
            "completion_length": float(ro.lengths.float().mean()),
            "duplicates": duplicate_fraction(ro.texts, G),
            "truncated": float(ro.truncated.float().mean()),
            "valid": float(valid.float().mean()),
            **update,
        }
        if cfg.verify.every and step % cfg.verify.every == 0:
            record |= self._verify(ro)
        check = engine.LAST_SELF_CHECK  # the engine's first-call self-check, logged once
        if check is not None and check is not getattr(self, "_logged_self_check", None):
            record["self_check/max_rel_err"] = check.max_rel_err
            self._logged_self_check = check
        record |= {"time/sample": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0}
        return record

    # -- evaluation ----------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Greedy decoding on the first ``eval.num_examples`` held-out prompts."""
        e = self.cfg.eval
        out = held_out_accuracy(
            self.model, self.tokenizer, self.test_set, self.checker, self.cfg.sampling, device=self.device,
            num_examples=e.num_examples, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
            add_special_tokens=self.add_special_tokens, autocast=self.autocast,
        )  # fmt: skip
        return {f"eval/{k}": v for k, v in out.items()}

    # -- the loop ------------------------------------------------------------------------------------------

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.cfg)

    def plot(self, panels: bool = False) -> None:
        if self.cfg.plots.enabled:
            write_plots(self.metrics.records, self.run_dir / "plots", panels=panels)

    def export(self) -> Path:
        """The final policy as a Hugging Face directory (LoRA: the adapter), with its tokenizer."""
        final = self.run_dir / "final_model"
        tmp = self.run_dir / FINAL_MODEL_TMP
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def train(self) -> list[dict[str, Any]]:
        from tqdm import tqdm

        cfg = self.cfg
        if cfg.eval.every and self.step == 0:
            self.metrics.log({"step": 0, **self.evaluate()})
        bar = tqdm(
            total=cfg.run.steps, initial=self.step, desc="vigor train", disable=not cfg.run.progress, dynamic_ncols=True
        )
        while self.step < cfg.run.steps:
            try:
                record = self.train_step(self.step + 1)
            except TrainingDiverged as e:
                bar.close()
                latest = latest_checkpoint(self.run_dir)
                kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been saved"
                raise TrainingDiverged(
                    f"step {self.step + 1}: {e}; the run stopped without saving this step ({kept}; a lower "
                    "optim.lr or optim.max_grad_norm may help)"
                ) from None
            self.step += 1
            last = self.step == cfg.run.steps
            if cfg.eval.every and (self.step % cfg.eval.every == 0 or last):
                record |= self.evaluate()
            self.metrics.log(record)
            bar.update(1)
            # rank-shaped rewards average to 0 in every group: show what moves (VIGOR's raw reward, accuracy, length)
            shown = {
                "accuracy": "acc",
                "eval/accuracy": "eval_acc",
                "vigor/raw": "vigor_raw",
                "completion_length": "len",
            }
            bar.set_postfix({name: f"{record[k]:.3g}" for k, name in shown.items() if k in record})
            saved = last or (cfg.run.save_every and self.step % cfg.run.save_every == 0)
            if saved:
                self.save()
            if not last and (saved or (cfg.plots.every and self.step % cfg.plots.every == 0)):
                self.plot()
        bar.close()
        self.plot(panels=True)
        self.export()
        return self.metrics.records


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Run ``cfg`` to ``cfg.run.steps``; returns every metrics record (also in ``<run_dir>/metrics.jsonl``)."""
    return Trainer(cfg).train()
