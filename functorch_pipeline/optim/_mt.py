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
import torch.autograd.forward_ad as _forward_ad
from torch._C._functorch import TransformType as _TransformType
from torch._C._functorch import is_functorch_wrapped_tensor as _is_wrapped
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _interpreters

Scalar = float | int | torch.Tensor
TL = list[torch.Tensor]


# NOTE [when foreach]
# ``torch._foreach_*`` kernels have no vmap batching rule, so under ``torch.func.vmap``
# (ensembles of optimizer states) and other functorch transforms the leaf-by-leaf path
# is used. Under ``torch.compile`` the leaf-by-leaf path is used too: inductor fuses it
# into the same few kernels and it keeps the trace free of functorch queries. Plain
# eager tensors (the hot path) get foreach.

# NOTE [differentiable optimizers]
# Every update is differentiable (meta-learning, hypergradients): ``torch.func.grad``,
# ``vmap`` of it, ``jvp``, and plain ``torch.autograd`` (``create_graph=True``). The fast
# paths are not: ``torch._fused_adam_`` has no derivative, foreach kernels with a 0-d
# tensor scalar have a broken backward ("inconsistent range for TensorList output"), and
# an in-place write into a tensor that autograd saved (``sqrt`` saves its output) makes
# the backward fail or, under ``no_grad``, silently drops a term. So :func:`foreach_ok`
# (foreach and the fused Adam kernel) and :func:`recording` (in-place writes, including
# ``inplace=True``) switch the fast paths off whenever something is differentiated:
#
# * a functorch transform is active (``grad``, ``vjp``, ``jvp``, ``vmap``: wrapped tensors
#   do not report ``requires_grad`` to the layers below, so we do not look at them);
# * a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``);
# * grad mode is on and any input leaf requires grad.
#
# Otherwise (plain eager tensors, ``torch.no_grad`` or nothing requiring grad) they stay
# on. The pure path computes the same maths; the fused Adam kernel agrees with it to
# rounding (NOTE [fused adam kernel]). Under ``torch.compile`` only ``requires_grad``
# matters (AOTAutograd functionalizes in-place ops itself).


def _differentiating() -> bool:
    """A functorch transform or a forward-AD level is active (eager mode only)."""
    return _transforms_active() or _forward_ad._current_level >= 0


def foreach_ok(*lists: Sequence[Any]) -> bool:
    """Whether the multi-tensor fast path may run: every element of every list is a plain
    eager tensor and nothing is differentiated (NOTE [differentiable optimizers]). The
    first list holds the leaves; when it is empty (an empty tree, ``{}``) the answer is
    no: ``torch._foreach_*`` kernels reject empty lists, the leaf-by-leaf path returns
    ``[]``."""
    if not lists or not lists[0]:
        return False
    if torch.compiler.is_compiling() or _differentiating():
        return False
    grad_mode = torch.is_grad_enabled()
    for xs in lists:
        for x in xs:
            if not isinstance(x, torch.Tensor) or (grad_mode and x.requires_grad):
                return False
    return True


_transforms_active = torch._C._are_functorch_transforms_active


def recording(xs: Sequence[Any]) -> bool:
    """Whether ops on ``xs`` may be differentiated: then "in-place" helpers work out of
    place (in-place writes would invalidate tensors saved for backward, e.g. by ``sqrt``).
    NOTE [differentiable optimizers]."""
    if not torch.compiler.is_compiling() and _differentiating():
        return True
    if torch.is_grad_enabled():
        for x in xs:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                return True
    return False


def differentiated(*lists: Sequence[Any]) -> bool:
    """Whether the tensors in ``lists`` are being differentiated: wrapped by a functorch
    ``grad``/``jvp`` (``vmap`` alone is fine), a forward-AD level is open, or autograd
    records them (non-leaf tensors that require grad; ``requires_grad`` leaves such as
    ``nn.Parameter`` are what ``torch.optim`` updates under ``no_grad``)."""
    if _forward_ad._current_level >= 0:
        return True
    xs = [x for lst in lists for x in lst if isinstance(x, torch.Tensor)]
    if _transforms_active() and any(_is_wrapped(x) for x in xs):
        keys = {i.key() for i in _interpreters()}
        if _TransformType.Grad in keys or _TransformType.Jvp in keys:
            return True
    if torch.is_grad_enabled():
        for x in xs:
            if x.requires_grad and not x.is_leaf:
                return True
    return False


def inplace_ok(extra_args: dict[str, Any], *lists: Sequence[Any], fe: bool = False) -> bool:
    """``inplace=True`` was asked for, nothing in ``lists`` is differentiated (``fe=True``:
    :func:`foreach_ok` already said so for these lists) and every leaf can take the write
    (NOTE [leaves an in-place write would corrupt])."""
    if not extra_args.get("inplace"):
        return False
    if not fe and any(recording(xs) for xs in lists):
        return False
    return _writable([x for xs in lists for x in xs if isinstance(x, torch.Tensor)])


# NOTE [leaves an in-place write would corrupt]
# ``inplace=True`` writes each update into its gradient's buffer and each moment into its
# own. Three kinds of leaves cannot take that, and the call then runs the pure path (the
# same numbers, NOTE [in-place opt-in]) instead:
#
# * a leaf whose elements share memory (a stride of 0 over a size > 1: autograd's gradient
#   of ``p.sum()``): aten refuses to write into it;
# * leaves that share memory with each other (one gradient tensor under two keys, as
#   ``{k: p.grad}`` gives for a tied parameter listed twice): the buffer would be written
#   once per key, each write reading the previous one's result (6.5e-3 from the pure path
#   after two momentum steps). Leaves are compared by the byte ranges they span, so views
#   that interleave without sharing an element (two columns of one matrix) take the pure
#   path too;
# * an integer or boolean gradient (``sign_sgd`` takes them): a float update cannot be
#   written into it.
#
# Under ``torch.compile`` memory addresses cannot be read (fake tensors); AOTAutograd
# functionalizes in-place ops and handles aliased inputs itself, so only the first and
# last kinds are checked there.


def _writable(xs: Sequence[torch.Tensor]) -> bool:
    """Whether ``xs`` can take in-place writes leaf by leaf with the pure path's result
    (NOTE [leaves an in-place write would corrupt])."""
    compiling = torch.compiler.is_compiling()
    spans = []
    for x in xs:
        dt = x.dtype
        if not (dt.is_floating_point or dt.is_complex):
            return False
        if x.is_contiguous():
            n = x.nbytes
        elif _overlapping(x):
            return False
        else:
            n = (sum((k - 1) * st for k, st in zip(x.shape, x.stride(), strict=True)) + 1) * x.element_size()
        if n and not compiling:
            start = x.data_ptr()
            spans.append((start, start + n))
    spans.sort()
    return all(b[0] >= a[1] for a, b in zip(spans, spans[1:], strict=False))


def _overlapping(x: torch.Tensor) -> bool:
    """Whether several elements of ``x`` share memory (a stride of 0 over a size > 1, as
    autograd gives for the gradient of ``p.sum()``): an in-place write into it fails."""
    return any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape, strict=True))


def _scalar_fe(fe: bool, s: Any) -> bool:
    """foreach only with a scalar that is a number or a tensor nothing differentiates
    (foreach ops with a 0-d tensor that requires grad have no working backward)."""
    return fe and not (isinstance(s, torch.Tensor) and torch.is_grad_enabled() and s.requires_grad)


def like(s: Any, xs: Sequence[torch.Tensor]) -> Any:
    """A 0-d tensor scalar in the leaves' compute dtype (NOTE [scalar dtype])."""
    if isinstance(s, torch.Tensor) and xs and s.dtype != xs[0].dtype and s.is_floating_point():
        dt = scalar_dtype(xs)
        if s.dtype != dt:
            return s.to(dt)
    return s


def compute_dtype(dt: torch.dtype) -> torch.dtype:
    """The real dtype scalar maths runs in for leaves of dtype ``dt``: float64 for float64
    and complex128, else float32 (the opmath of half/bfloat16 kernels)."""
    return torch.float64 if dt in (torch.float64, torch.complex128) else torch.float32


def promotes(s: Any, xs: Sequence[torch.Tensor]) -> bool:
    """Whether the tensor scalar ``s`` would change the dtype of a 0-d leaf of ``xs`` in an
    out-of-place op (NOTE [scalar dtype]); then the helpers go leaf by leaf with
    :func:`to_leaf`."""
    if not isinstance(s, torch.Tensor) or 0 not in map(_DIM, xs):  # no 0-d leaf: a C loop
        return False
    dt = s.dtype
    return any(x.dtype != dt and x.dim() == 0 for x in xs)


_DIM = torch.Tensor.dim


def to_leaf(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` (computed from leaf ``x`` and a tensor scalar) back in ``x``'s dtype when
    ``x`` is 0-d, whose dtype the scalar may have promoted (NOTE [scalar dtype])."""
    if x.dim() == 0 and out.dtype != x.dtype and (x.is_floating_point() or x.is_complex()):
        return out.to(x.dtype)
    return out


def leaf_scalar(s: Any, x: torch.Tensor) -> Any:
    """The tensor scalar ``s`` for one leaf ``x``: in ``x``'s compute dtype when ``x`` is a
    0-d float leaf (so a 0-d float32 leaf of a mixed tree sees the scalar a float32 tree
    gives it), else unchanged (NOTE [scalar dtype])."""
    if isinstance(s, torch.Tensor) and x.dim() == 0 and s.is_floating_point() and (
            x.is_floating_point() or x.is_complex()):
        dt = compute_dtype(x.dtype)
        if s.dtype != dt:
            return s.to(dt)
    return s


# NOTE [scalar dtype]
# Schedules and injected hyperparameters are float64 0-d tensors (NOTE [schedule
# precision]). Multiplying a float32 leaf by one gives float32 for leaves with dims (0-d
# tensors do not promote them) but float64 for a 0-d leaf, whose update or state would
# then change dtype. So tensor scalars are cast to the leaves' compute dtype where they
# meet the leaves (:func:`scalar_dtype`: float64 if any leaf is float64 or complex128,
# else float32, the opmath of half/bfloat16 kernels): the rounding the kernels apply to a
# Python-number learning rate, as in torch.optim.
#
# One cast per list is not enough when the leaves' dtypes differ (a float64 weight and a
# 0-d float32 temperature): the scalar is then float64 and still promotes the 0-d float32
# leaf, and a later stateful transform rejects the float64 update. So whenever a tensor
# scalar would promote a 0-d leaf (:func:`promotes`), the helpers go leaf by leaf, give
# each 0-d leaf the scalar in its own compute dtype (:func:`leaf_scalar`, the value a
# float32-only tree would use) and cast the result back to the leaf's dtype
# (:func:`to_leaf`, for half/bfloat16 0-d leaves). Every leaf's update keeps its dtype, as
# in optax. Trees whose leaves all have dims, or all share the scalar's dtype, take the
# unchanged fast paths.


def for_leaf(x: torch.Tensor, *scalars: Any) -> tuple[Any, ...]:
    """``scalars`` (hyperparameters, possibly injected tensors) as one leaf ``x`` should
    see them: :func:`leaf_scalar` of each (NOTE [scalar dtype]); for transforms that loop
    over the leaves themselves instead of using the list helpers."""
    return tuple(leaf_scalar(s, x) for s in scalars)


def tensors(*xs: Any) -> list[torch.Tensor]:
    """The tensors among hyperparameters (learning rates, decays): pass them to
    :func:`foreach_ok` too, since one that requires grad must keep foreach off."""
    return [x for x in xs if isinstance(x, torch.Tensor)]


def is_float(x: torch.Tensor) -> bool:
    return x.is_floating_point() or x.is_complex()


def is_tensor(s: Any) -> bool:
    return isinstance(s, torch.Tensor)


def mul(xs: TL, s: Scalar, fe: bool) -> TL:
    s = like(s, xs)
    if promotes(s, xs):
        return [to_leaf(x * leaf_scalar(s, x), x) for x in xs]
    if _scalar_fe(fe, s):
        return list(torch._foreach_mul(xs, s))
    return [x * s for x in xs]


def mul_(xs: TL, s: Scalar, fe: bool) -> TL:
    s = like(s, xs)
    if (not fe and recording(xs)) or not _scalar_fe(True, s):
        return mul(xs, s, fe)
    if promotes(s, xs):
        for x in xs:
            x.mul_(leaf_scalar(s, x))
        return xs
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
        fe = _scalar_fe(fe, alpha)
        ys = mul(ys, alpha, fe)
        alpha = 1
    if fe:
        return list(torch._foreach_add(xs, ys, alpha=alpha))
    if alpha == 1:
        return [x + y for x, y in zip(xs, ys, strict=True)]
    return [torch.add(x, y, alpha=alpha) for x, y in zip(xs, ys, strict=True)]


def add_(xs: TL, ys: TL, fe: bool, alpha: Scalar = 1) -> TL:
    if (not fe and (recording(xs) or recording(ys))) or not _scalar_fe(True, alpha):
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
    s = like(s, xs)
    if promotes(s, xs):
        return [to_leaf(x + leaf_scalar(s, x), x) for x in xs]
    if _scalar_fe(fe, s):
        return list(torch._foreach_add(xs, s))
    return [x + s for x in xs]


def add_scalar_(xs: TL, s: Scalar, fe: bool) -> TL:
    s = like(s, xs)
    if (not fe and recording(xs)) or not _scalar_fe(True, s):
        return add_scalar(xs, s, fe)
    if promotes(s, xs):
        for x in xs:
            x.add_(leaf_scalar(s, x))
        return xs
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
    inplace = inplace and (fe or not (recording(xs) or recording(ys)))
    if is_tensor(w):
        w = like(w, xs)
        fe = _scalar_fe(fe, w)
        d = sub(ys, xs, fe)
        d = mul_(d, w, fe)
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
    if any(x.is_complex() for x in g):  # g * g is the complex square, not |g|^2
        raise TypeError(
            "fp.optim: a complex gradient reached a second moment (adam, adamw, nadam, radam, "
            "rmsprop, adadelta, ...), which would square it as a complex number (Adam's update "
            "was then 1 + 0j whatever the gradient); pass real views instead "
            "(torch.view_as_real on the parameters and gradients)")
    inplace = inplace and (fe or not (recording(nu) or recording(g)))
    decay = like(decay, nu)
    fe = _scalar_fe(fe, decay)
    out = mul_(nu, decay, fe) if inplace else mul(nu, decay, fe)
    w = 1 - decay
    if is_tensor(w):
        g2 = mul_list(g, g, fe)
        return add_(out, g2, fe, alpha=w)
    if not fe and (recording(out) or recording(g)):
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
    """float64 if any leaf is float64 or complex128, else float32: the precision of
    step-count maths (a complex leaf's scalars are real, in its real part's precision)."""
    for x in xs:
        if x.dtype in (torch.float64, torch.complex128):
            return torch.float64
    return torch.float32


def hyper_dtype(device: torch.device) -> torch.dtype:
    """The dtype of hyperparameter and schedule values: float64, the widest real dtype
    (so a float64 run gets torch.optim's exact double learning rate), except on MPS,
    which has no float64. A 0-d float64 tensor does not promote float32 leaves."""
    return torch.float32 if device.type == "mps" else torch.float64


def addcmul(xs: TL, ys: TL, zs: TL, fe: bool, inplace: bool = False) -> TL:
    """``xs + ys * zs`` (one fused kernel; in place on ``xs`` when ``inplace``)."""
    inplace = inplace and (fe or not (recording(xs) or recording(ys)))
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
