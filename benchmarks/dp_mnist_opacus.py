"""Opacus' own DP-SGD MNIST run, on the same data and network as ``examples/dp_mnist.py``.

The peer row for issue 10's accuracy table: Opacus' ``PrivacyEngine.make_private`` with
Poisson sampling, exactly as Opacus' ``examples/mnist.py`` trains (SampleConvNet, SGD
without momentum, ``nn.CrossEntropyLoss`` mean, clip ``C``, noise ``sigma``, expected batch
``q * 60000``), one fresh model per seed, final test accuracy per run, then mean and
standard deviation. It tells whether a gap between our reproduction and Opacus' published
94.63% +- 0.34 is ours or the published row's: both runs see the same images, normalised
the same way (``fp.data.mnist_tensors``), on this machine's torch.

Needs ``opacus`` (the ``bench`` extra) and real MNIST under ``--data-dir``.

    .venv/bin/python benchmarks/dp_mnist_opacus.py --seeds 1 2 3 --threads 1 --out runs/opacus.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))

import _common  # noqa: E402
from common import evaluate  # noqa: E402
from dp_mnist import SampleConvNet  # noqa: E402

import functorch_pipeline as fp  # noqa: E402


def run(seed: int, args: argparse.Namespace, train: tuple, test: tuple) -> dict:
    """One Opacus training run; returns its final test accuracy and epsilon."""
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    model = SampleConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0)
    loader = DataLoader(TensorDataset(*train), batch_size=round(args.sample_rate * len(train[0])))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=args.sigma,
        max_grad_norm=args.max_grad_norm, poisson_sampling=True)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    accuracy = evaluate(model, test, 1000)["test_accuracy"]  # as examples/dp_mnist.py scores
    return {"seed": seed, "test_accuracy": accuracy,
            "epsilon_rdp": engine.get_epsilon(args.delta), "wall_time_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--sample-rate", type=float, default=0.004)
    p.add_argument("--sigma", type=float, default=1.3)
    p.add_argument("--max-grad-norm", type=float, default=1.5)
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      os.pardir, os.pardir, "shared", "data"))
    p.add_argument("--out", default=None, help="append one JSON line per run here")
    args = p.parse_args()
    if _common.optional("opacus") is None:
        sys.exit("dp_mnist_opacus.py needs opacus: pip install 'functorch-pipeline[bench]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    train = fp.data.mnist_tensors(args.data_dir, train=True)
    test = fp.data.mnist_tensors(args.data_dir, train=False)
    accs = []
    for seed in args.seeds:
        row = run(seed, args, train, test)
        accs.append(100 * row["test_accuracy"])
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    if len(accs) > 1:
        print(f"Opacus, {len(accs)} runs: {statistics.mean(accs):.2f} +- "
              f"{statistics.stdev(accs):.2f} (min {min(accs):.2f}, max {max(accs):.2f})")


if __name__ == "__main__":
    main()
