"""Timing helpers for the benchmark scripts: interleaved medians, ratios, page faults.

Every benchmark here measures its candidates in one process, interleaved (A B C, B C A,
C A B, ...: the start rotates so no method always runs right after the same other one),
and reports medians and throughput ratios against a baseline measured in the same run.
Minor page faults per call (``ru_minflt``) are recorded because glibc's malloc returns
large freed blocks to the OS and faults them back in on the next call; run with
``--malloc both`` to see the effect of ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` (see /work/shared/DESIGN.md, "Benchmarking on these machines").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch

# The examples' networks (examples/models.py) are the ones benchmarked.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))

MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "268435456"}


@dataclasses.dataclass
class Stats:
    """Per-call wall and CPU times (s) and minor page faults of one candidate, plus its
    first call's wall time."""

    times: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    faults: list[int] = dataclasses.field(default_factory=list)
    first: float = float("nan")
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> tuple[float, float]:
        """The 25th and 75th percentiles of the call time."""
        q = statistics.quantiles(self.times, n=4) if len(self.times) > 1 else [self.times[0]] * 3
        return q[0], q[2]


def _call(fn: Callable[[], Any]) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return elapsed, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def measure(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2,
            budget_s: float | None = None, every: dict[str, int] | None = None,
            apart: Sequence[str] = ()) -> dict[str, Stats]:
    """Time every candidate ``rounds`` times, interleaved, after ``warmup`` untimed calls.

    # NOTE [peers timed apart]
    Candidates named in ``apart`` (the JAX rows) are timed after all the others, in their
    own interleaved block: XLA's CPU thread pool keeps spinning for a while after each
    JAX call, which took CPU from whatever torch candidate ran next (a torch step timed
    1.4x slower right after a JAX row, and its CPU time exceeded its wall time at 1
    thread). Their ratios still divide by the baseline's median from the main block.

    Args:
      fns: name -> zero-argument callable doing one full unit of work.
      rounds: timed calls per candidate.
      warmup: untimed calls per candidate first (the very first call is timed separately
        as ``Stats.first``: it includes lazy initialisation and any compilation).
      budget_s: stop early (after a full round) once this many seconds are spent timing.
      every: name -> k to time a slow candidate (a Python loop) only every k-th round.
      apart: names timed after the others, among themselves (NOTE [peers timed apart]).

    Returns:
      name -> :class:`Stats`, in the order of ``fns``.
    """
    main = {k: f for k, f in fns.items() if k not in apart}
    late = {k: f for k, f in fns.items() if k in apart}
    stats = _measure(main, rounds, warmup, budget_s, every)
    if late:
        stats.update(_measure(late, rounds, warmup, budget_s, every))
    return {k: stats[k] for k in fns}


def _measure(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int,
             budget_s: float | None, every: dict[str, int] | None) -> dict[str, Stats]:
    stats = {name: Stats() for name in fns}
    for name, fn in fns.items():
        stats[name].first = _call(fn)[0]
        for _ in range(max(warmup - 1, 0)):
            fn()
    names = list(fns)
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if r % (every or {}).get(name, 1):
                continue
            t, c, f = _call(fns[name])
            stats[name].times.append(t)
            stats[name].cpu.append(c)
            stats[name].faults.append(f)
        if budget_s is not None and time.perf_counter() - start > budget_s and r >= 4:
            break
    return stats


def keep_freed_memory_if(argv: Sequence[str]) -> None:
    """A fresh-process side's first step: ``fp.devices.keep_freed_memory()`` when its argv
    has ``--keep-freed-memory`` (NOTE [fresh processes])."""
    if "--keep-freed-memory" in argv:
        import functorch_pipeline as fp

        fp.devices.keep_freed_memory()


def child_times(fn: Callable[[], Any], calls: int, warmup: int = 3) -> None:
    """The body of a fresh-process side (NOTE [fresh processes]): ``warmup`` untimed calls,
    then ``calls`` timed ones, printed as one JSON line of wall and CPU times (s) and minor
    page faults per call."""
    for _ in range(warmup):
        fn()
    out: dict[str, list[float]] = {"wall": [], "cpu": [], "faults": []}
    for _ in range(calls):
        wall, cpu, faults = _call(fn)
        out["wall"].append(wall)
        out["cpu"].append(cpu)
        out["faults"].append(faults)
    print(json.dumps(out))


def fresh_processes(command: Callable[[int, bool], list[str]], labels: Sequence[str],
                    rounds: int, title: str) -> None:
    """Time several sides, each in its own fresh process, over ``rounds`` rounds, with
    glibc malloc as the process starts and then with freed memory kept; every side's
    ratio is against side 0 (the baseline).

    # NOTE [fresh processes]
    One side's allocation history changes the other's page faults inside one process
    (DESIGN.md, "Benchmarking on these machines"): a peer that frees a 20 MB block raises
    glibc's dynamic mmap and trim thresholds for everything timed after it. So each side
    runs alone in a process of its own that builds nothing but that side (no checks, no
    other rows), the order rotates each round (A B C, B C A, ...), and ratios are taken
    of the medians of the per-process medians. Each process prints :func:`child_times`'
    JSON line. Two regimes are timed: glibc's defaults (the state a user's script starts
    in; a side that returns memory to the OS every call pays thousands of page faults)
    and, with ``command(side, True)``, ``fp.devices.keep_freed_memory()`` called first in
    every side, where none faults and the ratios compare the work itself.

    Args:
      command: ``(side, keep)`` -> the argv of that side's process (side 0 is the
        baseline); ``keep``: call ``fp.devices.keep_freed_memory()`` first.
      labels: the sides' names.
      rounds: processes per side and regime.
      title: printed above the result.
    """
    n = len(labels)
    print(f"\n{title}: {rounds} fresh processes per side and malloc regime, medians of "
          "per-process medians, throughput ratios against A")
    for keep in (False, True):
        med: dict[str, list[list[float]]] = {k: [[] for _ in range(n)] for k in ("wall", "cpu", "faults")}
        for r in range(rounds):
            for side in [*range(n)][r % n:] + [*range(n)][:r % n]:
                out = subprocess.run(command(side, keep), capture_output=True, text=True,
                                     check=True, env=os.environ.copy())
                times = json.loads(out.stdout.strip().splitlines()[-1])
                for kind in med:
                    med[kind][side].append(statistics.median(times[kind]))
        print("  glibc malloc " + ("with fp.devices.keep_freed_memory() in every side" if keep
                                   else "as the process starts (default)"))
        a_wall, a_cpu = (statistics.median(med[k][0]) for k in ("wall", "cpu"))
        for side, label in enumerate(labels):
            wall, cpu = statistics.median(med["wall"][side]), statistics.median(med["cpu"][side])
            line = (f"    {'ABCDEFGH'[side]}: {label:<28} {wall * 1e3:7.2f} ms, cpu {cpu * 1e3:7.2f} ms, "
                    f"page faults a call {statistics.median(med['faults'][side]):7,.0f}")
            if side:
                line += (f"; x A wall {a_wall / wall:.3f} (per round: "
                         + " ".join(f"{x / y:.2f}" for x, y in zip(med["wall"][0], med["wall"][side],
                                                                  strict=True))
                         + f"), cpu {a_cpu / cpu:.3f}")
            print(line)


def table(stats: dict[str, Stats], baselines: dict[str, str], examples: int, title: str) -> str:
    """A text table: median wall ms (IQR), median CPU ms, examples/s, ratios, faults per call.

    Args:
      stats: from :func:`measure`.
      baselines: column label -> the name of the candidate it divides by (throughput
        ratio: ``median(baseline) / median(candidate)``, so > 1 is faster). The first
        baseline also gets a CPU-time ratio (``cpu``): with other jobs on the machine, the
        process's own CPU time is steadier than wall time, though it counts OpenMP
        threads spinning at barriers.
      examples: examples per call, for the throughput column.
      title: printed above the table.
    """
    first = next(iter(baselines.values()))
    head = ["method", "median ms", "IQR ms", "cpu ms", "ex/s"] + [
        f"x {label}" for label in baselines] + [f"x {next(iter(baselines))} cpu", "faults/call", "1st call s"]
    rows = []
    for name, s in stats.items():
        lo, hi = s.spread
        cpu = statistics.median(s.cpu)
        row = [name, f"{s.median * 1e3:.2f}", f"{lo * 1e3:.1f}-{hi * 1e3:.1f}", f"{cpu * 1e3:.2f}",
               f"{examples / s.median:,.0f}"]
        row += [f"{stats[b].median / s.median:.3f}" for b in baselines.values()]
        row += [f"{statistics.median(stats[first].cpu) / cpu:.3f}",
                f"{statistics.median(s.faults):,.0f}", f"{s.first:.2f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "| " + " | ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths)) + " |"
    lines = [title, fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*r) for r in rows]
    notes = [f"  {name}: {s.note}" for name, s in stats.items() if s.note]
    return "\n".join(lines + notes)


def python_loop_grads(module: torch.nn.Module, loss_fn: Callable[..., torch.Tensor],
                      inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """The baseline every per-sample method is compared with: one forward and one
    ``torch.autograd.grad`` per example, stacked per parameter."""
    params = list(module.parameters())
    rows = [torch.autograd.grad(loss_fn(module(inputs[i:i + 1]), targets[i:i + 1]), params)
            for i in range(inputs.shape[0])]
    return [torch.stack(g) for g in zip(*rows, strict=True)]


def environment() -> str:
    """One line about the run: torch, threads, malloc settings, load."""
    set_ = {k: os.environ[k] for k in MALLOC_TUNED if k in os.environ}
    malloc = " ".join(f"{k}={v}" for k, v in set_.items()) if set_ else "default"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}, glibc malloc {malloc}, load average {load:.2f} "
            "at start (other jobs share these cores: numbers are noisy, compare ratios)")


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=15, help="timed calls per method (interleaved)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--malloc", choices=["current", "tuned", "both"], default="current",
                   help="glibc malloc settings: as the environment has them, tuned "
                   "(MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_), or both in two subprocesses")
    p.add_argument("--mmap-threshold", type=int, default=int(MALLOC_TUNED["MALLOC_MMAP_THRESHOLD_"]),
                   help="MALLOC_MMAP_THRESHOLD_ for --malloc tuned/both (bytes; blocks above it are "
                   "still mmap'ed and page-faulted on every call)")
    p.add_argument("--budget", type=float, default=None, help="stop timing after this many seconds")
    return p


def maybe_respawn(args: argparse.Namespace) -> bool:
    """Handle ``--malloc tuned|both`` by re-running this script in subprocesses (glibc reads
    the variables at start-up). Returns True when the caller should exit."""
    if args.malloc == "current":
        return False
    argv = list(sys.argv[1:])
    i = argv.index("--malloc")
    del argv[i:i + 2]
    tuned = {**MALLOC_TUNED, "MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
    runs = [("default", {}), ("tuned", tuned)] if args.malloc == "both" else [("tuned", tuned)]
    for label, extra in runs:
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_TUNED}
        env.update(extra)
        print(f"\n=== glibc malloc: {label} {' '.join(f'{k}={v}' for k, v in extra.items())}", flush=True)
        subprocess.run([sys.executable, sys.argv[0], *argv, "--malloc", "current"], env=env, check=True)
    return True


def begin(args: argparse.Namespace) -> bool:
    """The start every timing script shares: handle ``--malloc`` (:func:`maybe_respawn`),
    else apply ``--threads`` and print the :func:`environment` line. Returns True when the
    caller should exit (the work ran in subprocesses)."""
    if maybe_respawn(args):
        return True
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment())
    return False


def optional(module: str) -> Any:
    """Import an optional peer package, or return None (the caller prints a skip note)."""
    try:
        return __import__(module)
    except ImportError:
        return None


def opacus_per_sample(module: torch.nn.Module, loss_fn: Callable[..., torch.Tensor],
                      inputs: torch.Tensor, targets: torch.Tensor) -> Callable[[], list]:
    """The Opacus row of the per-sample benchmarks: a zero-argument call returning
    ``GradSampleModule(module)``'s per-sample gradients of ``loss_fn(out, targets,
    reduction="sum")`` (a sum, so each example's gradient is its own). Needs opacus."""
    import warnings

    from opacus import GradSampleModule

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    gsm = GradSampleModule(module, loss_reduction="sum")

    def run() -> list:
        for p in gsm.parameters():
            p.grad, p.grad_sample = None, None
        loss_fn(gsm(inputs), targets, reduction="sum").backward()
        return [p.grad_sample for p in gsm.parameters()]

    return run


def opacus_row(make_model: Callable[[], torch.nn.Module], loss_fn: Callable[..., torch.Tensor],
               inputs: torch.Tensor, targets: torch.Tensor, want: Any) -> dict[str, Callable[[], list]]:
    """``{"Opacus GradSampleModule": row}`` when opacus is installed and accepts
    ``make_model()`` with per-sample gradients close to ``want`` (printed), else ``{}`` and
    a skip note naming why."""
    import warnings

    if optional("opacus") is None:
        print("  skipped Opacus: `opacus` is not installed (pip install opacus)")
        return {}
    try:
        row = opacus_per_sample(make_model(), loss_fn, inputs, targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            worst = max_relative_difference(row(), list(want))
    except Exception as e:  # noqa: BLE001 (a peer's refusal is a note, not a failure)
        print(f"  skipped Opacus: GradSampleModule refused the model: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:160]}")
        return {}
    print(f"  check: Opacus GradSampleModule vs vmap, max relative difference {worst:.1e}")
    return {"Opacus GradSampleModule": row}


def max_relative_difference(got: Any, want: Any) -> float:
    """The worst ``max |got - want| / max |want|`` over paired tensors (0/0 counts as 0)."""
    return max(float((g - w).abs().max() / w.abs().max().clamp(min=1e-30))
               for g, w in zip(got, want, strict=True))


def fast_and_vmap_rows(losses: Callable[..., torch.Tensor], params: dict, batch: Sequence[Any]
                       ) -> tuple[dict[str, Callable[[], Any]], dict[str, torch.Tensor]]:
    """The rows the model benchmarks share: ``fp.per_sample_grads`` and ``fp.clipped_grad``
    (max_norm 1) with the default method and with ``method="vmap"``, after checking and
    printing that the default gives vmap's numbers; and vmap's per-example gradients, for
    a peer's check."""
    import warnings

    import functorch_pipeline as fp

    default, vmapped = fp.per_sample_grads(losses), fp.per_sample_grads(losses, method="vmap")
    clipped, clipped_vmap = fp.clipped_grad(losses, 1.0), fp.clipped_grad(losses, 1.0, method="vmap")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "performance drop" notes on attention
        want, got = vmapped(params, *batch), default(params, *batch)
        (sum_v, norms_v), (sum_d, norms_d) = clipped_vmap(params, *batch), clipped(params, *batch)
    worst = max_relative_difference([got[k] for k in want], want.values())
    print(f"  check: per_sample_grads default vs vmap, max relative difference {worst:.1e}")
    worst = max_relative_difference([*(sum_d[k] for k in sum_v), norms_d], [*sum_v.values(), norms_v])
    print(f"  check: clipped_grad default vs vmap (sum and norms), max relative difference {worst:.1e}")
    return {
        "fp.per_sample_grads default": lambda: default(params, *batch),
        "fp.per_sample_grads vmap (the fall-back before)": lambda: vmapped(params, *batch),
        "fp.clipped_grad default": lambda: clipped(params, *batch),
        "fp.clipped_grad vmap (the fall-back before)": lambda: clipped_vmap(params, *batch),
    }, want

