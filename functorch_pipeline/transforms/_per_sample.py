"""Per-example gradients: ``vmap`` of ``grad`` with the batch as a batch of one."""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch

from functorch_pipeline import tree as _tree
from functorch_pipeline.transforms._autodiff import ArgNums
from functorch_pipeline.transforms._autodiff import _normalize_argnums
from functorch_pipeline.transforms._autodiff import _value_and_grad_impl
from functorch_pipeline.transforms._vmap import vmap

__all__ = ["per_sample_grads", "per_sample_value_and_grad"]


def _per_sample(
    loss_fn: Callable[..., Any],
    argnums: ArgNums,
    has_aux: bool,
    batch_argnums: Sequence[int] | None,
    chunk_size: int | None,
    keep_batch_dim: bool,
    randomness: str,
    fn: str,
) -> Callable[..., tuple[Any, Any]]:
    vg = _value_and_grad_impl(loss_fn, argnums, has_aux, fn)

    # NOTE [a batch of one]
    # Each example is handed to `loss_fn` with a leading axis of size 1, so the same
    # loss function that averages over a batch gives exactly that example's loss (the mean
    # over one). Per-example keys therefore arrive as a (1, 2) key batch: fp.nn's `apply`
    # reads a key batch of size N as one key per example, which keeps this consistent with
    # a Python loop over `x[i:i+1]`. `keep_batch_dim=False` hands raw examples instead.
    @functools.wraps(loss_fn)
    def wrapped(*args: Any) -> tuple[Any, Any]:
        nums, _ = _normalize_argnums(argnums, len(args), fn)
        if batch_argnums is None:
            batched = tuple(i for i in range(len(args)) if i not in nums)
        else:
            batched = tuple(i + len(args) if i < 0 else i for i in batch_argnums)
            both = sorted(set(batched) & set(nums))
            if both:
                raise ValueError(f"{fn}: arguments {both} are in both `argnums` and `batch_argnums`")
        if not batched:
            raise ValueError(f"{fn}: no batch argument: every positional argument is in `argnums`")
        in_axes = tuple(0 if i in batched else None for i in range(len(args)))

        def one(*a: Any) -> tuple[Any, Any]:
            if keep_batch_dim:
                a = tuple(
                    _tree.map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, ai)
                    if i in batched
                    else ai
                    for i, ai in enumerate(a)
                )
            return vg(*a)

        return vmap(one, in_axes=in_axes, chunk_size=chunk_size, randomness=randomness)(*args)

    return wrapped


def per_sample_value_and_grad(
    loss_fn: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    batch_argnums: Sequence[int] | None = None,
    chunk_size: int | None = None,
    keep_batch_dim: bool = True,
    randomness: str = "error",
) -> Callable[..., tuple[Any, Any]]:
    """Like :func:`per_sample_grads` but returns ``(values, grads)``: each example's loss
    (shape ``(B,)``) and gradient (leading axis ``B``); ``((values, aux), grads)`` with
    ``has_aux=True``.

    >>> loss = lambda w, x: ((x @ w) ** 2).mean()
    >>> v, g = per_sample_value_and_grad(loss)(torch.ones(2), torch.tensor([[1., 0.], [1., 1.]]))
    >>> v, g
    (tensor([1., 4.]), tensor([[2., 0.],
            [4., 4.]]))
    """
    return _per_sample(loss_fn, argnums, has_aux, batch_argnums, chunk_size, keep_batch_dim, randomness,
                       "per_sample_value_and_grad(loss_fn)")


def per_sample_grads(
    loss_fn: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    batch_argnums: Sequence[int] | None = None,
    chunk_size: int | None = None,
    keep_batch_dim: bool = True,
    randomness: str = "error",
) -> Callable[..., Any]:
    """The gradient of each example's loss: ``vmap(grad(loss_fn))`` over the batch.

    Args:
      loss_fn: ``loss_fn(params, batch, ...) -> scalar``, written for a *batch* (it may
        average over it). Each example is passed as a batch of one (see
        ``keep_batch_dim``), so the same function serves training and per-sample use.
      argnums: the argument(s) to differentiate (the parameters).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is returned per example.
      batch_argnums: the arguments whose tensor leaves carry the batch on axis 0; by
        default every positional argument not in ``argnums``.
      chunk_size: examples per vectorised chunk, to bound memory (same result).
      keep_batch_dim: pass each example with a leading axis of size 1 (default), or
        without it (``False``) for a ``loss_fn`` written for one example.
      randomness: ``torch.func``'s mode for PyTorch's global RNG inside ``loss_fn``;
        prefer explicit per-example ``fp.random`` keys as a batch argument.

    Returns:
      A function with ``loss_fn``'s signature returning per-example gradients shaped like
      the differentiated argument(s) with a leading batch axis, plus per-example ``aux``
      with ``has_aux=True``.

    >>> loss = lambda w, x, y: ((x @ w - y) ** 2).mean()
    >>> x, y = torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([1., 0.])
    >>> per_sample_grads(loss)(torch.zeros(2), x, y)
    tensor([[-2., -4.],
            [ 0.,  0.]])
    """
    vg = _per_sample(loss_fn, argnums, has_aux, batch_argnums, chunk_size, keep_batch_dim, randomness,
                     "per_sample_grads(loss_fn)")

    @functools.wraps(loss_fn)
    def wrapped(*args: Any) -> Any:
        value, grads = vg(*args)
        return (grads, value[1]) if has_aux else grads

    return wrapped
