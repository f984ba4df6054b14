"""Structure: flatten/unflatten, map, key paths and registering container types.

Every function here uses one optree namespace, ``functorch_pipeline``, where the library
registers its own containers. :func:`register_dataclass` and
:func:`register_pytree_node` also register with ``torch.utils._pytree``, which is the
registry ``torch.func`` reads (see NOTE [two pytree registries]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import TypeVar

import optree
import torch
import torch.utils._pytree as torch_pytree

__all__ = [
    "NAMESPACE",
    "KeyPath",
    "PyTree",
    "flatten",
    "flatten_with_path",
    "is_leaf_none",
    "keystr",
    "leaves",
    "leaves_with_path",
    "map",
    "map_with_path",
    "register_dataclass",
    "register_pytree_node",
    "same_structure",
    "structure",
    "unflatten",
]

NAMESPACE = "functorch_pipeline"

PyTree = Any
KeyPath = tuple[Any, ...]
T = TypeVar("T")

# NOTE [two pytree registries]
# optree (fast, C++) is what fp.tree uses; torch.func (vmap, grad, ...) flattens its
# inputs with torch.utils._pytree, a separate registry. dicts, lists, tuples, NamedTuples
# and None are known to both. Any other container (a dataclass state, a TrainState) must
# be registered in both, or torch.func treats it as an opaque leaf and fails. The
# registration helpers below always do both.


def leaves(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[Any]:
    """The leaves of ``tree`` in a fixed order (dict keys sorted); ``None`` is no leaf.

    Args:
      tree: a pytree (nested dicts, lists, tuples, NamedTuples, registered classes).
      is_leaf: an optional predicate: a node for which it returns ``True`` is a leaf.

    Returns:
      The list of leaves.

    Examples:
      >>> leaves({"b": 1, "a": (2, None, [3])})
      [2, 3, 1]
    """
    return optree.tree_leaves(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def structure(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> optree.PyTreeSpec:
    """The structure (treedef) of ``tree``.

    Args:
      tree: a pytree (nested dicts, lists, tuples, NamedTuples, registered classes).
      is_leaf: an optional predicate: a node for which it returns ``True`` is a leaf.

    Returns:
      An ``optree.PyTreeSpec``.

    Examples:
      >>> structure({"a": 1, "b": [2, 3]})
      PyTreeSpec({'a': *, 'b': [*, *]})
    """
    return optree.tree_structure(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def flatten(
    tree: PyTree, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[list[Any], optree.PyTreeSpec]:
    """``(leaves, treedef)``; :func:`unflatten` inverts it.

    Args:
      tree: a pytree (nested dicts, lists, tuples, NamedTuples, registered classes).
      is_leaf: an optional predicate: a node for which it returns ``True`` is a leaf.

    Returns:
      ``(leaves, treedef)``: the leaves in :func:`leaves` order and the structure.

    Examples:
      >>> leaves_, treedef = flatten({"w": 1, "b": 2})
      >>> leaves_, unflatten(treedef, [10, 20])
      ([2, 1], {'w': 20, 'b': 10})
    """
    return optree.tree_flatten(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def unflatten(treedef: optree.PyTreeSpec, leaves_: Iterable[Any]) -> PyTree:
    """Rebuild a tree from a treedef and its leaves (in :func:`leaves` order).

    Args:
      treedef: a structure from :func:`structure` or :func:`flatten`.
      leaves_: exactly as many leaves as ``treedef`` has.

    Returns:
      The rebuilt tree.

    Examples:
      >>> unflatten(structure([1, (2, 3)]), "xyz")
      ['x', ('y', 'z')]
    """
    leaves_ = list(leaves_)
    if len(leaves_) != treedef.num_leaves:
        raise ValueError(
            f"unflatten(treedef, leaves): the treedef has {treedef.num_leaves} leaves "
            f"but {len(leaves_)} were given"
        )
    return optree.tree_unflatten(treedef, leaves_)


def _path_key(entry: Any) -> Any:
    if isinstance(entry, (optree.NamedTupleEntry, optree.StructSequenceEntry)):
        return entry.field
    if isinstance(entry, optree.DataclassEntry):
        return entry.name
    if isinstance(entry, optree.GetAttrEntry):
        return entry.name
    return entry.entry


def flatten_with_path(
    tree: PyTree, is_leaf: Callable[[Any], bool] | None = None, *, none_is_leaf: bool = False
) -> tuple[list[KeyPath], list[Any], optree.PyTreeSpec]:
    """``(paths, leaves, treedef)``. A path is a tuple of keys: dict keys, sequence
    indices (int) and field names of NamedTuples/dataclasses (str). With
    ``none_is_leaf=True``, ``None`` values are leaves too.

    Args:
      tree: a pytree (nested dicts, lists, tuples, NamedTuples, registered classes).
      is_leaf: an optional predicate: a node for which it returns ``True`` is a leaf.
      none_is_leaf: treat ``None`` values as leaves.

    Returns:
      ``(paths, leaves, treedef)``, one key path per leaf.

    Examples:
      >>> paths, leaves_, _ = flatten_with_path({"fc": {"w": 1}, "s": (2,)})
      >>> paths, leaves_
      ([('fc', 'w'), ('s', 0)], [1, 2])
    """
    leaves_, treedef = optree.tree_flatten(
        tree, is_leaf=is_leaf, none_is_leaf=none_is_leaf, namespace=NAMESPACE
    )
    return list(_paths_of(treedef)), leaves_, treedef


# NOTE [cached key paths]
# Building readable paths (field names for NamedTuples) goes through optree accessors,
# ~7x slower than a flatten. Training loops see the same few structures over and over,
# so paths are cached per treedef (hashable, compared structurally). The cache is a plain
# dict, not functools.lru_cache: Dynamo warns on every compile that traces through an
# lru_cache wrapper; under torch.compile the paths are built without the cache.
_PATHS: dict[optree.PyTreeSpec, tuple[KeyPath, ...]] = {}
_PATHS_MAX = 1024


def _paths_of(treedef: optree.PyTreeSpec) -> tuple[KeyPath, ...]:
    if torch.compiler.is_compiling():
        return tuple(tuple(_path_key(e) for e in acc) for acc in treedef.accessors())
    paths = _PATHS.get(treedef)
    if paths is None:
        paths = tuple(tuple(_path_key(e) for e in acc) for acc in treedef.accessors())
        if len(_PATHS) >= _PATHS_MAX:
            _PATHS.clear()
        _PATHS[treedef] = paths
    return paths


def leaves_with_path(
    tree: PyTree, is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[KeyPath, Any]]:
    """``[(path, leaf), ...]``; see :func:`flatten_with_path` for what a path is.

    Args:
      tree: a pytree (nested dicts, lists, tuples, NamedTuples, registered classes).
      is_leaf: an optional predicate: a node for which it returns ``True`` is a leaf.

    Returns:
      A list of ``(key_path, leaf)`` pairs in :func:`leaves` order.

    Examples:
      >>> leaves_with_path({"a": [5, 6]})
      [(('a', 0), 5), (('a', 1), 6)]
    """
    paths, leaves_, _ = flatten_with_path(tree, is_leaf=is_leaf)
    return list(zip(paths, leaves_, strict=True))


def keystr(path: Sequence[Any]) -> str:
    """A readable string for a key path: ``params.fc1.weight``, ``layers[0].bias``.

    Args:
      path: a key path (a sequence of dict keys, indices and field names).

    Returns:
      The dotted/indexed string; ``"<root>"`` for the empty path.

    Examples:
      >>> keystr(("params", "fc1", "weight")), keystr(("layers", 0, "bias")), keystr(())
      ('params.fc1.weight', 'layers[0].bias', '<root>')
    """
    if not path:
        return "<root>"
    out = ""
    for k in path:
        if isinstance(k, str) and k and not any(c in k for c in ".[]'\" "):
            out += ("." if out else "") + k
        elif isinstance(k, int):
            out += f"[{k}]"
        else:
            out += f"[{k!r}]"
    return out


def _structure_error(fn: str, trees: Sequence[PyTree], err: Exception) -> ValueError:
    first = flatten_with_path(trees[0])[0]
    for i, other in enumerate(trees[1:], start=1):
        other_paths = flatten_with_path(other)[0]
        want = {keystr(p) for p in first}
        have = {keystr(p) for p in other_paths}
        missing, extra = sorted(want - have), sorted(have - want)
        if missing or extra:
            return ValueError(
                f"{fn}: tree {i} does not match tree 0: missing {missing or 'nothing'}, "
                f"extra {extra or 'nothing'}"
            )
    return ValueError(f"{fn}: the trees have different structures: {err}")


def map(  # noqa: A001 - JAX's name
    f: Callable[..., Any],
    tree: PyTree,
    *rest: PyTree,
    is_leaf: Callable[[Any], bool] | None = None,
) -> PyTree:
    """Apply ``f`` to the leaves of one or more trees of the same structure.

    Args:
      f: called as ``f(leaf, *rest_leaves)`` for each leaf position.
      tree: a pytree (nested dicts, lists, tuples, NamedTuples, registered classes).
      *rest: more trees with ``tree``'s structure.
      is_leaf: an optional predicate: a node for which it returns ``True`` is a leaf.

    Returns:
      A tree of ``tree``'s structure holding ``f``'s results.

    Examples:
      >>> map(lambda a, b: a + b, {"x": 1, "y": None}, {"x": 10, "y": None})
      {'x': 11, 'y': None}
    """
    try:
        return optree.tree_map(f, tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)
    except ValueError as e:
        if rest and _mismatched(tree, rest, is_leaf):  # else the error is f's own: keep it
            raise _structure_error("tree.map", (tree, *rest), e) from None
        raise


def _mismatched(tree: PyTree, rest: Sequence[PyTree], is_leaf: Callable[[Any], bool] | None) -> bool:
    """Whether ``tree`` is not a prefix of every tree in ``rest`` (what ``map`` needs)."""
    treedef = optree.tree_structure(tree, is_leaf=is_leaf, namespace=NAMESPACE)
    for r in rest:
        try:
            treedef.flatten_up_to(r)
        except ValueError:
            return True
    return False


def map_with_path(
    f: Callable[..., Any],
    tree: PyTree,
    *rest: PyTree,
    is_leaf: Callable[[Any], bool] | None = None,
) -> PyTree:
    """Like :func:`map`, but ``f(path, *leaves)`` also gets each leaf's key path.

    Args:
      f: called as ``f(key_path, leaf, *rest_leaves)``.
      tree: a pytree (nested dicts, lists, tuples, NamedTuples, registered classes).
      *rest: more trees with ``tree``'s structure.
      is_leaf: an optional predicate: a node for which it returns ``True`` is a leaf.

    Returns:
      A tree of ``tree``'s structure holding ``f``'s results.

    Examples:
      >>> map_with_path(lambda p, x: keystr(p), {"fc": {"w": 0}})
      {'fc': {'w': 'fc.w'}}
    """
    paths, leaves0, treedef = flatten_with_path(tree, is_leaf=is_leaf)
    others = []
    for r in rest:
        try:
            others.append(treedef.flatten_up_to(r))
        except ValueError as e:
            raise _structure_error("tree.map_with_path", (tree, *rest), e) from None
    out = [f(p, x, *(o[i] for o in others)) for i, (p, x) in enumerate(zip(paths, leaves0, strict=True))]
    return optree.tree_unflatten(treedef, out)


def same_structure(a: optree.PyTreeSpec, b: optree.PyTreeSpec) -> bool:
    """Whether two treedefs are equal.

    # NOTE [treedef equality under torch.compile]
    Dynamo in torch 2.11 cannot trace ``PyTreeSpec.__eq__`` (nor ``str`` of one). While
    compiling, only the leaf counts are compared; callers check leaf shapes too, and the
    same call run eagerly has checked the full structure.

    Args:
      a: a treedef (from :func:`structure`).
      b: another treedef.

    Returns:
      ``True`` when the two structures are equal.

    Examples:
      >>> same_structure(structure({"a": 1}), structure({"a": 2}))
      True
      >>> same_structure(structure([1]), structure((1,)))
      False
    """
    if torch.compiler.is_compiling():
        return a.num_leaves == b.num_leaves
    return a == b


def is_leaf_none(x: Any) -> bool:
    """An ``is_leaf`` predicate that makes ``None`` a leaf (optree treats it as empty).

    Args:
      x: a node of a tree.

    Returns:
      ``True`` when ``x is None``.

    Examples:
      >>> leaves([1, None], is_leaf=is_leaf_none)
      [1, None]
    """
    return x is None


def register_pytree_node(
    cls: type[T],
    flatten_fn: Callable[[T], tuple[Sequence[Any], Any]],
    unflatten_fn: Callable[[Any, Sequence[Any]], T],
    *,
    field_names: Sequence[str] | None = None,
) -> type[T]:
    """Register a container type with optree *and* ``torch.utils._pytree``.

    Args:
      cls: the container class.
      flatten_fn: ``obj -> (children, aux_data)``; ``aux_data`` must be hashable.
      unflatten_fn: ``(aux_data, children) -> obj``.
      field_names: optional names of the children, used in key paths.

    Returns:
      ``cls`` itself (now registered).

    Examples:
      >>> class Pair:
      ...     def __init__(self, a, b): self.a, self.b = a, b
      >>> _ = register_pytree_node(Pair, lambda p: ((p.a, p.b), None), lambda _, c: Pair(*c),
      ...                          field_names=("a", "b"))
      >>> leaves_with_path(Pair(1, 2))
      [(('a',), 1), (('b',), 2)]
    """
    names = tuple(field_names) if field_names is not None else None

    def optree_flatten(obj: T) -> tuple[Sequence[Any], Any, Any]:
        children, aux = flatten_fn(obj)
        entries = names if names is not None else tuple(range(len(children)))
        return children, aux, entries

    entry_type = optree.GetAttrEntry if names is not None else optree.AutoEntry
    optree.register_pytree_node(
        cls, optree_flatten, unflatten_fn, path_entry_type=entry_type, namespace=NAMESPACE
    )

    def torch_flatten(obj: T) -> tuple[list[Any], Any]:
        children, aux = flatten_fn(obj)
        return list(children), aux

    def torch_unflatten(children: Iterable[Any], aux: Any) -> T:
        return unflatten_fn(aux, list(children))

    def torch_flatten_with_keys(obj: T) -> tuple[list[tuple[Any, Any]], Any]:
        children, aux = flatten_fn(obj)
        if names is not None:
            keys = [torch_pytree.GetAttrKey(n) for n in names]
        else:
            keys = [torch_pytree.SequenceKey(i) for i in range(len(children))]
        return list(zip(keys, children, strict=True)), aux

    torch_pytree.register_pytree_node(
        cls,
        torch_flatten,
        torch_unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=torch_flatten_with_keys,
    )
    return cls


def register_dataclass(
    cls: type[T] | None = None,
    *,
    data_fields: Sequence[str] | None = None,
    meta_fields: Sequence[str] = (),
) -> Any:
    """Register a dataclass as a pytree with optree and ``torch.utils._pytree``.

    ``data_fields`` (default: every field not in ``meta_fields``) are children;
    ``meta_fields`` are static and compared for structure equality. Usable as a
    decorator, with or without arguments.

    Rebuilt instances (every ``map``, ``unflatten``, ``torch.func`` transform and
    ``fp.load``) get their fields set directly, without calling ``__init__`` or
    ``__post_init__``, since transforms put placeholders in the fields that a validating
    ``__post_init__`` would reject (``jax.tree_util.register_dataclass`` calls the
    constructor instead). So an attribute that is not a field, such as one derived in
    ``__post_init__``, is absent on a rebuilt instance: make it a field or a property.

    Args:
      cls: the dataclass (omit it to get a decorator).
      data_fields: the fields that are children (default: every field not in ``meta_fields``).
      meta_fields: static fields, part of the structure.

    Returns:
      ``cls`` itself (registered), or a decorator when ``cls`` is omitted.

    Examples:
      >>> @register_dataclass
      ... @dataclasses.dataclass
      ... class State:
      ...     count: int
      ...     mu: object
      >>> leaves(State(0, {"w": 1.0}))
      [0, 1.0]
    """

    def wrap(c: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(c):
            raise TypeError(f"register_dataclass: {c.__name__} is not a dataclass")
        all_fields = [f.name for f in dataclasses.fields(c)]
        meta = tuple(meta_fields)
        data = tuple(data_fields) if data_fields is not None else tuple(n for n in all_fields if n not in meta)
        unknown = [n for n in (*data, *meta) if n not in all_fields]
        if unknown:
            raise ValueError(f"register_dataclass: {c.__name__} has no fields {unknown}")

        def flatten_fn(obj: T) -> tuple[list[Any], tuple[Any, ...]]:
            return [getattr(obj, n) for n in data], tuple(getattr(obj, n) for n in meta)

        def unflatten_fn(aux: tuple[Any, ...], children: Sequence[Any]) -> T:
            kwargs = dict(zip(data, children, strict=True))
            kwargs.update(zip(meta, aux, strict=True))
            obj = object.__new__(c)
            for k, v in kwargs.items():
                object.__setattr__(obj, k, v)
            return obj

        return register_pytree_node(c, flatten_fn, unflatten_fn, field_names=data)

    return wrap if cls is None else wrap(cls)
