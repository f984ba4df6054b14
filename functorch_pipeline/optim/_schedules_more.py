"""Composite schedules with optax's definitions: warmup + constant, warmup + exponential
decay, SGDR (warm restarts) and the linear one-cycle. Built from ``_schedules.py``'s
pieces, so they share its tensor-only maths (NOTE [schedule precision]).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

from functorch_pipeline.optim._schedules import Schedule
from functorch_pipeline.optim._schedules import _warmup
from functorch_pipeline.optim._schedules import constant_schedule
from functorch_pipeline.optim._schedules import exponential_decay
from functorch_pipeline.optim._schedules import join_schedules
from functorch_pipeline.optim._schedules import linear_schedule
from functorch_pipeline.optim._schedules import piecewise_interpolate_schedule
from functorch_pipeline.optim._schedules import warmup_cosine_decay_schedule

__all__ = [
    "linear_onecycle_schedule",
    "sgdr_schedule",
    "warmup_constant_schedule",
    "warmup_exponential_decay_schedule",
]


def warmup_constant_schedule(init_value: float, peak_value: float,
                             warmup_steps: int) -> Schedule:
    r"""Linear from ``init_value`` to ``peak_value`` over ``warmup_steps``, then constant:
    :math:`v_t = v_0 + (v_p - v_0)\min(t, T_w)/T_w` (optax's ``linear_schedule``; so with
    ``warmup_steps <= 0`` it is the constant ``init_value``, with a warning).

    Args:
      init_value: the value at step 0.
      peak_value: the value from ``warmup_steps`` on.
      warmup_steps: length of the warmup.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    Example:
      >>> s = warmup_constant_schedule(0.0, 1.0, 4)
      >>> [float(s(i)) for i in (0, 2, 4, 100)]
      [0.0, 0.5, 1.0, 1.0]
    """
    if warmup_steps <= 0:
        # optax's warmup_constant_schedule is linear_schedule(init, peak, warmup_steps),
        # which is the constant init_value when there is no warmup
        warnings.warn(
            f"warmup_constant_schedule: warmup_steps={warmup_steps} <= 0, so the schedule is "
            f"the constant init_value={init_value} (optax's rule; peak_value={peak_value} is "
            "never reached): pass init_value=peak_value for a constant peak",
            stacklevel=2)
        return constant_schedule(init_value)
    return linear_schedule(init_value, peak_value, warmup_steps)


def warmup_exponential_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    r"""Linear warmup to ``peak_value`` over ``warmup_steps``, then
    :func:`exponential_decay` from ``peak_value`` (its step counted from the end of the
    warmup): :math:`v_p\,r^{(t - T_w - b)/T}` (floored exponent with ``staircase``).

    Args:
      init_value: the value at step 0.
      peak_value: the value at the end of the warmup.
      warmup_steps: length of the warmup.
      transition_steps: steps per factor ``decay_rate``.
      decay_rate: the factor :math:`r`.
      transition_begin: steps after the warmup before the decay starts (:math:`b`).
      staircase: decay in whole factors.
      end_value: the floor (or ceiling when ``decay_rate > 1``).

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    Example:
      >>> s = warmup_exponential_decay_schedule(0.0, 1.0, 2, transition_steps=1, decay_rate=0.5)
      >>> [float(s(i)) for i in (0, 1, 2, 3, 4)]
      [0.0, 0.5, 1.0, 0.5, 0.25]
    """
    return join_schedules(
        [
            _warmup(init_value, peak_value, warmup_steps),
            exponential_decay(peak_value, transition_steps, decay_rate, transition_begin,
                              staircase, end_value),
        ],
        [warmup_steps],
    )


def sgdr_schedule(cosine_kwargs: Iterable[Mapping[str, Any]]) -> Schedule:
    r"""SGDR (Loshchilov and Hutter, 2017): warm restarts, one
    :func:`warmup_cosine_decay_schedule` per dict of ``cosine_kwargs``, each starting
    where the previous one's ``decay_steps`` end.

    Args:
      cosine_kwargs: keyword arguments of :func:`warmup_cosine_decay_schedule`
        (``init_value``, ``peak_value``, ``warmup_steps``, ``decay_steps``, ...), one dict
        per cycle.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    Example:
      >>> cycle = dict(init_value=0.0, peak_value=1.0, warmup_steps=1, decay_steps=3)
      >>> s = sgdr_schedule([cycle, cycle])
      >>> [round(float(s(i)), 2) for i in range(7)]
      [0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0]
    """
    schedules, boundaries, step = [], [], 0
    for i, kwargs in enumerate(cosine_kwargs):
        if "decay_steps" not in kwargs:
            raise ValueError(f"sgdr_schedule(cosine_kwargs): cycle {i} has no `decay_steps`")
        schedules.append(warmup_cosine_decay_schedule(**kwargs))
        step += kwargs["decay_steps"]
        boundaries.append(step)
    if not schedules:
        raise ValueError("sgdr_schedule(cosine_kwargs): need at least one cycle")
    return join_schedules(schedules, boundaries[:-1])


def linear_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    pct_final: float = 0.85,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    r"""Linear one-cycle (Smith and Topin, 2017), optax's three phases: linear from
    :math:`v_p/d` up to :math:`v_p` over the first ``pct_start`` of ``transition_steps``,
    back down to :math:`v_p/d` by ``pct_final``, then down to
    :math:`v_p/(d \cdot d_f)` at ``transition_steps``.

    Args:
      transition_steps: length of the cycle.
      peak_value: the maximum :math:`v_p`.
      pct_start: fraction of the cycle spent rising.
      pct_final: fraction at which the second phase ends.
      div_factor: :math:`d`, peak over start.
      final_div_factor: :math:`d_f`, start over end.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    Example:
      >>> s = linear_onecycle_schedule(10, 1.0, pct_start=0.2, pct_final=0.6,
      ...                              div_factor=10.0, final_div_factor=100.0)
      >>> [round(float(s(i)), 4) for i in (0, 1, 2, 4, 6, 10)]
      [0.1, 0.55, 1.0, 0.55, 0.1, 0.001]
    """
    if transition_steps <= 0:
        raise ValueError(
            f"linear_onecycle_schedule(transition_steps): must be positive, got "
            f"{transition_steps}")
    return piecewise_interpolate_schedule(
        "linear",
        peak_value / div_factor,
        {
            int(pct_start * transition_steps): div_factor,
            int(pct_final * transition_steps): 1.0 / div_factor,
            int(transition_steps): 1.0 / final_div_factor,
        },
    )
