"""The README's tour is code users copy: it must run, and its claims must hold."""

from __future__ import annotations

import os
import pathlib
import re

import pytest
import torch

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_readme_tour_runs(tmp_path, monkeypatch):
    text = pathlib.Path(README).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    tour = next(b for b in blocks if "fp.functionalize" in b)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(tour, "README.md", "exec"), ns)
    # the fast and the vmap per-example gradients agree, and the checkpoint round-trips
    for a, b in zip(ns["per_example"].values(), ns["fast"].values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ns["restored"]["params"], ns["params"], rtol=0, atol=0)


def test_readme_dp_lines_hold(tmp_path, monkeypatch):
    text = pathlib.Path(README).read_text()
    tour = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                if "fp.clipped_grad" in b)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(tour, "README.md", "exec"), ns)
    # the clipped sum against the per-example gradients clipped by hand (optax's rule)
    per_example = ns["per_example"]
    norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in per_example.values()))
    torch.testing.assert_close(ns["norms"], norms, rtol=1e-4, atol=1e-5)
    factor = 1.0 / torch.clamp(norms / 1.0, min=1.0)
    for k, g in per_example.items():
        want = (factor.reshape(-1, *[1] * (g.dim() - 1)) * g).sum(0)
        torch.testing.assert_close(ns["clipped_sum"][k], want, rtol=1e-4, atol=1e-5)
    # epsilon against dp-accounting called directly
    dp = pytest.importorskip("dp_accounting", reason="the privacy extra is not installed")
    acc = dp.rdp.RdpAccountant()
    acc.compose(dp.PoissonSampledDpEvent(256 / 60000, dp.GaussianDpEvent(1.1)), 2340)
    assert abs(ns["eps"] - acc.get_epsilon(1e-5)) < 1e-3
