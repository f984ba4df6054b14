"""The classic PyTorch MNIST example, in the functional style.

functionalize -> value_and_grad -> fp.optim -> fp.save, with exact resume.

    python examples/mnist.py --data-dir ../shared/data                 # classic: SGD(0.01, 0.5), 10 epochs
    python examples/mnist.py --data-dir ../shared/data --epochs 3 --model wide \
        --optimizer adam --lr 1e-3                                      # >= 99% test accuracy
    python examples/mnist.py --data-dir ../shared/data --resume         # continue the last run exactly

Writes to --out-dir (default runs/mnist): checkpoints (ckpt_<step>.safetensors, every
--save-interval batches and at each epoch end), metrics.jsonl (one line per epoch) and
curves.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

import functorch_pipeline as fp
from functorch_pipeline import optim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fit  # noqa: E402
from common import load_mnist  # noqa: E402
from common import pick_device  # noqa: E402
from models import Net  # noqa: E402
from models import WideNet  # noqa: E402

MODELS = {"classic": Net, "wide": WideNet}


def make_optimizer(name: str, lr: float, momentum: float, schedule: Any) -> optim.GradientTransformation:
    lr_or_schedule = schedule if schedule is not None else lr
    if name == "sgd":
        return optim.sgd(lr_or_schedule, momentum=momentum or None)
    if name in ("adam", "adamw", "nadam", "radam", "adamax", "lamb", "lion", "adagrad", "adadelta", "rmsprop"):
        return getattr(optim, name)(lr_or_schedule)
    raise SystemExit(f"unknown --optimizer {name!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Functional MNIST with functorch_pipeline")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    p.add_argument("--test-batch-size", type=int, default=1000, help="test batch size (default: 1000)")
    p.add_argument("--epochs", type=int, default=10, help="epochs to train (default: 10)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default: 0.01)")
    p.add_argument("--momentum", type=float, default=0.5, help="SGD momentum (default: 0.5)")
    p.add_argument("--gamma", type=float, default=1.0, help="learning-rate decay per epoch (default: 1.0, none)")
    p.add_argument("--optimizer", default="sgd", help="sgd (uses --momentum), adam, adamw, adadelta, ...")
    p.add_argument("--model", default="classic", choices=sorted(MODELS), help="network (default: classic)")
    p.add_argument("--no-cuda", action="store_true", help="disable CUDA even when available")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if available)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    p.add_argument("--data-dir", default="../shared/data", help="dataset root (torchvision layout)")
    p.add_argument("--out-dir", default="runs/mnist", help="checkpoints, metrics.jsonl, curves.png")
    p.add_argument("--save-interval", type=int, default=10, help="batches between checkpoints (default: 10)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default: 3)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    p.add_argument("--log-interval", type=int, default=10, help="batches between progress-bar loss updates")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test examples")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # only torch internals; all our randomness is keyed
    device = pick_device(args.device, args.no_cuda)
    train, test = load_mnist(args.data_dir, device, args.limit_train, args.limit_test)
    n_train = train[0].shape[0]
    steps_per_epoch = fp.data.num_batches(n_train, args.batch_size)

    model = fp.functionalize(MODELS[args.model]())
    key = fp.random.key(args.seed, device=device)
    variables = fp.tree.to(model.init(fp.random.fold_in(key, 1), train[0][:1]), device)
    schedule = None
    if args.gamma != 1.0:
        schedule = optim.exponential_decay(args.lr, steps_per_epoch, args.gamma, staircase=True)
    opt = make_optimizer(args.optimizer, args.lr, args.momentum, schedule)

    state = fp.train.TrainState.create(
        variables["params"], opt.init(variables["params"]), key, buffers=variables["buffers"]
    )
    def loss_fn(params: Any, buffers: Any, batch: Any, key: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x, y = batch
        out, new_buffers = model.apply({"params": params, "buffers": buffers}, x, train=True, key=key)
        return fp.losses.nll(out, y).mean(), new_buffers

    state, history = fit(
        model, state, loss_fn, opt, train, test, epochs=args.epochs, batch_size=args.batch_size,
        test_batch_size=args.test_batch_size, out_dir=args.out_dir, save_interval=args.save_interval,
        keep=args.keep, resume=args.resume, log_probs=True, log_interval=args.log_interval,
        no_progress=args.no_progress, title="functorch_pipeline MNIST", plot=not args.no_plot)
    return {"history": history, "state": state}


if __name__ == "__main__":
    main()
