"""Selecting parameters: ``masked``, ``partition`` (per-group settings) and ``freeze``.

Masks and labels are given as a tree matching the parameters, as a *prefix* of it
(``{"encoder": False, "head": True}`` covers every leaf below each key), or as a
function. Inner transformations only ever see the selected leaves; the others are
replaced by :class:`MaskedNode` (an empty node, so it has no leaves).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Hashable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import torch

from functorch_pipeline import tree as fpt
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import Params
from functorch_pipeline.optim._base import Updates
from functorch_pipeline.optim._base import drop_extra_args
from functorch_pipeline.optim._base import mismatch_error
from functorch_pipeline.optim._base import set_to_zero

__all__ = [
    "MaskedNode",
    "MaskedState",
    "PartitionState",
    "freeze",
    "masked",
    "multi_transform",
    "partition",
]


class MaskedNode(NamedTuple):
    """Stands in for a leaf that an inner transformation must not see (no leaves)."""


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner transformation's state (over selected leaves).

    Attributes:
        inner_state: the inner transformation's state over the selected leaves.
    """

    inner_state: Any


class PartitionState(NamedTuple):
    """State of :func:`partition`: one :class:`MaskedState` per label.

    Attributes:
        inner_states: a dict ``{label: MaskedState}``.
    """

    inner_states: dict


def _is_masked_node(x: Any) -> bool:
    return isinstance(x, MaskedNode)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _walk(tree: Any, path: tuple, paths: list, leaves: list, none_is_leaf: bool) -> bool:
    """Key paths and leaves of dict/list/tuple/NamedTuple trees in fp.tree's leaf order,
    in plain Python so that ``torch.compile`` can trace it (optree's accessor API is
    opaque to dynamo). Returns False for a container it does not know. A
    :class:`MaskedNode` has no leaves; with ``none_is_leaf`` it is listed as a leaf (so
    that :func:`broadcast_to_leaves` can see where the placeholders are)."""
    if tree is None or isinstance(tree, MaskedNode):
        if none_is_leaf:
            paths.append(path)
            leaves.append(tree)
        return True
    if type(tree) is dict:
        keys = _dict_keys(tree)
        return all(_walk(tree[k], (*path, k), paths, leaves, none_is_leaf) for k in keys)
    if isinstance(tree, OrderedDict):
        return all(_walk(v, (*path, k), paths, leaves, none_is_leaf) for k, v in tree.items())
    if _is_namedtuple(tree):
        return all(_walk(v, (*path, f), paths, leaves, none_is_leaf) for f, v in zip(tree._fields, tree, strict=True))
    if type(tree) in (list, tuple):
        return all(_walk(v, (*path, i), paths, leaves, none_is_leaf) for i, v in enumerate(tree))
    if isinstance(tree, (dict, list, tuple)) or fpt.structure(tree).num_nodes > 1:
        return False
    paths.append(path)
    leaves.append(tree)
    return True


def paths_and_leaves(tree: Any, none_is_leaf: bool = False) -> tuple[list, list]:
    """``(paths, leaves)`` of ``tree`` (see :func:`_walk`; falls back to fp.tree)."""
    paths: list = []
    leaves: list = []
    if _walk(tree, (), paths, leaves, none_is_leaf):
        return paths, leaves
    ps, ls, _ = fpt.flatten_with_path(
        tree, is_leaf=(lambda x: x is None or isinstance(x, MaskedNode)) if none_is_leaf else _is_masked_node)
    if not none_is_leaf:  # MaskedNode has no leaves
        keep = [i for i, x in enumerate(ls) if not isinstance(x, MaskedNode)]
        ps, ls = [ps[i] for i in keep], [ls[i] for i in keep]
    return ps, ls


def broadcast_to_leaves(where: str, what: str, prefix: Any, full: Any) -> list[Any]:
    """The value of ``prefix`` (a tree matching ``full`` or a prefix of it) for each leaf
    of ``full``, in leaf order. Errors name the key path that has no value."""
    ppaths, pleaves = paths_and_leaves(prefix, none_is_leaf=True)
    table = dict(zip(ppaths, pleaves, strict=True))
    fpaths, _ = paths_and_leaves(full)
    out, used = [], set()
    for path in fpaths:
        for k in range(len(path), -1, -1):
            if path[:k] in table:
                out.append(table[path[:k]])
                used.add(path[:k])
                break
        else:
            raise ValueError(
                f"{where}: no {what} for the leaf at path `{fpt.keystr(path)}`; `{what}` must "
                f"be a tree with the structure of the parameters or a prefix of it "
                f"(it has paths {sorted(fpt.keystr(p) for p in ppaths)})"
            )
    unused = [p for p in ppaths if p not in used]
    if unused:
        # a None in ``prefix`` where ``full`` has None too: an empty subtree in both (optax)
        fpaths_n, fleaves_n = paths_and_leaves(full, none_is_leaf=True)
        empty = {q for q, x in zip(fpaths_n, fleaves_n, strict=True) if x is None}
        # NOTE [masks over placeholders]: inside masked/partition the inner transformation
        # sees MaskedNode where the other groups' leaves are; a mask or label tree written
        # for all the parameters (optax's usual weight-decay mask) has entries there. As in
        # optax, an entry whose path is a MaskedNode, or a prefix of one, is not an error.
        holes = [q for q, x in zip(fpaths_n, fleaves_n, strict=True) if isinstance(x, MaskedNode)]
        unused = [fpt.keystr(p) for p in unused
                  if not (table[p] is None and p in empty)
                  and not any(q[:len(p)] == p for q in holes)]
    if unused:
        raise ValueError(f"{where}: `{what}` has paths that match no parameter: {unused}")
    return out


def _mask_leaves(where: str, mask: Any, tree: Any) -> list[bool]:
    m = mask(tree) if callable(mask) else mask
    vals = broadcast_to_leaves(where, "mask", m, tree)
    return [bool(v) for v in vals]


def _dict_keys(tree: dict) -> list[Any]:
    """A dict's keys in the order optree flattens them: sorted when they sort."""
    try:
        return sorted(tree)
    except TypeError:
        return list(tree)


def _rebuild(tree: Any, new_leaves: Any) -> Any:
    """``tree`` with its leaves, in :func:`_walk` order, replaced by ``next(new_leaves)``:
    the same containers (dict insertion order kept, as optree's unflatten does). Only for
    a tree :func:`_walk` accepts."""
    if tree is None or isinstance(tree, MaskedNode):
        return tree
    if type(tree) is dict:
        keys = _dict_keys(tree)
        new = {k: _rebuild(tree[k], new_leaves) for k in keys}
        return {k: new[k] for k in tree}
    if isinstance(tree, OrderedDict):
        return OrderedDict((k, _rebuild(v, new_leaves)) for k, v in tree.items())
    if _is_namedtuple(tree):
        return type(tree)(*[_rebuild(v, new_leaves) for v in tree])
    if type(tree) in (list, tuple):
        return type(tree)([_rebuild(v, new_leaves) for v in tree])
    return next(new_leaves)


def _traced_leaves(tree: Any) -> list | None:
    """Under ``torch.compile``, the leaves of a tree :func:`_walk` accepts (then rebuilt
    with :func:`_rebuild`); else None: use fp.tree (NOTE [MaskedNode under torch.compile]).

    # NOTE [MaskedNode under torch.compile]
    Dynamo's optree polyfill (torch 2.11-2.14) cannot unflatten a treespec whose dict
    node receives only MaskedNode children (a fully masked sub-dict, e.g. a frozen layer
    of nested params): "unhashable type: 'list'" or "length mismatch", so
    ``TrainState.create(trainable=...)``, ``DPTrainer(trainable=...)`` and every
    ``masked``/``partition`` over nested dicts failed under ``fp.jit``. While compiling,
    the masked trees are built and taken apart in plain Python (:func:`_walk`,
    :func:`_rebuild`), which Dynamo traces like any code; eager calls keep optree's C++
    flatten/unflatten (3x faster than the Python walk). Containers :func:`_walk` does not
    know (registered dataclasses, ...) still go through optree.
    Still (torch 2.14): the inner transformation flattens the masked tree itself, and a
    dict node without leaves (the fully masked sub-dict, like the empty dicts of NOTE
    [empty containers in aux] in ``fp.transforms``) makes Dynamo break the graph there and
    run that part eagerly: the numbers are the eager ones, but such a mask cannot compile
    with ``fullgraph=True``. A mask that leaves at least one leaf in every sub-dict (or
    flat parameters) compiles to one graph.
    """
    if not torch.compiler.is_compiling():
        return None
    paths: list = []
    leaves: list = []
    return leaves if _walk(tree, (), paths, leaves, False) else None


def _select(tree: Any, flags: list[bool]) -> Any:
    leaves = _traced_leaves(tree)
    if leaves is not None:  # NOTE [MaskedNode under torch.compile]
        return _rebuild(tree, iter([x if f else MaskedNode() for x, f in zip(leaves, flags, strict=True)]))
    leaves, td = fpt.flatten(tree)
    return fpt.unflatten(td, [x if f else MaskedNode() for x, f in zip(leaves, flags, strict=True)])


def masked(
    inner: GradientTransformation, mask: Any, *, mask_compatible_extra_args: bool = False
) -> GradientTransformation:
    """Apply ``inner`` only to the leaves where ``mask`` is true; others pass unchanged.

    Args:
      inner: the transformation to apply to the selected leaves.
      mask: a tree of booleans (the parameters' structure or a prefix of it), or a
        function ``params -> such a tree``.
      mask_compatible_extra_args: (optax 0.2.8) also mask every extra keyword argument of
        ``update`` that is a tree with the updates' structure (e.g. per-parameter
        values), so that ``inner`` sees only the selected leaves of it too; other extra
        arguments pass unchanged either way.

    Returns:
      A :class:`GradientTransformation`.

    >>> import torch
    >>> from functorch_pipeline import optim
    >>> tx = masked(optim.scale(0.0), {"w": True, "b": False})
    >>> u = {"w": torch.ones(1), "b": torch.ones(1)}
    >>> tx.update(u, tx.init(u))[0]
    {'w': tensor([0.]), 'b': tensor([1.])}
    """
    return _masked_by_flags(inner, lambda where, tree: _mask_leaves(where, mask, tree), callable(mask),
                            mask_compatible_extra_args, name="masked")


def _mask_extra(extra_args: dict, updates: Any, flags: list[bool]) -> dict:
    """Extra arguments with the updates' structure, masked like the updates."""
    td = fpt.structure(updates)
    out = {}
    for k, v in extra_args.items():
        try:
            same = fpt.same_structure(fpt.structure(v), td)
        except Exception:  # noqa: BLE001 - anything that is not a matching tree passes as is
            same = False
        out[k] = _select(v, flags) if same else v
    return out


def _masked_by_flags(inner: GradientTransformation, flags_fn: Any, use_params: bool,
                     mask_extra: bool = False, name: str = "masked") -> GradientTransformation:
    """:func:`masked` with ``flags_fn(where, tree) -> [bool per leaf]``; ``name``: the
    public API errors name (``masked``, ``partition``, ``multi_transform``)."""
    inner = drop_extra_args(inner)

    def init_fn(params: Params) -> MaskedState:
        flags = flags_fn(f"{name}.init", params)
        return MaskedState(inner.init(_select(params, flags)))

    def update_fn(updates: Updates, state: MaskedState, params: Params = None, **extra_args: Any):
        where = f"{name}.update"
        flags = flags_fn(where, params if use_params and params is not None else updates)
        try:
            sub_u = _select(updates, flags)
            sub_p = None if params is None else _select(params, flags)
        except ValueError:  # zip(strict=True): the flags come from the other tree
            if params is None:
                raise
            raise mismatch_error(where, "updates", updates, "params", params) from None
        if mask_extra:
            extra_args = _mask_extra(extra_args, updates, flags)
        new_sub, new_inner = inner.update(sub_u, state.inner_state, sub_p, **extra_args)
        # the selected leaves, in order (MaskedNode has no leaves: ours, and an outer
        # masked's when nested, NOTE [masks over placeholders])
        new_leaves, new_td = fpt.flatten(new_sub)
        ul, td = fpt.flatten(updates)
        if fpt.same_structure(new_td, fpt.structure(sub_u)):
            it = iter(new_leaves)
            out = [next(it) if f else u for u, f in zip(ul, flags, strict=True)]
        else:
            # as optax, whatever the inner transformation put where the leaves are masked
            # (``2 * MaskedNode()`` is ``()``) is ignored; the rest must keep its structure
            try:
                at = td.flatten_up_to(new_sub)
            except (ValueError, TypeError):
                at = None
            if at is None or not all(isinstance(n, torch.Tensor) for n, f in zip(at, flags, strict=True) if f):
                raise ValueError(f"{where}: the inner transformation changed the structure of the updates")
            out = [n if f else u for u, n, f in zip(ul, at, flags, strict=True)]
        if _traced_leaves(updates) is not None:  # NOTE [MaskedNode under torch.compile]
            return _rebuild(updates, iter(out)), MaskedState(new_inner)
        return fpt.unflatten(td, out), MaskedState(new_inner)

    return GradientTransformation(init_fn, update_fn)


def _labels(where: str, param_labels: Any, tree: Any) -> list[Hashable]:
    if callable(param_labels):
        try:
            n_args = len(inspect.signature(param_labels).parameters)
        except (TypeError, ValueError):
            n_args = 1
        if n_args >= 2:
            paths, leaves = paths_and_leaves(tree)
            return [param_labels(p, x) for p, x in zip(paths, leaves, strict=True)]
        return broadcast_to_leaves(where, "param_labels", param_labels(tree), tree)
    return broadcast_to_leaves(where, "param_labels", param_labels, tree)


def partition(
    transforms: Mapping[Hashable, GradientTransformation],
    param_labels: Any,
    *,
    mask_compatible_extra_args: bool = False,
) -> GradientTransformation:
    """Different transformations for different groups of parameters (torch's param groups).

    Args:
      transforms: ``{label: transformation}``.
      param_labels: the label of every parameter, as a tree matching the parameters, a
        prefix of it, a function ``params -> labels tree``, or a function of the key
        path ``(path, leaf) -> label`` (a two-argument callable; ``path`` is a tuple of
        keys, see ``fp.tree.keystr``).
      mask_compatible_extra_args: as in :func:`masked`: extra arguments with the
        updates' structure reach each group's transformation restricted to its leaves.

    Returns:
      A :class:`GradientTransformation`.

    >>> import torch
    >>> from functorch_pipeline import optim
    >>> tx = partition({"slow": optim.sgd(0.01), "fast": optim.sgd(1.0)},
    ...                lambda path, leaf: "fast" if path[-1] == "b" else "slow")
    >>> g = {"w": torch.ones(1), "b": torch.ones(1)}
    >>> tx.update(g, tx.init(g))[0]
    {'w': tensor([-0.0100]), 'b': tensor([-1.])}
    """
    return _partition(transforms, param_labels, mask_compatible_extra_args, "partition")


def _partition(transforms: Mapping[Hashable, GradientTransformation], param_labels: Any,
               mask_compatible_extra_args: bool, name: str) -> GradientTransformation:
    """:func:`partition`, whose errors name ``name`` (``partition`` or ``multi_transform``)."""
    transforms = {k: GradientTransformation(*v) for k, v in transforms.items()}

    def label_list(where: str, tree: Any) -> list[Hashable]:
        labels = _labels(where, param_labels, tree)
        paths = None
        for i, lab in enumerate(labels):
            if lab not in transforms:
                paths = paths or paths_and_leaves(tree)[0]
                raise ValueError(
                    f"{where}: the parameter at path `{fpt.keystr(paths[i])}` has label {lab!r}, "
                    f"which has no transformation; `transforms` has labels {sorted(map(repr, transforms))}"
                )
        return labels

    def inner_masked(label: Hashable, labels: list[Hashable]) -> GradientTransformation:
        flags = [lab == label for lab in labels]
        return _masked_by_flags(transforms[label], lambda where, tree: flags, False,
                                mask_compatible_extra_args, name=name)

    def init_fn(params: Params) -> PartitionState:
        labels = label_list(f"{name}.init", params)
        return PartitionState({k: inner_masked(k, labels).init(params) for k in transforms})

    def update_fn(updates: Updates, state: PartitionState, params: Params = None, **extra_args: Any):
        labels = label_list(f"{name}.update", updates)
        new_states = {}
        for k in transforms:
            updates, new_states[k] = inner_masked(k, labels).update(updates, state.inner_states[k], params, **extra_args)
        return updates, PartitionState(new_states)

    return GradientTransformation(init_fn, update_fn)


def multi_transform(
    transforms: Mapping[Hashable, GradientTransformation],
    param_labels: Any,
    *,
    mask_compatible_extra_args: bool = False,
) -> GradientTransformation:
    """optax's older name of :func:`partition` (same arguments, same transformation).

    Args:
      transforms: ``{label: transformation}``.
      param_labels: the label of every parameter (see :func:`partition`).
      mask_compatible_extra_args: see :func:`masked`.

    Returns:
      A :class:`GradientTransformation`.

    Example:
      >>> import torch
      >>> from functorch_pipeline import optim
      >>> tx = multi_transform({"a": optim.sgd(1.0), "b": optim.sgd(0.0)}, {"w": "a", "b": "b"})
      >>> g = {"w": torch.ones(1), "b": torch.ones(1)}
      >>> tx.update(g, tx.init(g))[0]
      {'w': tensor([-1.]), 'b': tensor([-0.])}
    """
    return _partition(transforms, param_labels, mask_compatible_extra_args, "multi_transform")


def freeze(mask: Any) -> GradientTransformation:
    """Zero the updates of the leaves where ``mask`` is true (those parameters stay fixed).

    Args:
      mask: booleans (tree, prefix or function) marking the frozen parameters.

    Returns:
      A :class:`GradientTransformation`.

    >>> import torch
    >>> tx = freeze({"w": True, "b": False})
    >>> u = {"w": torch.ones(1), "b": torch.ones(1)}
    >>> tx.update(u, tx.init(u))[0]
    {'w': tensor([0.]), 'b': tensor([1.])}
    """
    return masked(set_to_zero(), mask)



