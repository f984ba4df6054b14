"""MAML on few-shot sine-wave regression (Finn, Abbeel & Levine 2017, section 5.1).

    python examples/maml.py                                  # 5000 meta-iterations
    python examples/maml.py --iterations 20000 --inner-steps 1 --inner-optimizer sgd
    python examples/maml.py --first-order                    # first-order MAML

Tasks: y = A sin(x - phi) with amplitude A ~ U[0.1, 5], phase phi ~ U[0, pi], inputs
x ~ U[-5, 5]; K support and K query points per task (K = --k-shot, 10). Model: an MLP
1 -> 40 -> 40 -> 1 with ReLU. Inner loop: --inner-steps steps of fp.optim.sgd(alpha =
0.01) (or fp.optim.adam) with optim.apply_updates on the support MSE; outer loop: Adam
(1e-3) on the query MSE after adaptation, averaged over a meta-batch of 25 tasks that run
together under fp.vmap. The meta-gradient flows through the inner fp.optim updates
(second order unless --first-order).

Baseline: the same MLP pretrained jointly on all tasks (Adam 1e-3 on the MSE of the same
number of sampled tasks and steps), fine-tuned on each held-out task with the same inner
optimizer. Both are evaluated on --eval-tasks held-out tasks (K support points, 100 query
points each) after 0 to --eval-steps inner steps.

Writes to --out-dir: results.json (MSE per number of adaptation steps, both models, the
command and timings) and maml.png (MSE against steps; one held-out task's fits).

Exit status: 0 done; 2 a bad flag or a device this machine lacks (one line on stderr);
1 a diverged run (a non-finite meta-loss); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import functorch_pipeline as fp
from functorch_pipeline import optim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DIVERGED  # noqa: E402
from common import ArgumentParser  # noqa: E402
from common import device_arg  # noqa: E402
from common import fail  # noqa: E402
from common import finite_positive_float  # noqa: E402
from common import non_negative_int  # noqa: E402
from common import pick_device  # noqa: E402
from common import positive_int  # noqa: E402
from common import run_main  # noqa: E402
from common import seed_int  # noqa: E402

Params = dict[str, torch.Tensor]
Tasks = dict[str, torch.Tensor]
AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


# --- model and tasks -----------------------------------------------------------------------

def init_params(key: torch.Tensor, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Params:
    """The 1-40-40-1 ReLU MLP's parameters, PyTorch's default initialisation drawn from
    ``key`` (names as in ``nn.Sequential``: ``0.weight``, ``0.bias``, ``2.weight``, ...)."""
    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(),
                                   torch.nn.Linear(40, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))

    params = fp.functionalize(net).init(key, torch.zeros(1, 1))["params"]
    return fp.tree.to(params, device=device, dtype=dtype)


def mlp(params: Params, x: torch.Tensor) -> torch.Tensor:
    """The MLP as a pure function: ``x`` of shape (n, 1) to (n, 1)."""
    h = F.relu(F.linear(x, params["0.weight"], params["0.bias"]))
    h = F.relu(F.linear(h, params["2.weight"], params["2.bias"]))
    return F.linear(h, params["4.weight"], params["4.bias"])


def mse(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((mlp(params, x) - y) ** 2).mean()


def sample_tasks(key: torch.Tensor, num_tasks: int, k_shot: int, num_query: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tasks:
    """``num_tasks`` sine tasks: support ``x_s, y_s`` (num_tasks, K, 1), query ``x_q, y_q``
    (num_tasks, num_query or K, 1), and each task's ``amplitude`` and ``phase``."""
    ka, kp, ks, kq = fp.random.split(key, 4)
    amp = fp.random.uniform(ka, (num_tasks, 1, 1), dtype, *AMPLITUDE).to(device)
    phase = fp.random.uniform(kp, (num_tasks, 1, 1), dtype, *PHASE).to(device)
    x_s = fp.random.uniform(ks, (num_tasks, k_shot, 1), dtype, *X_RANGE).to(device)
    x_q = fp.random.uniform(kq, (num_tasks, num_query or k_shot, 1), dtype, *X_RANGE).to(device)
    return {"x_s": x_s, "y_s": amp * torch.sin(x_s - phase), "x_q": x_q,
            "y_q": amp * torch.sin(x_q - phase), "amplitude": amp, "phase": phase}


def inner_optimizer(name: str, lr: float) -> optim.GradientTransformation:
    """The inner-loop optimizer. Adam gets ``eps_root=1e-12``: with the default 0, an inner
    gradient entry that is exactly 0 (a dead ReLU) gives a NaN meta-gradient (optax says
    the same)."""
    if name == "sgd":
        return optim.sgd(lr)
    if name == "adam":
        return optim.adam(lr, eps_root=1e-12)
    raise ValueError(f"inner_optimizer: unknown optimizer {name!r} (sgd or adam)")


# --- MAML ------------------------------------------------------------------------------------

def adapt(params: Params, x: torch.Tensor, y: torch.Tensor, opt: optim.GradientTransformation,
          steps: int, first_order: bool = False) -> Params:
    """``steps`` inner updates of ``opt`` on ``mse(params, x, y)``, differentiable in
    ``params`` (fp.grad inside whatever transform the caller runs). ``first_order`` stops
    the gradient through the inner gradients (first-order MAML)."""
    state = opt.init(params)
    for _ in range(steps):
        g = fp.grad(mse)(params, x, y)
        if first_order:
            g = fp.tree.detach(g)
        updates, state = opt.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params


def make_meta_loss(opt: optim.GradientTransformation, steps: int, first_order: bool = False
                   ) -> Callable[[Params, Tasks], torch.Tensor]:
    """``meta_loss(params, tasks)``: the query MSE after adaptation, averaged over tasks,
    each task adapted under ``fp.vmap`` (the JAX idiom ``vmap(maml_loss)(tasks).mean()``)."""

    def task_loss(params: Params, task: Tasks) -> torch.Tensor:
        adapted = adapt(params, task["x_s"], task["y_s"], opt, steps, first_order)
        return mse(adapted, task["x_q"], task["y_q"])

    def meta_loss(params: Params, tasks: Tasks) -> torch.Tensor:
        return fp.vmap(task_loss, in_axes=(None, 0))(params, tasks).mean()

    return meta_loss


def make_meta_step(meta_loss: Callable[[Params, Tasks], torch.Tensor],
                   meta_opt: optim.GradientTransformation) -> Callable[..., Any]:
    """One meta-training step: ``(params, opt_state, tasks) -> (params, opt_state, loss)``."""
    value_and_grad = fp.value_and_grad(meta_loss)

    def step(params: Params, opt_state: Any, tasks: Tasks) -> tuple[Params, Any, torch.Tensor]:
        loss, grads = value_and_grad(params, tasks)
        updates, opt_state = meta_opt.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, loss

    return step


def make_joint_step(meta_opt: optim.GradientTransformation) -> Callable[..., Any]:
    """The baseline's step: plain training on every point of every task of the batch."""

    def joint_loss(params: Params, tasks: Tasks) -> torch.Tensor:
        x = torch.cat([tasks["x_s"], tasks["x_q"]], dim=1).reshape(-1, 1)
        y = torch.cat([tasks["y_s"], tasks["y_q"]], dim=1).reshape(-1, 1)
        return mse(params, x, y)

    return make_meta_step(joint_loss, meta_opt)


def evaluate(params: Params, tasks: Tasks, opt: optim.GradientTransformation, max_steps: int
             ) -> list[float]:
    """Mean query MSE over ``tasks`` after 0, 1, ..., ``max_steps`` inner steps."""
    def after(steps: int) -> torch.Tensor:
        def one(task: Tasks) -> torch.Tensor:
            adapted = adapt(params, task["x_s"], task["y_s"], opt, steps)
            return mse(adapted, task["x_q"], task["y_q"])
        return fp.vmap(one)(tasks).mean()

    return [float(after(s)) for s in range(max_steps + 1)]


# --- command line ----------------------------------------------------------------------------

def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="maml.py", description="MAML on few-shot sine regression "
                       "(Finn et al. 2017) against a jointly pretrained baseline")
    p.add_argument("--iterations", type=positive_int, default=5000,
                   help="meta-training iterations (also the baseline's training steps)")
    p.add_argument("--inner-steps", type=positive_int, default=1,
                   help="inner-loop steps during meta-training")
    p.add_argument("--first-order", action="store_true",
                   help="first-order MAML (no second derivatives through the inner loop)")
    p.add_argument("--inner-optimizer", choices=["sgd", "adam"], default="sgd",
                   help="inner-loop fp.optim optimizer")
    p.add_argument("--inner-lr", type=finite_positive_float, default=0.01,
                   help="inner-loop learning rate alpha")
    p.add_argument("--meta-lr", type=finite_positive_float, default=1e-3,
                   help="outer Adam learning rate (also the baseline's)")
    p.add_argument("--meta-batch", type=positive_int, default=25, help="tasks per meta-batch")
    p.add_argument("--k-shot", type=positive_int, default=10,
                   help="support (and query) points per training task")
    p.add_argument("--eval-tasks", type=positive_int, default=600, help="held-out tasks")
    p.add_argument("--eval-steps", type=non_negative_int, default=10,
                   help="evaluate after 0..N inner steps")
    p.add_argument("--log-every", type=positive_int, default=500,
                   help="print the meta-loss every N iterations")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="parameter and data dtype")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch.set_num_threads: the model is tiny, so more intra-op threads "
                   "mostly add synchronisation (default: 1)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (-2**63 <= seed < 2**63)")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda, cuda:1, mps, ... (default: CUDA if available, else CPU)")
    p.add_argument("--out-dir", default="runs/maml", help="where results.json and maml.png go")
    p.add_argument("--no-plot", action="store_true", help="skip maml.png")
    return p


def _train(name: str, step: Callable[..., Any], params: Params, meta_opt: Any,
           args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
           key: torch.Tensor) -> tuple[Params, float]:
    opt_state = meta_opt.init(params)
    start = time.perf_counter()
    window = []
    for it in range(1, args.iterations + 1):
        tasks = sample_tasks(fp.random.fold_in(key, it), args.meta_batch, args.k_shot,
                             device=device, dtype=dtype)
        params, opt_state, loss = step(params, opt_state, tasks)
        window.append(loss.detach())
        if it % args.log_every == 0 or it == args.iterations:
            mean = float(torch.stack(window).mean())
            window = []
            if not math.isfinite(mean):
                fail(f"{name}: non-finite loss at iteration {it}; lower --meta-lr or "
                     "--inner-lr", status=DIVERGED)
            rate = it / (time.perf_counter() - start)
            print(f"{name:>10} it {it:6d}  loss {mean:.4f}  ({rate:.1f} it/s)", flush=True)
    return params, time.perf_counter() - start


def plot(path: str, results: dict[str, Any], curves: dict[str, Any]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = list(range(len(results["maml_mse"])))
    a1.plot(steps, results["maml_mse"], "o-", label="MAML")
    a1.plot(steps, results["pretrained_mse"], "s-", label="pretrained jointly")
    a1.set_xlabel("inner steps at test time")
    a1.set_ylabel(f"query MSE ({results['eval_tasks']} held-out tasks)")
    a1.set_yscale("log")
    a1.legend()
    x = curves["x"]
    a2.plot(x, curves["truth"], "k-", label="ground truth")
    a2.plot(curves["x_s"], curves["y_s"], "k^", label=f"{len(curves['x_s'])} shots")
    a2.plot(x, curves["maml"], "-", label=f"MAML, {curves['steps']} steps")
    a2.plot(x, curves["pretrained"], "--", label=f"pretrained, {curves['steps']} steps")
    a2.set_xlabel("x")
    a2.legend(fontsize=8)
    fig.suptitle(f"few-shot sine regression, K={results['k_shot']}, "
                 f"{results['iterations']} iterations")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out_dir, exist_ok=True)
    root = fp.random.key(args.seed)
    k_init, k_maml, k_joint, k_eval = fp.random.split(root, 4)
    inner = inner_optimizer(args.inner_optimizer, args.inner_lr)
    params0 = init_params(k_init, device, dtype)
    print(f"MAML: {args.iterations} iterations, meta-batch {args.meta_batch}, K={args.k_shot}, "
          f"{args.inner_steps} inner {args.inner_optimizer} step(s) (alpha {args.inner_lr}), "
          f"{'first' if args.first_order else 'second'} order, device {device}", flush=True)
    meta_step = make_meta_step(make_meta_loss(inner, args.inner_steps, args.first_order),
                               optim.adam(args.meta_lr))
    maml_params, maml_s = _train("maml", meta_step, params0, optim.adam(args.meta_lr), args,
                                 device, dtype, k_maml)
    joint_params, joint_s = _train("pretrain", make_joint_step(optim.adam(args.meta_lr)),
                                   params0, optim.adam(args.meta_lr), args, device, dtype, k_joint)
    held_out = sample_tasks(k_eval, args.eval_tasks, args.k_shot, num_query=100, device=device,
                            dtype=dtype)
    results = {
        "command": shlex.join(["python", "examples/maml.py", *(sys.argv[1:] if argv is None
                                                                 else argv)]),
        "iterations": args.iterations, "inner_steps": args.inner_steps,
        "first_order": args.first_order, "inner_optimizer": args.inner_optimizer,
        "k_shot": args.k_shot, "meta_batch": args.meta_batch, "eval_tasks": args.eval_tasks,
        "maml_mse": evaluate(maml_params, held_out, inner, args.eval_steps),
        "pretrained_mse": evaluate(joint_params, held_out, inner, args.eval_steps),
        "maml_train_s": round(maml_s, 1), "pretrain_s": round(joint_s, 1),
        "device": str(device), "torch": torch.__version__,
    }
    print("held-out query MSE after k inner steps (k = 0, 1, ...):")
    print("  MAML      " + " ".join(f"{v:.3f}" for v in results["maml_mse"]))
    print("  pretrained " + " ".join(f"{v:.3f}" for v in results["pretrained_mse"]))
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if not args.no_plot:
        task = {k: v[:1] for k, v in held_out.items()}
        x = torch.linspace(*X_RANGE, 200, dtype=dtype, device=device).reshape(-1, 1)
        shown = max(args.eval_steps, 1)
        fits = {name: mlp(adapt(p, task["x_s"][0], task["y_s"][0], inner, shown), x)
                for name, p in (("maml", maml_params), ("pretrained", joint_params))}
        curves = {"x": x[:, 0].tolist(), "steps": shown,
                  "truth": (task["amplitude"][0] * torch.sin(x - task["phase"][0]))[:, 0].tolist(),
                  "x_s": task["x_s"][0, :, 0].tolist(), "y_s": task["y_s"][0, :, 0].tolist(),
                  **{k: v.detach()[:, 0].tolist() for k, v in fits.items()}}
        where = plot(os.path.join(args.out_dir, "maml.png"), results, curves)
        if where:
            print(f"plot: {where}")
    print(f"results: {os.path.join(args.out_dir, 'results.json')}")
    return {"results": results, "maml_params": maml_params, "pretrained_params": joint_params}


if __name__ == "__main__":
    run_main(main)
