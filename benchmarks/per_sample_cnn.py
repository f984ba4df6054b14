"""Per-sample gradients of the classic MNIST CNN, against the plain batch gradient.

The yardstick is one eager ``backward()`` of the mean loss over the batch (the practical
limit for per-sample gradients); every other row is a way of getting each example's own
gradient, measured in the same process, interleaved. Ratios are throughput ratios
(> 1 is faster than the yardstick).

    .venv/bin/python benchmarks/per_sample_cnn.py                 # batch 64 and 256
    .venv/bin/python benchmarks/per_sample_cnn.py --malloc both   # + tuned glibc malloc
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402

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


def candidates(batch: int, loop: bool, compile: bool = False) -> tuple[dict, dict[str, str]]:
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

    hooks = fp.per_sample_grads(losses, method="hooks")
    one = torch.func.grad(lambda p, xi, yi: mean_loss(p, xi[None], yi[None]))
    vmapped = torch.func.vmap(one, in_dims=(None, 0, 0))
    def python_loop() -> list[torch.Tensor]:
        return _common.python_loop_grads(model, F.nll_loss, x, y)

    fns = {
        "batch gradient (yardstick)": batch_grad,
        "fp.per_sample_grads hooks": lambda: hooks(params, x, y),
        "torch.func vmap(grad)": lambda: vmapped(params, x, y),
    }
    if compile:
        jitted = fp.jit(fp.per_sample_grads(mean_loss))
        fns["fp.jit(per_sample_grads)"] = lambda: jitted(params, x, y)
    if loop:
        fns["python loop"] = python_loop

    # Same numbers first: the fast method against vmap(grad).
    with torch.no_grad():
        a, b = hooks(params, x, y), vmapped(params, x, y)
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)  # noqa: B023
    print(f"  check: hooks vs vmap(grad), max relative difference {worst:.1e}")
    assert worst < 1e-4, worst
    return fns, {"yardstick": "batch gradient (yardstick)", "vmap": "torch.func vmap(grad)"}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", default="64,256", help="comma-separated batch sizes")
    p.add_argument("--no-loop", action="store_true", help="skip the Python-loop baseline")
    p.add_argument("--compile", action="store_true",
                   help="add fp.jit(fp.per_sample_grads(...)) (torch.compile; first call timed apart)")
    args = p.parse_args()
    if _common.maybe_respawn(args):
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(_common.environment())
    for peer, why in (("opacus", "Opacus GradSampleModule"), ("jax", "JAX vmap+jit")):
        if _common.optional(peer) is None:
            print(f"  skipped {why}: `{peer}` is not installed")
    for batch in (int(b) for b in args.batch.split(",")):
        fns, baselines = candidates(batch, not args.no_loop, args.compile)
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget,
                                every={"python loop": 5})
        print(_common.table(stats, baselines, batch, f"\nper-sample gradients, MNIST CNN, batch {batch}"))


if __name__ == "__main__":
    main()
