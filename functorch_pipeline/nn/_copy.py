"""Copies of modules that work with lazy parameters, optionally with storage on ``meta``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer
from torch.nn.parameter import UninitializedParameter
from torch.nn.parameter import is_lazy
from torch.nn.utils.weight_norm import WeightNorm

__all__ = ["copy_module", "has_lazy"]


def has_lazy(module: nn.Module) -> bool:
    """Whether ``module`` still has uninitialised (lazy) parameters or buffers."""
    return any(is_lazy(t) for t in (*module.parameters(), *module.buffers()))


def _uncopyable(module: nn.Module, fn: str) -> TypeError | None:
    """Why ``copy.deepcopy`` refused ``module``: a tensor attribute (not a parameter or
    buffer) that carries autograd history, as the deprecated ``torch.nn.utils.weight_norm``
    leaves behind; ``None`` if there is none."""
    for path, m in module.named_modules(remove_duplicate=False):
        for name, value in vars(m).items():
            if not isinstance(value, torch.Tensor) or value.grad_fn is None:
                continue
            where = f"`{path}.{name}`" if path else f"`{name}`"
            if any(isinstance(h, WeightNorm) and h.name == name for h in m._forward_pre_hooks.values()):
                return TypeError(
                    f"{fn}: {where} comes from the deprecated torch.nn.utils.weight_norm, whose "
                    "computed weight attribute cannot be copied. Use "
                    "torch.nn.utils.parametrizations.weight_norm instead (same function; "
                    f"`{name}_g` / `{name}_v` become `parametrizations.{name}.original0` / "
                    "`original1`), or remove it with torch.nn.utils.remove_weight_norm")
            return TypeError(
                f"{fn}: {where} is a tensor attribute with autograd history (grad_fn="
                f"{type(value.grad_fn).__name__}), not a parameter or buffer, so the module "
                "cannot be copied. Compute it inside forward, register it as a buffer, or "
                "store it detached (.detach())")
    return None


def copy_module(module: nn.Module, *, meta: bool = False, fn: str = "functionalize(module)") -> nn.Module:
    """A deep copy of ``module``; with ``meta=True`` its parameters and buffers live on the
    ``meta`` device (shapes and dtypes only, no memory). ``fn`` names the public call in
    the error raised for a module that cannot be copied (the deprecated
    ``torch.nn.utils.weight_norm``, or another tensor attribute with autograd history).

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
    try:
        with torch.no_grad():
            return copy.deepcopy(module, memo)
    except RuntimeError as e:
        error = _uncopyable(module, fn)
        if error is None:
            raise
        raise error from e
