"""Checkpoints: the trainable weights in safetensors (with LoRA: the adapters), and beside them the
optimizer, LR scheduler and RNG states and the config, each file written atomically.

Layout: ``<run_dir>/checkpoints/step-000010/{model.safetensors, trainer_state.pt, config.yaml}`` and
``<run_dir>/checkpoints/latest`` naming the newest complete one (written last). The RNG states (torch's
CPU and CUDA generators, which ``generate`` samples from) make a resumed run reproduce the uninterrupted
run's next steps exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vigor import atomic
from vigor.trainer.config import TrainConfig, dump_config

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
CONFIG = "config.yaml"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model; the message names the file."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """theta by name (tied weights once), detached, contiguous, on the CPU."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path, step: int, model: nn.Module, optimizer: Any, scheduler: Any, config: TrainConfig
) -> Path:
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    where = root / f"step-{step:06d}"
    weights = trainable_state(model)
    atomic.write_with(where / WEIGHTS, lambda tmp: save_file(weights, tmp, metadata={"step": str(step)}))
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    atomic.write_with(where / STATE, lambda tmp: torch.save(state, tmp))
    atomic.write_text(where / CONFIG, dump_config(config))
    atomic.write_text(root / LATEST, where.name + "\n")
    return where


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text().strip()


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: Any, scheduler: Any) -> int:
    """Restore weights, optimizer, scheduler and RNG states from ``path``; returns the step it ended."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (WEIGHTS, STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} has no {name}: not a (complete) checkpoint directory")
    weights = load_file(str(path / WEIGHTS))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit this model's trainable parameters: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]} (same model and lora settings?)"
        )
    with torch.no_grad():
        for n, p in params.items():
            if weights[n].shape != p.shape:
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: {n} has shape {list(weights[n].shape)}, model {list(p.shape)}"
                )
            p.copy_(weights[n])
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])
