"""Fixed-shape batches: pad a batch to a size with a boolean mask, and use the mask.

A padded batch is ``(batch, mask)``: every leaf of ``batch`` has ``size`` rows on axis 0,
``mask`` is a ``(size,)`` bool tensor, ``True`` on real rows. One shape for every batch
means ``vmap``/``fp.jit`` trace once.

# NOTE [padding rows]
Padding rows are copies of the batch's first real row, not zeros, so a model computes
there exactly what it computes on a real row (valid labels and embedding indices, no
``log(0)``). An empty batch has no row to copy; :func:`pad_batch` then fills floating
and complex leaves with ``0.5`` and integer and bool leaves with ``0`` / ``False``.
``0.5`` is inside the domain of the common functions with singular points, with a finite
derivative there: ``log``, ``sqrt``, ``1/x``, ``x/|x|`` (singular at 0) and ``logit``,
``log(1 - x)``, ``atanh``, ``asin``, ``acos`` (singular at 1 or -1); ``0`` is a valid class
label and embedding index. (``poisson_batches`` pads an empty batch with example 0, a
real row.) No constant suits every function: what the model computes from the fill
(``log(2 * x - 1)``, a label ``0`` for an index into an empty table) can still be
singular.

# NOTE [masked_sum and gradients]
:func:`masked_sum` drops padding rows with ``torch.where``: their values are never added
(``0 * nan`` would be ``nan``) and the gradient it sends back to them is exactly ``0``,
whatever they hold. It cannot reach into a function ``f`` applied before it: where ``f``
has an infinite derivative at a padding row, ``f``'s own backward computes
``0 * inf = nan``, and that NaN flows into the parameters ``f`` shares with the real
rows. :func:`pad_batch`'s padding avoids this for the functions listed above (when the
real rows avoid it). For anything else, make the padding safe before ``f``, the "double
where" trick: ``masked_sum(f(torch.where(mask_b, x, safe)), mask)`` with ``mask_b`` the
mask reshaped to broadcast against ``x`` and ``safe`` a value where ``f`` is smooth.

# NOTE [padding and layers that couple examples]
Padding rows are real inputs to the model. A layer that mixes examples along axis 0
(``BatchNorm`` in train mode, attention or normalisation across the batch) sees them:
they change its batch statistics, hence the outputs and gradients of the real rows, and
its running averages. A padded batch then does not give the numbers of the unpadded one.
Such layers are not per-example, so DP-SGD excludes them anyway (use ``GroupNorm`` or
``LayerNorm``); elsewhere compute the statistics with the mask, or run those layers on
``unpad(batch, mask)``.
"""

from __future__ import annotations

from typing import Any

import torch

from functorch_pipeline import tree as _tree
from functorch_pipeline.data._batches import _as_int

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
      size: the padded number of rows, an int >= 0.

    Returns:
      ``(padded, mask)``: ``padded`` shaped like ``batch`` with ``size`` rows per leaf
      (the first ``B`` are ``batch``'s, the rest copies of its first row; when ``B == 0``,
      ``0.5`` in floating and complex leaves and ``0`` in integer and bool leaves, see
      NOTE [padding rows]); ``mask`` a ``(size,)`` bool tensor on the first leaf's device,
      ``True`` on the first ``B`` rows.

    Raises:
      ValueError: ``batch`` has more than ``size`` rows, or leaves disagree on axis 0.

    Notes:
      NOTE [padding rows]: padding rows copy the first real row, so the model computes
        there what it computes on a real row; an empty batch is filled with ``0.5``
        (floating) / ``0`` (integer, bool), where ``log``, ``sqrt``, ``1/x``, ``x/|x|``,
        ``logit``, ``atanh``, ``asin``, ``acos`` have finite derivatives and ``0`` is a
        valid label or index. No constant suits every function.
      NOTE [padding and layers that couple examples]: ``BatchNorm`` in train mode (any
        layer mixing examples along axis 0) sees the padding rows, which change its batch
        statistics and so the real rows' outputs: use a per-example normalisation, or run
        such layers on ``unpad(batch, mask)``.

    Example:
      >>> padded, mask = pad_batch((torch.tensor([5.0, 6.0]), torch.tensor([1, 2])), 4)
      >>> padded[0].tolist(), padded[1].tolist(), mask.tolist()
      ([5.0, 6.0, 5.0, 5.0], [1, 2, 1, 1], [True, True, False, False])
      >>> padded, mask = pad_batch((torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), 2)
      >>> padded[0].tolist(), padded[1].tolist(), mask.tolist()
      ([[0.5, 0.5], [0.5, 0.5]], [0, 0], [False, False])
    """
    where = "pad_batch(batch, size)"
    n = _as_int(size)
    if n is None or n < 0:
        raise ValueError(f"{where}: `size` must be an int >= 0, got {size!r}")
    size = n
    paths, leaves, treedef = _tree.flatten_with_path(batch)
    if not leaves:
        raise ValueError(f"{where}: `batch` has no tensor leaves")
    rows = _rows(where, paths, leaves)
    if rows > size:
        raise ValueError(f"{where}: `batch` has {rows} rows, more than `size`={size}")
    dev = leaves[0].device
    mask = torch.arange(size, device=dev) < rows
    if rows == 0:  # nothing to copy: NOTE [padding rows]
        out = [x.new_full((size, *x.shape[1:]), _EMPTY_FILL if _floating(x) else 0) for x in leaves]
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
    per-example losses): padding rows contribute exactly nothing to the value, and the
    gradient ``masked_sum`` sends back to them is exactly ``0``, even if they hold
    ``inf``/``nan``. A function applied *before* ``masked_sum`` keeps its own backward:
    where it has an infinite derivative at a padding row it makes ``0 * inf = nan`` there
    (NOTE [masked_sum and gradients]). No host sync; works under ``vmap`` and
    ``torch.compile``.

    Args:
      tree: a pytree of tensors with the batch on axis 0.
      mask: a ``(B,)`` bool tensor.

    Returns:
      A pytree like ``tree`` with axis 0 summed away.

    Raises:
      ValueError: a leaf's axis 0 does not match the mask (the message names its path).

    Notes:
      NOTE [masked_sum and gradients]: padding rows get exactly zero gradient from
        ``masked_sum`` itself, but a function ``f`` applied before it computes ``0 * inf =
        nan`` in its own backward where its derivative is infinite at a padding row; make
        such rows safe before ``f`` with ``torch.where(mask_b, x, safe)``.

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


# the fill of an empty batch's floating leaves: NOTE [padding rows]
_EMPTY_FILL = 0.5


def _floating(x: torch.Tensor) -> bool:
    return x.is_floating_point() or x.is_complex()


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
