"""The eager-CPU form of ``fp.random``'s hash: the same 32-bit words, computed on the host.

# NOTE [host fast path]
Keyed draws are a counter-based hash written in tensor operations, so that they run under
``vmap``, ``grad`` and ``torch.compile`` and on any device. On CPU in plain eager code
those ~30 int32 tensor operations cost more than the hash itself: each is a dispatch,
an allocation and, at 2 threads, a parallel region, for a few cycles of work per
element. There, and only there, the same hash runs here instead:

* :func:`fold_in` hashes the key's two words in Python integers (a key is 2 numbers:
  ~5 us instead of ~40 us of tiny tensor ops);
* :func:`bits` and :func:`unit` hash the counters in NumPy ``uint32`` arrays, where
  shifts are logical and multiplies wrap by themselves (no masks), in place and in
  cache-sized chunks: 0.04 against 0.13 ms for 21,840 words at 2 threads, 1.7 against
  4.5 ms for 2**20 (ad hoc); ``benchmarks/per_example_conv.py`` times the
  whole ``normal`` draw both ways.

Every word is the one the tensor form gives (tests compare both forms bit for bit, and
the float conversions are exact: integers below 2**24 or 2**53 scaled by a power of 2).
:func:`eligible` decides: plain CPU tensors, outside any ``torch.func`` transform,
``torch.compile`` trace, ``jit`` trace or dispatch mode (fake tensors, functionalisation),
where reading a CPU tensor's values is free and cannot change what is traced. Everything
else takes the tensor form, unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["below", "bits", "eligible", "fold_in", "fold_words", "normal_streams", "positions_below", "unit"]

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_C1, _C2, _ADD = 0x85EBCA6B, 0xC2B2AE35, 0x7F4A7C15
_SALT = (0x2545F491, 0x1B873593)
_CHUNK = 1 << 16  # counters per pass: 256 KB of uint32, stays in L2
_U32 = {name: np.uint32(v) for name, v in
        (("golden", _GOLDEN), ("c1", _C1), ("c2", _C2), ("add", _ADD), ("16", 16), ("13", 13))}


def eligible(*tensors: torch.Tensor) -> bool:
    """Whether the host form may run for these tensors (NOTE [host fast path])."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: constant when traced
        return False
    for t in tensors:
        if type(t) is not torch.Tensor or t.device.type != "cpu":
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    return (torch._C._functorch.peek_interpreter_stack() is None
            and torch._C._len_torch_dispatch_stack() == 0)


# -- Python integers (keys) -----------------------------------------------------------------


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * _C1) & _MASK32
    h ^= h >> 13
    h = (h * _C2) & _MASK32
    return h ^ (h >> 16)


def _hash2(k0: int, k1: int, counter: int) -> int:
    x = _fmix32((counter * _GOLDEN + k0) & _MASK32)
    return _fmix32(((x ^ k1) + _ADD) & _MASK32)


def fold_in(k: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor | None:
    """``_core.fold_in`` for one key (shape ``(2,)``) and an int or an integer tensor of at
    most one axis; ``None`` for anything else (the caller uses the tensor form)."""
    if k.dim() != 1:
        return None
    if isinstance(data, torch.Tensor):
        if data.dim() > 1:
            return None
        values = data.tolist()
    else:
        values = data
    k0, k1 = (int(v) for v in k.tolist())
    if isinstance(values, list):
        words = [list(fold_words(k0, k1, int(d))) for d in values]
        return torch.tensor(words, dtype=torch.int64).reshape(len(words), 2)
    return torch.tensor(fold_words(k0, k1, int(values)), dtype=torch.int64)


def fold_words(k0: int, k1: int, data: int) -> tuple[int, int]:
    """``fold_in`` on a key's two words as Python ints (the key tensor's values, any sign),
    ``data`` reduced to its low 32 bits; the new key's two words."""
    a, b = (k1 ^ _SALT[0]) & _MASK32, (k0 ^ _SALT[1]) & _MASK32
    d = data & _MASK32
    return _hash2(k0 & _MASK32, a, d), _hash2(k1 & _MASK32, b, d)


# -- NumPy uint32 arrays (draws) ------------------------------------------------------------


def _fmix32_(h: np.ndarray) -> None:
    h ^= h >> _U32["16"]
    h *= _U32["c1"]
    h ^= h >> _U32["13"]
    h *= _U32["c2"]
    h ^= h >> _U32["16"]


_BASE: list[np.ndarray] = []  # [counters 0 .. _CHUNK-1 times the golden ratio], made once


def _base() -> np.ndarray:
    if not _BASE:
        _BASE.append(np.arange(_CHUNK, dtype=np.uint32) * _U32["golden"])
    return _BASE[0]


def _key_words(k: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A key tensor's (or its ``int64`` words array's) values, and its two words as
    ``uint32`` columns ``(..., 1)``."""
    kn = k.numpy() if isinstance(k, torch.Tensor) else k
    return kn, (kn[..., 0:1] & _MASK32).astype(np.uint32), (kn[..., 1:2] & _MASK32).astype(np.uint32)


def _hash_into(h: np.ndarray, start: int, k0: np.ndarray, k1: np.ndarray) -> None:
    """Fill ``h`` (``(..., m)``, ``m <= _CHUNK``) with the words of counters ``start ..
    start + m - 1``."""
    # counter * golden + k0 (mod 2**32), counter = start + i: base[i] + (start * golden + k0)
    np.add(_base()[:h.shape[-1]], k0 + np.uint32((start * _GOLDEN) & _MASK32), out=h)
    _fmix32_(h)
    h ^= k1
    h += _U32["add"]
    _fmix32_(h)


def _words(k: torch.Tensor | np.ndarray, n: int) -> np.ndarray:
    """``uint32`` words ``(*k.shape[:-1], n)``: the hash of counters ``0 .. n-1`` (``k``:
    key tensors, or their words as an ``int64`` array)."""
    kn, k0, k1 = _key_words(k)
    out = np.empty(kn.shape[:-1] + (n,), dtype=np.uint32)
    for s in range(0, n, _CHUNK):
        _hash_into(out[..., s:min(n, s + _CHUNK)], s, k0, k1)
    return out


def below(k: torch.Tensor, n: int, threshold: int) -> np.ndarray:
    """``bits(k, n) < threshold`` (``threshold`` in ``[0, 2**32]``) as a NumPy ``bool``
    array ``(*k.shape[:-1], n)``: ``_core.bernoulli`` with a Python probability.

    # NOTE [bernoulli without its words]
    The tensor form widens the words to int64 (``bits``), masks and compares them: three
    passes over ``8 n`` bytes before the ``n``-byte answer. Here each cache-sized chunk of
    words is hashed into one scratch buffer and compared into the answer while in cache:
    the same booleans (the same words, the same comparison). 10M draws (a Poisson batch
    of a 10M-example dataset): 27 against 100 ms, 60k: 0.19 against 0.31 ms (ad hoc, 2
    threads, 2-core Intel Xeon).
    """
    kn, k0, k1 = _key_words(k)
    out = np.empty(kn.shape[:-1] + (n,), dtype=bool)
    if threshold >= 1 << 32 or threshold <= 0:  # every word is below 2**32, none below 0
        out.fill(threshold > 0)
        return out
    t = np.uint32(threshold)
    scratch = np.empty(kn.shape[:-1] + (min(n, _CHUNK),), dtype=np.uint32)
    for s in range(0, n, _CHUNK):
        h = scratch[..., :min(n, s + _CHUNK) - s]
        _hash_into(h, s, k0, k1)
        np.less(h, t, out=out[..., s:s + h.shape[-1]])
    return out


def positions_below(k: torch.Tensor, n: int, threshold: int) -> torch.Tensor:
    """The ``int64`` positions where :func:`below` is ``True`` (one key), in order."""
    return torch.from_numpy(np.flatnonzero(below(k, n, threshold)).astype(np.int64, copy=False))


def bits(k: torch.Tensor, n: int) -> torch.Tensor:
    """``_core._bits_i32`` flattened: ``int32`` bit patterns ``(*k.shape[:-1], n)``."""
    return torch.from_numpy(_words(k, n).view(np.int32))


def unit(k: torch.Tensor | np.ndarray, n: int, second: torch.Tensor | np.ndarray | None
         ) -> torch.Tensor:
    """``_core._unit`` flattened: float32 from 24 bits of one word, or float64 from 27 + 26
    bits of this key's words and ``second``'s (the float64 second stream's key)."""
    w = _words(k, n)
    if second is None:
        np.right_shift(w, np.uint32(8), out=w)
        u = w.astype(np.float32)
        u *= np.float32(1.0 / 16777216.0)
        return torch.from_numpy(u)
    hi = (w >> np.uint32(5)).astype(np.float64)
    hi *= 67108864.0
    hi += _words(second, n) >> np.uint32(6)
    hi *= 1.0 / 9007199254740992.0
    return torch.from_numpy(hi)


def normal_streams(k0: int, k1: int, n: int, float64: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two uniform streams of ``_core.normal`` for the key with words ``(k0, k1)``:
    ``1 - unit(fold_in(k, 1))`` in ``(0, 1]`` and ``unit(fold_in(k, 2))``, hashed in one
    pass with no key tensors (``1 - u`` is exact in both widths: ``u`` is a multiple of
    ``2**-24`` or ``2**-53`` below 1)."""
    keys = [fold_words(k0, k1, 1), fold_words(k0, k1, 2)]
    second = np.array([fold_words(a, b, 0x6A09E667) for a, b in keys]) if float64 else None
    u = unit(np.array(keys), n, second).numpy()
    np.subtract(u.dtype.type(1.0), u[0], out=u[0])
    out = torch.from_numpy(u)
    return out[0], out[1]
