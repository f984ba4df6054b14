"""Per-sample rules for ``F.conv3d`` and the transposed convolutions (1d, 2d, 3d).

``F.conv1d``/``F.conv2d`` live in ``_rules`` with the per-example weight gradient they
share (NOTE [per-example conv weight gradients]); this module adds the 3-d case of that
gradient and the transposed layers.

# NOTE [transposed convolution as the adjoint]
``y = conv_transpose(x, w)`` is the adjoint (in ``x``) of ``z = conv(u, w)`` with the
same stride, padding, dilation and groups: ``<g, conv_transpose(x, w)> =
<conv(g, w), x>`` for every ``g`` shaped like ``y``. So the weight gradient of the
transposed layer at output gradient ``g`` is the weight gradient of a plain convolution
whose *input* is ``g`` and whose *output gradient* is ``x``: the same patch matmul with the
roles swapped. ``output_padding`` only adds rows at the end of ``y`` that no output of
``conv(g, w)`` of ``x``'s size reads, so it needs nothing. The weight shapes agree:
``conv_transpose``'s ``(C_in, C_out / groups, *k)`` is the plain weight of a convolution
from ``C_out`` to ``C_in`` channels.

Tests: ``tests/test_grad_sample_zoo.py`` (against a loop over examples, float64, 1e-10).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._rules import _PATCH_BYTES
from functorch_pipeline.transforms._grad_sample._rules import _conv_weight
from functorch_pipeline.transforms._grad_sample._rules import _get
from functorch_pipeline.transforms._grad_sample._rules import _no_graph
from functorch_pipeline.transforms._grad_sample._rules import _pair
from functorch_pipeline.transforms._grad_sample._rules import _params
from functorch_pipeline.transforms._grad_sample._rules import conv_pads
from functorch_pipeline.transforms._grad_sample._rules import register_rule

__all__: list[str] = []


def _conv_weight_nd(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...],
                    stride: tuple[int, ...], padding: Any, dilation: tuple[int, ...],
                    groups: int) -> torch.Tensor:
    """Per-example weight gradients ``(B, O, C / groups, *kernel)`` of an N-d convolution,
    by the patch matmul of NOTE [per-example conv weight gradients] in ``_rules``."""
    nd = len(kernel)
    pads = conv_pads(padding, kernel, dilation)
    if any(pads):
        x = F.pad(x, pads)
    x = x.contiguous()
    B, C = x.shape[:2]
    out_ch, outs = g.shape[1], tuple(g.shape[2:])
    cin, cout, L = C // groups, out_ch // groups, math.prod(outs)
    st = x.stride()
    size = (groups, cin, *kernel, *outs)
    strides = (st[1] * cin, st[1], *(st[2 + i] * dilation[i] for i in range(nd)),
               *(st[2 + i] * stride[i] for i in range(nd)))
    K = cin * math.prod(kernel)
    grads = g.reshape(B, groups, cout, L)
    out = x.new_empty(B, groups, cout, K)
    chunk = max(1, _PATCH_BYTES // max(1, C * math.prod(kernel) * L * x.element_size()))
    for start in range(0, B, chunk):
        xs = x[start:start + chunk]
        n = xs.shape[0]
        patches = xs.as_strided((n, *size), (st[0], *strides)).reshape(n, groups, K, L)
        torch.matmul(grads[start:start + n], patches.mT, out=out[start:start + n])
    return out.reshape(B, out_ch, cin, *kernel)


def _weight_grad(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...],
                 stride: tuple[int, ...], padding: Any, dilation: tuple[int, ...],
                 groups: int) -> torch.Tensor:
    if len(kernel) <= 2:
        return _conv_weight(x, g, kernel, stride, padding, dilation, groups)
    return _conv_weight_nd(x, g, kernel, stride, padding, dilation, groups)


def _finish(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int | None, bs: int | None,
            geometry: tuple[Any, ...], transposed: bool) -> None:
    if bs is not None:
        engine.add("direct", bs, g.sum(tuple(range(2, g.dim()))))
    if ws is not None:
        # NOTE [transposed convolution as the adjoint]: input and output gradient swap.
        def form(xs: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
            return _weight_grad(gs, xs, *geometry) if transposed else _weight_grad(xs, gs, *geometry)

        engine.add("direct", ws, engine.summed_rows(form, x, g, engine.bases[ws]))


def _conv3d(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    x, w, b = (_get(args, kwargs, i, n) for i, n in enumerate(("input", "weight", "bias")))
    stride, padding = _get(args, kwargs, 3, "stride", 1), _get(args, kwargs, 4, "padding", 0)
    dilation, groups = _get(args, kwargs, 5, "dilation", 1), _get(args, kwargs, 6, "groups", 1)
    (ws, bs), (wp, bp) = _params(engine, w, b)
    if engine.input_axis(torch.conv3d, args, kwargs, lambda: engine.check_input(
            x, "F.conv3d", [s for s in (ws, bs) if s is not None], min_dim=5, features=4)) is None:
        return engine.derive_op(torch.conv3d, args, kwargs)  # NOTE [constants or batch data]
    xin = x.detach().requires_grad_() if _no_graph(x, wp, bp) else x
    out = torch.conv3d(xin, wp, bp, stride, padding, dilation, groups)
    geometry = (tuple(wp.shape[2:]), _pair(stride, 3), padding, _pair(dilation, 3), groups)
    engine.record(out, _finish, x, ws, bs, geometry, False)
    return out


def _conv_transpose(nd: int) -> Any:
    op = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}[nd]
    name = f"F.conv_transpose{nd}d"

    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        x, w, b = (_get(args, kwargs, i, n) for i, n in enumerate(("input", "weight", "bias")))
        stride, padding = _get(args, kwargs, 3, "stride", 1), _get(args, kwargs, 4, "padding", 0)
        output_padding = _get(args, kwargs, 5, "output_padding", 0)
        groups, dilation = _get(args, kwargs, 6, "groups", 1), _get(args, kwargs, 7, "dilation", 1)
        (ws, bs), (wp, bp) = _params(engine, w, b)
        if engine.input_axis(op, args, kwargs, lambda: engine.check_input(
                x, name, [s for s in (ws, bs) if s is not None], min_dim=nd + 2,
                features=nd + 1)) is None:  # a constant input: NOTE [constants or batch data]
            return engine.derive_op(op, args, kwargs)
        xin = x.detach().requires_grad_() if _no_graph(x, wp, bp) else x
        out = op(xin, wp, bp, stride, padding, output_padding, groups, dilation)
        geometry = (tuple(wp.shape[2:]), _pair(stride, nd), _pair(padding, nd),
                    _pair(dilation, nd), groups)
        engine.record(out, _finish, x, ws, bs, geometry, True)
        return out

    return rule


register_rule(torch.conv3d, _conv3d)
for _nd in (1, 2, 3):
    register_rule(getattr(torch, f"conv_transpose{_nd}d"), _conv_transpose(_nd))
