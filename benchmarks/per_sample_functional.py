"""Per-sample gradients and clipped sums of an MLP written the JAX way, against the plain
batch gradient.

Model: ``relu(x @ w1 + b1) @ w2 + b2`` over a parameter dict (784 -> 512 -> 10), MNIST-shaped
random inputs, batch 256, cross entropy per example: the code a JAX user ports by turning
``jnp.dot`` into ``@``. Before the ``x @ w`` rule (NOTE [x @ w]) every fp method fell back to
``vmap(grad)``, which is a row here for comparison. The yardstick is ``fp.grad`` of the
batch's mean loss. When ``jax`` is installed, the same function in JAX adds ``jax.jit`` rows
(batch gradient, and ``vmap(grad)``), timed after the torch rows (NOTE [peers timed apart]).
Rows run in one process, interleaved; ratios are throughput ratios against the yardstick.

    .venv/bin/python benchmarks/per_sample_functional.py
    .venv/bin/python benchmarks/per_sample_functional.py --batch 64 --rounds 30
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import _jax_models  # noqa: E402

import functorch_pipeline as fp  # noqa: E402

YARDSTICK = "fp.grad of the mean loss (yardstick)"


def losses(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross entropy of the two-layer MLP, written with ``@``."""
    return F.cross_entropy(torch.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"], y,
                           reduction="none")


def candidates(batch: int, width: int = 512) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    params = {"w1": torch.randn(784, width) / 28.0, "b1": torch.zeros(width),
              "w2": torch.randn(width, 10) / width ** 0.5, "b2": torch.zeros(10)}
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    grad = fp.grad(lambda p, x, y: losses(p, x, y).mean())
    rows, want = _common.fast_and_vmap_rows(losses, params, (x, y))
    fns = {YARDSTICK: lambda: grad(params, x, y), **rows}
    if _jax_models.modules() is not None:
        fns.update(_jax(params, x, y, want))
    return fns, params


def _jax(params: dict, x: torch.Tensor, y: torch.Tensor, want: dict) -> dict[str, Any]:
    """The same MLP in JAX, checked against torch's per-example gradients first (that
    check makes the compiling first call)."""
    jax, jnp, _ = _jax_models.modules()
    jp = _jax_models.params_from_torch(params.items())
    jx, jy = _jax_models.to_jax(x), _jax_models.to_jax(y)

    def example_loss(p: Any, xi: Any, yi: Any) -> Any:
        logits = jax.nn.relu(xi @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return -jax.nn.log_softmax(logits)[yi]

    def mean_loss(p: Any, xb: Any, yb: Any) -> Any:
        return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0, 0))(p, xb, yb))

    want_mean = {k: v.mean(0) for k, v in want.items()}
    return {name: _jax_models.checked_row(name, fn, (jp, jx, jy), ref,
                                          "fp's vmap(grad) mean" if ref is want_mean else "fp's vmap(grad)")
            for name, fn, ref in (
                ("JAX batch gradient (jit)", jax.jit(jax.grad(mean_loss)), want_mean),
                ("JAX vmap(grad) (jit)", jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))),
                 want))}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    args = p.parse_args()
    if _common.begin(args):
        return
    if _jax_models.modules() is None:
        print(_jax_models.skip_line("the JAX rows"))
    else:
        print(_jax_models.threads_line())
    print("  Opacus: no row (its grad samplers hook nn.Module layers; a bare `x @ w` has none)")
    fns, _ = candidates(args.batch, args.width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget,
                                apart=_jax_models.rows(fns))
    for name, fn in fns.items():
        stats[name].note = getattr(fn, "note", "")
    print(_common.table(stats, {"yardstick": YARDSTICK}, args.batch,
                        f"\nper-sample gradients, MLP written with `x @ w`, batch {args.batch}, "
                        f"width {args.width}"))


if __name__ == "__main__":
    main()
