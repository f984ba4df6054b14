"""Start ranks without ``torchrun``: N local processes (tests, notebooks) or a 1-rank group.

# NOTE [spawn never hangs]
:func:`spawn` gives every rank a process-group timeout (a collective waiting on a dead or
diverged peer raises after it) and the parent a hard deadline: at the deadline every
still-running rank is killed and a ``TimeoutError`` names them; once a rank has failed,
its peers get 10 s to report their own error (usually the broken collective) and are then
killed, instead of waiting out their timeout. Results travel back as
``torch.save`` bytes (not shared-memory tensors, which would tie the parent to the
children's lifetime).
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from functorch_pipeline.distributed._runtime import is_initialized

__all__ = ["local_group", "spawn"]

_GRACE_S = 10.0  # how long the peers of a failed rank get to report their own error


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(
    rank: int,
    nprocs: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int | None,
    out: Any,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, rank=rank, world_size=nprocs, timeout=timedelta(seconds=timeout_s)
        )
        result = fn(rank, *args)
        buf = io.BytesIO()
        torch.save(result, buf)
        out.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    threads: int | None = 1,
) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes joined in one process group.

    The local stand-in for ``torchrun --nproc_per_node nprocs``: each child initialises
    ``torch.distributed`` (``backend``, on ``127.0.0.1`` and a free port) with a timeout
    of ``timeout_s``, and the whole run is killed at ``timeout_s`` plus 30 s of start-up
    (NOTE [spawn never hangs]). ``fn`` and ``args`` must be picklable (a module-level
    function).

    Args:
      fn: ``fn(rank, *args)``; its return value (tensors, trees, numbers) comes back.
      nprocs: the number of ranks.
      *args: extra arguments for every rank.
      backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank).
      timeout_s: the process-group timeout and the basis of the hard deadline.
      threads: ``torch.set_num_threads`` in each child (``None``: torch's default).

    Returns:
      The ranks' return values, in rank order.

    Raises:
      RuntimeError: a rank raised or died; the message holds every rank's failure.
      TimeoutError: ranks still running at the deadline (they are killed).

    Notes:
      NOTE [spawn never hangs]: ranks get a process-group timeout and the parent a hard deadline
        after which every still-running rank is killed and a ``TimeoutError`` names them; once a
        rank fails, its peers get 10 s to report before being killed.

    Example:
      >>> import operator
      >>> spawn(operator.mul, 2, 10, timeout_s=60)  # rank * 10 on each rank
      [0, 10]
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"fp.distributed.spawn: `nprocs` must be a positive int, got {nprocs!r}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(r, nprocs, port, backend, timeout_s, threads, out, fn, args),
            daemon=True,
        )
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s + 30.0
    results: dict[int, tuple[str, Any]] = {}
    first_error = float("inf")
    try:
        while len(results) < nprocs:
            try:
                r, status, payload = out.get(timeout=0.2)
                results[r] = (status, payload)
                if status != "ok":
                    first_error = min(first_error, time.monotonic())
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if r not in results and not p.is_alive()]
            if dead:
                time.sleep(0.5)  # a message already sent may still be in the pipe
                while True:
                    try:
                        r, status, payload = out.get_nowait()
                        results[r] = (status, payload)
                    except queue.Empty:
                        break
                for r in dead:
                    if r not in results:
                        results[r] = (
                            "error",
                            f"exited with code {procs[r].exitcode} without a result",
                        )
                        first_error = min(first_error, time.monotonic())
            failed = any(status != "ok" for status, _ in results.values())
            if failed and time.monotonic() > min(deadline, first_error + _GRACE_S):
                for r in range(nprocs):  # peers of a failed rank would wait for its timeout
                    if r not in results:
                        results[r] = ("error", f"killed {_GRACE_S:.0f} s after a peer failed")
                break
            if time.monotonic() > deadline:
                missing = [r for r in range(nprocs) if r not in results]
                raise TimeoutError(
                    f"fp.distributed.spawn: ranks {missing} still running after "
                    f"{timeout_s + 30:.0f} s; killed them"
                )
    finally:
        for p in procs:
            p.join(timeout=5.0 if p.is_alive() and not first_error < float("inf") else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"rank {r}: {results[r][1]}" for r in sorted(results) if results[r][0] != "ok"]
    if errors:
        raise RuntimeError("fp.distributed.spawn: " + "\n".join(errors))
    return [torch.load(io.BytesIO(results[r][1]), weights_only=False) for r in range(nprocs)]


@contextlib.contextmanager
def local_group(backend: str = "gloo") -> Iterator[None]:
    """A one-rank process group in this process for the ``with`` block.

    Collectives then run (trivially: every reduction over one rank is the identity), so
    code written for ``torchrun`` can be tried and tested in a notebook. Destroyed on
    exit.

    Args:
      backend: ``"gloo"`` (CPU) or ``"nccl"``.

    Returns:
      A context manager.

    Example:
      >>> import functorch_pipeline as fp
      >>> with local_group():
      ...     fp.distributed.world_size(), fp.distributed.psum({"w": torch.ones(2)})
      (1, {'w': tensor([1., 1.])})
    """
    if is_initialized():
        raise RuntimeError("fp.distributed.local_group: a process group is already initialised")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
