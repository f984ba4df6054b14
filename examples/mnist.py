"""The classic PyTorch MNIST example, in the functional style.

functionalize -> value_and_grad -> fp.optim -> fp.save, with exact resume.

    python examples/mnist.py                       # classic: SGD(0.01, 0.5), 10 epochs
    python examples/mnist.py --epochs 3 --model wide \
        --optimizer adam --lr 1e-3                 # >= 99% test accuracy
    python examples/mnist.py --resume              # continue the last run exactly
    python examples/mnist.py --jit                 # the train step under fp.jit
    torchrun --nproc_per_node 2 examples/mnist.py  # data parallel: 2 processes, same flags

Under torchrun, --batch-size is the global batch: each rank takes its share of every batch
(fp.distributed.shard), the gradients are averaged (fp.distributed.data_parallel; gloo on
CPUs, NCCL on GPUs) and dropout differs per rank (fp.distributed.rank_key). Every rank
holds the same state; rank 0 prints and writes --out-dir, rank r > 0 keeps a silent mirror
in <out-dir>.rank<r> so each rank resumes (--resume) from its own files.

--data-dir defaults to <repo>/../shared/data when that folder exists (found from this
file, not the current directory). Writes to --out-dir (default runs/mnist):
checkpoints/ (ckpt_<step>.safetensors, every --save-interval batches and at each epoch
end), metrics.jsonl (one line per epoch), steps.jsonl (the train loss of every step) and
curves.png (per-step and per-epoch losses, test accuracy), and prints where they went.

Exit status: 0 done; 2 a bad flag, a device this machine lacks, missing data, --resume
with nothing to resume, or an --out-dir holding another run (one line on stderr, checked
before any data is read); 1 the loss or parameters became non-finite (nothing
non-finite is saved); 130 Ctrl-C, which saves the current step and prints the command
that resumes it.
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
from common import ArgumentParser  # noqa: E402
from common import default_data_dir  # noqa: E402
from common import device_arg  # noqa: E402
from common import fail  # noqa: E402
from common import finite_positive_float  # noqa: E402
from common import fit  # noqa: E402
from common import load_mnist  # noqa: E402
from common import non_negative_float  # noqa: E402
from common import pick_device  # noqa: E402
from common import positive_int  # noqa: E402
from common import prepare_out_dir  # noqa: E402
from common import resume_command  # noqa: E402
from common import run_main  # noqa: E402
from common import seed_int  # noqa: E402
from models import Net  # noqa: E402
from models import WideNet  # noqa: E402

MODELS = {"classic": Net, "wide": WideNet}
# optimizers taking only a learning rate here; sgd also takes --momentum
OPTIMIZERS = ("adadelta", "adagrad", "adam", "adamax", "adamw", "lamb", "lion", "nadam", "radam",
              "rmsprop", "sgd")


def make_optimizer(name: str, lr: float, momentum: float,
                   schedule: Any) -> optim.GradientTransformation:
    lr_or_schedule = schedule if schedule is not None else lr
    if name == "sgd":
        return optim.sgd(lr_or_schedule, momentum=momentum or None)
    if name in OPTIMIZERS:
        return getattr(optim, name)(lr_or_schedule)
    raise ValueError(f"make_optimizer: unknown optimizer {name!r}; "
                     f"choose from {', '.join(OPTIMIZERS)}")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="mnist.py", description="Functional MNIST with functorch_pipeline")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch size")
    p.add_argument("--test-batch-size", type=positive_int, default=1000, help="test batch size")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs to train (in total, "
                   "counting the epochs a resumed run already did)")
    p.add_argument("--lr", type=finite_positive_float, default=0.01, help="learning rate")
    p.add_argument("--momentum", type=non_negative_float, default=0.5,
                   help="SGD momentum (0: none)")
    p.add_argument("--gamma", type=finite_positive_float, default=1.0,
                   help="learning-rate decay per epoch (1.0: none)")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                   help="optimizer from fp.optim (sgd uses --momentum)")
    p.add_argument("--model", default="classic", choices=sorted(MODELS), help="network")
    p.add_argument("--no-cuda", action="store_true", help="disable CUDA even when available")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda, cuda:1, mps, ... (default: CUDA if available, else CPU)")
    p.add_argument("--seed", type=seed_int, default=1, help="random seed (-2**63 <= seed < 2**63)")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="dataset root holding MNIST/raw/ (torchvision layout)")
    p.add_argument("--out-dir", default="runs/mnist",
                   help="where checkpoints/, metrics.jsonl, steps.jsonl and curves.png go")
    p.add_argument("--save-interval", type=positive_int, default=10,
                   help="batches between checkpoints")
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out-dir "
                   "(an error if there is none)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out-dir and start over")
    p.add_argument("--log-interval", type=positive_int, default=10,
                   help="batches between loss checks and progress-bar updates")
    p.add_argument("--limit-train", type=positive_int, default=None,
                   help="use only the first N training examples (default: all)")
    p.add_argument("--limit-test", type=positive_int, default=None,
                   help="use only the first N test examples (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    p.add_argument("--jit", action="store_true",
                   help="compile the train step with fp.jit (torch.compile); prints the cold "
                   "compile time (default: eager)")
    p.add_argument("--jit-backend", default="inductor",
                   help="torch.compile backend for --jit (eager: no code generation, for tests)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    distributed = fp.distributed.initialize()  # True under torchrun
    rank, world = fp.distributed.rank(), fp.distributed.world_size()
    if rank > 0:  # the same state as rank 0: a silent mirror of its files
        args.out_dir = f"{args.out_dir.rstrip(os.sep)}.rank{rank}"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    torch.manual_seed(args.seed)  # only torch internals; all our randomness is keyed
    device = pick_device(args.device, args.no_cuda)
    key = fp.random.key(args.seed, device=device)
    prepare_out_dir(args.out_dir, args.resume, args.overwrite, args.keep)  # before reading data
    train, test = load_mnist(args.data_dir, device, args.limit_train, args.limit_test)
    n_train = train[0].shape[0]
    steps_per_epoch = fp.data.num_batches(n_train, args.batch_size)
    if args.batch_size % world or (n_train % args.batch_size) % world:
        fail(f"--batch-size {args.batch_size} (and the last batch, {n_train % args.batch_size} of "
             f"{n_train} examples) must split evenly over {world} ranks")

    model = fp.functionalize(MODELS[args.model]())
    variables = fp.tree.to(model.init(fp.random.fold_in(key, 1), train[0][:1]), device)
    schedule = None
    if args.gamma != 1.0:
        schedule = optim.exponential_decay(args.lr, steps_per_epoch, args.gamma, staircase=True)
    opt = make_optimizer(args.optimizer, args.lr, args.momentum, schedule)
    if distributed:  # average the gradients over ranks; the optimizer state is unchanged
        opt = fp.distributed.data_parallel(opt)

    state = fp.train.TrainState.create(
        variables["params"], opt.init(variables["params"]), key, buffers=variables["buffers"]
    )
    def loss_fn(params: Any, buffers: Any, batch: Any, key: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x, y = fp.distributed.shard(batch) if distributed else batch  # this rank's share
        key = fp.distributed.rank_key(key) if distributed else key  # other dropout per rank
        out, new_buffers = model.apply({"params": params, "buffers": buffers}, x, train=True, key=key)
        return fp.losses.nll(out, y).mean(), new_buffers

    state, history = fit(
        model, state, loss_fn, opt, train, test, epochs=args.epochs, batch_size=args.batch_size,
        test_batch_size=args.test_batch_size, out_dir=args.out_dir, save_interval=args.save_interval,
        keep=args.keep, resume=args.resume, log_probs=True, log_interval=args.log_interval,
        no_progress=args.no_progress, title="functorch_pipeline MNIST", plot=not args.no_plot,
        overwrite=args.overwrite, resume_hint=resume_command(__file__, argv), jit=args.jit,
        jit_backend=args.jit_backend)
    return {"history": history, "state": state}


if __name__ == "__main__":
    run_main(main)
