"""``jit``: ``torch.compile`` under JAX's name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["jit"]


def jit(f: Callable[..., Any], *, fullgraph: bool = False, dynamic: bool | None = None,
        mode: str | None = None, backend: str = "inductor") -> Callable[..., Any]:
    """Compile ``f`` with ``torch.compile`` (the analogue of ``jax.jit``).

    Compilation happens on the first call and again when shapes or dtypes change; it
    can take from seconds (a small model) to minutes (a Python loop over time steps), so
    time it cold and warm separately. ``fullgraph=True`` makes a graph break an error
    instead of a silent fallback to eager.

    A :class:`custom_vjp`/:class:`custom_jvp` function called inside a ``torch.func``
    transform (``fp.grad``, ``fp.vmap``, ...) in the compiled function raises:
    torch.compile (2.14) would silently ignore its rule there and differentiate ``f``
    itself. Keep the transform outside ``jit``, or use ``loss.backward()`` inside it,
    which keeps the rule.

    Args:
      f: the function (or module) to compile.
      fullgraph: make a graph break an error.
      dynamic: ``torch.compile``'s dynamic-shape setting (``None``: automatic).
      mode: ``torch.compile``'s mode (``"reduce-overhead"``, ``"max-autotune"``, ...).
      backend: ``torch.compile``'s backend (``"eager"`` skips code generation, for debugging).

    Returns:
      The compiled function, called like ``f``.

    Examples:
      >>> f = jit(lambda x: x * 2, backend="eager")
      >>> f(torch.ones(2))
      tensor([2., 2.])
    """
    from functorch_pipeline.transforms._grad_sample._api import prepare_eager

    compiled = torch.compile(f, fullgraph=fullgraph, dynamic=dynamic, mode=mode, backend=backend)
    prepare_eager()  # NOTE [engines under torch.compile]: dynamo is imported by now
    return compiled
