"""Drawing one Poisson-sampled batch: ``fp.data.poisson_batches`` against its tensor form
and Opacus' sampler.

A DP-SGD step starts by drawing its batch: each of the ``n`` examples joins with
probability ``q`` (expected batch 240 here, Opacus' MNIST setting), so the draw is
``O(n)`` whatever the batch. Rows, per batch (membership + gather of the rows), measured
in one process, interleaved, medians:

* ``fp.data.poisson_batches`` as it runs by default (eager CPU: NOTE [host fast path] and
  NOTE [bernoulli without its words] in ``fp.random._host``);
* the same call with the host form switched off: the tensor form that runs under
  ``vmap``/``torch.compile`` and on GPUs (the same batches);
* the CPU path before NOTE [bernoulli without its words]: the words hashed on the host
  (``fp.random.bits``), widened to int64, compared, then ``torch.nonzero`` (the same
  batches);
* Opacus' ``UniformWithReplacementSampler`` (``torch.rand(n) < q`` from a
  ``torch.Generator``, then the positions) when ``opacus`` is installed: the same
  distribution from torch's generator, not the same batches.

The data is ``(x, y)`` with ``x`` of shape ``(n, 4)``, so the gather is small and the
draw dominates.

    .venv/bin/python benchmarks/poisson_batches.py
    .venv/bin/python benchmarks/poisson_batches.py --sizes 60000 10000000 --rounds 9
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402

import functorch_pipeline as fp  # noqa: E402
from functorch_pipeline.random import _host  # noqa: E402

EXPECTED_BATCH = 240
DEFAULT = "fp.data.poisson_batches (default)"
TENSOR = "fp.data.poisson_batches, tensor form"
PREVIOUS = "previous CPU path: bits() < t, torch.nonzero"
OPACUS = "Opacus UniformWithReplacementSampler"


class _TensorForm:
    """A context in which ``fp.random`` takes its tensor form (the host form's switch off)."""

    def __enter__(self) -> None:
        self.saved = _host.eligible
        _host.eligible = lambda *tensors: False

    def __exit__(self, *exc: object) -> None:
        _host.eligible = self.saved


def candidates(n: int) -> dict[str, Callable[[], Any]]:
    q = EXPECTED_BATCH / n
    x, y = torch.randn(n, 4), torch.arange(n)
    key = fp.random.key(0)
    box = {"i": 0}

    def draw() -> Any:  # a new batch index each call: batch i of a long run
        box["i"] += 1
        return next(fp.data.poisson_batches((x, y), q, key=key, num_batches=box["i"] + 1,
                                            start=box["i"]))

    def tensor_form() -> Any:
        with _TensorForm():
            return draw()

    threshold = round(q * 2**32)

    def previous() -> Any:
        box["i"] += 1
        k = fp.random.fold_in(key, box["i"])
        idx = torch.nonzero(fp.random.bits(k, (n,)) < threshold).squeeze(1)
        return x.index_select(0, idx), y.index_select(0, idx)

    fns: dict[str, Callable[[], Any]] = {DEFAULT: draw, TENSOR: tensor_form, PREVIOUS: previous}
    with torch.no_grad():  # same batches both ways (the check, not timed)
        for i in (0, 1, 7):
            a = next(fp.data.poisson_batches((x, y), q, key=key, num_batches=i + 1, start=i))
            with _TensorForm():
                b = next(fp.data.poisson_batches((x, y), q, key=key, num_batches=i + 1, start=i))
            assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]), i
            box["i"] = i - 1
            assert torch.equal(previous()[1], a[1]), i
    print(f"  check n = {n:,}: default, tensor form and previous path draw the same batches")
    if _common.optional("opacus") is not None:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q,
                                                generator=torch.Generator().manual_seed(0))
        batches = iter(sampler)

        def opacus() -> Any:
            nonlocal batches
            try:
                idx = next(batches)
            except StopIteration:  # one epoch is 1 / q batches
                batches = iter(sampler)
                idx = next(batches)
            rows = torch.as_tensor(idx, dtype=torch.int64)
            return x.index_select(0, rows), y.index_select(0, rows)

        fns[OPACUS] = opacus
    else:
        print("  (opacus not installed: no Opacus row; pip install 'functorch-pipeline[bench]')")
    return fns


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[60_000, 1_000_000, 10_000_000],
                   help="dataset sizes n (q = 240 / n)")
    args = p.parse_args()
    if _common.begin(args):
        return
    for n in args.sizes:
        fns = candidates(n)
        stats = _common.measure(fns, args.rounds, warmup=2, budget_s=args.budget)
        baselines = {"previous": PREVIOUS, "tensor form": TENSOR}
        if OPACUS in fns:
            baselines["Opacus"] = OPACUS
        print(_common.table(stats, baselines, EXPECTED_BATCH,
                            f"\nOne Poisson batch, n = {n:,}, q = {EXPECTED_BATCH}/n "
                            f"(ratios: throughput, > 1 is faster than the column's row)"))


if __name__ == "__main__":
    main()
