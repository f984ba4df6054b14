"""DP-SGD on MNIST: Opacus' SampleConvNet row reproduced, and the same budget spent better.

Opacus' README row: SampleConvNet, 15 epochs, Poisson sampling with q = 0.004 (expected
batch 240), clip C = 1.5, sigma = 1.3, SGD lr 0.25 (no momentum): 94.63% +- 0.34 test
accuracy over 10 runs, reported at epsilon = 1.19 (delta = 1e-5) by an older, looser
RDP-to-epsilon conversion. Today's RDP gives about 0.92 for that run and PLD less.

    python examples/dp_mnist.py                              # the Opacus row (sigma 1.3)
    python examples/dp_mnist.py --target-epsilon 1.19        # sigma calibrated with PLD
    python examples/dp_mnist.py --optimizer adam --lr 1e-3   # DP-Adam, same privacy

Every epoch prints epsilon by RDP and by PLD; --out-dir gets metrics.jsonl (one line per
epoch), summary.json and accuracy_vs_epsilon.png. Both JSON files are strict JSON: an
epsilon is null where it is not a finite number, that is with --sigma 0 (no noise, no
guarantee: epsilon is infinite, printed as inf) and for PLD below sigma 0.1 (not computed,
printed as n/a); the record's sigma tells which. The state (parameters, optimizer and
noise state, step, key, accountant) is checkpointed at each epoch end, with the per-example
conv kernels the run measured (kernel_choices.json); --resume continues exactly.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline import optim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ArgumentParser  # noqa: E402
from common import append_jsonl  # noqa: E402
from common import check_run_meta  # noqa: E402
from common import default_data_dir  # noqa: E402
from common import dumps_strict  # noqa: E402
from common import evaluate  # noqa: E402
from common import fail  # noqa: E402
from common import finite_positive_float  # noqa: E402
from common import load_mnist  # noqa: E402
from common import non_negative_float  # noqa: E402
from common import open_unit_float  # noqa: E402
from common import pick_device  # noqa: E402
from common import positive_float  # noqa: E402
from common import positive_int  # noqa: E402
from common import prepare_out_dir  # noqa: E402
from common import progress  # noqa: E402
from common import run_main  # noqa: E402
from common import seed_int  # noqa: E402

INIT_STREAM, DATA_STREAM = 1, 2
# the per-example conv kernels this run measured (fp.transforms.kernel_choices): a resumed
# run in a new process runs the same ones, so it stays bit-identical
KERNEL_CHOICES = "kernel_choices.json"


class SampleConvNet(nn.Module):
    """Opacus' ``examples/mnist.py`` network: conv 1->16 k8 s2 p3, maxpool 2 s1, conv
    16->32 k4 s2, maxpool 2 s1, fc 512->32, fc 32->10, ReLU activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)  # (B, 16, 13, 13)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)  # (B, 32, 4, 4)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def parse_args(argv: list[str] | None = None) -> Any:
    p = ArgumentParser(description="DP-SGD on MNIST (Opacus' SampleConvNet) with "
                                   "functorch_pipeline")
    p.add_argument("--epochs", type=positive_int, default=15, help="epochs (of 1/q steps each)")
    p.add_argument("--sample-rate", type=positive_float, default=0.004,
                   help="Poisson sampling rate q (expected batch q * 60000 = 240)")
    p.add_argument("--sigma", type=non_negative_float, default=1.3,
                   help="noise multiplier (ignored with --target-epsilon)")
    p.add_argument("--target-epsilon", type=positive_float, default=None,
                   help="calibrate sigma for this epsilon with --calibrate-accountant")
    p.add_argument("--calibrate-accountant", choices=("pld", "rdp"), default="pld",
                   help="accountant used by --target-epsilon")
    p.add_argument("-c", "--max-grad-norm", type=positive_float, default=1.5,
                   help="per-example clipping bound C")
    p.add_argument("--delta", type=open_unit_float, default=1e-5, help="target delta")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="inner optimizer")
    p.add_argument("--lr", type=finite_positive_float, default=0.25, help="learning rate")
    p.add_argument("--momentum", type=non_negative_float, default=0.0, help="SGD momentum")
    p.add_argument("--max-physical-batch-size", type=positive_int, default=256,
                   help="examples per physical chunk (memory bound)")
    p.add_argument("--method", choices=("auto", "ghost", "hooks", "vmap"), default="auto",
                   help="per-example clipping method (fp.clipped_grad)")
    p.add_argument("--test-batch-size", type=positive_int, default=1000, help="test batch size")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 on a busy machine)")
    p.add_argument("--seed", type=seed_int, default=1, help="random seed")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="folder holding MNIST/raw/")
    p.add_argument("--out-dir", default="runs/dp_mnist", help="metrics, plot, checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --out-dir")
    p.add_argument("--limit-train", type=positive_int, default=None,
                   help="use only the first N training examples")
    p.add_argument("--limit-test", type=positive_int, default=None,
                   help="use only the first N test examples")
    p.add_argument("--steps-per-epoch", type=positive_int, default=None,
                   help="steps per epoch (default round(1/q), one epoch in expectation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    args = p.parse_args(argv)
    if args.sample_rate > 1:
        p.error(f"argument --sample-rate: must be in (0, 1], got {args.sample_rate}")
    if args.max_grad_norm == float("inf") and (args.sigma > 0 or args.target_epsilon):
        p.error("argument -c/--max-grad-norm: inf (no clipping) needs --sigma 0: the noise "
                "std is C * sigma")
    if args.optimizer == "adam" and args.momentum:
        p.error("argument --momentum: SGD's momentum; --optimizer adam has its own moments")
    if args.sigma == 0 and args.target_epsilon is None:
        print("warning: --sigma 0 trains without noise: no privacy guarantee", file=sys.stderr)
    return args


_FLAGS = {"dp.sigma": "--sigma (or the sigma --target-epsilon calibrates for --epochs)",
          "dp.sample_rate": "--sample-rate", "dp.steps_per_epoch": "--steps-per-epoch",
          "dp.num_train": "training set size (--limit-train)", "dp.max_grad_norm": "-c",
          "dp.seed": "--seed", "dp.optimizer": "--optimizer", "dp.lr": "--lr",
          "dp.momentum": "--momentum",
          "dp.delta": "--delta (the metrics of one run report epsilon at one delta)"}


def epsilons(sigma: float, q: float, steps: int, delta: float) -> dict[str, float | None]:
    if sigma == 0 or steps == 0:
        return {"epsilon_rdp": float("inf") if steps else 0.0,
                "epsilon_pld": float("inf") if steps else 0.0}
    # PLD refuses sigma < 0.1 (minutes to terabytes, at epsilon in the hundreds): RDP alone
    kinds = ("rdp", "pld") if sigma >= fp.privacy.PLD_MIN_NOISE_MULTIPLIER else ("rdp",)
    out: dict[str, float | None] = {"epsilon_pld": None}
    out.update({f"epsilon_{a}": fp.privacy.epsilon(noise_multiplier=sigma, sample_rate=q,
                                                   steps=steps, delta=delta, accountant=a)
                for a in kinds})
    return out


def _eps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _read_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row as main built it: a null epsilon after steps at sigma 0 is the
    infinite epsilon that strict JSON cannot hold (see the module docstring)."""
    if row.get("sigma") == 0 and row.get("step", 0) > 0:
        row.update({k: math.inf for k in ("epsilon_rdp", "epsilon_pld") if row.get(k) is None})
    return row


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    acc = [100 * r["test_accuracy"] for r in rows]
    ax.plot([r["epsilon_rdp"] for r in rows], acc, "o-", label="epsilon by RDP")
    if all(r["epsilon_pld"] is not None for r in rows):
        ax.plot([r["epsilon_pld"] for r in rows], acc, "s-", label="epsilon by PLD")
    ax.set_xlabel(f"epsilon (delta = {rows[0]['delta']:g})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    files = prepare_out_dir(args.out_dir, args.resume, args.overwrite, keep=2)
    device = pick_device(args.device)
    train, test = load_mnist(args.data_dir, device, args.limit_train, args.limit_test)
    n = train[0].shape[0]
    q = args.sample_rate
    steps_per_epoch = args.steps_per_epoch or max(1, round(1 / q))
    total_steps = args.epochs * steps_per_epoch
    sigma = args.sigma
    if args.target_epsilon is not None:
        try:
            sigma = fp.privacy.noise_multiplier_for(
                target_epsilon=args.target_epsilon, delta=args.delta, sample_rate=q,
                steps=total_steps, accountant=args.calibrate_accountant)
        except ValueError as e:
            fail(f"--target-epsilon: {e}")
        print(f"sigma = {sigma:.4f} spends epsilon <= {args.target_epsilon} "
              f"({args.calibrate_accountant.upper()}, delta = {args.delta:g}) "
              f"in {total_steps} steps")

    model = fp.functionalize(SampleConvNet())
    key = fp.random.key(args.seed)

    def loss_fn(params: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        return fp.losses.cross_entropy(model.apply({"params": params}, x), y)

    inner = (optim.sgd(args.lr, momentum=args.momentum or None) if args.optimizer == "sgd"
             else optim.adam(args.lr))
    trainer = fp.train.DPTrainer(
        loss_fn, inner, l2_norm_clip=args.max_grad_norm, noise_multiplier=sigma,
        sample_rate=q, expected_batch_size=q * n,
        max_physical_batch_size=args.max_physical_batch_size, method=args.method)
    params = fp.tree.to(model.init(fp.random.fold_in(key, INIT_STREAM), train[0][:1])["params"],
                        device)
    state = trainer.init(params, key, accountant="rdp")
    choices = os.path.join(args.out_dir, KERNEL_CHOICES)
    # NOTE [resume with the same run]: what a checkpoint's steps were taken with. The epsilon
    # reported is that of every step at this run's sigma and q, and the batches come from
    # --seed, so a resume that changed them (or the data, or --target-epsilon's sigma,
    # recalibrated for more epochs) would report a budget it did not spend: refused.
    run_meta = {"dp.sigma": repr(sigma), "dp.sample_rate": repr(q),
                "dp.steps_per_epoch": str(steps_per_epoch), "dp.num_train": str(n),
                "dp.max_grad_norm": repr(args.max_grad_norm), "dp.seed": str(args.seed),
                "dp.optimizer": args.optimizer, "dp.lr": repr(args.lr),
                "dp.momentum": repr(args.momentum), "dp.delta": repr(args.delta)}
    if args.resume:
        check_run_meta(files.manager.latest(), run_meta, _FLAGS,
                       " (the epsilon reported assumes every step ran with this run's settings)")
        state = files.manager.restore(device=device)
        print(f"resumed from step {int(state.step)} ({files.manager.latest()})")
        if os.path.exists(choices):  # the kernels the interrupted run measured: same bits
            with open(choices) as f:
                fp.transforms.set_kernel_choices(json.load(f))

    title = (f"DP-SGD MNIST: sigma {sigma:.3g}, C {args.max_grad_norm}, q {q}, "
             f"{args.optimizer} lr {args.lr}")
    rows = []
    if args.resume and os.path.exists(files.metrics):
        with open(files.metrics) as f:
            rows = [_read_row(json.loads(line)) for line in f if line.strip()]
    t_run = time.perf_counter()
    for epoch in range(int(state.step) // steps_per_epoch, args.epochs):
        batches = fp.data.poisson_batches(
            train, q, key=fp.random.fold_in(fp.random.fold_in(key, DATA_STREAM), epoch),
            num_batches=steps_per_epoch)
        bar = progress(batches, steps_per_epoch, 0, f"epoch {epoch + 1}/{args.epochs}",
                       args.no_progress)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        seen = torch.zeros((), device=device, dtype=torch.int64)
        t0 = time.perf_counter()
        for batch in bar:
            state, metrics = trainer.step(state, batch)
            loss_sum += metrics["loss"].double() * metrics["num_examples"]
            seen += metrics["num_examples"]
        epoch_time = time.perf_counter() - t0
        steps = int(state.step)
        eps = epsilons(sigma, q, steps, args.delta)
        record = {
            "epoch": epoch + 1, "step": steps, "sigma": sigma, "delta": args.delta,
            "train_loss": float(loss_sum) / max(1, int(seen)),
            **evaluate(lambda x, s=state: model.apply({"params": s.params}, x), test,
                       args.test_batch_size),
            **eps, "epoch_time_s": round(epoch_time, 2),
        }
        if not math.isfinite(record["train_loss"]):
            fail(f"non-finite train loss ({record['train_loss']}) in epoch {epoch + 1}: lower --lr "
                 "or -c; nothing saved for this epoch", status=1)
        files.manager.save(steps, state, metadata=run_meta)
        with open(choices, "w") as f:
            json.dump(fp.transforms.kernel_choices(), f, indent=1)
        append_jsonl(files.metrics, record)
        rows.append(record)
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, test accuracy "
              f"{100 * record['test_accuracy']:.2f}%, epsilon {_eps(eps['epsilon_rdp'])} (RDP) "
              f"{_eps(eps['epsilon_pld'])} (PLD) at delta {args.delta:g} ({epoch_time:.1f} s)",
              flush=True)
    summary = {"sigma": sigma, "sample_rate": q, "max_grad_norm": args.max_grad_norm,
               "optimizer": args.optimizer, "lr": args.lr, "epochs": args.epochs,
               "steps": int(state.step), "wall_time_s": round(time.perf_counter() - t_run, 1),
               **({k: rows[-1][k] for k in ("test_accuracy", "epsilon_rdp", "epsilon_pld")}
                  if rows else {})}
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        f.write(dumps_strict(summary, indent=1))  # an infinite epsilon as null
    if rows and not args.no_plot:
        plot(rows, os.path.join(args.out_dir, "accuracy_vs_epsilon.png"), title)
    if rows:
        print(f"final: test accuracy {100 * rows[-1]['test_accuracy']:.2f}% at epsilon "
              f"{_eps(rows[-1]['epsilon_rdp'])} (RDP) / {_eps(rows[-1]['epsilon_pld'])} (PLD), "
              f"sigma {sigma:.4f}; outputs in {args.out_dir}")
    return summary


if __name__ == "__main__":
    run_main(main)
