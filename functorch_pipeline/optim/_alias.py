"""Named optimizers: each is a docstring and one ``chain`` of building blocks.

Names, argument names and defaults are optax's. Every docstring says which arguments
reproduce ``torch.optim`` exactly (the parity tests in ``tests/test_optim_parity.py``
use exactly those). ``torch.optim``'s coupled ``weight_decay`` (``g + wd * p`` before
the optimizer) is ``chain(add_decayed_weights(wd), <optimizer>)`` everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from functorch_pipeline.optim._adaptive import scale_by_adadelta
from functorch_pipeline.optim._adaptive import scale_by_adam
from functorch_pipeline.optim._adaptive import scale_by_adamax
from functorch_pipeline.optim._adaptive import scale_by_lion
from functorch_pipeline.optim._adaptive import scale_by_nadam
from functorch_pipeline.optim._adaptive import scale_by_radam
from functorch_pipeline.optim._adaptive import scale_by_rms
from functorch_pipeline.optim._adaptive import scale_by_rss
from functorch_pipeline.optim._adaptive import scale_by_stddev
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import ScalarOrSchedule
from functorch_pipeline.optim._base import chain
from functorch_pipeline.optim._base import identity
from functorch_pipeline.optim._checks import check_hyperparameter
from functorch_pipeline.optim._transforms import add_decayed_weights
from functorch_pipeline.optim._transforms import check_number
from functorch_pipeline.optim._transforms import scale_by_learning_rate
from functorch_pipeline.optim._transforms import scale_by_trust_ratio
from functorch_pipeline.optim._transforms import trace

__all__ = [
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "lamb",
    "lion",
    "nadam",
    "radam",
    "rmsprop",
    "sgd",
]


def _lr(name: str, learning_rate: Any) -> None:
    check_hyperparameter(f"{name}(learning_rate)", "learning_rate", learning_rate, schedule=True)
    check_number(f"{name}(learning_rate)", "learning_rate", learning_rate, low=0.0)


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: torch.dtype | None = None,
    *,
    dampening: float = 0.0,
) -> GradientTransformation:
    r"""Stochastic gradient descent, optionally with (Nesterov) momentum.

    ``chain(trace(momentum, nesterov), scale_by_learning_rate(learning_rate))``:
    :math:`t \leftarrow g + \mu t`, update :math:`-\eta t` (or :math:`-\eta (g + \mu t)`).

    Reproduces ``torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov)`` with
    ``chain(add_decayed_weights(weight_decay), sgd(lr, momentum or None, nesterov,
    dampening=dampening))``. ``dampening`` is not in optax; torch applies it from the
    second step on (the first buffer is the raw gradient), and so do we.

    Args:
      learning_rate: a number or a schedule.
      momentum: the momentum coefficient, or ``None`` for plain SGD.
      nesterov: Nesterov momentum.
      accumulator_dtype: dtype of the momentum buffer.
      dampening: torch.optim.SGD's dampening (keyword only; 0 in optax).

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.sgd(0.1)
    >>> opt.update({"w": torch.tensor([1.0])}, opt.init({"w": torch.zeros(1)}))[0]
    {'w': tensor([-0.1000])}
    """
    check_number("sgd(dampening)", "dampening", dampening)
    _lr("sgd", learning_rate)
    if momentum is None and nesterov:
        raise ValueError("sgd(learning_rate, momentum, nesterov): nesterov=True needs a `momentum`")
    return chain(
        trace(momentum, nesterov, accumulator_dtype, dampening=dampening) if momentum is not None else identity(),
        scale_by_learning_rate(learning_rate),
    )


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    r"""Adam: ``chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=...), scale_by_learning_rate(lr))``.

    Reproduces ``torch.optim.Adam(lr, betas=(b1, b2), eps)`` with the same arguments
    (torch adds eps after dividing :math:`\sqrt{v}` by :math:`\sqrt{1-\beta_2^t}`, as we
    do). torch's ``weight_decay`` is ``chain(add_decayed_weights(wd), adam(...))``.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added outside the square root.
      eps_root: added inside the square root; 0 matches ``torch.optim.Adam``. Set it
        (e.g. 1e-12 in float64, 1e-8 in float32) to differentiate through the update
        (meta-learning): with 0, a gradient entry that is exactly 0 gives a NaN
        meta-gradient (:math:`\sqrt{v}` has an infinite derivative at 0), as in optax.
      mu_dtype: dtype of the first moment.
      nesterov: Nesterov form (NAdam).

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.adam(1e-3)
    >>> opt.update({"w": torch.tensor([5.0])}, opt.init({"w": torch.zeros(1)}))[0]
    {'w': tensor([-0.0010])}
    """
    _lr("adam", learning_rate)
    return chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov), scale_by_learning_rate(learning_rate))


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    r"""Adam with decoupled weight decay: update :math:`-\eta(\mathrm{adam}(g) + \lambda p)`.

    optax's default ``weight_decay`` is **1e-4**; ``torch.optim.AdamW``'s is **1e-2**.
    ``adamw(lr, b1, b2, eps, weight_decay=wd)`` reproduces
    ``torch.optim.AdamW(lr, betas=(b1, b2), eps, weight_decay=wd)`` (torch shrinks the
    parameters by :math:`1-\eta\lambda` first, which is the same step).

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1, b2, eps, eps_root, mu_dtype, nesterov: as in :func:`adam`.
      weight_decay: the decoupled decay coefficient (optax 1e-4, torch 1e-2), or a
        schedule of the step count (see :func:`add_decayed_weights`).
      mask: which parameters to decay (tree or function).

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.adamw(0.1, weight_decay=0.5)
    >>> opt.update({"w": torch.tensor([1.0])}, opt.init({"w": torch.ones(1)}), {"w": torch.ones(1)})[0]
    {'w': tensor([-0.1500])}
    """
    _lr("adamw", learning_rate)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def nadam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = True,
    momentum_decay: float | None = None,
) -> GradientTransformation:
    r"""NAdam. By default optax's form: :func:`adam` with ``nesterov=True`` (constant
    momentum coefficient :math:`\beta_1`). optax 0.2.8 defines ``nadam`` as
    ``functools.partial(adam, nesterov=True)``, so it takes ``nesterov=`` too
    (``nesterov=False`` is plain Adam).

    ``torch.optim.NAdam`` uses Dozat's momentum schedule
    :math:`\mu_t = \beta_1(1 - \tfrac12 0.96^{t\psi})` with ``momentum_decay`` ψ = 4e-3,
    which no setting of optax's form reproduces. ``momentum_decay=4e-3`` (keyword only,
    not in optax) switches to :func:`scale_by_nadam` and reproduces
    ``torch.optim.NAdam(lr, betas=(b1, b2), eps, momentum_decay=4e-3)``
    (``eps_root`` and ``mu_dtype`` are not supported then).

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1, b2, eps, eps_root, mu_dtype: as in :func:`adam`.
      nesterov: as in optax's ``adam`` (default True here).
      momentum_decay: (not in optax) torch's ψ; None for optax's form.

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.nadam(1e-3)
    >>> u, _ = opt.update({"w": torch.tensor([5.0])}, opt.init({"w": torch.zeros(1)}))
    >>> u["w"] < 0
    tensor([True])
    """
    _lr("nadam", learning_rate)
    if momentum_decay is not None:
        if not nesterov:
            raise ValueError("nadam(momentum_decay=...): torch's schedule is Nesterov's; "
                             "`nesterov=False` cannot be combined with it")
        if not (isinstance(eps_root, (int, float)) and eps_root == 0) or mu_dtype is not None:
            raise ValueError("nadam(momentum_decay=...): `eps_root` and `mu_dtype` are not supported with momentum_decay")
        return chain(scale_by_nadam(b1, b2, eps, momentum_decay), scale_by_learning_rate(learning_rate))
    return chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
                 scale_by_learning_rate(learning_rate))


def radam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
    eps_before_bias_correction: bool = False,
) -> GradientTransformation:
    r"""Rectified Adam (see :func:`scale_by_radam` for the rule).

    Reproduces ``torch.optim.RAdam(lr, betas=(b1, b2), eps)`` with
    ``radam(lr, b1, b2, eps, threshold=5.0, eps_before_bias_correction=True)``: torch
    rectifies when :math:`\rho_t > 5` (optax: :math:`\rho_t \ge` threshold; the same
    steps, since :math:`\rho_t` is never exactly 5 for :math:`\beta_2` in (0, 1) at integer
    steps in practice) and adds eps to :math:`\sqrt{v_t}` *before* the bias
    correction. Without that flag the two differ by O(eps) per step.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1, b2, eps, eps_root: as in :func:`adam`.
      threshold: rectify when rho_t is at least this.
      nesterov: Nesterov form.
      eps_before_bias_correction: (not in optax) torch's eps placement.

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.radam(0.1)
    >>> opt.update({"w": torch.tensor([5.0])}, opt.init({"w": torch.zeros(1)}))[0]
    {'w': tensor([-0.5000])}
    """
    _lr("radam", learning_rate)
    return chain(
        scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov,
                       eps_before_bias_correction=eps_before_bias_correction),
        scale_by_learning_rate(learning_rate),
    )


def adamax(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    r"""Adamax (Adam with an infinity norm): ``chain(scale_by_adamax(b1, b2, eps), scale_by_learning_rate(lr))``.

    Reproduces ``torch.optim.Adamax(lr, betas=(b1, b2), eps)`` with the same arguments
    (torch's default lr is 2e-3).

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1: decay of the first moment.
      b2: decay of the infinity norm.
      eps: added to ``|g|``.

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.adamax(0.1)
    >>> opt.update({"w": torch.tensor([5.0])}, opt.init({"w": torch.zeros(1)}))[0]
    {'w': tensor([-0.1000])}
    """
    _lr("adamax", learning_rate)
    return chain(scale_by_adamax(b1, b2, eps), scale_by_learning_rate(learning_rate))


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> GradientTransformation:
    r"""RMSProp: divide by the root of an EMA of squared gradients, then optional momentum.

    Reproduces ``torch.optim.RMSprop(lr, alpha, eps, momentum, centered)`` with
    ``rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False, centered=centered,
    momentum=momentum or None)``: torch's default ``alpha`` is 0.99 (optax's ``decay``
    0.9) and torch adds eps *outside* the square root (optax inside, ``eps_in_sqrt=True``).
    torch's momentum buffer is ``mu * buf + g / avg`` applied as ``-lr * buf``, which is
    optax's ``trace`` placed after the learning rate.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      decay: decay of the squared-gradient average (torch's alpha).
      eps: numerical stability term.
      initial_scale: starting value of the average.
      eps_in_sqrt: eps inside (optax) or outside (torch) the root.
      centered: divide by the standard deviation instead.
      momentum: optional momentum (after the learning rate).
      nesterov: Nesterov momentum.
      bias_correction: debias the averages.

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.rmsprop(0.1, decay=0.0, eps=0.0)
    >>> opt.update({"w": torch.tensor([5.0])}, opt.init({"w": torch.zeros(1)}))[0]
    {'w': tensor([-0.1000])}
    """
    _lr("rmsprop", learning_rate)
    scaler = scale_by_stddev if centered else scale_by_rms
    return chain(
        scaler(decay, eps, initial_scale, eps_in_sqrt, bias_correction),
        scale_by_learning_rate(learning_rate),
        trace(momentum, nesterov) if momentum is not None else identity(),
    )


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    eps_in_sqrt: bool = True,
) -> GradientTransformation:
    r"""AdaGrad: divide by the root of the running sum of squared gradients.

    optax's defaults are ``initial_accumulator_value=0.1, eps=1e-7`` with eps inside the
    root; torch's are 0 and 1e-10 with eps outside. ``adagrad(lr,
    initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False)`` reproduces
    ``torch.optim.Adagrad(lr)`` (``lr_decay=0``; ``eps_in_sqrt`` is not in optax).

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      initial_accumulator_value: the starting sum of squares.
      eps: numerical stability term.
      eps_in_sqrt: (not in optax) False puts eps outside the root, as torch.

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0)
    >>> opt.update({"w": torch.tensor([5.0])}, opt.init({"w": torch.zeros(1)}))[0]
    {'w': tensor([-0.1000])}
    """
    _lr("adagrad", learning_rate)
    return chain(scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt=eps_in_sqrt), scale_by_learning_rate(learning_rate))


def adadelta(
    learning_rate: ScalarOrSchedule,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
) -> GradientTransformation:
    r"""AdaDelta. ``weight_decay`` is added to the gradient first (coupled, as torch).

    ``adadelta(lr, rho, eps, weight_decay)`` reproduces
    ``torch.optim.Adadelta(lr, rho, eps, weight_decay)`` (torch's default lr is 1.0).

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      rho: decay of both running averages.
      eps: added inside both square roots.
      weight_decay: coupled weight decay (added to the gradient first), or a schedule
        of the step count.
      weight_decay_mask: which parameters to decay (tree or function).

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.adadelta(1.0, eps=1.0)
    >>> opt.update({"w": torch.tensor([0.0])}, opt.init({"w": torch.zeros(1)}))[0]
    {'w': tensor([-0.])}
    """
    _lr("adadelta", learning_rate)
    return chain(
        add_decayed_weights(weight_decay, weight_decay_mask),
        scale_by_adadelta(rho, eps),
        scale_by_learning_rate(learning_rate),
    )


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-3,
    mask: Any = None,
) -> GradientTransformation:
    r"""Lion: :math:`u = -\eta(\mathrm{sign}(\beta_1 m + (1-\beta_1) g) + \lambda p)`,
    then :math:`m \leftarrow \beta_2 m + (1-\beta_2) g`. No torch.optim counterpart.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1: interpolation for the sign direction.
      b2: decay of the momentum.
      mu_dtype: dtype of the momentum.
      weight_decay: decoupled decay (optax default 1e-3), or a schedule of the step count.
      mask: which parameters to decay.

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.lion(0.1, weight_decay=0.0)
    >>> opt.update({"w": torch.tensor([5.0])}, opt.init({"w": torch.zeros(1)}), {"w": torch.zeros(1)})[0]
    {'w': tensor([-0.1000])}
    """
    _lr("lion", learning_rate)
    return chain(
        scale_by_lion(b1, b2, mu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    r"""LAMB: Adam's direction plus weight decay, rescaled per leaf by the trust ratio
    :math:`\|p\| / \|u\|`. No torch.optim counterpart.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      b1, b2, eps, eps_root: as in :func:`adam`.
      weight_decay: decoupled decay, or a schedule of the step count.
      mask: which parameters to decay.

    Returns:
      A :class:`GradientTransformation`.

    >>> import functorch_pipeline as fp
    >>> opt = fp.optim.lamb(0.1)
    >>> p = {"w": torch.tensor([3.0, 4.0])}
    >>> opt.update({"w": torch.tensor([1.0, 0.0])}, opt.init(p), p)[0]
    {'w': tensor([-0.5000, 0.0000])}
    """
    _lr("lamb", learning_rate)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root),
        add_decayed_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )
