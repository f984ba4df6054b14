"""More transforms and wrappers with optax's names: lookahead, skip_not_finite,
zero_nans, add_noise, apply_every, centralize, adaptive_grad_clip.

Like ``_wrappers.py``, nothing branches on tensor values (``torch.where`` instead of
``lax.cond``), so all of them run under ``vmap`` and ``torch.compile`` and stay
differentiable.
"""

from __future__ import annotations

import numbers
from typing import Any
from typing import NamedTuple

import torch

from functorch_pipeline import random as fpr
from functorch_pipeline import tree as fpt
from functorch_pipeline.optim import _checks
from functorch_pipeline.optim import _mt
from functorch_pipeline.optim._base import EmptyState
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import Params
from functorch_pipeline.optim._base import Updates
from functorch_pipeline.optim._base import drop_extra_args
from functorch_pipeline.optim._base import flatten_like
from functorch_pipeline.optim._base import mismatch_error
from functorch_pipeline.optim._base import require_params
from functorch_pipeline.optim._base import zero_count
from functorch_pipeline.optim._transforms import check_number

__all__ = [
    "AddNoiseState",
    "ApplyEvery",
    "LookaheadParams",
    "LookaheadState",
    "ZeroNansState",
    "adaptive_grad_clip",
    "add_noise",
    "apply_every",
    "centralize",
    "lookahead",
    "skip_large_updates",
    "skip_not_finite",
    "zero_nans",
]


def _pure(extra_args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra_args.items() if k != "inplace"}


class LookaheadParams(NamedTuple):
    """The parameters :func:`lookahead` works on: the fast and the slow copy."""

    fast: Any
    slow: Any

    @classmethod
    def init_synced(cls, params: Params) -> LookaheadParams:
        """Both copies equal to ``params`` (the usual start).

        Args:
          params: the model parameters.

        Returns:
          ``LookaheadParams(params, params)``.

        Example:
          >>> LookaheadParams.init_synced({"w": torch.ones(1)}).slow
          {'w': tensor([1.])}
        """
        return cls(fast=params, slow=params)


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`: the fast optimizer's state and the steps since a sync.

    Attributes:
        fast_state: the fast optimizer's state.
        steps_since_sync: fast steps since the slow weights were last synchronised.
    """

    fast_state: Any
    steps_since_sync: torch.Tensor


def lookahead(
    fast_optimizer: GradientTransformation,
    sync_period: int,
    slow_step_size: float,
    reset_state: bool = False,
) -> GradientTransformation:
    r"""Lookahead (Zhang et al., 2019): a slow copy of the weights follows the fast one.

    The fast weights take ``fast_optimizer`` steps; every ``sync_period`` steps the slow
    weights move :math:`\phi \leftarrow \phi + \alpha(\theta - \phi)` (``alpha`` =
    ``slow_step_size``) and the fast weights are reset to them. ``params`` is a
    :class:`LookaheadParams`: start from ``LookaheadParams.init_synced(params)``;
    evaluate with ``params.slow``. ``update`` takes the gradients with respect to
    ``params.fast`` as a plain tree, as optax 0.2.8 does
    (``grads = grad(loss)(params.fast); tx.update(grads, state, params)``); a
    ``LookaheadParams`` whose ``fast`` holds them is accepted too (its ``slow`` is
    ignored). The returned updates are a :class:`LookaheadParams` for
    :func:`apply_updates`.

    Args:
      fast_optimizer: the inner optimizer of the fast weights.
      sync_period: steps between two synchronisations (>= 1).
      slow_step_size: :math:`\alpha` in [0, 1].
      reset_state: reset the fast optimizer's state at every synchronisation.

    Returns:
      A :class:`GradientTransformation` whose state is a :class:`LookaheadState`.

    Example:
      >>> from functorch_pipeline import optim
      >>> tx = lookahead(optim.sgd(1.0), sync_period=2, slow_step_size=0.5)
      >>> p = LookaheadParams.init_synced({"w": torch.zeros(1)})
      >>> s = tx.init(p)
      >>> for _ in range(2):
      ...     u, s = tx.update({"w": torch.ones(1)}, s, p)  # gradients w.r.t. p.fast
      ...     p = optim.apply_updates(p, u)
      >>> p.slow, p.fast
      ({'w': tensor([-1.])}, {'w': tensor([-1.])})
    """
    if isinstance(sync_period, bool) or not isinstance(sync_period, numbers.Integral) \
            or sync_period < 1:
        raise ValueError(f"lookahead(sync_period): must be an int >= 1, got {sync_period!r}")
    check_number("lookahead(slow_step_size)", "slow_step_size", slow_step_size, low=0.0,
                 high=1.0)
    fast_optimizer = drop_extra_args(fast_optimizer)  # optax's with_extra_args_support
    where = "lookahead.update"

    def _check(x: Any, name: str) -> None:
        if not isinstance(x, LookaheadParams):
            raise TypeError(
                f"{where}: `{name}` must be a LookaheadParams(fast, slow), got a "
                f"{type(x).__name__}; start from LookaheadParams.init_synced(params)"
            )

    def init_fn(params: LookaheadParams) -> LookaheadState:
        _check(params, "params")
        return LookaheadState(fast_optimizer.init(params.fast), zero_count(params.fast))

    def update_fn(updates: Any, state: LookaheadState,
                  params: LookaheadParams | None = None,
                  **extra_args: Any) -> tuple[LookaheadParams, LookaheadState]:
        _check(params, "params")
        # optax 0.2.8: plain gradients of the fast params; the wrapped form: their .fast
        grads = updates.fast if isinstance(updates, LookaheadParams) else updates
        _checks.check_state(where, state, LookaheadState, "lookahead.init")
        fl, td = fpt.flatten(params.fast)
        _checks.check_count(where, "state.steps_since_sync", state.steps_since_sync, fl)
        fast_u, fast_state = fast_optimizer.update(grads, state.fast_state, params.fast,
                                                   **_pure(extra_args))
        ul = flatten_like(where, params.fast, fast_u, "updates.fast (after fast_optimizer)",
                          td, ref=fl, dtype=None)
        sl = flatten_like(where, params.fast, params.slow, "params.slow", td, ref=fl)
        sync = state.steps_since_sync == sync_period - 1
        slow_u, new_fast_u = [], []
        for f, u, s in zip(fl, ul, sl, strict=True):
            su = torch.where(sync, slow_step_size * (f + u - s), torch.zeros_like(s))
            slow_u.append(su)
            new_fast_u.append(torch.where(sync, s + su - f, u))
        if reset_state:
            fresh = fast_optimizer.init(params.fast)
            fast_state = fpt.map(
                lambda a, b: torch.where(sync, a, b) if isinstance(a, torch.Tensor) else b,
                fresh, fast_state)
        steps = torch.remainder(state.steps_since_sync + 1, sync_period)
        out = LookaheadParams(fpt.unflatten(td, new_fast_u), fpt.unflatten(td, slow_u))
        return out, LookaheadState(fast_state, steps)

    return GradientTransformation(init_fn, update_fn)


def skip_not_finite(updates: Updates, gradient_step: torch.Tensor,
                    params: Params = None) -> tuple[torch.Tensor, dict]:
    """A ``should_skip_update_fn`` for :class:`MultiSteps`: skip when any update element
    is NaN or infinite.

    Args:
      updates: the incoming gradients.
      gradient_step: the number of applied steps (unused, part of the protocol).
      params: the parameters (unused).

    Returns:
      ``(should_skip, {"should_skip": ..., "num_not_finite": ...})``: a 0-d bool tensor
      and the count of non-finite elements (int32), as optax.

    Example:
      >>> skip, info = skip_not_finite({"w": torch.tensor([1.0, float("inf")])}, 0)
      >>> bool(skip), int(info["num_not_finite"])
      (True, 1)
    """
    ul = fpt.leaves(updates)
    dev = _checks.first_device(ul) or torch.device("cpu")
    n = torch.zeros((), dtype=torch.int32, device=dev)
    for u in ul:
        n = n + (~torch.isfinite(u)).sum().to(torch.int32)
    skip = n > 0
    return skip, {"should_skip": skip, "num_not_finite": n}


def skip_large_updates(updates: Updates, gradient_step: torch.Tensor, params: Params,
                       max_squared_norm: float) -> tuple[torch.Tensor, dict]:
    r"""A ``should_skip_update_fn`` for :class:`MultiSteps` (bind ``max_squared_norm``
    with ``functools.partial``): skip when :math:`\sum_\ell \|u_\ell\|^2` exceeds
    ``max_squared_norm`` or is not finite.

    Args:
      updates: the incoming gradients.
      gradient_step: the number of applied steps (unused).
      params: the parameters (unused).
      max_squared_norm: the largest squared global norm let through.

    Returns:
      ``(should_skip, {"should_skip": ..., "norm_squared": ...})``, as optax.

    Example:
      >>> skip, info = skip_large_updates({"w": torch.tensor([3.0, 4.0])}, 0, None, 20.0)
      >>> bool(skip), float(info["norm_squared"])
      (True, 25.0)
    """
    ul = fpt.leaves(updates)
    _checks.check_one_device("skip_large_updates", ul, updates)
    dev = _checks.first_device(ul) or torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64 if any(u.dtype == torch.float64 for u in ul)
                     else torch.float32, device=dev)
    for u in ul:
        sq = sq + torch.sum(u.to(sq.dtype) ** 2)
    skip = ~torch.isfinite(sq) | (sq > max_squared_norm)
    return skip, {"should_skip": skip, "norm_squared": sq}


class ZeroNansState(NamedTuple):
    """State of :func:`zero_nans`: per leaf, whether the last update had a NaN.

    Attributes:
        found_nan: a tree of 0-d bool tensors: whether each leaf of the last update had a NaN.
    """

    found_nan: Any


def zero_nans() -> GradientTransformation:
    r"""Replace NaN update elements by 0 and record, per leaf, whether there were any.

    :math:`u = \mathrm{where}(\mathrm{isnan}(g), 0, g)`; infinities pass unchanged.

    Returns:
      A :class:`GradientTransformation` whose state is a :class:`ZeroNansState` (a tree of
      0-d bool tensors).

    Example:
      >>> tx = zero_nans()
      >>> g = {"w": torch.tensor([float("nan"), 2.0])}
      >>> u, s = tx.update(g, tx.init(g))
      >>> u, s.found_nan
      ({'w': tensor([0., 2.])}, {'w': tensor(True)})
    """

    def init_fn(params: Params) -> ZeroNansState:
        return ZeroNansState(fpt.map(
            lambda p: torch.zeros((), dtype=torch.bool, device=p.device), params))

    def update_fn(updates: Updates, state: ZeroNansState, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, ZeroNansState]:
        where = "zero_nans.update"
        _checks.check_state(where, state, ZeroNansState, "zero_nans.init")
        ul, td = fpt.flatten(updates)
        try:
            fl = td.flatten_up_to(state.found_nan)
        except (ValueError, TypeError):
            raise mismatch_error(where, "updates", updates, "state.found_nan",
                                 state.found_nan) from None
        for i, (f, u) in enumerate(zip(fl, ul, strict=True)):
            if not (isinstance(f, torch.Tensor) and f.dim() == 0 and f.dtype == torch.bool
                    and f.device == u.device):
                got = (f"shape {tuple(f.shape)}, {f.dtype} on {f.device}"
                       if isinstance(f, torch.Tensor) else f"a {type(f).__name__}")
                raise (ValueError if isinstance(f, torch.Tensor) else TypeError)(
                    f"{where}: leaf at path `{_checks._path(updates, i)}` of `state.found_nan` "
                    f"must be a 0-d bool tensor on {u.device}, got {got}"
                )
        out = [torch.where(torch.isnan(u), torch.zeros_like(u), u) for u in ul]
        found = [torch.isnan(u).any() for u in ul]
        return fpt.unflatten(td, out), ZeroNansState(fpt.unflatten(td, found))

    return GradientTransformation(init_fn, update_fn)


class AddNoiseState(NamedTuple):
    """State of :func:`add_noise`: the step count and the base ``fp.random`` key.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        rng_key: the base ``fp.random`` key; step ``count``'s noise uses it folded with ``count``.
    """

    count: torch.Tensor
    rng_key: torch.Tensor


def add_noise(
    eta: float, gamma: float, key: int | torch.Tensor | None = None, *, seed: int | None = None
) -> GradientTransformation:
    r"""Add annealed Gaussian noise (Neelakantan et al., 2015):
    :math:`u = g + \sigma_t z`, :math:`z \sim N(0, I)`, :math:`\sigma_t^2 = \eta/t^\gamma`
    with :math:`t` the step from 1.

    The noise of step :math:`t` comes from ``split(fold_in(key, t - 1), num_leaves)``, so a
    restored state continues the same stream. optax 0.2.8 names the last argument
    ``key`` (older versions: ``seed``, still accepted as a keyword); an int is turned into
    ``fp.random.key(int)``.

    Args:
      eta: the base variance :math:`\eta`.
      gamma: the annealing exponent :math:`\gamma`.
      key: an ``fp.random`` key or an int seed.
      seed: the older spelling of ``key`` (pass one of the two).

    Returns:
      A :class:`GradientTransformation` whose state is an :class:`AddNoiseState`.

    Example:
      >>> tx = add_noise(0.01, 0.55, key=0)
      >>> g = {"w": torch.zeros(1000)}
      >>> u, s = tx.update(g, tx.init(g))
      >>> abs(float(u["w"].std()) - 0.1) < 0.01
      True
    """
    check_number("add_noise(eta)", "eta", eta, low=0.0)
    check_number("add_noise(gamma)", "gamma", gamma, low=0.0)
    if (key is None) == (seed is None):
        raise TypeError("add_noise(key): pass exactly one of `key` (optax 0.2.8) and `seed`")
    key = key if key is not None else seed
    if isinstance(key, bool):
        raise TypeError("add_noise(key): `key` must be an int or an fp.random key, got a bool")
    if isinstance(key, numbers.Integral):
        base = fpr.key(int(key))
    elif isinstance(key, torch.Tensor) and fpr.is_key(key) and key.dim() == 1:
        base = key
    else:
        raise TypeError(
            f"add_noise(key): `key` must be an int or one fp.random key, got {key!r:.60}")

    def init_fn(params: Params) -> AddNoiseState:
        count = zero_count(params)
        return AddNoiseState(count, base.to(count.device))

    def update_fn(updates: Updates, state: AddNoiseState, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, AddNoiseState]:
        where = "add_noise.update"
        _checks.check_state(where, state, AddNoiseState, "add_noise.init")
        ul, td = fpt.flatten(updates)
        _checks.check_float(where, ul, updates)
        _checks.check_one_device(where, ul, updates)  # the noise is drawn on one device
        _checks.check_count(where, "state.count", state.count, ul)
        k = state.rng_key
        if not (isinstance(k, torch.Tensor) and fpr.is_key(k) and k.dim() == 1
                and k.device == state.count.device):
            raise TypeError(f"{where}: `state.rng_key` must be one fp.random key on "
                            f"{state.count.device}, got {k!r:.80}")
        if not ul:
            return updates, AddNoiseState(state.count + 1, state.rng_key)
        count = state.count + 1
        keys = fpr.split(fpr.fold_in(state.rng_key, state.count), len(ul))
        out = []
        for u, k in zip(ul, keys, strict=True):
            std = torch.sqrt(_mt.leaf_scalar(eta, u) / count.to(u.dtype) ** _mt.leaf_scalar(
                gamma, u))  # NOTE [scalar dtype]
            out.append(_mt.to_leaf(u + std * fpr.normal(k, tuple(u.shape), u.dtype), u))
        return fpt.unflatten(td, out), AddNoiseState(count, state.rng_key)

    return GradientTransformation(init_fn, update_fn)


class ApplyEvery(NamedTuple):
    """State of :func:`apply_every`: a counter (mod ``k``) and the gradient sum.

    Attributes:
        count: the step counter modulo ``k``.
        grad_acc: the sum of the gradients since the last applied update.
    """

    count: torch.Tensor
    grad_acc: Any


def apply_every(k: int = 1) -> GradientTransformation:
    r"""Sum the updates of ``k`` steps and emit the sum on every ``k``-th step (zeros
    otherwise). Transforms earlier in a chain still step every call: use
    :class:`MultiSteps` to accumulate before the optimizer instead.

    :math:`a \leftarrow [c \ne 0]\,a + g`, :math:`u = [c = k-1]\,a` with :math:`c` the
    count mod ``k``.

    Args:
      k: emit every ``k`` steps.

    Returns:
      A :class:`GradientTransformation` whose state is an :class:`ApplyEvery`.

    Example:
      >>> tx = apply_every(2)
      >>> s = tx.init({"w": torch.zeros(1)})
      >>> u, s = tx.update({"w": torch.ones(1)}, s); u
      {'w': tensor([0.])}
      >>> u, s = tx.update({"w": torch.full((1,), 2.0)}, s); u
      {'w': tensor([3.])}
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"apply_every(k): must be an int >= 1, got {k!r}")

    def init_fn(params: Params) -> ApplyEvery:
        return ApplyEvery(zero_count(params), fpt.map(torch.zeros_like, params))

    def update_fn(updates: Updates, state: ApplyEvery, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, ApplyEvery]:
        where = "apply_every.update"
        _checks.check_state(where, state, ApplyEvery, "apply_every.init")
        ul, td = fpt.flatten(updates)
        _checks.check_count(where, "state.count", state.count, ul)
        al = flatten_like(where, updates, state.grad_acc, "state.grad_acc", td, ref=ul)
        c = torch.remainder(state.count, k)
        keep, emit = c != 0, c == k - 1
        acc = [torch.where(keep, a, torch.zeros_like(a)) + g for g, a in zip(ul, al, strict=True)]
        out = [torch.where(emit, a, torch.zeros_like(a)) for a in acc]
        new = ApplyEvery(torch.remainder(state.count + 1, k), fpt.unflatten(td, acc))
        return fpt.unflatten(td, out), new

    return GradientTransformation(init_fn, update_fn)


def centralize() -> GradientTransformation:
    r"""Gradient centralization (Yong et al., 2020): subtract from every leaf with two or
    more axes its mean over all axes but the first,
    :math:`u = g - \mathrm{mean}_{1..}(g)`; vectors and scalars pass unchanged.

    Axis 0 is the output axis both in optax's layouts and in torch's ``nn.Linear``
    (``(out, in)``) and ``nn.Conv*`` (``(out, in, *k)``) weights, so the rule is the same.

    Returns:
      A :class:`GradientTransformation` (stateless).

    Example:
      >>> tx = centralize()
      >>> tx.update({"w": torch.tensor([[1.0, 3.0], [0.0, 4.0]])}, tx.init(None))[0]
      {'w': tensor([[-1.,  1.],
              [-2.,  2.]])}
    """

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, Any]:
        ul, td = fpt.flatten(updates)
        _checks.check_float("centralize.update", ul, updates)
        out = [g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True) if g.dim() > 1 else g
               for g in ul]
        return fpt.unflatten(td, out), state

    return GradientTransformation(init_fn, update_fn)


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per unit (NOTE [unitwise layout]): the whole leaf's norm (0-d) when it has
    at most one axis of size other than 1 (scalars, vectors, ``(n, 1)``, ``(1, n)``, as
    optax's ``unitwise_norm`` squeezes), else one norm per output row, over axes 1.."""
    if sum(n != 1 for n in x.shape) <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


def adaptive_grad_clip(clipping: float, eps: float = 1e-3) -> GradientTransformation:
    r"""Adaptive gradient clipping (Brock et al., 2021, NFNets), unit by unit:

    .. math::
        g_i \leftarrow \begin{cases} g_i & \|g_i\| < \lambda \max(\|p_i\|, \epsilon) \\
        \lambda \max(\|p_i\|, \epsilon)\, g_i / \max(\|g_i\|, 10^{-6}) & \text{otherwise}
        \end{cases}

    # NOTE [unitwise layout]: a leaf with at most one axis of size other than 1 (a scalar,
    # a bias vector, an ``(n, 1)`` or ``(1, n)`` matrix) is one unit: it is clipped by the
    # norm of the whole leaf, as optax 0.2.8's ``unitwise_norm`` (which squeezes first),
    # timm and the NFNets code do. Otherwise a "unit" is one output row: norms are taken
    # over every axis but the first, which is torch's layout (``nn.Linear`` is
    # ``(out, in)``, ``nn.Conv2d`` ``(out, in, kh, kw)``; timm's NFNet code does the
    # same). optax reduces over every axis but the *last* for ranks 2, 4 and 5, JAX's
    # ``(in, out)`` / ``(h, w, in, out)`` layouts, so an optax leaf ``w`` matches fp's
    # ``w.T`` (ranks 4 and 5: the axes reversed). Two deliberate differences: a rank-3
    # leaf is reduced over axes 1 and 2 here (``nn.Conv1d``'s ``(out, in, k)``), where
    # optax reduces axis 0 only (it assumes a multi-head ``(in, heads, out)`` kernel); and
    # ranks above 5, which optax rejects, are reduced over axes 1.. too.

    Args:
      clipping: :math:`\lambda`, the largest ratio of gradient to parameter norm.
      eps: :math:`\epsilon`, the floor of the parameter norm.

    Returns:
      A :class:`GradientTransformation` (stateless; needs ``params``).

    Example:
      >>> tx = adaptive_grad_clip(0.1)
      >>> p = {"w": torch.tensor([[3.0, 4.0], [0.0, 10.0]])}
      >>> tx.update({"w": torch.tensor([[6.0, 8.0], [0.0, 0.5]])}, tx.init(p), p)[0]
      {'w': tensor([[0.3000, 0.4000],
              [0.0000, 0.5000]])}
    """
    check_number("adaptive_grad_clip(clipping)", "clipping", clipping, low=0.0)
    check_number("adaptive_grad_clip(eps)", "eps", eps, low=0.0)

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, Any]:
        where = "adaptive_grad_clip.update"
        require_params(where, params)
        ul, td = fpt.flatten(updates)
        _checks.check_float(where, ul, updates)
        pl = flatten_like(where, updates, params, "params", td, ref=ul)
        out = []
        for g, p in zip(ul, pl, strict=True):
            clip_, eps_ = _mt.for_leaf(g, clipping, eps)  # NOTE [scalar dtype]
            max_norm = clip_ * torch.clamp(_unitwise_norm(p), min=eps_)
            gn = _unitwise_norm(g)
            clipped = g * (max_norm / torch.clamp(gn, min=1e-6))
            out.append(_mt.to_leaf(torch.where(gn < max_norm, g, clipped), g))
        return fpt.unflatten(td, out), state

    return GradientTransformation(init_fn, update_fn)
