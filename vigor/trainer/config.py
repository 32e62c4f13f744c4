"""The trainer's configuration: nested dataclasses, loaded from YAML, overridden from the command line.

Every key is checked: an unknown key, a value of the wrong type or out of range is a ``ConfigError``
naming the key (``sampling.group_size``) and what was expected, before any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vigor.dtypes import DTYPES

BUILTIN_REWARDS = ("vigor", "self_certainty", "mean_logprob", "random", "math")


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key and the problem."""


@dataclass
class ModelConfig:
    name: str = "tiny-qwen2"  # "tiny-<family>" (random weights, built offline) or a local Hugging Face directory
    tokenizer: str | None = None  # "chars" (built-in, offline) or a local directory; default: chars for tiny models
    hidden: int = 64  # sizes of a tiny model (ignored for a local directory)
    layers: int = 2
    heads: int = 4
    dtype: str = "float32"  # weights' dtype; mixed precision is `precision: bf16`
    gradient_checkpointing: bool = False


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DataConfig:
    task: str | None = "arithmetic"  # built-in synthetic task, written into <run_dir>/data when no files are given
    train_file: str | None = None  # local .jsonl / .json / .parquet
    test_file: str | None = None
    num_train: int = 2000  # size of the synthetic task's splits
    num_test: int = 200
    max_ops: int = 3  # synthetic task: operations per problem, 1..max_ops
    prompt_column: str = "question"
    answer_column: str | None = "answer"  # needed by the `math` reward and the accuracy metrics
    prompt_template: str = "{question}\nAnswer:"  # str.format over the row's columns
    chat_template: bool = False  # instead: the tokenizer's chat template around the prompt column
    system_prompt: str | None = None  # with chat_template


@dataclass
class SamplingConfig:
    group_size: int = 8  # completions per prompt (G)
    prompts_per_step: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    mask_truncated_completions: bool = True  # no EOS within max_new_tokens: no loss, ranked last by VIGOR


@dataclass
class RewardConfig:
    # name -> weight; names: vigor, self_certainty, random, math, or "package.module:function" (a plain
    # callable f(prompts, completions, **columns) -> list of floats). Weight 0 switches a reward off (not computed).
    weights: dict[str, float] = field(default_factory=lambda: {"vigor": 1.0})
    sqrt_length: bool = True  # VIGOR's sqrt(T_b) length correction
    rank: bool = True  # VIGOR's rank shaping (off: z-scored raw rewards)
    theta: str | None = None  # regex: VIGOR's theta is the trainable parameters whose names match it


ONE_PASS_MODES = ("auto", "bookkeep", "graph", "off")


@dataclass
class GRPOConfig:
    epsilon: float = 0.2  # clip range of the ratio: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # default: epsilon
    kl_coef: float = 0.0  # beta of the KL term to the reference (LoRA: the adapter-disabled model)
    num_iterations: int = 1  # optimizer passes over each sampled batch (mu)
    loss_type: str = "grpo"  # grpo: mean over each completion's tokens, then over completions; token: over all tokens
    # the VIGOR reward and the first update share one forward (docs/one-pass.md): auto (where exact: the
    # update's gradient book-kept from the norm pass, else its graph reused), bookkeep, graph, or off
    one_pass: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    schedule: str = "constant"  # constant, linear or cosine (to 0), after warmup_steps of linear warm-up
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # null: no clipping (the norm is still logged)
    micro_batch_size: int = 0  # completions per forward/backward (gradient accumulation); 0: the whole batch


@dataclass
class EvalConfig:
    every: int = 0  # steps between held-out evaluations (greedy decoding); 0: never
    num_examples: int = 64
    batch_size: int = 64
    max_new_tokens: int | None = None  # default: sampling.max_new_tokens


@dataclass
class TrainConfig:
    run_dir: str = "runs/vigor"
    seed: int = 0
    steps: int = 100
    device: str = "auto"  # auto, cpu, cuda, cuda:1...
    threads: int | None = None  # torch's CPU threads (torch.set_num_threads); null: torch's default
    precision: str = "fp32"  # fp32, or bf16 (autocast of the policy passes; VIGOR scores in the weights' dtype)
    save_every: int = 0  # steps between checkpoints; 0: only the last step
    verify_every: int = 0  # steps between engine-vs-oracle checks on a few completions; 0: never
    verify_completions: int = 4
    plots: bool = True  # PNG plots in <run_dir>/plots: overview.png at checkpoints, one PNG per panel at the end
    plot_every: int = 0  # steps between refreshes of overview.png; 0: at checkpoints only
    progress: bool = True
    resume: str | None = None  # a checkpoint directory, or "auto": the latest in run_dir if there is one
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- building dataclasses from plain data, with checks ---------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of settings, got {type(value).__name__} {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, args[0], f"{key} key"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string: accept any string float() understands.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        else:
            number = float(value)
        # an inf learning rate or a nan weight would train to NaN weights without any error
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {_type_name(tp)}")  # a bug in this module


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown setting '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range checks across the whole config; returns it unchanged."""
    _check(cfg.steps >= 1, "steps", "must be >= 1", cfg.steps)
    _check(0 <= cfg.seed < 2**32, "seed", "must be in [0, 2**32)", cfg.seed)
    _check(cfg.precision in ("fp32", "bf16"), "precision", "must be fp32 or bf16", cfg.precision)
    _check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device) is not None,
        "device",
        "must be auto, cpu or cuda[:n]",
        cfg.device,
    )
    for key in ("save_every", "verify_every", "plot_every"):
        _check(getattr(cfg, key) >= 0, key, "must be >= 0", getattr(cfg, key))
    _check(cfg.threads is None or cfg.threads >= 1, "threads", "must be >= 1 or null", cfg.threads)
    _check(cfg.verify_completions >= 1, "verify_completions", "must be >= 1", cfg.verify_completions)
    m = cfg.model
    _check(m.dtype in DTYPES, "model.dtype", f"must be one of {tuple(DTYPES)}", m.dtype)
    for key in ("hidden", "layers", "heads"):
        _check(getattr(m, key) >= 1, f"model.{key}", "must be >= 1", getattr(m, key))
    _check(m.hidden % m.heads == 0, "model.hidden", f"must be a multiple of model.heads ({m.heads})", m.hidden)
    lo = cfg.lora
    _check(lo.r >= 1, "lora.r", "must be >= 1", lo.r)
    _check(lo.alpha > 0, "lora.alpha", "must be > 0", lo.alpha)
    _check(0 <= lo.dropout < 1, "lora.dropout", "must be in [0, 1)", lo.dropout)
    _check(len(lo.target_modules) > 0, "lora.target_modules", "must name at least one module", lo.target_modules)
    d = cfg.data
    _check(d.num_train >= 1 and d.num_test >= 1, "data.num_train/num_test", "must be >= 1", (d.num_train, d.num_test))
    _check(d.max_ops >= 1, "data.max_ops", "must be >= 1", d.max_ops)
    _check(d.task in (None, "arithmetic", "addition"), "data.task", "must be 'arithmetic', 'addition' or null", d.task)
    if d.train_file is None:
        _check(d.task is not None, "data.train_file", "is required when data.task is null", d.train_file)
    s = cfg.sampling
    _check(s.group_size >= 1, "sampling.group_size", "must be >= 1", s.group_size)
    _check(s.prompts_per_step >= 1, "sampling.prompts_per_step", "must be >= 1", s.prompts_per_step)
    _check(s.temperature > 0, "sampling.temperature", "must be > 0", s.temperature)
    _check(0 < s.top_p <= 1, "sampling.top_p", "must be in (0, 1]", s.top_p)
    _check(s.max_new_tokens >= 1, "sampling.max_new_tokens", "must be >= 1", s.max_new_tokens)
    r = cfg.rewards
    _check(
        any(w != 0 for w in r.weights.values()), "rewards.weights", "must give some reward a non-zero weight", r.weights
    )
    for name in r.weights:
        _check(
            name in BUILTIN_REWARDS or re.fullmatch(r"[\w.]+:\w+", name) is not None,
            f"rewards.weights.{name}",
            f"is not a reward: use one of {BUILTIN_REWARDS} or 'package.module:function'",
            name,
        )
    if r.theta is not None:
        try:
            re.compile(r.theta)
        except re.error as e:
            raise ConfigError(f"rewards.theta is not a valid regular expression ({e}), got {r.theta!r}") from None
    if "math" in r.weights:
        _check(d.answer_column is not None, "data.answer_column", "is required by the math reward", d.answer_column)
    g = cfg.grpo
    _check(g.epsilon > 0, "grpo.epsilon", "must be > 0", g.epsilon)
    _check(g.epsilon_high is None or g.epsilon_high > 0, "grpo.epsilon_high", "must be > 0", g.epsilon_high)
    _check(g.kl_coef >= 0, "grpo.kl_coef", "must be >= 0", g.kl_coef)
    _check(g.num_iterations >= 1, "grpo.num_iterations", "must be >= 1", g.num_iterations)
    _check(g.loss_type in ("grpo", "token"), "grpo.loss_type", "must be grpo or token", g.loss_type)
    _check(g.one_pass in ONE_PASS_MODES, "grpo.one_pass", f"must be one of {', '.join(ONE_PASS_MODES)}", g.one_pass)
    o = cfg.optim
    _check(0 < o.lr <= 1, "optim.lr", "must be in (0, 1]", o.lr)  # AdamW moves each weight by about lr a step
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)", (o.beta1, o.beta2))
    _check(o.eps > 0, "optim.eps", "must be > 0", o.eps)
    _check(
        o.schedule in ("constant", "linear", "cosine"),
        "optim.schedule",
        "must be constant, linear or cosine",
        o.schedule,
    )
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", o.warmup_steps)
    _check(
        o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0 or null", o.max_grad_norm
    )
    _check(o.micro_batch_size >= 0, "optim.micro_batch_size", "must be >= 0", o.micro_batch_size)
    e = cfg.eval
    _check(e.every >= 0, "eval.every", "must be >= 0", e.every)
    _check(
        e.num_examples >= 1 and e.batch_size >= 1,
        "eval.num_examples/batch_size",
        "must be >= 1",
        (e.num_examples, e.batch_size),
    )
    _check(e.max_new_tokens is None or e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1", e.max_new_tokens)
    return cfg


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parents[: i + 1])}' is not a section")
        node = child
    node[last] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "steps=10"]`` -> a nested dict; values are read as YAML (``null``, lists...)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key.strip()):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of settings, got {type(values).__name__}")
    return validate(_build(TrainConfig, values))


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, build: Callable[[dict], Any] | None = None
) -> TrainConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides, check everything. Messages name the file.
    ``build`` turns the merged values into another checked config (``vigor sft``'s); default: a TrainConfig."""
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
        return (build or config_from_dict)(values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
