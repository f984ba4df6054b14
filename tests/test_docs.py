"""Every ```python block of every page of the documentation site runs.

Blocks of one page run in order in one namespace (a page is one tutorial), in a temporary
directory, like the README tour in ``test_readme.py``. Blocks fenced as ```text or
```bash are not run.
"""

from __future__ import annotations

import os
import re
import sys
import types

import pytest
import torch

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs")
PAGES = sorted(
    os.path.relpath(os.path.join(root, name), DOCS)
    for root, _, names in os.walk(DOCS)
    for name in names
    if name.endswith(".md")
)


def python_blocks(page: str) -> list[str]:
    with open(os.path.join(DOCS, page)) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_the_guides_have_code():
    guides = [p for p in PAGES if p.startswith("guides" + os.sep)]
    assert len(guides) >= 8, guides
    for page in guides:
        assert python_blocks(page), f"{page} has no ```python block"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    # A real module in sys.modules, as a user's script would be: torch.compile (torch 2.11)
    # imports the module of the globals it traces, by name.
    module = types.ModuleType("__docs__")
    monkeypatch.setitem(sys.modules, "__docs__", module)
    try:
        for i, block in enumerate(python_blocks(page)):
            exec(compile(block, f"docs/{page} (block {i + 1})", "exec"), module.__dict__)
    finally:
        torch.set_num_threads(threads)  # the performance guide sets it
