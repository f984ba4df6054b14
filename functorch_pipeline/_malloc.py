"""Keeping freed memory: an explicit, reversible opt-in to glibc malloc settings.

With it, large freed blocks stay in the process instead of going back to the OS. Re-exported as ``fp.devices.keep_freed_memory``. Nothing here runs at import.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any

__all__ = ["MallocSettings", "keep_freed_memory"]

MiB = 1024 * 1024
# mallopt parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's documented defaults (mallopt(3)): both thresholds start at 128 KiB; the mmap
# threshold may not exceed HEAP_MAX_SIZE / 2 (32 MiB on 64-bit systems).
DEFAULT_MMAP_THRESHOLD = 128 * 1024
DEFAULT_TRIM_THRESHOLD = 128 * 1024
MAX_MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
_ENV = {"mmap": "MALLOC_MMAP_THRESHOLD_", "trim": "MALLOC_TRIM_THRESHOLD_"}

_lock = threading.Lock()
# what this module last set (None: never touched, so the process has what it started with)
_current: dict[str, int | None] = {"mmap": None, "trim": None}


def _glibc() -> Any:
    """The C library when it is glibc (has ``mallopt`` and ``gnu_get_libc_version``), else
    None. Tests monkeypatch this to simulate other platforms."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return libc


def _startup(which: str) -> int | None:
    """The value glibc read from ``MALLOC_*_THRESHOLD_`` at start-up, if one was set."""
    text = os.environ.get(_ENV[which], "").strip()
    return int(text) if text.isdigit() else None


def _first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


class MallocSettings:
    """The handle :func:`keep_freed_memory` returns.

    ``applied`` says whether the thresholds were changed (False on a non-glibc platform,
    where nothing happens, with the reason in ``reason``). :meth:`restore` (or leaving the
    ``with`` block) puts back the settings that were in force before the call. Calling
    :meth:`restore` twice is harmless.

    Attributes:
        applied: whether the thresholds were changed.
        reason: what was done, or why nothing was (a non-glibc platform).
        mmap_threshold: the ``M_MMAP_THRESHOLD`` asked for, in bytes.
        trim_threshold: the ``M_TRIM_THRESHOLD`` asked for, in bytes.
        previous: the thresholds in force before the call, put back by :meth:`restore`.
        restored: whether :meth:`restore` has run (``True`` when nothing was applied).

    Examples:
        >>> import functorch_pipeline as fp
        >>> with fp.devices.keep_freed_memory() as settings:
        ...     pass
        >>> isinstance(settings, MallocSettings), settings.restored
        (True, True)
    """

    def __init__(self, applied: bool, reason: str, mmap_threshold: int, trim_threshold: int,
                 previous: dict[str, int | None]) -> None:
        self.applied = applied
        self.reason = reason
        self.mmap_threshold = mmap_threshold
        self.trim_threshold = trim_threshold
        self.previous = dict(previous)
        self.restored = not applied

    def __bool__(self) -> bool:
        return self.applied

    def __repr__(self) -> str:
        state = "restored" if self.restored and self.applied else (
            "active" if self.applied else "not applied")
        return (f"MallocSettings({state}, mmap_threshold={self.mmap_threshold}, "
                f"trim_threshold={self.trim_threshold}, reason={self.reason!r})")

    def restore(self) -> None:
        """Put back the thresholds in force before :func:`keep_freed_memory` was called.

        # NOTE [malloc restore]: glibc has no getter for these thresholds, so "previous" is
        # known, not read: what an earlier ``keep_freed_memory`` set, else the value of
        # ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment at
        # start-up, else glibc's documented default (128 KiB each). One thing cannot be put
        # back: by default glibc raises the mmap threshold dynamically (up to 32 MiB) when a
        # large mmap'ed block is freed, and any ``mallopt`` of a threshold switches that
        # adjustment off for the life of the process. After ``restore`` the thresholds are
        # the defaults, but fixed.
        """
        if self.restored:
            return
        libc = _glibc()
        with _lock:
            if libc is not None:
                mmap = _first(self.previous["mmap"], _startup("mmap"), DEFAULT_MMAP_THRESHOLD)
                trim = _first(self.previous["trim"], _startup("trim"), DEFAULT_TRIM_THRESHOLD)
                libc.mallopt(M_MMAP_THRESHOLD, min(mmap, MAX_MMAP_THRESHOLD))
                libc.mallopt(M_TRIM_THRESHOLD, trim)
            _current.update(self.previous)
            self.restored = True

    def __enter__(self) -> MallocSettings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _check(name: str, value: Any, upper: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"keep_freed_memory: `{name}` must be an int (bytes), "
                        f"got {type(value).__name__}")
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}] (glibc's maximum)" if upper is not None else ">= 0"
        raise ValueError(f"keep_freed_memory: `{name}` must be {bound}, got {value}")
    if value > 2**31 - 1:
        raise ValueError(f"keep_freed_memory: `{name}` must fit a C int (< 2**31), got {value}")
    return value


def keep_freed_memory(mmap_threshold: int = 32 * MiB,
                      trim_threshold: int = 256 * MiB) -> MallocSettings:
    """Make glibc malloc keep large freed blocks in the process (explicit opt-in).

    Pure, functional code allocates fresh tensors every step (new parameters, new optimizer
    state) and frees the old ones. With glibc's defaults, blocks of a few MiB are served by
    ``mmap`` and the top of the heap is trimmed when freed, so every step hands that memory
    back to the OS and page-faults it in again (~8,000 minor faults per step for Adam on a
    10M-parameter MLP). This calls ``mallopt`` to raise ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD``, the same as setting ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` before the process starts. It changes the whole process (all
    threads, every library), never happens at import, and is undone by the handle's
    :meth:`MallocSettings.restore` or by leaving its ``with`` block (see NOTE
    [malloc restore] for what "undone" means with glibc). The cost: the process keeps up to
    ``trim_threshold`` bytes of freed heap it would otherwise return. Results of any
    computation are unchanged; only where memory comes from changes. CUDA memory is not
    affected (PyTorch's caching allocator already keeps it).

    On a platform without glibc (macOS, Windows, musl) nothing happens and the handle has
    ``applied == False`` (it is falsy) and ``reason`` says why. JAX has no counterpart:
    XLA's CPU client uses its own allocator.

    Args:
      mmap_threshold: bytes; blocks at least this large are ``mmap``'ed (and unmapped when
        freed). At most 32 MiB on 64-bit glibc (``MAX_MMAP_THRESHOLD``).
      trim_threshold: bytes of free memory at the top of the heap before glibc returns it
        to the OS.

    Returns:
      A :class:`MallocSettings` handle: ``applied``, ``reason``, ``restore()``, and a
      context manager that restores on exit.

    Raises:
      TypeError, ValueError: a threshold that is not an int in range.

    Notes:
      NOTE [malloc restore]: glibc has no getter for the thresholds, so ``restore`` puts back the
        known previous values (an earlier setting, else the environment's, else glibc's 128 KiB
        defaults); glibc's dynamic mmap-threshold adjustment stays off for the process.

    Examples:
      >>> import functorch_pipeline as fp
      >>> with fp.devices.keep_freed_memory() as settings:
      ...     x = fp.optim.adam(1e-3)  # ... train here ...
      >>> settings.restored
      True
      >>> fp.devices.keep_freed_memory(mmap_threshold=-1)
      Traceback (most recent call last):
      ...
      ValueError: keep_freed_memory: `mmap_threshold` must be in [0, 33554432] (glibc's maximum), got -1
    """
    mmap_threshold = _check("mmap_threshold", mmap_threshold, MAX_MMAP_THRESHOLD)
    trim_threshold = _check("trim_threshold", trim_threshold, None)
    libc = _glibc()
    if libc is None:
        return MallocSettings(False, f"not glibc ({sys.platform}): malloc settings unchanged",
                              mmap_threshold, trim_threshold, dict(_current))
    with _lock:
        previous = dict(_current)
        ok_mmap = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        ok_trim = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
        _current.update(mmap=mmap_threshold, trim=trim_threshold)
    handle = MallocSettings(True, "glibc mallopt", mmap_threshold, trim_threshold, previous)
    if not (ok_mmap and ok_trim):  # glibc refused a value: undo, then say so
        handle.restore()
        raise ValueError(f"keep_freed_memory: glibc mallopt refused mmap_threshold="
                         f"{mmap_threshold} (ok={ok_mmap}) or trim_threshold={trim_threshold} "
                         f"(ok={ok_trim})")
    return handle
