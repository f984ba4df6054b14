"""Ghost clipping: per-example gradient norms and a clipped gradient sum, never forming
per-example gradients (``method="ghost"`` of ``fp.clipped_grad`` / ``fp.per_sample_grad_norms``).

# NOTE [ghost engine]
The ghost method runs the hooks engine (see NOTE [how the engine works] in ``_engine``):
one batched forward in which every call using a parameter is recorded, one backward of
the per-example losses to the recorded outputs only (no weight gradient is computed
there). The rules leave their parts; instead of merging them into ``(B, *shape)``
gradients, ``_ghost_math`` turns them into per-example squared norms (Gram matrices or
small per-layer gradients, whichever is cheaper) and then into the clipped sum.

Only calls whose parts have a ghost form are allowed: ``F.linear``, ``F.conv1d``/
``F.conv2d`` (a ghost rule here that keeps the input and output gradient instead of the
hooks rule's per-example weight gradient), ``F.embedding``, ``F.layer_norm``,
``F.group_norm``, ``F.batch_norm`` (eval), ``F.instance_norm``, ``F.rms_norm``,
``F.multi_head_attention_forward`` (its rule re-computes attention with ``F.linear``
calls and per-example copies of the few broadcast biases, NOTE [attention through the
linear rule]) and the fused recurrent directions of ``fp.nn`` (LSTM, GRU; ``fp.nn.RNN``
is plain ``F.linear`` calls). Conv3d and the transposed convolutions have their
per-example gradients formed, a chunk of examples at a time, as in hooks (see ``_NATIVE``).
Any other rule the hooks method has (embedding bags: their hooks rules form ``B x params``
gradients) raises :class:`HooksOnly` here, so the caller can say that ``method="hooks"``
handles that call (or fall back to it).

# NOTE [clipping without a second backward]
Opacus's ghost clipping runs a second backward of ``sum_b c_b loss_b`` with the clip
factors ``c`` detached. Its result at every weight is an ordinary batch weight gradient
whose output gradient is ``c_b g_b`` (row ``b`` of a recorded output's gradient belongs
to example ``b`` alone, and scales with its loss). The parts already hold every ``g`` and
the inputs, so :func:`_ghost_math.weighted_sum` computes that weight gradient directly
(one matmul per linear weight, ``convolution_backward`` per conv, ``index_add_`` per
embedding): the same numbers without backpropagating through the network again (the
"Book-keeping" trick, Bu et al., 2023).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from functorch_pipeline import tree as _tree
from functorch_pipeline.transforms._grad_sample import _ghost_math
from functorch_pipeline.transforms._grad_sample import _recurrent
from functorch_pipeline.transforms._grad_sample import _rules_broadcast
from functorch_pipeline.transforms._grad_sample import _rules_cells
from functorch_pipeline.transforms._grad_sample import _rules_elementwise
from functorch_pipeline.transforms._grad_sample import _rules_index
from functorch_pipeline.transforms._grad_sample import _rules_matmul
from functorch_pipeline.transforms._grad_sample._api import FAKE_REASON
from functorch_pipeline.transforms._grad_sample._api import _batch_size
from functorch_pipeline.transforms._grad_sample._api import _Names
from functorch_pipeline.transforms._grad_sample._api import fake_tensors
from functorch_pipeline.transforms._grad_sample._api import forward_losses
from functorch_pipeline.transforms._grad_sample._api import join_chunks
from functorch_pipeline.transforms._grad_sample._api import no_inference_tensors
from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._engine import _describe
from functorch_pipeline.transforms._grad_sample._engine import autocast_on
from functorch_pipeline.transforms._grad_sample._padding import run_unambiguous
from functorch_pipeline.transforms._grad_sample._rules import RULES
from functorch_pipeline.transforms._grad_sample._rules import VERSION
from functorch_pipeline.transforms._grad_sample._rules import _pair
from functorch_pipeline.transforms._grad_sample._rules import conv_pads
from functorch_pipeline.transforms._grad_sample._rules import merge
from functorch_pipeline.transforms._grad_sample._state import chunks_from_one_state

__all__ = ["HooksOnly", "clip_factors", "ghost_norms_and_sum"]


class HooksOnly(Unsupported):
    """A call the hooks method has a rule for, but ghost clipping has not."""


def clip_factors(norms: torch.Tensor, max_norm: float | torch.Tensor) -> torch.Tensor:
    """``c_b = 1 / max(1, norm_b / max_norm)``: optax's (and
    ``optim.per_example_global_norm_clip``'s) convention, no epsilon."""
    return 1.0 / torch.clamp(norms / max_norm, min=1.0)


# -- ghost rules ----------------------------------------------------------------------------


def _get(args: Any, kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _ghost_conv(nd: int) -> Callable[..., Any]:
    op = {1: torch.conv1d, 2: torch.conv2d}[nd]
    name = f"F.conv{nd}d"

    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        x, w, b = (_get(args, kwargs, i, n) for i, n in enumerate(("input", "weight", "bias")))
        stride, padding = _get(args, kwargs, 3, "stride", 1), _get(args, kwargs, 4, "padding", 0)
        dilation, groups = _get(args, kwargs, 5, "dilation", 1), _get(args, kwargs, 6, "groups", 1)
        ws, bs = engine.slot(w), engine.slot(b)
        wp, bp = engine.base(w), engine.base(b)
        if engine.input_axis(op, args, kwargs, lambda: engine.check_input(
                x, name, [s for s in (ws, bs) if s is not None], min_dim=nd + 2,
                features=nd + 1, blocks=True)) is None:  # a constant: NOTE [constants or batch data]
            return engine.derive_op(op, args, kwargs)
        grads_flow = x.requires_grad or wp.requires_grad or (bp is not None and bp.requires_grad)
        xin = x if grads_flow else x.detach().requires_grad_()
        out = op(xin, wp, bp, stride, padding, dilation, groups)
        kernel, dil = tuple(wp.shape[2:]), _pair(dilation, nd)
        geometry = (kernel, _pair(stride, nd), conv_pads(padding, kernel, dil), dil,
                    groups)
        engine.record(out, _finish_conv, x, ws, bs, geometry)
        return out

    return rule


def _finish_conv(engine: Engine, g: torch.Tensor, x: torch.Tensor, ws: int | None,
                 bs: int | None, geometry: tuple[Any, ...]) -> None:
    if bs is not None:
        engine.add("direct", bs, g.sum(tuple(range(2, g.dim()))))
    if ws is not None and (ws in engine.derived or x.shape[0] != engine.batch_size):
        # A weight computed from parameters (weight standardisation, weight norm): its
        # per-example gradients are formed, to be pulled back (NOTE [derived parameters]).
        # Rows merged per example (NOTE [examples merged into axis 0] in _engine): formed
        # per row and summed per example, a chunk of examples at a time.
        w = engine.bases[ws]
        engine.add("direct", ws, engine.summed_rows(
            lambda xs, gs: _ghost_math.conv_materialise(xs, gs, geometry, w), x, g, w))
    elif ws is not None:
        engine.add("conv", ws, x, g, geometry)


# Calls whose hooks rules leave ghost-ready parts: outer/sum/embed, or "direct" parts of
# a few numbers per example (normalisation layers' affine parameters), or of a parameter
# whose per-example gradients no cheaper form gives here (einsum, bilinear: NOTE [einsum];
# a token written into the batch: NOTE [a parameter written into the batch]; conv3d and
# the transposed convolutions, formed a chunk of examples at a time as in hooks, so that
# a video model's other layers keep ghost's saving).
_NATIVE = (F.linear, F.embedding, F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm,
           F.rms_norm, F.multi_head_attention_forward, *_rules_broadcast.ADD,
           *_rules_broadcast.MUL, *_rules_broadcast.SUB, *_rules_broadcast.DIV,
           torch.Tensor.expand, torch.Tensor.repeat, torch.prelu, *_rules_matmul.MATMUL, *_rules_matmul.FUSED,
           *_rules_elementwise.ELEMENTWISE, _rules_elementwise.SDPA, torch.einsum, torch.tensordot,
           torch.bilinear, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
           torch.conv_transpose3d, *_rules_index.INDEX,
           *_rules_cells.CELLS)
_CONV = {torch.conv1d: _ghost_conv(1), torch.conv2d: _ghost_conv(2)}


def _native_rules() -> set[Any]:
    """Rules whose parts are all ghost-ready (looked up now: higher layers register the
    recurrent ones at import)."""
    names = ("lstm_direction_rule", "gru_direction_rule", "rnn_direction_rule")
    return {getattr(_recurrent, n) for n in names if hasattr(_recurrent, n)}


def _refuse(func: Any, hooks_rule: Callable[..., Any]) -> Callable[..., Any]:
    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> Any:
        # The hooks rule runs first: when it cannot handle the call either (a built-in
        # nn.LSTM kernel), its own error is the right one. Anything it recorded stays in
        # this engine, which is discarded with the error.
        out = hooks_rule(engine, args, kwargs)
        if not torch.is_grad_enabled():  # no gradient flows here: nothing to clip
            return out
        slots = engine.slots(args, kwargs)
        raise HooksOnly(
            f"{engine.names(args, kwargs)} {'is' if len(slots) == 1 else 'are'} used by "
            f"`{_describe(func)}`, which has no ghost-clipping rule; method='hooks' handles it "
            "(method='auto' falls back to it)")

    return rule


_TABLE: list[Any] = [None, None]  # (RULES version, the ghost table built from it)


def ghost_rules() -> dict[Any, Callable[..., Any]]:
    """The engine's rule table for the ghost method (see NOTE [ghost engine]), built once
    per version of ``RULES`` (rebuilding it took ~90 us a call)."""
    if _TABLE[0] != VERSION[0]:
        _TABLE[:] = [VERSION[0], _build_ghost_rules()]
    return _TABLE[1]


def _build_ghost_rules() -> dict[Any, Callable[..., Any]]:
    native = _native_rules()
    rules: dict[Any, Callable[..., Any]] = {}
    for func, rule in RULES.items():
        if func in _CONV:
            rules[func] = _CONV[func]
        elif func in _NATIVE or rule in native:
            rules[func] = rule
        else:
            rules[func] = _refuse(func, rule)
    return rules


# -- the driver -----------------------------------------------------------------------------


def _run_once(loss_fn: Callable[..., Any], args: list[Any], nums: Sequence[int],
              leaves: list[list[torch.Tensor]], defs: list[Any], names: _Names, batch_size: int,
              has_aux: bool, max_norm: Any, fn: str, batched: Sequence[int] = (),
              real: int | None = None, evidence: Any = None
              ) -> tuple[Any, torch.Tensor, list[torch.Tensor] | None]:
    """One ghost pass over a batch of ``batch_size`` rows, of which the first ``real`` (all
    by default) are examples and the rest padding, whose clip factors are 0 (NOTE
    [padding an ambiguous batch] in ``_padding``)."""
    flat = [leaf for group in leaves for leaf in group]
    engine = Engine(flat, names, batch_size, ghost_rules(), fn, real=real, evidence=evidence)
    try:
        losses, aux = forward_losses(engine, loss_fn, args, nums, leaves, defs, batch_size,
                                     has_aux, fn, needs="ghost clipping", batched=batched)
        engine.backward(losses)
        engine.resolve_derived(merge)
    finally:
        engine.close()  # NOTE [tensors kept past their call] in _engine
    by_slot: dict[int, dict[str, list[tuple[Any, ...]]]] = {}
    for (kind, slot), payloads in engine.parts.items():
        by_slot.setdefault(slot, {})[kind] = payloads
    engine.parts.clear()
    acc = torch.float64 if any(p.dtype == torch.float64 for p in flat) else torch.float32
    device = flat[0].device if flat else losses.device
    with torch.no_grad():
        budget = _ghost_math.KEEP_BYTES if max_norm is not None else 0
        kept: dict[int, torch.Tensor] = {}
        squares = []
        for slot, parts in by_slot.items():
            p = flat[slot]
            size = batch_size * p.numel() * p.element_size()
            s, k = _ghost_math.squared_norms(parts, p, keep=size <= budget)
            squares.append(s if s.dtype == acc else s.to(acc))  # float64 for any float64 leaf
            if k is not None:
                kept[slot] = k
                budget -= size
        # One (slots, B) sum, not a chain of in-place adds.
        norms = (torch.stack(squares).sum(0).sqrt_() if squares
                 else torch.zeros(batch_size, dtype=acc, device=device))
        grads = None
        if max_norm is not None:
            c = clip_factors(norms, max_norm)
            if real is not None and real < batch_size:
                c[real:] = 0
            cast = {c.dtype: c}  # the factors in each parameter dtype, cast once
            grads = []
            device = c.device.type  # NOTE [ghost sums under autocast] in _ghost_math
            off = torch.autocast(device_type=device, enabled=False) \
                if autocast_on(device) else contextlib.nullcontext()
            with off:
                for slot, p in enumerate(flat):
                    parts = by_slot.get(slot)
                    if parts is None:
                        grads.append(torch.zeros_like(p))
                        continue
                    if p.dtype not in cast:
                        cast[p.dtype] = c.to(p.dtype)
                    g = _ghost_math.weighted_sum(parts, p, cast[p.dtype], kept.get(slot))
                    # NOTE [autocast] (in _engine): each parameter's dtype, as autograd gives
                    grads.append(g if g.dtype == p.dtype else g.to(p.dtype))
    aux = _tree.map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux)
    value = (losses.detach(), aux) if has_aux else losses.detach()
    return value, norms, grads


def ghost_norms_and_sum(
    loss_fn: Callable[..., Any], args: Sequence[Any], nums: Sequence[int], is_tuple: bool,
    batched: Sequence[int], has_aux: bool, chunk_size: int | None, max_norm: Any, fn: str,
) -> tuple[Any, torch.Tensor, Any]:
    """``(values, norms, clipped_sum)`` of ``loss_fn`` by ghost clipping.

    ``loss_fn(*args)`` returns per-example losses ``(B,)`` (or ``(losses, aux)``); ``nums``
    are the differentiated positions, ``batched`` those carrying the batch on axis 0.
    ``norms`` are the ``(B,)`` per-example gradient norms; ``clipped_sum`` (``None`` when
    ``max_norm`` is ``None``) is ``sum_b c_b grad_b`` shaped like the differentiated
    argument(s), with ``c`` from :func:`clip_factors`. Raises :class:`Unsupported`
    (:class:`HooksOnly` when the hooks method would do) for calls it cannot handle.
    """
    args = no_inference_tensors(args)  # NOTE [inference tensors] in _api
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise Unsupported("ghost clipping cannot run inside a torch.func transform")
    if fake_tensors(args):
        raise Unsupported(FAKE_REASON)
    from functorch_pipeline.transforms._autodiff import _check_diff_leaves

    leaves, defs = [], []
    for i in nums:
        group, treedef = _tree.flatten(args[i])
        if not all(isinstance(leaf, torch.Tensor) and leaf.is_floating_point() for leaf in group):
            _check_diff_leaves(args[i], i, fn)
            raise Unsupported("complex parameters have no ghost-clipping rules")
        leaves.append(group)
        defs.append(treedef)
    names = _Names(args, nums)
    batch_size = _batch_size(args, batched, fn)
    step = batch_size if chunk_size is None else max(1, min(chunk_size, batch_size))
    total: list[torch.Tensor] | None = None  # the clipped sum, added chunk by chunk

    def work(start: int) -> tuple[Any, torch.Tensor]:
        nonlocal total
        n = min(step, batch_size - start)
        if step == batch_size:
            chunk = list(args)
        else:
            def cut(x: Any) -> Any:
                return x[start:start + step] if isinstance(x, torch.Tensor) else x
            chunk = [_tree.map(cut, a) if i in batched else a for i, a in enumerate(args)]

        def run(padded: list[Any], size: int, evidence: Any) -> tuple[Any, torch.Tensor, Any]:
            return _run_once(loss_fn, padded, nums, leaves, defs, names, size, has_aux,
                             max_norm, fn, batched, real=n, evidence=evidence)

        # NOTE [padding an ambiguous batch] (in _padding): rows past n are padding.
        (v, nrm, grads), extra = run_unambiguous(run, loss_fn, chunk, batched, n, has_aux, fn)
        if grads is not None:
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        return (v[:n], nrm[:n]) if extra else (v, nrm)

    starts = range(0, batch_size, step)
    if step == batch_size:
        done = [work(0)]
    else:  # NOTE [runs that change module state] in _state: each chunk from the call's state
        done = chunks_from_one_state([functools.partial(work, start) for start in starts],
                                     lambda: loss_fn(*args), Unsupported, fn)
    values = [v for v, _ in done]
    norms = [nrm for _, nrm in done]
    sizes = [min(step, batch_size - start) for start in range(0, batch_size, step)]
    value = join_chunks(values, sizes, has_aux, fn)  # NOTE [aux over chunks] in _api
    norm = norms[0] if len(norms) == 1 else torch.cat(norms)
    if total is None:
        return value, norm, None
    it = iter(total)
    trees = tuple(_tree.unflatten(d, [next(it) for _ in g]) for d, g in zip(defs, leaves, strict=True))
    return value, norm, (trees if is_tuple else trees[0])
