"""Tree maths: elementwise arithmetic, reductions and constructors over pytrees.

Where every leaf is a tensor and each pair has one shape, dtype and device (checked first),
the binary ops use PyTorch's multi-tensor ``_foreach`` kernels (one dispatch for the whole
tree); otherwise they go leaf by leaf (broadcasting and type promotion as ``x + y``), and a
pair that does not combine raises a ValueError naming the leaf's key path.
Reductions return 0-d tensors (no host sync); ``size`` and ``nbytes`` return ints.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from functorch_pipeline.tree._core import PyTree
from functorch_pipeline.tree._core import _structure_error
from functorch_pipeline.tree._core import flatten
from functorch_pipeline.tree._core import flatten_with_path
from functorch_pipeline.tree._core import keystr
from functorch_pipeline.tree._core import map
from functorch_pipeline.tree._core import same_structure
from functorch_pipeline.tree._core import structure
from functorch_pipeline.tree._core import unflatten

__all__ = [
    "add",
    "add_scale",
    "allclose",
    "full_like",
    "global_norm",
    "max",
    "nbytes",
    "norm",
    "ones_like",
    "scale",
    "size",
    "sub",
    "sum",
    "vdot",
    "where",
    "zeros_like",
]

_builtin_sum = sum


def _all_tensors(xs: list[Any]) -> bool:
    # len(), not bool(): torch 2.11's dynamo cannot trace bool() of a list (fp.jit, fullgraph)
    return len(xs) > 0 and all(isinstance(x, torch.Tensor) for x in xs)


def _foreach_ok(la: list[Any], lb: list[Any]) -> bool:
    """Whether two leaf lists may go to a ``torch._foreach_*`` kernel together: all tensors,
    each pair of one shape, dtype and device (checked before the private kernel sees them).
    Any other pair (broadcasting, mixed dtypes, numbers) goes leaf by leaf, with the same
    numbers and errors that name the leaf."""
    return _all_tensors(la) and _all_tensors(lb) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
        for x, y in zip(la, lb, strict=True))


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} tensor on {x.device}"
    return f"a {type(x).__name__}"


def _leafwise(name: str, a: PyTree, ta: Any, la: list[Any], lb: list[Any],
              op: Callable[..., Any]) -> PyTree:
    out = []
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        try:
            out.append(op(x, y))
        except (RuntimeError, TypeError) as e:  # shapes that do not broadcast, devices
            path = keystr(flatten_with_path(a)[0][i])
            raise ValueError(f"tree.{name}: leaf `{path}`: {_describe(x)} and {_describe(y)} "
                             f"do not combine ({e})") from e
    return unflatten(ta, out)


def _same_or_raise(name: str, *trees: PyTree) -> tuple[list[list[Any]], Any]:
    """The trees' leaves and the first's treedef; a ValueError naming the key paths that
    differ when the structures do (also where one tree is deeper at a leaf of another,
    which ``map`` would accept as a prefix and hand a whole subtree to the op)."""
    flat = [flatten(t) for t in trees]
    if not all(same_structure(flat[0][1], td) for _, td in flat[1:]):
        raise _structure_error(f"tree.{name}", trees, ValueError(
            "; ".join(str(td) for _, td in flat)))
    return [leaves_ for leaves_, _ in flat], flat[0][1]


def _binary(name: str, a: PyTree, b: PyTree, foreach: Callable[..., Any], op: Callable[..., Any]) -> PyTree:
    (la, lb), ta = _same_or_raise(name, a, b)
    if _foreach_ok(la, lb):
        return unflatten(ta, foreach(la, lb))
    return _leafwise(name, a, ta, la, lb, op)


def add(a: PyTree, b: PyTree) -> PyTree:
    """``a + b`` leaf by leaf.

    Args:
        a: a pytree of tensors (or numbers).
        b: a tree with the same structure as ``a``.

    Returns:
        A tree of ``a``'s structure holding ``a + b`` per leaf.

    Examples:
        >>> add({"w": torch.tensor(1.)}, {"w": torch.tensor(2.)})
        {'w': tensor(3.)}
    """
    return _binary("add", a, b, torch._foreach_add, lambda x, y: x + y)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` leaf by leaf.

    Args:
        a: a pytree of tensors (or numbers).
        b: a tree with the same structure as ``a``.

    Returns:
        A tree of ``a``'s structure holding ``a - b`` per leaf.

    Examples:
        >>> sub([torch.tensor(3.)], [torch.tensor(1.)])
        [tensor(2.)]
    """
    return _binary("sub", a, b, torch._foreach_sub, lambda x, y: x - y)


def scale(tree: PyTree, s: float | torch.Tensor) -> PyTree:
    """``s * tree``; ``s`` may be a 0-d tensor (no host sync).

    Args:
        tree: a pytree of tensors (or numbers).
        s: the factor: a Python number or a 0-d tensor.

    Returns:
        A tree of ``tree``'s structure holding ``s * leaf``.

    Examples:
        >>> scale({"w": torch.tensor([1., 2.])}, 3.0)
        {'w': tensor([3., 6.])}
    """
    ls, td = flatten(tree)
    if _all_tensors(ls) and not (isinstance(s, torch.Tensor) and s.dim() > 0):
        return unflatten(td, torch._foreach_mul(ls, s))
    return unflatten(td, [x * s for x in ls])


def add_scale(a: PyTree, s: float | torch.Tensor, b: PyTree) -> PyTree:
    """``a + s * b`` leaf by leaf (an axpy).

    Args:
        a: a pytree of tensors (or numbers).
        s: the factor on ``b``: a number or a 0-d tensor.
        b: a tree with the same structure as ``a``.

    Returns:
        A tree of ``a``'s structure holding ``a + s * b`` per leaf.

    Examples:
        >>> add_scale([torch.tensor(1.)], 0.5, [torch.tensor(4.)])
        [tensor(3.)]
    """
    (la, lb), ta = _same_or_raise("add_scale", a, b)
    if _foreach_ok(la, lb):
        if isinstance(s, torch.Tensor):
            return unflatten(ta, torch._foreach_add(la, torch._foreach_mul(lb, s)))
        if _alpha_ok(s, la):
            return unflatten(ta, torch._foreach_add(la, lb, alpha=s))
        if _real_number(s) and all(x.is_floating_point() for x in la):
            # half precision: s * b rounded to the leaf dtype, then added, as x + s * y
            return unflatten(ta, torch._foreach_add(la, torch._foreach_mul(lb, s)))
    return _leafwise("add_scale", a, ta, la, lb, lambda x, y: x + s * y)


def _alpha_ok(s: Any, leaves_: list[torch.Tensor]) -> bool:
    """Whether ``_foreach_add(a, b, alpha=s)`` is ``a + s * b`` for these leaves: a real
    number ``s`` on float32/float64/complex leaves. (It refuses a float ``s`` on integer
    leaves, a complex ``s`` on real ones and 65536 on float16 (above its range, though
    ``s * b`` may not be), and gives a bool for bool leaves where ``a + s * b`` is an int.)"""
    return _real_number(s) and all(x.dtype in _ALPHA_DTYPES for x in leaves_)


def _real_number(s: Any) -> bool:
    return isinstance(s, (int, float)) and not isinstance(s, bool)


_ALPHA_DTYPES = frozenset((torch.float32, torch.float64, torch.complex64, torch.complex128))


def vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    """The inner product of two trees, summed over all leaves (a 0-d tensor).

    Args:
        a: a pytree of tensors (or numbers).
        b: a tree with the same structure as ``a``.

    Returns:
        A 0-d tensor: the sum over leaves of ``(a.conj() * b).sum()`` (``optax.tree.vdot``,
        ``numpy.vdot``: complex leaves of ``a`` are conjugated, so ``vdot(a, a)`` is the
        squared norm).

    Examples:
        >>> vdot({"x": torch.tensor([1., 2.])}, {"x": torch.tensor([3., 4.])})
        tensor(11.)
        >>> vdot([torch.tensor([1j])], [torch.tensor([1j])])
        tensor(1.+0.j)
    """
    (la, lb), _ = _same_or_raise("vdot", a, b)
    terms = [torch.sum(torch.as_tensor(x).conj() * torch.as_tensor(y)) for x, y in zip(la, lb, strict=True)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def sum(tree: PyTree) -> torch.Tensor:  # noqa: A001 - optax.tree.sum
    """The sum of every element of every leaf (a 0-d tensor).

    Args:
        tree: a pytree of tensors (or numbers).

    Returns:
        A 0-d tensor holding the sum of all elements.

    Examples:
        >>> sum({"a": torch.ones(3), "b": torch.tensor(2.)})
        tensor(5.)
    """
    ls = [torch.as_tensor(x) for x in flatten(tree)[0]]
    if not ls:
        return torch.zeros(())
    return torch.stack([x.sum() for x in ls]).sum()


def max(tree: PyTree) -> torch.Tensor:  # noqa: A001 - optax.tree.max
    """The largest element over all leaves (a 0-d tensor).

    Args:
        tree: a pytree of tensors (or numbers).

    Returns:
        A 0-d tensor holding the largest element.

    Examples:
        >>> max([torch.tensor([1., 5.]), torch.tensor(3.)])
        tensor(5.)
    """
    paths, leaves_, _ = flatten_with_path(tree)
    ls = [torch.as_tensor(x) for x in leaves_]
    if not ls:
        raise ValueError("tree.max: the tree has no leaves")
    for p, x in zip(paths, ls, strict=True):
        if x.numel() == 0:
            raise ValueError(f"tree.max: leaf `{keystr(p)}` is empty (shape {tuple(x.shape)}): "
                             "it has no largest element")
    return torch.stack([x.max() for x in ls]).max()


def norm(tree: PyTree, ord: float | str = 2, squared: bool = False) -> torch.Tensor:
    """The norm of all leaves taken together as one vector (``ord`` 1, 2 or ``inf``).

    Uses ``torch._foreach_norm``; the result is a 0-d tensor in the leaves' promoted dtype
    (real for complex leaves; integer and bool leaves count as the default float dtype),
    and the per-leaf norms of half-precision leaves are combined in float32.

    Args:
        tree: a pytree of tensors (or numbers).
        ord: the norm's order: ``1``, ``2`` or ``"inf"``/``math.inf``.
        squared: return the squared norm (``ord=2`` only), skipping the square root.

    Returns:
        A 0-d tensor: the norm of all leaves flattened into one vector.

    Examples:
        >>> norm({"a": torch.tensor([3.]), "b": torch.tensor([4.])})
        tensor(5.)
        >>> norm([torch.tensor([3., -4.])], ord=1), norm([torch.tensor([3., -4.])], ord="inf")
        (tensor(7.), tensor(4.))
    """
    # Empty leaves contribute nothing (and _foreach_norm rejects them for ord=inf).
    ls = [_float_leaf(t) for t in (torch.as_tensor(x) for x in flatten(tree)[0]) if t.numel()]
    if ord in ("inf", math.inf):
        ord = math.inf
    if ord not in (1, 2, math.inf):
        raise ValueError(f"tree.norm: `ord` must be 1, 2 or 'inf', got {ord!r}")
    if not ls:
        return torch.zeros(())
    if any(_is_functorch_wrapped(x) for x in ls):
        # _foreach_norm has no vmap batching rule; per-leaf norms do.
        per_leaf = [torch.linalg.vector_norm(x, ord) for x in ls]
    else:
        per_leaf = torch._foreach_norm(ls, ord)
    dtypes = {p.dtype for p in per_leaf}
    dtype = functools.reduce(torch.promote_types, dtypes)
    acc = torch.promote_types(dtype, torch.float32)  # no float16 sum of a float32 leaf's norm
    if len(dtypes) == 1:  # one cast of the stacked norms, not one per leaf
        stacked = torch.stack(per_leaf)
        stacked = stacked if stacked.dtype == acc else stacked.to(acc)
    else:
        stacked = torch.stack([p if p.dtype == acc else p.to(acc) for p in per_leaf])
    if ord == 2:
        out = torch.dot(stacked, stacked) if squared else torch.linalg.vector_norm(stacked)
    else:
        out = stacked.sum() if ord == 1 else stacked.max()
        out = out * out if squared else out
    return out if out.dtype == dtype else out.to(dtype)


def _float_leaf(t: torch.Tensor) -> torch.Tensor:
    """An integer or bool leaf as the default float dtype (norms need floats)."""
    return t if t.is_floating_point() or t.is_complex() else t.to(torch.get_default_dtype())


def _rows_sq_norms(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B,)`` squared L2 norms of ``t``'s rows along axis 0 (``B`` may be 0), accumulated
    in ``dtype``: one reduction that reads ``t`` once, without a squared copy of ``t``.
    Per-example norms in ghost clipping, ``fp.clipped_grad`` and ``optim``'s per-example
    clipping all use it."""
    if t.dim() > 2 and not t.is_contiguous():  # a permuted block: no copy to make rows
        return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), dtype=dtype).square()
    rows = t if t.dim() == 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))
    n = rows.shape[1]
    if n <= 4 * _NORM_BLOCK or dtype == torch.float64 or rows.stride(1) != 1:
        return torch.linalg.vector_norm(rows, dim=1, dtype=dtype).square()
    # NOTE [long rows]: blocks of _NORM_BLOCK reduced in `dtype`, their squares summed in
    # float64 (a view: rows are contiguous along axis 1, axis 0 may step further)
    full = n - n % _NORM_BLOCK
    blocks = rows[:, :full].unflatten(1, (full // _NORM_BLOCK, _NORM_BLOCK))
    sq = torch.linalg.vector_norm(blocks, dim=2, dtype=dtype).square().sum(1, dtype=torch.float64)
    if full < n:
        sq += torch.linalg.vector_norm(rows[:, full:], dim=1, dtype=dtype).square()
    return sq.to(dtype)


# NOTE [long rows]
# torch's float32 norm of one long row accumulates nearly in sequence on CPU: squared norms
# of rows of 16.7M entries (a 4096 x 4096 layer's per-example gradients) came out 1.3e-3
# low, always low, so clipping let such examples through 0.1% above the bound. Rows longer
# than four blocks (~3e-6 in one reduction) are reduced in blocks of this many entries
# (8e-7 each) and the blocks summed in float64; the MNIST CNN's rows (<= 16,416) take the
# single reduction as before.
_NORM_BLOCK = 1 << 14


def _is_functorch_wrapped(x: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def global_norm(tree: PyTree) -> torch.Tensor:
    """The global L2 norm of a tree (optax's name); same as ``norm(tree)``.

    Args:
        tree: a pytree of tensors (or numbers).

    Returns:
        A 0-d tensor: the L2 norm over all leaves.

    Examples:
        >>> global_norm([torch.tensor([6., 8.])])
        tensor(10.)
    """
    return norm(tree, 2)


def zeros_like(tree: PyTree) -> PyTree:
    """A tree of zeros with the same shapes, dtypes and devices.

    Args:
        tree: a pytree of tensors (or numbers).

    Returns:
        A tree of zeros shaped like ``tree``.

    Examples:
        >>> zeros_like({"w": torch.ones(2)})
        {'w': tensor([0., 0.])}
    """
    return map(lambda x: torch.zeros_like(torch.as_tensor(x)), tree)


def ones_like(tree: PyTree) -> PyTree:
    """A tree of ones with the same shapes, dtypes and devices.

    Args:
        tree: a pytree of tensors (or numbers).

    Returns:
        A tree of ones shaped like ``tree``.

    Examples:
        >>> ones_like([torch.zeros(2, dtype=torch.int64)])
        [tensor([1, 1])]
    """
    return map(lambda x: torch.ones_like(torch.as_tensor(x)), tree)


def full_like(tree: PyTree, fill_value: float | int | bool) -> PyTree:
    """A tree filled with ``fill_value``, shapes/dtypes/devices of ``tree``.

    Args:
        tree: a pytree of tensors (or numbers).
        fill_value: the value every element takes.

    Returns:
        A tree shaped like ``tree`` filled with ``fill_value``.

    Examples:
        >>> full_like((torch.zeros(2),), 7.0)
        (tensor([7., 7.]),)
    """
    return map(lambda x: torch.full_like(torch.as_tensor(x), fill_value), tree)


def where(condition: PyTree | torch.Tensor | bool, x: PyTree, y: PyTree) -> PyTree:
    """Pick ``x`` where ``condition`` holds, else ``y``. ``condition`` is either one
    (broadcast) boolean tensor for all leaves, or a tree matching ``x``.

    Args:
        condition: a boolean tensor or bool applied to every leaf, or a tree of booleans with the
            structure of ``x``.
        x: the tree picked where ``condition`` holds.
        y: the tree picked elsewhere (same structure as ``x``).

    Returns:
        A tree of ``x``'s structure with ``torch.where(condition, x, y)`` per leaf.

    Examples:
        >>> where(torch.tensor(False), {"a": torch.tensor(1.)}, {"a": torch.tensor(2.)})
        {'a': tensor(2.)}
    """
    if isinstance(condition, (torch.Tensor, bool)):
        c = condition
        (lx, ly), tx = _same_or_raise("where", x, y)
        cs = [torch.as_tensor(c, device=torch.as_tensor(a).device) for a in lx]
    else:
        (cs, lx, ly), tx = _same_or_raise("where", condition, x, y)
    out = []
    for i, (c, a, b) in enumerate(zip(cs, lx, ly, strict=True)):
        try:
            out.append(torch.where(c, a, b))
        except (RuntimeError, TypeError) as e:
            path = keystr(flatten_with_path(x)[0][i])
            raise ValueError(f"tree.where: leaf `{path}`: the condition ({_describe(c)}) does not "
                             f"combine with {_describe(a)} and {_describe(b)} ({e})") from e
    return unflatten(tx, out)


def allclose(a: PyTree, b: PyTree, rtol: float = 1e-5, atol: float = 1e-8, equal_nan: bool = False) -> bool:
    """Whether two trees have the same structure and all leaves are close.

    Returns a Python bool (it syncs: meant for tests and checks, not hot paths).

    Args:
        a: a pytree of tensors (or numbers).
        b: the tree to compare with ``a``.
        rtol: relative tolerance (as ``torch.allclose``).
        atol: absolute tolerance (as ``torch.allclose``).
        equal_nan: count NaNs in the same places as equal.

    Returns:
        ``True`` when the structures match and every leaf pair is close (a host bool: not for use
        inside compiled code).

    Examples:
        >>> allclose({"a": torch.tensor(1.0)}, {"a": torch.tensor(1.0 + 1e-9)})
        True
        >>> allclose({"a": torch.tensor(1.0)}, {"b": torch.tensor(1.0)})
        False
    """
    if structure(a) != structure(b):
        return False
    for x, y in zip(flatten(a)[0], flatten(b)[0], strict=True):
        tx, ty = torch.as_tensor(x), torch.as_tensor(y)
        if tx.shape != ty.shape:
            return False
        dt = torch.promote_types(tx.dtype, ty.dtype)  # as numpy: neither side is cast down
        if not dt.is_floating_point and not dt.is_complex:
            dt = torch.float64
        if not torch.allclose(tx.to(dt), ty.to(dt), rtol=rtol, atol=atol, equal_nan=equal_nan):
            return False
    return True


def size(tree: PyTree) -> int:
    """The total number of elements over all tensor leaves.

    Args:
        tree: a pytree of tensors (or numbers).

    Returns:
        The number of elements as a Python int.

    Examples:
        >>> size({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
        16
    """
    return _builtin_sum(int(x.numel()) for x in flatten(tree)[0] if isinstance(x, torch.Tensor))


def nbytes(tree: PyTree) -> int:
    """The total bytes of all tensor leaves (``numel * element_size``).

    Args:
        tree: a pytree of tensors (or numbers).

    Returns:
        The number of bytes as a Python int.

    Examples:
        >>> nbytes({"w": torch.zeros(3, 4), "i": torch.zeros(2, dtype=torch.int16)})
        52
    """
    return _builtin_sum(
        int(x.numel() * x.element_size()) for x in flatten(tree)[0] if isinstance(x, torch.Tensor)
    )

