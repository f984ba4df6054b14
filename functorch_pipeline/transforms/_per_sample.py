"""Per-example gradients: ``vmap`` of ``grad`` with the batch as a batch of one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch

from functorch_pipeline import tree as _tree
from functorch_pipeline.transforms._autodiff import ArgNums
from functorch_pipeline.transforms._autodiff import _normalize_argnums
from functorch_pipeline.transforms._autodiff import _value_and_grad_impl
from functorch_pipeline.transforms._grad_sample import Unsupported
from functorch_pipeline.transforms._grad_sample import hooks_value_and_grad
from functorch_pipeline.transforms._vmap import vmap

__all__ = ["per_sample_grads", "per_sample_value_and_grad"]

_METHODS = ("vmap", "hooks", "auto")


def _squeeze_one(loss_fn: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
    """``loss_fn`` with a per-example loss vector of shape ``(1,)`` turned into a scalar, so
    a ``loss_fn`` returning per-example losses (what ``method="hooks"`` needs) also serves
    the ``vmap`` method, which calls it on batches of one."""

    @functools.wraps(loss_fn)
    def wrapped(*args: Any) -> Any:
        out = loss_fn(*args)
        value = out[0] if has_aux and isinstance(out, tuple) and len(out) == 2 else out
        if isinstance(value, torch.Tensor) and value.shape == (1,):
            value = value.reshape(())
            return (value, out[1]) if has_aux else value
        return out

    return wrapped


def _per_sample(
    loss_fn: Callable[..., Any],
    argnums: ArgNums,
    has_aux: bool,
    batch_argnums: Sequence[int] | None,
    chunk_size: int | None,
    keep_batch_dim: bool,
    randomness: str,
    method: str,
    fn: str,
) -> Callable[..., tuple[Any, Any]]:
    if method not in _METHODS:
        raise ValueError(f"{fn}: `method` must be one of {_METHODS}, got {method!r}")
    vg = _value_and_grad_impl(_squeeze_one(loss_fn, has_aux) if keep_batch_dim else loss_fn,
                              argnums, has_aux, fn)

    # NOTE [a batch of one]
    # Each example is handed to `loss_fn` with a leading axis of size 1, so the same
    # loss function that averages over a batch gives exactly that example's loss (the mean
    # over one). Per-example keys therefore arrive as a (1, 2) key batch: fp.nn's `apply`
    # reads a key batch of size N as one key per example, which keeps this consistent with
    # a Python loop over `x[i:i+1]`. `keep_batch_dim=False` hands raw examples instead.
    @functools.wraps(loss_fn)
    def wrapped(*args: Any) -> tuple[Any, Any]:
        nums, is_tuple = _normalize_argnums(argnums, len(args), fn)
        if batch_argnums is None:
            batched = tuple(i for i in range(len(args)) if i not in nums)
        else:
            batched = tuple(i + len(args) if i < 0 else i for i in batch_argnums)
            both = sorted(set(batched) & set(nums))
            if both:
                raise ValueError(f"{fn}: arguments {both} are in both `argnums` and `batch_argnums`")
        if not batched:
            raise ValueError(f"{fn}: no batch argument: every positional argument is in `argnums`")
        if method != "vmap":
            fast = _fast(loss_fn, args, nums, is_tuple, batched, has_aux, chunk_size, keep_batch_dim,
                         method, fn)
            if fast is not None:
                return fast
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


def _fast(loss_fn: Callable[..., Any], args: Sequence[Any], nums: Sequence[int], is_tuple: bool,
          batched: Sequence[int], has_aux: bool, chunk_size: int | None, keep_batch_dim: bool,
          method: str, fn: str) -> tuple[Any, Any] | None:
    """``method="hooks"``/``"auto"``: the engine's result, or None to fall back to vmap."""
    try:
        if not keep_batch_dim:
            raise Unsupported("keep_batch_dim=False means loss_fn is written for one example, "
                              "but the fast method calls it once on the whole batch")
        return hooks_value_and_grad(loss_fn, args, nums, is_tuple, batched, has_aux, chunk_size, fn)
    except Unsupported as e:
        if method == "hooks":
            raise ValueError(f"{fn}: method='hooks': {e}. Use method='vmap', or method='auto' "
                             "to fall back to it automatically.") from None
        warnings.warn(f"{fn}: method='auto' falls back to 'vmap': {e}", stacklevel=4)
        return None


def per_sample_value_and_grad(
    loss_fn: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    batch_argnums: Sequence[int] | None = None,
    chunk_size: int | None = None,
    keep_batch_dim: bool = True,
    randomness: str = "error",
    method: str = "vmap",
) -> Callable[..., tuple[Any, Any]]:
    """Like :func:`per_sample_grads` but returns ``(values, grads)``: each example's loss
    (shape ``(B,)``) and gradient (leading axis ``B``); ``((values, aux), grads)`` with
    ``has_aux=True``. Arguments as :func:`per_sample_grads`, ``method`` included.

    >>> loss = lambda w, x: ((x @ w) ** 2).mean()
    >>> v, g = per_sample_value_and_grad(loss)(torch.ones(2), torch.tensor([[1., 0.], [1., 1.]]))
    >>> v, g
    (tensor([1., 4.]), tensor([[2., 0.],
            [4., 4.]]))
    """
    return _per_sample(loss_fn, argnums, has_aux, batch_argnums, chunk_size, keep_batch_dim, randomness,
                       method, "per_sample_value_and_grad(loss_fn)")


def per_sample_grads(
    loss_fn: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    batch_argnums: Sequence[int] | None = None,
    chunk_size: int | None = None,
    keep_batch_dim: bool = True,
    randomness: str = "error",
    method: str = "vmap",
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
      method: how to compute them (the same numbers, up to rounding):

        * ``"vmap"`` (default): ``vmap(grad)`` over batches of one; any ``loss_fn`` that
          ``torch.func`` can transform. A ``loss_fn`` returning per-example losses (shape
          ``(1,)`` for a batch of one) is accepted too.
        * ``"hooks"``: one forward and one backward of the whole batch, close to the cost
          of one batch gradient. Each parameter's per-example gradient is rebuilt from
          the inputs and output gradients of the calls that use it: ``F.linear``,
          ``F.conv1d``/``F.conv2d``, ``F.embedding``, ``F.layer_norm``, ``F.group_norm``
          and ``F.batch_norm`` in eval mode (``fp.nn.LSTM``/``GRU`` use only
          ``F.linear``). The contract: ``loss_fn`` returns the *per-example* losses,
          shape ``(B,)`` (``reduction="none"``; a scalar is an error, never rescaled);
          example ``i``'s loss depends on example ``i`` alone (no BatchNorm in training
          mode, which is an error, and no statistics over the batch); and every call that
          uses a parameter sees the batch on axis 0 of its input. The last is checked by
          size: axis 0 must have size ``B`` and, where another axis could hold the
          examples (a ``(T, B, E)`` input with ``T == B``), the call is an error as
          ambiguous; an input with *no* batch axis whose first axis happens to have size
          ``B`` (position ids ``arange(T)`` with ``T == B``) cannot be told apart: use
          ``"vmap"`` for such models. Any other use of a parameter
          (``x @ w``, ``nn.LSTM``'s fused kernel) is an error naming the parameter and the
          call. ``randomness`` does not apply; ``aux`` is what ``loss_fn`` returns for the
          whole batch; the gradients carry no autograd graph. Large fresh outputs make
          glibc's malloc page-fault on every call: see ``benchmarks/_common.py``.
        * ``"auto"``: ``"hooks"``, falling back to ``"vmap"`` with a warning when
          ``loss_fn`` returns a scalar or uses a parameter in a call without a rule.

    Returns:
      A function with ``loss_fn``'s signature returning per-example gradients shaped like
      the differentiated argument(s) with a leading batch axis, plus per-example ``aux``
      with ``has_aux=True``.

    >>> loss = lambda w, x, y: ((x @ w - y) ** 2).mean()
    >>> x, y = torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([1., 0.])
    >>> per_sample_grads(loss)(torch.zeros(2), x, y)
    tensor([[-2., -4.],
            [ 0.,  0.]])

    The fast method needs per-example losses and a parameter used through ``F.linear``:

    >>> losses = lambda w, x, y: (torch.nn.functional.linear(x, w)[:, 0] - y) ** 2
    >>> per_sample_grads(losses, method="hooks")(torch.zeros(1, 2), x, y)
    tensor([[[-2., -4.]],
    <BLANKLINE>
            [[ 0.,  0.]]])
    """
    vg = _per_sample(loss_fn, argnums, has_aux, batch_argnums, chunk_size, keep_batch_dim, randomness,
                     method, "per_sample_grads(loss_fn)")

    @functools.wraps(loss_fn)
    def wrapped(*args: Any) -> Any:
        value, grads = vg(*args)
        return (grads, value[1]) if has_aux else grads

    return wrapped
