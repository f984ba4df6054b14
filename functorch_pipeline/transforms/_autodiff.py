"""Reverse- and forward-mode differentiation with JAX's signatures over torch.func."""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch
import torch.func

from functorch_pipeline import tree as _tree
from functorch_pipeline.transforms._autograd_graph import graph_leaves

__all__ = [
    "grad",
    "hessian",
    "hvp",
    "jacfwd",
    "jacobian",
    "jacrev",
    "jvp",
    "linear_transpose",
    "linearize",
    "value_and_grad",
    "vjp",
]

ArgNums = int | Sequence[int]


def _normalize_argnums(argnums: ArgNums, nargs: int, fn: str) -> tuple[tuple[int, ...], bool]:
    """``(positions, is_tuple)``; negative positions count from the end."""
    is_tuple = not isinstance(argnums, int)
    try:
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    except TypeError:  # a float, None, a tensor's scalar: not an int nor a sequence of them
        nums = ()
    if not nums or not all(isinstance(i, int) and not isinstance(i, bool) for i in nums):
        raise TypeError(f"{fn}: `argnums` must be an int or a non-empty tuple of ints, got {argnums!r}")
    out = []
    for i in nums:
        j = i + nargs if i < 0 else i
        if not 0 <= j < nargs:
            raise ValueError(
                f"{fn}: `argnums` contains {i} but f was called with {nargs} positional arguments"
            )
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: `argnums` has repeated positions: {argnums!r}")
    return tuple(out), is_tuple


def _check_diff_leaves(arg: Any, pos: int, fn: str) -> None:
    for path, leaf in _tree.leaves_with_path(arg):
        if getattr(leaf, "_fp_engine", None) is not None:  # a per-sample engine's parameter
            from functorch_pipeline.transforms._grad_sample._engine import inner_differentiation

            raise inner_differentiation(fn)  # NOTE [differentiating inside loss_fn]
        where = f"argument {pos}" + (f" at path `{_tree.keystr(path)}`" if path else "")
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{fn}: can only differentiate with respect to tensors, but {where} is a "
                f"{type(leaf).__name__}. Close over it or move it to an argument outside `argnums`."
            )
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"{fn}: can only differentiate with respect to floating-point tensors, but "
                f"{where} has dtype {leaf.dtype}. Move it to an argument outside `argnums`."
            )


def _check_scalar(out: Any, has_aux: bool, fn: str) -> torch.Tensor:
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"{fn}: with has_aux=True, f must return a pair (value, aux), got "
                f"{type(out).__name__}"
            )
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{fn}: f must return a scalar tensor, got {type(out).__name__}")
    if out.dim() != 0:
        raise ValueError(
            f"{fn}: f must return a scalar (0-d) tensor, got shape {tuple(out.shape)}. Reduce it "
            "(.sum() or .mean()), or use jacrev/vjp for non-scalar outputs."
        )
    if not out.is_floating_point():
        raise TypeError(f"{fn}: f must return a floating-point scalar, got dtype {out.dtype}")
    return out


def _value_and_grad_impl(
    f: Callable[..., Any], argnums: ArgNums, has_aux: bool, fn: str
) -> Callable[..., tuple[Any, Any]]:
    # NOTE [flattening differentiated arguments]
    # The differentiated arguments are flattened with fp.tree (optree) and torch.func sees
    # only a tuple of tensor lists. This is what lets `None` leaves, NamedTuples and our
    # registered dataclasses pass through whatever torch.utils._pytree thinks of them, and
    # lets us name the key path of a non-differentiable leaf in the error.
    @functools.wraps(f)
    def wrapped(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            # NOTE [gradients under inference mode] (Dynamo cannot trace the query): autograd records nothing there, and
            # torch.func.grad returned zeros under torch 2.11 (right under 2.14); the
            # gradient is taken outside it, on normal copies of inference tensors
            with torch.inference_mode(False):
                args, kwargs = _tree.map(_normal_tensor, (args, kwargs))
                return wrapped(*args, **kwargs)
        nums, is_tuple = _normalize_argnums(argnums, len(args), fn)
        flats, defs = [], []
        for i in nums:
            _check_diff_leaves(args[i], i, fn)
            leaves, treedef = _tree.flatten(args[i])
            flats.append(leaves)
            defs.append(treedef)

        aux_parts: list[Any] = []

        def flat_f(*flat_args: list[torch.Tensor]) -> Any:
            new_args = list(args)
            for i, leaves, treedef in zip(nums, flat_args, defs, strict=True):
                new_args[i] = _tree.unflatten(treedef, leaves)
            out = f(*new_args, **kwargs)
            _check_scalar(out, has_aux, fn)
            if not has_aux:
                return out
            # torch.func accepts only tensors in aux: pass its tensor leaves through and
            # keep the rest (None, numbers, strings) aside, as JAX lets aux be any pytree.
            # NOTE [empty containers in aux]: only Dynamo needs it; eager calls skip the callback
            aux_leaves, aux_def = _tree.flatten(
                out[1], is_leaf=_empty_container if torch.compiler.is_compiling() else None)
            aux_parts[:] = [aux_def, aux_leaves, out[1]]
            return out[0], [x for x in aux_leaves if isinstance(x, torch.Tensor)]

        if _plain_autograd_ok(args, kwargs):
            grads, value = _autograd_grad_and_value(flat_f, flats, has_aux, fn)
        else:
            grads, value = torch.func.grad_and_value(flat_f, argnums=tuple(range(len(nums))), has_aux=has_aux)(*flats)
        trees = tuple(_tree.unflatten(d, g) for d, g in zip(defs, grads, strict=True))
        if has_aux:
            loss, tensors = value
            aux_def, aux_leaves, aux_out = aux_parts
            if not tensors:  # f's own object: nothing to rebuild
                aux = aux_out
            else:
                it = iter(tensors)
                aux = _tree.unflatten(aux_def, [next(it) if isinstance(x, torch.Tensor) else x
                                                for x in aux_leaves])
            value = (loss, aux)
        return value, (trees if is_tuple else trees[0])

    return wrapped


def _normal_tensor(x: Any) -> Any:
    """A normal copy of an inference tensor (call outside inference mode), else ``x``."""
    return x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x


def _empty_container(x: Any) -> bool:
    """None or an empty dict, list or tuple (a node without leaves): kept as one aux leaf.

    # NOTE [empty containers in aux]
    Under ``torch.compile`` (torch 2.11-2.14), a treespec with an empty dict node, made
    inside the traced function, breaks Dynamo's optree polyfill for the trees unflattened
    after it: the gradients' ``{"w", "b"}`` came back as "unhashable type: 'list'" or
    "length mismatch". ``None`` (optree's empty node) does the same. A model without buffers returns ``{}`` as its new buffers, so
    ``fp.jit`` of ``fp.train.train_step`` failed for every such model. Flattened as a leaf
    (passed aside like any non-tensor), an empty container makes no such node. Still
    failing there (ad hoc, torch 2.14): an aux holding a dict but no tensor at all, such
    as ``{"n": 1}`` (a tensor anywhere in the aux, or a tuple or list instead, compiles).
    """
    return x is None or (type(x) in (dict, list, tuple) and len(x) == 0)


# NOTE [eager fast path]
# At the top level (no torch.func transform active, not compiling, no input already
# tracked by autograd) a first-order gradient is exactly what torch.autograd computes, and
# plain autograd skips functorch's per-op dispatch through its interpreter stack, which
# costs ~10-20 us per op: with keyed dropout (many small integer ops) it made a CNN
# training step ~1.5x slower than loss.backward(). Anywhere else -- inside vmap/grad/jvp,
# under torch.compile, or when an input already requires grad (so the result must stay
# differentiable for an outer autograd) -- torch.func.grad_and_value is used. A tensor f
# reads from its closure that requires grad (module parameters) is no input: when the
# loss's graph reaches one, the fast path differentiates with create_graph=True and keeps
# the value attached, as torch.func.grad does (NOTE [eager fast path and closed-over
# tensors]); finding out walks the graph once (~0.5 us per node).
# Inference mode also takes torch.func: under torch.inference_mode() enable_grad records
# nothing (the loss looked constant: silent zero gradients), and plain autograd refuses a
# tensor made under inference mode ("Setting requires_grad=True on inference tensor",
# "Inference tensors cannot be saved for backward") where torch.func.grad takes it, so an
# argument with such a leaf goes there too (``is_inference()`` is an attribute read, one
# per leaf). An inference tensor f reads from its closure cannot be seen beforehand: the
# fast path then raises, saying what to do (NOTE [inference tensors in the closure]).
def _plain_autograd_ok(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
            or torch.is_inference_mode_enabled()):
        return False
    grad_on = torch.is_grad_enabled()
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for x in _tree.leaves((args, kwargs)):
        if isinstance(x, torch.Tensor) and (
                x.is_inference() or (grad_on and (x.requires_grad or wrapped(x)))):
            return False
    return True


def _autograd_grad_and_value(
    flat_f: Callable[..., Any], flats: list[list[torch.Tensor]], has_aux: bool, fn: str
) -> tuple[tuple[list[torch.Tensor], ...], Any]:
    outer = torch.is_grad_enabled()
    leaves = [[x.detach().requires_grad_() for x in group] for group in flats]
    with torch.enable_grad():
        try:
            out = flat_f(*leaves)
        except RuntimeError as e:
            # NOTE [inference tensors in the closure]: an argument made under
            # torch.inference_mode() is sent to torch.func (NOTE [eager fast path]); one
            # that f closes over is only found here, by autograd's refusal. f is not rerun
            # (its side effects would happen twice): say what to do instead.
            if "Inference tensors cannot be saved for backward" not in str(e):
                raise
            raise RuntimeError(
                f"{fn}: f uses a tensor created under torch.inference_mode() that is not one "
                "of its arguments (it reads it from its closure), and autograd cannot record "
                "an operation on it outside inference mode. Pass that tensor to f as an "
                "argument, or clone it outside inference mode (`t = t.clone()`)."
            ) from e
        loss = out[0] if has_aux else out
        everything = [x for group in leaves for x in group]
        # NOTE [eager fast path and closed-over tensors]: if the loss also depends on a
        # tensor f reads from its closure that requires grad (a critic's parameters under
        # a gradient penalty), torch.func.grad returns a gradient that is differentiable
        # with respect to it; so does this path then (create_graph), else that share of an
        # outer gradient was silently dropped.
        keep = outer and loss.requires_grad and _reaches_other_leaves(loss, everything)
        if everything and loss.requires_grad:
            gs = torch.autograd.grad(loss, everything, allow_unused=True, create_graph=keep)
        else:  # the loss does not depend on the arguments (a constant branch, stop_gradient)
            gs = (None,) * len(everything)
    it = iter(gs)
    grads = tuple([torch.zeros_like(x) if (g := next(it)) is None else g for x in group] for group in leaves)
    if keep:
        return grads, out
    if has_aux:
        return grads, (loss.detach(), _tree.detach(out[1]))
    return grads, loss.detach()


def _reaches_other_leaves(loss: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    """Whether ``loss``'s autograd graph reaches a leaf that requires grad other than
    ``inputs`` (a tensor the function closed over); the walk stops at the first."""
    own = {id(x) for x in inputs}
    return any(id(v) not in own for v in graph_leaves(loss))


def value_and_grad(
    f: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """Like ``jax.value_and_grad``: returns ``(value, grads)``, or ``((value, aux), grads)``
    with ``has_aux=True``. (``torch.func.grad_and_value`` returns the reverse order.)

    Args:
      f: a function returning a scalar (0-d, floating) tensor, or ``(scalar, aux)``.
      argnums: which positional argument(s) to differentiate; with a tuple, ``grads`` is a
        tuple of the same length.
      has_aux: whether ``f`` returns ``(value, aux)``.

    Returns:
      A function with ``f``'s signature returning ``(value, grads)``, where ``grads`` has
      the structure of the differentiated argument(s).

    >>> f = lambda p: (p["w"] ** 2).sum()
    >>> value_and_grad(f)({"w": torch.tensor([1., 2.])})
    (tensor(5.), {'w': tensor([2., 4.])})
    """
    return _value_and_grad_impl(f, argnums, has_aux, "value_and_grad(f)")


def grad(f: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False) -> Callable[..., Any]:
    """Like ``jax.grad``: the gradient of a scalar function with respect to pytrees.

    Returns ``grads``, or ``(grads, aux)`` with ``has_aux=True``. See
    :func:`value_and_grad` for the arguments. If ``f``'s value does not depend on the
    differentiated arguments (a constant ``cond`` branch, ``stop_gradient``), the
    gradient is zeros, as in JAX.

    Complex arguments follow PyTorch's convention, not JAX's: for a real-valued ``f`` of
    a complex ``z`` the result is ``df/dRe(z) + i df/dIm(z)``, the complex conjugate of
    ``jax.grad``'s (so ``z - lr * grad`` descends ``f``); take ``.conj()`` to get JAX's
    number. No ``holomorphic=`` argument is supported.

    Args:
      f: a function returning a scalar (0-d, floating) tensor, or ``(scalar, aux)`` with
        ``has_aux=True``.
      argnums: which positional argument(s) to differentiate; with a tuple, ``grads`` is a tuple of
        the same length.
      has_aux: whether ``f`` returns ``(value, aux)``.

    Returns:
      A function with ``f``'s signature returning ``grads`` (the structure of the differentiated
      argument(s)), or ``(grads, aux)``.

    Examples:
      >>> grad(lambda x, y: (x * y).sum(), argnums=(0, 1))(torch.tensor(2.), torch.tensor(3.))
      (tensor(3.), tensor(2.))
    """
    vg = _value_and_grad_impl(f, argnums, has_aux, "grad(f)")

    @functools.wraps(f)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        value, g = vg(*args, **kwargs)
        return (g, value[1]) if has_aux else g

    return wrapped


def _jac_impl(torch_jac: Callable[..., Any], f: Callable[..., Any], argnums: ArgNums, has_aux: bool,
              fn: str, **options: Any) -> Callable[..., Any]:
    """``torch.func.jacrev``/``jacfwd`` over fp.tree-flattened arguments and outputs (NOTE
    [flattening differentiated arguments]): ``None`` leaves, NamedTuples and registered
    dataclasses pass; the result is nested output structure first, then input structure."""

    @functools.wraps(f)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nums, is_tuple = _normalize_argnums(argnums, len(args), fn)
        flats, defs = [], []
        for i in nums:
            _check_diff_leaves(args[i], i, fn)
            leaves, treedef = _tree.flatten(args[i])
            flats.append(leaves)
            defs.append(treedef)
        out_def: list[Any] = []
        aux_parts: list[Any] = []

        def flat_f(*flat_args: list[torch.Tensor]) -> Any:
            new_args = list(args)
            for i, leaves, treedef in zip(nums, flat_args, defs, strict=True):
                new_args[i] = _tree.unflatten(treedef, leaves)
            out = f(*new_args, **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(f"{fn}: with has_aux=True, f must return a pair (out, aux), "
                                    f"got {type(out).__name__}")
                out, aux = out
                aux_leaves, aux_def = _tree.flatten(aux)
                aux_parts[:] = [aux_def, aux_leaves]
            out_leaves, d = _tree.flatten(out)
            for p, x in zip(_tree.flatten_with_path(out)[0], out_leaves, strict=True):
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"{fn}: f must return tensors, but its output at path "
                                    f"`{_tree.keystr(p)}` is a {type(x).__name__}")
            out_def[:] = [d]
            if has_aux:
                return tuple(out_leaves), [x for x in aux_leaves if isinstance(x, torch.Tensor)]
            return tuple(out_leaves)

        res = torch_jac(flat_f, argnums=tuple(range(len(nums))), has_aux=has_aux, **options)(*flats)
        jac, aux_tensors = res if has_aux else (res, None)
        per_out = []
        for j in jac:  # one entry per output leaf, then one per argnum, then per input leaf
            trees = tuple(_tree.unflatten(d, list(g)) for d, g in zip(defs, j, strict=True))
            per_out.append(trees if is_tuple else trees[0])
        result = _tree.unflatten(out_def[0], per_out)
        if not has_aux:
            return result
        aux_def, aux_leaves = aux_parts
        it = iter(aux_tensors)
        aux = _tree.unflatten(
            aux_def, [next(it) if isinstance(x, torch.Tensor) else x for x in aux_leaves]
        )
        return result, aux

    return wrapped


def jacrev(
    f: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False, *, chunk_size: int | None = None
) -> Callable[..., Any]:
    """The Jacobian by reverse mode (``jax.jacrev``); output axes first, then input axes.

    Args:
      f: a function of pytrees returning a pytree of tensors (or ``(out, aux)``).
      argnums: which positional argument(s) to differentiate.
      has_aux: whether ``f`` returns ``(out, aux)``; ``aux`` is returned as it is.
      chunk_size: compute that many vector-Jacobian products at a time (bounds memory).

    Returns:
      A function returning the Jacobian, nested as JAX nests it: the output's structure
      outside, the differentiated argument's structure inside (a tuple of them for tuple
      ``argnums``), each leaf of shape ``out.shape + in.shape``. ``None`` in an argument
      is an empty subtree, as in JAX: allowed, and ``None`` in the result.

    Example:
      >>> jacrev(lambda x: x ** 2)(torch.tensor([1., 3.]))
      tensor([[2., 0.],
              [0., 6.]])
      >>> jacrev(lambda p: p["w"] * 2)({"w": torch.ones(2), "skip": None})["w"].shape
      torch.Size([2, 2])
    """
    return _jac_impl(torch.func.jacrev, f, argnums, has_aux, "jacrev(f)", chunk_size=chunk_size)


def jacfwd(
    f: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False, *, randomness: str = "error"
) -> Callable[..., Any]:
    """The Jacobian by forward mode (``jax.jacfwd``); efficient for few inputs.

    Args:
      f: a function of pytrees returning a pytree of tensors (or ``(out, aux)``).
      argnums: which positional argument(s) to differentiate.
      has_aux: whether ``f`` returns ``(out, aux)``.
      randomness: as in :func:`vmap` (jacfwd vmaps over the input tangents).

    Returns:
      A function returning the Jacobian, nested as :func:`jacrev`'s.

    Example:
      >>> jacfwd(lambda x: x.sin())(torch.zeros(2))
      tensor([[1., 0.],
              [0., 1.]])
    """
    return _jac_impl(torch.func.jacfwd, f, argnums, has_aux, "jacfwd(f)", randomness=randomness)


jacobian = jacrev  # JAX's alias (``jax.jacobian`` is ``jax.jacrev``)


def hessian(
    f: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """The Hessian of a scalar function (``jax.hessian``): ``jacfwd(jacrev(f))``.

    Args:
      f: a function returning a scalar tensor (or ``(scalar, aux)``).
      argnums: which positional argument(s) to differentiate.
      has_aux: whether ``f`` returns ``(scalar, aux)``; then ``(hessian, aux)`` is returned.

    Returns:
      A function returning the Hessian, nested argument structure in argument structure.

    Example:
      >>> hessian(lambda x: (x ** 3).sum())(torch.tensor([1., 2.]))
      tensor([[ 6.,  0.],
              [ 0., 12.]])
      >>> h, aux = hessian(lambda x: ((x ** 2).sum(), x.shape[0]), has_aux=True)(torch.ones(2))
      >>> h, aux
      (tensor([[2., 0.],
              [0., 2.]]), 2)
    """
    return _jac_impl(torch.func.jacfwd, jacrev(f, argnums, has_aux), argnums, has_aux, "hessian(f)")


def hvp(f: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any]) -> Any:
    """The Hessian-vector product of a scalar ``f`` with respect to its first argument,
    ``jvp(grad(f), primals, tangents)[1]`` (forward-over-reverse, as in JAX's autodiff
    cookbook; ``torch.func`` has no ``hvp``). No Hessian is formed.

    Args:
      f: a function returning a scalar tensor.
      primals: a tuple of ``f``'s arguments (pytrees).
      tangents: a tuple like ``primals`` (the vector).

    Returns:
      ``H v`` with the structure of the first argument.

    Example:
      >>> hvp(lambda x: (x ** 3).sum(), (torch.tensor([1., 2.]),), (torch.tensor([1., 1.]),))
      tensor([ 6., 12.])
    """
    return jvp(grad(f), primals, tangents)[1]


def _argnums(argnums: ArgNums) -> int | tuple[int, ...]:
    return argnums if isinstance(argnums, int) else tuple(argnums)


def _as_tuple(x: Any, name: str, fn: str) -> tuple[Any, ...]:
    if isinstance(x, (tuple, list)):
        return tuple(x)
    raise TypeError(f"{fn}: `{name}` must be a tuple or list of arguments, got {type(x).__name__}")


def jvp(
    f: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any], has_aux: bool = False
) -> tuple[Any, ...]:
    """Forward-mode Jacobian-vector product (``jax.jvp``).

    Returns ``(f(*primals), J @ tangents)``, plus ``aux`` with ``has_aux=True``.

    Args:
      f: a function of pytrees.
      primals: the point: a tuple (or list) of ``f``'s positional arguments.
      tangents: the direction: one tangent per primal, same structures.
      has_aux: whether ``f`` returns ``(out, aux)``.

    Returns:
      ``(f(*primals), tangent_out)``, or ``(out, tangent_out, aux)`` with ``has_aux=True``.

    Examples:
      >>> jvp(torch.sin, (torch.tensor(0.),), (torch.tensor(2.),))
      (tensor(0.), tensor(2.))
    """
    fn = "jvp(f, primals, tangents)"
    p = _as_tuple(primals, "primals", fn)
    t = _as_tuple(tangents, "tangents", fn)
    if len(p) != len(t):
        raise ValueError(f"{fn}: got {len(p)} primals but {len(t)} tangents")
    for i, (a, b) in enumerate(zip(p, t, strict=True)):
        if _tree.structure(a) != _tree.structure(b):
            raise ValueError(f"{fn}: tangent {i} has structure {_tree.structure(b)} but primal {i} has {_tree.structure(a)}")
        for path, x, y in zip(*_paths_and_leaves(a, b), strict=True):
            if isinstance(x, torch.Tensor) and (x.shape != y.shape or x.dtype != y.dtype):
                raise ValueError(
                    f"{fn}: tangent {i} at path `{_tree.keystr(path)}` has shape {tuple(y.shape)} and "
                    f"dtype {y.dtype}, but the primal has {tuple(x.shape)} and {x.dtype}"
                )
    leaves, in_def = _tree.flatten(p)
    flat_f, out_def = _flat_function(f, in_def, has_aux, fn)
    res = torch.func.jvp(flat_f, tuple(leaves), tuple(_tree.leaves(t)), has_aux=has_aux)
    out = (_tree.unflatten(out_def[0], res[0]), _tree.unflatten(out_def[0], res[1]))
    return (*out, _rebuild_aux(out_def, res[2])) if has_aux else out


def _flat_function(f: Callable[..., Any], in_def: Any, has_aux: bool, fn: str) -> tuple[Callable[..., Any], list[Any]]:
    """``f`` as a function of flat tensor leaves returning a tuple of leaves (plus aux);
    the output's treedef lands in the returned list once it has run (NOTE [flattening
    differentiated arguments])."""
    out_def: list[Any] = [None, None, None]  # output treedef; aux treedef and leaves

    def flat_f(*flat: torch.Tensor) -> Any:
        out = f(*_tree.unflatten(in_def, flat))
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"{fn}: with has_aux=True, f must return a pair (out, aux), got "
                                + (f"a tuple of length {len(out)}" if isinstance(out, tuple)
                                   else type(out).__name__))
            out, aux = out
            # torch.func takes only tensors in aux: pass the tensor leaves through and keep
            # the rest aside (JAX lets aux be any pytree)
            aux_leaves, aux_def = _tree.flatten(aux)
            out_def[1], out_def[2] = aux_def, aux_leaves
        out_leaves, d = _tree.flatten(out)
        out_def[0] = d
        if has_aux:
            return tuple(out_leaves), [x for x in aux_leaves if isinstance(x, torch.Tensor)]
        return tuple(out_leaves)

    return flat_f, out_def


def _rebuild_aux(out_def: list[Any], tensors: list[torch.Tensor]) -> Any:
    """The aux pytree from its tensor leaves (as torch.func returned them) and the rest."""
    aux_def, aux_leaves = out_def[1], out_def[2]
    it = iter(tensors)
    return _tree.unflatten(aux_def, [next(it) if isinstance(x, torch.Tensor) else x for x in aux_leaves])


def _paths_and_leaves(a: Any, b: Any) -> tuple[list[Any], list[Any], list[Any]]:
    paths, la, _ = _tree.flatten_with_path(a)
    return paths, la, _tree.leaves(b)


def vjp(f: Callable[..., Any], *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
    """Reverse-mode vector-Jacobian product (``jax.vjp``).

    Returns ``(f(*primals), vjp_fn)`` (plus ``aux`` with ``has_aux=True``); ``vjp_fn(ct)``
    returns a tuple with one cotangent per primal. The cotangent must match ``f``'s
    output in structure, shapes and dtypes, as in JAX (a mismatch raises, naming the path;
    cast it with ``.to(out.dtype)``).

    Complex numbers follow PyTorch's convention, not JAX's (as :func:`grad` does):
    ``vjp_fn(ct)`` is ``conj(jax_vjp_fn(conj(ct)))`` for any ``f``; for a holomorphic
    ``f`` with Jacobian ``J`` that is ``conj(J)^T ct`` here and ``J^T ct`` in JAX (for
    ``f(z) = z ** 2``: ``2 * conj(z) * ct`` here, ``2 * z * ct`` in JAX). So conjugate
    ``ct`` on the way in and the result on the way out to get JAX's number. Real inputs
    and outputs agree with JAX.

    Args:
      f: a function of pytrees.
      *primals: the point (``f``'s positional arguments).
      has_aux: whether ``f`` returns ``(out, aux)``.

    Returns:
      ``(out, vjp_fn)``, or ``(out, vjp_fn, aux)`` with ``has_aux=True``; ``vjp_fn(cotangent)``
      returns one cotangent per primal, in a tuple.

    Examples:
      >>> out, vjp_fn = vjp(lambda x: x * 3, torch.tensor([1., 2.]))
      >>> vjp_fn(torch.ones(2))
      (tensor([3., 3.]),)
      >>> z = torch.tensor([1 + 2j])
      >>> vjp(lambda z: z ** 2, z)[1](torch.ones(1, dtype=torch.cfloat))  # 2 * conj(z)
      (tensor([2.-4.j]),)
    """
    return _vjp(f, primals, has_aux, "vjp(f, *primals)")


def _vjp(f: Callable[..., Any], primals: tuple[Any, ...], has_aux: bool, fn: str) -> tuple[Any, ...]:
    leaves, in_def = _tree.flatten(primals)
    flat_f, out_def = _flat_function(f, in_def, has_aux, fn)
    res = torch.func.vjp(flat_f, *leaves, has_aux=has_aux)
    out_leaves, vjp_flat = res[0], res[1]

    def vjp_fn(cotangent: Any) -> tuple[Any, ...]:
        if _tree.structure(cotangent) != out_def[0]:
            raise ValueError(
                f"{fn}: the cotangent has structure {_tree.structure(cotangent)} but f's output has "
                f"{out_def[0]}"
            )
        cts = _tree.leaves(cotangent)
        for k, (ct, o) in enumerate(zip(cts, out_leaves, strict=True)):
            if not (isinstance(ct, torch.Tensor) and ct.shape == o.shape and ct.dtype == o.dtype):
                _bad_cotangent(fn, cotangent, k, ct, o)
        grads = vjp_flat(tuple(cts))
        return tuple(_tree.unflatten(in_def, list(grads)))

    out = _tree.unflatten(out_def[0], list(out_leaves))
    return (out, vjp_fn, _rebuild_aux(out_def, res[2])) if has_aux else (out, vjp_fn)


def _bad_cotangent(fn: str, cotangent: Any, k: int, ct: Any, o: torch.Tensor) -> None:
    """Raise for the ``k``-th cotangent leaf, which does not match output leaf ``o``."""
    path = _tree.keystr(_tree.flatten_with_path(cotangent)[0][k])
    got = (f"shape {tuple(ct.shape)} and dtype {ct.dtype}" if isinstance(ct, torch.Tensor)
           else f"a {type(ct).__name__}")
    raise ValueError(
        f"{fn}: the cotangent at path `{path}` must have the shape and dtype of f's output "
        f"there, {tuple(o.shape)} and {o.dtype}, but it has {got}"
    )


def linearize(f: Callable[..., Any], *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
    """``(f(*primals), f_jvp)`` where ``f_jvp(*tangents)`` evaluates the JVP at the fixed
    primals (``jax.linearize``). Traced once with ``make_fx``; each call is cheap.

    Primals and tangents may be pytrees of floating-point or complex tensors; tangents
    must match their primals' structure, shapes and dtypes. It works inside
    ``torch.inference_mode()`` and at primals made there (it is traced outside
    inference mode, where ``torch.func.linearize`` would return zeros). With
    ``has_aux=True``, ``f`` returns ``(out, aux)`` and ``(out, f_jvp, aux)`` is returned
    (``aux`` from the first, untraced call).

    Args:
      f: a function of pytrees.
      *primals: the point at which to linearize (``f``'s arguments).
      has_aux: whether ``f`` returns ``(out, aux)``.

    Returns:
      ``(out, f_jvp)``, or ``(out, f_jvp, aux)`` with ``has_aux=True``.

    Examples:
      >>> out, f_jvp = linearize(torch.sin, torch.tensor([0., 0.]))
      >>> f_jvp(torch.tensor([1., 2.]))
      tensor([1., 2.])
    """
    fn = "linearize(f, *primals)"
    leaves, treedef = _tree.flatten(primals)
    for path, leaf in _tree.leaves_with_path(primals):
        if not isinstance(leaf, torch.Tensor) or not (leaf.is_floating_point() or leaf.is_complex()):
            got = f"dtype {leaf.dtype}" if isinstance(leaf, torch.Tensor) else f"a {type(leaf).__name__}"
            raise TypeError(f"{fn}: primal at path `{_tree.keystr(path)}` must be a floating-point "
                            f"or complex tensor, got {got}")
    out_def: list[Any] = []
    aux_box: list[Any] = []

    def flat_f(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = f(*_tree.unflatten(treedef, flat))
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"{fn}: with has_aux=True, f must return a pair (out, aux), got "
                                f"{type(out).__name__}")
            out, aux = out
            if not aux_box:  # the first call runs on the real primals; later ones are traced
                aux_box.append(_tree.detach(aux))
        out_leaves, d = _tree.flatten(out)
        out_def[:] = [d]
        return tuple(out_leaves)

    # NOTE [linearize under inference mode]: torch.func.linearize traced inside
    # torch.inference_mode(), or at a primal made there, gives an f_jvp that returns zeros
    # (it records no forward-mode graph). It is traced outside inference mode, at plain
    # copies of such primals; the traced f_jvp then works anywhere.
    with torch.inference_mode(False):
        traced = [x.clone() if x.is_inference() else x for x in leaves]
        out_leaves, jvp_flat = torch.func.linearize(flat_f, *traced)
    out = _tree.unflatten(out_def[0], out_leaves)

    def f_jvp(*tangents: Any) -> Any:
        if _tree.structure(tangents) != treedef:
            raise ValueError(f"{fn}: tangents have structure {_tree.structure(tangents)}, expected {treedef}")
        t = _tree.leaves(tangents)
        for path, x, p in zip(_tree.flatten_with_path(primals)[0], t, leaves, strict=True):
            if not isinstance(x, torch.Tensor) or x.shape != p.shape or x.dtype != p.dtype:
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"{fn}: tangent at path `{_tree.keystr(path)}` must match its primal "
                    f"({tuple(p.shape)} {p.dtype}), got {got}"
                )
        return _tree.unflatten(out_def[0], jvp_flat(*t))

    return (out, f_jvp, aux_box[0]) if has_aux else (out, f_jvp)


def linear_transpose(f: Callable[..., Any], *primals: Any) -> Callable[[Any], tuple[Any, ...]]:
    """The transpose of a linear function (``jax.linear_transpose``): ``f_t(ct)`` returns
    one cotangent per argument, ``A^T ct`` for ``f(x) = A x`` with a real ``A``.

    For complex ``A`` the result is ``A^H ct = conj(A)^T ct``, PyTorch's convention (see
    :func:`vjp`), where ``jax.linear_transpose`` gives ``A^T ct``; conjugate ``ct`` on the
    way in and the result on the way out to get JAX's number. The cotangent must match
    ``f``'s output in structure, shapes and dtypes (a mismatch raises, naming the path).

    Args:
      f: a function linear in its arguments (not checked: JAX rejects non-linear
        primitives while tracing; here a non-linear ``f`` gives its VJP at zero).
      *primals: example arguments (pytrees of tensors) fixing shapes and dtypes; only
        their shapes and dtypes are used.

    Returns:
      ``f_t(cotangent) -> tuple`` with one entry per primal.

    Example:
      >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
      >>> linear_transpose(lambda x: a @ x, torch.zeros(2))(torch.tensor([1.0, 0.0]))
      (tensor([1., 2.]),)
    """
    zeros = _tree.map(lambda x: torch.zeros_like(x) if isinstance(x, torch.Tensor) else x, primals)
    _, vjp_fn = _vjp(f, zeros, False, "linear_transpose(f, *primals)")
    return vjp_fn
