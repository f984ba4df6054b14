"""Wrappers: gradient accumulation, skipping non-finite steps, injected hyperparameters, EMA.

None of them branches on tensor values: where optax uses ``lax.cond`` we compute both
sides and select with ``torch.where`` (so they run under ``vmap`` and
``torch.compile``). The inner transformation therefore runs every step, and always on
the pure path (its old state must survive a step that is not applied).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import torch

from functorch_pipeline import tree as fpt
from functorch_pipeline.optim import _checks
from functorch_pipeline.optim import _mt
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import Params
from functorch_pipeline.optim._base import Updates
from functorch_pipeline.optim._base import drop_extra_args
from functorch_pipeline.optim._base import flatten_like
from functorch_pipeline.optim._base import zero_count
from functorch_pipeline.optim._checks import SAME

__all__ = [
    "ApplyIfFiniteState",
    "EmaState",
    "InjectHyperparamsState",
    "MultiSteps",
    "MultiStepsState",
    "apply_if_finite",
    "ema",
    "inject_hyperparams",
]


def _select_tree(cond: torch.Tensor, a: Any, b: Any) -> Any:
    """``a`` where ``cond`` else ``b``, leaf by leaf (tensor leaves only)."""
    return fpt.map(lambda x, y: torch.where(cond, x, y) if isinstance(x, torch.Tensor) else x, a, b)


def _pure(extra_args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra_args.items() if k != "inplace"}


class MultiStepsState(NamedTuple):
    """State of :class:`MultiSteps`.

    Attributes:
        mini_step: mini-steps since the last real update (0 to ``every_k_schedule - 1``).
        gradient_step: real (applied) updates so far.
        inner_opt_state: the wrapped optimizer's state.
        acc_grads: the gradients accumulated over the current mini-steps (their running mean, or
            their sum with ``use_grad_mean=False``).
        skip_state: the state of ``should_skip_update_fn`` (``()`` when unused).
    """

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_opt_state: Any
    acc_grads: Any
    skip_state: Any = ()


class MultiSteps:
    """Gradient accumulation: apply ``opt`` once every ``every_k_schedule`` calls.

    Between applications the updates are zeros and gradients are accumulated (their
    mean by default). ``every_k_schedule`` is an int or a function of the number of
    applied steps. ``should_skip_update_fn(updates, gradient_step, params) ->
    (skip, skip_state)`` may veto an accumulation.

    Args:
      opt: the optimizer to apply every ``every_k_schedule`` calls.
      every_k_schedule: an int, or a function of the number of applied steps.
      use_grad_mean: accumulate the mean (default) or the sum of the gradients.
      should_skip_update_fn: optional ``(updates, gradient_step, params) -> (skip, skip_state)``.
      accumulator_dtype: dtype of the gradient accumulator (optax 0.2.8's argument;
        default: the gradients'). The running mean/sum is formed and stored in this dtype
        (e.g. ``torch.float32`` for bfloat16 gradients) and cast back to the gradients'
        dtype for the inner optimizer.

    >>> from functorch_pipeline import optim
    >>> ms = MultiSteps(optim.sgd(1.0), every_k_schedule=2)
    >>> s = ms.init({"w": torch.zeros(1)})
    >>> u, s = ms.update({"w": torch.tensor([1.0])}, s); u
    {'w': tensor([0.])}
    >>> u, s = ms.update({"w": torch.tensor([3.0])}, s); u
    {'w': tensor([-2.])}
    """

    def __init__(
        self,
        opt: GradientTransformation,
        every_k_schedule: int | Callable[[torch.Tensor], Any],
        use_grad_mean: bool = True,
        should_skip_update_fn: Callable[..., tuple[Any, Any]] | None = None,
        accumulator_dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(every_k_schedule, numbers.Integral) and every_k_schedule < 1:
            raise ValueError(f"MultiSteps(every_k_schedule): must be >= 1, got {every_k_schedule}")
        self._opt = drop_extra_args(opt)  # optax's with_extra_args_support
        self._k = every_k_schedule
        self._mean = use_grad_mean
        self._skip = should_skip_update_fn
        if accumulator_dtype is not None and not isinstance(accumulator_dtype, torch.dtype):
            raise TypeError(f"MultiSteps(accumulator_dtype): expected a torch.dtype or None, got "
                            f"{accumulator_dtype!r}")
        self._acc_dtype = accumulator_dtype

    @property
    def inner_opt(self) -> GradientTransformation:
        return self._opt

    def _every_k(self, gradient_step: torch.Tensor) -> Any:
        return self._k(gradient_step) if callable(self._k) else self._k

    def init(self, params: Params) -> MultiStepsState:
        """The initial state: zero counters and gradient sum, and the inner state.

        Args:
            params: the parameters (a pytree of tensors).

        Returns:
            A :class:`MultiStepsState`.
        """
        count = zero_count(params)
        skip_state = ()
        if self._skip is not None:
            _, skip_state = self._skip(fpt.zeros_like(params), count, params)
        dt = self._acc_dtype
        acc = fpt.map(lambda p: torch.zeros_like(p, dtype=dt or p.dtype), params)
        return MultiStepsState(count, count, self._opt.init(params), acc, skip_state)

    def update(
        self, updates: Updates, state: MultiStepsState, params: Params = None, **extra_args: Any
    ) -> tuple[Updates, MultiStepsState]:
        """Accumulate ``updates``; every ``k``-th call, apply the inner optimizer to them.

        Args:
            updates: this mini-step's gradients.
            state: the state from :meth:`init` or the previous call.
            params: the current parameters (passed to the inner optimizer).
            **extra_args: passed to the inner optimizer's ``update``.

        Returns:
            ``(updates, new_state)``: the inner optimizer's updates on the ``k``-th call,
            zeros on the others.
        """
        where = "MultiSteps.update"
        _checks.check_state(where, state, MultiStepsState, "MultiSteps.init")
        extra_args = _pure(extra_args)
        ul, td = fpt.flatten(updates)
        _checks.check_count(where, "state.mini_step", state.mini_step, ul)
        _checks.check_count(where, "state.gradient_step", state.gradient_step, ul)
        k = self._every_k(state.gradient_step)
        al = flatten_like(where, updates, state.acc_grads, "state.acc_grads", td, ref=ul,
                          dtype=self._acc_dtype or SAME)
        ug = ul  # the gradients, in their own dtype (what the inner optimizer sees)
        if self._acc_dtype is not None:  # accumulate in the accumulator's dtype
            ul = [u.to(self._acc_dtype) for u in ul]
        fe = _mt.foreach_ok(ul, al)
        if self._mean:
            n = (state.mini_step + 1).to(_mt.scalar_dtype(ul)) if ul else state.mini_step
            acc = _mt.add(al, _mt.sub(ul, al, fe), fe, alpha=1 / n)
        else:
            acc = _mt.add(al, ul, fe)
        stored = fpt.unflatten(td, acc)
        acc_tree = stored
        if self._acc_dtype is not None:
            acc_tree = fpt.unflatten(td, [a.to(u.dtype) for a, u in zip(acc, ug, strict=True)])
        emit = state.mini_step >= k - 1
        inner_u, inner_s = self._opt.update(acc_tree, state.inner_opt_state, params, **extra_args)
        zeros = fpt.zeros_like(updates)
        out = _select_tree(emit, inner_u, zeros)
        new_state = MultiStepsState(
            mini_step=torch.where(emit, torch.zeros_like(state.mini_step), state.mini_step + 1),
            gradient_step=state.gradient_step + emit.to(state.gradient_step.dtype),
            inner_opt_state=_select_tree(emit, inner_s, state.inner_opt_state),
            acc_grads=_select_tree(emit, fpt.zeros_like(stored), stored),
            skip_state=state.skip_state,
        )
        if self._skip is not None:
            skip, skip_state = self._skip(updates, state.gradient_step, params)
            skip = torch.as_tensor(skip, device=state.mini_step.device)
            kept = state._replace(skip_state=skip_state)
            new_state = _select_tree(skip, kept, new_state._replace(skip_state=skip_state))
            out = _select_tree(skip, zeros, out)
        return out, new_state

    def has_updated(self, state: MultiStepsState) -> torch.Tensor:
        """Whether the last call applied the inner optimizer (a bool tensor).

        Args:
            state: a state returned by :meth:`update`.

        Returns:
            A 0-d bool tensor (no host sync).
        """
        return (state.mini_step == 0) & (state.gradient_step > 0)

    def gradient_transformation(self) -> GradientTransformation:
        """This wrapper as a plain :class:`GradientTransformation`.

        Returns:
            ``GradientTransformation(self.init, self.update)``.
        """
        return GradientTransformation(self.init, self.update)


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    Attributes:
        notfinite_count: consecutive updates with a non-finite value.
        last_finite: whether the last update was finite (0-d bool tensor).
        total_notfinite: all non-finite updates seen so far.
        inner_state: the wrapped transformation's state.
    """

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: Any


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Skip steps whose incoming updates contain NaN or inf, and count them.

    A skipped step returns zero updates and keeps the inner state. After more than
    ``max_consecutive_errors`` bad steps in a row, updates are applied anyway.

    Args:
      inner: the transformation to protect.
      max_consecutive_errors: apply anyway after this many bad steps in a row.

    Returns:
      A :class:`GradientTransformation`.

    >>> from functorch_pipeline import optim
    >>> tx = apply_if_finite(optim.sgd(1.0), max_consecutive_errors=3)
    >>> s = tx.init({"w": torch.zeros(1)})
    >>> u, s = tx.update({"w": torch.tensor([float("nan")])}, s)
    >>> u, s.total_notfinite
    ({'w': tensor([0.])}, tensor(1, dtype=torch.int32))
    """
    inner = drop_extra_args(inner)  # optax's with_extra_args_support

    def init_fn(params: Params) -> ApplyIfFiniteState:
        z = zero_count(params)
        return ApplyIfFiniteState(z, torch.ones((), dtype=torch.bool, device=z.device), z, inner.init(params))

    def update_fn(updates: Updates, state: ApplyIfFiniteState, params: Params = None, **extra_args: Any):
        where = "apply_if_finite.update"
        _checks.check_state(where, state, ApplyIfFiniteState, "apply_if_finite.init")
        ul = fpt.leaves(updates)
        _checks.check_one_device(where, ul, updates)
        for name in ("notfinite_count", "total_notfinite"):
            _checks.check_count(where, f"state.{name}", getattr(state, name), ul)
        lf = state.last_finite
        if not (isinstance(lf, torch.Tensor) and lf.dtype == torch.bool and lf.dim() == 0):
            raise TypeError(f"{where}: `state.last_finite` must be a 0-d bool tensor, got {lf!r}")
        if lf.device != state.notfinite_count.device:
            raise ValueError(f"{where}: `state.last_finite` is on {lf.device}, the counts on "
                             f"{state.notfinite_count.device}")
        isfinite = torch.stack([torch.isfinite(u).all() for u in ul]).all() if ul else state.last_finite
        inner_u, inner_s = inner.update(updates, state.inner_state, params, **_pure(extra_args))
        bad = torch.where(isfinite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        total = state.total_notfinite + (~isfinite).to(state.total_notfinite.dtype)
        apply = isfinite | (bad > max_consecutive_errors)
        out = _select_tree(apply, inner_u, fpt.zeros_like(updates))
        new_inner = _select_tree(apply, inner_s, state.inner_state)
        return out, ApplyIfFiniteState(bad, isfinite, total, new_inner)

    return GradientTransformation(init_fn, update_fn)


class InjectHyperparamsState(NamedTuple):
    """State of :func:`inject_hyperparams`: count, current hyperparameters, inner state.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        hyperparams: a dict of the current hyperparameter values (tensors).
        inner_state: the wrapped optimizer's state.
    """

    count: torch.Tensor
    hyperparams: dict
    inner_state: Any


def inject_hyperparams(
    inner_factory: Callable[..., GradientTransformation],
    static_args: str | tuple[str, ...] = (),
    hyperparam_dtype: torch.dtype | None = None,
) -> Callable[..., GradientTransformation]:
    """Make an optimizer's numeric hyperparameters part of its state.

    ``inject_hyperparams(optim.adam)(learning_rate=1e-3)`` behaves like
    ``optim.adam(1e-3)``, but ``state.hyperparams["learning_rate"]`` holds the current
    value (a 0-d tensor: log it, or assign a new value between steps). Arguments given
    as schedules (callables) are evaluated at the step count each step. Non-numeric
    arguments and those named in ``static_args`` stay Python values.

    Args:
      inner_factory: a function returning a GradientTransformation (e.g. ``optim.adam``).
      static_args: names of arguments that must not become tensors.
      hyperparam_dtype: dtype of the injected values. Default: float64 (float32 on MPS,
        which has no float64), so ``learning_rate=0.1`` is stored as the double 0.1 that
        ``torch.optim`` uses, not float32's 0.10000000149. A 0-d float64 value does not
        promote float32 parameters (type promotion skips 0-d tensors), and the values are
        differentiable: assign a tensor that requires grad (or pass one) and differentiate
        the loss after the update with respect to it (hypergradients; NOTE
        [differentiable optimizers] in ``_mt.py``).

    Returns:
      A function with ``inner_factory``'s signature returning a :class:`GradientTransformation`
      whose state is an :class:`InjectHyperparamsState`.

    >>> from functorch_pipeline import optim
    >>> opt = inject_hyperparams(optim.sgd)(learning_rate=0.1)
    >>> s = opt.init({"w": torch.zeros(1)})
    >>> s.hyperparams["learning_rate"] = torch.tensor(0.5)
    >>> opt.update({"w": torch.ones(1)}, s)[0]
    {'w': tensor([-0.5000])}

    Notes:
      NOTE [differentiable optimizers]: every update is differentiable (``torch.func.grad``,
        ``vmap``, ``jvp``, ``create_graph=True``); fused, foreach and in-place fast paths are
        switched off whenever something is differentiated.
    """
    static = (static_args,) if isinstance(static_args, str) else tuple(static_args)
    sig = inspect.signature(inner_factory)

    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        other: dict[str, Any] = {}
        numeric: dict[str, Any] = {}
        schedules: dict[str, Callable[..., Any]] = {}
        for name, value in bound.arguments.items():
            if name in static:
                other[name] = value
            elif callable(value):
                schedules[name] = value
            elif (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
                isinstance(value, torch.Tensor) and value.dim() == 0
            ):
                numeric[name] = value
            else:
                other[name] = value
        # The factory's own checks of the numbers given (NaN, ranges), named as the plain
        # factory names them: a NaN injected learning rate was accepted.
        plain = {k: v for k, v in numeric.items() if not isinstance(v, torch.Tensor)}
        if plain:
            first = {k: f(torch.zeros((), dtype=torch.int32)) for k, f in schedules.items()}
            inner_factory(**other, **first, **numeric)

        def dtype_for(count: torch.Tensor) -> torch.dtype:
            return hyperparam_dtype or _mt.hyper_dtype(count.device)

        def as_t(v: Any, like: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
            if isinstance(v, torch.Tensor):
                return v.to(device=like.device, dtype=dt)
            return torch.tensor(v, device=like.device, dtype=dt)  # no float32 round trip

        def init_fn(params: Params) -> InjectHyperparamsState:
            count = zero_count(params)
            dt = dtype_for(count)
            hps = {k: as_t(v, count, dt) for k, v in numeric.items()}
            hps.update({k: as_t(f(count), count, dt) for k, f in schedules.items()})
            inner = inner_factory(**other, **hps)
            return InjectHyperparamsState(count, hps, inner.init(params))

        def update_fn(updates: Updates, state: InjectHyperparamsState, params: Params = None, **extra_args: Any):
            where = "inject_hyperparams.update"
            _checks.check_state(where, state, InjectHyperparamsState,
                                "inject_hyperparams(...).init")
            dev = _checks.first_device(updates)
            _checks.check_scalar(where, "state.count", state.count, dev, torch.int32)
            for k, v in state.hyperparams.items():
                # NOTE [injected values]: assigned values are cast to the hyperparameter
                # dtype and a CPU value is moved to the state's device (both
                # differentiable); any other shape or device is an error.
                name = f"state.hyperparams[{k!r}]"
                _checks.check_hyperparameter(where, name, v)
                here = (state.count.device, torch.device("cpu"))
                if isinstance(v, torch.Tensor) and v.device not in here:
                    raise ValueError(
                        f"{where}: `{name}` is on device {v.device}, the state on "
                        f"{state.count.device}"
                    )
            dt = dtype_for(state.count)
            hps = {k: as_t(v, state.count, dt) for k, v in state.hyperparams.items()}
            hps.update({k: as_t(f(state.count), state.count, dt) for k, f in schedules.items()})
            # stored in float64; used in the leaves' compute dtype (NOTE [scalar dtype])
            leaves = [x for x in fpt.leaves(updates) if isinstance(x, torch.Tensor)]
            inner = drop_extra_args(
                inner_factory(**other, **{k: _mt.like(v, leaves) for k, v in hps.items()}))
            new_u, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
            return new_u, InjectHyperparamsState(state.count + 1, hps, new_inner)

        return GradientTransformation(init_fn, update_fn)

    return wrapped


class EmaState(NamedTuple):
    """State of :func:`ema`: count and the (not debiased) moving average."""

    count: torch.Tensor
    ema: Any


def ema(decay: float, debias: bool = True, accumulator_dtype: torch.dtype | None = None) -> GradientTransformation:
    r"""Replace updates by their exponential moving average :math:`e \leftarrow d\,e + (1-d)u`,
    divided by :math:`1 - d^t` when ``debias``.

    Args:
      decay: the averaging coefficient.
      debias: divide by ``1 - decay**t``.
      accumulator_dtype: dtype of the average.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = ema(0.5)
    >>> s = tx.init([torch.zeros(1)])
    >>> u, s = tx.update([torch.tensor([2.0])], s); u
    [tensor([2.])]
    """

    def init_fn(params: Params) -> EmaState:
        return EmaState(zero_count(params), fpt.map(lambda p: torch.zeros_like(p, dtype=accumulator_dtype or p.dtype), params))

    def update_fn(updates: Updates, state: EmaState, params: Params = None, **extra_args: Any):
        where = "ema.update"
        _checks.check_state(where, state, EmaState, "ema.init")
        ul, td = fpt.flatten(updates)
        _checks.check_count(where, "state.count", state.count, ul)
        el = flatten_like(where, updates, state.ema, "state.ema", td, ref=ul,
                          dtype=accumulator_dtype or SAME)
        fe = _mt.foreach_ok(ul, el, _mt.tensors(decay))
        inplace = _mt.inplace_ok(extra_args, ul, el, fe=fe)
        new_e = _mt.lerp(el, ul, 1 - decay, fe, inplace=inplace and accumulator_dtype is None)
        count = state.count + 1
        out = new_e
        if debias and ul:
            out = _mt.mul(new_e, 1 / (1 - decay ** count.to(_mt.scalar_dtype(ul))), fe)
        elif extra_args.get("inplace"):
            # NOTE [update never aliases state] in ``_transforms.py``: later transforms may
            # write into the update in place, even when this call took the pure path
            out = [e.clone() for e in new_e]
        new_e = _mt.cast(new_e, accumulator_dtype)
        return fpt.unflatten(td, out), EmaState(count, fpt.unflatten(td, new_e))

    return GradientTransformation(init_fn, update_fn)
