"""Per-sample rules for the other elementwise ops a parameter meets the batch in:
``torch.maximum``/``minimum``/``fmax``/``fmin``, ``clamp``/``clip`` with tensor bounds (a
learned clipping threshold), ``lerp`` (a learned mixing weight, RWKV's token shift),
``addcmul``/``addcdiv``, ``where``, ``pow`` and ``float_power`` (a learned exponent, GeM
pooling), ``atan2``, ``hypot``, ``xlogy``, ``logaddexp``/``logaddexp2``, ``copysign``, and the
aliases ``multiply``, ``subtract``, ``divide`` and ``true_divide``.

# NOTE [elementwise parameters]
An elementwise op whose result has the shape of a batched operand ``x`` and which takes
parameters laid out as in NOTE [broadcast parameters] (each spans trailing axes of ``x``,
1 or ``x``'s size along each, and is broadcast over the examples' axis) gives example
``b`` the sum, over ``b``'s elements, of the output gradient times the op's elementwise
derivative with respect to the parameter. Rather than a formula per op, the rule hands
the op each parameter as an expanded view, ``p.reshape(aligned).expand(x.shape)``, made a
leaf that requires grad, and records that leaf (``Engine.record``): the engine's one
backward returns its gradient, which is autograd's own derivative of the op left
unreduced (the op's backward sums a broadcast operand down to its shape, and the leaf's
shape is the whole result's). The finisher of ``x + p`` and ``x * p`` then sums it per
example over the other axes. So every op here is exactly as right as its autograd
formula, at the cost of one gradient the size of the result per parameter use.

The examples' axis is ``x``'s, found as for ``x + p`` (``Engine.check_input``; padded
when ambiguous). ``x`` is a plain operand of the result's rank, which it may be broadcast
to (T5's attention mask ``(B, 1, L, L)`` in ``torch.where`` with a ``(1, H, L, L)`` position
bias): the one that requires grad (an activation), else a floating one, else any, the
largest first. Every other plain operand must be batched alongside it (the same rank and
size on that axis: ``where``'s mask, ``lerp``'s end) or be a constant of ``loss_fn`` (NOTE
[constants or batch data] in ``_engine``); anything else is refused and ``auto`` falls
back to ``vmap``. When ``x`` itself is a constant, the result has no batch axis and is a
derived tensor (NOTE [derived parameters] in ``_engine``), and so is the result when no
plain operand has its rank (a position bias ``(1, H, L, L)`` masked by a constant
``(L, L)`` mask). In-place forms (``clamp_``,
``lerp_``) keep going to the engine's refusal of in-place ops on parameters.

``F.scaled_dot_product_attention`` takes a parameter the same way as its float
``attn_mask``, which it adds to the attention scores ``(*batch, L, S)``: a relative
position bias computed from parameters (TinyViT's ``attention_biases[:, idx]``, learned
ALiBi slopes times distances). The examples' axis is the query's (checked as above, so
windows or crops merged into the batch axis are taken once a padded batch shows them);
query, key and value must not be parameters themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._engine import _describe
from functorch_pipeline.transforms._grad_sample._engine import _plain_tensors
from functorch_pipeline.transforms._grad_sample._rules import register_rule
from functorch_pipeline.transforms._grad_sample._rules_broadcast import expanded_leaf
from functorch_pipeline.transforms._grad_sample._rules_broadcast import finish_binary
from functorch_pipeline.transforms._grad_sample._rules_broadcast import layout

__all__ = ["ELEMENTWISE", "SDPA"]

SDPA = F.scaled_dot_product_attention

_T = torch.Tensor
_NAMES = ("maximum", "minimum", "fmax", "fmin", "clamp", "clip", "clamp_min", "clamp_max",
          "lerp", "addcmul", "addcdiv", "where", "pow", "float_power", "atan2", "arctan2",
          "hypot", "xlogy", "logaddexp", "logaddexp2", "copysign", "multiply", "subtract",
          "divide", "true_divide")
# torch.<name> and Tensor.<name>, where each exists, and the ** operator.
ELEMENTWISE = tuple(f for name in _NAMES for f in (getattr(torch, name, None), getattr(_T, name, None))
                    if f is not None) + (_T.__pow__, _T.__rpow__)


def _swap(values: Any, engine: Engine, leaves: dict[int, torch.Tensor]) -> Any:
    """``values`` with each tracked tensor replaced by its slot's leaf."""
    slot = engine.slot(values)
    if slot is not None:
        return leaves[slot]
    if isinstance(values, (list, tuple)):
        return type(values)(_swap(v, engine, leaves) for v in values)
    return values


def _rule(func: Any) -> Any:
    name = _describe(func)

    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        # Called with gradients on and a plain operand: _Tracked.__torch_function__ derives
        # calls on parameters alone (NOTE [derived parameters]).
        slots = engine.slots(args, kwargs)
        who = engine.names(args, kwargs)
        verb = "is" if len(slots) == 1 else "are"
        plain = _plain_tensors((*args, *kwargs.values()))
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in plain),
                                           *(engine.bases[s].shape for s in slots))
        except RuntimeError as e:
            raise Unsupported(f"{who} {verb} used by `{name}` with operands that do not "
                              f"broadcast: {e}") from e
        ranked = [t for t in plain if t.dim() == len(shape)]

        def refuse() -> int:
            raise Unsupported(f"{who} {verb} used by `{name}` with a plain operand that is neither "
                              "batched along the examples' axis of the result "
                              f"{tuple(shape)} nor a constant of loss_fn (NOTE [elementwise "
                              "parameters])")

        if not ranked:  # no operand can hold the examples: with constants, a derived tensor
            engine.with_constants(func, args, kwargs, refuse)
            return engine.derive_op(func, args, kwargs)
        x = max(ranked, key=lambda t: (t.requires_grad, t.is_floating_point(), t.numel()))
        layouts = {s: layout(engine.bases[s].shape, shape) for s in slots}
        k = min(k for k, _, _ in layouts.values())

        def check() -> int:
            if not all(fits for _, _, fits in layouts.values()):
                shapes = ", ".join(str(tuple(engine.bases[s].shape)) for s in slots)
                raise Unsupported(
                    f"{who} of shape {shapes} {verb} used by `{name}` on an operand of shape "
                    f"{tuple(shape)}; its rule takes parameters spanning the trailing axes, "
                    "broadcast over the leading ones (NOTE [elementwise parameters])")
            return engine.check_input(x, name, slots, min_dim=1, features=x.dim() - k,
                                      seq_first=k >= 2)

        op = f"`{name}` on {who}"
        axis = engine.examples_axis(x, check, op)
        if axis is None:  # x is a constant: so must the rest be, and the result is derived
            engine.with_constants(func, args, kwargs, refuse)
            return engine.derive_op(func, args, kwargs)
        for t in plain:
            if (t is not x and not (t.dim() == x.dim() and t.shape[axis] == x.shape[axis])
                    and engine.examples_axis(t, refuse, op) is not None):
                refuse()  # pragma: no cover - examples_axis returns None or raises
        leaves = _leaves(engine, slots, shape)
        out = func(*_swap(args, engine, leaves), **{n: _swap(v, engine, leaves) for n, v in kwargs.items()})
        if not isinstance(out, torch.Tensor) or out.shape != shape:
            raise Unsupported(f"{who} {verb} used by `{name}`, whose result is not one tensor "
                              f"of shape {tuple(shape)}")
        _record(engine, leaves, layouts, axis)
        return out

    return rule


def _leaves(engine: Engine, slots: list[int], shape: torch.Size) -> dict[int, torch.Tensor]:
    """Each slot's parameter expanded to ``shape``, as a leaf that requires grad."""
    return {s: expanded_leaf(engine.bases[s], shape) for s in slots}


def _record(engine: Engine, leaves: dict[int, torch.Tensor], layouts: dict[int, Any],
            axis: int) -> None:
    for s, leaf in leaves.items():
        k, inner, _ = layouts[s]
        engine.record(leaf, finish_binary, None, s, axis, k, 1, inner)


def _sdpa(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with a parameter as its float ``attn_mask``."""
    names = ("query", "key", "value", "attn_mask")
    q, k, v, mask = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
    slot = engine.slot(mask)
    who = engine.names(args, kwargs)
    if slot is None or any(engine.slot(t) is not None for t in (q, k, v)):
        raise Unsupported(f"{who} is used by `F.scaled_dot_product_attention` as its query, key "
                          "or value; its rule takes a parameter as the attn_mask only")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() < 2:
        raise Unsupported(f"{who} is used by `F.scaled_dot_product_attention` with no batched query")
    p = engine.bases[slot]
    try:
        shape = torch.broadcast_shapes(q.shape[:-1] + k.shape[-2:-1], p.shape)
    except RuntimeError as e:
        raise Unsupported(f"{who} is used by `F.scaled_dot_product_attention` as a mask that does "
                          f"not broadcast to the scores: {e}") from e
    ks, inner, fits = layout(p.shape, shape)
    if shape != q.shape[:-1] + k.shape[-2:-1] or not fits:
        raise Unsupported(
            f"{who} of shape {tuple(p.shape)} is used by `F.scaled_dot_product_attention` as the "
            f"mask of scores of shape {tuple(q.shape[:-1] + k.shape[-2:-1])}; its rule takes a "
            "mask broadcast over the leading axes (NOTE [elementwise parameters])")
    axis = engine.check_input(q, "F.scaled_dot_product_attention", [slot], min_dim=2,
                              features=q.dim() - ks)
    leaves = _leaves(engine, [slot], shape)
    rest = {n: val for n, val in kwargs.items() if n not in names}
    out = F.scaled_dot_product_attention(q, k, v, leaves[slot], *args[4:], **rest)
    _record(engine, leaves, {slot: (ks, inner, fits)}, axis)
    return out


for _func in ELEMENTWISE:
    register_rule(_func, _rule(_func))
register_rule(F.scaled_dot_product_attention, _sdpa)
