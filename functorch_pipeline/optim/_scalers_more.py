"""More adaptive scalers, with optax's names and rules: AMSGrad, AdaBelief, Yogi,
NovoGrad, Rprop and the sign.

They run leaf by leaf (plain torch ops, no fused/foreach kernels), so they are
differentiable, run under ``vmap`` and ``torch.compile``, and have nothing to switch off
(NOTE [differentiable optimizers] in ``_mt.py``). Every state tree is checked against the
updates before use (NOTE [leaf checks] in ``_checks.py``); ``inplace=True`` is accepted
and ignored (the pure path gives the same numbers by construction).
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

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
from functorch_pipeline.optim._base import zero_count
from functorch_pipeline.optim._checks import SAME
from functorch_pipeline.optim._transforms import check_number

__all__ = [
    "ScaleByAmsgradState",
    "ScaleByBeliefState",
    "ScaleByNovogradState",
    "ScaleByOptimisticGradientState",
    "ScaleByRpropState",
    "ScaleByYogiState",
    "scale_by_amsgrad",
    "scale_by_belief",
    "scale_by_novograd",
    "scale_by_optimistic_gradient",
    "scale_by_rprop",
    "scale_by_sign",
    "scale_by_yogi",
]


def _betas(where: str, **betas: Any) -> None:
    for k, v in betas.items():
        _checks.check_hyperparameter(where, k, v)
        check_number(where, k, v, low=0.0, high=1.0, high_open=True)


def _start(where: str, updates: Updates, state: Any, cls: type, init: str,
           count: bool = True) -> tuple[list, Any, Any]:
    gl, td = fpt.flatten(updates)
    _checks.check_state(where, state, cls, init)
    if count:
        _checks.check_count(where, "state.count", state.count, gl)
    return gl, td, _checks.signature(gl)


def _bc(b: Any, count: torch.Tensor, gl: list) -> torch.Tensor:
    """``1 - b**count`` in the step-count precision (NOTE [scalar dtype])."""
    return 1 - b ** count.to(_mt.scalar_dtype(gl))


def _to(s: torch.Tensor | float, x: torch.Tensor) -> Any:
    """A 0-d scalar in a leaf's dtype (optax divides in the moment's precision)."""
    return s.to(x.dtype) if isinstance(s, torch.Tensor) else s


class ScaleByAmsgradState(NamedTuple):
    """State of :func:`scale_by_amsgrad`: count, moments and the running max of ``nu``.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        mu: the EMA of the gradients (first moment), a tree like the parameters.
        nu: the EMA of the squared gradients (second moment), a tree like the parameters.
        nu_max: the running maximum of ``nu``.
    """

    count: torch.Tensor
    mu: Any
    nu: Any
    nu_max: Any


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    debias_after_max: bool = False,
) -> GradientTransformation:
    r"""Rescale updates by AMSGrad: Adam with a running maximum of the second moment.

    optax's rule (the maximum is taken over the *bias-corrected* second moment):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        \hat v^{max}_t = \max(\hat v^{max}_{t-1}, v_t/(1-\beta_2^t)),\quad
        u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{\hat v^{max}_t + \epsilon_{root}} + \epsilon}

    ``torch.optim.Adam(amsgrad=True)`` takes the maximum of the *raw* :math:`v_t` and
    bias-corrects afterwards, :math:`u_t = \hat m_t / (\sqrt{v^{max}_t}/\sqrt{1-\beta_2^t}
    + \epsilon)`; ``debias_after_max=True`` (not in optax) gives that rule. The two
    differ whenever the maximum is held from an earlier step.

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added outside the square root.
      eps_root: added inside the square root (optax's rule only).
      mu_dtype: dtype of the first moment (default: the parameters').
      debias_after_max: (not in optax) torch's order: max of the raw moment, then debias.

    Returns:
      A :class:`GradientTransformation` whose state is a :class:`ScaleByAmsgradState`.

    Example:
      >>> tx = scale_by_amsgrad()
      >>> tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init({"w": torch.zeros(2)}))[0]
      {'w': tensor([ 1.0000, -1.0000])}
    """
    _betas("scale_by_amsgrad(b1, b2)", b1=b1, b2=b2)
    check_number("scale_by_amsgrad(eps)", "eps", eps, low=0.0)
    check_number("scale_by_amsgrad(eps_root)", "eps_root", eps_root, low=0.0)

    def init_fn(params: Params) -> ScaleByAmsgradState:
        z = fpt.map(torch.zeros_like, params)
        mu = fpt.map(lambda p: torch.zeros_like(p, dtype=mu_dtype or p.dtype), params)
        return ScaleByAmsgradState(zero_count(params), mu, z, fpt.map(torch.zeros_like, params))

    def update_fn(updates: Updates, state: ScaleByAmsgradState, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, ScaleByAmsgradState]:
        where = "scale_by_amsgrad.update"
        gl, td, gs = _start(where, updates, state, ScaleByAmsgradState, "scale_by_amsgrad.init")
        ml = flatten_like(where, updates, state.mu, "state.mu", td, ref=gl, ref_sig=gs,
                          dtype=mu_dtype or SAME)
        vl = flatten_like(where, updates, state.nu, "state.nu", td, ref=gl, ref_sig=gs)
        xl = flatten_like(where, updates, state.nu_max, "state.nu_max", td, ref=gl, ref_sig=gs)
        count = state.count + 1
        bc1, bc2 = _bc(b1, count, gl), _bc(b2, count, gl)
        out, nm, nv, nx = [], [], [], []
        for g, m, v, x in zip(gl, ml, vl, xl, strict=True):
            # injected hyperparameters per leaf (NOTE [scalar dtype])
            b1_, b2_, eps_, er_ = _mt.for_leaf(g, b1, b2, eps, eps_root)
            m = _mt.to_leaf(torch.lerp(m.to(g.dtype), g, 1 - b1_), g)
            v = _mt.to_leaf(b2_ * v + (1 - b2_) * g * g, g)
            if debias_after_max:
                x = torch.maximum(x, v)
                u = (m / _to(bc1, g)) / (torch.sqrt(x) / torch.sqrt(_to(bc2, g)) + eps_)
            else:
                x = torch.maximum(x, v / _to(bc2, g))
                u = (m / _to(bc1, g)) / (torch.sqrt(x + er_) + eps_)
            out.append(_mt.to_leaf(u, g))
            nm.append(m if mu_dtype is None else m.to(mu_dtype))
            nv.append(v)
            nx.append(_mt.to_leaf(x, g))
        un = fpt.unflatten
        return un(td, out), ScaleByAmsgradState(count, un(td, nm), un(td, nv), un(td, nx))

    return GradientTransformation(init_fn, update_fn)


class ScaleByBeliefState(NamedTuple):
    """State of :func:`scale_by_belief`: count, first moment, belief (``s``) moment.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        mu: the EMA of the gradients (first moment), a tree like the parameters.
        nu: the EMA of ``(g - mu) ** 2`` (the belief).
    """

    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_belief(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    r"""Rescale updates by AdaBelief (Zhuang et al., 2020), optax's rule.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon_{root},\quad
        u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{s_t/(1-\beta_2^t)} + \epsilon}

    (the prediction error uses the *updated* first moment :math:`m_t`, as optax 0.2.8 and
    Algorithm 2 of the paper do). With
    ``nesterov=True`` the first moment is replaced as in :func:`scale_by_adam`.

    Args:
      b1: decay of the first moment.
      b2: decay of the belief moment.
      eps: added outside the square root.
      eps_root: added to :math:`s_t` (kept in the state, as optax).
      nesterov: Nesterov form of the first moment.

    Returns:
      A :class:`GradientTransformation` whose state is a :class:`ScaleByBeliefState`.

    Example:
      >>> tx = scale_by_belief()
      >>> tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))[0]
      {'w': tensor([1.1111])}
    """
    _betas("scale_by_belief(b1, b2)", b1=b1, b2=b2)
    check_number("scale_by_belief(eps)", "eps", eps, low=0.0)
    check_number("scale_by_belief(eps_root)", "eps_root", eps_root, low=0.0)

    def init_fn(params: Params) -> ScaleByBeliefState:
        z = fpt.map(torch.zeros_like, params)
        return ScaleByBeliefState(zero_count(params), z, fpt.map(torch.zeros_like, params))

    def update_fn(updates: Updates, state: ScaleByBeliefState, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, ScaleByBeliefState]:
        where = "scale_by_belief.update"
        gl, td, gs = _start(where, updates, state, ScaleByBeliefState, "scale_by_belief.init")
        ml = flatten_like(where, updates, state.mu, "state.mu", td, ref=gl, ref_sig=gs)
        vl = flatten_like(where, updates, state.nu, "state.nu", td, ref=gl, ref_sig=gs)
        count = state.count + 1
        bc1, bc2 = _bc(b1, count, gl), _bc(b2, count, gl)
        bc1n = _bc(b1, count + 1, gl)
        out, nm, nv = [], [], []
        for g, m0, v in zip(gl, ml, vl, strict=True):
            # injected hyperparameters per leaf (NOTE [scalar dtype])
            b1_, b2_, eps_, er_ = _mt.for_leaf(g, b1, b2, eps, eps_root)
            m = _mt.to_leaf(torch.lerp(m0, g, 1 - b1_), g)
            e = g - m  # the updated first moment (optax, paper Alg. 2)
            v = _mt.to_leaf(b2_ * v + (1 - b2_) * e * e + er_, g)
            if nesterov:
                mh = b1_ * m / _to(bc1n, g) + (1 - b1_) * g / _to(bc1, g)
            else:
                mh = m / _to(bc1, g)
            out.append(_mt.to_leaf(mh / (torch.sqrt(v / _to(bc2, g)) + eps_), g))
            nm.append(m)
            nv.append(v)
        un = fpt.unflatten
        return un(td, out), ScaleByBeliefState(count, un(td, nm), un(td, nv))

    return GradientTransformation(init_fn, update_fn)


class ScaleByYogiState(NamedTuple):
    """State of :func:`scale_by_yogi`: count and both moments.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        mu: the EMA of the gradients (first moment), a tree like the parameters.
        nu: Yogi's additive second moment estimate.
    """

    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_yogi(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
    eps_root: float = 0.0,
    initial_accumulator_value: float = 1e-6,
) -> GradientTransformation:
    r"""Rescale updates by Yogi (Zaheer et al., 2018), optax's rule.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = v_{t-1} - (1-\beta_2)\,\mathrm{sign}(v_{t-1} - g_t^2)\, g_t^2,\quad
        u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

    Both moments start at ``initial_accumulator_value`` (optax's choice).

    Args:
      b1: decay of the first moment.
      b2: rate of the additive second-moment update.
      eps: added outside the square root.
      eps_root: added inside the square root.
      initial_accumulator_value: the start of both moments.

    Returns:
      A :class:`GradientTransformation` whose state is a ``ScaleByYogiState``.

    Example:
      >>> tx = scale_by_yogi(initial_accumulator_value=0.0, eps=0.0)
      >>> tx.update({"w": torch.tensor([-3.0])}, tx.init({"w": torch.zeros(1)}))[0]
      {'w': tensor([-1.])}
    """
    check_number("scale_by_yogi(initial_accumulator_value)", "initial_accumulator_value", initial_accumulator_value)
    _betas("scale_by_yogi(b1, b2)", b1=b1, b2=b2)
    check_number("scale_by_yogi(eps)", "eps", eps, low=0.0)
    check_number("scale_by_yogi(eps_root)", "eps_root", eps_root, low=0.0)

    def init_fn(params: Params) -> ScaleByYogiState:
        def full(p: torch.Tensor) -> torch.Tensor:
            return torch.full_like(p, initial_accumulator_value)

        return ScaleByYogiState(zero_count(params), fpt.map(full, params), fpt.map(full, params))

    def update_fn(updates: Updates, state: ScaleByYogiState, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, ScaleByYogiState]:
        where = "scale_by_yogi.update"
        gl, td, gs = _start(where, updates, state, ScaleByYogiState, "scale_by_yogi.init")
        ml = flatten_like(where, updates, state.mu, "state.mu", td, ref=gl, ref_sig=gs)
        vl = flatten_like(where, updates, state.nu, "state.nu", td, ref=gl, ref_sig=gs)
        count = state.count + 1
        bc1, bc2 = _bc(b1, count, gl), _bc(b2, count, gl)
        out, nm, nv = [], [], []
        for g, m, v in zip(gl, ml, vl, strict=True):
            # injected hyperparameters per leaf (NOTE [scalar dtype])
            b1_, b2_, eps_, er_ = _mt.for_leaf(g, b1, b2, eps, eps_root)
            m = _mt.to_leaf(torch.lerp(m, g, 1 - b1_), g)
            g2 = g * g
            v = _mt.to_leaf(v - (1 - b2_) * torch.sign(v - g2) * g2, g)
            out.append(_mt.to_leaf(
                (m / _to(bc1, g)) / (torch.sqrt(v / _to(bc2, g) + er_) + eps_), g))
            nm.append(m)
            nv.append(v)
        un = fpt.unflatten
        return un(td, out), ScaleByYogiState(count, un(td, nm), un(td, nv))

    return GradientTransformation(init_fn, update_fn)


class ScaleByNovogradState(NamedTuple):
    """State of :func:`scale_by_novograd`: count, first moment, and one 0-d second
    moment per leaf (the EMA of the leaf's squared gradient norm).

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        mu: the EMA of the gradients (first moment), a tree like the parameters.
        nu: one 0-d tensor per leaf: the EMA of the leaf's squared gradient norm.
    """

    count: torch.Tensor
    mu: Any
    nu: Any


def _check_per_leaf_scalars(where: str, name: str, xs: list, gl: list, tree: Any) -> None:
    """``xs[i]`` must be a 0-d tensor with ``gl[i]``'s dtype and device."""
    for i, (x, g) in enumerate(zip(xs, gl, strict=True)):
        if not isinstance(x, torch.Tensor) or x.dim() != 0 or x.dtype != g.dtype \
                or x.device != g.device:
            got = (f"shape {tuple(x.shape)}, {x.dtype} on {x.device}"
                   if isinstance(x, torch.Tensor) else f"a {type(x).__name__}")
            raise (ValueError if isinstance(x, torch.Tensor) and x.dim() != 0 else TypeError)(
                f"{where}: leaf at path `{_checks._path(tree, i)}` of `{name}` must be a 0-d "
                f"tensor of dtype {g.dtype} on {g.device} (the update's), got {got}"
            )


def scale_by_novograd(
    b1: float = 0.9,
    b2: float = 0.25,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""NovoGrad's layer-wise scaling (Ginsburg et al., 2019), optax's rule.

    Per leaf :math:`\ell` (a layer), with a scalar second moment:

    .. math::
        v_1 = \|g_1\|^2,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2)\|g_t\|^2,\\
        m_1 = \frac{g_1}{\sqrt{v_1+\epsilon_{root}}+\epsilon} + \lambda p,\quad
        m_t = \beta_1 m_{t-1} + \frac{g_t}{\sqrt{v_t+\epsilon_{root}}+\epsilon} + \lambda p

    and the update is :math:`m_t` (no bias correction).

    Args:
      b1: decay of the first moment.
      b2: decay of the per-layer second moment.
      eps: added outside the square root.
      eps_root: added inside the square root.
      weight_decay: :math:`\lambda` (needs ``params`` when nonzero).
      mu_dtype: dtype of the first moment.

    Returns:
      A :class:`GradientTransformation` whose state is a :class:`ScaleByNovogradState`.

    Example:
      >>> tx = scale_by_novograd(eps=0.0)
      >>> tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init({"w": torch.zeros(2)}))[0]
      {'w': tensor([0.6000, 0.8000])}
    """
    _betas("scale_by_novograd(b1, b2)", b1=b1, b2=b2)
    check_number("scale_by_novograd(eps)", "eps", eps, low=0.0)
    check_number("scale_by_novograd(eps_root)", "eps_root", eps_root, low=0.0)
    if callable(weight_decay) and not isinstance(weight_decay, torch.Tensor):
        # optax 0.2.8 takes no schedule here either (its novograd fails on one)
        raise TypeError(
            "scale_by_novograd(weight_decay): `weight_decay` must be a number or a 0-d tensor, "
            "not a schedule (as in optax); for a scheduled decay use "
            "inject_hyperparams(novograd)(..., weight_decay=schedule)")
    _checks.check_hyperparameter("scale_by_novograd(weight_decay)", "weight_decay", weight_decay)
    check_number("scale_by_novograd(weight_decay)", "weight_decay", weight_decay, low=0.0)
    decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

    def init_fn(params: Params) -> ScaleByNovogradState:
        mu = fpt.map(lambda p: torch.zeros_like(p, dtype=mu_dtype or p.dtype), params)
        nu = fpt.map(lambda p: torch.zeros((), dtype=p.dtype, device=p.device), params)
        return ScaleByNovogradState(zero_count(params), mu, nu)

    def update_fn(updates: Updates, state: ScaleByNovogradState, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, ScaleByNovogradState]:
        where = "scale_by_novograd.update"
        gl, td, gs = _start(where, updates, state, ScaleByNovogradState,
                            "scale_by_novograd.init")
        ml = flatten_like(where, updates, state.mu, "state.mu", td, ref=gl, ref_sig=gs,
                          dtype=mu_dtype or SAME)
        try:
            vl = td.flatten_up_to(state.nu)
        except (ValueError, TypeError):
            from functorch_pipeline.optim._base import mismatch_error

            raise mismatch_error(where, "updates", updates, "state.nu", state.nu) from None
        _check_per_leaf_scalars(where, "state.nu", vl, gl, updates)
        pl = [None] * len(gl)
        if decays:
            require_params(where, params)
            pl = flatten_like(where, updates, params, "params", td, ref=gl, ref_sig=gs)
        first = state.count == 0
        out, nv = [], []
        for g, m, v, p in zip(gl, ml, vl, pl, strict=True):
            # injected hyperparameters per leaf; ``v`` is 0-d (NOTE [scalar dtype])
            b1_, b2_, eps_, er_, wd_ = _mt.for_leaf(g, b1, b2, eps, eps_root, weight_decay)
            b2v, erv = _mt.for_leaf(v, b2, eps_root)
            sq = torch.sum(g * g)
            v = _mt.to_leaf(torch.where(first, sq, b2v * v + (1 - b2v) * sq), v)
            a = g / (torch.sqrt(v + erv) + eps_)
            if decays:
                a = a + wd_ * p
            m = _mt.to_leaf(torch.where(first, a, b1_ * m.to(g.dtype) + a), g)
            out.append(m)
            nv.append(v)
        un = fpt.unflatten
        # the state must not share tensors with the updates (a later in-place transform
        # in a chain writes into the updates)
        new_mu = un(td, [m.clone() for m in out] if mu_dtype is None else _mt.cast(out, mu_dtype))
        return un(td, out), ScaleByNovogradState(state.count + 1, new_mu, un(td, nv))

    return GradientTransformation(init_fn, update_fn)


class ScaleByRpropState(NamedTuple):
    """State of :func:`scale_by_rprop`: per-element step sizes and the last update.

    Attributes:
        step_sizes: the per-element step sizes.
        prev_updates: the previous update (its sign drives the step-size changes).
    """

    step_sizes: Any
    prev_updates: Any


def scale_by_rprop(
    learning_rate: float,
    eta_minus: float = 0.5,
    eta_plus: float = 1.2,
    min_step_size: float = 1e-6,
    max_step_size: float = 50.0,
) -> GradientTransformation:
    r"""Rprop (Riedmiller and Braun, 1993): per-element step sizes driven by sign changes.

    With :math:`s = g_t \cdot u_{t-1}` elementwise: the step size becomes
    :math:`\min(\eta_+ \delta, \delta_{max})` where :math:`s > 0`,
    :math:`\max(\eta_- \delta, \delta_{min})` where :math:`s < 0`, and stays otherwise;
    the update is :math:`u_t = \delta_t\,\mathrm{sign}(g_t)`, or 0 where :math:`s < 0`
    (and that 0 is remembered, so the next step does not shrink again).

    # NOTE [rprop stale update]: optax 0.2.8's ``scale_by_rprop`` computes this update
    # but returns the *previous* step's (its first step is all zeros; optax PR #1725).
    # We follow the published rule, which is also ``torch.optim.Rprop``'s.

    Args:
      learning_rate: the initial step size :math:`\delta_0`.
      eta_minus: factor applied where the gradient changed sign.
      eta_plus: factor applied where it kept its sign.
      min_step_size: smallest step size.
      max_step_size: largest step size.

    Returns:
      A :class:`GradientTransformation` whose state is a :class:`ScaleByRpropState`
      (add ``scale(-1)`` to descend: :func:`~functorch_pipeline.optim.rprop` does).

    Example:
      >>> tx = scale_by_rprop(0.1)
      >>> s = tx.init({"w": torch.zeros(2)})
      >>> u, s = tx.update({"w": torch.tensor([1.0, -1.0])}, s)
      >>> u, s = tx.update({"w": torch.tensor([1.0, 1.0])}, s); u
      {'w': tensor([0.1200, 0.0000])}
    """
    where0 = "scale_by_rprop"
    for name, v in (("learning_rate", learning_rate), ("eta_minus", eta_minus),
                    ("eta_plus", eta_plus), ("min_step_size", min_step_size),
                    ("max_step_size", max_step_size)):
        _checks.check_hyperparameter(f"{where0}({name})", name, v)
        check_number(f"{where0}({name})", name, v, low=0.0)

    def init_fn(params: Params) -> ScaleByRpropState:
        steps = fpt.map(lambda p: torch.full_like(p, learning_rate), params)
        return ScaleByRpropState(steps, fpt.map(torch.zeros_like, params))

    def update_fn(updates: Updates, state: ScaleByRpropState, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, ScaleByRpropState]:
        where = "scale_by_rprop.update"
        gl, td, gs = _start(where, updates, state, ScaleByRpropState, "scale_by_rprop.init",
                            count=False)
        sl = flatten_like(where, updates, state.step_sizes, "state.step_sizes", td, ref=gl,
                          ref_sig=gs)
        ql = flatten_like(where, updates, state.prev_updates, "state.prev_updates", td,
                          ref=gl, ref_sig=gs)
        out, ns = [], []
        for g, d, q in zip(gl, sl, ql, strict=True):
            s = g * q
            hp, hm, hi, lo = (_mt.leaf_scalar(h, g) for h in (
                eta_plus, eta_minus, max_step_size, min_step_size))  # NOTE [scalar dtype]
            up = _mt.to_leaf(torch.clamp(d * hp, max=hi), d)
            down = _mt.to_leaf(torch.clamp(d * hm, min=lo), d)
            d = torch.where(s > 0, up, torch.where(s < 0, down, d))
            out.append(torch.where(s < 0, torch.zeros_like(g), d * torch.sign(g)))
            ns.append(d)
        un = fpt.unflatten
        kept = [u.clone() for u in out]  # not shared with the updates (in-place chains)
        return un(td, out), ScaleByRpropState(un(td, ns), un(td, kept))

    return GradientTransformation(init_fn, update_fn)


def scale_by_sign() -> GradientTransformation:
    r"""Replace every update element by its sign, :math:`u = \mathrm{sign}(g)` (0 at 0).

    Returns:
      A :class:`GradientTransformation` (stateless).

    Example:
      >>> tx = scale_by_sign()
      >>> tx.update({"w": torch.tensor([-3.0, 0.0, 0.2])}, tx.init(None))[0]
      {'w': tensor([-1.,  0.,  1.])}
    """

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, Any]:
        return fpt.map(torch.sign, updates), state

    return GradientTransformation(init_fn, update_fn)


class ScaleByOptimisticGradientState(NamedTuple):
    """State of :func:`scale_by_optimistic_gradient`: first-step flag, last gradient.

    Attributes:
        is_initial_step: whether no update has been made yet (a 0-d bool tensor).
        previous_gradient: the last step's gradients, a tree like the parameters.
    """

    is_initial_step: torch.Tensor
    previous_gradient: Any


def scale_by_optimistic_gradient(alpha: float = 1.0, beta: float = 1.0) -> GradientTransformation:
    r"""Optimistic gradients (Mokhtari et al., 2019):
    :math:`u_t = (\alpha + \beta) g_t - \beta g_{t-1}`, with :math:`g_{t-1} := g_t` on
    the first step (optax >= 0.2.4, optax issue #1082).

    Args:
      alpha: weight of the current gradient.
      beta: weight of the negative momentum.

    Returns:
      A :class:`GradientTransformation` whose state is a
      :class:`ScaleByOptimisticGradientState`.

    Example:
      >>> tx = scale_by_optimistic_gradient()
      >>> s = tx.init({"w": torch.zeros(1)})
      >>> u, s = tx.update({"w": torch.tensor([2.0])}, s); u
      {'w': tensor([2.])}
      >>> u, s = tx.update({"w": torch.tensor([3.0])}, s); u
      {'w': tensor([4.])}
    """
    check_number("scale_by_optimistic_gradient(alpha)", "alpha", alpha)
    check_number("scale_by_optimistic_gradient(beta)", "beta", beta)
    for name, v in (("alpha", alpha), ("beta", beta)):
        _checks.check_hyperparameter(f"scale_by_optimistic_gradient({name})", name, v)

    def init_fn(params: Params) -> ScaleByOptimisticGradientState:
        first = torch.ones((), dtype=torch.bool, device=zero_count(params).device)
        return ScaleByOptimisticGradientState(first, fpt.map(torch.zeros_like, params))

    def update_fn(updates: Updates, state: ScaleByOptimisticGradientState, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, ScaleByOptimisticGradientState]:
        where = "scale_by_optimistic_gradient.update"
        gl, td, gs = _start(where, updates, state, ScaleByOptimisticGradientState,
                            "scale_by_optimistic_gradient.init", count=False)
        _checks.check_scalar(where, "state.is_initial_step", state.is_initial_step,
                             _checks.first_device(gl), torch.bool)
        ql = flatten_like(where, updates, state.previous_gradient, "state.previous_gradient",
                          td, ref=gl, ref_sig=gs)
        first = state.is_initial_step
        out = [_mt.to_leaf((alpha + beta) * g - beta * torch.where(first, g, q), g)
               for g, q in zip(gl, ql, strict=True)]  # NOTE [scalar dtype]
        kept = [g.clone() for g in gl]  # not the caller's tensors (in-place chains)
        new = ScaleByOptimisticGradientState(torch.zeros_like(first), fpt.unflatten(td, kept))
        return fpt.unflatten(td, out), new

    return GradientTransformation(init_fn, update_fn)
