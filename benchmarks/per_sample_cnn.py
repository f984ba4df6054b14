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
these machines"): the in-process table runs after the checks and beside Opacus and vmap,
whose freed 22 MB gradients raise glibc's mmap and trim thresholds for every row. So
``--processes N`` also runs the yardstick and the default method in fresh processes of
their own that build only those rows and run nothing before the timing (the state a
user's script starts in), alternating over N process pairs, and pools the medians
(NOTE [fresh processes] in ``_common``; ``--aa`` runs the yardstick against itself as a
check of the harness: it should give ~1.00).

    .venv/bin/python benchmarks/per_sample_cnn.py                 # batch 64 and 256
    .venv/bin/python benchmarks/per_sample_cnn.py --batch 256 --processes 4
    .venv/bin/python benchmarks/per_sample_cnn.py --malloc both   # + tuned glibc malloc
"""

from __future__ import annotations

import os
import sys
from typing import Any

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


def _ours(batch: int) -> tuple[dict, dict[str, Any]]:
    """The torch rows alone (yardstick, fp's methods, torch.func's vmap), built without
    calling anything: what a fresh-process side needs (NOTE [fresh processes])."""
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
    fns = {
        YARDSTICK: batch_grad,
        DEFAULT: lambda: default(params, x, y),
        "fp.per_sample_grads hooks": lambda: hooks(params, x, y),
        "torch.func vmap(grad)": lambda: vmapped(params, x, y),
    }
    return fns, {"model": model, "params": params, "x": x, "y": y, "default": default,
                 "vmapped": vmapped, "mean_loss": mean_loss}


def candidates(batch: int, loop: bool, compile: bool = False,
               jax_rows: bool = True) -> tuple[dict, dict[str, str]]:
    fns, parts = _ours(batch)
    model, params, x, y = parts["model"], parts["params"], parts["x"], parts["y"]
    default, vmapped, mean_loss = parts["default"], parts["vmapped"], parts["mean_loss"]

    def python_loop() -> list[torch.Tensor]:
        return _common.python_loop_grads(model, F.nll_loss, x, y)

    opacus_row = _opacus(x, y)
    if opacus_row is not None:
        fns[OPACUS] = opacus_row
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
    return fns, {"yardstick": YARDSTICK, "vmap": "torch.func vmap(grad)"}


DEFAULT = "fp.per_sample_grads (default method)"
YARDSTICK = "batch gradient (yardstick)"
OPACUS = "Opacus GradSampleModule"


def _opacus(x: torch.Tensor, y: torch.Tensor) -> object:
    """Opacus' hooks (``GradSampleModule``) on a copy of the model, or None without opacus."""
    if _common.optional("opacus") is None:
        return None
    torch.manual_seed(0)
    return _common.opacus_per_sample(Net(), F.nll_loss, x, y)


def _jax(model: nn.Module, x: torch.Tensor, y: torch.Tensor, want: dict) -> dict:
    """The JAX rows (same weights and batch), each checked against torch's ``vmap(grad)``
    result ``want`` first; that check makes the compiling first call, timed into a note."""

    jax = _jax_models.modules()[0]
    params = _jax_models.params_from_torch(model.named_parameters())
    jx, jy = _jax_models.to_jax(x), _jax_models.to_jax(y)
    batch_grad = jax.jit(jax.grad(_jax_models.cnn_mean_loss))
    per_example = jax.jit(jax.vmap(jax.grad(_jax_models.cnn_example_loss), in_axes=(None, 0, 0)))
    want_mean = {k: v.mean(0) for k, v in want.items()}
    return {name: _jax_models.checked_row(name, fn, (params, jx, jy), ref,
                                          "vmap(grad) mean" if ref is want_mean else "vmap(grad)", 1e-4)
            for name, fn, ref in (("JAX batch gradient (jit)", batch_grad, want_mean),
                                  ("JAX vmap(grad) (jit)", per_example, want))}


def _child(name: str, batch: int, calls: int) -> None:
    """Time ``calls`` calls of one candidate in this fresh process (NOTE [fresh processes]
    in ``_common``): only that row is built, and nothing runs before the timing."""
    fns, parts = _ours(batch)
    fn = _opacus(parts["x"], parts["y"]) if name == OPACUS else fns[name]
    _common.child_times(fn, calls)


def _processes(batch: int, rounds: int, calls: int, aa: bool, threads: int | None) -> None:
    """The yardstick, the default method and (when installed) Opacus, each in fresh
    processes of its own."""
    sides = [YARDSTICK, YARDSTICK if aa else DEFAULT]
    labels = ["yardstick", "yardstick (A/A check)" if aa else "default method"]
    if not aa and _common.optional("opacus") is not None:
        sides.append(OPACUS)
        labels.append("Opacus GradSampleModule")

    def command(side: int, keep: bool) -> list[str]:
        return ([sys.executable, os.path.abspath(__file__), "--child", sides[side], "--batch",
                 str(batch), "--rounds", str(calls)] + (["--threads", str(threads)] if threads else [])
                + (["--keep-freed-memory"] if keep else []))

    _common.fresh_processes(command, labels, rounds,
                            f"per-sample gradients, batch {batch}, {calls} calls each")


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", default="64,256", help="comma-separated batch sizes")
    p.add_argument("--no-loop", action="store_true", help="skip the Python-loop baseline")
    p.add_argument("--compile", action="store_true",
                   help="add fp.jit(fp.per_sample_grads(...)) (torch.compile; first call timed apart)")
    p.add_argument("--processes", type=int, default=0,
                   help="also time the yardstick, the default method and Opacus in N fresh "
                        "processes each")
    p.add_argument("--aa", action="store_true", help="with --processes: yardstick vs itself")
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--keep-freed-memory", action="store_true", help=argparse_hidden())
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        _common.keep_freed_memory_if(sys.argv)
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
