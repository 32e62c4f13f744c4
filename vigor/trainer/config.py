"""The trainer's configuration (``vigor train``'s and ``vigor sft``'s): sections of settings, loaded from YAML,
overridden from the command line.

Every setting carries its help text and range rule in its field's metadata (:mod:`vigor.trainer.settings`);
``configs/README.md``'s settings tables are generated from them (``python -m vigor.trainer.config_docs``).
Every key is checked before any model is built: an unknown key, a value of the wrong type or out of range
is a ``ConfigError`` naming the key (``sampling.group_size``) and what was expected. The flat top-level
keys of earlier versions (``steps``, ``run_dir``, ``precision: bf16``...) are still read, with a one-line
deprecation warning naming their new place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vigor.dtypes import DTYPES
from vigor.trainer.settings import (
    ConfigError,
    Rule,
    Section,
    TopLevel,
    above,
    at_least,
    matching,
    one_of,
    parse_overrides,
    require,
    section,
    setting,
    within,
)
from vigor_kernels.dispatch import BACKEND_MODULES

__all__ = ["BUILTIN_REWARDS", "ConfigError", "SFTConfig", "TrainConfig", "config_from_dict", "load_config"]
__all__ += ["dump_config", "parse_overrides"]

BUILTIN_REWARDS = ("vigor", "self_certainty", "mean_logprob", "random", "math")
TASKS = ("arithmetic", "addition")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class RunSettings(Section):
    """Where the run writes, how long it runs, its seed, checkpoints and resuming."""

    dir: str = setting("runs/vigor", "where everything is written; a fresh run refuses a directory with checkpoints")
    seed: int = setting(
        0, "model init, data order, synthetic task, sampling", Rule(lambda v: 0 <= v < 2**32, "be in [0, 2**32)")
    )
    steps: int = setting(100, "training steps (one sampled batch each)", at_least(1))
    resume: str | None = setting(None, "a checkpoint directory, or `auto`: the latest in `run.dir` if there is one")
    save_every: int = setting(0, "steps between checkpoints; 0: the last step only", at_least(0))
    progress: bool = setting(True, "a tqdm progress bar")


@dataclass
class ComputeSettings(Section):
    """Where and in which precision the policy's passes run."""

    device: str = setting(
        "auto",
        "where the policy runs; `auto`: the GPU if torch sees one, else the CPU",
        matching(r"auto|cpu|cuda(:\d+)?|mps", "auto, cpu or cuda[:n]"),
    )
    threads: int | None = setting(
        None, "torch's CPU threads (`torch.set_num_threads`); null: torch's default", at_least(1)
    )
    precision: str = setting(
        "float32",
        "`bfloat16`: autocast of sampling and the update (master weights stay in `model.dtype`); "
        "VIGOR scores outside autocast",
        one_of("float32", "bfloat16"),
    )


@dataclass
class ModelSettings(Section):
    """The policy."""

    name: str = setting(
        "tiny-qwen2",
        "`tiny-<family>` (random weights, built offline), `smollm2` (the 'real' extra) or a local directory",
    )
    tokenizer: str | None = setting(
        None, "`chars` (built-in, offline) or a local directory; null: `chars` for tiny models, else the model's"
    )
    hidden: int = setting(64, "hidden size of a tiny model (ignored for a local directory)", at_least(1))
    layers: int = setting(2, "layers of a tiny model", at_least(1))
    heads: int = setting(4, "attention heads of a tiny model", at_least(1))
    dtype: str = setting("float32", "the weights' dtype (mixed precision: `compute.precision`)", one_of(*DTYPES))
    gradient_checkpointing: bool = setting(False, "non-reentrant activation checkpointing of the update")

    def check(self, prefix: str) -> None:
        require(
            self.hidden % self.heads == 0,
            f"{prefix}hidden",
            f"must be a multiple of {prefix}heads ({self.heads})",
            self.hidden,
        )


@dataclass
class LoraSettings(Section):
    """peft LoRA adapters: when enabled, theta (VIGOR's and the optimizer's) is the adapters."""

    enabled: bool = setting(False, "train LoRA adapters instead of the whole model")
    r: int = setting(8, "adapter rank", at_least(1))
    alpha: float = setting(16.0, "`lora_alpha` (scale alpha / r)", above(0))
    dropout: float = setting(0.0, "dropout on the adapters' input", within(0, 1, closed="[)"))
    target_modules: list[str] = setting(
        help="module names that get adapters",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
    )

    def check(self, prefix: str) -> None:
        require(
            len(self.target_modules) > 0,
            f"{prefix}target_modules",
            "must name at least one module",
            self.target_modules,
        )


@dataclass
class DataSettings(Section):
    """The prompts (and answers) to train and evaluate on."""

    task: str | None = setting(
        "arithmetic",
        "the built-in synthetic task (`arithmetic`, or `addition`: 3-digit sums answered with reversed digits, "
        "checked by exact match), written to `<run.dir>/data` when `train_file` is null",
        one_of(*TASKS),
    )
    train_file: str | None = setting(None, "local `.jsonl`, `.json` or `.parquet`")
    test_file: str | None = setting(None, "the held-out split, same formats")
    num_train: int = setting(2000, "size of the synthetic task's training split", at_least(1))
    num_test: int = setting(200, "size of the synthetic task's held-out split", at_least(1))
    max_ops: int = setting(3, "synthetic task: operations per problem, 1..max_ops", at_least(1))
    prompt_column: str = setting("question", "the column the prompt is made from")
    answer_column: str | None = setting(
        "answer", "reference answers (the `math` reward, accuracy metrics); null when there are none"
    )
    prompt_template: str = setting("{question}\nAnswer:", "`str.format` over the row's columns")
    chat_template: bool = setting(False, "instead: the tokenizer's chat template around the prompt column")
    system_prompt: str | None = setting(None, "with `chat_template`: the system message")

    def check(self, prefix: str) -> None:
        if self.train_file is None:
            require(self.task is not None, f"{prefix}train_file", f"is required when {prefix}task is null", None)


@dataclass
class SamplingSettings(Section):
    """Groups of completions from `generate` (no top-k)."""

    group_size: int = setting(8, "completions per prompt (G)", at_least(1))
    prompts_per_step: int = setting(4, "prompts per training step", at_least(1))
    temperature: float = setting(1.0, "sampling temperature", above(0))
    top_p: float = setting(1.0, "nucleus sampling", within(0, 1, closed="(]"))
    max_new_tokens: int = setting(32, "longest completion", at_least(1))
    mask_truncated_completions: bool = setting(True, "no EOS within `max_new_tokens`: no loss, ranked last by VIGOR")


@dataclass
class RewardSettings(Section):
    """The rewards mixed into each step's advantages, and how VIGOR's gradient norms are computed."""

    weights: dict[str, float] = setting(
        help="name -> weight: `vigor`, `self_certainty`, `mean_logprob`, `random`, `math` (the task's answer check) "
        "or `package.module:function` (called `f(prompts, completions, **columns)`, one float per completion); "
        "weight 0 turns one off; an override `rewards.weights.x=1` merges into the config's mapping",
        factory=lambda: {"vigor": 1.0},
    )
    sqrt_length: bool = setting(True, "VIGOR's `sqrt(T)` length correction")
    rank: bool = setting(True, "VIGOR's rank shaping (off: z-scored raw rewards)")
    params: str | None = setting(
        None,
        "regex: VIGOR's theta is the trainable parameters whose names match (e.g. `layers\\.(22|23)\\.`); "
        "null: all of them (as `params=` of `vigor.per_sample_grad_norms`)",
    )
    backend: str | None = setting(
        None,
        "vigor_kernels backend of VIGOR's norms; null: `$VIGOR_BACKEND`, else `auto`",
        one_of("auto", *BACKEND_MODULES),
    )

    def check(self, prefix: str) -> None:
        nonzero = any(w != 0 for w in self.weights.values())
        require(nonzero, f"{prefix}weights", "must give some reward a non-zero weight", self.weights)
        for name in self.weights:
            require(
                name in BUILTIN_REWARDS or re.fullmatch(r"[\w.]+:\w+", name) is not None,
                f"{prefix}weights.{name}",
                f"is not a reward: use one of {BUILTIN_REWARDS} or 'package.module:function'",
                name,
            )
        if self.params is not None:
            try:
                re.compile(self.params)
            except re.error as e:
                raise ConfigError(
                    f"{prefix}params is not a valid regular expression ({e}), got {self.params!r}"
                ) from None


ONE_PASS_MODES = ("auto", "bookkeep", "graph", "off")


@dataclass
class GRPOSettings(Section):
    """The GRPO loss and update: clipping, KL, passes over each batch."""

    epsilon: float = setting(0.2, "clip range of the ratio: `[1 - epsilon, 1 + epsilon_high]`", above(0))
    epsilon_high: float | None = setting(None, "upper clip; null: `epsilon`", above(0))
    kl_coef: float = setting(
        0.0,
        "beta of the KL (k3) to the reference: the initial model, or with LoRA the adapter-disabled model",
        at_least(0),
    )
    num_iterations: int = setting(
        1, "optimizer passes over each sampled batch (mu; old log-probs frozen before the first)", at_least(1)
    )
    loss_type: str = setting(
        "grpo",
        "`grpo`: mean over each completion's tokens, then over completions; `token`: over all tokens",
        one_of("grpo", "token"),
    )
    one_pass: str = setting(
        "auto",
        "the VIGOR reward and the first update share one forward (docs/one-pass.md): `auto` (the update's "
        "gradient book-kept from the norm pass where exact, else the scoring graph reused, else two passes), "
        "`bookkeep`, `graph`, or `off`",
        one_of(*ONE_PASS_MODES),
    )
    bookkeep_max_mib: float | None = setting(
        None,
        "most memory book-keeping may hold for one micro-batch (its captured inputs and output gradients, "
        "until the advantages are known; estimated from the layer widths): a step that would need more reuses "
        "the scoring graph instead; null: a quarter of the memory available when the step starts",
        above(0),
    )


@dataclass
class OptimSettings(Section):
    """AdamW, the learning-rate schedule, clipping, micro-batches."""

    # AdamW moves each weight by about lr a step: more than 1 is never meant
    lr: float = setting(1e-4, "learning rate", within(0, 1, closed="(]"))
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay", at_least(0))
    beta1: float = setting(0.9, "AdamW's first-moment decay", within(0, 1, closed="[)"))
    beta2: float = setting(0.99, "AdamW's second-moment decay", within(0, 1, closed="[)"))
    eps: float = setting(1e-8, "AdamW's epsilon", above(0))
    schedule: str = setting(
        "constant", "`constant`, `linear` or `cosine` (to 0 at the last step) after the warm-up", one_of(*SCHEDULES)
    )
    warmup_steps: int = setting(0, "steps of linear warm-up", at_least(0))
    max_grad_norm: float | None = setting(
        1.0, "gradient clipping; null: none (the norm is logged either way)", above(0)
    )
    micro_batch_size: int = setting(
        0, "completions per forward/backward (gradient accumulation); 0: the whole batch", at_least(0)
    )


@dataclass
class EvalSettings(Section):
    """Greedy held-out evaluation."""

    every: int = setting(0, "steps between held-out evaluations; 0: never", at_least(0))
    num_examples: int = setting(64, "held-out problems per evaluation", at_least(1))
    batch_size: int = setting(64, "problems per `generate` call", at_least(1))
    max_new_tokens: int | None = setting(None, "longest completion; null: `sampling.max_new_tokens`", at_least(1))


@dataclass
class VerifySettings(Section):
    """The engine checked against the autograd oracle on a few of a step's completions."""

    every: int = setting(0, "steps between checks (largest relative error logged); 0: never", at_least(0))
    completions: int = setting(4, "completions checked", at_least(1))


@dataclass
class PlotSettings(Section):
    """PNG plots in `<run.dir>/plots`."""

    enabled: bool = setting(True, "`overview.png` at checkpoints, one PNG per panel at the end")
    every: int = setting(0, "steps between refreshes of `overview.png`; 0: at checkpoints only", at_least(0))


@dataclass
class TrainConfig(TopLevel):
    """``vigor train``: GRPO with VIGOR (or other) rewards."""

    run: RunSettings = section(RunSettings, "the run")
    compute: ComputeSettings = section(ComputeSettings, "device and precision")
    model: ModelSettings = section(ModelSettings, "the policy")
    lora: LoraSettings = section(LoraSettings, "LoRA adapters")
    data: DataSettings = section(DataSettings, "prompts and answers")
    sampling: SamplingSettings = section(SamplingSettings, "completions")
    rewards: RewardSettings = section(RewardSettings, "rewards")
    grpo: GRPOSettings = section(GRPOSettings, "the GRPO loss")
    optim: OptimSettings = section(OptimSettings, "the optimizer")
    eval: EvalSettings = section(EvalSettings, "held-out evaluation")
    verify: VerifySettings = section(VerifySettings, "engine vs oracle")
    plots: PlotSettings = section(PlotSettings, "plots")

    MOVED: ClassVar[dict[str, str]] = {
        "run_dir": "run.dir",
        "seed": "run.seed",
        "steps": "run.steps",
        "resume": "run.resume",
        "save_every": "run.save_every",
        "progress": "run.progress",
        "device": "compute.device",
        "threads": "compute.threads",
        "precision": "compute.precision",
        "verify_every": "verify.every",
        "verify_completions": "verify.completions",
        "plots": "plots.enabled",
        "plot_every": "plots.every",
        "rewards.theta": "rewards.params",
    }
    RENAMED_VALUES: ClassVar[dict[str, dict[str, str]]] = {"compute.precision": {"fp32": "float32", "bf16": "bfloat16"}}

    def check(self, prefix: str) -> None:
        if "math" in self.rewards.weights:
            d = self.data
            require(
                d.answer_column is not None, "data.answer_column", "is required by the math reward", d.answer_column
            )


@dataclass
class SFTSettings(Section):
    """The supervised stage's own settings."""

    batch_size: int = setting(128, "training rows per step", at_least(1))
    target_column: str = setting("solution", "the completion to imitate (the answer column for data without solutions)")
    stop_at_accuracy: float | None = setting(
        None, "stop at the first evaluation with greedy held-out accuracy >= this", within(0, 1, closed="(]")
    )
    export_dir: str | None = setting(None, "the final model (HF directory + tokenizer); null: `<run.dir>/final_model`")


@dataclass
class SFTConfig(TopLevel):
    """``vigor sft``: teacher-forced training on a task's solutions. Sections as in ``vigor train``, with their
    own defaults, plus ``sft``."""

    run: RunSettings = section(RunSettings, "the run", dir="runs/sft", steps=1000)
    compute: ComputeSettings = section(ComputeSettings, "device (no mixed precision)")
    model: ModelSettings = section(ModelSettings, "the policy")
    data: DataSettings = section(DataSettings, "prompts and targets")
    # torch's AdamW defaults (beta2 0.999): the committed checkpoints/addition-sft was trained with them
    optim: OptimSettings = section(OptimSettings, "the optimizer", lr=1e-3, beta2=0.999, schedule="linear")
    eval: EvalSettings = section(
        EvalSettings, "held-out evaluation", every=10, num_examples=200, batch_size=200, max_new_tokens=32
    )
    plots: PlotSettings = section(PlotSettings, "plots")
    sft: SFTSettings = section(SFTSettings, "the supervised stage")

    MOVED: ClassVar[dict[str, str]] = {
        **{k: v for k, v in TrainConfig.MOVED.items() if v.split(".")[0] in ("run", "compute", "plots")},
        "batch_size": "sft.batch_size",
        "target_column": "sft.target_column",
        "stop_at_accuracy": "sft.stop_at_accuracy",
        "export_dir": "sft.export_dir",
        "lr": "optim.lr",
        "weight_decay": "optim.weight_decay",
        "schedule": "optim.schedule",
        "warmup_steps": "optim.warmup_steps",
        "max_grad_norm": "optim.max_grad_norm",
        "eval_every": "eval.every",
        "eval_examples": "eval.num_examples",
        "eval_batch_size": "eval.batch_size",
        "max_new_tokens": "eval.max_new_tokens",
    }

    def check(self, prefix: str) -> None:
        unused = {
            "compute.precision": (self.compute.precision, "float32"),
            "optim.micro_batch_size": (self.optim.micro_batch_size, 0),
            "plots.every": (self.plots.every, 0),
        }
        for key, (value, default) in unused.items():
            require(value == default, key, f"is not used by vigor sft (leave it {default!r})", value)
        require(self.eval.max_new_tokens is not None, "eval.max_new_tokens", "is required by vigor sft", None)
        if self.sft.stop_at_accuracy is not None:
            require(
                self.eval.every >= 1, "eval.every", "must be >= 1 when sft.stop_at_accuracy is set", self.eval.every
            )


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    return TrainConfig.from_dict(values)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides, check everything. Messages name the file."""
    return TrainConfig.load(path, overrides)


def dump_config(cfg: TopLevel) -> str:
    return cfg.dump()
