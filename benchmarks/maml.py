"""MAML meta-training steps per second: fp (vmap over tasks) vs a torch.autograd loop vs TorchOpt.

One meta-training step of examples/maml.py (few-shot sine regression, 1-40-40-1 ReLU MLP,
meta-batch 25, K = 10 support + 10 query points, --inner-steps SGD steps with alpha 0.01,
second order, outer Adam 1e-3), written three ways and timed in the same process,
interleaved (medians, throughput ratios, page faults per call):

- ``fp (vmap)``: examples/maml.py's step: ``fp.value_and_grad`` of
  ``fp.vmap(task_loss)(tasks).mean()``, inner ``fp.optim.sgd`` + ``apply_updates``,
  outer ``fp.optim.adam``;
- ``torch.autograd loop``: a Python loop over tasks with
  ``torch.autograd.grad(create_graph=True)`` and ``p - alpha * g``, one ``backward()``,
  ``torch.optim.Adam``;
- ``torchopt functional`` (when torchopt is importable): TorchOpt's functional API as its
  MAML tutorial writes it, looping over tasks: ``torchopt.sgd`` +
  ``torchopt.apply_updates(inplace=False)`` inside, ``torchopt.adam`` outside.

Before timing, the three meta-gradients are computed from the same parameters and tasks in
float64 and must agree to 1e-6 (relative to the largest entry); the timed runs use
``--dtype`` (float32 by default).

    .venv/bin/python benchmarks/maml.py
    .venv/bin/python benchmarks/maml.py --inner-steps 5 --threads 1
    .venv/bin/pip install --no-deps torchopt   # for the TorchOpt row (needs optree)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))

import _common  # noqa: E402
import maml  # noqa: E402

import functorch_pipeline as fp  # noqa: E402
from functorch_pipeline import optim  # noqa: E402

ALPHA = 0.01
META_LR = 1e-3


def _names(params: dict[str, torch.Tensor]) -> list[str]:
    return list(params)


def autograd_meta_grads(params: list[torch.Tensor], names: list[str], tasks: dict[str, Any],
                        steps: int) -> list[torch.Tensor]:
    """The hand-written loop (params are leaves that require grad)."""
    total = 0.0
    n = tasks["x_s"].shape[0]
    for i in range(n):
        p = list(params)
        for _ in range(steps):
            loss = maml.mse(dict(zip(names, p, strict=True)), tasks["x_s"][i], tasks["y_s"][i])
            gs = torch.autograd.grad(loss, p, create_graph=True)
            p = [w - ALPHA * g for w, g in zip(p, gs, strict=True)]
        total = total + maml.mse(dict(zip(names, p, strict=True)), tasks["x_q"][i], tasks["y_q"][i])
    return list(torch.autograd.grad(total / n, params))


def torchopt_meta_grads(torchopt: Any, params: tuple[torch.Tensor, ...], names: list[str],
                        tasks: dict[str, Any], steps: int) -> list[torch.Tensor]:
    """TorchOpt's functional API, looping over tasks (its MAML tutorial's structure)."""
    inner = torchopt.sgd(ALPHA)
    total = 0.0
    n = tasks["x_s"].shape[0]
    for i in range(n):
        p = params
        state = inner.init(p)
        for _ in range(steps):
            loss = maml.mse(dict(zip(names, p, strict=True)), tasks["x_s"][i], tasks["y_s"][i])
            grads = torch.autograd.grad(loss, p, create_graph=True)
            updates, state = inner.update(grads, state, inplace=False)
            p = torchopt.apply_updates(p, updates, inplace=False)
        total = total + maml.mse(dict(zip(names, p, strict=True)), tasks["x_q"][i], tasks["y_q"][i])
    return list(torch.autograd.grad(total / n, params))


def check_same_meta_gradients(steps: int, torchopt: Any) -> str:
    """All rows' meta-gradients from the same float64 parameters and tasks."""
    params = maml.init_params(fp.random.key(0), dtype=torch.float64)
    tasks = maml.sample_tasks(fp.random.key(1), 25, 10, dtype=torch.float64)
    names = _names(params)
    ref = fp.grad(maml.make_meta_loss(optim.sgd(ALPHA), steps))(params, tasks)
    leaves = [params[k].clone().requires_grad_() for k in names]
    rows = {"torch.autograd loop": autograd_meta_grads(leaves, names, tasks, steps)}
    if torchopt is not None:
        rows["torchopt functional"] = torchopt_meta_grads(torchopt, tuple(leaves), names, tasks,
                                                          steps)
    scale = max(float(ref[k].abs().max()) for k in names)
    worst = {}
    for row, grads in rows.items():
        worst[row] = max(float((ref[k] - g).abs().max()) for k, g in zip(names, grads,
                                                                        strict=True)) / scale
        assert worst[row] < 1e-6, (row, worst[row])
    return ", ".join(f"{row} {w:.1e}" for row, w in worst.items())


def candidates(steps: int, batch: int, dtype: torch.dtype, torchopt: Any
               ) -> dict[str, Callable[[], Any]]:
    params0 = maml.init_params(fp.random.key(0), dtype=dtype)
    names = _names(params0)
    tasks = maml.sample_tasks(fp.random.key(1), batch, 10, dtype=dtype)

    fp_step = maml.make_meta_step(maml.make_meta_loss(optim.sgd(ALPHA), steps), optim.adam(META_LR))
    fp_state = {"p": params0, "s": optim.adam(META_LR).init(params0)}

    def run_fp() -> None:
        fp_state["p"], fp_state["s"], _ = fp_step(fp_state["p"], fp_state["s"], tasks)

    leaves = [torch.nn.Parameter(params0[k].clone()) for k in names]
    torch_opt = torch.optim.Adam(leaves, lr=META_LR)

    def run_autograd() -> None:
        grads = autograd_meta_grads(leaves, names, tasks, steps)
        for w, g in zip(leaves, grads, strict=True):
            w.grad = g
        torch_opt.step()

    fns = {"fp (vmap)": run_fp, "torch.autograd loop": run_autograd}
    if torchopt is not None:
        outer = torchopt.adam(META_LR)
        to_state = {"p": tuple(params0[k].clone().requires_grad_() for k in names)}
        to_state["s"] = outer.init(to_state["p"])

        def run_torchopt() -> None:
            grads = torchopt_meta_grads(torchopt, to_state["p"], names, tasks, steps)
            updates, to_state["s"] = outer.update(tuple(grads), to_state["s"], inplace=False)
            new = torchopt.apply_updates(to_state["p"], updates, inplace=False)
            to_state["p"] = tuple(w.detach().requires_grad_() for w in new)

        fns["torchopt functional"] = run_torchopt
    return fns


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--inner-steps", type=int, default=1, help="inner SGD steps per task")
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-step")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = p.parse_args()
    if _common.begin(args):
        return
    torchopt = _common.optional("torchopt")
    if torchopt is None:
        print("  torchopt not importable: no TorchOpt row "
              "(.venv/bin/pip install --no-deps torchopt)")
    else:
        print(f"  torchopt {torchopt.__version__}")
    print(f"  check (float64): meta-gradients vs fp, max |difference| / max |fp|: "
          f"{check_same_meta_gradients(args.inner_steps, torchopt)}")
    fns = candidates(args.inner_steps, args.meta_batch, getattr(torch, args.dtype), torchopt)
    stats = _common.measure(fns, rounds=args.rounds, warmup=3, budget_s=args.budget)
    baselines = {"torchopt": "torchopt functional"} if torchopt is not None else {}
    baselines["autograd"] = "torch.autograd loop"
    title = (f"MAML sine regression, meta-batch {args.meta_batch}, K=10, {args.inner_steps} "
             f"inner SGD step(s), second order, {args.dtype}; 'ex/s' = meta-steps/s")
    print(_common.table(stats, baselines, examples=1, title=title))


if __name__ == "__main__":
    main()
