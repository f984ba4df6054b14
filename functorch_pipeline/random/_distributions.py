"""Distributions over the counter-based hash of ``fp.random``: JAX's samplers as pure
tensor ops (vmap and compile safe)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from functorch_pipeline.random._core import _check_key
from functorch_pipeline.random._core import _check_shape
from functorch_pipeline.random._core import _is_number
from functorch_pipeline.random._core import fold_in
from functorch_pipeline.random._core import key
from functorch_pipeline.random._core import normal
from functorch_pipeline.random._core import permutation
from functorch_pipeline.random._core import randint
from functorch_pipeline.random._core import uniform
from functorch_pipeline.random._host import eligible

__all__ = [
    "PRNGKey",
    "beta",
    "categorical",
    "choice",
    "dirichlet",
    "exponential",
    "gamma",
    "gumbel",
    "multivariate_normal",
    "truncated_normal",
]


PRNGKey = key  # JAX's legacy name (``jax.random.PRNGKey``); the same int64 (2,) key


# ------------------------------------------------------------------ distributions
# NOTE [distributions are pure tensor ops]
# Every sampler below is a fixed sequence of tensor operations on the hash draws above:
# no data-dependent Python branching, no host reads of tensor arguments, so each runs
# under vmap (a key batch gives independent draws) and torch.compile. Rejection sampling
# (gamma) therefore runs a fixed number of proposal rounds at once instead of looping.
# Each sampler takes its sub-streams with fold_in(key, <constant>), so its draws are
# independent of the key's other uses. Parameters are detached: samples carry no gradient
# to the distribution's parameters (JAX's gamma/beta/dirichlet have implicit
# reparameterisation gradients; ours do not).


def _float_dtype(dtype: torch.dtype, fn: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: `dtype` must be floating, got {dtype}")
    return dtype


def _param(x: float | torch.Tensor, name: str, fn: str, k: torch.Tensor,
            work: torch.dtype, positive: bool = False) -> torch.Tensor:
    """A distribution parameter as a detached ``work`` tensor on the key's device."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or not (x.is_floating_point() or x.dtype in _INT_DTYPES):
            raise TypeError(f"{fn}: `{name}` must be real, got dtype {x.dtype}")
        return x.detach().to(device=k.device, dtype=work)
    if not _is_number(x):
        raise TypeError(f"{fn}: `{name}` must be a number or a tensor, got {type(x).__name__}")
    if positive and not x > 0:  # also refuses NaN
        raise ValueError(f"{fn}: `{name}` must be > 0, got {x}")
    return torch.tensor(float(x), dtype=work, device=k.device)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _batch_shape(shape: Sequence[int] | None, fn: str, *params: torch.Tensor) -> tuple[int, ...]:
    """``shape`` checked, or the broadcast shape of the parameters (JAX's default)."""
    full = torch.broadcast_shapes(*(p.shape for p in params))
    if shape is None:
        return tuple(full)
    out = _check_shape(shape, fn)
    try:
        if torch.broadcast_shapes(out, full) != torch.Size(out):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{fn}: `shape` {out} is not broadcast-compatible with the parameters' "
                         f"shape {tuple(full)}") from None
    return out


def _open_uniform(k: torch.Tensor, shape: Sequence[int], work: torch.dtype) -> torch.Tensor:
    """Uniform in the open interval (0, 1)."""
    tiny = torch.finfo(work).tiny
    return uniform(k, shape, work, minval=tiny, maxval=1.0)


def gumbel(k: torch.Tensor, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32
           ) -> torch.Tensor:
    """Standard Gumbel draws ``-log(-log(U))`` (``jax.random.gumbel``).

    Args:
      k: a key.
      shape: the shape of the draw.
      dtype: a floating dtype.

    Returns:
      A tensor of ``shape`` and ``dtype`` (mean Euler's gamma, variance ``pi**2 / 6``).

    Example:
      >>> g = gumbel(key(0), (20000,), torch.float64)
      >>> abs(float(g.mean()) - 0.5772) < 0.03
      True
    """
    fn = "gumbel(key, shape, dtype)"
    dtype = _float_dtype(dtype, fn)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u = _open_uniform(fold_in(k, 0x6B1), _check_shape(shape, fn), work)
    return (-torch.log(-torch.log(u))).to(dtype)


def exponential(k: torch.Tensor, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """Standard exponential draws ``-log1p(-U)`` (``jax.random.exponential``): rate 1;
    divide by a rate for other rates.

    Args:
      k: a key.
      shape: the shape of the draw.
      dtype: a floating dtype.

    Returns:
      A non-negative tensor of ``shape`` and ``dtype``.

    Example:
      >>> e = exponential(key(0), (20000,), torch.float64)
      >>> abs(float(e.mean()) - 1) < 0.03, bool((e >= 0).all())
      (True, True)
    """
    fn = "exponential(key, shape, dtype)"
    dtype = _float_dtype(dtype, fn)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u = uniform(fold_in(k, 0x6E2), _check_shape(shape, fn), work)
    return (-torch.log1p(-u)).to(dtype)


def truncated_normal(k: torch.Tensor, lower: float | torch.Tensor, upper: float | torch.Tensor,
                     shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
    """Standard normal draws conditioned on ``lower < x < upper``
    (``jax.random.truncated_normal``), by inverting the CDF (computed in float64).

    Args:
      k: a key.
      lower: the lower bound (a number or a tensor; may be ``-inf``).
      upper: the upper bound (``+inf`` allowed).
      shape: the shape of the draw; default the broadcast shape of the bounds.
      dtype: a floating dtype.

    Returns:
      A tensor of ``shape`` and ``dtype`` inside ``(lower, upper)``.

    Raises:
      ValueError: number bounds with ``lower >= upper`` (tensor bounds are not checked).

    Example:
      >>> t = truncated_normal(key(0), -1.0, 2.0, (5000,))
      >>> bool(((t > -1) & (t < 2)).all())
      True
    """
    fn = "truncated_normal(key, lower, upper, shape, dtype)"
    dtype = _float_dtype(dtype, fn)
    _check_key(k, fn)
    lo = _param(lower, "lower", fn, k, torch.float64)
    hi = _param(upper, "upper", fn, k, torch.float64)
    if _is_number(lower) and _is_number(upper) and not lower < upper:
        raise ValueError(f"{fn}: need `lower` < `upper`, got {lower} and {upper}")
    shape = _batch_shape(shape, fn, lo, hi)
    # NOTE [truncated normal tails]: erf(x / sqrt 2) rounds to 1 from x ~ 6, so inverting
    # it put every draw of [10, 11) at 11.0 and gave 1.8e308 from a lower bound of ~7 (JAX
    # does the same). The CDF is tiny but exact in float64 in the *left* tail when taken
    # as erfc(-x / sqrt 2) / 2, down to x ~ -37.5 (torch.special.ndtr loses it from ~-8),
    # so an interval right of 0 is drawn as its mirror image and negated.
    flip = lo > 0
    a_, b_ = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    sqrt2 = math.sqrt(2.0)
    pa, pb = 0.5 * torch.special.erfc(-a_ / sqrt2), 0.5 * torch.special.erfc(-b_ / sqrt2)
    u = uniform(fold_in(k, 0x7A3), shape, torch.float64)
    x = torch.special.ndtri(pa + u * (pb - pa))
    x = torch.where(flip, -x, x)
    # Rounding in erf/erfinv can land exactly on (or just outside) a bound: clamp inside.
    low_in = torch.nextafter(lo, torch.full_like(lo, math.inf))
    high_in = torch.nextafter(hi, torch.full_like(hi, -math.inf))
    x = torch.minimum(torch.maximum(x, low_in), high_in).to(dtype)
    if dtype != torch.float64:  # the cast can round onto a bound again
        lo_d, hi_d = lo.to(dtype), hi.to(dtype)
        x = torch.minimum(torch.maximum(x, torch.nextafter(lo_d, torch.full_like(lo_d, math.inf))),
                          torch.nextafter(hi_d, torch.full_like(hi_d, -math.inf)))
    return x


def categorical(k: torch.Tensor, logits: torch.Tensor, axis: int = -1,
                shape: Sequence[int] | None = None) -> torch.Tensor:
    """Indices drawn with probabilities ``softmax(logits, axis)`` (``jax.random.categorical``),
    by the Gumbel-max trick: ``argmax(logits + gumbel)``.

    Args:
      k: a key.
      logits: unnormalised log-probabilities; ``-inf`` entries are never drawn.
      axis: the axis of the categories.
      shape: the shape of the draw; must broadcast with ``logits``' shape without
        ``axis``; default that shape.

    Returns:
      An ``int64`` tensor of ``shape``.

    Example:
      >>> c = categorical(key(0), torch.tensor([0.0, 1.0, -float("inf")]), shape=(20000,))
      >>> abs(float((c == 1).double().mean()) - 0.7311) < 0.02, int(c.max())
      (True, 1)
    """
    fn = "categorical(key, logits, axis, shape)"
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{fn}: `logits` must be a floating tensor, got {logits!r}")
    if logits.dim() == 0 or not -logits.dim() <= axis < logits.dim():
        raise ValueError(f"{fn}: `axis` {axis} is out of range for logits of shape "
                         f"{tuple(logits.shape)}")
    moved = logits.detach().movedim(axis, -1)
    shape = _batch_shape(shape, fn, moved[..., 0])
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    g = gumbel(fold_in(k, 0xCA7), (*shape, moved.shape[-1]), work)
    return torch.argmax(moved.to(work) + g, dim=-1)


def _check_probabilities(p: torch.Tensor, count: int, replace: bool, fn: str) -> None:
    """``numpy.random.choice``'s checks of ``p`` (host reads: eager CPU only)."""
    if p.is_complex() or not (p.is_floating_point() or p.dtype in _INT_DTYPES):
        raise TypeError(f"{fn}: `p` must be a real tensor, got {p.dtype}")
    bad = ~torch.isfinite(p) | (p < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: `p` must be finite and >= 0; got p[{i}] = {p[i].item()}")
    nonzero = int((p > 0).sum())
    if p.numel() and nonzero == 0:
        raise ValueError(f"{fn}: `p` must have a positive entry; got all zeros")
    if not replace and count > nonzero:
        raise ValueError(f"{fn}: cannot draw {count} values without replacement when `p` has "
                         f"only {nonzero} non-zero entries")


def choice(k: torch.Tensor, a: int | torch.Tensor, shape: Sequence[int] = (), replace: bool = True,
           p: torch.Tensor | None = None, axis: int = 0) -> torch.Tensor:
    """Draws from ``a`` (``jax.random.choice``): entries of a tensor along ``axis``, or
    from ``range(a)`` for an int.

    Without replacement and with ``p``, this is sequential sampling proportional to ``p``
    (Gumbel-top-k, the same law as ``numpy``'s and JAX's).

    Args:
      k: a key.
      a: an int ``n`` (draw from ``0 .. n-1``) or a tensor (draw slices along ``axis``).
      shape: the shape of the draw.
      replace: with replacement (default) or without (``prod(shape)`` must be <= n).
      p: optional probabilities of the ``n`` entries (a 1-d tensor, normalised: it need
        not sum to one). On CPU in eager code its values are checked (``numpy``'s
        rules): a negative or non-finite entry, an all-zero ``p``, or fewer non-zero
        entries than draws without replacement raise ``ValueError``. Elsewhere (CUDA,
        under ``vmap`` or ``torch.compile``) that check would need a host read, and
        such a ``p`` gives meaningless draws.
      axis: the axis of ``a`` to draw along.

    Returns:
      The drawn indices (``int64``) for an int ``a``; else ``a`` indexed along ``axis``.

    Example:
      >>> sorted(choice(key(0), 5, (5,), replace=False).tolist())
      [0, 1, 2, 3, 4]
      >>> choice(key(1), torch.tensor([10.0, 20.0]), (3,), p=torch.tensor([0.0, 1.0]))
      tensor([20., 20., 20.])
    """
    fn = "choice(key, a, shape, replace, p, axis)"
    shape = _check_shape(shape, fn)
    if isinstance(a, torch.Tensor):
        if a.dim() == 0 or not -a.dim() <= axis < a.dim():
            raise ValueError(f"{fn}: `axis` {axis} is out of range for `a` of shape "
                             f"{tuple(a.shape)}")
        n = a.shape[axis]
    elif isinstance(a, int) and not isinstance(a, bool):
        if a < 0:
            raise ValueError(f"{fn}: `a` must be >= 0, got {a}")
        n = a
    else:
        raise TypeError(f"{fn}: `a` must be an int or a tensor, got {type(a).__name__}")
    count = math.prod(shape)
    if p is not None:
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.shape[0] != n:
            got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"{fn}: `p` must be a 1-d tensor of {n} probabilities, got {got}")
        if eligible(p):
            _check_probabilities(p, count, replace, fn)
    if count and n == 0:
        raise ValueError(f"{fn}: cannot draw {count} values from an empty `a`")
    if not replace and count > n:
        raise ValueError(f"{fn}: cannot draw {count} values without replacement from {n}")
    if p is None and replace:
        idx = randint(fold_in(k, 0xC40), shape, 0, max(n, 1)) if count else torch.zeros(
            shape, dtype=torch.int64, device=k.device)
    elif p is None:
        idx = permutation(fold_in(k, 0xC41), n)[:count].reshape(shape)
    else:
        logp = torch.log(p.detach().to(device=k.device, dtype=torch.float64))
        if replace:
            idx = categorical(fold_in(k, 0xC42), logp, shape=shape)
        else:
            g = gumbel(fold_in(k, 0xC43), (n,), torch.float64)
            idx = torch.argsort(logp + g, descending=True)[:count].reshape(shape)
    if not isinstance(a, torch.Tensor):
        return idx
    ax = axis % a.dim()  # JAX's take: a.shape[:axis] + shape + a.shape[axis + 1:]
    out = torch.index_select(a, ax, idx.reshape(-1).to(a.device))
    return out.reshape(*a.shape[:ax], *shape, *a.shape[ax + 1:])


_GAMMA_ROUNDS = 8  # Marsaglia-Tsang accepts >= 95% of proposals: 8 rounds fail w.p. < 4e-11


def gamma(k: torch.Tensor, a: float | torch.Tensor, shape: Sequence[int] | None = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gamma(``a``, 1) draws (``jax.random.gamma``): shape ``a``, rate 1; divide by a rate
    for other rates.

    Marsaglia and Tsang's method, with ``a + 1`` and a ``U**(1/a)`` boost for ``a < 1``.
    Its rejection step runs as a fixed number of proposal rounds drawn at once (vmap and
    compile safe: no data-dependent loop); the first accepted proposal
    is used. With 8 rounds the chance that none is accepted is below ``4e-11`` per draw;
    then the draw is ``a - 1/3`` (the method's centre), a negligible bias.

    Args:
      k: a key.
      a: the shape parameter (> 0): a number or a tensor (not checked).
      shape: the shape of the draw; default ``a``'s shape.
      dtype: a floating dtype.

    Returns:
      A positive tensor of ``shape`` and ``dtype`` (no gradient to ``a``: JAX's has
      implicit reparameterisation gradients).

    Example:
      >>> g = gamma(key(0), 3.0, (20000,), torch.float64)
      >>> abs(float(g.mean()) - 3) < 0.05, abs(float(g.var()) - 3) < 0.15
      (True, True)
    """
    fn = "gamma(key, a, shape, dtype)"
    dtype = _float_dtype(dtype, fn)
    _check_key(k, fn)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = _param(a, "a", fn, k, work, positive=True)
    shape = _batch_shape(shape, fn, alpha)
    return _gamma(k, alpha.expand(shape), work).to(dtype)


def _gamma(k: torch.Tensor, alpha: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    return _gamma_with_log(k, alpha, work)[0]


def _gamma_with_log(k: torch.Tensor, alpha: torch.Tensor, work: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gamma draws and their logarithms, from the same proposals.

    # NOTE [small concentrations]
    For ``a < 1`` the draw is boosted by ``U**(1/a)``, which underflows to 0 in float64
    for small ``a`` (``U = 0.5`` and ``a = 1e-3``: ``2**-1000``). A Beta(a, b) draw
    ``X / (X + Y)`` was then 0/0: 22.6% NaN at ``a = b = 1e-3``, 86% at ``1e-4``, and
    10.7% of Dirichlet rows at ``1e-3`` (JAX works in log space there). ``log U / a`` does
    not underflow, so Beta and Dirichlet normalise the logarithms (a sigmoid, a softmax)
    wherever the draws' sum underflowed to 0, and keep the plain quotient elsewhere (the
    same values as before wherever those were defined).
    """
    shape = tuple(alpha.shape)
    boosted = alpha < 1
    d = torch.where(boosted, alpha + 1, alpha) - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    x = normal(fold_in(k, 0x6A1), (_GAMMA_ROUNDS, *shape), work)
    u = _open_uniform(fold_in(k, 0x6A2), (_GAMMA_ROUNDS, *shape), work)
    v = (1.0 + c * x) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
    first = torch.argmax(ok.to(torch.int8), dim=0, keepdim=True)  # 0 when none is accepted
    v_first = torch.gather(v, 0, first).squeeze(0)
    out = torch.where(ok.any(0), d * v_first, d)
    u_boost = _open_uniform(fold_in(k, 0x6A3), shape, work)
    boost = u_boost ** (1.0 / alpha)
    log_out = torch.log(out)
    return (torch.where(boosted, out * boost, out),
            torch.where(boosted, log_out + torch.log(u_boost) / alpha, log_out))


def beta(k: torch.Tensor, a: float | torch.Tensor, b: float | torch.Tensor,
         shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Beta(``a``, ``b``) draws (``jax.random.beta``) as ``X / (X + Y)`` with
    ``X ~ Gamma(a)``, ``Y ~ Gamma(b)`` (computed in float64).

    Args:
      k: a key.
      a: the first shape parameter (> 0).
      b: the second shape parameter (> 0).
      shape: the shape of the draw; default the broadcast shape of ``a`` and ``b``.
      dtype: a floating dtype.

    Returns:
      A tensor of ``shape`` and ``dtype`` in ``[0, 1]``.

    Example:
      >>> x = beta(key(0), 2.0, 5.0, (20000,), torch.float64)
      >>> abs(float(x.mean()) - 2 / 7) < 0.01
      True
    """
    fn = "beta(key, a, b, shape, dtype)"
    dtype = _float_dtype(dtype, fn)
    _check_key(k, fn)
    pa = _param(a, "a", fn, k, torch.float64, positive=True)
    pb = _param(b, "b", fn, k, torch.float64, positive=True)
    shape = _batch_shape(shape, fn, pa, pb)
    x, log_x = _gamma_with_log(fold_in(k, 0xBE1), pa.expand(shape), torch.float64)
    y, log_y = _gamma_with_log(fold_in(k, 0xBE2), pb.expand(shape), torch.float64)
    # NOTE [small concentrations]: from the logarithms where X + Y underflowed
    return torch.where(x + y > 0, x / (x + y), torch.sigmoid(log_x - log_y)).to(dtype)


def dirichlet(k: torch.Tensor, alpha: torch.Tensor, shape: Sequence[int] | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dirichlet(``alpha``) draws (``jax.random.dirichlet``): independent
    ``Gamma(alpha_i)`` normalised along the last axis (computed in float64).

    Args:
      k: a key.
      alpha: concentrations (> 0), shape ``(..., K)``.
      shape: the batch shape of the draw; default ``alpha.shape[:-1]``.
      dtype: a floating dtype.

    Returns:
      A tensor of shape ``shape + (K,)`` whose last axis sums to one.

    Example:
      >>> x = dirichlet(key(0), torch.tensor([1.0, 2.0, 3.0]), (4,))
      >>> x.shape, bool(torch.allclose(x.sum(-1), torch.ones(4)))
      (torch.Size([4, 3]), True)
    """
    fn = "dirichlet(key, alpha, shape, dtype)"
    dtype = _float_dtype(dtype, fn)
    _check_key(k, fn)
    if not isinstance(alpha, torch.Tensor) or alpha.dim() == 0:
        raise ValueError(f"{fn}: `alpha` must be a tensor of shape (..., K), got {alpha!r}")
    conc = _param(alpha, "alpha", fn, k, torch.float64)
    shape = _batch_shape(shape, fn, conc[..., 0])
    g, log_g = _gamma_with_log(fold_in(k, 0xD1), conc.expand(*shape, conc.shape[-1]), torch.float64)
    total = g.sum(-1, keepdim=True)  # NOTE [small concentrations]: a softmax where it underflowed
    return torch.where(total > 0, g / total, torch.softmax(log_g, -1)).to(dtype)


def multivariate_normal(k: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor,
                        shape: Sequence[int] | None = None, dtype: torch.dtype | None = None,
                        method: str = "cholesky") -> torch.Tensor:
    """Multivariate normal draws ``mean + L z`` with ``L L^T = cov``
    (``jax.random.multivariate_normal``).

    Args:
      k: a key.
      mean: shape ``(..., n)``.
      cov: shape ``(..., n, n)``, symmetric positive (semi-)definite.
      shape: the batch shape of the draw; default the broadcast of ``mean.shape[:-1]``
        and ``cov.shape[:-2]``.
      dtype: a floating dtype; default ``mean``'s.
      method: ``"cholesky"`` (positive definite ``cov``; a singular one gives NaN),
        ``"eigh"`` or ``"svd"`` (positive semi-definite ``cov``).

    Returns:
      A tensor of shape ``shape + (n,)``.

    Example:
      >>> cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
      >>> x = multivariate_normal(key(0), torch.zeros(2, dtype=torch.float64), cov, (20000,))
      >>> bool(torch.allclose(x.T.cov(), cov, atol=0.06))
      True
    """
    fn = "multivariate_normal(key, mean, cov, shape, dtype, method)"
    _check_key(k, fn)
    for name, t, rank in (("mean", mean, 1), ("cov", cov, 2)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < rank:
            raise ValueError(f"{fn}: `{name}` must be a floating tensor with at least {rank} axes, "
                             f"got {t!r}")
    n = mean.shape[-1]
    if cov.shape[-2:] != (n, n):
        raise ValueError(f"{fn}: `cov` must have shape (..., {n}, {n}) to match `mean` of shape "
                         f"{tuple(mean.shape)}, got {tuple(cov.shape)}")
    if method not in ("cholesky", "eigh", "svd"):
        raise ValueError(f"{fn}: `method` must be 'cholesky', 'eigh' or 'svd', got {method!r}")
    dtype = _float_dtype(mean.dtype if dtype is None else dtype, fn)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    m, c = mean.detach().to(work), cov.detach().to(work)
    shape = _batch_shape(shape, fn, m[..., 0], c[..., 0, 0])
    if method == "cholesky":
        factor = torch.linalg.cholesky_ex(c)[0]
        factor = torch.where(torch.linalg.cholesky_ex(c)[1][..., None, None] == 0, factor,
                             torch.full_like(factor, math.nan))
    elif method == "eigh":
        w, q = torch.linalg.eigh(c)
        factor = q * w.clamp_min(0).sqrt()[..., None, :]
    else:
        u, s, _ = torch.linalg.svd(c)
        factor = u * s.sqrt()[..., None, :]
    z = normal(fold_in(k, 0x3D1), (*shape, n), work)
    return (m + (factor @ z.unsqueeze(-1)).squeeze(-1)).to(dtype)
