"""Every public name is documented: Args, Returns, a runnable example and type hints.

The test walks ``__all__`` of each public module (``MODULES``) and checks each exported object
against these rules (issue 15, item 2):

* **Functions** (anything callable that is not a class): a docstring with

  - an ``Args:`` section when the signature has parameters other than ``self``/``cls``, with
    an entry for each of them (``name: ...``; several may share one entry, ``a, b: ...``;
    ``*args``/``**kwargs`` may be written with or without their stars);
  - a ``Returns:`` (or ``Yields:``) section unless the return annotation is ``None``;
  - a runnable example: a ``>>>`` line (the suite runs the package with ``--doctest-modules``,
    so the example also has to pass);
  - type hints on every parameter (``*args``/``**kwargs`` included) and on the return.

* **Classes**: a docstring with a ``>>>`` example, and an ``Args:`` or ``Attributes:`` section
  when the constructor takes parameters, with an entry for each of them (a class is called
  like a function, so its constructor's parameters are its arguments; dataclasses may list
  their fields as ``Attributes:``). No ``Returns:``: calling a class returns an instance of it.

* **Public methods** (defined in a public class, name without a leading underscore): a
  docstring with ``Args:``/``Returns:`` as for functions, and type hints; no example is
  required, since the class's example shows them in use. Properties are skipped, and so are
  ``forward``/``extra_repr`` of ``nn.Module`` subclasses (PyTorch's hooks, called as
  ``module(x)`` and documented by the class).

* **NamedTuple state classes** (optimizer states, ``TrainState``-like records): these are
  records users receive rather than build, so a docstring naming every field suffices (in an
  ``Attributes:`` section or in prose); no example is required.

* **Exception classes**: a docstring saying when they are raised suffices.

* **Constants, type aliases and submodules** (non-callable values such as version strings,
  aliases such as ``PyTree = Any`` or ``Schedule = Callable[...]``, or ``fp.optim`` listed in
  ``fp.__all__``): nothing is required here; type aliases cannot carry a docstring of their own
  (they are documented where they are used), and submodules are walked themselves.

An object that is re-exported under several names is checked once.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types

import pytest
import torch

MODULES = [
    "functorch_pipeline",
    "functorch_pipeline.tree",
    "functorch_pipeline.random",
    "functorch_pipeline.nn",
    "functorch_pipeline.nn.init",
    "functorch_pipeline.losses",
    "functorch_pipeline.optim",
    "functorch_pipeline.data",
    "functorch_pipeline.devices",
    "functorch_pipeline.serialization",
    "functorch_pipeline.train",
    "functorch_pipeline.transforms",
    "functorch_pipeline.privacy",
    "functorch_pipeline.implicit",
    "functorch_pipeline.distributed",
]

_SECTION = r"^\s*{}:\s*$"


def _has_section(doc: str, *names: str) -> bool:
    return any(re.search(_SECTION.format(n), doc, flags=re.M) for n in names)


def _section_names(doc: str, *titles: str) -> set[str] | None:
    """The entry names of the first Google-style section among ``titles``, or ``None``."""
    alternatives = "|".join(titles)
    m = re.search(rf"^([ \t]*)(?:{alternatives}):[ \t]*$", doc, flags=re.M)
    if m is None:
        return None
    names: set[str] = set()
    entry_indent = None
    for line in doc[m.end():].split("\n"):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= len(m.group(1)):
            break  # the section ended
        if entry_indent is None:
            entry_indent = indent
        if indent == entry_indent:  # an entry, not its continuation lines
            head = line.strip().split(":")[0]
            names.update(n.strip().lstrip("*").split(" ")[0] for n in head.split(","))
    return names


def _undocumented_params(doc: str, params: list[inspect.Parameter], *titles: str) -> list[str]:
    names = _section_names(doc, *titles)
    if names is None:
        return []  # reported as a missing section
    return [p.name for p in params if p.name not in names]


def _is_namedtuple(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def _is_type_alias(obj: object) -> bool:
    # typing.Any, tuple[...], Callable[...]: callable objects that are annotations, not APIs
    return getattr(obj, "__module__", None) in ("typing", "collections.abc") or (
        isinstance(obj, types.GenericAlias)
    )


def _signature(obj):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _params(sig) -> list[inspect.Parameter]:
    return [p for p in sig.parameters.values() if p.name not in ("self", "cls")]


def _function_problems(obj) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    problems = []
    if not doc:
        return ["no docstring"]
    sig = _signature(obj)
    if sig is None:
        return ["no inspectable signature"]
    params = _params(sig)
    if params and not _has_section(doc, "Args", "Arguments"):
        problems.append("no Args: section")
    elif missing_args := _undocumented_params(doc, params, "Args", "Arguments"):
        problems.append(f"Args: has no entry for {missing_args}")
    returns_none = sig.return_annotation in (None, "None")
    if not returns_none and not _has_section(doc, "Returns", "Yields"):
        problems.append("no Returns: section")
    if ">>>" not in doc:
        problems.append("no >>> example")
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    if missing:
        problems.append(f"parameters without type hints: {missing}")
    if sig.return_annotation is inspect.Signature.empty:
        problems.append("no return annotation")
    return problems


def _class_problems(cls: type) -> list[str]:
    doc = inspect.getdoc(cls) or ""
    if not doc or doc == inspect.getdoc(object):
        return ["no docstring"]
    if issubclass(cls, BaseException):
        return []
    if _is_namedtuple(cls):
        unnamed = [f for f in cls._fields if not re.search(rf"\b{re.escape(f)}\b", doc)]
        return [f"fields not described: {unnamed}"] if unnamed else []
    problems = []
    sig = _signature(cls)
    if sig is not None and _params(sig):
        if not _has_section(doc, "Args", "Arguments", "Attributes"):
            problems.append("no Args:/Attributes: section")
        elif missing_args := _undocumented_params(doc, _params(sig), "Args", "Arguments",
                                                  "Attributes"):
            problems.append(f"Args: has no entry for {missing_args}")
    if ">>>" not in doc:
        problems.append("no >>> example")
    return problems


def _public_objects():
    seen: dict[int, str] = {}
    for modname in MODULES:
        module = importlib.import_module(modname)
        assert hasattr(module, "__all__"), f"{modname} has no __all__"
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) or not callable(obj) or _is_type_alias(obj):
                continue
            if id(obj) in seen:
                continue
            seen[id(obj)] = f"{modname}.{name}"
            yield f"{modname}.{name}", obj


_MODULE_HOOKS = ("forward", "extra_repr")


def _public_methods():
    for qual, cls in _public_objects():
        if not isinstance(cls, type) or _is_namedtuple(cls) or issubclass(cls, BaseException):
            continue
        is_module = issubclass(cls, torch.nn.Module)
        for name, member in vars(cls).items():
            if name.startswith("_") or (is_module and name in _MODULE_HOOKS):
                continue
            fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            if inspect.isfunction(fn):
                yield f"{qual}.{name}", fn


def _method_problems(fn) -> list[str]:
    return [p for p in _function_problems(fn) if p != "no >>> example"]


def _problems(obj) -> list[str]:
    if isinstance(obj, type):
        return _class_problems(obj)
    return _function_problems(obj)


def test_every_public_module_has_all():
    for modname in MODULES:
        module = importlib.import_module(modname)
        assert isinstance(getattr(module, "__all__", None), list | tuple), modname
        for name in module.__all__:
            assert hasattr(module, name), f"{modname}.__all__ lists missing name {name!r}"


def test_every_public_name_is_documented():
    report = [f"{qual}: {'; '.join(p)}" for qual, obj in _public_objects() if (p := _problems(obj))]
    assert not report, f"{len(report)} public names lack documentation:\n" + "\n".join(report)


def test_every_public_method_is_documented():
    methods = list(_public_methods())
    assert len(methods) > 10  # the walk reaches the classes' methods
    report = [f"{qual}: {'; '.join(p)}" for qual, fn in methods if (p := _method_problems(fn))]
    assert not report, f"{len(report)} public methods lack documentation:\n" + "\n".join(report)


# The checker itself must be able to fail: each rule rejects a counterexample.


def _undocumented(x, y=1):
    return x + y


def _no_returns(x: int) -> int:
    """Add one.

    Args:
        x: a number.

    Examples:
        >>> _no_returns(1)
        2
    """
    return x + 1


def _partial_args(x: int, y: int) -> int:
    """Add.

    Args:
        x: a number,
            continued (not an entry).

    Returns:
        ``x + y``.

    Examples:
        >>> _partial_args(1, 2)
        3
    """
    return x + y


def _complete(x: int) -> int:
    """Add one.

    Args:
        x: a number.

    Returns:
        ``x + 1``.

    Examples:
        >>> _complete(1)
        2
    """
    return x + 1


class _BareClass:
    """A class without sections."""

    def __init__(self, a: int) -> None:
        self.a = a


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (_undocumented, ["no docstring"]),
        (_no_returns, ["no Returns: section"]),
        (_complete, []),
        (_partial_args, ["Args: has no entry for ['y']"]),
        (_BareClass, ["no Args:/Attributes: section", "no >>> example"]),
    ],
)
def test_checker_rejects_counterexamples(obj, expected):
    assert _problems(obj) == expected


class _Holder:
    """A class with one undocumented and one documented method.

    >>> _Holder().ok()
    1
    """

    def bad(self, x):
        """No sections."""
        return x

    def ok(self) -> int:
        """One.

        Returns:
            1.
        """
        return 1


def test_checker_flags_methods():
    problems = _method_problems(_Holder.bad)
    assert problems == ["no Args: section", "no Returns: section",
                        "parameters without type hints: ['x']", "no return annotation"]
    assert _method_problems(_Holder.ok) == []


def test_checker_flags_missing_hints_and_namedtuple_fields():
    from typing import NamedTuple

    def f(x, y: int):
        """Doc.

        Args:
            x: a.
            y: b.

        Returns:
            c.

        >>> 1
        1
        """

    problems = _problems(f)
    assert "parameters without type hints: ['x']" in problems
    assert "no return annotation" in problems

    class State(NamedTuple):
        """Holds ``count``."""

        count: int
        mu: int

    assert _problems(State) == ["fields not described: ['mu']"]
