"""Tree structure <-> JSON: how a checkpoint records where its leaves go.

A tree is encoded as nested JSON nodes, each an object with a kind ``"t"``:

==============  =================================================================
``tensor``      ``{"t": "tensor", "n": name}``, the name of a tensor in the file
``none``        ``None``
``bool``        ``{"t": "bool", "v": true}``
``int``         ``{"t": "int", "v": 3}``, up to 4300 digits (Python's default limit on
                int/str conversion, which JSON parsing applies too)
``float``       ``{"t": "float", "v": "0x1.8p+1"}``: ``float.hex``, so every value,
                ``-0.0``, ``inf`` and ``nan`` round-trip exactly (not nan payloads)
``str``         ``{"t": "str", "v": "adam"}``
``dict``        ``{"t": "dict", "k": [key nodes], "c": [children]}``, insertion order;
                keys are ``str`` or ``int``. ``odict`` is the same for OrderedDict.
``list``        ``{"t": "list", "c": [...]}``; ``tuple`` likewise
``namedtuple``  ``{"t": "namedtuple", "type": "module:Qual", "f": [fields], "c": [...]}``
``node``        ``{"t": "node", "type": "module:Qual", "aux": node, "f": [entries],
                "c": [...]}``: a class registered with ``fp.tree`` (dataclasses)
==============  =================================================================

Strings and ``str`` keys must be valid UTF-8 (no lone surrogates), as the JSON header is.
``type`` is :func:`recorded_name` of the class: the name it was given to
:func:`register_type`, else ``module:QualName``.

# NOTE [type registry]
Rebuilding a NamedTuple or a registered dataclass needs its class, and a file must never
be able to make us import or call arbitrary code. Classes are found by qualified name
(``module:QualName``) in two places only: the explicit registry filled by
:func:`register_type`, and the library's own modules (``functorch_pipeline.*``), so
optimizer states and ``TrainState`` load with no registration. A name from our package is
resolved by importing that module of our package and walking attributes; the result must
be a class whose ``__module__``/``__qualname__`` are exactly the name (no re-exported
foreign objects) and which is a NamedTuple or a class registered with ``fp.tree``. Any
other name is refused with an error that says to call ``register_type`` or to pass
``like=``. Rebuilding then only calls the NamedTuple's ``_make`` or the ``fp.tree``
unflatten function registered for the class.
"""

from __future__ import annotations

import collections
import importlib
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import optree
import torch

from functorch_pipeline.serialization._format import CheckpointError
from functorch_pipeline.serialization._format import dtype_name
from functorch_pipeline.tree import NAMESPACE
from functorch_pipeline.tree import KeyPath
from functorch_pipeline.tree import keystr

__all__ = ["Encoder", "decode", "leaf_nodes", "recorded_name", "register_type", "type_name"]

_REGISTRY: dict[str, type] = {}  # recorded name -> class, for loading
_NAMES: dict[type, str] = {}  # class -> the name register_type was given, for saving
_INT_LIMIT = 10**4300  # sys.int_info.default_max_str_digits: json.loads refuses longer ints
_LIB = "functorch_pipeline"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def type_name(cls: type) -> str:
    """The name a checkpoint records for a class: ``module:QualName``.

    >>> import collections
    >>> type_name(collections.OrderedDict)
    'collections:OrderedDict'
    """
    return f"{cls.__module__}:{cls.__qualname__}"


def recorded_name(cls: type) -> str:
    """The name a checkpoint records for ``cls``: the ``name`` it was registered under
    with :func:`register_type` (the latest such call), else :func:`type_name`.

    Args:
      cls: a class.

    Returns:
      The ``module:QualName``-style name written to the file.

    >>> from typing import NamedTuple
    >>> class Moved(NamedTuple):
    ...     x: int
    >>> _ = register_type(Moved, name="oldlib.stats:Moved")
    >>> recorded_name(Moved)
    'oldlib.stats:Moved'
    """
    return _NAMES.get(cls) or type_name(cls)


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple)


def _custom_entry(cls: type) -> Any:
    entry = optree.register_pytree_node.get(cls, namespace=NAMESPACE)
    return entry if entry is not None and entry.kind == optree.PyTreeKind.CUSTOM else None


def register_type(cls: type, name: str | None = None) -> type:
    """Let :func:`fp.load <load>` rebuild ``cls`` from a checkpoint without ``like=``.

    The library's own NamedTuples and registered dataclasses (optimizer states,
    ``TrainState``) need no registration (see NOTE [type registry]); your own classes do,
    in every process that loads them. Usable as a decorator.

    Args:
      cls: a NamedTuple class, or a class registered with ``fp.tree.register_dataclass``
        / ``fp.tree.register_pytree_node``.
      name: the name to record; default ``module:QualName``. Pass one to keep old
        checkpoints loading after moving or renaming the class: :func:`fp.save <save>`
        then records ``name`` for ``cls`` (so files load in any process that registers
        ``cls`` under the same name, wherever the class lives), and files that recorded
        the class's own ``module:QualName`` still load too.

    Returns:
      ``cls``, unchanged.

    >>> from typing import NamedTuple
    >>> @register_type
    ... class Stats(NamedTuple):
    ...     count: int
    ...     total: float
    >>> type_name(Stats) in _REGISTRY
    True

    Notes:
      NOTE [type registry]: a file never imports or calls arbitrary code: classes are found by
        qualified name only in the ``register_type`` registry and in ``functorch_pipeline``'s own
        modules.
    """
    if not isinstance(cls, type) or not (_is_namedtuple(cls) or _custom_entry(cls) is not None):
        raise TypeError(
            f"register_type(cls): `cls` must be a NamedTuple or a class registered with "
            f"fp.tree.register_dataclass / register_pytree_node, got {cls!r}"
        )
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"register_type(cls, name): `name` must be a non-empty str, got {name!r}")
    own = type_name(cls)
    _REGISTRY[name if name is not None else own] = cls
    _REGISTRY.setdefault(own, cls)  # files that recorded the default name keep loading
    _NAMES[cls] = name if name is not None else own
    return cls


def _resolve(name: Any, where: str, path: KeyPath) -> type:
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    text = str(name)[:120]
    mod, _, qual = text.partition(":") if isinstance(name, str) else ("", "", "")
    unknown = CheckpointError(
        f"{where}: the checkpoint needs type `{text}` at path `{keystr(path)}`, which is not "
        "registered; call fp.serialization.register_type(cls) before loading, or pass `like=`"
    )
    if not (mod == _LIB or mod.startswith(_LIB + ".")) or not _DOTTED.match(mod) or not _DOTTED.match(qual):
        raise unknown
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError:
        raise unknown from None
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    if not (
        isinstance(obj, type)
        and obj.__module__ == mod
        and obj.__qualname__ == qual
        and (_is_namedtuple(obj) or _custom_entry(obj) is not None)
    ):
        raise unknown
    return obj


# ----------------------------------------------------------------------------- encoding


class Encoder:
    """Walks a tree once, producing its JSON node and the list of its tensors, each with
    a unique name derived from its key path (``params.fc1.weight``)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self._names: set[str] = {"__metadata__"}
        # The total key-path length fp.load's leaf_nodes will charge (NOTE [parse budget]).
        self.path_units = 0

    def _fail(self, path: KeyPath, msg: str) -> TypeError:
        return TypeError(f"{self.where}: value at path `{keystr(path)}` {msg}")

    def _name(self, path: KeyPath) -> str:
        base = keystr(path)
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}#{i}"
        self._names.add(name)
        return name

    def encode(self, obj: Any, path: KeyPath = (), static: bool = False) -> dict[str, Any]:
        if isinstance(obj, torch.Tensor):
            if static:
                raise self._fail(path, "is a tensor inside static (aux) data of a registered class")
            self._check_tensor(obj, path)
            name = self._name(path)
            self.tensors.append((name, obj))
            self.path_units += len(path) + 1
            return {"t": "tensor", "n": name}
        if obj is None:
            return {"t": "none"}
        if not static and type(obj) in (bool, int, float, str):
            self.path_units += len(path) + 1
        if isinstance(obj, bool):
            return {"t": "bool", "v": obj}
        if type(obj) is int:
            if not -_INT_LIMIT < obj < _INT_LIMIT:
                raise self._fail(
                    path,
                    f"is an int of {obj.bit_length()} bits, more than 4300 decimal digits, "
                    "which JSON parsing refuses (Python's int/str conversion limit); store it "
                    "as a str",
                )
            return {"t": "int", "v": obj}
        if type(obj) is float:
            return {"t": "float", "v": obj.hex()}
        if type(obj) is str:
            if not _is_utf8(obj):
                raise self._fail(path, f"is a str that is not valid UTF-8 ({_utf8_problem(obj)}); {_UTF8_HINT}")
            return {"t": "str", "v": obj}
        cls = type(obj)
        if cls is dict or cls is collections.OrderedDict:
            keys = []
            for k in obj:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise self._fail(path, f"is a dict with key {k!r} of type {type(k).__name__}; keys must be str or int")
                if isinstance(k, str) and not _is_utf8(k):
                    raise self._fail(path, f"is a dict with key {k!r} that is not valid UTF-8 ({_utf8_problem(k)}); {_UTF8_HINT}")
                keys.append(k)
            return {
                "t": "dict" if cls is dict else "odict",
                "k": [self.encode(k, path, static=True) for k in keys],
                "c": [self.encode(obj[k], (*path, k), static) for k in keys],
            }
        if cls is list or cls is tuple:
            return {"t": cls.__name__, "c": [self.encode(x, (*path, i), static) for i, x in enumerate(obj)]}
        if _is_namedtuple(cls):
            fields = list(cls._fields)
            return {
                "t": "namedtuple",
                "type": recorded_name(cls),
                "f": fields,
                "c": [self.encode(x, (*path, f), static) for f, x in zip(fields, obj, strict=True)],
            }
        if _custom_entry(cls) is not None:
            out = optree.tree_flatten_one_level(obj, namespace=NAMESPACE)
            entries = [e if isinstance(e, (str, int)) else str(e) for e in out.entries]
            return {
                "t": "node",
                "type": recorded_name(cls),
                "aux": self.encode(out.metadata, path, static=True),
                "f": entries,
                "c": [self.encode(x, (*path, e), static) for e, x in zip(entries, out.children, strict=True)],
            }
        raise self._fail(
            path,
            f"is a {cls.__module__}.{cls.__qualname__}; a checkpoint holds tensors, int, float, bool, "
            "str, None and containers (dict, OrderedDict, list, tuple, NamedTuple, classes registered "
            "with fp.tree.register_dataclass)",
        )

    def _check_tensor(self, t: torch.Tensor, path: KeyPath) -> None:
        if t.is_nested:
            raise self._fail(path, "is a nested tensor; only dense (strided) tensors can be saved (save its unbind() list)")
        if t.layout != torch.strided:
            raise self._fail(path, f"is a {t.layout} tensor; only dense (strided) tensors can be saved")
        if t.is_quantized:
            raise self._fail(path, "is a quantized tensor, which a safetensors file cannot hold")
        if t.device.type == "meta":
            raise self._fail(path, "is a meta tensor: it has no data to save")
        if dtype_name(t.dtype) is None:
            raise self._fail(path, f"has dtype {t.dtype}, which safetensors cannot hold; cast it first")


_UTF8_HINT = "a checkpoint's header is UTF-8 JSON (for file names, use os.fsencode(name).hex() or a bytes tensor)"


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8_problem(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{e.reason}: {s[e.start:e.end]!r} at index {e.start}"
    return "valid"


# ----------------------------------------------------------------------------- decoding

_SCALARS = {"bool": bool, "int": int, "str": str}


def _bad(where: str, path: KeyPath, msg: str) -> CheckpointError:
    return CheckpointError(f"{where}: corrupted tree structure at path `{keystr(path)}`: {msg}")


def _scalar(node: dict[str, Any], where: str, path: KeyPath) -> Any:
    kind = node["t"]
    v = node.get("v")
    if kind == "float":
        if not isinstance(v, str):
            raise _bad(where, path, "a float node must hold a hex string")
        try:
            return float.fromhex(v)
        except (ValueError, OverflowError):
            raise _bad(where, path, f"invalid float {v[:40]!r}") from None
    typ = _SCALARS[kind]
    if type(v) is not typ:
        raise _bad(where, path, f"a {kind} node holds {type(v).__name__}")
    return v


def _children(node: dict[str, Any], where: str, path: KeyPath) -> list[tuple[Any, Any]]:
    """``[(path entry, child node)]`` of a container node, validated."""
    c = node.get("c")
    if not isinstance(c, list):
        raise _bad(where, path, f"a {node['t']} node needs a list of children")
    kind = node["t"]
    if kind in ("dict", "odict"):
        keys = node.get("k")
        if not isinstance(keys, list) or len(keys) != len(c):
            raise _bad(where, path, "a dict node needs as many keys as children")
        entries = []
        for k in keys:
            if not isinstance(k, dict) or k.get("t") not in ("str", "int"):
                raise _bad(where, path, "dict keys must be str or int nodes")
            entries.append(_scalar(k, where, path))
        return list(zip(entries, c, strict=True))
    if kind in ("namedtuple", "node"):
        f = node.get("f")
        if not isinstance(f, list) or len(f) != len(c) or not all(isinstance(e, (str, int)) for e in f):
            raise _bad(where, path, f"a {kind} node needs one field name per child")
        return list(zip(f, c, strict=True))
    return list(enumerate(c))


_CONTAINERS = ("dict", "odict", "list", "tuple", "namedtuple", "node")


def _kind(node: Any, where: str, path: KeyPath) -> str:
    if not isinstance(node, dict) or not isinstance(node.get("t"), str):
        raise _bad(where, path, "every node must be an object with a string kind `t`")
    kind = node["t"]
    if kind not in ("tensor", "none", "float", *_SCALARS, *_CONTAINERS):
        raise _bad(where, path, f"unknown node kind {kind[:40]!r}")
    return kind


def leaf_nodes(
    node: Any, where: str, path: KeyPath = (), budget: int | None = None
) -> list[tuple[KeyPath, dict[str, Any]]]:
    """``[(path, leaf node)]`` in tree order, validating the structure; ``None`` nodes are
    empty subtrees (as in ``fp.tree``). Resolves no types. ``budget`` caps the total length
    of the leaves' key paths (NOTE [parse budget]): a deep tree with many leaves would
    otherwise cost depth x leaves.

    >>> leaf_nodes({"t": "list", "c": [{"t": "int", "v": 1}, {"t": "none"}]}, "example")
    [((0,), {'t': 'int', 'v': 1})]
    """
    out: list[tuple[KeyPath, dict[str, Any]]] = []
    left = [budget if budget is not None else -1]
    _leaf_nodes(node, where, path, out, left)
    return out


def _leaf_nodes(
    node: Any, where: str, path: KeyPath, out: list[tuple[KeyPath, dict[str, Any]]], left: list[int]
) -> None:
    kind = _kind(node, where, path)
    if kind == "none":
        return
    if kind not in _CONTAINERS:
        if kind == "tensor":
            if not isinstance(node.get("n"), str):
                raise _bad(where, path, "a tensor node needs a string name `n`")
        else:
            _scalar(node, where, path)
        if left[0] >= 0:
            left[0] -= len(path) + 1
            if left[0] < 0:
                raise CheckpointError(
                    f"{where}: the tree's key paths are too long in total for the file's size "
                    f"(a leaf at depth {len(path)}, {len(out)} leaves so far; NOTE [parse "
                    "budget]); refusing to build them"
                )
        out.append((path, node))
        return
    for entry, child in _children(node, where, path):
        _leaf_nodes(child, where, (*path, entry), out, left)


def decode(
    node: Any, tensor: Callable[[str, KeyPath], torch.Tensor], where: str, path: KeyPath = ()
) -> Any:
    """Rebuild a tree from its JSON node; ``tensor(name, path)`` supplies tensor leaves."""
    kind = _kind(node, where, path)
    if kind == "tensor":
        return tensor(node.get("n"), path)
    if kind == "none":
        return None
    if kind not in _CONTAINERS:
        return _scalar(node, where, path)
    pairs = _children(node, where, path)
    kids = [decode(child, tensor, where, (*path, e)) for e, child in pairs]
    if kind == "dict":
        return dict(zip((e for e, _ in pairs), kids, strict=True))
    if kind == "odict":
        return collections.OrderedDict(zip((e for e, _ in pairs), kids, strict=True))
    if kind == "list":
        return kids
    if kind == "tuple":
        return tuple(kids)
    cls = _resolve(node.get("type"), where, path)
    fields = [e for e, _ in pairs]
    if kind == "namedtuple":
        if not _is_namedtuple(cls) or list(cls._fields) != fields:
            have = list(cls._fields) if _is_namedtuple(cls) else "not a NamedTuple"
            raise CheckpointError(
                f"{where}: type `{type_name(cls)}` at path `{keystr(path)}` has fields {have} "
                f"now but {fields} on disk; pass `like=` to load into the new layout"
            )
        return cls._make(kids)
    entry = _custom_entry(cls)
    if entry is None:
        raise CheckpointError(f"{where}: type `{type_name(cls)}` at path `{keystr(path)}` is no longer registered with fp.tree")
    aux = _freeze(decode(node.get("aux"), _no_tensor(where), where, path))
    mismatch = CheckpointError(
        f"{where}: type `{type_name(cls)}` at path `{keystr(path)}` does not accept the fields "
        f"{fields} stored on disk; pass `like=` to load into the class's new layout"
    )
    try:
        obj = entry.unflatten_func(aux, kids)
        probe = optree.tree_flatten_one_level(obj, namespace=NAMESPACE)
    except Exception:  # the class's own unflatten rejected the stored children
        raise mismatch from None
    if [e if isinstance(e, (str, int)) else str(e) for e in probe.entries] != fields:
        raise mismatch
    return obj


def _freeze(x: Any) -> Any:
    """Aux data must be hashable: lists from JSON become tuples, dicts stay dicts."""
    if isinstance(x, list):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, Mapping):
        return type(x)((k, _freeze(v)) for k, v in x.items())
    return x


def _no_tensor(where: str) -> Callable[[str, KeyPath], torch.Tensor]:
    def fail(name: str, path: KeyPath) -> torch.Tensor:
        raise _bad(where, path, "static (aux) data of a registered class cannot hold a tensor")

    return fail
