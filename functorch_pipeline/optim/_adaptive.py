"""Adaptive scalers: Adam and its family, RMS/RSS/AdaDelta, Lion.

Each ``scale_by_*`` returns a :class:`GradientTransformation` whose update function can
also absorb a following learning-rate scaling and weight decay (NOTE [affine tail
fusion] in ``_base.py``): ``fused(updates, state, params, m, c)`` returns
``m * T(updates) + c * params``. Step counts are int32 tensors; bias corrections are
0-d tensors computed on the device, never read on the host.
"""

from __future__ import annotations

import numbers
from typing import Any
from typing import NamedTuple

import torch

from functorch_pipeline import tree as fpt
from functorch_pipeline.optim import _checks
from functorch_pipeline.optim import _mt
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import Params
from functorch_pipeline.optim._base import Updates
from functorch_pipeline.optim._base import flatten_like
from functorch_pipeline.optim._base import fused_transformation
from functorch_pipeline.optim._base import require_params
from functorch_pipeline.optim._base import zero_count
from functorch_pipeline.optim._checks import SAME
from functorch_pipeline.optim._transforms import check_number

__all__ = [
    "ScaleByAdaDeltaState",
    "ScaleByAdamState",
    "ScaleByLionState",
    "ScaleByNadamState",
    "ScaleByRStdDevState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "scale_by_adadelta",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_lion",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_stddev",
]


def _unit(m: Any) -> bool:
    return isinstance(m, numbers.Real) and not isinstance(m, bool) and m == 1


def _zero(c: Any) -> bool:
    return isinstance(c, numbers.Real) and not isinstance(c, bool) and c == 0


def _foldable(m: Any) -> bool:
    """A nonzero Python number can be folded into a denominator exactly enough."""
    return isinstance(m, numbers.Real) and not isinstance(m, bool) and m != 0


def _finish(where: str, out: list, m: Any, c: Any, updates: Updates, params: Params, fe: bool, td: Any = None) -> list:
    """``m * out + c * params`` in place on ``out`` (``out`` must be freshly owned)."""
    if not _unit(m):
        out = _mt.mul_(out, m, fe)
    if not _zero(c):
        require_params(where, params)
        pl = flatten_like(where, updates, params, "params", td, ref=out)
        out = _mt.add_(out, pl, fe, alpha=c)
    return out


def _zeros_tree(params: Params, dtype: torch.dtype | None = None) -> Any:
    return fpt.map(lambda p: torch.zeros_like(p, dtype=dtype or p.dtype), params)


def _check_betas(where: str, **betas: Any) -> None:
    for k, v in betas.items():
        _checks.check_hyperparameter(where, k, v)
        check_number(where, k, v, low=0.0, high=1.0, high_open=True)


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: step count and first/second moments.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        mu: the EMA of the gradients (first moment), a tree like the parameters.
        nu: the EMA of the squared gradients (second moment), a tree like the parameters.
    """

    count: torch.Tensor
    mu: Any
    nu: Any


_HAS_FUSED_ADAM = hasattr(torch, "_fused_adam_")


def _fused_adam_ok(*lists: list) -> bool:
    """Whether torch's single-pass Adam kernel applies (NOTE [fused adam kernel])."""
    if not _HAS_FUSED_ADAM or not lists[0]:
        return False
    first = lists[0][0]
    if first.dtype not in (torch.float32, torch.float64) or first.device.type not in ("cpu", "cuda"):
        return False
    # the other lists match lists[0] leaf by leaf (NOTE [leaf checks]): one dtype/device pass
    for x in lists[0]:
        if x.dtype != first.dtype or x.device != first.device:
            return False
    return all(x.is_contiguous() for xs in lists for x in xs)


# NOTE [fused adam kernel]
# torch.optim's ``fused=True`` Adam is one aten kernel, ``torch._fused_adam_(params,
# grads, exp_avgs, exp_avg_sqs, ...)``, that updates both moments and does
# ``param -= lr * m_hat / (sqrt(v_hat) + eps)`` in a single pass. We run it with a
# buffer ``z = c * params`` (or zeros) in the role of ``param`` and ``lr = -m``, so that
# ``z`` ends as exactly our (fused-tail) update ``m * adam(g) + c * params``, and the
# moments as our new state. That is one pass instead of ~7 foreach passes (pure: plus a
# copy of each moment). It is used for plain eager tensors only (same dtype and device,
# contiguous, float32/64, CPU/CUDA, Python-number b1/b2/eps, eps_root=0, no nesterov);
# everything else (vmap, compile, autograd, injected hyperparameters) takes the foreach
# / leaf-by-leaf path, which agrees to rounding. Pure and in-place calls use the same
# kernel, hence give bit-identical numbers.


def _fused_adam_step(gl: list, ml: list, vl: list, count: torch.Tensor, b1: float, b2: float,
                     eps: float, m: Any, c: Any, pl: list | None, inplace: bool) -> tuple[list, list, list]:
    fe = True
    new_m = ml if inplace else [x.clone() for x in ml]
    new_v = vl if inplace else [x.clone() for x in vl]
    if _zero(c):
        out = [torch.zeros_like(g) for g in gl]
    else:
        out = _mt.mul(pl, c, fe)
    step = (count + 1).to(torch.float32)
    lr = -m if isinstance(m, numbers.Real) else (-m).to(device=gl[0].device)
    torch._fused_adam_(out, gl, new_m, new_v, [], [step] * len(gl), lr=lr, beta1=b1, beta2=b2,
                       weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
    return out, new_m, new_v


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    r"""Rescale updates by Adam's moment estimates.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

    With ``nesterov=True`` the first moment is replaced by
    :math:`\beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)` (NAdam).

    Args:
      b1, b2: decay rates of the first and second moments.
      eps: added to the denominator outside the square root.
      eps_root: added inside the square root. Leave it 0 to match ``torch.optim.Adam``;
        set it (e.g. 1e-12 in float64, 1e-8 in float32) when differentiating *through*
        the update (meta-learning, hypergradients): where a gradient entry is exactly 0,
        :math:`\sqrt{v}` has an infinite derivative at :math:`v = 0` and the
        meta-gradient is NaN (optax documents the same).
      mu_dtype: dtype of the first moment (default: the parameters').
      nesterov: use the Nesterov form.

    Returns:
      A :class:`GradientTransformation`. Its state is a :class:`ScaleByAdamState`.

    >>> tx = scale_by_adam()
    >>> u, s = tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init({"w": torch.zeros(2)}))
    >>> u["w"]
    tensor([ 1.0000, -1.0000])
    """
    _check_betas("scale_by_adam(b1, b2)", b1=b1, b2=b2)
    check_number("scale_by_adam(eps)", "eps", eps, low=0.0)
    check_number("scale_by_adam(eps_root)", "eps_root", eps_root, low=0.0)

    fast = (
        not nesterov
        and mu_dtype is None
        and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in (b1, b2, eps))
    )

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(zero_count(params), _zeros_tree(params, mu_dtype), _zeros_tree(params))

    def fused(updates: Updates, state: ScaleByAdamState, params: Params, m: Any, c: Any, **extra_args: Any):
        where = "scale_by_adam.update"
        gl, td = fpt.flatten(updates)
        gs = _checks.signature(gl)
        _checks.check_state(where, state, ScaleByAdamState, "scale_by_adam.init")
        _checks.check_count(where, "state.count", state.count, gl)
        ml = flatten_like(where, updates, state.mu, "state.mu", td, ref=gl, ref_sig=gs,
                          dtype=mu_dtype or SAME)
        vl = flatten_like(where, updates, state.nu, "state.nu", td, ref=gl, ref_sig=gs)
        fe = _mt.foreach_ok(gl, ml, vl, _mt.tensors(b1, b2, eps, eps_root, m, c))
        inplace = _mt.inplace_ok(extra_args, gl, ml, vl, fe=fe) and mu_dtype is None
        count = state.count + 1
        if not gl:
            return updates, ScaleByAdamState(count, state.mu, state.nu)
        # fe: plain eager tensors, nothing differentiated (NOTE [differentiable optimizers]);
        # a learning rate / decay that requires grad must not go into the kernel either
        if fe and fast and _zero(eps_root):
            pl = None
            if not _zero(c):
                require_params(where, params)
                pl = flatten_like(where, updates, params, "params", td, ref=gl, ref_sig=gs)
            if _fused_adam_ok(gl, ml, vl, pl or []) and (pl is None or _mt.foreach_ok(pl)):
                out, new_m, new_v = _fused_adam_step(gl, ml, vl, state.count, b1, b2, eps, m, c, pl, inplace)
                new_state = ScaleByAdamState(count, fpt.unflatten(td, new_m), fpt.unflatten(td, new_v))
                return fpt.unflatten(td, out), new_state
        t = count.to(_mt.scalar_dtype(gl))
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        mu_in = ml if mu_dtype is None else [x.to(g.dtype) for x, g in zip(ml, gl, strict=True)]
        new_m = _mt.lerp(mu_in, gl, 1 - b1, fe, inplace=inplace)
        new_v = _mt.ema_sq(vl, gl, b2, fe, inplace=inplace)
        if nesterov:
            num = _mt.mul(new_m, b1 / (1 - b1 ** (t + 1)), fe)
            num = _mt.add_(num, gl, fe, alpha=(1 - b1) / bc1)
        else:
            num = new_m
        if _zero(eps_root):
            d = _mt.sqrt(new_v, fe)
            if nesterov:
                d = _mt.mul_(d, 1 / torch.sqrt(bc2), fe)
                d = _mt.add_scalar_(d, eps, fe)
                out = _mt.div(num, d, fe)
            elif _foldable(m):
                # m * (mu/bc1) / (sqrt(nu)/sqrt(bc2) + eps) == mu / (sqrt(nu)*a + b)
                d = _mt.mul_(d, bc1 / (m * torch.sqrt(bc2)), fe)
                d = _mt.add_scalar_(d, eps * bc1 / m, fe)
                out = _mt.div(num, d, fe)
                m = 1
            else:
                d = _mt.mul_(d, bc1 / torch.sqrt(bc2), fe)
                d = _mt.add_scalar_(d, eps * bc1, fe)
                out = _mt.div(num, d, fe)
        else:
            d = _mt.mul(new_v, 1 / bc2, fe)
            d = _mt.add_scalar_(d, eps_root, fe)
            d = _mt.sqrt(d, fe)
            d = _mt.add_scalar_(d, eps, fe)
            out = _mt.div(num, d, fe)
            if not nesterov:
                out = _mt.mul_(out, 1 / bc1, fe)
        out = _finish(where, out, m, c, updates, params, fe, td)
        new_m = _mt.cast(new_m, mu_dtype)
        return fpt.unflatten(td, out), ScaleByAdamState(count, fpt.unflatten(td, new_m), fpt.unflatten(td, new_v))

    return fused_transformation(init_fn, fused)


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    r"""Rescale updates by Adamax's infinity-norm estimate.

    :math:`m_t = \beta_1 m + (1-\beta_1) g`, :math:`v_t = \max(\beta_2 v, |g| + \epsilon)`,
    :math:`u = m_t / ((1-\beta_1^t) v_t)` (as ``torch.optim.Adamax``).

    Args:
      b1: decay of the first moment.
      b2: decay of the infinity norm.
      eps: added to ``|g|``.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_adamax()
    >>> tx.update([torch.tensor([2.0])], tx.init([torch.zeros(1)]))[0]
    [tensor([1.0000])]
    """
    _check_betas("scale_by_adamax(b1, b2)", b1=b1, b2=b2)
    check_number("scale_by_adamax(eps)", "eps", eps, low=0.0)

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(zero_count(params), _zeros_tree(params), _zeros_tree(params))

    def fused(updates: Updates, state: ScaleByAdamState, params: Params, m: Any, c: Any, **extra_args: Any):
        where = "scale_by_adamax.update"
        gl, td = fpt.flatten(updates)
        gs = _checks.signature(gl)
        _checks.check_state(where, state, ScaleByAdamState, "scale_by_adamax.init")
        _checks.check_count(where, "state.count", state.count, gl)
        ml = flatten_like(where, updates, state.mu, "state.mu", td, ref=gl, ref_sig=gs)
        vl = flatten_like(where, updates, state.nu, "state.nu", td, ref=gl, ref_sig=gs)
        fe = _mt.foreach_ok(gl, ml, vl, _mt.tensors(b1, b2, eps, m, c))
        inplace = _mt.inplace_ok(extra_args, gl, vl, ml, fe=fe)
        count = state.count + 1
        t = count.to(_mt.scalar_dtype(gl)) if gl else count
        new_m = _mt.lerp(ml, gl, 1 - b1, fe, inplace=inplace)
        new_v = _mt.mul_(vl, b2, fe) if inplace else _mt.mul(vl, b2, fe)
        a = torch._foreach_abs(gl) if fe else [torch.abs(g) for g in gl]
        a = _mt.add_scalar_(a, eps, fe)
        if fe:  # (foreach_ok: nothing differentiated)
            torch._foreach_maximum_(new_v, a)
        elif inplace and not _mt.recording(new_v):
            for v, x in zip(new_v, a, strict=True):
                v.copy_(torch.maximum(v, x))
        else:
            new_v = [torch.maximum(v, x) for v, x in zip(new_v, a, strict=True)]
        out = _mt.div(new_m, new_v, fe)
        m = m / (1 - b1**t) if gl else m
        out = _finish(where, out, m, c, updates, params, fe, td)
        return fpt.unflatten(td, out), ScaleByAdamState(count, fpt.unflatten(td, new_m), fpt.unflatten(td, new_v))

    return fused_transformation(init_fn, fused)


def scale_by_radam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
    eps_before_bias_correction: bool = False,
) -> GradientTransformation:
    r"""Rectified Adam: Adam's step times a variance rectification term when it is defined.

    With :math:`\rho_\infty = 2/(1-\beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`: when
    :math:`\rho_t \ge` ``threshold`` the update is
    :math:`r_t \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)` with
    :math:`r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}`,
    otherwise it is :math:`\hat m_t` (bias-corrected momentum only).

    Args:
      b1, b2, eps, eps_root: as in :func:`scale_by_adam`.
      threshold: the rectification threshold on :math:`\rho_t`.
      nesterov: Nesterov form of the first moment.
      eps_before_bias_correction: (not in optax) add ``eps`` to :math:`\sqrt{v_t}` before
        the bias correction, :math:`\hat m_t \sqrt{1-\beta_2^t} / (\sqrt{v_t} + \epsilon)`,
        as ``torch.optim.RAdam`` does.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_radam()
    >>> tx.update([torch.tensor([3.0])], tx.init([torch.zeros(1)]))[0]  # rho_1 < 5: momentum only
    [tensor([3.0000])]
    """
    check_number("scale_by_radam(eps)", "eps", eps)
    check_number("scale_by_radam(eps_root)", "eps_root", eps_root)
    check_number("scale_by_radam(threshold)", "threshold", threshold)
    _check_betas("scale_by_radam(b1, b2)", b1=b1, b2=b2)
    ro_inf = 2.0 / (1.0 - b2) - 1.0

    def init_fn(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(zero_count(params), _zeros_tree(params), _zeros_tree(params))

    def fused(updates: Updates, state: ScaleByAdamState, params: Params, m: Any, c: Any, **extra_args: Any):
        where = "scale_by_radam.update"
        gl, td = fpt.flatten(updates)
        gs = _checks.signature(gl)
        _checks.check_state(where, state, ScaleByAdamState, "scale_by_radam.init")
        _checks.check_count(where, "state.count", state.count, gl)
        ml = flatten_like(where, updates, state.mu, "state.mu", td, ref=gl, ref_sig=gs)
        vl = flatten_like(where, updates, state.nu, "state.nu", td, ref=gl, ref_sig=gs)
        fe = _mt.foreach_ok(gl, ml, vl, _mt.tensors(b1, b2, eps, eps_root, m, c))
        inplace = _mt.inplace_ok(extra_args, gl, vl, ml, fe=fe)
        count = state.count + 1
        if not gl:
            return updates, ScaleByAdamState(count, state.mu, state.nu)
        t = count.to(_mt.scalar_dtype(gl))
        bc1, b2t = 1 - b1**t, b2**t
        bc2 = 1 - b2t
        ro = ro_inf - 2 * t * b2t / bc2
        on = ro >= threshold
        # NOTE [safe where]: in the first steps the rectification's radicand is negative;
        # its NaN sits in the branch torch.where does not take, but the backward of
        # ``x / y * rect`` multiplies the zero cotangent by rect (0 * NaN = NaN). Feeding
        # the root 1 where the branch is off keeps meta-gradients finite (same values).
        radicand = (ro - 4) * (ro - 2) * ro_inf / ((ro_inf - 4) * (ro_inf - 2) * ro)
        rect = torch.sqrt(torch.where(on, radicand, torch.ones_like(radicand)))
        new_m = _mt.lerp(ml, gl, 1 - b1, fe, inplace=inplace)
        new_v = _mt.ema_sq(vl, gl, b2, fe, inplace=inplace)
        if nesterov:
            mh = _mt.mul(new_m, b1 / (1 - b1 ** (t + 1)), fe)
            mh = _mt.add_(mh, gl, fe, alpha=(1 - b1) / bc1)
        else:
            mh = _mt.mul(new_m, 1 / bc1, fe)
        if eps_before_bias_correction:
            d = _mt.sqrt(new_v, fe)
            d = _mt.add_scalar_(d, eps, fe)
            k = rect * torch.sqrt(bc2)
        else:
            d = _mt.mul(new_v, 1 / bc2, fe)
            if not _zero(eps_root):
                d = _mt.add_scalar_(d, eps_root, fe)
            d = _mt.sqrt(d, fe)
            d = _mt.add_scalar_(d, eps, fe)
            k = rect
        # NOTE [scalar dtype]: k is a step-count scalar; keep a 0-d leaf's dtype
        out = [_mt.to_leaf(torch.where(on, x / y * _mt.leaf_scalar(k, x), x), x)
               for x, y in zip(mh, d, strict=True)]
        out = _finish(where, out, m, c, updates, params, fe, td)
        return fpt.unflatten(td, out), ScaleByAdamState(count, fpt.unflatten(td, new_m), fpt.unflatten(td, new_v))

    return fused_transformation(init_fn, fused)


class ScaleByNadamState(NamedTuple):
    """State of :func:`scale_by_nadam`: count, product of momentum coefficients, moments.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        mu_product: the product of the momentum coefficients so far (for bias correction).
        mu: the EMA of the gradients (first moment), a tree like the parameters.
        nu: the EMA of the squared gradients (second moment), a tree like the parameters.
    """

    count: torch.Tensor
    mu_product: torch.Tensor
    mu: Any
    nu: Any


def scale_by_nadam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    momentum_decay: float = 4e-3,
) -> GradientTransformation:
    r"""NAdam with Dozat's momentum schedule, as ``torch.optim.NAdam`` (not in optax).

    :math:`\mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi})` with :math:`\psi` =
    ``momentum_decay``; the update is
    :math:`\frac{(1-\mu_t) g_t}{1-\prod_{i\le t}\mu_i} + \frac{\mu_{t+1} m_t}{1-\prod_{i\le t+1}\mu_i}`
    divided by :math:`\sqrt{v_t/(1-\beta_2^t)} + \epsilon`. optax's ``nadam`` (constant
    :math:`\mu = \beta_1`) is :func:`scale_by_adam` with ``nesterov=True``.

    Args:
      b1, b2, eps: as in :func:`scale_by_adam`.
      momentum_decay: ψ of the momentum schedule.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_nadam()
    >>> u, _ = tx.update([torch.tensor([1.0])], tx.init([torch.zeros(1)]))
    >>> u[0].shape
    torch.Size([1])
    """
    check_number("scale_by_nadam(eps)", "eps", eps)
    _check_betas("scale_by_nadam(b1, b2)", b1=b1, b2=b2)
    check_number("scale_by_nadam(momentum_decay)", "momentum_decay", momentum_decay, low=0.0)

    def init_fn(params: Params) -> ScaleByNadamState:
        count = zero_count(params)
        dt = _mt.scalar_dtype([x for x in fpt.leaves(params) if isinstance(x, torch.Tensor)])
        one = torch.ones((), dtype=dt, device=count.device)
        return ScaleByNadamState(count, one, _zeros_tree(params), _zeros_tree(params))

    def fused(updates: Updates, state: ScaleByNadamState, params: Params, m: Any, c: Any, **extra_args: Any):
        where = "scale_by_nadam.update"
        gl, td = fpt.flatten(updates)
        gs = _checks.signature(gl)
        _checks.check_state(where, state, ScaleByNadamState, "scale_by_nadam.init")
        _checks.check_count(where, "state.count", state.count, gl)
        _checks.check_scalar(where, "state.mu_product", state.mu_product, state.count.device,
                             _mt.scalar_dtype(gl))
        ml = flatten_like(where, updates, state.mu, "state.mu", td, ref=gl, ref_sig=gs)
        vl = flatten_like(where, updates, state.nu, "state.nu", td, ref=gl, ref_sig=gs)
        fe = _mt.foreach_ok(gl, ml, vl, _mt.tensors(b1, b2, eps, m, c))
        inplace = _mt.inplace_ok(extra_args, gl, vl, ml, fe=fe)
        count = state.count + 1
        t = count.to(state.mu_product.dtype)
        mu_t = b1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
        prod = state.mu_product * mu_t
        prod_next = prod * mu_next
        new_m = _mt.lerp(ml, gl, 1 - b1, fe, inplace=inplace)
        new_v = _mt.ema_sq(vl, gl, b2, fe, inplace=inplace)
        d = _mt.mul(new_v, 1 / (1 - b2**t), fe)
        d = _mt.sqrt(d, fe)
        d = _mt.add_scalar_(d, eps, fe)
        out = _mt.mul(gl, (1 - mu_t) / (1 - prod), fe)
        out = _mt.add_(out, new_m, fe, alpha=mu_next / (1 - prod_next))
        out = _mt.div(out, d, fe)
        out = _finish(where, out, m, c, updates, params, fe, td)
        new_state = ScaleByNadamState(count, prod, fpt.unflatten(td, new_m), fpt.unflatten(td, new_v))
        return fpt.unflatten(td, out), new_state

    return fused_transformation(init_fn, fused)


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: count (for bias correction) and the EMA of ``g**2``.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        nu: the EMA of the squared gradients (second moment), a tree like the parameters.
    """

    count: torch.Tensor
    nu: Any


class ScaleByRStdDevState(NamedTuple):
    """State of :func:`scale_by_stddev`: count and EMAs of ``g`` and ``g**2``.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        mu: the EMA of the gradients (first moment), a tree like the parameters.
        nu: the EMA of the squared gradients (second moment), a tree like the parameters.
    """

    count: torch.Tensor
    mu: Any
    nu: Any


def _rms_common(name: str, decay: float, eps: float, initial_scale: float, eps_in_sqrt: bool,
                bias_correction: bool, centered: bool) -> GradientTransformation:
    _check_betas(f"{name}(decay)", decay=decay)
    check_number(f"{name}(eps)", "eps", eps, low=0.0)

    def init_fn(params: Params) -> Any:
        nu = fpt.map(lambda p: torch.full_like(p, initial_scale), params)
        if centered:
            return ScaleByRStdDevState(zero_count(params), _zeros_tree(params), nu)
        return ScaleByRmsState(zero_count(params), nu)

    def fused(updates: Updates, state: Any, params: Params, m: Any, c: Any, **extra_args: Any):
        where = f"{name}.update"
        gl, td = fpt.flatten(updates)
        gs = _checks.signature(gl)
        cls = ScaleByRStdDevState if centered else ScaleByRmsState
        _checks.check_state(where, state, cls, f"{name}.init")
        _checks.check_count(where, "state.count", state.count, gl)
        vl = flatten_like(where, updates, state.nu, "state.nu", td, ref=gl, ref_sig=gs)
        ml = []
        if centered:
            ml = flatten_like(where, updates, state.mu, "state.mu", td, ref=gl, ref_sig=gs)
        fe = _mt.foreach_ok(gl, vl, ml, _mt.tensors(decay, eps, m, c))
        inplace = _mt.inplace_ok(extra_args, gl, ml, vl, fe=fe)
        count = state.count + 1
        new_v = _mt.ema_sq(vl, gl, decay, fe, inplace=inplace)
        v = new_v
        if bias_correction and gl:
            v = _mt.mul(v, 1 / (1 - decay ** count.to(_mt.scalar_dtype(gl))), fe)
        new_m: list = []
        if centered:
            new_m = _mt.lerp(ml, gl, 1 - decay, fe, inplace=inplace)
            mm = new_m
            if bias_correction and gl:
                mm = _mt.mul(mm, 1 / (1 - decay ** count.to(_mt.scalar_dtype(gl))), fe)
            v = _mt.sub(v, _mt.mul_list(mm, mm, fe), fe)
        if eps_in_sqrt:
            d = _mt.add_scalar(v, eps, fe)
            d = _mt.sqrt(d, fe)
        else:
            d = _mt.sqrt(v, fe)
            d = _mt.add_scalar_(d, eps, fe)
        out = _mt.div(gl, d, fe)
        out = _finish(where, out, m, c, updates, params, fe, td)
        if centered:
            st = ScaleByRStdDevState(count, fpt.unflatten(td, new_m), fpt.unflatten(td, new_v))
        else:
            st = ScaleByRmsState(count, fpt.unflatten(td, new_v))
        return fpt.unflatten(td, out), st

    return fused_transformation(init_fn, fused)


def scale_by_rms(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> GradientTransformation:
    r"""Divide by the root of an EMA of squared gradients (RMSProp's scaling).

    :math:`\nu_t = d\,\nu_{t-1} + (1-d) g^2`; :math:`u = g/\sqrt{\nu_t + \epsilon}`, or
    :math:`g/(\sqrt{\nu_t} + \epsilon)` with ``eps_in_sqrt=False`` (torch's placement).

    Args:
      decay: decay of the squared-gradient average.
      eps: numerical stability term.
      initial_scale: starting value of the average.
      eps_in_sqrt: eps inside the root (optax) or outside (torch).
      bias_correction: debias the average.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_rms(decay=0.0)
    >>> tx.update([torch.tensor([-2.0])], tx.init([torch.zeros(1)]))[0]
    [tensor([-1.0000])]
    """
    check_number("scale_by_rms(initial_scale)", "initial_scale", initial_scale)
    return _rms_common("scale_by_rms", decay, eps, initial_scale, eps_in_sqrt, bias_correction, False)


def scale_by_stddev(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> GradientTransformation:
    r"""Divide by a running standard deviation of the gradients (centered RMSProp).

    :math:`u = g/\sqrt{\nu_t - \mu_t^2 + \epsilon}` (or eps outside the root).

    Args:
      decay, eps, initial_scale, eps_in_sqrt, bias_correction: as in :func:`scale_by_rms`.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_stddev(decay=0.5)
    >>> tx.update([torch.tensor([2.0])], tx.init([torch.zeros(1)]))[0]
    [tensor([2.0000])]
    """
    check_number("scale_by_stddev(initial_scale)", "initial_scale", initial_scale)
    return _rms_common("scale_by_stddev", decay, eps, initial_scale, eps_in_sqrt, bias_correction, True)


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`: the running sum of squared gradients.

    Attributes:
        sum_of_squares: the running sum of squared gradients.
    """

    sum_of_squares: Any


def scale_by_rss(
    initial_accumulator_value: float = 0.1, eps: float = 1e-7, *, eps_in_sqrt: bool = True
) -> GradientTransformation:
    r"""Divide by the root of the sum of all squared gradients so far (AdaGrad).

    :math:`s_t = s_{t-1} + g^2`; :math:`u = g / \sqrt{s_t + \epsilon}` where
    :math:`s_t > 0` (else 0), as optax. ``eps_in_sqrt=False`` (not in optax) gives
    ``torch.optim.Adagrad``'s :math:`g/(\sqrt{s_t}+\epsilon)`.

    Args:
      initial_accumulator_value: the starting sum of squares.
      eps: numerical stability term.
      eps_in_sqrt: (not in optax) False puts eps outside the root.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_rss(initial_accumulator_value=0.0, eps=0.0)
    >>> tx.update([torch.tensor([-4.0, 0.0])], tx.init([torch.zeros(2)]))[0]
    [tensor([-1.,  0.])]
    """
    check_number("scale_by_rss(initial_accumulator_value)", "initial_accumulator_value",
                 initial_accumulator_value, low=0.0)
    check_number("scale_by_rss(eps)", "eps", eps, low=0.0)

    def init_fn(params: Params) -> ScaleByRssState:
        return ScaleByRssState(fpt.map(lambda p: torch.full_like(p, initial_accumulator_value), params))

    def fused(updates: Updates, state: ScaleByRssState, params: Params, m: Any, c: Any, **extra_args: Any):
        where = "scale_by_rss.update"
        gl, td = fpt.flatten(updates)
        gs = _checks.signature(gl)
        _checks.check_state(where, state, ScaleByRssState, "scale_by_rss.init")
        sl = flatten_like(where, updates, state.sum_of_squares, "state.sum_of_squares", td,
                          ref=gl, ref_sig=gs)
        fe = _mt.foreach_ok(gl, sl, _mt.tensors(eps, m, c))
        new_s = _mt.addcmul(sl, gl, gl, fe, inplace=_mt.inplace_ok(extra_args, gl, sl, fe=fe))
        if eps_in_sqrt:
            # per leaf: an injected eps must not promote a 0-d leaf (NOTE [scalar dtype])
            out = [_mt.to_leaf(torch.where(s > 0, torch.rsqrt(s + _mt.leaf_scalar(eps, s)),
                                           torch.zeros_like(s)) * g, g)
                   for s, g in zip(new_s, gl, strict=True)]
        else:
            d = _mt.sqrt(new_s, fe)
            d = _mt.add_scalar_(d, eps, fe)
            out = _mt.div(gl, d, fe)
        out = _finish(where, out, m, c, updates, params, fe, td)
        return fpt.unflatten(td, out), ScaleByRssState(fpt.unflatten(td, new_s))

    return fused_transformation(init_fn, fused)


class ScaleByAdaDeltaState(NamedTuple):
    """State of :func:`scale_by_adadelta`: EMAs of squared gradients and squared updates.

    Attributes:
        e_g: the EMA of the squared gradients.
        e_x: the EMA of the squared updates.
    """

    e_g: Any
    e_x: Any


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    r"""AdaDelta's scaling: :math:`u = \sqrt{E[x^2] + \epsilon} / \sqrt{E[g^2] + \epsilon}\; g`.

    Args:
      rho: decay of both running averages.
      eps: added inside both roots.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_adadelta(eps=1.0)
    >>> tx.update([torch.tensor([0.0])], tx.init([torch.zeros(1)]))[0]
    [tensor([0.])]
    """
    _check_betas("scale_by_adadelta(rho)", rho=rho)
    check_number("scale_by_adadelta(eps)", "eps", eps, low=0.0)

    def init_fn(params: Params) -> ScaleByAdaDeltaState:
        return ScaleByAdaDeltaState(_zeros_tree(params), _zeros_tree(params))

    def fused(updates: Updates, state: ScaleByAdaDeltaState, params: Params, m: Any, c: Any, **extra_args: Any):
        where = "scale_by_adadelta.update"
        gl, td = fpt.flatten(updates)
        gs = _checks.signature(gl)
        _checks.check_state(where, state, ScaleByAdaDeltaState, "scale_by_adadelta.init")
        egl = flatten_like(where, updates, state.e_g, "state.e_g", td, ref=gl, ref_sig=gs)
        exl = flatten_like(where, updates, state.e_x, "state.e_x", td, ref=gl, ref_sig=gs)
        fe = _mt.foreach_ok(gl, egl, exl, _mt.tensors(rho, eps, m, c))
        inplace = _mt.inplace_ok(extra_args, gl, exl, egl, fe=fe)
        new_eg = _mt.ema_sq(egl, gl, rho, fe, inplace=inplace)
        std = _mt.sqrt(_mt.add_scalar(new_eg, eps, fe), fe)
        delta = _mt.sqrt(_mt.add_scalar(exl, eps, fe), fe)
        if fe:
            delta = _mt.mul_list(_mt.div(delta, std, fe), gl, fe)
        else:
            delta = [x / s * g for x, s, g in zip(delta, std, gl, strict=True)]
        new_ex = _mt.ema_sq(exl, delta, rho, fe, inplace=inplace)
        out = _finish(where, delta, m, c, updates, params, fe, td)
        return fpt.unflatten(td, out), ScaleByAdaDeltaState(fpt.unflatten(td, new_eg), fpt.unflatten(td, new_ex))

    return fused_transformation(init_fn, fused)


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: count and the momentum.

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        mu: the momentum (EMA of the gradients).
    """

    count: torch.Tensor
    mu: Any


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: torch.dtype | None = None,
    *,
    mode: str = "hard",
    smooth_beta: float = 1.0,
) -> GradientTransformation:
    r"""Lion's sign update: :math:`u = \mathrm{sign}(x)` with
    :math:`x = \beta_1 m + (1-\beta_1) g`, then :math:`m \leftarrow \beta_2 m + (1-\beta_2) g`.

    ``mode`` (keyword only, optax's newest signature) picks the sign variant: ``"hard"``
    :math:`\mathrm{sign}(x)`, ``"smooth"`` :math:`\tanh(\beta_s x)` (``smooth_beta``),
    ``"refined"`` :math:`x` where :math:`|x| < 1`, else :math:`\mathrm{sign}(x)`.

    Args:
      b1: interpolation for the sign direction.
      b2: decay of the momentum.
      mu_dtype: dtype of the momentum.
      mode: ``"hard"`` (default), ``"smooth"`` or ``"refined"``.
      smooth_beta: :math:`\beta_s` of the ``"smooth"`` mode.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = scale_by_lion()
    >>> tx.update([torch.tensor([0.3, -2.0, 0.0])], tx.init([torch.zeros(3)]))[0]
    [tensor([ 1., -1.,  0.])]
    """
    check_number("scale_by_lion(smooth_beta)", "smooth_beta", smooth_beta)
    _check_betas("scale_by_lion(b1, b2)", b1=b1, b2=b2)
    if mode not in ("hard", "smooth", "refined"):
        raise ValueError(
            f"scale_by_lion(mode): must be 'hard', 'smooth' or 'refined', got {mode!r}"
        )
    _checks.check_hyperparameter("scale_by_lion(smooth_beta)", "smooth_beta", smooth_beta)

    def init_fn(params: Params) -> ScaleByLionState:
        return ScaleByLionState(zero_count(params), _zeros_tree(params, mu_dtype))

    def fused(updates: Updates, state: ScaleByLionState, params: Params, m: Any, c: Any, **extra_args: Any):
        where = "scale_by_lion.update"
        gl, td = fpt.flatten(updates)
        gs = _checks.signature(gl)
        _checks.check_state(where, state, ScaleByLionState, "scale_by_lion.init")
        _checks.check_count(where, "state.count", state.count, gl)
        ml = flatten_like(where, updates, state.mu, "state.mu", td, ref=gl, ref_sig=gs,
                          dtype=mu_dtype or SAME)
        fe = _mt.foreach_ok(gl, ml, _mt.tensors(b1, b2, m, c))
        mu_in = ml if mu_dtype is None else [x.to(g.dtype) for x, g in zip(ml, gl, strict=True)]
        out = _mt.lerp(mu_in, gl, 1 - b1, fe)
        if mode == "smooth":
            out = [torch.tanh(smooth_beta * x) for x in out]
        elif mode == "refined":
            out = [torch.where(torch.abs(x) < 1.0, x, torch.sign(x)) for x in out]
        elif fe:
            out = list(torch._foreach_sign(out))
        else:
            out = [torch.sign(x) for x in out]
        inplace = _mt.inplace_ok(extra_args, gl, ml, fe=fe) and mu_dtype is None
        new_m = _mt.cast(_mt.lerp(mu_in, gl, 1 - b2, fe, inplace=inplace), mu_dtype)
        out = _finish(where, out, m, c, updates, params, fe, td)
        return fpt.unflatten(td, out), ScaleByLionState(state.count + 1, fpt.unflatten(td, new_m))

    return fused_transformation(init_fn, fused)
