"""BatchNorm under ``vmap``: detection, the error that explains the way out, and a
helper that swaps BatchNorm for GroupNorm.

# NOTE [BatchNorm and per-sample gradients]
In train mode a BatchNorm layer normalises every example with the mean and variance of
the whole batch and writes running statistics in place. Under per-sample gradients
(``vmap`` over the examples) both break: each example is its own batch of one, so the
statistics are not the ones training uses (and ``BatchNorm1d`` refuses a batch of one),
and the in-place update of an unbatched buffer with batched statistics is not allowed.
``apply`` detects the case before running: BatchNorm layers, ``train=True``, and an input
mapped by a ``vmap`` level that maps none of the BatchNorm variables. An ensemble (a
``vmap`` over stacked variables, with or without mapped inputs) maps the variables at the
same level as the inputs, so it is allowed: each member updates its own statistics.
InstanceNorm with ``track_running_stats=True`` has per-example statistics but the same
in-place update, and gets its own error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from functorch_pipeline.nn._copy import copy_module

__all__ = [
    "batchnorm_error",
    "batchnorm_paths",
    "instancenorm_error",
    "replace_batchnorm_with_groupnorm",
    "running_instancenorm_paths",
    "vmap_levels",
]

_fz = torch._C._functorch


def batchnorm_paths(module: nn.Module) -> list[str]:
    """Dotted paths of the BatchNorm layers in ``module`` (``""`` for the module itself)."""
    return [name for name, m in module.named_modules() if isinstance(m, _BatchNorm)]


def running_instancenorm_paths(module: nn.Module) -> list[str]:
    """Dotted paths of InstanceNorm layers that update running statistics in train mode."""
    return [name for name, m in module.named_modules()
            if isinstance(m, _InstanceNorm) and m.track_running_stats]


def vmap_levels(tensors: Iterable[Any]) -> set[int]:
    """The ``vmap`` levels at which any of ``tensors`` is batched (peeling grad wrappers)."""
    levels: set[int] = set()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        while _fz.is_functorch_wrapped_tensor(t):
            if _fz.is_batchedtensor(t):
                levels.add(_fz.maybe_get_level(t))
            t = _fz.get_unwrapped(t)
    return levels


def batchnorm_error(fn: str, paths: list[str]) -> RuntimeError:
    """The error for BatchNorm in train mode under ``vmap`` over the examples."""
    names = ", ".join(f"`{p or '<root>'}`" for p in paths)
    return RuntimeError(
        f"{fn}: BatchNorm layers ({names}) ran with train=True under vmap over the inputs, as in "
        "per-sample gradients. In train mode BatchNorm normalises each example with statistics "
        "of the whole batch and updates its running statistics in place, so examples are not "
        "independent and cannot be mapped one by one. Choose one: (1) train=False, where "
        "BatchNorm uses its running statistics and per-example gradients are well defined; or "
        "(2) replace BatchNorm with GroupNorm, which normalises each example on its own: "
        "`fp.functionalize(fp.nn.replace_batchnorm_with_groupnorm(module, num_groups=...))` "
        "(the usual choice for DP-SGD)."
    )


def instancenorm_error(fn: str, paths: list[str]) -> RuntimeError:
    """The error for InstanceNorm with running statistics in train mode under ``vmap``."""
    names = ", ".join(f"`{p or '<root>'}`" for p in paths)
    return RuntimeError(
        f"{fn}: InstanceNorm layers ({names}) with track_running_stats=True ran with train=True under "
        "vmap over the inputs, as in per-sample gradients. Their statistics are per example, but "
        "they write running statistics in place from the whole batch, which vmap cannot map. "
        "Choose one: train=False, or build the layers with track_running_stats=False."
    )


def replace_batchnorm_with_groupnorm(
    module: nn.Module, num_groups: int | Callable[[int], int] | None = None
) -> nn.Module:
    """A copy of ``module`` with every ``BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``)
    replaced by ``GroupNorm``, which normalises each example on its own and therefore works
    with per-sample gradients. The input module is not modified.

    The GroupNorm keeps the BatchNorm's ``eps``, ``affine`` and, when affine, its current
    ``weight`` and ``bias`` (both are per-channel scales and shifts in either layer); the
    running statistics are dropped. The network computes a different function, so retrain
    or fine-tune it.

    Args:
      module: the module to convert (the module itself may be a BatchNorm).
      num_groups: groups per layer: an int used for every layer, a function
        ``num_channels -> groups``, or ``None`` for ``gcd(num_channels, 32)`` (32 groups
        when the channels allow, as in Wu & He 2018).

    Returns:
      The converted copy.

    Raises:
      ValueError: a layer's channel count is not divisible by its group count, or a lazy
        BatchNorm has no channel count yet (run the module once first).

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> replace_batchnorm_with_groupnorm(net, num_groups=4)[1]
    GroupNorm(4, 8, eps=1e-05, affine=True...)
    """
    fn = "replace_batchnorm_with_groupnorm(module, num_groups)"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: `module` must be an nn.Module, got {type(module).__name__}")

    def convert(path: str, bn: _BatchNorm) -> nn.GroupNorm:
        where = f"`{path or '<root>'}`"
        c = bn.num_features
        if not isinstance(c, int) or c <= 0 or any(
            isinstance(t, nn.parameter.UninitializedTensorMixin) for t in (bn.weight, bn.running_mean)
        ):
            raise ValueError(f"{fn}: the BatchNorm at {where} is lazy and has no channel count yet; run the module once first")
        g = math.gcd(c, 32) if num_groups is None else num_groups(c) if callable(num_groups) else num_groups
        if not isinstance(g, int) or g <= 0 or c % g:
            raise ValueError(f"{fn}: the BatchNorm at {where} has {c} channels, which {g!r} groups do not divide")
        factory = {"device": bn.weight.device if bn.affine else None,
                   "dtype": bn.weight.dtype if bn.affine else None}
        gn = nn.GroupNorm(g, c, eps=bn.eps, affine=bn.affine, **factory)
        if bn.affine:
            with torch.no_grad():
                gn.weight.copy_(bn.weight)
                gn.bias.copy_(bn.bias)
            gn.weight.requires_grad_(bn.weight.requires_grad)
            gn.bias.requires_grad_(bn.bias.requires_grad)
        gn.train(bn.training)
        return gn

    if isinstance(module, _BatchNorm):
        return convert("", module)
    out = copy_module(module, fn="replace_batchnorm_with_groupnorm(module)")
    done: dict[int, nn.GroupNorm] = {}  # a BatchNorm used in several places stays one layer
    for path, m in list(out.named_modules(remove_duplicate=False)):
        for name, child in list(m._modules.items()):  # named_children() skips a repeat
            if isinstance(child, _BatchNorm):
                if id(child) not in done:
                    done[id(child)] = convert(f"{path}.{name}" if path else name, child)
                setattr(m, name, done[id(child)])
    return out
