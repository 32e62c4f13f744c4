"""Models whose parameters are sharded across processes by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 swaps a module's parameter objects: outside a forward ``module.weight`` is the sharded ``DTensor``
that ``model.named_parameters()`` lists; while the module runs (and in its backward) it is the unsharded
parameter gathered from every process, a different object (FSDPParam's ``_unsharded_param``, in the
compute dtype of the mixed-precision policy); after a forward with ``reshard_after_forward=int`` it is a
third one. The engine identifies parameters by object, so it must know that these objects are one
parameter (``aliases``). The norms themselves need only a layer's input and output gradient, which are
local to a process: the sharding changes where the weight lives, not what is scored.

A forward or backward of a sharded model is a collective (every process all-gathers the parameters), so
every decision that changes how many of them a process runs must be taken by all processes together
(``agree``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


def fsdp_params(model: nn.Module) -> list:
    """FSDP2's records (``FSDPParam``) of every parameter sharded in ``model``, empty if none is."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return []
    out = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                out.extend(group.fsdp_params)
    return out


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_params(model))


def forms(fsdp_param) -> list[nn.Parameter]:
    """Every object that stands for this parameter on its modules at some point of a step."""
    found = [fsdp_param.sharded_param]
    for attr in ("_unsharded_param", "_sharded_post_forward_param"):
        p = getattr(fsdp_param, attr, None)
        if p is not None:
            found.append(p)
    return found


def aliases(model: nn.Module, names: dict[int, str]) -> dict[int, str]:
    """``names`` (``id(parameter) -> name``) extended to every other form of the same sharded parameters."""
    out = dict(names)
    for fp in fsdp_params(model):
        objects = forms(fp)
        name = next((names[id(p)] for p in objects if id(p) in names), None)
        if name is not None:
            out.update({id(p): name for p in objects})
    return out


def compute_dtype(model: nn.Module, param: nn.Parameter) -> torch.dtype:
    """The dtype ``param`` is used in by the forward: the mixed-precision ``param_dtype`` if FSDP2 casts it."""
    for fp in fsdp_params(model):
        if any(p is param for p in forms(fp)):
            return fp.param_dtype or param.dtype
    return param.dtype


def agree(flag: bool, model: nn.Module) -> bool:
    """``flag`` if any process has it, for a sharded model (a collective); ``flag`` itself otherwise."""
    params = fsdp_params(model)
    if not (params and dist.is_available() and dist.is_initialized()):
        return flag
    # on the device FSDP2 communicates from (NCCL reduces CUDA tensors only, gloo CPU ones)
    t = torch.tensor([int(flag)], dtype=torch.int64, device=params[0].mesh_info.mesh.device_type)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Gather every sharded parameter (FSDP2's ``unshard``) and keep it whole until the block ends.

    Inside, ``model.named_parameters()`` lists the whole parameters, and forwards and backwards run no
    collective (nothing is resharded), so each process may run as many as it likes. Costs the memory of
    the whole model in its compute dtype. A no-op for a model that is not sharded.
    """
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield
        return
    for m in modules:  # in model order, so an FSDP root is initialized as a root, as its first forward would
        m._get_fsdp_state()._lazy_init()
    saved = []
    for m in modules:
        for group in m._get_fsdp_state()._fsdp_param_groups:
            saved.append((group, group.post_forward_mesh_info, group.reshard_after_backward))
            group.post_forward_mesh_info = None  # what set_reshard_after_forward(False) sets
            group.reshard_after_backward = False
    try:
        for m in modules:
            m.unshard()
        yield
    finally:
        for group, mesh_info, after_backward in saved:
            group.post_forward_mesh_info = mesh_info
            group.reshard_after_backward = after_backward
        for m in modules:
            m.reshard()
