"""The per-sample-gradient engine: one batched forward, one backward, one einsum per weight.

# NOTE [how the engine works]
Each differentiated parameter is handed to ``loss_fn`` as a ``_Tracked`` tensor: a
subclass that shares the parameter's storage and whose ``__torch_function__`` sees every
call that receives it (``F.linear(x, w, b)``, ``w.t()``, ``torch._VF.lstm(..., [w, ...])``)
and no other call, so the rest of the model runs at full eager speed. A call with a rule
(``_rules.RULES``) runs the op on the *detached* parameter, so autograd never builds
the batch weight gradient, saves what the rule needs (the op's input) and remembers the
output's gradient edge. Any other use of a tracked parameter raises ``Unsupported``,
naming the parameter and the call: the caller falls back to ``vmap`` or reports it. No
use of a parameter is ever silently skipped.

After the forward, one ``torch.autograd.grad`` of the per-example losses (with ones)
returns the gradient at every recorded output. Examples do not interact, so row ``b`` of
that gradient is example ``b``'s own; each rule turns ``(input, output grad)`` into
per-example weight gradients with one batched matmul. Uses of the same parameter (a
recurrent ``W_hh`` at every time step, tied weights) are concatenated first and
contracted once: one ``(B, out, n) @ (B, n, in)`` instead of ``n`` outer products.

# NOTE [gradient edges, not tensors]
The recorded output may be modified in place later (``relu_``), which re-points its
``grad_fn``. The engine keeps the output's ``GradientEdge`` taken at creation time, so
the gradient it receives is the one with respect to the op's own result. An output that
is a view of the whole of a fresh tensor (``F.linear`` on a ``(B, T, F)`` input returns its
matmul's result viewed back to three axes; ``F.embedding`` on 2-d ids) is different: an
in-place op on a view rebases the view's base (``CopySlices``) and the view's own node
leaves the graph, so its edge would receive no gradient and the layer's per-example
gradients would silently be zero. They were, for ``nn.ReLU(inplace=True)`` or ``h += x``
after a Linear on sequences, until a survey found it. So for such a view the engine
keeps the base's edge and lays its gradient out as the view (a reshape or a permutation
of the whole base, such as an einsum's permuted output); a view of part of its base is
watched, and changed in place it is refused. Saved inputs
are checked against their version counter for the same reason. When neither the input
nor any untracked argument requires grad (the first layer), the input is replaced by a
detached copy that requires grad so the output has a ``grad_fn``; autograd never
computes that copy's gradient because nothing asks for it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.graph import GradientEdge
from torch.autograd.graph import get_gradient_edge

from functorch_pipeline import tree as _tree
from functorch_pipeline.transforms._grad_sample._row_order import ROWWISE_UNARY
from functorch_pipeline.transforms._grad_sample._row_order import VALUES_READ
from functorch_pipeline.transforms._grad_sample._row_order import BatchStatistics
from functorch_pipeline.transforms._grad_sample._row_order import Mixed
from functorch_pipeline.transforms._grad_sample._row_order import Weighted
from functorch_pipeline.transforms._grad_sample._row_order import batch_norm_error
from functorch_pipeline.transforms._grad_sample._row_order import batch_statistics
from functorch_pipeline.transforms._grad_sample._row_order import reordered_by

__all__ = ["Ambiguous", "Engine", "PlainBatch", "StaleTracked", "Unproven", "Unsupported", "rng_states"]


# NOTE [rows kept through elementwise ops]: autograd nodes of elementwise ops (row r of the
# output reads row r of the one input with a graph), and how many the walk passes.
_ELEMENTWISE_NODES = ROWWISE_UNARY | frozenset(
    f"{name}Backward0" for name in ("Mul", "Div", "Add", "Sub", "Where"))
_KEEP_WALK = 16
_PRINT_NODES = 8  # autograd nodes named per rule input in a run's record of its walks


_next_node_number: Callable[[], int] = getattr(torch._C._autograd, "_get_sequence_nr", lambda: 0)


def _node_number(node: Any) -> int:
    """The number autograd gave ``node`` when it made it (its sequence number: nodes made
    on a thread are numbered in order), or 0 where torch does not say."""
    number = getattr(node, "_sequence_nr", None)
    return number() if number is not None else 0


def _in_examples_order(x: torch.Tensor, axis: int, rows: torch.Tensor | None) -> torch.Tensor:
    """``rows`` (a caller's own layout of ``x``'s rows), or ``x`` with ``axis`` first, detached."""
    return (x.movedim(axis, 0) if rows is None else rows).detach()


class Unsupported(Exception):  # noqa: N818 (a signal to fall back, not a user error)
    """A differentiated parameter is used in a way the engine has no exact rule for."""


def autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type``; False for 'meta' (shape
    inference), which has no autocast: asking raised "unknown device type for autocast".
    (Not ``torch.amp.is_autocast_available``: dynamo in torch 2.11 cannot trace it.)"""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def inner_differentiation(how: str) -> Unsupported:
    """The refusal for a ``loss_fn`` that differentiates a tracked parameter itself.

    # NOTE [differentiating inside loss_fn]
    An inner step (``q = p - lr * fp.grad(reg)(p)``, MAML's adapted weights, an implicit
    regulariser) makes ``loss_fn`` depend on ``p`` through a gradient. The engine sees that
    gradient come back as a plain tensor and would treat it as a constant: first-order
    results, silently (error 0.62 against a loop with ``create_graph=True``). So fp's own
    transforms (``fp.grad``, ``fp.value_and_grad``, ``fp.jacrev``, ...) and
    ``torch.autograd.grad``/``backward`` refuse a tracked parameter, and ``auto`` takes
    ``vmap``, which differentiates through them. ``torch.func`` transforms read a tensor
    below ``__torch_function__``, where the engine cannot see them: an inner
    ``torch.func.grad`` of the parameters needs ``method="vmap"`` (documented).
    """
    return Unsupported(f"loss_fn differentiates a parameter itself ({how}, an inner step); "
                       "the fast methods would take that inner gradient as a constant, and "
                       "only method='vmap' differentiates through it")


class StaleTracked(RuntimeError):
    """A tensor computed from a tracked parameter was kept past its call and used again
    (NOTE [tensors kept past their call])."""


class Ambiguous(Unsupported):
    """An op's input has the batch size on more than one axis that could hold the examples
    (NOTE [which axis is the batch]); the drivers retry with a padded batch (NOTE
    [padding an ambiguous batch] in ``_padding``)."""


class PlainBatch(Unsupported):
    """``loss_fn`` raised a ``RuntimeError`` on a batch that requires grad (NOTE [the
    batch requires grad] in ``_api``: an in-place op on it, ``numpy()`` of it): the call
    runs again with the batch handed plain."""


class Unproven(Ambiguous):
    """A tensor made inside ``loss_fn`` without a graph has the batch size on axis 0 and
    may be a copy of the batch or a constant (NOTE [a table the size of the batch]); a
    padded run answers, and later calls reuse the answer unpadded."""


def rng_states() -> list[torch.Tensor]:
    """PyTorch's global generators' states (CPU, and CUDA's current device once
    initialised), to tell whether a run drew random numbers."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    return states


def _describe(func: Any) -> str:
    """A readable name for a torch function: ``F.linear``, ``torch.lstm``, ``Tensor.t``."""
    owner = getattr(func, "__self__", None)
    if type(owner).__name__ == "getset_descriptor":  # Tensor.<attr>.__get__
        return f"Tensor.{owner.__name__}"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    head, _, tail = name.partition(".")
    if head in ("TensorBase", "Tensor") and tail:
        return f"Tensor.{tail}"
    if head == "_VariableFunctionsClass" and tail:
        return f"torch.{tail}"
    if module in ("torch.nn.functional", "torch._C._nn"):
        return f"F.{name}"
    return f"torch.{name}" if module in ("torch", "") else f"{module}.{name}"


MERGED_BYTES = 64 << 20  # per-row parts formed at once for merged rows (Engine.summed_rows)

_T = torch.Tensor
# Calls that read metadata or produce an alias without a gradient path: allowed, and
# answered from the plain parameter (see NOTE [how the engine works]).
_PASSTHROUGH: set[Any] = {
    _T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.ndim.__get__,
    _T.layout.__get__, _T.requires_grad.__get__, _T.is_cuda.__get__, _T.is_leaf.__get__,
    _T.size, _T.dim, _T.numel, _T.nelement, _T.element_size, _T.stride,
    _T.is_floating_point, _T.is_complex, _T.is_contiguous, _T.data_ptr, _T.__len__,
    _T.__repr__, _T.__format__, _T.detach, _T.data.__get__, _T.get_device,
}


_REQUIRES_GRAD = _T.requires_grad.__get__
_AUTOGRAD = {torch.autograd.grad, torch.autograd.backward, _T.backward}
_HOOKS = {_T.register_hook, _T.register_post_accumulate_grad_hook}
_FORWARDS: dict[Any, str | None] = {}  # forward code objects -> Function class name, or None


def _function_forward(code: Any) -> str | None:
    """The name of the ``torch.autograd.Function`` subclass whose ``forward`` is ``code``,
    or None; the subclasses are listed again when a ``forward`` is met for the first time."""
    if code not in _FORWARDS:
        todo = list(torch.autograd.Function.__subclasses__())
        while todo:
            cls = todo.pop()
            todo.extend(cls.__subclasses__())
            fwd = getattr(cls.__dict__.get("forward"), "__func__", cls.__dict__.get("forward"))
            if hasattr(fwd, "__code__"):
                _FORWARDS[fwd.__code__] = cls.__qualname__
        _FORWARDS.setdefault(code, None)
    return _FORWARDS[code]


def _in_custom_function() -> str | None:
    """The class of the ``torch.autograd.Function`` whose ``forward`` is running (up to 40
    frames up the call stack), or None.

    # NOTE [parameters in a custom autograd.Function]
    ``Function.apply`` hands its tensor arguments to ``forward`` under ``no_grad`` and
    attaches its own backward to the outputs. A parameter among them (a straight-through
    quantiser of the weights, a fused bias and activation, ``fp.checkpoint`` around the
    model, ``fp.custom_vjp``/``custom_jvp`` of the parameters) reached the engine only as
    an op under ``no_grad``, taken for a stop-gradient: that parameter's per-example
    gradient came back 0, silently (reference up to 1.6). No rule can read a backward the
    engine does not see, so such a use is refused (``auto``: vmap, which runs the
    Function's own backward, or refuses it with torch's message). ``apply`` leaves no
    Python frame, so the ``forward`` frame is recognised: by a ``ctx`` argument, or as the
    ``forward`` of a ``Function`` subclass (``setup_context`` style). The stack is read
    only for parameter ops under ``no_grad``, which are rare in a forward. ``detach`` and
    ``.data`` are among them: a forward that detaches its inputs first
    (``fp.implicit.custom_root``, a call into an external solver) otherwise unwrapped the
    parameter unseen, and its per-example gradients were 0 (15.2 off the loop).
    """
    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "forward":
            ctx = frame.f_locals.get("ctx")
            if isinstance(ctx, torch.autograd.function.FunctionCtx):
                cls = getattr(type(ctx), "_forward_cls", None)
                if getattr(cls, "__module__", None) == "torch.utils.checkpoint":
                    return None  # refused by name at the backward (activation checkpointing)
                return type(ctx).__name__.removesuffix("Backward")
            name = _function_forward(code)
            if name is not None:
                return name
        frame = frame.f_back
    return None


_DETACHING = {_T.detach, _T.data.__get__}


def _into_function(engine: Engine, args: Any, kwargs: Any, fn_class: str, func: Any) -> Unsupported:
    """The refusal of a parameter handed to a custom ``autograd.Function`` (NOTE
    [parameters in a custom autograd.Function])."""
    return Unsupported(
        f"{engine.names(args, kwargs)} {'goes' if len(engine.slots(args, kwargs)) == 1 else 'go'} "
        f"into the custom torch.autograd.Function {fn_class} (its forward calls "
        f"`{_describe(func)}`), whose backward the fast methods cannot read; "
        "method='vmap' runs it")


class _Tracked(torch.Tensor):
    """A differentiated parameter as ``loss_fn`` sees it; see NOTE [how the engine works]."""

    _fp_slot: int
    _fp_engine: Engine

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        engine = _find_engine(args, kwargs)
        if func in _PASSTHROUGH:
            if func == _REQUIRES_GRAD:  # it is differentiated: what the loop and vmap answer
                return torch.is_grad_enabled() or bool(engine.unwrap(args)[0].requires_grad)
            if func in _DETACHING and not torch.is_grad_enabled():
                # a Function's forward that detaches its inputs first (fp.implicit.custom_root,
                # an external solver): NOTE [parameters in a custom autograd.Function]
                fn_class = _in_custom_function()
                if fn_class is not None:
                    raise _into_function(engine, args, kwargs, fn_class, func)
            return func(*engine.unwrap(args), **engine.unwrap(kwargs))
        if engine.renormed and not _renorming_lookup(func, args, kwargs) and (
                engine.renormed.intersection(engine.slots(args, kwargs))):
            raise Unsupported(  # NOTE [max_norm renormalises the table] in _rules
                f"{engine.names(args, kwargs)} {'is' if len(engine.slots(args, kwargs)) == 1 else 'are'} "
                f"read by `{_describe(func)}` after F.embedding/F.embedding_bag with max_norm "
                "rescaled, in place, the rows every example of the batch looked up: each "
                "example would read rows that other examples rescaled, so its gradient would "
                "depend on the batch (no method gives per-example gradients of that: vmap "
                "cannot batch max_norm). Look up without max_norm, or renormalise the table "
                "outside loss_fn")
        if not torch.is_grad_enabled():  # no gradient flows here, unless a Function's does
            fn_class = _in_custom_function()  # NOTE [parameters in a custom autograd.Function]
            if fn_class is not None:
                raise _into_function(engine, args, kwargs, fn_class, func)
            return func(*engine.unwrap(args), **engine.unwrap(kwargs))
        if engine.closed:
            engine.stale(func, args, kwargs)
        if torch._C._functorch.peek_interpreter_stack() is not None:  # NOTE [a backward inside loss_fn]
            raise Unsupported(
                f"{engine.names(args, kwargs)} {'is' if len(engine.slots(args, kwargs)) == 1 else 'are'} "
                f"used by `{_describe(func)}` inside a torch.func transform that loss_fn runs "
                "(torch.func.grad, vmap, jacrev, ...), which the fast methods cannot "
                "differentiate through; method='vmap' runs it")
        if func in _AUTOGRAD:  # NOTE [differentiating inside loss_fn]
            raise inner_differentiation(_describe(func))
        if func in _HOOKS:
            raise Unsupported(
                f"loss_fn registers an autograd hook on {engine.names(args, kwargs)} "
                f"(`{_describe(func)}`), which the per-example gradients of the fast methods "
                "would not pass through; method='vmap' applies it")
        rule = engine.rules.get(func)
        # A rule that can make the examples' axis from parameters alone (an expand over the
        # batch) decides first; any other op of parameters alone makes a derived tensor.
        if rule is not None and getattr(rule, "takes_parameters_only", False):
            return rule(engine, args, kwargs)
        if args and isinstance(args[0], _Tracked) and (
                kwargs.get("inplace") is True or _in_place_on_first(func, kwargs)):
            return engine.derive_in_place(func, args, kwargs)
        if engine.parameters_only(func, args, kwargs):  # NOTE [derived parameters]
            return engine.derive_op(func, args, kwargs)
        if rule is not None:  # rules are for out-of-place ops: checked before in-place forms
            return rule(engine, args, kwargs)
        if args and isinstance(args[0], torch.Tensor) and _in_place_on_first(func, kwargs):
            return engine.in_place_on_plain(func, args, kwargs)

        def no_rule() -> int:
            raise Unsupported(
                f"{engine.names(args, kwargs)} {'is' if len(engine.slots(args, kwargs)) == 1 else 'are'} "
                f"used by `{_describe(func)}`, which has no per-sample gradient rule (rules: "
                f"{', '.join(sorted({_describe(f) for f in engine.rules}))})")

        # Parameters with constants (a buffer of indices, a mask): NOTE [derived parameters].
        engine.with_constants(func, args, kwargs, no_rule)
        return engine.derive_op(func, args, kwargs)


def _renorming_lookup(func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether ``func`` is an ``F.embedding``/``F.embedding_bag`` lookup with ``max_norm``
    (its own renormalisation makes it read what a loop's lookup reads)."""
    if func is not torch.nn.functional.embedding and func is not torch.nn.functional.embedding_bag:
        return False
    return (args[3] if len(args) > 3 else kwargs.get("max_norm")) is not None


def _find_engine(args: Any, kwargs: dict[str, Any]) -> Engine:
    for a in (*args, *kwargs.values()):
        if isinstance(a, _Tracked):
            return a._fp_engine
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, _Tracked):
                    return b._fp_engine
    raise AssertionError("__torch_function__ called without a tracked tensor")  # pragma: no cover


def examples_first(t: torch.Tensor, m: int) -> torch.Tensor:
    """Rows ``k * B + b`` of ``t`` (``m`` blocks of ``B`` rows) as rows ``b * m + k``.

    # NOTE [examples last]
    Augmentations concatenated (``torch.cat([aug(x) for _ in range(K)])``) put example
    ``b``'s ``k``-th augmentation at row ``k * B + b``: ``K`` blocks of the batch, not the
    ``K`` consecutive rows per example of NOTE [examples merged into axis 0], which
    refused them, and ``auto`` fell back to ``vmap``. In a padded run each block's
    padding rows repeat that block's first row, so the rows reordered by this function
    pass that NOTE's test; such an input is then read with its rows reordered at the
    finisher (:func:`_from_examples_last`: its input and output gradient, for the
    position-wise rules that pass ``check_input(blocks=True)``: F.linear, conv1d/2d and the
    layer, group and RMS norms, which save no other tensor with those rows).
    Only a padded run shows this layout, so such a model runs padded on every call (and
    ``has_aux`` falls back). Both layout proofs compare values, and the padding examples
    are copies of the first: rows that permute the examples among themselves in a way
    that swaps the first example's rows with the padding's (all rows reversed,
    ``h.flip(0)``, then reversed back) pass them, and are read in the wrong order (error
    1.1 on a toy model, also before this layout was taken). The proofs are built for the
    layouts models write: consecutive rows per example, blocks of the batch, tables.

    Args:
      t: a tensor whose axis 0 has ``m * B`` rows.
      m: the number of blocks.

    Returns:
      A contiguous tensor of ``t``'s shape, its rows reordered.

    Example:
      >>> examples_first(torch.arange(6), 2)
      tensor([0, 3, 1, 4, 2, 5])
    """
    return t.reshape(m, t.shape[0] // m, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _from_examples_last(finish: Callable[..., None], m: int, engine: Any, g: torch.Tensor,
                        x: Any, *saved: Any) -> None:
    """``finish`` on the output gradient and input with their rows reordered to ``m``
    consecutive rows per example (NOTE [examples last])."""
    finish(engine, examples_first(g, m), examples_first(x, m), *saved)


def _like(saved: tuple[Any, ...], g: torch.Tensor) -> tuple[Any, ...]:
    """A use's saved floating tensors in its output gradient's dtype.

    # NOTE [autocast]
    Under ``torch.autocast`` an op runs in the autocast dtype while the input a rule saved
    may be float32 (the data, a float32 layer's output), so the rules would multiply
    tensors of two dtypes, which matmul and the conv kernels refuse. Autograd forms the
    weight gradient in the op's own dtype, the dtype of its output gradient, so the saved
    inputs are cast to that. The gradients go back to each parameter's dtype at the end
    (``hooks_value_and_grad``, the ghost driver). Without autocast nothing is cast.
    """
    if all(not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == g.dtype
           for t in saved):
        return saved
    return tuple(t.to(g.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype != g.dtype else t for t in saved)


def _only_tracked(values: Any) -> bool:
    """Whether every tensor in ``values`` (nested lists, tuples and dicts) is tracked."""
    if isinstance(values, _Tracked):
        return True
    if isinstance(values, torch.Tensor):
        return False
    if isinstance(values, (list, tuple)):
        return all(_only_tracked(v) for v in values)
    if isinstance(values, dict):
        return all(_only_tracked(v) for v in values.values())
    return True


def _plain_tensors(values: Any) -> list[torch.Tensor]:
    """The untracked tensors in ``values`` (nested lists, tuples and dicts)."""
    if isinstance(values, _Tracked):
        return []
    if isinstance(values, torch.Tensor):
        return [values]
    if isinstance(values, (list, tuple)):
        return [t for v in values for t in _plain_tensors(v)]
    if isinstance(values, dict):
        return [t for v in values.values() for t in _plain_tensors(v)]
    return []


# Augmented assignments (``t += x``): in place on their first argument. Not every
# ``__i...__`` is one (``__int__``, ``__index__``, ``__iter__``, ``__invert__``).
_IN_PLACE_DUNDER = frozenset(f"__i{op}__" for op in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
    "lshift", "rshift"))


def _out_of_place(func: Any, kwargs: dict[str, Any]) -> bool:
    """Whether ``func`` leaves its arguments alone (no in-place method, no ``out=``, no
    ``inplace=True``: ``F.relu(h, inplace=True)`` on a derived ``h`` would change a tensor
    whose slot and graph the engine keeps)."""
    name = getattr(func, "__name__", "")
    return not (name.endswith("_") and not name.startswith("__") or name in _IN_PLACE_DUNDER
                or name in ("__setitem__", "__delitem__") or kwargs.get("out") is not None
                or kwargs.get("inplace") is True)


def _in_place_on_first(func: Any, kwargs: dict[str, Any]) -> bool:
    """Whether ``func`` changes its first argument in place: an in-place method
    (``zero_``, ``add_``), ``__setitem__`` or an augmented assignment (``__iadd__``), with
    no ``out=``."""
    name = getattr(func, "__name__", "")
    return kwargs.get("out") is None and (
        name.endswith("_") and not name.startswith("__") or name in _IN_PLACE_DUNDER
        or name == "__setitem__")


_AUGMENTED = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__",
              "__itruediv__": "__truediv__", "__ipow__": "__pow__"}


def _replayed(func: Any, view: tuple[Any, tuple[Any, ...], dict[str, Any]] | None) -> Any:
    """``func`` (in place on its first argument) as an out-of-place function of that
    argument: on a clone of it, or, with ``view = (op, args, kwargs)``, on that view of the
    clone; the clone is the result (NOTE [in-place on derived tensors])."""

    def replay(target: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
        copy = target.clone()
        into = copy if view is None else view[0](copy, *view[1], **view[2])
        func(into, *rest, **kw)  # in place, on a tensor of this graph's own
        return copy

    return replay


def _pull_back(engine: Engine, total: torch.Tensor, out: torch.Tensor, leaves: list[torch.Tensor],
               parents: tuple[int, ...]) -> None:
    """A derived tensor's per-example gradient ``total`` ``(B, *out.shape)``, pulled back to
    its parents through the op's recorded graph, every example at once (NOTE [derived
    parameters])."""
    grads = torch.autograd.grad(out, leaves, grad_outputs=total.to(out.dtype), allow_unused=True,
                                retain_graph=True, is_grads_batched=True)  # chunks share it
    for slot, g in zip(parents, grads, strict=True):
        if g is not None:
            engine.add("direct", slot, g)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``t.numel()`` consecutive memory slots from its offset,
    each once, in some order of its axes (contiguous, or a permutation of contiguous)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _covers(view: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``view`` holds every element of the contiguous ``base`` once: a reshape or
    a permutation of it (``F.linear``'s 3-axis output, an einsum's permuted one)."""
    return (base.is_contiguous() and view.numel() == base.numel()
            and view.storage_offset() == base.storage_offset() and _dense(view))


def _reshaped(finish: Callable[..., None], layout: tuple[torch.Size, tuple[int, ...]], engine: Engine,
              grad: torch.Tensor, *saved: Any) -> None:
    """``finish`` given the gradient at a view's base, laid out as the view (``layout``:
    its shape and strides; the base is contiguous and the view covers it: :func:`_covers`)."""
    finish(engine, grad.contiguous().as_strided(*layout), *saved)


def _no_parts(engine: Engine, grad: torch.Tensor) -> None:
    pass


class _Use:
    """One call of a rule: which slots it feeds, what it saved, where its gradient arrives."""

    __slots__ = ("edge", "finish", "saved", "unpack", "versions", "watch")

    def __init__(self, edge: Any, finish: Callable[..., None], saved: tuple[Any, ...],
                 watch: torch.Tensor | None = None) -> None:
        self.edge = edge
        self.finish = finish
        self.versions = tuple(t._version for t in saved if isinstance(t, torch.Tensor))
        # NOTE [saved-tensor hooks]: the tensors a rule saved go through the hooks
        # autograd would put its own saved tensors through
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.unpack = None if hooks is None or not saved else hooks[1]
        self.saved = saved if self.unpack is None else tuple(
            (True, hooks[0](t)) if isinstance(t, torch.Tensor) else (False, t) for t in saved)
        # A recorded output that is a view of part of a larger tensor, and its version: an
        # in-place op on it would leave its edge without a gradient (NOTE [gradient
        # edges, not tensors] in _engine).
        self.watch = None if watch is None else (watch, watch._version)

    def unpacked(self) -> tuple[Any, ...]:
        """The saved values, as autograd would hand them to a backward.

        # NOTE [saved-tensor hooks]
        Under ``torch.autograd.graph.saved_tensors_hooks`` autograd stores ``pack(t)``
        for each tensor an op saves and computes the gradients from ``unpack(...)``: a
        hook that changes values (activations compressed to float16) changes the loop's
        gradients, and the rules, which kept their inputs themselves, gave the uncompressed
        ones (2e-4 off with float16). The rules' saved tensors now go through the same
        hooks, at the same time (the op's call, its backward), which also keeps what the
        hooks are for (``save_on_cpu`` moves them off the device too).
        """
        if self.unpack is None:
            return self.saved
        return tuple(self.unpack(v) if packed else v for packed, v in self.saved)


class _Watch:
    """The node pre-hooks of one engine (NOTE [tensor hooks on a recorded output], NOTE [a
    backward inside loss_fn]); it holds no engine, so the hooks on autograd nodes make no
    reference cycle through them."""

    __slots__ = ("backward", "inner", "outputs", "seen")

    def __init__(self) -> None:
        self.backward = False  # the engine's own backward has started
        self.inner = False  # loss_fn ran a backward with a graph through a recorded node
        self.outputs: dict[Any, set[int]] = {}  # node -> the recorded outputs of it
        self.seen: dict[Any, dict[int, tuple[int, tuple[int, ...]]]] = {}

    def add(self, edge: Any) -> None:
        """Watch ``edge``'s node and note its output: one node pre-hook per recorded node,
        registered when the node is recorded. During the engine's backward it notes, by node
        and output, where the gradient each recorded node receives lies (data pointer and
        shape); before it, a backward that ``loss_fn`` itself ran through the node with a
        graph.

        # NOTE [tensor hooks on a recorded output]
        ``torch.autograd.grad`` captures the gradient at a requested edge after the tensor
        hooks of its output (``z.register_hook``) when it does not run that edge's node, and
        *before* them when it does, because an edge further down is requested too. Every
        recorded output but the first layer's is such an edge, so a hook on a layer's output
        (``z2.register_hook(lambda g: -3 * g)``) reached the layers below it and not that
        layer's own per-example gradients (error 1.65 against the loop). A node pre-hook runs
        after the tensor hooks: where the gradient it sees is not the tensor autograd captured
        (a hook returned another one) the call is refused, naming the hook, and ``auto`` takes
        ``vmap``, which applies it to each example. (Keeping the hooked gradients themselves
        to use them held every recorded gradient to the end of the backward: 14 to 20 GB on
        torchvision's MViT v2.) A hook that returns None or changes the gradient in place
        changes the captured tensor too. A hook on any other activation acts on the batch's
        gradient, as in a plain backward: exact for hooks that treat each example's rows alone,
        not for one that mixes them (documented).

        # NOTE [a backward inside loss_fn]
        A ``loss_fn`` may differentiate its own output with a graph (``torch.autograd.grad(out,
        x, create_graph=True)``: an input-gradient penalty, WGAN-GP, physics-informed losses)
        and return a loss of that gradient. The rules run each op on the *detached* parameter,
        so the second-order path (the gradient ``g @ W`` depends on ``W``) was invisible: the
        fast methods returned first-order per-example gradients, off by the size of the result
        (0.57 against a loop), silently. ``torch.autograd.grad`` never sees a tracked tensor
        there (its arguments are activations and inputs), but that backward runs the recorded
        nodes' pre-hooks with grad mode on (``create_graph``) before the engine's own backward:
        such a call is refused, and ``auto`` takes ``vmap``, which differentiates through a
        ``torch.func.grad`` written inside ``loss_fn`` (a ``torch.autograd.grad`` there is
        refused by torch.func itself). A backward without a graph inside ``loss_fn`` gives a
        constant, as in the loop, and is allowed. A ``torch.func`` transform inside
        ``loss_fn`` hands the rules its wrapped tensors, which they cannot read (it crashed in
        the rules, "Cannot access storage of TensorWrapper", and ``auto`` did not fall back): a
        parameter used under one is refused the same way.
        """
        node = edge.node
        outputs = self.outputs.get(node)
        if outputs is None:
            outputs = self.outputs[node] = set()
            node.register_prehook(functools.partial(_noted, self, node, outputs))
        outputs.add(edge.output_nr)


def _noted(watch: _Watch, node: Any, outputs: set[int], grads: tuple[Any, ...]) -> None:
    if not watch.backward:  # NOTE [a backward inside loss_fn]
        watch.inner = watch.inner or torch.is_grad_enabled()
        return
    watch.seen[node] = {i: (grads[i].data_ptr(), tuple(grads[i].shape))
                        for i in outputs if grads[i] is not None}


class Engine:
    """Records rule calls during one forward, then turns them into per-example gradients.

    Args:
      params: the differentiated leaves (plain tensors), one slot each.
      names: ``names[slot]`` is a readable name (key path) for error messages.
      batch_size: ``B``, the size of axis 0 of every batched input.
      rules: ``{torch function: rule}`` (``_rules.RULES``).
      fn: the public call, to prefix errors that are not ``Unsupported``.
      real: the number of examples when the batch carries padding rows past them
        (NOTE [padding an ambiguous batch] in ``_padding``); None or ``batch_size``: none.
      evidence: the call's ``_padding.Evidence`` about expands over the batch.
    """

    def __init__(self, params: list[torch.Tensor], names: Any, batch_size: int,
                 rules: dict[Any, Callable[..., Any]], fn: str = "per_sample_grads(loss_fn)",
                 real: int | None = None, evidence: Any = None) -> None:
        self.fn = fn
        self.bases = [p.detach() for p in params]
        self._names = names
        # Slots past the parameters: tensors computed from parameters alone (NOTE
        # [derived parameters]), slot -> (parent slots, the op that made it, converter).
        self.derived: dict[int, tuple[tuple[int, ...], str, Callable[[Engine, torch.Tensor], None]]] = {}
        self.batch_size = batch_size
        # The arguments carrying the batch on axis 0 (set by the forward); their tensors
        # are gathered only when a rule asks (NOTE [sequence-first inputs]).
        self.batch_args: list[Any] = []
        self._batch_data: list[torch.Tensor] | None = None
        self._batch_storage: set[int] | None = None  # their storages, for reads_batch
        # The number of examples when the drivers padded the batch past them (NOTE
        # [padding an ambiguous batch] in _padding): inputs must then prove their batch
        # axis. None when the batch is not padded.
        self.real = real if real is not None and real < batch_size else None
        # What the runs of this call have shown about expands over the batch
        # (_padding.Evidence), given by the drivers; None outside them.
        self.evidence = evidence
        self.rules = rules
        self.uses: list[_Use] = []
        self.watch = _Watch()  # pre-hooks on the recorded nodes
        self.renormed: set[int] = set()  # NOTE [max_norm renormalises the table] in _rules
        # (kind, slot) -> payloads, merged by the matching finisher in `_rules`.
        self.parts: dict[tuple[str, int], list[tuple[torch.Tensor, ...]]] = {}
        self.closed = False  # set by close(), when the call that made this engine is over
        # NOTE [in-place on derived tensors]: the tracked object of each slot (a second one
        # makes the slot aliased), and derived slots that are views of another derived
        # slot: view slot -> (base slot, the view op, its other args, its kwargs).
        self.objects: dict[int, _Tracked] = {}
        self.aliased: set[int] = set()
        self.views: dict[int, tuple[int, Any, tuple[Any, ...], dict[str, Any]]] = {}
        # NOTE [rows kept through elementwise ops]: the last input check's proof of merged
        # rows (m, input), and the autograd nodes of rule outputs with such rows -> shape.
        self._proof: tuple[int, torch.Tensor, bool] | None = None  # (m, input, examples last)
        self.merged_rows: dict[Any, torch.Size] = {}
        # NOTE [a table the size of the batch]: id -> (tensor, whether its axis 0 holds
        # the examples), for tensors made inside loss_fn without a graph.
        self._rows: dict[int, tuple[torch.Tensor, bool]] = {}
        # NOTE [rows reordered inside loss_fn] in _row_order: the autograd nodes of rule
        # outputs (the walk stops there) and the walks' answers of this run.
        self.rule_nodes: set[Any] = set()
        self._order_memo: dict[Any, Any] = {}
        self._sources: set[Any] | None = None  # the batch leaves' gradient accumulators
        self.unproven: str | None = None  # raised by the backward of an unpadded run
        self._rng = rng_states() if self.real is not None else None  # to tell a run that draws
        # NOTE [rows reordered inside loss_fn] in _row_order: autograd's next node number
        # now, so that a record counts the nodes made in this run before each rule input
        self._first_node = _next_node_number()

    def close(self) -> None:
        """Mark the run over: a tracked tensor used after it (NOTE [tensors kept past
        their call]) raises :class:`StaleTracked` instead of recording into this engine."""
        self.closed = True
        self.uses.clear()
        self.watch.outputs.clear()  # the run's autograd nodes
        self.watch.seen.clear()
        self.objects.clear()  # the run's tracked objects: a kept one must not keep them all
        self.views.clear()
        self.merged_rows.clear()
        self._rows.clear()
        self.rule_nodes.clear()
        self._order_memo.clear()
        self._sources = None
        self._proof = None

    def stale(self, func: Any, args: Any, kwargs: dict[str, Any]) -> None:
        """Raise for a tracked tensor of this closed engine used with gradients on.

        # NOTE [tensors kept past their call]
        The engine hands ``loss_fn`` tracked parameters, and tensors computed from them
        alone are tracked too. A model may keep one past the call: timm's LeViT,
        EfficientFormer and TinyViT cache ``attention_biases[:, idx]`` in eval mode
        (``attention_bias_cache``), filled by the first forward that runs. Used by a later
        call, that tensor holds the earlier call's values and no path to the parameter
        it came from, so the parameter's gradient through it would be lost: a later
        ``vmap`` or per-example loop silently gives it none, and a later engine could not
        tell it from its own. So its use with gradients on raises, naming the parameter,
        the op and the way out. Under ``torch.no_grad`` it acts as a plain tensor of its
        values, as a cache does in eager PyTorch.
        """
        slot = next(t._fp_slot for t in (*args, *kwargs.values(),
                                         *(b for a in args if isinstance(a, (list, tuple)) for b in a))
                    if isinstance(t, _Tracked) and t._fp_engine is self)
        raise StaleTracked(
            f"{self.fn}: a tensor computed from {self.name(slot)} in an earlier run (an earlier "
            "call, or this call's first run, repeated padded) was kept past it and is used again "
            f"by `{_describe(func)}` with gradients on; it holds that run's values and no path "
            "back to the parameter, so the parameter's gradient through it would be lost, by "
            "every method. A module that caches a tensor computed from its parameters does this "
            "(timm's attention_bias_cache, filled in eval mode): empty the cache and set "
            "`training = True` on those modules alone (timm: `m.attention_bias_cache = {}; "
            "m.training = True` for each module m with an attention_bias_cache; not m.train(), "
            "which also puts their BatchNorm in training mode), or compute the tensor afresh in "
            "each forward")

    def tracked(self) -> list[torch.Tensor]:
        return [self.track(slot) for slot in range(len(self.bases))]

    def track(self, slot: int) -> torch.Tensor:
        """The tracked tensor of ``slot``, as ``loss_fn`` sees it."""
        t = torch.Tensor._make_subclass(_Tracked, self.bases[slot], False)
        t._fp_slot = slot
        t._fp_engine = self
        if slot in self.objects:
            self.aliased.add(slot)
        else:
            self.objects[slot] = t
        return t

    def transposed_from(self, slot: int) -> int | None:
        """The parameter slot whose matrix transpose ``slot`` is (``w.T``, ``w.mT``,
        ``w.t()`` of a 2-d ``w``), else None: NOTE [x @ w]."""
        if slot not in self.derived:
            return None
        parents, made_by, _ = self.derived[slot]
        if (len(parents) == 1 and made_by in ("Tensor.T", "Tensor.mT", "Tensor.t", "torch.t")
                and self.bases[parents[0]].dim() == 2):
            return parents[0]
        return None

    # -- helpers for rules ------------------------------------------------------------------

    def slot(self, t: Any) -> int | None:
        """The slot of a tracked tensor from this engine, else ``None``."""
        if isinstance(t, _Tracked):
            if t._fp_engine is not self:
                raise Unsupported("a parameter from another per-sample gradient call was captured")
            return t._fp_slot
        return None

    def base(self, t: Any) -> Any:
        return self.bases[t._fp_slot] if isinstance(t, _Tracked) else t

    def unwrap(self, x: Any) -> Any:
        if isinstance(x, _Tracked):
            return self.bases[x._fp_slot]
        if isinstance(x, (list, tuple)):
            return type(x)(self.unwrap(v) for v in x)
        if isinstance(x, dict):
            return {k: self.unwrap(v) for k, v in x.items()}
        return x

    def slots(self, args: Any, kwargs: dict[str, Any]) -> list[int]:
        found: list[int] = []
        for a in (*args, *kwargs.values()):
            for b in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(b, _Tracked) and b._fp_slot not in found:
                    found.append(b._fp_slot)
        return found

    def derive(self, out: torch.Tensor, parents: tuple[int, ...], made_by: str,
               convert: Callable[[Engine, torch.Tensor], None]) -> torch.Tensor:
        """``out``, computed from the parameters in slots ``parents`` alone (no batch axis),
        as a tracked tensor of a slot of its own.

        # NOTE [derived parameters]
        A tensor computed from differentiated parameters alone has no batch axis: a
        positional embedding looked up with ids made inside ``loss_fn`` (``arange(T)``,
        ``(1, T)`` position ids), a slice or reshape of a positional table
        (``pos[:, :T]``, ``pos.unsqueeze(0)``), a reparametrised weight (weight norm,
        ``w * scale``, ``a @ b``). No rule can find the examples in it; its gradient is
        per-example only where it meets the batch later. So such a result is handed back
        as a tracked tensor of a new slot, as if it were a parameter: the rules where it
        meets the batch (a Linear or conv taking it as weight, ``x + pos``: NOTE
        [broadcast parameters] in ``_rules_broadcast``) give its per-example gradient
        ``(B, *out.shape)``, and after the backward :meth:`resolve_derived` pulls that
        back to the parameters it came from: through the lookup for an embedding (each
        example's rows scattered into the table), and for any other op by autograd on
        the op's own recorded graph, once for the whole batch (``is_grads_batched``). A
        result that meets the batch anywhere without a rule is refused, naming the
        parameters and the op it came through. In-place ops and ``out=`` on parameters
        stay refused. An op with no rule that combines parameters with constants of
        ``loss_fn`` (tensors with no batch axis, by :meth:`examples_axis`: a buffer of
        indices as in Swin's ``bias_table[index]``, a fixed mask in ``torch.where``) makes
        a derived tensor too; a plain tensor that is or may be batch data is refused
        (or, when only its size says, settled by a padded run).
        """
        slot = len(self.bases)
        self.bases.append(out)
        self.derived[slot] = (parents, made_by, convert)
        t = torch.Tensor._make_subclass(_Tracked, out, False)
        t._fp_slot = slot
        t._fp_engine = self
        self.objects[slot] = t
        return t

    def is_tracked(self, t: Any) -> bool:
        """Whether ``t`` is a tracked tensor of this engine (a parameter, or a tensor
        derived from parameters alone): one with no batch axis."""
        return isinstance(t, _Tracked) and t._fp_engine is self

    def parameters_only(self, func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
        """Whether ``func`` is an out-of-place op whose tensor arguments are all tracked
        (parameters or tensors derived from them alone): NOTE [derived parameters]."""
        if not _only_tracked((*args, *kwargs.values())):  # a layer's plain input: at once
            return False
        return _out_of_place(func, kwargs)

    def with_constants(self, func: Any, args: Any, kwargs: dict[str, Any],
                       refuse: Callable[[], int]) -> None:
        """Return when ``func`` (an op with no rule) is out of place and its plain tensor
        arguments are constants of ``loss_fn`` (NOTE [constants or batch data]): a buffer
        of indices (``table[index]``, Swin's relative position bias), a fixed mask. Else
        ``refuse()`` raises (or :meth:`examples_axis` raises :class:`Ambiguous` for a
        padded run to decide)."""
        if not _out_of_place(func, kwargs):
            refuse()
        self.constants_only(args, kwargs, refuse, f"`{_describe(func)}` on {self.names(args, kwargs)}")

    def input_axis(self, func: Any, args: Any, kwargs: dict[str, Any],
                   check: Callable[[], int]) -> int | None:
        """``check()``, a rule's examples' axis of its input; or None when that check
        refuses the input and it is a constant of ``loss_fn`` (NOTE [constants or batch
        data]): Swin v2's table of coordinates through its position MLP, XCiT's Fourier
        features of the patch grid through a conv, then broadcast over the batch. The
        caller returns ``derive_op(func, args, kwargs)``, a derived tensor. Only where the
        size check refuses: an input that passes it keeps the rule's documented reading."""
        try:
            return check()
        except Ambiguous:
            raise
        except Unsupported as refused:
            reason = refused  # `refused` is unbound once the except block ends

            def refuse() -> int:
                raise reason

            try:
                self.with_constants(func, args, kwargs, refuse)
            except Ambiguous as maybe:
                raise Ambiguous(f"{refused}; unless that input is a constant of loss_fn, which "
                                f"only a padded batch can show ({maybe})") from None
            return None

    def derive_in_place(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """``func`` changing a tracked ``t = args[0]`` in place (``inplace=True``, an
        in-place method, ``t[i] = v``): the op out of place, with ``t`` rebound to its result.

        # NOTE [in-place on derived tensors]
        ``nn.ReLU(inplace=True)`` inside a branch computed from parameters alone (Swin v2's
        position MLP on a constant table of coordinates) changes a derived tensor in
        place, and so does torchvision's Swin v2 on a clone of its qkv bias
        (``b = bias.clone(); b[n:2 * n].zero_()``, an in-place method on a view of it).
        The engine keeps each derived tensor's value and graph for its slot, so the op
        runs out of place as a new derived slot: on a clone of ``t``, or, when ``t`` is a
        view of a derived tensor ``base`` (recorded by :meth:`derive_op`), on that view
        of a clone of ``base``. The caller's objects (``t``, and ``base`` when there is
        one) are pointed at the results with ``torch.utils.swap_tensors``, which writes
        into neither tensor (tensors saved for the old slots' graphs keep their
        versions): later uses see the new values and pull back through the new slots,
        as in eager PyTorch. A tensor whose other aliases the engine cannot rebind is
        refused: a parameter itself, a slot with more than one tracked object, and a
        derived tensor that other derived tensors were computed from (eager PyTorch
        would change the views among them too).
        """
        t = args[0]
        old = t._fp_slot
        inplace = kwargs.get("inplace") is True
        op = f"`{_describe(func)}`" + (" with inplace=True" if inplace else "")
        view = self.views.get(old)  # (base slot, view op, its args, its kwargs)
        target = old if view is None else view[0]

        def refuse(why: str = "") -> int:
            raise Unsupported(f"{self.name(old)} is changed in place by {op}{why}")

        if target not in self.derived:
            refuse("" if view is None else f" through a view of {self.name(target)}")
        if (old in self.aliased or target in self.aliased
                or any(old in parents or target in parents and s != old
                       for s, (parents, _, _) in self.derived.items())):
            refuse(" after other tensors were computed from it")
        self.constants_only(args, kwargs, lambda: refuse(
            " with a plain tensor that is not a constant of loss_fn"), op)
        if view is None:
            out = (self.derive_op(func, args, {**kwargs, "inplace": False}) if inplace
                   else self.derive_op(_replayed(func, None), args, kwargs, _describe(func)))
            self._rebind(t, out)
        else:
            base = self.objects[target]
            new_base = self.derive_op(_replayed(func, view[1:]), (base, *args[1:]), kwargs,
                                      f"{_describe(func)} on a view")
            self._rebind(base, new_base)
            self._rebind(t, self.derive_op(view[1], (base, *view[2]), view[3]))
        return None if func is _T.__setitem__ else t

    def in_place_on_plain(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """``func`` writing a tracked argument into a plain tensor in place: ``h += p``,
        ``h.mul_(p)``, ``h.clamp_(min=p)``. The op's out-of-place form runs on a copy of
        ``h`` through its rule (so ``h``'s version, which the rule may save, stays) and its
        result is copied into ``h``, so the caller's tensor has the new values and a history
        through the rule's recorded output, as in eager PyTorch. An op with no out-of-place
        form is refused (``h[i] = p`` has a rule of its own: NOTE [a parameter written
        into the batch] in ``_rules_index``)."""
        name = getattr(func, "__name__", "")
        plain = _AUGMENTED.get(name, name[:-1] if name.endswith("_") and not name.startswith("_") else "")
        outofplace = getattr(_T, plain, None) if plain else None
        if outofplace is None:
            raise Unsupported(f"{self.names(args, kwargs)} {'is' if len(self.slots(args, kwargs)) == 1 else 'are'} "
                              f"written in place into a plain tensor by `{_describe(func)}`, which has no "
                              "out-of-place form")
        h = args[0]
        out = outofplace(h.clone(), *args[1:], **kwargs)  # through the rules: args are tracked
        if isinstance(out, _Tracked) or not isinstance(out, torch.Tensor) or out.shape != h.shape:
            raise Unsupported(f"{self.names(args, kwargs)} written in place by `{_describe(func)}` "
                              f"into a plain tensor of shape {tuple(h.shape)} that holds no examples")
        return h.copy_(out)

    def _rebind(self, t: _Tracked, out: Any) -> None:
        """Point the caller's tracked object ``t`` at ``out`` (a new derived slot's tracked
        tensor) without writing into either: NOTE [in-place on derived tensors]."""
        if not isinstance(out, _Tracked):  # pragma: no cover - derive_op of a float op
            raise Unsupported(f"{self.name(t._fp_slot)} is changed in place into a tensor with "
                              "no gradient")
        torch.utils.swap_tensors(t, out)  # the objects' slots (their __dict__) swap too
        self.objects[t._fp_slot], self.objects[out._fp_slot] = t, out

    def constants_only(self, args: Any, kwargs: dict[str, Any], refuse: Callable[[], int],
                       op: str) -> None:
        """Return when every plain tensor in the arguments is a constant of ``loss_fn``
        (NOTE [constants or batch data]); else ``refuse()`` raises (or :meth:`examples_axis`
        raises :class:`Ambiguous` for a padded run to decide)."""
        for x in _plain_tensors((*args, *kwargs.values())):
            self.examples_axis(x, refuse, op)

    def derive_op(self, func: Any, args: Any, kwargs: dict[str, Any], made_by: str | None = None) -> Any:
        """``func`` on tracked arguments only, its floating result a derived tensor pulled
        back by autograd (NOTE [derived parameters]); other results are returned plain.
        ``made_by`` names the op in messages (default: ``func``'s name)."""
        leaves: dict[int, torch.Tensor] = {}

        def leaf(a: Any) -> Any:
            if isinstance(a, _Tracked):
                if a._fp_slot not in leaves:
                    leaves[a._fp_slot] = self.bases[a._fp_slot].detach().requires_grad_()
                return leaves[a._fp_slot]
            if isinstance(a, (list, tuple)):
                return type(a)(leaf(b) for b in a)
            if isinstance(a, dict):
                return {k: leaf(v) for k, v in a.items()}
            return a

        out = func(*leaf(args), **{k: leaf(v) for k, v in kwargs.items()})
        parents = tuple(leaves)
        made_by = made_by or _describe(func)

        def derived(t: Any) -> Any:
            # Every tensor of the result (chunk and split give several) is derived or
            # detached: none may carry the leaves' graph past the engine unseen.
            if isinstance(t, (list, tuple)):
                items = [derived(u) for u in t]
                return type(t)(*items) if hasattr(t, "_fields") else type(t)(items)
            if not isinstance(t, torch.Tensor):
                return t
            if t.grad_fn is None:
                for s, leaf in leaves.items():
                    if t is leaf:  # the op returned its input (flatten of a matrix,
                        return self.track(s)  # contiguous, .to(its dtype)): still tracked
                return t.detach()
            made = self.derive(t.detach(), parents, made_by, functools.partial(
                _pull_back, out=t, leaves=[leaves[s] for s in parents], parents=parents))
            if (len(parents) == 1 and t._base is leaves[parents[0]] and args  # a view of
                    and isinstance(args[0], _Tracked) and args[0]._fp_slot == parents[0]):  # args[0]
                self.views[made._fp_slot] = (parents[0], func, tuple(args[1:]), kwargs)
            return made

        return derived(out)

    def resolve_derived(self, merge: Callable[[str, list[Any], torch.Tensor], torch.Tensor]) -> None:
        """After the backward: each derived slot's parts, merged into its per-example
        gradient, become parts of its parent (NOTE [derived parameters]); ``merge`` is
        ``_rules.merge``."""
        with torch.no_grad():  # saved activations require grad; nothing here is recorded
            self._resolve_derived(merge)

    def _resolve_derived(self, merge: Callable[[str, list[Any], torch.Tensor], torch.Tensor]) -> None:
        for slot in sorted(self.derived, reverse=True):
            kinds = [kind for kind, s in self.parts if s == slot]
            if not kinds:
                continue
            total = None
            for kind in kinds:
                if kind not in ("outer", "sum", "embed", "direct"):
                    raise Unsupported(f"{self.name(slot)} is used by a call whose per-example "
                                      f"parts ({kind!r}) cannot be passed back to the parameter")
                g = merge(kind, self.parts.pop((kind, slot)), self.bases[slot])
                total = g if total is None else total + g
            self.derived[slot][2](self, total)

    def name(self, slot: int) -> str:
        if slot in self.derived:
            parents, made_by, _ = self.derived[slot]
            return f"{', '.join(self.name(p) for p in parents)} (through `{made_by}`)"
        return f"`{self._names[slot]}`"

    def names(self, args: Any, kwargs: dict[str, Any]) -> str:
        return ", ".join(self.name(s) for s in self.slots(args, kwargs))

    def examples_axis(self, x: Any, check: Callable[[], int], op: str) -> int | None:
        """``check()`` (the rule's examples' axis of ``x``), or None when ``x`` is a constant
        of ``loss_fn``: a tensor with no batch axis, which makes the op's result a derived
        tensor (NOTE [derived parameters]).

        # NOTE [constants or batch data]
        A parameter may meet a plain tensor that is not batch data: ``base @ matrix_exp(A)``
        inside ``parametrizations.orthogonal``, a frozen weight plus a learned update or
        bias. Taking such a constant for the batch because an axis has size ``B`` gives
        wrong per-example gradients silently (the orthogonal parametrisation at ``B`` equal
        to its size: error 0.58). A tensor that reads no batch argument (a new tensor, not
        a view of one) and has no graph (nothing tracked made it) may be either: the batch
        copied (``x / 255``, ``x.float()``) or a constant. If no axis has a size that is a
        multiple of ``B`` it cannot hold the examples, merged with other axes or not, so
        it is a constant. Otherwise only another batch size can tell: the first run is
        ambiguous and the batch runs again padded (NOTE [padding an ambiguous batch] in
        ``_padding``), where batch data grows with the batch and repeats its first example
        in the padding rows, and a constant does not. Tensors with a graph or that view a
        batch argument are checked by ``check`` alone, as before. (A table whose first
        axis alone has the batch size is asked about by ``check`` too: NOTE [a table the
        size of the batch].)
        """
        if not isinstance(x, torch.Tensor) or x.grad_fn is not None or self.reads_batch(x):
            return check()
        rows = self.holds_examples(x, op)  # NOTE [a table the size of the batch]
        if rows is not None:
            return check() if rows else None
        B = self.batch_size
        if not any(n % B == 0 for n in x.shape):
            return None
        if self.real is None:
            raise Ambiguous(f"{op} meets a tensor of shape {tuple(x.shape)} made inside loss_fn "
                            f"without a graph, which could be the batch of {B} or a constant "
                            "(NOTE [constants or batch data])")
        try:
            return check()
        except Ambiguous:
            raise
        except Unsupported as e:
            raise Ambiguous(f"{op}: {e}") from e

    def reads_batch(self, x: torch.Tensor) -> bool:
        """Whether ``x`` shares memory with a batch argument (the argument or a view)."""
        if self._batch_storage is None:  # the batch arguments are fixed for a run
            self._batch_storage = {t.untyped_storage().data_ptr() for arg in self.batch_args
                                   for t in _tree.leaves(arg) if isinstance(t, torch.Tensor)}
        return x.untyped_storage().data_ptr() in self._batch_storage

    def holds_examples(self, x: torch.Tensor, op: str) -> bool | None:
        """For a tensor made inside ``loss_fn`` with no graph that reads no batch argument,
        and whose axis 0 has the batch size: whether that axis holds the examples (True)
        or it is a constant of ``loss_fn`` (False). None for any other tensor: one with a
        graph or reading the batch, or whose axis 0 does not have the batch size (the
        rules' other checks decide those), or in a batch of one.

        # NOTE [a table the size of the batch]
        A rule takes an input whose axis 0 has size ``B`` for the examples (NOTE [which
        axis is the batch]). A constant made inside ``loss_fn`` can have that size too: a
        fixed ``(K, D)`` table of keys through a Linear when ``K == B``. Read as examples,
        row ``b`` of the table's gradient went to example ``b``: wrong per-example
        gradients, clip norms and DP noise calibration, silently (error 1.2 on a toy
        model; ``vmap`` and the loop were right). Such a tensor has no graph and reads no
        batch argument, as does a copy of the batch made in ``loss_fn`` (``x / 255``,
        ``one_hot(y).float()``, features of a frozen extractor under ``no_grad``), the
        usual first-layer input. Only another batch size tells them apart, so the first
        call is ambiguous and runs again padded (NOTE [padding an ambiguous batch] in
        ``_padding``): there a copy has the padded size and repeats the first example in
        the padding rows, and a constant keeps the real size. The padded run notes each
        answer in :class:`~._padding.Evidence`, keyed by the op, the tensor's other axes
        and dtype, and its place among such tensors; later calls with the same shapes run
        unpadded with those answers (one refused forward, and one padded run, a shape),
        and run padded again only if they do not match. ``has_aux`` calls take the padded
        run for its answers alone and then run unpadded. Each tensor is asked once a run.
        """
        B = self.batch_size
        real = self.real if self.real is not None else B
        if real == 1 or x.dim() == 0 or x.shape[0] not in (B, real):
            return None
        if x.grad_fn is not None or self.reads_batch(x):  # a leaf that requires grad
            return None  # (a module's own frozen nn.Parameter) is asked too
        seen = self._rows.get(id(x))
        if seen is not None and seen[0] is x:
            return seen[1]
        sig = (op, tuple(x.shape[1:]), x.dtype)
        # each such tensor counts, answered or not, so that a padded run compares each with
        # the same tensor of the unpadded run: NOTE [a statistic with no graph]
        key = self.evidence.occurrence(("no graph", *sig)) if self.evidence is not None else None
        if self.real is not None:  # padded: a copy of the batch grew with it
            rows = x.shape[0] == B
            if not rows and any(n % B == 0 for n in x.shape[1:]):
                raise Ambiguous(  # another axis may hold the examples: another size tells
                    f"`{op}` meets a tensor of shape {tuple(x.shape)} made inside loss_fn without "
                    "a graph whose first axis kept the batch's real size while another has the "
                    "padded size")
            if rows and not self.padding_rows_repeat(x):  # a table of the padded size?
                raise Ambiguous(
                    f"`{op}` meets a tensor of shape {tuple(x.shape)} made inside loss_fn without "
                    "a graph that neither repeats the first example in the padding rows nor keeps "
                    "the batch's real size, so it is neither a copy of the batch nor a constant "
                    "at this padded size")
            if rows:  # NOTE [a statistic with no graph]
                self._same_as_unpadded(x, key, op)
            if self.evidence is not None:
                self.evidence.note_rows(sig, rows)
        else:
            rows = self.evidence.rows_for(sig) if self.evidence is not None else None
            if rows is None:
                if self.evidence is not None:  # for the padded run (NOTE [a statistic with
                    # no graph])
                    self.evidence.earlier_rows(key, x.detach().clone())
                raise Unproven(
                    f"`{op}` meets a tensor of shape {tuple(x.shape)} made inside loss_fn without a "
                    f"graph, whose first axis has the batch size {B}: a copy of the batch or a "
                    "constant, which only a padded batch can show (NOTE [a table the size of "
                    "the batch])")
        self._rows[id(x)] = (x, rows)
        return rows

    def _same_as_unpadded(self, x: torch.Tensor, key: Any, op: str) -> None:
        """In a padded run, raise :class:`Unsupported` when the first rows of ``x`` (a
        tensor made without a graph, taken for a copy of the batch) differ from the same
        tensor's rows in this call's unpadded run (``key``: its place among such tensors,
        from :meth:`~._padding.Evidence.occurrence`).

        # NOTE [a statistic with no graph]
        A statistic over the batch computed where autograd records nothing is not in any
        graph the walks of NOTE [statistics over the examples] in ``_row_order`` read:
        integer pixels standardised by the batch's mean and spread inside ``loss_fn``
        (``x = x.double() / 255; (x - x.mean()) / x.std()``: integer data cannot require
        grad, so nothing after it has a graph), features of a frozen backbone in training
        mode under ``no_grad``. Such a tensor reaches a rule as a tensor made without a
        graph whose first axis has the batch size (NOTE [a table the size of the batch]),
        and the padded run took it for a copy of the batch because its padding rows repeat
        its first row, which a standardisation keeps. Every fast method then gave the
        batch-coupled gradients, silently (1.18 off the loop), and the first call, whose
        answer came from the padded run, other numbers than the second (1.27). A copy of
        the batch has, in its first rows, the unpadded run's rows whatever the padding; a
        statistic moves when copies of the first example join the batch. So the unpadded
        run that asks for the padded one keeps the tensor's rows (``Evidence.seen``), and
        the padded run compares its first rows with them (to the few thousand ulps of
        :meth:`same_rows`; skipped in a run that drew random numbers, from PyTorch's
        generators or, under NOTE [random draws in a padded run] in ``_same_draws``, a
        ``torch.Generator`` of the user's, whose rows differ by their draws): a difference
        is refused as a statistic over the examples, and ``auto`` falls back to ``vmap``,
        which computes it over each example alone (the loop's numbers). Limits: only a
        tensor whose unpadded run asked for the padded one is compared (the first such
        tensor of the call; later calls with those shapes reuse the answer, and a model
        padded for another reason, a sequence as long as the batch, is not compared); a
        statistic whose effect on the rows is under that tolerance (a huge batch in float32)
        passes; and a statistic applied without a graph anywhere else (a REINFORCE baseline
        ``(r - r.mean()).detach() * logp``, weights computed from the batch and multiplied
        in by hand) is never seen: the fast methods give the batch-coupled numbers there,
        and ``method="vmap"`` is needed.
        """
        ev = self.evidence
        if ev is None or self.real is None:
            return
        before = ev.seen.get(key)
        if (before is None or before.shape[0] != self.real or self._drew()
                or ev.same_draws is not None and ev.same_draws.drew):  # a user's generator
            return
        if not self.same_rows(x.detach()[:self.real], before):
            raise Unsupported(
                f"`{op}` meets a tensor of shape {tuple(x.shape)} made inside loss_fn without a "
                "graph whose first rows changed when copies of the first example joined the "
                "batch: it is computed from the whole batch (a statistic over the examples, "
                "such as inputs standardised by the batch's mean and spread), so each "
                "example's loss depends on the others, which per-example gradients exclude; "
                "method='vmap' runs each example alone, computing the statistic over that "
                "example only (NOTE [a statistic with no graph])")

    def check_input(self, x: Any, op: str, slots: list[int], min_dim: int = 2,
                    features: int = 0, seq_first: bool = False, paired: bool = False,
                    blocks: bool = False) -> int:
        """The axis of ``x`` that holds the examples: 0, or 1 for a sequence-first input
        when ``seq_first`` (NOTE [sequence-first inputs]); raise ``Unsupported`` when it is
        not known unambiguously. ``paired``: the op combines ``x``'s rows one by one with
        another input's, whose rows hold the examples (a recurrent layer's initial state
        and its steps), so a tensor made without a graph needs no proof (NOTE [a table the
        size of the batch]): ``x.new_zeros(B, H)``. ``blocks``: the rule's finisher reads
        only its input and output gradient by rows, so ``m`` blocks of the batch may be
        read with the rows reordered (NOTE [examples last]).

        # NOTE [which axis is the batch]
        Rules take axis 0 of an op's input to be the examples; nothing else is known about
        it without tracing every op. Two checks keep a wrong guess from passing silently in
        the common cases: axis 0 must have size ``B``, and no other axis that could hold the
        examples (all but the last ``features`` axes: sequence axes of ``F.linear`` inputs,
        every axis of embedding indices) may have size ``B`` too, which catches
        sequence-first layouts such as ``(T, B, E)`` when ``T == B``. Such a coincidence of
        sizes raises :class:`Ambiguous`, and the drivers run the batch again with a few
        padding rows, at a size the other axes do not share (NOTE [padding an ambiguous
        batch] in ``_padding``): only the axis that holds the examples grows. One-dimensional
        embedding ids are examples only when read from a batch argument; others have no
        batch axis (NOTE [one-dimensional indices] in ``_rules``, NOTE [derived
        parameters]). A float input with no batch axis whose first axis happens to equal
        ``B`` (a fixed ``(T, E)`` table through a ``Linear`` with ``T == B``) is told from
        batch data by NOTE [a table the size of the batch]. An input computed from the
        batch is walked back to it for ops that reorder its examples (NOTE [rows
        reordered inside loss_fn] in ``_row_order``).

        # NOTE [sequence-first inputs]
        Position-wise rules (``F.linear``, ``F.layer_norm``, ``F.rms_norm``, ``F.embedding``:
        an output row depends on the same input row only) also take the examples on axis 1, the
        ``(T, B, ...)`` layout of ``nn.TransformerEncoderLayer(batch_first=False)``, when
        three things hold: axis 0 does not have size ``B`` (else the rule above decides),
        axis 1 is the only candidate axis of size ``B``, and one of two things shows that
        the input has a batch axis at all:
        * it has a graph: inside ``loss_fn`` an input has one because it was computed
          from an earlier rule's output or from the batch (NOTE [the batch requires grad]
          in ``_api``), and both are batched (a rule's input passed these checks), so the
          examples are on some axis and axis 1 is the only one that can hold them (a leaf
          that requires grad, a module's own frozen ``nn.Parameter``, has no graph);
        * or it is a batch argument with its axes permuted (``x.transpose(0, 1)`` of the
          ``(B, T, ...)`` data, or of ``(B, T)`` token ids): the same storage, offset and
          (size, stride) pairs, with axis 1 carrying the argument's axis 0, so it is
          the same elements re-indexed and axis 1 provably holds the examples.
        A copy of transposed batch data is computed from the batch, so it has a graph
        (NOTE [the batch requires grad] in ``_api``) and is read by the first test.
        Anything else (a ``(1, T, E)`` positional table with ``T == B``) stays an error,
        so ``method="auto"`` falls back to ``vmap``. The finishers move the examples to
        axis 0 before any per-example sum.

        # NOTE [examples merged into axis 0]
        Models fold a per-example axis into the batch axis: augmentation multiplicity (De et
        al.: ``x.reshape(B * K, C, H, W)`` of ``K`` augmentations of each example, the loss
        averaged over them), a video's frames through a 2-d CNN, flattened tokens
        ``h.reshape(B * T, E)``, Swin's windows ``(B * nW, 49, C)``. An input whose axis 0
        has ``m * B`` rows, ``m`` consecutive rows per example, is position-wise the same
        as ``m`` more positions of one example: each row's per-example part (a Linear's
        outer factors, a conv's or a norm's per-row gradient) belongs to example
        ``row // m``, so :meth:`add` takes the rows of each example as more positions
        (``outer``, ``sum``, ``embed`` parts) or sums them (``direct`` parts). Size cannot
        tell that layout from the examples last (``x.transpose(0, 1).reshape(K * B, ...)``,
        row ``k * B + b``) or a table with ``m * B`` rows, so one size is never enough: the
        first run is ambiguous and the batch runs again padded (NOTE [padding an ambiguous
        batch] in ``_padding``), where the input must have ``m`` rows per example at the
        padded size too and each padding example's ``m`` rows must repeat the first
        example's, which neither the other layout nor a table does (the examples last are
        then tried for the ops that take them: NOTE [examples last]). ``m`` is whatever the
        input shows; later calls with the same shapes run padded at once (remembered per
        ``loss_fn``), one padding example more a call. ``has_aux`` is never padded, so
        there it stays an error and ``auto`` takes ``vmap``. A batch of one needs no
        padded run: all rows are its own, whatever their layout, and a rule's per-row
        parts summed are its gradient. An expand of a parameter to
        ``m * B`` rows (a ViT's class token for every augmentation) is taken when its size
        follows the batch's (``_padding.Evidence``); its rows are all alike, so only their
        output gradients show whose they are: in the padded run each padding example's
        ``m`` rows of gradient must repeat the first example's (:meth:`padding_rows_repeat`), as
        the gradient of a copy of the first example's loss does.
        """
        B = self.batch_size
        ambiguous = False
        self._proof = None
        if isinstance(x, torch.Tensor) and not isinstance(x, _Tracked) and x.dim() >= min_dim:
            rows = None if paired else self.holds_examples(x, op)  # NOTE [a table the size of the batch]
            if rows is False:
                raise Unsupported(
                    f"{', '.join(self.name(s) for s in slots)} {'is' if len(slots) == 1 else 'are'} "
                    f"used by `{op}` on a constant of loss_fn of shape {tuple(x.shape)} (its first "
                    "axis only has the batch size: it did not follow a padded batch)")
            lead = x.shape[:x.dim() - features]
            if x.shape[0] == B and (B == 1 or B not in lead[1:]):
                if rows or self.real is None or x.requires_grad or self.padding_rows_repeat(x):
                    self.rows_in_order(x, 0, op, slots)  # NOTE [rows reordered inside loss_fn]
                    return 0
                # Padded, a tensor with no provable batch axis (a table whose first axis
                # has the padded size) must not pass for the examples.
                raise Unsupported(
                    f"{', '.join(self.name(s) for s in slots)} {'is' if len(slots) == 1 else 'are'} "
                    f"used by `{op}` on an input of "
                    f"shape {tuple(x.shape)} that neither requires grad nor repeats the first "
                    "example in the padding rows, so at the padded size its first axis cannot "
                    "be told from the examples'")
            if (seq_first and len(lead) >= 2 and lead[0] != B and lead[1] == B
                    and (x.grad_fn is not None or self.permuted_batch(x))
                    # Padded, axis 1 must repeat the first example too: an activation with
                    # merged rows (NOTE [examples merged into axis 0]) may have another axis
                    # of the padded size.
                    and (self.real is None or self.padding_rows_repeat(x.movedim(1, 0)))):
                if B not in lead[2:]:
                    self.rows_in_order(x, 1, op, slots)  # NOTE [rows reordered inside loss_fn]
                    return 1
                ambiguous = True  # axis 1 or a later one: NOTE [padding an ambiguous batch]
        who = ", ".join(self.name(s) for s in slots)
        verb = "is" if len(slots) == 1 else "are"
        if (not ambiguous and isinstance(x, torch.Tensor) and not isinstance(x, _Tracked)
                and x.dim() >= min_dim and x.shape[0] > B and x.shape[0] % B == 0):
            m = x.shape[0] // B  # NOTE [examples merged into axis 0]
            if B == 1 and self.real is None:
                return 0  # one example: every row is its own, whatever the layout
            if self._merges_examples(x, op, slots) or self._keeps_rows(x):
                # NOTE [rows reordered inside loss_fn]
                self.rows_in_order(x, 0, op, slots, lambda: self.padding_rows_repeat(x, m))
                self._proof = (m, x, False)
                return 0
            if self.real is None:
                raise Ambiguous(
                    f"{who} {verb} used by `{op}` on an input of shape {tuple(x.shape)}, whose "
                    f"first axis is {m} times the batch size {B}: it may hold {m} rows per "
                    "example, which only a padded batch can show")
            if self.padding_rows_repeat(x, m):
                self.rows_in_order(x, 0, op, slots, lambda: True)  # shown just above
                self._proof = (m, x, False)
                return 0
            first = examples_first(x, m) if blocks else None
            if first is not None and self.padding_rows_repeat(first, m):
                self.rows_in_order(x, 0, op, slots, lambda: True, first)
                self._proof = (m, x, True)  # NOTE [examples last]
                return 0
            raise Unsupported(
                f"{who} {verb} used by `{op}` on an input of shape {tuple(x.shape)}, whose first "
                f"axis is {m} times the batch size {B}, but whose rows past the examples do not "
                f"repeat the first example's {m} rows: it holds neither {m} consecutive rows per "
                f"example (x.reshape(B * m, ...) of a (B, m, ...) tensor) nor {m} blocks of the "
                f"batch (torch.cat of {m} tensors of the batch's shape, which F.linear, conv1d/2d "
                "and the layer, group and RMS norms take)")
        if isinstance(x, _Tracked):
            raise Unsupported(f"{self.name(x._fp_slot)} is used as the input of `{op}`; only its "
                              "weight and bias arguments have a per-sample gradient rule")
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        if ambiguous or isinstance(x, torch.Tensor) and x.dim() >= min_dim and x.shape[0] == B:
            raise Ambiguous(
                f"{who} {verb} used by `{op}` on an input of shape {shape}: several axes have "
                f"the batch size {B}, so which one holds the examples is ambiguous")
        also = (" (or on axis 1 of a sequence-first input computed from the parameters or "
                "transposed from the batch itself; a copy or a table is not read as "
                "sequence-first)" if seq_first else "")
        raise Unsupported(
            f"{who} {verb} used by `{op}` on an input of shape {shape}, whose first axis is not "
            f"the batch (B={B}); the fast method needs every op that uses a parameter to see "
            f"the batch on axis 0{also}")

    def _subject(self, slots: list[int]) -> str:
        """``"`a`, `b` are"``: the parameters of ``slots`` as an error's subject."""
        return f"{', '.join(self.name(s) for s in slots)} {'is' if len(slots) == 1 else 'are'}"

    def rows_in_order(self, x: torch.Tensor, axis: int, op: str, slots: list[int],
                      shown: Callable[[], bool] | None = None,
                      rows: torch.Tensor | None = None) -> None:
        """Return when no op between the batch and ``x`` reorders the examples on ``axis``,
        or when a padded run shows they are in order anyway. Else, unpadded: keep the rows
        and have the backward raise :class:`Unproven` (a padded run decides); padded:
        raise :class:`Ambiguous` with fewer than two padding examples or no other run's
        rows to compare, :class:`Unsupported` when the padding rows do not repeat the first
        example's or the first rows differ from the other run's (NOTE [rows reordered inside
        loss_fn] in ``_row_order``). ``shown``: the padded run's test of the rows' layout
        (default: one row per example); ``rows``: ``x``'s rows in the examples' order
        (default: ``x`` with ``axis`` first), compared across runs."""
        if (self.real or self.batch_size) == 1:
            return
        ev = self.evidence
        sig = ("rows reordered", op, x.shape[:axis] + x.shape[axis + 1:], axis, x.dtype)
        # Every input of this signature counts, so that a padded run compares each with
        # the same input of an earlier run whatever either's walk found.
        key = ev.occurrence(sig) if ev is not None else None
        why = self._walk(x, axis)
        if why is None:
            if key is not None and self.real is not None and key in ev.seen and not self._drew():
                # NOTE [examples split by a view] in _row_order: an earlier run of this
                # call could not show this input's order, and this one finds no op to
                # name: its first rows must still be that run's.
                rows = _in_examples_order(x, axis, rows)
                before = ev.seen[key]
                if before.shape[0] > rows.shape[0] or not self.same_rows(rows[:before.shape[0]], before):
                    raise Unsupported(
                        f"{self._reading(slots, op)} whose examples are arranged differently at "
                        "different batch sizes (its rows in a padded run are not the unpadded "
                        "run's, which passed through an op that may reorder them), which the "
                        "per-row rules cannot read; method='vmap' runs each example alone")
            return
        if ev is not None:
            ev.walk_found = True
        if isinstance(why, BatchStatistics):  # NOTE [batch norm without parameters]
            raise ValueError(batch_norm_error(self.fn, f"before {self._reading(slots, op, reads=True)}: "
                                              f"{why}"))
        if isinstance(why, Mixed):  # NOTE [statistics over the examples] in _row_order
            raise Unsupported(
                f"{self._reading(slots, op)} computed with {why}: each "
                "example's loss then depends on the others, which per-example gradients "
                "exclude (clipping them would not bound one example's influence); "
                "method='vmap' runs each example alone, computing the statistic over that "
                "example only")
        rows = _in_examples_order(x, axis, rows)
        if ev is not None and ev.rows is not None and ev.rows_for(sig):
            return  # shown by a padded run of an earlier call with these shapes
        if self.real is None:
            why = (f"{self._reading(slots, op, reads=True)} whose examples passed through {why}, which may "
                   "have reordered them; only a padded batch can show whether its rows are "
                   "in the batch's order (NOTE [rows reordered inside loss_fn])")
            if ev is None:
                raise Unproven(why)
            ev.earlier_rows(key, rows.clone())  # kept for the padded run to compare
            self.unproven = self.unproven or why  # the run goes on to keep any others
            return
        before = ev.earlier_rows(key, rows.clone()) if ev is not None else None
        drew = self._drew()
        if self.batch_size - self.real < 2 or (before is None and ev is not None and not drew):
            raise Ambiguous(f"{self._reading(slots, op, reads=True)} whose examples passed through {why}: "
                            "showing their order takes two padding examples and the rows of "
                            "a run of another size")
        if (shown() if shown is not None else self.padding_rows_repeat(rows)) and (
                before is None or before.shape[0] > rows.shape[0] or drew
                or self.same_rows(rows[:before.shape[0]], before)):
            if ev is not None:
                ev.note_rows(sig, True)
            return
        if isinstance(why, Weighted):  # NOTE [loss weights with no graph] in _row_order
            raise Unsupported(
                f"{self._reading(slots, op)} computed with {why}: they changed when copies of "
                "the first example joined the batch, so each example's loss depends on the "
                "others (class weights from the batch's labels?), which per-example gradients "
                "exclude; method='vmap' runs each example alone, weighting it as a batch of one")
        raise Unsupported(
            f"{self._reading(slots, op)} whose examples were reordered inside loss_fn ({why}: "
            "row b is not example b), which the per-row rules cannot read; method='vmap' runs "
            "each example alone")

    def _reading(self, slots: list[int], op: str, reads: bool = False) -> str:
        """What reads a checked input, for :meth:`rows_in_order`'s messages: a rule (``"`w`
        is used by `F.linear` on an input"``, or ``reads``: ``"`F.linear` reads an input"``),
        or, with no slots, the backward of the losses (``"loss_fn returns losses"``)."""
        if not slots:
            return f"{op} returns losses"
        return f"`{op}` reads an input" if reads else f"{self._subject(slots)} used by `{op}` on an input"

    def _walk(self, x: torch.Tensor, axis: int) -> str | None:
        """:func:`~._row_order.reordered_by` for a rule input with a graph, skipped where an
        earlier run's walks found nothing (``_padding._WALKED``)."""
        if x.grad_fn is None:
            return None
        ev = self.evidence
        if ev is not None:  # skip the walk where an earlier run's found nothing (_padding._WALKED)
            ev.names.append(self._fingerprint(x.grad_fn))
            n, known = len(ev.names), ev.known
            if known is not None and len(known) >= n and known[n - 1] == ev.names[-1]:
                return None
            ev.known = None  # the history differs from that run's: walk from here on
        first = _next_node_number()
        if self._sources is None:  # (the losses' walk runs after the forward's modes)
            with torch.inference_mode(False), torch.enable_grad():
                self._sources = {get_gradient_edge(t).node for arg in self.batch_args
                                 for t in _tree.leaves(arg) if isinstance(t, torch.Tensor)
                                 and t.requires_grad and t.grad_fn is None}
        why = reordered_by(x, axis, self.rule_nodes, self._order_memo, self._sources)
        # nodes the walk made (get_gradient_edge of a leaf makes a view) are not the
        # model's: left out of the count of later records, which must not depend on
        # whether this run walked
        self._first_node += _next_node_number() - first
        if ev is not None and self._order_memo.get(VALUES_READ):
            ev.walk_found = True  # NOTE [an index in order this time]: walk every call
        return why

    def _fingerprint(self, node: Any) -> str:
        """The names of the first :data:`_PRINT_NODES` autograd nodes of ``node``'s history,
        breadth first, up to earlier rules' outputs and leaves, and how many autograd nodes
        this run made before ``node``: what a later call must meet at this rule input to
        skip its walk (NOTE [rows reordered inside loss_fn] in ``_row_order``)."""
        names, todo, seen = [f"#{_node_number(node) - self._first_node}"], [node], {node}
        while todo and len(names) <= _PRINT_NODES:
            n = todo.pop(0)
            names.append(n.name() + (" (batch statistics)" if batch_statistics(n) else ""))
            if n in self.rule_nodes:
                continue
            for m, _ in n.next_functions:
                if m is not None and m not in seen:
                    seen.add(m)
                    todo.append(m)
        return "<".join(names)

    def _drew(self) -> bool:
        """Whether this padded run has drawn from PyTorch's global generators (its rows
        then differ from the unpadded run's by their draws alone)."""
        return self._rng is not None and not all(
            torch.equal(a, b) for a, b in zip(self._rng, rng_states(), strict=True))

    def _keeps_rows(self, x: torch.Tensor) -> bool:
        """Whether ``x`` was computed by elementwise ops alone from the output of a rule
        whose input had ``m`` rows per example, and has that output's shape.

        # NOTE [rows kept through elementwise ops]
        A position-wise rule on merged rows (NOTE [examples merged into axis 0]) gives an
        output whose row ``r`` is computed from its input's row ``r``, so it has ``m`` rows
        per example too; :meth:`record` notes its autograd node and shape. An elementwise
        op keeps that: its row ``r`` reads row ``r`` of its one input that has a graph
        (other inputs, a dropout mask or a constant, are broadcast to it). So when ``x``'s
        autograd history, walked back through nodes of elementwise ops that have one
        input with a graph (at most :data:`_KEEP_WALK` of them), reaches such an output of
        ``x``'s own shape, ``x`` has its rows. OPT's feed-forward block, ``fc2(dropout(
        relu(fc1(h.view(-1, d)))))``, reads such rows: before, ``fc2``'s input needed the
        padded run of NOTE [examples merged into axis 0], which dropout in training mode
        defeats (the padding rows draw masks of their own), and ``auto`` fell back to
        ``vmap``, which cannot run Hugging Face's mask code. An op outside the list, or a
        second input with a graph (a residual sum of two activations), ends the walk with
        no answer, and the padded run decides as before.
        """
        node = x.grad_fn
        for _ in range(_KEEP_WALK):
            if node is None:
                return False
            shape = self.merged_rows.get(node)
            if shape is not None:
                return shape == x.shape
            if node.name() not in _ELEMENTWISE_NODES:
                return False
            inputs = [n for n, _ in node.next_functions if n is not None]
            if len(inputs) != 1:
                return False
            node = inputs[0]
        return False

    def _merges_examples(self, x: torch.Tensor, op: str, slots: list[int]) -> bool:
        """Whether ``x`` is a reshape of a tensor whose axis 0 holds the examples
        (``h.view(-1, F)`` of an activation ``(B, T, F)``: Hugging Face's ``Conv1D``, a
        flattened FFN; ``x.reshape(B * K, C, H, W)`` of the batch). ``x`` is contiguous over
        the base's memory, and the base fills it densely with axis 0 outermost (attention's
        ``(B, H, T, d)`` output viewed from its ``(B, T, H, d)`` buffer is such a base):
        example ``b`` is the ``b``-th ``1/B`` of that memory, so ``x``'s rows are
        ``m`` consecutive rows per example by construction, which the padded run of NOTE
        [examples merged into axis 0] would otherwise have to show from values, and
        cannot when dropout in training mode draws the padding rows anew."""
        base = x._base
        if (base is None or base.dim() < 2 or base.shape[0] != self.batch_size
                or base.numel() != x.numel() or x.storage_offset() != base.storage_offset()
                or not x.is_contiguous() or not _dense(base)
                or base.stride(0) * self.batch_size != base.numel()):  # examples outermost
            return False
        try:  # the base's axis 0 must hold the examples, by the Linear's check
            return self.check_input(base, op, slots, min_dim=2, features=1) == 0
        except Unsupported:
            return False

    @property
    def batch_data(self) -> list[torch.Tensor]:
        """The tensors of :attr:`batch_args` with the batch on axis 0, gathered once."""
        if self._batch_data is None:
            self._batch_data = [leaf for arg in self.batch_args for leaf in _tree.leaves(arg)
                                if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1
                                and leaf.shape[0] == self.batch_size]
        return self._batch_data

    def permuted_batch(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a batch argument re-indexed with its axis 0 moved to axis 1
        (NOTE [sequence-first inputs])."""
        if not self.batch_data or x.dim() < 2:
            return False
        pairs = sorted(zip(x.shape, x.stride(), strict=True))
        for a in self.batch_data:
            if (a.dtype == x.dtype and a.device == x.device and a.dim() == x.dim()
                    and a.storage_offset() == x.storage_offset() and a.stride(0) == x.stride(1)
                    and sorted(zip(a.shape, a.stride(), strict=True)) == pairs
                    and a.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()):
                return True
        return False

    def padding_rows_repeat(self, x: torch.Tensor, m: int = 1) -> bool:
        """Whether ``x``'s rows past the examples equal its first row, as every tensor
        computed example by example from the padded batch does (its padding rows are
        copies of the first example: NOTE [padding an ambiguous batch] in ``_padding``),
        and a table whose first axis only happens to have the padded size does not; with
        ``m`` rows per example (NOTE [examples merged into axis 0]), whether each padding
        example's ``m`` rows equal the first example's.
        Floating rows are compared to a few thousand ulps: batched kernels do not always
        round identical rows identically (a conv backbone under ``no_grad`` gave rows that
        differ in the last bit at batch sizes 2, 3 and 7 here)."""
        real = self.real
        if real is None or x.shape[0] <= real * m:
            return False
        if m > 1:
            x = x.reshape(x.shape[0] // m, m, *x.shape[1:])
        x = x.detach()
        same = self.same_rows(x[real:], x[:1].expand_as(x[real:]))
        if not same and self.evidence is not None:
            self.evidence.unrepeated = True  # random draws, maybe: _padding._padded
        return same

    @staticmethod
    def same_rows(rows: torch.Tensor, want: torch.Tensor) -> bool:
        """Whether ``rows`` equal ``want``; floating ones to a few thousand ulps (see
        :meth:`padding_rows_repeat`)."""
        if not rows.is_floating_point():
            return bool(torch.equal(rows, want))
        eps = 1e3 * torch.finfo(rows.dtype).eps
        return bool(torch.allclose(rows, want, rtol=eps, atol=eps * float(want.abs().max())))

    def flattened_batch(self, x: torch.Tensor) -> bool:
        """Whether the 1-d ``x`` reads a batch argument and has a multiple of ``B`` entries
        (the batch's token ids flattened: NOTE [examples merged into axis 0]); the padded
        run proves the layout."""
        n, B = x.shape[0], self.batch_size
        return x.dim() == 1 and n > B and n % B == 0 and self.reads_batch(x)

    def batch_view(self, x: torch.Tensor) -> bool:
        """Whether ``x`` reads a batch argument with the examples on axis 0 of both: the
        same storage, ``x``'s axis 0 stepping one example at a time, and its start inside
        the first example (NOTE [one-dimensional indices])."""
        for a in self.batch_data:
            step = a.stride(0)
            if (a.device == x.device and x.dim() >= 1 and x.shape[0] == a.shape[0]
                    and x.stride(0) == step and step > 0
                    and 0 <= (x.storage_offset() - a.storage_offset()) * x.element_size()
                    < step * a.element_size()
                    and a.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()):
                return True
        return False

    @staticmethod
    def grad_input(x: torch.Tensor, *others: Any) -> torch.Tensor:
        """``x``, or a detached copy requiring grad when the op's output would have no graph."""
        if x.requires_grad or any(isinstance(o, torch.Tensor) and o.requires_grad for o in others):
            return x
        return x.detach().requires_grad_()

    def record(self, out: torch.Tensor, finish: Callable[..., None], *saved: Any) -> None:
        """Remember ``out``'s gradient edge; ``finish(engine, grad, *saved)`` adds the parts.
        ``out`` may be a leaf requiring grad that a rule handed to an op (NOTE [elementwise
        parameters] in ``_rules_elementwise``): the backward then returns its gradient."""
        node = out.grad_fn
        if node is not None:
            self.rule_nodes.add(node)  # NOTE [rows reordered inside loss_fn]
        proof, self._proof = self._proof, None
        if proof is not None and proof[2] and saved and saved[0] is proof[1]:
            finish = functools.partial(_from_examples_last, finish, proof[0])
        elif (proof is not None and node is not None and saved and saved[0] is proof[1]
                and out.dim() >= 1 and out.shape[0] == proof[0] * self.batch_size):
            self.merged_rows[node] = out.shape  # NOTE [rows kept through elementwise ops]
        if node is None:
            if out.requires_grad:
                self._use(_Use(get_gradient_edge(out), finish, saved))
            return  # else under no_grad: no gradient flows through this use
        base = out._base
        if base is not None and base.grad_fn is not None and _covers(out, base):
            # NOTE [gradient edges, not tensors]: a view of the whole of a fresh tensor.
            self.rule_nodes.add(base.grad_fn)
            self._use(_Use(GradientEdge(base.grad_fn, base.output_nr),
                           functools.partial(_reshaped, finish, (out.shape, out.stride())), saved))
            return
        self._use(_Use(GradientEdge(node, out.output_nr), finish, saved,
                       out if base is not None and base.grad_fn is not None else None))

    def _use(self, use: _Use) -> None:
        self.uses.append(use)
        self.watch.add(use.edge)

    def anchor(self, like: torch.Tensor) -> torch.Tensor:
        """A scalar leaf that requires grad and whose gradient the backward asks for: an
        ``autograd.Function`` that takes it as an input is always run backward, even when
        no other recorded output lies upstream of it (see ``_recurrent``)."""
        a = like.new_zeros(()).requires_grad_()
        self._use(_Use(get_gradient_edge(a), _no_parts, ()))
        return a

    def add(self, kind: str, slot: int, *payload: torch.Tensor) -> None:
        if payload[0].shape[0] != self.batch_size:  # NOTE [examples merged into axis 0]
            payload = self._grouped(kind, payload)
        self.parts.setdefault((kind, slot), []).append(payload)

    def summed_rows(self, form: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    x: torch.Tensor, g: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """``form(x, g)``: per-row parts of ``param`` (one per row of the op's input ``x``
        and output gradient ``g``), as per-example sums ``(B, ...)``. With ``m`` rows per
        example (NOTE [examples merged into axis 0]) they are formed for a chunk of
        examples at a time, so that at most about ``MERGED_BYTES`` of per-row parts exist
        at once: a conv layer's per-row weight gradients, ``B * K`` of them, would
        otherwise all be formed before their sum."""
        B, n = self.batch_size, x.shape[0]
        if n == B:
            return form(x, g)
        m = n // B
        step = max(1, MERGED_BYTES // max(1, m * param.numel() * g.element_size()))
        out = None
        for s in range(0, B, step):
            e = min(B, s + step)
            t = form(x[s * m:e * m], g[s * m:e * m])
            t = t.reshape(e - s, m, *t.shape[1:]).sum(1)
            if step >= B:  # one chunk: the whole batch
                return t
            if out is None:  # the parts' own shape and dtype (autocast)
                out = t.new_empty(B, *t.shape[1:])
            out[s:e] = t
        assert out is not None
        return out

    def _grouped(self, kind: str, payload: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A part whose rows are ``m`` consecutive rows per example (NOTE [examples merged
        into axis 0]) as a part of one row per example: a position-wise part (``outer``,
        ``sum``, ``embed``) takes the ``m`` rows as more positions, a ``direct`` one sums
        them."""
        B = self.batch_size
        n = payload[0].shape[0]
        if n % B:  # pragma: no cover - check_input admits multiples of B only
            raise AssertionError(f"a {kind} part of {n} rows for a batch of {B}")
        m = n // B
        if kind == "direct":
            t = payload[0]
            return (t.reshape(B, m, *t.shape[1:]).sum(1),)
        if kind == "outer":  # (B m, G, n, d) -> (B, G, m n, d)
            return tuple(t.reshape(B, m, *t.shape[1:]).transpose(1, 2).reshape(B, t.shape[1], -1, t.shape[3])
                         for t in payload)
        if kind == "sum":
            return (payload[0].reshape(B, -1, payload[0].shape[-1]),)
        if kind == "embed":
            idx, rows = payload
            return idx.reshape(B, -1), rows.reshape(B, -1, rows.shape[-1])
        raise Unsupported(f"a per-sample gradient part of kind {kind!r} cannot take the examples "
                          "merged into axis 0 (NOTE [examples merged into axis 0])")

    # -- after the forward ------------------------------------------------------------------

    def backward(self, losses: torch.Tensor) -> None:
        """One backward of ``losses`` (shape ``(B,)``) to every recorded output edge."""
        if self.uses and losses.requires_grad:  # NOTE [statistics in the loss] in _row_order
            self.rows_in_order(losses, 0, "loss_fn", [])
        if self.unproven is not None:  # NOTE [rows reordered inside loss_fn] in _row_order
            raise Unproven(self.unproven)
        if self.watch.inner:  # NOTE [a backward inside loss_fn]
            raise Unsupported(
                "loss_fn runs a backward with a graph (torch.autograd.grad or Tensor.backward "
                "with create_graph=True) through a call that uses a parameter; the fast methods "
                "cannot differentiate through that gradient (they would take it as a constant). "
                "method='vmap' differentiates through a torch.func.grad written in its place")
        for use in self.uses:
            # (packed by saved-tensor hooks, the tensors are not held: as autograd's own)
            if use.unpack is None and use.versions != tuple(
                    t._version for t in use.saved if isinstance(t, torch.Tensor)):
                raise RuntimeError(
                    "a tensor saved for per-sample gradients was modified by an in-place "
                    "operation after it was used; make that operation out of place")
            if use.watch is not None and use.watch[0]._version != use.watch[1]:
                raise Unsupported(
                    f"the output of a call of type {type(use.edge.node).__name__} that uses a "
                    "parameter, a view of part of a larger tensor, was changed in place "
                    "afterwards, which leaves no gradient at it: make that operation out "
                    "of place")
        if not self.uses or not losses.requires_grad:
            return
        self.watch.backward = True
        hooked = self.watch.seen
        try:
            grads = torch.autograd.grad(
                losses, [u.edge for u in self.uses], grad_outputs=torch.ones_like(losses),
                allow_unused=True)
        except RuntimeError as e:
            if "torch.utils.checkpoint" not in str(e):
                raise
            raise ValueError(
                f"{self.fn}: the model uses activation checkpointing (torch.utils.checkpoint), "
                "which recomputes the checkpointed block during the backward, after loss_fn "
                "has returned and torch.func.functional_call has put the module's own "
                "parameters back: the recompute reads those, not the ones passed, so no method "
                "can give per-example gradients through it (vmap refuses its saved-tensor "
                "hooks). Turn checkpointing off for this call (Hugging Face: "
                "model.gradient_checkpointing_disable()). The error: "
                f"{str(e).splitlines()[0]}") from None
        for use, g in zip(self.uses, grads, strict=True):  # NOTE [tensor hooks on a recorded output]
            seen = hooked.get(use.edge.node, {}).get(use.edge.output_nr)
            if g is not None and seen is not None and seen != (g.data_ptr(), tuple(g.shape)):
                raise Unsupported(
                    f"loss_fn registers a tensor hook (Tensor.register_hook) on the output of "
                    f"a call of type {type(use.edge.node).__name__} that uses a parameter, "
                    "which replaces that output's gradient after the fast methods read it; "
                    "method='vmap' applies it to each example")
        with torch.no_grad():
            for use, g in zip(self.uses, grads, strict=True):
                if g is not None:
                    use.finish(self, g, *_like(use.unpacked(), g))
        self.uses.clear()
