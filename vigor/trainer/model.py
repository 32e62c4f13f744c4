"""The policy: a tiny random model built offline or a local Hugging Face directory, optionally with LoRA
adapters (peft) and gradient checkpointing; the frozen reference for the KL term."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from vigor.dtypes import DTYPES
from vigor.trainer.config import ConfigError, TrainConfig
from vigor.trainer.tokenizer import load_tokenizer


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"compute.device is {spec!r} but torch sees no CUDA device")
    return device


def tiny_family(name: str) -> str | None:
    """``"tiny-qwen2"`` -> ``"qwen2"``; None for anything else (a local directory)."""
    from vigor.tiny import FAMILIES

    if not name.startswith("tiny-"):
        return None
    family = name.removeprefix("tiny-")
    if family not in FAMILIES:
        raise ConfigError(
            f"model.name {name!r}: no tiny family {family!r}; choose one of {['tiny-' + f for f in FAMILIES]}"
        )
    return family


def model_dir(cfg: TrainConfig) -> str:
    """The local directory of a real model: ``model.name`` itself, or for ``smollm2`` the directory that
    ``vigor models smollm2`` writes (converted on first use; needs the 'real' extra)."""
    if cfg.model.name != "smollm2":
        return cfg.model.name
    from vigor.pretrained import PretrainedError, smollm2_dir

    try:
        return str(smollm2_dir("float32"))
    except PretrainedError as e:
        raise ConfigError(f"model.name 'smollm2': {e}") from None


def check_model_source(cfg: TrainConfig) -> str | None:
    """The tiny family, or None for a local directory (which must exist)."""
    family = tiny_family(cfg.model.name)
    if family is not None:
        return family
    where = Path(model_dir(cfg))  # for `smollm2`, the converted copy
    if not where.is_dir():
        raise ConfigError(
            f"model.name {cfg.model.name!r} is neither tiny-<family> nor a local model directory "
            "(no hub access: download the model first and point model.name at its directory)"
        )
    if not (where / "config.json").is_file():
        raise ConfigError(f"model.name {cfg.model.name!r} has no config.json: not a Hugging Face model directory")
    return None


def build_tokenizer(cfg: TrainConfig):
    spec = cfg.model.tokenizer or ("chars" if check_model_source(cfg) else model_dir(cfg))
    try:
        return load_tokenizer(spec)
    except FileNotFoundError as e:
        raise ConfigError(f"model.tokenizer: {e}") from None
    except (OSError, ValueError) as e:  # transformers' own messages run over several lines
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {spec!r}: {first}") from None


def build_model(cfg: TrainConfig, tokenizer, device: torch.device) -> nn.Module:
    """The base causal LM (no adapters yet), on ``device``, in the weights' dtype."""
    dtype = DTYPES[cfg.model.dtype]
    family = check_model_source(cfg)
    if family is not None:
        from vigor.tiny import tiny_model

        sizes = dict(vocab=len(tokenizer), hidden=cfg.model.hidden, layers=cfg.model.layers, heads=cfg.model.heads)
        model = tiny_model(family, seed=cfg.run.seed, dtype=dtype, **sizes)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir(cfg), dtype=dtype)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(f"model.name: cannot load a causal LM from {cfg.model.name!r}: {first}") from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has only {vocab}")
    for where in (model.config, model.generation_config):
        where.pad_token_id = tokenizer.pad_token_id
        # a tiny model's config carries its family's ids, which mean nothing to the built-in tokenizer
        if family is not None or getattr(where, "eos_token_id", None) is None:
            where.eos_token_id = tokenizer.eos_token_id
        if family is not None:
            where.bos_token_id = tokenizer.bos_token_id
    return model.to(device)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (the policy's update; VIGOR scores in eval mode, unaffected)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def add_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"lora.target_modules {cfg.lora.target_modules}: {e} (linear layers here: {names})") from None


def build_policy(cfg: TrainConfig, tokenizer, device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """``(policy, reference)``. The reference is a frozen copy of the initial weights when the KL term is
    on without LoRA; with LoRA it is the policy with its adapters disabled (returned as None)."""
    model = build_model(cfg, tokenizer, device)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    reference = None
    if cfg.grpo.kl_coef > 0 and not cfg.lora.enabled:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    model.train()
    return model, reference
