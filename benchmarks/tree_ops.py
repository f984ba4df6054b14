"""Overhead of fp.tree and fp transforms against raw optree and raw torch.func.

A 100-leaf parameter tree (dict of 50 layers x {weight, bias}, small tensors so the
Python overhead dominates). Each operation and its baseline run interleaved
(A B A B ...) in the same process; the table shows median microseconds per call and the
ratio fp / baseline.

    python benchmarks/tree_ops.py [--repeats 30] [--inner 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import optree
import torch
import torch.func

import functorch_pipeline as fp
from functorch_pipeline import tree


def make_tree(n_layers: int = 50) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}": {"weight": torch.randn(8, 8, generator=g), "bias": torch.randn(8, generator=g)} for i in range(n_layers)}


def interleaved(pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]], repeats: int, inner: int):
    """Median microseconds per call for (fp, baseline) of every row, run A B A B."""
    times = {k: ([], []) for k in pairs}
    for _ in range(repeats):
        for name, (a, b) in pairs.items():
            for fn, bucket in ((a, times[name][0]), (b, times[name][1])):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                bucket.append((time.perf_counter() - t0) / inner * 1e6)
    return {k: (statistics.median(a), statistics.median(b)) for k, (a, b) in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)

    t = make_tree()
    u = tree.map(lambda x: x * 0.5, t)
    assert len(tree.leaves(t)) == 100
    x = torch.randn(16, 8)

    def loss(p, x):
        h = x
        for i in range(3):
            h = torch.tanh(h @ p[f"layer{i}"]["weight"] + p[f"layer{i}"]["bias"])
        return h.sum() + sum(v["bias"].sum() for v in p.values())

    raw_grad = torch.func.grad(loss)
    fp_grad = fp.grad(loss)
    per_ex = lambda p, x: loss(p, x[None])  # noqa: E731
    raw_vmap = torch.func.vmap(torch.func.grad(per_ex), in_dims=(None, 0))
    fp_vmap = fp.vmap(fp.grad(per_ex), in_axes=(None, 0))

    def raw_add():
        ls, d = optree.tree_flatten(t)
        return optree.tree_unflatten(d, torch._foreach_add(ls, optree.tree_leaves(u)))

    rows = {
        "tree.leaves": (lambda: tree.leaves(t), lambda: optree.tree_leaves(t)),
        "tree.map (x*2)": (lambda: tree.map(lambda a: a * 2, t), lambda: optree.tree_map(lambda a: a * 2, t)),
        "tree.map_with_path": (
            lambda: tree.map_with_path(lambda p, a: a, t),
            lambda: optree.tree_map_with_path(lambda p, a: a, t),
        ),
        "tree.add (foreach)": (lambda: tree.add(t, u), raw_add),
        "tree.add_scale": (
            lambda: tree.add_scale(t, 0.1, u),
            lambda: optree.tree_map(lambda a, b: a + 0.1 * b, t, u),
        ),
        "tree.global_norm": (
            lambda: tree.global_norm(t),
            lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(optree.tree_leaves(t)))),
        ),
        "tree.vdot": (
            lambda: tree.vdot(t, u),
            lambda: sum((a * b).sum() for a, b in zip(optree.tree_leaves(t), optree.tree_leaves(u), strict=True)),
        ),
        "tree.ravel": (lambda: tree.ravel(t)[0], lambda: torch.cat([a.reshape(-1) for a in optree.tree_leaves(t)])),
        "tree.stack (4 trees)": (
            lambda: tree.stack([t, u, t, u]),
            lambda: optree.tree_map(lambda *a: torch.stack(a), t, u, t, u),
        ),
        "fp.grad vs torch.func.grad": (lambda: fp_grad(t, x), lambda: raw_grad(t, x)),
        "fp.vmap(grad) vs torch.func": (lambda: fp_vmap(t, x), lambda: raw_vmap(t, x)),
    }
    inner = {k: (args.inner if not k.startswith("fp.") else max(2, args.inner // 10)) for k in rows}
    results = {}
    for k, pair in rows.items():
        results.update(interleaved({k: pair}, args.repeats, inner[k]))

    print(f"torch {torch.__version__}, optree {optree.__version__}, 100-leaf tree, 1 thread, "
          f"medians of {args.repeats} interleaved repeats")
    print(f"{'operation':32s} {'fp (us)':>10s} {'baseline (us)':>14s} {'ratio':>7s}")
    for k, (a, b) in results.items():
        print(f"{k:32s} {a:10.1f} {b:14.1f} {a / b:7.2f}")


if __name__ == "__main__":
    main()
