"""Per-sample gradient rules, one per functional op, and the finishers that merge them.

A rule is called in place of the op when a tracked parameter is among its arguments. It
validates the call, runs the op on the plain parameters and records the output (see
NOTE [how the engine works] in ``_engine``). After the backward, the rule's ``finish``
turns the output gradient into *parts* keyed by ``(kind, slot)``; :func:`merge` then
builds each parameter's ``(B, *shape)`` gradient from all its parts at once:

* ``"outer"``: ``x (B, G, n, in)`` and ``g (B, G, n, out)``; the sum over ``n`` of
  ``g^T x`` (linear and recurrent weights: every use of the parameter, a ``W_hh`` at each
  time step, is concatenated on ``n`` and contracted by one batched matmul).
* ``"sum"``: ``g (B, n, k)`` summed over ``n`` (linear and recurrent biases).
* ``"embed"``: indices ``(B, n)`` and rows ``(B, n, D)`` scattered into ``(B, V, D)``.
* ``"direct"``: a ready ``(B, *shape)`` contribution, summed over uses (conv weights and
  biases, see NOTE [per-example conv weight gradients]; normalisation layers).

Tests: ``tests/test_grad_sample.py`` checks every rule against a Python loop over examples.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function
from torch.overrides import has_torch_function

from functorch_pipeline.transforms._grad_sample import _buffers
from functorch_pipeline.transforms._grad_sample import _kernel_choice
from functorch_pipeline.transforms._grad_sample import _state
from functorch_pipeline.transforms._grad_sample._engine import Ambiguous
from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._row_order import batch_norm_error

__all__ = ["RULES", "VERSION", "conv_weight_grouped", "conv_weight_per_example", "merge", "overridable",
           "register_rule"]


def _get(args: Any, kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _params(engine: Engine, *ts: Any) -> tuple[list[int | None], list[Any]]:
    return [engine.slot(t) for t in ts], [engine.base(t) for t in ts]


def _no_graph(*ts: Any) -> bool:
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


# -- linear ---------------------------------------------------------------------------------


def _linear(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    if len(args) == 3 and not kwargs:  # the common call, parsed fast
        x, w, b = args
    else:
        x, w, b = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "weight"), _get(args, kwargs, 2, "bias")
    ws, bs = engine.slot(w), engine.slot(b)
    wp = engine.bases[ws] if ws is not None else w
    bp = engine.bases[bs] if bs is not None else b
    if ws is not None and wp.dim() != 2:  # x @ w with a vector w: valid in torch, no rule here
        raise Unsupported(f"{engine.names(args, kwargs)} {'is' if len(engine.slots(args, kwargs)) == 1 else 'are'} "
                          f"used by `F.linear` with a {wp.dim()}-d weight, which has no "
                          "per-sample gradient rule; method='vmap' runs it")
    # A constant input (Swin v2's table of relative coordinates through its position MLP)
    # is a derived tensor, NOTE [constants or batch data] in _engine: where the size check
    # refuses it, or where it has the batch size (NOTE [a table the size of the batch]).
    axis = engine.input_axis(F.linear, args, kwargs, lambda: engine.check_input(
        x, "F.linear", [s for s in (ws, bs) if s is not None], features=1, seq_first=True,
        blocks=True))
    if axis is None:
        return engine.derive_op(F.linear, args, kwargs)
    xin = x.detach().requires_grad_() if _no_graph(x, wp, bp) else x
    out = F.linear(xin, wp, bp)
    engine.record(out, _finish_linear, x, ws, bs, axis)
    return out


def _finish_linear(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int | None,
                   bs: int | None, axis: int = 0) -> None:
    if axis:  # NOTE [sequence-first inputs]
        x, g = x.movedim(axis, 0), g.movedim(axis, 0)
    B = g.shape[0]
    if ws is not None:
        engine.add("outer", ws, x.reshape(B, 1, -1, x.shape[-1]), g.reshape(B, 1, -1, g.shape[-1]))
    if bs is not None:
        engine.add("sum", bs, g.reshape(B, -1, g.shape[-1]))


# -- convolution ----------------------------------------------------------------------------


def _pair(v: Any, n: int) -> tuple[int, ...]:
    """A conv's ``stride``/``padding``/``dilation`` per spatial axis: an int, or a sequence
    of one (which torch expands to every axis, as for ``stride=(2,)``) or ``n`` values."""
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    return t * n if len(t) == 1 else t


def conv_pads(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """``F.pad`` amounts (last axis first) equivalent to a conv's ``padding`` argument;
    ``"same"`` puts the odd extra element on the right, as torch does."""
    if isinstance(padding, str):
        pads: list[int] = []
        for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
            total = d * (k - 1) if padding == "same" else 0
            pads += [total // 2, total - total // 2]
        return pads
    return [p for p in reversed(_pair(padding, len(kernel))) for _ in range(2)]


def _conv(nd: int) -> Any:
    op = {1: torch.conv1d, 2: torch.conv2d}[nd]
    name = f"F.conv{nd}d"

    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        x, w, b = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "weight"), _get(args, kwargs, 2, "bias")
        stride, padding = _get(args, kwargs, 3, "stride", 1), _get(args, kwargs, 4, "padding", 0)
        dilation, groups = _get(args, kwargs, 5, "dilation", 1), _get(args, kwargs, 6, "groups", 1)
        (ws, bs), (wp, bp) = _params(engine, w, b)
        if engine.input_axis(op, args, kwargs, lambda: engine.check_input(
                x, name, [s for s in (ws, bs) if s is not None], min_dim=nd + 2,
                features=nd + 1, blocks=True)) is None:  # a constant: NOTE [constants or batch data]
            return engine.derive_op(op, args, kwargs)
        xin = x.detach().requires_grad_() if _no_graph(x, wp, bp) else x
        out = op(xin, wp, bp, stride, padding, dilation, groups)
        geometry = (tuple(wp.shape[2:]), _pair(stride, nd), padding, _pair(dilation, nd), groups)
        engine.record(out, _finish_conv, x, ws, bs, geometry)
        return out

    return rule


def _finish_conv(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int | None,
                 bs: int | None, geometry: tuple[Any, ...]) -> None:
    if bs is not None:
        engine.add("direct", bs, g.sum(tuple(range(2, g.dim()))))
    if ws is not None:
        engine.add("direct", ws, engine.summed_rows(
            lambda xs, gs: _conv_weight(xs, gs, *geometry), x, g, engine.bases[ws]))


_PATCH_BYTES = 2 << 20  # patches per chunk: about what stays in a 2 MB cache


def _conv_weight(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                 padding: Any, dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """Per-example conv weight gradients ``(B, O, C / groups, *kernel)``.

    # NOTE [per-example conv weight gradients]
    For each example, the weight gradient is ``g (O, L) @ patches (L, C k)``: the input
    patches are a strided view of the (padded) input, copied to a contiguous block, and one
    batched matmul contracts them with the output gradient. Both are done in chunks of
    examples whose patches fit in ~2 MB, so the copy is still in cache when the matmul
    reads it: on 1 CPU thread this took the MNIST CNN's two layers from 5.0 and 7.9 ms
    (whole batch of 256 at once) to 3.5 and 5.5 ms, against 2.6 and 4.6 ms for the *batch*
    weight gradient in mkldnn. (``F.unfold`` was slower: 40+ ms.) In float32 on CPU,
    mkldnn's grouped backward with one group per example (NOTE [grouped weight gradients
    on CPU]) is the other kernel: which of the two runs is measured per layer (NOTE
    [measured kernel choice] in ``_kernel_choice``); this path alone serves float64 (no
    mkldnn) and other devices.
    """
    nd = len(kernel)
    if nd == 1:  # conv1d as a conv2d of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        if not isinstance(padding, str):
            padding = (0, *_pair(padding, 1))
    pads = conv_pads(padding, kernel, dilation)
    if _grouped_ok(x):
        out = conv_weight_per_example(x, g, kernel, stride, pads, dilation, groups)
    else:
        out = _patch_weight(x, g, kernel, stride, pads, dilation, groups)
    return out.reshape(out.shape[:3] + tuple(kernel[2 - nd:]))


def _patch_weight(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                  pads: list[int], dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """NOTE [per-example conv weight gradients] for a 2-d conv: ``(B, O, C / groups, kh, kw)``."""
    if any(pads):
        x = F.pad(x, pads)
    x = x.contiguous()
    (B, C, _, _), (out_ch, Ho, Wo), (kh, kw) = x.shape, g.shape[1:], kernel
    cin, cout, L = C // groups, out_ch // groups, Ho * Wo
    sB, sC, sH, sW = x.stride()
    size = (groups, cin, kh, kw, Ho, Wo)
    strides = (sC * cin, sC, sH * dilation[0], sW * dilation[1], sH * stride[0], sW * stride[1])
    grads = g.reshape(B, groups, cout, L)
    out = x.new_empty(B, groups, cout, cin * kh * kw)
    chunk = max(1, _PATCH_BYTES // (C * kh * kw * L * x.element_size()))
    for start in range(0, B, chunk):
        xs = x[start:start + chunk]
        n = xs.shape[0]
        patches = xs.as_strided((n, *size), (sB, *strides)).reshape(n, groups, cin * kh * kw, L)
        torch.matmul(grads[start:start + n], patches.mT, out=out[start:start + n])
    return out.reshape(B, out_ch, cin, kh, kw)


def _patch_weight_last(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...],
                       stride: tuple[int, ...], pads: list[int], dilation: tuple[int, ...],
                       groups: int, any_layout: bool = False) -> torch.Tensor:
    """NOTE [per-example conv weight gradients] with the input channels last: ``(B, O, C /
    groups, kh, kw)``; with ``any_layout``, a permuted view of a ``(B, O, kh, kw, C /
    groups)`` block (for callers that only reduce over it: ghost clipping's norms and
    weighted sums), without the copy into the weight's layout.

    # NOTE [channels-last patches]
    The patch copy of :func:`_patch_weight` moves runs of ``Wo`` contiguous numbers (a
    patch row along the output's width): 8 for the MNIST CNN's conv2 (10 -> 20, 5x5 on
    12x12), so the copy, not the matmul, sets its time. With the input laid out ``(B, H,
    W, C)`` a patch's ``kw`` columns times its ``C / groups`` channels are one contiguous
    run (50 numbers for conv2, when ``groups == 1`` and the width's dilation is 1), the
    matmul gives ``(O, kh, kw, C / groups)`` per example, and each chunk's result is
    permuted into the weight's layout while it is still in cache. Batch 256, float32, 2
    threads, 2-core Intel Xeon (medians of 15, interleaved, ad hoc): conv2 3.1 ms against
    4.5 ms for :func:`_patch_weight` (the batch weight gradient: 3.9 ms). A single input
    channel gains nothing (runs of ``kw`` against ``Wo``), so which of the kernels runs is
    measured per layer (NOTE [measured kernel choice]).
    """
    B, C = x.shape[:2]
    out_ch, Ho, Wo = g.shape[1:]
    (kh, kw), cin, cout = kernel, C // groups, out_ch // groups
    top, bottom, left, right = pads[2], pads[3], pads[0], pads[1]
    make = x.new_zeros if any(pads) else x.new_empty
    xl = make(B, x.shape[2] + top + bottom, x.shape[3] + left + right, C)
    xl[:, top:top + x.shape[2], left:left + x.shape[3]] = x.permute(0, 2, 3, 1)
    sB, sH, sW, _ = xl.stride()
    size = (groups, Ho, Wo, kh, kw, cin)
    strides = (cin, sH * stride[0], sW * stride[1], sH * dilation[0], sW * dilation[1], 1)
    grads = g.reshape(B, groups, cout, Ho * Wo)
    block = x.new_empty(B, groups, cout, kh * kw * cin) if any_layout else None
    out = x.new_empty(B, out_ch, cin, kh, kw) if block is None else None
    chunk = max(1, _PATCH_BYTES // (C * kh * kw * Ho * Wo * x.element_size()))
    for start in range(0, B, chunk):
        n = min(chunk, B - start)
        patches = xl[start:start + n].as_strided((n, *size), (sB, *strides)).reshape(
            n, groups, Ho * Wo, kh * kw * cin)
        if block is not None:
            torch.matmul(grads[start:start + n], patches, out=block[start:start + n])
        else:  # (n, groups, cout, kh kw cin), into the weight's layout while in cache
            part = torch.matmul(grads[start:start + n], patches)
            out[start:start + n] = part.view(n, out_ch, kh, kw, cin).permute(0, 1, 4, 2, 3)
    if block is not None:
        return block.view(B, out_ch, kh, kw, cin).permute(0, 1, 4, 2, 3)
    return out


def conv_weight_per_example(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...],
                            stride: tuple[int, ...], pads: list[int], dilation: tuple[int, ...],
                            groups: int, any_layout: bool = False) -> torch.Tensor:
    """Per-example 2-d conv weight gradients ``(B, O, C / groups, kh, kw)`` on CPU in
    float32 or bfloat16 (``pads`` in ``F.pad`` order): mkldnn's grouped kernel, the patch
    matmul or the patch matmul with the channels last (NOTE [channels-last patches]),
    whichever this process measured fastest for the layer's geometry (NOTE [measured
    kernel choice] in ``_kernel_choice``). With ``any_layout`` the result may be a permuted
    view (NOTE [channels-last patches])."""
    B = x.shape[0]
    if B == 0:  # an empty (Poisson) batch: nothing to measure
        return conv_weight_grouped(x, g, kernel, stride, pads, dilation, groups)
    key = (f"conv2d weight gradients: batch <= {1 << (B - 1).bit_length()}, input "
           f"{tuple(x.shape[1:])}, output {tuple(g.shape[1:])}, kernel {tuple(kernel)}, stride "
           f"{tuple(stride)}, pads {tuple(pads)}, dilation {tuple(dilation)}, groups {groups}, "
           f"{x.dtype}, {torch.get_num_threads()} threads")
    return _kernel_choice.pick(key, "grouped", {
        "grouped": lambda: conv_weight_grouped(x, g, kernel, stride, pads, dilation, groups),
        "patches": lambda: _patch_weight(x, g, kernel, stride, pads, dilation, groups),
        "channels_last": lambda: _patch_weight_last(x, g, kernel, stride, pads, dilation, groups,
                                                    any_layout),
    }, (x, g))


def _grouped_ok(x: torch.Tensor) -> bool:
    """Whether to take NOTE [grouped weight gradients on CPU] for this input."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available())


_GROUPED_BYTES = 24 << 20  # NOTE [grouped chunks]: whole batches up to this
_GROUPED_CHUNK = 4 << 20  # and chunks of about this beyond it
_SCRATCH_PER_THREAD = 4  # NOTE [oneDNN scratch]: weight gradients' worth per thread


def _forward_branch(x: torch.Tensor, groups: int, kernel: tuple[int, ...],
                    stride: tuple[int, ...]) -> bool:
    """Whether :func:`_grouped_once` takes the grouped *forward* convolution (few input
    channels) rather than the backward-weights kernel.

    # NOTE [first-layer kernels]
    mkldnn's grouped backward-weights kernel is slow when a group's input channels are
    fewer than 8 (an image's 1-3 channels); the grouped forward convolution with the
    channels as its batch computes the same sums. Medians of 7, float32, 2 threads,
    ``N = 128`` examples, interleaved (ad hoc grid, 2-core AMD EPYC, torch 2.14.1; ``N``
    of 32 and 256 gave the same ratios), forward time over backward time: 0.29-0.82 for
    every stride-1 layer with 1-7 input channels (3 -> 16, 3x3 on 32x32: 2.43 against
    6.37 ms; 3 -> 32: 3.02 against 5.19 ms), 0.46-0.51 for large strided kernels (a 7x7
    stride-2 stem, Opacus' 8x8 stride-2 first conv), but 1.1-2.3 for 3x3 and 5x5 stride-2
    or 4x4 stride-4 layers, and 1.1-4.0 from 8 input channels (MNIST's 10 -> 20: 1.23-1.29).
    So it is taken for fewer than 8 input channels when every stride is 1 or every kernel
    side is at least ``2 * stride + 2``. (The rule was "1 or 2 input channels" before;
    3-channel images took the slower kernel.)
    """
    if groups != 1 or x.shape[1] >= 8:
        return False
    return (all(s == 1 for s in stride)
            or all(k >= 2 * s + 2 for k, s in zip(kernel, stride, strict=True)))


def _scratch(x: torch.Tensor, out_ch: int, groups: int, weight: int, kernel: tuple[int, ...],
             stride: tuple[int, ...]) -> int:
    """The bytes per example of mkldnn's own buffer in a grouped weight-gradient call
    (NOTE [oneDNN scratch]): none for the grouped-forward branch or when both per-group
    channel counts are multiples of 8; else 4 float32 weight gradients per thread."""
    if _forward_branch(x, groups, kernel, stride):
        return 0
    if (x.shape[1] // groups) % 8 == 0 and (out_ch // groups) % 8 == 0:
        return 0
    return _SCRATCH_PER_THREAD * torch.get_num_threads() * weight * max(4, x.element_size())


def grouped_step(batch: int, per_example: int, scratch: int) -> int:
    """Examples per grouped call (``batch``: one call). ``per_example``: the bytes of one
    example's input, output gradient and weight gradient; ``scratch``: the bytes of
    oneDNN's own buffers per example (NOTE [oneDNN scratch]).

    Example:
      >>> grouped_step(256, 30_880, 160_000)  # the MNIST CNN's conv2 at 2 threads
      128
      >>> grouped_step(64, 30_880, 160_000)  # 12 MB: one call
      64
    """
    if batch <= 1:
        return batch
    if batch * per_example > _GROUPED_BYTES:  # past the cache: small chunks
        return max(1, min(_GROUPED_CHUNK // per_example, _GROUPED_BYTES // (per_example + scratch)))
    if batch * (per_example + scratch) > _GROUPED_BYTES:  # even chunks under the limit
        most = max(1, _GROUPED_BYTES // (per_example + scratch))
        calls = -(-batch // most)
        return -(-batch // calls)
    return batch


def conv_weight_grouped(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...],
                         stride: tuple[int, ...], pads: list[int], dilation: tuple[int, ...],
                         groups: int) -> torch.Tensor:
    """Per-example 2-d conv weight gradients ``(B, O, C / groups, *kernel)`` from one grouped
    weight-gradient call (one per chunk of examples for large batches, NOTE [grouped chunks]).

    # NOTE [grouped weight gradients on CPU]
    The batch becomes ``B * groups`` groups of one convolution over a batch of one:
    input ``(1, B C, H, W)``, output gradient ``(1, B O, Ho, Wo)``; the weight gradient
    of that grouped convolution, ``(B O, C / groups, kh, kw)``, is every example's own.
    On CPU in float32 mkldnn's backward-weights kernel does this without the patch copy
    of NOTE [per-example conv weight gradients]: on the MNIST CNN at batch 256 (1 thread,
    busy 2-core AMD machine, medians of 15) 3.5 vs 5.3 ms (conv1) and 3.5 vs 4.8 ms
    (conv2), and 1.3-1.8x on CIFAR-sized 3x3 layers; float64 (no mkldnn) gains nothing, so
    the patch matmul stays for float64 and other devices. On an Intel Xeon the patch
    matmul is the faster one for many layers, so in float32 the two are measured per
    layer: NOTE [measured kernel choice] in ``_kernel_choice``.
    """
    B, C = x.shape[:2]
    out_ch = g.shape[1]
    if B == 0:  # an empty (Poisson) batch: mkldnn refuses zero groups
        return x.new_zeros(0, out_ch, C // groups, *kernel)
    # NOTE [grouped chunks]: when the whole batch's input, output gradient and weight
    # gradients pass _GROUPED_BYTES (more than the last-level cache holds), the grouped
    # call runs on chunks of examples of ~_GROUPED_CHUNK bytes, written into one output.
    # At batch 256 on 2 threads (medians of 20-30, interleaved, ad hoc, two runs) a
    # CIFAR-sized 32->64 3x3 layer on 16x16 (46 MB whole) took 10.0 and 20.8 ms whole
    # against 8.6 and 8.9 ms in chunks of 16-22 examples.
    #
    # NOTE [oneDNN scratch]
    # Below that limit the call may still need chunks, for memory the tensors above do
    # not show. When a group's input or output channels are not a multiple of 8 (the
    # MNIST CNN's conv2: 10 -> 20, 5x5 on 12x12), mkldnn's backward-weights kernel
    # allocates its own buffer of 4 weight gradients per thread (3 in bfloat16, in
    # float32 entries), on top of torch's allocator: 41,091,072 bytes per call at batch
    # 256 on 2 threads, 20.5 MB on 1 thread, 82 MB at batch 512, 30.8 MB in bfloat16.
    # Channels 8 -> 8, 8 -> 16, 16 -> 32, 24 -> 32, 32 -> 64 and 64 -> 64 allocated none;
    # 3 -> 32, 4 -> 16, 12 -> 16, 16 -> 20, 20 -> 32, 32 -> 10 did (strace of the mmap
    # calls, AVX-512 machine, torch 2.14.1's mkldnn 3.12). Above glibc's 32 MiB ceiling
    # for its dynamic mmap threshold such a block is mmap'ed and unmapped on every call
    # and its pages fault in again; at 16 threads it would be ~330 MB a call if the
    # per-thread rule measured at 1 and 2 threads holds. So the batch is split evenly
    # into calls whose input, output gradient, weight gradients and that buffer stay
    # under _GROUPED_BYTES: conv2 at batch 256 runs as two calls of 128, bit-identical
    # to one call. In fresh processes with glibc's defaults (6 per side, 30 calls each,
    # medians of medians), per_sample_grads of the MNIST CNN took 12.5 ms with 11 page
    # faults a call against 15.0 ms with 2,426, and a DPTrainer step 14.4 ms (690
    # faults) against 19.2 ms (4,255); with malloc tuned in both, 13.1 against 13.4 ms
    # and 14.8 against 14.9 ms. In one process the split call takes as long as the
    # whole one (``benchmarks/per_example_conv.py``: 1.77 vs 1.75 ms). Splitting a
    # layer that has no such buffer is not free (16 -> 32, 4x4 stride 2 at batch 240:
    # 1.04-1.08 ms in three calls against 0.85-0.93 ms in one, freed memory kept), so
    # layers whose channels are multiples of 8 are not split for it.
    weight = out_ch * (C // groups) * math.prod(kernel)
    per_example = (math.prod(x.shape[1:]) + math.prod(g.shape[1:]) + weight) * x.element_size()
    step = grouped_step(B, per_example, _scratch(x, out_ch, groups, weight, kernel, stride))
    if step < B:
        out = x.new_empty(B, out_ch, C // groups, *kernel)
        for s in range(0, B, step):
            out[s:s + step] = _grouped_once(x[s:s + step], g[s:s + step], kernel, stride, pads,
                                            dilation, groups)
        return out
    return _grouped_once(x, g, kernel, stride, pads, dilation, groups)


def _grouped_once(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...],
                  stride: tuple[int, ...], pads: list[int], dilation: tuple[int, ...],
                  groups: int) -> torch.Tensor:
    """:func:`conv_weight_grouped` in one grouped call."""
    B, C = x.shape[:2]
    out_ch = g.shape[1]
    if pads[0] != pads[1] or pads[2] != pads[3]:  # asymmetric ("same", even kernel)
        x, padding = F.pad(x, pads), [0, 0]
    else:
        padding = [pads[2], pads[0]]
    if _forward_branch(x, groups, kernel, stride):
        # Few input channels (a first layer): the same sums as a grouped *forward*
        # convolution, channels as its batch and each example's output gradient as the
        # kernels of its group (stride and dilation trade places): NOTE [first-layer
        # kernels] says when it is faster.
        w = F.conv2d(x.transpose(0, 1), g.reshape(B * out_ch, 1, *g.shape[2:]), None,
                     list(dilation), padding, list(stride), B)
        w = w[:, :, :kernel[0], :kernel[1]].reshape(C, B, out_ch, *kernel)
        return w.permute(1, 2, 0, 3, 4).contiguous()
    weight = x.new_empty(B * out_ch, C // groups, *kernel)  # its shape is all that is read
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, B * out_ch, *g.shape[2:]), x.reshape(1, B * C, *x.shape[2:]), weight, None,
        list(stride), padding, list(dilation), False, [0, 0], B * groups, [False, True, False])
    return grad_w.reshape(B, out_ch, C // groups, *kernel)


# -- embedding ------------------------------------------------------------------------------


def _constant_ids(engine: Engine, idx: torch.Tensor, ws: int, wp: torch.Tensor,
                  padding_idx: int | None, by_freq: bool) -> torch.Tensor:
    """A lookup by ids with no batch axis: a derived tensor (NOTE [derived parameters])."""
    out = F.embedding(idx, wp, padding_idx)
    return engine.derive(out, (ws,), "F.embedding", functools.partial(
        _positions_to_table, idx=idx, ws=ws, padding_idx=padding_idx, by_freq=by_freq))


def _embedding(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    idx, w = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "weight")
    padding_idx = _get(args, kwargs, 2, "padding_idx")
    ws = engine.slot(w)
    if ws is None:
        raise Unsupported(f"{engine.names(args, kwargs)} is used as the indices of `F.embedding`")
    max_norm, norm_type = _get(args, kwargs, 3, "max_norm"), _get(args, kwargs, 4, "norm_type", 2.0)
    by_freq = bool(_get(args, kwargs, 5, "scale_grad_by_freq", False))
    if by_freq and _get(args, kwargs, 6, "sparse", False) and torch.is_grad_enabled():
        raise ValueError(SPARSE_BY_FREQ.format(fn=engine.fn, call="F.embedding"))
    # sparse=True is otherwise ignored: NOTE [sparse embedding gradients]
    wp = engine.bases[ws]
    if max_norm is not None:
        renorm_rows(engine, ws, idx, max_norm, norm_type, "F.embedding")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += wp.shape[0]
    B = engine.batch_size
    if (isinstance(idx, torch.Tensor) and torch.is_grad_enabled()
            and (B > 1 and (idx.dim() == 1 or idx.shape[0] == 1)
                 or B == 1 and idx.dim() == 1 and idx.shape[0] != 1)
            and not engine.batch_view(idx) and not engine.permuted_batch(idx)
            and not engine.flattened_batch(idx)
            # one id per example computed in loss_fn (`(y * 3 + 1) % 10`): NOTE [a table
            # the size of the batch] in _engine tells them from B positions
            and not engine.holds_examples(idx, "F.embedding")):
        # Ids with no batch axis (positions made in loss_fn, a (1, T) row of them; not the
        # batch's own ids, nor their (1, B) transpose): NOTE [derived parameters].
        return _constant_ids(engine, idx, ws, wp, padding_idx, by_freq)

    def check() -> int:
        return engine.check_input(idx, "F.embedding", [ws], min_dim=1, seq_first=True)

    try:
        axis = check()
    except Ambiguous:
        raise
    except Unsupported:
        # Ids of two or more axes without the batch on the axis the check looks at, and
        # made in loss_fn (T5's (L, L) relative position buckets): a constant of loss_fn
        # when no axis is a multiple of B, else the padded batch decides (NOTE [constants
        # or batch data] in _engine). examples_axis returns None or raises.
        engine.examples_axis(idx, check, f"`F.embedding` on {engine.name(ws)}")
        return _constant_ids(engine, idx, ws, wp, padding_idx, by_freq)
    # NOTE [one-dimensional indices]
    # A 1-d index tensor of size B is either one id per example (a batch argument, or a
    # column of one) or positions made inside ``loss_fn`` (a learned prefix's
    # ``torch.arange(P)`` with P == B, looked up once and broadcast over the batch),
    # whose rows are not examples: reading those as examples gave wrong per-example
    # gradients silently (max error 5.6 on tests/test_grad_sample.py's prefix model).
    # Ids read from a batch argument (``Engine.batch_view``: its storage, examples on
    # axis 0) are taken as examples, and so are the batch's ids flattened
    # (``ids.reshape(-1)``, ``Engine.flattened_batch``: T rows per example, NOTE [examples
    # merged into axis 0] in ``_engine``), and ids computed in ``loss_fn`` that a padded
    # run shows to follow the batch (NOTE [a table the size of the batch]); other 1-d
    # ids (and ``(1, T)`` rows of ids) were refused, and are now looked up as a tensor
    # with no batch axis (NOTE [derived parameters] above). (2-d or longer ids computed
    # in ``loss_fn``, shifted or concatenated token ids, are asked the same way when
    # their first axis has the batch size.)
    # Indices never require grad: a leaf alias of the weight gives the output a grad_fn
    # (see NOTE [gradient edges, not tensors]); its own gradient is never computed.
    out = F.embedding(idx, wp.detach().requires_grad_(), padding_idx)
    engine.record(out, _finish_embedding, idx, ws, padding_idx, axis, by_freq)
    return out


# NOTE [sparse embedding gradients]
# ``sparse=True`` (``nn.Embedding``/``nn.EmbeddingBag``) changes only the storage format of
# the gradient autograd returns for the table (a sparse COO tensor), not its values, so
# the embedding rules ignore it: the lookup is re-run with ``sparse=False`` and the
# per-example gradients (hooks), norms and clipped sum (ghost) are those of the dense
# table, returned dense like every other layer's. ``vmap`` cannot batch the sparse
# backward at all (``aten::view`` has no sparse kernel), so these rules are the only
# transformed path for such tables; ``_per_sample`` says so when it does fall back.
# ``scale_grad_by_freq=True`` with ``sparse=True`` is refused as PyTorch's backward
# refuses it (a loop over examples and ``fp.grad`` fail there too).
SPARSE_BY_FREQ = ("{fn}: {call} does not take scale_grad_by_freq=True with sparse=True "
                  "(PyTorch's backward refuses it); sparse=False gives the same gradient values")


def renorm_rows(engine: Engine, ws: int, idx: Any, max_norm: float, norm_type: float,
                call: str) -> None:
    """``max_norm``: rescale the looked-up rows of the table in place, as the eager forward
    does.

    # NOTE [max_norm renormalises the table]
    ``F.embedding``/``F.embedding_bag`` with ``max_norm`` rescale, in place and outside
    autograd, every row they look up whose norm exceeds ``max_norm``; the gradient is that
    of a plain lookup of the rescaled rows. ``fp.grad`` and eager PyTorch therefore leave the
    caller's table renormalised, and so does this rule (the engine's bases alias the
    parameters), so a DP step sees the table a non-private step would. The rescaling is
    idempotent (a rescaled row's norm is just under ``max_norm``), so a batch, a
    per-example loop, chunks and padded reruns all read the same rows *in the lookups
    with max_norm*. Any other read of the table after one (a tied output head
    ``F.linear(h, table)``, a plain lookup) would read the rows every example of the batch
    rescaled, where a loop's example reads only its own: its gradient depended on the other
    examples (86.6 off the loop, the norm of one example 119.0 alone and 27.8 in a batch of
    4, and ``chunk_size`` changed it), which breaks DP's sensitivity bound. Such a read is
    refused (``Engine.renormed``), and so is any method (``vmap`` cannot batch the in-place
    rescaling at all). A table derived inside ``loss_fn`` (NOTE [derived parameters]) is
    refused: rescaling it in place would change what its gradient is pulled back through.
    A plain read *before* such a lookup reads the rows as they were, in a loop as in the
    batch, but the engines may run ``loss_fn`` more than once in a call (a padded run:
    NOTE [padding an ambiguous batch] in ``_padding``; ``chunk_size``): such a read in a
    later run or chunk read rows an earlier one had rescaled (4.2 off the loop on the
    first call, 3.1 with ``chunk_size=2``). So the rows are kept before each rescaling
    (:meth:`~._state.Snapshot.keep_rows`) and written back with the module buffers
    before every later run or chunk (NOTE [runs that change module state] in
    ``_state``); a call whose answer came from a padded run or from chunks ends, as for
    a buffer, with one plain forward of the batch under ``no_grad``, so the table is
    left as one eager forward of the batch leaves it.
    """
    if ws in engine.derived:
        raise Unsupported(f"{engine.name(ws)} is used by `{call}` with max_norm={max_norm!r} "
                          "after being computed inside loss_fn; the in-place rescaling of its "
                          "rows has no per-sample gradient rule there")
    engine.renormed.add(ws)
    ids = idx.contiguous().reshape(-1)
    _state.keep_rows(engine.bases[ws], ids)  # for a later run of this call to start from
    with torch.no_grad():
        torch.embedding_renorm_(engine.bases[ws], ids, max_norm, norm_type)


def _positions_to_table(engine: Engine, grad: torch.Tensor, idx: torch.Tensor, ws: int,
                        padding_idx: int | None, by_freq: bool = False) -> None:
    """The per-example gradient ``(B, *idx.shape, D)`` of a lookup of ids with no batch
    axis, scattered into the table as every example's rows (NOTE [derived parameters])."""
    B = grad.shape[0]
    ids = idx.reshape(1, -1).expand(B, -1).contiguous()
    _finish_embedding(engine, grad.reshape(B, -1, grad.shape[-1]), ids, ws, padding_idx,
                      by_freq=by_freq)


def counts_in_rows(idx: torch.Tensor) -> torch.Tensor:
    """``out[b, t]``: how many times ``idx[b, t]`` occurs in row ``b`` of the 2-d ``idx``.

    # NOTE [scale_grad_by_freq per example]
    ``scale_grad_by_freq=True`` divides each looked-up row's gradient by the number of
    times its id occurs *in the input of the call*. One example's gradient is that of its
    loss alone, so its ids are counted within the example (as ``vmap`` and a loop over
    examples count them), not over the batch: the batch gradient of such a lookup is not
    the sum of the per-example gradients. Counted by sorting each row (no host sync).
    """
    s, order = idx.sort(1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    seg = new.long().cumsum(1) - 1
    per_seg = torch.zeros_like(seg).scatter_add_(1, seg, torch.ones_like(seg))
    return torch.empty_like(seg).scatter_(1, order, per_seg.gather(1, seg))


def _finish_embedding(engine: Engine, g: torch.Tensor, idx: torch.Tensor, ws: int,
                      padding_idx: int | None, axis: int = 0, by_freq: bool = False) -> None:
    if axis:  # NOTE [sequence-first inputs]
        idx, g = idx.movedim(axis, 0), g.movedim(axis, 0)
    B = engine.batch_size  # rows merged per example are positions: NOTE [examples merged ...]
    idx, g = idx.reshape(B, -1), g.reshape(B, -1, g.shape[-1])
    if padding_idx is not None:
        g = g.masked_fill((idx == padding_idx).unsqueeze(-1), 0)
    if by_freq:  # NOTE [scale_grad_by_freq per example]
        g = g / counts_in_rows(idx).unsqueeze(-1).to(g.dtype)
    engine.add("embed", ws, idx, g)


# -- normalisation --------------------------------------------------------------------------


def _affine_parts(engine: Engine, g: torch.Tensor, x_hat: torch.Tensor, ws: int | None,
                  bs: int | None, dims: tuple[int, ...]) -> None:
    if ws is not None:
        gx = g * x_hat
        engine.add("direct", ws, gx.sum(dims) if dims else gx)
    if bs is not None:
        engine.add("direct", bs, g.sum(dims) if dims else g)


def _layer_norm(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    x, shape = _get(args, kwargs, 0, "input"), tuple(_get(args, kwargs, 1, "normalized_shape"))
    w, b, eps = _get(args, kwargs, 2, "weight"), _get(args, kwargs, 3, "bias"), _get(args, kwargs, 4, "eps", 1e-5)
    (ws, bs), (wp, bp) = _params(engine, w, b)
    axis = engine.input_axis(F.layer_norm, args, kwargs, lambda: engine.check_input(
        x, "F.layer_norm", [s for s in (ws, bs) if s is not None], min_dim=len(shape) + 1,
        features=len(shape), seq_first=True, blocks=True))
    if axis is None:  # a constant input: NOTE [constants or batch data] in _engine
        return engine.derive_op(F.layer_norm, args, kwargs)
    xin = x.detach().requires_grad_() if _no_graph(x, wp, bp) else x
    out = F.layer_norm(xin, shape, wp, bp, eps)
    engine.record(out, _finish_layer_norm, x, ws, bs, shape, eps, axis)
    return out


def _finish_layer_norm(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int | None,
                       bs: int | None, shape: tuple[int, ...], eps: float, axis: int = 0) -> None:
    with torch.no_grad():
        x_hat = F.layer_norm(x, shape, None, None, eps)
    if axis:  # NOTE [sequence-first inputs]
        g, x_hat = g.movedim(axis, 0), x_hat.movedim(axis, 0)
    _affine_parts(engine, g, x_hat, ws, bs, tuple(range(1, x.dim() - len(shape))))


def _group_norm(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    x, groups = _get(args, kwargs, 0, "input"), _get(args, kwargs, 1, "num_groups")
    w, b, eps = _get(args, kwargs, 2, "weight"), _get(args, kwargs, 3, "bias"), _get(args, kwargs, 4, "eps", 1e-5)
    (ws, bs), (wp, bp) = _params(engine, w, b)
    if engine.input_axis(F.group_norm, args, kwargs, lambda: engine.check_input(
            x, "F.group_norm", [s for s in (ws, bs) if s is not None], features=x.dim() - 1,
            blocks=True)) is None:
        return engine.derive_op(F.group_norm, args, kwargs)  # NOTE [constants or batch data]
    xin = x.detach().requires_grad_() if _no_graph(x, wp, bp) else x
    out = F.group_norm(xin, groups, wp, bp, eps)
    engine.record(out, _finish_group_norm, x, ws, bs, groups, eps)
    return out


def _finish_group_norm(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int | None,
                       bs: int | None, groups: int, eps: float) -> None:
    with torch.no_grad():
        x_hat = F.group_norm(x, groups, None, None, eps)
    _affine_parts(engine, g, x_hat, ws, bs, tuple(range(2, x.dim())))


def _batch_norm(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    x, mean, var = (_get(args, kwargs, i, n) for i, n in enumerate(("input", "running_mean", "running_var")))
    w, b = _get(args, kwargs, 3, "weight"), _get(args, kwargs, 4, "bias")
    training, momentum = _get(args, kwargs, 5, "training", False), _get(args, kwargs, 6, "momentum", 0.1)
    eps = _get(args, kwargs, 7, "eps", 1e-5)
    (ws, bs), (wp, bp) = _params(engine, w, b)
    if training:
        raise ValueError(batch_norm_error(engine.fn, f"(parameters {engine.names(args, kwargs)})"))
    if engine.slot(mean) is not None or engine.slot(var) is not None:
        raise Unsupported(f"{engine.names(args, kwargs)} is used as running statistics of `F.batch_norm`")
    engine.check_input(x, "F.batch_norm", [s for s in (ws, bs) if s is not None], features=x.dim() - 1)
    xin = x.detach().requires_grad_() if _no_graph(x, wp, bp) else x
    out = F.batch_norm(xin, mean, var, wp, bp, False, momentum, eps)
    engine.record(out, _finish_batch_norm, x, ws, bs, mean, var, eps)
    return out


def _finish_batch_norm(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int | None,
                       bs: int | None, mean: torch.Tensor, var: torch.Tensor, eps: float) -> None:
    view = (1, -1) + (1,) * (x.dim() - 2)
    with torch.no_grad():
        x_hat = (x - mean.reshape(view)) * torch.rsqrt(var.reshape(view) + eps)
    _affine_parts(engine, g, x_hat, ws, bs, tuple(range(2, x.dim())))


VERSION = [0]  # bumped by every change to RULES: tables built from it are rebuilt then


class _Rules(dict):  # type: ignore[type-arg]
    """The rule table: a dict whose changes (``register_rule``, a test's ``setitem``) move
    ``VERSION``; lookups are plain dict lookups."""

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        VERSION[0] += 1

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        VERSION[0] += 1


RULES: dict[Any, Any] = _Rules({
    F.linear: _linear,
    torch.conv1d: _conv(1),
    torch.conv2d: _conv(2),
    F.embedding: _embedding,
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.batch_norm: _batch_norm,
})


# -- merging parts --------------------------------------------------------------------------


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def merge(kind: str, parts: list[tuple[torch.Tensor, ...]], param: torch.Tensor) -> torch.Tensor:
    """One parameter's per-example gradient ``(B, *param.shape)`` from its parts."""
    B = parts[0][0].shape[0]
    if kind == "outer":
        x, g = _cat([p[0] for p in parts], 2), _cat([p[1] for p in parts], 2)
        # NOTE [recycled outputs] (in _buffers): written into a reused buffer when free.
        out = _buffers.take((B, *param.shape), g)
        view = out.view(B, g.shape[1], g.shape[3], x.shape[3])
        # n == 1 (a dense layer on a flat batch): a broadcast product beats bmm with k=1.
        if x.shape[2] == 1:
            torch.mul(g.mT, x, out=view)
        else:
            torch.matmul(g.mT, x, out=view)
        return _buffers.keep(out)
    if kind == "sum":
        g = _cat([p[0] for p in parts], 1)
        return (g[:, 0] if g.shape[1] == 1 else g.sum(1)).reshape(B, *param.shape)
    if kind == "embed":
        idx, rows = _cat([p[0] for p in parts], 1), _cat([p[1] for p in parts], 1)
        V = param.shape[0]
        flat = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * V).reshape(-1)
        out = rows.new_zeros(B * V, rows.shape[-1])
        return out.index_add_(0, flat, rows.reshape(-1, rows.shape[-1])).reshape(B, *param.shape)
    if kind == "direct":
        out = parts[0][0]
        for p in parts[1:]:
            out = out + p[0]
        return out.reshape(B, *param.shape)
    raise AssertionError(kind)  # pragma: no cover


def overridable(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a composite function so that a per-sample rule can replace the whole call.

    When a tensor argument (or one inside a list/tuple argument) has a
    ``__torch_function__`` override, such as a parameter tracked by the engine, the call
    goes through ``torch.overrides.handle_torch_function``; otherwise it costs one cheap
    check. Pair it with :func:`register_rule`.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        relevant = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if has_torch_function(relevant):
            return handle_torch_function(wrapper, relevant, *args, **kwargs)
        return func(*args, **kwargs)

    return wrapper


def register_rule(func: Any, rule: Callable[..., Any]) -> None:
    """Make ``rule(engine, args, kwargs)`` handle calls of ``func`` that receive a tracked
    parameter; ``func`` must be :func:`overridable` (or call ``handle_torch_function``
    itself). Higher layers register rules for their composite ops this way, e.g.
    ``register_rule(_lstm_direction, lstm_direction_rule)`` in ``fp.nn``."""
    RULES[func] = rule
