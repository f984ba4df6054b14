"""Adafactor's building blocks: the factored second-moment scaling and the per-leaf
(block) RMS clipping and scaling, with optax's names and rules.

Leaf by leaf in plain torch ops (differentiable, ``vmap``/``torch.compile`` safe); the
factoring decision depends on shapes only, so it is fixed per leaf.
"""

from __future__ import annotations

from collections.abc import Callable
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
from functorch_pipeline.optim._base import mismatch_error
from functorch_pipeline.optim._base import require_params
from functorch_pipeline.optim._base import zero_count
from functorch_pipeline.optim._transforms import check_number

__all__ = [
    "FactoredState",
    "clip_by_block_rms",
    "scale_by_factored_rms",
    "scale_by_param_block_norm",
    "scale_by_param_block_rms",
]


def _decay_rate_pow(i: torch.Tensor, exponent: float = 0.8) -> torch.Tensor:
    """Adafactor's second-moment decay :math:`1 - (i+1)^{-exponent}`."""
    return 1.0 - (i + 1.0) ** (-exponent)


def _factored_dims(shape: tuple, factored: bool, min_dim: int) -> tuple[int, int] | None:
    """The two largest axes ``(d1, d0)`` (d0 the largest), or None (not factored)."""
    if not factored or len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: shape[i])  # stable, like np.argsort
    if shape[order[-2]] < min_dim:
        return None
    return order[-2], order[-1]


class FactoredState(NamedTuple):
    """State of :func:`scale_by_factored_rms`. Factored leaves keep ``v_row``/``v_col``
    (and a ``(1,)`` placeholder in ``v``); the others keep ``v`` (and placeholders).

    Attributes:
        count: the number of updates so far (a 0-d int tensor).
        v_row: per-row EMAs of squared gradients (factored leaves).
        v_col: per-column EMAs of squared gradients (factored leaves).
        v: full EMAs of squared gradients (unfactored leaves).
    """

    count: torch.Tensor
    v_row: Any
    v_col: Any
    v: Any


def scale_by_factored_rms(
    factored: bool = True,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
    decay_rate_fn: Callable[[torch.Tensor, float], torch.Tensor] = _decay_rate_pow,
) -> GradientTransformation:
    r"""Divide by a factored estimate of the gradient RMS (Adafactor, Shazeer and Stern 2018).

    With :math:`\hat\beta_t = 1 - (t - \text{offset} + 1)^{-\text{decay\_rate}}` (``t`` from
    0) and :math:`G = g^2 + \epsilon`: for a leaf whose two largest axes ``d1 < d0`` (by
    size) are both at least ``min_dim_size_to_factor``,

    .. math::
        R_t = \hat\beta_t R_{t-1} + (1-\hat\beta_t)\,\mathrm{mean}_{d0}(G),\quad
        C_t = \hat\beta_t C_{t-1} + (1-\hat\beta_t)\,\mathrm{mean}_{d1}(G),\\
        u = g \cdot \Big(\frac{R_t}{\mathrm{mean}_{d1}(R_t)}\Big)^{-1/2} \cdot C_t^{-1/2}

    otherwise :math:`v_t = \hat\beta_t v_{t-1} + (1-\hat\beta_t) G` and
    :math:`u = g\,v_t^{-1/2}`.

    Args:
      factored: whether to factor leaves with two large axes.
      decay_rate: the exponent of the decay schedule.
      step_offset: subtracted from the step (fine-tuning restarts).
      min_dim_size_to_factor: both factored axes must be at least this long.
      epsilon: added to :math:`g^2`.
      decay_rate_fn: ``(step, decay_rate) -> beta``; default Adafactor's power law.

    Returns:
      A :class:`GradientTransformation` whose state is a :class:`FactoredState`.

    Example:
      >>> tx = scale_by_factored_rms(min_dim_size_to_factor=2)
      >>> p = {"w": torch.ones(2, 3)}
      >>> u, s = tx.update({"w": torch.full((2, 3), 2.0)}, tx.init(p), p)
      >>> u["w"]
      tensor([[1., 1., 1.],
              [1., 1., 1.]])
    """
    check_number("scale_by_factored_rms(decay_rate)", "decay_rate", decay_rate)
    check_number("scale_by_factored_rms(epsilon)", "epsilon", epsilon, low=0.0)

    def _shapes(shape: tuple) -> tuple[tuple, tuple, tuple]:
        """Expected shapes of (v_row, v_col, v) for a leaf of ``shape``."""
        dims = _factored_dims(shape, factored, min_dim_size_to_factor)
        if dims is None:
            return (1,), (1,), tuple(shape)
        d1, d0 = dims
        vr = tuple(s for i, s in enumerate(shape) if i != d0)
        vc = tuple(s for i, s in enumerate(shape) if i != d1)
        return vr, vc, (1,)

    def init_fn(params: Params) -> FactoredState:
        def make(p: torch.Tensor, k: int) -> torch.Tensor:
            return torch.zeros(_shapes(tuple(p.shape))[k], dtype=p.dtype, device=p.device)

        return FactoredState(
            zero_count(params),
            fpt.map(lambda p: make(p, 0), params),
            fpt.map(lambda p: make(p, 1), params),
            fpt.map(lambda p: make(p, 2), params),
        )

    def update_fn(updates: Updates, state: FactoredState, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, FactoredState]:
        where = "scale_by_factored_rms.update"
        gl, td = fpt.flatten(updates)
        _checks.check_state(where, state, FactoredState, "scale_by_factored_rms.init")
        _checks.check_count(where, "state.count", state.count, gl)
        trees = []
        for k, name in enumerate(("state.v_row", "state.v_col", "state.v")):
            tree = getattr(state, name[6:])
            try:
                leaves = td.flatten_up_to(tree)
            except (ValueError, TypeError):
                raise mismatch_error(where, "updates", updates, name, tree) from None
            # the expected layout's shape, the update's dtype and device (NOTE [leaf checks])
            for i, (x, g) in enumerate(zip(leaves, gl, strict=True)):
                want = _shapes(tuple(g.shape))[k]
                if not isinstance(x, torch.Tensor) or tuple(x.shape) != want \
                        or x.dtype != g.dtype or x.device != g.device:
                    got = (f"shape {tuple(x.shape)}, {x.dtype} on {x.device}"
                           if isinstance(x, torch.Tensor) else f"a {type(x).__name__}")
                    err = TypeError if not isinstance(x, torch.Tensor) or x.dtype != g.dtype \
                        else ValueError
                    raise err(
                        f"{where}: leaf at path `{_checks._path(updates, i)}` of `{name}` "
                        f"should have shape {want}, dtype {g.dtype} on {g.device} "
                        f"for an update of shape {tuple(g.shape)}; got {got}"
                    )
            trees.append(leaves)
        rl, cl, vl = trees
        step = (state.count - step_offset).to(_mt.scalar_dtype(gl)) if gl else state.count
        beta = decay_rate_fn(step, decay_rate)
        out, nr, nc, nv = [], [], [], []
        for g, r, c, v in zip(gl, rl, cl, vl, strict=True):
            b = beta.to(g.dtype) if isinstance(beta, torch.Tensor) else beta
            gsq = _mt.to_leaf(g * g + _mt.leaf_scalar(epsilon, g), g)  # NOTE [scalar dtype]
            dims = _factored_dims(tuple(g.shape), factored, min_dim_size_to_factor)
            if dims is None:
                v = b * v + (1 - b) * gsq
                out.append(g * torch.rsqrt(v))
                nr.append(r.clone())
                nc.append(c.clone())
                nv.append(v)
                continue
            d1, d0 = dims
            r = b * r + (1 - b) * gsq.mean(dim=d0)
            c = b * c + (1 - b) * gsq.mean(dim=d1)
            rd1 = d1 - 1 if d1 > d0 else d1
            row = torch.rsqrt(r / r.mean(dim=rd1, keepdim=True))
            col = torch.rsqrt(c)
            out.append(g * row.unsqueeze(d0) * col.unsqueeze(d1))
            nr.append(r)
            nc.append(c)
            nv.append(v.clone())
        un = fpt.unflatten
        return un(td, out), FactoredState(state.count + 1, un(td, nr), un(td, nc), un(td, nv))

    return GradientTransformation(init_fn, update_fn)


def clip_by_block_rms(threshold: float) -> GradientTransformation:
    r"""Clip each leaf to an RMS of at most ``threshold``:
    :math:`u / \max(1, \mathrm{rms}(u)/\tau)` with
    :math:`\mathrm{rms}(u)=\sqrt{\mathrm{mean}(u^2)}`.

    Args:
      threshold: the largest RMS per leaf (:math:`\tau`).

    Returns:
      A :class:`GradientTransformation` (stateless).

    Example:
      >>> tx = clip_by_block_rms(1.0)
      >>> tx.update({"w": torch.tensor([3.0, -3.0]), "b": torch.tensor([0.5])}, tx.init(None))[0]
      {'w': tensor([ 1., -1.]), 'b': tensor([0.5000])}
    """
    check_number("clip_by_block_rms(threshold)", "threshold", threshold, low=0.0)

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, Any]:
        ul, td = fpt.flatten(updates)
        _checks.check_float("clip_by_block_rms.update", ul, updates)
        # per leaf: an injected threshold must not promote a 0-d leaf (NOTE [scalar dtype])
        out = [_mt.to_leaf(u / torch.clamp(torch.sqrt(torch.mean(u * u))
                                           / _mt.leaf_scalar(threshold, u), min=1.0), u)
               for u in ul]
        return fpt.unflatten(td, out), state

    return GradientTransformation(init_fn, update_fn)


def scale_by_param_block_rms(min_scale: float = 1e-3) -> GradientTransformation:
    r"""Multiply each leaf's update by its parameter's RMS, floored at ``min_scale``:
    :math:`u \cdot \max(\sqrt{\mathrm{mean}(p^2)}, s_{min})`.

    Args:
      min_scale: the floor of the factor.

    Returns:
      A :class:`GradientTransformation` (stateless; needs ``params``).

    Example:
      >>> tx = scale_by_param_block_rms()
      >>> tx.update({"w": torch.ones(2)}, tx.init(None), {"w": torch.tensor([3.0, -3.0])})[0]
      {'w': tensor([3., 3.])}
    """
    check_number("scale_by_param_block_rms(min_scale)", "min_scale", min_scale, low=0.0)

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, Any]:
        where = "scale_by_param_block_rms.update"
        require_params(where, params)
        ul, td = fpt.flatten(updates)
        pl = flatten_like(where, updates, params, "params", td, ref=ul)
        out = [_mt.to_leaf(u * torch.clamp(torch.sqrt(torch.mean(p * p)),
                                           min=_mt.leaf_scalar(min_scale, u)), u)
               for u, p in zip(ul, pl, strict=True)]  # NOTE [scalar dtype]
        return fpt.unflatten(td, out), state

    return GradientTransformation(init_fn, update_fn)


def scale_by_param_block_norm(min_scale: float = 1e-3) -> GradientTransformation:
    r"""Multiply each leaf's update by its parameter's L2 norm, floored at ``min_scale``:
    :math:`u \cdot \max(\|p\|_2, s_{min})`.

    Args:
      min_scale: the floor of the factor.

    Returns:
      A :class:`GradientTransformation` (stateless; needs ``params``).

    Example:
      >>> tx = scale_by_param_block_norm()
      >>> tx.update({"w": torch.ones(2)}, tx.init(None), {"w": torch.tensor([3.0, -4.0])})[0]
      {'w': tensor([5., 5.])}
    """
    check_number("scale_by_param_block_norm(min_scale)", "min_scale", min_scale, low=0.0)

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: Any, params: Params = None,
                  **extra_args: Any) -> tuple[Updates, Any]:
        where = "scale_by_param_block_norm.update"
        require_params(where, params)
        ul, td = fpt.flatten(updates)
        pl = flatten_like(where, updates, params, "params", td, ref=ul)
        out = [_mt.to_leaf(u * torch.clamp(torch.linalg.vector_norm(p),
                                           min=_mt.leaf_scalar(min_scale, u)), u)
               for u, p in zip(ul, pl, strict=True)]  # NOTE [scalar dtype]
        return fpt.unflatten(td, out), state

    return GradientTransformation(init_fn, update_fn)
