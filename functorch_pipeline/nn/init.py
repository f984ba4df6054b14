"""Pure parameter initialisers: ``init(key, shape, dtype) -> tensor``.

The names, arguments and formulas are ``torch.nn.init``'s (``kaiming_uniform`` is
``torch.nn.init.kaiming_uniform_`` with the same ``a``, ``mode`` and ``nonlinearity`` and
the same fan rule), but in ``jax.nn.initializers``' shape: a factory takes the
hyperparameters and returns an initialiser, a pure function of a key. Nothing reads or
advances PyTorch's global generator, and the same key gives the same tensor on the same
device. ``zeros`` and ``ones`` are initialisers themselves, as in JAX.

# NOTE [fans follow torch's weight layout]
``fan_in`` and ``fan_out`` are computed as ``torch.nn.init`` does for a PyTorch weight
of shape ``(out_features, in_features, *kernel)``: ``fan_in = shape[1] * prod(kernel)``,
``fan_out = shape[0] * prod(kernel)``. JAX's initialisers assume ``(in, out)`` kernels,
so shapes written for JAX must be transposed.

Defaults follow PyTorch where it and JAX disagree: ``normal()`` is N(0, 1) (JAX's
``normal()`` has ``stddev=1e-2``) and ``uniform()`` is U[0, 1) (JAX's is U[0, 1e-2)).

>>> import functorch_pipeline as fp
>>> w = fp.nn.init.kaiming_uniform(a=5 ** 0.5)(fp.random.key(0), (64, 32))
>>> w.shape, bool(w.abs().max() <= 1 / 32 ** 0.5)
(torch.Size([64, 32]), True)
"""

from __future__ import annotations

import fnmatch
import math
import operator
import zlib
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import torch

from functorch_pipeline import random as _random
from functorch_pipeline import tree as _tree

__all__ = [
    "Initializer",
    "constant",
    "kaiming_normal",
    "kaiming_uniform",
    "normal",
    "ones",
    "orthogonal",
    "reinitialize",
    "truncated_normal",
    "uniform",
    "variance_scaling",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
]

Initializer = Callable[..., torch.Tensor]
"""``(key, shape, dtype=torch.float32) -> tensor`` on the key's device; ``shape`` is a
sequence of ints, or an int ``n`` for ``(n,)`` as in JAX (NOTE [int shapes])."""


def _check(fn: str, key: torch.Tensor, shape: int | Sequence[int], dtype: torch.dtype) -> tuple[int, ...]:
    if not _random.is_key(key) or key.dim() != 1:
        raise TypeError(f"{fn}: `key` must be one key from fp.random.key (int64, shape (2,)), got {key!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: `dtype` must be a floating-point torch.dtype, got {dtype!r}")
    # NOTE [int shapes]: as in JAX (core.canonicalize_shape), an int n is the shape (n,);
    # sizes must be integers (operator.index: Python, NumPy and 0-d integer tensor ints).
    try:
        shape = (operator.index(shape),)
    except TypeError:
        try:
            shape = tuple(operator.index(s) for s in shape)
        except TypeError:
            raise TypeError(f"{fn}: `shape` must be an int or a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{fn}: `shape` must have non-negative sizes, got {shape}")
    return shape


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fans(fn: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) as torch.nn.init computes them (NOTE [fans follow torch's weight layout])."""
    if len(shape) < 2:
        raise ValueError(
            f"{fn}: fan in and fan out can not be computed for a shape with fewer than 2 "
            f"dimensions, got {shape} (use it on weights, not biases)"
        )
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _fan(fn: str, shape: tuple[int, ...], mode: str) -> int:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"{fn}: `mode` must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = _fans(fn, shape)
    return fan_in if mode == "fan_in" else fan_out


def zeros(key: torch.Tensor, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All zeros (the key only sets the device).

    Args:
      key: one key from ``fp.random.key``; it also sets the device.
      shape: the tensor's shape.
      dtype: a floating-point dtype (default float32).

    Returns:
      A tensor of zeros of ``shape`` and ``dtype`` on the key's device.

    Examples:
      >>> import functorch_pipeline as fp
      >>> zeros(fp.random.key(0), (2,))
      tensor([0., 0.])
    """
    shape = _check("init.zeros(key, shape, dtype)", key, shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=key.device)


def ones(key: torch.Tensor, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All ones (the key only sets the device).

    Args:
      key: one key from ``fp.random.key``; it also sets the device.
      shape: the tensor's shape.
      dtype: a floating-point dtype (default float32).

    Returns:
      A tensor of ones of ``shape`` and ``dtype`` on the key's device.

    Examples:
      >>> import functorch_pipeline as fp
      >>> ones(fp.random.key(0), (2,))
      tensor([1., 1.])
    """
    shape = _check("init.ones(key, shape, dtype)", key, shape, dtype)
    return torch.ones(shape, dtype=dtype, device=key.device)


def constant(value: float) -> Initializer:
    """Every entry equal to ``value`` (``torch.nn.init.constant_``).

    Args:
      value: the fill value.

    Returns:
      An initialiser ``(key, shape, dtype=torch.float32) -> tensor``.

    Examples:
      >>> import functorch_pipeline as fp
      >>> constant(0.5)(fp.random.key(0), (2,))
      tensor([0.5000, 0.5000])
    """

    def init(key: torch.Tensor, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = _check("init.constant(value)", key, shape, dtype)
        return torch.full(shape, value, dtype=dtype, device=key.device)

    return init


def uniform(a: float = 0.0, b: float = 1.0) -> Initializer:
    """U[a, b) (``torch.nn.init.uniform_``; JAX's ``uniform(scale)`` is U[0, scale)).

    Args:
      a: lower bound.
      b: upper bound.

    Returns:
      An initialiser ``(key, shape, dtype) -> tensor``.

    >>> import functorch_pipeline as fp
    >>> u = uniform(-1.0, 1.0)(fp.random.key(0), (1000,))
    >>> bool((u >= -1).all() and (u < 1).all())
    True
    """
    if not a <= b:
        raise ValueError(f"init.uniform(a, b): need a <= b, got a={a} and b={b}")

    def init(key: torch.Tensor, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = _check("init.uniform(a, b)", key, shape, dtype)
        return _random.uniform(key, shape, _work(dtype), a, b).to(dtype)

    return init


def normal(mean: float = 0.0, std: float = 1.0) -> Initializer:
    """N(mean, std²) (``torch.nn.init.normal_``; JAX's ``normal()`` defaults to std 1e-2).

    Args:
      mean: the mean.
      std: the standard deviation (non-negative).

    Returns:
      An initialiser ``(key, shape, dtype=torch.float32) -> tensor``.

    Examples:
      >>> import functorch_pipeline as fp
      >>> z = normal(0.0, 2.0)(fp.random.key(0), (20000,))
      >>> abs(float(z.std()) - 2.0) < 0.05
      True
    """
    if std < 0:
        raise ValueError(f"init.normal(mean, std): `std` must be non-negative, got {std}")

    def init(key: torch.Tensor, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = _check("init.normal(mean, std)", key, shape, dtype)
        return (_random.normal(key, shape, _work(dtype)) * std + mean).to(dtype)

    return init


def truncated_normal(mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0) -> Initializer:
    """N(mean, std²) truncated to ``[a, b]`` (absolute bounds, ``torch.nn.init.trunc_normal_``).

    Drawn by inverting the normal CDF on a uniform draw between ``cdf(a)`` and ``cdf(b)``,
    as PyTorch does. (JAX's ``truncated_normal(stddev)`` truncates at ±2 *standard
    deviations*; pass ``a=-2 * std, b=2 * std`` for that.)

    Args:
      mean: the mean of the untruncated normal.
      std: its standard deviation (positive).
      a: the lower bound (absolute, not in standard deviations).
      b: the upper bound (absolute).

    Returns:
      An initialiser ``(key, shape, dtype=torch.float32) -> tensor``.

    Examples:
      >>> import functorch_pipeline as fp
      >>> t = truncated_normal(std=1.0, a=-0.5, b=0.5)(fp.random.key(0), (1000,))
      >>> bool(t.abs().max() <= 0.5)
      True
    """
    if std <= 0 or not a < b:
        raise ValueError(f"init.truncated_normal(mean, std, a, b): need std > 0 and a < b, got std={std}, a={a}, b={b}")

    def cdf(x: float) -> float:
        return (1.0 + math.erf((x - mean) / std / math.sqrt(2.0))) / 2.0

    lo, hi = 2 * cdf(a) - 1, 2 * cdf(b) - 1

    def init(key: torch.Tensor, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = _check("init.truncated_normal(mean, std, a, b)", key, shape, dtype)
        u = _random.uniform(key, shape, torch.float64, lo, hi)
        t = torch.erfinv(u) * (std * math.sqrt(2.0)) + mean
        return t.clamp(a, b).to(dtype)

    return init


def _scaled(fn: str, std_of_shape: Callable[[tuple[int, ...]], float], distribution: str) -> Initializer:
    def init(key: torch.Tensor, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = _check(fn, key, shape, dtype)
        if math.prod(shape) == 0:  # as torch.nn.init: an empty weight (fan 0) stays empty
            return torch.empty(shape, dtype=dtype, device=key.device)
        std = std_of_shape(shape)
        if distribution == "uniform":
            bound = math.sqrt(3.0) * std
            return _random.uniform(key, shape, _work(dtype), -bound, bound).to(dtype)
        return (_random.normal(key, shape, _work(dtype)) * std).to(dtype)

    return init


def xavier_uniform(gain: float = 1.0) -> Initializer:
    """U(-b, b) with ``b = gain * sqrt(6 / (fan_in + fan_out))`` (``xavier_uniform_``,
    Glorot & Bengio 2010; JAX's ``glorot_uniform`` for a transposed shape).

    Args:
      gain: the scaling factor (``torch.nn.init.calculate_gain``).

    Returns:
      An initialiser ``(key, shape, dtype=torch.float32) -> tensor``.

    Examples:
      >>> import functorch_pipeline as fp
      >>> w = xavier_uniform()(fp.random.key(0), (30, 20))
      >>> bool(w.abs().max() <= (6 / 50) ** 0.5)
      True
    """
    fn = "init.xavier_uniform(gain)"
    return _scaled(fn, lambda s: gain * math.sqrt(2.0 / sum(_fans(fn, s))), "uniform")


def xavier_normal(gain: float = 1.0) -> Initializer:
    """N(0, std²) with ``std = gain * sqrt(2 / (fan_in + fan_out))`` (``xavier_normal_``).

    Args:
      gain: the scaling factor (``torch.nn.init.calculate_gain``).

    Returns:
      An initialiser ``(key, shape, dtype=torch.float32) -> tensor``.

    Examples:
      >>> import functorch_pipeline as fp
      >>> xavier_normal()(fp.random.key(0), (30, 20)).shape
      torch.Size([30, 20])
    """
    fn = "init.xavier_normal(gain)"
    return _scaled(fn, lambda s: gain * math.sqrt(2.0 / sum(_fans(fn, s))), "normal")


_GAINS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")


def _kaiming_std(fn: str, a: float, mode: str, nonlinearity: str) -> Callable[[tuple[int, ...]], float]:
    if nonlinearity not in _GAINS:  # calculate_gain's names
        raise ValueError(f"{fn}: `nonlinearity` must be one of {', '.join(map(repr, _GAINS))} "
                         f"(torch.nn.init.calculate_gain), got {nonlinearity!r}")
    try:
        gain = torch.nn.init.calculate_gain(nonlinearity, a)
    except ValueError as e:  # a slope `a` that is not a number
        raise ValueError(f"{fn}: {e}") from None
    return lambda s: gain / math.sqrt(_fan(fn, s, mode))


def kaiming_uniform(a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu") -> Initializer:
    """U(-b, b) with ``b = gain * sqrt(3 / fan_mode)`` (``kaiming_uniform_``, He et al. 2015).

    ``gain = torch.nn.init.calculate_gain(nonlinearity, a)``. ``kaiming_uniform(a=sqrt(5))``
    is the default weight init of ``nn.Linear`` and ``nn.Conv*d``.

    Args:
      a: the negative slope of the rectifier after this layer (for ``leaky_relu``).
      mode: ``"fan_in"`` (preserves the forward variance) or ``"fan_out"`` (backward).
      nonlinearity: a name ``calculate_gain`` knows (``"relu"``, ``"leaky_relu"``, ...).

    Returns:
      An initialiser ``(key, shape, dtype) -> tensor``.

    >>> import functorch_pipeline as fp
    >>> w = kaiming_uniform(nonlinearity="relu")(fp.random.key(0), (50, 40))
    >>> bool(w.abs().max() <= (6 / 40) ** 0.5)
    True
    """
    fn = "init.kaiming_uniform(a, mode, nonlinearity)"
    return _scaled(fn, _kaiming_std(fn, a, mode, nonlinearity), "uniform")


def kaiming_normal(a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu") -> Initializer:
    """N(0, std²) with ``std = gain / sqrt(fan_mode)`` (``kaiming_normal_``); see
    :func:`kaiming_uniform` for the arguments.

    Args:
      a: the negative slope of the rectifier after this layer (for ``leaky_relu``).
      mode: ``"fan_in"`` (preserves the forward variance) or ``"fan_out"`` (backward).
      nonlinearity: a name ``calculate_gain`` knows (``"relu"``, ``"leaky_relu"``, ...).

    Returns:
      An initialiser ``(key, shape, dtype=torch.float32) -> tensor``.

    Examples:
      >>> import functorch_pipeline as fp
      >>> kaiming_normal(mode="fan_out")(fp.random.key(0), (8, 4, 3, 3)).shape
      torch.Size([8, 4, 3, 3])
    """
    fn = "init.kaiming_normal(a, mode, nonlinearity)"
    return _scaled(fn, _kaiming_std(fn, a, mode, nonlinearity), "normal")


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """JAX's ``variance_scaling``: variance ``scale / n`` with ``n`` the fan in, fan out or
    their average (``mode`` ``"fan_in"``, ``"fan_out"``, ``"fan_avg"``), drawn from a
    ``"truncated_normal"`` (at ±2 std, rescaled to keep the variance), ``"normal"`` or
    ``"uniform"`` distribution. Fans follow torch's weight layout ``(out, in, *kernel)``:
    ``fan_in = shape[1] * prod(kernel)``, ``fan_out = shape[0] * prod(kernel)``; JAX's
    initialisers assume ``(in, out)`` kernels, so shapes written for JAX must be
    transposed. E.g. JAX's ``lecun_normal()`` is ``variance_scaling(1, "fan_in",
    "truncated_normal")``.

    Args:
      scale: the variance numerator, a finite number ``>= 0`` (``0`` gives zeros, as in
        JAX; a negative ``scale``, for which JAX returns NaNs, raises ``ValueError``).
      mode: ``"fan_in"``, ``"fan_out"`` or ``"fan_avg"``.
      distribution: ``"truncated_normal"``, ``"normal"`` or ``"uniform"``.

    Returns:
      An initialiser ``(key, shape, dtype=torch.float32) -> tensor``.

    Examples:
      >>> import functorch_pipeline as fp
      >>> w = variance_scaling(2.0, "fan_in", "normal")(fp.random.key(0), (200, 100))
      >>> abs(float(w.var()) - 2 / 100) < 2e-3
      True
    """
    fn = "init.variance_scaling(scale, mode, distribution)"
    try:  # a Python, NumPy or 0-d tensor number; not a bool or a string
        value = None if isinstance(scale, (bool, str, bytes)) else float(scale)
    except (TypeError, ValueError, RuntimeError):
        value = None
    if value is None or not math.isfinite(value) or value < 0:
        raise ValueError(f"{fn}: `scale` must be a finite number >= 0 (the variance numerator), "
                         f"got {scale!r}")
    numerator: float = value
    if mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"{fn}: `mode` must be 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}")
    if distribution not in ("truncated_normal", "normal", "uniform"):
        raise ValueError(f"{fn}: `distribution` must be 'truncated_normal', 'normal' or 'uniform', got {distribution!r}")

    def std(shape: tuple[int, ...]) -> float:
        fan_in, fan_out = _fans(fn, shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        return math.sqrt(numerator / n)

    if distribution != "truncated_normal":
        return _scaled(fn, std, distribution)

    def init(key: torch.Tensor, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = _check(fn, key, shape, dtype)
        if math.prod(shape) == 0:  # as torch.nn.init: an empty weight (fan 0) stays empty
            return torch.empty(shape, dtype=dtype, device=key.device)
        if numerator == 0:  # zeros, as JAX gives
            return torch.zeros(shape, dtype=dtype, device=key.device)
        s = std(shape) / 0.87962566103423978  # the std of N(0, 1) truncated to [-2, 2]
        return truncated_normal(0.0, s, -2 * s, 2 * s)(key, shape, dtype)

    return init


def orthogonal(gain: float = 1.0) -> Initializer:
    """A (semi-)orthogonal matrix times ``gain`` (``torch.nn.init.orthogonal_``, Saxe et al.
    2013): QR of a Gaussian matrix of shape ``(shape[0], prod(shape[1:]))`` with the signs
    of R's diagonal folded into Q.

    Args:
      gain: the factor applied to the orthogonal matrix.

    Returns:
      An initialiser ``(key, shape, dtype=torch.float32) -> tensor``.

    Examples:
      >>> import functorch_pipeline as fp
      >>> q = orthogonal()(fp.random.key(0), (3, 5))
      >>> torch.allclose(q @ q.T, torch.eye(3), atol=1e-5)
      True
    """

    def init(key: torch.Tensor, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = _check("init.orthogonal(gain)", key, shape, dtype)
        if len(shape) < 2:
            raise ValueError(f"init.orthogonal(gain): only shapes with 2 or more dimensions are supported, got {shape}")
        rows, cols = shape[0], math.prod(shape[1:])
        if rows * cols == 0:
            return torch.zeros(shape, dtype=dtype, device=key.device)
        flat = _random.normal(key, (rows, cols), _work(dtype))
        if rows < cols:
            flat = flat.T
        q, r = torch.linalg.qr(flat)
        q = q * torch.diagonal(r).sign()
        if rows < cols:
            q = q.T
        return (q * gain).reshape(shape).to(dtype)

    return init


def _dotted(path: Sequence[Any]) -> str:
    return ".".join(str(k) for k in path)


Rule = str | Callable[[str], bool]


def reinitialize(key: torch.Tensor, tree: Any, rules: Mapping[Rule, Initializer]) -> Any:
    """Re-draw chosen leaves of a parameter tree; the rest are returned as they are.

    Each leaf is named by its dotted path: the keys on the way joined by ``.``, so a
    ``params`` dict from ``fp.functionalize`` gives ``"fc1.weight"`` and the whole
    ``variables`` tree gives ``"params.fc1.weight"`` (PyTorch's ``state_dict`` naming).
    The first rule that matches a leaf's path decides its initialiser.

    Args:
      key: one key; the leaf at path ``p`` uses ``fold_in(key, crc32(p))``, so a leaf's
        draw does not depend on which other leaves exist or match.
      tree: a pytree of tensors (``variables["params"]``, or ``variables``).
      rules: ``{pattern: initializer}``; a pattern is a glob matched against the whole
        dotted path (``"*.weight"``, ``"encoder.*"``) or a predicate ``path -> bool``.

    Returns:
      A new tree; re-drawn leaves keep their shape, dtype and device.

    Raises:
      ValueError: a rule matches no leaf (a typo would otherwise pass silently).

    >>> import functorch_pipeline as fp
    >>> params = {"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(3)}
    >>> new = reinitialize(fp.random.key(0), params, {"*.bias": constant(0.1)})
    >>> new["fc.bias"], new["fc.weight"] is params["fc.weight"]
    (tensor([0.1000, 0.1000, 0.1000]), True)
    """
    fn = "init.reinitialize(key, tree, rules)"
    if not _random.is_key(key) or key.dim() != 1:
        raise TypeError(f"{fn}: `key` must be one key from fp.random.key, got {key!r}")
    if not isinstance(rules, Mapping) or not rules:
        raise TypeError(f"{fn}: `rules` must be a non-empty mapping {{pattern: initializer}}, got {rules!r}")
    for pattern, init in rules.items():
        if not (isinstance(pattern, str) or callable(pattern)) or not callable(init):
            raise TypeError(f"{fn}: each rule must map a glob string or predicate to an initializer, got {pattern!r}: {init!r}")
    used = {id(p): False for p in rules}

    def redraw(path: tuple[Any, ...], leaf: Any) -> Any:
        name = _dotted(path)
        for pattern, init in rules.items():
            hit = fnmatch.fnmatchcase(name, pattern) if isinstance(pattern, str) else bool(pattern(name))
            if hit:
                used[id(pattern)] = True
                if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                    raise TypeError(f"{fn}: rule {pattern!r} matches `{name}`, which is not a floating-point tensor")
                k = _random.fold_in(key.to(leaf.device), zlib.crc32(name.encode()))
                new = init(k, tuple(leaf.shape), leaf.dtype)
                if tuple(new.shape) != tuple(leaf.shape):
                    raise ValueError(f"{fn}: the initializer for `{name}` returned shape {tuple(new.shape)}, expected {tuple(leaf.shape)}")
                return new.to(device=leaf.device, dtype=leaf.dtype)
        return leaf

    out = _tree.map_with_path(redraw, tree)
    unused = [p for p in rules if not used[id(p)]]
    if unused:
        names = [_dotted(p) for p, _ in _tree.leaves_with_path(tree)]
        raise ValueError(f"{fn}: rules {unused!r} match no leaf; the paths are {names}")
    return out

