"""Multi-tensor helpers shared by the transforms (private).

Every helper takes lists of tensors (the leaves of a tree) and a flag ``fe``: when it is
true the whole list goes through one ``torch._foreach_*`` call, otherwise the same
maths runs leaf by leaf. :func:`foreach_ok` decides (see NOTE [when foreach]).

Scalars may be Python numbers or 0-d tensors (a step count, an injected learning rate).
Tensor scalars only ever reach ``foreach`` overloads that take a ``Tensor`` (``mul``,
``add``, ``div``); the ``Scalar`` overloads would call ``.item()`` on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Scalar = float | int | torch.Tensor
TL = list[torch.Tensor]


# NOTE [when foreach]
# ``torch._foreach_*`` kernels have no vmap batching rule, so under ``torch.func.vmap``
# (ensembles of optimizer states) and other functorch transforms the leaf-by-leaf path
# is used. Under ``torch.compile`` the leaf-by-leaf path is used too: inductor fuses it
# into the same few kernels and it keeps the trace free of functorch queries. Plain
# eager tensors (the hot path) get foreach.


def foreach_ok(*lists: Sequence[Any]) -> bool:
    """Whether every element of every list is a plain eager tensor (not traced/wrapped)."""
    if torch.compiler.is_compiling() or _transforms_active():
        return False
    for xs in lists:
        for x in xs:
            if type(x) is not torch.Tensor and not isinstance(x, torch.Tensor):
                return False
    return True


_transforms_active = torch._C._are_functorch_transforms_active


def recording(xs: Sequence[torch.Tensor]) -> bool:
    """Whether autograd records ops on ``xs``: then "in-place" helpers work out of place
    (in-place writes would invalidate tensors saved for backward, e.g. by ``sqrt``)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def is_tensor(s: Any) -> bool:
    return isinstance(s, torch.Tensor)


def mul(xs: TL, s: Scalar, fe: bool) -> TL:
    if fe:
        return list(torch._foreach_mul(xs, s))
    return [x * s for x in xs]


def mul_(xs: TL, s: Scalar, fe: bool) -> TL:
    if recording(xs):
        return mul(xs, s, fe)
    if fe:
        torch._foreach_mul_(xs, s)
    else:
        for x in xs:
            x.mul_(s)
    return xs


def mul_list(xs: TL, ys: TL, fe: bool) -> TL:
    if fe:
        return list(torch._foreach_mul(xs, ys))
    return [x * y for x, y in zip(xs, ys, strict=True)]


def add(xs: TL, ys: TL, fe: bool, alpha: Scalar = 1) -> TL:
    """``xs + alpha * ys``."""
    if is_tensor(alpha):
        ys = mul(ys, alpha, fe)
        alpha = 1
    if fe:
        return list(torch._foreach_add(xs, ys, alpha=alpha))
    if alpha == 1:
        return [x + y for x, y in zip(xs, ys, strict=True)]
    return [torch.add(x, y, alpha=alpha) for x, y in zip(xs, ys, strict=True)]


def add_(xs: TL, ys: TL, fe: bool, alpha: Scalar = 1) -> TL:
    if recording(xs) or recording(ys):
        return add(xs, ys, fe, alpha)
    if is_tensor(alpha):
        ys = mul(ys, alpha, fe)
        alpha = 1
    if fe:
        torch._foreach_add_(xs, ys, alpha=alpha)
    else:
        for x, y in zip(xs, ys, strict=True):
            x.add_(y, alpha=alpha)
    return xs


def add_scalar(xs: TL, s: Scalar, fe: bool) -> TL:
    if fe:
        return list(torch._foreach_add(xs, s))
    return [x + s for x in xs]


def add_scalar_(xs: TL, s: Scalar, fe: bool) -> TL:
    if recording(xs):
        return add_scalar(xs, s, fe)
    if fe:
        torch._foreach_add_(xs, s)
    else:
        for x in xs:
            x.add_(s)
    return xs


def div(xs: TL, ys: TL, fe: bool) -> TL:
    if fe:
        return list(torch._foreach_div(xs, ys))
    return [x / y for x, y in zip(xs, ys, strict=True)]


def sqrt(xs: TL, fe: bool) -> TL:
    if fe:
        return list(torch._foreach_sqrt(xs))
    return [torch.sqrt(x) for x in xs]


def lerp(xs: TL, ys: TL, w: Scalar, fe: bool, inplace: bool = False) -> TL:
    """``xs + w * (ys - xs)``, in place on ``xs`` when ``inplace``."""
    inplace = inplace and not (recording(xs) or recording(ys))
    if is_tensor(w):
        d = sub(ys, xs, fe)
        mul_(d, w, fe)
        return add_(xs, d, fe) if inplace else add(xs, d, fe)
    if fe:
        if inplace:
            torch._foreach_lerp_(xs, ys, w)
            return xs
        return list(torch._foreach_lerp(xs, ys, w))
    if inplace:
        for x, y in zip(xs, ys, strict=True):
            x.lerp_(y, w)
        return xs
    return [torch.lerp(x, y, w) for x, y in zip(xs, ys, strict=True)]


def sub(xs: TL, ys: TL, fe: bool) -> TL:
    if fe:
        return list(torch._foreach_sub(xs, ys))
    return [x - y for x, y in zip(xs, ys, strict=True)]


def ema_sq(nu: TL, g: TL, decay: Scalar, fe: bool, inplace: bool = False) -> TL:
    """``decay * nu + (1 - decay) * g * g`` (torch's ``mul_`` then ``addcmul_`` order)."""
    inplace = inplace and not (recording(nu) or recording(g))
    out = mul_(nu, decay, fe) if inplace else mul(nu, decay, fe)
    w = 1 - decay
    if is_tensor(w):
        g2 = mul_list(g, g, fe)
        return add_(out, g2, fe, alpha=w)
    if recording(out) or recording(g):
        out = [torch.addcmul(o, x, x, value=w) for o, x in zip(out, g, strict=True)]
    elif fe:
        torch._foreach_addcmul_(out, g, g, w)
    elif inplace:
        for o, x in zip(out, g, strict=True):
            o.addcmul_(x, x, value=w)
    else:  # out of place: addcmul_ has no vmap batching rule
        out = [torch.addcmul(o, x, x, value=w) for o, x in zip(out, g, strict=True)]
    return out


def cast(xs: TL, dtype: torch.dtype | None) -> TL:
    if dtype is None:
        return xs
    return [x.to(dtype) for x in xs]


def scalar_dtype(xs: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any leaf is float64, else float32: the precision of step-count maths."""
    for x in xs:
        if x.dtype == torch.float64:
            return torch.float64
    return torch.float32


def addcmul(xs: TL, ys: TL, zs: TL, fe: bool, inplace: bool = False) -> TL:
    """``xs + ys * zs`` (one fused kernel; in place on ``xs`` when ``inplace``)."""
    inplace = inplace and not (recording(xs) or recording(ys))
    if fe:
        if inplace:
            torch._foreach_addcmul_(xs, ys, zs)
            return xs
        return list(torch._foreach_addcmul(xs, ys, zs))
    if inplace:
        for x, y, z in zip(xs, ys, zs, strict=True):
            x.addcmul_(y, z)
        return xs
    return [torch.addcmul(x, y, z) for x, y, z in zip(xs, ys, zs, strict=True)]
