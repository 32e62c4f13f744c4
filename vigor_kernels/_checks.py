"""Input validation shared by the public ops: every problem is reported by name before any kernel runs."""

from __future__ import annotations

import torch

from vigor_kernels.errors import VigorInputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_features(name: str, t: object, ndim: int | None = None) -> torch.Tensor:
    """A float feature tensor ``[B, T, (*mid,) d]``: exactly ``ndim`` dims if given, else at least 3."""
    if not isinstance(t, torch.Tensor):
        raise VigorInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise VigorInputError(f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    if t.dim() < 3:
        raise VigorInputError(f"{name} must be [B, T, (*mid,) d] (at least 3-D), got shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise VigorInputError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def check_ids(name: str, ids: object) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise VigorInputError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise VigorInputError(f"{name} must be 2-D [B, T], got shape {list(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise VigorInputError(f"{name} must be an integer tensor, got {ids.dtype}")
    return ids


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise VigorInputError(f"tensors are on different devices: {devices}")
    return next(iter(devices.values()))


def check_leading(expected: tuple[int, ...], **tensors: torch.Tensor) -> None:
    """Every tensor's leading dims must equal ``expected`` (e.g. ``(B, T)``)."""
    k = len(expected)
    for name, t in tensors.items():
        if tuple(t.shape[:k]) != expected:
            dims = ", ".join(f"{n}={v}" for n, v in zip("BT", expected, strict=False))
            raise VigorInputError(f"{name} has shape {list(t.shape)}; its leading dims must be [{dims}]")


def common_dtype(**tensors: torch.Tensor) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        raise VigorInputError(
            "tensors must share one dtype, got " + ", ".join(f"{n}: {t.dtype}" for n, t in tensors.items())
        )
    return dtypes.pop()
