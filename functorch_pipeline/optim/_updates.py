"""Update utilities with optax's names: the global norm, Polyak (incremental) and periodic
target updates, and two small transforms that use whole-tree quantities
(``keep_params_nonnegative``, ``normalize_by_update_norm``)."""

from __future__ import annotations

from typing import Any

import torch

from functorch_pipeline import tree as fpt
from functorch_pipeline.optim import _checks
from functorch_pipeline.optim import _mt
from functorch_pipeline.optim._base import EmptyState
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import Params
from functorch_pipeline.optim._base import Updates
from functorch_pipeline.optim._base import flatten_like
from functorch_pipeline.optim._base import require_params
from functorch_pipeline.optim._transforms import check_number

__all__ = [
    "global_norm",
    "incremental_update",
    "keep_params_nonnegative",
    "normalize_by_update_norm",
    "periodic_update",
]


def global_norm(updates: Updates) -> torch.Tensor:
    r"""The L2 norm of all leaves together, :math:`\sqrt{\sum_\ell \|u_\ell\|^2}` (0-d;
    float64 if any leaf is float64 or complex128, else float32). A complex leaf counts
    :math:`|u|^2 = \mathrm{Re}(u)^2 + \mathrm{Im}(u)^2`, as optax's ``global_norm``.

    Args:
      updates: a tree of tensors on one device.

    Returns:
      A 0-d tensor.

    Example:
      >>> global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])})
      tensor(5.)
    """
    ul = fpt.leaves(updates)
    _checks.check_one_device("global_norm", ul, updates)
    _checks.check_float("global_norm", ul, updates)
    if not ul:
        return torch.zeros(())
    dt = _mt.scalar_dtype(ul)
    return torch.sqrt(sum(_sum_sq(u, dt) for u in ul))


def _sum_sq(u: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    r""":math:`\sum |u|^2` in the real dtype ``dt`` (a complex leaf's real and imaginary
    parts both count; casting it to ``dt`` would drop the imaginary part)."""
    if u.is_complex():
        return torch.sum(u.real.to(dt) ** 2) + torch.sum(u.imag.to(dt) ** 2)
    return torch.sum(u.to(dt) ** 2)


def _pair(where: str, new: Any, old: Any) -> tuple[list, list, Any]:
    nl, td = fpt.flatten(new)
    ol = flatten_like(where, new, old, "old_tensors", td, ref=nl)
    return nl, ol, td


def incremental_update(new_tensors: Any, old_tensors: Any,
                       step_size: float | torch.Tensor) -> Any:
    r"""Polyak averaging (target networks): :math:`\tau\,\text{new} + (1-\tau)\,\text{old}`.

    Args:
      new_tensors: the online values.
      old_tensors: the averaged values (same structure, shapes and dtypes).
      step_size: :math:`\tau` in [0, 1].

    Returns:
      The new averaged tree.

    Example:
      >>> incremental_update({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.0])}, 0.25)
      {'w': tensor([0.2500])}
    """
    check_number("incremental_update(step_size)", "step_size", step_size, low=0.0, high=1.0)
    nl, ol, td = _pair("incremental_update(new_tensors, old_tensors)", new_tensors, old_tensors)
    return fpt.unflatten(td, [torch.lerp(o, n, step_size) for n, o in zip(nl, ol, strict=True)])


def periodic_update(new_tensors: Any, old_tensors: Any, steps: int | torch.Tensor,
                    update_period: int) -> Any:
    """``new_tensors`` when ``steps % update_period == 0``, else ``old_tensors`` (a
    ``torch.where``, so ``steps`` may be a tensor: no host sync).

    Args:
      new_tensors: the online values.
      old_tensors: the periodically copied values.
      steps: the current step.
      update_period: copy every this many steps.

    Returns:
      One of the two trees (leaf by leaf, as tensors).

    Example:
      >>> periodic_update({"w": torch.ones(1)}, {"w": torch.zeros(1)}, 4, 2)
      {'w': tensor([1.])}
    """
    if isinstance(update_period, bool) or not isinstance(update_period, int) or update_period < 1:
        raise ValueError(f"periodic_update(update_period): must be an int >= 1, got "
                         f"{update_period!r}")
    nl, ol, td = _pair("periodic_update(new_tensors, old_tensors)", new_tensors, old_tensors)
    take = torch.remainder(torch.as_tensor(steps, device=nl[0].device if nl else None),
                           update_period) == 0
    return fpt.unflatten(td, [torch.where(take, n, o) for n, o in zip(nl, ol, strict=True)])


def keep_params_nonnegative() -> GradientTransformation:
    r"""Clip the updates so the parameters stay non-negative:
    :math:`u \leftarrow -p` where :math:`p + u < 0`. (Parameters must start
    non-negative, as in optax.)

    Returns:
      A :class:`GradientTransformation` (stateless; needs ``params``).

    Example:
      >>> tx = keep_params_nonnegative()
      >>> p = {"w": torch.tensor([1.0, 2.0])}
      >>> tx.update({"w": torch.tensor([-3.0, -1.0])}, tx.init(p), p)[0]
      {'w': tensor([-1., -1.])}
    """

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, Any]:
        where = "keep_params_nonnegative.update"
        require_params(where, params)
        ul, td = fpt.flatten(updates)
        pl = flatten_like(where, updates, params, "params", td, ref=ul)
        out = [torch.where(p + u < 0, -p, u) for u, p in zip(ul, pl, strict=True)]
        return fpt.unflatten(td, out), state

    return GradientTransformation(init_fn, update_fn)


def normalize_by_update_norm(
    scale_factor: float = 1.0, eps: float = 1e-6
) -> GradientTransformation:
    r"""Divide the updates by their global norm: :math:`u \cdot s / (\|u\| + \epsilon)`.

    Args:
      scale_factor: :math:`s`.
      eps: :math:`\epsilon`.

    Returns:
      A :class:`GradientTransformation` (stateless).

    Example:
      >>> tx = normalize_by_update_norm(eps=0.0)
      >>> tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(None))[0]
      {'w': tensor([0.6000, 0.8000])}
    """
    check_number("normalize_by_update_norm(scale_factor)", "scale_factor", scale_factor)
    check_number("normalize_by_update_norm(eps)", "eps", eps, low=0.0)

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, Any]:
        where = "normalize_by_update_norm.update"
        ul, td = fpt.flatten(updates)
        if not ul:
            return updates, state
        _checks.check_one_device(where, ul, updates)
        _checks.check_float(where, ul, updates)
        factor = scale_factor / (global_norm(updates) + eps)
        return fpt.unflatten(td, [u * factor.to(u.dtype) for u in ul]), state

    return GradientTransformation(init_fn, update_fn)
