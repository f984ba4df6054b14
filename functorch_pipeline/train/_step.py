"""A pure training step and an evaluation loop over ``TrainState``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import torch

from functorch_pipeline import optim
from functorch_pipeline import tree as _tree
from functorch_pipeline.privacy import Accountant
from functorch_pipeline.train._state import TrainState
from functorch_pipeline.transforms import value_and_grad

__all__ = ["evaluate", "train_step"]


def train_step(
    state: TrainState,
    batch: Any,
    loss_fn: Callable[..., tuple[Any, ...]],
    optimizer: Any = None,
    *,
    has_aux: bool = False,
) -> tuple[Any, ...]:
    """One step: gradients of ``loss_fn``, an optimizer update, ``step + 1``.

    The step's key is ``state.step_key()`` (NOTE [exact resume] in :class:`TrainState`:
    everything random comes from the state's key folded with the step, so a resumed run
    continues bit for bit), so dropout is a pure function of the state. Nothing is
    mutated; no host sync.

    On a ``fp.train.DPTrainState`` the step is not private (NOTE [train_step on a DP
    state]): its accountant records it as a step without noise, and reports epsilon =
    inf from then on.

    Args:
      state: the current :class:`TrainState`.
      batch: whatever ``loss_fn`` takes (any pytree).
      loss_fn: ``(params, buffers, batch, key) -> (loss, new_buffers)``; ``loss`` a
        scalar tensor, ``new_buffers`` the updated buffers (return ``buffers`` unchanged,
        or ``None``, when the model has none). With ``has_aux=True`` it returns
        ``(loss, new_buffers, aux)``, ``aux`` any pytree of metrics (accuracy, logits).
      optimizer: an ``fp.optim`` ``GradientTransformation``; default ``state.tx`` (from
        ``TrainState.create(..., tx=...)``, which keeps frozen parameters fixed). An
        explicit optimizer is used as given.
      has_aux: whether ``loss_fn`` returns ``aux`` too.

    Returns:
      ``(new_state, loss)``, or ``(new_state, loss, aux)`` with ``has_aux=True``; ``loss``
      and the tensors of ``aux`` are detached. A state with an ``accountant`` gets the
      step recorded as one without noise (NOTE [train_step on a DP state]).

    Notes:
      NOTE [exact resume]: everything random comes from ``state.key`` folded with the step, and the
        key never advances, so a state saved at step N and resumed in a new process continues bit
        for bit.
      NOTE [train_step on a DP state]: on a state with a privacy accountant (``DPTrainState``) the
        step is the batch gradient, unclipped and without noise, so it is recorded with
        ``Accountant.step_without_noise(sample_rate=1.0)`` (no sampling is assumed), as
        ``DPTrainer(noise_multiplier=0)`` records its steps: from then on epsilon is inf and delta
        1, and a ``UserWarning`` says so (once per call site). It used to leave the accountant
        alone, which kept reporting the earlier DP steps' finite epsilon for a model that had
        since seen an exact gradient. ``DPTrainer.step`` takes private steps; after a step on
        public data only (which spends no privacy) put the old accountant back,
        ``new.replace(accountant=state.accountant)``, or train a plain ``TrainState``.

    Example:
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
      >>> def with_metrics(params, buffers, batch, key):
      ...     x, y = batch
      ...     pred = x @ params["w"]
      ...     return ((pred - y) ** 2).mean(), buffers, {"pred": pred}
      >>> state, loss, aux = train_step(state, batch, with_metrics, opt, has_aux=True)
      >>> aux["pred"].round(decimals=3)
      tensor([1., 2.])
    """
    fn = "train_step(state, batch, loss_fn, optimizer)"
    tx = state.tx if optimizer is None else optimizer
    if tx is None:
        raise TypeError(f"{fn}: no optimizer: pass `optimizer` or create the state with "
                        "TrainState.create(..., tx=...)")
    key = state.step_key()

    def value(params: Any) -> tuple[torch.Tensor, Any]:
        out = loss_fn(params, state.buffers, batch, key)
        want = 3 if has_aux else 2
        if not (isinstance(out, tuple) and len(out) == want):
            shape = "(loss, new_buffers, aux)" if has_aux else "(loss, new_buffers)"
            hint = "" if has_aux else "; pass has_aux=True to return (loss, new_buffers, aux)"
            got = type(out).__name__ + (f" of {len(out)}" if isinstance(out, tuple) else "")
            raise TypeError(f"{fn}: loss_fn must return {shape}, got {got}{hint}")
        return out[0], out[1:]

    (loss, rest), grads = value_and_grad(value, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optim.apply_updates(state.params, updates)
    changes = {}
    accountant = getattr(state, "accountant", None)
    if isinstance(accountant, Accountant):
        # NOTE [train_step on a DP state] (in the docstring): not private, so recorded
        warnings.warn(
            f"{fn}: a step on a state with a privacy accountant (DPTrainState) is not "
            "private (an exact, unclipped gradient without noise): it is recorded with "
            "Accountant.step_without_noise, so epsilon is inf from now on; use DPTrainer.step "
            "for a private step", UserWarning, stacklevel=2)
        changes["accountant"] = accountant.step_without_noise(sample_rate=1.0)
    new = state.replace(params=params, buffers=_tree.detach(rest[0]), opt_state=opt_state,
                        step=state.step + 1, **changes)
    if has_aux:
        return new, loss.detach(), _tree.detach(rest[1])
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
        for i, batch in enumerate(batches):
            out = metric_fn(batch)
            if i and set(out) != set(totals):  # a mean over examples that lack the metric
                raise ValueError(
                    f"evaluate(metric_fn, batches): batch {i} returns metrics {sorted(out)}, but "
                    f"the batches before returned {sorted(totals)}: every batch must return the "
                    "same names")
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
