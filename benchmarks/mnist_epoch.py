"""One epoch of real MNIST with the classic CNN: functional vs imperative, same run.

The functional side is exactly examples/mnist.py's step (functionalize -> value_and_grad
-> fp.optim -> apply_updates via fp.train.train_step, keyed dropout); the imperative side
is ``loss.backward()`` + ``torch.optim``. Both see the same preloaded batches in the same
order. The epoch is cut into chunks of --chunk batches and the two methods alternate
chunk by chunk (A B, B A, ...), so drift on a shared machine hits both alike; the epoch
time of each is the sum of its chunks, and the table also gives the median chunk ratio.

    python benchmarks/mnist_epoch.py --data-dir ../shared/data [--optimizer sgd|adam]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import functorch_pipeline as fp
from functorch_pipeline import optim

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
from common import evaluate  # noqa: E402
from models import Net  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    ap.add_argument("--chunk", type=int, default=25, help="batches per timed chunk")
    ap.add_argument("--limit", type=int, default=None, help="use the first N training examples")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    train = fp.data.mnist_tensors(args.data_dir, train=True)
    test = fp.data.mnist_tensors(args.data_dir, train=False)
    if args.limit:
        train = fp.tree.map(lambda a: a[: args.limit], train)
    key = fp.random.key(1)
    batches = list(fp.data.batches(train, args.batch_size, key=fp.random.fold_in(key, 0)))

    # the same initial weights for both
    net = Net()
    model = fp.functionalize(net)
    variables = model.init(fp.random.fold_in(key, 1), train[0][:1])
    imperative = Net()
    imperative.load_state_dict(model.to_state_dict(variables))
    imperative.train()
    if args.optimizer == "sgd":
        topt = torch.optim.SGD(imperative.parameters(), lr=0.01, momentum=0.5)
        opt = optim.sgd(0.01, momentum=0.5)
    else:
        topt = torch.optim.Adam(imperative.parameters(), lr=1e-3)
        opt = optim.adam(1e-3)
    state = fp.train.TrainState.create(variables["params"], opt.init(variables["params"]), key,
                                       buffers=variables["buffers"])

    def loss_fn(params, buffers, batch, k):
        x, y = batch
        out, new_buffers = model.apply({"params": params, "buffers": buffers}, x, train=True, key=k)
        return fp.losses.nll(out, y).mean(), new_buffers

    def run_functional(chunk):
        nonlocal state
        for b in chunk:
            state, _ = fp.train.train_step(state, b, loss_fn, opt)

    def run_imperative(chunk):
        for x, y in chunk:
            topt.zero_grad(set_to_none=True)
            F.nll_loss(imperative(x), y).backward()
            topt.step()

    chunks = [batches[i : i + args.chunk] for i in range(0, len(batches), args.chunk)]
    times = {"functional": [], "imperative": []}
    cpu = {"functional": [], "imperative": []}
    load0 = os.getloadavg()[0]
    for i, chunk in enumerate(chunks):
        order = [("functional", run_functional), ("imperative", run_imperative)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fn(chunk)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    acc_f = evaluate(lambda x: model.apply({"params": state.params, "buffers": state.buffers}, x), test, 1000,
                     log_probs=True)["test_accuracy"]
    imperative.eval()
    acc_i = evaluate(imperative, test, 1000, log_probs=True)["test_accuracy"]
    epoch = {k: sum(v) for k, v in times.items()}
    ratios = [f / i for f, i in zip(times["functional"], times["imperative"], strict=True)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{len(batches)} batches, optimizer {args.optimizer}, chunks of {args.chunk} interleaved")
    print(f"{'method':12s} {'epoch s':>9s} {'steps/s':>9s} {'test acc':>9s}")
    for name, acc in (("imperative", acc_i), ("functional", acc_f)):
        print(f"{name:12s} {epoch[name]:9.2f} {len(batches) / epoch[name]:9.1f} {100 * acc:8.2f}%")
    print(f"load average {load0:.2f} at start (shared cores); process CPU-time ratio "
          f"functional/imperative: {sum(cpu['functional']) / sum(cpu['imperative']):.3f}")
    print(f"epoch-time ratio functional/imperative: {epoch['functional'] / epoch['imperative']:.3f} "
          f"(median chunk ratio {statistics.median(ratios):.3f}; issue 13 target <= 1.05)")


if __name__ == "__main__":
    main()
