"""Kernel choice by measurement: which of several ways of computing the same tensor is kept
for a layer's geometry, timed once per process on the call's own inputs.

# NOTE [measured kernel choice]
On CPU in float32 a conv's per-example weight gradients have three kernels: mkldnn's
grouped weight-gradient kernel with one group per example (NOTE [grouped weight gradients
on CPU] in ``_rules``), the patch matmul (NOTE [per-example conv weight gradients]) and the
patch matmul over the input with its channels last (NOTE [channels-last patches], added
later: on the Intel machine below it takes the MNIST CNN's conv2, 3.1 against 4.5 ms,
and not its one-channel conv1). Which is fastest depends on the machine and on the
layer, by up to 3x either way. On the 2-core AMD
EPYC machines earlier measurements were made on, the grouped kernel won on the layers
timed (it became the only float32 kernel then). On a 2-core Intel Xeon (AVX-512), medians
of 5 x 7 calls at 2 threads, patch time over grouped time (ad hoc grid, 24 layers, torch
2.14.1):

* 0.52 for the MNIST CNN's conv1 (1 -> 10, 5x5 on 28x28, batch 256: 1.41 against 2.68 ms),
  0.81 for its conv2 (10 -> 20 on 12x12);
* 0.32-0.36 for 64 -> 128 and 128 -> 128 3x3 layers on 8x8 (4.7 against 14.7 ms),
  0.38-0.68 for 1-4 input channels at stride 1;
* but 1.3-2.5 for every stride-2 layer, and for 8 -> 16 on 32x32, 16 -> 16 on 8x8,
  32 -> 32 on 14x14 and 64 -> 64 on 16x16.

No rule of shapes fits both machines, so :func:`pick` measures: the first time a geometry
(``key``) is met, the candidates run :data:`WARMUP` times untimed (oneDNN creates its
kernels on a first call: 40-70 ms for the MNIST CNN's conv1, then 3-5 ms; the first touch
of fresh memory) and then alternately :data:`ROUNDS` times on the call's own inputs, and
the one whose time over the default's, in the median over rounds (each round's runs are
back to back, under the same load), is the smallest below :data:`MARGIN` is kept (the
default on a tie: :data:`MARGIN` is 1). The choice holds for that geometry for the rest
of the process. Every call of a geometry, the first included, returns the chosen kernel's
own result (the measuring call runs it once more after deciding, and holds one result at
a time, so its peak memory is that of one call), so a process gives the same bits on
every call. The kernels sum in different orders: their results differ at float32
rounding (~1e-7 relative). A layer whose two kernels run within
the machine's noise of each other can be given the other kernel in another process: the
MNIST CNN's conv2 (patches 0.82-0.97 of grouped by the ratio of minima, 8 fresh
processes on this busy 2-core machine) took the grouped kernel in 3 of 12 fresh processes
with a 0.9 margin on minima after one untimed run, 2 of 12 with no margin, 1 of 12 (both
convs) with the median of ratios, and 0 of 16 with two untimed runs (ad hoc; a margin only
moves where flips happen, and a near-tie costs little speed either way);
``fp.transforms.kernel_choices()`` lists what this process chose, and
``fp.transforms.set_kernel_choices`` fixes it (a resumed run that must be bit-identical to
an interrupted one across processes passes it the interrupted run's choices). Inside ``torch.compile`` tracing, or with tensors a
``torch.func`` transform wraps, the default runs without measuring.

The per-sample MNIST CNN at batch 256 on the Intel machine (``/tmp`` A/B script,
interleaved medians of 40): ``per_sample_grads`` went from 0.763x to 0.825x the batch
gradient, and the DP step from 0.770x to 0.808x the non-private step, with both convs
on the patch matmul.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import TypeVar

import torch

from functorch_pipeline.random import _host

__all__ = ["KERNELS", "MARGIN", "ROUNDS", "WARMUP", "kernel_choices", "pick", "set_kernel_choices"]

T = TypeVar("T")

WARMUP = 2  # untimed runs of each candidate at a geometry's first call
ROUNDS = 5  # then timed runs of each
MARGIN = 1.0  # another kernel replaces the default when faster by this factor
KERNELS = ("grouped", "patches", "channels_last")  # the names a choice may take
_CHOSEN: dict[str, str] = {}


def kernel_choices() -> dict[str, str]:
    """The kernel this process chose for each layer geometry it has met.

    Per-example conv weight gradients in float32 on CPU (``per_sample_grads``,
    ``clipped_grad``, ``DPTrainer``) have three kernels, mkldnn's grouped kernel
    (``"grouped"``), a patch matmul (``"patches"``) and a patch matmul over the input
    with its channels last (``"channels_last"``), and which is fastest depends on the
    machine and the layer, by up to 3x either way. The first time a geometry runs, each is
    timed on its inputs (five runs each, after two untimed) and the fastest is kept (on a
    tie, ``"grouped"``); the choice then holds for the rest of the process.

    Returns:
      A new dict from a geometry's description (batch-size bucket, shapes, kernel,
      stride, padding, dilation, groups, dtype, threads) to a name in :data:`KERNELS`;
      JSON-serialisable, for :func:`set_kernel_choices` in another process.

    Example:
      >>> import json
      >>> import functorch_pipeline as fp
      >>> table = fp.transforms.kernel_choices()
      >>> json.loads(json.dumps(table)) == table
      True
    """
    return dict(_CHOSEN)


def set_kernel_choices(table: Mapping[str, str] | None) -> None:
    """Fix the kernel for layer geometries, so that a process runs what another chose.

    The kernels sum in different orders, so their float32 results differ in the last
    bits; a run resumed in a new process is bit-identical to an uninterrupted one when it
    runs the same kernels. Save :func:`kernel_choices` beside the checkpoint and pass it
    here before resuming. Geometries not in ``table`` are still measured when first met.

    Args:
      table: from :func:`kernel_choices`; ``None`` forgets every choice (each geometry is
        measured again when next met).

    Returns:
      None.

    Raises:
      TypeError: ``table`` is not a mapping of str to str.
      ValueError: a choice that is not in :data:`KERNELS`.

    Example:
      >>> import functorch_pipeline as fp
      >>> saved = fp.transforms.kernel_choices()
      >>> fp.transforms.set_kernel_choices(saved)
      >>> fp.transforms.kernel_choices() == saved
      True
    """
    fn = "set_kernel_choices(table)"
    if table is None:
        _CHOSEN.clear()
        return
    if not isinstance(table, Mapping):
        raise TypeError(f"{fn}: `table` must be a mapping from kernel_choices(), got {type(table).__name__}")
    for key, name in table.items():
        if not isinstance(key, str):
            raise TypeError(f"{fn}: keys are geometry descriptions (str), got {key!r}")
        if name not in KERNELS:
            raise ValueError(f"{fn}: table[{key!r}] must be one of {KERNELS}, got {name!r}")
    _CHOSEN.update(table)


def pick(key: str, default: str, candidates: Mapping[str, Callable[[], T]],
         inputs: tuple[torch.Tensor, ...] = (),
         clock: Callable[[], float] = time.perf_counter) -> T:
    """Run the kernel kept for ``key``, measuring the candidates first if ``key`` is new.

    Args:
      key: the geometry's description: calls with equal keys run the same kernel.
      default: the name of the kernel kept on a tie (and when measuring is not possible).
      candidates: name -> a call computing the result; all give the same values.
      inputs: the tensors the candidates read (measured only as plain CPU tensors in
        eager code: ``fp.random``'s test for its host fast path).
      clock: the timer (tests pass a fake one).

    Returns:
      The result of the kept kernel.

    Example:
      >>> pick("doc: a tie", "grouped", {"grouped": lambda: 1, "patches": lambda: 1})
      1
      >>> kernel_choices()["doc: a tie"] in KERNELS
      True
    """
    name = _CHOSEN.get(key)
    if name is not None:
        return candidates[name]()
    if len(candidates) == 1 or not _host.eligible(*inputs):  # eager CPU, nothing traced
        return candidates[default]()
    times: dict[str, list[float]] = {n: [] for n in candidates}
    for _ in range(WARMUP):  # untimed: kernel creation (oneDNN's JIT), first touch of memory
        for f in candidates.values():
            f()
    for _ in range(ROUNDS):
        for n, f in candidates.items():
            start = clock()
            out = f()
            times[n].append(clock() - start)
            del out  # one result alive at a time: the measuring call's peak memory is a call's
    # Each round's candidates run back to back, under the same load: the median over rounds
    # of each one's time over the default's is steadier than the ratio of two minima.
    ratio = {n: statistics.median(t / max(d, 1e-12) for t, d in zip(ts, times[default], strict=True))
             for n, ts in times.items() if n != default}
    name = min(ratio, key=ratio.__getitem__)  # ratio has an entry: two candidates at least
    if ratio[name] >= MARGIN:
        name = default
    _CHOSEN[key] = name
    return candidates[name]()
