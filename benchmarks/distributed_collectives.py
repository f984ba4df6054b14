"""fp.distributed collectives on gloo, 2 local ranks (1 thread each), against raw c10d.

Rows (each rank times them interleaved, A B A B, with ``_common.measure``; rank 0 prints
medians and ratios):

* ``psum`` of a 10M-parameter float32 gradient tree (20 leaves) vs ONE flat in-place
  ``torch.distributed.all_reduce`` of the same bytes (target: fp <= 1.2x the flat call);
* ``psum`` of 100-leaf trees vs one ``all_reduce`` per leaf (target: fp >= 3x faster);
* sharded optimizer state (``fp.distributed.shard_optimizer(adam)``) vs replicated data
  parallel Adam (``data_parallel(adam)``) on a 10M-parameter tree: per-rank state bytes and
  step time;
* with ``--mnist``: one data-parallel epoch of the classic MNIST CNN (global batch 64,
  SGD) on 2 ranks vs 1 rank, each rank one thread, alternating 1-rank and 2-rank runs
  in fresh process groups; scaling efficiency = t(1 rank) / (2 * t(2 ranks)).

    python benchmarks/distributed_collectives.py [--rounds 15] [--mnist --limit-train 20000]

The machine's cores are shared with other jobs: compare ratios, not absolute times.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import functorch_pipeline as fp  # noqa: E402
from functorch_pipeline import distributed as fpd  # noqa: E402


def _collectives(rank: int, rounds: int) -> str:
    big = {f"layer{i}": torch.randn(500_000) for i in range(20)}  # 10M float32, 40 MB
    flat = torch.randn(10_000_000)
    rows = {
        "psum 10M (20 leaves)": lambda: fpd.psum(big),
        "flat all_reduce 10M": lambda: dist.all_reduce(flat),
    }
    trees = {size: {f"p{i:03d}": torch.randn(size) for i in range(100)} for size in (1_000, 10_000)}
    for size, tree in trees.items():
        leaves = fp.tree.leaves(tree)
        rows[f"psum 100 leaves x {size}"] = lambda t=tree: fpd.psum(t)
        rows[f"per-leaf all_reduce 100 x {size}"] = lambda ls=leaves: [
            dist.all_reduce(x) for x in ls
        ]
    # NOTE: no time budget: both ranks must make the same calls in the same order.
    stats = _common.measure(rows, rounds=rounds, warmup=3)
    if rank != 0:
        return ""
    out = [
        _common.table(
            {k: stats[k] for k in list(rows)[:2]},
            {"flat": "flat all_reduce 10M"},
            10_000_000,
            "psum of a 10M-parameter tree vs one flat all_reduce (ex/s = parameters/s)",
        )
    ]
    for size in trees:
        keys = [f"psum 100 leaves x {size}", f"per-leaf all_reduce 100 x {size}"]
        out.append(
            _common.table(
                {k: stats[k] for k in keys},
                {"per-leaf": keys[1]},
                100 * size,
                f"100-leaf tree of {100 * size:,} parameters",
            )
        )
    return "\n\n".join(out)


def _zero(rank: int, rounds: int) -> str:
    from functorch_pipeline import optim

    params = {f"layer{i}": torch.randn(500_000) for i in range(20)}
    grads = fp.tree.map(lambda x: torch.randn_like(x) * 1e-3, params)
    sharded = fpd.shard_optimizer(optim.adam(1e-3))
    replicated = fpd.data_parallel(optim.adam(1e-3))
    states = {"sharded": sharded.init(params), "replicated": replicated.init(params)}

    def step(name: str, opt: object) -> None:
        updates, states[name] = opt.update(grads, states[name], params)

    stats = _common.measure(
        {
            "zero step (shard_optimizer adam)": lambda: step("sharded", sharded),
            "replicated step (data_parallel adam)": lambda: step("replicated", replicated),
        },
        rounds=rounds,
        warmup=2,
    )
    if rank != 0:
        return ""
    b_s, b_r = fp.tree.nbytes(states["sharded"]), fp.tree.nbytes(states["replicated"])
    return (
        _common.table(
            stats,
            {"replicated": "replicated step (data_parallel adam)"},
            10_000_000,
            "Adam on a 10M-parameter tree, 2 ranks (ex/s = parameters/s)",
        )
        + f"\nper-rank optimizer state: sharded {b_s / 2**20:.1f} MiB, replicated "
        f"{b_r / 2**20:.1f} MiB (ratio {b_s / b_r:.3f})"
    )


def _epoch(rank: int, data_dir: str, limit: int, batch: int) -> float:
    from models import Net

    from functorch_pipeline import optim

    x, y = fp.data.mnist_tensors(data_dir, train=True)
    x, y = x[:limit], y[:limit]
    model = fp.functionalize(Net())
    key = fp.distributed.shared_key(fp.random.key(0))
    variables = model.init(fp.random.fold_in(key, 1), x[:1])
    params = variables["params"]
    opt = optim.chain(
        *([fpd.pmean_gradients()] if fpd.world_size() > 1 else []), optim.sgd(0.01, momentum=0.5)
    )
    state = opt.init(params)

    def loss_fn(p, xb, yb, k):
        out, _ = model.apply({"params": p, "buffers": variables["buffers"]}, xb, train=True, key=k)
        return fp.losses.nll(out, yb).mean()

    grad = fp.grad(loss_fn)
    fpd.barrier()
    start = time.perf_counter()
    for step, (xb, yb) in enumerate(fp.data.batches((x, y), batch, key=key)):
        xb, yb = fpd.shard((xb, yb))
        g = grad(params, xb, yb, fpd.rank_key(fp.random.fold_in(key, step)))
        updates, state = opt.update(g, state, params)
        params = optim.apply_updates(params, updates)
    fpd.barrier()
    return time.perf_counter() - start


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--mnist", action="store_true", help="also time a data-parallel MNIST epoch, 1 vs 2 ranks"
    )
    p.add_argument(
        "--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
    )
    p.add_argument("--limit-train", type=int, default=60_000, help="training examples per epoch")
    p.add_argument("--pairs", type=int, default=3, help="1-rank/2-rank epoch pairs (alternating)")
    args = p.parse_args()
    print(_common.environment().replace(f"{torch.get_num_threads()} threads", "1 thread per rank"))
    print(fpd.spawn(_collectives, 2, args.rounds, timeout_s=900)[0])
    print()
    print(fpd.spawn(_zero, 2, max(5, args.rounds // 2), timeout_s=900)[0])
    if args.mnist:
        one, two = [], []
        for _ in range(args.pairs):
            one.append(fpd.spawn(_epoch, 1, args.data_dir, args.limit_train, 64, timeout_s=1800)[0])
            two.append(fpd.spawn(_epoch, 2, args.data_dir, args.limit_train, 64, timeout_s=1800)[0])
        t1, t2 = statistics.median(one), statistics.median(two)
        print(
            f"\nMNIST data-parallel epoch ({args.limit_train} examples, global batch 64, "
            f"classic CNN, SGD), 1 thread per rank, {args.pairs} alternating pairs"
        )
        print(
            "| ranks | median s | all runs s |\n|---|---|---|\n"
            f"| 1 | {t1:.2f} | {', '.join(f'{t:.2f}' for t in one)} |\n"
            f"| 2 | {t2:.2f} | {', '.join(f'{t:.2f}' for t in two)} |"
        )
        print(f"speed-up {t1 / t2:.2f}x, scaling efficiency {t1 / (2 * t2):.0%}")


if __name__ == "__main__":
    main()
