"""Per-example gradients on MNIST: gradient-norm statistics and DP-SGD.

    python examples/per_sample_grads.py      # --data-dir defaults to <repo>/../shared/data

1. Trains the classic CNN briefly (plain SGD), then computes the gradient of every one of
   --num-examples training examples with fp.per_sample_grads: a histogram of their norms
   (grad_norms.png) and the highest-norm examples as an image grid (top_grad_norms.png).
2. Trains with DP-SGD from fp.optim (per-example clipping to --clip, Gaussian noise
   --sigma * --clip, per-example dropout keys) and reports test accuracy.
3. Sanity check: with sigma = 0 and an infinite clip, DP-SGD is plain SGD on the mean
   loss; both are run step for step from the same start (float64) and compared.

Exit status: 0 done; 2 a bad flag, a device this machine lacks or missing data (one line
on stderr, before any data is read); 1 a diverged run (non-finite parameters); 130 Ctrl-C
(this example keeps no checkpoints).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import torch

import functorch_pipeline as fp
from functorch_pipeline import optim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DIVERGED  # noqa: E402
from common import ArgumentParser  # noqa: E402
from common import all_finite  # noqa: E402
from common import check_mnist_files  # noqa: E402
from common import default_data_dir  # noqa: E402
from common import device_arg  # noqa: E402
from common import evaluate  # noqa: E402
from common import fail  # noqa: E402
from common import finite_positive_float  # noqa: E402
from common import load_mnist  # noqa: E402
from common import non_negative_float  # noqa: E402
from common import non_negative_int  # noqa: E402
from common import pick_device  # noqa: E402
from common import positive_float  # noqa: E402
from common import positive_int  # noqa: E402
from common import progress  # noqa: E402
from common import run_main  # noqa: E402
from common import seed_int  # noqa: E402
from models import Net  # noqa: E402


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="per_sample_grads.py",
                       description="Per-example gradients and DP-SGD on MNIST")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="dataset root holding MNIST/raw/ (torchvision layout)")
    p.add_argument("--out-dir", default="runs/per_sample_grads",
                   help="where grad_norms.png and top_grad_norms.png go")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda, cuda:1, mps, ... (default: CUDA if available, else CPU)")
    p.add_argument("--no-cuda", action="store_true", help="disable CUDA even when available")
    p.add_argument("--seed", type=seed_int, default=1, help="random seed (-2**63 <= seed < 2**63)")
    p.add_argument("--pretrain-steps", type=non_negative_int, default=300,
                   help="plain SGD steps before measuring norms")
    p.add_argument("--num-examples", type=positive_int, default=4096,
                   help="examples whose gradient norms are measured")
    p.add_argument("--chunk-size", type=positive_int, default=512,
                   help="examples per vectorised chunk")
    p.add_argument("--top", type=positive_int, default=16, help="highest-norm examples in the grid")
    p.add_argument("--dp-epochs", type=finite_positive_float, default=1.0,
                   help="DP-SGD epochs (fractions allowed)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="DP-SGD batch size")
    p.add_argument("--lr", type=finite_positive_float, default=0.5, help="DP-SGD learning rate")
    p.add_argument("--momentum", type=non_negative_float, default=0.9, help="DP-SGD momentum")
    p.add_argument("--clip", type=positive_float, default=1.0,
                   help="per-example L2 clip C (inf: none)")
    p.add_argument("--sigma", type=non_negative_float, default=1.0,
                   help="noise multiplier (std = sigma * C)")
    p.add_argument("--check-steps", type=non_negative_int, default=10,
                   help="steps of the sigma=0 sanity check (0: skip)")
    p.add_argument("--limit-train", type=positive_int, default=None,
                   help="use only the first N training examples (default: all)")
    p.add_argument("--limit-test", type=positive_int, default=None,
                   help="use only the first N test examples (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="do not write the two plots")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = pick_device(args.device, args.no_cuda)
    if args.sigma > 0 and math.isinf(args.clip):
        fail("--clip inf with --sigma > 0 adds infinite noise; give a finite --clip or --sigma 0")
    check_mnist_files(args.data_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    train, test = load_mnist(args.data_dir, device, args.limit_train, args.limit_test)

    model = fp.functionalize(Net())
    key = fp.random.key(args.seed, device=device)
    params = fp.tree.to(model.init(fp.random.fold_in(key, 1), train[0][:1])["params"], device)

    def batch_loss(params: Any, x: torch.Tensor, y: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        # `keys` holds one key per example: dropout masks are per example and reproducible.
        out, _ = model.apply({"params": params, "buffers": {}}, x, train=True, key=keys)
        return fp.losses.nll(out, y).mean()

    def eval_loss(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # per-example losses (not their mean): per_sample_grads' fast "hooks" method needs them
        return fp.losses.nll(model.apply({"params": params, "buffers": {}}, x), y)

    def logits_of(params: Any) -> Any:
        return lambda x: model.apply({"params": params, "buffers": {}}, x)

    # 1. a short plain-SGD warm-up, then the gradient norms of many examples.
    sgd = optim.sgd(0.01, momentum=0.5)
    opt_state = sgd.init(params)
    step_fn = fp.value_and_grad(batch_loss)
    done = 0
    while done < args.pretrain_steps:
        for x, y in fp.data.batches(train, 64, key=fp.random.fold_in(key, 100 + done)):
            keys = fp.random.split(fp.random.fold_in(key, 10_000 + done), x.shape[0])
            _, grads = step_fn(params, x, y, keys)
            updates, opt_state = sgd.update(grads, opt_state, params)
            params = optim.apply_updates(params, updates)
            done += 1
            if done >= args.pretrain_steps:
                break
    if not bool(all_finite(params)):
        fail(f"the plain-SGD warm-up diverged: non-finite parameters after {done} steps",
             status=DIVERGED)
    n = min(args.num_examples, train[0].shape[0])
    x, y = train[0][:n], train[1][:n]
    t0 = time.perf_counter()
    grads = fp.per_sample_grads(eval_loss, chunk_size=args.chunk_size)(params, x, y)
    norms = fp.vmap(fp.tree.global_norm)(grads)
    norm_time = time.perf_counter() - t0
    print(f"per-example gradient norms of {n} examples in {norm_time:.2f} s ({n / norm_time:.0f} examples/s): "
          f"median {norms.median().item():.4g}, 99th percentile {norms.quantile(0.99).item():.4g}, "
          f"max {norms.max().item():.4g}")
    plotted = not args.no_plot and _plots(norms, x, y, args.top, args.out_dir)

    # 2. DP-SGD with per-example clipping and noise.
    dp = optim.dpsgd(args.lr, l2_norm_clip=args.clip, noise_multiplier=args.sigma,
                     seed=fp.random.fold_in(key, 7), momentum=args.momentum)
    dp_params = fp.tree.to(model.init(fp.random.fold_in(key, 2), train[0][:1])["params"], device)
    dp_state = dp.init(dp_params)
    # batch_loss takes one dropout key per example and returns a mean: vmap it explicitly
    per_example = fp.per_sample_grads(batch_loss, method="vmap")
    # an epoch is the batches `batches(..., drop_last=True)` below draws from one shuffle
    steps = math.ceil(args.dp_epochs * fp.data.num_batches(train[0].shape[0], args.batch_size,
                                                           drop_last=True))
    bar = progress(range(steps), steps, 0, "DP-SGD", args.no_progress)
    t0 = time.perf_counter()
    it = iter(())
    for step in bar:
        try:
            xb, yb = next(it)
        except StopIteration:
            it = fp.data.batches(train, args.batch_size, key=fp.random.fold_in(key, 20_000 + step), drop_last=True)
            xb, yb = next(it)
        keys = fp.random.split(fp.random.fold_in(key, 30_000 + step), xb.shape[0])
        g = per_example(dp_params, xb, yb, keys)
        updates, dp_state = dp.update(g, dp_state, dp_params)
        dp_params = optim.apply_updates(dp_params, updates)
    dp_time = time.perf_counter() - t0
    if not bool(all_finite(dp_params)):
        fail(f"DP-SGD diverged: non-finite parameters after {steps} steps; lower --lr or --sigma",
             status=DIVERGED)
    dp_metrics = evaluate(logits_of(dp_params), test, 1000, log_probs=True)
    print(f"DP-SGD (C={args.clip}, sigma={args.sigma}, batch {args.batch_size}, {steps} steps, {dp_time:.1f} s): "
          f"test accuracy {100 * dp_metrics['test_accuracy']:.2f}%")

    # 3. sigma = 0, infinite clip: DP-SGD must be plain SGD on the mean loss.
    max_diff = float("nan")
    if args.check_steps:
        max_diff = sanity_check(model, train, key, args.check_steps, device)
        print(f"sanity check (sigma=0, clip=inf, {args.check_steps} steps, float64): "
              f"max |param difference| = {max_diff:.3g}")
    if not plotted:
        print(f"outputs: none ({'--no-plot' if args.no_plot else 'matplotlib not installed'})")
    else:
        print(f"outputs: {os.path.join(args.out_dir, 'grad_norms.png')} (norm histogram), "
              f"{os.path.join(args.out_dir, 'top_grad_norms.png')} (highest-norm examples)")
    return {"norms": norms, "dp_accuracy": dp_metrics["test_accuracy"], "dp_steps": steps,
            "sanity_max_diff": max_diff}


def sanity_check(model: Any, train: Any, key: torch.Tensor, steps: int, device: torch.device) -> float:
    """Run DP-SGD(sigma=0, C=inf) and SGD side by side in float64; the largest difference."""
    params = fp.tree.astype(model.init(fp.random.fold_in(key, 3), train[0][:1])["params"], torch.float64)
    params = fp.tree.to(params, device)

    def loss(params: Any, x: torch.Tensor, y: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        out, _ = model.apply({"params": params, "buffers": {}}, x, train=True, key=keys)
        return fp.losses.nll(out, y).mean()

    dp = optim.dpsgd(0.05, l2_norm_clip=math.inf, noise_multiplier=0.0, seed=0, momentum=0.5)
    sgd = optim.sgd(0.05, momentum=0.5)
    p_dp, p_sgd = params, params
    s_dp, s_sgd = dp.init(p_dp), sgd.init(p_sgd)
    batches = fp.data.batches(fp.tree.map(lambda a: a[: 32 * steps], train), 32)
    worst = 0.0
    for step, (x, y) in enumerate(batches):
        x = x.double()
        keys = fp.random.split(fp.random.fold_in(key, 40_000 + step), x.shape[0])
        u, s_dp = dp.update(fp.per_sample_grads(loss, method="vmap")(p_dp, x, y, keys), s_dp, p_dp)
        p_dp = optim.apply_updates(p_dp, u)
        u, s_sgd = sgd.update(fp.grad(loss)(p_sgd, x, y, keys), s_sgd, p_sgd)
        p_sgd = optim.apply_updates(p_sgd, u)
        diff = fp.tree.map(lambda a, b: (a - b).abs().max(), p_dp, p_sgd)
        d = fp.tree.max(diff).item()
        worst = d if math.isnan(d) or d > worst else worst  # a NaN must not hide
    return worst


def _plots(norms: torch.Tensor, x: torch.Tensor, y: torch.Tensor, top: int, out_dir: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return False
    v = norms.detach().cpu()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(v.numpy(), bins=80, log=True)
    ax.set_xlabel("per-example gradient L2 norm")
    ax.set_ylabel("examples (log scale)")
    ax.set_title(f"MNIST, classic CNN: {len(v)} examples")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "grad_norms.png"), dpi=100)
    plt.close(fig)

    order = torch.argsort(v, descending=True)[:top]
    cols = min(8, top)
    rows = math.ceil(top / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order.tolist(), strict=False):
        ax.imshow(x[i, 0].detach().cpu().numpy(), cmap="gray")
        ax.set_title(f"y={int(y[i])}  |g|={v[i]:.2g}", fontsize=8)
    fig.suptitle("highest per-example gradient norms")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "top_grad_norms.png"), dpi=100)
    plt.close(fig)
    return True


if __name__ == "__main__":
    run_main(main)
