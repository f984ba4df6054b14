"""Minibatches of data already held as tensors, in an order fixed by a random key.

# NOTE [data order is state]
The shuffle of an epoch is ``fp.random.permutation(key, n)``: a pure function of the key,
independent of PyTorch's global RNG and of how many batches were drawn before. Derive
the key of epoch ``e`` as ``fold_in(base_key, e)`` and the position inside the epoch from
the step counter, and the data order is fully determined by ``(base_key, step)`` — both
part of a ``TrainState`` — so a run resumed from a checkpoint sees exactly the batches it
would have seen without the interruption (``start=`` skips the batches already used).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any

import torch

from functorch_pipeline import random as _random
from functorch_pipeline import tree as _tree

__all__ = ["batches", "num_batches"]


def _as_int(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (``int``, ``np.int64``, ...), else ``None``.

    ``bool`` (and ``np.bool_``) is refused: ``True`` is not a count.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _as_float(value: Any) -> float | None:
    """``value`` as a Python float if it is a real number (``float``, ``int``, ``np.float32``,
    ...), else ``None``; ``bool`` is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _describe(x: Any) -> str:
    """A short description of a bad argument: a tensor's shape and dtype, else its repr."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{x!r} ({type(x).__name__})"


def _check_key(where: str, key: Any) -> None:
    """Refuse anything but one ``fp.random`` key of shape ``(2,)`` (a batch of keys too)."""
    if not _random.is_key(key) or key.dim() != 1:
        raise TypeError(
            f"{where}: `key` must be one fp.random key (an int64 tensor of shape (2,), e.g. "
            f"fp.random.fold_in(key, epoch)), got {_describe(key)}"
        )


def num_batches(num_examples: int, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches one epoch has.

    Args:
        num_examples: the dataset size.
        batch_size: examples per batch.
        drop_last: drop a final incomplete batch (as ``DataLoader``).

    Returns:
        The number of batches per epoch, an int.

    Examples:
        >>> num_batches(10, 4), num_batches(10, 4, drop_last=True)
        (3, 2)
    """
    for name, v in (("num_examples", num_examples), ("batch_size", batch_size)):
        if _as_int(v) is None:
            raise TypeError(f"num_batches: `{name}` must be an int, got {type(v).__name__}")
    num_examples, batch_size = int(num_examples), int(batch_size)
    if batch_size < 1:
        raise ValueError(f"num_batches: `batch_size` must be >= 1, got {batch_size}")
    if num_examples < 0:
        raise ValueError(f"num_batches: `num_examples` must be >= 0, got {num_examples}")
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def _num_examples(data: Any, fn: str) -> int:
    paths, leaves, _ = _tree.flatten_with_path(data)
    if not leaves:
        raise ValueError(f"{fn}: `data` has no tensor leaves")
    sizes = []
    for p, x in zip(paths, leaves, strict=True):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"{fn}: leaf at path `{_tree.keystr(p)}` must be a tensor with a leading example axis")
        sizes.append(x.shape[0])
    for p, s in zip(paths, sizes, strict=True):
        if s != sizes[0]:
            raise ValueError(
                f"{fn}: leaf at path `{_tree.keystr(p)}` has {s} examples but leaf "
                f"`{_tree.keystr(paths[0])}` has {sizes[0]}"
            )
    return sizes[0]


def batches(
    data: Any,
    batch_size: int,
    *,
    key: torch.Tensor | None = None,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[Any]:
    """One epoch of minibatches from a pytree of tensors that share a leading axis.

    Faster than a ``DataLoader`` over a ``TensorDataset`` (one gather per leaf per batch,
    no per-example Python), and reproducible: see NOTE [data order is state].

    Args:
      data: a pytree of tensors, e.g. ``(images, labels)``; axis 0 indexes examples.
      batch_size: examples per batch, an int >= 1 (numpy integers are accepted).
      key: one ``fp.random`` key (shape ``(2,)``): shuffle with
        ``fp.random.permutation(key, n)``; ``None`` keeps the order (batches are then
        views, no copy).
      drop_last: drop the final short batch.
      start: skip this many batches (resume inside an epoch), an int in
        ``[0, num_batches]``.

    Returns:
      An iterator of pytrees shaped like ``data`` with ``batch_size`` examples each.

    Raises:
      ValueError: ``batch_size`` or ``start`` out of range, or leaves disagree on axis 0.
      TypeError: ``key`` is not ``None`` or one key, or a leaf is not a tensor.

    >>> import functorch_pipeline as fp
    >>> x, y = torch.arange(5.0), torch.arange(5)
    >>> [b[1].tolist() for b in batches((x, y), 2)]
    [[0, 1], [2, 3], [4]]
    >>> k = fp.random.key(0)
    >>> a = [b[1].tolist() for b in batches((x, y), 2, key=k)]
    >>> b = [b[1].tolist() for b in batches((x, y), 2, key=k, start=1)]
    >>> sorted(sum(a, [])), a[1:] == b
    ([0, 1, 2, 3, 4], True)

    Notes:
      NOTE [data order is state]: the epoch's shuffle is ``fp.random.permutation(key, n)``, a pure
        function of the key (not of PyTorch's global RNG), so with ``key = fold_in(base_key,
        epoch)`` the data order is fixed by ``(base_key, step)`` and a resumed run sees exactly the
        batches an uninterrupted one would.
    """
    fn = "batches(data, batch_size)"
    size = _as_int(batch_size)
    if size is None or size < 1:
        raise ValueError(f"{fn}: `batch_size` must be an int >= 1, got {batch_size!r}")
    if key is not None:
        _check_key(fn, key)
    n = _num_examples(data, fn)
    total = num_batches(n, size, drop_last=drop_last)
    first = _as_int(start)
    if first is None or not 0 <= first <= total:
        raise ValueError(f"{fn}: `start` must be an int in [0, {total}], got {start!r}")
    return _iterate(data, n, size, key, total, first)


def _iterate(data: Any, n: int, batch_size: int, key: torch.Tensor | None, total: int, start: int) -> Iterator[Any]:
    leaves, treedef = _tree.flatten(data)
    if key is None:
        for i in range(start, total):
            lo = i * batch_size
            yield _tree.unflatten(treedef, [x[lo : lo + batch_size] for x in leaves])
        return
    perm = _random.permutation(key, n)
    perms = {x.device: perm.to(x.device) for x in leaves}
    for i in range(start, total):
        lo = i * batch_size
        yield _tree.unflatten(treedef, [x.index_select(0, perms[x.device][lo : lo + batch_size]) for x in leaves])

