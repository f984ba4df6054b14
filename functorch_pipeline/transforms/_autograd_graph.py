"""Walks of a tensor's autograd graph shared by the transforms."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["graph_leaves"]


def graph_leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The leaves that require grad in ``t``'s autograd graph (the variables of its
    ``AccumulateGrad`` nodes), each once, depth first; lazily, so a caller looking for one
    stops the walk there (~0.5 us a node). ``t`` itself when it is such a leaf."""
    if t.grad_fn is None:
        if t.requires_grad:
            yield t
        return
    todo, seen = [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            yield var
            continue
        todo.extend(n for n, _ in node.next_functions)
