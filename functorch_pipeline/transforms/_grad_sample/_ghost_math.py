"""Ghost clipping maths: per-example squared norms and clip-weighted sums from the parts.

The engine's rules leave, per parameter slot, *parts* of a few kinds (see ``_rules``):
``"outer"`` (inputs and output gradients of ``F.linear`` and recurrent weights),
``"sum"`` (biases), ``"embed"`` (indices and output-gradient rows), ``"direct"`` (small
ready per-example gradients: normalisation layers, conv biases) and, from the ghost conv
rule in ``_ghost``, ``"conv"`` (a conv input, its output gradient and the geometry).
This module turns them into

* :func:`squared_norms`: ``(B,)`` squared norms of each example's gradient of the slot,
  without forming ``(B, *param.shape)`` when the slot is large;
* :func:`weighted_sum`: ``sum_b c_b * grad_b``, the batch gradient of ``sum_b c_b loss_b``,
  computed like an ordinary weight gradient from the same parts.

# NOTE [Gram or materialise]
For a weight used on ``n`` rows per example (sequence positions, conv output positions,
time steps) with inputs ``a_t`` (``din``) and output gradients ``g_t`` (``dout``), the
per-example gradient is ``sum_t g_t a_t^T`` and its squared norm is
``sum_{t,s} (a_t . a_s)(g_t . g_s)``: two ``n x n`` Gram matrices, ``O(n^2 (din + dout))``
work and ``n^2`` memory per example, against ``O(n din dout)`` work and ``din dout``
memory to form the gradient itself. As Opacus and the Book-keeping paper (Bu et al.,
2023) do, the cheaper one is chosen per layer; since both are computed in chunks of
examples (a temporary holds at most :data:`CHUNK_BYTES`, nothing of size ``B x params``
is allocated), memory does not decide and the work does: Gram when
``n (din + dout) <= din dout`` (:data:`GRAM_RATIO` scales the right side; tests move it
to force each path). The MNIST CNN's second conv (``n`` = 64 positions, ``din`` = 250,
``dout`` = 20) is thus formed per example, a wide late layer (``n`` = 49, 512 channels)
takes the Gram path.

# NOTE [a Gram sum below zero]
# A squared norm summed from Gram matrices, sum_{t,s} (a_t . a_s)(g_t . g_s) (and the tied
# table's |E|^2 + |O|^2 + 2 <E, O>), is a sum of terms of both signs: for an example whose
# gradient is ~0 because its positions cancel (a repeated token under a softmax over the
# positions, a constant signal under instance norm) it rounds to a tiny number of either
# sign, and a negative one gave a NaN norm, a NaN clip factor and a NaN clipped sum for the
# whole step (the per-example loop's norms there: ~1e-16 to 1e-10). Each such sum is
# clamped at 0, its true lower bound. The rounding is absolute, of the size of the Gram
# terms: centred (NOTE [centred Gram sums]) they are of the size of the example's own
# gradient, not of its inputs' shared part, which had read a norm of 0.29 as 0.80.

# NOTE [centred Gram sums]
The Gram sum adds n^2 terms of size |a_t||a_s||g_t||g_s|; when the inputs share a large
part across positions (activations after a ReLU or GELU have a mean, an offset input)
and the output gradients nearly cancel across them (instance norm over the positions,
a softmax), those terms cancel down to a far smaller norm and float32 rounding of the
Gram entries decides it: 1.5% off the loop at T = 128 with inputs offset by 1e3, 4% low
under instance norm (an example clipped to 0.5 kept norm 0.523: the sensitivity bound
broken), and an example of true norm 0.29 read as 0.80 and clipped. So both sides are
centred over the positions first: with a_t = c + r_t and g_t = d + h_t (c, d the means,
the r_t and h_t summing to 0), sum_t g_t a_t^T = n d c^T + sum_t h_t r_t^T exactly, and
its squared norm is n^2 |d|^2 |c|^2 + 2 n sum_t (d . h_t)(r_t . c) + the Gram sum of the
centred r and h, whose terms are of the size of the result. Costs O(n (din + dout)) per
example beside the Gram's O(n^2 (din + dout)).

Centring spreads each row over all positions, which the plain Gram sum does not need
where a row is exactly 0: a position whose input is 0 adds exactly 0 to sum_t g_t a_t^T
whatever its output gradient. Padding positions are such rows, and their output
gradients can be huge: torchvision's Swin v2 pads a small feature map to its window, and
its cosine attention normalises the padded tokens' zero queries (gradient ~1/eps = 1e11
there). Centred, those rows swamped the sum: ghost norms of 201,995 against the loop's
186, and a clipped sum off by its own size. So a position where either row is exactly 0
is zeroed on both sides before centring (exact: its term is 0).

# NOTE [keeping small per-example gradients]
Where a norm path forms a slot's per-example gradients anyway (a conv whose Gram would
cost more, a normalisation layer), the clipped sum ``sum_b c_b grad_b`` is one
``(1, B) @ (B, P)`` product of them instead of a second weight-gradient computation
(``convolution_backward``): on the MNIST CNN at batch 256 that took a step from ~36 to
~27 ms (1 thread). Slots keep theirs, in order, only while all kept tensors of one call
stay under :data:`KEEP_BYTES` (the caller's budget); the others compute the sum from the
parts, so no ``B x params`` tensor is ever held.

# NOTE [embedding norms by sorting]
An embedding's per-example gradient adds output-gradient rows into the rows of the
indices, so its squared norm is ``sum_{t,s: i_t = i_s} g_t . g_s``. Instead of the
``n x n`` equality Gram, the indices of each example are sorted, equal indices are given
one segment id, the rows are summed per segment (``index_add_``) and the sums squared:
``O(n D)`` memory and no host synchronisation (no ``unique``). Rows of ``padding_idx``
arrive already zeroed by the rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from functorch_pipeline.transforms._grad_sample._rules import conv_weight_per_example
from functorch_pipeline.transforms._grad_sample._rules import merge
from functorch_pipeline.tree._math import _rows_sq_norms

__all__ = ["CHUNK_BYTES", "GRAM_RATIO", "KEEP_BYTES", "conv_materialise", "squared_norms", "weighted_sum"]

CHUNK_BYTES = 16 << 20  # the largest temporary (Gram matrices, materialised gradients)
KEEP_BYTES = 32 << 20  # see NOTE [keeping small per-example gradients]
PATCH_BYTES = 2 << 20  # conv input patches per chunk, see NOTE [patch chunks]
GRAM_RATIO = 1.0  # see NOTE [Gram or materialise]

Parts = dict[str, list[tuple[Any, ...]]]


def _chunks(batch: int, per_example: int, element_size: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(1, per_example * element_size))
    for start in range(0, batch, step):
        yield start, min(batch, start + step)


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Square norms accumulate in float64 for float64 leaves, else float32 (as
    ``optim.per_example_global_norm_clip`` does)."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _rows_sq(t: torch.Tensor) -> torch.Tensor:
    """``(B,)`` squared norms of the rows of ``t`` (float64 for float64, else float32)."""
    # No squared copy as large as ``t``: on the MNIST CNN's kept conv2 gradients
    # (256 x 5000) inside a DP step that copy cost ~0.55 ms of a ~15 ms step at 2 threads.
    return _rows_sq_norms(t, torch.float64 if t.dtype == torch.float64 else torch.float32)


def _centred_gram_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``|sum_t g_t a_t^T|^2`` over the positions on axis -2 of ``a`` (``..., n, din``) and
    ``g`` (``..., n, dout``), one per leading index, by NOTE [centred Gram sums]."""
    n = a.shape[-2]
    a, g = _acc(a), _acc(g)  # float16/bfloat16 centred in float32: their means are coarse
    # positions where either row is exactly 0 add exactly 0: out of both sides before
    # centring spreads them (NOTE [centred Gram sums], last paragraph)
    live = (a != 0).any(-1, keepdim=True) & (g != 0).any(-1, keepdim=True)
    a, g = torch.where(live, a, 0.0), torch.where(live, g, 0.0)
    c, d = a.mean(-2, keepdim=True), g.mean(-2, keepdim=True)
    r, h = a - c, g - d
    centred = ((r @ r.mT) * (h @ h.mT)).sum((-2, -1))
    cross = ((h @ d.mT) * (r @ c.mT)).sum((-2, -1))
    means = d.square().sum((-2, -1)) * c.square().sum((-2, -1))
    return centred + (2 * n) * cross + (n * n) * means


# -- conv geometry --------------------------------------------------------------------------


def conv_patches(x: torch.Tensor, geometry: tuple[Any, ...]) -> torch.Tensor:
    """The input patches of a conv, ``(B, groups, cin * prod(kernel), L)``: a strided view
    of the padded input (copied by the ``reshape``), 1-d convs as 2-d of height 1."""
    kernel, stride, pads, dilation, groups = geometry
    if any(pads):
        x = F.pad(x, pads)
    if len(kernel) == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    x = x.contiguous()
    B, C, H, W = x.shape
    (kh, kw), cin = kernel, C // groups
    Ho = (H - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    sB, sC, sH, sW = x.stride()
    size = (B, groups, cin, kh, kw, Ho, Wo)
    strides = (sB, sC * cin, sC, sH * dilation[0], sW * dilation[1], sH * stride[0], sW * stride[1])
    return x.as_strided(size, strides).reshape(B, groups, cin * kh * kw, Ho * Wo)


def _grouped_ok(x: torch.Tensor) -> bool:
    """Whether NOTE [per-example conv gradients] takes mkldnn's grouped kernel."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


def _conv_per_example(x: torch.Tensor, g: torch.Tensor, geometry: tuple[Any, ...],
                      any_layout: bool = False) -> torch.Tensor:
    """Per-example conv weight gradients ``(n, O, cin, *kernel)``; with ``any_layout``
    possibly a permuted view (NOTE [channels-last patches] in ``_rules``).

    # NOTE [per-example conv gradients]
    On CPU in float32/bfloat16, the hooks conv rule's kernels: mkldnn's weight-gradient
    kernel with the examples as ``n * groups`` groups of one convolution (NOTE [grouped
    weight gradients on CPU] in ``_rules``) or the patch matmul, whichever was measured
    faster for the layer (NOTE [measured kernel choice]). Elsewhere (float64, other
    devices): input patches (:func:`conv_patches`) times the output gradient.
    """
    kernel, stride, pads, dilation, groups = geometry
    n, out_ch = g.shape[:2]
    shape = (n, out_ch, x.shape[1] // groups, *kernel)
    if not _grouped_ok(x):
        return (g.reshape(n, groups, out_ch // groups, -1) @ conv_patches(x, geometry).mT).view(shape)
    if len(kernel) == 1:  # as a 2-d conv of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, dilation, pads = (1, *kernel), (1, *stride), (1, *dilation), [*pads, 0, 0]
    # The hooks rule's kernel choice (mkldnn's grouped kernel or the patch matmuls, measured
    # per layer): NOTE [measured kernel choice] in _kernel_choice.
    grad_w = conv_weight_per_example(x, g, kernel, stride, pads, dilation, groups, any_layout)
    return grad_w.view(shape)  # a 1-d conv drops its height of 1: a view in any layout


def _conv_sq(x: torch.Tensor, g: torch.Tensor, geometry: tuple[Any, ...],
             keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Squared norms of a conv weight's per-example gradients; when they are formed (not
    the Gram path) and ``keep`` (the parameter) is given, they are also returned."""
    kernel, groups = geometry[0], geometry[4]
    B, out_ch = g.shape[:2]
    L, cout = g[0, 0].numel(), out_ch // groups
    din = x.shape[1] // groups
    for k in kernel:
        din *= k
    size = x.element_size()
    if L * (din + cout) <= GRAM_RATIO * din * cout:
        # NOTE [patch chunks]: examples whose patches fit in ~2 MB at a time, so that the
        # copy is still in cache when the matmul reads it (as the hooks conv rule does).
        step = max(1, min(PATCH_BYTES // (groups * din * L * size),
                          CHUNK_BYTES // (groups * L * L * size)))
        out = []
        for s in range(0, B, step):
            p = conv_patches(x[s:s + step], geometry)  # (n, G, din, L)
            gs = g[s:s + step].reshape(-1, groups, cout, L)
            # NOTE [centred Gram sums]; NOTE [a Gram sum below zero]
            out.append(_centred_gram_sq(p.mT, gs.mT).sum(1).clamp_(min=0))
        return _cat(out, 0), None
    step = max(1, CHUNK_BYTES // (groups * cout * din * size))
    if not _grouped_ok(x):
        step = max(1, min(step, PATCH_BYTES // (groups * din * L * size)))
    if step >= B:  # one chunk: what it forms is what is kept, in its own layout
        m = _conv_per_example(x, g, geometry, any_layout=True)
        return _rows_sq(m), (None if keep is None else m)
    kept = None if keep is None else keep.new_empty(B, *keep.shape)
    out = []
    for s in range(0, B, step):
        m = _conv_per_example(x[s:s + step], g[s:s + step], geometry)
        if kept is not None:
            kept[s:s + step] = m
        out.append(_rows_sq(m))
    return _cat(out, 0), kept


def conv_materialise(x: torch.Tensor, g: torch.Tensor, geometry: tuple[Any, ...],
                      param: torch.Tensor) -> torch.Tensor:
    return _conv_per_example(x, g, geometry).reshape(g.shape[0], *param.shape)


def _conv_weighted(x: torch.Tensor, g: torch.Tensor, geometry: tuple[Any, ...],
                   param: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The batch weight gradient for output gradient ``c_b g_b``: torch's own conv
    backward on the explicitly padded input."""
    kernel, stride, pads, dilation, groups = geometry
    if any(pads):
        x = F.pad(x, pads)
    nd = len(kernel)
    gw = g * c.reshape(-1, *([1] * (g.dim() - 1)))
    return torch.ops.aten.convolution_backward(
        gw, x, param, None, list(stride), [0] * nd, list(dilation), False, [0] * nd, groups,
        [False, True, False])[1]


# -- per kind -------------------------------------------------------------------------------


def _outer_sq(x: torch.Tensor, g: torch.Tensor, keep: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Squared norms of a linear weight's per-example gradients (see NOTE [Gram or
    materialise]); when they are formed and ``keep`` (the parameter) is given, also them."""
    B, G, n, din = x.shape
    dout = g.shape[-1]
    if n == 1:
        sq = (_rows_sq(x) * _rows_sq(g)) if G == 1 else \
            (_acc(x).square().sum((2, 3)) * _acc(g).square().sum((2, 3))).sum(1)
        return sq, None
    gram = n * (din + dout) <= GRAM_RATIO * din * dout
    # in the product's dtype: the autocast dtype under autocast (NOTE [autocast] in _engine)
    kept = None if gram or keep is None else keep.new_empty(B, *keep.shape, dtype=g.dtype)
    out = []
    for s, e in _chunks(B, G * (n * n if gram else din * dout), x.element_size()):
        xs, gs = x[s:e], g[s:e]
        if gram:  # NOTE [centred Gram sums]; NOTE [a Gram sum below zero]
            out.append(_centred_gram_sq(xs, gs).sum(1).clamp_(min=0))
        elif kept is not None:
            out.append(_rows_sq(torch.matmul(gs.mT, xs, out=kept[s:e].view(e - s, G, dout, din))))
        else:
            out.append(_rows_sq(gs.mT @ xs))
    return _cat(out, 0), kept


def _embed_sq(idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """See NOTE [embedding norms by sorting]."""
    B, n = idx.shape
    D = rows.shape[-1]
    if n == 1:
        return _rows_sq(rows)
    sorted_idx, order = idx.sort(dim=1)
    new = torch.ones_like(sorted_idx, dtype=torch.bool)
    new[:, 1:] = sorted_idx[:, 1:] != sorted_idx[:, :-1]
    segment = torch.empty_like(order).scatter_(1, order, new.cumsum(1) - 1)
    segment = segment + torch.arange(B, device=idx.device).unsqueeze(1) * n
    sums = rows.new_zeros(B * n, D).index_add_(0, segment.reshape(-1), rows.reshape(B * n, D))
    return _rows_sq(sums.reshape(B, n * D))


def _tied_sq(parts: Parts) -> torch.Tensor:
    """An embedding table that is also a linear layer's weight (an output head tied to
    the input embedding): ``|E + O|^2 = |E|^2 + |O|^2 + 2 <E, O>`` with the embedding part
    ``E`` (rows ``r_t`` added at indices ``i_t``) and the linear part ``O = sum_s g_s h_s^T``,
    where ``<E, O> = sum_{t,s} g_s[i_t] (h_s . r_t)``: no ``(V, D)`` per example."""
    idx = _cat([p[0] for p in parts["embed"]], 1)
    rows = _cat([p[1] for p in parts["embed"]], 1)
    x = _cat([p[0] for p in parts["outer"]], 2)[:, 0]  # (B, n, D): the linear inputs
    g = _cat([p[1] for p in parts["outer"]], 2)[:, 0]  # (B, n, V): their output gradients
    at = g.gather(2, idx.unsqueeze(1).expand(-1, g.shape[1], -1))  # g_s[i_t]: (B, n, n_e)
    cross = _acc(at * (x @ rows.mT)).sum((1, 2))
    sq = _embed_sq(idx, rows) + _outer_sq(x.unsqueeze(1), g.unsqueeze(1), None)[0] + 2 * cross
    return sq.clamp_(min=0)  # NOTE [a Gram sum below zero]


def _slice(payload: tuple[Any, ...], s: int, e: int) -> tuple[Any, ...]:
    return tuple(t[s:e] if isinstance(t, torch.Tensor) else t for t in payload)


def _materialised(parts: Parts, param: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Examples ``s:e``'s whole gradient of the slot, summed over all its parts."""
    total = None
    for kind, payloads in parts.items():
        chunk = [_slice(p, s, e) for p in payloads]
        if kind == "conv":
            g = None
            for p in chunk:
                m = conv_materialise(*p, param)
                g = m if g is None else g + m
        else:
            g = merge(kind, chunk, param)
        total = g if total is None else total + g
    assert total is not None
    return total


def _contract_rows(c: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``sum_b c_b kept[b]``, contiguous, reading ``kept`` in its memory order: kept conv
    gradients may be a permuted view (NOTE [channels-last patches] in ``_rules``), which
    ``reshape`` would copy whole; the product is permuted back instead (one weight's size)."""
    order = sorted(range(1, kept.dim()), key=kept.stride, reverse=True)
    sizes = [kept.shape[d] for d in order]
    rows = kept.permute(0, *order).reshape(c.shape[0], math.prod(sizes))  # a view if a block
    out = torch.matmul(c, rows).view(sizes)
    return out.permute([order.index(d) for d in range(1, kept.dim())]).contiguous()


def _as(dtype: torch.dtype, payload: tuple[Any, ...]) -> tuple[Any, ...]:
    """A part's floating tensors in ``dtype`` (NOTE [ghost sums under autocast])."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype != dtype else t for t in payload)


def _batch(parts: Parts) -> int:
    first = next(iter(parts.values()))[0]
    return next(t for t in first if isinstance(t, torch.Tensor)).shape[0]


def squared_norms(parts: Parts, param: torch.Tensor, keep: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B,)`` squared norms of each example's gradient of one parameter (float64 for a
    float64 parameter, else float32), see NOTE [Gram or materialise]; and, when ``keep``
    and the path formed them anyway, the per-example gradients ``(B, *param.shape)`` for
    :func:`weighted_sum` (see NOTE [keeping small per-example gradients]). Call it under
    ``torch.no_grad()`` (the driver runs both functions in one such block)."""
    B = _batch(parts)
    if len(parts) == 1:
        kind, payloads = next(iter(parts.items()))
        if kind == "outer":
            x, g = _cat([p[0] for p in payloads], 2), _cat([p[1] for p in payloads], 2)
            return _outer_sq(x, g, param if keep else None)
        if kind == "sum":
            g = _cat([p[0] for p in payloads], 1)
            return _rows_sq(g if g.shape[1] == 1 else g.sum(1)), None
        if kind == "embed":
            idx, rows = _cat([p[0] for p in payloads], 1), _cat([p[1] for p in payloads], 1)
            return _embed_sq(idx, rows), None
        if kind == "direct":
            m = merge(kind, payloads, param)
            return _rows_sq(m), (m if keep else None)
        if kind == "conv" and len(payloads) == 1:
            return _conv_sq(*payloads[0], param if keep else None)
    if set(parts) == {"embed", "outer"} and parts["outer"][0][0].shape[1] == 1:
        return _tied_sq(parts), None
    # A parameter used by several kinds of call (tied weights): form its gradient, a
    # chunk of examples at a time.
    buf = param.new_empty(B, *param.shape) if keep else None
    out = []
    for s, e in _chunks(B, param.numel(), param.element_size()):
        m = _materialised(parts, param, s, e)
        if buf is not None:
            buf[s:e] = m
        out.append(_rows_sq(m))
    return _cat(out, 0), buf


def weighted_sum(parts: Parts, param: torch.Tensor, c: torch.Tensor,
                 kept: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_b c_b * grad_b`` of one parameter from its parts: the gradient of
    ``sum_b c_b loss_b`` (see NOTE [clipping without a second backward] in ``_ghost``);
    from ``kept`` per-example gradients when :func:`squared_norms` formed them. Call it
    under ``torch.no_grad()``."""
    # NOTE [ghost sums under autocast]: parts saved under autocast carry its dtype (bf16);
    # the factors carry the parameter's. The sum is taken in the latter, as autograd's
    # gradient of a float32 parameter is (a float32 @ bf16 product was an error when the
    # autocast was inside loss_fn, and a bf16 one rounded float32 layers' sums to bf16).
    parts = {k: [_as(c.dtype, p) for p in v] for k, v in parts.items()}
    if kept is not None:  # (B,) @ (B, P): the same product as (1, B) @ (B, P)
        return _contract_rows(c, kept if kept.dtype == c.dtype else kept.to(c.dtype)).view(param.shape)
    total = None
    for kind, payloads in parts.items():
        if kind == "outer":
            x, g = _cat([p[0] for p in payloads], 2), _cat([p[1] for p in payloads], 2)
            B, G, n, din = x.shape
            gw = g * c.reshape(B, 1, 1, 1)
            if G == 1:  # the usual linear layer: one (dout, B n) @ (B n, din) product
                out = (gw.reshape(B * n, -1).mT @ x.reshape(B * n, din)).view(param.shape)
            else:
                xs = x.transpose(0, 1).reshape(G, B * n, din)
                out = (gw.transpose(0, 1).reshape(G, B * n, -1).mT @ xs).reshape(param.shape)
        elif kind == "sum":
            g = _cat([p[0] for p in payloads], 1)
            if g.shape[1] == 1:  # one row per example: (B,) @ (B, dout)
                out = torch.matmul(c, g.reshape(g.shape[0], -1)).view(param.shape)
            else:
                out = (g * c.reshape(-1, 1, 1)).sum((0, 1)).reshape(param.shape)
        elif kind == "embed":
            idx, rows = _cat([p[0] for p in payloads], 1), _cat([p[1] for p in payloads], 1)
            D = rows.shape[-1]
            out = rows.new_zeros(param.shape[0], D).index_add_(
                0, idx.reshape(-1), (rows * c.reshape(-1, 1, 1)).reshape(-1, D)).reshape(param.shape)
        elif kind == "conv":
            out = None
            for x, g, geometry in payloads:
                w = _conv_weighted(x, g, geometry, param, c)
                out = w if out is None else out + w
        else:  # "direct" and any kind a newer rule adds: form it, a chunk at a time
            B = _batch({kind: payloads})
            out = None
            for s, e in _chunks(B, param.numel(), param.element_size()):
                m = _materialised({kind: payloads}, param, s, e)
                w = (m * c[s:e].reshape(-1, *([1] * param.dim()))).sum(0)
                out = w if out is None else out + w
        total = out if total is None else total + out
    assert total is not None
    return total
