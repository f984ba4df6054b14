"""The README's tour is code users copy: it must run, and its claims must hold."""

from __future__ import annotations

import os
import re

import torch

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_readme_tour_runs(tmp_path, monkeypatch):
    text = open(README).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    tour = next(b for b in blocks if "fp.functionalize" in b)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(tour, "README.md", "exec"), ns)
    # the fast and the vmap per-example gradients agree, and the checkpoint round-trips
    for a, b in zip(ns["per_example"].values(), ns["fast"].values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ns["restored"]["params"], ns["params"], rtol=0, atol=0)
