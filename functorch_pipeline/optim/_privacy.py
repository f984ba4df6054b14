"""Differential privacy: per-example clipping, the noisy aggregate, and ``dpsgd``.

Following optax, per-example gradients carry the batch on axis 0 of every leaf (what
``vmap(grad(loss))`` / ``fp.per_sample_grads`` return). Each example's gradient is
clipped to L2 norm ``l2_norm_clip``; the clipped gradients are summed; Gaussian noise
of standard deviation ``l2_norm_clip * noise_multiplier`` is added to the sum; the
result is divided by the batch size. The noise comes from an explicit ``fp.random`` key
folded with the step count, so every step draws fresh noise and runs are reproducible.
"""

from __future__ import annotations

import math
from typing import Any
from typing import NamedTuple

import torch

from functorch_pipeline import random as fpr
from functorch_pipeline import tree as fpt
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import Params
from functorch_pipeline.optim._base import ScalarOrSchedule
from functorch_pipeline.optim._base import Updates
from functorch_pipeline.optim._base import chain
from functorch_pipeline.optim._base import identity
from functorch_pipeline.optim._transforms import check_number
from functorch_pipeline.optim._transforms import scale_by_learning_rate
from functorch_pipeline.optim._transforms import trace

__all__ = [
    "DifferentiallyPrivateAggregateState",
    "differentially_private_aggregate",
    "dpsgd",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
]


def _batch_size(where: str, grads: Any) -> int:
    leaves = fpt.leaves(grads)
    if not leaves:
        raise ValueError(f"{where}: the gradient tree has no leaves")

    def path(i: int) -> str:  # only on error: key paths are not traced under compile
        return fpt.keystr(fpt.flatten_with_path(grads)[0][i])

    n = None
    for i, g in enumerate(leaves):
        if not isinstance(g, torch.Tensor) or g.dim() == 0:
            raise ValueError(
                f"{where}: leaf at path `{path(i)}` has no batch axis; per-example gradients "
                "must have the examples on axis 0 of every leaf"
            )
        if n is None:
            n = g.shape[0]
        elif g.shape[0] != n:
            raise ValueError(
                f"{where}: leaf at path `{path(i)}` has {g.shape[0]} examples on axis 0 but "
                f"the first leaf has {n}"
            )
    return int(n)


def _clip_sum(leaves: list[torch.Tensor], clip: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    b = leaves[0].shape[0]
    sq = torch.stack([g.reshape(b, -1).pow(2).sum(1).to(torch.float64 if g.dtype == torch.float64 else torch.float32)
                      for g in leaves]).sum(0)
    norms = torch.sqrt(sq)
    divisors = torch.clamp(norms / clip, min=1.0)
    summed = [(g / divisors.to(g.dtype).reshape(b, *([1] * (g.dim() - 1)))).sum(0) for g in leaves]
    return summed, (norms > clip).sum()


def per_example_global_norm_clip(grads: Any, l2_norm_clip: float | torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Clip each example's whole gradient to L2 norm ``l2_norm_clip`` and sum over examples.

    Args:
      grads: a tree whose leaves have the examples on axis 0.
      l2_norm_clip: the maximum L2 norm of one example's gradient (over all leaves).

    Returns:
      ``(summed, num_clipped)``: the sum of clipped gradients (leaves without the batch
      axis) and how many examples were clipped (a 0-d tensor).

    >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
    >>> per_example_global_norm_clip(g, 1.0)
    ({'w': tensor([0.9000, 1.2000])}, tensor(1))
    """
    where = "per_example_global_norm_clip(grads, l2_norm_clip)"
    check_number(where, "l2_norm_clip", l2_norm_clip, low=0.0)
    _batch_size(where, grads)
    leaves, td = fpt.flatten(grads)
    summed, n = _clip_sum(leaves, l2_norm_clip)
    return fpt.unflatten(td, summed), n


def per_example_layer_norm_clip(
    grads: Any, global_l2_norm_clip: float, uniform: bool = True
) -> tuple[Any, list[torch.Tensor]]:
    """Clip each leaf ("layer") of each example separately, then sum over examples.

    Per-leaf bounds are ``C / sqrt(L)`` (``uniform``) or ``C * sqrt(size_l / total)``
    for ``L`` leaves, so the whole clipped gradient of one example has norm at most
    ``C = global_l2_norm_clip``.

    Returns:
      ``(summed, num_clipped)`` with one count per leaf (in leaf order).

    Args:
      grads: a tree whose leaves have the examples on axis 0.
      global_l2_norm_clip: the bound for a whole example.
      uniform: equal per-leaf bounds, else proportional to sqrt(leaf size).

    >>> g = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[0.1]])}
    >>> s, n = per_example_layer_norm_clip(g, 2 ** 0.5)
    >>> s["a"], s["b"], [int(x) for x in n]
    (tensor([0.6000, 0.8000]), tensor([0.1000]), [1, 0])
    """
    where = "per_example_layer_norm_clip(grads, global_l2_norm_clip)"
    check_number(where, "global_l2_norm_clip", global_l2_norm_clip, low=0.0)
    _batch_size(where, grads)
    leaves, td = fpt.flatten(grads)
    n_layers = len(leaves)
    if uniform:
        clips = [global_l2_norm_clip / math.sqrt(n_layers)] * n_layers
    else:
        total = sum(g[0].numel() for g in leaves)
        clips = [global_l2_norm_clip * math.sqrt(g[0].numel() / total) for g in leaves]
    summed, counts = [], []
    for g, c in zip(leaves, clips, strict=True):
        s, n = _clip_sum([g], c)
        summed.append(s[0])
        counts.append(n)
    return fpt.unflatten(td, summed), counts


class DifferentiallyPrivateAggregateState(NamedTuple):
    """State of :func:`differentially_private_aggregate`: the base key and the step count."""

    rng_key: torch.Tensor
    count: torch.Tensor


def _as_key(where: str, seed: Any) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if not fpr.is_key(seed) or seed.dim() != 1:
            raise ValueError(f"{where}: `seed` must be an int or one key from fp.random.key, got shape {tuple(seed.shape)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{where}: `seed` must be an int or an fp.random key, got {type(seed).__name__}")
    return fpr.key(seed)


def differentially_private_aggregate(
    l2_norm_clip: float, noise_multiplier: float, seed: int | torch.Tensor
) -> GradientTransformation:
    r"""Clip per-example gradients, sum them, add Gaussian noise, divide by the batch size.

    .. math:: u = \frac{1}{B}\Big(\sum_i \mathrm{clip}_C(g_i) + \mathcal N(0, (C\sigma)^2 I)\Big)

    so each coordinate of the result carries noise of standard deviation
    :math:`C\sigma/B` (``C = l2_norm_clip``, ``σ = noise_multiplier``, ``B`` the batch).

    Args:
      l2_norm_clip: the per-example L2 bound ``C``.
      noise_multiplier: ``σ``, the noise standard deviation relative to ``C``.
      seed: an int or an ``fp.random`` key; step ``t`` uses ``fold_in(key, t)``.

    Returns:
      A :class:`GradientTransformation`. Its ``update`` takes per-example gradients.

    >>> tx = differentially_private_aggregate(1.0, 0.0, seed=0)
    >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
    >>> tx.update(g, tx.init({"w": torch.zeros(2)}))[0]
    {'w': tensor([0.4500, 0.6000])}
    """
    where = "differentially_private_aggregate"
    check_number(f"{where}(l2_norm_clip)", "l2_norm_clip", l2_norm_clip, low=0.0)
    check_number(f"{where}(noise_multiplier)", "noise_multiplier", noise_multiplier, low=0.0)
    base_key = _as_key(f"{where}(seed)", seed)
    if noise_multiplier > 0 and math.isinf(l2_norm_clip):
        raise ValueError(f"{where}: noise_multiplier > 0 needs a finite `l2_norm_clip` (the noise std is their product)")
    # sigma = 0 means no noise, even with C = inf (where C * sigma would be NaN).
    std = l2_norm_clip * noise_multiplier if noise_multiplier > 0 else 0.0

    def init_fn(params: Params) -> DifferentiallyPrivateAggregateState:
        dev = next((x.device for x in fpt.leaves(params) if isinstance(x, torch.Tensor)), torch.device("cpu"))
        return DifferentiallyPrivateAggregateState(base_key.to(dev), torch.zeros((), dtype=torch.int32, device=dev))

    def update_fn(updates: Updates, state: DifferentiallyPrivateAggregateState, params: Params = None, **extra_args: Any):
        b = _batch_size(f"{where}.update", updates)
        leaves, td = fpt.flatten(updates)
        summed, _ = _clip_sum(leaves, l2_norm_clip)
        if std == 0.0:
            out = [s / b for s in summed]
            return fpt.unflatten(td, out), DifferentiallyPrivateAggregateState(state.rng_key, state.count + 1)
        keys = fpr.split(fpr.fold_in(state.rng_key, state.count), len(leaves))
        out = [
            (s + std * fpr.normal(k, tuple(s.shape), s.dtype if s.is_floating_point() else torch.float32)) / b
            for s, k in zip(summed, keys, strict=True)
        ]
        return fpt.unflatten(td, out), DifferentiallyPrivateAggregateState(state.rng_key, state.count + 1)

    return GradientTransformation(init_fn, update_fn)


def dpsgd(
    learning_rate: ScalarOrSchedule,
    l2_norm_clip: float,
    noise_multiplier: float,
    seed: int | torch.Tensor,
    momentum: float | None = None,
    nesterov: bool = False,
) -> GradientTransformation:
    """DP-SGD (Abadi et al., 2016): :func:`differentially_private_aggregate` then SGD.

    ``update`` takes per-example gradients (examples on axis 0) and the parameters'
    tree for ``init``. Privacy accounting (epsilon) is not part of this library.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      l2_norm_clip: per-example L2 bound.
      noise_multiplier: noise std relative to the bound.
      seed: an int or an ``fp.random`` key.
      momentum: optional momentum.
      nesterov: Nesterov momentum.

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.dpsgd(0.1, l2_norm_clip=1.0, noise_multiplier=0.0, seed=0)
    >>> per_example = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
    >>> opt.update(per_example, opt.init({"w": torch.zeros(2)}))[0]
    {'w': tensor([-0.0450, -0.0600])}
    """
    check_number("dpsgd(learning_rate)", "learning_rate", learning_rate, low=0.0)
    return chain(
        differentially_private_aggregate(l2_norm_clip, noise_multiplier, seed),
        trace(momentum, nesterov) if momentum is not None else identity(),
        scale_by_learning_rate(learning_rate),
    )
