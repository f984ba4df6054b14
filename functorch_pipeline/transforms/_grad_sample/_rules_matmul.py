"""Per-sample rule for a parameter in a matrix product: ``x @ w`` and ``w @ x``.

# NOTE [x @ w]
Functional code written the JAX way (``x @ params["w"] + params["b"]``, ``jnp.dot``
ported to ``torch.matmul``) applies a weight ``w`` of shape ``(in, out)`` (or a vector
``(in,)``) to a batched ``x`` of shape ``(B, ..., in)``: ``F.linear(x, w.T)``, with every
leading axis but the examples' a position. So the rule is the Linear rule's, with the
examples found the same way (axis 0, or axis 1 of a sequence-first input, NOTE [which
axis is the batch]); example ``b``'s gradient is ``sum_n x_bn g_bn^T``, ``(in, out)``,
which is the ``"outer"`` kind of part with its two factors in the other order
(``_rules``: the part ``(a, b)`` gives ``sum_n b_n a_n^T`` in the parameter's layout).
Ghost clipping takes it as it takes a Linear weight. A parameter on the left, ``w @ x``
with ``x`` of shape ``(B, ..., in, n)``, is a Linear applied to each of the ``n`` columns:
the same part with both factors transposed. Two batched operands, a parameter of more
than two axes and ``out=`` are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._rules import _no_graph
from functorch_pipeline.transforms._grad_sample._rules import register_rule

__all__ = ["MATMUL"]

_T = torch.Tensor
MATMUL = (torch.matmul, _T.matmul, _T.__matmul__, _T.__rmatmul__)  # ghost-ready parts


def _matmul(reflected: bool) -> Any:
    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        if len(args) != 2 or kwargs:
            raise Unsupported(f"{engine.names(args, kwargs)} is used by `x @ w` with arguments "
                              "its rule does not take")
        a, b = (args[1], args[0]) if reflected else args  # the product is a @ b
        sa, sb = engine.slot(a), engine.slot(b)
        left = sa is not None  # w @ x
        ws, x = (sa, b) if left else (sb, a)
        name = "w @ x" if left else "x @ w"
        wp = engine.bases[ws]
        if wp.dim() not in (1, 2) or not isinstance(x, torch.Tensor) or x.dim() < 2 + left:
            raise Unsupported(
                f"{engine.name(ws)} of shape {tuple(wp.shape)} is used by `{name}` on an input "
                f"of shape {tuple(getattr(x, 'shape', ()))}; its rule takes a matrix or "
                f"vector `w` and a batched `x` of at least {2 + left} axes (NOTE [x @ w])")
        axis = engine.check_input(x, name, [ws], features=1 + left, seq_first=not left)
        xin = x.detach().requires_grad_() if _no_graph(x, wp) else x
        out = torch.matmul(wp, xin) if left else torch.matmul(xin, wp)
        engine.record(out, _finish_matmul, x, ws, axis, left)
        return out

    return rule


def _finish_matmul(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int,
                   axis: int = 0, left: bool = False) -> None:
    if engine.bases[ws].dim() == 1:  # a vector: the product dropped its axis
        g = g.unsqueeze(-2 if left else -1)
    if axis:  # NOTE [sequence-first inputs]
        x, g = x.movedim(axis, 0), g.movedim(axis, 0)
    if left:  # w @ x is (x^T @ w^T)^T: positions on the last axis
        x, g = x.mT, g.mT
    B = g.shape[0]
    x, g = x.reshape(B, 1, -1, x.shape[-1]), g.reshape(B, 1, -1, g.shape[-1])
    # The part (a, b) gives sum_n b_n a_n^T in the parameter's layout: (in, out) for x @ w,
    # from (g, x); (out, in) for w @ x, from (x^T, g^T), as a Linear's weight.
    engine.add("outer", ws, *((x, g) if left else (g, x)))


for _func in MATMUL:
    register_rule(_func, _matmul(reflected=_func is _T.__rmatmul__))
