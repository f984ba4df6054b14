"""Recycled output buffers for per-example gradients (see NOTE [recycled outputs]).

# NOTE [recycled outputs]
A per-example gradient is a large fresh tensor every call (``(B, 50, 320)`` float32 for
the MNIST CNN's ``fc1``: 16 MB). glibc's malloc serves such blocks with ``mmap`` and
unmaps them on free, so every call page-faults the whole block back in (~4,000 faults,
~1.4 us each on the 2-core benchmark machine: 5-6 ms of a 22 ms step; DESIGN.md,
"Benchmarking on these machines"). A batch gradient has no such output. The engine
therefore keeps the buffers it returned (up to ``_PER_KEY`` per shape, dtype and device,
only those of at least ``_MIN_BYTES``) and writes the next call's result into one of them
*only when nothing else can reach it*: no other Python reference to the tensor, no other
C++ owner of its ``TensorImpl`` (autograd's saved tensors, DLPack), and no view of its
storage. A buffer the caller still holds is never touched; the cost is that the memory
of the last results stays allocated after the caller drops them (what a training loop
allocates again at the next step anyway). :func:`release` frees it.

"Nothing else" is read from ``sys.getrefcount``, whose value for an unreachable pooled
tensor depends on the interpreter (5 on CPython 3.10, 4 on 3.11-3.13): it is measured at
import (:func:`_calibrate`), not assumed. The pool is shared by all threads and guarded
by a lock.
"""

from __future__ import annotations

import sys
import threading

import torch

__all__ = ["release", "take", "keep"]

_PER_KEY = 4
_MIN_BYTES = 1 << 20
_POOL: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[torch.Tensor]] = {}
# Calls from several threads share the pool: a scan must not see another thread's
# removal or eviction halfway (an IndexError, or the wrong entry deleted).
_LOCK = threading.Lock()


def _refcount(t: torch.Tensor) -> int:
    # ``take`` calls this on its loop variable; the count includes the pool's list, that
    # variable, this argument and getrefcount's own (plus the caller's argument slot on
    # CPython 3.10: 5 there, 4 on 3.11-3.13), so it is measured, not assumed.
    return sys.getrefcount(t)


def _calibrate() -> int | None:
    """What :func:`_refcount` returns inside :func:`take`'s loop for a pooled tensor that
    nothing else holds, measured the same way on this interpreter; ``None`` (never reuse)
    if it is not a plausible count (an interpreter that counts references differently)."""
    pool = [torch.empty(0)]
    for i in range(len(pool)):  # the same statements as take's loop
        t = pool[i]
        n = _refcount(t)
        return n if 2 <= n <= 8 else None
    return None


# sys.getrefcount of a pooled tensor seen by `take` when nothing else holds it.
_REFS_WHEN_FREE = _calibrate()


def _free(t: torch.Tensor, refs: int) -> bool:
    # ``refs`` was read by the caller (see _refcount); a reference anywhere else adds one.
    return (refs == _REFS_WHEN_FREE and t._use_count() == 1
            and torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2)


def take(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device: a recycled
    buffer when one is free, else a new one. The caller must overwrite every element."""
    key = (tuple(shape), like.dtype, like.device)
    with _LOCK:
        pool = _POOL.get(key)
        if pool and _REFS_WHEN_FREE is not None:
            for i in range(len(pool)):  # not enumerate: its cached tuple would hold a reference
                t = pool[i]
                n = _refcount(t)  # its own statement, as in _calibrate (nothing else on the stack)
                if _free(t, n):
                    del pool[i]
                    return t
    return like.new_empty(shape)


def keep(t: torch.Tensor) -> torch.Tensor:
    """Remember ``t`` (a result about to be returned) for reuse; returns ``t``."""
    if t.numel() * t.element_size() >= _MIN_BYTES and t.is_contiguous() and t._base is None:
        with _LOCK:
            pool = _POOL.setdefault((tuple(t.shape), t.dtype, t.device), [])
            pool.append(t)
            if len(pool) > _PER_KEY:
                del pool[0]
    return t


def release() -> None:
    """Drop every recycled buffer (their memory is freed once nothing else holds it)."""
    with _LOCK:
        _POOL.clear()
