"""The kernels behind per-example conv weight gradients, against the batch weight gradient.

Per-sample gradients and ghost clipping of a conv net spend most of their extra time in
each example's conv weight gradient (NOTE [grouped weight gradients on CPU] in
``_grad_sample/_rules``). This script times, for the classic MNIST CNN's two convs at
batch 256, every way this library has (or tried) of computing it, against mkldnn's
*batch* weight gradient (the yardstick: what a plain batch gradient pays for that layer),
interleaved in one process, plus ``fp.random.normal`` (the DP noise draw) against
``torch.randn``, against the same draw in the tensor form (what ``vmap``/``compile``
and other devices run; the default on CPU is the host form, NOTE [host fast path] in
``fp.random._host``) and against the int64 form of the same hash; and the DP step's own
draw (``normal`` of the key folded with the step counter and a chunk index) made with
public calls against ``add_dp_noise``'s path, which folds the keys as host integers.

    .venv/bin/python benchmarks/per_example_conv.py --threads 1
    .venv/bin/python benchmarks/per_example_conv.py            # torch's default threads
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402

import functorch_pipeline as fp  # noqa: E402
from functorch_pipeline.random import _core as random_core  # noqa: E402
from functorch_pipeline.random import _host as random_host  # noqa: E402
from functorch_pipeline.transforms._grad_sample._ghost_math import conv_patches  # noqa: E402
from functorch_pipeline.transforms._grad_sample._rules import conv_weight_grouped  # noqa: E402

# (input channels, output channels, input side, kernel) of per_sample_cnn.Net's convs.
LAYERS = {"conv1 (1->10, k5, 28x28)": (1, 10, 28, 5), "conv2 (10->20, k5, 12x12)": (10, 20, 12, 5)}


def conv_candidates(batch: int, cin: int, cout: int, side: int, k: int) -> dict:
    torch.manual_seed(0)
    out = side - k + 1
    x, g = torch.randn(batch, cin, side, side), torch.randn(batch, cout, out, out)
    w = torch.randn(cout, cin, k, k)
    geometry = ((k, k), (1, 1), [0, 0, 0, 0], (1, 1), 1)

    def batch_wgrad() -> None:
        torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [0, 0], [1, 1], False,
                                            [0, 0], 1, [False, True, False])

    def grouped_backward() -> None:
        weight = x.new_empty(batch * cout, cin, k, k)
        torch.ops.aten.convolution_backward(
            g.reshape(1, batch * cout, out, out), x.reshape(1, batch * cin, side, side), weight,
            None, [1, 1], [0, 0], [1, 1], False, [0, 0], batch, [False, True, False])

    def grouped_forward() -> None:
        F.conv2d(x.transpose(0, 1), g.reshape(batch * cout, 1, out, out), None, 1, 0, 1, batch)

    def patches_bmm() -> None:  # the float64 / non-CPU path (NOTE [per-example conv gradients])
        g.reshape(batch, 1, cout, -1) @ conv_patches(x, geometry).mT

    return {"batch weight gradient (yardstick)": batch_wgrad,
            "library default (conv_weight_grouped)": lambda: conv_weight_grouped(x, g, *geometry),
            "grouped backward (mkldnn)": grouped_backward,
            "grouped forward (channels as batch)": grouped_forward,
            "input patches + bmm": patches_bmm}


def noise_candidates(n: int) -> dict:
    key = fp.random.key(0)

    def int64_reference() -> None:  # the same words from the int64 form of the hash
        ks = fp.random.fold_in(key, torch.tensor([1, 2]))
        counter = torch.arange(n, dtype=torch.int64)
        w = random_core._hash2(ks[:, 0:1], ks[:, 1:2], counter)
        u = (w >> 8).to(torch.float32) * (1.0 / 16777216.0)
        torch.sqrt(-2.0 * torch.log(1.0 - u[0])) * torch.cos(6.283185307179586 * u[1])

    def tensor_form() -> None:  # the same numbers, host form switched off
        eligible = random_host.eligible
        random_host.eligible = lambda *tensors: False
        try:
            fp.random.normal(key, (n,))
        finally:
            random_host.eligible = eligible

    step = torch.tensor(7, dtype=torch.int32)  # a DP state's step counter

    def noise_keyed() -> None:  # the DP noise as public calls: two key tensors made first
        fp.random.normal(fp.random.fold_in(fp.random.fold_in(key, step), 0), (n,))

    return {"torch.randn (yardstick, unkeyed)": lambda: torch.randn(n),
            "fp.random.normal (default)": lambda: fp.random.normal(key, (n,)),
            "DP noise: normal(fold_in(fold_in(key, step), 0))": noise_keyed,
            "same, keys folded as host ints (add_dp_noise)":
                lambda: random_core._normal_folded(key, (step, 0), (n,)),
            "same draw, tensor form (int32 hash)": tensor_form,
            "same draw, int64 hash": int64_reference}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sizes", default="21840,262144", help="noise draw sizes (entries)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(_common.environment())
    for name, (cin, cout, side, k) in LAYERS.items():
        fns = conv_candidates(args.batch, cin, cout, side, k)
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget)
        yard = "batch weight gradient (yardstick)"
        print(_common.table(stats, {"yardstick": yard}, args.batch,
                            f"\nper-example weight gradients, {name}, batch {args.batch}"))
    for n in (int(s) for s in args.sizes.split(",")):
        fns = noise_candidates(n)
        stats = _common.measure(fns, rounds=max(args.rounds, 30), budget_s=args.budget)
        print(_common.table(stats, {"randn": "torch.randn (yardstick, unkeyed)"}, n,
                            f"\nnormal draws of {n:,} float32 entries (ex/s = entries/s)"))


if __name__ == "__main__":
    main()
