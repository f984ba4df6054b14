"""Whole-tree operations: ravel, dtype casts, device moves, copies, stacking, random."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch

from functorch_pipeline import random as _random
from functorch_pipeline.tree._core import PyTree
from functorch_pipeline.tree._core import flatten
from functorch_pipeline.tree._core import flatten_with_path
from functorch_pipeline.tree._core import keystr
from functorch_pipeline.tree._core import map
from functorch_pipeline.tree._core import same_structure
from functorch_pipeline.tree._core import unflatten

__all__ = [
    "astype",
    "clone",
    "detach",
    "random_like",
    "ravel",
    "stack",
    "to",
    "unstack",
]


def ravel(tree: PyTree) -> tuple[torch.Tensor, Callable[[torch.Tensor], PyTree]]:
    """Concatenate every tensor leaf into one flat vector; also return its inverse.

    Leaves are promoted to a common dtype in the vector; ``unravel`` restores each
    leaf's shape and dtype. Like ``jax.flatten_util.ravel_pytree``.

    Args:
        tree: a pytree of tensors.

    Returns:
        ``(flat, unravel)``: a 1-d tensor of all elements (leaves in flatten order, promoted to a
        common dtype) and a function mapping such a vector back to a tree of ``tree``'s structure,
        shapes and dtypes.

    Examples:
        >>> flat, unravel = ravel({"w": torch.ones(2, 2), "b": torch.zeros(2)})
        >>> flat
        tensor([0., 0., 1., 1., 1., 1.])
        >>> unravel(flat * 2)["w"]
        tensor([[2., 2.],
                [2., 2.]])
    """
    paths, leaves_, treedef = flatten_with_path(tree)
    for path, x in zip(paths, leaves_, strict=True):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"tree.ravel: leaf at path `{keystr(path)}` is a {type(x).__name__}, not a tensor")
    shapes = [x.shape for x in leaves_]
    dtypes = [x.dtype for x in leaves_]
    sizes = [x.numel() for x in leaves_]
    if leaves_:
        common = dtypes[0]
        for d in set(dtypes):
            common = torch.promote_types(common, d)
        flat = torch.cat([x.reshape(-1) if x.dtype == common else x.reshape(-1).to(common) for x in leaves_])
    else:
        flat = torch.zeros(0)
    total = int(flat.numel())

    def unravel(vec: torch.Tensor) -> PyTree:
        if vec.dim() != 1 or vec.shape[0] != total:
            raise ValueError(f"unravel: expected a vector of shape ({total},), got {tuple(vec.shape)}")
        parts = torch.split(vec, sizes) if leaves_ else []
        return unflatten(treedef, [p.view(s).to(d) for p, s, d in zip(parts, shapes, dtypes, strict=True)])

    return flat, unravel


def astype(tree: PyTree, dtype: torch.dtype, *, floating_only: bool = True) -> PyTree:
    """Cast tensor leaves to ``dtype``. By default only floating-point leaves are cast
    (labels, counters and masks keep their dtype; complex leaves too, unless ``dtype`` is
    complex, so no imaginary part is dropped); ``floating_only=False`` casts all.

    Args:
        tree: a pytree whose tensor leaves are used (other leaves pass through).
        dtype: the target dtype.
        floating_only: cast only floating-point leaves (default); ``False`` casts every tensor leaf.

    Returns:
        A tree of the same structure with the cast leaves.

    Examples:
        >>> astype({"w": torch.ones(1), "step": torch.tensor(3)}, torch.float64)
        {'w': tensor([1.], dtype=torch.float64), 'step': tensor(3)}
    """

    def cast(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if floating_only and not (x.is_floating_point() or (x.is_complex() and dtype.is_complex)):
            return x  # a complex leaf keeps its imaginary part unless dtype is complex
        return x.to(dtype)

    return map(cast, tree)


def to(
    tree: PyTree,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    non_blocking: bool = False,
) -> PyTree:
    """Move every tensor leaf to ``device`` (and optionally cast floating leaves).

    Non-tensor leaves are left alone. ``non_blocking=True`` overlaps host-to-device
    copies from pinned memory with compute (see ``torch.Tensor.to``). As with
    ``Tensor.to``, a dtype may be given alone in second place: ``to(tree, torch.float16)``
    casts without moving.

    Args:
        tree: a pytree whose tensor leaves are used (other leaves pass through).
        device: the target device (a ``torch.device``, a string such as ``"cuda:0"`` or a
            device index); ``None`` keeps each leaf's device. A ``torch.dtype`` here is
            taken as ``dtype``.
        dtype: if given, floating-point leaves are cast to it.
        non_blocking: passed to ``torch.Tensor.to`` (overlaps pinned host-to-device copies).

    Returns:
        A tree of the same structure with the moved leaves.

    Raises:
        TypeError: ``device`` or ``dtype`` of the wrong type, or two dtypes given.

    Examples:
        >>> to({"w": torch.ones(1)}, "cpu", torch.float16)
        {'w': tensor([1.], dtype=torch.float16)}
        >>> to({"w": torch.ones(1), "n": torch.arange(1)}, torch.float64)
        {'w': tensor([1.], dtype=torch.float64), 'n': tensor([0])}
    """
    if isinstance(device, torch.dtype):  # Tensor.to(dtype): the dtype in second place
        if dtype is not None:
            raise TypeError(f"fp.tree.to(tree, device, dtype): got two dtypes, {device} as "
                            f"`device` and {dtype} as `dtype`; pass one")
        device, dtype = None, device
    if device is not None and (isinstance(device, bool)
                               or not isinstance(device, (torch.device, str, int))):
        raise TypeError(f"fp.tree.to(tree, device, dtype): `device` must be a torch.device, a "
                        f"str, a device index or None, got {type(device).__name__} {device!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"fp.tree.to(tree, device, dtype): `dtype` must be a torch.dtype or "
                        f"None, got {type(dtype).__name__} {dtype!r}")

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        d = dtype if dtype is not None and x.is_floating_point() else None
        return x.to(device=device, dtype=d, non_blocking=non_blocking)

    return map(move, tree)


def clone(tree: PyTree) -> PyTree:
    """A deep copy of every tensor leaf (keeps autograd history; see :func:`detach`).

    Args:
        tree: a pytree whose tensor leaves are used (other leaves pass through).

    Returns:
        A tree of the same structure whose tensor leaves are fresh copies.

    Examples:
        >>> a = {"w": torch.zeros(1)}; b = clone(a); _ = b["w"].add_(1); a["w"]
        tensor([0.])
    """
    return map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def detach(tree: PyTree) -> PyTree:
    """Detach every tensor leaf from the autograd graph (shares storage).

    Args:
        tree: a pytree whose tensor leaves are used (other leaves pass through).

    Returns:
        A tree of the same structure whose tensor leaves are detached views.

    Examples:
        >>> detach({"w": torch.ones(1, requires_grad=True)})["w"].requires_grad
        False
    """
    return map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def stack(trees: Sequence[PyTree], dim: int = 0) -> PyTree:
    """Stack a list of same-structured trees along a new axis ``dim`` (ensembles,
    per-example results).

    Args:
        trees: a non-empty sequence of trees with one structure and matching leaf shapes.
        dim: the new axis.

    Returns:
        One tree whose leaves are ``torch.stack`` of the corresponding leaves.

    Examples:
        >>> stack([{"w": torch.tensor(1.)}, {"w": torch.tensor(2.)}])
        {'w': tensor([1., 2.])}
    """
    trees = list(trees)
    if not trees:
        raise ValueError("tree.stack: need at least one tree")
    ts = [flatten(t) for t in trees]
    paths = flatten_with_path(trees[0])[0]
    for i, (_, td) in enumerate(ts[1:], start=1):
        if not same_structure(ts[0][1], td):
            map(lambda *_: None, trees[0], trees[i])  # raises naming the key paths
            raise ValueError(f"tree.stack: tree {i} has structure {td}, tree 0 has {ts[0][1]}")
    out = []
    for j, p in enumerate(paths):
        xs = [torch.as_tensor(leaves_[j]) for leaves_, _ in ts]
        try:
            out.append(torch.stack(xs, dim=dim))
        except (RuntimeError, IndexError) as e:
            got = ", ".join(str(tuple(x.shape)) for x in xs)
            raise ValueError(f"tree.stack: leaf `{keystr(p)}` cannot be stacked on axis {dim}: "
                             f"shapes {got} ({e})") from e
    return unflatten(ts[0][1], out)


def unstack(tree: PyTree, dim: int = 0) -> list[PyTree]:
    """Split a tree along axis ``dim`` into a list of trees (inverse of :func:`stack`).

    Args:
        tree: a pytree of tensors that share the size of axis ``dim``.
        dim: the axis to split along (removed from the results).

    Returns:
        A list of trees, one per index along ``dim``.

    Examples:
        >>> unstack({"w": torch.tensor([1., 2.])})
        [{'w': tensor(1.)}, {'w': tensor(2.)}]
    """
    paths, leaves_, treedef = flatten_with_path(tree)
    if not leaves_:
        raise ValueError("tree.unstack: the tree has no leaves")
    for p, x in zip(paths, leaves_, strict=True):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"tree.unstack: leaf `{keystr(p)}` is a {type(x).__name__}, not a tensor")
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"tree.unstack: axis {dim} is out of range for leaf `{keystr(p)}` of "
                             f"shape {tuple(x.shape)}")
    n = leaves_[0].shape[dim]
    for p, x in zip(paths, leaves_, strict=True):
        if x.shape[dim] != n:
            raise ValueError(
                f"tree.unstack: leaf at path `{keystr(p)}` has size {x.shape[dim]} on axis {dim} "
                f"but the first leaf has {n}"
            )
    parts = [x.unbind(dim) for x in leaves_]
    return [unflatten(treedef, [p[i] for p in parts]) for i in range(n)]


def random_like(
    key: torch.Tensor, tree: PyTree, distribution: str = "normal"
) -> PyTree:
    """A tree of random draws shaped like ``tree``: ``"normal"`` or ``"uniform"`` in
    each leaf's dtype and device; each leaf gets its own key (``split`` of ``key``).

    Args:
        key: a key from ``fp.random.key``.
        tree: a pytree of tensors (or numbers); non-floating leaves draw in float32.
        distribution: ``"normal"`` (standard normal) or ``"uniform"`` (on [0, 1)).

    Returns:
        A tree of ``tree``'s structure holding fresh draws of each leaf's shape, dtype and device.

    Examples:
        >>> import functorch_pipeline as fp
        >>> r = random_like(fp.random.key(0), {"a": torch.zeros(2), "b": torch.zeros(3)})
        >>> r["a"].shape, r["b"].shape
        (torch.Size([2]), torch.Size([3]))
    """
    if distribution not in ("normal", "uniform"):
        raise ValueError(f"tree.random_like: `distribution` must be 'normal' or 'uniform', got {distribution!r}")
    leaves_, treedef = flatten(tree)
    keys = _random.split(key, max(len(leaves_), 1))
    sample = _random.normal if distribution == "normal" else _random.uniform
    out = []
    for k, x in zip(keys, leaves_, strict=False):
        x = torch.as_tensor(x)
        dt = x.dtype if x.is_floating_point() else torch.float32
        out.append(sample(k.to(x.device), tuple(x.shape), dt))
    return unflatten(treedef, out)

