"""Process-group helpers: is the job distributed, which rank am I, start it, wait for all."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["barrier", "initialize", "is_initialized", "rank", "require", "world_size"]

LAUNCH_HINT = (
    "launch the script with `torchrun --nproc_per_node N script.py` and call "
    "`fp.distributed.initialize()` (or `torch.distributed.init_process_group()`) first; "
    "in tests, `fp.distributed.spawn(fn, nprocs)` starts N local processes"
)


def is_initialized() -> bool:
    """Whether a default ``torch.distributed`` process group exists.

    Returns:
      ``True`` inside an initialised job, else ``False`` (also when ``torch.distributed``
      is not built).

    Example:
      >>> is_initialized()
      False
    """
    return dist.is_available() and dist.is_initialized()


def require(fn: str) -> None:
    """Raise a clear error, naming ``fn`` and how to launch, when there is no process group."""
    if not is_initialized():
        raise RuntimeError(f"{fn}: torch.distributed is not initialised; {LAUNCH_HINT}")


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (the default group when ``None``).

    Like ``jax.process_index()``, a single process that never initialised a group is
    rank 0, so one script runs both alone and under ``torchrun``.

    Args:
      group: a ``torch.distributed`` process group, or ``None`` for the default one.

    Returns:
      The rank, an ``int`` in ``[0, world_size(group))``.

    Example:
      >>> rank(), world_size()
      (0, 1)
    """
    if not is_initialized():
        return 0
    return dist.get_rank(group)


def world_size(group: Any = None) -> int:
    """The number of processes in ``group`` (1 when no group is initialised).

    Args:
      group: a process group, or ``None`` for the default one.

    Returns:
      The group size (``jax.process_count()`` for the default group).

    Example:
      >>> world_size()
      1
    """
    if not is_initialized():
        return 1
    return dist.get_world_size(group)


def barrier(group: Any = None) -> None:
    """Block until every rank of ``group`` reaches this call (a no-op in one process).

    A peer that died or never arrives makes this raise after the group's timeout (set by
    :func:`initialize`), never hang forever.

    Args:
      group: a process group, or ``None`` for the default one.

    Returns:
      ``None``.

    Example:
      >>> barrier()  # nothing to wait for in a single process
    """
    if not is_initialized() or dist.get_world_size(group) == 1:
        return
    try:
        dist.barrier(group)
    except Exception as e:  # noqa: BLE001 - re-raised with the rank and a hint
        raise RuntimeError(
            f"fp.distributed.barrier: rank {dist.get_rank()} failed waiting for its peers "
            f"(a peer rank may have died or timed out): {e}"
        ) from e


def initialize(backend: str | None = None, *, timeout_s: float = 300.0) -> bool:
    """Initialise the default process group from ``torchrun``'s environment variables.

    Like ``jax.distributed.initialize()``. Under ``torchrun`` (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT`` set) it calls ``torch.distributed.init_process_group``
    with ``backend`` (default: ``"nccl"`` when CUDA is available, else ``"gloo"``) and a
    timeout, after which a collective waiting on a dead peer raises instead of hanging.
    Without those variables (a plain ``python script.py``) it does nothing, so a script
    runs alone or distributed unchanged. On CUDA with NCCL it also selects the GPU
    ``LOCAL_RANK``.

    Args:
      backend: ``"gloo"``, ``"nccl"``, ... or ``None`` to choose from the hardware.
      timeout_s: seconds a collective may wait for its peers.

    Returns:
      ``True`` when a group is initialised (now or before), ``False`` when running alone.

    Example:
      >>> initialize()  # not under torchrun: nothing to do
      False
    """
    if is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True
