"""Elementary transformations: scaling, momentum, weight decay, clipping, trust ratio."""

from __future__ import annotations

import math
import numbers
from typing import Any
from typing import NamedTuple

import torch

from functorch_pipeline import tree as fpt
from functorch_pipeline.optim import _checks
from functorch_pipeline.optim import _mt
from functorch_pipeline.optim._base import EmptyState
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import Params
from functorch_pipeline.optim._base import ScalarOrSchedule
from functorch_pipeline.optim._base import Schedule
from functorch_pipeline.optim._base import Updates
from functorch_pipeline.optim._base import flatten_like
from functorch_pipeline.optim._base import fused_transformation
from functorch_pipeline.optim._base import require_params
from functorch_pipeline.optim._base import zero_count
from functorch_pipeline.optim._checks import SAME

__all__ = [
    "ScaleByScheduleState",
    "TraceState",
    "WeightDecaySchedule",
    "add_decayed_weights",
    "clip",
    "clip_by_global_norm",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_trust_ratio",
    "trace",
]


def check_number(where: str, name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, high_open: bool = False) -> None:
    """Validate a Python-number hyperparameter (tensors and schedules are not checked):
    NaN, which passes every comparison as False (and so every range check), is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return
    if math.isnan(value):
        raise ValueError(f"{where}: `{name}` must be a number, got nan")
    if low is not None and value < low:
        raise ValueError(f"{where}: `{name}` must be >= {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        op = "<" if high_open else "<="
        raise ValueError(f"{where}: `{name}` must be {op} {high}, got {value}")


def _scale_affine(step_size: Any):
    def affine(state: Any, params: Params) -> tuple[Any, Any, Any]:
        return step_size, 0, state

    return affine


def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiply updates by a fixed ``step_size``.

    Args:
      step_size: the factor (a number or a 0-d tensor).

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale(-0.1)
    >>> tx.update({"w": torch.tensor([1.0, 2.0])}, tx.init(None))[0]
    {'w': tensor([-0.1000, -0.2000])}
    """

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None, **extra_args: Any):
        ul, td = fpt.flatten(updates)
        fe = _mt.foreach_ok(ul, _mt.tensors(step_size))
        if _mt.inplace_ok(extra_args, ul, fe=fe):
            out = _mt.mul_(ul, step_size, fe)
        else:
            out = _mt.mul(ul, step_size, fe)
        return fpt.unflatten(td, out), state

    update_fn._fp_affine = _scale_affine(step_size)
    return GradientTransformation(init_fn, update_fn)


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: the number of steps taken.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
    """

    count: torch.Tensor


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiply updates by ``step_size_fn(count)``, where ``count`` is the step (from 0).

    Args:
      step_size_fn: a function of the step count (from 0).

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_schedule(lambda n: 1.0 / (n + 1))
    >>> s = tx.init({"w": torch.ones(1)})
    >>> u, s = tx.update({"w": torch.ones(1)}, s); u2, s = tx.update({"w": torch.ones(1)}, s)
    >>> u2, s.count
    ({'w': tensor([0.5000])}, tensor(2, dtype=torch.int32))
    """
    if not callable(step_size_fn):
        raise TypeError(f"scale_by_schedule(step_size_fn): expected a callable, got {type(step_size_fn).__name__}")

    def init_fn(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=zero_count(params))

    def affine(state: ScaleByScheduleState, params: Params) -> tuple[Any, Any, Any]:
        where = "scale_by_schedule.update"
        _checks.check_state(where, state, ScaleByScheduleState, "scale_by_schedule.init")
        dev = None if params is None else _checks.first_device(params)
        _checks.check_scalar(where, "state.count", state.count, dev, torch.int32)
        return step_size_fn(state.count), 0, ScaleByScheduleState(count=state.count + 1)

    def update_fn(updates: Updates, state: ScaleByScheduleState, params: Params = None, **extra_args: Any):
        ul, td = fpt.flatten(updates)
        s, _, new_state = affine(state, params)
        _checks.check_count("scale_by_schedule.update", "state.count", state.count, ul)
        fe = _mt.foreach_ok(ul, _mt.tensors(s))
        out = _mt.mul_(ul, s, fe) if _mt.inplace_ok(extra_args, ul, fe=fe) else _mt.mul(ul, s, fe)
        return fpt.unflatten(td, out), new_state

    update_fn._fp_affine = affine
    return GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Scale by ``-learning_rate`` (a number, a 0-d tensor or a schedule of the step).

    Args:
      learning_rate: the step size, or a schedule ``count -> step size``.
      flip_sign: negate (the default), so that adding the updates descends.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_learning_rate(0.1)
    >>> tx.update([torch.tensor([2.0])], tx.init(None))[0]
    [tensor([-0.2000])]
    """
    where = "scale_by_learning_rate(learning_rate)"
    _checks.check_hyperparameter(where, "learning_rate", learning_rate, schedule=True)
    check_number(where, "learning_rate", learning_rate, low=0.0)
    m = -1 if flip_sign else 1
    if callable(learning_rate):
        return scale_by_schedule(lambda count: m * learning_rate(count))
    return scale(m * learning_rate)


# Below this many elements a fresh foreach ``mul`` beats a Python loop of ``out=`` muls.
_OUT_MIN_NUMEL = 1 << 16


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffer, shaped like the parameters."""

    trace: Any


class DampedTraceState(NamedTuple):
    """State of :func:`trace` with ``dampening``: a step count and the momentum buffer."""

    count: torch.Tensor
    trace: Any


def trace(
    decay: float,
    nesterov: bool = False,
    accumulator_dtype: torch.dtype | None = None,
    *,
    dampening: float = 0.0,
) -> GradientTransformation:
    """Momentum: ``t <- g + decay * t``; the update is ``t`` (or ``g + decay * t`` with nesterov).

    Args:
      decay: the momentum coefficient.
      nesterov: use Nesterov's look-ahead form.
      accumulator_dtype: dtype of the buffer (default: the parameters').
      dampening: (not in optax) torch.optim.SGD's ``dampening``:
        ``t <- decay * t + (1 - dampening) * g`` after a first step ``t = g``.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = trace(0.5)
    >>> s = tx.init([torch.zeros(1)])
    >>> u, s = tx.update([torch.ones(1)], s); u, s = tx.update([torch.ones(1)], s)
    >>> u
    [tensor([1.5000])]
    """
    check_number("trace(decay)", "decay", decay, low=0.0)
    check_number("trace(dampening)", "dampening", dampening, low=0.0, high=1.0)
    damped = not (isinstance(dampening, numbers.Real) and dampening == 0)

    def init_fn(params: Params) -> Any:
        buf = fpt.map(lambda p: torch.zeros_like(p, dtype=accumulator_dtype or p.dtype), params)
        return DampedTraceState(zero_count(params), buf) if damped else TraceState(buf)

    def fused(updates: Updates, state: Any, params: Params, m: Any, c: Any, **extra_args: Any):
        where = "trace.update"
        gl, td = fpt.flatten(updates)
        gs = _checks.signature(gl)
        _checks.check_state(where, state, DampedTraceState if damped else TraceState, "trace.init")
        if damped:
            _checks.check_count(where, "state.count", state.count, gl)
        tl = flatten_like(where, updates, state.trace, "state.trace", td, ref=gl, ref_sig=gs,
                          dtype=accumulator_dtype or SAME)
        fe = _mt.foreach_ok(gl, tl, _mt.tensors(decay, dampening, m, c))
        inplace = _mt.inplace_ok(extra_args, gl, tl, fe=fe)
        # NOTE [update never aliases state]: the caller asked for in-place writes, so the
        # transforms after this one may write into the update we return (scale,
        # add_decayed_weights, clip_by_global_norm in a chain): it must not be the new
        # trace, even when this call itself takes the pure path.
        donate = bool(extra_args.get("inplace"))
        free = None  # buffers no state refers to any more, free to receive the update
        if damped:
            first = state.count == 0
            dec, dam = _mt.like(decay, gl), _mt.like(dampening, gl)
            # NOTE [scalar dtype]: per leaf, so a 0-d trace keeps its dtype in a mixed tree
            new_t = [_mt.to_leaf(torch.where(first, g, _mt.leaf_scalar(dec, t) * t
                                             + (1 - _mt.leaf_scalar(dam, t)) * g), t)
                     for g, t in zip(gl, tl, strict=True)]
            if inplace:
                for t, n in zip(tl, new_t, strict=True):
                    t.copy_(n)
                new_t = tl  # the state's own buffers: the update goes elsewhere
        elif inplace and accumulator_dtype is None:  # inplace_ok: nothing differentiated
            # NOTE [trace buffer swap]: the donated gradient buffers receive the new trace
            # (g <- g + decay * t, the same kernel as the pure ``add``) and become the new
            # state; the update is then m * trace: one pass less than updating t in place.
            if nesterov:
                for g, t in zip(gl, tl, strict=True):
                    torch.add(g, t, alpha=decay, out=t)
                new_t = tl
            else:
                new_t = _mt.add_(gl, tl, fe, alpha=decay)
                free = tl  # the old trace: the update may be written there
        else:
            inplace = False
            new_t = _mt.cast(_mt.add(gl, tl, fe, alpha=decay), accumulator_dtype)
        unit = isinstance(m, numbers.Real) and m == 1
        no_c = isinstance(c, numbers.Real) and c == 0
        # Every branch below returns buffers this call owns (fresh, the donated gradients
        # or the freed old trace), never ``new_t``, except the pure ``unit`` and ``no_c``
        # case, where nothing writes into the update (NOTE [update never aliases state]).
        out: list | None
        if nesterov:  # (``new_t`` is never ``gl`` here)
            out = _mt.add_(gl, new_t, fe, alpha=decay) if inplace else _mt.add(gl, new_t, fe, alpha=decay)
            out = out if unit else _mt.mul_(out, m, fe)
        elif free is not None and unit:
            if fe:
                torch._foreach_copy_(free, new_t)
            else:
                for t, n in zip(free, new_t, strict=True):
                    t.copy_(n)
            out = free
        elif free is not None and sum(t.numel() for t in free) >= _OUT_MIN_NUMEL:
            # no allocation, hence no page faults; same kernel as the pure ``mul``
            out = [torch.mul(n, m, out=t) for n, t in zip(new_t, free, strict=True)]
        elif not unit:
            out = _mt.mul(new_t, m, fe)
        elif not no_c:
            out = None  # ``new_t + c * params`` out of place, below
        elif donate:
            out = [t.clone() for t in new_t]
        else:
            out = new_t  # pure: the update is the new trace itself, as in optax
        if not no_c:
            require_params(where, params)
            pl = flatten_like(where, updates, params, "params", td, ref=gl, ref_sig=gs)
            out = _mt.add(new_t, pl, fe, alpha=c) if out is None else _mt.add_(out, pl, fe, alpha=c)
        new_trace = fpt.unflatten(td, new_t)
        new_state = DampedTraceState(state.count + 1, new_trace) if damped else TraceState(new_trace)
        return fpt.unflatten(td, out), new_state

    return fused_transformation(init_fn, fused)


class WeightDecaySchedule(NamedTuple):
    """State of :func:`add_decayed_weights` with a schedule: the step count (optax's
    ``WeightDecaySchedule``).

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
    """

    count: torch.Tensor


def add_decayed_weights(weight_decay: ScalarOrSchedule = 0.0, mask: Any = None) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (decoupled weight decay in a chain).

    Args:
      weight_decay: the coefficient: a number, a 0-d tensor or a schedule (a function of
        the step count, from 0; the state is then a :class:`WeightDecaySchedule`, as in
        optax).
      mask: a tree of booleans (or a function of the params returning one) selecting
        the parameters to decay; see :func:`masked`.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = add_decayed_weights(0.1)
    >>> tx.update({"w": torch.ones(1)}, tx.init(None), {"w": torch.tensor([2.0])})[0]
    {'w': tensor([1.2000])}
    >>> tx = add_decayed_weights(lambda count: 0.5 / (count + 1))
    >>> s = tx.init(None)
    >>> u, s = tx.update({"w": torch.ones(1)}, s, {"w": torch.tensor([2.0])})
    >>> u, s = tx.update({"w": torch.ones(1)}, s, {"w": torch.tensor([2.0])}); u
    {'w': tensor([1.5000])}
    """
    where0 = "add_decayed_weights(weight_decay)"
    _checks.check_hyperparameter(where0, "weight_decay", weight_decay, schedule=True)
    check_number(where0, "weight_decay", weight_decay, low=0.0)
    scheduled = callable(weight_decay)

    def init_fn(params: Params) -> Any:
        return WeightDecaySchedule(zero_count(params)) if scheduled else EmptyState()

    no_op = isinstance(weight_decay, numbers.Real) and weight_decay == 0

    def coefficient(state: Any, params: Params) -> tuple[Any, Any]:
        """``(weight_decay now, new state)``; the schedule is evaluated at ``state.count``."""
        if not scheduled:
            return weight_decay, state
        where = "add_decayed_weights.update"
        _checks.check_state(where, state, WeightDecaySchedule, "add_decayed_weights.init")
        dev = None if params is None else _checks.first_device(params)
        _checks.check_scalar(where, "state.count", state.count, dev, torch.int32)
        wd = weight_decay(state.count)
        _checks.check_hyperparameter(where, "weight_decay(count)", wd)
        return wd, WeightDecaySchedule(state.count + 1)

    def update_fn(updates: Updates, state: Any, params: Params = None, **extra_args: Any):
        where = "add_decayed_weights.update"
        if no_op:
            return updates, state
        require_params(where, params)
        wd, new_state = coefficient(state, params)
        ul, td = fpt.flatten(updates)
        pl = flatten_like(where, updates, params, "params", td, ref=ul)
        fe = _mt.foreach_ok(ul, pl, _mt.tensors(wd))
        if _mt.inplace_ok(extra_args, ul, pl, fe=fe):
            out = _mt.add_(ul, pl, fe, alpha=wd)
        else:
            out = _mt.add(ul, pl, fe, alpha=wd)
        return fpt.unflatten(td, out), new_state

    if mask is not None:
        from functorch_pipeline.optim._masking import masked

        return masked(GradientTransformation(init_fn, update_fn), mask)

    def affine(state: Any, params: Params) -> tuple[Any, Any, Any]:
        if no_op:
            return 1, 0, state
        require_params("add_decayed_weights.update", params)
        wd, new_state = coefficient(state, params)
        return 1, wd, new_state

    update_fn._fp_affine = affine
    return GradientTransformation(init_fn, update_fn)


def clip(max_delta: float | torch.Tensor) -> GradientTransformation:
    """Clip every update element to ``[-max_delta, max_delta]``.

    Args:
      max_delta: the bound (a number or a 0-d tensor).

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = clip(1.0)
    >>> tx.update([torch.tensor([-3.0, 0.5, 2.0])], tx.init(None))[0]
    [tensor([-1.0000,  0.5000,  1.0000])]
    """
    check_number("clip(max_delta)", "max_delta", max_delta, low=0.0)

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None, **extra_args: Any):
        ul, td = fpt.flatten(updates)
        if _mt.foreach_ok(ul) and not isinstance(max_delta, torch.Tensor):
            out = torch._foreach_clamp_min(torch._foreach_clamp_max(ul, max_delta), -max_delta)
        else:
            out = [_mt.to_leaf(torch.clamp(u, -max_delta, max_delta), u) for u in ul]
        return fpt.unflatten(td, list(out)), state

    return GradientTransformation(init_fn, update_fn)


def tree_norm(leaves: list[torch.Tensor], fe: bool) -> torch.Tensor:
    """The global L2 norm of a list of tensors (0-d; foreach when allowed)."""
    if not leaves:
        return torch.zeros(())
    norms = torch._foreach_norm(leaves) if fe else [torch.linalg.vector_norm(x) for x in leaves]
    dt = _mt.scalar_dtype(leaves)
    sq = torch.stack([n.to(dt) for n in norms])
    return torch.sqrt(torch.sum(sq * sq))


def clip_by_global_norm(max_norm: float | torch.Tensor) -> GradientTransformation:
    """Rescale the updates so their global L2 norm is at most ``max_norm``.

    ``u <- u * max_norm / max(norm(u), max_norm)``: unchanged when the norm is below
    ``max_norm`` (optax's rule). ``torch.nn.utils.clip_grad_norm_`` instead uses
    ``max_norm / (norm + 1e-6)``, so it scales by slightly less than 1 at the threshold.

    Args:
      max_norm: the largest global L2 norm let through.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = clip_by_global_norm(1.0)
    >>> tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(None))[0]
    {'w': tensor([0.6000, 0.8000])}
    """
    check_number("clip_by_global_norm(max_norm)", "max_norm", max_norm, low=0.0)

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None, **extra_args: Any):
        ul, td = fpt.flatten(updates)
        if not ul:
            return updates, state
        _checks.check_one_device("clip_by_global_norm.update", ul, updates)
        fe = _mt.foreach_ok(ul, _mt.tensors(max_norm))
        norm = tree_norm(ul, fe)
        factor = max_norm / torch.maximum(norm, torch.as_tensor(max_norm, dtype=norm.dtype, device=norm.device))
        if _mt.inplace_ok(extra_args, ul, fe=fe):
            out = _mt.mul_(ul, factor, fe)
        else:
            out = _mt.mul(ul, factor, fe)
        return fpt.unflatten(td, out), state

    return GradientTransformation(init_fn, update_fn)


def scale_by_trust_ratio(
    min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> GradientTransformation:
    """Scale each leaf's update by ``trust_coefficient * |param| / (|update| + eps)`` (LARS/LAMB).

    Norms are per leaf and floored at ``min_norm``; a leaf whose parameter or update
    norm is zero keeps its update unchanged.

    Args:
      min_norm: floor for both norms.
      trust_coefficient: multiplies the ratio.
      eps: added to the update norm.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_trust_ratio()
    >>> tx.update({"w": torch.tensor([0.0, 2.0])}, tx.init(None), {"w": torch.tensor([3.0, 4.0])})[0]
    {'w': tensor([0., 5.])}
    """
    check_number("scale_by_trust_ratio(min_norm)", "min_norm", min_norm)
    check_number("scale_by_trust_ratio(trust_coefficient)", "trust_coefficient", trust_coefficient)
    check_number("scale_by_trust_ratio(eps)", "eps", eps)

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None, **extra_args: Any):
        where = "scale_by_trust_ratio.update"
        require_params(where, params)
        ul, td = fpt.flatten(updates)
        pl = flatten_like(where, updates, params, "params", td, ref=ul)
        out = []
        for u, p in zip(ul, pl, strict=True):
            pn = torch.clamp(torch.linalg.vector_norm(p), min=min_norm)
            un = torch.clamp(torch.linalg.vector_norm(u), min=min_norm)
            ratio = trust_coefficient * pn / (un + eps)
            safe = torch.where((pn == 0) | (un == 0), torch.ones_like(ratio), ratio)
            out.append(u * safe.to(u.dtype))
        return fpt.unflatten(td, out), state

    return GradientTransformation(init_fn, update_fn)
