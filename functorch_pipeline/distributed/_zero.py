"""Sharded optimizer state (ZeRO stage 1/2): each rank keeps and updates 1/N of it.

# NOTE [flat shards]
The parameters are grouped by ``(device, dtype)`` (leaf order); each group is one flat
vector of ``P`` numbers, zero-padded to ``N * S`` with ``S = ceil(P / N)``; rank ``r`` owns
``[r * S, (r + 1) * S)``. A step is: ``psum_scatter`` of the padded gradient vectors
(one reduce-scatter per dtype; this also averages, replacing the all-reduce of plain data
parallelism), the inner optimizer on the rank's shards (a tuple of 1-d tensors), and an
``all_gather`` of the update shards (the same bytes as gathering parameters; gathering
updates keeps the ``GradientTransformation`` contract, so ``apply_updates`` is unchanged).
Padding stays zero: a zero gradient gives a zero update in every elementwise optimizer,
and the padding is cut off after the gather anyway.

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

import torch

from functorch_pipeline import optim
from functorch_pipeline import tree as fpt
from functorch_pipeline.distributed._collectives import all_gather
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
        total = sum(leaves[i].numel() for i in idx)
        out.append(_Bucket(idx, total, max(1, math.ceil(total / n))))
    return out


def _padded(leaves: list[torch.Tensor], b: _Bucket, n: int) -> torch.Tensor:
    flat = torch.cat([leaves[i].reshape(-1) for i in b.index])
    return torch.nn.functional.pad(flat, (0, n * b.shard - b.total))


class ShardedOptimizer(NamedTuple):
    """What :func:`shard_optimizer` returns: ``init``/``update`` like a
    ``GradientTransformation``, and the two checkpoint helpers."""

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
    most ``N - 1`` numbers per dtype). ``inner`` must be elementwise (see the note); use
    ``fp.distributed.clip_by_global_norm`` inside it for clipping.

    Checkpoints: ``gather_state(state, params)`` (a collective) returns the state over
    the unpadded flat vectors, which does not depend on the world size;
    ``shard_state(full_state, params)`` cuts such a state for this rank, so a run saved with
    N ranks resumes with M.

    Args:
      inner: an elementwise ``fp.optim`` transformation (e.g. ``optim.adam(1e-3)``).
      group: a process group, or ``None`` for the default one.

    Returns:
      A :class:`ShardedOptimizer` ``(init, update, gather_state, shard_state)``.

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

    def shards_of(tree: Any, n: int, r: int) -> tuple[tuple[torch.Tensor, ...], list[_Bucket], Any]:
        leaves, treedef = fpt.flatten(tree)
        for i, x in enumerate(leaves):
            if not isinstance(x, torch.Tensor):
                path = fpt.keystr(fpt.flatten_with_path(tree)[0][i])
                raise TypeError(
                    f"{where}: leaf at path `{path}` is a {type(x).__name__}, not a tensor"
                )
        layout = _layout(leaves, n)
        return (
            tuple(_padded(leaves, b, n)[r * b.shard : (r + 1) * b.shard] for b in layout),
            layout,
            treedef,
        )

    def init_fn(params: Any) -> Any:
        require(f"{where}.init")
        shards, _, _ = shards_of(params, world_size(group), rank(group))
        return inner.init(tuple(s.clone() for s in shards))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        require(f"{where}.update")
        n, r = world_size(group), rank(group)
        leaves, treedef = fpt.flatten(updates)
        layout = _layout(leaves, n)
        grad_shards = psum_scatter(
            tuple(_padded(leaves, b, n) for b in layout), tiled=True, group=group
        )
        grad_shards = tuple(g / n for g in grad_shards)
        param_shards = None if params is None else shards_of(params, n, r)[0]
        extra.pop("inplace", None)  # the shards are fresh tensors: nothing to donate
        upd_shards, state = inner.update(grad_shards, state, param_shards, **extra)
        full = all_gather(tuple(upd_shards), tiled=True, group=group)
        out: list[Any] = [None] * len(leaves)
        for b, vec in zip(layout, full, strict=True):
            parts = torch.split(vec[: b.total], [leaves[i].numel() for i in b.index])
            for i, p in zip(b.index, parts, strict=True):
                out[i] = p.view(leaves[i].shape)
        return fpt.unflatten(treedef, out), state

    def bucket_of(path: Any, x: Any, params: Any, size: Callable[[_Bucket], int]) -> _Bucket | None:
        """The parameter group a 1-d state leaf of length ``size(bucket)`` belongs to."""
        if not isinstance(x, torch.Tensor) or x.dim() != 1:
            return None
        leaves = fpt.leaves(params)
        layout = _layout(leaves, world_size(group))
        hits = [b for b in layout if size(b) == x.numel() and leaves[b.index[0]].dtype == x.dtype]
        hits = hits or [b for b in layout if size(b) == x.numel()]
        if len({(b.total, b.shard) for b in hits}) > 1:
            raise ValueError(
                f"{where}: cannot tell which parameter group the state leaf at path "
                f"`{fpt.keystr(path)}` (shape {tuple(x.shape)}, {x.dtype}) belongs to"
            )
        return hits[0] if hits else None

    def gather_state(state: Any, params: Any) -> Any:
        require(f"{where}.gather_state")
        paths, leaves, treedef = fpt.flatten_with_path(state)
        picks = [
            bucket_of(p, x, params, lambda b: b.shard) for p, x in zip(paths, leaves, strict=True)
        ]
        # one all-gather per dtype for all sharded leaves together
        gathered = iter(
            all_gather(
                [x for x, b in zip(leaves, picks, strict=True) if b is not None],
                tiled=True,
                group=group,
            )
        )
        out = [
            next(gathered)[: b.total] if b is not None else x
            for x, b in zip(leaves, picks, strict=True)
        ]
        return fpt.unflatten(treedef, out)

    def shard_state(full_state: Any, params: Any) -> Any:
        n, r = world_size(group), rank(group)

        def cut(path: Any, x: Any) -> Any:
            b = bucket_of(path, x, params, lambda b: b.total)
            if b is None:
                return x
            return torch.nn.functional.pad(x, (0, n * b.shard - b.total))[
                r * b.shard : (r + 1) * b.shard
            ].clone()

        return fpt.map_with_path(cut, full_state)

    return ShardedOptimizer(init_fn, update_fn, gather_state, shard_state)


def clip_by_global_norm(
    max_norm: float | torch.Tensor, *, group: Any = None
) -> optim.GradientTransformation:
    """``optim.clip_by_global_norm`` for updates SHARDED across ranks (inside
    :func:`shard_optimizer`): the squared norm of the local shard is summed over ranks
    (one scalar all-reduce) before the usual rule ``u * max_norm / max(norm, max_norm)``.

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
        acc = torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32
        sq = torch.stack([x.to(acc).pow(2).sum() for x in leaves]).sum()
        norm = torch.sqrt(psum(sq, group=group))
        factor = max_norm / torch.maximum(
            norm, torch.as_tensor(max_norm, dtype=norm.dtype, device=norm.device)
        )
        return fpt.unflatten(treedef, [x * factor.to(x.dtype) for x in leaves]), state

    return optim.GradientTransformation(lambda params: optim.EmptyState(), update_fn)
