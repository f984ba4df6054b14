"""Control flow and memory: ``scan`` (``lax.scan`` semantics) and ``checkpoint`` (remat)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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
    ``f`` is run once on fake tensors (``fp.eval_shape``) to find it.

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
      ValueError: if ``f`` changes the carry's structure, or the shape of a carry leaf.

    Examples:
      >>> step = lambda c, x: (c + x, c * x)
      >>> carry, ys = scan(step, torch.tensor(0.), torch.tensor([1., 2., 3.]))
      >>> carry, ys
      (tensor(6.), tensor([0., 2., 9.]))
    """
    fn = "scan(f, init, xs)"
    paths, x_leaves, x_def = _tree.flatten_with_path(xs)
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
    carry_shapes = [x.shape if isinstance(x, torch.Tensor) else None for x in carry_init]
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
        for path, a, b in zip(carry_paths, carry_shapes, _tree.leaves(carry), strict=True):
            if a is not None and isinstance(b, torch.Tensor) and b.shape != a:
                raise ValueError(
                    f"{fn}: f must keep the carry's shapes (as lax.scan), but the carry at path "
                    f"`{_tree.keystr(path)}` had shape {tuple(a)} and f returned shape "
                    f"{tuple(b.shape)} at step {i}"
                )
    if n == 0:
        return carry, _empty_ys(f, init, x_leaves, x_def, fn)
    if ys[0] is None or not _tree.leaves(ys[0]):
        return carry, ys[0]
    return carry, _tree.stack(ys)


def _empty_ys(f: Callable[[Any, Any], tuple[Any, Any]], init: Any, x_leaves: list[Any], x_def: Any,
              fn: str) -> Any:
    """The ``ys`` of a zero-step scan: ``y``'s structure with a leading axis of 0."""
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
    return _tree.map(
        lambda s: torch.empty((0, *s.shape), dtype=s.dtype, device=s.device)
        if isinstance(s, ShapeDtypeStruct) else s,
        out[1], is_leaf=lambda s: isinstance(s, ShapeDtypeStruct),
    )


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
    """Forward without saving activations; recompute them in backward via ``vjp``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(holder: Any, *leaves: Any) -> tuple[Any, ...]:  # type: ignore[override]
        f, in_def = holder.f, holder.in_def
        if holder.grad:  # NOTE [tensors checkpoint does not receive]
            with _ClosedOver(leaves):
                out = f(*_tree.unflatten(in_def, leaves))
        else:
            out = f(*_tree.unflatten(in_def, leaves))
        out_leaves, holder.out_def = _tree.flatten(out)
        return tuple(out_leaves)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        holder, *leaves = inputs
        ctx.holder = holder
        ctx.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        ctx.others = [None if t else x for x, t in zip(leaves, ctx.is_tensor, strict=True)]
        tensors = [x for x, t in zip(leaves, ctx.is_tensor, strict=True) if t]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def _function(ctx: Any, detach: bool) -> tuple[Callable[..., tuple[Any, ...]], list[Any], list[int]]:
        """``(g, leaves, diff_idx)``: ``f`` as a function of its floating/complex tensor
        leaves (the others fixed at their saved values)."""
        holder = ctx.holder
        saved = iter(ctx.saved_tensors)
        leaves = [next(saved) if t else o for t, o in zip(ctx.is_tensor, ctx.others, strict=True)]
        if detach:
            leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
        diff_idx = [i for i, x in enumerate(leaves)
                    if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())]

        def g(*diff: torch.Tensor) -> tuple[Any, ...]:
            full = list(leaves)
            for i, x in zip(diff_idx, diff, strict=True):
                full[i] = x
            return tuple(_tree.leaves(holder.f(*_tree.unflatten(holder.in_def, full))))

        return g, leaves, diff_idx

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[Any, ...]:
        # Forward mode stores no activations anyway: the jvp of f itself, recomputed.
        g, leaves, diff_idx = _Remat._function(ctx, detach=False)
        ts = [torch.zeros_like(leaves[i]) if tangents[1 + i] is None else tangents[1 + i] for i in diff_idx]
        _, out_t = torch.func.jvp(g, tuple(leaves[i] for i in diff_idx), tuple(ts))
        return tuple(out_t)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        # NOTE [checkpoint backward and create_graph]
        # Grad mode is on in a backward only when the outer backward builds a graph
        # (create_graph=True, an outer fp.grad/jacrev level). Only then may the recomputed
        # gradients stay attached to the saved inputs; otherwise they were returned with a
        # graph to the (requires-grad) saved leaves, and a training loop's parameters
        # carried an ever-growing history from step to step.
        create_graph = torch.is_grad_enabled()
        g, leaves, diff_idx = _Remat._function(ctx, detach=not create_graph)
        with torch.set_grad_enabled(create_graph):
            _, vjp_fn = torch.func.vjp(g, *[leaves[i] for i in diff_idx])
            cts = tuple(torch.zeros_like(o) if gr is None else gr for gr, o in zip(grads, _, strict=True))
            in_grads = vjp_fn(cts)
        out: list[Any] = [None] * len(leaves)
        for i, gi in zip(diff_idx, in_grads, strict=True):
            out[i] = gi if create_graph else gi.detach()
        return (None, *out)


class _Holder:
    def __init__(self, f: Callable[..., Any], in_def: Any) -> None:
        self.f = f
        self.in_def = in_def
        self.out_def: Any = None
        self.grad = torch.is_grad_enabled()  # at the call: a gradient may be asked for


def checkpoint(f: Callable[..., Any]) -> Callable[..., Any]:
    """Rematerialise ``f`` (``jax.checkpoint``): its activations are not stored for the
    backward pass but recomputed, trading compute for memory.

    Unlike ``torch.utils.checkpoint`` (whose saved-tensor hooks ``vmap`` rejects, and
    whose recompute runs after ``apply`` has returned, so it cannot run inside a
    functionalized module), this works under ``fp.grad``, ``fp.vmap`` and
    ``loss.backward()``, and around ``apply`` itself:
    ``checkpoint(lambda v, x: model.apply(v, x))``. ``f`` must be deterministic (no
    global-RNG draws; pass an ``fp.random`` key instead), and must receive every tensor
    it differentiates as an argument: one it reads from its closure that requires grad (a
    module's parameters inside its ``forward``) would get no gradient, so it raises a
    ``ValueError`` naming it.

    Args:
      f: a deterministic function of tensors/pytrees.

    Returns:
      A function with ``f``'s signature and outputs whose backward pass recomputes ``f``'s
      activations.

    Examples:
      >>> import functorch_pipeline as fp
      >>> f = checkpoint(lambda x: x.sin().sin())
      >>> torch.allclose(fp.grad(lambda x: f(x).sum())(torch.ones(3)),
      ...                fp.grad(lambda x: x.sin().sin().sum())(torch.ones(3)))
      True
    """

    @functools.wraps(f)
    def wrapped(*args: Any) -> Any:
        leaves, in_def = _tree.flatten(args)
        holder = _Holder(f, in_def)
        out = _Remat.apply(holder, *leaves)
        return _tree.unflatten(holder.out_def, list(out))

    return wrapped


remat = checkpoint
