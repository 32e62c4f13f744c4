"""VIGOR and self-certainty rewards for TRL's ``GRPOTrainer``, scored in one batched pass.

Usage: add the reward to an existing GRPO script, nothing else changes::

    from vigor.integrations.trl import VigorReward

    trainer = GRPOTrainer(model=..., reward_funcs=[VigorReward()], args=GRPOConfig(...), train_dataset=...)

Why a reward callable and not a ``GRPOTrainer`` subclass: TRL's reward interface (a callable receiving
``prompts``, ``completions``, ``completion_ids`` and ``log_metric``) is public and stable, composes with the
user's other rewards and ``reward_weights``, and keeps working when the user already has their own
``GRPOTrainer`` subclass (or one of TRL's experimental trainers deriving from it). A subclass would have to
override private methods (``_generate``, ``_calculate_rewards``) whose signatures change between releases.
The reward finds its trainer from the ``log_metric`` hook TRL hands it (a bound method of the trainer); where
that is not possible, ``reward.bind(trainer)`` says it explicitly.

What the reward computes (docs/reward.md), for each completion TRL hands it:

- the token sequence TRL trained on: the prompt tokenized by TRL's own ``_tokenize_prompts`` (plain text with
  the tokenizer's special tokens, or the chat template with ``add_generation_prompt=True``), left-padded with
  the pad token, followed by TRL's ``completion_ids`` right-padded, ``pad_to_multiple_of`` applied as TRL does;
  the loss mask covers the completion tokens, and is empty for a truncated completion (last token neither EOS
  nor pad) when ``mask_truncated_completions=True``, as in TRL's own loss;
- VIGOR: ``r_b = -sqrt(T_b) ||grad_theta L_b||`` under the trainer's model as it is when TRL asks for rewards
  (temperature 1, eval mode, theta = every parameter with ``requires_grad``, i.e. the adapters for a peft
  model), rank-shaped inside each group of ``num_generations`` with invalid completions ranked last;
- self-certainty: ``SC_b``, left for TRL's group z-score; an invalid completion returns ``None`` (TRL turns it
  into NaN, leaves it out of the group's mean and std and gives it advantage 0; TRL's loss masks it anyway).

TRL then computes, per group, ``(s_b - mean) / (std + 1e-4)`` with the unbiased std (``nanstd``), in float32:
the group advantage of docs/reward.md#group-advantage, as long as ``scale_rewards="group"`` and
``multi_objective_aggregation="sum_then_normalize"`` (TRL's defaults) and the reward's weight is 1 (a weight
``w`` turns the epsilon into ``1e-4 / w``). The reward warns at binding when the trainer is configured
otherwise. ``vigor.group_advantages`` computes the same in float64; the two differ by float32 rounding only
(below 1e-6).

Several processes: each process scores its own completions (one batched pass on its local generation batch),
then the per-completion norms and token counts of all processes are gathered (a ``[B, 2]`` float tensor per
process, in process order, the order TRL's own reward gather uses) and shaped per group on the whole
generation batch; each process returns its own slice. A group that TRL's sampler splits across two processes
(when ``per_device_train_batch_size * steps_per_generation`` is not a multiple of ``num_generations``) is thus
ranked whole. With the model replicated on every process (DDP, DeepSpeed ZeRO-1/2) or sharded by FSDP2
(accelerate's ``fsdp_version: 2``; the norms need only each layer's input and output gradient, which are local
to a process: docs/engine.md#sharded-models-fsdp2), scores are exact. FSDP1 and DeepSpeed ZeRO-3 are refused: the
engine is not verified on them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from vigor.engine import per_sample_grad_norms
from vigor.packing import PackedBatch, pack_completions
from vigor.rewards import self_certainty_scores, shape_vigor

TrlBatch = PackedBatch  # a local generation batch laid out exactly as GRPOTrainer lays out its policy forward


def trl_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_token_ids: Iterable[int] = (),
    mask_truncated_completions: bool = False,
    pad_to_multiple_of: int | None = None,
    device: torch.device | str = "cpu",
) -> TrlBatch:
    """GRPOTrainer's layout of prompt + completion ids (``_generate_and_score_completions`` in trl 1.16).

    A completion is truncated when its last token is neither an EOS id nor the pad id; with
    ``mask_truncated_completions`` its completion mask (attention and loss) is zeroed, as TRL does.
    """
    return pack_completions(
        prompt_ids,
        completion_ids,
        pad_id=pad_token_id,
        stop_ids=[*eos_token_ids, pad_token_id],
        mask_truncated=mask_truncated_completions,
        hide_truncated=True,
        pad_to_multiple_of=pad_to_multiple_of,
        device=device,
    )


def _chunks(size: int, max_rows: int | None) -> list[slice]:
    step = max_rows or size
    return [slice(i, min(i + step, size)) for i in range(0, size, step)]


def score_norms(
    model: nn.Module,
    batch: TrlBatch,
    *,
    params: Iterable[str] | None = None,
    backend: str | None = None,
    max_batch_size: int | None = None,
) -> torch.Tensor:
    """``||grad_theta L_b||`` of every completion of ``batch``, at most ``max_batch_size`` rows per engine pass
    (an empty theta is the engine's :class:`vigor.ThetaError`)."""
    return torch.cat(
        [
            per_sample_grad_norms(
                model,
                batch.input_ids[rows],
                batch.attention_mask[rows],
                batch.loss_mask[rows],
                params=params,
                backend=backend,
            )
            for rows in _chunks(batch.input_ids.shape[0], max_batch_size)
        ]
    )


class _Distributed:
    """The process layout the reward sees: its index, the count, and a gather in process order."""

    def __init__(self, process_index: int, num_processes: int, gather: Callable[[torch.Tensor], torch.Tensor]):
        self.process_index = process_index
        self.num_processes = num_processes
        self.gather = gather

    @classmethod
    def of(cls, accelerator: Any) -> _Distributed:
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.gather)

    def whole_batch(self, local: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """All processes' rows (process-major, as TRL gathers rewards) and this process's slice of them."""
        rows = local.shape[0]
        here = slice(self.process_index * rows, (self.process_index + 1) * rows)
        if self.num_processes == 1:
            return local, here
        gathered = self.gather(local.contiguous())
        if gathered.shape[0] != rows * self.num_processes:
            raise RuntimeError(
                f"gathered {gathered.shape[0]} rows from {self.num_processes} processes of {rows} rows each: "
                "every process must score a local batch of the same size"
            )
        return gathered, here


class _TrainerReward:
    """Plumbing shared by the rewards: find and check the trainer, rebuild TRL's batch, log metrics."""

    __name__ = "trl_reward"

    def __init__(self, *, name: str, max_batch_size: int | None) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive number of completions, got {max_batch_size}")
        self.__name__ = name  # TRL names the reward's logs after it: rewards/<name>/mean
        self.max_batch_size = max_batch_size
        self._trainer = None

    def __getstate__(self) -> dict:
        # Picklable like TRL's other reward forms; the trainer binding is found again on the first call.
        return {**self.__dict__, "_trainer": None}

    def bind(self, trainer: Any) -> _TrainerReward:
        """Attach to a ``trl.GRPOTrainer`` (done automatically on the first call when TRL passes ``log_metric``)."""
        from trl import GRPOTrainer

        if not isinstance(trainer, GRPOTrainer):
            raise TypeError(
                f"{type(self).__name__} works with trl.GRPOTrainer (its group normalization gives VIGOR's "
                f"group advantage), got {type(trainer).__name__}"
            )
        _check_supported(trainer, self.__name__)
        _warn_if_not_spec_advantage(trainer, self)
        self._trainer = trainer
        return self

    def _resolve_trainer(self, log_metric: Any) -> Any:
        from trl import GRPOTrainer

        caller = getattr(log_metric, "__self__", None)
        if isinstance(caller, GRPOTrainer):
            if self._trainer is not None and self._trainer is not caller:
                raise RuntimeError(
                    f"{type(self).__name__} '{self.__name__}' is bound to one GRPOTrainer but called by another: "
                    "use one reward object per trainer"
                )
            if self._trainer is None:
                self.bind(caller)
        if self._trainer is None:
            raise RuntimeError(
                f"{type(self).__name__} could not find its GRPOTrainer from the reward call (TRL did not pass its "
                "log_metric hook): call reward.bind(trainer) after building the trainer"
            )
        return self._trainer

    def _batch(self, trainer: Any, model: nn.Module, prompts: list, completion_ids: list) -> TrlBatch:
        # TRL's own prompt tokenization (plain text or chat template, special tokens, chat_template_kwargs): the
        # reward kwargs carry the prompts but not their ids, and re-implementing it could drift silently.
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        return trl_batch(
            prompt_ids,
            completion_ids,
            pad_token_id=trainer._tokenizer.pad_token_id,
            eos_token_ids=trainer.eos_token_ids,
            mask_truncated_completions=trainer.mask_truncated_completions,
            pad_to_multiple_of=trainer.pad_to_multiple_of,
            device=model.get_input_embeddings().weight.device,
        )

    def _log(self, log_metric: Any, stats: dict[str, float]) -> None:
        if callable(log_metric):
            for key, value in stats.items():
                log_metric(f"{self.__name__}/{key}", float(value))


class VigorReward(_TrainerReward):
    """The VIGOR reward as a TRL reward function: rank-shaped ``-sqrt(T) ||grad L||`` per group.

    ``sqrt_length=False`` drops the ``sqrt(T_b)`` correction; ``rank=False`` returns z-scored raw rewards
    instead of ranks (TRL's group normalization then re-standardizes them); ``params`` restricts theta to
    parameters of the trainer's model named as ``model.named_parameters()`` spells them; ``backend`` picks the
    vigor_kernels backend; ``max_batch_size`` caps how many completions one engine pass scores (the layout,
    hence every number, is unchanged; only peak memory drops). Logs ``<name>/grad_norm_{mean,min,max}`` over
    valid completions and ``<name>/invalid_fraction`` through TRL's ``log_metric``, over the whole generation
    batch of all processes.
    """

    def __init__(
        self,
        *,
        sqrt_length: bool = True,
        rank: bool = True,
        params: Iterable[str] | None = None,
        backend: str | None = None,
        max_batch_size: int | None = None,
        name: str = "vigor",
    ) -> None:
        if params is not None:
            params = list(params)
            if not all(isinstance(p, str) for p in params):
                raise TypeError("params must be parameter names (strings): the trainer may wrap or move the model")
        self.sqrt_length = sqrt_length
        self.rank = rank
        self.params = params
        self.backend = backend
        super().__init__(name=name, max_batch_size=max_batch_size)

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        log_metric = kwargs.get("log_metric")
        trainer = self._resolve_trainer(log_metric)
        model = trainer.accelerator.unwrap_model(trainer.model)
        group_size = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        batch = self._batch(trainer, model, prompts, completion_ids)
        norms = score_norms(model, batch, params=self.params, backend=self.backend, max_batch_size=self.max_batch_size)
        counts = batch.loss_mask.sum(1).to(norms.dtype)
        both, here = _Distributed.of(trainer.accelerator).whole_batch(torch.stack([norms, counts], 1))
        all_norms, all_counts = both[:, 0], both[:, 1].round().long()
        shaped = shape_vigor(all_norms, all_counts, group_size, sqrt_length=self.sqrt_length, rank=self.rank).rewards
        self._log(log_metric, vigor_stats(all_norms, all_counts))
        return shaped[here].tolist()


def vigor_stats(norms: torch.Tensor, token_counts: torch.Tensor) -> dict[str, float]:
    """Gradient-norm statistics over the valid completions, and the fraction that is invalid."""
    valid = token_counts > 0
    stats = {"invalid_fraction": float((~valid).float().mean())}
    if valid.any():
        v = norms[valid].double()
        stats.update(grad_norm_mean=float(v.mean()), grad_norm_min=float(v.min()), grad_norm_max=float(v.max()))
    return stats


class SelfCertaintyReward(_TrainerReward):
    """INTUITOR's self-certainty ``(1/T) sum_t KL(U || p_t)`` as a TRL reward function (TRL z-scores it per
    group). Invalid completions return ``None``. Logs ``<name>/invalid_fraction`` of this process's batch."""

    def __init__(self, *, max_batch_size: int | None = None, name: str = "self_certainty") -> None:
        super().__init__(name=name, max_batch_size=max_batch_size)

    def __call__(
        self, prompts: list, completions: list, completion_ids: list[list[int]], **kwargs: Any
    ) -> list[float | None]:
        log_metric = kwargs.get("log_metric")
        trainer = self._resolve_trainer(log_metric)
        model = trainer.accelerator.unwrap_model(trainer.model)
        batch = self._batch(trainer, model, prompts, completion_ids)
        scores, valid = [], []
        for rows in _chunks(batch.input_ids.shape[0], self.max_batch_size):
            sc, ok = self_certainty_scores(
                model, batch.input_ids[rows], batch.attention_mask[rows], batch.loss_mask[rows]
            )
            scores.append(sc)
            valid.append(ok)
        sc, ok = torch.cat(scores), torch.cat(valid)
        self._log(log_metric, {"invalid_fraction": float((~ok).float().mean())})
        return [float(s) if v else None for s, v in zip(sc.tolist(), ok.tolist(), strict=True)]


# What the bridge reads from a GRPOTrainer (trl 1.16): how TRL tokenized the prompts and laid out its batch.
_TRAINER_ATTRIBUTES = (
    "_tokenize_prompts",
    "_tokenizer",
    "eos_token_ids",
    "mask_truncated_completions",
    "pad_to_multiple_of",
    "num_generations",
    "num_generations_eval",
    "accelerator",
    "scale_rewards",
    "multi_objective_aggregation",
)


def _check_supported(trainer: Any, name: str) -> None:
    """Refuse configurations whose token sequences or parameters the reward cannot see exactly."""
    missing = [a for a in _TRAINER_ATTRIBUTES if not hasattr(trainer, a)]
    if missing:
        raise TypeError(
            f"reward '{name}' reads {missing} from the trainer, which this trl release lacks: the bridge is written "
            "against trl 1.16's GRPOTrainer"
        )
    reasons = []
    if getattr(trainer, "tools", None):
        reasons.append("tools (completion_ids then hold tool-result tokens, and TRL does not pass their mask)")
    if getattr(trainer, "environment_factories", None) is not None:
        reasons.append("environment_factory (environment tokens inside completion_ids are not masked for rewards)")
    if getattr(trainer, "rollout_func", None) is not None:
        reasons.append("rollout_func (its prompt_ids are not passed to reward functions)")
    if getattr(trainer, "_is_vlm", False):
        reasons.append("a vision-language model (the engine scores text-only causal LMs)")
    fsdp_plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) and getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        reasons.append("FSDP1 (the engine is verified on FSDP2's sharded parameters only: set fsdp_version: 2)")
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and getattr(plugin, "zero_stage", 0) == 3:
        reasons.append("DeepSpeed ZeRO-3 (its sharded parameters are not verified; use FSDP2, ZeRO-1/2 or DDP)")
    if reasons:
        raise ValueError(f"reward '{name}' cannot score exactly with " + "; ".join(reasons))


def _warn_if_not_spec_advantage(trainer: Any, reward: _TrainerReward) -> None:
    """TRL's settings under which its group normalization is VIGOR's group advantage
    (docs/reward.md#group-advantage); warn about the others."""
    problems = []
    if trainer.scale_rewards != "group":
        problems.append(f"scale_rewards='{trainer.scale_rewards}' (VIGOR divides by the group std: use 'group')")
    if trainer.multi_objective_aggregation != "sum_then_normalize":
        problems.append(f"multi_objective_aggregation='{trainer.multi_objective_aggregation}'")
    weights = [float(w) for f, w in zip(trainer.reward_funcs, trainer.reward_weights, strict=True) if f is reward]
    if weights and weights[0] != 1.0:
        problems.append(f"reward weight {weights[0]} (the advantage's epsilon becomes 1e-4 / {weights[0]})")
    if problems:
        warnings.warn(
            f"reward '{reward.__name__}': TRL's advantage will differ from (s - mean) / (std + 1e-4) because of "
            + "; ".join(problems),
            stacklevel=3,
        )


__all__ = [
    "SelfCertaintyReward",
    "TrlBatch",
    "VigorReward",
    "score_norms",
    "trl_batch",
    "vigor_stats",
]
