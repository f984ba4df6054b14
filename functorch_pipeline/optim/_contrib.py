"""``reduce_on_plateau``: optax.contrib's loss-driven scaling of the updates."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import torch

from functorch_pipeline import tree as fpt
from functorch_pipeline.optim import _checks
from functorch_pipeline.optim import _mt
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import Params
from functorch_pipeline.optim._base import Updates
from functorch_pipeline.optim._transforms import check_number

__all__ = ["ReduceLROnPlateauState", "reduce_on_plateau"]


class ReduceLROnPlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau` (optax.contrib's fields).

    Attributes:
        scale: the current factor applied to the updates.
        best_value: the best (lowest) averaged value seen.
        plateau_count: evaluations since ``best_value`` last improved.
        cooldown_count: evaluations left in the cooldown after a reduction.
        count: values accumulated in the current ``accumulation_size`` window.
        avg_value: the running mean of the values in the current window.
    """

    scale: torch.Tensor
    best_value: torch.Tensor
    plateau_count: torch.Tensor
    cooldown_count: torch.Tensor
    count: torch.Tensor
    avg_value: torch.Tensor


def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    rtol: float = 1e-4,
    atol: float = 0.0,
    cooldown: int = 0,
    accumulation_size: int = 1,
    min_scale: float = 0.0,
) -> GradientTransformation:
    r"""Multiply the updates by a scale that drops by ``factor`` when the loss plateaus.

    ``update(updates, state, params, value=loss)`` (``value`` is required). The values of
    ``accumulation_size`` calls are averaged into :math:`\bar v`; then, as optax.contrib:
    :math:`\bar v` improves when :math:`\bar v < (1 - \text{rtol})\,v_{best} - \text{atol}`
    (then :math:`v_{best} \leftarrow \bar v` and the plateau count resets, else it grows);
    when it reaches ``patience`` the scale becomes :math:`\max(\text{factor}\cdot s,
    s_{min})` and ``cooldown`` evaluations follow in which the plateau count stays 0.

    ``torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", threshold_mode="rel")``
    reduces after ``patience + 1`` bad evaluations (``num_bad_epochs > patience``), so
    ``reduce_on_plateau(factor, patience=p, rtol=th, cooldown=c)`` follows
    ``ReduceLROnPlateau(factor=factor, patience=p - 1, threshold=th, cooldown=c, eps=0)``.

    Args:
      factor: the multiplier applied on a plateau (in [0, 1]).
      patience: bad evaluations before the scale drops.
      rtol: relative improvement threshold.
      atol: absolute improvement threshold.
      cooldown: evaluations after a drop in which bad values are not counted.
      accumulation_size: calls whose values are averaged into one evaluation.
      min_scale: the smallest scale.

    Returns:
      A :class:`GradientTransformation` (it takes ``value=``) whose state is a
      :class:`ReduceLROnPlateauState`.

    Example:
      >>> tx = reduce_on_plateau(factor=0.5, patience=2)
      >>> s = tx.init({"w": torch.zeros(1)})
      >>> for loss in [1.0, 1.0, 1.0]:
      ...     u, s = tx.update({"w": torch.ones(1)}, s, value=loss)
      >>> u, s.scale
      ({'w': tensor([0.5000])}, tensor(0.5000, dtype=torch.float64))
    """
    check_number("reduce_on_plateau(factor)", "factor", factor, low=0.0, high=1.0)
    for name, v in (("patience", patience), ("cooldown", cooldown),
                    ("accumulation_size", accumulation_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name != "cooldown" else 0):
            raise ValueError(f"reduce_on_plateau({name}): expected an int >= "
                             f"{1 if name != 'cooldown' else 0}, got {v!r}")
    check_number("reduce_on_plateau(rtol)", "rtol", rtol, low=0.0, high=1.0)
    check_number("reduce_on_plateau(atol)", "atol", atol, low=0.0)
    check_number("reduce_on_plateau(min_scale)", "min_scale", min_scale, low=0.0)

    def init_fn(params: Params) -> ReduceLROnPlateauState:
        dev = _checks.first_device(params) or torch.device("cpu")
        dt = _mt.hyper_dtype(dev)
        i0 = torch.zeros((), dtype=torch.int32, device=dev)
        return ReduceLROnPlateauState(
            scale=torch.ones((), dtype=dt, device=dev),
            best_value=torch.full((), float("inf"), dtype=dt, device=dev),
            plateau_count=i0, cooldown_count=i0.clone(), count=i0.clone(),
            avg_value=torch.zeros((), dtype=dt, device=dev),
        )

    def update_fn(updates: Updates, state: ReduceLROnPlateauState, params: Params = None,
                  *, value: Any = None, **extra_args: Any) -> tuple[Updates, Any]:
        where = "reduce_on_plateau.update"
        _checks.check_state(where, state, ReduceLROnPlateauState, "reduce_on_plateau.init")
        if value is None:
            raise TypeError(f"{where}: needs the loss as `value=` (update(updates, state, "
                            "params, value=loss))")
        dev = state.count.device
        for name in ("plateau_count", "cooldown_count", "count"):
            _checks.check_scalar(where, f"state.{name}", getattr(state, name), dev, torch.int32)
        dt = state.avg_value.dtype
        for name in ("scale", "best_value", "avg_value"):
            _checks.check_scalar(where, f"state.{name}", getattr(state, name), dev, dt)
        v = torch.as_tensor(value, device=dev)
        if v.dim() != 0:
            raise ValueError(f"{where}: `value` must be a scalar, got shape {tuple(v.shape)}")
        v = v.to(dt)
        count = state.count + 1
        avg = (state.count.to(dt) * state.avg_value + v) / count.to(dt)
        full = count == accumulation_size
        improved = avg < (1 - rtol) * state.best_value - atol
        best = torch.where(full & improved, avg, state.best_value)
        plateau = torch.where(improved, torch.zeros_like(state.plateau_count),
                              state.plateau_count + 1)
        cooling = state.cooldown_count > 0
        hit = ~cooling & (plateau == patience)
        new_plateau = torch.where(cooling | hit, torch.zeros_like(plateau), plateau)
        new_scale = torch.where(hit, torch.clamp(state.scale * factor, min=min_scale),
                                state.scale)
        new_cool = torch.where(cooling, state.cooldown_count - 1,
                               torch.where(hit, torch.full_like(plateau, cooldown),
                                           torch.zeros_like(plateau)))
        z = torch.zeros_like(state.count)
        new_state = ReduceLROnPlateauState(
            scale=torch.where(full, new_scale, state.scale),
            best_value=best,
            plateau_count=torch.where(full, new_plateau, state.plateau_count),
            cooldown_count=torch.where(full, new_cool, state.cooldown_count),
            count=torch.where(full, z, count),
            avg_value=torch.where(full, torch.zeros_like(avg), avg),
        )
        s = new_state.scale
        out = fpt.map(lambda u: u * s.to(u.dtype), updates)
        return out, new_state

    return GradientTransformation(init_fn, update_fn)
