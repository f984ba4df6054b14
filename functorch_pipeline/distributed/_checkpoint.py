"""Checkpoints in a distributed run: one rank writes, every rank waits for the file.

# NOTE [one writer, agreed outcome]
Rank ``src`` (0) writes the whole tree with ``fp.save`` (atomic: a temporary file renamed
into place only when complete, so a crash never leaves a half-written checkpoint under
the final name). The other ranks wait on a one-number broadcast of the writer's outcome:
it doubles as the barrier (nobody reads before the file is complete) and makes a failed
save raise on EVERY rank at once (not a timeout later). A writer that dies mid-save
breaks the broadcast on the others (a ``RuntimeError`` within the group's timeout), and
the directory's latest checkpoint stays the previous complete one. Restores agree on the
step first (rank ``src`` picks it), so all ranks load the same file even while another
job adds checkpoints. Trees must be the same on every rank: with
:func:`shard_optimizer`, save ``gather_state(...)`` (independent of the world size) and
cut it with ``shard_state(...)`` after loading, so N ranks can resume with M.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from functorch_pipeline import serialization
from functorch_pipeline.distributed._collectives import broadcast
from functorch_pipeline.distributed._runtime import is_initialized
from functorch_pipeline.distributed._runtime import rank

__all__ = ["load", "restore_checkpoint", "save", "save_checkpoint"]


def _agree(fn: str, value: int, src: int, group: Any) -> int:
    """Broadcast one int from ``src`` (also a barrier); one process: ``value``."""
    if not is_initialized():
        return value
    return int(broadcast(torch.tensor([value], dtype=torch.int64), src=src, group=group)[0])


def _write(fn: str, thunk: Any, src: int, group: Any) -> Any:
    out, err = None, None
    if rank(group) == src:
        try:
            out = thunk()
        except Exception as e:  # noqa: BLE001 - the other ranks learn of it, then it is re-raised
            err = e
    status = _agree(fn, 0 if err is None else 1, src, group)
    if err is not None:
        raise err
    if status:
        raise RuntimeError(
            f"fp.distributed.{fn}: rank {src} failed to write the checkpoint (see its error)"
        )
    return out


def save(
    path: str | os.PathLike[str],
    tree: Any,
    *,
    metadata: Mapping[str, str] | None = None,
    src: int = 0,
    group: Any = None,
) -> str:
    """``fp.save`` by rank ``src`` only; returns on every rank once the file is complete.

    A collective (NOTE [one writer, agreed outcome]). Without a process group it is
    ``fp.save``.

    Args:
      path: the file to write.
      tree: the pytree (rank ``src``'s is written; others may pass the same tree).
      metadata: extra ``{str: str}`` header entries.
      src: the writing rank.
      group: a process group, or ``None`` for the default one.

    Returns:
      ``path`` as a string.

    Notes:
      NOTE [one writer, agreed outcome]: rank 0 writes with an atomic ``fp.save``; the other ranks
        wait on a broadcast of its outcome, which is the barrier and makes a failed save raise on
        every rank at once.

    Example:
      >>> import os, tempfile, functorch_pipeline as fp
      >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
      >>> with fp.distributed.local_group():
      ...     _ = fp.distributed.save(path, {"w": torch.ones(2)})
      ...     fp.distributed.load(path)
      {'w': tensor([1., 1.])}
    """
    _write("save", lambda: serialization.save(path, tree, metadata=metadata), src, group)
    return os.fspath(path)


def load(
    path: str | os.PathLike[str],
    like: Any = None,
    *,
    device: torch.device | str | int | None = None,
    group: Any = None,
) -> Any:
    """``fp.load`` on every rank (after :func:`save` returned, the file is complete).

    Args:
      path: the file.
      like: optional template (see ``fp.load``).
      device: where tensors go (e.g. this rank's GPU).
      group: unused; accepted for symmetry with :func:`save`.

    Returns:
      The tree.

    Example:
      >>> import os, tempfile, functorch_pipeline as fp
      >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
      >>> fp.save(path, {"w": torch.zeros(1)})
      >>> fp.distributed.load(path)
      {'w': tensor([0.])}
    """
    return serialization.load(path, like, device=device)


def save_checkpoint(
    manager: Any,
    step: int,
    tree: Any,
    *,
    metrics: Mapping[str, Any] | None = None,
    src: int = 0,
    group: Any = None,
) -> str:
    """``manager.save(step, tree, metrics=...)`` by rank ``src``; every rank waits for it.

    Only rank ``src`` touches the directory, so retention and the manager's run id work as
    in one process; if that rank dies mid-save, ``manager.latest_step()`` is still the
    previous complete step (NOTE [one writer, agreed outcome]).

    Args:
      manager: an ``fp.train.CheckpointManager`` (one per rank, same directory).
      step: the step number.
      tree: the pytree to save (e.g. a ``TrainState``).
      metrics: numbers recorded with the checkpoint.
      src: the writing rank.
      group: a process group, or ``None`` for the default one.

    Returns:
      The checkpoint's path.

    Notes:
      NOTE [one writer, agreed outcome]: rank 0 writes with an atomic ``fp.save``; the other ranks
        wait on a broadcast of its outcome, which is the barrier and makes a failed save raise on
        every rank at once.

    Example:
      >>> import tempfile, functorch_pipeline as fp
      >>> mgr = fp.train.CheckpointManager(tempfile.mkdtemp())
      >>> with fp.distributed.local_group():
      ...     _ = fp.distributed.save_checkpoint(mgr, 3, {"w": torch.ones(1)})
      ...     fp.distributed.restore_checkpoint(mgr)
      {'w': tensor([1.])}
    """
    _write("save_checkpoint", lambda: manager.save(step, tree, metrics=metrics), src, group)
    return manager.path(int(step))


def restore_checkpoint(
    manager: Any,
    like: Any = None,
    *,
    step: int | None = None,
    device: torch.device | str | int | None = None,
    src: int = 0,
    group: Any = None,
) -> Any:
    """Every rank restores the same step (default: rank ``src``'s latest).

    Args:
      manager: an ``fp.train.CheckpointManager``.
      like: optional template (see ``fp.load``).
      step: a step, or ``None`` for the latest on rank ``src``.
      device: where tensors go.
      src: the rank that picks the latest step.
      group: a process group, or ``None`` for the default one.

    Returns:
      The restored tree.

    Raises:
      FileNotFoundError: on every rank, when there is no checkpoint.

    Example:
      >>> import tempfile, functorch_pipeline as fp
      >>> mgr = fp.train.CheckpointManager(tempfile.mkdtemp())
      >>> _ = mgr.save(1, {"w": torch.zeros(1)})
      >>> fp.distributed.restore_checkpoint(mgr, step=1)
      {'w': tensor([0.])}
    """
    if step is None:
        mine = manager.latest_step() if rank(group) == src else None
        step = _agree("restore_checkpoint", -1 if mine is None else int(mine), src, group)
        if step < 0:
            raise FileNotFoundError(
                f"fp.distributed.restore_checkpoint: no checkpoint in {manager.directory!r}"
            )
    return manager.restore(step, like, device=device)
