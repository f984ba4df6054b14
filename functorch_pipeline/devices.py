"""``fp.devices``: pick devices that exist, and move whole pytrees between them.

Every helper falls back to the CPU cleanly on a machine without a GPU, so the same
script runs everywhere::

    device = fp.devices.default_device()          # cuda:0 if there is one, else cpu
    params = fp.devices.device_put(params, device)
"""

from __future__ import annotations

from typing import Any

import torch

from functorch_pipeline import tree as _tree
from functorch_pipeline._malloc import MallocSettings
from functorch_pipeline._malloc import keep_freed_memory

__all__ = [
    "cpu",
    "default_device",
    "device_put",
    "keep_freed_memory",
    "MallocSettings",
    "num_gpus",
    "try_all_gpus",
    "try_gpu",
]


def cpu() -> torch.device:
    """The CPU device.

    Returns:
        ``torch.device("cpu")``.

    Examples:
        >>> cpu()
        device(type='cpu')
    """
    return torch.device("cpu")


def num_gpus() -> int:
    """How many CUDA devices this process can see (0 without CUDA).

    Returns:
        ``torch.cuda.device_count()`` (0 without CUDA), an int.

    Examples:
        >>> num_gpus() >= 0
        True
    """
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def try_gpu(i: int = 0) -> torch.device:
    """GPU ``i`` if it exists, else the CPU (like d2l's ``try_gpu``).

    Args:
      i: the CUDA device index.

    Returns:
      ``torch.device("cuda:i")`` or ``torch.device("cpu")``.

    >>> try_gpu(10_000)
    device(type='cpu')
    """
    if not isinstance(i, int) or isinstance(i, bool) or i < 0:
        raise ValueError(f"try_gpu(i): `i` must be a non-negative int, got {i!r}")
    return torch.device(f"cuda:{i}") if i < num_gpus() else cpu()


def try_all_gpus() -> list[torch.device]:
    """Every visible GPU, or ``[cpu]`` when there is none.

    Returns:
        A non-empty list of ``torch.device``: every CUDA device, or ``[cpu]``.

    Examples:
        >>> devs = try_all_gpus()
        >>> len(devs) >= 1 and all(isinstance(d, torch.device) for d in devs)
        True
    """
    return [torch.device(f"cuda:{i}") for i in range(num_gpus())] or [cpu()]


def default_device() -> torch.device:
    """The device to use when none is given: ``cuda:0`` if CUDA is available, else CPU.

    Other accelerators (MPS, XPU) are not picked automatically, since parts of PyTorch
    are missing there (float64 on MPS); pass them explicitly.

    Returns:
        ``cuda:0`` when CUDA is available, else the CPU device.

    Examples:
        >>> default_device() == try_gpu(0)
        True
    """
    return try_gpu(0)


def device_put(
    tree: Any, device: torch.device | str | int | None = None, *, non_blocking: bool = False
) -> Any:
    """Move every tensor leaf of ``tree`` to ``device`` (JAX's ``device_put``).

    Non-tensor leaves are untouched and leaves already there are not copied. With
    ``non_blocking=True``, host-to-GPU copies from pinned memory overlap with compute
    (see ``fp.data.DeviceLoader``, which pins for you).

    Args:
      tree: any pytree.
      device: a ``torch.device``, a string (``"cuda:1"``) or a CUDA index; default
        :func:`default_device`.
      non_blocking: passed to ``Tensor.to``.

    Returns:
      A new tree on ``device``; ``tree`` itself is not modified.

    >>> device_put({"w": torch.ones(2), "step": 3}, "cpu")
    {'w': tensor([1., 1.]), 'step': 3}
    """
    dev = default_device() if device is None else torch.device(device)
    return _tree.to(tree, dev, non_blocking=non_blocking)
