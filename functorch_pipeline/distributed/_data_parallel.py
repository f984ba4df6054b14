"""Data parallelism: each rank takes its share of a global batch and the gradients are
averaged, so N ranks follow the trajectory of one process with the whole batch.

# NOTE [N ranks = one process]
Every rank draws the same global batch (same data key), keeps the contiguous block
``[r * B/N, (r + 1) * B/N)`` (:func:`shard`) and computes the mean loss over it. The mean
of the N block means is the global mean when the blocks are equal, so ``pmean`` of the
gradients is the one-process gradient, and any optimizer (clipping included) then sees
the same numbers on every rank, up to summation order. Randomness tied to examples
(dropout) must come from keys of the *global* example index (``fold_in(key, i)`` with
``i`` from ``shard(torch.arange(B))``), not from one key per rank.
"""

from __future__ import annotations

from typing import Any

import torch

from functorch_pipeline import optim
from functorch_pipeline import tree as fpt
from functorch_pipeline.data import poisson_mask
from functorch_pipeline.distributed._collectives import pmean
from functorch_pipeline.distributed._collectives import psum
from functorch_pipeline.distributed._runtime import rank
from functorch_pipeline.distributed._runtime import world_size
from functorch_pipeline.optim._privacy import _batch_size
from functorch_pipeline.optim._privacy import _memo
from functorch_pipeline.optim._privacy import _shapes

__all__ = [
    "data_parallel",
    "differentially_private_aggregate",
    "pmean_gradients",
    "poisson_indices",
    "shard",
]


def shard(tree: Any, *, axis: int = 0, group: Any = None) -> Any:
    """This rank's contiguous share of every leaf along ``axis`` (NOTE [N ranks = one process]).

    No communication. Without a process group (one process) the tree comes back whole.

    Args:
      tree: a pytree of tensors holding the global batch (the same on every rank).
      axis: the batch axis; its length must be divisible by the world size.
      group: a process group, or ``None`` for the default one.

    Returns:
      A tree of views: rank ``r`` of ``N`` gets indices ``[r * B/N, (r + 1) * B/N)``.

    Notes:
      NOTE [N ranks = one process]: every rank draws the same global batch and keeps its contiguous
        block; with equal blocks the ``pmean`` of the block-mean gradients is the one-process
        gradient, so N ranks compute what one process does (up to summation order).

    Example:
      >>> import functorch_pipeline as fp
      >>> fp.distributed.shard({"x": torch.arange(4)})  # one process: everything
      {'x': tensor([0, 1, 2, 3])}
    """
    n, r = world_size(group), rank(group)
    paths, leaves, treedef = fpt.flatten_with_path(tree)
    out = []
    for path, x in zip(paths, leaves, strict=True):
        if (
            not isinstance(x, torch.Tensor)
            or not -x.dim() <= axis < max(x.dim(), 1)
            or x.dim() == 0
        ):
            raise ValueError(
                f"fp.distributed.shard: leaf at path `{fpt.keystr(path)}` has no axis {axis} "
                f"({type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))})"
            )
        size = x.shape[axis]
        if size % n:
            raise ValueError(
                f"fp.distributed.shard: leaf at path `{fpt.keystr(path)}` has {size} entries on "
                f"axis {axis}, not divisible by the world size {n}; use a global batch size "
                f"that is a multiple of {n}"
            )
        out.append(x.narrow(axis, r * (size // n), size // n))
    return fpt.unflatten(treedef, out)


def pmean_gradients(*, group: Any = None) -> optim.GradientTransformation:
    """A stateless transformation that averages the updates over ranks (:func:`pmean`).

    Put it first in a chain, ``optim.chain(pmean_gradients(), optim.clip_by_global_norm(1.0),
    optim.adam(1e-3))``, and ``fp.train.train_step`` becomes data parallel: every later
    transformation sees the global-batch gradient (NOTE [N ranks = one process]).

    Args:
      group: a process group, or ``None`` for the default one.

    Returns:
      An ``fp.optim.GradientTransformation``.

    Notes:
      NOTE [N ranks = one process]: every rank draws the same global batch and keeps its contiguous
        block; with equal blocks the ``pmean`` of the block-mean gradients is the one-process
        gradient, so N ranks compute what one process does (up to summation order).

    Example:
      >>> import functorch_pipeline as fp
      >>> tx = fp.distributed.pmean_gradients()
      >>> with fp.distributed.local_group():
      ...     tx.update({"w": torch.tensor([2.0])}, tx.init(None))[0]
      {'w': tensor([2.])}
    """

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        return pmean(updates, group=group), state

    return optim.GradientTransformation(lambda params: optim.EmptyState(), update_fn)


def data_parallel(
    optimizer: optim.GradientTransformation, *, group: Any = None
) -> optim.GradientTransformation:
    """``optimizer`` applied to the gradients averaged over ranks, with ``optimizer``'s own state.

    The same as ``optim.chain(pmean_gradients(), optimizer)`` but its state is exactly
    ``optimizer``'s (no chain tuple around it), so a checkpoint of a one-process run resumes
    under ``torchrun`` and back.

    Args:
      optimizer: any ``fp.optim`` transformation.
      group: a process group, or ``None`` for the default one.

    Returns:
      An ``fp.optim.GradientTransformation``.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.distributed.data_parallel(fp.optim.sgd(0.1))
      >>> params = {"w": torch.tensor([1.0])}
      >>> with fp.distributed.local_group():
      ...     opt.update({"w": torch.tensor([2.0])}, opt.init(params), params)[0]
      {'w': tensor([-0.2000])}
    """

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        return optimizer.update(pmean(updates, group=group), state, params, **extra)

    return optim.GradientTransformation(optimizer.init, update_fn)


def poisson_indices(
    key: torch.Tensor, num_examples: int, sample_rate: float, *, group: Any = None
) -> torch.Tensor:
    """This rank's share of one Poisson-sampled batch (DP-SGD's sampling), sharded.

    The global batch is ``fp.data.poisson_mask(key, num_examples, sample_rate)`` (each
    example joins with probability ``q`` given the key, the same on every rank); its
    indices are split in N contiguous, near-equal blocks (``torch.tensor_split``), so the
    union over ranks is exactly the one-process batch and the privacy accounting is the
    one-process accounting. Reads the batch size on the host (a data-loading step).

    Args:
      key: the batch's key, identical on every rank (e.g. ``fold_in(data_key, step)``).
      num_examples: dataset size.
      sample_rate: ``q`` in (0, 1].
      group: a process group, or ``None`` for the default one.

    Returns:
      An ``int64`` tensor of dataset indices for this rank (possibly empty).

    Example:
      >>> import functorch_pipeline as fp
      >>> idx = fp.distributed.poisson_indices(fp.random.key(0), 1000, 0.1)
      >>> 60 < len(idx) < 140
      True
    """
    mask = poisson_mask(key, num_examples, sample_rate)
    return torch.tensor_split(torch.nonzero(mask).flatten(), world_size(group))[rank(group)]


def differentially_private_aggregate(
    l2_norm_clip: float, noise_multiplier: float, key: int | torch.Tensor, *, group: Any = None
) -> optim.GradientTransformation:
    r"""``fp.optim.differentially_private_aggregate`` across ranks: clip locally, add noise once.

    Each rank clips its own examples' gradients and sums them; one :func:`psum` (that also
    carries the example count) gives the global clipped sum; then every rank adds the SAME
    Gaussian noise with ``fp.optim.add_dp_noise`` (the draw of the one-process aggregate,
    from the shared ``key``) and divides by the global batch size:

    .. math:: u = \frac{1}{\sum_r B_r}\Big(\sum_r \sum_{i \in r} \mathrm{clip}_C(g_i)
              + \mathcal N(0, (C\sigma)^2 I)\Big)

    So the noise is added once to the global sum (standard deviation ``C σ``, not
    ``sqrt(N) C σ``), the result is identical on every rank, and with the same key it
    equals ``fp.optim.differentially_private_aggregate`` on the concatenated batch up to
    summation order. ``key`` must be the same on every rank (see :func:`shared_key`).
    The state is ``fp.optim``'s ``DifferentiallyPrivateAggregateState``.

    ``update`` checks, before any collective, that it is given per-example gradients:
    every leaf must have shape ``(B_r, *param.shape)`` (``params`` when passed, else the
    shapes ``init`` saw; NOTE [batch axis check] of ``fp.optim``), so batch-mean gradients
    raise a ``ValueError`` naming the key path and both shapes.

    Args:
      l2_norm_clip: the per-example L2 bound ``C``.
      noise_multiplier: ``σ``.
      key: an ``fp.random`` key or an int seed, identical on every rank.
      group: a process group, or ``None`` for the default one.

    Returns:
      A ``GradientTransformation`` whose ``update`` takes this rank's per-example gradients
      (examples on axis 0; a rank may have none, ``B_r = 0``).

    Raises:
      ValueError: from ``update``, on gradients that are not per-example (see above), a
        ``batch_size`` argument, or an empty global batch.

    Notes:
      NOTE [batch axis check]: per-example gradients must have shape ``(B, *param.shape)``; when the
        parameter shapes are known every leaf must have exactly one more axis, so a batch-mean
        gradient is refused instead of being clipped row by row.

    Example:
      >>> import functorch_pipeline as fp
      >>> tx = fp.distributed.differentially_private_aggregate(1.0, 0.0, key=0)
      >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
      >>> with fp.distributed.local_group():
      ...     tx.update(g, tx.init({"w": torch.zeros(2)}))[0]
      {'w': tensor([0.4500, 0.6000])}
    """
    where = "fp.distributed.differentially_private_aggregate"
    # validates the numbers and the key; batch_size is given per step (the global count)
    noise = optim.add_dp_noise(l2_norm_clip, noise_multiplier, key)
    seen: dict[str, Any] = {}  # the parameter shapes init saw

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        if "batch_size" in extra:  # it was ignored: the divisor is the count over the ranks
            raise ValueError(f"{where}.update: `batch_size` is not taken: the noisy sum is divided "
                             "by the number of examples summed over every rank")
        # NOTE [batch axis check] (fp.optim), before the psum: every leaf (B_r, *param.shape)
        # against ``params`` or the shapes ``init`` saw; a batch-mean gradient failed inside
        # add_dp_noise, after the collective, naming neither this API nor the given shape
        shapes = _shapes(params) if params is not None else _memo(seen, updates)
        b = _batch_size(f"{where}.update", updates, shapes)
        leaves, td = fpt.flatten(updates)
        if b:
            summed, _ = optim.per_example_global_norm_clip(updates, l2_norm_clip)
            local = fpt.leaves(summed)
        else:
            local = [g.new_zeros(g.shape[1:]) for g in leaves]
        # The count in float64 (float32 where the device has no float64): in the gradients'
        # float16 it overflowed past 65504 examples and rounded past 2048.
        device = local[0].device
        count = torch.tensor(float(b), device=device,
                             dtype=torch.float32 if device.type == "mps" else torch.float64)
        total, count = psum((local, count), group=group)
        if device.type == "cpu" and not float(count) > 0:  # read for free on the host
            raise ValueError(f"{where}.update: the global batch is empty (0 examples on every "
                             "rank), and an empty batch has no mean")
        return noise.update(fpt.unflatten(td, total), state, params, batch_size=count)

    def init_fn(params: Any) -> Any:
        seen["shapes"] = _shapes(params)
        return noise.init(params)

    return optim.GradientTransformation(init_fn, update_fn)
