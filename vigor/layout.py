"""Which sample each row of a tensor belongs to, followed op by op through the scoring forward.

The per-sample norm identities (docs/engine.md#rows) need one fact about a layer's input ``X`` and
output gradient ``G``: which entries belong to which sample. Guessing it from shapes is wrong when sizes
coincide (``B == L``, ``L ==`` number of heads, an expert that receives exactly ``B * L`` gathered rows),
so the engine follows it instead: the batch's ``input_ids`` and ``attention_mask`` carry a
:class:`Layout` (sample axis 0, token axis 1) and every torch function called during the forward maps
its inputs' layouts to its outputs' (``propagate``).

Two axes are followed:

- ``batch``: along this dimension, index ``i`` belongs to sample ``i // inner`` (``inner > 1`` when the
  sample axis was merged with the next one, as in ``[B * heads, L, d]``). It must be right on the
  gradient path, so every op is mapped exactly or marked :data:`MIXED`.
- ``token``: the dimension of token positions, used only to skip rows that cannot carry gradient. The
  engine checks that the gradient really is zero on every skipped row (docs/engine.md#padding), so this
  axis is a hint: a wrong one costs a second pass, never a wrong number.

Why it is enough to be strict on the gradient path only: a row of a layer's output may be attributed
to sample ``b`` whenever nothing downstream lets it reach another sample's loss. Parameters are frozen
during the pass, so exactly the tensors downstream of a captured layer require grad; if every op that
produces such a tensor keeps samples apart (checked here), the rows named ``b`` reach only ``L_b``,
however the names of the non-gradient inputs were chosen.
"""

from __future__ import annotations

import contextlib
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

ATTR = "_vigor_layout"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


@dataclass(frozen=True)
class Axis:
    dim: int
    inner: int = 1


class _Mixed:
    """A tensor whose entries cannot be attributed to single samples (an op combined samples)."""

    def __repr__(self) -> str:
        return "MIXED"


MIXED = _Mixed()


@dataclass(frozen=True)
class Layout:
    batch: Axis | _Mixed | None  # None: no sample data (shared by every sample)
    token: Axis | None = None

    @property
    def mixed(self) -> bool:
        return self.batch is MIXED


FREE = Layout(None, None)


def layout_of(t: torch.Tensor) -> Layout:
    return getattr(t, ATTR, FREE)


def set_layout(t: torch.Tensor, layout: Layout) -> None:
    if isinstance(t, torch.nn.Parameter):
        return
    if layout == FREE:
        if hasattr(t, ATTR):
            delattr(t, ATTR)
        return
    setattr(t, ATTR, layout)


# ---- op families -------------------------------------------------------------------------------------

POINTWISE = _words("""
    abs absolute acos acosh add addcdiv addcmul angle asin asinh atan atan2 atanh bitwise_and bitwise_not
    bitwise_or bitwise_xor ceil clamp clamp_max clamp_min clip clone contiguous copysign cos cosh deg2rad detach
    div divide elu eq erf erfc erfinv exp exp2 expm1 float_power floor floor_divide fmax fmin fmod frac ge
    gelu glu_ greater greater_equal gt hardsigmoid hardswish hardtanh heaviside hypot isfinite isinf isnan
    isneginf isposinf le leaky_relu lerp less less_equal lgamma log log10 log1p log2 log_sigmoid logaddexp
    logical_and logical_not logical_or logical_xor logit lt masked_fill maximum minimum mish mul multiply
    nan_to_num ne neg negative not_equal pow prelu rad2deg reciprocal relu relu6 remainder round rsqrt rsub
    selu sgn sigmoid sign signbit silu sin sinc sinh softplus softshrink sqrt square sub subtract tan tanh
    tanhshrink threshold trunc where xlogy dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d
    to type type_as float double half bfloat16 int long bool short char byte cpu cuda requires_grad_
    expand expand_as broadcast_to tril triu logical_xor true_divide fill_ zero_ masked_fill_ __add__
    __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __floordiv__ __rfloordiv__ __mod__
    __rmod__ __pow__ __rpow__ __neg__ __pos__ __abs__ __and__ __rand__ __or__ __ror__ __xor__ __rxor__
    __invert__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ data __iadd__ __isub__ __imul__ __itruediv__ __ipow__
    __iand__ __ior__ __ixor__ __lshift__ __rshift__ square_ softmax_ conj resolve_conj resolve_neg
    """)
# ops whose output has no data of any input (shapes only): shared by every sample
DATA_FREE = _words("""
    zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros new_ones new_empty
    new_full new_tensor size dim numel arange""")
REDUCTIONS = _words("""
    sum mean amax amin max min var std norm logsumexp prod any all argmax argmin count_nonzero nansum
    nanmean median nanmedian mode vector_norm var_mean std_mean aminmax""")
ALONG_DIM = _words("softmax log_softmax cumsum cumprod logcumsumexp cummax cummin normalize _softmax")
RESHAPES = _words("view reshape flatten unflatten view_as reshape_as squeeze unsqueeze ravel")
PERMUTES = _words("permute transpose swapaxes swapdims movedim moveaxis t T mT H mH adjoint")
MATMULS = _words("matmul __matmul__ __rmatmul__ mm bmm")
SPLITS = _words("split chunk tensor_split split_with_sizes unbind unsafe_split")


_NAMES: dict[Any, str] = {}  # op -> name: every op of every forward asks, and the ops are few


def func_name(func: Any) -> str:
    try:
        return _NAMES[func]
    except (KeyError, TypeError):  # not seen yet, or not hashable
        pass
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":  # a property getter, e.g. Tensor.T.__get__
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    name = name.split(".")[0]
    if len(_NAMES) < 4096:  # bounded, should some op object be made anew on each call
        with contextlib.suppress(TypeError):  # not hashable
            _NAMES[func] = name
    return name


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in an op's arguments (nested lists, tuples and dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        if all(isinstance(item, torch.Tensor) or not isinstance(item, (list, tuple, dict)) for item in obj):
            return [item for item in obj if isinstance(item, torch.Tensor)]  # flat: most ops' arguments
        return [t for item in obj for t in tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_in(item)]
    return []


def _arg(args: Sequence, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# ---- axis maps: where an input's axis lands in the output (None: dropped, MIXED: samples combined) -----

_Map = Axis | _Mixed | None


def _aligned(axis: Axis, inp: torch.Tensor, out: torch.Tensor) -> _Map:
    """Broadcasting ops: dimensions align from the right."""
    dim = axis.dim + out.dim() - inp.dim()
    if dim < 0:
        return MIXED
    size_in, size_out = inp.shape[axis.dim], out.shape[dim]
    if size_in == size_out:
        return Axis(dim, axis.inner)
    if size_in == 1:  # one sample broadcast to the whole dimension
        return Axis(dim, size_out)
    return MIXED


def _reduced(axis: Axis, inp: torch.Tensor, out: torch.Tensor, dims: Any, keepdim: bool) -> _Map:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return MIXED
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = {_norm_dim(d, inp.dim()) for d in dims}
    if axis.dim in dims:
        return MIXED
    dim = axis.dim if keepdim else axis.dim - sum(d < axis.dim for d in dims)
    return Axis(dim, axis.inner) if dim < out.dim() and out.shape[dim] == inp.shape[axis.dim] else MIXED


def _reshaped(axis: Axis, in_shape: Sequence[int], out_shape: Sequence[int]) -> _Map:
    """Same elements in the same order, new shape: find the output axis whose blocks hold whole samples."""
    outer = math.prod(in_shape[: axis.dim])
    block = axis.inner * math.prod(in_shape[axis.dim + 1 :])  # elements of one sample within an outer slab
    slab = in_shape[axis.dim] * math.prod(in_shape[axis.dim + 1 :])
    for d, size in enumerate(out_shape):
        if math.prod(out_shape[:d]) != outer:
            continue
        rest = math.prod(out_shape[d + 1 :])
        if size * rest != slab or rest == 0 or block % rest:
            continue
        inner = block // rest
        if inner and size % inner == 0:
            return Axis(d, inner)
    return MIXED


def _permuted(axis: Axis, perm: Sequence[int]) -> _Map:
    return Axis(list(perm).index(axis.dim), axis.inner)


def _permutation(name: str, args: Sequence, kwargs: dict, ndim: int) -> list[int]:
    if name in ("t", "T", "adjoint", "H") and ndim <= 2:
        return list(range(ndim))[::-1]
    if name in ("mT", "mH", "adjoint", "H", "T"):
        if name == "T":
            return list(range(ndim))[::-1]
        return [*range(ndim - 2), ndim - 1, ndim - 2]
    if name == "permute":
        dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else args[1]
        dims = kwargs.get("dims", dims)
        return [_norm_dim(d, ndim) for d in dims]
    if name in ("transpose", "swapaxes", "swapdims"):
        a = _norm_dim(_arg(args, kwargs, 1, "dim0"), ndim)
        b = _norm_dim(_arg(args, kwargs, 2, "dim1"), ndim)
        perm = list(range(ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    # movedim / moveaxis
    src = _arg(args, kwargs, 1, "source")
    dst = _arg(args, kwargs, 2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [_norm_dim(d, ndim) for d in src]
    dst = [_norm_dim(d, ndim) for d in dst]
    perm = [-1] * ndim
    for s, d in zip(src, dst, strict=True):
        perm[d] = s
    rest = iter(d for d in range(ndim) if d not in src)
    return [p if p >= 0 else next(rest) for p in perm]


def _indexed(axis: Axis, inp: torch.Tensor, index: Any) -> _Map:
    """``inp[index]`` for basic indices (ints, slices, None, Ellipsis) and one tensor index off the axis."""
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis and not _is_bool_tensor(it))
    consumed += sum(it.dim() for it in items if _is_bool_tensor(it))
    if any(it is Ellipsis for it in items):
        at = next(i for i, it in enumerate(items) if it is Ellipsis)
        items = items[:at] + [slice(None)] * (inp.dim() - consumed) + items[at + 1 :]
    tensor_items = [it for it in items if isinstance(it, (torch.Tensor, list))]
    if len(tensor_items) > 1 or any(_is_bool_tensor(it) for it in tensor_items):
        return MIXED
    in_dim = out_dim = 0
    for it in items:
        if it is None:
            out_dim += 1
            continue
        if in_dim == axis.dim:
            if isinstance(it, slice) and it.start in (None, 0) and it.step in (None, 1):
                stop = it.stop
                if stop is None or stop >= inp.shape[in_dim]:
                    return Axis(out_dim, axis.inner)
                return Axis(out_dim, axis.inner) if stop % axis.inner == 0 and axis.inner > 1 else None
            return MIXED
        if isinstance(it, int):
            in_dim += 1
        elif isinstance(it, slice):
            in_dim, out_dim = in_dim + 1, out_dim + 1
        else:  # one integer tensor index on another dimension: it is replaced by the index's dims
            in_dim += 1
            out_dim += torch.as_tensor(it).dim() if isinstance(it, list) else it.dim()
    return Axis(out_dim + axis.dim - in_dim, axis.inner)


def _is_bool_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor) and obj.dtype == torch.bool


def _matmul_map(axis: Axis, side: int, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> _Map:
    """``a @ b`` with broadcast batch dimensions: an axis survives unless it is the contracted one."""
    t = a if side == 0 else b
    if t.dim() < 2:
        return MIXED
    last = t.dim() - 1
    if (side == 0 and axis.dim == last) or (side == 1 and axis.dim == last - 1):
        return MIXED  # contracted
    if side == 0 and axis.dim == last - 1:
        return Axis(out.dim() - 2, axis.inner)
    if side == 1 and axis.dim == last:
        return Axis(out.dim() - 1, axis.inner)
    return _aligned(axis, t, out) if t.dim() <= out.dim() else MIXED


def _einsum_map(axis: Axis, side: int, equation: str, operands: Sequence[torch.Tensor]) -> _Map:
    if "..." in equation or "->" not in equation:
        return MIXED
    lhs, rhs = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if side >= len(terms) or len(terms[side]) != operands[side].dim():
        return MIXED
    letter = terms[side][axis.dim]
    if letter not in rhs or letter not in string.ascii_letters:
        return MIXED
    return Axis(rhs.index(letter), axis.inner)


# ---- the propagation ------------------------------------------------------------------------------------


def _combine(candidates: list[_Map]) -> _Map:
    """One mapped axis from several inputs: they must agree."""
    found = [c for c in candidates if c is not None]
    if not found:
        return None
    if any(c is MIXED for c in found):
        return MIXED
    first = found[0]
    return first if all(c == first for c in found) else MIXED


def _axis_maps(name: str, func: Any, args: tuple, kwargs: dict, out: torch.Tensor) -> list[tuple[torch.Tensor, Any]]:
    """``(input tensor, map)`` pairs, where ``map(axis) -> output axis`` for this op and output."""
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if name in DATA_FREE:
        return []
    if name in ("linear", "embedding"):
        x = args[0] if name == "linear" else _arg(args, kwargs, 0, "input")
        if name == "embedding":
            return [(x, lambda a: Axis(a.dim, a.inner))]
        return [(x, lambda a: MIXED if a.dim == x.dim() - 1 else Axis(a.dim, a.inner))] + [
            (w, lambda a: MIXED) for w in tensors_in(args[1:]) if w is not None
        ]
    if name in MATMULS or name in ("addmm", "baddbmm", "addbmm"):
        offset = 1 if name.startswith("add") or name == "baddbmm" else 0
        first_name, second_name = {"addmm": ("mat1", "mat2"), "baddbmm": ("batch1", "batch2")}.get(
            name, ("batch1", "batch2") if offset else ("input", "other")
        )
        a, b = _arg(args, kwargs, offset, first_name), _arg(args, kwargs, offset + 1, second_name)
        if name == "__rmatmul__":
            a, b = b, a
        maps = [(a, lambda ax: _matmul_map(ax, 0, a, b, out)), (b, lambda ax: _matmul_map(ax, 1, a, b, out))]
        if offset:
            bias = _arg(args, kwargs, 0, "input")
            maps.append((bias, lambda ax: _aligned(ax, bias, out)))
        return maps
    if name == "scaled_dot_product_attention":
        q, k, v = args[:3]
        mask = _arg(args, kwargs, 3, "attn_mask")
        maps = [(q, lambda ax: MIXED if ax.dim == q.dim() - 1 else _aligned(ax, q, out))]
        for kv in (k, v):
            maps.append((kv, lambda ax, kv=kv: MIXED if ax.dim >= kv.dim() - 2 else _aligned(ax, kv, out)))
        if isinstance(mask, torch.Tensor) and mask.requires_grad:
            maps.append((mask, lambda ax: MIXED))
        return maps
    if name == "einsum":
        equation = args[0]
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        return [(t, lambda ax, i=i: _einsum_map(ax, i, equation, operands)) for i, t in enumerate(operands)]
    if name in ("conv1d", "conv2d", "conv3d"):
        x = args[0]
        maps = [(x, lambda ax: Axis(0, ax.inner) if ax.dim == 0 else None)]
        return maps + [(w, lambda ax: MIXED) for w in tensors_in(args[1:3])]
    if name in ("layer_norm", "rms_norm", "group_norm"):
        x = args[0]
        if name == "group_norm":
            return [(x, lambda ax: Axis(0, ax.inner) if ax.dim == 0 else MIXED)]
        shape = _arg(args, kwargs, 1, "normalized_shape")
        n = 1 if isinstance(shape, int) else len(shape)
        maps = [(x, lambda ax: MIXED if ax.dim >= x.dim() - n else Axis(ax.dim, ax.inner))]
        return maps + [(w, lambda ax, w=w: _aligned(ax, w, out)) for w in tensors_in(args[2:])]
    if first is None:
        if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
            return _cat_maps(name, args, kwargs, out)
        if name in POINTWISE or name in ("where", "broadcast_tensors"):
            return [(t, lambda ax, t=t: _aligned(ax, t, out)) for t in tensors_in(args) + tensors_in(kwargs)]
        return [(t, lambda ax: MIXED) for t in tensors_in(args) + tensors_in(kwargs)]
    if name in POINTWISE or name.rstrip("_") in POINTWISE:
        return [(t, lambda ax, t=t: _aligned(ax, t, out)) for t in tensors_in(args) + tensors_in(kwargs)]
    if name in REDUCTIONS:
        dims = _arg(args, kwargs, 1, "dim")
        if name == "norm":
            dims = _arg(args, kwargs, 2, "dim")
        if name == "vector_norm":
            dims = _arg(args, kwargs, 2, "dim")
        positional = args[2] if name not in ("norm", "vector_norm") and len(args) > 2 else False
        keepdim = bool(kwargs.get("keepdim", positional))
        return [(first, lambda ax: _reduced(ax, first, out, dims, keepdim))]
    if name in ALONG_DIM or name in ("sort", "argsort", "topk", "flip", "roll", "kthvalue"):
        dims = _arg(args, kwargs, 1 if name not in ("topk", "roll") else 2, "dim", -1)
        if name == "flip":
            dims = _arg(args, kwargs, 1, "dims")
        if name == "roll":
            dims = _arg(args, kwargs, 2, "dims")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        dims = {_norm_dim(d, first.dim()) for d in dims} if dims else set(range(first.dim()))
        same = out.shape == first.shape if isinstance(out, torch.Tensor) else True
        return [
            (first, lambda ax: MIXED if ax.dim in dims or (not same and name != "topk") else Axis(ax.dim, ax.inner))
        ]
    if name in RESHAPES:
        return [(first, lambda ax: _reshaped(ax, first.shape, out.shape))]
    if name in PERMUTES:
        perm = _permutation(name, args, kwargs, first.dim())
        return [(first, lambda ax: _permuted(ax, perm))]
    if name == "__getitem__":
        index = args[1]
        maps = [(first, lambda ax: _indexed(ax, first, index))]
        return maps + [(t, lambda ax: MIXED) for t in tensors_in(index)]
    if name in ("gather", "take_along_dim"):
        dim = _norm_dim(_arg(args, kwargs, 1, "dim"), first.dim())
        index = _arg(args, kwargs, 2, "index")
        return [
            (first, lambda ax: MIXED if ax.dim == dim else Axis(ax.dim, ax.inner)),
            (index, lambda ax: MIXED if ax.dim == dim else Axis(ax.dim, ax.inner)),
        ]
    if name == "index_select":
        dim = _norm_dim(_arg(args, kwargs, 1, "dim"), first.dim())
        index = _arg(args, kwargs, 2, "index")
        return [(first, lambda ax: MIXED if ax.dim == dim else Axis(ax.dim, ax.inner)), (index, lambda ax: MIXED)]
    if name == "one_hot":
        return [(first, lambda ax: Axis(ax.dim, ax.inner))]
    if name in ("repeat_interleave",):
        dim = _arg(args, kwargs, 2, "dim")
        reps = _arg(args, kwargs, 1, "repeats")
        if dim is None or not isinstance(reps, int):
            return [(first, lambda ax: MIXED)]
        dim = _norm_dim(dim, first.dim())
        return [(first, lambda ax: Axis(ax.dim, ax.inner * reps) if ax.dim == dim else Axis(ax.dim, ax.inner))]
    if name == "repeat":
        sizes = args[1:] if len(args) > 2 or isinstance(_arg(args, kwargs, 1, "repeats"), int) else args[1]
        lead = len(sizes) - first.dim()
        return [(first, lambda ax: Axis(ax.dim + lead, ax.inner) if sizes[ax.dim + lead] == 1 else MIXED)]
    if name == "pad":
        pad = _arg(args, kwargs, 1, "pad")
        touched = {first.dim() - 1 - i // 2 for i in range(len(pad))}
        return [(first, lambda ax: MIXED if ax.dim in touched else Axis(ax.dim, ax.inner))]
    if name in SPLITS:
        dim = _norm_dim(_arg(args, kwargs, 2 if name != "unbind" else 1, "dim", 0), first.dim())
        drop = name == "unbind"
        return [(first, lambda ax: MIXED if ax.dim == dim else Axis(ax.dim - (drop and ax.dim > dim), ax.inner))]
    if name in ("narrow", "select"):
        dim = _norm_dim(_arg(args, kwargs, 1, "dim"), first.dim())
        drop = name == "select"
        return [(first, lambda ax: MIXED if ax.dim == dim else Axis(ax.dim - (drop and ax.dim > dim), ax.inner))]
    if name in ("view_as_complex", "view_as_real"):
        kept = first.dim() - (name == "view_as_complex")
        return [(first, lambda ax: Axis(ax.dim, ax.inner) if ax.dim < kept else MIXED)]
    return [(t, lambda ax: MIXED) for t in tensors_in(args) + tensors_in(kwargs)]


def _cat_maps(name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> list:
    tensors = list(args[0]) if args else list(kwargs.get("tensors", []))
    dim = _arg(args, kwargs, 1, "dim", 0)
    if name in ("hstack", "vstack"):
        return [(t, lambda ax: MIXED) for t in tensors]
    if name == "stack":
        dim = _norm_dim(dim, out.dim())
        return [(t, lambda ax: Axis(ax.dim + (ax.dim >= dim), ax.inner)) for t in tensors]
    dim = _norm_dim(dim, out.dim())
    return [(t, lambda ax: MIXED if ax.dim == dim else Axis(ax.dim, ax.inner)) for t in tensors]


def propagate(func: Any, args: tuple, kwargs: dict, out: torch.Tensor) -> Layout:
    """The layout of ``out``, an output of ``func(*args, **kwargs)``, from its inputs' layouts.

    On the gradient path every input's axis must map (else ``batch`` is :data:`MIXED`); inputs that
    carry no gradient only name rows, and are used when no gradient input names them.
    """
    name = func_name(func)
    try:
        maps = _axis_maps(name, func, args, kwargs or {}, out)
    except (IndexError, KeyError, TypeError, ValueError, AttributeError):  # an argument form not parsed
        maps = [(t, lambda ax: MIXED) for t in tensors_in(args) + tensors_in(kwargs or {})]
    grad_batch, other_batch, tokens = [], [], []
    for t, fn in maps:
        if not isinstance(t, torch.Tensor):
            continue
        lay = layout_of(t)
        on_path = t.requires_grad
        if lay.batch is MIXED:
            if on_path:
                grad_batch.append(MIXED)
            continue
        if isinstance(lay.batch, Axis):
            mapped = _safe(fn, lay.batch)
            (grad_batch if on_path else other_batch).append(mapped)
        if lay.token is not None:
            mapped = _safe(fn, lay.token)
            if isinstance(mapped, Axis):
                tokens.append(mapped)
    batch = _combine(grad_batch)
    if batch is None:
        usable = [c for c in other_batch if isinstance(c, Axis)]
        batch = usable[0] if usable else (MIXED if other_batch else None)
    token = tokens[0] if tokens else None
    if isinstance(batch, Axis) and (batch.dim >= out.dim() or (token is not None and token.dim == batch.dim)):
        batch = MIXED if grad_batch else None
    if token is not None and (token.dim >= out.dim() or token.inner != 1):
        token = None
    return Layout(batch, token)


def _safe(fn: Any, axis: Axis) -> _Map:
    try:
        return fn(axis)
    except (IndexError, TypeError, ValueError, KeyError):  # an argument form this map does not parse
        return MIXED


def inplace_target(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or name in (
        "__setitem__",
        "__iadd__",
        "__isub__",
        "__imul__",
    )


__all__ = ["FREE", "MIXED", "Axis", "Layout", "func_name", "layout_of", "propagate", "set_layout", "tensors_in"]
