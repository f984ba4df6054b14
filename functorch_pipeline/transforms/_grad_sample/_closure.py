"""Parameters that ``loss_fn`` closes over and that require grad, seen by the fast methods.

# NOTE [closed-over parameters]
The fast methods (hooks, ghost) differentiate the arguments in ``argnums`` and nothing
else: their per-example gradients and norms come back without an autograd graph. A
``loss_fn`` that reads an ``nn.Parameter`` it closes over (a backbone module called
directly, a head given as the argument) builds a graph to it in its forward, and ``vmap``
(or a loop) returns results that keep that graph. A gradient-norm penalty through such a
result (``total = loss + norms.mean(); total.backward()``) then lost the penalty's share
of the backbone's gradient under the fast methods (0.18 off the loop, max 0.59), silently
when another term of ``total`` had a graph. The forward's graph is walked once per
``loss_fn`` called under grad mode (its leaves are ``AccumulateGrad`` nodes; the engine's
own leaves are plain tensors, so an ``nn.Parameter`` there was closed over), and a
``UserWarning`` names what the results carry no graph to and the two ways out: freeze
them (``requires_grad_(False)``, which also saves their share of the forward's graph), or
pass them as arguments / use ``method="vmap"`` to differentiate through them.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from functorch_pipeline.transforms._autograd_graph import graph_leaves

__all__ = ["warn_closed_over"]

_LOOKED: weakref.WeakSet[Any] = weakref.WeakSet()  # loss_fns whose graph was walked


def closed_over_parameters(losses: torch.Tensor) -> list[torch.Tensor]:
    """The ``nn.Parameter`` leaves that require grad in ``losses``' autograd graph."""
    return [v for v in graph_leaves(losses) if isinstance(v, torch.nn.Parameter)]


def warn_closed_over(loss_fn: Callable[..., Any], losses: torch.Tensor, fn: str,
                     caller_grad: bool) -> None:
    """NOTE [closed-over parameters]: warn once per ``loss_fn`` (called under grad mode,
    ``caller_grad``) whose losses' graph reaches ``nn.Parameter`` leaves."""
    owner = getattr(loss_fn, "__func__", loss_fn)
    if not caller_grad or losses.grad_fn is None:
        return
    try:
        if owner in _LOOKED:
            return
        _LOOKED.add(owner)
    except TypeError:  # not weakly referenceable: look every call
        pass
    found = closed_over_parameters(losses)
    if found:
        shapes = ", ".join(str(tuple(p.shape)) for p in found[:3]) + (", ..." if len(found) > 3 else "")
        warnings.warn(
            f"{fn}: loss_fn reads {len(found)} nn.Parameter(s) that require grad but are not "
            f"among the differentiated arguments (shapes {shapes}); the fast methods take them "
            "as constants, so the per-example results carry no autograd graph to them. If they "
            "are frozen, call requires_grad_(False) on them (their forward graph is then not "
            "built either); to differentiate through the results with respect to them, pass "
            "them as arguments or use method='vmap' (said once per loss_fn)",
            UserWarning, stacklevel=4)
