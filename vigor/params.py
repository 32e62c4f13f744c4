"""Which parameters theta the norms are taken over, and how they are named."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from vigor.errors import BatchError, ThetaError


def select_params(model: nn.Module, params: Iterable[nn.Parameter] | Iterable[str] | None) -> dict[str, nn.Parameter]:
    """theta as ``{name: parameter}`` in model order.

    ``None``: every parameter with ``requires_grad=True`` (with peft LoRA, the adapters only). Otherwise
    parameters of the model, or their names as ``model.named_parameters()`` spells them.
    """
    named = dict(model.named_parameters())
    if params is None:
        theta = {n: p for n, p in named.items() if p.requires_grad}
        if not theta:
            raise ThetaError(
                "theta is empty: no parameter of the model requires grad, so every gradient norm would be 0; "
                "unfreeze the parameters to score (or pass params=[names])"
            )
        return theta
    if isinstance(params, (str, bytes, nn.Parameter)):
        raise ThetaError(
            f"params must be a list of parameter names or parameters, not a single {type(params).__name__}: "
            f"write params=[{params!r}]"
            if isinstance(params, str)
            else "write params=[parameter]"
        )
    wanted = list(params)
    if not wanted:
        raise ThetaError("params=[] selects no parameter: theta is empty, so every gradient norm would be 0")
    by_id = {id(p): n for n, p in named.items()}
    chosen: set[str] = set()
    for item in wanted:
        if isinstance(item, str):
            if item not in named:
                raise BatchError(f"params: the model has no parameter named '{item}'")
            chosen.add(item)
        elif isinstance(item, nn.Parameter):
            if id(item) not in by_id:
                raise BatchError(f"params: a parameter of shape {list(item.shape)} does not belong to the model")
            chosen.add(by_id[id(item)])
        else:
            raise BatchError(f"params must hold nn.Parameter objects or names, got {type(item).__name__}")
    theta = {n: p for n, p in named.items() if n in chosen}
    bad = [n for n, p in theta.items() if not (p.is_floating_point() or p.is_complex())]
    if bad:
        raise ThetaError(f"params: {bad} are not floating-point parameters and have no gradient")
    return theta
