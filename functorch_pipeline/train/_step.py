"""A pure training step and an evaluation loop over ``TrainState``."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import torch

from functorch_pipeline import optim
from functorch_pipeline import tree as _tree
from functorch_pipeline.train._state import TrainState
from functorch_pipeline.transforms import value_and_grad

__all__ = ["evaluate", "train_step"]


def train_step(
    state: TrainState,
    batch: Any,
    loss_fn: Callable[[Any, Any, Any, torch.Tensor], tuple[torch.Tensor, Any]],
    optimizer: Any,
) -> tuple[TrainState, torch.Tensor]:
    """One step: gradients of ``loss_fn``, an optimizer update, ``step + 1``.

    The step's key is ``state.step_key()`` (NOTE [exact resume]), so dropout is a pure
    function of the state. Nothing is mutated; no host sync.

    Args:
      state: the current :class:`TrainState`.
      batch: whatever ``loss_fn`` takes (any pytree).
      loss_fn: ``(params, buffers, batch, key) -> (loss, new_buffers)``; ``loss`` a
        scalar tensor, ``new_buffers`` the updated buffers (return ``buffers`` unchanged,
        or ``None``, when the model has none).
      optimizer: an ``fp.optim`` ``GradientTransformation``.

    Returns:
      ``(new_state, loss)``.

    >>> from functorch_pipeline import optim, random
    >>> def loss_fn(params, buffers, batch, key):
    ...     x, y = batch
    ...     return ((x @ params["w"] - y) ** 2).mean(), buffers
    >>> opt = optim.sgd(0.1)
    >>> params = {"w": torch.zeros(2)}
    >>> state = TrainState.create(params, opt.init(params), random.key(0))
    >>> batch = (torch.eye(2), torch.tensor([1.0, 2.0]))
    >>> for _ in range(50):
    ...     state, loss = train_step(state, batch, loss_fn, opt)
    >>> state.params["w"].round(decimals=3), int(state.step)
    (tensor([1., 2.]), 50)
    """
    key = state.step_key()
    (loss, buffers), grads = value_and_grad(
        lambda params: loss_fn(params, state.buffers, batch, key), has_aux=True
    )(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optim.apply_updates(state.params, updates)
    new = state.replace(params=params, buffers=_tree.detach(buffers), opt_state=opt_state, step=state.step + 1)
    return new, loss.detach()


def evaluate(
    metric_fn: Callable[[Any], dict[str, torch.Tensor]],
    batches: Iterable[Any],
) -> dict[str, float]:
    """Example-weighted means of per-example metrics over batches, without autograd.

    Args:
      metric_fn: ``batch -> {name: per-example tensor of shape (B,)}``, e.g. the loss of
        each example and ``(argmax == label)`` for accuracy.
      batches: any iterable of batches.

    Returns:
      ``{name: mean over all examples}`` as Python floats (one host sync per metric at
      the end).

    >>> batches = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    >>> evaluate(lambda b: {"value": b, "big": (b > 1.5).float()}, batches)
    {'value': 2.0, 'big': 0.6666666666666666}
    """
    totals: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad():
        for batch in batches:
            out = metric_fn(batch)
            n = None
            for name, v in out.items():
                if v.dim() != 1:
                    raise ValueError(f"evaluate(metric_fn, batches): metric {name!r} must be per-example, shape (B,), got {tuple(v.shape)}")
                if n is not None and v.shape[0] != n:
                    raise ValueError(f"evaluate(metric_fn, batches): metrics disagree on the batch size ({n} and {v.shape[0]})")
                n = v.shape[0]
                s = v.detach().double().sum()
                totals[name] = totals[name] + s if name in totals else s
            count += n or 0
    if count == 0:
        raise ValueError("evaluate(metric_fn, batches): no examples")
    return {k: float(v) / count for k, v in totals.items()}
