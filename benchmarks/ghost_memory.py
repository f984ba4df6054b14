"""Peak memory of a DP step with ghost clipping against the non-private step.

The model is a 100,000 x 64 ``nn.Embedding`` (6.4M parameters) whose rows are averaged
over a sequence of tokens and fed to a ``Linear(64, 10)``; batch 1024 (issue 10's memory
row: target <= 1.5x the non-private step). Each measurement runs in its own fresh
subprocess (the order of methods rotated, several rounds): set up model and batch, run one
step, reset the kernel's peak-RSS mark (``/proc/self/clear_refs``), run ``--steps`` more
steps, read the peak (``VmHWM``). Two figures per method: the whole process's peak RSS
(with torch's own ~hundreds of MB), and the peak *above* the RSS just before the timed
steps, which is what the step itself allocates. Materialising per-example gradients
(``method="hooks"``/``"vmap"``) would need ``B x params`` floats (26 GB here), so they
are not run; the script prints that size.

    .venv/bin/python benchmarks/ghost_memory.py
    .venv/bin/python benchmarks/ghost_memory.py --batch 1024 --tokens 16 --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

VOCAB, DIM, CLASSES = 100_000, 64, 10


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(method: str, batch: int, tokens: int, steps: int) -> None:
    """One measurement, printed as a JSON line."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import functorch_pipeline as fp

    torch.manual_seed(0)
    params = {"emb": torch.randn(VOCAB, DIM) * 0.1, "fc.weight": torch.randn(CLASSES, DIM) * 0.1,
              "fc.bias": torch.zeros(CLASSES)}
    idx = torch.randint(0, VOCAB, (batch, tokens))
    y = torch.randint(0, CLASSES, (batch,))

    def losses(p: dict, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.embedding(idx, p["emb"]).mean(1)
        return F.cross_entropy(F.linear(h, p["fc.weight"], p["fc.bias"]), y, reduction="none")

    grad = fp.grad(lambda p, idx, y: losses(p, idx, y).mean())
    clipped = fp.clipped_grad(losses, 1.0, method="ghost")
    key = fp.random.key(0)
    lr, sigma = 0.1, 1.0

    def step(p: dict) -> dict:
        if method == "nonprivate":
            g = grad(p, idx, y)
        elif method == "ghost":
            g, _ = clipped(p, idx, y)
            g = {k: v / batch for k, v in g.items()}
        else:  # ghost + noise from fp.random
            g, _ = clipped(p, idx, y)
            keys = fp.random.split(key, len(g))
            g = {k: (v + sigma * fp.random.normal(keys[i], v.shape, dtype=v.dtype)) / batch
                 for i, (k, v) in enumerate(sorted(g.items()))}
        return {k: p[k] - lr * g[k] for k in p}

    params = step(params)  # warm: lazy initialisation, allocator pools
    before = _rss_kb("VmRSS")
    exact = _reset_peak()
    for _ in range(steps):
        params = step(params)
    peak = _rss_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"method": method, "before_kb": before, "peak_kb": peak, "exact": exact}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=16, help="tokens per example")
    p.add_argument("--steps", type=int, default=3, help="steps measured per process")
    p.add_argument("--pairs", type=int, default=3, help="rounds of fresh processes, one per method, order rotated")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.batch, args.tokens, args.steps)
        return
    params = VOCAB * DIM + CLASSES * DIM + CLASSES
    print(f"Embedding {VOCAB} x {DIM} + Linear({DIM}, {CLASSES}): {params:,} parameters, "
          f"batch {args.batch}, {args.tokens} tokens per example, float32; one fresh process "
          f"per measurement, {args.pairs} rounds of the three; other jobs share this machine")
    print(f"  per-example gradients (hooks/vmap) would need B x params x 4 bytes = "
          f"{args.batch * params * 4 / 2**30:.1f} GiB: not run")
    names = ["nonprivate", "ghost", "ghost+noise"]
    results: dict[str, list[dict]] = {m: [] for m in names}
    for i in range(args.pairs):
        for method in names[i % 3:] + names[:i % 3]:  # rotate the order
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", method,
                 "--batch", str(args.batch), "--tokens", str(args.tokens), "--steps", str(args.steps)],
                check=True, capture_output=True, text=True).stdout
            results[method].append(json.loads(out.strip().splitlines()[-1]))
    if not all(r["exact"] for rs in results.values() for r in rs):
        print("  note: /proc/self/clear_refs unavailable: peaks include set-up (ru_maxrss)")
    labels = {"nonprivate": "non-private: grad + SGD", "ghost": "ghost clipped sum + SGD",
              "ghost+noise": "ghost + fp.random noise + SGD"}
    med = {}
    print(f"| {'step':<31} | peak RSS MiB | above pre-step MiB (min-max) | "
          "x non-private (RSS, above) |")
    print(f"|{'-' * 33}|--------------|------------------------------|----------------------------|")
    for method, rs in results.items():
        total = statistics.median(r["peak_kb"] for r in rs) / 1024
        extras = [(r["peak_kb"] - r["before_kb"]) / 1024 for r in rs]
        extra = statistics.median(extras)
        med[method] = (total, extra)
        t0, e0 = med["nonprivate"]
        ratio = f"{total / t0:.3f}, {extra / max(e0, 1e-9):.3f}"
        spread = f"{extra:.1f} ({min(extras):.1f}-{max(extras):.1f})"
        print(f"| {labels[method]:<31} | {total:12.1f} | {spread:>28} | {ratio:>26} |")
    print("medians over the rounds; the step's own peak moves by ~25 MiB between identical runs "
          "(what the warm-up step left in malloc's free lists)")
    print("target: a DP step <= 1.5x the non-private step's peak")


if __name__ == "__main__":
    main()
