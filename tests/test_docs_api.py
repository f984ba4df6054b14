"""The API reference documents every public name, and the site's configuration is complete.

Every name in the ``__all__`` of every public module (no ``_`` in its dotted path) must
appear on an API page: as a ``::: module.name`` directive (rendered by mkdocstrings), a row
of the constants table, or a link to a submodule's page. Adding a public name without
regenerating the pages (``python docs/gen_api.py``) fails here. Also: every page is in
the site's navigation, and the griffe extension reads our docstring habits as intended.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import types

import pytest

import functorch_pipeline as fp

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
DOCS = os.path.join(ROOT, "docs")


def _load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", os.path.join(DOCS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load("gen_api")
GRIFFE_FP = _load("griffe_fp")
PAGES = {module: page for module, page, _ in GEN.MODULES}


def public_modules() -> list[str]:
    names = ["functorch_pipeline"]
    for info in pkgutil.walk_packages(fp.__path__, "functorch_pipeline."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def page_text(module: str) -> str:
    with open(os.path.join(DOCS, "api", PAGES[module])) as f:
        return f.read()


def documented(module: str, name: str, text: str) -> bool:
    return (f"\n::: {module}.{name}\n" in text
            or f"| `{name}` |" in text
            or re.search(rf"\[`fp\.{re.escape(name)}`\]\(\w+\.md\)", text) is not None)


def test_the_brief_modules_have_pages():
    wanted = ["tree", "random", "nn", "nn.init", "losses", "optim", "data", "devices",
              "serialization", "train", "transforms", "privacy", "implicit", "distributed"]
    assert "functorch_pipeline" in PAGES
    for short in wanted:
        assert f"functorch_pipeline.{short}" in PAGES, short


@pytest.mark.parametrize("module", sorted(PAGES))
def test_every_public_name_is_on_its_page(module):
    mod = importlib.import_module(module)
    text = page_text(module)
    missing = [n for n in mod.__all__ if not documented(module, n, text)]
    assert not missing, (f"{module}: {missing} missing from docs/api/{PAGES[module]}; "
                         "run `python docs/gen_api.py`")
    assert text == GEN._page(module, dict((m, t) for m, _, t in GEN.MODULES)[module]), (
        f"docs/api/{PAGES[module]} is stale: run `python docs/gen_api.py`")


def test_public_modules_without_a_page_are_documented_elsewhere():
    # e.g. fp.nn.recurrent: its names are re-exported (and documented) by fp.nn
    on_pages = set()
    for module in PAGES:
        mod = importlib.import_module(module)
        text = page_text(module)
        on_pages |= {id(getattr(mod, n)) for n in mod.__all__ if documented(module, n, text)}
    for module in public_modules():
        if module in PAGES:
            continue
        mod = importlib.import_module(module)
        assert hasattr(mod, "__all__"), f"{module} is public but has no __all__"
        orphans = [n for n in mod.__all__ if id(getattr(mod, n)) not in on_pages]
        assert not orphans, f"{module}.{orphans} are on no API page: add it to docs/gen_api.py"


def test_every_page_is_in_the_navigation():
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        config = f.read()
    pages = [os.path.relpath(os.path.join(r, n), DOCS).replace(os.sep, "/")
             for r, _, names in os.walk(DOCS) for n in names if n.endswith(".md")]
    assert len(pages) >= 1 + 8 + len(PAGES)
    for page in pages:
        assert f": {page}\n" in config, f"docs/{page} is not in mkdocs.yml's nav"


def test_griffe_extension_normalises_our_docstring_habits():
    doc = "\n".join([
        "Summary, see :func:`fp.load <load>` and :class:`torch.nn.GRU`.",
        "",
        "# NOTE [a design note]",
        "Text.",
        "",
        "Args:",
        "  b1, b2: the decay rates,",
        "    wrapped.",
        "  input_size, hidden_size,",
        "  bias: as LSTM.",
        "  eps: small.",
        "",
        "Example:",
        "  >>> 1 + 1",
        "  2",
    ])
    assert GRIFFE_FP.normalize(doc).split("\n") == [
        "Summary, see `fp.load` and `torch.nn.GRU`.",
        "",
        "**NOTE [a design note]**",
        "Text.",
        "",
        "Args:",
        "  b1: the decay rates,",
        "    wrapped.",
        "  b2: the decay rates,",
        "    wrapped.",
        "  input_size: as LSTM.",
        "  hidden_size: as LSTM.",
        "  bias: as LSTM.",
        "  eps: small.",
        "",
        "Examples:",
        "  >>> 1 + 1",
        "  2",
    ]
    bare = "Summary.\n\n>>> f(1)\n2"
    assert GRIFFE_FP.normalize(bare) == "Summary.\n\nExamples:\n  >>> f(1)\n  2"
