"""Learning-rate schedules: pure functions of the step, with optax's definitions.

A schedule maps a step ``count`` (a Python int or an integer tensor, e.g. an optimizer
state's counter) to a value. Everything is tensor maths (``torch.where`` instead of
``if``), so a tensor step never syncs with the host and schedules run under ``vmap``
and ``torch.compile``. The result is a 0-d float64 tensor (float32 on MPS) on the
step's device: NOTE [schedule precision].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import torch

from functorch_pipeline.optim import _mt

__all__ = [
    "constant_schedule",
    "cosine_decay_schedule",
    "cosine_onecycle_schedule",
    "exponential_decay",
    "join_schedules",
    "linear_schedule",
    "piecewise_constant_schedule",
    "piecewise_interpolate_schedule",
    "polynomial_schedule",
    "warmup_cosine_decay_schedule",
]

Schedule = Callable[[Any], torch.Tensor]


def _step(count: Any) -> torch.Tensor:
    # NOTE [schedule precision]: float64 (float32 on MPS), not the default dtype: a
    # float64 run then gets torch.optim's exact double learning rates, and a 0-d float64
    # value does not promote float32 parameters (0-d tensors do not take part in type
    # promotion), so float32 runs are unchanged. Values stay differentiable.
    t = torch.as_tensor(count)
    return t.to(_mt.hyper_dtype(t.device))


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), value, dtype=like.dtype, device=like.device)


def constant_schedule(value: float) -> Schedule:
    """``value`` at every step.

    Args:
      value: the constant.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    >>> constant_schedule(0.1)(1000)
    tensor(0.1000, dtype=torch.float64)
    """

    def schedule(count: Any) -> torch.Tensor:
        return _const(value, _step(count))

    return schedule


def polynomial_schedule(
    init_value: float, end_value: float, power: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    r"""``(init - end) * (1 - t/T)**power + end`` with ``t = clip(count - begin, 0, T)``.

    Args:
      init_value: the start value.
      end_value: the final value.
      power: the polynomial power.
      transition_steps: length of the transition.
      transition_begin: first step of the transition.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    >>> s = polynomial_schedule(1.0, 0.0, 2, transition_steps=10)
    >>> s(0), s(5), s(10), s(20)
    (tensor(1., dtype=torch.float64), tensor(0.2500, dtype=torch.float64),
     tensor(0., dtype=torch.float64), tensor(0., dtype=torch.float64))
    """
    if transition_steps <= 0:
        warnings.warn("polynomial_schedule: transition_steps <= 0, using a constant init_value", stacklevel=2)
        return constant_schedule(init_value)
    if transition_begin < 0:
        warnings.warn("polynomial_schedule: transition_begin < 0, using 0", stacklevel=2)
        transition_begin = 0

    def schedule(count: Any) -> torch.Tensor:
        t = torch.clamp(_step(count) - transition_begin, 0, transition_steps)
        frac = 1 - t / transition_steps
        return (init_value - end_value) * frac**power + end_value

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps`` after ``transition_begin``.

    Args:
      init_value: the start value.
      end_value: the final value.
      transition_steps: length of the ramp.
      transition_begin: step where the ramp starts.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    >>> s = linear_schedule(0.0, 1.0, transition_steps=4, transition_begin=2)
    >>> [round(float(s(i)), 2) for i in (0, 2, 3, 6, 9)]
    [0.0, 0.0, 0.25, 1.0, 1.0]
    """
    return polynomial_schedule(init_value, end_value, 1, transition_steps, transition_begin)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    r"""``init * ((1 - alpha) * (0.5 (1 + cos(pi t / T)))**exponent + alpha)``, ``t = min(count, T)``.

    Args:
      init_value: the value at step 0.
      decay_steps: steps to reach the floor (> 0).
      alpha: the floor as a fraction of ``init_value``.
      exponent: power of the cosine factor.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    >>> s = cosine_decay_schedule(1.0, decay_steps=10, alpha=0.1)
    >>> s(0), s(5), s(10), s(50)
    (tensor(1., dtype=torch.float64), tensor(0.5500, dtype=torch.float64),
     tensor(0.1000, dtype=torch.float64), tensor(0.1000, dtype=torch.float64))
    """
    if not decay_steps > 0:
        raise ValueError(f"cosine_decay_schedule(decay_steps): must be positive, got {decay_steps}")

    def schedule(count: Any) -> torch.Tensor:
        t = torch.clamp(_step(count), max=decay_steps)
        cosine = 0.5 * (1 + torch.cos(math.pi * t / decay_steps))
        return init_value * ((1 - alpha) * cosine**exponent + alpha)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Schedule ``i`` from ``boundaries[i-1]`` on, fed ``count - boundaries[i-1]``.

    Args:
      schedules: ``len(boundaries) + 1`` schedules.
      boundaries: the steps where each next schedule starts.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    >>> s = join_schedules([constant_schedule(1.0), constant_schedule(2.0)], [3])
    >>> s(2), s(3)
    (tensor(1., dtype=torch.float64), tensor(2., dtype=torch.float64))
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join_schedules(schedules, boundaries): need one more schedule than boundaries, "
            f"got {len(schedules)} and {len(boundaries)}"
        )

    def schedule(count: Any) -> torch.Tensor:
        step = _step(count)
        out = schedules[0](step)
        for boundary, s in zip(boundaries, schedules[1:], strict=True):
            out = torch.where(step < boundary, out, s(step - boundary))
        return out

    return schedule


def _warmup(init_value: float, peak_value: float, warmup_steps: int) -> Schedule:
    """The warmup piece of a joined schedule: with ``warmup_steps <= 0`` it is only used
    before the join's boundary (negative steps), where optax's ``linear_schedule`` with no
    transition gives ``init_value``; so no warning (the schedule starts at its next piece)."""
    if warmup_steps <= 0:
        return constant_schedule(init_value)
    return linear_schedule(init_value, peak_value, warmup_steps)


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value``; ``decay_steps`` counts the warmup too.

    Args:
      init_value: the value at step 0.
      peak_value: the value after the warmup.
      warmup_steps: length of the linear warmup.
      decay_steps: total length, warmup included.
      end_value: the final value.
      exponent: power of the cosine factor.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    >>> s = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6, end_value=0.2)
    >>> [round(float(s(i)), 4) for i in (0, 1, 2, 4, 6, 9)]
    [0.0, 0.5, 1.0, 0.6, 0.2, 0.2]
    """
    alpha = 0.0 if peak_value == 0 else end_value / peak_value
    return join_schedules(
        [
            _warmup(init_value, peak_value, warmup_steps),
            cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent),
        ],
        [warmup_steps],
    )


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init * decay_rate ** ((count - begin) / transition_steps)`` (floored exponent with
    ``staircase``), ``init`` before ``transition_begin``, clipped at ``end_value``.

    Args:
      init_value: the value before the decay starts.
      transition_steps: steps per factor of ``decay_rate``.
      decay_rate: the factor.
      transition_begin: first step of the decay.
      staircase: decay in whole factors.
      end_value: a floor (or a ceiling when ``decay_rate > 1``).

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    >>> s = exponential_decay(1.0, transition_steps=2, decay_rate=0.5, staircase=True, end_value=0.3)
    >>> s(0), s(1), s(2), s(3), s(10)
    (tensor(1., dtype=torch.float64), tensor(1., dtype=torch.float64),
     tensor(0.5000, dtype=torch.float64), tensor(0.5000, dtype=torch.float64),
     tensor(0.3000, dtype=torch.float64))
    """
    if transition_steps <= 0:
        warnings.warn("exponential_decay: transition_steps <= 0, using a constant init_value", stacklevel=2)
        return constant_schedule(init_value)
    if decay_rate == 0:
        warnings.warn("exponential_decay: decay_rate == 0, using a constant init_value", stacklevel=2)
        return constant_schedule(init_value)
    if transition_begin < 0:
        warnings.warn("exponential_decay: transition_begin < 0, using 0", stacklevel=2)
        transition_begin = 0

    def schedule(count: Any) -> torch.Tensor:
        n = _step(count) - transition_begin
        p = n / transition_steps
        if staircase:
            p = torch.floor(p)
        value = torch.where(n <= 0, _const(init_value, n), init_value * torch.pow(_const(decay_rate, n), p))
        if end_value is not None:
            clip = torch.maximum if decay_rate < 1 else torch.minimum
            value = clip(value, _const(end_value, n))
        return value

    return schedule


def piecewise_constant_schedule(init_value: float, boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    """``init_value`` multiplied by every ``scale`` whose boundary is ``<= count``.

    Args:
      init_value: the value before the first boundary.
      boundaries_and_scales: ``{step: factor}``.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    >>> s = piecewise_constant_schedule(1.0, {2: 0.5, 4: 0.1})
    >>> [round(float(s(i)), 4) for i in (0, 1, 2, 3, 4, 9)]
    [1.0, 1.0, 0.5, 0.5, 0.05, 0.05]
    """
    items = sorted((boundaries_and_scales or {}).items())
    for b, sc in items:
        if sc < 0:
            raise ValueError(f"piecewise_constant_schedule: scales must be non-negative, got {sc} at {b}")

    def schedule(count: Any) -> torch.Tensor:
        step = _step(count)
        v = _const(init_value, step)
        for boundary, sc in items:
            v = torch.where(step < boundary, v, v * sc)
        return v

    return schedule


def piecewise_interpolate_schedule(
    interpolate_type: str, init_value: float, boundaries_and_scales: Mapping[int, float] | None = None
) -> Schedule:
    """Interpolate (``"linear"`` or ``"cosine"``) between values that change at boundaries:
    the value at boundary ``b_i`` is ``init_value`` times the product of scales up to it.
    At a negative step the value is 0, as in optax.

    Args:
      interpolate_type: ``"linear"`` or ``"cosine"``.
      init_value: the value at step 0.
      boundaries_and_scales: ``{step: factor}``.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    >>> s = piecewise_interpolate_schedule("linear", 1.0, {4: 0.5})
    >>> [round(float(s(i)), 3) for i in (0, 2, 4, 8)]
    [1.0, 0.75, 0.5, 0.5]
    """
    if interpolate_type not in ("linear", "cosine"):
        raise ValueError(f"piecewise_interpolate_schedule: `interpolate_type` must be 'linear' or 'cosine', got {interpolate_type!r}")
    items = sorted((boundaries_and_scales or {}).items())
    if any(sc < 0 for _, sc in items):
        raise ValueError("piecewise_interpolate_schedule: scales must be non-negative")
    bounds = [0] + [b for b, _ in items]
    values = [init_value]
    for _, sc in items:
        values.append(values[-1] * sc)

    def interp(a: float, b: float, pct: torch.Tensor) -> torch.Tensor:
        if interpolate_type == "linear":
            return a + (b - a) * pct
        return b + (a - b) / 2 * (torch.cos(math.pi * pct) + 1)

    def schedule(count: Any) -> torch.Tensor:
        step = _step(count)
        # optax's rule: 0 before step 0 (no interval holds a negative count; extrapolating
        # the first segment gave a one-cycle schedule a negative learning rate there)
        out = torch.where(step >= bounds[-1], _const(values[-1], step), _const(0.0, step))
        for i in range(len(bounds) - 2, -1, -1):
            lo, hi = bounds[i], bounds[i + 1]
            pct = (step - lo) / (hi - lo) if hi > lo else step * 0
            out = torch.where((step >= lo) & (step < hi), interp(values[i], values[i + 1], pct), out)
        return out

    return schedule


def cosine_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """One-cycle: cosine from ``peak/div_factor`` up to ``peak`` over the first
    ``pct_start`` of ``transition_steps``, then cosine down to
    ``peak / (div_factor * final_div_factor)``.

    Args:
      transition_steps: length of the cycle.
      peak_value: the maximum.
      pct_start: fraction of the cycle spent rising.
      div_factor: ``peak / start``.
      final_div_factor: ``start / end``.

    Returns:
      A schedule: a function ``step -> value`` (a 0-d tensor).

    >>> s = cosine_onecycle_schedule(10, 1.0, pct_start=0.2, div_factor=10.0, final_div_factor=100.0)
    >>> [round(float(s(i)), 4) for i in (0, 1, 2, 10)]
    [0.1, 0.55, 1.0, 0.001]
    """
    if transition_steps <= 0:
        raise ValueError(f"cosine_onecycle_schedule(transition_steps): must be positive, got {transition_steps}")
    return piecewise_interpolate_schedule(
        "cosine",
        peak_value / div_factor,
        {int(pct_start * transition_steps): div_factor, int(transition_steps): 1.0 / (div_factor * final_div_factor)},
    )
