"""JAX-named collectives over pytrees on ``torch.distributed``'s functional collectives.

# NOTE [one collective per bucket]
Leaves are grouped by ``(device, dtype)`` in leaf order; each group is flattened into one
buffer (``torch.cat`` of the raveled leaves) and sent with ONE functional collective, then
split back into views. A 100-leaf tree thus costs one round trip per dtype instead of 100
(gloo's ``allreduce_coalesced`` would do the same but refuses mixed dtypes; NCCL coalesces
too, but the flat buffer is the one form every backend and ``torch.compile`` accept).
The copy into the buffer is one memcpy per leaf, small next to the transfer.

# NOTE [cross-rank tree check]
A collective over trees that differ across ranks (other keys, other shapes) would mix
unrelated numbers or wait forever for a message of another size. So on the first eager call
with each (treedef, shapes, dtypes) signature, the ranks all-gather a 56-bit hash of it
(one tiny collective) and compare; on a mismatch every rank gathers the readable
descriptions and raises the same ``ValueError`` naming the rank and key path. Later calls
with a signature every rank has checked skip it (no extra latency, no host sync). Under
``torch.compile`` the check is not traced: check eagerly once (or call
:func:`check_same_tree`) before compiling.

The cache is a LIMIT, not a guarantee: each rank decides from its own memory, so once
two signatures A and B have both been checked, a call where some ranks pass A and others B
is NOT checked, and nothing catches it reliably. With the same number of elements per
dtype (e.g. {x: (3,), y: (2,)} vs {x: (2,), y: (3,)}) every rank silently gets mixed
numbers; with different sizes the backend may return garbage on the smaller rank while the
larger one errors, or (gloo's all_gather) abort the whole process from C++ without a
Python error; or the group times out. The realistic trigger is a per-rank size that
varies by step, e.g. per-example tensors of ``poisson_indices`` blocks (which differ by
one) gathered for a metric: there, call :func:`check_same_tree` (always checks, one tiny
all-gather) before the collective, or pad to a common size. Checking every call costs one
extra round trip (measured on gloo, 2 ranks: a 13-number psum went from 1.9 ms to 2.8 ms),
and folding the hash into the data cannot stop gloo's abort on differing sizes, so the
default stays cached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as _fwad
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from functorch_pipeline import tree as fpt
from functorch_pipeline.distributed._runtime import require

# torch >= 2.6 names; older ones only have the *_tensor spellings.
_ALL_GATHER = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_REDUCE_SCATTER = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
_C10D_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_C10D_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

__all__ = [
    "all_gather",
    "broadcast",
    "check_same_tree",
    "pmax",
    "pmean",
    "pmin",
    "psum",
    "psum_scatter",
    "reduce_scatter",
]

_CHECKED: dict[int, tuple[Any, set[Any]]] = {}


def _group(group: Any) -> Any:
    return dist.group.WORLD if group is None else group


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _leaves(fn: str, tree: Any) -> tuple[list[torch.Tensor], Any]:
    leaves, treedef = fpt.flatten(tree)
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            path = fpt.keystr(fpt.flatten_with_path(tree)[0][i])
            raise TypeError(
                f"fp.distributed.{fn}: leaf at path `{path}` is a {type(x).__name__}, not a tensor"
            )
    return leaves, treedef


def _describe(tree: Any) -> tuple[str, list[tuple[str, tuple[int, ...], str]]]:
    paths, leaves, treedef = fpt.flatten_with_path(tree)
    return str(treedef), [
        (fpt.keystr(p), tuple(x.shape), str(x.dtype)) for p, x in zip(paths, leaves, strict=True)
    ]


def _mismatch(fn: str, descs: list[Any], hashes: list[int]) -> str:
    r = next(i for i, h in enumerate(hashes) if h != hashes[0])
    (td0, l0), (tdr, lr) = descs[0], descs[r]
    p0, pr = [d[0] for d in l0], [d[0] for d in lr]
    head = f"fp.distributed.{fn}: the tree differs across ranks (rank {r} vs rank 0): "
    if p0 != pr:
        only_r = [p for p in pr if p not in p0][:5]
        only_0 = [p for p in p0 if p not in pr][:5]
        return head + (
            f"key paths only on rank {r}: {only_r}; only on rank 0: {only_0}"
            if only_r or only_0
            else f"the leaves come in another order: {pr[:5]} vs {p0[:5]}"
        )
    for (path, s0, d0), (_, sr, dr) in zip(l0, lr, strict=True):
        if (s0, d0) != (sr, dr):
            return head + (
                f"leaf at path `{path}` has shape {sr} and dtype {dr} on rank {r} "
                f"but shape {s0} and dtype {d0} on rank 0"
            )
    return head + f"tree structure {tdr} on rank {r} but {td0} on rank 0"


def check_same_tree(tree: Any, *, group: Any = None, fn: str = "check_same_tree") -> None:
    """Raise unless ``tree`` has the same structure, shapes and dtypes on every rank.

    Collectives call this automatically on their first eager call with each tree
    signature (NOTE [cross-rank tree check]); call it yourself before compiling a step, and
    before a collective whose shapes may differ across ranks on a later step (this call
    always checks; the collectives' own check is cached per signature).
    A collective: every rank of ``group`` must call it.

    Args:
      tree: a pytree of tensors.
      group: a process group, or ``None`` for the default one.
      fn: the API name used in the error message.

    Returns:
      ``None``.

    Raises:
      ValueError: naming the first differing rank and key path.

    Notes:
      NOTE [cross-rank tree check]: on the first eager call per (treedef, shapes, dtypes) the ranks
        all-gather a hash of that signature and compare; a mismatch raises the same ``ValueError``
        naming the rank and key path on every rank instead of hanging. Later collective calls with
        a signature already checked are not re-checked: if ranks then pass DIFFERENT previously
        checked signatures (per-rank sizes that vary by step), the result can be silently wrong,
        or gloo can abort the process; this function always checks.

    Example:
      >>> import functorch_pipeline as fp
      >>> with fp.distributed.local_group():
      ...     fp.distributed.check_same_tree({"w": torch.zeros(2)})
    """
    require(f"fp.distributed.{fn}")
    g = _group(group)
    leaves, treedef = _leaves(fn, tree)
    _check(fn, tree, leaves, treedef, g, force=True)


def _check(
    fn: str, tree: Any, leaves: list[torch.Tensor], treedef: Any, g: Any, force: bool = False
) -> None:
    sig = (treedef, tuple((tuple(x.shape), x.dtype) for x in leaves))
    entry = _CHECKED.get(id(g))
    if entry is None or entry[0] is not g:
        entry = _CHECKED[id(g)] = (g, set())
    if sig in entry[1] and not force:
        return
    digest = hashlib.blake2b(repr((str(treedef), sig[1])).encode(), digest_size=7).digest()
    dev = leaves[0].device if leaves else torch.device("cpu")
    if dist.get_backend(g) == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([int.from_bytes(digest, "little")], dtype=torch.int64, device=dev)
    hashes = _guard(fn, lambda: _all_gather_buf(mine, g)).tolist()
    if len(set(hashes)) > 1:
        descs: list[Any] = [None] * dist.get_world_size(g)
        dist.all_gather_object(descs, _describe(tree), group=g)
        raise ValueError(_mismatch(fn, descs, hashes))
    entry[1].add(sig)


def _guard(fn: str, thunk: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run a collective and wait for it; eager failures name the API and the rank."""
    if _compiling():
        return thunk()
    try:
        return thunk()
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise RuntimeError(
            f"fp.distributed.{fn}: the collective failed on rank {dist.get_rank()} (a peer rank "
            f"may have died, timed out, or called a different collective): {e}"
        ) from e


# NOTE [eager c10d, traced funcol]
# Eagerly, the buffers go through the classic in-place c10d calls on buffers we own (fresh
# concatenations): importing the functional collectives' machinery costs ~3 s (it imports
# torch._dynamo) on a process's first call, and the classic calls can run asynchronously.
# While compiling, the functional collectives are used: they return new tensors and trace
# under fullgraph=True. Same backend kernels either way.
#
# NOTE [eager buckets of 4 MB]
# Eager all-reduces and broadcasts cut each dtype group into leaf-aligned chunks of about
# 4 MB (a bigger leaf is cut into 4 MB slices of its own buffer) and launch them all
# asynchronously before waiting: packing chunk k + 1 overlaps with sending chunk k, and
# buffers this size come from glibc's heap instead of fresh mmap'ed pages that
# page-fault on every call (a 40 MB buffer costs ~10k faults per call). Measured on gloo
# (benchmarks/distributed_collectives.py): a 10M-parameter tree goes from ~3.6x to about
# the time of one flat in-place all_reduce. Small trees still make one call per dtype.
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_BUCKET_BYTES = 4 << 20


def _chunks(idx: list[int], leaves: list[torch.Tensor]) -> list[list[int]]:
    out: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i in idx:
        nbytes = leaves[i].numel() * leaves[i].element_size()
        if cur and size + nbytes > _BUCKET_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += nbytes
    if cur:
        out.append(cur)
    return out


def _eager_inplace(
    fn: str, leaves: list[torch.Tensor], launch: Callable[[torch.Tensor], Any]
) -> list[tuple[list[int], torch.Tensor]]:
    """Pack every chunk into an owned buffer, launch ``launch(slice)`` (async) on each
    slice, wait for all; return ``(leaf positions, buffer)`` per chunk (NOTE [eager
    buckets of 4 MB])."""
    done, works = [], []
    try:
        for idx in _buckets(leaves):
            for chunk in _chunks(idx, leaves):
                buf = torch.cat([leaves[i].reshape(-1) for i in chunk])
                if buf.dtype == torch.bool:
                    buf = buf.to(torch.uint8)
                step = max(1, _BUCKET_BYTES // buf.element_size())
                for start in range(0, buf.numel(), step):
                    works.append(launch(buf[start : start + step]))
                done.append((chunk, buf))
        for w in works:
            w.wait()
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise RuntimeError(
            f"fp.distributed.{fn}: the collective failed on rank {dist.get_rank()} (a peer rank "
            f"may have died, timed out, or called a different collective): {e}"
        ) from e
    return done


def _scatter_back(
    done: list[tuple[list[int], torch.Tensor]], leaves: list[torch.Tensor], out: list[Any]
) -> None:
    for chunk, buf in done:
        xs = [leaves[i] for i in chunk]
        if xs[0].dtype == torch.bool:
            buf = buf.to(torch.bool)
        for i, y in zip(chunk, _unflat(buf, xs), strict=True):
            out[i] = y


def _all_reduce_traced(buf: torch.Tensor, op: str, g: Any) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(buf, op, g))


def _all_gather_buf(buf: torch.Tensor, g: Any) -> torch.Tensor:
    if _compiling():
        return funcol.wait_tensor(_ALL_GATHER(buf, 0, g))
    out = buf.new_empty((dist.get_world_size(g) * buf.numel(),))
    _C10D_ALL_GATHER(out, buf.contiguous(), group=g)
    return out


def _reduce_scatter_buf(buf: torch.Tensor, g: Any) -> torch.Tensor:
    if _compiling():
        return funcol.wait_tensor(_REDUCE_SCATTER(buf, "sum", 0, g))
    out = buf.new_empty((buf.numel() // dist.get_world_size(g),))
    _C10D_REDUCE_SCATTER(out, buf.contiguous(), op=dist.ReduceOp.SUM, group=g)
    return out


def _broadcast_traced(buf: torch.Tensor, src: int, g: Any) -> torch.Tensor:
    return funcol.wait_tensor(funcol.broadcast(buf, src, g))


def _buckets(leaves: list[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.device, x.dtype), []).append(i)
    return list(groups.values())


def _prepare(fn: str, tree: Any, group: Any) -> tuple[list[torch.Tensor], Any, Any]:
    require(f"fp.distributed.{fn}")
    g = _group(group)
    leaves, treedef = _leaves(fn, tree)
    if not _compiling():
        _check(fn, tree, leaves, treedef, g)
    return leaves, treedef, g


def _flat(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0].reshape(-1) if len(xs) == 1 else torch.cat([x.reshape(-1) for x in xs])


def _unflat(buf: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    parts = torch.split(buf, [x.numel() for x in like])
    return [p.view(x.shape) for p, x in zip(parts, like, strict=True)]


def _all_reduce(fn: str, tree: Any, op: str, group: Any, mean: bool = False) -> Any:
    leaves, treedef, g = _prepare(fn, tree, group)
    for idx in _buckets(leaves):
        dtype = leaves[idx[0]].dtype
        if dtype == torch.bool and op == "sum":
            raise TypeError(
                f"fp.distributed.{fn}: boolean leaves cannot be summed; cast them first"
            )
        if mean and not (dtype.is_floating_point or dtype.is_complex):
            path = fpt.keystr(fpt.flatten_with_path(tree)[0][idx[0]])
            raise TypeError(
                f"fp.distributed.{fn}: leaf at path `{path}` has dtype {dtype}; "
                "the mean needs floating point (use psum for integers)"
            )
    n = dist.get_world_size(g)
    out: list[Any] = [None] * len(leaves)
    if _compiling():
        def reduce(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            red = _all_reduce_traced(buf, op, g).to(dtype)
            return red / n if mean else red

        return fpt.unflatten(treedef, _traced_buckets(leaves, reduce))
    done = _eager_inplace(
        fn, leaves, lambda t: dist.all_reduce(t, op=_OPS[op], group=g, async_op=True)
    )
    if mean:
        for _, buf in done:
            buf.div_(n)
    _scatter_back(done, leaves, out)
    return fpt.unflatten(treedef, out)


def _gather_axis_ok(tree: Any, i: int, x: torch.Tensor, axis: int, tiled: bool) -> None:
    if not -x.dim() - 1 <= axis <= x.dim() or (tiled and not -x.dim() <= axis < x.dim()):
        path = fpt.keystr(fpt.flatten_with_path(tree)[0][i])
        raise ValueError(
            f"fp.distributed.all_gather: `axis`={axis} is out of range for the "
            f"leaf at path `{path}` of shape {tuple(x.shape)} (tiled={tiled})"
        )


def _scatter_shape_ok(tree: Any, i: int, x: torch.Tensor, d: int, tiled: bool, n: int) -> None:
    size = x.shape[d] if -x.dim() <= d < x.dim() else None
    if size is None or (size != n if not tiled else size % n):
        path = fpt.keystr(fpt.flatten_with_path(tree)[0][i])
        need = f"exactly {n}" if not tiled else f"a multiple of {n}"
        raise ValueError(
            f"fp.distributed.psum_scatter: leaf at path `{path}` has shape "
            f"{tuple(x.shape)}; axis {d} must have {need} entries "
            f"(world size {n}, tiled={tiled})"
        )


def _all_gather_impl(tree: Any, *, axis: int, tiled: bool, group: Any) -> Any:
    leaves, treedef, g = _prepare("all_gather", tree, group)
    n = dist.get_world_size(g)
    out: list[Any] = [None] * len(leaves)
    for idx in _buckets(leaves):
        xs = [leaves[i] for i in idx]
        dtype = xs[0].dtype
        for i, x in zip(idx, xs, strict=True):
            _gather_axis_ok(tree, i, x, axis, tiled)
        buf = _flat(xs)
        if dtype == torch.bool:
            buf = buf.to(torch.uint8)
        got = _guard("all_gather", lambda b=buf: _all_gather_buf(b, g)).to(dtype).view(n, -1)
        parts = torch.split(got, [x.numel() for x in xs], dim=1)
        for i, x, p in zip(idx, xs, parts, strict=True):
            y = p.reshape(n, *x.shape)
            if tiled:
                a = axis % x.dim()
                y = y.movedim(0, a).reshape(*x.shape[:a], n * x.shape[a], *x.shape[a + 1 :])
            else:
                y = y.movedim(0, axis % (x.dim() + 1))
            out[i] = y
    return fpt.unflatten(treedef, out)


def _traced_buckets(leaves: list[torch.Tensor],
                    call: Callable[[torch.Tensor, torch.dtype], torch.Tensor]) -> list[Any]:
    """Under ``torch.compile``: ``call(flat buffer, dtype)`` once per dtype bucket of
    ``leaves`` (booleans travel as uint8), split back into the leaves' shapes."""
    out: list[Any] = [None] * len(leaves)
    for idx in _buckets(leaves):
        xs = [leaves[i] for i in idx]
        buf = _flat(xs)
        buf = buf.to(torch.uint8) if buf.dtype == torch.bool else buf
        for i, y in zip(idx, _unflat(call(buf, xs[0].dtype), xs), strict=True):
            out[i] = y
    return out


def _broadcast_impl(tree: Any, *, src: int, group: Any) -> Any:
    leaves, treedef, g = _prepare("broadcast", tree, group)
    n = dist.get_world_size(g)
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < n:
        raise ValueError(f"fp.distributed.broadcast: `src` must be a rank in [0, {n}), got {src!r}")
    out: list[Any] = [None] * len(leaves)
    if _compiling():
        return fpt.unflatten(treedef, _traced_buckets(
            leaves, lambda buf, dtype: _broadcast_traced(buf, src, g).to(dtype)))
    root = dist.get_global_rank(g, src)
    done = _eager_inplace(
        "broadcast", leaves, lambda t: dist.broadcast(t, src=root, group=g, async_op=True)
    )
    _scatter_back(done, leaves, out)
    return fpt.unflatten(treedef, out)


def _psum_scatter_impl(tree: Any, *, scatter_dimension: int, tiled: bool, group: Any) -> Any:
    leaves, treedef, g = _prepare("psum_scatter", tree, group)
    n = dist.get_world_size(g)
    d = scatter_dimension
    out: list[Any] = [None] * len(leaves)
    for idx in _buckets(leaves):
        xs = [leaves[i] for i in idx]
        dtype = xs[0].dtype
        if dtype == torch.bool:
            raise TypeError(
                "fp.distributed.psum_scatter: boolean leaves cannot be summed; cast them first"
            )
        blocks = []
        for i, x in zip(idx, xs, strict=True):
            _scatter_shape_ok(tree, i, x, d, tiled, n)
            blocks.append(x.movedim(d, 0).reshape(n, -1))
        buf = (blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)).reshape(-1)
        got = _guard("psum_scatter", lambda b=buf: _reduce_scatter_buf(b, g))
        parts = torch.split(got, [b.shape[1] for b in blocks])
        for i, x, p in zip(idx, xs, parts, strict=True):
            moved = x.movedim(d, 0).shape
            y = p.reshape(moved[0] // n, *moved[1:]).movedim(0, d % x.dim())
            out[i] = y.squeeze(d % x.dim()) if not tiled else y
    return fpt.unflatten(treedef, out)


# NOTE [gradients of collectives]
# The collectives are differentiable as in JAXs, which are also the backwards of
# ``torch.distributed.nn.functional``: what is differentiated is the SUM over ranks of every
# rank's objective, so the cotangent that reaches a rank's input collects the cotangents of
# every rank's output:
#   psum -> psum of the cotangents;  pmean -> pmean of them;
#   pmax / pmin -> the psum of the cotangents, given to the rank(s) holding the extreme value
#     (ties split evenly, as torch.amax and JAX's max), 0 elsewhere;
#   all_gather -> psum_scatter of the cotangent;  psum_scatter -> all_gather of it;
#   broadcast -> the sum of the cotangents on ``src``, 0 on the other ranks (their outputs do
#     not depend on their inputs).
# Consequences, stated in the docstrings and the guide: the backward is a collective too (every
# rank must backpropagate through the same collectives in the same order, or the others wait
# for the group's timeout); and a loss already summed over ranks (``psum(local_loss)``) and
# backpropagated on every rank counts each rank's term N times, as in JAX; differentiate the
# local loss and average the gradients instead (``data_parallel``). Only floating-point and
# complex leaves carry gradients; integer and boolean leaves pass through without one.
# One ``autograd.Function`` wraps the implementations, which run on detached leaves (c10d's
# in-place calls then never see the graph); it is used only when a leaf needs it (grad mode on
# and a leaf requiring grad, a leaf wrapped by a torch.func transform, or a forward-AD dual),
# so the plain path costs only that check. Before this, the in-place calls were invisible to
# autograd: pmax/pmin/broadcast got the identity as gradient (wrong), psum/pmean a rank-local
# one, and all_gather of a tensor requiring grad raised a misleading error.
#
# NOTE [forward mode and vmap of collectives]
# Forward mode (fp.jvp, fp.jacfwd, fp.hessian, fp.hvp, torch.func.jvp, torch.autograd's dual
# tensors) follows JAX too: the tangent of every rank's output collects the tangents of every
# rank's input. psum, pmean, all_gather, psum_scatter and broadcast are linear, so the output
# tangent is the same collective applied to the tangents (psum's is the psum of the tangents);
# pmax / pmin give the tangent of the rank(s) holding the extreme value, averaged over ties
# (the reverse rule's split). Like the backward, the rule is a collective: every rank must
# differentiate through the same collectives in forward mode too (within a call, a leaf
# without a tangent counts as a zero tangent). Before this, dual tensors did not report
# ``requires_grad``, the in-place calls ran on the primals only, and fp.jvp of psum returned
# the rank's own tangent (all_gather: 0).
# torch runs a Function's ``jvp`` with forward AD off, so the pmax / pmin rule re-enables it
# (an outer level of jvp of jvp would see a constant); the linear rules go through the
# Function again and are differentiated at every level.
# vmap (fp.vmap, torch.func.vmap, and jacrev / jacfwd, which vmap over the basis) runs the
# collective once on the batched leaves with the batch axis moved first (the c10d calls have
# no batching rule): elementwise collectives are unchanged, all_gather's ``axis`` and
# psum_scatter's ``scatter_dimension`` move one place right when non-negative. Every rank must
# vmap with the same batch size (the cross-rank tree check sees the batched shapes).
# Before this, vmap raised "the collective failed ... a peer rank may have died" from c10d's
# missing batching rule, naming psum_scatter under jacrev of all_gather.
# Under fp.jit / torch.compile neither works (the functional collectives have no forward-mode
# or batching rule, Dynamo refuses a Function with a ``jvp``; jvp gave 0 and vmap mixed numbers
# across ranks): a batched or dual leaf raises NotImplementedError naming the collective.
# Reverse mode compiles (the Function without jvp/vmap, ``_Collective``).
_IMPLS: dict[str, Callable[..., Any]] = {
    "psum": lambda tree, group: _all_reduce("psum", tree, "sum", group),
    "pmean": lambda tree, group: _all_reduce("pmean", tree, "sum", group, mean=True),
    "pmax": lambda tree, group: _all_reduce("pmax", tree, "max", group),
    "pmin": lambda tree, group: _all_reduce("pmin", tree, "min", group),
    "all_gather": _all_gather_impl,
    "broadcast": _broadcast_impl,
    "psum_scatter": _psum_scatter_impl,
}


def _inexact(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _differentiable(fn: str, tree: Any, **kw: Any) -> Any:
    """``_IMPLS[fn](tree, **kw)``, through :class:`_Collective` when a leaf requires grad, is
    wrapped by a torch.func transform (grad, jvp, vmap) or is a forward-AD dual tensor
    (NOTE [gradients of collectives], NOTE [forward mode and vmap of collectives])."""
    leaves, treedef = fpt.flatten(tree)
    if not _transformed(fn, leaves):
        return _IMPLS[fn](tree, **kw)
    _leaves(fn, tree)  # a leaf that is not a tensor: the TypeError naming its path
    _VALIDATE.get(fn, lambda *a: None)(tree, leaves, kw)
    # Dynamo refuses a Function with a ``jvp`` ("Unsupported custom jvp"): compiled steps
    # take the reverse-mode-only class, eager calls the one with forward mode and vmap
    cls = _Collective if _compiling() else _CollectiveAD
    return fpt.unflatten(treedef, list(cls.apply(fn, kw, treedef, *leaves)))


def _transformed(fn: str, leaves: list[Any]) -> bool:
    """Whether a leaf needs :class:`_Collective`: it requires grad (grad mode on), it is a
    torch.func-wrapped tensor, or it carries a forward-AD tangent. Cheap when no transform is
    active: two global checks and one ``requires_grad`` per leaf."""
    if torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in leaves
    ):
        return True
    if _compiling():
        _refuse_compiled_transform(fn, leaves)
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None and any(
        isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)
        for x in leaves
    ):
        return True
    return _fwad._current_level >= 0 and any(
        isinstance(x, torch.Tensor) and _fwad.unpack_dual(x).tangent is not None for x in leaves
    )


def _refuse_compiled_transform(fn: str, leaves: list[Any]) -> None:
    """Under torch.compile the functional collectives have no forward-mode or batching rule,
    and Dynamo refuses a Function with a ``jvp``: fp.jvp of psum gave 0 there and vmap mixed
    numbers across ranks, so a batched or dual leaf is refused (NOTE [forward mode and vmap of
    collectives])."""
    if any(
        isinstance(x, torch.Tensor)
        and (torch._C._functorch.is_batchedtensor(x) or _fwad.unpack_dual(x).tangent is not None)
        for x in leaves
    ):
        raise NotImplementedError(
            f"fp.distributed.{fn}: forward mode (fp.jvp, fp.jacfwd, fp.hessian) and vmap over a "
            "collective are not supported under fp.jit / torch.compile; run that part eagerly "
            "(both work there)"
        )


def _validate_gather(tree: Any, leaves: list[torch.Tensor], kw: dict[str, Any]) -> None:
    for i, x in enumerate(leaves):
        _gather_axis_ok(tree, i, x, kw["axis"], kw["tiled"])


def _validate_scatter(tree: Any, leaves: list[torch.Tensor], kw: dict[str, Any]) -> None:
    n = dist.get_world_size(_group(kw["group"]))
    for i, x in enumerate(leaves):
        _scatter_shape_ok(tree, i, x, kw["scatter_dimension"], kw["tiled"], n)


# Checks on the logical shapes, before a transform changes the physical ones (vmap's batch
# axis): errors then name the user's axis and shape.
_VALIDATE: dict[str, Callable[[Any, list[torch.Tensor], dict[str, Any]], None]] = {
    "all_gather": _validate_gather,
    "psum_scatter": _validate_scatter,
}


class _Collective(torch.autograd.Function):
    """A collective over a flat list of leaves with its transpose as backward
    (NOTE [gradients of collectives])."""

    @staticmethod
    def forward(fn: str, kw: dict[str, Any], treedef: Any, *leaves: torch.Tensor) -> Any:
        out = _IMPLS[fn](fpt.unflatten(treedef, [x.detach() for x in leaves]), **kw)
        if _fwad._current_level >= 0:
            # forward AD lays a view's tangent out like its primal (torch asserts it): the
            # leaves are views into one buffer, so under a dual level they get their own memory
            return tuple(y.clone() if y._base is not None else y for y in fpt.leaves(out))
        return tuple(fpt.leaves(out))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        fn, kw, _, *leaves = inputs
        ctx.fn, ctx.kw = fn, kw
        ctx.dims = [x.dim() for x in leaves]
        ctx.inexact = [_inexact(y.dtype) for y in output]
        ctx.mark_non_differentiable(*[y for y, d in zip(output, ctx.inexact, strict=True) if not d])
        if fn in ("pmax", "pmin"):
            ctx.save_for_backward(*leaves, *output)
            if not _compiling():
                ctx.save_for_forward(*leaves, *output)
        ctx.like = [torch.empty(0, dtype=y.dtype, device=y.device) for y in output]
        ctx.out_shapes = [y.shape for y in output]
        ctx.in_shapes = [x.shape for x in leaves]

    @staticmethod
    def backward(ctx: Any, *cts: torch.Tensor | None) -> Any:
        fn, kw, group = ctx.fn, ctx.kw, ctx.kw["group"]
        idx = [i for i, d in enumerate(ctx.inexact) if d]
        ct = [
            cts[i] if cts[i] is not None else ctx.like[i].new_zeros(ctx.out_shapes[i]) for i in idx
        ]
        dims = [ctx.dims[i] for i in idx]
        if fn in ("psum", "pmean"):
            grads = _differentiable(fn, ct, group=group)
        elif fn in ("pmax", "pmin"):
            saved = ctx.saved_tensors
            n = len(saved) // 2
            masks = [(saved[i] == saved[n + i]).to(c.dtype) for i, c in zip(idx, ct, strict=True)]
            total, count = _differentiable("psum", (ct, masks), group=group)
            grads = [m * t / c for m, t, c in zip(masks, total, count, strict=True)]
        elif fn == "broadcast":
            total = _differentiable("psum", ct, group=group)
            # a 0/1 factor, not fresh zeros: the graph (and so the collectives of a double
            # backward, e.g. jacrev of jacrev) is then the same on every rank
            mine = float(dist.get_rank(_group(group)) == kw["src"])
            grads = [t * mine for t in total]
        elif fn == "all_gather":
            axis, tiled = kw["axis"], kw["tiled"]
            pos = [axis % (k if tiled else k + 1) for k in dims]
            moved = [c.movedim(a, 0) for c, a in zip(ct, pos, strict=True)]
            got = _differentiable(
                "psum_scatter", moved, scatter_dimension=0, tiled=tiled, group=group
            )
            grads = [g.movedim(0, a) if tiled else g for g, a in zip(got, pos, strict=True)]
        else:  # psum_scatter
            d, tiled = kw["scatter_dimension"], kw["tiled"]
            pos = [d % k for k in dims]
            moved = [c.movedim(a, 0) if tiled else c for c, a in zip(ct, pos, strict=True)]
            got = _differentiable("all_gather", moved, axis=0, tiled=tiled, group=group)
            grads = [g.movedim(0, a) for g, a in zip(got, pos, strict=True)]
        out: list[torch.Tensor | None] = [None] * len(ctx.inexact)
        for i, g in zip(idx, grads, strict=True):
            out[i] = g
        return (None, None, None, *out)


class _CollectiveAD(_Collective):
    """:class:`_Collective` with its forward-mode rule (the collective on the tangents; the
    winners' tangent for pmax/pmin) and a vmap rule that runs it on the batched leaves
    (NOTE [forward mode and vmap of collectives]). Eager only (Dynamo refuses a custom jvp)."""

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        fn, kw, group = ctx.fn, ctx.kw, ctx.kw["group"]
        idx = [i for i, d in enumerate(ctx.inexact) if d]
        tan = [
            tangents[3 + i]
            if tangents[3 + i] is not None
            else ctx.like[i].new_zeros(ctx.in_shapes[i])
            for i in idx
        ]
        if fn in ("pmax", "pmin"):
            saved = ctx.saved_tensors
            n = len(saved) // 2
            # torch runs this rule with forward AD off: an outer forward level (jvp of jvp,
            # jacfwd of jacfwd) would see the tangent as a constant
            with _fwad._set_fwd_grad_enabled(True):
                masks = [
                    (saved[i] == saved[n + i]).to(t.dtype) for i, t in zip(idx, tan, strict=True)
                ]
                total, count = _differentiable(
                    "psum", ([m * t for m, t in zip(masks, tan, strict=True)], masks), group=group
                )
                outs = [t / c for t, c in zip(total, count, strict=True)]
        else:  # linear: the same collective on the tangents
            outs = _differentiable(fn, tan, **kw)
        out: list[torch.Tensor | None] = [None] * len(ctx.inexact)
        for i, t in zip(idx, outs, strict=True):
            out[i] = t
        return tuple(out)

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[Any, ...],
        fn: str,
        kw: dict[str, Any],
        treedef: Any,
        *leaves: torch.Tensor,
    ) -> Any:
        dims = in_dims[3:]
        batched = [i for i, d in enumerate(dims) if d is not None]
        plain = [i for i, d in enumerate(dims) if d is None]
        out: list[Any] = [None] * len(leaves)
        if plain:
            got = _differentiable(fn, [leaves[i] for i in plain], **kw)
            for i, y in zip(plain, got, strict=True):
                # returned batched (a broadcast view): torch 2.11 mis-places an unbatched
                # output of a Function's vmap rule under out_dims != 0
                out[i] = y.unsqueeze(0).expand(info.batch_size, *y.shape)
        if batched:
            # the batch axis goes first; a non-negative axis of all_gather / psum_scatter
            # moves one place right, a negative one counts from the end and stays
            kw_b = dict(kw)
            for k in ("axis", "scatter_dimension"):
                if k in kw_b and kw_b[k] >= 0:
                    kw_b[k] += 1
            moved = [leaves[i].movedim(dims[i], 0) for i in batched]
            tree = fpt.unflatten(treedef, moved) if not plain else moved
            got = fpt.leaves(_differentiable(fn, tree, **kw_b))
            for i, y in zip(batched, got, strict=True):
                out[i] = y
        return tuple(out), tuple(0 for _ in dims)


def psum(tree: Any, *, group: Any = None) -> Any:
    """Sum every leaf over the ranks of ``group`` (``jax.lax.psum``).

    One collective per dtype (NOTE [one collective per bucket]); the tree must agree
    across ranks (NOTE [cross-rank tree check]). Works eagerly and under
    ``fp.jit(fullgraph=True)``. Unlike JAX there is no ``axis_name``: the ranks of a
    process group play the role of a mapped axis.

    Args:
      tree: a pytree of tensors (same structure, shapes and dtypes on every rank).
      group: a ``torch.distributed`` process group, or ``None`` for the default one.

    Returns:
      A new tree of the sums (inputs are not modified).

    Notes:
      NOTE [gradients of collectives]: differentiable as in JAX (the gradient of the sum
        over ranks of every rank's objective): the gradient w.r.t. each rank's input is the psum of
        every rank's cotangent (``torch.distributed.nn.functional.all_reduce`` does the same). The
        backward is a collective too: every rank must backpropagate through the same collectives in
        the same order. Integer and boolean leaves get no gradient. A loss summed over ranks
        (``psum(loss)``) and backpropagated on every rank thus counts each rank's term N times;
        differentiate the local loss and average the gradients (``data_parallel``) instead.
        Forward mode (``fp.jvp``, ``fp.jacfwd``, ``fp.hessian``) gives the psum of every rank's
        tangent as the output's tangent, and vmap (``fp.vmap``, ``fp.jacrev``) runs the collective
        on the batched leaves (the batch axis is kept).
      NOTE [cross-rank tree check]: on the first eager call per (treedef, shapes, dtypes) the ranks
        all-gather a hash of that signature and compare; a mismatch raises the same ``ValueError``
        naming the rank and key path on every rank instead of hanging. Later calls with a
        signature already checked are not re-checked: if ranks then pass DIFFERENT previously
        checked signatures (per-rank sizes that vary by step), the result can be silently wrong,
        or gloo can abort the process; call :func:`check_same_tree` first in that case.
      NOTE [one collective per bucket]: leaves are grouped by ``(device, dtype)`` and each group is
        flattened into one buffer sent with one collective, then split back: one round trip per
        dtype instead of one per leaf.

    Example:
      >>> import functorch_pipeline as fp
      >>> with fp.distributed.local_group():  # one rank here; under torchrun, N ranks
      ...     fp.distributed.psum({"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)})
      {'w': tensor([1., 2.]), 'n': tensor(3)}
    """
    return _differentiable("psum", tree, group=group)


def pmean(tree: Any, *, group: Any = None) -> Any:
    """Average every leaf over the ranks of ``group`` (``jax.lax.pmean``).

    Computed as the sum divided by the group size; floating-point leaves only.

    Args:
      tree: a pytree of floating-point tensors.
      group: a process group, or ``None`` for the default one.

    Returns:
      A new tree of the means.

    Notes:
      NOTE [gradients of collectives]: differentiable as in JAX (the gradient of the sum
        over ranks of every rank's objective): the gradient w.r.t. each rank's input is the pmean of
        every rank's cotangent. The backward is a collective too: every rank must backpropagate
        through the same collectives in the same order. Integer and boolean leaves get no gradient.
        Forward mode (``fp.jvp``, ``fp.jacfwd``, ``fp.hessian``) gives the pmean of every rank's
        tangent as the output's tangent, and vmap (``fp.vmap``, ``fp.jacrev``) runs the collective
        on the batched leaves (the batch axis is kept).

    Example:
      >>> import functorch_pipeline as fp
      >>> with fp.distributed.local_group():
      ...     fp.distributed.pmean(torch.tensor([0.5]))
      tensor([0.5000])
    """
    return _differentiable("pmean", tree, group=group)


def pmax(tree: Any, *, group: Any = None) -> Any:
    """Elementwise maximum of every leaf over the ranks (``jax.lax.pmax``).

    Args:
      tree: a pytree of tensors.
      group: a process group, or ``None`` for the default one.

    Returns:
      A new tree of the maxima.

    Notes:
      NOTE [gradients of collectives]: differentiable as in JAX (the gradient of the sum
        over ranks of every rank's objective): the psum of every rank's cotangent goes to the rank(s)
        holding the maximum (split evenly on ties, as ``torch.amax``), 0 to the others. The backward
        is a collective too: every rank must backpropagate through the same collectives in the same
        order. Integer and boolean leaves get no gradient.
        Forward mode (``fp.jvp``, ``fp.jacfwd``, ``fp.hessian``) gives the tangent of the rank(s)
        holding the maximum (averaged over ties) as the output's tangent, and vmap (``fp.vmap``,
        ``fp.jacrev``) runs the collective on the batched leaves (the batch axis is kept).

    Example:
      >>> import functorch_pipeline as fp
      >>> with fp.distributed.local_group():
      ...     fp.distributed.pmax(torch.tensor([1, -1]))
      tensor([ 1, -1])
    """
    return _differentiable("pmax", tree, group=group)


def pmin(tree: Any, *, group: Any = None) -> Any:
    """Elementwise minimum of every leaf over the ranks (``jax.lax.pmin``).

    Args:
      tree: a pytree of tensors.
      group: a process group, or ``None`` for the default one.

    Returns:
      A new tree of the minima.

    Notes:
      NOTE [gradients of collectives]: as :func:`pmax`'s, with the rank(s) holding the
        minimum (ties split evenly, as ``torch.amin``) in place of the maximum.

    Example:
      >>> import functorch_pipeline as fp
      >>> with fp.distributed.local_group():
      ...     fp.distributed.pmin(torch.tensor([1, -1]))
      tensor([ 1, -1])
    """
    return _differentiable("pmin", tree, group=group)


def all_gather(tree: Any, *, axis: int = 0, tiled: bool = False, group: Any = None) -> Any:
    """Gather every leaf from all ranks (``jax.lax.all_gather``).

    Args:
      tree: a pytree of tensors.
      axis: where the rank axis goes (``tiled=False``) or which axis is concatenated
        (``tiled=True``).
      tiled: ``False``: a new axis of size ``world_size`` at ``axis``; ``True``: the
        ranks' leaves concatenated along ``axis`` (rank order).
      group: a process group, or ``None`` for the default one.

    Returns:
      A new tree of the gathered leaves.

    Notes:
      NOTE [gradients of collectives]: differentiable as in JAX (the gradient of the sum
        over ranks of every rank's objective): the gradient w.r.t. each rank's input is the
        psum_scatter of the cotangents along the gathered axis
        (``torch.distributed.nn.functional.all_gather``). The backward is a collective too: every rank
        must backpropagate through the same collectives in the same order. Integer and boolean leaves
        get no gradient.
        Forward mode (``fp.jvp``, ``fp.jacfwd``, ``fp.hessian``) gives the all_gather of the
        tangents as the output's tangent, and vmap (``fp.vmap``, ``fp.jacrev``) runs the collective
        on the batched leaves (the batch axis is kept).

    Example:
      >>> import functorch_pipeline as fp
      >>> with fp.distributed.local_group():
      ...     x = torch.tensor([1.0, 2.0])
      ...     fp.distributed.all_gather(x), fp.distributed.all_gather(x, tiled=True)
      (tensor([[1., 2.]]), tensor([1., 2.]))
    """
    return _differentiable("all_gather", tree, axis=axis, tiled=tiled, group=group)


def broadcast(tree: Any, *, src: int = 0, group: Any = None) -> Any:
    """Every rank receives rank ``src``'s leaves (``torch.distributed.broadcast``, pure).

    JAX has no process-level broadcast; this is the usual way to make a tree (initial
    parameters, a key) identical on all ranks.

    Args:
      tree: a pytree of tensors; its structure and shapes must match on every rank.
      src: the rank (in ``group``) whose values everyone gets.
      group: a process group, or ``None`` for the default one.

    Returns:
      A new tree holding ``src``'s values.

    Notes:
      NOTE [gradients of collectives]: differentiable as in JAX (the gradient of the sum
        over ranks of every rank's objective): rank ``src`` receives the sum of every rank's
        cotangent, the other ranks 0 (their outputs do not depend on their inputs), as
        ``torch.distributed.nn.functional.broadcast``. The backward is a collective too: every rank
        must backpropagate through the same collectives in the same order. Integer and boolean leaves
        get no gradient.
        Forward mode (``fp.jvp``, ``fp.jacfwd``, ``fp.hessian``) gives rank ``src``'s tangent as the
        output's tangent, and vmap (``fp.vmap``, ``fp.jacrev``) runs the collective on the batched
        leaves (the batch axis is kept).

    Example:
      >>> import functorch_pipeline as fp
      >>> with fp.distributed.local_group():
      ...     fp.distributed.broadcast({"w": torch.tensor([1.0])}, src=0)
      {'w': tensor([1.])}
    """
    return _differentiable("broadcast", tree, src=src, group=group)


def psum_scatter(
    tree: Any, *, scatter_dimension: int = 0, tiled: bool = False, group: Any = None
) -> Any:
    """Sum over ranks and give each rank one slice (``jax.lax.psum_scatter``).

    Each leaf's axis ``scatter_dimension`` is cut into ``world_size`` equal blocks; rank
    ``r`` receives the sum over ranks of block ``r``. ``tiled=False`` (JAX's default) needs
    that axis to have exactly ``world_size`` entries and removes it; ``tiled=True`` needs
    it divisible by ``world_size`` and keeps it, ``world_size`` times shorter.

    Args:
      tree: a pytree of tensors.
      scatter_dimension: the axis to cut.
      tiled: see above.
      group: a process group, or ``None`` for the default one.

    Returns:
      A new tree of this rank's summed blocks.

    Notes:
      NOTE [gradients of collectives]: differentiable as in JAX (the gradient of the sum
        over ranks of every rank's objective): the gradient w.r.t. each rank's input is the all_gather
        of the cotangents of every rank's block. The backward is a collective too: every rank must
        backpropagate through the same collectives in the same order. Integer and boolean leaves get
        no gradient.
        Forward mode (``fp.jvp``, ``fp.jacfwd``, ``fp.hessian``) gives the psum_scatter of the
        tangents as the output's tangent, and vmap (``fp.vmap``, ``fp.jacrev``) runs the collective
        on the batched leaves (the batch axis is kept).

    Example:
      >>> import functorch_pipeline as fp
      >>> with fp.distributed.local_group():
      ...     fp.distributed.psum_scatter(torch.arange(4.0), tiled=True)
      tensor([0., 1., 2., 3.])
    """
    return _differentiable(
        "psum_scatter", tree, scatter_dimension=scatter_dimension, tiled=tiled, group=group
    )


reduce_scatter = psum_scatter
"""``torch.distributed``'s name for :func:`psum_scatter` (same function)."""
