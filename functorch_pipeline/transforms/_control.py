"""Control flow and memory: ``scan`` (``lax.scan`` semantics) and ``checkpoint`` (remat)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.func
from torch.overrides import TorchFunctionMode

from functorch_pipeline import tree as _tree
from functorch_pipeline.transforms._eval_shape import ShapeDtypeStruct
from functorch_pipeline.transforms._eval_shape import eval_shape

__all__ = ["checkpoint", "remat", "scan"]


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> tuple[Any, Any]:
    """Loop ``f(carry, x) -> (carry, y)`` over the leading axis of ``xs`` (``lax.scan``).

    Returns ``(final_carry, ys)`` where ``ys`` stacks every ``y`` on a new leading axis
    (``None`` if ``f`` returns ``y=None``). ``xs`` may be any pytree (or ``None`` with
    ``length``); with ``reverse=True`` the loop runs from the end and ``ys`` keeps the
    order of ``xs``. The carry must keep its structure, shapes and dtypes. Over zero
    steps ``ys`` has ``y``'s structure with a leading axis of 0, as in ``lax.scan``:
    ``f`` is run once on fake tensors (``fp.eval_shape``) to find it (a Python-number
    leaf of ``y`` becomes an empty tensor of the dtype ``torch.as_tensor`` gives it, as
    for one step or more).

    It is an eager Python loop, differentiable and vmappable like any PyTorch code.

    Args:
      f: ``f(carry, x) -> (carry, y)``.
      init: the initial carry (any pytree).
      xs: a pytree whose leaves are scanned along axis 0, or ``None``.
      length: the number of steps when ``xs`` is ``None`` (must agree with ``xs`` when both are
        given).
      reverse: run from the last element to the first.
      unroll: accepted for ``lax.scan`` compatibility and ignored: the loop is eager
        Python, so there is nothing to unroll (results do not depend on it).

    Returns:
      ``(final_carry, ys)``, ``ys`` stacked on a new leading axis.

    Raises:
      TypeError: if a leaf of ``xs`` is not a tensor with a leading axis, or ``length`` is
        not an int.
      ValueError: if ``length`` is negative or disagrees with ``xs``, or if ``f`` changes
        the carry's structure, or the shape or dtype of a carry leaf.

    Examples:
      >>> step = lambda c, x: (c + x, c * x)
      >>> carry, ys = scan(step, torch.tensor(0.), torch.tensor([1., 2., 3.]))
      >>> carry, ys
      (tensor(6.), tensor([0., 2., 9.]))
    """
    fn = "scan(f, init, xs)"
    if length is not None:
        length = _length(length, fn)
    paths, x_leaves, x_def = _tree.flatten_with_path(xs)
    for p, x in zip(paths, x_leaves, strict=True):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            got = (f"a 0-d tensor ({x.dtype})" if isinstance(x, torch.Tensor)
                   else f"a {type(x).__name__} ({x!r})")
            raise TypeError(
                f"{fn}: every leaf of `xs` must be a tensor with a leading axis to scan over, "
                f"but the leaf at path `{_tree.keystr(p)}` is {got}"
            )
    if x_leaves:
        sizes = {p: x.shape[0] for p, x in zip(paths, x_leaves, strict=True)}
        n = next(iter(sizes.values()))
        bad = {_tree.keystr(p): s for p, s in sizes.items() if s != n}
        if bad:
            raise ValueError(f"{fn}: leaves of `xs` must share their leading size {n}, but {bad} differ")
        if length is not None and length != n:
            raise ValueError(f"{fn}: `length` is {length} but `xs` has leading size {n}")
    elif length is None:
        raise ValueError(f"{fn}: with no `xs`, give `length`")
    else:
        n = length
    if not isinstance(unroll, (int, bool)):
        raise TypeError(f"{fn}: `unroll` must be an int or bool, got {type(unroll).__name__}")
    carry_def = _tree.structure(init)
    carry_paths, carry_init, _ = _tree.flatten_with_path(init)
    carry_meta = [(x.shape, x.dtype) if isinstance(x, torch.Tensor) else None for x in carry_init]
    carry = init
    ys: list[Any] = [None] * n
    order = range(n - 1, -1, -1) if reverse else range(n)
    for i in order:
        x = _tree.unflatten(x_def, [leaf[i] for leaf in x_leaves]) if x_leaves else None
        out = f(carry, x)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"{fn}: f must return a pair (carry, y), got {type(out).__name__}")
        carry, ys[i] = out
        if _tree.structure(carry) != carry_def:
            raise ValueError(
                f"{fn}: f changed the carry's structure from {carry_def} to {_tree.structure(carry)}"
            )
        for path, a, b in zip(carry_paths, carry_meta, _tree.leaves(carry), strict=True):
            if a is not None and isinstance(b, torch.Tensor) and (b.shape != a[0] or b.dtype != a[1]):
                raise ValueError(
                    f"{fn}: f must keep the carry's shapes and dtypes (as lax.scan), but the "
                    f"carry at path `{_tree.keystr(path)}` had shape {tuple(a[0])} and dtype "
                    f"{a[1]} and f returned shape {tuple(b.shape)} and dtype {b.dtype} at step {i}"
                )
    if n == 0:
        return carry, _empty_ys(f, init, x_leaves, x_def, fn)
    if ys[0] is None or not _tree.leaves(ys[0]):
        return carry, ys[0]
    return carry, _tree.stack(ys)


def _length(length: Any, fn: str) -> int:
    """``length`` as a non-negative Python int (NumPy integers and 0-d integer tensors too)."""
    try:
        if isinstance(length, (bool, np.bool_)) or (
            isinstance(length, torch.Tensor) and length.dtype == torch.bool
        ):
            raise TypeError
        n = operator.index(length)
    except TypeError:
        raise TypeError(f"{fn}: `length` must be an int, got {type(length).__name__} {length!r}") from None
    if n < 0:
        raise ValueError(f"{fn}: `length` must be non-negative, got {n}")
    return n


def _empty_ys(f: Callable[[Any, Any], tuple[Any, Any]], init: Any, x_leaves: list[Any], x_def: Any,
              fn: str) -> Any:
    """The ``ys`` of a zero-step scan: ``y``'s structure with a leading axis of 0. A leaf
    that is a Python number becomes an empty tensor of the dtype ``torch.as_tensor`` gives
    it, as a scan of one step or more stacks it (``lax.scan`` likewise)."""
    structs = [ShapeDtypeStruct(t.shape[1:], t.dtype, t.device) for t in x_leaves]
    x = _tree.unflatten(x_def, structs) if x_leaves else None
    try:
        out = eval_shape(f, init, x)
    except Exception as e:  # a data-dependent f cannot run on fake tensors
        raise RuntimeError(
            f"{fn}: over zero steps f is run on fake tensors (fp.eval_shape) to find the shape "
            f"of y, and that failed: {type(e).__name__}: {e}. Skip the call when the length is 0, "
            "or make f's output shape independent of the data"
        ) from e
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"{fn}: f must return a pair (carry, y), got {type(out).__name__}")

    def empty(s: Any) -> Any:
        if isinstance(s, (bool, int, float, complex, np.number, np.bool_)):
            t = torch.as_tensor(s)
            return torch.empty((0, *t.shape), dtype=t.dtype)
        if isinstance(s, ShapeDtypeStruct):
            return torch.empty((0, *s.shape), dtype=s.dtype, device=s.device)
        return s

    return _tree.map(empty, out[1], is_leaf=lambda s: isinstance(s, ShapeDtypeStruct))


def _tensors(values: Any) -> Any:
    """The tensors among ``values`` and in its lists and tuples (an op's arguments)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


class _ClosedOver(TorchFunctionMode):
    """Refuses a tensor that requires grad and is not one of ``f``'s arguments.

    # NOTE [tensors checkpoint does not receive]
    ``checkpoint`` is an ``autograd.Function`` of ``f``'s arguments: a tensor ``f`` reads
    from its closure (``self.l2`` inside a module's forward, the parameters that
    ``functional_call`` swapped in) is no input of it, so autograd gave it no gradient,
    silently 0 (under ``loss.backward()`` and ``fp.grad``), and under ``fp.vmap`` the
    closure's wrapped tensor failed a PyTorch internal assert. Rebuilding such a tensor in
    the backward cannot help either: by then ``functional_call`` has put the module's own
    parameters back. So while ``f`` runs forward, every op's tensor arguments are checked
    and one that requires grad without being an argument or a tensor ``f`` made is refused,
    naming its shape and the op. A call made with gradients off (``torch.no_grad()``,
    inference) is not checked. The price: a call that wants only the gradients of ``f``'s
    arguments (a saliency map through a checkpointed module whose parameters require
    grad) is refused too, though it worked; its message says to turn the parameters'
    ``requires_grad`` off, since no forward can tell which gradients a backward will ask.
    """

    def __init__(self, inputs: Any) -> None:
        super().__init__()
        # f's arguments, and the tensors f makes (an inner derivative of its own tensor)
        self.known = {id(t) for t in inputs if isinstance(t, torch.Tensor)}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for t in _tensors((*args, *kwargs.values())):
            if id(t) not in self.known and t.requires_grad:
                name = getattr(func, "__name__", repr(func))
                raise ValueError(
                    "checkpoint: f reads a tensor that requires grad and is not one of its "
                    f"arguments (shape {tuple(t.shape)}, {t.dtype}, used by `{name}`): it "
                    "would get no gradient. Pass it to f as an argument, e.g. "
                    "checkpoint(lambda params, x: torch.func.functional_call(block, params, "
                    "(x,)))(dict(block.named_parameters()), x), or "
                    "checkpoint(lambda v, x: model.apply(v, x)) for an fp.nn model; if only "
                    "the gradients of f's arguments are wanted (a saliency map), turn that "
                    "tensor's requires_grad off (model.requires_grad_(False))")
        out = func(*args, **kwargs)
        for t in _tensors(out if isinstance(out, (list, tuple)) else (out,)):
            self.known.add(id(t))
        return out


class _Remat(torch.autograd.Function):
    """Forward without saving activations; recompute them in backward via ``vjp``.

    # NOTE [what checkpoint differentiates]
    The Function's inputs are the leaves of ``(args, kwargs)``; its outputs are the tensor
    leaves of ``f``'s output (the other leaves, a Python int, pass beside it in the
    holder). The recompute differentiates only what was asked: in ``backward`` the inputs
    with ``ctx.needs_input_grad`` (not a BatchNorm's running statistics, which
    ``native_batch_norm`` cannot differentiate, nor anything else the caller holds
    constant), in ``jvp`` the inputs that carry a tangent, and in both only ``f``'s
    floating (or complex) outputs: an integer output (``argmax``, a BatchNorm's
    ``num_batches_tracked``) is marked non-differentiable. An input that ``f`` returns
    as-is is returned as a view, since autograd refuses to save an input that is also an
    output (as ``custom_vjp`` does).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(holder: Any, *leaves: Any) -> tuple[Any, ...]:  # type: ignore[override]
        args, kwargs = _tree.unflatten(holder.in_def, leaves)
        if holder.grad:  # NOTE [tensors checkpoint does not receive]
            with _ClosedOver(leaves):
                out = holder.f(*args, **kwargs)
        else:
            out = holder.f(*args, **kwargs)
        out_leaves, holder.out_def = _tree.flatten(out)
        holder.out_is_tensor = [isinstance(x, torch.Tensor) for x in out_leaves]
        holder.out_others = [None if t else x for x, t in zip(out_leaves, holder.out_is_tensor, strict=True)]
        tensors = [x for x in out_leaves if isinstance(x, torch.Tensor)]
        # the floating outputs' positions among f's output leaves / among the Function's outputs
        holder.diff_out = [i for i, x in enumerate(out_leaves) if _floating(x)]
        holder.diff_pos = [j for j, x in enumerate(tensors) if _floating(x)]
        ids = {id(x) for x in leaves if isinstance(x, torch.Tensor)}
        return tuple(x.view_as(x) if id(x) in ids else x for x in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        holder, *leaves = inputs
        ctx.holder = holder
        ctx.set_materialize_grads(False)  # a missing tangent or cotangent stays None
        diff = set(holder.diff_pos)
        ctx.mark_non_differentiable(*[o for j, o in enumerate(output) if j not in diff])
        ctx.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        ctx.others = [None if t else x for x, t in zip(leaves, ctx.is_tensor, strict=True)]
        tensors = [x for x, t in zip(leaves, ctx.is_tensor, strict=True) if t]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def _function(ctx: Any, detach: bool, wanted: list[bool]) -> tuple[Callable[..., tuple[Any, ...]], list[Any], list[int]]:
        """``(g, leaves, diff_idx)``: ``f``'s floating outputs as a function of the floating
        tensor leaves ``wanted`` (the others fixed at their saved values)."""
        holder = ctx.holder
        saved = iter(ctx.saved_tensors)
        leaves = [next(saved) if t else o for t, o in zip(ctx.is_tensor, ctx.others, strict=True)]
        if detach:
            leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
        diff_idx = [i for i, x in enumerate(leaves) if wanted[i] and _floating(x)]

        def g(*diff: torch.Tensor) -> tuple[Any, ...]:
            full = list(leaves)
            for i, x in zip(diff_idx, diff, strict=True):
                full[i] = x
            args, kwargs = _tree.unflatten(holder.in_def, full)
            out = _tree.leaves(holder.f(*args, **kwargs))
            return tuple(out[i] for i in holder.diff_out)

        return g, leaves, diff_idx

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[Any, ...]:
        # Forward mode stores no activations anyway: the jvp of f itself, recomputed, with
        # respect to the inputs that carry a tangent (NOTE [what checkpoint differentiates]).
        holder = ctx.holder
        g, leaves, diff_idx = _Remat._function(ctx, False, [t is not None for t in tangents[1:]])
        out: list[Any] = [None] * sum(holder.out_is_tensor)
        if diff_idx:
            _, out_t = torch.func.jvp(g, tuple(leaves[i] for i in diff_idx),
                                      tuple(tangents[1 + i] for i in diff_idx))
            for j, t in zip(holder.diff_pos, out_t, strict=True):
                out[j] = t
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        # NOTE [checkpoint backward and create_graph]
        # Grad mode is on in a backward only when the outer backward builds a graph
        # (create_graph=True, an outer fp.grad/jacrev level). Only then may the recomputed
        # gradients stay attached to the saved inputs; otherwise they were returned with a
        # graph to the (requires-grad) saved leaves, and a training loop's parameters
        # carried an ever-growing history from step to step.
        create_graph = torch.is_grad_enabled()
        holder = ctx.holder
        g, leaves, diff_idx = _Remat._function(ctx, not create_graph, list(ctx.needs_input_grad[1:]))
        out: list[Any] = [None] * len(leaves)
        if not diff_idx:
            return (None, *out)
        with torch.set_grad_enabled(create_graph):
            outs, vjp_fn = torch.func.vjp(g, *[leaves[i] for i in diff_idx])
            cts = tuple(torch.zeros_like(o) if grads[j] is None else grads[j]
                        for j, o in zip(holder.diff_pos, outs, strict=True))
            in_grads = vjp_fn(cts)
        for i, gi in zip(diff_idx, in_grads, strict=True):
            out[i] = gi if create_graph else gi.detach()
        return (None, *out)


def _floating(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


class _Holder:
    def __init__(self, f: Callable[..., Any], in_def: Any) -> None:
        self.f = f
        self.in_def = in_def
        self.out_def: Any = None
        self.out_is_tensor: list[bool] = []
        self.out_others: list[Any] = []
        self.diff_out: list[int] = []
        self.diff_pos: list[int] = []
        self.grad = torch.is_grad_enabled()  # at the call: a gradient may be asked for


def checkpoint(f: Callable[..., Any]) -> Callable[..., Any]:
    """Rematerialise ``f`` (``jax.checkpoint``): its activations are not stored for the
    backward pass but recomputed, trading compute for memory.

    Unlike ``torch.utils.checkpoint`` (whose saved-tensor hooks ``vmap`` rejects, and
    whose recompute runs after ``apply`` has returned, so it cannot run inside a
    functionalized module), this works under ``fp.grad``, ``fp.vmap``, ``fp.jvp`` and
    ``loss.backward()``, and around ``apply`` itself, BatchNorm included:
    ``checkpoint(lambda v, x: model.apply(v, x))``. ``f`` must be deterministic (no
    global-RNG draws; pass an ``fp.random`` key instead), and must receive every tensor
    it differentiates as an argument: one it reads from its closure that requires grad (a
    module's parameters inside its ``forward``) would get no gradient, so it raises a
    ``ValueError`` naming it. The recompute differentiates only the arguments a gradient
    or tangent is asked for, and only ``f``'s floating outputs (NOTE [what checkpoint
    differentiates]); ``f`` may return its inputs as-is, integer tensors and non-tensor
    leaves.

    NOTE [what checkpoint differentiates]: in the backward pass only the arguments whose
    gradient is asked for (not a BatchNorm's running statistics, which
    ``native_batch_norm`` cannot differentiate), in forward mode only those with a
    tangent, and in both only floating or complex outputs (an integer output such as
    ``num_batches_tracked`` is non-differentiable); an argument returned as-is comes back
    as a view.

    Args:
      f: a deterministic function of tensors/pytrees (positional and keyword arguments).

    Returns:
      A function with ``f``'s signature and outputs whose backward pass recomputes ``f``'s
      activations.

    Examples:
      >>> import functorch_pipeline as fp
      >>> f = checkpoint(lambda x: x.sin().sin())
      >>> torch.allclose(fp.grad(lambda x: f(x).sum())(torch.ones(3)),
      ...                fp.grad(lambda x: x.sin().sin().sum())(torch.ones(3)))
      True
      >>> scaled = checkpoint(lambda x, s=1.0: x * s)
      >>> fp.grad(lambda x: scaled(x, s=3.0).sum())(torch.ones(2))
      tensor([3., 3.])
    """

    @functools.wraps(f)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        leaves, in_def = _tree.flatten((args, kwargs))
        holder = _Holder(f, in_def)
        tensors = iter(_Remat.apply(holder, *leaves))
        out = [next(tensors) if t else o
               for t, o in zip(holder.out_is_tensor, holder.out_others, strict=True)]
        return _tree.unflatten(holder.out_def, out)

    return wrapped


remat = checkpoint
