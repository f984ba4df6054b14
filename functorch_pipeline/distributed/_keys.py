"""Random keys across ranks: one identical everywhere, one distinct per rank."""

from __future__ import annotations

from typing import Any

import torch

from functorch_pipeline import random as fpr
from functorch_pipeline.distributed._collectives import broadcast
from functorch_pipeline.distributed._runtime import is_initialized
from functorch_pipeline.distributed._runtime import rank

__all__ = ["rank_key", "shared_key"]


def _check(fn: str, key: Any) -> None:
    if not fpr.is_key(key):
        raise TypeError(
            f"fp.distributed.{fn}: `key` must be an fp.random key, got "
            f"{type(key).__name__ if not isinstance(key, torch.Tensor) else key.dtype}"
        )


def shared_key(key: torch.Tensor, *, src: int = 0, group: Any = None) -> torch.Tensor:
    """Rank ``src``'s key on every rank: for draws that must agree (DP noise, data order).

    Keys made from the same seed already agree; this makes it so even when the seed came
    from somewhere rank-specific (a clock, a per-process RNG). A collective (every rank
    calls it); in a single process without a group it returns ``key``.

    Args:
      key: an ``fp.random`` key.
      src: the rank whose key everyone gets.
      group: a process group, or ``None`` for the default one.

    Returns:
      The shared key (a new tensor).

    Example:
      >>> import functorch_pipeline as fp
      >>> k = fp.random.key(0)
      >>> bool((fp.distributed.shared_key(k) == k).all())
      True
    """
    _check("shared_key", key)
    if not is_initialized():
        return key.clone()
    return broadcast(key, src=src, group=group)


def rank_key(key: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """``fp.random.fold_in(key, rank)``: a key that differs on every rank (no communication).

    Use it for randomness that must be independent across ranks, such as dropout on
    each rank's own examples (with per-example keys from the global example index, the
    shared key is the right choice instead: then N ranks reproduce one process exactly).

    Args:
      key: an ``fp.random`` key (the same on every rank).
      group: the process group whose rank is folded in (``None``: the default group; rank
        0 without a group).

    Returns:
      A new key.

    Example:
      >>> import functorch_pipeline as fp
      >>> k = fp.random.key(0)
      >>> bool((fp.distributed.rank_key(k) == fp.random.fold_in(k, 0)).all())
      True
    """
    _check("rank_key", key)
    return fpr.fold_in(key, rank(group))
