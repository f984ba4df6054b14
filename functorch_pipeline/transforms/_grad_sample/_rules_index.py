"""Per-sample rules for indexing: ``p[ids]`` with the batch's ids (a parameter indexed by the
batch) and ``h[key] = p`` (a parameter written into a batched tensor in place).

# NOTE [a parameter indexed by the batch]
``p[ids]`` and ``p.index_select(0, ids)`` with integer ids from the batch select one row
of ``p`` (or a block: ``W[y]`` of a ``(C, in, out)`` stack) per id: class-conditional
normalisation's ``gamma[y]``, a recommender's ``user_table[user_ids]``, a mixture's
per-class weights ``W[y]`` in a ``bmm``. That is ``F.embedding(ids, p.reshape(V, -1))``
reshaped to ``ids.shape + p.shape[1:]``, the same rows, so it runs as that and takes the
embedding rule's parts (per-example scatters; ghost's norms without per-example
gradients, NOTE [one-dimensional indices] in ``_rules`` for which ids hold the
examples). Only ids that read a batch argument (a view of it: ``y``, ``ids[:, :5]``,
``batch[:, 0]``) take this path; ids computed in ``loss_fn`` (``y % C``, positions
``arange(T)``) keep the path they had: a constant of ``loss_fn`` makes a derived tensor
(NOTE [derived parameters] in ``_engine``, Swin's ``table[index]``), and batch data
computed there is refused, so that the embedding rule's size checks never decide alone
whether such ids hold the examples. Negative ids (which indexing wraps and
``F.embedding`` does not) and any other key keep that path too.

# NOTE [a parameter written into the batch]
Masked modelling writes a learned vector into the positions it hides: wav2vec 2.0's and
HuBERT's ``hidden_states[mask_time_indices] = self.masked_spec_embed`` (SpecAugment in
training mode), a masked autoencoder's ``x[mask] = mask_token``, a class token written
into position 0 (``h[:, 0] = cls``). ``torch.func.vmap`` cannot run the boolean-mask form
at all ("We do not support batching operators that can support dynamic shape"), so this
rule is the only method that takes it.

``h`` must hold the examples on axis 0 (NOTE [which axis is the batch]; a copy of the data
made inside ``loss_fn`` is decided by a padded run, NOTE [constants or batch data]). The
value, ``p`` broadcast to the shape of ``h[key]`` (after torch drops its leading axes of
size 1) and cast to ``h``'s dtype, is formed as a leaf of that shape and written into ``h``
in place, as eager PyTorch writes it, so later ops see the new values and ``h``'s history
runs through the write. Each written element belongs to the example whose row of ``h`` it
lands in, which indexing a tensor of row numbers ``arange(B)`` (broadcast to ``h``'s
shape) with the same ``key`` tells, whatever the key (a boolean mask, integer tensors,
slices, ``None``, an ellipsis); each also reads one element of ``p``, which indexing
``arange(p.numel())`` broadcast the same way tells. Example ``b``'s gradient is the leaf's
gradient summed by (row, element of ``p``) with ``index_add_``: a ``"direct"`` part, so
ghost clipping forms that one parameter's per-example gradients (``B x p.numel()``, the
size of a token). Rows merged from ``m`` per example are summed per example
(NOTE [examples merged into axis 0]). A ``h`` with no batch axis (a constant table made in
``loss_fn``) is refused: its out-of-place form ``table.index_put((idx,), p)`` makes a
derived tensor (NOTE [derived parameters]). ``h.index_put(indices, p, accumulate)`` (and
``index_put_``, which runs as it on a copy) is the same write on a copy of ``h``
(``accumulate=True`` adds, with the same parts); on a constant ``h`` it makes that derived
tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._rules import _get
from functorch_pipeline.transforms._grad_sample._rules import register_rule

__all__ = ["INDEX"]

_T = torch.Tensor
_OP = "`Tensor.__setitem__`"
INDEX = (_T.__getitem__, _T.index_select, torch.index_select, _T.__setitem__, _T.index_put,
         torch.index_put)  # ghost-ready


def _get_item(engine: Engine, args: Any, kwargs: dict[str, Any]) -> Any:
    """``p[key]``: NOTE [a parameter indexed by the batch]."""
    p, key = (args + (None, None))[:2]
    rest = key[1:] if isinstance(key, tuple) else ()
    if (isinstance(key, tuple) and key and sum(k is Ellipsis for k in rest) <= 1
            and all(k is Ellipsis or isinstance(k, slice) and k == slice(None) for k in rest)):
        key = key[0]
    return _rows(engine, _T.__getitem__, args, kwargs, p, key)


def _index_select(func: Any) -> Any:
    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> Any:
        """``p.index_select(0, ids)``: NOTE [a parameter indexed by the batch]."""
        p, dim, ids = (_get(args, kwargs, i, n) for i, n in enumerate(("input", "dim", "index")))
        first = isinstance(dim, int) and isinstance(p, torch.Tensor) and dim in (0, -p.dim())
        return _rows(engine, func, args, kwargs, p, ids if first and "out" not in kwargs else None)

    return rule


def _rows(engine: Engine, func: Any, args: Any, kwargs: dict[str, Any], p: Any, ids: Any) -> Any:
    """``p``'s rows at ``ids`` through the embedding rule when the ids read the batch, else
    the path an op without a rule takes (a derived tensor, or a refusal)."""
    slot = engine.slot(p)
    if (slot is not None and isinstance(ids, torch.Tensor) and engine.slot(ids) is None
            and ids.dtype in (torch.int64, torch.int32) and ids.dim() >= 1 and p.dim() >= 1
            and engine.reads_batch(ids) and not bool((ids < 0).any())):
        w = p if p.dim() == 2 else p.reshape(p.shape[0], -1)
        out = F.embedding(ids, w)
        return out if p.dim() == 2 else out.reshape(*ids.shape, *p.shape[1:])

    def refuse() -> int:
        raise Unsupported(f"{engine.names(args, kwargs)} is indexed by a tensor that holds "
                          "examples in a way no rule takes (row ids read from a batch argument "
                          "are: NOTE [a parameter indexed by the batch])")

    engine.with_constants(func, args, kwargs, refuse)
    return engine.derive_op(func, args, kwargs)


def _set_item(engine: Engine, args: Any, kwargs: dict[str, Any]) -> None:
    """``h[key] = p`` for a plain ``h`` (a tracked ``h`` is NOTE [in-place on derived
    tensors]): NOTE [a parameter written into the batch]."""
    h, key, value = (args + (None, None, None))[:3]
    if kwargs or not _write(engine, h, key, value, False, _OP):
        raise Unsupported(
            f"{engine.name(engine.slot(value))} is written by {_OP} into a tensor of shape "
            f"{tuple(h.shape)} made inside loss_fn with no batch axis: write it out of place "
            "(`table.index_put((idx,), p)`) to make a tensor computed from the parameter")


def _index_put(func: Any) -> Any:
    def rule(engine: Engine, args: Any, kwargs: dict[str, Any]) -> Any:
        """``h.index_put(indices, p, accumulate)``, out of place (``index_put_`` runs as it,
        on a copy: ``Engine.in_place_on_plain``): NOTE [a parameter written into the batch];
        a constant ``h`` makes a derived tensor."""
        h, indices, value = (_get(args, kwargs, i, n) for i, n in enumerate(("input", "indices", "values")))
        accumulate = _get(args, kwargs, 3, "accumulate", False)
        key = tuple(indices) if isinstance(indices, (list, tuple)) else None
        if key is not None and engine.slot(h) is None and set(kwargs) <= {"accumulate"}:
            out = h.clone()
            if _write(engine, out, key, value, bool(accumulate), f"`{func.__name__}`"):
                return out

        def refuse() -> int:
            raise Unsupported(f"{engine.names(args, kwargs)} is used by `{func.__name__}` in a way no "
                              "rule takes (NOTE [a parameter written into the batch])")

        engine.with_constants(func, args, kwargs, refuse)
        return engine.derive_op(func, args, kwargs)

    return rule


def _write(engine: Engine, h: Any, key: Any, value: Any, accumulate: bool, op: str) -> bool:
    """Write (or with ``accumulate`` add) tracked ``value`` into ``h[key]`` in place, its
    per-example gradient recorded (NOTE [a parameter written into the batch]); False, with
    nothing written, when ``h`` has no batch axis."""
    slot = engine.slot(value)
    if slot is None or not isinstance(h, torch.Tensor) or engine.slots((key,), {}):
        raise Unsupported(f"{engine.names((h, key, value), {})} is used by {op} as the tensor "
                          "written into or as an index, which has no per-sample gradient")
    axis = engine.examples_axis(
        h, lambda: engine.check_input(h, op, [slot], min_dim=1, features=h.dim() - 1),
        f"{op} of {engine.name(slot)}")
    if axis is None:
        return False
    p = engine.bases[slot]
    rows = h.shape[0]
    owner = torch.arange(rows, device=h.device).view([rows] + [1] * (h.dim() - 1)).expand(h.shape)[key]
    where = torch.arange(p.numel(), device=h.device).view(p.shape)
    while where.dim() > owner.dim() and where.shape[0] == 1:  # torch drops these too
        where = where[0]
    try:
        where = where.expand(owner.shape)
    except RuntimeError:
        raise Unsupported(f"{engine.name(slot)} of shape {tuple(p.shape)} is written by {op} "
                          f"into {tuple(owner.shape)} elements, a shape it does not broadcast to") from None
    leaf = p.reshape(-1).to(h.dtype)[where].requires_grad_()
    if accumulate:
        h.index_put_(key, leaf, accumulate=True)
    else:
        h[key] = leaf
    engine.record(leaf, _finish, owner * p.numel() + where, slot, rows)
    return True


def _finish(engine: Engine, g: torch.Tensor, index: torch.Tensor, slot: int, rows: int) -> None:
    p = engine.bases[slot]
    part = g.new_zeros(rows * p.numel()).index_add_(0, index.reshape(-1), g.reshape(-1))
    engine.add("direct", slot, part.view(rows, *p.shape))


register_rule(_T.__getitem__, _get_item)
register_rule(_T.index_select, _index_select(_T.index_select))
register_rule(torch.index_select, _index_select(torch.index_select))
register_rule(_T.__setitem__, _set_item)
register_rule(_T.index_put, _index_put(_T.index_put))
register_rule(torch.index_put, _index_put(torch.index_put))
