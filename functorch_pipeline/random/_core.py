"""Keys (key, split, fold_in) and the basic draws over a counter-based hash; see
``fp.random`` for the design notes."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

from functorch_pipeline.random import _host

__all__ = [
    "bernoulli",
    "bits",
    "fold_in",
    "generator",
    "is_key",
    "key",
    "key_data",
    "normal",
    "permutation",
    "randint",
    "seed_from_key",
    "split",
    "uniform",
]

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 63) - 1


# NOTE [no integer overflow]
# Every product below stays inside int64 without wrapping: a 32-bit value times a 32-bit
# constant (up to 2**64) is split into the constant's 16-bit halves. Signed overflow is
# undefined behaviour in the C++ that torch.compile's inductor generates, and inductor
# (torch 2.14, CPU, AVX-512) did miscompile the int32 form below (`_fmix32_i32`, which
# relies on wrapping) in its vector loops' tails: under fp.jit, DP noise and Poisson
# masks came out wrong (27-32 of 51 examples taken at q = 0.004, eager 0). Compiled code
# therefore takes this form (`_bits_i32`); eager torch kernels wrap, and the int32 form
# stays there, where it is ~2-3x faster.
def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``(h * c) mod 2**32`` for int64 ``h`` in ``[0, 2**32)``, without int64 overflow."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _hash2(k0: torch.Tensor, k1: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """A 32-bit value from a key (k0, k1) and a non-negative int64 counter."""
    # Two rounds of MurmurHash3's finaliser (full avalanche each): ample for dropout,
    # noise and initialisation, and each draw stays ~20 cheap integer ops.
    x = _fmix32(_mul32(counter & _MASK32, _GOLDEN) + k0 & _MASK32)
    return _fmix32((x ^ k1) + 0x7F4A7C15 & _MASK32)


# The same hash on int32 bit patterns (wrapping multiplies, masked logical shifts): the
# identical 32-bit words at half the memory traffic of the int64 form, ~2-3x faster for
# large draws. `_hash2` stays for keys (a few elements, values in int64 for the API).
_GOLDEN_I32 = _GOLDEN - (1 << 32)
_C1_I32, _C2_I32 = 0x85EBCA6B - (1 << 32), 0xC2B2AE35 - (1 << 32)


def _fmix32_i32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _C1_I32
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _C2_I32
    return h ^ ((h >> 16) & 0xFFFF)


def _bits_i32(k: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`bits` as int32 bit patterns (``bits == _bits_i32 & 0xFFFFFFFF`` in int64)."""
    n = math.prod(shape)
    if n <= 1 << 31 and _host.eligible(k):  # NOTE [host fast path]: the same words
        return _host.bits(k, n).reshape(tuple(k.shape[:-1]) + shape)
    if n > 1 << 31 or torch.compiler.is_compiling():
        # counters past int32, or compiled code (NOTE [no integer overflow]): the int64
        # form, the same words, brought to int32 bit patterns without an out-of-range cast
        w = _hash2(k[..., 0:1], k[..., 1:2], torch.arange(n, device=k.device, dtype=torch.int64))
        w = torch.where(w >= 1 << 31, w - (1 << 32), w)
        return w.to(torch.int32).reshape(tuple(k.shape[:-1]) + shape)
    k32 = k.to(torch.int32)  # modular: the key words' bit patterns
    counter = torch.arange(n, device=k.device, dtype=torch.int32)
    x = _fmix32_i32(counter * _GOLDEN_I32 + k32[..., 0:1])
    out = _fmix32_i32((x ^ k32[..., 1:2]) + 0x7F4A7C15)
    return out.reshape(tuple(k.shape[:-1]) + shape)


def _check_key(k: torch.Tensor, fn: str) -> None:
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"{fn}: `key` must be a key tensor from fp.random.key, got {type(k).__name__}")
    if k.dtype != torch.int64 or k.shape[-1:] != (2,):
        raise ValueError(
            f"{fn}: `key` must be an int64 tensor of shape (2,) made by fp.random.key, "
            f"got dtype {k.dtype} and shape {tuple(k.shape)}"
        )


# NOTE [argument checks without host syncs]
# Draws must run under vmap and torch.compile, so only Python numbers and shapes are
# validated here (free: no tensor is read). A tensor `minval`/`maxval`/`p` is used as
# given; checking it would need a host sync (`.item()`), which breaks both.


def _check_shape(shape: Sequence[int], fn: str) -> tuple[int, ...]:
    try:
        out = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"{fn}: `shape` must be a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in out):
        raise ValueError(f"{fn}: `shape` must have non-negative sizes, got {out}")
    return out


def _is_number(x: object) -> bool:
    """A real Python/NumPy number (not a bool, not a tensor): free to check on the host."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, torch.Tensor))


def _check_finite(x: object, name: str, fn: str) -> None:
    if _is_number(x) and not math.isfinite(x):
        raise ValueError(f"{fn}: `{name}` must be finite, got {x}")


def is_key(x: object) -> bool:
    """Whether ``x`` looks like a key (an int64 tensor whose last axis has size 2).

    Args:
        x: any object.

    Returns:
        ``True`` for an int64 tensor whose last axis has size 2.

    Examples:
        >>> is_key(key(0)), is_key(torch.zeros(2))
        (True, False)
    """
    return isinstance(x, torch.Tensor) and x.dtype == torch.int64 and x.shape[-1:] == (2,)


def key(seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Make a key from an integer seed (like ``jax.random.key``).

    # NOTE [seed range]
    Seeds are 64-bit signed integers, ``-2**63 <= seed < 2**63``, as in JAX (which
    converts the seed to ``int64``). Every seed in that range gives a different key (the
    seed's 64-bit two's-complement pattern goes through a bijective hash), so a negative
    seed is as good as a positive one: ``key(-1)`` is unrelated to ``key(1)`` and to
    every non-negative seed. A seed outside the range raises ``ValueError`` rather than
    wrapping (``key(2**64)`` would otherwise equal ``key(0)``). PyTorch's
    ``torch.manual_seed`` differs: it also accepts ``[2**63, 2**64)`` and maps ``-1``
    to ``2**64 - 1``. To use a larger number, reduce it yourself (``seed % 2**63``) or
    fold its pieces in with :func:`fold_in`.

    Args:
      seed: a Python integer (or anything with ``__index__``, e.g. ``numpy.int64``) in
        ``[-2**63, 2**63)``; different seeds give unrelated keys.
      device: where the key tensor lives (CPU by default).

    Returns:
      An ``int64`` tensor of shape ``(2,)``.

    Raises:
      TypeError: ``seed`` is not an integer (a ``bool`` is refused too).
      ValueError: ``seed`` is outside ``[-2**63, 2**63)``.

    Examples:
      >>> k = key(0)
      >>> k.shape, k.dtype
      (torch.Size([2]), torch.int64)
      >>> bool((key(0) == key(0)).all()), bool((key(0) == key(1)).all())
      (True, False)
      >>> bool((key(-1) == key(2**63 - 1)).all())
      False
      >>> key(2**70)
      Traceback (most recent call last):
      ...
      ValueError: key(seed): `seed` must be in [-2**63, 2**63) (int64, as in JAX), got 1...; ...
    """
    if isinstance(seed, bool):
        raise TypeError("key(seed): `seed` must be an int, got bool")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"key(seed): `seed` must be an int, got {type(seed).__name__}") from None
    if not _SEED_MIN <= seed <= _SEED_MAX:
        raise ValueError(
            f"key(seed): `seed` must be in [-2**63, 2**63) (int64, as in JAX), got {seed}; "
            "reduce it first (e.g. seed % 2**63) or fold its 32-bit pieces in with fold_in"
        )
    seed = seed % (1 << 64)  # two's complement: a bijection of the int64 range
    lo = torch.tensor(seed & _MASK32, dtype=torch.int64)
    hi = torch.tensor(seed >> 32, dtype=torch.int64)
    k0 = _fmix32(lo ^ 0x5851F42D)
    # NOTE [key words unrelated to the draw hash]: k1 mixes k0 in with xor after a hash of
    # hi. It used to be fmix32(hi + k0 + GOLDEN), the draw hash's own first round at
    # counter 1 + hi * GOLDEN^-1 (mod 2**32), so there x ^ k1 == 0 and every seed sharing
    # hi drew the same word: counter 1 of key(s) for every s in [0, 2**32) (example 1 was
    # never in a poisson_mask at q < 0.296, permutations of 4 came 91-1808 times in 24000
    # seeds instead of ~1000). Each key still has one counter where the word is that
    # constant (any k1 does), but now at a position that varies with the seed.
    k1 = _fmix32(_fmix32(hi ^ 0x2545F491) ^ k0)
    return torch.stack([k0, k1]).to(device)


def key_data(k: torch.Tensor) -> torch.Tensor:
    """The raw words of a key (a copy), for logging or saving.

    Args:
        k: a key or a stack of keys.

    Returns:
        An int64 tensor holding a copy of the key's words.

    Examples:
        >>> key_data(key(3)).tolist() == key(3).tolist()
        True
    """
    _check_key(k, "key_data(key)")
    return k.clone()


def split(k: torch.Tensor, num: int = 2) -> torch.Tensor:
    """Split a key into ``num`` new independent keys, stacked on a new leading axis.

    Args:
        k: a key (shape ``(2,)``) or a batch of keys (shape ``(..., 2)``).
        num: how many keys to make.

    Returns:
        An int64 tensor of shape ``(num, *k.shape)``: ``num`` independent keys.

    Examples:
        >>> ks = split(key(0), 3)
        >>> ks.shape
        torch.Size([3, 2])
        >>> len({tuple(x.tolist()) for x in ks})
        3
    """
    _check_key(k, "split(key, num)")
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"split(key, num): `num` must be a positive int, got {num!r}")
    # One vectorised hash for both words of all `num` keys: word j of key i hashes the
    # counter 2 * i + 1 + j with the key's words in order (j = 0) or swapped (j = 1).
    counter = torch.arange(1, 2 * num + 1, device=k.device, dtype=torch.int64).view(num, 2)
    k0, k1 = k.unsqueeze(-2), k.flip(-1).unsqueeze(-2)  # (..., 1, 2)
    out = _hash2(k0, k1, counter)  # (..., num, 2)
    return out.movedim(-2, 0) if out.dim() > 2 else out


def fold_in(k: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """Fold an integer (or an integer tensor, e.g. a step counter) into a key.

    ``data`` may be a 0-d tensor, so a step counter folds in without a host sync, and a
    batched one under ``vmap``.

    Args:
      k: the key (JAX calls it ``key``), from :func:`key`, :func:`split` or :func:`fold_in`.
      data: a Python int in ``[0, 2**32)`` (JAX's 32-bit ``data``), or an integer tensor.
        A Python int outside that range raises ``ValueError`` instead of wrapping (so
        ``fold_in(k, 2**32)`` cannot silently equal ``fold_in(k, 0)``); fold a larger
        number in as several 32-bit pieces. A tensor is not range-checked (that would
        need a host sync, which breaks vmap and torch.compile): only its low 32 bits are
        used.

    Returns:
      A new key of the same shape as ``key``.

    >>> bool((fold_in(key(0), 1) == fold_in(key(0), 1)).all())
    True
    >>> bool((fold_in(key(0), 1) == fold_in(key(0), 2)).all())
    False
    """
    _check_key(k, "fold_in(key, data)")
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.is_complex():
            raise TypeError(f"fold_in(key, data): `data` must be an integer, got dtype {data.dtype}")
    elif not isinstance(data, int) or isinstance(data, bool):
        raise TypeError(f"fold_in(key, data): `data` must be an int, got {type(data).__name__}")
    elif not 0 <= data <= _MASK32:
        raise ValueError(f"fold_in(key, data): `data` must be in [0, 2**32), got {data}")
    if _host.eligible(k, *([data] if isinstance(data, torch.Tensor) else [])):
        out = _host.fold_in(k, data)  # NOTE [host fast path]: the same words
        if out is not None:
            return out
    if isinstance(data, torch.Tensor):
        d = data.to(device=k.device, dtype=torch.int64)
    else:
        d = torch.tensor(data, dtype=torch.int64, device=k.device)
    d = (d & _MASK32).unsqueeze(-1)
    # Both output words in one vectorised hash: (k0, k1 ^ c0) and (k1, k0 ^ c1).
    flipped = k.flip(-1)
    salt = torch.tensor([0x2545F491, 0x1B873593], dtype=torch.int64, device=k.device)
    return _hash2(k, flipped ^ salt, d)


def bits(k: torch.Tensor, shape: Sequence[int] = ()) -> torch.Tensor:
    """Uniform random 32-bit words (as ``int64`` in ``[0, 2**32)``) of the given shape.

    Args:
      k: a key (or a batch of keys: their shape prefixes ``shape``).
      shape: the shape of the draw (non-negative sizes).

    Returns:
      An ``int64`` tensor of shape ``k.shape[:-1] + shape``.

    >>> b = bits(key(0), (4,))
    >>> b.dtype, bool(((b >= 0) & (b < 2**32)).all())
    (torch.int64, True)
    """
    _check_key(k, "bits(key, shape)")
    shape = _check_shape(shape, "bits(key, shape)")
    return _bits_i32(k, shape).to(torch.int64) & _MASK32


def _unit(k: torch.Tensor, shape: tuple[int, ...], work: torch.dtype) -> torch.Tensor:
    """Uniform draws in ``[0, 1)`` of ``k.shape[:-1] + shape``: 24 random bits per float32,
    53 (two words) per float64; ``work`` is one of the two."""
    n = math.prod(shape)
    if n <= 1 << 31 and _host.eligible(k):  # NOTE [host fast path]: the same numbers
        second = fold_in(k, 0x6A09E667) if work == torch.float64 else None
        return _host.unit(k, n, second).reshape(tuple(k.shape[:-1]) + shape)
    w = _bits_i32(k, shape)
    if work == torch.float64:  # 27 + 26 bits
        w2 = _bits_i32(fold_in(k, 0x6A09E667), shape)
        hi = ((w >> 5) & 0x7FFFFFF).to(torch.float64)
        return (hi * 67108864.0 + ((w2 >> 6) & 0x3FFFFFF)) * (1.0 / 9007199254740992.0)
    return ((w >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / 16777216.0)  # < 1 in float32


def uniform(
    k: torch.Tensor,
    shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
    minval: float | torch.Tensor = 0.0,
    maxval: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Uniform draws in ``[minval, maxval)``.

    Args:
      k: a key.
      shape: the shape of the draw (non-negative sizes).
      dtype: a floating dtype.
      minval: the lower bound (inclusive); a Python number or a tensor broadcastable
        to ``shape``.
      maxval: the upper bound (exclusive). ``minval == maxval`` gives ``minval``.

    Returns:
      A tensor of ``shape`` and ``dtype``.

    Raises:
      ValueError: Python-number bounds that are not finite or have ``minval > maxval``
        (JAX returns garbage there). Tensor bounds are not checked, since that would
        need a host sync (``.item()``), which breaks vmap and torch.compile.

    Examples:
      >>> u = uniform(key(0), (1000,))
      >>> bool(((u >= 0) & (u < 1)).all()), abs(float(u.mean()) - 0.5) < 0.05
      (True, True)
      >>> uniform(key(0), (2,), minval=1.0, maxval=0.0)
      Traceback (most recent call last):
      ...
      ValueError: uniform(...): need `minval` <= `maxval`, got 1.0 and 0.0
    """
    fn = "uniform(key, shape, dtype, minval, maxval)"
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"uniform(key, shape, dtype): `dtype` must be floating, got {dtype}")
    _check_finite(minval, "minval", fn)
    _check_finite(maxval, "maxval", fn)
    if _is_number(minval) and _is_number(maxval) and minval > maxval:
        raise ValueError(f"{fn}: need `minval` <= `maxval`, got {minval} and {maxval}")
    _check_key(k, fn)
    shape = _check_shape(shape, fn)
    u = _unit(k, shape, torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype not in (torch.float32, torch.float64):
        u = u.to(dtype)
        # Rounding to a short dtype can produce exactly 1.0; keep the interval half-open.
        one = torch.ones((), dtype=dtype, device=u.device)
        u = torch.where(u >= 1, torch.nextafter(one, torch.zeros_like(one)), u)
    out = u * (maxval - minval) + minval
    # The product and sum round too, to maxval itself for a u just below 1 (0.6% of
    # bfloat16 draws on [1, 2), 18 of 4.2M float32 draws on [100, 101)): such draws become
    # the largest value below maxval, so the interval stays half-open in every dtype.
    hi = torch.as_tensor(maxval, dtype=dtype, device=u.device)
    return torch.where(out < hi, out, torch.nextafter(hi, torch.as_tensor(minval, dtype=dtype,
                                                                           device=u.device)))


def normal(
    k: torch.Tensor, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal draws (Box-Muller on two independent uniform streams).

    Like ``jax.random.normal`` there is no mean or std argument: scale the draw
    (``mean + std * normal(...)``).

    Args:
      k: a key.
      shape: the shape of the draw (non-negative sizes).
      dtype: a floating dtype.

    Returns:
      A tensor of ``shape`` and ``dtype``.

    >>> z = normal(key(0), (20000,))
    >>> abs(float(z.mean())) < 0.03, abs(float(z.std()) - 1) < 0.03
    (True, True)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"normal(key, shape, dtype): `dtype` must be floating, got {dtype}")
    shape = _check_shape(shape, "normal(key, shape, dtype)")
    _check_key(k, "normal(key, shape, dtype)")
    return _normal(k, shape, dtype, None)


def _host_foldable(d: object) -> bool:
    """Whether :func:`fold_in` takes ``d`` as is (a 32-bit Python int, or a 0-d integer
    tensor), so :func:`_normal_folded` may fold it on the host."""
    if isinstance(d, torch.Tensor):
        return d.dim() == 0 and not d.is_floating_point() and not d.is_complex()
    return isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MASK32


def _normal_folded(k: torch.Tensor, data: Sequence[int | torch.Tensor], shape: Sequence[int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``normal(fold_in(...fold_in(k, data[0])..., data[-1]), shape, dtype)``, for a draw made
    once from a key folded with a few numbers (the DP noise: a step counter, a chunk
    index). On the host fast path the intermediate keys stay Python ints (no key
    tensors): the same numbers, fewer tiny tensor operations."""
    if (isinstance(k, torch.Tensor) and k.dtype == torch.int64 and k.shape == (2,)
            and isinstance(dtype, torch.dtype) and dtype.is_floating_point
            and all(_host_foldable(d) for d in data)
            and _host.eligible(k, *(d for d in data if isinstance(d, torch.Tensor)))):
        words = [int(v) for v in k.tolist()]
        for d in data:
            words = list(_host.fold_words(words[0], words[1], int(d)))
        return _normal(k, _check_shape(shape, "normal(key, shape, dtype)"), dtype, words)
    for d in data:
        k = fold_in(k, d)
    return normal(k, shape, dtype)


def _normal(k: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
            words: list[int] | None) -> torch.Tensor:
    """:func:`normal` after its checks; ``words``: the key's two words as Python ints, when
    already folded on the host (``k`` is then only a device reference)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n = math.prod(shape)
    if k.dim() == 1 and n <= 1 << 31 and (words is not None or _host.eligible(k)):
        # NOTE [host fast path]: both streams hashed in one NumPy pass, no key tensors.
        w0, w1 = words if words is not None else (int(v) for v in k.tolist())
        u1, u2 = _host.normal_streams(w0, w1, n, work == torch.float64)
        if len(shape) != 1:
            u1, u2 = u1.reshape(shape), u2.reshape(shape)
    elif k.dim() == 1:
        # The two streams, fold_in(k, 1) and fold_in(k, 2), hashed in one vectorised pass:
        # the same numbers as two `uniform` calls, at half the per-op overhead.
        u = _unit(fold_in(k, torch.tensor([1, 2], device=k.device)), shape, work)
        u1, u2 = 1.0 - u[0], u[1]  # u1 in (0, 1]
    else:
        u1 = 1.0 - uniform(fold_in(k, 1), shape, work)
        u2 = uniform(fold_in(k, 2), shape, work)
    # In place on the fresh draws (the same operations, so the same numbers): four
    # fewer temporaries of the draw's size.
    z = torch.log(u1).mul_(-2.0).sqrt_().mul_(u2.mul_(2.0 * math.pi).cos_())
    return z if z.dtype == dtype else z.to(dtype)


def bernoulli(
    k: torch.Tensor, p: float | torch.Tensor = 0.5, shape: Sequence[int] | None = None
) -> torch.Tensor:
    """Boolean draws that are ``True`` with probability ``p``.

    Args:
      k: a key.
      p: the probability: a Python number in ``[0, 1]``, or a tensor (not checked: a
        tensor ``p`` outside ``[0, 1]`` acts as if clipped; checking it would need a
        host sync, which breaks vmap and torch.compile). A tensor ``p`` is compared with a
        uniform draw of its own precision: float64 resolves ``2**-53``, other dtypes
        ``2**-24`` (a float32 ``p = 1e-9`` draws True ~6e-8 of the time).
      shape: the shape of the draw; default ``p``'s shape.

    Returns:
      A ``bool`` tensor.

    Raises:
      ValueError: a Python-number ``p`` outside ``[0, 1]`` or NaN.

    Examples:
      >>> m = bernoulli(key(0), 0.25, (10000,))
      >>> m.dtype, abs(float(m.float().mean()) - 0.25) < 0.02
      (torch.bool, True)
      >>> bernoulli(key(0), 1.5, (3,))
      Traceback (most recent call last):
      ...
      ValueError: bernoulli(key, p, shape): `p` must be a probability in [0, 1], got 1.5
    """
    fn = "bernoulli(key, p, shape)"
    if not isinstance(p, torch.Tensor):
        if not _is_number(p):
            raise TypeError(f"{fn}: `p` must be a float or a tensor, got {type(p).__name__}")
        if not 0.0 <= p <= 1.0:  # also refuses NaN
            raise ValueError(f"{fn}: `p` must be a probability in [0, 1], got {p}")
    if shape is None:
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else ()
    shape = _check_shape(shape, fn)
    if isinstance(p, torch.Tensor):  # a float64 p is compared at float64's resolution
        return uniform(k, shape, torch.float64 if p.dtype == torch.float64 else torch.float32) < p
    threshold = _threshold(p)
    _check_key(k, fn)
    n = math.prod(shape)
    if n <= 1 << 31 and _host.eligible(k):  # NOTE [bernoulli without its words] in _host
        return torch.from_numpy(_host.below(k, n, threshold)).reshape(tuple(k.shape[:-1]) + shape)
    return bits(k, shape) < threshold


def _bernoulli_positions(k: torch.Tensor, p: float, n: int) -> torch.Tensor:
    """``torch.nonzero(bernoulli(k, p, (n,))).squeeze(1)`` for one key and a Python ``p``
    (checked by the caller): the ``int64`` positions of the ``True`` draws, in order. On
    the host fast path NumPy finds them (about 10x faster than ``torch.nonzero`` on CPU);
    the same positions either way. Poisson batches' members (``fp.data``)."""
    if k.dim() == 1 and n <= 1 << 31 and _host.eligible(k):
        return _host.positions_below(k, n, _threshold(p))
    return torch.nonzero(bernoulli(k, p, (n,))).squeeze(1)


def _threshold(p: float) -> int:
    """A Python probability as the bound a 32-bit word is compared with (exact to
    ``2**-32``, two ops fewer than comparing a uniform draw)."""
    return min(max(round(float(p) * 4294967296.0), 0), 4294967296)


def randint(
    k: torch.Tensor, shape: Sequence[int], minval: int, maxval: int
) -> torch.Tensor:
    """Integers drawn uniformly from ``[minval, maxval)`` (int64).

    Args:
      k: a key.
      shape: the shape of the draw (non-negative sizes).
      minval: the lowest value (a Python int).
      maxval: one past the highest value (a Python int); ``maxval - minval`` must be
        in ``[1, 2**53]`` (the draw scales one float64 uniform; JAX clips an empty range
        to ``minval`` instead of raising).

    Returns:
      An ``int64`` tensor of ``shape``.

    Examples:
      >>> r = randint(key(0), (1000,), 3, 7)
      >>> int(r.min()), int(r.max())
      (3, 6)
      >>> randint(key(0), (2,), 5, 5)
      Traceback (most recent call last):
      ...
      ValueError: randint(key, shape, minval, maxval): need `minval` < `maxval`, got 5 and 5
    """
    fn = "randint(key, shape, minval, maxval)"
    for name, v in (("minval", minval), ("maxval", maxval)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fn}: `{name}` must be a Python int, got {type(v).__name__}")
    if maxval <= minval:
        raise ValueError(f"{fn}: need `minval` < `maxval`, got {minval} and {maxval}")
    if minval < _SEED_MIN or maxval - 1 > _SEED_MAX:
        raise ValueError(f"{fn}: the draws must fit int64, got [{minval}, {maxval})")
    if maxval - minval > 1 << 53:
        raise ValueError(
            f"{fn}: `maxval - minval` must be at most 2**53 (the draw scales a float64 "
            f"uniform), got {maxval - minval}"
        )
    shape = _check_shape(shape, fn)
    u = uniform(k, shape, torch.float64)
    # clamp, not clamp_: the in-place form has no vmap batching rule (a slow fallback).
    # The offset is added in int64: in float64 a minval beyond 2**53 lost the draw (all of
    # randint(k, s, 2**60, 2**60 + 10) was 2**60).
    return torch.floor(u * (maxval - minval)).to(torch.int64).clamp(max=maxval - minval - 1) + minval


def permutation(k: torch.Tensor, n: int) -> torch.Tensor:
    """A random permutation of ``range(n)``.

    Args:
      k: a key.
      n: a non-negative Python int.

    Returns:
      An ``int64`` tensor holding ``0 .. n-1`` in random order.

    >>> sorted(permutation(key(0), 5).tolist())
    [0, 1, 2, 3, 4]
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"permutation(key, n): `n` must be a Python int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"permutation(key, n): `n` must be >= 0, got {n}")
    return torch.argsort(uniform(k, (n,), torch.float64))


def seed_from_key(k: torch.Tensor) -> int:
    """A 63-bit integer seed from a key. Reads the key on the host (a sync).

    Args:
        k: a key.

    Returns:
        A non-negative Python int below ``2**63``.

    Examples:
        >>> seed_from_key(key(0)) == seed_from_key(key(0))
        True
    """
    _check_key(k, "seed_from_key(key)")
    if k.dim() != 1:
        raise ValueError(f"seed_from_key(key): expected one key of shape (2,), got {tuple(k.shape)}")
    a, b = (int(v) for v in k.detach().cpu().tolist())
    return ((a << 31) ^ b) & ((1 << 63) - 1)


def generator(k: torch.Tensor, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` seeded from a key, the bridge to PyTorch's own samplers.

    The same key always gives the same stream; PyTorch's global RNG is untouched.

    Args:
        k: a key (int64 tensor of shape ``(2,)``).
        device: the generator's device (default: the key's device); draw on that device.

    Returns:
        A fresh ``torch.Generator`` seeded deterministically from ``k``.

    Examples:
        >>> g1, g2 = generator(key(0)), generator(key(0))
        >>> bool(torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2)))
        True
    """
    dev = torch.device(device) if device is not None else k.device
    g = torch.Generator(device=dev)
    g.manual_seed(seed_from_key(k))
    return g

