"""Copies of modules that work with lazy parameters, optionally with storage on ``meta``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer
from torch.nn.parameter import UninitializedParameter
from torch.nn.parameter import is_lazy

__all__ = ["copy_module", "has_lazy"]


def has_lazy(module: nn.Module) -> bool:
    """Whether ``module`` still has uninitialised (lazy) parameters or buffers."""
    return any(is_lazy(t) for t in (*module.parameters(), *module.buffers()))


def copy_module(module: nn.Module, *, meta: bool = False) -> nn.Module:
    """A deep copy of ``module``; with ``meta=True`` its parameters and buffers live on the
    ``meta`` device (shapes and dtypes only, no memory).

    # NOTE [meta templates]
    ``apply`` runs ``torch.func.functional_call`` on a private copy whose own tensors are
    never read (every parameter and buffer is supplied from ``variables``), so the copy
    holds them on ``meta``: the template costs no memory whatever the model's size. Tied
    tensors stay tied in the copy (``deepcopy``'s memo maps each tensor once), which is
    what ``functional_call(..., tie_weights=True)`` relies on. ``copy.deepcopy`` alone
    fails on lazy modules (uninitialised parameters refuse every torch function), so they
    get fresh uninitialised tensors here.
    """
    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        if is_lazy(t):
            cls = UninitializedParameter if isinstance(t, nn.Parameter) else UninitializedBuffer
            memo[id(t)] = cls(requires_grad=t.requires_grad, device=t.device, dtype=t.dtype)
        elif meta:
            data = t.detach().to("meta")
            memo[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    with torch.no_grad():
        return copy.deepcopy(module, memo)
