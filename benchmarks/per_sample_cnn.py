"""Per-sample gradients of the classic MNIST CNN, against the plain batch gradient.

The yardstick is one eager ``backward()`` of the mean loss over the batch (the practical
limit for per-sample gradients); every other row is a way of getting each example's own
gradient, measured in the same process, interleaved. Ratios are throughput ratios
(> 1 is faster than the yardstick). The target row is ``fp.per_sample_grads`` with the
default method on per-example losses (issue 10: >= 0.95x the yardstick at batch 256).
Opacus' ``GradSampleModule`` is a row when ``opacus`` is installed, and JAX's
``jax.jit(jax.grad)`` (batch gradient) and ``jax.jit(jax.vmap(jax.grad))`` (per-example) on
the same network and weights (``_jax_models.cnn``) when ``jax`` and ``optax`` are installed;
their compile is their first call, made (and timed, see the row's note) by the check before
timing, so it is in neither the medians nor the "1st call s" column.

Allocation history leaks between candidates of one process (DESIGN.md, "Benchmarking on
these machines"), so ``--processes N`` also runs the yardstick and the default method in
fresh processes of their own, alternating chunks of calls between them over N process
pairs, and pools the medians (``--aa`` runs the yardstick against itself as a check of
the harness: it should give ~1.00).

    .venv/bin/python benchmarks/per_sample_cnn.py                 # batch 64 and 256
    .venv/bin/python benchmarks/per_sample_cnn.py --batch 256 --processes 4
    .venv/bin/python benchmarks/per_sample_cnn.py --malloc both   # + tuned glibc malloc
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import _jax_models  # noqa: E402

import functorch_pipeline as fp  # noqa: E402


class Net(nn.Module):
    """conv 1->10 k5, pool, relu, conv 10->20 k5, pool, relu, fc 320->50, relu, fc 50->10:
    examples/models.py's classic Net without its two dropouts, so that every method
    computes the same deterministic gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=-1)


def candidates(batch: int, loop: bool, compile: bool = False,
               jax_rows: bool = True) -> tuple[dict, dict[str, str]]:
    torch.manual_seed(0)
    model = Net()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def losses(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    def mean_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(torch.func.functional_call(model, p, (x,)), y)

    def batch_grad() -> None:
        model.zero_grad(set_to_none=True)
        F.nll_loss(model(x), y).backward()

    default = fp.per_sample_grads(losses)
    hooks = fp.per_sample_grads(losses, method="hooks")
    one = torch.func.grad(lambda p, xi, yi: mean_loss(p, xi[None], yi[None]))
    vmapped = torch.func.vmap(one, in_dims=(None, 0, 0))
    def python_loop() -> list[torch.Tensor]:
        return _common.python_loop_grads(model, F.nll_loss, x, y)

    fns = {
        "batch gradient (yardstick)": batch_grad,
        DEFAULT: lambda: default(params, x, y),
        "fp.per_sample_grads hooks": lambda: hooks(params, x, y),
        "torch.func vmap(grad)": lambda: vmapped(params, x, y),
    }
    opacus_row = _opacus(x, y)
    if opacus_row is not None:
        fns["Opacus GradSampleModule"] = opacus_row
    if compile:
        jitted = fp.jit(fp.per_sample_grads(mean_loss))
        fns["fp.jit(per_sample_grads)"] = lambda: jitted(params, x, y)
    if loop:
        fns["python loop"] = python_loop

    # Same numbers first: the default method (and Opacus) against vmap(grad).
    with torch.no_grad():
        b = vmapped(params, x, y)
        rows = {"default": default(params, x, y)}
    if opacus_row is not None:
        rows["Opacus"] = dict(zip(params, opacus_row(), strict=True))
    for label, a in rows.items():
        worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)  # noqa: B023
        print(f"  check: {label} vs vmap(grad), max relative difference {worst:.1e}")
        assert worst < 1e-4, worst
    if jax_rows and _jax_models.modules() is not None:
        fns.update(_jax(model, x, y, b))
    return fns, {"yardstick": "batch gradient (yardstick)", "vmap": "torch.func vmap(grad)"}


DEFAULT = "fp.per_sample_grads (default method)"


def _opacus(x: torch.Tensor, y: torch.Tensor) -> object:
    """Opacus' hooks (``GradSampleModule``) on a copy of the model, or None without opacus."""
    if _common.optional("opacus") is None:
        return None
    torch.manual_seed(0)
    return _common.opacus_per_sample(Net(), F.nll_loss, x, y)


def _jax(model: nn.Module, x: torch.Tensor, y: torch.Tensor, want: dict) -> dict:
    """The JAX rows (same weights and batch), each checked against torch's ``vmap(grad)``
    result ``want`` first; that check makes the compiling first call, timed into a note."""
    import time

    jax = _jax_models.modules()[0]
    params = _jax_models.params_from_torch(model.named_parameters())
    jx, jy = _jax_models.to_jax(x), _jax_models.to_jax(y)
    batch_grad = jax.jit(jax.grad(_jax_models.cnn_mean_loss))
    per_example = jax.jit(jax.vmap(jax.grad(_jax_models.cnn_example_loss), in_axes=(None, 0, 0)))
    want_mean = {k: v.mean(0) for k, v in want.items()}
    fns = {}
    for name, fn, ref in (("JAX batch gradient (jit)", batch_grad, want_mean),
                          ("JAX vmap(grad) (jit)", per_example, want)):
        start = time.perf_counter()
        got = jax.block_until_ready(fn(params, jx, jy))
        first = time.perf_counter() - start
        worst = _jax_models.max_relative_difference(got, ref)
        print(f"  check: {name} vs vmap(grad){' mean' if ref is want_mean else ''}, "
              f"max relative difference {worst:.1e}")
        assert worst < 1e-4, worst

        def run(fn: object = fn) -> object:
            return jax.block_until_ready(fn(params, jx, jy))

        run.note = f"compile + first call {first:.2f} s (in the check, before timing)"
        fns[name] = run
    return fns


def _child(name: str, batch: int, calls: int) -> None:
    """Time ``calls`` calls of one candidate in this fresh process; print JSON times."""
    fns, _ = candidates(batch, loop=False, jax_rows=False)
    fn = fns[name]
    for _ in range(3):
        fn()
    wall, cpu = [], []
    for _ in range(calls):
        w, c, _ = _common._call(fn)
        wall.append(w)
        cpu.append(c)
    print(json.dumps({"wall": wall, "cpu": cpu}))


def _processes(batch: int, pairs: int, calls: int, aa: bool, threads: int | None) -> None:
    """NOTE [fresh processes]: each side in its own process, alternating A B B A ..."""
    sides = ["batch gradient (yardstick)", "batch gradient (yardstick)" if aa else DEFAULT]
    labels = ["A: yardstick", "B: yardstick (A/A check)" if aa else "B: default method"]
    medians: dict[str, list[list[float]]] = {"wall": [[], []], "cpu": [[], []]}
    for pair in range(pairs):
        order = [0, 1] if pair % 2 == 0 else [1, 0]
        for side in order:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", sides[side],
                                  "--batch", str(batch), "--rounds", str(calls)]
                                 + (["--threads", str(threads)] if threads else []),
                                 capture_output=True, text=True, check=True, env=os.environ.copy())
            times = json.loads(out.stdout.strip().splitlines()[-1])
            for kind in medians:
                medians[kind][side].append(statistics.median(times[kind]))
    print(f"\nfresh processes, batch {batch}: {pairs} pairs x {calls} calls, medians of medians")
    for kind, (a_list, b_list) in medians.items():
        a, b = statistics.median(a_list), statistics.median(b_list)
        print(f"  {kind:4s}  {labels[0]} {a * 1e3:.2f} ms, {labels[1]} {b * 1e3:.2f} ms, "
              f"throughput ratio B/A {a / b:.3f}; per pair: "
              + " ".join(f"{x / y:.2f}" for x, y in zip(a_list, b_list, strict=True)))


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", default="64,256", help="comma-separated batch sizes")
    p.add_argument("--no-loop", action="store_true", help="skip the Python-loop baseline")
    p.add_argument("--compile", action="store_true",
                   help="add fp.jit(fp.per_sample_grads(...)) (torch.compile; first call timed apart)")
    p.add_argument("--processes", type=int, default=0,
                   help="also time yardstick vs default method in N pairs of fresh processes")
    p.add_argument("--aa", action="store_true", help="with --processes: yardstick vs itself")
    p.add_argument("--child", default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        _child(args.child, int(args.batch), args.rounds)
        return
    if _common.maybe_respawn(args):
        return
    print(_common.environment())
    if _common.optional("opacus") is None:
        print("  skipped Opacus GradSampleModule: `opacus` is not installed")
    if _jax_models.modules() is None:
        print(_jax_models.skip_line("JAX batch gradient and vmap(grad) (jit)"))
    else:
        print(_jax_models.threads_line())
    for batch in (int(b) for b in args.batch.split(",")):
        fns, baselines = candidates(batch, not args.no_loop, args.compile)
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget,
                                every={"python loop": 5}, apart=_jax_models.rows(fns))
        for name, fn in fns.items():
            stats[name].note = getattr(fn, "note", "")
        print(_common.table(stats, baselines, batch, f"\nper-sample gradients, MNIST CNN, batch {batch}"))
        if args.processes:
            _processes(batch, args.processes, args.rounds, args.aa, args.threads)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
