"""Per-sample rules for parameters that meet the batch by broadcasting: ``x + p``,
``x - p``, ``x * p``, ``x / p`` and ``p.expand(B, ...)`` (or ``p.repeat(B, 1, ...)``), the positional embedding,
LayerScale and class token of a vision transformer (torchvision's ``vit_*``, timm's
``VisionTransformer``), and ``F.prelu``'s slopes.

# NOTE [broadcast parameters]
``x + p``, ``x - p``, ``x * p`` and ``x / p``, in either order (``torch.add``/``sub``/
``mul``/``div``, ``torch.rsub``, the operators, ``alpha`` included) take a
parameter ``p`` that spans the trailing axes of a batched ``x`` and is broadcast over
its leading ``k`` axes: ``p``'s shape, left-padded with ones to ``x``'s rank, must be
``(1,) * k + s`` where ``s`` has an axis 0 other than 1 and each of its axes either equals
``x``'s or is 1 (a bias ``(D,)``, a positional table ``(1, T, D)`` or ``(T, D)`` against
``(B, T, D)``; a per-channel scale ``(C, 1, 1)`` against ``(B, C, H, W)``, ConvNeXt's
LayerScale). The examples must be on one of those ``k`` axes, found by
``Engine.check_input`` as for a Linear (axis 0, or axis 1 of a sequence-first input;
several candidates of size ``B`` are ambiguous and get padded): ``p`` is the same for
every example there, so example ``b``'s gradient is its output gradient times the
elementwise derivative (``x`` for a product, ``-out / p`` or ``1 / x`` for a quotient,
``alpha`` or ``-alpha`` for a sum or difference) summed over the other broadcast axes,
leading and trailing.
``x`` may be broadcast too, along trailing axes where it has size 1 (the distances of
each position to a set of learned prototypes, ``x[:, :, None] - P`` with ``P`` of shape
``(M, D)``, an RBF layer): the result is then larger than ``x``, and ``p`` enters as a leaf
expanded to the result's shape, whose gradient (autograd's elementwise derivative times
the output gradient) is summed as above. Any other shape (``p`` varying along a leading
axis) is refused.

``p.expand(n, ...)`` of a parameter whose axis 0 has size 1 (or with new leading axes:
a bias ``(O,)`` expanded to ``(B, T, O)`` for ``torch.baddbmm``) makes the examples' axis itself when ``n`` is the batch size, and nothing but the size
says so. So the rule asks for proof (``_padding.Evidence``, NOTE [padding an ambiguous
batch]): an expand is over the examples only if its size equalled the batch size in
every run of the call that reached it, at least two of different sizes (the caller's and
padded ones; the runs make the same expands in the same order). When only one run has seen it, it is ambiguous and
the batch runs again padded; an expand whose size did not follow the batch (a length
that equals ``B`` or a padded size by coincidence) is not over the examples. Example
``b``'s gradient is row ``b`` of the output gradient, summed over the other expanded
axes. An expand to ``m`` times the batch size in every run (a class token for each of
``K`` augmentations merged into the batch axis) is taken as ``m`` rows per example, once
its output gradient shows that grouping too (NOTE [examples merged into axis 0] in
``_engine``). A batch of one needs no proof: all rows are its own. An expand to any other
size, and ``+``/``*`` of parameters with each other or with numbers, have no batch axis:
their results are derived tensors (NOTE [derived parameters] in ``_engine``).
"""

from __future__ import annotations

from typing import Any

import torch

from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._padding import Evidence
from functorch_pipeline.transforms._grad_sample._rules import _get
from functorch_pipeline.transforms._grad_sample._rules import register_rule

__all__ = ["expanded_leaf", "finish_binary", "layout"]

_T = torch.Tensor
ADD = (torch.add, _T.add, _T.__add__, _T.__radd__)
MUL = (torch.mul, _T.mul, _T.__mul__, _T.__rmul__)
SUB = (torch.sub, _T.sub, _T.__sub__, _T.__rsub__, torch.rsub)
DIV = (torch.div, _T.div, _T.__truediv__, _T.__rtruediv__)
_REFLECTED = (_T.__rsub__, torch.rsub, _T.__rtruediv__)  # first argument on the right


_NAMES = {"add": "x + p", "sub": "x - p", "mul": "x * p", "div": "x / p"}
_OPS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}


def _binary(kind: str, reflected: bool = False) -> Any:
    """The rule of ``x <kind> p`` (either order; ``reflected``: the ``__r*__`` method,
    whose first argument is the right operand)."""
    name, op = _NAMES[kind], _OPS[kind]
    takes = {"alpha"} if kind in ("add", "sub") else {"rounding_mode"} if kind == "div" else set()

    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        # Called with gradients on and a batched operand: _Tracked.__torch_function__ passes
        # the rest through or derives it (p * 2, p + q: NOTE [derived parameters]).
        if len(args) != 2 or set(kwargs) - takes or kwargs.get("rounding_mode") is not None:
            raise Unsupported(f"{engine.names(args, kwargs)} {'is' if len(engine.slots(args, kwargs)) == 1 else 'are'} "
                              f"used by `{name}` with arguments its rule does not take")
        a, b = (args[1], args[0]) if reflected else args  # the result is a <op> b
        sa, sb = engine.slot(a), engine.slot(b)
        slot, x = (sa, b) if sa is not None else (sb, a)
        p = engine.bases[slot]
        if not isinstance(x, torch.Tensor):
            raise Unsupported(f"{engine.name(slot)} is used by `{name}` with no batched operand")
        if x.dim() == 0 or p.dim() > x.dim():  # a scalar or a smaller tensor: no examples

            def refuse() -> int:
                raise Unsupported(f"{engine.name(slot)} is used by `{name}` with no batched operand")

            # A constant (W + v, a frozen bias added to a parameter): a derived tensor.
            engine.examples_axis(x, refuse, f"`{name}` on {engine.name(slot)}")
            return engine.derive_op(op, (a, b), kwargs)
        try:  # x may be broadcast too, along trailing axes (NOTE [broadcast parameters])
            shape = torch.broadcast_shapes(x.shape, p.shape)
        except RuntimeError:
            shape = x.shape  # the op itself raises torch's error below
        grown = shape != x.shape and len(shape) == x.dim()
        k, inner, fits = layout(p.shape, shape if grown else x.shape)

        def check() -> int:
            if not fits:
                raise Unsupported(
                    f"{engine.name(slot)} of shape {tuple(p.shape)} is used by `{name}` on an "
                    f"input of shape {tuple(x.shape)}; its rule takes a parameter spanning the "
                    "trailing axes, broadcast over the leading ones (NOTE [broadcast parameters])")
            return engine.check_input(x, name, [slot], min_dim=1, features=x.dim() - k,
                                      seq_first=k >= 2)

        # A constant (a frozen weight, W + B @ A): NOTE [constants or batch data] in _engine.
        axis = engine.examples_axis(x, check, f"`{name}` on {engine.name(slot)}")
        if axis is None:
            return engine.derive_op(op, (a, b), kwargs)
        xin = x.detach().requires_grad_() if not x.requires_grad else x
        if grown:  # the parameter as a leaf of the result's shape: autograd's derivative
            leaf = expanded_leaf(p, shape)
            out = op(*((leaf, xin) if sa is not None else (xin, leaf)), **kwargs)
            engine.record(leaf, finish_binary, None, slot, axis, k, 1, inner)
            return out
        out = op(*((p, xin) if sa is not None else (xin, p)), **kwargs)
        if out.shape != x.shape:
            raise Unsupported(f"{engine.name(slot)} is used by `{name}` with a result of shape "
                              f"{tuple(out.shape)}, larger than the batched input's {tuple(x.shape)}")
        # d out / d p, elementwise: 1 or alpha (+), -alpha for the subtrahend (-), x (*),
        # -out / p for the divisor and 1 / x for the dividend (/).
        alpha = kwargs.get("alpha", 1)
        if kind == "div":
            factor = -(out.detach() / p) if sb is not None else 1 / x.detach()
        else:
            factor = x if kind == "mul" else None
        scale = -alpha if kind == "sub" and sb is not None else alpha if sb is not None else 1
        engine.record(out, finish_binary, factor, slot, axis, k, scale, inner)
        return out

    return rule


def layout(p_shape: torch.Size, x_shape: torch.Size) -> tuple[int, tuple[int, ...], bool]:
    """How a parameter of shape ``p_shape`` broadcasts against a batched ``x_shape`` (NOTE
    [broadcast parameters]): ``k``, the number of leading axes it is broadcast over;
    ``inner``, the trailing axes past ``k`` where it is 1 against ``x``'s ``n`` (summed by
    the finisher); and whether it fits the rule (``k > 0``, every axis past ``k`` 1 or
    ``x``'s)."""
    aligned = (1,) * (len(x_shape) - len(p_shape)) + tuple(p_shape)
    k = next((i for i, n in enumerate(aligned) if n != 1), len(aligned))
    inner = tuple(i for i in range(k, len(x_shape)) if aligned[i] == 1 and x_shape[i] != 1)
    fits = (len(p_shape) <= len(x_shape) and k > 0
            and all(a in (1, n) for a, n in zip(aligned[k:], x_shape[k:], strict=True)))
    return k, inner, fits


def expanded_leaf(p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``p`` broadcast to ``shape`` (aligned on the right), as a leaf that requires grad:
    its gradient is the output gradient times the op's elementwise derivative, at every
    position, for :func:`finish_binary` to sum."""
    aligned = (1,) * (len(shape) - p.dim()) + tuple(p.shape)
    return p.detach().reshape(aligned).expand(shape).requires_grad_()


def finish_binary(engine: Engine, g: torch.Tensor, factor: torch.Tensor | None, slot: int,
                   axis: int, k: int, scale: Any, inner: tuple[int, ...] = ()) -> None:
    contribution = g if factor is None else g * factor
    if scale != 1:
        contribution = contribution * scale
    if inner:  # axes past k: movedim below leaves them where they are
        contribution = contribution.sum(inner, keepdim=True)
    contribution = contribution.movedim(axis, 0)
    if k > 1:
        contribution = contribution.sum(tuple(range(1, k)))
    p = engine.bases[slot]
    engine.add("direct", slot, contribution.reshape(contribution.shape[0], *p.shape))


def _expand(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    slot = engine.slot(args[0])  # gradients are on: see _Tracked.__torch_function__
    if slot is None or kwargs and set(kwargs) != {"size"}:
        raise Unsupported(f"{engine.names(args, kwargs)} is expanded in a way its rule does not take")
    p = engine.bases[slot]
    sizes = tuple(kwargs["size"]) if kwargs else tuple(args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    B = engine.batch_size
    shape = (1,) * (len(sizes) - p.dim()) + tuple(p.shape)  # new leading axes, if any
    evidence = engine.evidence if engine.evidence is not None else Evidence()
    if (len(sizes) != len(shape) or shape[0] != 1
            or not evidence.batch_expand(sizes[0], B)):  # raises Ambiguous when unproven
        # Not over the batch: a parameter reshaped, NOTE [derived parameters].
        return engine.derive_op(_T.expand, args, kwargs)
    base = p.detach().requires_grad_()
    out = base.expand(*sizes)
    engine.record(out, _finish_expand, slot, shape)
    return out


def _repeat(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """``p.repeat(n, 1, ..., 1)`` of a ``p`` whose axis 0 has size 1 (or with a new leading
    axis): the values of ``p.expand(n, ...)``, copied, so taken as that expand when ``n``
    follows the batch (XCiT's positional encoding ``pos.repeat(B, 1, 1, 1)``); any other
    repeat is a derived tensor."""
    slot = engine.slot(args[0])
    reps = tuple(kwargs["repeats"]) if "repeats" in kwargs else tuple(args[1:])
    if len(reps) == 1 and isinstance(reps[0], (tuple, list, torch.Size)):
        reps = tuple(reps[0])
    if slot is None or set(kwargs) - {"repeats"}:
        raise Unsupported(f"{engine.names(args, kwargs)} is repeated in a way its rule does not take")
    p = engine.bases[slot]
    if reps and all(r == 1 for r in reps[1:]) and (
            len(reps) == p.dim() + 1 or len(reps) == p.dim() > 0 and p.shape[0] == 1):
        sizes = (reps[0], *p.shape) if len(reps) == p.dim() + 1 else (reps[0], *p.shape[1:])
        return _expand(engine, (args[0], *sizes), {}).clone()
    return engine.derive_op(_T.repeat, args, kwargs)


def _finish_expand(engine: Engine, g: torch.Tensor, slot: int, shape: tuple[int, ...]) -> None:
    m = g.shape[0] // engine.batch_size
    if m > 1 and engine.batch_size > 1 and not engine.padding_rows_repeat(g, m):
        # m rows per example: an expand's rows are all alike, so only their gradients show
        # whose they are (NOTE [examples merged into axis 0] in _engine).
        raise Unsupported(f"{engine.name(slot)} is expanded to {g.shape[0]} rows, {m} per "
                          "example, but their gradients do not group by example (the first "
                          "example's rows repeated in the padding rows)")
    dims = tuple(i for i in range(1, len(shape)) if shape[i] == 1 and g.shape[i] != 1)
    p = engine.bases[slot]
    engine.add("direct", slot, (g.sum(dims, keepdim=True) if dims else g).reshape(g.shape[0], *p.shape))


def _prelu(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """``F.prelu(x, w)``: ``max(0, x) + w * min(0, x)`` with ``w`` of one entry or one per
    channel (axis 1); example ``b``'s gradient is ``g * min(0, x)`` summed over its other
    axes (and over the channels for a single ``w``)."""
    x, w = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "weight")
    slot = engine.slot(w)
    if slot is None or engine.slot(x) is not None or not isinstance(x, torch.Tensor):
        raise Unsupported(f"{engine.names(args, kwargs)} is used by `F.prelu` as its input")
    engine.check_input(x, "F.prelu", [slot], min_dim=1, features=x.dim() - 1)
    xin = x.detach().requires_grad_() if not x.requires_grad else x
    out = torch.prelu(xin, engine.bases[slot])
    engine.record(out, _finish_prelu, x, slot)
    return out


def _finish_prelu(engine: Engine, g: torch.Tensor, x: torch.Tensor, slot: int) -> None:
    p = engine.bases[slot]
    part = g * x.clamp(max=0)
    keep = (0, 1) if p.numel() > 1 else (0,)
    dims = tuple(i for i in range(part.dim()) if i not in keep)
    engine.add("direct", slot, (part.sum(dims) if dims else part).reshape(part.shape[0], *p.shape))


register_rule(torch.prelu, _prelu)
for _kind, _funcs in (("add", ADD), ("mul", MUL), ("sub", SUB), ("div", DIV)):
    for _func in _funcs:
        register_rule(_func, _binary(_kind, _func in _REFLECTED))  # + and * commute
_expand.takes_parameters_only = True  # it makes the batch axis: see _Tracked.__torch_function__
_repeat.takes_parameters_only = True
register_rule(_T.expand, _expand)
register_rule(_T.repeat, _repeat)
