"""Write the API reference pages (docs/api/*.md) from every public module's ``__all__``.

Run ``python docs/gen_api.py`` after adding a public name; ``tests/test_docs_api.py`` fails
when a name in an ``__all__`` is missing from its page. Names are grouped by the private
module that defines them, under that module's one-line summary.
"""

from __future__ import annotations

import importlib
import inspect
import os
import types

# (module, page file, page title); the order is the site's navigation order
MODULES = [
    ("functorch_pipeline", "fp.md", "fp (top level)"),
    ("functorch_pipeline.transforms", "transforms.md", "fp.transforms"),
    ("functorch_pipeline.tree", "tree.md", "fp.tree"),
    ("functorch_pipeline.random", "random.md", "fp.random"),
    ("functorch_pipeline.nn", "nn.md", "fp.nn"),
    ("functorch_pipeline.nn.init", "nn_init.md", "fp.nn.init"),
    ("functorch_pipeline.losses", "losses.md", "fp.losses"),
    ("functorch_pipeline.optim", "optim.md", "fp.optim"),
    ("functorch_pipeline.serialization", "serialization.md", "fp.serialization"),
    ("functorch_pipeline.data", "data.md", "fp.data"),
    ("functorch_pipeline.devices", "devices.md", "fp.devices"),
    ("functorch_pipeline.privacy", "privacy.md", "fp.privacy"),
    ("functorch_pipeline.implicit", "implicit.md", "fp.implicit"),
    ("functorch_pipeline.distributed", "distributed.md", "fp.distributed"),
    ("functorch_pipeline.train", "train.md", "fp.train"),
]

HERE = os.path.dirname(os.path.abspath(__file__))


def _summary(module_name: str) -> str:
    doc = inspect.getdoc(importlib.import_module(module_name)) or module_name
    para = " ".join(doc.strip().split("\n\n")[0].split())
    return para.split(". ")[0].rstrip(".:").replace("``", "`")


def _page(module_name: str, title: str) -> str:
    mod = importlib.import_module(module_name)
    pages = {m: f for m, f, _ in MODULES}
    groups: dict[str, list[str]] = {}
    submodules: list[str] = []
    constants: list[str] = []
    for name in sorted(mod.__all__, key=str.lower):
        obj = getattr(mod, name)
        if isinstance(obj, types.ModuleType):
            submodules.append(name)
            continue
        if not callable(obj):
            # NOTE [constants as a table]: griffe cannot follow every constant's assignment
            # statically (tuple unpacking), so values are listed from the imported module.
            constants.append(name)
            continue
        home = getattr(obj, "__module__", None)
        if not isinstance(home, str) or not home.startswith("functorch_pipeline"):
            home = module_name
        groups.setdefault(home, []).append(name)
    out = [f"# {title}", "", f"::: {module_name}", "    options:", "      members: false",
           "      show_root_heading: false", "      show_root_toc_entry: false", ""]
    if submodules:
        out += ["## Modules", ""]
        for name in submodules:
            target = pages.get(f"{module_name}.{name}")
            link = f"[`fp.{name}`]({target})" if target else f"`fp.{name}`"
            out.append(f"- {link}: {_summary(f'{module_name}.{name}')}")
        out.append("")
    if constants:
        out += ["## Constants and type aliases", "", "| name | value |", "| --- | --- |"]
        for name in constants:
            value = repr(getattr(mod, name)).replace("|", "\\|")
            value = value if len(value) <= 80 else value[:77] + "..."
            out.append(f"| `{name}` | `{value}` |")
        out.append("")
    for home in sorted(groups):
        heading = _summary(home) if home != module_name else "Types"
        out += [f"## {heading}", ""]
        for name in groups[home]:
            out += [f"::: {module_name}.{name}", ""]
    return "\n".join(out)


def main() -> None:
    for module_name, filename, title in MODULES:
        with open(os.path.join(HERE, "api", filename), "w") as f:
            f.write(_page(module_name, title))


if __name__ == "__main__":
    main()
