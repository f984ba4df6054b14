"""More named optimizers (optax 0.2.8's names, arguments and defaults), each one
``chain`` of building blocks. Which of them reproduce ``torch.optim`` (and with which
arguments) is said in each docstring; ``tests/test_optim_more.py`` checks exactly that.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from functorch_pipeline.optim import _mt
from functorch_pipeline.optim._adaptive import scale_by_adam
from functorch_pipeline.optim._adaptive import scale_by_adamax
from functorch_pipeline.optim._alias import _lr
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import ScalarOrSchedule
from functorch_pipeline.optim._base import chain
from functorch_pipeline.optim._base import stateless_with_tree_map
from functorch_pipeline.optim._factorized import clip_by_block_rms
from functorch_pipeline.optim._factorized import scale_by_factored_rms
from functorch_pipeline.optim._factorized import scale_by_param_block_rms
from functorch_pipeline.optim._masking import masked
from functorch_pipeline.optim._scalers_more import scale_by_amsgrad
from functorch_pipeline.optim._scalers_more import scale_by_belief
from functorch_pipeline.optim._scalers_more import scale_by_novograd
from functorch_pipeline.optim._scalers_more import scale_by_optimistic_gradient
from functorch_pipeline.optim._scalers_more import scale_by_rprop
from functorch_pipeline.optim._scalers_more import scale_by_sign
from functorch_pipeline.optim._scalers_more import scale_by_yogi
from functorch_pipeline.optim._transforms import add_decayed_weights
from functorch_pipeline.optim._transforms import check_number
from functorch_pipeline.optim._transforms import scale
from functorch_pipeline.optim._transforms import scale_by_learning_rate
from functorch_pipeline.optim._transforms import scale_by_trust_ratio
from functorch_pipeline.optim._transforms import trace
from functorch_pipeline.optim._wrappers import ema
from functorch_pipeline.optim._wrappers_more import add_noise

__all__ = [
    "adabelief",
    "adafactor",
    "adamaxw",
    "amsgrad",
    "fromage",
    "lars",
    "nadamw",
    "noisy_sgd",
    "novograd",
    "optimistic_gradient_descent",
    "rprop",
    "sign_sgd",
    "yogi",
]


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    debias_after_max: bool = False,
) -> GradientTransformation:
    r"""AMSGrad: ``chain(scale_by_amsgrad(...), scale_by_learning_rate(lr))``; see
    :func:`scale_by_amsgrad` for the rule.

    optax's AMSGrad keeps the maximum of the bias-corrected second moment;
    ``torch.optim.Adam(lr, betas=(b1, b2), eps, amsgrad=True)`` keeps the maximum of the raw
    one and is reproduced by ``amsgrad(lr, b1, b2, eps, debias_after_max=True)``.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1, b2, eps, eps_root, mu_dtype: as in :func:`adam`.
      debias_after_max: (not in optax) torch's order of max and bias correction.

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.amsgrad(0.1)
      >>> opt.update({"w": torch.tensor([5.0])}, opt.init({"w": torch.zeros(1)}))[0]
      {'w': tensor([-0.1000])}
    """
    _lr("amsgrad", learning_rate)
    return chain(
        scale_by_amsgrad(b1, b2, eps, eps_root, mu_dtype, debias_after_max=debias_after_max),
        scale_by_learning_rate(learning_rate),
    )


def adabelief(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    r"""AdaBelief: ``chain(scale_by_belief(...), scale_by_learning_rate(lr))``; the
    update is :math:`-\eta\,\hat m_t / (\sqrt{\hat s_t} + \epsilon)` with :math:`s` the EMA
    of :math:`(g_t - m_t)^2` (see :func:`scale_by_belief`). No torch.optim counterpart.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1, b2: decays of the first and belief moments.
      eps: added outside the square root (optax default 1e-16).
      eps_root: added to the belief moment (optax default 1e-16).
      nesterov: Nesterov form of the first moment.

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.adabelief(0.1)
      >>> opt.update({"w": torch.tensor([5.0])}, opt.init({"w": torch.zeros(1)}))[0]
      {'w': tensor([-0.1111])}
    """
    _lr("adabelief", learning_rate)
    return chain(scale_by_belief(b1, b2, eps, eps_root, nesterov=nesterov),
                 scale_by_learning_rate(learning_rate))


def adamaxw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
) -> GradientTransformation:
    r"""Adamax with decoupled weight decay: :math:`-\eta(\mathrm{adamax}(g) + \lambda p)`.

    ``chain(scale_by_adamax(b1, b2, eps), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(lr))``. ``torch.optim.Adamax`` has only coupled decay; with
    ``weight_decay=0`` this is :func:`adamax`, which reproduces it.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1, b2, eps: as in :func:`adamax`.
      weight_decay: the decoupled decay (optax default 1e-4), or a schedule of the
        step count.
      mask: which parameters to decay (tree or function).

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.adamaxw(0.1, weight_decay=0.5)
      >>> p = {"w": torch.ones(1)}
      >>> opt.update({"w": torch.tensor([2.0])}, opt.init(p), p)[0]
      {'w': tensor([-0.1500])}
    """
    _lr("adamaxw", learning_rate)
    return chain(scale_by_adamax(b1, b2, eps), add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate))


def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = True,
) -> GradientTransformation:
    r"""NAdamW: :func:`adamw` with ``nesterov=True`` (optax defines it exactly so).

    The first moment :math:`\hat m_t` becomes
    :math:`\beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)`; the update is
    :math:`-\eta(\hat m_t/(\sqrt{\hat v_t+\epsilon_{root}}+\epsilon) + \lambda p)`.
    ``torch.optim.NAdam`` uses Dozat's schedule
    :math:`\mu_t = \beta_1(1 - \tfrac12 0.96^{t\psi})`; a huge ``momentum_decay`` ψ makes
    :math:`0.96^{t\psi}` underflow to 0, so :math:`\mu_t = \beta_1` exactly and torch's
    rule becomes this one: ``nadamw(lr, b1, b2, eps, weight_decay=wd)`` reproduces
    ``torch.optim.NAdam(lr, betas=(b1, b2), eps, weight_decay=wd, momentum_decay=1e9,
    decoupled_weight_decay=True)``.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1, b2, eps, eps_root, mu_dtype, weight_decay, mask: as in :func:`adamw`.
      nesterov: as in optax (``functools.partial(adamw, nesterov=True)``).

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.nadamw(1e-3)
      >>> p = {"w": torch.zeros(1)}
      >>> bool(opt.update({"w": torch.tensor([5.0])}, opt.init(p), p)[0]["w"] < 0)
      True
    """
    _lr("nadamw", learning_rate)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def lars(
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = True,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    trust_ratio_mask: Any = True,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> GradientTransformation:
    r"""LARS (You et al., 2017): weight decay, the layer-wise trust ratio, then momentum.

    ``chain(add_decayed_weights(wd, weight_decay_mask), masked(scale_by_trust_ratio(
    trust_coefficient=c, eps=eps), trust_ratio_mask), scale_by_learning_rate(lr),
    trace(momentum, nesterov))``: per leaf,
    :math:`d = g + \lambda p`, :math:`d \leftarrow c\,\|p\|/(\|d\|+\epsilon)\, d`,
    :math:`t \leftarrow -\eta d + \mu t`, update :math:`t`. No torch.optim counterpart.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      weight_decay: coupled decay added before the trust ratio, or a schedule of the
        step count.
      weight_decay_mask: which parameters to decay (default all).
      trust_coefficient: :math:`c`.
      eps: added to the update norm.
      trust_ratio_mask: which parameters get the trust ratio (default all).
      momentum: the momentum :math:`\mu`.
      nesterov: Nesterov momentum.

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.lars(1.0, trust_coefficient=1.0)
      >>> p = {"w": torch.tensor([3.0, 4.0])}
      >>> opt.update({"w": torch.tensor([1.0, 0.0])}, opt.init(p), p)[0]
      {'w': tensor([-5., -0.])}
    """
    check_number("lars(trust_coefficient)", "trust_coefficient", trust_coefficient)
    check_number("lars(momentum)", "momentum", momentum)
    check_number("lars(eps)", "eps", eps)
    _lr("lars", learning_rate)
    return chain(
        add_decayed_weights(weight_decay, weight_decay_mask),
        masked(scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
               trust_ratio_mask),
        scale_by_learning_rate(learning_rate),
        trace(momentum, nesterov),
    )


def novograd(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.25,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    r"""NovoGrad: ``chain(scale_by_novograd(...), scale_by_learning_rate(lr))``, layer-wise
    second moments (one number per leaf); see :func:`scale_by_novograd`. No torch.optim
    counterpart.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1, b2, eps, eps_root: as in :func:`scale_by_novograd` (optax's ``eps`` here is 1e-6).
      weight_decay: added to the normalised gradient (needs ``params`` when nonzero); a
        number or a 0-d tensor, not a schedule (a TypeError, as optax takes none either:
        use ``inject_hyperparams(novograd)`` for a scheduled decay).

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.novograd(0.1, eps=0.0)
      >>> opt.update({"w": torch.tensor([3.0, 4.0])}, opt.init({"w": torch.zeros(2)}))[0]
      {'w': tensor([-0.0600, -0.0800])}
    """
    _lr("novograd", learning_rate)
    if callable(weight_decay) and not isinstance(weight_decay, torch.Tensor):
        raise TypeError(
            "novograd(weight_decay): `weight_decay` must be a number or a 0-d tensor, not a "
            "schedule (as in optax 0.2.8, whose novograd fails on one); for a scheduled decay "
            "use inject_hyperparams(novograd)(..., weight_decay=schedule)")
    return chain(scale_by_novograd(b1, b2, eps, eps_root, weight_decay),
                 scale_by_learning_rate(learning_rate))


def yogi(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
) -> GradientTransformation:
    r"""Yogi: ``chain(scale_by_yogi(b1, b2, eps), scale_by_learning_rate(lr))``; Adam with
    an additive, sign-controlled second moment (see :func:`scale_by_yogi`). No torch.optim
    counterpart.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1, b2: decay of the first moment and rate of the second.
      eps: added outside the square root (optax default 1e-3).

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.yogi(0.1)
      >>> u, _ = opt.update({"w": torch.tensor([5.0])}, opt.init({"w": torch.zeros(1)}))
      >>> round(float(u["w"]), 4)
      -0.1
    """
    _lr("yogi", learning_rate)
    return chain(scale_by_yogi(b1, b2, eps), scale_by_learning_rate(learning_rate))


def sign_sgd(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    r"""SignSGD: :math:`u = -\eta\,\mathrm{sign}(g)`. No torch.optim counterpart.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.sign_sgd(0.1)
      >>> opt.update({"w": torch.tensor([5.0, -0.01, 0.0])}, opt.init(None))[0]
      {'w': tensor([-0.1000,  0.1000, -0.0000])}
    """
    _lr("sign_sgd", learning_rate)
    return chain(scale_by_sign(), scale_by_learning_rate(learning_rate))


def rprop(
    learning_rate: float,
    eta_minus: float = 0.5,
    eta_plus: float = 1.2,
    min_step_size: float = 1e-6,
    max_step_size: float = 50.0,
) -> GradientTransformation:
    r"""Rprop: ``chain(scale_by_rprop(...), scale(-1))``; see :func:`scale_by_rprop`.

    ``rprop(lr, eta_minus, eta_plus, min_step_size, max_step_size)`` reproduces
    ``torch.optim.Rprop(lr, etas=(eta_minus, eta_plus), step_sizes=(min_step_size,
    max_step_size))``. optax 0.2.8's rprop lags one step behind that rule (NOTE [rprop
    stale update] in ``_scalers_more.py``); we do not copy its bug.

    Args:
      learning_rate: the initial step size (torch's ``lr``; default there 1e-2).
      eta_minus, eta_plus: step-size factors on a sign change / no change.
      min_step_size, max_step_size: bounds of the step sizes.

    Returns:
      A :class:`GradientTransformation`.

    Notes:
      NOTE [rprop stale update]: optax 0.2.8's ``scale_by_rprop`` returns the previous step's update
        (optax PR #1725); this follows the published rule, which is also ``torch.optim.Rprop``'s.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.rprop(0.1)
      >>> opt.update({"w": torch.tensor([5.0, -2.0])}, opt.init({"w": torch.zeros(2)}))[0]
      {'w': tensor([-0.1000,  0.1000])}
    """
    return chain(scale_by_rprop(learning_rate, eta_minus, eta_plus, min_step_size,
                                max_step_size), scale(-1.0))


def adafactor(
    learning_rate: ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: torch.dtype | None = None,
    weight_decay_rate: ScalarOrSchedule | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: Any = None,
) -> GradientTransformation:
    r"""Adafactor (Shazeer and Stern, 2018), optax's composition:

    ``chain(scale_by_factored_rms(factored, decay_rate, decay_offset,
    min_dim_size_to_factor, eps), clip_by_block_rms(clipping_threshold),
    scale_by_learning_rate(lr, flip_sign=False), scale_by_param_block_rms(),
    ema(momentum, debias=False), add_decayed_weights(weight_decay_rate, mask), scale(-1))``,
    each optional piece present only when its argument asks for it. So the update is
    :math:`-(\eta\,\max(\mathrm{rms}(p), 10^{-3})\,\mathrm{clip}(g/\sqrt{\hat V}) + \lambda p)`.

    ``torch.optim.Adafactor`` (torch >= 2.5) is a different variant (relative step sizes,
    no clipping, ``beta2_decay=-0.8`` with an ``eps`` pair), so it is not a reference.

    Args:
      learning_rate: a number, a schedule, or None (no learning-rate factor).
      min_dim_size_to_factor: factor only leaves with two axes at least this long.
      decay_rate: exponent of the second-moment decay schedule.
      decay_offset: step offset of that schedule (fine-tuning).
      multiply_by_parameter_scale: multiply by each parameter's RMS (floored at 1e-3).
      clipping_threshold: block-RMS clipping threshold, or None.
      momentum: EMA coefficient of the updates, or None.
      dtype_momentum: dtype of the momentum buffer. optax defaults to float32; here None
        means the parameters' dtype (fp.optim does not promote, NOTE [leaf dtypes]).
      weight_decay_rate: decoupled decay (a number, a 0-d tensor or a schedule of the
        step count), or None.
      eps: added to :math:`g^2`.
      factored: whether to factor the second moment at all.
      weight_decay_mask: which parameters to decay.

    Returns:
      A :class:`GradientTransformation`.

    Notes:
      NOTE [leaf dtypes]: fp.optim does not promote dtypes: a gradient leaf must have its
        parameter's dtype and a state leaf the gradient's (or the requested state dtype), else a
        ``TypeError`` names the key path; optax promotes instead.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.adafactor(0.1, multiply_by_parameter_scale=False)
      >>> p = {"w": torch.zeros(2)}
      >>> opt.update({"w": torch.tensor([2.0, -2.0])}, opt.init(p), p)[0]
      {'w': tensor([-0.1000,  0.1000])}
    """
    check_number("adafactor(clipping_threshold)", "clipping_threshold", clipping_threshold)
    if learning_rate is not None:
        _lr("adafactor", learning_rate)
    tx = [scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor,
                                eps)]
    if clipping_threshold is not None:
        tx.append(clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        tx.append(scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        tx.append(scale_by_param_block_rms())
    if momentum is not None:
        tx.append(ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    if weight_decay_rate is not None:
        tx.append(add_decayed_weights(weight_decay_rate, weight_decay_mask))
    tx.append(scale(-1.0))
    return chain(*tx)


def noisy_sgd(
    learning_rate: ScalarOrSchedule,
    eta: float = 0.01,
    gamma: float = 0.55,
    key: int | torch.Tensor | None = None,
    *,
    seed: int | None = None,
) -> GradientTransformation:
    r"""SGD on gradients with annealed Gaussian noise (Neelakantan et al., 2015):
    ``chain(add_noise(eta, gamma, key), scale_by_learning_rate(lr))``, i.e.
    :math:`u_t = -\eta_{lr}(g_t + \sigma_t z_t)`, :math:`\sigma_t^2 = \eta/t^\gamma`.

    optax 0.2.8 takes ``key`` (older versions ``seed``, accepted as a keyword); an int is
    a seed; with neither, seed 0 (the old optax default).

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      eta: base variance of the noise.
      gamma: annealing exponent.
      key: an ``fp.random`` key or an int seed.
      seed: the older spelling of ``key``.

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.noisy_sgd(0.1, eta=0.0)
      >>> opt.update({"w": torch.tensor([2.0])}, opt.init({"w": torch.zeros(1)}))[0]
      {'w': tensor([-0.2000])}
    """
    _lr("noisy_sgd", learning_rate)
    if key is None and seed is None:
        seed = 0
    return chain(add_noise(eta, gamma, key, seed=seed), scale_by_learning_rate(learning_rate))


def fromage(learning_rate: float | torch.Tensor, min_norm: float = 1e-6) -> GradientTransformation:
    r"""Fromage (Bernstein et al., 2020): the update of each leaf is rescaled to
    :math:`\eta\,\|p\|` and the result shrunk by :math:`1/\sqrt{1+\eta^2}`:

    .. math::
        p \leftarrow \frac{p - \eta\,\frac{\|p\|}{\|g\|} g}{\sqrt{1 + \eta^2}}

    (``chain(scale_by_trust_ratio(min_norm), scale_by_learning_rate(lr * m),
    add (m - 1) p)`` with :math:`m = 1/\sqrt{1+\eta^2}`; norms floored at ``min_norm``).
    ``learning_rate`` is a number or a 0-d tensor, not a schedule (as in optax, whose
    fromage computes :math:`m` from it once); ``inject_hyperparams(fromage)`` takes a
    schedule.

    Args:
      learning_rate: :math:`\eta` (a number or a 0-d tensor).
      min_norm: floor of both norms.

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.fromage(0.75)
      >>> p = {"w": torch.tensor([3.0, 4.0])}
      >>> u, _ = opt.update({"w": torch.tensor([1.0, 0.0])}, opt.init(p), p)
      >>> fp.optim.apply_updates(p, u)
      {'w': tensor([-0.6000,  3.2000])}
    """
    check_number("fromage(min_norm)", "min_norm", min_norm)
    if callable(learning_rate) and not isinstance(learning_rate, torch.Tensor):
        raise TypeError(
            "fromage(learning_rate): must be a number or a 0-d tensor, not a schedule (optax's "
            "fromage takes none either); for a scheduled learning rate use "
            "inject_hyperparams(fromage)(learning_rate=schedule)")
    _lr("fromage", learning_rate)
    if isinstance(learning_rate, torch.Tensor):
        mult_t = 1.0 / torch.sqrt(1.0 + learning_rate**2)

        def shrink(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            # NOTE [scalar dtype]: the tensor factor must not promote a 0-d leaf
            return _mt.to_leaf(u + _mt.leaf_scalar(mult_t - 1.0, p) * p, u)

        return chain(
            scale_by_trust_ratio(min_norm),
            scale_by_learning_rate(learning_rate * mult_t),
            stateless_with_tree_map(shrink),
        )
    mult = 1.0 / math.sqrt(1.0 + learning_rate**2)
    return chain(
        scale_by_trust_ratio(min_norm),
        scale_by_learning_rate(learning_rate * mult),
        stateless_with_tree_map(lambda u, p: u + (mult - 1.0) * p),
    )


def optimistic_gradient_descent(
    learning_rate: ScalarOrSchedule, alpha: float = 1.0, beta: float = 1.0
) -> GradientTransformation:
    r"""Optimistic gradient descent (Mokhtari et al., 2019), optax's form:
    :math:`u_t = -\eta\big((\alpha + \beta) g_t - \beta g_{t-1}\big)` with
    :math:`g_0 := g_1` (the first step is :math:`-\eta\alpha g_1`).

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      alpha: weight of the current gradient.
      beta: weight of the (negative) momentum term.

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.optimistic_gradient_descent(0.1)
      >>> s = opt.init({"w": torch.zeros(1)})
      >>> u, s = opt.update({"w": torch.tensor([1.0])}, s)
      >>> u, s = opt.update({"w": torch.tensor([3.0])}, s); u
      {'w': tensor([-0.5000])}
    """
    _lr("optimistic_gradient_descent", learning_rate)
    return chain(scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(learning_rate))
