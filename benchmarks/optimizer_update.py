"""Time one optimizer step (update + apply_updates) of fp.optim against torch.optim.

Same tensors, same process, interleaved (torch, fp pure, fp in-place, ... per round);
prints the median time per step, the ratio to torch.optim with ``foreach=True`` and the
minor page faults per call (a glibc-malloc symptom, see DESIGN.md).

    .venv/bin/python benchmarks/optimizer_update.py                 # both models
    .venv/bin/python benchmarks/optimizer_update.py --model mlp --reps 40
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 \\
        .venv/bin/python benchmarks/optimizer_update.py
    .venv/bin/python benchmarks/optimizer_update.py --model mlp --keep-freed-memory both

``--keep-freed-memory on`` calls ``fp.devices.keep_freed_memory()`` (glibc ``mallopt``, the
in-process equivalent of the variables above) before timing; the setting is process-wide, so
every row of that run (torch.optim included) runs under it. ``both`` runs the script twice in
fresh processes, default malloc first, then the opt-in, and prints both tables.

Models: (a) the classic MNIST CNN (conv 1->10 k5, conv 10->20 k5, fc 320->50, fc 50->10;
21,840 parameters in 8 tensors), (b) an MLP 784-2048-2048-2048-10 (10,020,874 parameters),
(c) ``many``: 192 small tensors (599,808 parameters; a 12-layer width-64 transformer).
``torch default`` is ``torch.optim`` with ``foreach=None``, which on CPU picks the
per-parameter for-loop.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import functorch_pipeline as fp
from functorch_pipeline import optim

_LAYER = [(64, 64)] * 4 + [(64,)] * 4 + [(256, 64), (256,), (64, 256), (64,)] + [(64,)] * 4
SHAPES = {
    "cnn": [(10, 1, 5, 5), (10,), (20, 10, 5, 5), (20,), (50, 320), (50,), (10, 50), (10,)],
    "mlp": [(2048, 784), (2048,), (2048, 2048), (2048,), (2048, 2048), (2048,), (10, 2048), (10,)],
    # many small leaves (a 12-layer, width-64 transformer's shapes): per-leaf Python costs
    # such as fp.optim's leaf checks (NOTE [leaf checks]) show here, not in the two above
    "many": _LAYER * 12,
}

OPTIMIZERS = {
    "adam": (lambda ps, fe: torch.optim.Adam(ps, lr=1e-3, foreach=fe), lambda: optim.adam(1e-3)),
    "adamw": (
        lambda ps, fe: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=fe),
        lambda: optim.adamw(1e-3, weight_decay=1e-2),
    ),
    "sgd(momentum)": (
        lambda ps, fe: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=fe),
        lambda: optim.sgd(1e-2, momentum=0.9),
    ),
}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench(model: str, name: str, reps: int, warmup: int) -> dict[str, tuple[float, float]]:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.01 for s in SHAPES[model]]
    grads = [torch.randn(s, generator=gen) * 0.01 for s in SHAPES[model]]
    make_torch, make_fp = OPTIMIZERS[name]

    runners = {}
    refills = {}
    for label, fe in (("torch foreach", True), ("torch default", None)):
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        runners[label] = make_torch(ps, fe).step
        # untimed, like the donated buffers below: fresh gradients land before each step
        refills[label] = lambda ps=ps: [p.grad.copy_(g) for p, g in zip(ps, grads, strict=True)]

    opt = make_fp()
    pure_state = {"p": {str(i): b.clone() for i, b in enumerate(base)}}
    pure_state["s"] = opt.init(pure_state["p"])
    pure_grads = {str(i): g.clone() for i, g in enumerate(grads)}

    def fp_pure() -> None:
        u, pure_state["s"] = opt.update(pure_grads, pure_state["s"], pure_state["p"])
        pure_state["p"] = optim.apply_updates(pure_state["p"], u)

    runners["fp pure"] = fp_pure
    refills["fp pure"] = lambda: [pure_grads[k].copy_(g) for k, g in zip(pure_grads, grads, strict=True)]

    inpl = {"p": {str(i): b.clone() for i, b in enumerate(base)}}
    inpl["s"] = opt.init(inpl["p"])
    donated = {str(i): g.clone() for i, g in enumerate(grads)}

    def fp_inplace() -> None:
        u, inpl["s"] = opt.update(donated, inpl["s"], inpl["p"], inplace=True)
        optim.apply_updates_(inpl["p"], u)

    runners["fp in-place"] = fp_inplace

    def donate_fresh() -> None:
        # donated buffers belong to the optimizer afterwards (the trace may live in them),
        # so each step donates new gradient tensors, as fp.grad would return
        for k, g in zip(list(donated), grads, strict=True):
            donated[k] = g.clone()

    refills["fp in-place"] = donate_fresh

    times: dict[str, list[float]] = {k: [] for k in runners}
    faults: dict[str, list[int]] = {k: [] for k in runners}
    for r in range(warmup + reps):
        for label, fn in runners.items():
            refills[label]()  # untimed: every method gets freshly written gradients
            f0 = _faults()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[label].append(dt)
                faults[label].append(_faults() - f0)
    return {k: (statistics.median(times[k]), statistics.median(faults[k])) for k in runners}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["cnn", "mlp", "many", "both"], default="both",
                    help="both: cnn and mlp")
    ap.add_argument("--reps", type=int, default=0,
                    help="timed rounds (default: 300 cnn, 100 many, 30 mlp)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--keep-freed-memory", choices=["off", "on", "both"], default="off",
                    help="fp.devices.keep_freed_memory() before timing; both: a fresh process each")
    args = ap.parse_args()
    if args.keep_freed_memory == "both":
        argv = list(sys.argv[1:])
        if "--keep-freed-memory=both" in argv:
            argv.remove("--keep-freed-memory=both")
        else:
            i = argv.index("--keep-freed-memory")
            del argv[i:i + 2]
        for mode in ("off", "on"):
            print(f"\n=== --keep-freed-memory {mode}", flush=True)
            subprocess.run([sys.executable, sys.argv[0], *argv, "--keep-freed-memory", mode],
                           check=True)
        return
    if args.keep_freed_memory == "on":
        print(f"fp.devices.keep_freed_memory(): {fp.devices.keep_freed_memory()!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "MALLOC_MMAP_THRESHOLD_" in os.environ
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tuned glibc malloc env: {malloc}")
    models = ["cnn", "mlp"] if args.model == "both" else [args.model]
    print(f"{'model':5} {'optimizer':14} {'method':14} {'median':>10} {'vs foreach':>10} {'faults/call':>11}")
    for model in models:
        reps = args.reps or {"cnn": 300, "many": 100}.get(model, 30)
        for name in OPTIMIZERS:
            res = bench(model, name, reps, args.warmup)
            base = res["torch foreach"][0]
            for label, (med, flt) in res.items():
                unit = f"{med * 1e6:8.1f}us" if med < 1e-3 else f"{med * 1e3:8.2f}ms"
                print(f"{model:5} {name:14} {label:14} {unit:>10} {med / base:10.3f} {flt:11.0f}")


if __name__ == "__main__":
    main()
