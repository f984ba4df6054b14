"""Sharded optimizer state (ZeRO stage 1/2): each rank keeps and updates 1/N of it.

# NOTE [flat shards]
The parameters are grouped by ``(device, dtype)`` in leaf order and cut into leaf-aligned
buckets of about 4 MB (a bigger leaf is a bucket alone). Each bucket is a flat vector of
``P`` numbers, zero-padded to ``N * S`` with ``S = ceil(P / N)``; rank ``r`` owns
``[r * S, (r + 1) * S)``. A step is: a reduce-scatter of each bucket's padded gradient
(this also averages, replacing the all-reduce of plain data parallelism), the inner
optimizer on the rank's shards (a tuple of 1-d tensors, one per bucket), and an all-gather
of the update shards (the same bytes as gathering parameters; gathering updates keeps the
``GradientTransformation`` contract, so ``apply_updates`` is unchanged). Eagerly, the
buckets' collectives are launched asynchronously and waited for together; small buckets
keep every temporary in glibc's heap (NOTE [eager buckets of 4 MB]): one flat 40 MB
vector per dtype made every step page-fault ~250 MB and run 6x slower than replicated
Adam. Padding stays zero: a zero gradient gives a zero update in every elementwise
optimizer, and the padding is cut off after the gather anyway.

Exact (the same numbers as the replicated optimizer, up to summation order) for every
ELEMENTWISE transformation: sgd (with momentum), adam, adamw, nadam, radam, adamax,
rmsprop, adagrad, adadelta, lion, scale_by_*, add_decayed_weights, schedules. NOT exact:
anything that reads the tree structure or a whole leaf: ``optim.clip_by_global_norm``
(it would clip each shard by its own norm: use :func:`clip_by_global_norm` from
``fp.distributed``, which adds one scalar all-reduce), per-leaf norms (lamb, lars,
``scale_by_trust_ratio``), masks by key path (``optim.masked``/``freeze``: the shards have
no key paths), and per-example DP transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import optree
import torch
import torch.distributed as dist

from functorch_pipeline import optim
from functorch_pipeline import tree as fpt
from functorch_pipeline.distributed._collectives import _C10D_ALL_GATHER
from functorch_pipeline.distributed._collectives import _C10D_REDUCE_SCATTER
from functorch_pipeline.distributed._collectives import _chunks
from functorch_pipeline.distributed._collectives import _compiling
from functorch_pipeline.distributed._collectives import _group
from functorch_pipeline.distributed._collectives import all_gather
from functorch_pipeline.distributed._collectives import check_same_tree
from functorch_pipeline.distributed._collectives import psum
from functorch_pipeline.distributed._collectives import psum_scatter
from functorch_pipeline.distributed._runtime import rank
from functorch_pipeline.distributed._runtime import require
from functorch_pipeline.distributed._runtime import world_size

__all__ = ["ShardedOptimizer", "clip_by_global_norm", "shard_optimizer"]


class _Bucket(NamedTuple):
    index: list[int]  # leaf positions
    total: int  # P
    shard: int  # S


def _layout(leaves: list[torch.Tensor], n: int) -> list[_Bucket]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.device, x.dtype), []).append(i)
    out = []
    for idx in groups.values():
        for chunk in _chunks(idx, leaves):
            total = sum(leaves[i].numel() for i in chunk)
            out.append(_Bucket(chunk, total, max(1, math.ceil(total / n))))
    return out


def _segment(leaves: list[torch.Tensor], b: _Bucket, start: int, stop: int) -> torch.Tensor:
    """Entries ``[start, stop)`` of the bucket's zero-padded flat vector (a fresh tensor),
    copying only the leaves that overlap it."""
    parts, offset = [], 0
    like = leaves[b.index[0]]
    for i in b.index:
        size = leaves[i].numel()
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            parts.append(leaves[i].reshape(-1)[lo - offset : hi - offset])
        offset += size
    pad = stop - max(start, b.total)
    if pad > 0:
        parts.append(like.new_zeros(min(pad, stop - start)))
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def _reduce_scatter_mean(leaves: list[torch.Tensor], layout: list[_Bucket], n: int,
                         group: Any) -> tuple[torch.Tensor, ...]:
    """This rank's shard of each bucket's gradient, summed over ranks and divided by N."""
    if _compiling() or not dist.is_initialized():
        padded = tuple(_segment(leaves, b, 0, n * b.shard) for b in layout)
        return tuple(g / n for g in psum_scatter(padded, tiled=True, group=group))
    g = _group(group)
    outs, works = [], []
    for b in layout:
        buf = _segment(leaves, b, 0, n * b.shard)
        out = buf.new_empty(b.shard)
        works.append(_C10D_REDUCE_SCATTER(out, buf, op=dist.ReduceOp.SUM, group=g, async_op=True))
        outs.append(out)
    _wait("update", works)
    return tuple(o.div_(n) for o in outs)


def _all_gather_updates(shards: tuple[torch.Tensor, ...], leaves: list[torch.Tensor],
                        layout: list[_Bucket], n: int, group: Any) -> list[torch.Tensor]:
    """The full update of every leaf from every rank's update shards."""
    if _compiling() or not dist.is_initialized():
        full = all_gather(tuple(shards), tiled=True, group=group)
    else:
        g = _group(group)
        full, works = [], []
        for b, s in zip(layout, shards, strict=True):
            out = s.new_empty(n * b.shard)
            works.append(_C10D_ALL_GATHER(out, s.contiguous(), group=g, async_op=True))
            full.append(out)
        _wait("update", works)
    out: list[Any] = [None] * len(leaves)
    for b, vec in zip(layout, full, strict=True):
        parts = torch.split(vec[: b.total], [leaves[i].numel() for i in b.index])
        for i, p in zip(b.index, parts, strict=True):
            out[i] = p.view(leaves[i].shape)
    return out


def _wait(fn: str, works: list[Any]) -> None:
    try:
        for w in works:
            w.wait()
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise RuntimeError(
            f"fp.distributed.shard_optimizer.{fn}: the collective failed on rank "
            f"{dist.get_rank()} (a peer rank may have died or timed out): {e}"
        ) from e


def _bucket_leaves(state: Any, layout: list[_Bucket], size: Callable[[_Bucket], int]
                   ) -> list[_Bucket | None]:
    """For each leaf of an inner optimizer state, the bucket it shards, or None.

    The inner optimizer saw a tuple of shards, one per bucket, so its per-parameter state
    leaves sit at paths ending in the bucket's index with shape ``(size(bucket),)``;
    everything else (counts, schedules) is left alone."""
    paths, leaves, _ = optree.tree_flatten_with_path(state, none_is_leaf=False,
                                                     namespace=fpt.NAMESPACE)
    out: list[_Bucket | None] = []
    for path, x in zip(paths, leaves, strict=True):
        k = path[-1] if path else None
        hit = (isinstance(x, torch.Tensor) and x.dim() == 1 and isinstance(k, int)
               and 0 <= k < len(layout) and x.numel() == size(layout[k]))
        out.append(layout[k] if hit else None)
    return out


class ShardedOptimizer(NamedTuple):
    """What :func:`shard_optimizer` returns: ``init``/``update`` like a
    ``GradientTransformation``, and the two checkpoint helpers.

    Attributes:
        init: ``init(params) -> state``, this rank's shard of the inner optimizer's state.
        update: ``update(updates, state, params=None) -> (updates, state)``, the full updates
            (every rank gets all of them) and this rank's new state shard.
        gather_state: ``gather_state(state, params)``, the full (unsharded) state for a
            checkpoint.
        shard_state: ``shard_state(full_state, params)``, this rank's shard of a full state
            (the inverse of ``gather_state``, for resuming).
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    gather_state: Callable[[Any, Any], Any]
    shard_state: Callable[[Any, Any], Any]


def shard_optimizer(inner: optim.GradientTransformation, *, group: Any = None) -> ShardedOptimizer:
    """Run ``inner`` on 1/N of the parameters per rank: ZeRO stage 1/2 (NOTE [flat shards]).

    ``update`` takes each rank's LOCAL gradients (the mean over its own examples, as with
    :func:`shard`), averages them with a reduce-scatter, applies ``inner`` to the rank's
    shard and all-gathers the updates, so every rank gets the full update tree of the
    replicated data-parallel optimizer. Do not put :func:`pmean_gradients` in front.

    Per-rank optimizer state is about ``1/N`` of the replicated state (plus padding of at
    most ``N - 1`` numbers per bucket). ``inner`` must be elementwise (see the note); use
    ``fp.distributed.clip_by_global_norm`` inside it for clipping.

    Checkpoints: ``gather_state(state, params)`` (a collective) returns the state over
    the unpadded buckets, which does not depend on the world size;
    ``shard_state(full_state, params)`` cuts such a state for this rank, so a run saved with
    N ranks resumes with M.

    Args:
      inner: an elementwise ``fp.optim`` transformation (e.g. ``optim.adam(1e-3)``).
      group: a process group, or ``None`` for the default one.

    Returns:
      A :class:`ShardedOptimizer` ``(init, update, gather_state, shard_state)``.

    Notes:
      NOTE [flat shards]: parameters are grouped by ``(device, dtype)`` into ~4 MB leaf-aligned flat
        buckets, zero-padded to ``N * S``; rank ``r`` owns slice ``[r * S, (r + 1) * S)``. A step
        is a reduce-scatter of the gradients, the inner optimizer on the rank's shards, then an
        all-gather of the update shards.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.distributed.shard_optimizer(fp.optim.adam(0.1))
      >>> params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
      >>> with fp.distributed.local_group():
      ...     state = opt.init(params)
      ...     updates, state = opt.update({"w": torch.ones(2), "b": -torch.ones(1)}, state, params)
      >>> updates
      {'w': tensor([-0.1000, -0.1000]), 'b': tensor([0.1000])}
    """
    where = "fp.distributed.shard_optimizer"

    def leaves_of(fn: str, tree: Any) -> list[torch.Tensor]:
        leaves = fpt.leaves(tree)
        for i, x in enumerate(leaves):
            if not isinstance(x, torch.Tensor):
                path = fpt.keystr(fpt.flatten_with_path(tree)[0][i])
                raise TypeError(
                    f"{where}.{fn}: leaf at path `{path}` is a {type(x).__name__}, not a tensor"
                )
        return leaves

    def shards_of(leaves: list[torch.Tensor], layout: list[_Bucket], r: int) -> tuple:
        return tuple(_segment(leaves, b, r * b.shard, (r + 1) * b.shard) for b in layout)

    def init_fn(params: Any) -> Any:
        require(f"{where}.init")
        leaves = leaves_of("init", params)
        check_same_tree(params, group=group, fn="shard_optimizer.init")
        n = world_size(group)
        return inner.init(shards_of(leaves, _layout(leaves, n), rank(group)))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        require(f"{where}.update")
        n, r = world_size(group), rank(group)
        leaves = leaves_of("update", updates)
        treedef = fpt.structure(updates)
        layout = _layout(leaves, n)
        grad_shards = _reduce_scatter_mean(leaves, layout, n, group)
        param_shards = None
        if params is not None:
            param_shards = shards_of(leaves_of("update", params), layout, r)
        extra.pop("inplace", None)  # the shards are fresh tensors: nothing to donate
        upd_shards, state = inner.update(grad_shards, state, param_shards, **extra)
        out = _all_gather_updates(tuple(upd_shards), leaves, layout, n, group)
        return fpt.unflatten(treedef, out), state

    def gather_state(state: Any, params: Any) -> Any:
        require(f"{where}.gather_state")
        layout = _layout(leaves_of("gather_state", params), world_size(group))
        leaves, treedef = fpt.flatten(state)
        picks = _bucket_leaves(state, layout, lambda b: b.shard)
        sharded = [x for x, b in zip(leaves, picks, strict=True) if b is not None]
        gathered = iter(all_gather(sharded, tiled=True, group=group))
        out = [next(gathered)[: b.total] if b is not None else x
               for x, b in zip(leaves, picks, strict=True)]
        return fpt.unflatten(treedef, out)

    def shard_state(full_state: Any, params: Any) -> Any:
        n, r = world_size(group), rank(group)
        layout = _layout(leaves_of("shard_state", params), n)
        leaves, treedef = fpt.flatten(full_state)
        picks = _bucket_leaves(full_state, layout, lambda b: b.total)
        out = []
        for x, b in zip(leaves, picks, strict=True):
            if b is not None:
                x = torch.nn.functional.pad(x, (0, n * b.shard - b.total))
                x = x[r * b.shard : (r + 1) * b.shard].clone()
            out.append(x)
        return fpt.unflatten(treedef, out)

    return ShardedOptimizer(init_fn, update_fn, gather_state, shard_state)


def _real_view(x: torch.Tensor) -> torch.Tensor:
    """``x``, or its real and imaginary parts side by side when complex (same squared norm)."""
    return torch.view_as_real(x.resolve_conj()) if x.is_complex() else x


def clip_by_global_norm(
    max_norm: float | torch.Tensor, *, group: Any = None
) -> optim.GradientTransformation:
    """``optim.clip_by_global_norm`` for updates SHARDED across ranks (inside
    :func:`shard_optimizer`): the squared norm of the local shard is summed over ranks
    (one scalar all-reduce) before the usual rule ``u * max_norm / max(norm, max_norm)``,
    with ``norm**2 = sum |u_i|**2`` (complex leaves count both parts, as in
    ``optim.clip_by_global_norm``).

    Args:
      max_norm: the largest global L2 norm let through.
      group: a process group, or ``None`` for the default one.

    Returns:
      An ``fp.optim.GradientTransformation``.

    Example:
      >>> import functorch_pipeline as fp
      >>> tx = fp.distributed.clip_by_global_norm(1.0)
      >>> with fp.distributed.local_group():
      ...     tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(None))[0]
      {'w': tensor([0.6000, 0.8000])}
    """
    if isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool) and max_norm < 0:
        raise ValueError(
            f"fp.distributed.clip_by_global_norm: `max_norm` must be >= 0, got {max_norm}"
        )

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        leaves, treedef = fpt.flatten(updates)
        if not leaves:
            return updates, state
        wide = (torch.float64, torch.complex128)
        acc = torch.float64 if any(x.dtype in wide for x in leaves) else torch.float32
        # |x|^2 for complex leaves (real^2 + imag^2); casting one to a real dtype dropped
        # the imaginary part and clipped complex updates too little
        sq = torch.stack([_real_view(x).to(acc).pow(2).sum() for x in leaves]).sum()
        norm = torch.sqrt(psum(sq, group=group))
        factor = max_norm / torch.maximum(
            norm, torch.as_tensor(max_norm, dtype=norm.dtype, device=norm.device)
        )
        return fpt.unflatten(treedef, [x * factor.to(x.dtype) for x in leaves]), state

    return optim.GradientTransformation(lambda params: optim.EmptyState(), update_fn)
