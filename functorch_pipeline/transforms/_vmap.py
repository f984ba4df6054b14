"""``vmap`` with JAX's ``in_axes``/``out_axes`` pytree prefixes over ``torch.func.vmap``."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.func
import torch.utils._pytree as torch_pytree

from functorch_pipeline import tree as _tree

__all__ = ["vmap"]


class _Outputs:
    """A torch-pytree node holding the flat tensor outputs of one vmapped call.

    # NOTE [out_axes through torch.func]
    torch.func needs `out_dims` to match the output's structure, which we only know once
    `f` has run. The wrapped function returns its tensor leaves in an `_Outputs` node and
    fills the *same* `_Outputs` instance passed as `out_dims` with one axis per leaf, so
    torch.func reads the right axes after the call (it consults `out_dims` only then).
    """

    def __init__(self, items: list[Any]) -> None:
        self.items = items


torch_pytree.register_pytree_node(
    _Outputs,
    lambda o: (list(o.items), None),
    lambda children, _: _Outputs(list(children)),
    serialized_type_name="functorch_pipeline.transforms._vmap._Outputs",
)

_RANDOMNESS = ("error", "different", "same")


def _is_axis(a: Any) -> bool:
    return a is None or (isinstance(a, int) and not isinstance(a, bool))


def _broadcast(axes: Any, tree: Any, what: str, fn: str) -> list[Any]:
    """One axis per leaf of ``tree`` (``None`` leaves included), from a prefix tree."""
    # The common cases (one axis for everything, or one per positional argument) avoid
    # optree's prefix broadcasting, which torch.compile cannot trace.
    if _is_axis(axes):
        return [axes] * len(optree.tree_leaves(tree, none_is_leaf=True, namespace=_tree.NAMESPACE))
    if isinstance(axes, tuple) and isinstance(tree, tuple) and len(axes) == len(tree) and all(map(_is_axis, axes)):
        out: list[Any] = []
        for a, sub in zip(axes, tree, strict=True):
            out.extend([a] * len(optree.tree_leaves(sub, none_is_leaf=True, namespace=_tree.NAMESPACE)))
        return out
    try:
        full = optree.tree_broadcast_prefix(axes, tree, none_is_leaf=True, namespace=_tree.NAMESPACE)
    except ValueError as e:
        raise ValueError(f"{fn}: `{what}` is not a pytree prefix of the {'arguments' if what == 'in_axes' else 'outputs'}: {e}") from None
    flat = optree.tree_leaves(full, none_is_leaf=True, namespace=_tree.NAMESPACE)
    for a in flat:
        if not _is_axis(a):
            raise TypeError(f"{fn}: every entry of `{what}` must be an int or None, got {a!r}")
    return flat


def vmap(
    f: Callable[..., Any],
    in_axes: Any = 0,
    out_axes: Any = 0,
    *,
    chunk_size: int | None = None,
    randomness: str = "error",
    axis_size: int | None = None,
) -> Callable[..., Any]:
    """Vectorise ``f`` over a batch axis (``jax.vmap`` semantics, ``torch.func`` engine).

    Args:
      f: the function to map; its arguments and outputs are pytrees of tensors.
      in_axes: an int, ``None``, or a tuple with one entry per positional argument, where
        each entry is a pytree prefix of that argument whose leaves are ints (the mapped
        axis) or ``None`` (not mapped). Non-tensor leaves are never mapped. Keyword
        arguments are passed to every mapped call unmapped, as ``torch.func`` does; JAX
        instead maps them over axis 0. Because the two disagree, a keyword argument that
        holds a tensor raises a ``UserWarning`` naming it: pass it positionally with an ``in_axes`` entry (``0`` to map, ``None`` to
        broadcast), or close over it, to say which you mean.
      out_axes: like ``in_axes`` for the outputs; ``None`` marks an output that must not
        depend on the mapped axis. An axis must be in ``[-(r + 1), r]`` for an output of
        rank ``r`` per example (it indexes the result, which has the mapped axis too).
      chunk_size: evaluate that many examples at a time (bounds memory; same result).
      randomness: what PyTorch's *global* RNG may do inside ``f``: ``"error"`` (the
        default, as in ``torch.func``) forbids it, ``"same"`` shares draws across the batch,
        ``"different"`` draws per example. Explicit ``fp.random`` keys need none of this
        (they never touch the global RNG): an unmapped key gives every example the same
        draw (like ``"same"``), a mapped batch of keys (``split(key, n)``, ``in_axes=0``)
        gives each its own (like ``"different"``).
      axis_size: the size of the mapped axis (``jax.vmap``'s ``axis_size``): needed when
        no argument is mapped (then ``f`` runs once and its outputs are broadcast along
        ``out_axes``); otherwise it must equal the mapped inputs' size.

    Returns:
      The mapped function.

    >>> x = {"a": torch.arange(6.).reshape(3, 2), "skip": None}
    >>> vmap(lambda t, w: t["a"].sum() * w, in_axes=(0, None))(x, torch.tensor(2.))
    tensor([ 2., 10., 18.])
    """
    fn = "vmap(f, in_axes, out_axes)"
    if randomness not in _RANDOMNESS:
        raise ValueError(f"{fn}: `randomness` must be one of {_RANDOMNESS}, got {randomness!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{fn}: `chunk_size` must be a positive int or None, got {chunk_size!r}")
    bad_size = isinstance(axis_size, bool) or not isinstance(axis_size, int) or axis_size < 0
    if axis_size is not None and bad_size:
        raise ValueError(f"{fn}: `axis_size` must be a non-negative int or None, got {axis_size!r}")
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)

    @functools.wraps(f)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if isinstance(in_axes, tuple) and len(in_axes) != len(args):
            raise ValueError(
                f"{fn}: `in_axes` has {len(in_axes)} entries but f was called with "
                f"{len(args)} positional arguments"
            )
        axes_tree = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        axes = _broadcast(axes_tree, args, "in_axes", fn)
        paths, leaves, treedef = _tree.flatten_with_path(args, none_is_leaf=True)
        mapped, mapped_axes, size = [], [], None
        for i, (path, leaf, ax) in enumerate(zip(paths, leaves, axes, strict=True)):
            if ax is None or not isinstance(leaf, torch.Tensor):
                continue
            where = f"argument {path[0]}" + (f" at path `{_tree.keystr(path[1:])}`" if len(path) > 1 else "")
            if not -leaf.dim() <= ax < max(leaf.dim(), 1) or leaf.dim() == 0:
                raise ValueError(f"{fn}: cannot map over axis {ax} of {where}, which has shape {tuple(leaf.shape)}")
            n = leaf.shape[ax]
            if size is None:
                size, first = n, where
            elif n != size:
                raise ValueError(
                    f"{fn}: mapped axes must all have the same size, but {first} has {size} "
                    f"and {where} has {n} along its mapped axis"
                )
            mapped.append(i)
            mapped_axes.append(ax % leaf.dim())
        tensor_kwargs = sorted(k for k, v in kwargs.items()
                               if any(isinstance(x, torch.Tensor) for x in _tree.leaves(v)))
        if tensor_kwargs:
            # NOTE [keyword arguments]: torch.func broadcasts keyword arguments, JAX maps
            # them over axis 0. Either silent choice surprises half the users; we keep
            # torch.func's (compatible with existing code) and say so.
            warnings.warn(
                f"{fn}: keyword argument(s) {tensor_kwargs} hold tensors; they are passed to every "
                "mapped call unmapped (broadcast), as torch.func does, whereas jax.vmap maps "
                "keyword arguments over axis 0. Pass them positionally with an in_axes entry "
                "(0 to map, None to broadcast) or close over them.",
                stacklevel=2,
            )
        if size is not None and axis_size is not None and size != axis_size:
            raise ValueError(f"{fn}: `axis_size` is {axis_size} but {first} has {size} along its "
                             "mapped axis")
        if not mapped:
            if axis_size is None:
                raise ValueError(f"{fn}: nothing to map: every tensor argument has in_axes None "
                                 "(give `axis_size` to broadcast f's outputs)")
            return _broadcast_outputs(f(*args, **kwargs), axis_size, out_axes, fn)

        out_def: list[Any] = []
        out_static: list[Any] = []
        box = _Outputs([])

        def inner(*mapped_leaves: torch.Tensor) -> _Outputs:
            new = list(leaves)
            for i, x in zip(mapped, mapped_leaves, strict=True):
                new[i] = x
            out = f(*optree.tree_unflatten(treedef, new), **kwargs)
            out_paths, out_leaves, d = _tree.flatten_with_path(out, none_is_leaf=True)
            oaxes = _broadcast(out_axes, out, "out_axes", fn)
            tensors, tensor_axes = [], []
            for p, leaf, ax in zip(out_paths, out_leaves, oaxes, strict=True):
                if leaf is None:
                    continue
                if not isinstance(leaf, torch.Tensor):
                    raise TypeError(
                        f"{fn}: f must return tensors, but the output at path "
                        f"`{_tree.keystr(p)}` is a {type(leaf).__name__}"
                    )
                _check_out_axis(ax, leaf.dim(), p, fn)
                if ax is None and torch._C._functorch.is_batchedtensor(leaf):
                    _unmapped_batched_output(f, leaf, p, fn)
                tensors.append(leaf)
                tensor_axes.append(ax)
            out_def[:] = [d]
            out_static[:] = [leaf is None for leaf in out_leaves]
            box.items[:] = tensor_axes
            return _Outputs(tensors)

        def run(xs: list[torch.Tensor]) -> list[torch.Tensor]:
            mapped_fn = torch.func.vmap(inner, in_dims=tuple(mapped_axes), out_dims=box, randomness=randomness)
            return mapped_fn(*xs).items

        xs = [leaves[i] for i in mapped]
        if chunk_size is None or chunk_size >= size:
            results = run(xs)
        else:
            # randomness="same": every chunk must see the one draw the whole batch shares, so
            # the RNG state is restored before each chunk (as torch.func's chunked vmap does).
            rng = _rng_state() if randomness == "same" else None
            chunks = []
            for start in range(0, size, chunk_size):
                if rng is not None:
                    _set_rng_state(rng)
                chunks.append(run([x.narrow(ax, start, min(chunk_size, size - start))
                                   for x, ax in zip(xs, mapped_axes, strict=True)]))
            results = []
            for j, ax in enumerate(box.items):
                parts = [c[j] for c in chunks]
                results.append(parts[0] if ax is None else torch.cat(parts, dim=ax))
        it = iter(results)
        out_leaves = [None if is_none else next(it) for is_none in out_static]
        return optree.tree_unflatten(out_def[0], out_leaves)

    return wrapped



def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The global CPU (and, once initialised, CUDA) RNG states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _check_out_axis(ax: Any, rank: int, path: Any, fn: str) -> None:
    if ax is not None and not -(rank + 1) <= ax <= rank:
        raise ValueError(
            f"{fn}: `out_axes` entry {ax} is out of range for the output at path "
            f"`{_tree.keystr(path)}`, which has rank {rank} per example (rank {rank + 1} with the "
            f"mapped axis): expected an axis in [{-(rank + 1)}, {rank}]"
        )


def _unmapped_batched_output(f: Callable[..., Any], leaf: torch.Tensor, path: Any, fn: str) -> None:
    """Raise for an output with ``out_axes`` None that is batched (torch.func would say
    "`inner` can not return a BatchedTensor", naming our closure, not ``f``, ``out_axes``
    or the output's path)."""
    where = (f"{fn}: `out_axes` is None for the output of `{getattr(f, '__name__', type(f).__name__)}` "
             f"at path `{_tree.keystr(path)}`, but ")
    F = torch._C._functorch  # noqa: N806
    if F.maybe_get_level(leaf) == F.maybe_current_level():
        raise ValueError(where + "that output depends on the mapped arguments (it is batched "
                         "along the mapped axis). Give it an int axis in `out_axes` (0 to stack "
                         "it), or make it independent of the mapped arguments.")
    raise ValueError(where + "that output depends on the arguments of an enclosing vmap: "
                     "torch.func cannot return it unmapped from this inner vmap (jax.vmap can). "
                     "Give it `out_axes` 0 and take element 0 of the result, or return it from "
                     "the enclosing function instead.")


def _broadcast_outputs(out: Any, size: int, out_axes: Any, fn: str) -> Any:
    """``f``'s unmapped outputs repeated ``size`` times along ``out_axes`` (``axis_size``)."""
    paths, leaves, treedef = _tree.flatten_with_path(out, none_is_leaf=True)
    axes = _broadcast(out_axes, out, "out_axes", fn)
    new = []
    for p, leaf, ax in zip(paths, leaves, axes, strict=True):
        if leaf is None or ax is None:
            new.append(leaf)
            continue
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{fn}: f must return tensors, but the output at path "
                            f"`{_tree.keystr(p)}` is a {type(leaf).__name__}")
        _check_out_axis(ax, leaf.dim(), p, fn)
        x = leaf.unsqueeze(ax)
        shape = list(x.shape)
        shape[ax] = size
        new.append(x.expand(shape))
    return optree.tree_unflatten(treedef, new)
