"""Fixed-shape batches: pad a batch to a size with a boolean mask, and use the mask.

A padded batch is ``(batch, mask)``: every leaf of ``batch`` has ``size`` rows on axis 0,
``mask`` is a ``(size,)`` bool tensor, ``True`` on real rows. One shape for every batch
means ``vmap``/``fp.jit`` trace once. Padding rows are copies of a real row (the first),
not zeros, so a model sees valid inputs there (valid labels and embedding indices, no
``log(0)``); :func:`masked_sum` then drops them with ``torch.where``, so even a NaN
computed on a padding row cannot leak into the sum (``0 * nan`` would).
"""

from __future__ import annotations

from typing import Any

import torch

from functorch_pipeline import tree as _tree

__all__ = ["check_mask", "masked_sum", "pad_batch", "unpad"]


def check_mask(tree: Any, mask: torch.Tensor, where: str = "check_mask") -> None:
    """Check that ``mask`` is a 1-D bool tensor with one entry per row of every leaf.

    Only shapes and dtypes are read (no host sync), so this is safe under ``vmap`` and
    ``torch.compile``.

    Args:
      tree: a pytree of tensors whose axis 0 is the batch.
      mask: the batch's mask.
      where: the API name to start error messages with.

    Raises:
      TypeError: ``mask`` is not a bool tensor, or a leaf is not a tensor.
      ValueError: ``mask`` is not 1-D, or a leaf's axis 0 differs from its length (the
        message names the leaf's key path).

    Example:
      >>> check_mask({"x": torch.zeros(3, 2)}, torch.tensor([True, True, False]))
      >>> check_mask({"x": torch.zeros(4, 2)}, torch.ones(3, dtype=torch.bool))
      Traceback (most recent call last):
      ...
      ValueError: check_mask: leaf at path `x` has 4 rows on axis 0 but `mask` has 3 entries
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{where}: `mask` must be a bool tensor, got {got}")
    if mask.dim() != 1:
        raise ValueError(
            f"{where}: `mask` must be 1-D (one entry per row), got shape {tuple(mask.shape)}"
        )
    for p, x in zip(*_tree.flatten_with_path(tree)[:2], strict=True):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{where}: leaf at path `{_tree.keystr(p)}` must be a tensor, "
                f"got {type(x).__name__}"
            )
        rows = x.shape[0] if x.dim() > 0 else None
        if rows != mask.shape[0]:
            got = f"{rows} rows on axis 0" if rows is not None else "no axis 0 (a 0-d tensor)"
            raise ValueError(
                f"{where}: leaf at path `{_tree.keystr(p)}` has {got} but `mask` has "
                f"{mask.shape[0]} entries"
            )


def pad_batch(batch: Any, size: int) -> tuple[Any, torch.Tensor]:
    """Pad every leaf of ``batch`` to ``size`` rows, and say which rows are real.

    Args:
      batch: a pytree of tensors sharing axis 0 (``B`` rows, ``B <= size``).
      size: the padded number of rows.

    Returns:
      ``(padded, mask)``: ``padded`` shaped like ``batch`` with ``size`` rows per leaf
      (the first ``B`` are ``batch``'s, the rest copies of its first row, or zeros when
      ``B == 0``); ``mask`` a ``(size,)`` bool tensor on the first leaf's device, ``True``
      on the first ``B`` rows.

    Raises:
      ValueError: ``batch`` has more than ``size`` rows, or leaves disagree on axis 0.

    Example:
      >>> padded, mask = pad_batch((torch.tensor([5.0, 6.0]), torch.tensor([1, 2])), 4)
      >>> padded[0].tolist(), padded[1].tolist(), mask.tolist()
      ([5.0, 6.0, 5.0, 5.0], [1, 2, 1, 1], [True, True, False, False])
    """
    where = "pad_batch(batch, size)"
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{where}: `size` must be an int >= 0, got {size!r}")
    paths, leaves, treedef = _tree.flatten_with_path(batch)
    if not leaves:
        raise ValueError(f"{where}: `batch` has no tensor leaves")
    rows = _rows(where, paths, leaves)
    if rows > size:
        raise ValueError(f"{where}: `batch` has {rows} rows, more than `size`={size}")
    dev = leaves[0].device
    mask = torch.arange(size, device=dev) < rows
    if rows == 0:
        out = [x.new_zeros((size, *x.shape[1:])) for x in leaves]
    else:
        out = [torch.cat([x, x[:1].expand(size - rows, *x.shape[1:])]) for x in leaves]
    return _tree.unflatten(treedef, out), mask


def unpad(batch: Any, mask: torch.Tensor) -> Any:
    """The real rows of a padded batch (variable size: reads the mask on the host).

    Args:
      batch: a padded pytree of tensors.
      mask: its ``(size,)`` bool mask.

    Returns:
      ``batch`` with only the rows where ``mask`` is ``True``, in order.

    Example:
      >>> unpad({"y": torch.tensor([1, 2, 3])}, torch.tensor([True, False, True]))
      {'y': tensor([1, 3])}
    """
    check_mask(batch, mask, "unpad(batch, mask)")
    idx = torch.nonzero(mask).squeeze(1)
    return _tree.map(lambda x: x.index_select(0, idx.to(x.device)), batch)


def masked_sum(tree: Any, mask: torch.Tensor) -> Any:
    """Sum every leaf over axis 0, counting only rows where ``mask`` is ``True``.

    Made for per-example quantities of a padded batch (clipped per-example gradients,
    per-example losses): padding rows contribute exactly nothing, even if they hold
    ``inf``/``nan``. No host sync; works under ``vmap`` and ``torch.compile``.

    Args:
      tree: a pytree of tensors with the batch on axis 0.
      mask: a ``(B,)`` bool tensor.

    Returns:
      A pytree like ``tree`` with axis 0 summed away.

    Raises:
      ValueError: a leaf's axis 0 does not match the mask (the message names its path).

    Example:
      >>> masked_sum({"g": torch.tensor([[1.0, 2.0], [3.0, float("nan")]])},
      ...            torch.tensor([True, False]))
      {'g': tensor([1., 2.])}
    """
    check_mask(tree, mask, "masked_sum(tree, mask)")

    def one(x: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.device).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(0)

    return _tree.map(one, tree)


def _rows(where: str, paths: list[Any], leaves: list[Any]) -> int:
    for p, x in zip(paths, leaves, strict=True):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(
                f"{where}: leaf at path `{_tree.keystr(p)}` must be a tensor with a leading "
                "batch axis"
            )
        if x.shape[0] != leaves[0].shape[0]:
            raise ValueError(
                f"{where}: leaf at path `{_tree.keystr(p)}` has {x.shape[0]} rows but leaf "
                f"`{_tree.keystr(paths[0])}` has {leaves[0].shape[0]}"
            )
    return leaves[0].shape[0]
